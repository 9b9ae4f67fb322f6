//! What every benchmark command hands back: the provenance that heads each report, the
//! [`Row`] that carries each point to both JSON and CSV, the aligned tables on stdout, and
//! `wattn peak`'s report.

use super::peak::{Measurement, Peak};
use super::plot::{self, Chart};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::timing::{Clock, Stats};
use serde::Serialize;
use serde::ser::SerializeMap;
use std::path::Path;

/// Who measured, on what, when: heads every report.
#[derive(Clone, Debug, Serialize)]
pub struct Provenance {
    pub wattn_version: &'static str,
    /// UTC, RFC 3339.
    pub date: String,
    pub adapter: Adapter,
    pub clock: Clock,
}

#[derive(Clone, Debug, Serialize)]
pub struct Adapter {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
}

impl Provenance {
    pub fn new(ctx: &Context, clock: Clock) -> Self {
        let info = ctx.adapter_info();
        Self {
            wattn_version: env!("CARGO_PKG_VERSION"),
            date: rfc3339_utc(std::time::SystemTime::now()),
            adapter: Adapter {
                name: info.name.clone(),
                backend: format!("{:?}", info.backend),
                device_type: format!("{:?}", info.device_type),
                driver: info.driver.clone(),
                driver_info: info.driver_info.clone(),
            },
            clock,
        }
    }

    /// The columns that open every CSV line, so that files from several machines can be
    /// concatenated.
    pub fn row(&self) -> Row {
        let a = &self.adapter;
        Row::default()
            .with("wattn_version", self.wattn_version)
            .with("date", self.date.as_str())
            .with("adapter", a.name.as_str())
            .with("backend", a.backend.as_str())
            .with("device_type", a.device_type.as_str())
            .with("driver", format!("{} {}", a.driver, a.driver_info).trim())
            .with("clock", self.clock.name())
    }

    /// A chart's title: "wattn 0.1.0 WHAT on ADAPTER (DATE)".
    pub fn title(&self, what: &str) -> String {
        format!("wattn {} {what} on {} ({})", self.wattn_version, self.adapter.name, self.date)
    }

    /// "wattn 0.1.0 on NAME (Vulkan, Cpu, DRIVER), 2025-01-01T00:00:00Z; GPU timestamps".
    pub fn headline(&self) -> String {
        let a = &self.adapter;
        let driver = [a.driver.as_str(), a.driver_info.as_str()]
            .iter()
            .filter(|s| !s.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        format!(
            "wattn {} on {} ({}, {}, {}), {}; timed by {}",
            self.wattn_version,
            a.name,
            a.backend,
            a.device_type,
            driver,
            self.date,
            self.clock.describe()
        )
    }
}

/// One cell of a [`Row`].
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    /// Not applicable, or not measured: `null` in JSON, an empty CSV field.
    Empty,
    Bool(bool),
    Int(i64),
    Num(f64),
    Text(String),
}

impl Cell {
    fn csv(&self) -> String {
        match self {
            Cell::Empty => String::new(),
            Cell::Bool(b) => b.to_string(),
            Cell::Int(i) => i.to_string(),
            Cell::Num(x) => x.to_string(),
            Cell::Text(s) => csv_field(s),
        }
    }
}

impl From<bool> for Cell {
    fn from(b: bool) -> Self {
        Cell::Bool(b)
    }
}
impl From<f64> for Cell {
    fn from(x: f64) -> Self {
        Cell::Num(x)
    }
}
impl From<&str> for Cell {
    fn from(s: &str) -> Self {
        Cell::Text(s.into())
    }
}
impl From<String> for Cell {
    fn from(s: String) -> Self {
        Cell::Text(s)
    }
}
macro_rules! integer_cells {
    ($($t:ty),*) => {$(
        impl From<$t> for Cell {
            fn from(i: $t) -> Self {
                // Counts, sizes and positions: far below i64::MAX.
                Cell::Int(i as i64)
            }
        }
    )*};
}
integer_cells!(i32, u32, u64, usize);
impl<T: Into<Cell>> From<Option<T>> for Cell {
    fn from(x: Option<T>) -> Self {
        x.map_or(Cell::Empty, Into::into)
    }
}

/// The figures of one point (or one setting of a point, or one bucket of a stream) as named
/// cells in column order: one JSON object in the report's `points`, one CSV line. Every row
/// of a report has the same columns, empty where a figure does not apply, so that the CSV
/// header holds whatever the outcomes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row(Vec<(String, Cell)>);

