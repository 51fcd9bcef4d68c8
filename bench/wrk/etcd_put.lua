-- One etcd put through the etcd-v3 profile: the body is read and its base64 key decoded before the
-- gate; wallet:1's token is current after the first request.
wrk.method = "POST"
wrk.path = "/v3/kv/put"
wrk.headers["Fencing-Token"] = "1"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"key": "L3dhbGxldHMvMQ==", "value": "MTIw"}'
done = dofile("bench/wrk/report.lua")
