//! `wattn bench`: for each point, check the flash output, then time the flash and naive
//! paths, on the [`engine`]. Block-sparse points time the flash path only,
//! and are compared afterwards with the dense point of their shape.

use super::engine::{self, Benchmark, Outcome, Repeats, Speeds, Validation, max_error, tolerance};
use super::peak::Peak;
use super::plot::{Chart, Families, Line, XAxis, seq_label};
use super::report::{Provenance, RateUnit, Report, Row, aligned, mib, ms_range, sig3, time_cells};
use super::workload::{Path, PathBuffers, Pattern, Problem, Sparsity, Workload, input_values};
use crate::attention::{AttentionOptions, AttentionShape};
use crate::context::Context;
use crate::error::Result;
use crate::reference;
use crate::timing::{Stats, Timer};
use crate::{FlashConfig, KvReads};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// How to run the points.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub repeats: Repeats,
    /// `--config`, else the adapter's preset: what block-sparse points run (their masks are
    /// built on its tiles), and dense points too when `per_shape` is off.
    pub config: FlashConfig,
    /// Where `config` comes from: "--config" or "preset NAME".
    pub config_source: String,
    /// Dense points run what [`FlashConfig::for_shape`] picks for them (tuned where the
    /// tuning cache has a configuration, else the preset): without `--config`.
    pub per_shape: bool,
    /// Seconds after which no point is started that is estimated to run past them;
    /// `None` runs every point.
    pub budget_s: Option<f64>,
    /// The f32 FMA ceiling in FLOP/s that efficiency is quoted against.
    pub peak_flops: Option<f64>,
    /// Time the naive baseline too (where it fits and the budget allows).
    pub naive: bool,
}

/// One timed path at one point.
#[derive(Clone, Debug)]
pub(crate) struct PathResult {
    pub time: Stats,
    /// Attention FLOPs (see [`Workload::flops`]) per second of the median run.
    pub flops_per_s: f64,
    /// GPU memory the path used: inputs and its outputs, plus the score matrix for naive.
    pub bytes: u64,
}

#[derive(Clone, Debug)]
pub(crate) struct Measured {
    pub flash: PathResult,
    /// Flash throughput over the f32 FMA ceiling.
    pub fraction_of_peak: Option<f64>,
    pub naive: Option<PathResult>,
    /// Why the naive path did not run when it was asked for.
    pub naive_skipped: Option<String>,
    /// Naive time over flash time.
    pub speedup: Option<f64>,
    pub validation: Validation,
}

/// A block-sparse point's mask and its speed against the dense kernel.
#[derive(Clone, Debug)]
pub(crate) struct BlockSparse {
    /// "random", "causal", "window" or "documents".
    pub pattern: &'static str,
    /// The density asked for, for random patterns.
    pub requested_density: Option<f64>,
    /// `[block_q, block_k]`.
    pub block: [u32; 2],
    /// The fraction of blocks the kernel visits.
    pub density: f64,
    /// 1 / density: the speed-up if time followed the blocks visited.
    pub ideal_speedup: f64,
    /// The dense kernel's median on the same shape and dtype, in the same run.
    pub dense_median_s: Option<f64>,
    /// `dense_median_s` over this point's median.
    pub speedup_vs_dense: Option<f64>,
    /// `speedup_vs_dense / ideal_speedup`.
    pub fraction_of_ideal: Option<f64>,
}

impl BlockSparse {
    /// The figures of `sparsity`, with speeds where both medians (in seconds) are known.
    fn new(sparsity: &Sparsity, median_s: Option<f64>, dense_median_s: Option<f64>) -> Self {
        let ideal_speedup = 1.0 / sparsity.density;
        let speedup_vs_dense = median_s.zip(dense_median_s).map(|(own, dense)| dense / own);
        Self {
            pattern: sparsity.pattern.kind(),
            requested_density: match sparsity.pattern {
                Pattern::Random(d) => Some(d),
                _ => None,
            },
            block: [sparsity.block.q, sparsity.block.k],
            density: sparsity.density,
            ideal_speedup,
            dense_median_s,
            speedup_vs_dense,
            fraction_of_ideal: speedup_vs_dense.map(|s| s / ideal_speedup),
        }
    }
}

