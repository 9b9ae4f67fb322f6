//! The benchmark engine behind `wattn bench` and `wattn bench --decode`: every point is
//! checked before it is timed, timed as warm-up runs then repeated runs summarised by their
//! median, and run cheapest first within a time budget that no point is started past. A
//! point that cannot run says why, and the run goes on. (`wattn stream` times one long
//! sequence of steps instead, summarised per bucket with the same [`Stats`].)
//!
//! A benchmark says what one point's work is, how to learn its speed when nothing is known
//! yet, and how to check and time the point (`Benchmark`); `run` does the rest.

use super::report::Row;
use crate::context::Context;
use crate::dtype::DType;
use crate::error::Result;
use crate::timing::{Stats, Timer, Work};
use std::collections::{HashMap, HashSet};
use std::time::Instant;

/// What became of one point.
#[derive(Clone, Debug)]
pub(crate) enum Outcome<M> {
    Measured(M),
    /// Not started: it was estimated to take `estimated_s`, and only `left_s` of the time
    /// budget were left.
    Capped {
        estimated_s: f64,
        left_s: f64,
    },
    /// Started and could not finish (a limit, out of memory, a wrong result).
    Failed {
        reason: String,
    },
}

impl<M> Outcome<M> {
    /// "measured", "capped" or "failed", as in the JSON and CSV.
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

    /// The status, the reason and, for a capped point, its estimate and the budget left:
    /// the cells every row of a point opens its figures with.
    pub fn cells(&self) -> Row {
        let (estimated_s, left_s) = match *self {
            Outcome::Capped { estimated_s, left_s } => (Some(estimated_s), Some(left_s)),
            _ => (None, None),
        };
        Row::default()
            .with("status", self.status())
            .with("reason", self.reason())
            .with("estimated_s", estimated_s)
            .with("left_s", left_s)
    }

    pub(crate) fn measured(&self) -> Option<&M> {
        match self {
            Outcome::Measured(m) => Some(m),
            _ => None,
        }
    }
}

/// Warm-up and timed runs per path or setting of a point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Repeats {
    /// Untimed runs; the first is the one whose output is checked.
    pub warmup: usize,
    /// Timed runs; their median is reported with min and max.
    pub runs: usize,
}

impl Repeats {
    /// Runs of one path or setting: the checked one (also the first warm-up), the other
    /// warm-ups, the timed ones.
    pub fn per_setting(&self) -> usize {
        self.warmup.max(1) + self.runs
    }

    /// Times `work` once its checked run is done: the remaining warm-ups, then the timed runs.
    pub fn time(&self, ctx: &Context, timer: &Timer, work: &mut Work<'_>) -> Result<Stats> {
        timer.measure(ctx, self.warmup.saturating_sub(1), self.runs, work)
    }
}

/// Seconds per unit of work (FLOP, byte read) that each kind of run was last seen to take,
/// per series and overall: how the engine estimates a point before starting it, and how a
/// benchmark estimates one of its paths.
#[derive(Default)]
pub struct Speeds {
    per_series: HashMap<(&'static str, String), f64>,
    latest: HashMap<&'static str, f64>,
}

impl Speeds {
    /// Records that `work` units of `kind` on `series` took `seconds`.
    pub fn record(&mut self, kind: &'static str, series: &str, work: f64, seconds: f64) {
        let rate = seconds / work;
        self.per_series.insert((kind, series.to_string()), rate);
        self.latest.insert(kind, rate);
    }

    /// Estimated seconds of `work` units of `kind` on `series`: at the series' last rate,
    /// else at the last rate of any series; `None` when nothing is known.
    pub fn seconds(&self, kind: &'static str, series: &str, work: f64) -> Option<f64> {
        let rate = self.per_series.get(&(kind, series.to_string())).or(self.latest.get(kind))?;
        Some(work * rate)
    }
}

/// The kind under which [`run`] records whole points.
const POINT: &str = "point";

/// A family of points the engine can run.
pub(crate) trait Benchmark {
    type Workload;
    type Measured;

    /// The work of everything the point runs (every run of every path or setting): the
    /// points run cheapest first, and their seconds per unit of work estimate the next ones.
    fn work(&self, w: &Self::Workload) -> f64;

    /// What a line of the plot follows: points of one series run at similar speeds.
    fn series(&self, w: &Self::Workload) -> String;

    /// Seconds per unit of work of `w`, learned cheaply (on a shrunk copy, say) when no
    /// point was measured yet; `None` where it cannot be learned. Called only under a budget.
    fn probe(&self, _w: &Self::Workload) -> Option<f64> {
        None
    }

