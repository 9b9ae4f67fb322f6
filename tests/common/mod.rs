//! Shared by the integration tests: the GPU context, a seeded RNG, and the comparison rule.
#![allow(dead_code)]

use std::ops::Range;
use std::sync::OnceLock;
use wattn::attention::varlen::SeqLens;
use wattn::reference::ReferenceOutput;
use wattn::{AttentionOptions, AttentionShape, Context, DType, Tensor};

/// The adapter every GPU test runs on. No adapter is a failure with instructions, never a skip.
pub fn ctx() -> &'static Context {
    static CTX: OnceLock<Context> = OnceLock::new();
    CTX.get_or_init(open_context)
}

/// A second device on the same adapter, for the other half of a test split in two. llvmpipe
/// compiles a device's pipelines on its one queue thread, so two tests on one device compile
/// one after the other; on two devices they use two cores.
pub fn second_ctx() -> &'static Context {
    static CTX: OnceLock<Context> = OnceLock::new();
    CTX.get_or_init(open_context)
}

fn open_context() -> Context {
    match Context::new() {
        Ok(c) => {
            eprintln!("wattn tests on {}", c.describe());
            c
        }
        Err(e) => panic!(
            "GPU tests need an adapter: {e}\n\
             Install one with `sudo apt-get install -y mesa-vulkan-drivers` or run `bash tools/ensure-adapter.sh`."
        ),
    }
}

/// SplitMix64: small, seeded, reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// Gaussian-ish values (sum of uniforms), like the randn inputs of FlashAttention's tests.
    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| (0..4).map(|_| self.uniform()).sum::<f32>() * 0.866).collect()
    }
}

/// Rounds `x` to what the kernel actually reads in `dtype`.
pub fn quantize(x: &[f32], dtype: DType) -> Vec<f32> {
    x.iter().map(|&v| round_to(v, dtype)).collect()
}

/// Max |a - b| over finite pairs; infinities must match exactly, NaN never passes.
pub fn max_abs_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let mut worst = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g as f64;
        if w.is_infinite() || g.is_infinite() {
            assert!(g == w, "index {i}: got {g}, want {w}");
            continue;
        }
        let e = (g - w).abs();
        assert!(e.is_finite(), "index {i}: got {g}, want {w}");
        worst = worst.max(e);
    }
    worst
}

/// Whether query `i` sees key `j`, written from the option docs independently of
/// `wattn::reference`: `rel` is the key's distance from the query's (bottom-right) diagonal.
fn sees(o: &AttentionOptions, n_q: usize, n_k: usize, i: usize, j: usize) -> bool {
    let rel = j as i64 - (i as i64 + n_k as i64 - n_q as i64);
    let (left, right) = o.window;
    let not_after = !(o.causal && rel > 0) && (right < 0 || rel <= right as i64);
    let not_before = left < 0 || rel >= -(left as i64) || j < o.sinks as usize;
    not_after && not_before
}

/// Rounds one value to `dtype`.
pub fn round_to(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::F16 => half::f16::from_f32(x).to_f32(),
    }
}

/// Attention as an unfused framework path computes it, in f32: scores, a two-pass softmax,
/// P·V. For f16 the probabilities and the output are rounded to f16, as PyTorch's fp16
/// math path does. Shares no code with `wattn::reference` on purpose. Returns O and LSE.
pub fn plain_attention(x: &Inputs, s: &AttentionShape, o: &AttentionOptions, dtype: DType) -> (Vec<f32>, Vec<f32>) {
    plain_attention_masked(x, s, o, dtype, |_, _| true)
}

