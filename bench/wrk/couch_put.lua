-- One CouchDB document write through the couchdb profile (the path names the document).
wrk.method = "PUT"
wrk.path = "/bank/wallet:1"
wrk.headers["Fencing-Token"] = "1"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"balance":120}'
done = dofile("bench/wrk/report.lua")
