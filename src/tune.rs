//! The tuner: for one problem, every candidate flash configuration runs once on seeded
//! random inputs and is checked against the f64 reference by FlashAttention's rule; those
//! that pass are timed and the fastest wins. [`TuneResult::entry`] is what the tuning cache
//! ([`crate::attention::tuning`]) keeps, and what [`FlashConfig::for_shape`] then runs;
//! `wattn tune` does both over a few buckets.
//!
//! ```no_run
//! use wattn::tune::{TuneRequest, tune};
//! use wattn::{Context, DType, TuneCache};
//! # fn main() -> wattn::Result<()> {
//! let ctx = Context::new()?;
//! let request = TuneRequest { seq: 2048, heads: 16, d_qk: 128, d_v: 128, dtype: DType::F16, causal: true, runs: 5 };
//! let result = tune(&ctx, &request)?;
//! if let (Some(entry), Some(mut cache)) = (result.entry(), TuneCache::load_default()) {
//!     cache.insert(entry);
//!     cache.save()?;
//! }
//! # Ok(()) }
//! ```

use crate::attention::tuning::{TuneKey, TunedEntry};
use crate::attention::{AttentionBuffers, AttentionOptions, AttentionShape, flash};
use crate::context::Context;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::flash::{FlashConfig, KvReads};
use crate::reference;
use crate::tensor::Tensor;
use crate::timing::{Clock, Stats, Timer};

/// One problem to tune for: self-attention over `seq` tokens, batch 1, `heads` query heads
/// and as many K/V heads. The winner is kept for the head-dim bucket, dtype and causality;
/// `seq` and `heads` only size the work, so choose them to fill the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TuneRequest {
    /// Nq = Nk.
    pub seq: usize,
    /// Hq = Hkv.
    pub heads: usize,
    /// Dqk, the head dim of Q and K.
    pub d_qk: usize,
    /// Dv, the head dim of V and O.
    pub d_v: usize,
    /// The storage dtype.
    pub dtype: DType,
    /// Causal (bottom-right) mask, or none.
    pub causal: bool,
    /// Timed runs per candidate, after one untimed run; the median decides.
    pub runs: usize,
}

impl TuneRequest {
    /// The problem's sizes, checked.
    pub fn shape(&self) -> Result<AttentionShape> {
        let qk = [1, self.heads, self.seq, self.d_qk];
        AttentionShape::from_shapes(&qk, &qk, &[1, self.heads, self.seq, self.d_v])
    }

    /// The options: causal or not, every other at its default.
    pub fn options(&self) -> AttentionOptions {
        AttentionOptions { causal: self.causal, ..Default::default() }
    }

    /// Attention FLOPs, 2 per multiply-add of Q·Kᵀ and P·V over the pairs counted, with
    /// FlashAttention's convention of half the pairs when causal.
    pub fn flops(&self) -> f64 {
        let pairs = (self.seq * self.seq) as f64 * if self.causal { 0.5 } else { 1.0 };
        2.0 * self.heads as f64 * pairs * (self.d_qk + self.d_v) as f64
    }
}

/// A candidate's output against the reference on the checked rows, by FlashAttention's rule:
/// its largest error may be at most twice that of a plain f32 implementation (scores, a
/// two-pass softmax, probabilities and output rounded to the dtype) plus a floor of half a
/// rounding of the largest output, and 1e-5 of the largest LSE.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Accuracy {
    /// Largest |O - reference|.
    pub out_error: f64,
    /// What `out_error` may reach.
    pub out_bound: f64,
    /// Largest |LSE - reference|.
    pub lse_error: f64,
    /// What `lse_error` may reach.
    pub lse_bound: f64,
}

impl Accuracy {
    /// Whether both errors are within their bounds (NaN never is).
    pub fn passes(&self) -> bool {
        self.out_error <= self.out_bound && self.lse_error <= self.lse_bound
    }
}

/// What became of one candidate.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// It passed the check and was timed.
    Timed {
        /// How close its output came.
        accuracy: Accuracy,
        /// Seconds per run.
        time: Stats,
    },
    /// Its output failed the check: it is left out.
    Inaccurate(Accuracy),
    /// It did not run (the device refused its pipeline, a GPU error): it is left out.
    Failed(String),
}

