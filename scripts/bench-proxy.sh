#!/usr/bin/env bash
# Proxy benchmark, not a test: in one run, side by side on this machine, wrk at 64 connections
# (non-streaming and streaming) against the decode backend directly, `pdctl proxy` (release),
# vllm-router and sglang-router (PyPI, installed into a venv by ../shared/bench/peers.sh).
# Prints req/s, p50, p99, proxy CPU µs/request and the ratios to vllm-router.
#   scripts/bench-proxy.sh                SECS=10 CONNS=64 by default
#   BACKEND=sim scripts/bench-proxy.sh    use two `pdctl sim` engines instead of nginx
# The default backend is ../shared/bench's fake vLLM on nginx (kv_transfer_params in every
# reply), so the backend is never the bottleneck. Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=../shared/bench
[ -d "$BENCH" ] || { echo "needs ../shared/bench beside the repo" >&2; exit 2; }
need_pkg() { dpkg -s "$1" >/dev/null 2>&1 || missing+=("$1"); }
missing=()
need_pkg wrk
if [ "${BACKEND:-nginx}" = nginx ]; then need_pkg nginx; need_pkg libnginx-mod-http-lua; fi
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
bash "$BENCH/peers.sh" install
cargo build --release --quiet
PDCTL=$PWD/target/release/pdctl
RUN=$(mktemp -d /tmp/pdctl-bench.XXXX)
pids=()
cleanup() {
    bash "$BENCH/peers.sh" stop || true
    [ "${BACKEND:-nginx}" = nginx ] && RUN=$RUN/nginx sh "$BENCH/fake-vllm-nginx/stop.sh" >/dev/null 2>&1 || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$RUN"
}
trap cleanup EXIT
if [ "${BACKEND:-nginx}" = nginx ]; then
    RUN=$RUN/nginx PPORT=18100 DPORT=18200 LOG=0 sh "$BENCH/fake-vllm-nginx/start.sh"
else
    "$PDCTL" sim --port 18100 --side-channel-port 18150 >"$RUN/p.log" 2>&1 & pids+=($!)
    "$PDCTL" sim --port 18200 --side-channel-port 18250 >"$RUN/d.log" 2>&1 & pids+=($!)
    for _ in $(seq 50); do curl -sf http://127.0.0.1:18200/health >/dev/null && break; sleep 0.1; done
fi
PDCTL_LOG=warn "$PDCTL" proxy --listen 127.0.0.1:18004 \
    --prefill http://127.0.0.1:18100 --decode http://127.0.0.1:18200 \
    --prefill-policy round-robin --decode-policy round-robin >"$RUN/proxy.log" 2>&1 & pids+=($!)
bash "$BENCH/peers.sh" start http://127.0.0.1:18100 http://127.0.0.1:18200
for _ in $(seq 50); do curl -sf http://127.0.0.1:18004/health >/dev/null && break; sleep 0.1; done
echo "== $(nproc) cores; backend ${BACKEND:-nginx}; SECS=${SECS:-10} CONNS=${CONNS:-64}"
bash "$BENCH/compare.sh" pdctl=http://127.0.0.1:18004 | tee "$RUN/table.txt"
# Lower p99 is better: pdctl's p99 as a fraction of vllm-router's.
awk '$1=="vllm-router" {p[$2]=$5} $1=="pdctl" {q[$2]=$5}
     function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
     END { for (m in q) if (m in p) printf "pdctl/vllm-router %s p99 ratio: %.2f\n", m, ms(q[m])/ms(p[m]) }' \
    "$RUN/table.txt"
