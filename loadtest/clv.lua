-- wrk script: the CLV API is GET /get_clv with a JSON body.
-- wrk -t1 -c10 -d10s -s loadtest/clv.lua http://127.0.0.1:8080/get_clv
wrk.method = "GET"
wrk.body = '{"customer_id": "450e1c2cbd21687780153995f1be0c23"}'
wrk.headers["Content-Type"] = "application/json"
