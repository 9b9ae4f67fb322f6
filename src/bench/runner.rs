//! The loop of `wattn bench`: for each point, check the flash output, then time the flash
//! and naive paths. A point or path that cannot run says why, and the run goes on.
//! Block-sparse points time the flash path only, and are compared afterwards with the
//! dense point of their shape.

use super::stats::Stats;
use super::timing::Timer;
use super::workload::{Path, PathBuffers, Pattern, Problem, Sparsity, Workload, input_values};
use crate::FlashConfig;
use crate::attention::{AttentionOptions, AttentionShape};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::reference;
use crate::tensor::DType;
use serde::Serialize;
use std::collections::HashMap;
use std::time::Instant;

/// How to run the points.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub warmup: usize,
    pub runs: usize,
    pub config: FlashConfig,
    /// Seconds after which no point is started that is estimated to run past them;
    /// `None` runs every point.
    pub budget_s: Option<f64>,
    /// The f32 FMA ceiling in FLOP/s that efficiency is quoted against.
    pub peak_flops: Option<f64>,
    /// Time the naive baseline too (where it fits and the budget allows).
    pub naive: bool,
}

/// One timed path at one point.
#[derive(Clone, Debug, Serialize)]
pub struct PathResult {
    pub time: Stats,
    /// Attention FLOPs (see [`Workload::flops`]) per second of the median run.
    pub flops_per_s: f64,
    /// GPU memory the path used: inputs and its outputs, plus the score matrix for naive.
    pub bytes: u64,
}

/// What the flash output was checked against before timing.
#[derive(Clone, Debug, Serialize)]
pub struct Validation {
    /// "naive" (every output) or "reference" (the last query rows of two heads, in f64).
    pub against: &'static str,
    /// Largest |flash - expected| / max(1, |expected|) over O and LSE.
    pub max_error: f64,
    pub tolerance: f64,
}

