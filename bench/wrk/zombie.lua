-- A zombie storm: token 1 against resources that are at a higher token. Every answer is a 409
-- whose audit row was committed first. Spread over BENCH_ZOMBIE_RESOURCES resources (default 100).
local resources = tonumber(os.getenv("BENCH_ZOMBIE_RESOURCES") or "100")
local n = 0
request = function()
  n = n + 1
  return wrk.format("PUT", "/r/zombie" .. (n % resources), { ["Fencing-Token"] = "1" })
end
done = dofile("bench/wrk/report.lua")
