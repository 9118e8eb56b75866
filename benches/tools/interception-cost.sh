#!/usr/bin/env bash
# Cost of the ways a node-local proxy can intercept Service (ClusterIP) traffic.
#
#   sudo benches/tools/interception-cost.sh            # 5 rounds, about 6-7 minutes
#   ROUNDS=7 LAT_SECS=3 CONN_SECS=2 TPUT_SECS=2 sudo benches/tools/interception-cost.sh
#
# Lab (all in network namespaces made here, named kim-<pid>-*, removed on exit):
#
#   pod  (10.244.1.5/32, default via 169.254.1.1 onlink) ──┐ node side: NO IPv4 address,
#                                                           │ proxy_arp=1, 10.244.1.5/32 dev veth
#   podb (10.0.1.2/24, default via 10.0.1.1) ───────────────┤ node side: 10.0.1.1/24
#                                                        node  (proxy + rules; 169.254.42.1/32 on lo;
#                                                           │   10.96.0.0/12 and default via 10.0.2.2)
#   be   (10.0.2.2/24): nginx :80, iperf3 :5201, sockperf :11111, UDP echo :53
#
# "pod" has the shape of a Calico/Cilium workload (address-less host veth);
# "podb" has the classic shape (the host side of the link has an address).
# Service 10.96.0.10: tcp/80, tcp/5201, tcp/11111, udp/53.
#
# Methods (one nft table `kim_m` in the node namespace, swapped per method):
#   kernel-dnat    reference: kernel DNAT straight to the backend, no proxy
#   redirect       today's kube-uproxy: nat `redirect` to a proxy port
#   dnat-lo        nat `dnat` to 169.254.42.1:<proxy port> (a /32 on lo)
#   tproxy         `tproxy to :<port>` + fwmark policy routing, transparent listener
#   tproxy-socket  tproxy plus a `socket transparent 1` fast path for non-SYN
#                  packets of connections that have a transparent socket
#   tproxy-socket-naive  the same fast path for every TCP packet, SYNs too
#                  (the shape of Istio's `-m socket` rule): see rules_on
# The proxy is one HAProxy (tcp mode) with one listener per method and service
# port, so only the interception differs. UDP is checked (not measured) with a
# tiny Python echo server in the node that answers the way a proxy must.
#
# Phase 1 prints which method carries traffic from which source (pod, podb,
# the node itself). Phase 2 runs ROUNDS interleaved rounds (every round runs
# every method once, in a rotated order) of: TCP ping-pong RTT (sockperf
# --full-rtt, p50/p99), new connections per second (wrk, `Connection: close`
# against nginx, so one TCP connection per request) and one-way throughput
# (iperf3). It prints a markdown table of median (min–max) per method.
# All traffic stays inside the namespaces made here.
set -euo pipefail

ROUNDS=${ROUNDS:-5}
LAT_SECS=${LAT_SECS:-3}     # sockperf ping-pong seconds (it drops the first ~0.5 s as warm-up)
CONN_SECS=${CONN_SECS:-2}   # wrk seconds
TPUT_SECS=${TPUT_SECS:-2}   # iperf3 seconds
WRK_CONNS=${WRK_CONNS:-16}
MAX_SECS=${MAX_SECS:-540}   # no new round starts after this many seconds
# measured rows: method@client namespace
ROWS=${ROWS:-"kernel-dnat@podb redirect@podb dnat-lo@podb tproxy@podb tproxy-socket@podb tproxy-socket-naive@podb dnat-lo@pod tproxy@pod"}

