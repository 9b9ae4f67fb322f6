//! The materialised-scores baselines: the forward (`shaders/naive.wgsl`, O(N^2) memory,
//! three passes) and the backward (`shaders/naive_bwd.wgsl`, two N x N matrices, six passes).
//! Benchmarks measure the flash kernels against them. Dense options only: no block masks.

use super::backward::{GradientBuffers, Gradients, run_on_tensors};
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

fn kernel_key(kernel: Kernel, entry_point: &'static str, dtype: DType) -> ShaderKey {
    ShaderKey { kernel, entry_point, dtype, constants: vec![("WORKGROUP", ConstValue::U32(WORKGROUP))] }
}

fn key(entry_point: &'static str, dtype: DType) -> ShaderKey {
    kernel_key(Kernel::Naive, entry_point, dtype)
}

fn backward_key(entry_point: &'static str, dtype: DType) -> ShaderKey {
    kernel_key(Kernel::NaiveBackward, entry_point, dtype)
}

/// Entry points of `naive.wgsl`, for validation.
pub const ENTRY_POINTS: [&str; 3] = ["scores_main", "softmax_main", "pv_main"];

/// Entry points of `naive_bwd.wgsl`, in dispatch order.
pub const BACKWARD_ENTRY_POINTS: [&str; 6] =
    ["probs_main", "deltas_main", "grad_scores_main", "dv_main", "dk_main", "dq_main"];

/// Every variant the naive paths compile: the forward's, then the backward's.
pub fn shader_keys() -> Vec<ShaderKey> {
    let dtypes = [DType::F32, DType::F16];
    let forward = dtypes.iter().flat_map(|&d| ENTRY_POINTS.iter().map(move |e| key(e, d)));
    let backward = dtypes.iter().flat_map(|&d| BACKWARD_ENTRY_POINTS.iter().map(move |e| backward_key(e, d)));
    forward.chain(backward).collect()
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
    scratch_buffer(ctx, "naive score matrix", scores_bytes(shape))
}

