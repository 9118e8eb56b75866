use super::*;
use serde_json::{Value, json};

fn dest(ip: &str, port: u16) -> Destination {
    Destination {
        ip: ip.parse().unwrap(),
        protocol: Protocol::Tcp,
        port,
    }
}

fn to_json(n: &Nftables) -> Value {
    serde_json::to_value(n).unwrap()
}

#[test]
fn full_replaces_the_table_and_holds_the_elements() {
    let mut els = BTreeMap::new();
    els.insert(
        Key::Service(dest("10.96.0.10", 80)),
        Action::Redirect(20000),
    );
    els.insert(Key::Service(dest("10.96.0.11", 443)), Action::Reject);
    els.insert(
        Key::NodePort(
            IpFamily::V4,
            ProxyPort {
                protocol: Protocol::Udp,
                port: 30053,
            },
        ),
        Action::Redirect(20001),
    );
    els.insert(Key::Guarded(dest("10.200.8.8", 80)), Action::Member);
    els.insert(
        Key::Allow(dest("10.200.8.8", 80), "10.0.0.0/8".parse().unwrap()),
        Action::Member,
    );
    let ports = BTreeSet::from([(
        IpFamily::V4,
        ProxyPort {
            protocol: Protocol::Tcp,
            port: 20000,
        },
    )]);
    let layout = Layout {
        proxy_address: "169.254.42.1".parse().unwrap(),
        proxy_address_v6: None,
        nodeport_addresses: Some(vec!["10.200.0.0/24".parse().unwrap()]),
        instance: Instance {
            id: 7,
            note: "a note".into(),
        },
        upstream_mark: 0x2000,
        local_traffic: None,
        preserve_client_ip_mark: 0x1000,
    };
    let v = to_json(&full(&layout, &els, &ports));
    let cmds = v["nftables"].as_array().unwrap();
    // add table, delete table, add table: atomic replacement.
    assert!(cmds[0]["add"]["table"].is_object());
    assert!(cmds[1]["delete"]["table"].is_object());
    assert!(cmds[2]["add"]["table"].is_object());
    let map = cmds.iter().find_map(|c| c["add"].get("map")).unwrap();
    assert_eq!(map["name"], MAP_SERVICE_PORTS);
    assert_eq!(
        map["elem"],
        json!([[{"concat": ["10.96.0.10", "tcp", 80]}, 20000]])
    );
    let set = |name: &str| {
        cmds.iter()
            .find_map(|c| {
                c["add"]
                    .get("set")
                    .or_else(|| c["add"].get("map"))
                    .filter(|s| s["name"] == name)
            })
            .unwrap_or_else(|| panic!("no set {name}"))
    };
    assert_eq!(
        set(SET_NO_ENDPOINTS)["elem"],
        json!([{"concat": ["10.96.0.11", "tcp", 443]}])
    );
    assert_eq!(
        set(MAP_NODE_PORTS)["elem"],
        json!([[{"concat": ["udp", 30053]}, 20001]])
    );
    assert_eq!(
        set(SET_LB_GUARDED)["elem"],
        json!([{"concat": ["10.200.8.8", "tcp", 80]}])
    );
    assert_eq!(
        set(SET_LB_ALLOWED)["elem"],
        json!([{"concat": ["10.200.8.8", "tcp", 80, {"prefix": {"addr": "10.0.0.0", "len": 8}}]}])
    );
    assert_eq!(set(SET_LB_ALLOWED)["flags"], json!(["interval"]));
    assert_eq!(
        set(SET_NODEPORT_ADDRESSES)["elem"],
        json!([{"prefix": {"addr": "10.200.0.0", "len": 24}}])
    );
    assert_eq!(
        set(SET_PROXY_PORTS)["elem"],
        json!([{"concat": ["tcp", 20000]}])
    );
    let instance = &set(SET_INSTANCE)["elem"][0]["elem"];
    assert_eq!(instance["val"], 7);
    assert_eq!(instance["comment"], "a note");
    // Every rule of every chain, as rules_in_chain() says.
    for (name, ..) in CHAINS {
        let n = cmds
            .iter()
            .filter_map(|c| c["add"].get("rule"))
            .filter(|r| r["chain"] == name)
            .count();
        assert_eq!(
            n,
            rules_in_chain(&layout, IpFamily::V4, name),
            "rules in {name}"
        );
    }
    // Service traffic is translated to the proxy address, not redirected.
    let dnat = cmds
        .iter()
        .filter_map(|c| c["add"].get("rule"))
        .find(|r| r["chain"] == "nat-prerouting")
        .unwrap();
    assert_eq!(dnat["expr"][1]["dnat"]["addr"], "169.254.42.1");
    assert_eq!(
        dnat["expr"][1]["dnat"]["port"]["map"]["data"],
        format!("@{MAP_SERVICE_PORTS}")
    );
    // The proxy's own upstream packets (marked) pass the NAT output chain
    // first, untranslated: it never connects to itself.
    let own = cmds
        .iter()
        .filter_map(|c| c["add"].get("rule"))
        .find(|r| r["chain"] == "nat-output")
        .unwrap();
    assert_eq!(
        own["expr"][0]["match"]["left"]["&"],
        json!([{"meta": {"key": "mark"}}, 0x2000])
    );
    assert_eq!(own["expr"][0]["match"]["right"], 0x2000);
    assert!(own["expr"][1].get("return").is_some());
    // preserve-client-ip: the socket's mark is saved in conntrack on the
    // way out (first in filter-output) and given back to the endpoint's
    // replies before routing (first in filter-prerouting), other bits kept.
    let first = |chain: &str| {
        cmds.iter()
            .filter_map(|c| c["add"].get("rule"))
            .find(|r| r["chain"] == chain)
            .unwrap()
            .clone()
    };
    let saved = first("filter-output");
    assert_eq!(
        saved["expr"][0]["match"]["left"]["&"],
        json!([{"meta": {"key": "mark"}}, 0x3000])
    );
    assert_eq!(saved["expr"][0]["match"]["right"], 0x3000);
    assert_eq!(
        saved["expr"][1]["mangle"],
        json!({"key": {"ct": {"key": "mark"}}, "value": {"|": [{"ct": {"key": "mark"}}, 0x1000]}})
    );
    let restored = first("filter-prerouting");
    assert_eq!(
        restored["expr"][0]["match"]["left"]["&"],
        json!([{"ct": {"key": "mark"}}, 0x1000])
    );
    assert_eq!(
        restored["expr"][1]["mangle"],
        json!({"key": {"meta": {"key": "mark"}}, "value": {"|": [{"meta": {"key": "mark"}}, 0x1000]}})
    );
    // TCP is refused with a reset (not rate-limited), the rest by ICMP.
    let rejects: Vec<&Value> = cmds
        .iter()
        .filter_map(|c| c["add"].get("rule"))
        .filter(|r| r["chain"] == "filter-forward")
        .collect();
    assert_eq!(rejects[0]["expr"][3]["reject"]["type"], "tcp reset");
    assert_eq!(rejects[0]["expr"][2]["match"]["right"], "tcp");
    assert!(rejects[1]["expr"][2]["reject"].is_object());
    let chains: Vec<&str> = cmds
        .iter()
        .filter_map(|c| c["add"].get("chain"))
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        chains,
        [
            "filter-prerouting",
            "filter-input",
            "filter-forward",
            "filter-output",
            "nat-prerouting",
            "nat-output"
        ]
    );
}

