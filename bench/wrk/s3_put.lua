-- One S3 PutObject through the s3 profile (Host forwarded unchanged).
wrk.method = "PUT"
wrk.path = "/bucket/wallets/1"
wrk.headers["Fencing-Token"] = "1"
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.body = '120'
done = dofile("bench/wrk/report.lua")