[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
for t in ip nft haproxy nginx sockperf wrk iperf3 python3 curl awk; do
    command -v "$t" >/dev/null || { echo "missing $t (apt-get install sockperf wrk iperf3 haproxy nginx nftables curl)" >&2; exit 1; }
done

P=kim-$$
POD=$P-pod; PODB=$P-podb; NODE=$P-node; BE=$P-be
NSS="$POD $PODB $NODE $BE"
WORK=$(mktemp -d /tmp/kim-$$.XXXXXX)
START=$(date +%s)
CIP=10.96.0.10          # the ClusterIP
OWN=169.254.42.1        # the node-local address the proxy owns (dnat-lo)
MARK=0x4b1              # fwmark for tproxy policy routing
TABLE=100

# Every exit path: stop what runs in our namespaces (all of it was started
# here), delete the namespaces (their veths go with them), remove the files.
cleanup() {
    set +e
    local ns p
    for ns in $NSS; do
        p=$(ip netns pids "$ns" 2>/dev/null)
        [ -n "$p" ] && kill $p 2>/dev/null
    done
    sleep 0.5
    for ns in $NSS; do
        p=$(ip netns pids "$ns" 2>/dev/null)
        [ -n "$p" ] && kill -9 $p 2>/dev/null
        ip netns del "$ns" 2>/dev/null
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# ---------------------------------------------------------------- the lab
for ns in $NSS; do ip netns add "$ns"; ip -n "$ns" link set lo up; done

# pod: Calico shape. The node side (vpod) has no IPv4 address; proxy ARP
# answers the pod's ARP for 169.254.1.1 (only because the node has a route
# for it, here its default route); a /32 route leads back to the pod.
ip -n "$NODE" link add vpod type veth peer name eth0 netns "$POD"
ip -n "$POD" addr add 10.244.1.5/32 dev eth0
ip -n "$POD" link set eth0 up
ip -n "$POD" route add 169.254.1.1 dev eth0 scope link
ip -n "$POD" route add default via 169.254.1.1 dev eth0 onlink
ip -n "$NODE" link set vpod up
nsx "$NODE" sysctl -qw net.ipv4.conf.vpod.proxy_arp=1
ip -n "$NODE" route add 10.244.1.5/32 dev vpod

# podb: classic shape, the node side has an address.
ip -n "$NODE" link add vpodb type veth peer name eth0 netns "$PODB"
ip -n "$PODB" addr add 10.0.1.2/24 dev eth0
ip -n "$PODB" link set eth0 up
ip -n "$PODB" route add default via 10.0.1.1
ip -n "$NODE" addr add 10.0.1.1/24 dev vpodb
ip -n "$NODE" link set vpodb up

# backend; the node routes the Service range (and everything else) to it, so
# a ClusterIP packet that is not intercepted goes there and is dropped (be
# does not forward and does not own 10.96/12).
ip -n "$NODE" link add vbe type veth peer name eth0 netns "$BE"
ip -n "$BE" addr add 10.0.2.2/24 dev eth0
ip -n "$BE" link set eth0 up
ip -n "$BE" route add default via 10.0.2.1
ip -n "$NODE" addr add 10.0.2.1/24 dev vbe
ip -n "$NODE" link set vbe up
ip -n "$NODE" route add 10.96.0.0/12 via 10.0.2.2 dev vbe
ip -n "$NODE" route add default via 10.0.2.2 dev vbe

# node: the owned address for dnat-lo (no dummy driver in this kernel: lo),
# the local route table for tproxy (the fwmark rule is added per method).
ip -n "$NODE" addr add $OWN/32 dev lo
ip -n "$NODE" route add local 0.0.0.0/0 dev lo table $TABLE
nsx "$NODE" sysctl -qw net.ipv4.ip_forward=1
# strict reverse-path filtering, as on many nodes: every method works with it
for c in all default lo vpod vpodb vbe; do nsx "$NODE" sysctl -qw net.ipv4.conf.$c.rp_filter=1; done
# many short connections: wide port range, TIME_WAIT reuse, short conntrack TIME_WAIT
for ns in $NSS; do
    nsx "$ns" sysctl -qw net.ipv4.ip_local_port_range="1024 65000" net.ipv4.tcp_tw_reuse=1
done

# Always loaded: a forward filter with a ct expression, so conntrack is on in
# the node for every method, as on any Kubernetes node (CNI, policies).
nsx "$NODE" nft -f - <<'EOF'
table ip kim_node {
  chain conntrack_on {
    type filter hook forward priority filter;
    ct state invalid drop
  }
}
EOF
nsx "$NODE" sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_time_wait=10

# ---------------------------------------------------------------- servers
cat >"$WORK/nginx.conf" <<EOF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  # the body names the peer: the proxy (10.0.2.1) or the client (kernel DNAT)
  server { listen 80 backlog=4096; location / { return 200 "\$remote_addr\n"; } }
}
EOF
cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread 2
  maxconn 8000
defaults
  mode tcp
  timeout connect 2s
  timeout client 30s
  timeout server 30s
# per service port one proxy, listening once per method:
#   $OWN:2xxxx (dnat-lo), *:3xxxx (redirect), *:4xxxx transparent (tproxy)
listen http
  bind $OWN:20080
  bind :30080
  bind :40080 transparent
  server be 10.0.2.2:80
listen iperf
  bind $OWN:25201
  bind :35201
  bind :45201 transparent
  server be 10.0.2.2:5201
listen sockperf
  bind $OWN:21111
  bind :31111
  bind :41111 transparent
  server be 10.0.2.2:11111
EOF
# UDP echo that answers as a proxy must: from the socket it received on
# (plain), or, for tproxy, from a transparent socket bound to the original
# destination read with IP_RECVORIGDSTADDR. Exits after 40 idle seconds.
cat >"$WORK/udp.py" <<'EOF'
import socket, struct, sys, select
IP_TRANSPARENT, IP_RECVORIGDSTADDR = 19, 20
mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "client":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((addr, port)); s.settimeout(1.5); s.send(b"ping")
    try: print(s.recv(100).decode())
    except OSError: print("no-reply")
    sys.exit(0)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if mode == "tproxy":
    s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    s.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
s.bind((addr, port))
for _ in range(1000):
    if not select.select([s], [], [], 40)[0]: break
    data, anc, _, peer = s.recvmsg(2048, 256)
    if mode == "tproxy":
        orig = None
        for lvl, typ, d in anc:
            if lvl == socket.SOL_IP and typ == IP_RECVORIGDSTADDR:
                p, a = struct.unpack("!2xH4s", d[:8]); orig = (socket.inet_ntoa(a), p)
        r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        r.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        r.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        r.bind(orig); r.sendto(b"udp-" + mode.encode(), peer); r.close()
    else:
        s.sendto(b"udp-" + mode.encode(), peer)
EOF
nsx "$BE" nginx -c "$WORK/nginx.conf" &
nsx "$BE" iperf3 -s -p 5201 >/dev/null 2>&1 &
nsx "$BE" sockperf server --tcp -i 10.0.2.2 -p 11111 >/dev/null 2>&1 &
nsx "$BE" python3 "$WORK/udp.py" echo 10.0.2.2 53 &
nsx "$NODE" haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
nsx "$NODE" python3 "$WORK/udp.py" echo $OWN 20053 &       # dnat-lo
nsx "$NODE" python3 "$WORK/udp.py" echo 0.0.0.0 30053 &    # redirect
nsx "$NODE" python3 "$WORK/udp.py" tproxy 0.0.0.0 40053 &  # tproxy
for i in $(seq 50); do
    nsx "$NODE" ss -ltn | grep -q ':41111 ' && nsx "$BE" ss -ltn | grep -q ':11111 ' && break
    sleep 0.1
done

# ---------------------------------------------------------------- the rules
# svc key: ip daddr . meta l4proto . th dport; one element per service port.
rules_on() {
    local m=$1
    nsx "$NODE" nft delete table ip kim_m 2>/dev/null || true
    ip -n "$NODE" rule del fwmark $MARK lookup $TABLE 2>/dev/null || true
    case $m in
    kernel-dnat) nsx "$NODE" nft -f - <<EOF
table ip kim_m {
  map svc {
    type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service
    elements = { $CIP . tcp . 80 : 10.0.2.2 . 80, $CIP . tcp . 5201 : 10.0.2.2 . 5201,
                 $CIP . tcp . 11111 : 10.0.2.2 . 11111, $CIP . udp . 53 : 10.0.2.2 . 53 }
  }
  chain pre {
    type nat hook prerouting priority dstnat;
    meta l4proto { tcp, udp } dnat ip to ip daddr . meta l4proto . th dport map @svc
  }
  chain out {
    type nat hook output priority -100;
    meta l4proto { tcp, udp } dnat ip to ip daddr . meta l4proto . th dport map @svc
  }
}
EOF
    ;;
    redirect) nsx "$NODE" nft -f - <<EOF