/// One point of the grid and what became of it.
#[derive(Clone, Debug)]
pub(crate) struct PointResult {
    pub workload: Workload,
    /// [`Workload::series`].
    pub series: String,
    /// Present exactly for block-sparse points.
    pub block_sparse: Option<BlockSparse>,
    pub outcome: Outcome<Measured>,
    /// The flash configuration the point ran, and where it came from.
    pub config: (FlashConfig, String),
}

impl PointResult {
    pub fn measured(&self) -> Option<&Measured> {
        self.outcome.measured()
    }

    pub fn seq(&self) -> usize {
        self.workload.shape.n_q
    }

    /// "2 x 16": batch and query heads.
    fn batch_heads(&self) -> String {
        format!("{} x {}", self.workload.shape.batch, self.workload.shape.q_heads)
    }

    /// The point as one JSON object and one CSV line.
    pub fn row(&self) -> Row {
        let (w, s) = (&self.workload, &self.workload.shape);
        let m = self.measured();
        let path = |r: Option<&PathResult>| {
            time_cells(r.map(|r| &r.time))
                .with("flops_per_s", r.map(|r| r.flops_per_s))
                .with("bytes", r.map(|r| r.bytes))
        };
        let b = self.block_sparse.as_ref();
        Row::default()
            .with("series", self.series.as_str())
            .with("dtype", w.dtype.name())
            .with("head_dim", s.d_qk)
            .with("causal", w.options.causal)
            .with("window_left", w.options.window.0)
            .with("window_right", w.options.window.1)
            .with("batch", s.batch)
            .with("heads", s.q_heads)
            .with("kv_heads", s.kv_heads)
            .with("seq", s.n_q)
            .with("config", self.config.0.to_string())
            .with("config_source", self.config.1.as_str())
            .with("flops", w.flops())
            .with_all("", self.outcome.cells())
            .with_all("flash", path(m.map(|m| &m.flash)))
            .with("fraction_of_peak", m.and_then(|m| m.fraction_of_peak))
            .with_all("naive", path(m.and_then(|m| m.naive.as_ref())))
            .with("naive_skipped", m.and_then(|m| m.naive_skipped.clone()))
            .with("speedup", m.and_then(|m| m.speedup))
            .with("validated_against", m.map(|m| m.validation.against))
            .with("max_error", m.map(|m| m.validation.max_error))
            .with("tolerance", m.map(|m| m.validation.tolerance))
            .with("block_pattern", b.map(|b| b.pattern))
            .with("block_requested_density", b.and_then(|b| b.requested_density))
            .with("block_q", b.map(|b| b.block[0]))
            .with("block_k", b.map(|b| b.block[1]))
            .with("block_density", b.map(|b| b.density))
            .with("ideal_speedup", b.map(|b| b.ideal_speedup))
            .with("dense_median_s", b.and_then(|b| b.dense_median_s))
            .with("speedup_vs_dense", b.and_then(|b| b.speedup_vs_dense))
            .with("fraction_of_ideal", b.and_then(|b| b.fraction_of_ideal))
    }
}

/// Runs `workloads` on the engine and returns their results in the given order.
/// `progress(done, total, next)` is called before each point.
pub(crate) fn run(
    ctx: &Context,
    timer: &Timer,
    workloads: &[Workload],
    settings: &Settings,
    progress: &mut dyn FnMut(usize, usize, &Workload),
) -> Vec<PointResult> {
    let bench = Prefill { ctx, timer, settings };
    let outcomes = engine::run(ctx, &bench, workloads, settings.budget_s, progress);
    let mut results: Vec<PointResult> = workloads
        .iter()
        .zip(outcomes)
        .map(|(w, outcome)| PointResult {
            workload: *w,
            series: w.series(),
            block_sparse: None,
            outcome,
            config: settings.config_for(ctx, w),
        })
        .collect();
    let median = |r: &PointResult| r.measured().map(|m| m.flash.time.median_s);
    for (i, w) in workloads.iter().enumerate() {
        if let Some(sparsity) = &w.sparsity {
            let dense = workloads.iter().position(|d| *d == w.dense_baseline()).and_then(|d| median(&results[d]));
            results[i].block_sparse = Some(BlockSparse::new(sparsity, median(&results[i]), dense));
        }
    }
    results
}

