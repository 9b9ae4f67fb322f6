//! The materialised-scores baseline (`shaders/naive.wgsl`): O(N^2) memory, three passes.
//! Benchmarks measure the flash kernel against it.

use super::flash::FlashParams;
use super::{AttentionBuffers, AttentionOptions, AttentionOutput, AttentionShape, alloc_output};
use crate::context::Context;
use crate::dispatch::{bind_buffers, check_grid, uniform_buffer};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shader::{ConstValue, Kernel, ShaderKey};
use crate::tensor::Tensor;

const WORKGROUP: u32 = 64;
/// Softmax rows are spread over (x, y) so that any row count fits the grid.
const ROWS_PER_GRID_ROW: u32 = 65535 * WORKGROUP;

fn key(entry_point: &'static str, dtype: DType) -> ShaderKey {
    ShaderKey { kernel: Kernel::Naive, entry_point, dtype, constants: vec![("WORKGROUP", ConstValue::U32(WORKGROUP))] }
}

/// Entry points of `naive.wgsl`, for validation.
pub const ENTRY_POINTS: [&str; 3] = ["scores_main", "softmax_main", "pv_main"];

/// Every variant the naive path compiles.
pub fn shader_keys() -> Vec<ShaderKey> {
    [DType::F32, DType::F16].iter().flat_map(|&d| ENTRY_POINTS.iter().map(move |e| key(e, d))).collect()
}

/// Bytes of the f32 score matrix `[B, Hq, Nq, Nk]` of `shape`.
pub fn scores_bytes(shape: &AttentionShape) -> u64 {
    (shape.batch * shape.q_heads * shape.n_q) as u64 * shape.n_k as u64 * 4
}

/// Records the three passes. `scores` must hold `B * Hq * Nq * Nk` f32.
pub fn encode(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    bufs: &AttentionBuffers<'_>,
    scores: &wgpu::Buffer,
    options: &AttentionOptions,
) -> Result<()> {
    options.validate()?;
    let shape = bufs.validate(ctx)?;
    let needed = scores_bytes(&shape);
    if scores.size() < needed {
        return Err(Error::Shape(format!("score buffer has {} bytes, needs {needed}", scores.size())));
    }
    let limits = ctx.limits();
    // softmax_main walks each row three times in one invocation.
    if let Some(limit) = ctx.loop_iteration_limit() {
        let needed = 3 * shape.n_k as u64;
        if needed > limit as u64 {
            return Err(Error::Limit {
                what: format!("naive softmax over {} keys", shape.n_k),
                needed,
                allowed: limit as u64,
                limit: "loop iterations per invocation",
            });
        }
    }
    let bh = (shape.batch * shape.q_heads) as u32;
    let rows = bh * shape.n_q as u32;
    let grids = [
        ("scores_main", [(shape.n_k as u32).div_ceil(WORKGROUP), shape.n_q as u32, bh]),
        ("softmax_main", [rows.div_ceil(WORKGROUP).min(65535), rows.div_ceil(ROWS_PER_GRID_ROW), 1]),
        ("pv_main", [(shape.d_v as u32).div_ceil(WORKGROUP), shape.n_q as u32, bh]),
    ];
    for (name, g) in &grids {
        for n in g {
            check_grid(limits, &format!("naive {name} grid {g:?}"), *n)?;
        }
    }
    let params = uniform_buffer(ctx, &FlashParams::new(&shape, options));
    let mut pass =
        encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("wattn naive"), timestamp_writes: None });
    for (entry, g) in grids {
        let pipeline = ctx.pipelines.get(ctx.device(), &key(entry, bufs.q.dtype()))?;
        let bindings: Vec<(&str, &wgpu::Buffer)> = match entry {
            "scores_main" => {
                vec![("params", &params), ("q", bufs.q.buffer()), ("k", bufs.k.buffer()), ("scores", scores)]
            }
            "softmax_main" => vec![("params", &params), ("lse", bufs.lse.buffer()), ("scores", scores)],
            _ => vec![("params", &params), ("v", bufs.v.buffer()), ("out", bufs.out.buffer()), ("scores", scores)],
        };
        let bind_group = bind_buffers(ctx.device(), &pipeline, Kernel::Naive, &bindings)?;
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(g[0], g[1], g[2]);
    }
    Ok(())
}

/// Allocates the score matrix, checking it against the adapter's limits first.
pub fn alloc_scores(ctx: &Context, shape: &AttentionShape) -> Result<wgpu::Buffer> {
    let bytes = scores_bytes(shape);
    crate::tensor::check_binding_size(ctx, "naive score matrix", bytes)?;
    Ok(ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("wattn naive scores"),
        size: bytes.max(4),
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    }))
}

/// Naive attention on owned tensors: records, submits, returns O and LSE.
pub fn attention(
    ctx: &Context,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    options: &AttentionOptions,
) -> Result<AttentionOutput> {
    let output = alloc_output(ctx, q, k, v)?;
    let shape = AttentionShape::from_shapes(q.shape(), k.shape(), v.shape())?;
    let scores = alloc_scores(ctx, &shape)?;
    let bufs =
        AttentionBuffers { q: q.view(), k: k.view(), v: v.view(), out: output.out.view(), lse: output.lse.view() };
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    encode(ctx, &mut encoder, &bufs, &scores, options)?;
    ctx.queue().submit([encoder.finish()]);
    Ok(output)
}