table ip kim_m {
  map svc {
    type ipv4_addr . inet_proto . inet_service : inet_service
    elements = { $CIP . tcp . 80 : 30080, $CIP . tcp . 5201 : 35201, $CIP . tcp . 11111 : 31111, $CIP . udp . 53 : 30053 }
  }
  chain pre {
    type nat hook prerouting priority dstnat;
    meta l4proto { tcp, udp } redirect to ip daddr . meta l4proto . th dport map @svc
  }
  chain out {
    type nat hook output priority -100;
    meta l4proto { tcp, udp } redirect to ip daddr . meta l4proto . th dport map @svc
  }
}
EOF
    ;;
    dnat-lo) nsx "$NODE" nft -f - <<EOF
table ip kim_m {
  map svc {
    type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service
    elements = { $CIP . tcp . 80 : $OWN . 20080, $CIP . tcp . 5201 : $OWN . 25201,
                 $CIP . tcp . 11111 : $OWN . 21111, $CIP . udp . 53 : $OWN . 20053 }
  }
  chain pre {
    type nat hook prerouting priority dstnat;
    meta l4proto { tcp, udp } dnat ip to ip daddr . meta l4proto . th dport map @svc
  }
  chain out {
    type nat hook output priority -100;
    meta l4proto { tcp, udp } dnat ip to ip daddr . meta l4proto . th dport map @svc
  }
}
EOF
    ;;
    tproxy|tproxy-socket|tproxy-socket-naive)
        local fast=""
        # Fast path: packets of connections that already have a transparent
        # socket are marked for local delivery and skip the map and tproxy.
        # The naive form (as in Istio's iptables) also takes SYNs that hit a
        # TIME_WAIT socket of the proxy: the SYN is then delivered to that
        # TIME_WAIT socket, whose listener lookup (ClusterIP:port) finds no
        # listener; reading tcp_v4_rcv, the SYN is then answered like a stray
        # segment (an ACK), and the client sends its SYN again after a second
        # (measured: the SYN retrans column). tproxy itself handles the case (it finds the
        # listener on the tproxy port and ends the TIME_WAIT), so SYNs must
        # not take the fast path.
        [ "$m" = tproxy-socket ] && fast="tcp flags & (syn | ack) != syn socket transparent 1 meta mark set $MARK accept"
        [ "$m" = tproxy-socket-naive ] && fast="meta l4proto tcp socket transparent 1 meta mark set $MARK accept"
        nsx "$NODE" nft -f - <<EOF
