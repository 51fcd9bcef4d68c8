-- Same-token fenced PUTs spread over the resources named in BENCH_IDS (comma-separated ids of
-- /r/{id}), in turn; every resource must already be at token 1.
local ids = {}
for id in string.gmatch(os.getenv("BENCH_IDS") or "hot", "[^,]+") do
  ids[#ids + 1] = id
end
local n = 0
request = function()
  n = n + 1
  return wrk.format("PUT", "/r/" .. ids[(n % #ids) + 1], { ["Fencing-Token"] = "1" })
end
done = dofile("bench/wrk/report.lua")
