#!/usr/bin/env bash
# Per-connection cost of one proxy in the connection-per-request phase:
# the proxy's CPU time, the whole machine's busy time, the proxy's context
# switches and system calls, each divided by the connections made.
#
#   benches/tools/conn-cost.sh splice|copy|nginx|haproxy   (as root, repo root)
#
# Runs the datapath harness with --phases connect --secs 8 (8 s of
# sequential connects, then 8 s of connects/s from 4 threads) and samples
# the proxy during 4 s inside the connects/s window. Needs perf.
set -euo pipefail
path=${1:?usage: conn-cost.sh splice|copy|nginx|haproxy}
out=$(mktemp)
cargo bench --bench datapath -- --paths "$path" --phases connect --rounds 1 --secs 8 \
    --no-control --no-memory --no-docs >"$out" 2>&1 &
bench=$!
sleep 11.5   # start-up, the latency phase, 1.5 s into the rate phase
case $path in
    splice|copy) pids=$(pgrep -f "release/kube-uproxy") ;;
    nginx) pids=$(pgrep -x nginx) ;;
    haproxy) pids=$(pgrep -x haproxy) ;;
    *) echo "unknown path $path" >&2; exit 2 ;;
esac
ticks() { local t=0 p; for p in $pids; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo $t; }
switches() { for p in $pids; do cat /proc/"$p"/task/*/status; done 2>/dev/null | awk '/ctxt_switches/{s+=$2} END{print s}'; }
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
t0=$(ticks); m0=$(busy); c0=$(switches)
perf stat -e raw_syscalls:sys_enter -x, -o "$out.perf" -p "$(echo $pids | tr ' ' ,)" -- sleep 4
t1=$(ticks); m1=$(busy); c1=$(switches)
wait $bench
rate=$(sed -nE 's/^round .* conn +([0-9]+)\/s.*/\1/p' "$out")
calls=$(grep sys_enter "$out.perf" | cut -d, -f1)
hz=$(getconf CLK_TCK)
awk -v p="$path" -v r="$rate" -v t=$((t1 - t0)) -v m=$((m1 - m0)) -v c=$((c1 - c0)) -v s="$calls" -v hz="$hz" 'BEGIN {
    n = r * 4
    printf "%s: %d conn/s; per connection: proxy CPU %.1f µs, machine busy %.1f µs, %.2f context switches, %.1f system calls\n",
        p, r, t / hz * 1e6 / n, m / hz * 1e6 / n, c / n, s / n }'
rm -f "$out" "$out.perf"
