//! kube-proxy's rules as its proxiers write them (one Service, one
//! endpoint: backend 0), and what is left of them on a node, for the
//! tests of the migration from kube-proxy and of `--cleanup-kube-proxy`
//! (e2e_migration, image_rootfs).

use std::time::Duration;

use super::{BACKEND_PORT, ProxyProcess, SVC_PORT, VIP_A, poll};
use crate::{Netns, backend_addr};

/// kube-proxy's nftables tables on `node` (`nft list tables` lines).
pub fn nft_tables_left(node: &Netns) -> Vec<String> {
    let out = node
        .output("nft", ["list", "tables"])
        .expect("nft list tables");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("kube-proxy"))
        .map(str::to_string)
        .collect()
}

/// kube-proxy's chains that `save` (an iptables-save tool) lists on
/// `node`; the kubelet's (`KUBE-FIREWALL`, `KUBE-MARK-MASQ`) stay after
/// a cleanup, as after `kube-proxy --cleanup`, and are not counted.
pub fn chains_left(node: &Netns, save: &str) -> Vec<String> {
    iptables_chains(node, save)
        .into_iter()
        .filter(|c| {
            c.starts_with("KUBE-") && !matches!(c.as_str(), "KUBE-FIREWALL" | "KUBE-MARK-MASQ")
        })
        .collect()
}

/// The chains `save` (an iptables-save tool) lists on `node`.
pub fn iptables_chains(node: &Netns, save: &str) -> Vec<String> {
    let out = node
        .output(save, [] as [&str; 0])
        .unwrap_or_else(|e| panic!("{save}: {e}"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Waits up to `timeout` for `leftovers` to find none of kube-proxy's
/// rules; panics naming those still there (after checking that `proxy`,
/// which was to remove them, still runs).
pub fn wait_removed(
    proxy: &mut ProxyProcess,
    timeout: Duration,
    mut leftovers: impl FnMut() -> Vec<String>,
) {
    let removed = poll(timeout, Duration::from_millis(50), || {
        let left = leftovers();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });
    if let Err(left) = removed {
        proxy.assert_running("--cleanup-kube-proxy");
        panic!("kube-proxy's rules are still there: {left}");
    }
}

/// kube-proxy in nftables mode, as its proxier writes the table (names
/// and structure; one Service, one endpoint: backend 0).
pub fn nftables() -> String {
    let ep = backend_addr(0);
    format!(
        r#"table ip kube-proxy {{
	comment "rules for kube-proxy"
	map no-endpoint-services {{
		type ipv4_addr . inet_proto . inet_service : verdict
		comment "vmap to drop or reject packets to services with no endpoints"
	}}
	chain service-endpoints-check {{
		ip daddr . meta l4proto . th dport vmap @no-endpoint-services
	}}
	chain filter-input {{
		type filter hook input priority -110; policy accept;
		ct state new jump service-endpoints-check
	}}
	chain filter-forward {{
		type filter hook forward priority -110; policy accept;
		ct state new jump service-endpoints-check
	}}
	chain filter-output {{
		type filter hook output priority -110; policy accept;
		ct state new jump service-endpoints-check
	}}
	chain mark-for-masquerade {{
		meta mark set meta mark | 0x4000
	}}
	chain masquerading {{
		meta mark & 0x4000 == 0 return
		meta mark set meta mark ^ 0x4000
		masquerade fully-random
	}}
	chain endpoint-5OJB2KTY-default/svc-a/tcp/http__{ep}/{BACKEND_PORT} {{
		ip saddr {ep} jump mark-for-masquerade
		meta l4proto tcp dnat to {ep}:{BACKEND_PORT}
	}}
	chain service-ULMVA6XW-default/svc-a/tcp/http {{
		ip daddr {VIP_A} tcp dport {SVC_PORT} ip saddr != 10.244.0.0/16 jump mark-for-masquerade
		numgen random mod 1 vmap {{ 0 : goto endpoint-5OJB2KTY-default/svc-a/tcp/http__{ep}/{BACKEND_PORT} }}
	}}
	map service-ips {{
		type ipv4_addr . inet_proto . inet_service : verdict
		comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
		elements = {{ {VIP_A} . tcp . {SVC_PORT} : goto service-ULMVA6XW-default/svc-a/tcp/http }}
	}}
	chain services {{
		ip daddr . meta l4proto . th dport vmap @service-ips
	}}
	chain nat-prerouting {{
		type nat hook prerouting priority dstnat; policy accept;
		jump services
	}}
	chain nat-output {{
		type nat hook output priority -100; policy accept;
		jump services
	}}
	chain nat-postrouting {{
		type nat hook postrouting priority srcnat; policy accept;
		jump masquerading
	}}
}}
"#
    )
}

/// kube-proxy's iptables mode (`iptables-restore` input as its proxier
/// writes it, abridged: one Service, one endpoint), with the kubelet's
/// KUBE-FIREWALL, which its cleanup leaves. Every match and target module
/// kube-proxy's rules use: comment, tcp, mark, MARK, MASQUERADE, DNAT,
/// statistic, recent (session affinity), addrtype, conntrack, REJECT.
pub fn iptables() -> String {
    let ep = backend_addr(0);
    format!(
        r#"*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-ULMVA6XWGHKZ4A3N - [0:0]
:KUBE-SEP-5OJB2KTYQ3DLF7XA - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SERVICES -d {VIP_A}/32 -p tcp -m comment --comment "default/svc-a:http cluster IP" -m tcp --dport {SVC_PORT} -j KUBE-SVC-ULMVA6XWGHKZ4A3N
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-ULMVA6XWGHKZ4A3N ! -s 10.244.0.0/16 -d {VIP_A}/32 -p tcp -m comment --comment "default/svc-a:http cluster IP" -m tcp --dport {SVC_PORT} -j KUBE-MARK-MASQ
-A KUBE-SVC-ULMVA6XWGHKZ4A3N -m comment --comment "default/svc-a:http -> {ep}:{BACKEND_PORT}" -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-5OJB2KTYQ3DLF7XA --mask 255.255.255.255 --rsource -j KUBE-SEP-5OJB2KTYQ3DLF7XA
-A KUBE-SVC-ULMVA6XWGHKZ4A3N -m comment --comment "default/svc-a:http -> {ep}:{BACKEND_PORT}" -m statistic --mode random --probability 1.00000000000 -j KUBE-SEP-5OJB2KTYQ3DLF7XA
-A KUBE-SEP-5OJB2KTYQ3DLF7XA -s {ep}/32 -m comment --comment "default/svc-a:http" -j KUBE-MARK-MASQ
-A KUBE-SEP-5OJB2KTYQ3DLF7XA -p tcp -m comment --comment "default/svc-a:http" -m recent --set --name KUBE-SEP-5OJB2KTYQ3DLF7XA --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination {ep}:{BACKEND_PORT}
COMMIT
*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-FIREWALL - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.99/32 -p tcp -m comment --comment "default/svc-gone:http has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
"#
    )
}
