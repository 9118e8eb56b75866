use prometheus_client::metrics::histogram::exponential_buckets;

use super::*;
use crate::model::{ObjectKey, Protocol};

fn name(svc: &str) -> ServicePortName {
    ServicePortName {
        service: ObjectKey::new("default", svc),
        port: "http".into(),
        protocol: Protocol::Tcp,
    }
}

fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .map(|l| l[series.len() + 1..].trim())
}

#[test]
fn service_port_series_follow_their_listeners() {
    let m = Arc::new(PortSeries::new(true));
    let web = name("web");
    let a = m.service_port(&web);
    let b = m.service_port(&web);
    a.accepted();
    b.accepted();
    a.failed(FailReason::ConnectRefused);
    let ep: SocketAddr = "10.0.0.1:8080".parse().unwrap();
    a.connected(ep, Duration::from_millis(1));
    {
        let _open = a.open();
        assert_eq!(m.active_connections(&web), Some(1));
    }
    assert_eq!(m.active_connections(&web), Some(0));
    let labels = "namespace=\"default\",service=\"web\",port_name=\"http\",protocol=\"TCP\"";
    let text = m.render();
    assert_eq!(
        sample(
            &text,
            &format!("kubeuproxy_connections_accepted_total{{{labels}}}")
        ),
        Some("2"),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!("kubeuproxy_connections_failed_total{{{labels},reason=\"connect_refused\"}}")
        ),
        Some("1")
    );
    assert_eq!(
        sample(
            &text,
            &format!(
                "kubeuproxy_endpoint_connections_total{{{labels},endpoint=\"10.0.0.1:8080\"}}"
            )
        ),
        Some("1")
    );
    // One of two listeners closes: the series stay; the last one: gone.
    m.release_service_port(&web);
    assert!(m.render().contains("service=\"web\""));
    m.release_service_port(&web);
    assert!(!m.render().contains("service=\"web\""), "{}", m.render());
    assert_eq!(m.active_connections(&web), None);
}

#[test]
fn connect_errors_map_to_reasons() {
    let e = |k| io::Error::new(k, "x");
    assert_eq!(
        FailReason::of(&e(io::ErrorKind::ConnectionRefused)),
        FailReason::ConnectRefused
    );
    assert_eq!(
        FailReason::of(&e(io::ErrorKind::TimedOut)),
        FailReason::ConnectTimeout
    );
    assert_eq!(
        FailReason::of(&io::Error::from_raw_os_error(
            nix::errno::Errno::EHOSTUNREACH as i32
        )),
        FailReason::Unreachable
    );
    assert_eq!(
        FailReason::of(&io::Error::from_raw_os_error(
            nix::errno::Errno::EMFILE as i32
        )),
        FailReason::LocalError
    );
}

#[test]
fn connect_buckets_are_the_exponential_ones() {
    let expected: Vec<f64> = exponential_buckets(0.0001, 2.0, 16).collect();
    assert_eq!(CONNECT_BOUNDS.to_vec(), expected);
}

/// The cumulative `_bucket` samples of a port's connect histogram, by
/// `le`, then `_sum` and `_count`.
fn histogram(text: &str, labels: &str) -> (Vec<(String, u64)>, f64, u64) {
    let name = "kubeuproxy_endpoint_connect_duration_seconds";
    let prefix = format!("{name}_bucket{{{labels},le=\"");
    let buckets = text
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|rest| {
            let (le, value) = rest.split_once("\"} ").unwrap();
            (le.to_string(), value.parse().unwrap())
        })
        .collect();
    let sum = sample(text, &format!("{name}_sum{{{labels}}}"))
        .unwrap()
        .parse()
        .unwrap();
    let count = sample(text, &format!("{name}_count{{{labels}}}"))
        .unwrap()
        .parse()
        .unwrap();
    (buckets, sum, count)
}

#[test]
fn connect_durations_render_as_a_cumulative_histogram() {
    let m = Arc::new(PortSeries::new(false));
    let ep: SocketAddr = "10.0.0.1:8080".parse().unwrap();
    // On the first bound (inclusive), and past the last one.
    let web = m.service_port(&name("web"));
    web.connected(ep, Duration::from_micros(100));
    web.connected(ep, Duration::from_secs(5));
    // 1 ms (le 0.0016) and 0.5 s (le 0.8192).
    let api = m.service_port(&name("api"));
    api.connected(ep, Duration::from_millis(1));
    api.connected(ep, Duration::from_millis(500));
    let text = m.render();
    let les: Vec<String> = exponential_buckets(0.0001, 2.0, 16)
        .map(|b| {
            let mut s = format!("{b}");
            if !s.contains('.') {
                s.push_str(".0");
            }
            s
        })
        .chain(["+Inf".to_string()])
        .collect();
    assert_eq!(les[0], "0.0001");
    assert_eq!(les[4], "0.0016");
    assert_eq!(les[13], "0.8192");
    assert_eq!(les[15], "3.2768");

    let port = |svc| {
        format!("namespace=\"default\",service=\"{svc}\",port_name=\"http\",protocol=\"TCP\"")
    };
    let (buckets, sum, count) = histogram(&text, &port("web"));
    let expected: Vec<(String, u64)> = les
        .iter()
        .enumerate()
        .map(|(i, le)| (le.clone(), if i < 16 { 1 } else { 2 }))
        .collect();
    assert_eq!(buckets, expected, "{text}");
    assert_eq!(count, 2);
    assert!((sum - 5.0001).abs() < 1e-9, "{sum}");

    let (buckets, sum, count) = histogram(&text, &port("api"));
    let expected: Vec<(String, u64)> = les
        .iter()
        .enumerate()
        .map(|(i, le)| {
            let n = match i {
                0..4 => 0,
                4..13 => 1,
                _ => 2,
            };
            (le.clone(), n)
        })
        .collect();
    assert_eq!(buckets, expected, "{text}");
    assert_eq!(count, 2);
    assert!((sum - 0.501).abs() < 1e-9, "{sum}");
}