impl Settings {
    /// The flash configuration `w` runs and where it comes from.
    fn config_for(&self, ctx: &Context, w: &Workload) -> (FlashConfig, String) {
        if self.per_shape && w.sparsity.is_none() {
            let (config, source) = FlashConfig::for_shape(ctx, &w.shape, w.dtype, w.options.causal);
            return (config, source.to_string());
        }
        (self.config, self.config_source.clone())
    }
}

/// Work below this many FLOPs is cheap enough to learn a path's speed from.
const PROBE_FLOPS: f64 = 1e9;
/// Query rows per head compared with the reference when the naive path does not run.
const REFERENCE_ROWS: usize = 32;
/// The kind under which the naive path's speed is recorded.
const NAIVE: &str = "naive";

struct Prefill<'a> {
    ctx: &'a Context,
    timer: &'a Timer,
    settings: &'a Settings,
}

impl Benchmark for Prefill<'_> {
    type Workload = Workload;
    type Measured = Measured;

    fn work(&self, w: &Workload) -> f64 {
        let paths = if self.naive(w) { 2 } else { 1 };
        w.flops() * (self.settings.repeats.per_setting() * paths) as f64
    }

    fn series(&self, w: &Workload) -> String {
        w.series()
    }

    fn probe(&self, w: &Workload) -> Option<f64> {
        self.probe_path(w, Path::Flash)
    }

    fn measure(&self, w: &Workload, speeds: &mut Speeds, left: Option<f64>) -> Result<Outcome<Measured>> {
        let (ctx, repeats) = (self.ctx, &self.settings.repeats);
        let config = &self.settings.config_for(ctx, w).0;
        let problem = Problem::upload(ctx, w)?;
        let flash = problem.alloc(ctx, Path::Flash)?;
        let mut flash_work = |e: &mut wgpu::CommandEncoder| problem.record(ctx, &flash, config, e);
        self.timer.time(ctx, &mut flash_work)?;

        let naive = self.naive(w).then(|| self.naive_run(&problem, speeds, left));
        let validation = validate(ctx, &problem, &flash, naive.as_ref().and_then(|n| n.as_ref().ok()))?;
        if !validation.passed() {
            return Ok(validation.failure("flash output"));
        }

        let time_path = |bufs: &PathBuffers, work: &mut dyn FnMut(&mut wgpu::CommandEncoder) -> Result<()>| {
            let time = repeats.time(ctx, self.timer, work)?;
            Result::<_>::Ok(PathResult {
                time,
                flops_per_s: w.flops() / time.median_s,
                bytes: problem.input_bytes() + bufs.bytes(),
            })
        };
        let flash_result = time_path(&flash, &mut flash_work)?;
        let (naive_result, naive_skipped) = match &naive {
            None => (None, None),
            Some(Ok(bufs)) => {
                let mut work = |e: &mut wgpu::CommandEncoder| problem.record(ctx, bufs, config, e);
                let result = time_path(bufs, &mut work)?;
                speeds.record(NAIVE, &w.series(), w.flops(), result.time.median_s);
                (Some(result), None)
            }
            Some(Err(reason)) => (None, Some(reason.clone())),
        };
        Ok(Outcome::Measured(Measured {
            fraction_of_peak: self.settings.peak_flops.map(|p| flash_result.flops_per_s / p),
            speedup: naive_result.as_ref().map(|n| n.time.median_s / flash_result.time.median_s),
            naive: naive_result,
            naive_skipped,
            validation,
            flash: flash_result,
        }))
    }
}