/// One configuration tried.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// The configuration.
    pub config: FlashConfig,
    /// Its check and time, or why it has none.
    pub outcome: Outcome,
}

impl Candidate {
    /// The median seconds of a timed candidate.
    pub fn median_s(&self) -> Option<f64> {
        match &self.outcome {
            Outcome::Timed { time, .. } => Some(time.median_s),
            _ => None,
        }
    }
}

/// Every candidate of one request, in the order tried, and the winner.
#[derive(Clone, Debug)]
pub struct TuneResult {
    /// What was tuned.
    pub request: TuneRequest,
    /// Where the winner belongs in the cache.
    pub key: TuneKey,
    /// How the candidates were timed.
    pub clock: Clock,
    /// Every candidate tried.
    pub candidates: Vec<Candidate>,
    /// The index in `candidates` of the fastest one that passed the check; `None` when none did.
    pub best: Option<usize>,
}

impl TuneResult {
    /// The fastest candidate that passed the check.
    pub fn best(&self) -> Option<&Candidate> {
        self.best.map(|i| &self.candidates[i])
    }

    /// The winner as an entry of the tuning cache.
    pub fn entry(&self) -> Option<TunedEntry> {
        let best = self.best()?;
        Some(TunedEntry {
            key: self.key.clone(),
            config: best.config,
            seq: self.request.seq,
            median_ms: best.median_s()? * 1e3,
        })
    }
}

