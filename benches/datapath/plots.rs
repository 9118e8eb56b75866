//! PNG figures rendered with plotters (bitmap backend, ab_glyph text with a
//! TrueType font found on the system: fonts-dejavu-core).

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::{Lat, PathSummary, Report};

const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

/// Registers a sans-serif font; false if none is installed.
pub fn init_font() -> bool {
    for p in FONTS {
        if let Ok(bytes) = std::fs::read(p) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

fn color(name: &str) -> RGBColor {
    match name {
        "direct" => RGBColor(40, 40, 40),
        "iptables" => RGBColor(31, 119, 180),
        "nftables" => RGBColor(23, 190, 207),
        "kube-uproxy splice" => RGBColor(214, 39, 40),
        "kube-uproxy copy" => RGBColor(255, 127, 14),
        "nginx stream" => RGBColor(44, 160, 44),
        "haproxy tcp" => RGBColor(148, 103, 189),
        _ => RGBColor(127, 127, 127),
    }
}

type Res = Result<(), Box<dyn std::error::Error>>;

const PCT: [&str; 5] = ["p50", "p90", "p99", "p99.9", "max"];

fn latency_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    series: &[(&str, &Lat)],
) -> Res {
    if series.is_empty() {
        return Ok(());
    }
    let lo = series
        .iter()
        .map(|(_, l)| l.p50_us)
        .fold(f64::INFINITY, f64::min)
        .max(1.0);
    let hi = series
        .iter()
        .map(|(_, l)| l.max_us)
        .fold(0.0, f64::max)
        .max(lo * 2.0);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.25f64..4.25f64, (lo * 0.7..hi * 1.4).log_scale())?;
    chart
        .configure_mesh()
        .x_labels(5)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.05 && (0.0..=4.0).contains(&i) {
                PCT[i as usize].to_string()
            } else {
                String::new()
            }
        })
        .y_desc("latency (µs, log scale)")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 14))
        .draw()?;
    for (name, lat) in series {
        let c = color(name);
        let pts: Vec<(f64, f64)> = lat
            .points()
            .iter()
            .enumerate()
            .map(|(i, v)| (i as f64, v.max(lo * 0.7)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Latency percentiles per path: persistent, fixed-rate, connect.
pub fn latency(rep: &Report, path: &Path) -> Res {
    let root = BitMapBackend::new(path, (1800, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "Latency percentiles per data path ({}, {})",
            rep.mode, rep.date
        ),
        ("sans-serif", 24),
    )?;
    let panels = root.split_evenly((1, 3));
    let live: Vec<&PathSummary> = rep.paths.iter().filter(|p| p.skipped.is_none()).collect();
    let pick = |g: fn(&PathSummary) -> Option<&Lat>| -> Vec<(&str, &Lat)> {
        live.iter()
            .filter_map(|p| g(p).map(|l| (p.name.as_str(), l)))
            .collect()
    };
    latency_panel(
        &panels[0],
        "request/response, persistent connection",
        &pick(|p| p.ping.as_ref()),
    )?;
    let rate = rep.settings.get("fixed_rate").cloned().unwrap_or_default();
    latency_panel(
        &panels[1],
        &format!("request/response at {rate} req/s"),
        &pick(|p| p.fixed.as_ref()),
    )?;
    latency_panel(
        &panels[2],
        "connect() → first response byte",
        &pick(|p| p.conn.as_ref()),
    )?;
    root.present()?;
    Ok(())
}

fn bar_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    unit: &str,
    vals: &[(&str, f64)],
) -> Res {
    if vals.is_empty() {
        return Ok(());
    }
    let n = vals.len();
    let max = vals.iter().map(|v| v.1).fold(0.0, f64::max).max(1e-9);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(150)
        .build_cartesian_2d(0f64..max * 1.22, (0..n - 1).into_segmented())?;
    let names: Vec<String> = vals.iter().map(|v| v.0.to_string()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_desc(unit)
        .x_label_formatter(&|x| {
            if max >= 100.0 {
                format!("{x:.0}")
            } else {
                format!("{x:.1}")
            }
        })
        .label_style(("sans-serif", 14))
        .draw()?;
    chart.draw_series(vals.iter().enumerate().map(|(i, (name, v))| {
        let mut r = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (*v, SegmentValue::Exact(i + 1)),
            ],
            color(name).filled(),
        );
        r.set_margin(5, 5, 0, 0);
        r
    }))?;
    chart.draw_series(vals.iter().enumerate().map(|(i, (_, v))| {
        let label = if *v >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.2}")
        };
        Text::new(
            label,
            (*v + max * 0.01, SegmentValue::CenterOf(i)),
            ("sans-serif", 14),
        )
    }))?;
    Ok(())
}

/// Throughput per path: req/s, conn/s, one-way and both-ways Gbit/s.
pub fn throughput(rep: &Report, path: &Path) -> Res {
    let root = BitMapBackend::new(path, (1600, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "Throughput per data path ({}, {}; median of rounds)",
            rep.mode, rep.date
        ),
        ("sans-serif", 24),
    )?;
    let panels = root.split_evenly((2, 2));
    let live: Vec<&PathSummary> = rep.paths.iter().filter(|p| p.skipped.is_none()).collect();
    let pick = |g: fn(&PathSummary) -> Option<f64>| -> Vec<(&str, f64)> {
        live.iter()
            .filter_map(|p| g(p).map(|v| (p.name.as_str(), v)))
            .collect()
    };
    bar_panel(
        &panels[0],
        "request/response, persistent connection",
        "requests per second",
        &pick(|p| p.ping_rate),
    )?;
    bar_panel(
        &panels[1],
        "connection per request at saturation",
        "connections per second",
        &pick(|p| p.conn_rate),
    )?;
    bar_panel(
        &panels[2],
        "bulk, one way",
        "Gbit/s",
        &pick(|p| p.one_way_gbps),
    )?;
    bar_panel(
        &panels[3],
        "bulk, both ways (sum)",
        "Gbit/s",
        &pick(|p| p.both_ways_gbps),
    )?;
    root.present()?;
    Ok(())
}
