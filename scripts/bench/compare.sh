#!/usr/bin/env bash
# One benchmark round: wrk against each NAME=URL given, non-streaming then streaming, printing
# one row per target and mode: req/s, p50, p99, and the CPU the process listening on the URL's
# port spent per request (utime+stime from /proc over the measured run; 0 when it is not ours
# to read). Each cell is preceded by 2 s of unmeasured warm-up.
#   scripts/bench/compare.sh NAME=URL...      SECS=10 CONNS=64 by default; needs wrk and ss
set -euo pipefail
[ $# -gt 0 ] || { sed -n '2,6p' "$0" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
secs=${SECS:-10} conns=${CONNS:-64}
ticks_per_s=$(getconf CLK_TCK)

listener_pid() {
    ss -ltnpH "sport = :$1" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2
}
cpu_ticks() {
    [ -n "$1" ] && awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}

printf '%-14s %-7s %10s %10s %10s %12s\n' target mode req/s p50 p99 cpu_us/req
for target in "$@"; do
    name=${target%%=*} url=${target#*=}
    pid=$(listener_pid "${url##*:}")
    for mode in cmpl stream; do
        script=$here/completions.lua
        [ "$mode" = stream ] && script=$here/completions-stream.lua
        wrk -t1 -c"$conns" -d2s -s "$script" "$url" >/dev/null 2>&1 || true
        before=$(cpu_ticks "$pid")
        out=$(wrk -t1 -c"$conns" -d"${secs}s" --latency -s "$script" "$url" 2>&1) || true
        after=$(cpu_ticks "$pid")
        rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
        p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
        p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
        requests=$(grep -oE '^ *[0-9]+ requests in' <<<"$out" | grep -oE '[0-9]+' || echo 0)
        errors=$(awk '/Non-2xx/ {print "non2xx=" $NF}' <<<"$out")
        cpu=0
        if [ "${requests:-0}" -gt 0 ]; then
            cpu=$(( (after - before) * 1000000 / ticks_per_s / requests ))
        fi
        printf '%-14s %-7s %10s %10s %10s %12s %s\n' "$name" "$mode" "${rps:-0}" "${p50:--}" \
            "${p99:--}" "$cpu" "$errors"
    done
done
