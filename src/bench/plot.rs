//! Line charts as self-contained SVG (linear y axis from zero, legend on the right): each
//! report builds its [`Chart`] (throughput against sequence length, speed-up against block
//! density, bandwidth against cache length, per-token time against stream position).

use std::fmt::Write;

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 500.0;
/// Plot area inside the margins; the legend sits to the right of it.
const LEFT: f64 = 80.0;
const RIGHT: f64 = 620.0;
const TOP: f64 = 60.0;
const BOTTOM: f64 = 440.0;
const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// How the x axis maps values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XAxis {
    /// Powers of two equally spaced, labelled as sequence lengths (512, 1K, 16K).
    Log2,
    /// From zero, ticks at 1, 2 or 5 times a power of ten.
    Linear,
}

/// One line of a chart, with a marker at each point.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    pub name: String,
    /// Index into the palette: lines of one family share a colour.
    pub color: usize,
    pub dashed: bool,
    /// (x, y) in drawing order.
    pub points: Vec<(f64, f64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_axis: XAxis,
    pub lines: Vec<Line>,
    /// Written across the plot area when no line has a point.
    pub empty_note: String,
}

/// Palette indices by family name, in order of first appearance: lines of one family
/// (one problem shape, say) share a colour.
#[derive(Default)]
pub struct Families(Vec<String>);

impl Families {
    pub fn color(&mut self, family: &str) -> usize {
        self.0.iter().position(|f| f == family).unwrap_or_else(|| {
            self.0.push(family.to_string());
            self.0.len() - 1
        })
    }
}

/// The SVG text of `chart`.
pub fn draw(chart: &Chart) -> String {
    let points = || chart.lines.iter().flat_map(|l| l.points.iter().copied());
    let (lo, hi, y_max) =
        points().fold((f64::MAX, 0.0f64, 0.0f64), |(lo, hi, top), (x, y)| (lo.min(x), hi.max(x), top.max(y)));
    let (x_lo, x_hi) = match chart.x_axis {
        XAxis::Log2 if lo > hi => (256.0, 1024.0),
        XAxis::Log2 if lo == hi => (lo / 2.0, hi * 2.0),
        XAxis::Log2 => (lo, hi),
        XAxis::Linear => (0.0, if hi > 0.0 { hi } else { 1.0 }),
    };
    let y_step = nice_step(y_max / 5.0);
    let y_ticks = (y_max / y_step).ceil().max(1.0) as usize;
    let y_top = y_ticks as f64 * y_step;

    let x_of = |x: f64| {
        let fraction = match chart.x_axis {
            XAxis::Log2 => (x.log2() - x_lo.log2()) / (x_hi.log2() - x_lo.log2()),
            XAxis::Linear => (x - x_lo) / (x_hi - x_lo),
        };
        LEFT + fraction * (RIGHT - LEFT)
    };
    let y_of = |y: f64| BOTTOM - y / y_top * (BOTTOM - TOP);

    let mut s = String::new();
    writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#).unwrap();
    writeln!(s, r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#).unwrap();
    writeln!(s, r#"<text x="{LEFT}" y="30" font-size="15">{}</text>"#, escape(&chart.title)).unwrap();

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
    let x_ticks: Vec<(f64, String)> = match chart.x_axis {
        XAxis::Log2 => std::iter::successors(Some(x_lo.log2().ceil().exp2()), |x| Some(x * 2.0))
            .take_while(|&x| x <= x_hi * (1.0 + 1e-9))
            .map(|x| (x, seq_label(x as usize)))
            .collect(),
        XAxis::Linear => {
            let step = nice_step(x_hi / 5.0);
            (0..=(x_hi / step).floor() as usize).map(|k| k as f64 * step).map(|x| (x, format_tick(x, step))).collect()
        }
    };
    for (x, label) in x_ticks {
        let px = x_of(x);
        writeln!(s, r##"<line x1="{px:.1}" y1="{BOTTOM}" x2="{px:.1}" y2="{}" stroke="#333"/>"##, BOTTOM + 5.0)
            .unwrap();
        writeln!(s, r#"<text x="{px:.1}" y="{}" text-anchor="middle">{label}</text>"#, BOTTOM + 20.0).unwrap();
    }
    writeln!(s, r##"<polyline points="{LEFT},{TOP} {LEFT},{BOTTOM} {RIGHT},{BOTTOM}" fill="none" stroke="#333"/>"##)
        .unwrap();
    writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (LEFT + RIGHT) / 2.0,
        BOTTOM + 45.0,
        escape(&chart.x_label)
    )
    .unwrap();
    writeln!(
        s,
        r#"<text transform="translate(22 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (TOP + BOTTOM) / 2.0,
        escape(&chart.y_label)
    )
    .unwrap();
    if points().next().is_none() {
        writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (LEFT + RIGHT) / 2.0,
            (TOP + BOTTOM) / 2.0,
            escape(&chart.empty_note)
        )
        .unwrap();
    }

    // The lines, and the legend in the same order.
    for (i, line) in chart.lines.iter().filter(|l| !l.points.is_empty()).enumerate() {
        let color = COLORS[line.color % COLORS.len()];
        let dash = if line.dashed { r#" stroke-dasharray="6 4""# } else { "" };
        let coords: Vec<String> = line.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", x_of(x), y_of(y))).collect();
        writeln!(s, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#, coords.join(" "))
            .unwrap();
        for &(x, y) in &line.points {
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
        writeln!(s, r#"<text x="{}" y="{}">{}</text>"#, RIGHT + 58.0, ly + 4.0, escape(&line.name)).unwrap();
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

/// Sequence lengths as 512, 1K, 16K.
pub fn seq_label(seq: usize) -> String {
    if seq >= 1024 && seq.is_multiple_of(1024) { format!("{}K", seq / 1024) } else { seq.to_string() }
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
