//! A block mask on the GPU: one storage buffer the flash kernel reads, uploaded once.

use super::{BlockMask, BlockSize, KvRun};
use crate::attention::{AttentionBuffers, AttentionOptions, AttentionShape, Output, alloc_output};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::flash::{self, FlashConfig};
use crate::tensor::{Tensor, check_binding_size};
use wgpu::util::DeviceExt;

/// The head of the mask buffer. The buffer is this header followed by `words`:
/// `row_starts` (one per mask row, plus the end) from word 0, the runs (3 words each, as
/// [`KvRun`]) from `runs_at`, and the partial blocks' element masks from `bits_at`.
/// Keep in sync with `struct BlockMask` in `shaders/flash_fwd.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockMaskHeader {
    pub batch: u32,
    pub heads: u32,
    pub q_blocks: u32,
    pub runs_at: u32,
    pub bits_at: u32,
}

/// A [`BlockMask`] uploaded to the GPU, with what launches are checked against.
pub struct GpuBlockMask {
    buffer: wgpu::Buffer,
    n_q: usize,
    n_k: usize,
    block: BlockSize,
    batch: usize,
    heads: usize,
}

impl BlockMask {
    /// Uploads the mask into one storage buffer for [`flash::encode_masked`].
    pub fn upload(&self, ctx: &Context) -> Result<GpuBlockMask> {
        let (row_starts, runs, bits) = self.parts();
        let runs_at = row_starts.len();
        let bits_at = runs_at + 3 * runs.len();
        let words = bits_at + bits.len();
        let header = BlockMaskHeader {
            batch: self.batch as u32,
            heads: self.heads as u32,
            q_blocks: self.grid.q_blocks as u32,
            runs_at: u32::try_from(runs_at).map_err(|_| super::too_big("buffer"))?,
            bits_at: u32::try_from(bits_at).map_err(|_| super::too_big("buffer"))?,
        };
        u32::try_from(words).map_err(|_| super::too_big("buffer"))?;
        let mut bytes: Vec<u8> = Vec::with_capacity(size_of::<BlockMaskHeader>() + 4 * words);
        bytes.extend_from_slice(bytemuck::bytes_of(&header));
        bytes.extend_from_slice(bytemuck::cast_slice(row_starts));
        bytes.extend_from_slice(bytemuck::cast_slice::<KvRun, u8>(runs));
        bytes.extend_from_slice(bytemuck::cast_slice(bits));
        check_binding_size(ctx, "block mask", bytes.len() as u64)?;
        let buffer = ctx.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("wattn block mask"),
            contents: &bytes,
            usage: wgpu::BufferUsages::STORAGE,
        });
        Ok(GpuBlockMask {
            buffer,
            n_q: self.n_q(),
            n_k: self.n_k(),
            block: self.block,
            batch: self.batch,
            heads: self.heads,
        })
    }
}

impl GpuBlockMask {
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
    pub fn block_size(&self) -> BlockSize {
        self.block
    }

    /// Errors unless the mask fits the attention problem and the kernel's tiles are its blocks.
    pub fn check(&self, shape: &AttentionShape, config: &FlashConfig) -> Result<()> {
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
}

/// Flash attention restricted to `mask` (dense options such as causal still apply on
/// top), on tensors wattn owns: uploads the mask, records, submits, returns O and LSE.
/// The kernel's tiles are the mask's blocks, with the rest of the adapter's
/// [`FlashConfig`]; a block size the device cannot run is an error. To reuse the mask,
/// upload it once and call [`flash::encode_masked`].
pub fn attention_masked(
    ctx: &Context,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &BlockMask,
    options: &AttentionOptions,
) -> Result<Output> {
    let config = FlashConfig::for_adapter(ctx).with_block_size(mask.block_size());
    let output = alloc_output(ctx, q, k, v)?;
    let gpu_mask = mask.upload(ctx)?;
    let bufs =
        AttentionBuffers { q: q.view(), k: k.view(), v: v.view(), out: output.out.view(), lse: output.lse.view() };
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    flash::encode_masked(ctx, &mut encoder, &bufs, &gpu_mask, options, &config)?;
    ctx.queue().submit([encoder.finish()]);
    Ok(output)
}
