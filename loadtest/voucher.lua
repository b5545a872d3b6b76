-- wrk script: the voucher API is POST /api/v1/voucher with a JSON body.
-- wrk -t1 -c50 -d10s -s loadtest/voucher.lua http://127.0.0.1:8080/api/v1/voucher
wrk.method = "POST"
wrk.body = '{"customer_id": 123, "country_code": "Peru", "last_order_ts": "2021-10-26 00:00:00", "first_order_ts": "2021-10-26 00:00:00", "total_orders": 14, "segment_name": "frequent_segment"}'
wrk.headers["Content-Type"] = "application/json"
