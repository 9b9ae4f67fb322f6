//! A block mask on the GPU: one storage buffer the flash kernel reads, uploaded once.

use super::{BlockMask, BlockSize, KvRun};
use crate::context::Context;
use crate::error::Result;
use crate::tensor::check_binding_size;
use wgpu::util::DeviceExt;

/// The head of the mask buffer. The buffer is this header followed by `words`:
/// `row_starts` (one per mask row, plus the end) from word 0, the runs (3 words each, as
/// [`KvRun`]) from `runs_at`, and the partial blocks' element masks from `bits_at`.
/// Keep in sync with `struct BlockMask` in `shaders/flash_fwd.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockMaskHeader {
    /// Distinct masks along the batch axis (1 = broadcast).
    pub batch: u32,
    /// Distinct masks along the head axis (1 = broadcast).
    pub heads: u32,
    /// Query blocks per mask.
    pub q_blocks: u32,
    /// Word offset of the first run, counted from the end of the header.
    pub runs_at: u32,
    /// Word offset of the first element mask, counted from the end of the header.
    pub bits_at: u32,
}

/// A [`BlockMask`] uploaded to the GPU, with what launches are checked against.
pub struct GpuBlockMask {
    buffer: wgpu::Buffer,
    pub(crate) n_q: usize,
    pub(crate) n_k: usize,
    pub(crate) block: BlockSize,
    pub(crate) batch: usize,
    pub(crate) heads: usize,
}

impl BlockMask {
    /// Uploads the mask into one storage buffer, for [`crate::flash::encode`].
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
    /// The storage buffer: a [`BlockMaskHeader`] and the words it indexes.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
    /// The block size the mask was built for: the flash tiles of launches that use it.
    pub fn block_size(&self) -> BlockSize {
        self.block
    }
}
