//! The flash-attention backward (`shaders/flash_bwd.wgsl`): dQ, dK and dV from the inputs,
//! the forward's O and LSE, and dO, with every option and block mask the forward takes.
//!
//! Three dispatches per call (more on adapters with a loop cap): the per-row statistics
//! (base-2 LSE and D = rowsum(dO * O)), the dK/dV pass over key blocks, which reduces GQA's
//! query heads in a fixed order, and the dQ pass over query blocks. No float atomics: the
//! same inputs give bit-identical gradients. Varlen batches (`encode_varlen`) run the same
//! kernels' varlen variants over every sequence in one launch per pass.

use super::flash::{FIRST_PASS, FlashParams, HEAD_DIM_GRANULE, LAST_PASS, Layout, check_whole_words};
use super::varlen::SeqLens;
use super::{AttentionBuffers, AttentionOptions, AttentionShape};
use crate::context::Context;
use crate::dispatch::{bind_buffers, check_grid, uniform_buffer, wrapped_grid};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::mask::{BlockMask, BlockSize, GpuBlockMask};
use crate::shader::{ConstValue, Kernel, ShaderKey};
use crate::tensor::{Tensor, TensorView, byte_size, check_binding_size, check_u32_indexing};

/// The range of work one dispatch of the dK/dV or dQ pass covers, as `struct PassRange` in
/// `flash_bwd.wgsl` (keep in sync; a test compares the layouts).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct PassRange {
    /// dQ pass: the first key, a multiple of the key tile. dK/dV pass: the first (query head
    /// of the group, query block) pair, numbered head-major.
    pub begin: u32,
    /// End (exclusive) of the range.
    pub end: u32,
    /// [`FIRST_PASS`] | [`LAST_PASS`].
    pub flags: u32,
    /// Varlen: where the pass's table of sequence blocks starts in the state buffer, in
    /// 32-bit words; dense: 0.
    pub table_at: u32,
}

/// The buffers of one backward call: the forward's inputs and results, dO, and the
/// gradients the kernels write (each in Q's dtype, in the layout of its input).
#[derive(Clone, Copy, Debug)]
pub struct GradientBuffers<'a> {
    /// Q, K, V and the forward's O and LSE (natural log), as [`crate::flash::encode`] took and wrote them.
    pub forward: AttentionBuffers<'a>,
    /// dO, the loss's gradient with respect to O: O's shape and dtype.
    pub d_out: TensorView<'a>,
    /// dQ, `[B, Hq, Nq, Dqk]`, written.
    pub dq: TensorView<'a>,
    /// dK, `[B, Hkv, Nk, Dqk]`, written.
    pub dk: TensorView<'a>,
    /// dV, `[B, Hkv, Nk, Dv]`, written.
    pub dv: TensorView<'a>,
}

impl GradientBuffers<'_> {
    /// Checks the forward's buffers as [`AttentionBuffers::validate`] does, and dO and the
    /// gradients against them.
    pub fn validate(&self, ctx: &Context) -> Result<AttentionShape> {
        let shape = self.forward.validate(ctx)?;
        let dtype = self.forward.q.dtype();
        let kv = [shape.batch, shape.kv_heads, shape.n_k];
        let expected = [
            ("dO", &self.d_out, shape.out_shape()),
            ("dQ", &self.dq, shape.q_shape()),
            ("dK", &self.dk, [kv[0], kv[1], kv[2], shape.d_qk]),
            ("dV", &self.dv, [kv[0], kv[1], kv[2], shape.d_v]),
        ];
        for (what, view, dims) in expected {
            if view.shape() != dims {
                return Err(Error::Shape(format!("{what} has shape {:?}, expected {dims:?}", view.shape())));
            }
            if view.dtype() != dtype {
                return Err(Error::DType(format!("{what} is {} but Q is {dtype}", view.dtype())));
            }
            check_u32_indexing(what, view.numel() as u64)?;
            check_binding_size(ctx, what, byte_size(view.numel(), dtype))?;
        }
        // The kernels read Q, K, V and dO in whole vec4 words.
        let f = &self.forward;
        for (what, view) in [("Q", &f.q), ("K", &f.k), ("V", &f.v), ("dO", &self.d_out)] {
            check_whole_words(what, view)?;
        }
        Ok(shape)
    }
}

