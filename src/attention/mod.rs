//! Attention: options and shape checks shared by every path, the flash kernel, the tuned
//! configurations it runs with, varlen (packed sequences), the backward, and the naive
//! baseline.

pub mod backward;
pub mod flash;
mod masked;
pub mod naive;
pub mod tuning;
pub mod varlen;

pub use masked::attention_masked;
pub use varlen::{SeqLens, attention_varlen, attention_varlen_with};

use crate::context::Context;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{Tensor, TensorView, byte_size, check_binding_size, check_u32_indexing};

/// Largest head dim (of Q/K and of V) the kernels take.
pub const MAX_HEAD_DIM: usize = 256;

/// What to compute, with FlashAttention's conventions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionOptions {
    /// Softmax scale; `None` means 1/sqrt(Dqk).
    pub scale: Option<f32>,
    /// Causal mask aligned bottom-right: query i sees key j iff j <= i + Nk - Nq.
    pub causal: bool,
    /// Sliding window `(left, right)` as FlashAttention's `window_size`: query i sees keys
    /// i + Nk - Nq - left ..= i + Nk - Nq + right; -1 means unbounded on that side.
    /// Causal is the same as `right = 0`.
    pub window: (i32, i32),
    /// The first `sinks` keys stay visible beside the window (StreamingLLM): they are
    /// exempt from the window's left bound, not from its right bound or causality.
    pub sinks: u32,
    /// Logit softcap: scores become `softcap * tanh(scores / softcap)`; 0 means none.
    pub softcap: f32,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        Self { scale: None, causal: false, window: (-1, -1), sinks: 0, softcap: 0.0 }
    }
}

impl AttentionOptions {
    /// Causal attention with every other option at its default.
    pub fn causal() -> Self {
        Self { causal: true, ..Self::default() }
    }

    /// The window with causality folded in: `(left, right)`, -1 = unbounded.
    pub fn effective_window(&self) -> (i32, i32) {
        let (left, right) = self.window;
        let right = if self.causal { if right < 0 { 0 } else { right.min(0) } } else { right };
        (left, right)
    }

    /// The softmax scale for Q/K head dim `d_qk`: [`Self::scale`], or 1/sqrt(`d_qk`).
    pub fn scale_for(&self, d_qk: usize) -> f32 {
        self.scale.unwrap_or(1.0 / (d_qk as f32).sqrt())
    }

    /// The settings that differ from plain attention, each with a leading space
    /// (" causal window 128,0 sinks 4"), or "" for none: for summaries and labels.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        if self.causal {
            s += " causal";
        }
        if self.window != (-1, -1) {
            s += &format!(" window {},{}", self.window.0, self.window.1);
        }
        if self.sinks > 0 {
            s += &format!(" sinks {}", self.sinks);
        }
        if self.softcap > 0.0 {
            s += &format!(" softcap {}", self.softcap);
        }
        if let Some(scale) = self.scale {
            s += &format!(" scale {scale}");
        }
        s
    }

    /// [`Error::Option`] for a window side below -1, a non-finite scale, or a softcap that is
    /// negative or not finite.
    pub fn validate(&self) -> Result<()> {
        let (l, r) = self.window;
        if l < -1 || r < -1 {
            return Err(Error::Option(format!("window ({l}, {r}): each side must be >= 0, or -1 for unbounded")));
        }
        if let Some(s) = self.scale {
            if !s.is_finite() {
                return Err(Error::Option(format!("scale {s} is not finite")));
            }
        }
        if !(self.softcap.is_finite() && self.softcap >= 0.0) {
            return Err(Error::Option(format!("softcap {} must be finite and >= 0 (0 = none)", self.softcap)));
        }
        Ok(())
    }
}

/// The sizes of one attention problem, checked for consistency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// B, shared by Q, K and V.
    pub batch: usize,
    /// Hq, a multiple of `kv_heads`.
    pub q_heads: usize,
    /// Hkv (of K and V).
    pub kv_heads: usize,
    /// Nq, the query length.
    pub n_q: usize,
    /// Nk, the key length (of K and V).
    pub n_k: usize,
    /// Dqk, the head dim of Q and K.
    pub d_qk: usize,
    /// Dv, the head dim of V and O.
    pub d_v: usize,
}

impl AttentionShape {
    /// Checks Q `[B, Hq, Nq, D]`, K `[B, Hkv, Nk, D]`, V `[B, Hkv, Nk, Dv]`.
    pub fn from_shapes(q: &[usize], k: &[usize], v: &[usize]) -> Result<Self> {
        for (what, s) in [("Q", q), ("K", k), ("V", v)] {
            if s.len() != 4 {
                return Err(Error::Rank { what, expected: "4 [B, H, N, D]".into(), got: s.to_vec() });
            }
            if s.contains(&0) {
                return Err(Error::Empty { what, shape: s.to_vec() });
            }
        }
        if k[0] != q[0] || v[0] != q[0] {
            return Err(Error::Shape(format!("batch sizes differ: Q {}, K {}, V {}", q[0], k[0], v[0])));
        }
        if v[1] != k[1] || v[2] != k[2] {
            return Err(Error::Shape(format!("V {v:?} must have the heads and length of K {k:?}")));
        }
        if k[3] != q[3] {
            return Err(Error::Shape(format!("Q head dim {} differs from K head dim {}", q[3], k[3])));
        }
        if !q[1].is_multiple_of(k[1]) {
            return Err(Error::Heads { what: "K", got: k[1], q_heads: q[1] });
        }
        for (what, d) in [("Q/K", q[3]), ("V", v[3])] {
            if d > MAX_HEAD_DIM {
                return Err(Error::HeadDim { what, got: d, max: MAX_HEAD_DIM });
            }
        }
        Ok(Self { batch: q[0], q_heads: q[1], kv_heads: k[1], n_q: q[2], n_k: k[2], d_qk: q[3], d_v: v[3] })
    }

