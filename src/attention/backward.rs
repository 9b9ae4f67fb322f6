//! The flash-attention backward (`shaders/flash_bwd.wgsl`): dQ, dK and dV from the inputs,
//! the forward's O and LSE, and dO, with every option and block mask the forward takes.
//!
//! Three dispatches per call (more on adapters with a loop cap): the per-row statistics
//! (base-2 LSE and D = rowsum(dO * O)), the dK/dV pass over key blocks, which reduces GQA's
//! query heads in a fixed order, and the dQ pass over query blocks. No float atomics: the
//! same inputs give bit-identical gradients.

use super::flash::{FIRST_PASS, FlashParams, HEAD_DIM_GRANULE, LAST_PASS};
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
    /// Pads the struct to 16 bytes; always 0.
    pub _pad: u32,
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
    let shape = AttentionShape::from_shapes(q.shape(), k.shape(), v.shape())?;
    let dtype = q.dtype();
    let gradients = Gradients {
        dq: Tensor::zeros(ctx, &shape.q_shape(), dtype)?,
        dk: Tensor::zeros(ctx, k.shape(), dtype)?,
        dv: Tensor::zeros(ctx, v.shape(), dtype)?,
    };
    let gpu_mask = mask.map(|m| m.upload(ctx)).transpose()?;
    let bufs = GradientBuffers {
        forward: AttentionBuffers { q: q.view(), k: k.view(), v: v.view(), out: out.view(), lse: lse.view() },
        d_out: d_out.view(),
        dq: gradients.dq.view(),
        dk: gradients.dk.view(),
        dv: gradients.dv.view(),
    };
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    encode(ctx, &mut encoder, &bufs, gpu_mask.as_ref(), options)?;
    ctx.queue().submit([encoder.finish()]);
    Ok(gradients)
}

/// The tiles of the backward kernels: the query and key blocks (a block mask's, when there
/// is one) and the keys of one dK/dV workgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tiles {
    block: BlockSize,
    keys_per_workgroup: u32,
}

/// Threads of one dK/dV workgroup, one key each, where the key block divides it.
const KEYS_PER_WORKGROUP: u32 = 64;

impl Tiles {
    /// Query blocks of 32 rows, key tiles of 16: the granularity at which the dense options'
    /// bounds skip work.
    const DENSE: BlockSize = BlockSize::new(32, 16);

    fn new(block: BlockSize, limits: &wgpu::Limits) -> Result<Self> {
        if block.q == 0 || block.k == 0 {
            return Err(Error::Option(format!("backward tiles {block}: both sides must be at least 1")));
        }
        let keys_per_workgroup = if KEYS_PER_WORKGROUP.is_multiple_of(block.k) { KEYS_PER_WORKGROUP } else { block.k };
        let allowed = limits.max_compute_invocations_per_workgroup.min(limits.max_compute_workgroup_size_x);
        for (what, threads) in [("query block", block.q), ("key block", keys_per_workgroup)] {
            if threads > allowed {
                return Err(Error::Limit {
                    what: format!("backward workgroup of one {what} ({block}), a thread per row"),
                    needed: threads as u64,
                    allowed: allowed as u64,
                    limit: "max_compute_invocations_per_workgroup",
                });
            }
        }
        Ok(Self { block, keys_per_workgroup })
    }
}

/// One pipeline of the backward: an entry point of `flash_bwd.wgsl` for a dtype, head dims
/// and tiles.
fn variant_key(
    entry_point: &'static str,
    dtype: DType,
    shape: &AttentionShape,
    tiles: &Tiles,
    sparse: bool,
) -> ShaderKey {
    let pad = |d: usize| (d as u32).next_multiple_of(HEAD_DIM_GRANULE);
    let aligned = shape.d_qk.is_multiple_of(4) && shape.d_v.is_multiple_of(4);
    ShaderKey {
        kernel: Kernel::FlashBackward,
        entry_point,
        dtype,
        constants: vec![
            ("BLOCK_Q", ConstValue::U32(tiles.block.q)),
            ("BLOCK_K", ConstValue::U32(tiles.block.k)),
            ("KEYS_WG", ConstValue::U32(tiles.keys_per_workgroup)),
            ("DQK_PAD", ConstValue::U32(pad(shape.d_qk))),
            ("DV_PAD", ConstValue::U32(pad(shape.d_v))),
            ("ALIGNED", ConstValue::Bool(aligned)),
            ("BLOCK_SPARSE", ConstValue::Bool(sparse)),
        ],
    }
}