/// Tries every candidate configuration ([`FlashConfig::candidates`]) on `request`: one
/// checked run each, then `runs` timed runs of those that pass (GPU timestamps where the
/// device has them, else the wall clock around submit-and-wait). A candidate that fails is
/// reported in the result, not as an error; the error is for a request that cannot run at all.
pub fn tune(ctx: &Context, request: &TuneRequest) -> Result<TuneResult> {
    if request.runs == 0 {
        return Err(Error::Option("tuning needs at least one timed run per candidate".into()));
    }
    let shape = request.shape()?;
    if request.dtype == DType::F16 {
        ctx.require_f16()?;
    }
    // Subgroup presets for other subgroup sizes than this device's are not candidates here.
    let mut candidates = FlashConfig::candidates(ctx.limits(), &shape, request.dtype);
    candidates.retain(|config| config.check_subgroups(ctx).is_ok());
    if candidates.is_empty() {
        return Err(Error::Option(format!(
            "no flash configuration fits head dims {}/{} within the device's limits",
            shape.d_qk, shape.d_v
        )));
    }
    let inputs = Inputs::random(&shape, request.dtype);
    let (q, k, v) = inputs.upload(ctx, &shape, request.dtype)?;
    let check = Check::new(&inputs, &shape, &request.options(), request.dtype);
    let timer = Timer::new(ctx);
    let candidates: Vec<Candidate> = candidates
        .into_iter()
        .map(|config| {
            let outcome = try_candidate(ctx, &timer, request, &shape, [&q, &k, &v], &check, &config)
                .unwrap_or_else(|e| Outcome::Failed(e.to_string()));
            Candidate { config, outcome }
        })
        .collect();
    let best = candidates
        .iter()
        .enumerate()
        .filter_map(|(i, c)| Some((i, c.median_s()?)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i);
    Ok(TuneResult {
        request: *request,
        key: TuneKey::new(ctx, shape.d_qk, shape.d_v, request.dtype, request.causal),
        clock: timer.clock(),
        candidates,
        best,
    })
}

/// One candidate: a checked run into outputs filled with NaN (so rows it does not write
/// fail), then the timed runs.
fn try_candidate(
    ctx: &Context,
    timer: &Timer,
    request: &TuneRequest,
    shape: &AttentionShape,
    [q, k, v]: [&Tensor; 3],
    check: &Check,
    config: &FlashConfig,
) -> Result<Outcome> {
    let out =
        Tensor::from_f32(ctx, &shape.out_shape(), &vec![f32::NAN; shape.out_shape().iter().product()], q.dtype())?;
    let lse =
        Tensor::from_f32(ctx, &shape.lse_shape(), &vec![f32::NAN; shape.lse_shape().iter().product()], DType::F32)?;
    let bufs = AttentionBuffers { q: q.view(), k: k.view(), v: v.view(), out: out.view(), lse: lse.view() };
    let options = request.options();
    let mut work = |encoder: &mut wgpu::CommandEncoder| flash::encode(ctx, encoder, &bufs, None, &options, config);
    ctx.catching_gpu_errors(|| timer.time(ctx, &mut work))?;
    let accuracy = check.judge(&out.to_f32(ctx)?, &lse.to_f32(ctx)?, shape);
    if !accuracy.passes() {
        return Ok(Outcome::Inaccurate(accuracy));
    }
    // The checked run built the pipeline and warmed the device: no other warm-up.
    let time = ctx.catching_gpu_errors(|| timer.measure(ctx, 0, request.runs, &mut work))?;
    Ok(Outcome::Timed { accuracy, time })
}

// The configurations the tuner tries: this names FlashConfig's fields, so keep it in step
// with them.
impl FlashConfig {
    /// The configurations [`tune`] tries for `shape`'s head-dim bucket: the presets (fitted
    /// to the shape) and a handful of tile sizes, rows per thread, head-dim splits and both
    /// ways of reading K/V around them, each once, those that [`FlashConfig::check`] admits on
    /// `limits`. (The kernel computes in f32 whatever the storage, so the dtype does not change
    /// the list.)
    pub fn candidates(limits: &wgpu::Limits, shape: &AttentionShape, _dtype: DType) -> Vec<FlashConfig> {
        // Head dims split over threads with K/V staged: the variants llvmpipe compiles in
        // seconds (and the CPU preset among the presets: whole rows up to 64 columns).
        let around = [(64, 4, 4, 4), (32, 8, 4, 4), (32, 4, 4, 2), (16, 4, 4, 4), (32, 4, 8, 4), (64, 16, 4, 4)].map(
            |(block_q, block_k, rows_per_thread, threads_per_row)| Self {
                block_q,
                block_k,
                rows_per_thread,
                threads_per_row,
                kv_reads: KvReads::Workgroup,
            },
        );
        let presets = Self::PRESETS.map(|(_, preset)| preset.fitted(limits, shape));
        let mut configs: Vec<FlashConfig> = Vec::new();
        for config in presets.into_iter().chain(around) {
            if !configs.contains(&config) && config.check(limits, shape).is_ok() {
                configs.push(config);
            }
        }
        configs
    }
}

/// Query rows per checked head compared with the reference, spread over the sequence from
/// the first to the last: every query block of a long sequence is not needed to catch a
/// wrong configuration, and the reference pays for every key of every row.
const CHECK_ROWS: usize = 64;

/// Seeded random inputs of a self-attention problem (K has Q's shape), rounded to the dtype
/// the GPU stores.
struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Inputs {
    /// Roughly standard normal values (a sum of four uniforms), like the randn inputs of
    /// FlashAttention's tests, from SplitMix64.
    fn random(shape: &AttentionShape, dtype: DType) -> Self {
        let mut state = 0x5eed_u64;
        let mut uniform = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let mut values = |n: usize| -> Vec<f32> {
            (0..n).map(|_| round_to((0..4).map(|_| uniform()).sum::<f32>() * 0.866, dtype)).collect()
        };
        let rows = shape.batch * shape.q_heads * shape.n_q;
        Self { q: values(rows * shape.d_qk), k: values(rows * shape.d_qk), v: values(rows * shape.d_v) }
    }

    fn upload(&self, ctx: &Context, shape: &AttentionShape, dtype: DType) -> Result<(Tensor, Tensor, Tensor)> {
        let v_shape = [shape.batch, shape.kv_heads, shape.n_k, shape.d_v];
        Ok((
            Tensor::from_f32(ctx, &shape.q_shape(), &self.q, dtype)?,
            Tensor::from_f32(ctx, &shape.q_shape(), &self.k, dtype)?,
            Tensor::from_f32(ctx, &v_shape, &self.v, dtype)?,
        ))
    }
}

fn round_to(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::F16 => half::f16::from_f32(x).to_f32(),
    }
}

/// The reference's O and LSE on the checked rows, and the bounds a candidate's errors
/// there must stay within: computed once per request, judged per candidate.
struct Check {
    /// (head, row) of each checked row, in the order of `want_out` and `want_lse`.
    rows: Vec<(usize, usize)>,
    want_out: Vec<f64>,
    want_lse: Vec<f64>,
    out_bound: f64,
    lse_bound: f64,
}