#[test]
fn delta_touches_only_changed_elements_and_deletes_first() {
    let changes = [
        Change {
            key: Key::Service(dest("10.96.0.10", 80)),
            old: Some(Action::Redirect(20000)),
            new: Some(Action::Reject),
        },
        Change {
            key: Key::Service(dest("10.96.0.12", 80)),
            old: None,
            new: Some(Action::Redirect(20001)),
        },
        Change {
            key: Key::Service(dest("10.96.0.13", 80)),
            old: Some(Action::Redirect(20002)),
            new: Some(Action::Redirect(20002)),
        },
    ];
    let v = to_json(&delta(&changes, &[]).unwrap());
    let cmds = v["nftables"].as_array().unwrap();
    assert_eq!(cmds.len(), 3, "{v}");
    assert_eq!(cmds[0]["delete"]["element"]["name"], MAP_SERVICE_PORTS);
    assert_eq!(cmds[1]["add"]["element"]["name"], SET_NO_ENDPOINTS);
    assert_eq!(
        cmds[2]["add"]["element"]["elem"],
        json!([[{"concat": ["10.96.0.12", "tcp", 80]}, 20001]])
    );
    assert!(delta(&changes[2..], &[]).is_none());
    let p = ProxyPort {
        protocol: Protocol::Tcp,
        port: 20001,
    };
    let v = to_json(&delta(&[], &[((IpFamily::V4, p), true)]).unwrap());
    assert_eq!(v["nftables"][0]["add"]["element"]["name"], SET_PROXY_PORTS);
}

