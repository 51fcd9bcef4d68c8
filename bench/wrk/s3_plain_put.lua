-- The same PutObject through a plain path route: the baseline of s3_put.
wrk.method = "PUT"
wrk.path = "/plain/bucket/wallets/1"
wrk.headers["Fencing-Token"] = "1"
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.body = '120'
done = dofile("bench/wrk/report.lua")
