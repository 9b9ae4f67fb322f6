//! `wattn bench --backward`: the flash backward against the forward of the same problem and
//! against the naive materialised backward (`naive_bwd.wgsl`) where its two N x N matrices fit.
//!
//! FLOPs follow FlashAttention's accounting: the backward counts 2.5 times the forward's
//! (it recomputes S, and computes dV, dP, dS K and dS^T Q: five matrix products to the
//! forward's two). Each point is first checked on a copy of 128 tokens (the same pipelines:
//! dtype, head dims and options) against the f64 reference gradients, the naive backward's
//! too, then the forward, the backward and the naive backward are timed on the point's own
//! inputs.

use super::engine::{self, Benchmark, Outcome, Repeats, Speeds, Validation, max_error, tolerance};
use super::peak::Peak;
use super::plot::{Chart, Families, Line, XAxis, seq_label};
use super::report::{Provenance, Report, Row, aligned, mib, sig3, time_cells};
use super::workload::{Workload, input_values};
use crate::FlashConfig;
use crate::attention::backward::{self, GradientBuffers};
use crate::attention::{AttentionBuffers, AttentionShape, flash, naive};
use crate::context::Context;
use crate::dtype::DType;
use crate::error::Result;
use crate::reference;
use crate::tensor::Tensor;
use crate::timing::{Stats, Timer};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// FlashAttention's count of the backward's FLOPs, in forwards.
pub const BACKWARD_FLOPS_PER_FORWARD: f64 = 2.5;

/// The sequence length of the copy each point is checked on.
const CHECKED_SEQ: usize = 128;

/// How to run the points.
#[derive(Clone, Debug)]
pub(crate) struct BackwardSettings {
    pub repeats: Repeats,
    /// Seconds after which no point is started that is estimated to run past them.
    pub budget_s: Option<f64>,
    /// The f32 FMA ceiling in FLOP/s that efficiency is quoted against.
    pub peak_flops: Option<f64>,
    /// Time the naive backward too, where it fits.
    pub naive: bool,
}

/// The naive backward's timing at one point.
#[derive(Clone, Debug)]
pub(crate) struct NaiveMeasured {
    pub time: Stats,
    /// GPU memory it used: the problem's tensors and its two N x N matrices.
    pub bytes: u64,
}

/// One point's timings.
#[derive(Clone, Debug)]
pub(crate) struct BackwardMeasured {
    pub forward: Stats,
    pub backward: Stats,
    /// The forward's FLOPs per second of its median run.
    pub forward_flops_per_s: f64,
    /// [`BACKWARD_FLOPS_PER_FORWARD`] forwards per second of the backward's median run.
    pub backward_flops_per_s: f64,
    /// Backward throughput over the f32 FMA ceiling.
    pub fraction_of_peak: Option<f64>,
    pub naive: Option<NaiveMeasured>,
    /// Why the naive backward did not run when it was asked for.
    pub naive_skipped: Option<String>,
    pub validation: Validation,
}

impl BackwardMeasured {
    /// Backward time over forward time (FlashAttention-2 reaches about 2.5).
    pub fn ratio(&self) -> f64 {
        self.backward.median_s / self.forward.median_s
    }

    /// The naive backward's time over the flash backward's.
    pub fn speedup(&self) -> Option<f64> {
        self.naive.as_ref().map(|n| n.time.median_s / self.backward.median_s)
    }
}

#[derive(Clone, Debug)]
pub(crate) struct BackwardPoint {
    pub workload: Workload,
    pub series: String,
    pub outcome: Outcome<BackwardMeasured>,
}

/// One problem's inputs, forward results, dO and gradients on the GPU, and the forward's
/// tile configuration: what `wattn bench --backward` and the criterion benches time.
pub struct BackwardProblem {
    workload: Workload,
    config: FlashConfig,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    d_out: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
}

impl BackwardProblem {
    /// Q, K, V and dO filled by [`input_values`] (dO is tensor 3), zeros elsewhere; the
    /// forward runs what [`FlashConfig::for_shape`] picks. Dense workloads only.
    pub fn upload(ctx: &Context, workload: &Workload) -> Result<Self> {
        workload.check()?;
        let (s, dtype) = (&workload.shape, workload.dtype);
        let kv = |d| [s.batch, s.kv_heads, s.n_k, d];
        let filled = |which, shape: [usize; 4]| {
            Tensor::from_f32(ctx, &shape, &input_values(which, 0..shape.iter().product(), dtype), dtype)
        };
        Ok(Self {
            workload: *workload,
            config: FlashConfig::for_shape(ctx, s, dtype, workload.options.causal).0,
            q: filled(0, s.q_shape())?,
            k: filled(1, kv(s.d_qk))?,
            v: filled(2, kv(s.d_v))?,
            out: Tensor::zeros(ctx, &s.out_shape(), dtype)?,
            lse: Tensor::zeros(ctx, &s.lse_shape(), DType::F32)?,
            d_out: filled(3, s.out_shape())?,
            dq: Tensor::zeros(ctx, &s.q_shape(), dtype)?,
            dk: Tensor::zeros(ctx, &kv(s.d_qk), dtype)?,
            dv: Tensor::zeros(ctx, &kv(s.d_v), dtype)?,
        })
    }

