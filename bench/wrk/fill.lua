-- Distinct resources: request n writes resource (n mod BENCH_FILL_RESOURCES) with token 1, so after
-- that many requests the gate has seen that many resources (later rounds are current-token writes).
local resources = tonumber(os.getenv("BENCH_FILL_RESOURCES") or "1000000")
local n = 0
request = function()
  local resource = n % resources
  n = n + 1
  return wrk.format("PUT", "/r/fill" .. resource, { ["Fencing-Token"] = "1" })
end
done = dofile("bench/wrk/report.lua")
