-- Durable epoch advances: request n raises resource (n mod R) to token 1 + n div R, so every
-- request is a new token for its resource (R = BENCH_ADVANCE_RESOURCES, default 10000). Each one is
-- committed to SQLite before it is forwarded. Run with one wrk thread so the counter is global.
local resources = tonumber(os.getenv("BENCH_ADVANCE_RESOURCES") or "10000")
local n = 0
request = function()
  local resource = n % resources
  local token = 1 + math.floor(n / resources)
  n = n + 1
  return wrk.format("PUT", "/r/adv" .. resource, { ["Fencing-Token"] = tostring(token) })
end
done = dofile("bench/wrk/report.lua")
