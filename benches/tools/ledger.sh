#!/usr/bin/env bash
# The per-message ledger (issue 21): what one proxy spends in the kernel's
# interface per request on a kept-alive connection (phase rr) or per
# connection (phase connect: accept, connect, first byte, RST close;
# connect-fin: the same with FIN closes):
# system calls by kind, epoll waits, futex calls (thread hand-offs and
# wake-ups), context switches, and CPU time.
#
#   benches/tools/ledger.sh rr|udp|connect|connect-fin PATH...   (as root, repo root)
#   PATH: splice copy transparent nginx haproxy haproxy-splice baseline
#   benches/tools/ledger.sh http1|h2c PATH...
#   PATH: request (this build's request mode) baseline haproxy nginx
#   (baseline: another kube-uproxy build, BASELINE_BIN=/path/to/kube-uproxy,
#   with the splice relay: before and after a change)
#
# Runs the datapath harness for one path and one phase (--secs 8; 10 for
# the HTTP phases) and
# counts with `perf stat` on the syscalls:sys_enter_* tracepoints of the
# proxy's processes.
# For rr, the proxy's whole life is counted and divided by the requests
# the harness made (start-up and 50 warm-up requests are under 1 %); for
# connect, 4 s of the rate part (4 client threads), divided by the proxy's
# connect(2) calls in those 4 s (one per proxied connection); for udp, 4 s
# of one flow's request/response, divided by half the datagrams the proxy
# sent in them (one each way per request); for http1 and h2c (request
# mode, issue 20), 4 s inside the phase's 10 s, divided by the phase's
# rate × 4 s. perf stat
# counts in the kernel: it barely slows the proxy.
# Prints one Markdown row per path; its last column, the calls by kind.
# Outside rr, a second table: around the proxy over the same 4 s, the CPU
# of the harness (the clients and servers), the machine's idle time and
# the TCP segments of the client namespace, per request or connection
# (the phase's rate × 4 s).
set -euo pipefail
usage="usage: ledger.sh rr|udp|connect|connect-fin PATH... | ledger.sh http1|h2c request|baseline|haproxy|nginx..."
phase=${1:?$usage}
shift
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
run_secs=8
case $phase in
    rr) field=rr ;;                    # counted over the proxy's whole life
    udp) wait_s=2; field=udp ;;        # 4 s inside the 8 s of one flow's request/response
    connect) wait_s=11; field=conn ;;  # start-up, 8 s of sequential connects, then the window (ending 1 s before the phase does)
    connect-fin) wait_s=11; field=fin ;;   # the same with FIN closes
    http1) wait_s=4; field=h1; run_secs=10 ;;   # past the HTTP lab's start-up, then the window
    h2c) wait_s=4; field=h2c; run_secs=10 ;;
    *) echo "unknown phase $phase (rr, udp, connect, connect-fin, http1 or h2c)" >&2; exit 2 ;;
esac
window=4
# The kinds a proxy's message path uses; enabling all ~360 tracepoints
# takes perf seconds, so these, and raw_syscalls for the total ("other").
kinds="read write readv writev recvfrom sendto recvmsg recvmmsg sendmsg sendmmsg splice epoll_wait epoll_pwait
    epoll_ctl futex accept4 connect bind socket setsockopt getsockopt getsockname getpeername close
    shutdown ioctl fcntl clock_gettime getrandom sched_yield pipe2 mmap munmap madvise mprotect brk io_uring_enter
    eventfd2 timerfd_settime clock_nanosleep rt_sigprocmask"
