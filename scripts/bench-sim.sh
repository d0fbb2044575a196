#!/usr/bin/env bash
# Simulator throughput on ONE core with zero delays (the issue's target: >= 20k non-streaming
# requests/s), and memory before/after a long run. Not a test: prints figures.
#   scripts/bench-sim.sh [DURATION_SECONDS]   (needs wrk: apt-get install -y wrk)
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 2; }
cargo build --release --quiet
bin=target/release/pdctl
port=${SIM_BENCH_PORT:-18900}
taskset -c 0 "$bin" sim --port "$port" --side-channel-port $((port + 1)) --workers 1 \
    >/tmp/pdctl-bench-sim.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.05; done
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
lua=$(mktemp --suffix=.lua)
cat >"$lua" <<'LUA'
wrk.method = "POST"
wrk.path = "/v1/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"sim-model","prompt":"Hello, my name is","max_tokens":16}'
LUA
taskset -c 1 wrk -t1 -c64 -d2s -s "$lua" "http://127.0.0.1:$port" >/dev/null  # warm-up
before=$(rss)
echo "== non-streaming, 64 connections, sim pinned to 1 core, ${duration}s"
taskset -c 1 wrk -t1 -c64 -d"${duration}s" --latency -s "$lua" "http://127.0.0.1:$port" |
    grep -E 'Requests/sec|50%|99%|requests in'
after_first=$(rss)
taskset -c 1 wrk -t1 -c64 -d"${duration}s" -s "$lua" "http://127.0.0.1:$port" | grep -E 'Requests/sec'
after=$(rss)
echo "RSS kB: after warm-up $before, after run 1 $after_first, after run 2 $after"
rm -f "$lua"