    fn forward_buffers(&self) -> AttentionBuffers<'_> {
        AttentionBuffers {
            q: self.q.view(),
            k: self.k.view(),
            v: self.v.view(),
            out: self.out.view(),
            lse: self.lse.view(),
        }
    }

    /// Records the forward, which writes the O and LSE the backward reads.
    pub fn record_forward(&self, ctx: &Context, encoder: &mut wgpu::CommandEncoder) -> Result<()> {
        flash::encode(ctx, encoder, &self.forward_buffers(), None, &self.workload.options, &self.config)
    }

    fn gradient_buffers(&self) -> GradientBuffers<'_> {
        GradientBuffers {
            forward: self.forward_buffers(),
            d_out: self.d_out.view(),
            dq: self.dq.view(),
            dk: self.dk.view(),
            dv: self.dv.view(),
        }
    }

    /// Records the backward.
    pub fn record_backward(&self, ctx: &Context, encoder: &mut wgpu::CommandEncoder) -> Result<()> {
        backward::encode(ctx, encoder, &self.gradient_buffers(), None, &self.workload.options)
    }

    /// Records the naive backward through `scratch` (made for this problem's shape), into the
    /// same gradients.
    pub fn record_naive_backward(
        &self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        scratch: &naive::BackwardScratch,
    ) -> Result<()> {
        naive::encode_backward(ctx, encoder, &self.gradient_buffers(), scratch, &self.workload.options)
    }

    /// Bytes of the problem's tensors: inputs, forward results, dO and gradients.
    pub fn tensor_bytes(&self) -> u64 {
        let tensors = [&self.q, &self.k, &self.v, &self.out, &self.lse, &self.d_out, &self.dq, &self.dk, &self.dv];
        tensors.iter().map(|t| t.buffer().size()).sum()
    }

    /// The worst relative error of dQ, dK and dV, as they stand, against the f64 reference
    /// gradients of the problem's inputs.
    fn gradient_error(&self, ctx: &Context) -> Result<f64> {
        let (s, dtype) = (&self.workload.shape, self.workload.dtype);
        let host = |which, t: &Tensor| input_values(which, 0..t.numel(), dtype);
        let (q, k, v, d_out) = (host(0, &self.q), host(1, &self.k), host(2, &self.v), host(3, &self.d_out));
        let want = reference::attention_backward(&q, &k, &v, &d_out, s, &self.workload.options);
        let mut worst = 0.0f64;
        for (got, want) in [(&self.dq, &want.dq), (&self.dk, &want.dk), (&self.dv, &want.dv)] {
            worst = worst.max(max_error(&got.to_f32(ctx)?, want.iter().copied()));
        }
        Ok(worst)
    }
}

/// Runs forward and backward on a copy of `workload` with one batch and [`CHECKED_SEQ`]
/// tokens (the same pipelines) and compares dQ, dK and dV with the f64 reference: the
/// worst relative error of the three, for the flash backward and (with `naive`) for the
/// naive one.
pub fn validate(ctx: &Context, workload: &Workload, naive: bool) -> Result<(Validation, Option<Validation>)> {
    let s = AttentionShape { batch: 1, n_q: CHECKED_SEQ, n_k: CHECKED_SEQ, ..workload.shape };
    let copy = Workload { shape: s, ..*workload };
    let p = BackwardProblem::upload(ctx, &copy)?;
    let validation = |max_error| Validation { against: "reference", max_error, tolerance: tolerance(copy.dtype) };
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    p.record_forward(ctx, &mut encoder)?;
    p.record_backward(ctx, &mut encoder)?;
    ctx.submit_and_wait(encoder)?;
    let flash = validation(p.gradient_error(ctx)?);
    if !naive {
        return Ok((flash, None));
    }
    let scratch = naive::BackwardScratch::alloc(ctx, &s)?;
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    p.record_naive_backward(ctx, &mut encoder, &scratch)?;
    ctx.submit_and_wait(encoder)?;
    Ok((flash, Some(validation(p.gradient_error(ctx)?))))
}

struct BackwardBench<'a> {
    ctx: &'a Context,
    timer: &'a Timer,
    settings: &'a BackwardSettings,
}

