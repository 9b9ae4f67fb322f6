//! A token-by-token generation loop on a [`KvCache`], timed per step: what `wattn stream`
//! runs. Each step appends one token's K/V to every layer and decodes its query against the
//! layer's cache, then waits for the GPU. The token data is synthetic (a small pool of
//! fixed pseudo-random tokens on the GPU, so no step uploads anything).

use crate::context::Context;
use crate::error::{Error, Result};
use crate::kv::{DecodeBuffers, DecodeOptions, EvictionPolicy, KvCache, KvCacheConfig, PositionMode};
use crate::tensor::{DType, Tensor};
use std::time::Instant;

/// The model shape and cache of a stream.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StreamSpec {
    pub layers: usize,
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    pub policy: EvictionPolicy,
    pub positions: PositionMode,
    pub decode: DecodeOptions,
}

/// One step of a stream.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Stream position of the step's token (0 for the first).
    pub position: u64,
    /// Tokens each (sequence, KV head) of a layer attended to.
    pub cache_len: usize,
    /// Splits of the decode.
    pub splits: u32,
    /// Wall time from recording the step to the GPU finishing it.
    pub seconds: f64,
}

/// Distinct synthetic tokens the stream cycles through.
const TOKEN_POOL: usize = 8;

struct Token {
    k: Tensor,
    v: Tensor,
    q: Tensor,
}

/// A running stream: its cache, its synthetic tokens and its output buffers.
pub struct Stream {
    cache: KvCache,
    tokens: Vec<Token>,
    out: Tensor,
    lse: Tensor,
    decode: DecodeOptions,
}

impl Stream {
    pub fn new(ctx: &Context, spec: &StreamSpec) -> Result<Self> {
        let StreamSpec { layers, batch, q_heads, kv_heads, head_dim, dtype, policy, positions, decode } = *spec;
        let cache = KvCache::new(ctx, KvCacheConfig { layers, batch, kv_heads, head_dim, dtype, policy, positions })?;
        if q_heads == 0 || q_heads % kv_heads != 0 {
            return Err(Error::Heads { what: "the KV cache", got: kv_heads, q_heads });
        }
        let kv_shape = [batch, kv_heads, 1, head_dim];
        let q_shape = [batch, q_heads, 1, head_dim];
        let mut seed = 0u64;
        let mut tensor = |shape: &[usize]| {
            seed += 1;
            let data = synthetic(seed, shape.iter().product());
            Tensor::from_f32(ctx, shape, &data, dtype)
        };
        let tokens = (0..TOKEN_POOL)
            .map(|_| Ok(Token { k: tensor(&kv_shape)?, v: tensor(&kv_shape)?, q: tensor(&q_shape)? }))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cache,
            tokens,
            out: Tensor::zeros(ctx, &q_shape, dtype)?,
            lse: Tensor::zeros(ctx, &q_shape[..3], DType::F32)?,
            decode,
        })
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Tokens streamed so far.
    pub fn position(&self) -> u64 {
        self.cache.seen(0)
    }

    /// Appends the next token to every layer and decodes it; blocks until the GPU is done.
    /// Under policy None this fails with [`Error::CacheFull`] once the cache is full, having
    /// recorded nothing.
    pub fn step(&mut self, ctx: &Context) -> Result<StepReport> {
        let position = self.position();
        let token = &self.tokens[position as usize % TOKEN_POOL];
        let start = Instant::now();
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        let mut splits = 0;
        for layer in 0..self.cache.config().layers {
            self.cache.append(ctx, &mut encoder, layer, &token.k.view(), &token.v.view())?;
            let bufs = DecodeBuffers { q: token.q.view(), out: self.out.view(), lse: self.lse.view() };
            let plan = self.cache.attend(ctx, &mut encoder, layer, &bufs, &self.decode)?;
            splits = plan.splits;
        }
        ctx.submit_and_wait(encoder)?;
        Ok(StepReport { position, cache_len: self.cache.len(0), splits, seconds: start.elapsed().as_secs_f64() })
    }
}

/// `n` values in [-1, 1) from a hash of (seed, index): fixed, varied, and cheap.
fn synthetic(seed: u64, n: usize) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut z = (seed << 32 ^ i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z ^= z >> 29;
            z = z.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}