impl Prefill<'_> {
    /// Whether to time the naive path: when asked, and for dense points (it takes no block mask).
    fn naive(&self, w: &Workload) -> bool {
        self.settings.naive && w.sparsity.is_none()
    }

    /// Seconds per FLOP of one run of `path` on a shrunk copy of `w`. A failure here
    /// teaches nothing and is left for the real point to report.
    fn probe_path(&self, w: &Workload, path: Path) -> Option<f64> {
        let small = w.shrunk_to(PROBE_FLOPS);
        let problem = Problem::upload(self.ctx, &small).ok()?;
        let bufs = problem.alloc(self.ctx, path).ok()?;
        let (config, _) = self.settings.config_for(self.ctx, w);
        let mut work = |e: &mut wgpu::CommandEncoder| problem.record(self.ctx, &bufs, &config, e);
        // The first run compiles the pipelines (on llvmpipe, inside the timed dispatch).
        self.timer.time(self.ctx, &mut work).ok()?;
        let seconds = self.timer.time(self.ctx, &mut work).ok()?;
        Some(seconds / small.flops())
    }

    /// The naive path's buffers after one run, or why it does not run: its score matrix is
    /// over a limit or out of memory, or its runs would take more than the `left` seconds.
    fn naive_run(
        &self,
        problem: &Problem,
        speeds: &mut Speeds,
        left: Option<f64>,
    ) -> std::result::Result<PathBuffers, String> {
        let (ctx, w) = (self.ctx, &problem.workload);
        let bufs = ctx.catching_gpu_errors(|| problem.alloc(ctx, Path::Naive)).map_err(|e| e.to_string())?;
        if let Some(left) = left {
            let series = w.series();
            if speeds.seconds(NAIVE, &series, 1.0).is_none() {
                if let Some(rate) = ctx.catching_gpu_errors(|| Ok(self.probe_path(w, Path::Naive))).ok().flatten() {
                    speeds.record(NAIVE, &series, 1.0, rate);
                }
            }
            let runs = self.settings.repeats.per_setting() as f64;
            if let Some(t) = speeds.seconds(NAIVE, &series, w.flops() * runs).filter(|&t| t > left) {
                return Err(format!("estimated {t:.0} s, past the time budget"));
            }
        }
        let (config, _) = self.settings.config_for(self.ctx, w);
        let mut work = |e: &mut wgpu::CommandEncoder| problem.record(ctx, &bufs, &config, e);
        ctx.catching_gpu_errors(|| self.timer.time(ctx, &mut work)).map_err(|e| e.to_string())?;
        Ok(bufs)
    }
}

/// Checks the output of a flash run: against the naive run's output when there is one,
/// else against the f64 reference on sampled rows.
pub fn validate(
    ctx: &Context,
    problem: &Problem,
    flash: &PathBuffers,
    naive: Option<&PathBuffers>,
) -> Result<Validation> {
    match naive {
        Some(naive) => {
            let out = max_error(&flash.out.to_f32(ctx)?, naive.out.to_f32(ctx)?.into_iter().map(f64::from));
            let lse = max_error(&flash.lse.to_f32(ctx)?, naive.lse.to_f32(ctx)?.into_iter().map(f64::from));
            Ok(Validation { against: "naive", max_error: out.max(lse), tolerance: tolerance(problem.workload.dtype) })
        }
        None => compare_reference_rows(ctx, problem, flash),
    }
}

/// Compares [`REFERENCE_ROWS`] query rows of the first and the last (batch, head), spread
/// over the sequence and ending with the last, with the f64 reference. Spread, because a
/// block mask changes from one query block to the next; the last row, because under causal
/// and windowed masks it sees the most keys. The reference takes the sampled rows as a
/// problem of their own, each row keeping its mask through the predicate.
fn compare_reference_rows(ctx: &Context, problem: &Problem, flash: &PathBuffers) -> Result<Validation> {
    let w = &problem.workload;
    let s = w.shape;
    let count = s.n_q.min(REFERENCE_ROWS);
    let rows: Vec<usize> = (1..=count).map(|k| (s.n_q - 1) * k / count).collect();
    let (out, lse) = (flash.out.to_f32(ctx)?, flash.lse.to_f32(ctx)?);
    let sub = AttentionShape { batch: 1, q_heads: 1, kv_heads: 1, n_q: count, ..s };
    let unmasked = AttentionOptions { causal: false, window: (-1, -1), sinks: 0, ..w.options };
    let visible = |_: usize, _: usize, r: usize, j: usize| {
        let i = rows[r];
        reference::visible(&w.options, s.n_q, s.n_k, i, j) && problem.mask_allows(i, j)
    };
    let mut worst: f64 = 0.0;
    for (b, h) in [(0, 0), (s.batch - 1, s.q_heads - 1)] {
        let first_row = (b * s.q_heads + h) * s.n_q;
        let first_key = (b * s.kv_heads + h / (s.q_heads / s.kv_heads)) * s.n_k;
        let q: Vec<f32> = rows
            .iter()
            .flat_map(|&i| input_values(0, (first_row + i) * s.d_qk..(first_row + i + 1) * s.d_qk, w.dtype))
            .collect();
        let k = input_values(1, first_key * s.d_qk..(first_key + s.n_k) * s.d_qk, w.dtype);
        let v = input_values(2, first_key * s.d_v..(first_key + s.n_k) * s.d_v, w.dtype);
        let want = reference::attention_masked(&q, &k, &v, &sub, &unmasked, visible);
        for (r, &i) in rows.iter().enumerate() {
            let row = first_row + i;
            let want_out = want.out[r * s.d_v..(r + 1) * s.d_v].iter().copied();
            worst = worst
                .max(max_error(&out[row * s.d_v..(row + 1) * s.d_v], want_out))
                .max(max_error(&lse[row..row + 1], [want.lse[r]]));
        }
    }
    Ok(Validation { against: "reference", max_error: worst, tolerance: tolerance(w.dtype) })
}