#[test]
fn a_fresh_port_renders_every_failure_reason_at_zero() {
    let m = Arc::new(PortSeries::new(false));
    let _web = m.service_port(&name("web"));
    let text = m.render();
    let labels = "namespace=\"default\",service=\"web\",port_name=\"http\",protocol=\"TCP\"";
    for reason in FailReason::ALL {
        assert_eq!(
            sample(
                &text,
                &format!(
                    "kubeuproxy_connections_failed_total{{{labels},reason=\"{}\"}}",
                    reason.as_str()
                )
            ),
            Some("0"),
            "{reason:?}: {text}"
        );
    }
    assert_eq!(
        text.matches("kubeuproxy_connections_failed_total{").count(),
        6
    );
    // And the rest of the port's series, at zero too.
    for series in [
        "kubeuproxy_connections_accepted_total",
        "kubeuproxy_connections_active",
        "kubeuproxy_connect_retries_total",
        "kubeuproxy_udp_flows_active",
        "kubeuproxy_udp_flows_expired_total",
        "kubeuproxy_session_affinity_clients",
        "kubeuproxy_endpoint_connect_duration_seconds_count",
    ] {
        assert_eq!(
            sample(&text, &format!("{series}{{{labels}}}")),
            Some("0"),
            "{series}"
        );
    }
    assert_eq!(
        sample(
            &text,
            &format!("kubeuproxy_endpoint_connect_duration_seconds_sum{{{labels}}}")
        ),
        Some("0.0")
    );
}

#[test]
fn service_ports_render_sorted_and_without_a_family_when_there_is_none() {
    let m = Arc::new(PortSeries::new(true));
    assert!(!m.render().contains("kubeuproxy_connections"));
    let udp = ServicePortName {
        protocol: Protocol::Udp,
        ..name("b")
    };
    for n in [name("c"), udp.clone(), name("a"), name("b")] {
        let _ = m.service_port(&n);
    }
    let text = m.render();
    let order: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("kubeuproxy_connections_accepted_total{"))
        .map(|l| &l[l.find("service=").unwrap()..l.find(" ").unwrap()])
        .collect();
    assert_eq!(
        order,
        [
            "service=\"a\",port_name=\"http\",protocol=\"TCP\"}",
            "service=\"b\",port_name=\"http\",protocol=\"TCP\"}",
            "service=\"b\",port_name=\"http\",protocol=\"UDP\"}",
            "service=\"c\",port_name=\"http\",protocol=\"TCP\"}",
        ]
    );
    // No endpoint seen yet: no per-endpoint family.
    assert!(!text.contains("kubeuproxy_endpoint_connections"), "{text}");
    assert_eq!(m.active_connections(&udp), Some(0));
    // A failure only: a series in the failures family alone.
    let b = m.service_port(&udp);
    b.attempt_failed("[fd00::1]:53".parse().unwrap());
    let text = m.render();
    assert!(!text.contains("kubeuproxy_endpoint_connections"), "{text}");
    assert!(
        text.contains(
            "kubeuproxy_endpoint_connect_failures_total{namespace=\"default\",service=\"b\",port_name=\"http\",protocol=\"UDP\",endpoint=\"[fd00::1]:53\"} 1"
        ),
        "{text}"
    );
}

/// The memory this module is about: one Service port's atomics and
/// label offsets (the `Arc` adds 16 bytes, the label string its
/// length). 296 before request mode (a pointer until a port's first
/// request) and the two UDP refusal counters.
#[test]
#[cfg(target_pointer_width = "64")]
fn a_service_port_stays_small() {
    assert!(
        std::mem::size_of::<ServicePortMetrics>() <= 320,
        "{}",
        std::mem::size_of::<ServicePortMetrics>()
    );
}

/// Two listeners of one Service port (dual-stack, or two traffic
/// policies) each report their own table: the gauges show the sum, and a
/// listener that goes takes only its own part with it.
#[test]
fn two_listeners_of_a_port_sum_their_udp_flows_and_affinity_clients() {
    let m = Arc::new(PortSeries::new(false));
    let web = name("web");
    let labels = "namespace=\"default\",service=\"web\",port_name=\"http\",protocol=\"TCP\"";
    let gauge = |series: &str| {
        let text = m.render();
        sample(&text, &format!("{series}{{{labels}}}")).map(str::to_owned)
    };
    let v4 = ListenerMetrics::new(m.service_port(&web));
    let v6 = ListenerMetrics::new(m.service_port(&web));
    v4.udp_flows(3);
    v6.udp_flows(5);
    v4.affinity_clients(2);
    v6.affinity_clients(1);
    assert_eq!(gauge("kubeuproxy_udp_flows_active").as_deref(), Some("8"));
    assert_eq!(
        gauge("kubeuproxy_session_affinity_clients").as_deref(),
        Some("3")
    );
    v4.udp_flows(1);
    assert_eq!(gauge("kubeuproxy_udp_flows_active").as_deref(), Some("6"));
    drop(v6);
    assert_eq!(gauge("kubeuproxy_udp_flows_active").as_deref(), Some("1"));
    assert_eq!(
        gauge("kubeuproxy_session_affinity_clients").as_deref(),
        Some("2")
    );
}