/// dQ, dK and dV, each in Q's dtype and in the layout of its input.
pub struct Gradients {
    /// dQ, `[B, Hq, Nq, Dqk]`.
    pub dq: Tensor,
    /// dK, `[B, Hkv, Nk, Dqk]`.
    pub dk: Tensor,
    /// dV, `[B, Hkv, Nk, Dv]`.
    pub dv: Tensor,
}

/// The backward on tensors wattn owns: records, submits, and returns the gradients of a
/// loss whose gradient with respect to O is `d_out`. `out` and `lse` are the forward's
/// results for the same inputs, options and mask ([`crate::attention`] or
/// [`crate::attention_masked`]).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    ctx: &Context,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    d_out: &Tensor,
    options: &AttentionOptions,
    mask: Option<&BlockMask>,
) -> Result<Gradients> {
    let gpu_mask = mask.map(|m| m.upload(ctx)).transpose()?;
    let forward = [q, k, v, out, lse];
    run_on_tensors(ctx, forward, d_out, |encoder, bufs| encode(ctx, encoder, bufs, gpu_mask.as_ref(), options))
}

/// Allocates the gradients of the forward `[q, k, v, out, lse]` (zeros, in Q's dtype), has
/// `record` record a backward that writes them, submits it, and returns them: the tensor form
/// of every backward's `encode`.
pub(crate) fn run_on_tensors(
    ctx: &Context,
    [q, k, v, out, lse]: [&Tensor; 5],
    d_out: &Tensor,
    record: impl FnOnce(&mut wgpu::CommandEncoder, &GradientBuffers<'_>) -> Result<()>,
) -> Result<Gradients> {
    let shape = AttentionShape::from_shapes(q.shape(), k.shape(), v.shape())?;
    let dtype = q.dtype();
    let gradients = Gradients {
        dq: Tensor::zeros(ctx, &shape.q_shape(), dtype)?,
        dk: Tensor::zeros(ctx, k.shape(), dtype)?,
        dv: Tensor::zeros(ctx, v.shape(), dtype)?,
    };
    let bufs = GradientBuffers {
        forward: AttentionBuffers { q: q.view(), k: k.view(), v: v.view(), out: out.view(), lse: lse.view() },
        d_out: d_out.view(),
        dq: gradients.dq.view(),
        dk: gradients.dk.view(),
        dv: gradients.dv.view(),
    };
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    record(&mut encoder, &bufs)?;
    ctx.queue().submit([encoder.finish()]);
    Ok(gradients)
}

/// The tiles of the backward kernels: the query and key blocks (a block mask's, when there
/// is one) and how each main pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tiles {
    block: BlockSize,
    /// The dK/dV pass and the dQ pass.
    passes: [PassTiles; 2],
}

/// How one main pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PassTiles {
    /// Register tiles (`dkdv_pass`, `dq_pass`): `split` threads (`SPLIT`) share each group of
    /// four rows, each over a slice of at most [`TILED_DIM`] head-dim columns, and `shuffle`
    /// (`SHUFFLE_ROWS`): the workgroup is one subgroup, which hands the other side's rows out
    /// by shuffles (and sums a split's partial products).
    Tiled { split: u32, shuffle: bool },
    /// One row per thread (`dkdv_wide`, `dq_wide`): head dims above [`TILED_DIM`] where the
    /// workgroup is not one subgroup.
    Wide,
}

/// The widest slice of a head dim one thread's register tiles hold: llvmpipe takes minutes to
/// compile wider ones.
const TILED_DIM: u32 = 64;
/// Threads of one register-tiled dK/dV workgroup (`KEY_THREADS` in the shader): groups of
/// four keys, each group `split` threads.
const KEY_THREADS: u32 = 8;
/// Keys of one `dkdv_wide` workgroup, one per thread, where the key block divides it.
const WIDE_KEYS: u32 = 64;

impl Tiles {
    /// Query blocks of 32 rows, key tiles of 16: the granularity at which the dense options'
    /// bounds skip work.
    const DENSE: BlockSize = BlockSize::new(32, 16);