/// A storage buffer of `bytes` for `what`, checked against the adapter's binding size first.
fn scratch_buffer(ctx: &Context, what: &str, bytes: u64) -> Result<wgpu::Buffer> {
    crate::tensor::check_binding_size(ctx, what, bytes)?;
    Ok(ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some(what),
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

/// The naive backward's scratch: P and dS, `[B, Hq, Nq, Nk]` f32 each, and D per query row.
pub struct BackwardScratch {
    probs: wgpu::Buffer,
    grad_scores: wgpu::Buffer,
    deltas: wgpu::Buffer,
}

impl BackwardScratch {
    /// Allocates the scratch of `shape`, checking each matrix against the adapter's limits first.
    pub fn alloc(ctx: &Context, shape: &AttentionShape) -> Result<Self> {
        let buffer = |what, bytes| scratch_buffer(ctx, what, bytes);
        let rows = (shape.batch * shape.q_heads * shape.n_q) as u64;
        Ok(Self {
            probs: buffer("naive backward P", scores_bytes(shape))?,
            grad_scores: buffer("naive backward dS", scores_bytes(shape))?,
            deltas: buffer("naive backward D", 4 * rows)?,
        })
    }

    /// Bytes of GPU memory the scratch holds.
    pub fn bytes(&self) -> u64 {
        self.probs.size() + self.grad_scores.size() + self.deltas.size()
    }
}

/// Records the naive backward's six passes: the gradients of the forward that wrote
/// `bufs.forward`'s O and LSE with `options`, through `scratch` (made for the same shape).
pub fn encode_backward(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    bufs: &GradientBuffers<'_>,
    scratch: &BackwardScratch,
    options: &AttentionOptions,
) -> Result<()> {
    options.validate()?;
    let shape = bufs.validate(ctx)?;
    let needed = [scores_bytes(&shape), 4 * (shape.batch * shape.q_heads * shape.n_q) as u64];
    let held = [scratch.probs.size().min(scratch.grad_scores.size()), scratch.deltas.size()];
    if held[0] < needed[0] || held[1] < needed[1] {
        return Err(Error::Shape(format!(
            "naive backward scratch holds {} bytes per matrix and {} for D, needs {} and {}",
            held[0], held[1], needed[0], needed[1]
        )));
    }
    // The longest loops: dv_main's and dk_main's over the query rows of a whole GQA group.
    if let Some(limit) = ctx.loop_iteration_limit() {
        let group = (shape.q_heads / shape.kv_heads) as u64;
        let needed = (group * (shape.n_q as u64 + 1)).max(shape.n_k as u64).max(shape.d_qk.max(shape.d_v) as u64);
        if needed > limit as u64 {
            return Err(Error::Limit {
                what: format!("naive backward over {} query rows and {} keys", group * shape.n_q as u64, shape.n_k),
                needed,
                allowed: limit as u64,
                limit: "loop iterations per invocation",
            });
        }
    }
    let bh = (shape.batch * shape.q_heads) as u32;
    let bkv = (shape.batch * shape.kv_heads) as u32;
    let rows = bh * shape.n_q as u32;
    let (n_q, n_k) = (shape.n_q as u32, shape.n_k as u32);
    let columns = |d: usize| (d as u32).div_ceil(WORKGROUP);
    let score_grid = [n_k.div_ceil(WORKGROUP), n_q, bh];
    let grids = [
        score_grid,
        [rows.div_ceil(WORKGROUP).min(65535), rows.div_ceil(ROWS_PER_GRID_ROW), 1],
        score_grid,
        [columns(shape.d_v), n_k, bkv],
        [columns(shape.d_qk), n_k, bkv],
        [columns(shape.d_qk), n_q, bh],
    ];
    for (name, g) in BACKWARD_ENTRY_POINTS.iter().zip(&grids) {
        for n in g {
            check_grid(ctx.limits(), &format!("naive backward {name} grid {g:?}"), *n)?;
        }
    }
    let params = uniform_buffer(ctx, &FlashParams::new(&shape, options));
    let f = &bufs.forward;
    let (probs, d_s, deltas) = (&scratch.probs, &scratch.grad_scores, &scratch.deltas);
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("wattn naive backward"),
        timestamp_writes: None,
    });
    for (entry, g) in BACKWARD_ENTRY_POINTS.into_iter().zip(grids) {
        let pipeline = ctx.pipelines.get(ctx.device(), &backward_key(entry, f.q.dtype()))?;
        let (q, k, v, out, d_out) = (f.q.buffer(), f.k.buffer(), f.v.buffer(), f.out.buffer(), bufs.d_out.buffer());
        let mut bindings: Vec<(&str, &wgpu::Buffer)> = vec![("params", &params)];
        bindings.extend(match entry {
            "probs_main" => vec![("q", q), ("k", k), ("lse", f.lse.buffer()), ("probs", probs), ("grad_scores", d_s)],
            "deltas_main" => vec![("out", out), ("d_out", d_out), ("deltas", deltas)],
            "grad_scores_main" => {
                vec![("v", v), ("d_out", d_out), ("probs", probs), ("grad_scores", d_s), ("deltas", deltas)]
            }
            // Both walk the weights through one function of the shader, P with dO or dS with Q.
            "dv_main" | "dk_main" => {
                let grad = if entry == "dv_main" { ("dv", bufs.dv.buffer()) } else { ("dk", bufs.dk.buffer()) };
                vec![("q", q), ("d_out", d_out), ("probs", probs), ("grad_scores", d_s), grad]
            }
            _ => vec![("k", k), ("dq", bufs.dq.buffer()), ("grad_scores", d_s)],
        });
        let bind_group = bind_buffers(ctx.device(), &pipeline, Kernel::NaiveBackward, &bindings)?;
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(g[0], g[1], g[2]);
    }
    Ok(())
}

/// The naive backward on owned tensors: records, submits, returns dQ, dK and dV. `out` and
/// `lse` are the forward's results for the same inputs and options.
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
) -> Result<Gradients> {
    let scratch = BackwardScratch::alloc(ctx, &AttentionShape::from_shapes(q.shape(), k.shape(), v.shape())?)?;
    run_on_tensors(ctx, [q, k, v, out, lse], d_out, |encoder, bufs| {
        encode_backward(ctx, encoder, bufs, &scratch, options)
    })
}