/// The tile sizes the flash kernel ran with, as `--config` takes them.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub(crate) struct TileConfig {
    pub block_q: u32,
    pub block_k: u32,
    pub rows_per_thread: u32,
    pub threads_per_row: u32,
    /// "memory", "workgroup" or "subgroup" ([`KvReads`]).
    pub kv_reads: &'static str,
    #[serde(skip)]
    config: FlashConfig,
}

impl From<FlashConfig> for TileConfig {
    fn from(config: FlashConfig) -> Self {
        let FlashConfig { block_q, block_k, rows_per_thread, threads_per_row, kv_reads } = config;
        let kv_reads = match kv_reads {
            KvReads::Memory => "memory",
            KvReads::Workgroup => "workgroup",
            KvReads::Subgroup => "subgroup",
        };
        Self { block_q, block_k, rows_per_thread, threads_per_row, kv_reads, config }
    }
}

impl std::fmt::Display for TileConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.config.fmt(f)
    }
}

/// `wattn bench`'s result.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct BenchReport {
    #[serde(flatten)]
    pub provenance: Provenance,
    /// What points run unless tuned ([`Settings::config`]).
    pub flash_config: TileConfig,
    /// Where `flash_config` comes from, and whether dense points may run a tuned one instead.
    pub flash_config_source: String,
    pub warmup: usize,
    pub runs: usize,
    /// The time budget in seconds; `None` when unlimited.
    pub budget_s: Option<f64>,
    /// `None` with `--no-peak`.
    pub peak: Option<Peak>,
    /// Whether the naive baseline was timed (`--no-naive` turns it off).
    pub naive_baseline: bool,
    /// In the JSON as their rows (see [`Report::rows`]).
    #[serde(skip)]
    pub points: Vec<PointResult>,
}

/// The unit for the flash throughputs of `points`.
fn rate_unit(points: &[PointResult]) -> RateUnit {
    RateUnit::for_max(points.iter().filter_map(|p| p.measured()).map(|m| m.flash.flops_per_s).fold(0.0, f64::max))
}