    /// Tiles of `block` for head dims `dims` (padded) on a device that has `subgroups` of
    /// `subgroup_sizes` (min, max) threads.
    fn new(
        block: BlockSize,
        dims: (u32, u32),
        limits: &wgpu::Limits,
        subgroups: bool,
        subgroup_sizes: (u32, u32),
    ) -> Result<Self> {
        if block.q == 0 || block.k == 0 {
            return Err(Error::Option(format!("backward tiles {block}: both sides must be at least 1")));
        }
        let split = Self::split(dims);
        let one_subgroup = |threads: u32| subgroups && subgroup_sizes == (threads, threads);
        let pass = |threads: u32| match (split, one_subgroup(threads)) {
            (1, shuffle) => PassTiles::Tiled { split, shuffle },
            (_, true) => PassTiles::Tiled { split, shuffle: true },
            (_, false) => PassTiles::Wide,
        };
        let tiles = Self { block, passes: [pass(KEY_THREADS), pass(block.q.div_ceil(4) * split)] };
        let allowed = limits.max_compute_invocations_per_workgroup.min(limits.max_compute_workgroup_size_x);
        let threads = tiles.threads();
        for (what, t) in [("key block", threads[0]), ("query block", threads[1])] {
            if t > allowed {
                return Err(Error::Limit {
                    what: format!("backward workgroup of one {what} ({block})"),
                    needed: t as u64,
                    allowed: allowed as u64,
                    limit: "max_compute_invocations_per_workgroup",
                });
            }
        }
        Ok(tiles)
    }

    /// The tiles of the dense options: [`Self::DENSE`], its query blocks cut to a split's
    /// share of 8 threads where that keeps the dQ pass's workgroup one subgroup of 8.
    fn dense(dims: (u32, u32), limits: &wgpu::Limits, subgroups: bool, subgroup_sizes: (u32, u32)) -> Result<Self> {
        let split = Self::split(dims);
        let rows = match subgroups && subgroup_sizes == (KEY_THREADS, KEY_THREADS) {
            true => Self::DENSE.q / split,
            false => Self::DENSE.q,
        };
        Self::new(BlockSize::new(rows, Self::DENSE.k), dims, limits, subgroups, subgroup_sizes)
    }

    /// Threads per group of four rows in the tiled passes: 1 up to [`TILED_DIM`] columns, 2
    /// up to twice that, 4 above.
    fn split(dims: (u32, u32)) -> u32 {
        dims.0.max(dims.1).div_ceil(TILED_DIM).next_power_of_two()
    }

    /// The tiles `ctx` runs for `shape` with the blocks of `mask`, or the dense ones.
    fn for_context(mask: Option<BlockSize>, shape: &AttentionShape, ctx: &Context) -> Result<Self> {
        let info = ctx.adapter_info();
        let sizes = (info.subgroup_min_size, info.subgroup_max_size);
        let (dims, limits, subgroups) = (padded_dims(shape), ctx.limits(), ctx.capabilities().subgroups);
        match mask {
            Some(block) => Self::new(block, dims, limits, subgroups, sizes),
            None => Self::dense(dims, limits, subgroups, sizes),
        }
    }

    /// The entry points of the dK/dV pass and of the dQ pass.
    fn entry_points(&self) -> [&'static str; 2] {
        match self.passes {
            [PassTiles::Wide, PassTiles::Wide] => ["dkdv_wide", "dq_wide"],
            [PassTiles::Wide, _] => ["dkdv_wide", "dq_pass"],
            [_, PassTiles::Wide] => ["dkdv_pass", "dq_wide"],
            _ => ["dkdv_pass", "dq_pass"],
        }
    }

    /// Keys per `dkdv_wide` workgroup (`WIDE_KEYS_WG`): a multiple of the key block.
    fn wide_keys(&self) -> u32 {
        if WIDE_KEYS.is_multiple_of(self.block.k) { WIDE_KEYS } else { self.block.k }
    }

    /// Keys per dK/dV workgroup.
    fn keys_per_workgroup(&self) -> u32 {
        match self.passes[0] {
            PassTiles::Tiled { split, .. } => 4 * KEY_THREADS / split,
            PassTiles::Wide => self.wide_keys(),
        }
    }

