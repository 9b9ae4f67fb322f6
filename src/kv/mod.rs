//! A GPU-resident KV cache for streaming generation, with eviction, and the split-KV decode
//! kernels that attend to it; [`paged`] holds a server's many sequences of mixed lengths in
//! shared page pools (f32, f16 or int8), decoded in one launch per layer.
//!
//! Per layer the cache holds K and V `[B, Hkv, capacity, D]`, the absolute stream position
//! of the token in each slot `[B, Hkv, capacity]` (u32, `u32::MAX` for an empty slot) and,
//! for heavy hitters, each slot's accumulated attention score. Appending (slot choice,
//! eviction, copy) and attending are kernels recorded into the caller's encoder: no step
//! reads anything back. All sequences of the batch advance together (an append adds the
//! same number of tokens to each), so the host knows every length without asking the GPU.
//!
//! ```no_run
//! use wattn::kv::{DecodeOptions, EvictionPolicy, KvCache, KvCacheConfig, PositionMode};
//! use wattn::{Context, DType, Tensor};
//! # fn main() -> wattn::Result<()> {
//! let ctx = Context::new()?;
//! let config = KvCacheConfig {
//!     layers: 1, batch: 1, kv_heads: 8, head_dim: 128, dtype: DType::F32,
//!     policy: EvictionPolicy::Streaming { sinks: 4, window: 1020 },
//!     positions: PositionMode::Absolute,
//! };
//! let mut cache = KvCache::new(&ctx, config)?;
//! let token = vec![0.1f32; 8 * 128];
//! let k = Tensor::from_f32(&ctx, &[1, 8, 1, 128], &token, DType::F32)?; // [B, Hkv, T, D]
//! let v = Tensor::from_f32(&ctx, &[1, 8, 1, 128], &token, DType::F32)?;
//! let q = Tensor::from_f32(&ctx, &[1, 32, 1, 128], &vec![0.1; 32 * 128], DType::F32)?;
//! let mut encoder = ctx.device().create_command_encoder(&Default::default());
//! cache.append(&ctx, &mut encoder, 0, &k.view(), &v.view())?;
//! ctx.queue().submit([encoder.finish()]);
//! let out = cache.decode(&ctx, 0, &q, &DecodeOptions::default())?; // O [1, 32, 1, 128] and LSE
//! # Ok(()) }
//! ```

pub mod cache;
pub mod combine;
pub mod decode;
pub mod paged;

pub use cache::{KvCache, LayerBuffers};
pub use decode::{DecodeBuffers, DecodeOptions, DecodePlan};
pub use paged::{KvStorage, PagedKvCache, PagedLayout, PagedStep, SequenceId};

use crate::error::{Error, Result};
use crate::shader::ShaderKey;

/// Which tokens a full cache keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvictionPolicy {
    /// Keep every token up to `capacity`; appending beyond it is an [`Error::CacheFull`].
    None {
        /// Slots per (sequence, KV head).
        capacity: usize,
    },
    /// StreamingLLM: the first `sinks` tokens stay, plus the `window` most recent ones in a
    /// ring buffer (eviction is O(1), nothing moves). Capacity `sinks + window`.
    Streaming {
        /// Tokens kept from the start of the stream.
        sinks: usize,
        /// Most recent tokens kept; at least 1.
        window: usize,
    },
    /// H2O: when the cache is full, each KV head evicts its token with the lowest accumulated
    /// attention (summed over the group's query heads and over steps), never one of the
    /// first `sinks` tokens nor of the `recent` most recent ones.
    HeavyHitters {
        /// Tokens kept from the start of the stream.
        sinks: usize,
        /// Most recent tokens never evicted; at least 1.
        recent: usize,
        /// Slots per (sequence, KV head); at least `sinks + recent`.
        capacity: usize,
    },
}

impl EvictionPolicy {
    /// Slots per (sequence, KV head).
    pub fn capacity(&self) -> usize {
        match *self {
            EvictionPolicy::None { capacity } | EvictionPolicy::HeavyHitters { capacity, .. } => capacity,
            EvictionPolicy::Streaming { sinks, window } => sinks + window,
        }
    }