impl Validation {
    pub fn passed(&self) -> bool {
        self.max_error <= self.tolerance
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Measured {
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
#[derive(Clone, Debug, Serialize)]
pub struct BlockSparse {
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

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome<M = Measured> {
    Measured(M),
    /// Not started: its flash runs were estimated to take `estimated_s`, and only `left_s`
    /// of the time budget were left.
    Capped {
        estimated_s: f64,
        left_s: f64,
    },
    /// Started and could not finish (a limit, out of memory, a wrong result).
    Failed {
        reason: String,
    },
}

/// One point of the grid and what became of it.
#[derive(Clone, Debug, Serialize)]
pub struct PointResult {
    pub series: String,
    pub dtype: &'static str,
    pub head_dim: usize,
    pub causal: bool,
    /// `[left, right]`, -1 for unbounded.
    pub window: [i32; 2],
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub flops: f64,
    /// Present exactly for block-sparse points.
    pub block_sparse: Option<BlockSparse>,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl PointResult {
    /// The result of `w`; a block-sparse point's speed against the dense kernel is filled
    /// in once the dense point has run.
    fn new(w: &Workload, outcome: Outcome) -> Self {
        let s = &w.shape;
        Self {
            series: w.series(),
            dtype: w.dtype.name(),
            head_dim: s.d_qk,
            causal: w.options.causal,
            window: [w.options.window.0, w.options.window.1],
            batch: s.batch,
            heads: s.q_heads,
            kv_heads: s.kv_heads,
            seq: s.n_q,
            flops: w.flops(),
            block_sparse: None,
            outcome,
        }
    }

    pub fn measured(&self) -> Option<&Measured> {
        match &self.outcome {
            Outcome::Measured(m) => Some(m),
            _ => None,
        }
    }
}

impl<M> Outcome<M> {
    /// "measured", "capped" or "failed", as in the JSON.
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Measured(_) => "measured",
            Outcome::Capped { .. } => "capped",
            Outcome::Failed { .. } => "failed",
        }
    }

    /// Why the point was not measured, in words.
    pub fn reason(&self) -> Option<String> {
        match self {
            Outcome::Measured(_) => None,
            Outcome::Capped { estimated_s, left_s } => {
                Some(format!("estimated {estimated_s:.0} s, past the time budget ({left_s:.0} s were left)"))
            }
            Outcome::Failed { reason } => Some(reason.clone()),
        }
    }
}

/// Runs `workloads`, cheapest first so that a time budget cuts the most expensive, and
/// returns their results in the given order. `progress(done, total, next)` is called
/// before each point.
pub fn run(
    ctx: &Context,
    timer: &Timer,
    workloads: &[Workload],
    settings: &Settings,
    progress: &mut dyn FnMut(usize, usize, &Workload),
) -> Vec<PointResult> {
    let start = Instant::now();
    let mut order: Vec<usize> = (0..workloads.len()).collect();
    order.sort_by(|&a, &b| workloads[a].flops().total_cmp(&workloads[b].flops()));
    let mut speeds = Speeds::default();
    let mut results: Vec<Option<PointResult>> = vec![None; workloads.len()];
    for (done, &i) in order.iter().enumerate() {
        let w = &workloads[i];
        progress(done, workloads.len(), w);
        let left = settings.budget_s.map(|b| b - start.elapsed().as_secs_f64());
        let point = Point { ctx, timer, settings, workload: w };
        results[i] = Some(PointResult::new(w, point.run(&mut speeds, left)));
    }
    let mut results: Vec<PointResult> = results.into_iter().map(|r| r.expect("every point was run")).collect();
    let median = |r: &PointResult| r.measured().map(|m| m.flash.time.median_s);
    for (i, w) in workloads.iter().enumerate() {
        if let Some(sparsity) = &w.sparsity {
            let dense = workloads.iter().position(|d| *d == w.dense_baseline()).and_then(|d| median(&results[d]));
            results[i].block_sparse = Some(BlockSparse::new(sparsity, median(&results[i]), dense));
        }
    }
    results
}

/// Work below this many FLOPs is cheap enough to learn a path's speed from.
const PROBE_FLOPS: f64 = 1e9;
/// Query rows per head compared with the reference when the naive path does not run.
const REFERENCE_ROWS: usize = 32;

/// The speed (FLOP/s) each path was last seen to sustain, per series and overall, to
/// estimate how long a point will take.
#[derive(Default)]
struct Speeds {
    per_series: HashMap<(Path, String), f64>,
    latest: HashMap<Path, f64>,
}

impl Speeds {
    fn record(&mut self, path: Path, w: &Workload, flops_per_s: f64) {
        self.per_series.insert((path, w.series()), flops_per_s);
        self.latest.insert(path, flops_per_s);
    }

    /// Estimated seconds of `runs` runs of `path` on `w`.
    fn seconds(&self, path: Path, w: &Workload, runs: usize) -> Option<f64> {
        let speed = self.per_series.get(&(path, w.series())).or(self.latest.get(&path))?;
        Some(w.flops() * runs as f64 / speed)
    }
}

struct Point<'a> {
    ctx: &'a Context,
    timer: &'a Timer,
    settings: &'a Settings,
    workload: &'a Workload,
}

impl Point<'_> {
    /// Runs of each path per point: the checked one, which is also the first warm-up, the
    /// other warm-ups, the timed ones.
    fn runs(&self) -> usize {
        self.settings.warmup.max(1) + self.settings.runs
    }

    /// Whether to time the naive path: when asked, and for dense points (it takes no block mask).
    fn naive(&self) -> bool {
        self.settings.naive && self.workload.sparsity.is_none()
    }

    /// `left`: seconds left of the budget, if there is one.
    fn run(&self, speeds: &mut Speeds, left: Option<f64>) -> Outcome {
        let started = Instant::now();
        let result = catching_gpu_errors(self.ctx, || {
            if let Some(left) = left {
                self.probe(speeds, Path::Flash);
                let seconds = speeds.seconds(Path::Flash, self.workload, self.runs());
                let left = left - started.elapsed().as_secs_f64();
                if let Some(estimated_s) = seconds.filter(|&t| t > left) {
                    return Ok(Outcome::Capped { estimated_s, left_s: left.max(0.0) });
                }
                if self.naive() {
                    self.probe(speeds, Path::Naive);
                }
            }
            let left = left.map(|l| l - started.elapsed().as_secs_f64());
            self.measure(speeds, left)
        });
        result.unwrap_or_else(|e| Outcome::Failed { reason: e.to_string() })
    }

    /// Learns `path`'s speed on a shrunk copy of the point when nothing is known yet.
    /// A failure here teaches nothing and is left for the real point to report.
    fn probe(&self, speeds: &mut Speeds, path: Path) {
        if speeds.seconds(path, self.workload, 1).is_some() {
            return;
        }
        let small = self.workload.shrunk_to(PROBE_FLOPS);
        let timed = Problem::upload(self.ctx, &small).and_then(|problem| {
            let bufs = problem.alloc(self.ctx, path)?;
            let mut work = |e: &mut wgpu::CommandEncoder| problem.record(self.ctx, &bufs, &self.settings.config, e);
            self.timer.measure(self.ctx, 1, 1, &mut work)
        });
        if let Ok(stats) = timed {
            speeds.record(path, self.workload, small.flops() / stats.median_s);
        }
    }

    fn measure(&self, speeds: &mut Speeds, left: Option<f64>) -> Result<Outcome> {
        let (ctx, w) = (self.ctx, self.workload);
        let problem = Problem::upload(ctx, w)?;
        let flash = problem.alloc(ctx, Path::Flash)?;
        let mut flash_work = |e: &mut wgpu::CommandEncoder| problem.record(ctx, &flash, &self.settings.config, e);
        self.timer.time(ctx, &mut flash_work)?;

        let flash_seconds = speeds.seconds(Path::Flash, w, self.runs()).unwrap_or(0.0);
        let naive = self.naive().then(|| self.naive_run(&problem, speeds, left.map(|l| l - flash_seconds)));
        let validation = validate(ctx, &problem, &flash, naive.as_ref().and_then(|n| n.as_ref().ok()))?;
        if !validation.passed() {
            return Ok(Outcome::Failed {
                reason: format!(
                    "flash output differs from {} by {:.3e} (tolerance {:.1e}); not timed",
                    validation.against, validation.max_error, validation.tolerance
                ),
            });
        }

        let settings = self.settings;
        let time_path = |bufs: &PathBuffers, work: &mut dyn FnMut(&mut wgpu::CommandEncoder) -> Result<()>| {
            let time = self.timer.measure(ctx, settings.warmup.saturating_sub(1), settings.runs, work)?;
            Ok::<_, Error>(PathResult {
                time,
                flops_per_s: w.flops() / time.median_s,
                bytes: problem.input_bytes() + bufs.bytes(),
            })
        };
        let flash_result = time_path(&flash, &mut flash_work)?;
        speeds.record(Path::Flash, w, flash_result.flops_per_s);
        let (naive_result, naive_skipped) = match &naive {
            None => (None, None),
            Some(Ok(bufs)) => {
                let mut work = |e: &mut wgpu::CommandEncoder| problem.record(ctx, bufs, &settings.config, e);
                let result = time_path(bufs, &mut work)?;
                speeds.record(Path::Naive, w, result.flops_per_s);
                (Some(result), None)
            }
            Some(Err(reason)) => (None, Some(reason.clone())),
        };
        Ok(Outcome::Measured(Measured {
            fraction_of_peak: settings.peak_flops.map(|p| flash_result.flops_per_s / p),
            speedup: naive_result.as_ref().map(|n| n.time.median_s / flash_result.time.median_s),
            naive: naive_result,
            naive_skipped,
            validation,
            flash: flash_result,
        }))
    }

    /// The naive path's buffers after one run, or why it does not run: its score matrix is
    /// over a limit or out of memory, or it would take more than the `left` seconds.
    fn naive_run(
        &self,
        problem: &Problem,
        speeds: &Speeds,
        left: Option<f64>,
    ) -> std::result::Result<PathBuffers, String> {
        let ctx = self.ctx;
        let bufs = catching_gpu_errors(ctx, || problem.alloc(ctx, Path::Naive)).map_err(|e| e.to_string())?;
        if let (Some(left), Some(t)) = (left, speeds.seconds(Path::Naive, self.workload, self.runs())) {
            if t > left {
                return Err(format!("estimated {t:.0} s, past the time budget"));
            }
        }
        let mut work = |e: &mut wgpu::CommandEncoder| problem.record(ctx, &bufs, &self.settings.config, e);
        catching_gpu_errors(ctx, || self.timer.time(ctx, &mut work)).map_err(|e| e.to_string())?;
        Ok(bufs)
    }
}

/// Runs `f`, turning the out-of-memory and validation errors wgpu raises meanwhile (which
/// would otherwise reach its uncaptured-error handler, a panic) into an error.
pub(crate) fn catching_gpu_errors<T>(ctx: &Context, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let out_of_memory = ctx.device().push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let validation = ctx.device().push_error_scope(wgpu::ErrorFilter::Validation);
    let result = f();
    let validation = pollster::block_on(validation.pop());
    let out_of_memory = pollster::block_on(out_of_memory.pop());
    match out_of_memory.or(validation) {
        Some(e) => Err(Error::Gpu(e.to_string())),
        None => result,
    }
}

/// The error allowed between the flash output and the expected one: output rounding of
/// the storage type and a different summation order, with a wide margin; a wrong kernel
/// is off by far more.
pub(crate) fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 4e-3,
    }
}

