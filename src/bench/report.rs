//! What `wattn bench` and `wattn peak` hand back: the reports (serialised to JSON as they
//! are), the aligned tables on stdout, and the CSV rows.

use super::peak::{Measurement, Peak};
use super::runner::{BlockSparse, Outcome, PathResult, PointResult};
use super::timing::Clock;
use crate::FlashConfig;
use crate::context::Context;
use crate::error::{Error, Result};
use serde::Serialize;
use std::fmt::Write;
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

    /// The CSV columns that open every row, named by [`PROVENANCE_CSV_HEADER`].
    pub fn csv_cells(&self) -> Vec<String> {
        let a = &self.adapter;
        vec![
            self.wattn_version.into(),
            self.date.clone(),
            a.name.clone(),
            a.backend.clone(),
            a.device_type.clone(),
            format!("{} {}", a.driver, a.driver_info).trim().into(),
            self.clock.name().into(),
        ]
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

/// The names of [`Provenance::csv_cells`].
pub const PROVENANCE_CSV_HEADER: [&str; 7] =
    ["wattn_version", "date", "adapter", "backend", "device_type", "driver", "clock"];

/// `wattn peak`'s result.
#[derive(Clone, Debug, Serialize)]
pub struct PeakReport {
    #[serde(flatten)]
    pub provenance: Provenance,
    pub warmup: usize,
    pub runs: usize,
    pub peak: Peak,
}

/// The tile sizes the flash kernel ran with, as `--config` takes them.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct TileConfig {
    pub block_q: u32,
    pub block_k: u32,
    pub threads_per_row: u32,
    pub d_chunk: u32,
}

impl From<FlashConfig> for TileConfig {
    fn from(c: FlashConfig) -> Self {
        Self { block_q: c.block_q, block_k: c.block_k, threads_per_row: c.threads_per_row, d_chunk: c.d_chunk }
    }
}

impl std::fmt::Display for TileConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{},{},{}", self.block_q, self.block_k, self.threads_per_row, self.d_chunk)
    }
}