impl Row {
    /// This row and one more cell.
    pub fn with(mut self, name: &str, value: impl Into<Cell>) -> Self {
        debug_assert!(self.get(name).is_none(), "column {name} twice");
        self.0.push((name.to_string(), value.into()));
        self
    }

    /// This row and the cells of `other`, their names prefixed with `prefix` and `_`
    /// (unchanged when `prefix` is empty).
    pub fn with_all(mut self, prefix: &str, other: Row) -> Self {
        for (name, cell) in other.0 {
            let name = if prefix.is_empty() { name } else { format!("{prefix}_{name}") };
            self = self.with(&name, cell);
        }
        self
    }

    pub fn get(&self, name: &str) -> Option<&Cell> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(n, _)| n.as_str())
    }
}

impl Serialize for Row {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, cell) in &self.0 {
            match cell {
                Cell::Empty => map.serialize_entry(name, &())?,
                Cell::Bool(b) => map.serialize_entry(name, b)?,
                Cell::Int(i) => map.serialize_entry(name, i)?,
                Cell::Num(x) => map.serialize_entry(name, x)?,
                Cell::Text(s) => map.serialize_entry(name, s)?,
            }
        }
        map.end()
    }
}

/// The median, min and max seconds and the number of runs of `time`; empty cells without one.
pub fn time_cells(time: Option<&Stats>) -> Row {
    Row::default()
        .with("median_s", time.map(|t| t.median_s))
        .with("min_s", time.map(|t| t.min_s))
        .with("max_s", time.map(|t| t.max_s))
        .with("runs", time.map(|t| t.runs))
}

/// `rows` as CSV, each line opened by the cells of `lead` (the provenance and the run's
/// settings); empty without rows.
pub fn csv(lead: &Row, rows: &[Row]) -> String {
    let Some(first) = rows.first() else { return String::new() };
    let names: Vec<&str> = lead.names().chain(first.names()).collect();
    let mut out = names.join(",") + "\n";
    for row in rows {
        debug_assert!(row.names().eq(first.names()), "rows of one report have the same columns");
        let cells: Vec<String> = lead.0.iter().chain(&row.0).map(|(_, c)| c.csv()).collect();
        out += &cells.join(",");
        out.push('\n');
    }
    out
}

/// What a benchmark command hands back. Its JSON is what it serialises to (the provenance
/// and the run's settings) with its rows as `points`; its CSV the same rows.
pub trait Report: Serialize {
    /// The aligned table printed on stdout.
    fn table(&self) -> String;
    /// The cells that open every CSV line: the provenance and the run's settings.
    fn lead(&self) -> Row;
    /// The points, as in the JSON.
    fn rows(&self) -> Vec<Row>;
    fn chart(&self) -> Chart;
}

/// Writes `report` to each of the files given: JSON, CSV (its rows) and SVG (its chart).
pub fn write_outputs(report: &impl Report, json: Option<&Path>, csv: Option<&Path>, svg: Option<&Path>) -> Result<()> {
    #[derive(Serialize)]
    struct Json<'a, R> {
        #[serde(flatten)]
        report: &'a R,
        points: &'a [Row],
    }
    let rows = report.rows();
    if let Some(path) = json {
        write_json(path, &Json { report, points: &rows })?;
    }
    if let Some(path) = csv {
        write_file(path, &self::csv(&report.lead(), &rows))?;
    }
    if let Some(path) = svg {
        write_file(path, &plot::draw(&report.chart()))?;
    }
    Ok(())
}

/// `wattn peak`'s result.
#[derive(Clone, Debug, Serialize)]
pub struct PeakReport {
    #[serde(flatten)]
    pub provenance: Provenance,
    pub warmup: usize,
    pub runs: usize,
    pub peak: Peak,
}

/// Writes `value` as pretty JSON.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| Error::File { path: path.into(), detail: e.to_string() })?;
    write_file(path, &(text + "\n"))
}

pub fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::File { path: path.into(), detail: format!("cannot write: {e}") })
}

/// GFLOP/s or TFLOP/s, whichever reads better for rates up to `max`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateUnit {
    pub name: &'static str,
    pub per: f64,
}

impl RateUnit {
    pub fn for_max(max: f64) -> Self {
        if max >= 1e12 { Self { name: "TFLOP/s", per: 1e12 } } else { Self { name: "GFLOP/s", per: 1e9 } }
    }
}