    /// Threads per workgroup of the dK/dV pass and of the dQ pass.
    fn threads(&self) -> [u32; 2] {
        let dkdv = match self.passes[0] {
            PassTiles::Tiled { .. } => KEY_THREADS,
            PassTiles::Wide => self.wide_keys(),
        };
        let dq = match self.passes[1] {
            PassTiles::Tiled { split, .. } => self.block.q.div_ceil(4) * split,
            PassTiles::Wide => self.block.q,
        };
        [dkdv, dq]
    }
}

/// The head dims rounded up to the kernels' granule, (Dqk, Dv).
fn padded_dims(shape: &AttentionShape) -> (u32, u32) {
    let pad = |d: usize| (d as u32).next_multiple_of(HEAD_DIM_GRANULE);
    (pad(shape.d_qk), pad(shape.d_v))
}

/// One pipeline of the backward: an entry point of `flash_bwd.wgsl` for a dtype, head dims
/// and tiles.
fn variant_key(
    entry_point: &'static str,
    dtype: DType,
    shape: &AttentionShape,
    tiles: &Tiles,
    layout: Layout,
) -> ShaderKey {
    let (dqk_pad, dv_pad) = padded_dims(shape);
    let aligned = shape.d_qk.is_multiple_of(4) && shape.d_v.is_multiple_of(4);
    let pass = match entry_point {
        "dkdv_pass" => tiles.passes[0],
        "dq_pass" => tiles.passes[1],
        _ => PassTiles::Wide,
    };
    let (split, shuffle) = match pass {
        PassTiles::Tiled { split, shuffle } => (split, shuffle),
        PassTiles::Wide => (1, false),
    };
    ShaderKey {
        kernel: Kernel::FlashBackward,
        entry_point,
        dtype,
        constants: vec![
            ("BLOCK_Q", ConstValue::U32(tiles.block.q)),
            ("BLOCK_K", ConstValue::U32(tiles.block.k)),
            ("WIDE_KEYS_WG", ConstValue::U32(tiles.wide_keys())),
            ("DQK_PAD", ConstValue::U32(dqk_pad)),
            ("DV_PAD", ConstValue::U32(dv_pad)),
            ("ALIGNED", ConstValue::Bool(aligned)),
            ("SPLIT", ConstValue::U32(split)),
            ("SHUFFLE_ROWS", ConstValue::Bool(shuffle)),
            ("BLOCK_SPARSE", ConstValue::Bool(layout.block_sparse)),
            ("VARLEN", ConstValue::Bool(layout.varlen)),
        ],
    }
}

/// Threads of the preprocess workgroups (`ROW_WG` in the shader).
const ROW_WORKGROUP: u64 = 64;