impl Benchmark for BackwardBench<'_> {
    type Workload = Workload;
    type Measured = BackwardMeasured;

    fn work(&self, w: &Workload) -> f64 {
        let backwards = if self.settings.naive { 2.0 } else { 1.0 };
        (1.0 + backwards * BACKWARD_FLOPS_PER_FORWARD) * w.flops() * self.settings.repeats.per_setting() as f64
    }

    fn series(&self, w: &Workload) -> String {
        w.series()
    }

    fn measure(&self, w: &Workload, _speeds: &mut Speeds, _left: Option<f64>) -> Result<Outcome<BackwardMeasured>> {
        let (validation, naive_validation) = validate(self.ctx, w, self.settings.naive)?;
        if !validation.passed() {
            return Ok(validation.failure("backward"));
        }
        let (ctx, timer, repeats) = (self.ctx, self.timer, &self.settings.repeats);
        let problem = BackwardProblem::upload(ctx, w)?;
        let forward = repeats.time(ctx, timer, &mut |encoder| problem.record_forward(ctx, encoder))?;
        let backward = repeats.time(ctx, timer, &mut |encoder| problem.record_backward(ctx, encoder))?;
        let (naive, naive_skipped) = match naive_validation {
            None => (None, None),
            Some(v) if !v.passed() => {
                let reason = format!("its gradients differ from the f64 reference by {:.3e}", v.max_error);
                (None, Some(reason))
            }
            Some(_) => match self.naive_run(&problem) {
                Ok(measured) => (Some(measured), None),
                Err(reason) => (None, Some(reason)),
            },
        };
        let flops = w.flops();
        let backward_flops_per_s = BACKWARD_FLOPS_PER_FORWARD * flops / backward.median_s;
        Ok(Outcome::Measured(BackwardMeasured {
            forward_flops_per_s: flops / forward.median_s,
            backward_flops_per_s,
            fraction_of_peak: self.settings.peak_flops.map(|p| backward_flops_per_s / p),
            forward,
            backward,
            naive,
            naive_skipped,
            validation,
        }))
    }
}

impl BackwardBench<'_> {
    /// Times the naive backward on `problem`, or says why it does not run: its matrices are
    /// over a binding limit or out of memory, or its loops over the adapter's cap.
    fn naive_run(&self, problem: &BackwardProblem) -> std::result::Result<NaiveMeasured, String> {
        let (ctx, timer, repeats) = (self.ctx, self.timer, &self.settings.repeats);
        let scratch = ctx
            .catching_gpu_errors(|| naive::BackwardScratch::alloc(ctx, &problem.workload.shape))
            .map_err(|e| e.to_string())?;
        let mut work = |encoder: &mut wgpu::CommandEncoder| problem.record_naive_backward(ctx, encoder, &scratch);
        let time = ctx.catching_gpu_errors(|| repeats.time(ctx, timer, &mut work)).map_err(|e| e.to_string())?;
        Ok(NaiveMeasured { time, bytes: problem.tensor_bytes() + scratch.bytes() })
    }
}

/// Checks and times every workload; the points come back in the given order.
pub(crate) fn run(
    ctx: &Context,
    timer: &Timer,
    workloads: &[Workload],
    settings: &BackwardSettings,
    progress: &mut dyn FnMut(usize, usize, &Workload),
) -> Vec<BackwardPoint> {
    let bench = BackwardBench { ctx, timer, settings };
    let outcomes = engine::run(ctx, &bench, workloads, settings.budget_s, progress);
    workloads
        .iter()
        .zip(outcomes)
        .map(|(w, outcome)| BackwardPoint { workload: *w, series: w.series(), outcome })
        .collect()
}

/// What `wattn bench --backward` reports.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct BackwardReport {
    #[serde(flatten)]
    pub provenance: Provenance,
    pub warmup: usize,
    pub runs: usize,
    pub budget_s: Option<f64>,
    pub backward_flops_per_forward: f64,
    /// Whether the naive backward was timed (`--no-naive` turns it off).
    pub naive_baseline: bool,
    pub peak: Option<Peak>,
    #[serde(skip)]
    pub points: Vec<BackwardPoint>,
}

