//! `wattn bench --plot FILE.svg`: flash throughput against sequence length, one line per
//! series, as a self-contained SVG (log-2 x axis, linear y axis from zero, legend).

use super::report::{BenchReport, RateUnit, seq_label};
use std::collections::BTreeMap;
use std::fmt::Write;

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 500.0;
/// Plot area inside the margins; the legend sits to the right of it.
const LEFT: f64 = 80.0;
const RIGHT: f64 = 620.0;
const TOP: f64 = 60.0;
const BOTTOM: f64 = 440.0;
const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// The SVG text of the report's measured points (an empty plot says so).
pub fn svg(report: &BenchReport) -> String {
    let unit = RateUnit::for_points(&report.points);
    let mut series: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for p in &report.points {
        if let Some(m) = p.measured() {
            series.entry(&p.series).or_default().push((p.seq as f64, m.flash.flops_per_s / unit.per));
        }
    }
    for line in series.values_mut() {
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let (lo, hi, y_max) = series
        .values()
        .flatten()
        .fold((f64::MAX, 0.0f64, 0.0f64), |(lo, hi, top), &(x, y)| (lo.min(x), hi.max(x), top.max(y)));
    let (x_lo, x_hi) = if lo > hi {
        (256.0, 1024.0)
    } else if lo == hi {
        (lo / 2.0, hi * 2.0)
    } else {
        (lo, hi)
    };
    let y_step = nice_step(y_max / 5.0);
    let y_ticks = (y_max / y_step).ceil().max(1.0) as usize;
    let y_top = y_ticks as f64 * y_step;

    let x_of = |x: f64| LEFT + (x.log2() - x_lo.log2()) / (x_hi.log2() - x_lo.log2()) * (RIGHT - LEFT);
    let y_of = |y: f64| BOTTOM - y / y_top * (BOTTOM - TOP);

    let mut s = String::new();
    writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#).unwrap();
    writeln!(s, r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#).unwrap();
    let pv = &report.provenance;
    let title = format!("wattn {} flash attention forward on {} ({})", pv.wattn_version, pv.adapter.name, pv.date);
    writeln!(s, r#"<text x="{LEFT}" y="30" font-size="15">{}</text>"#, escape(&title)).unwrap();

    // Axes, grid lines and ticks.
    for k in 0..=y_ticks {
        let tick = k as f64 * y_step;
        let y = y_of(tick);
        writeln!(s, r##"<line x1="{LEFT}" y1="{y:.1}" x2="{RIGHT}" y2="{y:.1}" stroke="#ddd"/>"##).unwrap();
        writeln!(
            s,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 8.0,
            y + 4.0,
            format_tick(tick, y_step)
        )
        .unwrap();
    }
    let mut x = x_lo.log2().ceil().exp2();
    while x <= x_hi * (1.0 + 1e-9) {
        let px = x_of(x);
        writeln!(s, r##"<line x1="{px:.1}" y1="{BOTTOM}" x2="{px:.1}" y2="{}" stroke="#333"/>"##, BOTTOM + 5.0)
            .unwrap();
        writeln!(s, r#"<text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"#, BOTTOM + 20.0, seq_label(x as usize))
            .unwrap();
        x *= 2.0;
    }
    writeln!(s, r##"<polyline points="{LEFT},{TOP} {LEFT},{BOTTOM} {RIGHT},{BOTTOM}" fill="none" stroke="#333"/>"##)
        .unwrap();
    writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">sequence length (tokens)</text>"#,
        (LEFT + RIGHT) / 2.0,
        BOTTOM + 45.0
    )
    .unwrap();
    writeln!(
        s,
        r#"<text transform="translate(22 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (TOP + BOTTOM) / 2.0,
        unit.name
    )
    .unwrap();
    if series.is_empty() {
        writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">no point was measured</text>"#,
            (LEFT + RIGHT) / 2.0,
            (TOP + BOTTOM) / 2.0
        )
        .unwrap();
    }

    // One line per series: one colour per series up to its mask, causal ones dashed.
    // The legend lists them in the same order.
    let mut families: Vec<String> = Vec::new();
    for (i, (name, line)) in series.iter().enumerate() {
        let family = name.replace(" causal", "").replace(" dense", "");
        let color = match families.iter().position(|f| *f == family) {
            Some(k) => COLORS[k % COLORS.len()],
            None => {
                families.push(family);
                COLORS[(families.len() - 1) % COLORS.len()]
            }
        };
        let dash = if name.contains("causal") { r#" stroke-dasharray="6 4""# } else { "" };
        let coords: Vec<String> = line.iter().map(|&(x, y)| format!("{:.1},{:.1}", x_of(x), y_of(y))).collect();
        writeln!(s, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#, coords.join(" "))
            .unwrap();
        for &(x, y) in line {
            writeln!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#, x_of(x), y_of(y)).unwrap();
        }
        let ly = TOP + 10.0 + 20.0 * i as f64;
        writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>"#,
            RIGHT + 20.0,
            RIGHT + 50.0
        )
        .unwrap();
        writeln!(s, r#"<text x="{}" y="{}">{}</text>"#, RIGHT + 58.0, ly + 4.0, escape(name)).unwrap();
    }
    s.push_str("</svg>\n");
    s
}

/// 1, 2 or 5 times a power of ten, at least `raw` (and positive).
fn nice_step(raw: f64) -> f64 {
    if raw.is_nan() || raw <= 0.0 {
        return 1.0;
    }
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * power).find(|&s| s >= raw).unwrap_or(10.0 * power)
}

/// A tick label with as many decimals as the step needs.
fn format_tick(value: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{value:.decimals$}")
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_one_two_five() {
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(1.3), 2.0);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(42.0), 50.0);
        assert_eq!(nice_step(0.0), 1.0);
        assert_eq!(format_tick(0.5, 0.1), "0.5");
        assert_eq!(format_tick(20.0, 10.0), "20");
    }
}
