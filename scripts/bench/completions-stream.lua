-- wrk -s scripts/bench/completions-stream.lua URL: POST /v1/completions with "stream": true
-- (an event stream of 16 tokens and [DONE] from the fake engine).
wrk.method = "POST"
wrk.path = "/v1/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"m","prompt":"Hello, my name is","max_tokens":16,"temperature":0,"stream":true}'