fn dual_stack_layout() -> Layout {
    Layout {
        proxy_address: "169.254.42.1".parse().unwrap(),
        proxy_address_v6: Some("fd6b:7570:7278::1".parse().unwrap()),
        nodeport_addresses: Some(vec![
            "10.200.0.0/24".parse().unwrap(),
            "fd00:200::/64".parse().unwrap(),
        ]),
        instance: Instance {
            id: 7,
            note: String::new(),
        },
        upstream_mark: 0x2000,
        local_traffic: None,
        preserve_client_ip_mark: 0x1000,
    }
}

#[test]
fn each_family_gets_its_own_table_with_its_own_keys_in_one_batch() {
    let mut els = BTreeMap::new();
    els.insert(
        Key::Service(dest("10.96.0.10", 80)),
        Action::Redirect(20000),
    );
    els.insert(
        Key::Service(dest("fd00:96::10", 80)),
        Action::Redirect(20001),
    );
    els.insert(Key::Service(dest("fd00:96::11", 53)), Action::Reject);
    let node_port = ProxyPort {
        protocol: Protocol::Tcp,
        port: 30080,
    };
    els.insert(
        Key::NodePort(IpFamily::V4, node_port),
        Action::Redirect(20000),
    );
    els.insert(
        Key::NodePort(IpFamily::V6, node_port),
        Action::Redirect(20001),
    );
    let ports = BTreeSet::from([
        (
            IpFamily::V4,
            ProxyPort {
                protocol: Protocol::Tcp,
                port: 20000,
            },
        ),
        (
            IpFamily::V6,
            ProxyPort {
                protocol: Protocol::Tcp,
                port: 20001,
            },
        ),
    ]);
    let v = to_json(&full(&dual_stack_layout(), &els, &ports));
    let cmds = v["nftables"].as_array().unwrap();
    let tables: Vec<&Value> = cmds.iter().filter_map(|c| c["add"].get("table")).collect();
    assert_eq!(tables.len(), 4, "add/delete/add per family: {tables:?}");
    assert_eq!(tables[0]["family"], "ip");
    assert_eq!(tables[3]["family"], "ip6");
    let set = |family: &str, name: &str| {
        cmds.iter()
            .find_map(|c| {
                c["add"]
                    .get("set")
                    .or_else(|| c["add"].get("map"))
                    .filter(|s| s["name"] == name && s["family"] == family)
            })
            .unwrap_or_else(|| panic!("no {family} set {name}"))
    };
    assert_eq!(
        set("ip", MAP_SERVICE_PORTS)["elem"],
        json!([[{"concat": ["10.96.0.10", "tcp", 80]}, 20000]])
    );
    assert_eq!(
        set("ip6", MAP_SERVICE_PORTS)["elem"],
        json!([[{"concat": ["fd00:96::10", "tcp", 80]}, 20001]])
    );
    assert_eq!(
        set("ip6", MAP_SERVICE_PORTS)["type"],
        json!(["ipv6_addr", "inet_proto", "inet_service"])
    );
    assert_eq!(
        set("ip6", SET_NO_ENDPOINTS)["elem"],
        json!([{"concat": ["fd00:96::11", "tcp", 53]}])
    );
    assert!(set("ip", SET_NO_ENDPOINTS).get("elem").is_none());
    assert_eq!(
        set("ip6", MAP_NODE_PORTS)["elem"],
        json!([[{"concat": ["tcp", 30080]}, 20001]])
    );
    assert_eq!(
        set("ip6", SET_PROXY_PORTS)["elem"],
        json!([{"concat": ["tcp", 20001]}])
    );
    assert_eq!(
        set("ip", SET_PROXY_PORTS)["elem"],
        json!([{"concat": ["tcp", 20000]}])
    );
    assert_eq!(set("ip6", SET_LB_ALLOWED)["type"][3], "ipv6_addr");
    // Each family's --nodeport-addresses CIDRs in its own table.
    assert_eq!(
        set("ip", SET_NODEPORT_ADDRESSES)["elem"],
        json!([{"prefix": {"addr": "10.200.0.0", "len": 24}}])
    );
    assert_eq!(
        set("ip6", SET_NODEPORT_ADDRESSES)["elem"],
        json!([{"prefix": {"addr": "fd00:200::", "len": 64}}])
    );
    // The ip6 table translates to the IPv6 proxy address and matches
    // on the IPv6 header; every chain has its rules there too.
    let rules = |family: &str| -> Vec<&Value> {
        cmds.iter()
            .filter_map(|c| c["add"].get("rule"))
            .filter(|r| r["family"] == family)
            .collect()
    };
    let dnat6 = rules("ip6")
        .into_iter()
        .find(|r| r["chain"] == "nat-prerouting")
        .unwrap();
    assert_eq!(dnat6["expr"][1]["dnat"]["addr"], "fd6b:7570:7278::1");
    assert_eq!(
        dnat6["expr"][1]["dnat"]["port"]["map"]["key"]["concat"][0]["payload"]["protocol"],
        "ip6"
    );
    for (name, ..) in CHAINS {
        for family in ["ip", "ip6"] {
            let n = rules(family).iter().filter(|r| r["chain"] == name).count();
            let fam = if family == "ip" {
                IpFamily::V4
            } else {
                IpFamily::V6
            };
            assert_eq!(
                n,
                rules_in_chain(&dual_stack_layout(), fam, name),
                "{family} rules in {name}"
            );
        }
    }
    assert!(
        !serde_json::to_string(&rules("ip6"))
            .unwrap()
            .contains("\"ip\"")
    );
    // Refusals: TCP reset and ICMPv6 (the family's default reject).
    let forward6: Vec<&Value> = rules("ip6")
        .into_iter()
        .filter(|r| r["chain"] == "filter-forward")
        .collect();
    assert_eq!(forward6[0]["expr"][3]["reject"]["type"], "tcp reset");
    assert!(forward6[1]["expr"][2]["reject"].is_object());

    // Without IPv6: the ip table alone, and IPv6 keys left out.
    let mut v4_only = dual_stack_layout();
    v4_only.proxy_address_v6 = None;
    let v = to_json(&full(&v4_only, &els, &ports));
    let text = v.to_string();
    assert!(!text.contains("ip6"), "{text}");
    assert!(!text.contains("fd00:96::10"), "{text}");
}