impl Check {
    /// [`CHECK_ROWS`] rows of the first and of the last head (heads are alike; the last
    /// catches indexing past the first).
    fn new(x: &Inputs, shape: &AttentionShape, options: &AttentionOptions, dtype: DType) -> Self {
        let (n, d_qk, d_v) = (shape.n_q, shape.d_qk, shape.d_v);
        let count = n.min(CHECK_ROWS);
        let spread: Vec<usize> =
            (0..count).map(|k| if count == 1 { n - 1 } else { k * (n - 1) / (count - 1) }).collect();
        let mut heads = vec![0, shape.q_heads - 1];
        heads.dedup();
        let sub = AttentionShape { batch: 1, q_heads: 1, kv_heads: 1, n_q: count, ..*shape };
        let unmasked = AttentionOptions { causal: false, ..*options };
        let (mut want_out, mut want_lse, mut plain_out, mut plain_lse) = (vec![], vec![], vec![], vec![]);
        for &h in &heads {
            let q: Vec<f32> =
                spread.iter().flat_map(|&i| &x.q[(h * n + i) * d_qk..(h * n + i + 1) * d_qk]).copied().collect();
            let k = &x.k[h * n * d_qk..(h + 1) * n * d_qk];
            let v = &x.v[h * n * d_v..(h + 1) * n * d_v];
            // The sampled rows as a problem of their own, each keeping its row's mask.
            let visible = |_: usize, _: usize, r: usize, j: usize| reference::visible(options, n, n, spread[r], j);
            let want = reference::attention_masked(&q, k, v, &sub, &unmasked, visible);
            want_out.extend(want.out);
            want_lse.extend(want.lse);
            for (r, &i) in spread.iter().enumerate() {
                let (out, lse) = plain_row(&q[r * d_qk..(r + 1) * d_qk], k, v, shape, options, i, dtype);
                plain_out.extend(out);
                plain_lse.push(lse);
            }
        }
        let largest = |xs: &[f64]| xs.iter().filter(|x| x.is_finite()).fold(1.0f64, |m, x| m.max(x.abs()));
        let eps = match dtype {
            DType::F32 => f32::EPSILON as f64,
            DType::F16 => half::f16::EPSILON.to_f64(),
        };
        let out_bound = 2.0 * max_error(&plain_out, &want_out) + 0.5 * eps * largest(&want_out);
        let lse_bound = 2.0 * max_error(&plain_lse, &want_lse) + 1e-5 * largest(&want_lse);
        let rows = heads.iter().flat_map(|&h| spread.iter().map(move |&i| (h, i))).collect();
        Self { rows, want_out, want_lse, out_bound, lse_bound }
    }

    /// A candidate's O and LSE (of the whole problem) on the checked rows.
    fn judge(&self, out: &[f32], lse: &[f32], shape: &AttentionShape) -> Accuracy {
        let (n, d_v) = (shape.n_q, shape.d_v);
        let got_out: Vec<f32> =
            self.rows.iter().flat_map(|&(h, i)| &out[(h * n + i) * d_v..(h * n + i + 1) * d_v]).copied().collect();
        let got_lse: Vec<f32> = self.rows.iter().map(|&(h, i)| lse[h * n + i]).collect();
        Accuracy {
            out_error: max_error(&got_out, &self.want_out),
            out_bound: self.out_bound,
            lse_error: max_error(&got_lse, &self.want_lse),
            lse_bound: self.lse_bound,
        }
    }
}

/// Largest |got - want|; infinities must agree exactly, and NaN or a lone infinity is an
/// infinite error.
fn max_error(got: &[f32], want: &[f64]) -> f64 {
    got.iter().zip(want).fold(0.0, |worst: f64, (&g, &w)| {
        let g = g as f64;
        let err = if g == w {
            0.0
        } else if g.is_finite() && w.is_finite() {
            (g - w).abs()
        } else {
            f64::INFINITY
        };
        worst.max(err)
    })
}