impl Report for BenchReport {
    fn table(&self) -> String {
        let mut out = self.provenance.headline() + "\n";
        let naive = if self.naive_baseline { "" } else { "; naive baseline off" };
        writeln!(
            out,
            "flash config {} ({}); median of {} runs after {} warm-up{naive}",
            self.flash_config, self.flash_config_source, self.runs, self.warmup
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
        let unit = rate_unit(&self.points);
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
            let mut row = vec![p.series.clone(), seq_label(p.seq()), p.batch_heads()];
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
                        notes.push(format!("{} {}: naive skipped: {why}", p.series, seq_label(p.seq())));
                    }
                    let (config, source) = &p.config;
                    let note = format!("{}: flash config {config} ({source})", p.series);
                    if TileConfig::from(*config) != self.flash_config && !notes.contains(&note) {
                        notes.push(note);
                    }
                }
                // A run of capped points of one series shares a row: "512-16K  capped: ...".
                Outcome::Capped { estimated_s, left_s } => {
                    let (first, least) = match capped_run {
                        Some((series, first, least)) if series == p.series => {
                            rows.pop();
                            (first, least)
                        }
                        _ => (p.seq(), *estimated_s),
                    };
                    let or_more = if first == p.seq() { "" } else { " or more" };
                    row[1] = if first == p.seq() {
                        seq_label(p.seq())
                    } else {
                        format!("{}-{}", seq_label(first), seq_label(p.seq()))
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

    fn lead(&self) -> Row {
        let peak = self.peak.as_ref();
        self.provenance
            .row()
            .with("flash_config", self.flash_config.to_string())
            .with("peak_fma_f32_flops_per_s", peak.map(|p| p.fma_f32.rate))
            .with("peak_fma_f16_flops_per_s", peak.and_then(|p| p.fma_f16.as_ref()).map(|m| m.rate))
            .with("peak_copy_bytes_per_s", peak.map(|p| p.copy.rate))
    }

    fn rows(&self) -> Vec<Row> {
        self.points.iter().map(PointResult::row).collect()
    }

    /// Flash throughput against sequence length or, when block-sparse points were
    /// measured, their speed-up over the dense kernel against density.
    fn chart(&self) -> Chart {
        if self.points.iter().any(|p| p.block_sparse.is_some()) {
            self.speedup_chart()
        } else {
            self.throughput_chart()
        }
    }
}

impl BenchReport {
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
            let mut row = vec![p.series.clone(), seq_label(p.seq()), p.batch_heads()];
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

    /// Flash throughput against sequence length, one line per series (one colour per series
    /// up to its mask, causal ones dashed).
    fn throughput_chart(&self) -> Chart {
        let unit = rate_unit(&self.points);
        let mut series: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
        for p in &self.points {
            if let Some(m) = p.measured() {
                series.entry(&p.series).or_default().push((p.seq() as f64, m.flash.flops_per_s / unit.per));
            }
        }
        let mut families = Families::default();
        let mut lines = Vec::new();
        for (name, mut points) in series {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let color = families.color(&name.replace(" causal", "").replace(" dense", ""));
            lines.push(Line { name: name.to_string(), color, dashed: name.contains("causal"), points });
        }
        Chart {
            title: self.provenance.title("flash attention forward"),
            x_label: "sequence length (tokens)".into(),
            y_label: unit.name.into(),
            x_axis: XAxis::Log2,
            lines,
            empty_note: "no point was measured".into(),
        }
    }

    /// Block-sparse speed-up over the dense kernel against density, per problem shape: the
    /// random masks as one line with the ideal 1 / density dashed beside it in the same
    /// colour, each structured pattern as a point of its own colour.
    fn speedup_chart(&self) -> Chart {
        // (problem, pattern) -> (density, speed-up) points; random densities share one line.
        let mut series: BTreeMap<(String, &str), Vec<(f64, f64)>> = BTreeMap::new();
        for p in &self.points {
            let Some(b) = &p.block_sparse else { continue };
            if let Some(speedup) = b.speedup_vs_dense {
                let (w, s) = (&p.workload, &p.workload.shape);
                let problem = format!("{} d{} {} {}x{}", w.dtype, s.d_qk, seq_label(s.n_q), s.batch, s.q_heads);
                series.entry((problem, b.pattern)).or_default().push((b.density, speedup));
            }
        }
        let mut lines: Vec<Line> = Vec::new();
        for ((problem, pattern), mut points) in series {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let color = lines.iter().filter(|l| !l.dashed).count();
            let ideal = (pattern == "random").then(|| points.iter().map(|&(d, _)| (d, 1.0 / d)).collect());
            lines.push(Line { name: format!("{problem} {pattern}"), color, dashed: false, points });
            if let Some(points) = ideal {
                lines.push(Line { name: format!("{problem} ideal"), color, dashed: true, points });
            }
        }
        Chart {
            title: self.provenance.title("block-sparse attention"),
            x_label: "block density (fraction of blocks visited)".into(),
            y_label: "speed-up over the dense kernel".into(),
            x_axis: XAxis::Linear,
            lines,
            empty_note: "no block-sparse point was measured against a dense one".into(),
        }
    }
}