table ip kim_m {
  map svc {
    type ipv4_addr . inet_proto . inet_service : inet_service
    elements = { $CIP . tcp . 80 : 40080, $CIP . tcp . 5201 : 45201, $CIP . tcp . 11111 : 41111, $CIP . udp . 53 : 40053 }
  }
  chain pre {
    type filter hook prerouting priority mangle;
    $fast
    meta l4proto { tcp, udp } tproxy ip to :ip daddr . meta l4proto . th dport map @svc meta mark set $MARK
  }
  # node-originated: mark, so the output reroute sends it via lo (table $TABLE)
  # and it comes back through prerouting, where tproxy takes it
  chain out {
    type route hook output priority mangle;
    meta l4proto { tcp, udp } ip daddr . meta l4proto . th dport @svc meta mark set $MARK
  }
}
EOF
        ip -n "$NODE" rule add fwmark $MARK lookup $TABLE pref 100
    ;;
    *) echo "unknown method $m" >&2; return 1 ;;
    esac
}

# ---------------------------------------------------------------- phase 1
# What each method carries, from each source. TCP: the body names who
# connected to the backend (10.0.2.1 = through the proxy). UDP: the answer of
# the echo the method leads to.
echo "## kube-uproxy interception cost ($(date -u +%FT%TZ), kernel $(uname -r), $(nft --version | cut -d' ' -f2))"
echo
echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg) (nproc $(nproc))"
echo
echo "### Which method carries traffic (TCP: peer seen by the backend; UDP: echo reply)"
echo
echo "| method | pod /32, address-less veth: TCP | UDP | podb, addressed link: TCP | UDP | node itself: TCP | UDP |"
echo "|---|---|---|---|---|---|---|"
for m in kernel-dnat redirect dnat-lo tproxy tproxy-socket tproxy-socket-naive; do
    rules_on "$m"
    row="| $m |"
    for ns in $POD $PODB $NODE; do
        tcp=$(nsx "$ns" curl -s -m 2 "http://$CIP/" 2>/dev/null || true)
        udp=$(nsx "$ns" timeout 3 python3 "$WORK/udp.py" client $CIP 53 2>/dev/null || true)
        row="$row ${tcp:-FAIL} | ${udp:-FAIL} |"
    done
    echo "$row"
done
echo
echo "FAIL/no-reply are expected where: redirect from pod (the address-less veth gives"
echo "redirect no address to rewrite to; the kernel drops the packet), and redirect UDP"
echo "from the node (output redirect sends to 127.0.0.1; the wildcard echo answers from"
echo "the node address, which conntrack does not match, so the reply is not un-NATed;"
echo "a redirect proxy must answer from the address it received on, IP_PKTINFO)."
echo