/// Row `i` of one head as an unfused f32 implementation computes it (FlashAttention's
/// "PyTorch in the same precision"): scores, a two-pass softmax, the probabilities and the
/// output rounded to `dtype`. Returns O's row and the LSE.
fn plain_row(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: &AttentionShape,
    options: &AttentionOptions,
    i: usize,
    dtype: DType,
) -> (Vec<f32>, f32) {
    let (n, d_qk, d_v) = (shape.n_k, shape.d_qk, shape.d_v);
    let scale = options.scale_for(d_qk);
    let scores: Vec<Option<f32>> = (0..n)
        .map(|j| {
            reference::visible(options, shape.n_q, n, i, j)
                .then(|| q.iter().zip(&k[j * d_qk..(j + 1) * d_qk]).map(|(a, b)| a * b).sum::<f32>() * scale)
        })
        .collect();
    let max = scores.iter().flatten().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut out = vec![0.0f32; d_v];
    if max == f32::NEG_INFINITY {
        return (out, f32::NEG_INFINITY);
    }
    let sum: f32 = scores.iter().flatten().map(|&s| (s - max).exp()).sum();
    for (j, score) in scores.iter().enumerate() {
        if let Some(score) = score {
            let p = round_to((score - max).exp() / sum, dtype);
            out.iter_mut().zip(&v[j * d_v..(j + 1) * d_v]).for_each(|(o, &x)| *o += p * x);
        }
    }
    out.iter_mut().for_each(|o| *o = round_to(*o, dtype));
    (out, max + sum.ln())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_distinct_admitted_and_start_with_the_presets() {
        for (storage, least) in [(16 << 10, 1), (32 << 10, 3), (48 << 10, 4)] {
            let limits = wgpu::Limits { max_compute_workgroup_storage_size: storage, ..wgpu::Limits::default() };
            for (d_qk, d_v) in [(64, 64), (128, 128), (256, 256), (192, 128)] {
                let shape = AttentionShape { batch: 1, q_heads: 1, kv_heads: 1, n_q: 1, n_k: 1, d_qk, d_v };
                let configs = FlashConfig::candidates(&limits, &shape, DType::F32);
                assert!(configs.len() >= least, "{storage} B d{d_qk}/{d_v}: {configs:?}");
                assert_eq!(configs[0], FlashConfig::PORTABLE, "the portable preset fits 16 KiB at every head dim");
                for (i, c) in configs.iter().enumerate() {
                    assert!(c.check(&limits, &shape).is_ok() && !configs[..i].contains(c), "{c}");
                }
            }
        }
    }

    #[test]
    fn the_check_passes_the_reference_itself_and_fails_a_wrong_or_missing_output() {
        let shape = AttentionShape { batch: 1, q_heads: 3, kv_heads: 3, n_q: 100, n_k: 100, d_qk: 24, d_v: 40 };
        for (dtype, causal) in [(DType::F32, false), (DType::F16, true)] {
            let options = AttentionOptions { causal, ..Default::default() };
            let x = Inputs::random(&shape, dtype);
            let check = Check::new(&x, &shape, &options, dtype);
            assert_eq!(check.rows.len(), 2 * 64);
            assert!(check.out_bound > 0.0 && check.lse_bound > 0.0);
            let want = reference::attention(&x.q, &x.k, &x.v, &shape, &options);
            let mut out: Vec<f32> = want.out.iter().map(|&o| o as f32).collect();
            let lse: Vec<f32> = want.lse.iter().map(|&l| l as f32).collect();
            assert!(check.judge(&out, &lse, &shape).passes(), "{:?}", check.judge(&out, &lse, &shape));
            // The last row of the last head, off by a hundredth.
            let last = out.len() - 1;
            out[last] += 0.01;
            assert!(!check.judge(&out, &lse, &shape).passes());
            out[last] = f32::NAN;
            assert!(!check.judge(&out, &lse, &shape).passes());
        }
    }

    #[test]
    fn causal_flops_count_half_the_pairs() {
        let dense = TuneRequest { seq: 1024, heads: 2, d_qk: 64, d_v: 64, dtype: DType::F32, causal: false, runs: 1 };
        assert_eq!(dense.flops(), 2.0 * 2.0 * 1024.0 * 1024.0 * 128.0);
        assert_eq!(TuneRequest { causal: true, ..dense }.flops(), dense.flops() / 2.0);
    }
}