/// How the two main passes split their work on an adapter that stops loops after
/// `loop_limit` iterations per invocation: (key tiles per dQ dispatch, (head, query block)
/// pairs per dK/dV dispatch), or `None` for no limit. The counts bound the iterations of
/// the shader's loops, assuming the compiler unrolls none, every pair is visible and every
/// product takes the NaN-safe path: keep them in sync with flash_bwd.wgsl.
fn tiles_per_pass(shape: &AttentionShape, tiles: &Tiles, loop_limit: Option<u32>) -> Option<(u32, u32)> {
    let loop_limit = loop_limit?;
    let (dqk_pad, dv_pad) = padded_dims(shape);
    let budget = (loop_limit as f64 * 0.9) as u32;
    let fit = |per_pass: u32, per_tile: u32| (budget.saturating_sub(per_pass) / per_tile).max(1);
    // Iterations per dispatch, and per key tile (dQ) or per (head, query block) pair (dK/dV).
    let [dkdv, dq] = [0, 1].map(|pass| match tiles.passes[pass] {
        PassTiles::Wide => {
            let (qk4, dv4) = (dqk_pad / 4, dv_pad / 4);
            // Loading the rows and the state, storing the state or the result, two binary
            // searches; per pair a row of the other side word by word, twice for Q or K.
            let per_pass = 3 * (qk4 + dv4) + 4 * (qk4 + dv4) + 64;
            let per_pair = 1 + 2 * qk4 + 2 * dv4;
            match pass {
                0 => (per_pass, 1 + 64 + tiles.block.q * per_pair),
                _ => (per_pass, 1 + tiles.block.k * per_pair),
            }
        }
        PassTiles::Tiled { split, .. } => {
            // A thread's slice of a row.
            let (qk4, dv4) = (dqk_pad / 4 / split, dv_pad / 4 / split);
            // Loading the rows and the state, storing the state or the result, the binary
            // searches.
            let per_pass = 4 * (1 + 2 * (qk4 + dv4)) + 4 * (1 + 5 * (qk4 + dv4)) + 64;
            // Loading four rows of the other side (and a split's flags); one 4 x 4 block: the
            // masks (4), the weights and dS (4 each), S and the products with dO or V (a 4-row
            // read each), the accumulations (a read and add_nonzero_products' 4 + 20 each),
            // a split's sums of S and dP.
            let per_rows = 4 * (1 + qk4 + dv4 + split);
            let per_block = 1 + 12 + qk4 * 5 + dv4 * 5 + (qk4 + dv4) * 25 + qk4 * 5 + 2 * split;
            match pass {
                0 => {
                    // Chunks of 4 query rows per group of keys (`CHUNK`), four at a time.
                    let chunk = 4 * (KEY_THREADS / split);
                    let chunks = tiles.block.q.div_ceil(chunk);
                    (per_pass, 1 + 4 * 32 + 32 + chunks * (1 + per_rows + chunk / 4 * per_block))
                }
                _ => {
                    let groups = tiles.block.k.div_ceil(4);
                    let keys_per_lane = (4 * groups).div_ceil(tiles.block.q.div_ceil(4));
                    (per_pass, 1 + keys_per_lane * per_rows / 4 + groups * per_block)
                }
            }
        }
    });
    Some((fit(dq.0, dq.1), fit(dkdv.0, dkdv.1)))
}

/// Records the backward into `encoder` on the caller's buffers; nothing is submitted or
/// read back. `options` (and `mask`, uploaded with [`BlockMask::upload`]) must be those of
/// the forward that wrote `bufs.forward`'s O and LSE. The kernels take any block size. A
/// scratch buffer is made per call: 8 bytes per query row, plus, on adapters with a loop cap
/// where a pass is split, f32 accumulators of dK and dV (or dQ) for the next dispatch.
pub fn encode(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    bufs: &GradientBuffers<'_>,
    mask: Option<&GpuBlockMask>,
    options: &AttentionOptions,
) -> Result<()> {
    record(ctx, encoder, bufs, mask, options, None)
}

/// [`encode`] for sequences packed along the sequence axis as [`crate::attention::varlen`]
/// packs them: `bufs` in the packed layouts (batch 1), `mask` (batch axis the sequence, the
/// longest sequence's lengths) and `options` those of the forward, `varlen::encode`, that
/// wrote O and LSE. Each sequence's gradients are those of its own attention; keys no query
/// sees get zeros. Two small tables of the sequences' blocks go to the GPU with the scratch
/// buffer.
pub fn encode_varlen(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    bufs: &GradientBuffers<'_>,
    seqlens: &SeqLens,
    mask: Option<&GpuBlockMask>,
    options: &AttentionOptions,
) -> Result<()> {
    record(ctx, encoder, bufs, mask, options, Some(seqlens))
}

/// The varlen backward on tensors wattn owns, as [`attention_backward`]: the gradients of the
/// packed Q, K and V (each in its layout), from the forward's O and LSE
/// ([`crate::attention::varlen::attention_varlen`] with the same lengths and options) and dO.
#[allow(clippy::too_many_arguments)]
pub fn attention_varlen_backward(
    ctx: &Context,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    d_out: &Tensor,
    seqlens: &SeqLens,
    options: &AttentionOptions,
) -> Result<Gradients> {
    let forward = [q, k, v, out, lse];
    run_on_tensors(ctx, forward, d_out, |encoder, bufs| encode_varlen(ctx, encoder, bufs, seqlens, None, options))
}

