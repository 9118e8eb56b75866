#!/usr/bin/env bash
# How busy each CPU is while one path carries a bulk transfer.
#
#   benches/tools/cpu-busy.sh PATH [one-way|both-ways [HARNESS ARGS...]]
#   (as root, from the repository root; e.g. `baseline one-way
#   --baseline-bin /tmp/pinned-wrapper`)
#
# Runs the datapath harness with --phases bulk --secs 6 and reads
# /proc/stat over 3 s inside the timed one-way (default) or both-ways
# transfer. The harness pins the client to CPU 0 and the servers to CPU 1.
set -euo pipefail
path=${1:?usage: cpu-busy.sh PATH [one-way|both-ways]}
phase=${2:-one-way}
shift $(($# < 2 ? $# : 2))
case $phase in
    one-way) at=4 ;;
    both-ways) at=10 ;;
    *) echo "second argument: one-way or both-ways" >&2; exit 2 ;;
esac
out=$(mktemp)
cargo bench --bench datapath -- --paths "$path" --phases bulk --rounds 1 --secs 6 \
    --no-control --no-memory --no-docs "$@" >"$out" 2>&1 &
bench=$!
sleep $at
snap() { awk '/^cpu[0-9]/{print $1, $2+$3+$4+$7+$8, $7+$8, $5+$6}' /proc/stat; }
a=$(snap); sleep 3; b=$(snap)
wait $bench
hz=$(getconf CLK_TCK)
paste <(echo "$a") <(echo "$b") | awk -v hz="$hz" '{
    printf "%s: busy %.0f %% (of it irq+softirq %.0f %%), idle %.0f %%\n",
        $1, ($6 - $2) / hz / 3 * 100, ($7 - $3) / hz / 3 * 100, ($8 - $4) / hz / 3 * 100 }'
grep '^round' "$out"
rm -f "$out"