/// The largest |got - want| / max(1, |want|). Infinities must agree exactly (a fully
/// masked row has LSE -inf); NaN, or a lone infinity, is an infinite error.
pub(crate) fn max_error(got: &[f32], want: impl IntoIterator<Item = f64>) -> f64 {
    got.iter().zip(want).fold(0.0, |worst: f64, (&g, w)| {
        let g = g as f64;
        let err = if g == w {
            0.0
        } else if g.is_finite() && w.is_finite() {
            (g - w).abs() / w.abs().max(1.0)
        } else {
            f64::INFINITY
        };
        worst.max(err)
    })
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
        Some(naive) => compare_paths(ctx, problem.workload.dtype, flash, naive),
        None => compare_reference_rows(ctx, problem, flash),
    }
}

/// Compares every output of the flash path with the naive path's.
fn compare_paths(ctx: &Context, dtype: DType, flash: &PathBuffers, naive: &PathBuffers) -> Result<Validation> {
    let out = max_error(&flash.out.to_f32(ctx)?, naive.out.to_f32(ctx)?.into_iter().map(f64::from));
    let lse = max_error(&flash.lse.to_f32(ctx)?, naive.lse.to_f32(ctx)?.into_iter().map(f64::from));
    Ok(Validation { against: "naive", max_error: out.max(lse), tolerance: tolerance(dtype) })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_relative_above_one_and_absolute_below() {
        assert_eq!(max_error(&[1.5, 100.0], [1.0, 101.0]), 0.5);
        assert!((max_error(&[0.001], [0.002]) - 0.001).abs() < 1e-9);
    }

    #[test]
    fn infinities_must_agree_and_nan_always_fails() {
        assert_eq!(max_error(&[f32::NEG_INFINITY], [f64::NEG_INFINITY]), 0.0);
        assert_eq!(max_error(&[f32::NEG_INFINITY], [0.0]), f64::INFINITY);
        assert_eq!(max_error(&[f32::NAN], [0.0]), f64::INFINITY);
        assert_eq!(max_error(&[f32::NAN], [f64::NAN]), f64::INFINITY);
    }
}
