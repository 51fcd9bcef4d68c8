-- The hot path: fenced PUTs of one resource with its current token.
wrk.method = "PUT"
wrk.path = "/r/hot"
wrk.headers["Fencing-Token"] = "1"
done = dofile("bench/wrk/report.lua")