#[test]
fn delta_sends_each_element_to_its_familys_table() {
    let changes = [
        Change {
            key: Key::Service(dest("fd00:96::10", 80)),
            old: None,
            new: Some(Action::Redirect(20001)),
        },
        Change {
            key: Key::NodePort(
                IpFamily::V6,
                ProxyPort {
                    protocol: Protocol::Udp,
                    port: 30053,
                },
            ),
            old: Some(Action::Redirect(20002)),
            new: Some(Action::Reject),
        },
    ];
    let p = ProxyPort {
        protocol: Protocol::Tcp,
        port: 20001,
    };
    let v = to_json(&delta(&changes, &[((IpFamily::V6, p), true)]).unwrap());
    let cmds = v["nftables"].as_array().unwrap();
    assert_eq!(cmds.len(), 4, "{v}");
    for c in cmds {
        let e = c.get("add").or_else(|| c.get("delete")).unwrap()["element"].clone();
        assert_eq!(e["family"], "ip6", "{c}");
    }
    assert_eq!(cmds[1]["delete"]["element"]["name"], MAP_NODE_PORTS);
    assert_eq!(
        cmds[2]["add"]["element"]["elem"],
        json!([[{"concat": ["fd00:96::10", "tcp", 80]}, 20001]])
    );
    assert_eq!(cmds[3]["add"]["element"]["name"], SET_NO_ENDPOINT_NODEPORTS);
}