events=task-clock,context-switches,cpu-migrations,raw_syscalls:sys_enter$(for k in $kinds; do printf ',syscalls:sys_enter_%s' "$k"; done)
descendants() {
    local c
    for c in $(pgrep -P "$1" || true); do echo "$c"; descendants "$c"; done
}
# The machine around the proxy, for the second table (not for rr, which
# counts the proxy's whole life): CPU ticks of the harness (its threads
# are the clients and the servers), the machine's idle ticks, and the TCP
# segments out and in of the lab's client namespace. (The proxy's own CPU
# is perf's count: its process may end right as the window does.)
machine() {
    local ns
    ns=$(ip netns list | awk '{print $1}' | grep -E "^ku-$1-.*-client$" | head -1)
    echo "$(awk '{print $14 + $15}' /proc/"$1"/stat) $(awk '/^cpu /{print $5; exit}' /proc/stat) \
        $(ip netns exec "$ns" awk '/^Tcp:/{n++} n == 2 && /^Tcp:/{print $12, $11; exit}' /proc/net/snmp)"
}
split_rows=()
rows=()
for path in "$@"; do
    out=$(mktemp)
    extra=()
    paths=$path
    if [ "$path" = baseline ]; then
        extra=(--baseline-bin "${BASELINE_BIN:?baseline needs BASELINE_BIN=/path/to/kube-uproxy}")
        # The proxy is found by its process name.
        [ "$(basename "$BASELINE_BIN")" = kube-uproxy ] ||
            { echo "BASELINE_BIN must be a file named kube-uproxy (copy it to a directory of its own)" >&2; exit 2; }
    fi
    case $path:$phase in
        request:http1|request:h2c|*:http1|*:h2c) ;;
        request:*) echo "request is a path of the HTTP phases (http1, h2c)" >&2; exit 2 ;;
    esac
    # Request mode alone (the splice path would run the L4 port in the
    # same process too): this build as the harness's baseline binary.
    [ "$path" = request ] && { paths=baseline; extra=(--baseline-bin "$PWD/target/release/kube-uproxy"); }
    cargo bench --bench datapath -- --paths "$paths" --phases "$phase" --rounds 1 --secs "$run_secs" \
        --no-control --no-memory --no-docs "${extra[@]}" >"$out" 2>&1 &
    bench=$!
    # Wait for the harness to be built and the proxy to run.
    for _ in $(seq 1 3000); do
        case $path in
            splice|copy|transparent|baseline|request) name=kube-uproxy ;;
            nginx) name=nginx ;;
            haproxy|haproxy-splice) name=haproxy ;;
            *) echo "unknown path $path" >&2; kill $bench; exit 2 ;;
        esac
        # Only the harness's own proxy (other proxies may run on the machine).
        pids=$(for p in $(descendants $bench); do
            [ "$(cat /proc/$p/comm 2>/dev/null)" = "$name" ] && echo $p; done || true)
        [ -n "$pids" ] && break
        sleep 0.02
    done
    threads=$(for p in $pids; do ls /proc/"$p"/task; done 2>/dev/null | wc -l)
    [ -n "$pids" ] || { echo "$path: proxy never started" >&2; exit 1; }
    if [ "$phase" = rr ]; then
        # The whole life of the proxy: start-up and 50 warm-up requests are
        # well under 1 % of 8 s of requests; the count is the harness's own.
        perf stat -e "$events" -x, -o "$out.perf" -p "$(echo $pids | tr ' ' ,)" &
        perf_pid=$!
        wait $bench || { echo "$path: harness failed" >&2; cat "$out" >&2; exit 1; }
        wait $perf_pid || true
        secs=$run_secs
    else
        sleep "$wait_s"
        # Again: the harness may run short-lived helpers of the same name first.
        pids=$(for p in $(descendants $bench); do
            [ "$(cat /proc/$p/comm 2>/dev/null)" = "$name" ] && echo $p; done || true)
        [ -n "$pids" ] || { echo "$path: proxy not running in the window" >&2; exit 1; }
        harness=$(for p in $(descendants $bench); do
            [[ "$(cat /proc/$p/comm 2>/dev/null)" == datapath-* ]] && echo $p; done | head -1 || true)
        # Its own clock, not perf's: perf takes a moment to set up its
        # tracepoints, and the phase ends soon after the window.
        { machine "$harness"; sleep $window; machine "$harness"; } >"$out.split" &
        split_pid=$!
        perf stat -e "$events" -x, -o "$out.perf" -p "$(echo $pids | tr ' ' ,)" -- sleep $window
        wait $split_pid || true
        wait $bench || { echo "$path: harness failed" >&2; cat "$out" >&2; exit 1; }
        secs=$window
    fi
    rate=$(sed -nE "s/^(http )?round .* $field +([0-9]+)( req)?\/s.*/\2/p" "$out" | head -1)
    [ -n "$rate" ] || { echo "$path: no $field rate in the harness output" >&2; cat "$out" >&2; exit 1; }
    n=$((rate * secs))
    if [ "$phase" = connect ] || [ "$phase" = connect-fin ]; then
        # Exact: every proxied connection is one connect(2) toward the
        # endpoint, for each of the proxies (the harness's rate is the
        # whole window's, not these 4 s).
        n=$(awk -F, '$3 == "syscalls:sys_enter_connect" {print $1}' "$out.perf")
        [ "${n:-0}" -gt 0 ] || { echo "$path: no connect(2) in the window" >&2; exit 1; }
    elif [ "$phase" = udp ]; then
        # Exact for one flow: each request is two datagrams sent (sendto;
        # not write, which includes tokio's wake-ups of its reactor), one
        # toward the endpoint and its answer toward the client (the
        # phase's later parts, a fixed rate and 1000 clients, come after
        # the window).
        s=$(awk -F, '$3 ~ /syscalls:sys_enter_(sendto|sendmsg)$/ && $1 ~ /^[0-9]+$/ {s += $1} END {print s + 0}' "$out.perf")
        n=$((s / 2))
        [ "$n" -gt 0 ] || { echo "$path: no datagram sent in the window" >&2; exit 1; }
    fi
    cpu_ms=$(awk -F, '$3 == "task-clock" {print $1}' "$out.perf")
    cs=$(awk -F, '$3 == "context-switches" || $3 == "cs" {print $1}' "$out.perf")
    migr=$(awk -F, '$3 == "cpu-migrations" {print $1}' "$out.perf")
    # kind -> calls per message
    per=$(awk -F, -v n="$n" '$1 ~ /^[0-9]+$/ && $3 == "raw_syscalls:sys_enter" { all = $1 }
        $1 ~ /^[0-9]+$/ && $3 ~ /syscalls:sys_enter_/ && $1 > 0 {
            k = $3; sub(/.*sys_enter_/, "", k); known += $1; printf "%s %.3f\n", k, $1 / n }
        END { if (all > known) printf "other %.3f\n", (all - known) / n
              printf "TOTAL %.3f\n", all / n }' "$out.perf" | sort -k2 -nr)
    total=$(echo "$per" | awk '$1 == "TOTAL" {printf "%.2f", $2}')
    per=$(echo "$per" | grep -v '^TOTAL')
    epoll=$(echo "$per" | awk '$1 ~ /^epoll_(p?wait|pwait2)$/ {s += $2} END {printf "%.2f", s}')
    futex=$(echo "$per" | awk '$1 == "futex" {s += $2} END {printf "%.2f", s}')
    top=$(echo "$per" | awk '$2 >= 0.01 {printf "%s%s %.2f", sep, $1, $2; sep = ", "}')
    rows+=("$(awk -v p="$path" -v r="$rate" -v cpu="$cpu_ms" -v cs="$cs" -v mg="$migr" \
        -v n="$n" -v tot="$total" -v e="$epoll" -v f="$futex" -v th="$threads" -v top="$top" 'BEGIN {
        printf "| %s | %d | %s | %s | %s | %.2f | %.3f | %.1f | %d | %s |",
            p, r, tot, e, f, cs / n, mg / n, cpu * 1e3 / n, th, top }')")
    if [ "$phase" != rr ]; then
        # ticks are 1/100 s (USER_HZ); idle as a share of one CPU.
        # Per the phase's rate × the window (the perf count's n is of
        # perf's own window).
        split_rows+=("$(tr '\n' ' ' <"$out.split" | awk -v p="$path" -v r="$rate" -v w="$window" -v cpu="$cpu_ms" -v n="$n" '
            NF != 8 { printf "| %s | (the lab ended inside the window) | | | | |", p; exit }
            { m = r * w
              printf "| %s | %.1f | %.1f | %.0f %% | %.2f | %.2f |", p,
                ($5 - $1) * 1e4 / m, cpu * 1e3 / n, ($6 - $2) / w,
                ($7 - $3) / m, ($8 - $4) / m }')")
    fi
    rm -f "$out" "$out.perf" "$out.split"
done
unit=request; case $phase in connect*) unit=connection ;; esac
echo "phase $phase: per $unit, measured over ${window} s of the harness's ${field} window"
echo
echo "| path | rate /s | system calls | epoll waits | futex | context switches | CPU migrations | proxy CPU µs | threads | calls by kind |"
echo "|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
if [ ${#split_rows[@]} -gt 0 ]; then
    echo
    echo "Around the proxy, over the same ${window} s: CPU per $unit of the harness (the clients and servers) and of the proxy, by /proc/PID/stat; the machine's idle time (a share of one CPU); TCP segments the client namespace sent and received per $unit."
    echo
    echo "| path | harness CPU µs | proxy CPU µs | machine idle | client segments out | client segments in |"
    echo "|---|---|---|---|---|---|"
    printf '%s\n' "${split_rows[@]}"
fi