    /// Checks and times `w`. `left`: seconds left of the budget, if there is one, for
    /// optional parts (a baseline) to decide whether they fit.
    fn measure(&self, w: &Self::Workload, speeds: &mut Speeds, left: Option<f64>) -> Result<Outcome<Self::Measured>>;
}

/// Runs `workloads`, cheapest first so that a budget of `budget_s` seconds cuts the most
/// expensive, and returns their outcomes in the given order. `progress(done, total, next)`
/// is called before each point.
pub(crate) fn run<B: Benchmark>(
    ctx: &Context,
    bench: &B,
    workloads: &[B::Workload],
    budget_s: Option<f64>,
    progress: &mut dyn FnMut(usize, usize, &B::Workload),
) -> Vec<Outcome<B::Measured>> {
    let start = Instant::now();
    let mut order: Vec<usize> = (0..workloads.len()).collect();
    order.sort_by(|&a, &b| bench.work(&workloads[a]).total_cmp(&bench.work(&workloads[b])));
    let mut speeds = Speeds::default();
    let mut series_measured = HashSet::new();
    let mut outcomes: Vec<Option<Outcome<B::Measured>>> = (0..workloads.len()).map(|_| None).collect();
    for (done, &i) in order.iter().enumerate() {
        let w = &workloads[i];
        progress(done, workloads.len(), w);
        let (series, work) = (bench.series(w), bench.work(w));
        let started = Instant::now();
        let left = budget_s.map(|b| b - start.elapsed().as_secs_f64());
        let outcome = ctx.catching_gpu_errors(|| {
            if let Some(left) = left {
                if speeds.seconds(POINT, &series, work).is_none() {
                    if let Some(rate) = bench.probe(w) {
                        speeds.record(POINT, &series, 1.0, rate);
                    }
                }
                let left = left - started.elapsed().as_secs_f64();
                if let Some(estimated_s) = speeds.seconds(POINT, &series, work).filter(|&t| t > left) {
                    return Ok(Outcome::Capped { estimated_s, left_s: left.max(0.0) });
                }
            }
            let measuring = Instant::now();
            let outcome = bench.measure(w, &mut speeds, left.map(|l| l - started.elapsed().as_secs_f64()))?;
            // A series' first point pays for compiling its pipelines (llvmpipe compiles at the
            // first dispatch, inside the timings): from a tiny first point on a cold driver
            // cache that cost would estimate every later point past any budget.
            if let Outcome::Measured(_) = outcome {
                if !series_measured.insert(series.clone()) {
                    speeds.record(POINT, &series, work, measuring.elapsed().as_secs_f64());
                }
            }
            Ok(outcome)
        });
        outcomes[i] = Some(outcome.unwrap_or_else(|e| Outcome::Failed { reason: e.to_string() }));
    }
    outcomes.into_iter().map(|o| o.expect("every point was run")).collect()
}

/// What an output was checked against before it was timed.
#[derive(Clone, Debug, PartialEq)]
pub struct Validation {
    /// "naive" (every output of the naive path) or "reference" (sampled rows, in f64).
    pub against: &'static str,
    /// Largest |got - expected| / max(1, |expected|) over O and LSE.
    pub max_error: f64,
    /// The largest `max_error` that passes; it depends on the storage dtype.
    pub tolerance: f64,
}

impl Validation {
    /// Whether `max_error` is within `tolerance`.
    pub fn passed(&self) -> bool {
        self.max_error <= self.tolerance
    }

    /// The outcome of a point whose `what` failed this check.
    pub(crate) fn failure<M>(&self, what: &str) -> Outcome<M> {
        let expected = if self.against == "naive" { "the naive baseline" } else { "the f64 reference" };
        Outcome::Failed {
            reason: format!(
                "{what} differs from {expected} by {:.3e} (tolerance {:.1e}); not timed",
                self.max_error, self.tolerance
            ),
        }
    }
}

/// The error allowed between a kernel's output and the expected one: output rounding of
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

    #[test]
    fn speeds_fall_back_to_the_latest_series() {
        let mut speeds = Speeds::default();
        assert_eq!(speeds.seconds("flash", "a", 10.0), None);
        speeds.record("flash", "a", 100.0, 2.0);
        speeds.record("flash", "b", 100.0, 4.0);
        assert_eq!(speeds.seconds("flash", "a", 50.0), Some(1.0));
        assert_eq!(speeds.seconds("flash", "c", 50.0), Some(2.0), "unknown series: the latest rate");
        assert_eq!(speeds.seconds("naive", "a", 50.0), None, "kinds do not mix");
    }
}