/// `--detect-local-mode`: two DNATs of pod traffic head `nat-prerouting`
/// in each family the detector covers, and pod keys live in their own
/// maps (read back as the same keys).
#[test]
fn local_traffic_detection_adds_the_pod_dnats_and_maps() {
    let mut els = BTreeMap::new();
    let pod_lb = Key::PodService(dest("10.200.8.8", 80));
    let pod_np = Key::PodNodePort(
        IpFamily::V4,
        ProxyPort {
            protocol: Protocol::Tcp,
            port: 30080,
        },
    );
    els.insert(pod_lb, Action::Redirect(20000));
    els.insert(pod_np, Action::Redirect(20000));
    let nat_prerouting = |layout: &Layout, family: &str| -> Vec<Value> {
        let v = to_json(&full(layout, &els, &BTreeSet::new()));
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["add"].get("rule"))
            .filter(|r| r["chain"] == "nat-prerouting" && r["family"] == family)
            .cloned()
            .collect()
    };
    // ClusterCIDR with an IPv4 range only: the ip6 table detects nothing.
    let mut layout = dual_stack_layout();
    layout.local_traffic = Some(LocalTraffic::Sources(vec![
        "10.244.0.0/16".parse().unwrap(),
    ]));
    let v4 = nat_prerouting(&layout, "ip");
    assert_eq!(
        v4.len(),
        rules_in_chain(&layout, IpFamily::V4, "nat-prerouting")
    );
    assert_eq!(v4.len(), 4);
    assert_eq!(
        v4[0]["expr"][0]["match"],
        json!({"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
               "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}})
    );
    assert_eq!(
        v4[0]["expr"][2]["dnat"]["port"]["map"]["data"],
        format!("@{MAP_POD_SERVICE_PORTS}")
    );
    assert_eq!(
        v4[1]["expr"].as_array().unwrap().last().unwrap()["dnat"]["port"]["map"]["data"],
        format!("@{MAP_POD_NODE_PORTS}")
    );
    assert_eq!(
        nat_prerouting(&layout, "ip6").len(),
        rules_in_chain(&layout, IpFamily::V6, "nat-prerouting")
    );
    assert_eq!(nat_prerouting(&layout, "ip6").len(), 2);
    // Interface detectors cover both families; a prefix is nft's wildcard.
    layout.local_traffic = Some(LocalTraffic::InterfacePrefix("cali".into()));
    for family in ["ip", "ip6"] {
        let r = nat_prerouting(&layout, family);
        assert_eq!(r.len(), 4);
        assert_eq!(
            r[0]["expr"][0]["match"],
            json!({"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "cali*"})
        );
    }
    layout.local_traffic = Some(LocalTraffic::Bridge("cni0".into()));
    assert_eq!(
        nat_prerouting(&layout, "ip")[0]["expr"][0]["match"]["right"],
        "cni0"
    );
    // The elements, and reading them back.
    let v = to_json(&full(&layout, &els, &BTreeSet::new()));
    let mut t = crate::rules::KernelTable::new(IpFamily::V4);
    for c in v["nftables"].as_array().unwrap() {
        if let Some(m) = c["add"].get("map").filter(|m| m["family"] == "ip") {
            t.add_set_object(m).unwrap();
        }
    }
    assert_eq!(
        t.elements,
        BTreeMap::from([
            (pod_lb, Action::Redirect(20000)),
            (pod_np, Action::Redirect(20000))
        ])
    );
}
