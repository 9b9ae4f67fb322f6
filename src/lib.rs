#![warn(missing_docs)]
//! # wattn: FlashAttention-class attention kernels in WGSL, on every GPU wgpu reaches
//!
//! ```no_run
//! use wattn::{AttentionOptions, Context, DType, Tensor};
//! # fn main() -> wattn::Result<()> {
//! let ctx = Context::new()?;
//! let (b, h, n, d) = (1, 8, 1024, 64);
//! let data = vec![0.1f32; b * h * n * d];
//! let q = Tensor::from_f32(&ctx, &[b, h, n, d], &data, DType::F32)?;
//! let k = Tensor::from_f32(&ctx, &[b, h, n, d], &data, DType::F32)?;
//! let v = Tensor::from_f32(&ctx, &[b, h, n, d], &data, DType::F32)?;
//! let result = wattn::attention(&ctx, &q, &k, &v, &AttentionOptions::causal())?;
//! let out: Vec<f32> = result.out.to_f32(&ctx)?; // [b, h, n, d]
//! let lse: Vec<f32> = result.lse.to_f32(&ctx)?; // [b, h, n], natural log
//! # Ok(()) }
//! ```
//!
//! Engines with their own device use [`Context::from_wgpu`] and record into their own
//! encoder with [`flash::encode`] on their own buffers ([`TensorView`]).

pub mod attention;
#[cfg(feature = "cli")]
pub mod bench;
#[cfg(feature = "cli")]
pub mod cli;
pub mod context;
mod dispatch;
pub mod dtype;
pub mod error;
pub mod kv;
pub mod mask;
mod pipeline;
pub mod reference;
mod shader;
pub mod tensor;
pub mod timing;
pub mod tune;

pub use wgpu;

/// The shader variants (every kernel, dtype, tile preset and head-dim bucket the crate
/// builds), for wattn's own shader tests and `wattn shaders`: not part of the API.
#[doc(hidden)]
pub mod internals {
    pub use crate::shader::{ConstValue, Kernel, ShaderKey, every_variant};
}

pub use attention::backward::{self, GradientBuffers, Gradients, attention_backward, attention_varlen_backward};
pub use attention::flash::{self, FlashConfig, KvReads};
pub use attention::naive;
pub use attention::tuning::{ConfigSource, TuneCache, TuneKey, TunedEntry};
pub use attention::{
    AttentionBuffers, AttentionOptions, AttentionOutput, AttentionShape, SeqLens, attention, attention_masked,
    attention_varlen, attention_varlen_with, attention_with,
};
pub use context::{AdapterSelection, Capabilities, Context};
pub use dtype::DType;
pub use error::{Error, Result};
pub use kv::{DecodeOptions, EvictionPolicy, KvCache, KvCacheConfig, PositionMode, Rope, RopeLayout};
pub use mask::{BlockMask, BlockSize, GpuBlockMask, Mask};
pub use tensor::{Tensor, TensorView};

/// The README's examples, compiled and run as doctests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;
