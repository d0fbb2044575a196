#!/usr/bin/env bash
# The P/D routers a user would otherwise pick, run beside pdctl for a side-by-side benchmark.
#   scripts/bench/peers.sh install               vllm-router and sglang-router from PyPI into
#                                                $PEERS_VENV (default /tmp/pdctl-peers-venv)
#   scripts/bench/peers.sh start RUN_DIR P_URL D_URL
#       vllm-router on 127.0.0.1:18001 (vLLM's NIXL P/D protocol: prefill, then decode) and
#       sglang-router on 127.0.0.1:18002 (SGLang's protocol sends to P and D at once: a load
#       reference, not a protocol peer); returns once both answer a completion
#   scripts/bench/peers.sh stop RUN_DIR
# Both bind only after every backend answers GET /health. Logs and pids go to RUN_DIR.
set -euo pipefail
venv=${PEERS_VENV:-/tmp/pdctl-peers-venv}

usage() { sed -n '2,11p' "$0" >&2; exit 2; }

answers_completion() {
    [ "$(curl -s -o /dev/null -w '%{http_code}' -H 'content-type: application/json' \
        -d '{"model":"m","prompt":"hi","max_tokens":1}' "$1/v1/completions")" = 200 ]
}

case "${1:-}" in
install)
    if [ -x "$venv/bin/vllm-router" ] && [ -x "$venv/bin/sglang-router" ]; then exit 0; fi
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check vllm-router sglang-router
    ;;
start)
    [ $# -eq 4 ] || usage
    run=$2 prefill=$3 decode=$4
    mkdir -p "$run"
    setsid "$venv/bin/vllm-router" --host 127.0.0.1 --port 18001 --vllm-pd-disaggregation \
        --prefill "$prefill" --decode "$decode" --policy round_robin \
        --prometheus-host 127.0.0.1 --prometheus-port 29001 \
        >"$run/vllm-router.log" 2>&1 </dev/null &
    echo $! >"$run/vllm-router.pid"
    setsid "$venv/bin/sglang-router" launch --host 127.0.0.1 --port 18002 --pd-disaggregation \
        --prefill "$prefill" --decode "$decode" --policy round_robin \
        --prometheus-host 127.0.0.1 --prometheus-port 29002 \
        >"$run/sglang-router.log" 2>&1 </dev/null &
    echo $! >"$run/sglang-router.pid"
    for _ in $(seq 100); do
        if answers_completion http://127.0.0.1:18001 && answers_completion http://127.0.0.1:18002; then
            exit 0
        fi
        sleep 0.2
    done
    echo "the peer routers did not answer within 20 s (logs in $run)" >&2
    exit 1
    ;;
stop)
    [ $# -eq 2 ] || usage
    for name in vllm-router sglang-router; do
        pidfile=$2/$name.pid
        [ -f "$pidfile" ] || continue
        # setsid made each router the leader of its own process group: end the group.
        kill -- "-$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
    done
    ;;
*) usage ;;
esac