    /// The first tokens that are never evicted.
    pub fn sinks(&self) -> usize {
        match *self {
            EvictionPolicy::None { .. } => 0,
            EvictionPolicy::Streaming { sinks, .. } | EvictionPolicy::HeavyHitters { sinks, .. } => sinks,
        }
    }

    /// The most recent tokens that are always kept; `None` for policy None (all are kept).
    pub fn recent(&self) -> Option<usize> {
        match *self {
            EvictionPolicy::None { .. } => None,
            EvictionPolicy::Streaming { window, .. } => Some(window),
            EvictionPolicy::HeavyHitters { recent, .. } => Some(recent),
        }
    }

    /// `"none"`, `"streaming"` or `"h2o"`, for reports and labels.
    pub fn name(&self) -> &'static str {
        match self {
            EvictionPolicy::None { .. } => "none",
            EvictionPolicy::Streaming { .. } => "streaming",
            EvictionPolicy::HeavyHitters { .. } => "h2o",
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::Option(format!("eviction policy {self:?}: {why}")));
        match *self {
            EvictionPolicy::None { capacity: 0 } => bad("capacity must be at least 1".into()),
            EvictionPolicy::Streaming { window: 0, .. } => bad("window must be at least 1".into()),
            EvictionPolicy::HeavyHitters { sinks, recent, capacity } if recent == 0 || capacity < sinks + recent => {
                bad(format!("needs recent >= 1 and capacity >= sinks + recent = {}", sinks + recent))
            }
            _ => Ok(()),
        }
    }
}

/// Rotary embedding (RoPE): the pairs of a head vector rotated by `position * base^(-2i/D)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    /// The base of the frequencies (10000 in the original, 500000 in Llama 3).
    pub base: f64,
    /// Which columns are rotated together.
    pub layout: RopeLayout,
}

/// Which columns RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// GPT-NeoX / Llama (Hugging Face): column i with column i + D/2.
    NeoX,
    /// GPT-J / Llama (Meta): column 2i with column 2i + 1.
    Interleaved,
}

/// How keys and queries carry their positions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PositionMode {
    /// The caller applies RoPE (if any) at absolute positions before appending and attending.
    Absolute,
    /// StreamingLLM's re-indexing: keys and queries are given before RoPE and rotated inside
    /// the attention kernel at their index within the cache (sinks first, then the window
    /// oldest to newest), so positions never exceed the capacity however long the stream.
    /// Needs a contiguous window: not available with heavy hitters.
    Reindexed(Rope),
}

/// Shape, storage and policies of a [`KvCache`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvCacheConfig {
    /// Layers, each with its own K, V and positions, indexed `0..layers` by every call.
    pub layers: usize,
    /// Sequences B, which advance together.
    pub batch: usize,
    /// KV heads Hkv; decode's query heads must be a multiple of them.
    pub kv_heads: usize,
    /// Head dim of K and V.
    pub head_dim: usize,
    /// Storage of K and V (and of the queries and outputs of decode).
    pub dtype: crate::dtype::DType,
    /// Which tokens a full cache keeps; it sets the capacity.
    pub policy: EvictionPolicy,
    /// Whether the caller or the kernel applies RoPE.
    pub positions: PositionMode,
}

/// Checks `positions` against the cache it would describe.
pub(crate) fn validate_positions(positions: PositionMode, policy: EvictionPolicy, head_dim: usize) -> Result<()> {
    if let PositionMode::Reindexed(rope) = positions {
        if matches!(policy, EvictionPolicy::HeavyHitters { .. }) {
            return Err(Error::Option(
                "re-indexed positions need a contiguous window; with heavy hitters use absolute positions".into(),
            ));
        }
        if !head_dim.is_multiple_of(2) {
            return Err(Error::Option(format!("RoPE needs an even head dim, got {head_dim}")));
        }
        if !(rope.base.is_finite() && rope.base > 1.0) {
            return Err(Error::Option(format!("RoPE base {} must be finite and > 1", rope.base)));
        }
    }
    Ok(())
}

/// Every shader variant the KV cache and decode paths build, for validation.
pub fn validation_keys() -> Vec<ShaderKey> {
    let mut keys = cache::shader_keys();
    keys.extend(combine::shader_keys());
    keys.extend(decode::validation_keys());
    keys
}
