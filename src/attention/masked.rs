//! Attention restricted to a block mask: what the kernels need of the mask data in
//! [`crate::mask`], which itself knows nothing of them.

use super::flash::{self, FlashConfig};
use super::{AttentionBuffers, AttentionOptions, AttentionOutput, AttentionShape, alloc_output};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::mask::{BlockMask, BlockSize, GpuBlockMask, Mask};
use crate::tensor::Tensor;

impl BlockSize {
    /// The tiles of [`FlashConfig::for_adapter`]: what [`attention_masked`] launches
    /// with unless the mask says otherwise.
    pub fn for_adapter(ctx: &Context) -> Self {
        FlashConfig::for_adapter(ctx).block_size()
    }
}

impl Mask {
    /// The dense options' mask (causal, window, sinks) as a predicate.
    pub fn from_options(options: &AttentionOptions) -> Self {
        let (left, right) = options.effective_window();
        if options.sinks > 0 && left >= 0 {
            Self::sinks_window(options.sinks as usize, left, right)
        } else {
            Self::window(left, right)
        }
    }
}

impl GpuBlockMask {
    /// Errors unless the mask fits the attention problem and the kernel's tiles are its blocks.
    pub(crate) fn check(&self, shape: &AttentionShape, config: &FlashConfig) -> Result<()> {
        self.check_shape(shape)?;
        if config.block_size() != self.block {
            return Err(Error::Option(format!(
                "block mask has blocks of {} but the flash tiles are {}: launch with {:?}.with_block_size({:?})",
                self.block,
                config.block_size(),
                config,
                self.block
            )));
        }
        Ok(())
    }

    /// Errors unless the mask is for the attention problem's lengths, batch and heads.
    pub(crate) fn check_shape(&self, shape: &AttentionShape) -> Result<()> {
        if (self.n_q, self.n_k) != (shape.n_q, shape.n_k) {
            return Err(Error::Shape(format!(
                "block mask is for {} queries x {} keys, the inputs have {} x {}",
                self.n_q, self.n_k, shape.n_q, shape.n_k
            )));
        }
        for (what, mask, inputs) in [("batch", self.batch, shape.batch), ("query heads", self.heads, shape.q_heads)] {
            if mask != 1 && mask != inputs {
                return Err(Error::Shape(format!(
                    "block mask has {mask} {what}, the inputs {inputs}: it must have 1 (broadcast) or {inputs}"
                )));
            }
        }
        Ok(())
    }
}

/// Flash attention restricted to `mask` (dense options such as causal still apply on
/// top), on tensors wattn owns: uploads the mask, records, submits, returns O and LSE.
/// The kernel's tiles are the mask's blocks, with the rest of the adapter's
/// [`FlashConfig`]; a block size the device cannot run is an error. To reuse the mask,
/// upload it once ([`BlockMask::upload`]) and pass it to [`flash::encode`].
pub fn attention_masked(
    ctx: &Context,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &BlockMask,
    options: &AttentionOptions,
) -> Result<AttentionOutput> {
    let shape = AttentionShape::from_shapes(q.shape(), k.shape(), v.shape())?;
    let config = FlashConfig::for_adapter(ctx).fitted_to_block(ctx.limits(), &shape, mask.block_size());
    let output = alloc_output(ctx, q, k, v)?;
    let gpu_mask = mask.upload(ctx)?;
    let bufs =
        AttentionBuffers { q: q.view(), k: k.view(), v: v.view(), out: output.out.view(), lse: output.lse.view() };
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    flash::encode(ctx, &mut encoder, &bufs, Some(&gpu_mask), options, &config)?;
    ctx.queue().submit([encoder.finish()]);
    Ok(output)
}
