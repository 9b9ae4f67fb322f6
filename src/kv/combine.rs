//! Merging partial attention results over disjoint key sets (`shaders/combine.wgsl`): the
//! second half of split-KV decode, and usable alone, e.g. to merge attention over a cache
//! with attention over new tokens computed elsewhere.

use crate::context::Context;
use crate::dispatch::{bind_buffers, uniform_buffer, wrapped_grid};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shader::{ConstValue, Kernel, ShaderKey};
use crate::tensor::{TensorView, check_u32_indexing};

/// Uniform parameters of `combine.wgsl`.
/// Keep in sync with `struct Params` there (a test compares the layouts).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CombineParams {
    /// Rows to merge (one per query head and query).
    pub rows: u32,
    /// Width of each output row (the head dim).
    pub dim: u32,
    /// Partials per row.
    pub splits: u32,
    /// Workgroups along x; the grid wraps into y.
    pub groups_x: u32,
}

const WORKGROUP: u32 = 64;

fn shader_key(dtype: DType) -> ShaderKey {
    ShaderKey {
        kernel: Kernel::Combine,
        entry_point: "main",
        dtype,
        constants: vec![("WORKGROUP", ConstValue::U32(WORKGROUP))],
    }
}

/// Every variant of `combine.wgsl`.
pub fn shader_keys() -> Vec<ShaderKey> {
    vec![shader_key(DType::F32), shader_key(DType::F16)]
}

/// The merge of `splits` partials of `rows` rows of width `dim`: where they are and where
/// the result goes. Shapes have been checked by the caller.
pub(crate) struct Merge<'a> {
    pub partial_out: &'a wgpu::Buffer,
    pub partial_lse: &'a wgpu::Buffer,
    pub out: &'a wgpu::Buffer,
    pub lse: &'a wgpu::Buffer,
    pub out_dtype: DType,
    pub rows: usize,
    pub dim: usize,
    pub splits: usize,
}

/// Records the merge into an open pass.
pub(crate) fn dispatch(ctx: &Context, pass: &mut wgpu::ComputePass<'_>, m: &Merge<'_>) -> Result<()> {
    let elements = (m.rows * m.dim) as u64;
    let grid = wrapped_grid(ctx.limits(), "combine grid", elements.div_ceil(WORKGROUP as u64))?;
    let params = CombineParams { rows: m.rows as u32, dim: m.dim as u32, splits: m.splits as u32, groups_x: grid[0] };
    let params = uniform_buffer(ctx, &params);
    let pipeline = ctx.pipelines.get(ctx.device(), &shader_key(m.out_dtype))?;
    let group = bind_buffers(
        ctx.device(),
        &pipeline,
        Kernel::Combine,
        &[
            ("params", &params),
            ("partial_out", m.partial_out),
            ("partial_lse", m.partial_lse),
            ("out", m.out),
            ("lse", m.lse),
        ],
    )?;
    pass.set_pipeline(&pipeline);
    pass.set_bind_group(0, &group, &[]);
    pass.dispatch_workgroups(grid[0], grid[1], 1);
    Ok(())
}

/// Records the merge of partial results: `partial_out` `[S, ..., D]` f32 (each partial
/// normalised over its own keys), `partial_lse` `[S, ...]` f32 (natural log, -inf where a
/// partial saw no key) into `out` `[..., D]` (f32 or f16) and `lse` `[...]` f32. Rows whose
/// partials are all -inf get zeros and -inf.
pub fn encode(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    partial_out: &TensorView<'_>,
    partial_lse: &TensorView<'_>,
    out: &TensorView<'_>,
    lse: &TensorView<'_>,
) -> Result<()> {
    let ps = partial_out.shape();
    if ps.len() < 2 || ps.contains(&0) {
        return Err(Error::Rank {
            what: "partial outputs",
            expected: "at least 2 [S, ..., D], none empty".into(),
            got: ps.to_vec(),
        });
    }
    check_u32_indexing("partial output", partial_out.numel() as u64)?;
    let (splits, row_shape, dim) = (ps[0], &ps[1..ps.len() - 1], ps[ps.len() - 1]);
    let expect = |what: &str, got: &[usize], want: Vec<usize>| {
        if got == want.as_slice() {
            Ok(())
        } else {
            Err(Error::Shape(format!("{what} has shape {got:?}, expected {want:?}")))
        }
    };
    expect("partial LSE", partial_lse.shape(), [&[splits][..], row_shape].concat())?;
    expect("combined output", out.shape(), ps[1..].to_vec())?;
    expect("combined LSE", lse.shape(), row_shape.to_vec())?;
    for (what, t) in [("partial outputs", partial_out), ("partial LSE", partial_lse), ("combined LSE", lse)] {
        if t.dtype() != DType::F32 {
            return Err(Error::DType(format!("{what} must be f32, got {}", t.dtype())));
        }
    }
    if out.dtype() == DType::F16 {
        ctx.require_f16()?;
    }
    let merge = Merge {
        partial_out: partial_out.buffer(),
        partial_lse: partial_lse.buffer(),
        out: out.buffer(),
        lse: lse.buffer(),
        out_dtype: out.dtype(),
        rows: row_shape.iter().product(),
        dim,
        splits,
    };
    let mut pass = encoder
        .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("wattn combine"), timestamp_writes: None });
    dispatch(ctx, &mut pass, &merge)
}