/// [`plain_attention`] where query `i` also needs `mask(i, j)` to see key `j` (in every
/// batch and head).
pub fn plain_attention_masked(
    x: &Inputs,
    s: &AttentionShape,
    o: &AttentionOptions,
    dtype: DType,
    mask: impl Fn(usize, usize) -> bool,
) -> (Vec<f32>, Vec<f32>) {
    let scale = o.scale.unwrap_or(1.0 / (s.d_qk as f32).sqrt());
    let mut out = vec![0.0f32; s.batch * s.q_heads * s.n_q * s.d_v];
    let mut lse = vec![f32::NEG_INFINITY; s.batch * s.q_heads * s.n_q];
    for bh in 0..s.batch * s.q_heads {
        let (b, h) = (bh / s.q_heads, bh % s.q_heads);
        let kv = b * s.kv_heads + h / (s.q_heads / s.kv_heads);
        for i in 0..s.n_q {
            let row = bh * s.n_q + i;
            let q = &x.q[row * s.d_qk..][..s.d_qk];
            let scores: Vec<Option<f32>> = (0..s.n_k)
                .map(|j| {
                    (sees(o, s.n_q, s.n_k, i, j) && mask(i, j)).then(|| {
                        let k = &x.k[(kv * s.n_k + j) * s.d_qk..][..s.d_qk];
                        let dot = q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                        let x = if o.softcap > 0.0 { o.softcap * (dot / o.softcap).tanh() } else { dot };
                        // Base 2, as the kernels compute: the logit is rounded once more.
                        x * std::f32::consts::LOG2_E
                    })
                })
                .collect();
            let max = scores.iter().flatten().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            if max == f32::NEG_INFINITY {
                continue;
            }
            let sum: f32 = scores.iter().flatten().map(|&x| (x - max).exp2()).sum();
            lse[row] = (max + sum.log2()) * std::f32::consts::LN_2;
            let o_row = &mut out[row * s.d_v..][..s.d_v];
            for (j, score) in scores.iter().enumerate() {
                if let Some(score) = score {
                    let p = round_to((score - max).exp2() / sum, dtype);
                    let v = &x.v[(kv * s.n_k + j) * s.d_v..][..s.d_v];
                    o_row.iter_mut().zip(v).for_each(|(acc, v)| *acc += p * v);
                }
            }
            o_row.iter_mut().for_each(|y| *y = round_to(*y, dtype));
        }
    }
    (out, lse)
}

/// Host inputs of one problem, already rounded to the dtype the GPU reads.
pub struct Inputs {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl Inputs {
    /// Gaussian-ish inputs for `shape`, rounded to `dtype`.
    pub fn random(shape: &AttentionShape, dtype: DType, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut random = |n| quantize(&rng.normal_vec(n), dtype);
        let s = shape;
        Self {
            q: random(s.batch * s.q_heads * s.n_q * s.d_qk),
            k: random(s.batch * s.kv_heads * s.n_k * s.d_qk),
            v: random(s.batch * s.kv_heads * s.n_k * s.d_v),
        }
    }

    /// Q, K, V as GPU tensors of `dtype`.
    pub fn upload(&self, ctx: &Context, s: &AttentionShape, dtype: DType) -> (Tensor, Tensor, Tensor) {
        let tensor = |data: &[f32], dims: [usize; 4]| Tensor::from_f32(ctx, &dims, data, dtype).unwrap();
        (
            tensor(&self.q, s.q_shape()),
            tensor(&self.k, [s.batch, s.kv_heads, s.n_k, s.d_qk]),
            tensor(&self.v, [s.batch, s.kv_heads, s.n_k, s.d_v]),
        )
    }
}

/// Largest errors of one implementation's O and LSE against the reference.
#[derive(Clone, Copy, Debug, Default)]
pub struct Errors {
    pub out: f64,
    pub lse: f64,
}

impl Errors {
    pub fn of(out: &[f32], lse: &[f32], want: &ReferenceOutput) -> Self {
        Self { out: max_abs_err(out, &want.out), lse: max_abs_err(lse, &want.lse) }
    }
    pub fn max(self, other: Self) -> Self {
        Self { out: self.out.max(other.out), lse: self.lse.max(other.lse) }
    }
}

/// A GPU result judged by FlashAttention's rule: its largest error may be at most twice
/// that of [`plain_attention`] in the same precision, plus a floor (like FlashAttention's
/// `fwd_atol`) of one rounding of the largest output, and 1e-5 of the largest finite LSE.
#[derive(Clone, Copy, Debug)]
pub struct Verdict {
    pub got: Errors,
    pub plain: Errors,
    pub bound: Errors,
}

impl Verdict {
    pub fn new(
        got_out: &[f32],
        got_lse: &[f32],
        x: &Inputs,
        s: &AttentionShape,
        o: &AttentionOptions,
        dtype: DType,
    ) -> Self {
        Self::new_masked(got_out, got_lse, x, s, o, dtype, |_, _| true)
    }

    /// [`Self::new`] where query `i` also needs `mask(i, j)` to see key `j`.
    pub fn new_masked(
        got_out: &[f32],
        got_lse: &[f32],
        x: &Inputs,
        s: &AttentionShape,
        o: &AttentionOptions,
        dtype: DType,
        mask: impl Fn(usize, usize) -> bool + Copy,
    ) -> Self {
        let want = wattn::reference::attention_masked(&x.q, &x.k, &x.v, s, o, |_, _, i, j| mask(i, j));
        let (plain_out, plain_lse) = plain_attention_masked(x, s, o, dtype, mask);
        let plain = Errors::of(&plain_out, &plain_lse, &want);
        let largest = |xs: &[f64]| xs.iter().filter(|x| x.is_finite()).fold(1.0f64, |m, x| m.max(x.abs()));
        let eps = match dtype {
            DType::F32 => f32::EPSILON as f64,
            DType::F16 => half::f16::EPSILON.to_f64(),
        };
        let bound = Errors {
            out: 2.0 * plain.out + 0.5 * eps * largest(&want.out),
            lse: 2.0 * plain.lse + 1e-5 * largest(&want.lse),
        };
        Self { got: Errors::of(got_out, got_lse, &want), plain, bound }
    }

