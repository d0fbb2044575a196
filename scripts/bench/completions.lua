-- wrk -s scripts/bench/completions.lua URL: POST /v1/completions, one JSON answer each.
wrk.method = "POST"
wrk.path = "/v1/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"m","prompt":"Hello, my name is","max_tokens":16,"temperature":0}'