    /// Q's shape, `[B, Hq, Nq, Dqk]`.
    pub fn q_shape(&self) -> [usize; 4] {
        [self.batch, self.q_heads, self.n_q, self.d_qk]
    }
    /// O's shape, `[B, Hq, Nq, Dv]`.
    pub fn out_shape(&self) -> [usize; 4] {
        [self.batch, self.q_heads, self.n_q, self.d_v]
    }
    /// LSE's shape, `[B, Hq, Nq]`.
    pub fn lse_shape(&self) -> [usize; 3] {
        [self.batch, self.q_heads, self.n_q]
    }
}

/// The buffers of one attention call: inputs Q, K, V and outputs O (Q's dtype) and LSE (f32).
#[derive(Clone, Copy, Debug)]
pub struct AttentionBuffers<'a> {
    /// Queries, `[B, Hq, Nq, Dqk]`.
    pub q: TensorView<'a>,
    /// Keys, `[B, Hkv, Nk, Dqk]`.
    pub k: TensorView<'a>,
    /// Values, `[B, Hkv, Nk, Dv]`.
    pub v: TensorView<'a>,
    /// Output O, `[B, Hq, Nq, Dv]`, written by the kernel.
    pub out: TensorView<'a>,
    /// Log-sum-exp (natural log), `[B, Hq, Nq]` f32, written by the kernel.
    pub lse: TensorView<'a>,
}

impl AttentionBuffers<'_> {
    /// Checks shapes, dtypes and sizes against each other and the adapter. That each buffer
    /// holds its view's shape is a [`TensorView`] invariant, checked where the view was made.
    pub fn validate(&self, ctx: &Context) -> Result<AttentionShape> {
        let shape = AttentionShape::from_shapes(self.q.shape(), self.k.shape(), self.v.shape())?;
        let dtype = self.q.dtype();
        for (what, t) in [("K", &self.k), ("V", &self.v), ("O", &self.out)] {
            if t.dtype() != dtype {
                return Err(Error::DType(format!("{what} is {} but Q is {dtype}", t.dtype())));
            }
        }
        if self.lse.dtype() != DType::F32 {
            return Err(Error::DType(format!("LSE must be f32, got {}", self.lse.dtype())));
        }
        if self.out.shape() != shape.out_shape() {
            return Err(Error::Shape(format!("O has shape {:?}, expected {:?}", self.out.shape(), shape.out_shape())));
        }
        if self.lse.shape() != shape.lse_shape() {
            return Err(Error::Shape(format!(
                "LSE has shape {:?}, expected {:?}",
                self.lse.shape(),
                shape.lse_shape()
            )));
        }
        if dtype == DType::F16 {
            ctx.require_f16()?;
        }
        for (what, t) in [("Q", &self.q), ("K", &self.k), ("V", &self.v), ("O", &self.out)] {
            check_u32_indexing(what, t.numel() as u64)?;
            check_binding_size(ctx, what, byte_size(t.numel(), t.dtype()))?;
        }
        Ok(shape)
    }
}

/// The result of [`attention`]: O `[B, Hq, Nq, Dv]` in Q's dtype, LSE `[B, Hq, Nq]` f32
/// (natural log; -inf for rows that see no key).
pub struct AttentionOutput {
    /// O, `[B, Hq, Nq, Dv]` in Q's dtype.
    pub out: Tensor,
    /// LSE, `[B, Hq, Nq]` f32.
    pub lse: Tensor,
}

/// Allocates O and LSE for inputs of `shape`.
pub(crate) fn alloc_output(ctx: &Context, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<AttentionOutput> {
    let shape = AttentionShape::from_shapes(q.shape(), k.shape(), v.shape())?;
    Ok(AttentionOutput {
        out: Tensor::zeros(ctx, &shape.out_shape(), q.dtype())?,
        lse: Tensor::zeros(ctx, &shape.lse_shape(), DType::F32)?,
    })
}

/// Flash attention on tensors wattn owns: records, submits, and returns O and LSE.
/// Uses the [`flash::FlashConfig`] chosen for this adapter and shape
/// ([`flash::FlashConfig::for_shape`]: tuned where `wattn tune` saved one, else the preset).
pub fn attention(
    ctx: &Context,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    options: &AttentionOptions,
) -> Result<AttentionOutput> {
    let shape = AttentionShape::from_shapes(q.shape(), k.shape(), v.shape())?;
    let (config, _) = flash::FlashConfig::for_shape(ctx, &shape, q.dtype(), options.causal);
    attention_with(ctx, q, k, v, options, &config)
}

/// [`attention`] with an explicit tile configuration.
pub fn attention_with(
    ctx: &Context,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    options: &AttentionOptions,
    config: &flash::FlashConfig,
) -> Result<AttentionOutput> {
    let output = alloc_output(ctx, q, k, v)?;
    let bufs =
        AttentionBuffers { q: q.view(), k: k.view(), v: v.view(), out: output.out.view(), lse: output.lse.view() };
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    flash::encode(ctx, &mut encoder, &bufs, None, options, config)?;
    ctx.queue().submit([encoder.finish()]);
    Ok(output)
}