    pub fn passes(&self) -> bool {
        self.got.out <= self.bound.out && self.got.lse <= self.bound.lse
    }

    pub fn describe(&self) -> String {
        format!(
            "O err {:.2e} (plain {:.2e}, bound {:.2e})  LSE err {:.2e} (plain {:.2e}, bound {:.2e})",
            self.got.out, self.plain.out, self.bound.out, self.got.lse, self.plain.lse, self.bound.lse
        )
    }
}

/// The adapter [`ctx`] uses, found again by name.
pub fn ctx_adapter() -> wgpu::Adapter {
    let name = &ctx().adapter_info().name;
    wattn::context::enumerate_adapters(&wattn::AdapterSelection::from_env())
        .into_iter()
        .find(|a| &a.get_info().name == name)
        .unwrap_or_else(|| panic!("adapter '{name}' disappeared"))
}

/// A device of its own on the adapter [`ctx`] uses, with exactly `features` and `limits`,
/// for tests that need a device the library did not open.
pub fn own_device(features: wgpu::Features, limits: wgpu::Limits) -> (wgpu::Device, wgpu::Queue) {
    let adapter = ctx_adapter();
    let desc = wgpu::DeviceDescriptor { required_features: features, required_limits: limits, ..Default::default() };
    pollster::block_on(adapter.request_device(&desc)).expect("opening a second device")
}

/// Row `r`'s partial results, as `reference::merge_partials` takes them, from split-KV
/// partials laid out as outputs `[splits, rows, dim]` and LSEs `[splits, rows]`.
pub fn row_partials(
    outs: &[f32],
    lses: &[f32],
    splits: usize,
    rows: usize,
    dim: usize,
    r: usize,
) -> Vec<(Vec<f64>, f64)> {
    (0..splits)
        .map(|s| {
            let i = s * rows + r;
            (outs[i * dim..(i + 1) * dim].iter().map(|&x| x as f64).collect(), lses[i] as f64)
        })
        .collect()
}

/// Rows `rows` of every head of a packed `[1, heads, total, width]` tensor, as `[1, heads, rows, width]`.
pub fn rows_of(data: &[f32], heads: usize, total: usize, rows: &Range<usize>, width: usize) -> Vec<f32> {
    (0..heads).flat_map(|h| &data[(h * total + rows.start) * width..(h * total + rows.end) * width]).copied().collect()
}

/// Sequence `s` of packed inputs alone: its dense shape and inputs.
pub fn sequence(x: &Inputs, p: &AttentionShape, seqlens: &SeqLens, s: usize) -> (AttentionShape, Inputs) {
    let (queries, keys) = (seqlens.queries(s), seqlens.keys(s));
    let shape = AttentionShape { n_q: queries.len(), n_k: keys.len(), ..*p };
    let inputs = Inputs {
        q: rows_of(&x.q, p.q_heads, p.n_q, &queries, p.d_qk),
        k: rows_of(&x.k, p.kv_heads, p.n_k, &keys, p.d_qk),
        v: rows_of(&x.v, p.kv_heads, p.n_k, &keys, p.d_v),
    };
    (shape, inputs)
}

/// The packed shape of `seqlens` with `heads` (Hq, Hkv) and head dims `dims`.
pub fn packed_shape(seqlens: &SeqLens, heads: (usize, usize), dims: (usize, usize)) -> AttentionShape {
    AttentionShape {
        batch: 1,
        q_heads: heads.0,
        kv_heads: heads.1,
        n_q: seqlens.total_q(),
        n_k: seqlens.total_k(),
        d_qk: dims.0,
        d_v: dims.1,
    }
}

/// Sequence lengths (queries, keys) with every awkward case, then `random` more of 1..=100 each.
pub fn varlen_lengths(random: usize, seed: u64) -> (Vec<u32>, Vec<u32>) {
    // 1 x 1; no queries; causal with 40 rows that see nothing; more keys than queries; no keys.
    let mut q = vec![1, 0, 70, 20, 37];
    let mut k = vec![1, 9, 30, 90, 0];
    let mut rng = Rng::new(seed);
    for _ in 0..random {
        q.push(1 + rng.below(100) as u32);
        k.push(1 + rng.below(100) as u32);
    }
    (q, k)
}