/// [`encode`], or with `seqlens` [`encode_varlen`].
fn record(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    bufs: &GradientBuffers<'_>,
    mask: Option<&GpuBlockMask>,
    options: &AttentionOptions,
    seqlens: Option<&SeqLens>,
) -> Result<()> {
    options.validate()?;
    let shape = bufs.validate(ctx)?;
    if let Some(seqlens) = seqlens {
        seqlens.check(&shape)?;
    }
    if let Some(mask) = mask {
        mask.check_shape(&seqlens.map_or(shape, |s| s.mask_shape(&shape)))?;
    }
    let tiles = Tiles::for_context(mask.map(GpuBlockMask::block_size), &shape, ctx)?;
    let limits = ctx.limits();
    // The longest sequence's lengths (dense: the problem's).
    let (n_q, n_k) = seqlens.map_or((shape.n_q, shape.n_k), |s| (s.max_q(), s.max_k()));
    let q_blocks = (n_q as u32).div_ceil(tiles.block.q);
    // Varlen: each pass's table of sequence blocks, which its grid's x counts (wrapped into z).
    let tables = seqlens.map(|s| [s.key_blocks(tiles.keys_per_workgroup()), s.query_blocks(tiles.block.q)]);
    let [dkdv_grid, dq_grid] = match &tables {
        Some(tables) => {
            let heads = [shape.kv_heads as u32, shape.q_heads as u32];
            let mut grids = [[0; 3]; 2];
            for (pass, what) in ["key blocks", "query blocks"].into_iter().enumerate() {
                let blocks = tables[pass].len() as u64;
                let [x, z] = wrapped_grid(limits, &format!("varlen backward grid: {blocks} {what}"), blocks)?;
                grids[pass] = [x, heads[pass], z];
            }
            grids
        }
        None => {
            let key_groups = (shape.n_k as u32).div_ceil(tiles.keys_per_workgroup());
            [
                [key_groups, shape.kv_heads as u32, shape.batch as u32],
                [q_blocks, shape.q_heads as u32, shape.batch as u32],
            ]
        }
    };
    for grid in [dkdv_grid, dq_grid] {
        for (what, g) in ["blocks", "heads", "batch"].iter().zip(grid) {
            check_grid(limits, &format!("backward grid: {g} {what}"), g)?;
        }
    }
    let query_rows = (shape.batch * shape.q_heads * shape.n_q) as u64;
    let key_rows = (shape.batch * shape.kv_heads * shape.n_k) as u64;
    let dqk_pad = (shape.d_qk as u32).next_multiple_of(HEAD_DIM_GRANULE) as u64;
    let dv_pad = (shape.d_v as u32).next_multiple_of(HEAD_DIM_GRANULE) as u64;

    // Passes per main pass (at least one, which writes the gradients), each over keys of
    // every sequence (dQ) or (query head of the group, query block) pairs (dK/dV).
    let (dq_tiles, dkdv_tiles) =
        tiles_per_pass(&shape, &tiles, ctx.loop_iteration_limit()).unwrap_or((u32::MAX, u32::MAX));
    let dq_keys = dq_tiles.saturating_mul(tiles.block.k);
    let dq_passes = (n_k as u32).div_ceil(dq_keys).max(1);
    let dkdv_pairs = (shape.q_heads / shape.kv_heads) as u32 * q_blocks;
    let dkdv_passes = dkdv_pairs.div_ceil(dkdv_tiles).max(1);

    // `state`, u32 words: the row statistics, then (only when a pass is split) the
    // accumulators one pass carries to the next (the dK/dV pass's, then in the same words the
    // dQ pass's), then the varlen tables, each its length and six words per block.
    let accumulators = match (dkdv_passes > 1, dq_passes > 1) {
        (false, false) => 0,
        (dkdv, dq) => (dkdv as u64 * key_rows * (dqk_pad + dv_pad)).max(dq as u64 * query_rows * dqk_pad),
    };
    let mut words: Vec<u32> = Vec::new();
    let mut table_at = [0u32; 2];
    if let Some(tables) = &tables {
        let tables_at = 2 * query_rows + accumulators;
        for (pass, table) in tables.iter().enumerate() {
            table_at[pass] = u32::try_from(tables_at + words.len() as u64).unwrap_or(u32::MAX);
            words.push(table.len() as u32);
            words.extend_from_slice(bytemuck::cast_slice(table));
        }
    }
    let total = 2 * query_rows + accumulators + words.len() as u64;
    let what = "backward state (row statistics, pass accumulators and varlen tables)";
    check_u32_indexing(what, total)?;
    check_binding_size(ctx, what, 4 * total)?;
    let state = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("wattn backward state"),
        size: 4 * total,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: !words.is_empty(),
    });
    if !words.is_empty() {
        let start = 4 * (total - words.len() as u64);
        let mut tail = state.slice(start..).get_mapped_range_mut().map_err(|e| Error::Gpu(e.to_string()))?;
        tail.copy_from_slice(bytemuck::cast_slice(&words));
        drop(tail);
        state.unmap();
    }
    // The dense variants never read the mask binding, but their layouts still have it.
    let mask_buffer = mask.map_or_else(|| ctx.unused_binding(1), |m| m.buffer());

    let params = uniform_buffer(ctx, &FlashParams::new(&shape, options));
    let dtype = bufs.forward.q.dtype();
    let layout = Layout { block_sparse: mask.is_some(), varlen: seqlens.is_some() };
    let mut dispatch = |entry_point: &'static str,
                        range: Option<PassRange>,
                        buffers: &[(&str, &wgpu::Buffer)],
                        grid: [u32; 3]|
     -> Result<()> {
        // The preprocess (no range) does not depend on the tiles: one variant serves every call.
        let key = match range {
            Some(_) => variant_key(entry_point, dtype, &shape, &tiles, layout),
            None => {
                let dense = Tiles::dense(padded_dims(&shape), limits, false, (0, 0))?;
                variant_key(entry_point, dtype, &shape, &dense, Layout::default())
            }
        };
        let pipeline = ctx.pipelines.get(ctx.device(), &key)?;
        let range = range.map(|r| uniform_buffer(ctx, &r));
        let mut entries = vec![("params", &params)];
        entries.extend(range.as_ref().map(|r| ("range", r)));
        entries.extend_from_slice(buffers);
        let bind_group = bind_buffers(ctx.device(), &pipeline, Kernel::FlashBackward, &entries)?;
        // One compute pass per dispatch, so each sees what the previous one wrote.
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("wattn flash backward"),
            timestamp_writes: None,
        });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
        Ok(())
    };
    let range = |p: u32, per_pass: u32, total: u32, passes: u32, table_at: u32| PassRange {
        begin: p * per_pass,
        end: ((p + 1) as u64 * per_pass as u64).min(total as u64) as u32,
        flags: if p == 0 { FIRST_PASS } else { 0 } | if p + 1 == passes { LAST_PASS } else { 0 },
        table_at,
    };
    let f = &bufs.forward;
    let [dkdv_entry, dq_entry] = tiles.entry_points();

    let [x, y] = wrapped_grid(limits, "backward preprocess grid", query_rows.div_ceil(ROW_WORKGROUP))?;
    let buffers = [("out", f.out.buffer()), ("d_out", bufs.d_out.buffer()), ("lse", f.lse.buffer()), ("state", &state)];
    dispatch("preprocess", None, &buffers, [x, y, 1])?;

    let inputs = [
        ("q", f.q.buffer()),
        ("k", f.k.buffer()),
        ("v", f.v.buffer()),
        ("d_out", bufs.d_out.buffer()),
        ("state", &state),
        ("block_mask", mask_buffer),
    ];
    let mut dkdv_buffers = inputs.to_vec();
    dkdv_buffers.extend([("dk", bufs.dk.buffer()), ("dv", bufs.dv.buffer())]);
    for p in 0..dkdv_passes {
        let range = range(p, dkdv_tiles, dkdv_pairs, dkdv_passes, table_at[0]);
        dispatch(dkdv_entry, Some(range), &dkdv_buffers, dkdv_grid)?;
    }
    let mut dq_buffers = inputs.to_vec();
    dq_buffers.push(("dq", bufs.dq.buffer()));
    for p in 0..dq_passes {
        let range = range(p, dq_keys, n_k as u32, dq_passes, table_at[1]);
        dispatch(dq_entry, Some(range), &dq_buffers, dq_grid)?;
    }
    Ok(())
}

