-- Plain GETs of one resource: unfenced reads, passed straight through.
wrk.method = "GET"
wrk.path = "/r/hot"
done = dofile("bench/wrk/report.lua")