/// `wattn bench`'s result.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    #[serde(flatten)]
    pub provenance: Provenance,
    pub flash_config: TileConfig,
    pub warmup: usize,
    pub runs: usize,
    /// The time budget in seconds; `None` when unlimited.
    pub budget_s: Option<f64>,
    /// `None` with `--no-peak`.
    pub peak: Option<Peak>,
    /// Whether the naive baseline was timed (`--no-naive` turns it off).
    pub naive_baseline: bool,
    pub points: Vec<PointResult>,
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

    /// The unit for the flash throughputs of `points`.
    pub fn for_points(points: &[PointResult]) -> Self {
        Self::for_max(points.iter().filter_map(|p| p.measured()).map(|m| m.flash.flops_per_s).fold(0.0, f64::max))
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

/// Sequence lengths as 512, 1K, 16K.
pub fn seq_label(seq: usize) -> String {
    if seq >= 1024 && seq.is_multiple_of(1024) { format!("{}K", seq / 1024) } else { seq.to_string() }
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

pub(crate) fn ms_range(time: &super::stats::Stats) -> String {
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

impl BenchReport {
    pub fn table(&self) -> String {
        let mut out = self.provenance.headline() + "\n";
        let naive = if self.naive_baseline { "" } else { "; naive baseline off" };
        writeln!(
            out,
            "flash config {} (--config BQ,BK,TPR,DC); median of {} runs after {} warm-up{naive}",
            self.flash_config, self.runs, self.warmup
        )
        .unwrap();
        if let Some(p) = &self.peak {
            let flops = |rate: f64| {
                let unit = RateUnit::for_max(rate);
                format!("{} {}", sig3(rate / unit.per), unit.name)
            };
            let f16 = p.fma_f16.as_ref().map_or(String::new(), |m| format!(", f16 {}", flops(m.rate)));
            writeln!(out, "peak: f32 FMA {}{f16}, copy {} GB/s", flops(p.fma_f32.rate), sig3(p.copy.rate / 1e9))
                .unwrap();
        }
        let unit = RateUnit::for_points(&self.points);
        let mut rows = vec![
            [
                "series",
                "seq",
                "batch x heads",
                "flash ms (min-max)",
                unit.name,
                "of peak",
                "naive ms",
                "speed-up",
                "flash MiB",
                "naive MiB",
                "checked against",
            ]
            .map(String::from)
            .to_vec(),
        ];
        let mut notes = Vec::new();
        // The series, first sequence length and estimate of the capped points in the last row.
        let mut capped_run: Option<(&str, usize, f64)> = None;
        for p in self.points.iter().filter(|p| p.block_sparse.is_none()) {
            let mut row = vec![p.series.clone(), seq_label(p.seq), format!("{} x {}", p.batch, p.heads)];
            let mut capped = None;
            match &p.outcome {
                Outcome::Measured(m) => {
                    let naive = |f: &dyn Fn(&PathResult) -> String| m.naive.as_ref().map_or("-".into(), f);
                    row.extend([
                        ms_range(&m.flash.time),
                        sig3(m.flash.flops_per_s / unit.per),
                        m.fraction_of_peak.map_or("-".into(), |f| format!("{:.1}%", f * 100.0)),
                        naive(&|n| sig3(n.time.median_s * 1e3)),
                        m.speedup.map_or("-".into(), |s| format!("{}x", sig3(s))),
                        mib(m.flash.bytes),
                        naive(&|n| mib(n.bytes)),
                        format!("{} ({:.0e})", m.validation.against, m.validation.max_error),
                    ]);
                    if let Some(why) = &m.naive_skipped {
                        notes.push(format!("{} {}: naive skipped: {why}", p.series, seq_label(p.seq)));
                    }
                }
                // A run of capped points of one series shares a row: "512-16K  capped: ...".
                Outcome::Capped { estimated_s, left_s } => {
                    let (first, least) = match capped_run {
                        Some((series, first, least)) if series == p.series => {
                            rows.pop();
                            (first, least)
                        }
                        _ => (p.seq, *estimated_s),
                    };
                    let or_more = if first == p.seq { "" } else { " or more" };
                    row[1] = if first == p.seq {
                        seq_label(p.seq)
                    } else {
                        format!("{}-{}", seq_label(first), seq_label(p.seq))
                    };
                    row[2] = String::new();
                    row.push(format!("capped: estimated {least:.0} s{or_more}, {left_s:.0} s of the time budget left"));
                    capped = Some((p.series.as_str(), first, least));
                }
                Outcome::Failed { reason } => row.push(format!("failed: {reason}")),
            }
            capped_run = capped;
            rows.push(row);
        }
        out.push('\n');
        out += &aligned(&rows, &[false, true, true, true, true, true, true, true, true, true, false]);
        if !notes.is_empty() {
            out.push('\n');
            out += &notes.join("\n");
            out.push('\n');
        }
        out + &self.block_sparse_table()
    }

    /// The block-sparse points against the dense kernel; empty when there are none.
    fn block_sparse_table(&self) -> String {
        let sparse: Vec<(&PointResult, &BlockSparse)> =
            self.points.iter().filter_map(|p| Some((p, p.block_sparse.as_ref()?))).collect();
        let Some((_, first)) = sparse.first() else { return String::new() };
        let mut rows = vec![
            [
                "series",
                "seq",
                "batch x heads",
                "density",
                "flash ms (min-max)",
                "dense ms",
                "speed-up",
                "ideal",
                "of ideal",
                "checked against",
            ]
            .map(String::from)
            .to_vec(),
        ];
        let or_dash = |x: Option<f64>, f: &dyn Fn(f64) -> String| x.map_or("-".into(), f);
        for (p, b) in &sparse {
            let mut row = vec![p.series.clone(), seq_label(p.seq), format!("{} x {}", p.batch, p.heads)];
            row.push(format!("{:.3}", b.density));
            match &p.outcome {
                Outcome::Measured(m) => row.extend([
                    ms_range(&m.flash.time),
                    or_dash(b.dense_median_s, &|s| sig3(s * 1e3)),
                    or_dash(b.speedup_vs_dense, &|s| format!("{}x", sig3(s))),
                    format!("{}x", sig3(b.ideal_speedup)),
                    or_dash(b.fraction_of_ideal, &|f| format!("{:.0}%", f * 100.0)),
                    format!("{} ({:.0e})", m.validation.against, m.validation.max_error),
                ]),
                other => row.push(format!("{}: {}", other.status(), other.reason().unwrap_or_default())),
            }
            rows.push(row);
        }
        let right = [false, true, true, true, true, true, true, true, true, false];
        format!(
            "\nblock-sparse, blocks of {}x{}, against the dense kernel on the same shape in this run \
             (ideal = 1 / density)\n{}",
            first.block[0],
            first.block[1],
            aligned(&rows, &right)
        )
    }

    /// One row per point, each carrying the provenance and the peak figures so that files
    /// from several machines can be concatenated.
    pub fn csv(&self) -> String {
        #[rustfmt::skip]
        let header = [
            "flash_config",
            "series", "dtype", "head_dim", "causal", "window_left", "window_right", "batch", "heads", "kv_heads", "seq",
            "flops", "status", "reason",
            "flash_median_s", "flash_min_s", "flash_max_s", "flash_flops_per_s", "flash_bytes", "fraction_of_peak",
            "naive_median_s", "naive_min_s", "naive_max_s", "naive_flops_per_s", "naive_bytes", "speedup",
            "validated_against", "max_error", "tolerance",
            "block_pattern", "block_requested_density", "block_q", "block_k", "block_density", "ideal_speedup",
            "dense_median_s", "speedup_vs_dense", "fraction_of_ideal",
            "peak_fma_f32_flops_per_s", "peak_fma_f16_flops_per_s", "peak_copy_bytes_per_s",
        ];
        let num = |x: Option<f64>| x.map_or(String::new(), |v| v.to_string());
        let peak = [
            num(self.peak.as_ref().map(|p| p.fma_f32.rate)),
            num(self.peak.as_ref().and_then(|p| p.fma_f16.as_ref()).map(|m| m.rate)),
            num(self.peak.as_ref().map(|p| p.copy.rate)),
        ];
        let mut out = PROVENANCE_CSV_HEADER.join(",") + "," + &header.join(",") + "\n";
        for p in &self.points {
            let mut row = self.provenance.csv_cells();
            row.extend([
                self.flash_config.to_string(),
                p.series.clone(),
                p.dtype.into(),
                p.head_dim.to_string(),
                p.causal.to_string(),
                p.window[0].to_string(),
                p.window[1].to_string(),
                p.batch.to_string(),
                p.heads.to_string(),
                p.kv_heads.to_string(),
                p.seq.to_string(),
                p.flops.to_string(),
            ]);
            let path = |r: Option<&PathResult>| {
                [
                    r.map(|r| r.time.median_s),
                    r.map(|r| r.time.min_s),
                    r.map(|r| r.time.max_s),
                    r.map(|r| r.flops_per_s),
                    r.map(|r| r.bytes as f64),
                ]
                .map(num)
            };
            match &p.outcome {
                Outcome::Measured(m) => {
                    row.extend(["measured".into(), m.naive_skipped.clone().unwrap_or_default()]);
                    row.extend(path(Some(&m.flash)));
                    row.push(num(m.fraction_of_peak));
                    row.extend(path(m.naive.as_ref()));
                    row.push(num(m.speedup));
                    row.extend([
                        m.validation.against.into(),
                        m.validation.max_error.to_string(),
                        m.validation.tolerance.to_string(),
                    ]);
                }
                Outcome::Capped { .. } | Outcome::Failed { .. } => {
                    row.extend([p.outcome.status().into(), p.outcome.reason().unwrap_or_default()]);
                    row.extend(std::iter::repeat_n(String::new(), 15));
                }
            }
            let b = p.block_sparse.as_ref();
            row.push(b.map_or("", |b| b.pattern).into());
            row.extend(
                [
                    b.and_then(|b| b.requested_density),
                    b.map(|b| b.block[0] as f64),
                    b.map(|b| b.block[1] as f64),
                    b.map(|b| b.density),
                    b.map(|b| b.ideal_speedup),
                    b.and_then(|b| b.dense_median_s),
                    b.and_then(|b| b.speedup_vs_dense),
                    b.and_then(|b| b.fraction_of_ideal),
                ]
                .map(num),
            );
            row.extend(peak.iter().cloned());
            debug_assert_eq!(row.len(), PROVENANCE_CSV_HEADER.len() + header.len());
            out += &row.iter().map(|c| csv_field(c)).collect::<Vec<_>>().join(",");
            out.push('\n');
        }
        out
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
        assert_eq!(seq_label(16384), "16K");
        assert_eq!(seq_label(1000), "1000");
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