/// Three significant figures, without exponent.
pub fn sig3(x: f64) -> String {
    match x.abs() {
        a if a >= 100.0 => format!("{x:.0}"),
        a if a >= 10.0 => format!("{x:.1}"),
        a if a >= 1.0 => format!("{x:.2}"),
        _ => format!("{x:.3}"),
    }
}

pub fn mib(bytes: u64) -> String {
    sig3(bytes as f64 / (1 << 20) as f64)
}

/// Columns padded to their widest cell; a row shorter than the header lets its last
/// cell run on (used for reasons in place of figures).
pub fn aligned(rows: &[Vec<String>], right: &[bool]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter(|r| r.len() > c + 1 || r.len() == columns)
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let last = c + 1 == row.len();
            let pad = widths[c].saturating_sub(cell.chars().count());
            if c > 0 {
                line.push_str("  ");
            }
            if right.get(c).copied().unwrap_or(false) && !(last && row.len() < columns) {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if !last {
                    line.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub(crate) fn ms_range(time: &Stats) -> String {
    format!("{} ({}-{})", sig3(time.median_s * 1e3), sig3(time.min_s * 1e3), sig3(time.max_s * 1e3))
}

impl PeakReport {
    pub fn table(&self) -> String {
        let out =
            format!("{}\nmedian of {} runs after {} warm-up\n\n", self.provenance.headline(), self.runs, self.warmup);
        let mut rows = vec![["ceiling", "rate", "work per run", "ms per run (min-max)"].map(String::from).to_vec()];
        let flop_unit =
            RateUnit::for_max(self.peak.fma_f32.rate.max(self.peak.fma_f16.as_ref().map_or(0.0, |m| m.rate)));
        let fma_row = |name: &str, m: &Measurement| {
            let work = format!("{} {}", sig3(m.work / flop_unit.per), flop_unit.name.trim_end_matches("/s"));
            vec![name.into(), format!("{} {}", sig3(m.rate / flop_unit.per), flop_unit.name), work, ms_range(&m.time)]
        };
        rows.push(fma_row("f32 FMA", &self.peak.fma_f32));
        match &self.peak.fma_f16 {
            Some(m) => rows.push(fma_row("f16 FMA", m)),
            None => rows.push(vec!["f16 FMA".into(), "n/a: the adapter lacks shader-f16".into()]),
        }
        let c = &self.peak.copy;
        rows.push(vec![
            "copy".into(),
            format!("{} GB/s", sig3(c.rate / 1e9)),
            format!("{} MiB moved", mib(c.work as u64)),
            ms_range(&c.time),
        ]);
        out + &aligned(&rows, &[false, true, true, true])
    }
}

/// Quotes a CSV field when it holds a comma, a quote or a line break.
pub(crate) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

/// `time` as RFC 3339 in UTC, e.g. "2025-03-01T12:00:00Z".
pub fn rfc3339_utc(time: std::time::SystemTime) -> String {
    let secs = time.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = ((secs / 86400) as i64, secs % 86400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest / 60 % 60, rest % 60)
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn dates_are_utc_rfc3339() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        // 2024-02-29 is day 19782; 2000-03-01 is day 11017.
        assert_eq!(rfc3339_utc(UNIX_EPOCH + Duration::from_secs(19782 * 86400 + 3723)), "2024-02-29T01:02:03Z");
        assert_eq!(rfc3339_utc(UNIX_EPOCH + Duration::from_secs(11017 * 86400)), "2000-03-01T00:00:00Z");
        assert_eq!(rfc3339_utc(UNIX_EPOCH + Duration::from_secs(19722 * 86400 + 86399)), "2023-12-31T23:59:59Z");
    }

    #[test]
    fn units_and_labels_read_well() {
        assert_eq!(RateUnit::for_max(3e11).name, "GFLOP/s");
        assert_eq!(RateUnit::for_max(3e12).name, "TFLOP/s");
        assert_eq!(plot::seq_label(16384), "16K");
        assert_eq!(plot::seq_label(1000), "1000");
        assert_eq!(sig3(0.01234), "0.012");
        assert_eq!(sig3(123.4), "123");
    }

    #[test]
    fn short_rows_run_on_and_csv_fields_are_quoted() {
        let rows = vec![
            vec!["a".to_string(), "bb".into(), "c".into()],
            vec!["long cell".to_string(), "reason that is long".into()],
        ];
        assert_eq!(aligned(&rows, &[false, true, true]), "a          bb  c\nlong cell  reason that is long\n");
        assert_eq!(csv_field("x, \"y\""), "\"x, \"\"y\"\"\"");
    }
}