impl BackwardPoint {
    fn row(&self) -> Row {
        let s = &self.workload.shape;
        let m = self.outcome.measured();
        Row::default()
            .with("series", self.series.as_str())
            .with("dtype", self.workload.dtype.name())
            .with("batch", s.batch)
            .with("heads", s.q_heads)
            .with("seq", s.n_q)
            .with("head_dim", s.d_qk)
            .with("causal", self.workload.options.causal)
            .with_all("", self.outcome.cells())
            .with_all("forward", time_cells(m.map(|m| &m.forward)))
            .with_all("backward", time_cells(m.map(|m| &m.backward)))
            .with("backward_over_forward", m.map(BackwardMeasured::ratio))
            .with("forward_flops_per_s", m.map(|m| m.forward_flops_per_s))
            .with("backward_flops_per_s", m.map(|m| m.backward_flops_per_s))
            .with("backward_fraction_of_peak", m.and_then(|m| m.fraction_of_peak))
            .with_all("naive", time_cells(m.and_then(|m| m.naive.as_ref().map(|n| &n.time))))
            .with("naive_bytes", m.and_then(|m| m.naive.as_ref().map(|n| n.bytes)))
            .with("naive_skipped", m.and_then(|m| m.naive_skipped.clone()))
            .with("speedup", m.and_then(BackwardMeasured::speedup))
            .with("checked_against", m.map(|m| m.validation.against))
            .with("max_error", m.map(|m| m.validation.max_error))
    }
}

impl Report for BackwardReport {
    fn table(&self) -> String {
        let mut out = self.provenance.headline() + "\n";
        let naive = if self.naive_baseline { "" } else { "; naive baseline off" };
        writeln!(
            out,
            "median of {} runs after {} warm-up; backward FLOPs = 2.5 x forward{naive}",
            self.runs, self.warmup
        )
        .unwrap();
        if let Some(p) = &self.peak {
            writeln!(out, "peak f32 FMA {} GFLOP/s", sig3(p.fma_f32.rate / 1e9)).unwrap();
        }
        let header = [
            "series",
            "seq",
            "batch",
            "fwd ms",
            "bwd ms",
            "bwd/fwd",
            "fwd GFLOP/s",
            "bwd GFLOP/s",
            "of peak",
            "naive ms",
            "speed-up",
            "naive MiB",
            "checked",
        ];
        let mut rows = vec![header.map(String::from).to_vec()];
        let mut notes = Vec::new();
        for p in &self.points {
            let s = &p.workload.shape;
            let lead = vec![p.series.clone(), seq_label(s.n_q), s.batch.to_string()];
            let row = match &p.outcome {
                Outcome::Measured(m) => {
                    if let Some(why) = &m.naive_skipped {
                        notes.push(format!("{} {}: naive skipped: {why}", p.series, seq_label(s.n_q)));
                    }
                    let naive = m.naive.as_ref();
                    [
                        sig3(m.forward.median_s * 1e3),
                        sig3(m.backward.median_s * 1e3),
                        format!("{:.2}", m.ratio()),
                        sig3(m.forward_flops_per_s / 1e9),
                        sig3(m.backward_flops_per_s / 1e9),
                        m.fraction_of_peak.map_or("-".into(), |f| format!("{:.0}%", f * 100.0)),
                        naive.map_or("-".into(), |n| sig3(n.time.median_s * 1e3)),
                        m.speedup().map_or("-".into(), |x| format!("{}x", sig3(x))),
                        naive.map_or("-".into(), |n| mib(n.bytes)),
                        format!("{:.0e}", m.validation.max_error),
                    ]
                    .to_vec()
                }
                other => vec![format!("{}: {}", other.status(), other.reason().unwrap_or_default())],
            };
            rows.push(lead.into_iter().chain(row).collect());
        }
        out.push('\n');
        out += &aligned(&rows, &[false, true, true, true, true, true, true, true, true, true, true, true, true]);
        for note in notes {
            writeln!(out, "{note}").unwrap();
        }
        out
    }

    fn lead(&self) -> Row {
        self.provenance.row().with("peak_f32_flops_per_s", self.peak.as_ref().map(|p| p.fma_f32.rate))
    }

    fn rows(&self) -> Vec<Row> {
        self.points.iter().map(BackwardPoint::row).collect()
    }

    /// Backward throughput against sequence length, a colour per series; the forward dashed.
    fn chart(&self) -> Chart {
        let mut series: BTreeMap<(String, bool), Vec<(f64, f64)>> = BTreeMap::new();
        for p in &self.points {
            if let Some(m) = p.outcome.measured() {
                let n = p.workload.shape.n_q as f64;
                series.entry((p.series.clone(), false)).or_default().push((n, m.backward_flops_per_s / 1e9));
                series.entry((p.series.clone(), true)).or_default().push((n, m.forward_flops_per_s / 1e9));
            }
        }
        let mut families = Families::default();
        let lines = series
            .into_iter()
            .map(|((family, forward), mut points)| {
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                let name = format!("{family} {}", if forward { "forward" } else { "backward" });
                Line { name, color: families.color(&family), dashed: forward, points }
            })
            .collect();
        Chart {
            title: self.provenance.title("flash backward"),
            x_label: "sequence length (tokens)".into(),
            y_label: "GFLOP/s".into(),
            x_axis: XAxis::Log2,
            lines,
            empty_note: "no point was measured".into(),
        }
    }
}
