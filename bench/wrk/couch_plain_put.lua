-- The same document write through a plain path route: the baseline of couch_put.
wrk.method = "PUT"
wrk.path = "/plain/bank/wallet:1"
wrk.headers["Fencing-Token"] = "1"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"balance":120}'
done = dofile("bench/wrk/report.lua")
