#!/usr/bin/env bash
# Proxy benchmark, not a test: in one run, side by side on this machine, wrk at 64 connections
# (non-streaming and streaming) against the decode backend directly, `pdctl proxy` (release),
# vllm-router and sglang-router (PyPI, installed into a venv by scripts/bench/peers.sh).
# Prints req/s, p50, p99, proxy CPU µs/request and the ratios to vllm-router.
#   scripts/bench-proxy.sh                SECS=10 CONNS=64 ROUNDS=3 by default
# Shared 2-core machines swing by 2x from minute to minute, so the whole comparison runs ROUNDS
# times and the summary gives each figure's median and the median of the per-round ratios
# (every ratio compares two figures taken minutes apart at most, never across rounds).
#   BACKEND=sim scripts/bench-proxy.sh    use two `pdctl sim` engines instead of nginx
#   SMOKE=1 scripts/bench-proxy.sh        check the set-up only: backend and pdctl proxy (debug
#                                         build unless PDCTL=path), one answer per mode, 2 s of
#                                         wrk; no peers, no figures worth keeping
# The default backend is scripts/bench/fake-vllm.sh (nginx + Lua, kv_transfer_params in every
# reply), so the backend is never the bottleneck. Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
bench=scripts/bench
backend=${BACKEND:-nginx}
smoke=${SMOKE:-0}
missing=()
need_pkg() { dpkg -s "$1" >/dev/null 2>&1 || missing+=("$1"); }
need_pkg wrk
if [ "$backend" = nginx ]; then need_pkg nginx; need_pkg libnginx-mod-http-lua; fi
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ "$smoke" = 1 ] || "$bench/peers.sh" install
if [ -z "${PDCTL:-}" ]; then
    if [ "$smoke" = 1 ]; then
        cargo build --quiet --bin pdctl
        PDCTL=$PWD/target/debug/pdctl
    else
        cargo build --release --quiet --bin pdctl
        PDCTL=$PWD/target/release/pdctl
    fi
fi
RUN=$(mktemp -d /tmp/pdctl-bench.XXXX)
pids=()
cleanup() {
    [ "$smoke" = 1 ] || "$bench/peers.sh" stop "$RUN/peers" || true
    [ "$backend" = nginx ] && "$bench/fake-vllm.sh" stop "$RUN/nginx" || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$RUN"
}
trap cleanup EXIT
wait_health() {
    for _ in $(seq 100); do curl -sf "$1/health" >/dev/null && return 0; sleep 0.1; done
    echo "$1 never answered /health (logs in $RUN)" >&2
    return 1
}
if [ "$backend" = nginx ]; then
    "$bench/fake-vllm.sh" start "$RUN/nginx" 18100 18200
else
    "$PDCTL" sim --port 18100 --side-channel-port 18150 >"$RUN/p.log" 2>&1 & pids+=($!)
    "$PDCTL" sim --port 18200 --side-channel-port 18250 >"$RUN/d.log" 2>&1 & pids+=($!)
    wait_health http://127.0.0.1:18100
    wait_health http://127.0.0.1:18200
fi
PDCTL_LOG=warn "$PDCTL" proxy --listen 127.0.0.1:18004 \
    --prefill http://127.0.0.1:18100 --decode http://127.0.0.1:18200 \
    --prefill-policy round-robin --decode-policy round-robin >"$RUN/proxy.log" 2>&1 & pids+=($!)
wait_health http://127.0.0.1:18004
if [ "$smoke" = 1 ]; then
    for stream in false true; do
        echo "== one completion through pdctl proxy (stream: $stream)"
        curl -sS --fail-with-body -w '\nHTTP %{http_code}\n' -H 'content-type: application/json' \
            -d "{\"model\":\"m\",\"prompt\":\"Hello\",\"max_tokens\":16,\"stream\":$stream}" \
            http://127.0.0.1:18004/v1/completions | tail -c 300
    done
    SECS=2 CONNS=${CONNS:-4} "$bench/compare.sh" direct=http://127.0.0.1:18200 pdctl=http://127.0.0.1:18004
    exit 0
fi
ROUNDS=${ROUNDS:-3}
"$bench/peers.sh" start "$RUN/peers" http://127.0.0.1:18100 http://127.0.0.1:18200
echo "== $(nproc) cores; backend $backend; SECS=${SECS:-10} CONNS=${CONNS:-64} ROUNDS=$ROUNDS"
for round in $(seq "$ROUNDS"); do
    echo "-- round $round"
    "$bench/compare.sh" direct=http://127.0.0.1:18200 vllm-router=http://127.0.0.1:18001 \
        sglang-router=http://127.0.0.1:18002 pdctl=http://127.0.0.1:18004 | tee "$RUN/table.$round.txt"
done
echo "== medians over $ROUNDS rounds"
# Lower p99 is better: pdctl's p99 as a fraction of vllm-router's.
awk 'function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
     function median(list,   n, a, i, j, t) {
         n = split(list, a, " ")
         for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j+1] = a[j]; a[j+1] = t }
         return n % 2 ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2
     }
     FNR == 1 { round++ }
     $1 !~ /\// && ($2 == "cmpl" || $2 == "stream") {
         key = $1 " " $2; if (!(key in seen)) { seen[key] = 1; order[++keys] = key }
         rps[key] = rps[key] " " $3; p50[key] = p50[key] " " ms($4); p99[key] = p99[key] " " ms($5)
         cpu[key] = cpu[key] " " $6; at[round, key] = $3 " " ms($5)
     }
     END {
         printf "%-14s %-7s %10s %9s %9s %12s\n", "target", "mode", "req/s", "p50_ms", "p99_ms", "cpu_us/req"
         for (k = 1; k <= keys; k++) { key = order[k]; split(key, t, " ")
             printf "%-14s %-7s %10.0f %9.2f %9.2f %12.0f\n", t[1], t[2], median(rps[key]), median(p50[key]), median(p99[key]), median(cpu[key]) }
         for (m = 1; m <= 2; m++) { mode = m == 1 ? "cmpl" : "stream"; tr = ""; pr = ""
             for (r = 1; r <= round; r++) {
                 if (!((r, "pdctl " mode) in at) || !((r, "vllm-router " mode) in at)) continue
                 split(at[r, "pdctl " mode], a, " "); split(at[r, "vllm-router " mode], b, " ")
                 if (b[1] > 0) tr = tr " " a[1] / b[1]; if (b[2] > 0) pr = pr " " a[2] / b[2]
             }
             if (tr != "") printf "pdctl/vllm-router %-6s throughput ratio %.2f (rounds:%s)\n", mode, median(tr), tr
             if (pr != "") printf "pdctl/vllm-router %-6s p99 ratio        %.2f (rounds:%s)\n", mode, median(pr), pr
         }
     }' "$RUN"/table.*.txt
