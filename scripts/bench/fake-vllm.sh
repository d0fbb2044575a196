#!/usr/bin/env bash
# A fake vLLM engine pair for proxy benchmarks: nginx with its Lua module answers the OpenAI
# routes with fixed bodies (JSON, or an event stream when the request says "stream": true), every
# answer carrying kv_transfer_params, so a P/D proxy in front of it is never waiting on the
# backend (nginx answers ~100k requests/s on a 2-core machine).
#   scripts/bench/fake-vllm.sh start RUN_DIR PREFILL_PORT DECODE_PORT
#   scripts/bench/fake-vllm.sh stop RUN_DIR
# Listens on 127.0.0.1 only. Needs Debian's nginx and libnginx-mod-http-lua. LOG=1 writes one
# line per request (with its body) to RUN_DIR/access.log, to see what a proxy sends.
set -euo pipefail

usage() { sed -n '2,9p' "$0" >&2; exit 2; }

start() {
    local run=$1 prefill_port=$2 decode_port=$3
    mkdir -p "$run/tmp"
    run=$(cd "$run" && pwd)
    if [ -f "$run/nginx.pid" ] && kill -0 "$(cat "$run/nginx.pid")" 2>/dev/null; then
        echo "fake vLLM already running in $run" >&2
        return 0
    fi
    local access_log="access_log off;"
    if [ "${LOG:-0}" = 1 ]; then
        access_log="log_format requests escape=json '{\"port\":\$server_port,\"uri\":\"\$request_uri\",\"status\":\$status,\"x_request_id\":\"\$http_x_request_id\",\"body\":\"\$request_body\"}';
    access_log $run/access.log requests;"
    fi
    cat >"$run/nginx.conf" <<NGINX
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
worker_processes 1;
daemon on;
pid $run/nginx.pid;
error_log $run/error.log warn;
events { worker_connections 16384; }
http {
    default_type application/json;
    client_body_temp_path $run/tmp/body;
    proxy_temp_path $run/tmp/proxy;
    fastcgi_temp_path $run/tmp/fastcgi;
    uwsgi_temp_path $run/tmp/uwsgi;
    scgi_temp_path $run/tmp/scgi;
    # The whole request body in memory, where the Lua handler (and the log) can read it.
    client_body_buffer_size 1m;
    client_body_in_single_buffer on;
    client_max_body_size 16m;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    tcp_nodelay on;
    server_tokens off;
    $access_log
    init_by_lua_file $run/answers.lua;
    server {
        listen 127.0.0.1:$prefill_port reuseport backlog=4096;
        listen 127.0.0.1:$decode_port reuseport backlog=4096;
        location = /health { default_type text/plain; return 200 ''; }
        location = /v1/models { content_by_lua_block { ngx.print(ANSWERS.models) } }
        location = /v1/completions { content_by_lua_block { ANSWERS.respond("completions") } }
        location = /v1/chat/completions { content_by_lua_block { ANSWERS.respond("chat") } }
        location / { return 404 '{"error":{"message":"not a route of the fake engine","code":404}}'; }
    }
}
NGINX
    cat >"$run/answers.lua" <<'LUA'
-- Every answer is built once, at start: the handler only picks one.
local usage = '"usage":{"prompt_tokens":8,"completion_tokens":16,"total_tokens":24}'
local kv = '"kv_transfer_params":{"do_remote_prefill":true,"do_remote_decode":false,' ..
    '"remote_block_ids":[1,2,3],"remote_engine_id":"fake-engine","remote_host":"127.0.0.1",' ..
    '"remote_port":5600,"tp_size":1}'
local head = '"created":1700000000,"model":"m",'
local text = ' hello world from the fake engine'

local function chunk(api, i, last)
    local finish = last and '"length"' or 'null'
    local choice
    if api == "chat" then
        local role = i == 0 and '"role":"assistant",' or ''
        choice = '{"index":0,"delta":{' .. role .. '"content":" t' .. i .. '"},"finish_reason":' .. finish .. '}'
    else
        choice = '{"index":0,"text":" t' .. i .. '","finish_reason":' .. finish .. '}'
    end
    local object = api == "chat" and "chat.completion.chunk" or "text_completion"
    local tail = last and (',' .. usage .. ',' .. kv) or ''
    return 'data: {"id":"fake-1","object":"' .. object .. '",' .. head ..
        '"choices":[' .. choice .. ']' .. tail .. '}\n\n'
end

local function stream(api)
    local parts = {}
    for i = 0, 15 do parts[#parts + 1] = chunk(api, i, i == 15) end
    parts[#parts + 1] = 'data: [DONE]\n\n'
    return table.concat(parts)
end

local function whole(api)
    local choice
    if api == "chat" then
        choice = '{"index":0,"message":{"role":"assistant","content":"' .. text .. '"},"finish_reason":"length"}'
    else
        choice = '{"index":0,"text":"' .. text .. '","finish_reason":"length"}'
    end
    local object = api == "chat" and "chat.completion" or "text_completion"
    return '{"id":"fake-1","object":"' .. object .. '",' .. head .. '"choices":[' .. choice ..
        '],' .. usage .. ',' .. kv .. '}'
end

ANSWERS = {
    models = '{"object":"list","data":[{"id":"m","object":"model","created":1700000000,' ..
        '"owned_by":"vllm","root":"m","max_model_len":4096}]}',
    whole = { completions = whole("completions"), chat = whole("chat") },
    stream = { completions = stream("completions"), chat = stream("chat") },
}

function ANSWERS.respond(api)
    ngx.req.read_body()
    local body = ngx.req.get_body_data() or ''
    if body:find('"stream"%s*:%s*true') then
        ngx.header["Content-Type"] = "text/event-stream; charset=utf-8"
        ngx.header["Cache-Control"] = "no-cache"
        ngx.print(ANSWERS.stream[api])
    else
        ngx.header["Content-Type"] = "application/json"
        ngx.print(ANSWERS.whole[api])
    end
end
LUA
    nginx -q -t -p "$run" -c "$run/nginx.conf"
    nginx -p "$run" -c "$run/nginx.conf"
    local port
    for port in "$prefill_port" "$decode_port"; do
        for _ in $(seq 50); do
            curl -fsS -o /dev/null "http://127.0.0.1:$port/health" 2>/dev/null && break
            sleep 0.1
        done
        curl -fsS -o /dev/null "http://127.0.0.1:$port/health" ||
            { echo "fake vLLM does not answer on $port (see $run/error.log)" >&2; exit 1; }
    done
    echo "fake vLLM: prefill 127.0.0.1:$prefill_port, decode 127.0.0.1:$decode_port ($run)"
}

stop() {
    local run=$1
    [ -f "$run/nginx.pid" ] || return 0
    # Only the master this script started, by the pid nginx wrote.
    kill -QUIT "$(cat "$run/nginx.pid")" 2>/dev/null || true
    for _ in $(seq 20); do [ -f "$run/nginx.pid" ] || break; sleep 0.1; done
}

case "${1:-}" in
start) [ $# -eq 4 ] || usage; start "$2" "$3" "$4" ;;
stop) [ $# -eq 2 ] || usage; stop "$2" ;;
*) usage ;;
esac