/// Threads of the preprocess workgroups (`ROW_WG` in the shader).
const ROW_WORKGROUP: u64 = 64;

/// How the two main passes split their work on an adapter that stops loops after
/// `loop_limit` iterations per invocation: (key tiles per dQ dispatch, (head, query block)
/// pairs per dK/dV dispatch), or `None` for no limit. The counts bound the iterations of
/// the shader's loops, assuming the compiler unrolls none and every pair is visible: keep
/// them in sync with flash_bwd.wgsl.
fn tiles_per_pass(shape: &AttentionShape, tiles: &Tiles, loop_limit: Option<u32>) -> Option<(u32, u32)> {
    let loop_limit = loop_limit?;
    let qk4 = (shape.d_qk as u32).next_multiple_of(HEAD_DIM_GRANULE) / 4;
    let dv4 = (shape.d_v as u32).next_multiple_of(HEAD_DIM_GRANULE) / 4;
    let budget = (loop_limit as f64 * 0.9) as u32;
    // Loading the rows and the state, storing the state or the result, two binary searches.
    let per_pass = 3 * (qk4 + dv4) + 4 * (qk4 + dv4) + 64;
    let per_pair = 1 + 2 * qk4 + 2 * dv4;
    let dq_tile = 1 + tiles.block.k * per_pair;
    let dkdv_tile = 1 + 64 + tiles.block.q * per_pair;
    let fit = |per_tile: u32| (budget.saturating_sub(per_pass) / per_tile).max(1);
    Some((fit(dq_tile), fit(dkdv_tile)))
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
    options.validate()?;
    let shape = bufs.validate(ctx)?;
    if let Some(mask) = mask {
        mask.check_shape(&shape)?;
    }
    let tiles = Tiles::new(mask.map_or(Tiles::DENSE, GpuBlockMask::block_size), ctx.limits())?;
    let limits = ctx.limits();
    let q_blocks = (shape.n_q as u32).div_ceil(tiles.block.q);
    let key_groups = (shape.n_k as u32).div_ceil(tiles.keys_per_workgroup);
    for (what, g) in [
        ("query blocks", q_blocks),
        ("key blocks", key_groups),
        ("query heads", shape.q_heads as u32),
        ("batch", shape.batch as u32),
    ] {
        check_grid(limits, &format!("backward grid: {g} {what}"), g)?;
    }
    let query_rows = (shape.batch * shape.q_heads * shape.n_q) as u64;
    let key_rows = (shape.batch * shape.kv_heads * shape.n_k) as u64;
    let dqk_pad = (shape.d_qk as u32).next_multiple_of(HEAD_DIM_GRANULE) as u64;
    let dv_pad = (shape.d_v as u32).next_multiple_of(HEAD_DIM_GRANULE) as u64;

    let (dq_tiles, dkdv_tiles) =
        tiles_per_pass(&shape, &tiles, ctx.loop_iteration_limit()).unwrap_or((u32::MAX, u32::MAX));
    let dq_keys = dq_tiles.saturating_mul(tiles.block.k);
    let dq_passes = (shape.n_k as u32).div_ceil(dq_keys);
    let dkdv_pairs = (shape.q_heads / shape.kv_heads) as u32 * q_blocks;
    let dkdv_passes = dkdv_pairs.div_ceil(dkdv_tiles);

    // The row statistics, then (only when a pass is split) the accumulators one pass carries
    // to the next: the dK/dV pass's, then in the same floats the dQ pass's.
    let accumulators = match (dkdv_passes > 1, dq_passes > 1) {
        (false, false) => 0,
        (dkdv, dq) => (dkdv as u64 * key_rows * (dqk_pad + dv_pad)).max(dq as u64 * query_rows * dqk_pad),
    };
    let floats = 2 * query_rows + accumulators;
    let what = "backward state (row statistics and pass accumulators)";
    check_u32_indexing(what, floats)?;
    check_binding_size(ctx, what, 4 * floats)?;
    let state = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("wattn backward state"),
        size: 4 * floats,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    // The dense variants never read the mask binding, but their layouts still have it.
    let mask_buffer = mask.map_or_else(|| ctx.unused_binding(1), |m| m.buffer());

    let params = uniform_buffer(ctx, &FlashParams::new(&shape, options));
    let dtype = bufs.forward.q.dtype();
    let sparse = mask.is_some();
    let mut dispatch = |entry_point: &'static str,
                        range: Option<PassRange>,
                        buffers: &[(&str, &wgpu::Buffer)],
                        grid: [u32; 3]|
     -> Result<()> {
        // The preprocess (no range) does not depend on the tiles: one variant serves every call.
        let key = match range {
            Some(_) => variant_key(entry_point, dtype, &shape, &tiles, sparse),
            None => variant_key(entry_point, dtype, &shape, &Tiles::new(Tiles::DENSE, limits)?, false),
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
    let range = |p: u32, per_pass: u32, total: u32, passes: u32| PassRange {
        begin: p * per_pass,
        end: ((p + 1) as u64 * per_pass as u64).min(total as u64) as u32,
        flags: if p == 0 { FIRST_PASS } else { 0 } | if p + 1 == passes { LAST_PASS } else { 0 },
        _pad: 0,
    };
    let f = &bufs.forward;

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
        let grid = [key_groups, shape.kv_heads as u32, shape.batch as u32];
        dispatch("dkdv_pass", Some(range(p, dkdv_tiles, dkdv_pairs, dkdv_passes)), &dkdv_buffers, grid)?;
    }
    let mut dq_buffers = inputs.to_vec();
    dq_buffers.push(("dq", bufs.dq.buffer()));
    for p in 0..dq_passes {
        let grid = [q_blocks, shape.q_heads as u32, shape.batch as u32];
        dispatch("dq_pass", Some(range(p, dq_keys, shape.n_k as u32, dq_passes)), &dq_buffers, grid)?;
    }
    Ok(())
}

/// The backward variants a build should compile: the three entry points × dtype × the
/// forward's head-dim buckets (see [`crate::flash::validation_keys`]), the main passes dense
/// and on the block sizes of the forward's presets. The shader tests validate and translate
/// every one.
pub fn validation_keys() -> Vec<ShaderKey> {
    let equal = (1..=16).map(|i| (16 * i, 16 * i));
    let asymmetric = [(192, 128), (64, 256), (256, 16), (128, 64), (16, 256), (96, 32)];
    let unaligned = [(40, 40), (90, 30), (3, 3), (37, 21), (255, 255)];
    let limits = wgpu::Limits::default();
    let dense = Tiles::new(Tiles::DENSE, &limits).expect("the dense tiles fit WebGPU's defaults");
    let mut masked: Vec<Tiles> = Vec::new();
    for (_, preset) in crate::flash::FlashConfig::PRESETS {
        let tiles = Tiles::new(preset.block_size(), &limits).expect("the presets' blocks fit WebGPU's defaults");
        if !masked.contains(&tiles) {
            masked.push(tiles);
        }
    }
    let mut keys = Vec::new();
    for dtype in [DType::F32, DType::F16] {
        for (d_qk, d_v) in equal.clone().chain(asymmetric).chain(unaligned) {
            let shape = AttentionShape { batch: 1, q_heads: 1, kv_heads: 1, n_q: 1, n_k: 1, d_qk, d_v };
            for entry_point in ["preprocess", "dkdv_pass", "dq_pass"] {
                keys.push(variant_key(entry_point, dtype, &shape, &dense, false));
            }
            for tiles in &masked {
                for entry_point in ["dkdv_pass", "dq_pass"] {
                    keys.push(variant_key(entry_point, dtype, &shape, tiles, true));
                }
            }
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pass fits the loop budget with room to spare, even at the widest head dims.
    #[test]
    fn passes_split_under_a_loop_cap() {
        let shape = AttentionShape { batch: 1, q_heads: 8, kv_heads: 1, n_q: 4096, n_k: 4096, d_qk: 256, d_v: 256 };
        let tiles = Tiles::new(Tiles::DENSE, &wgpu::Limits::default()).unwrap();
        assert_eq!(tiles_per_pass(&shape, &tiles, None), None);
        let (dq, dkdv) = tiles_per_pass(&shape, &tiles, Some(65535)).unwrap();
        assert!(dq >= 1 && dkdv >= 1);
        let per_pair = 1 + 2 * 64 + 2 * 64;
        assert!(dq * tiles.block.k * per_pair < 65535 && dkdv * tiles.block.q * per_pair < 65535);
    }
}