/// The backward variants a build should compile: the three entry points × dtype × the
/// forward's head-dim buckets (see [`crate::flash::validation_keys`]), the main passes dense
/// and on the block sizes of the forward's presets, and their varlen variants at a few head
/// dims (one aligned, one not, one split over two threads, the widest). The shader tests
/// validate and translate every one.
pub fn validation_keys() -> Vec<ShaderKey> {
    let equal = (1..=16).map(|i| (16 * i, 16 * i));
    let asymmetric = [(192, 128), (64, 256), (256, 16), (128, 64), (16, 256), (96, 32)];
    let unaligned = [(40, 40), (90, 30), (3, 3), (37, 21), (255, 255)];
    let varlen_dims = [(64, 64), (37, 21), (128, 128), (256, 256)];
    let limits = wgpu::Limits::default();
    let blocks = crate::flash::FlashConfig::PRESETS.map(|(_, preset)| preset.block_size());
    let mut keys = Vec::new();
    for dtype in [DType::F32, DType::F16] {
        for (d_qk, d_v) in equal.clone().chain(asymmetric).chain(unaligned) {
            let shape = AttentionShape { batch: 1, q_heads: 1, kv_heads: 1, n_q: 1, n_k: 1, d_qk, d_v };
            let dims = padded_dims(&shape);
            let preprocess = Tiles::dense(dims, &limits, false, (0, 0)).expect("the dense tiles fit");
            keys.push(variant_key("preprocess", dtype, &shape, &preprocess, Layout::default()));
            let varlen = if varlen_dims.contains(&(d_qk, d_v)) { &[false, true][..] } else { &[false] };
            // The dense tiles and each preset's block, without shuffles, and with them where a
            // pass's workgroup is the 8-thread subgroup of the CPU presets.
            for subgroups in [false, true] {
                let sizes = (KEY_THREADS, KEY_THREADS);
                let dense = Tiles::dense(dims, &limits, subgroups, sizes).expect("the dense tiles fit");
                let masked = blocks.iter().map(|&block| {
                    Tiles::new(block, dims, &limits, subgroups, sizes)
                        .expect("the presets' blocks fit WebGPU's defaults")
                });
                for (tiles, block_sparse) in [(dense, false)].into_iter().chain(masked.map(|t| (t, true))) {
                    for &varlen in varlen {
                        for entry_point in tiles.entry_points() {
                            let key = variant_key(entry_point, dtype, &shape, &tiles, Layout { block_sparse, varlen });
                            if !keys.contains(&key) {
                                keys.push(key);
                            }
                        }
                    }
                }
            }
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Head dims split over 2 threads above 64 columns and 4 above 128 where the workgroups
    /// are one subgroup of 8, else run a row per thread; every pass fits the loop budget with
    /// room to spare, even at the widest head dims.
    #[test]
    fn passes_split_under_a_loop_cap() {
        for (d, split) in [(64, 1), (128, 2), (256, 4)] {
            let shape = AttentionShape { batch: 1, q_heads: 8, kv_heads: 1, n_q: 4096, n_k: 4096, d_qk: d, d_v: d };
            for subgroups in [true, false] {
                let tiles = Tiles::dense(padded_dims(&shape), &wgpu::Limits::default(), subgroups, (8, 8)).unwrap();
                let want = match (split, subgroups) {
                    (1, shuffle) => PassTiles::Tiled { split, shuffle },
                    (_, true) => PassTiles::Tiled { split, shuffle: true },
                    (_, false) => PassTiles::Wide,
                };
                assert_eq!(tiles.passes, [want; 2], "d{d}, subgroups {subgroups}");
                assert_eq!(tiles.threads()[1], if want == PassTiles::Wide { 32 } else { 8 });
                assert_eq!(tiles_per_pass(&shape, &tiles, None), None);
                let (dq, dkdv) = tiles_per_pass(&shape, &tiles, Some(65535)).unwrap();
                assert!(dq >= 1 && dkdv >= 1);
                // Every pair reads a row of the other side word by word, or 4 x 4 blocks of
                // a thread's slice of them.
                let per_pair = match want {
                    PassTiles::Wide => 1 + 4 * d as u32 / 4,
                    PassTiles::Tiled { split, .. } => d as u32 / 4 / split * 2 / 4,
                };
                assert!(dq * tiles.block.k * per_pair < 65535 && dkdv * tiles.block.q * per_pair < 65535);
            }
        }
    }
}
