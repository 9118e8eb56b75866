#!/usr/bin/env bash
# Cold start of the proxy as a user starts it (no --proxy-port-range), by
# hand: N ClusterIP Services with two endpoints each, one JSON List file;
# prints the "rules synced" timings and the RSS after the first sync.
# Runs inside a network namespace of its own (lo only; no packet is sent).
#
#   sudo benches/tools/cold-start.sh target/release/kube-uproxy 10000 [more flags]
#
# The harness (cargo bench --bench datapath) measures the control plane with
# a port range; this script covers the default, where the proxy takes ports
# from the kernel's ephemeral range itself.
set -euo pipefail
bin=$(realpath "$1"); n=$2; shift 2
dir=$(mktemp -d); ns="ku-cold-$$"
cleanup() { ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL; ip netns del "$ns" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
python3 - "$n" "$dir/services.json" <<'PY'
import json, sys
n, path = int(sys.argv[1]), sys.argv[2]
items = []
for i in range(n):
    name = f"svc-{i}"
    items.append({"apiVersion": "v1", "kind": "Service",
                  "metadata": {"name": name, "namespace": "default"},
                  "spec": {"clusterIP": f"10.{96 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}",
                           "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}})
    items.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                  "metadata": {"name": name + "-a", "namespace": "default",
                               "labels": {"kubernetes.io/service-name": name}},
                  "addressType": "IPv4",
                  "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                  "endpoints": [{"addresses": [f"10.244.{j}.{10 + i % 200}"], "conditions": {"ready": True}}
                                for j in (1, 2)]})
json.dump({"apiVersion": "v1", "kind": "List", "items": items}, open(path, "w"))
PY
ip netns add "$ns"
ip netns exec "$ns" ip link set lo up
start=$(date +%s.%N)
ip netns exec "$ns" "$bin" --manifests "$dir/services.json" "$@" >"$dir/log" 2>&1 &
for _ in $(seq 1 600); do
  grep -q 'rules synced' "$dir/log" && break
  sleep 0.1
done
synced=$(date +%s.%N)
grep -m1 'rules synced' "$dir/log" || { echo "no sync within 60 s"; tail "$dir/log"; exit 1; }
sleep 2
pid=$(ip netns pids "$ns" | head -1)
rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
awk -v n="$n" -v t0="$start" -v t1="$synced" -v rss="$rss" 'BEGIN {
  printf "services=%d start->synced(polled)=%.2f s rss=%d KiB per_service=%.1f KiB\n", n, t1 - t0, rss, rss / n
}' 
