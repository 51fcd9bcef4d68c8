-- The same etcd put through a plain path route (one resource for the whole keyspace): the baseline
-- the profile's cost is measured against.
wrk.method = "POST"
wrk.path = "/plain/v3/kv/put"
wrk.headers["Fencing-Token"] = "1"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"key": "L3dhbGxldHMvMQ==", "value": "MTIw"}'
done = dofile("bench/wrk/report.lua")