# ---------------------------------------------------------------- phase 2
res=$WORK/results   # lines: row metric value
# SYNs the client had to send again (a connect that was not answered at once)
syn_retrans() {
    nsx "$1" cat /proc/net/netstat | awk '/^TcpExt:/ { if (!h) { for (i = 1; i <= NF; i++) c[$i] = i; h = 1 } else print $c["TCPSynRetrans"] }'
}
measure() {
    local m=${1%@*} src=${1#*@} ns out
    case $src in pod) ns=$POD ;; podb) ns=$PODB ;; *) echo "bad row $1" >&2; return 1 ;; esac
    rules_on "$m"
    if ! nsx "$ns" curl -s -m 2 -o /dev/null "http://$CIP/"; then
        echo "$1 fail 1" >>"$res"; return 0
    fi
    out=$(nsx "$ns" timeout $((LAT_SECS + 10)) sockperf ping-pong --tcp -i $CIP -p 11111 -t "$LAT_SECS" -m 64 --full-rtt 2>&1 || true)
    echo "$out" | awk -v r="$1" '/percentile 50.000 =/{print r, "p50", $NF} /percentile 99.000 =/{print r, "p99", $NF}' >>"$res"
    local syn0 syn1
    syn0=$(syn_retrans "$ns")
    out=$(nsx "$ns" timeout $((CONN_SECS + 10)) wrk -t1 -c"$WRK_CONNS" -d"${CONN_SECS}s" -H 'Connection: close' "http://$CIP/" 2>&1 || true)
    syn1=$(syn_retrans "$ns")
    echo "$out" | awk -v r="$1" -v s=$((syn1 - syn0)) -v t="$CONN_SECS" '
        /^Requests\/sec:/ { print r, "conn", $2; if ($2 > 0) print r, "synre", s / ($2 * t) * 1000 }
        /Socket errors|Non-2xx/ { print r, "errors", 1 }' >>"$res"
    out=$(nsx "$ns" timeout $((TPUT_SECS + 10)) iperf3 -c $CIP -p 5201 -t "$TPUT_SECS" -f m 2>&1 || true)
    echo "$out" | awk -v r="$1" '/receiver$/{for (i = 1; i < NF; i++) if ($(i+1) == "Mbits/sec") print r, "gbit", $i / 1000}' >>"$res"
}
: >"$res"
rounds_done=0
set -- $ROWS
n=$#
for ((round = 0; round < ROUNDS; round++)); do
    if (($(date +%s) - START > MAX_SECS)); then echo "(time limit: stopped after $rounds_done rounds)"; break; fi
    for ((k = 0; k < n; k++)); do         # rotated order, so no method always runs first
        idx=$(((k + round) % n + 1))
        measure "${!idx}"
    done
    rounds_done=$((round + 1))
    echo "round $rounds_done of $ROUNDS done at +$(($(date +%s) - START)) s, load $(cut -d' ' -f1 /proc/loadavg)" >&2
done
nsx "$NODE" nft delete table ip kim_m 2>/dev/null || true

stat() { # row metric -> "median (min–max)"
    awk -v r="$1" -v k="$2" '$1 == r && $2 == k {print $3}' "$res" | sort -g | awk -v d="$3" '
        { v[NR] = $1 }
        END {
            if (NR == 0) { printf "–"; exit }
            med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            printf "%.*f (%.*f–%.*f)", d, med, d, v[1], d, v[NR]
        }'
}
echo "### Cost, $rounds_done interleaved rounds: median (min–max)"
echo
echo "| method | client link | RTT p50 µs | RTT p99 µs | new conn/s | SYN retrans per 1k conns | throughput Gbit/s | notes |"
echo "|---|---|---|---|---|---|---|---|"
for r in $ROWS; do
    m=${r%@*}; src=${r#*@}
    case $src in pod) link="/32, address-less veth" ;; *) link="addressed" ;; esac
    note=""
    grep -q "^$r fail" "$res" && note="did not connect"
    grep -q "^$r errors" "$res" && note="wrk reported errors in some round"
    echo "| $m | $link | $(stat "$r" p50 0) | $(stat "$r" p99 0) | $(stat "$r" conn 0) | $(stat "$r" synre 1) | $(stat "$r" gbit 2) | $note |"
done
echo
echo "commands (client namespace; $CIP is the ClusterIP):"
echo "  sockperf ping-pong --tcp -i $CIP -p 11111 -t $LAT_SECS -m 64 --full-rtt"
echo "  wrk -t1 -c$WRK_CONNS -d${CONN_SECS}s -H 'Connection: close' http://$CIP/"
echo "  iperf3 -c $CIP -p 5201 -t $TPUT_SECS"
echo "proxy: HAProxy $(haproxy -v | awk 'NR==1{print $3}') tcp mode, nbthread 2; backend: nginx 1 worker"
echo
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg); run took $(($(date +%s) - START)) s"
