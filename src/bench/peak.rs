//! The adapter's measured ceilings (`shaders/peak.wgsl`): FMA throughput in f32 (and f16
//! where the device has `shader-f16`) and device-memory copy bandwidth. `wattn peak`
//! prints them and `wattn bench` quotes kernel efficiency against the f32 figure.

use crate::context::Context;
use crate::dispatch::{bind_buffers, uniform_buffer};
use crate::dtype::DType;
use crate::error::Result;
use crate::shader::{ConstValue, Kernel, ShaderKey};
use crate::timing::{Stats, Timer};
use serde::Serialize;

/// Uniform parameters of `fma_main` in `peak.wgsl`.
/// Keep in sync with `struct Params` there (a test compares the layouts).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct PeakParams {
    iterations: u32,
    multiplier: f32,
    addend: f32,
    pad: u32,
}

/// Threads per workgroup of both kernels (WebGPU guarantees 256).
const WORKGROUP: u32 = 256;
/// FMA workgroups: a million threads, several per FMA lane even on the largest GPUs.
const FMA_WORKGROUPS: u32 = 4096;
/// Scalar FMAs per thread and loop iteration: eight vec4 chains.
const FMAS_PER_ITERATION: f64 = 32.0;
/// The FMA loop grows until one run lasts about this long, so that launch overhead and
/// timer resolution do not show.
const TARGET_SECONDS: f64 = 0.02;
const MAX_ITERATIONS: u32 = 1 << 24;
/// Bytes copied: well beyond the last-level caches of GPUs and CPUs.
const COPY_BYTES: u64 = 256 << 20;
/// Copy workgroups; each thread strides over the buffer.
const COPY_WORKGROUPS: u32 = 4096;

fn key(entry_point: &'static str, dtype: DType) -> ShaderKey {
    ShaderKey { kernel: Kernel::Peak, entry_point, dtype, constants: vec![("WORKGROUP", ConstValue::U32(WORKGROUP))] }
}

/// Every variant the peak kernels compile: FMA in f32 and f16, the copy.
pub fn shader_keys() -> Vec<ShaderKey> {
    vec![key("fma_main", DType::F32), key("fma_main", DType::F16), key("copy_main", DType::F32)]
}

/// One measured ceiling.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Measurement {
    /// FLOP/s for FMA (an FMA is 2 FLOPs), bytes/s for the copy (bytes read + written).
    pub rate: f64,
    /// FLOPs or bytes of one run.
    pub work: f64,
    pub time: Stats,
}

impl Measurement {
    fn new(work: f64, time: Stats) -> Self {
        Self { rate: work / time.median_s, work, time }
    }
}

/// The adapter's ceilings.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Peak {
    pub fma_f32: Measurement,
    /// `None` when the device lacks `shader-f16`.
    pub fma_f16: Option<Measurement>,
    pub copy: Measurement,
}

/// Measures every ceiling: `warmup` discarded runs, then the median of `runs`.
pub(crate) fn measure(ctx: &Context, timer: &Timer, warmup: usize, runs: usize) -> Result<Peak> {
    let fma_f16 = if ctx.capabilities().shader_f16 { Some(fma(ctx, timer, DType::F16, warmup, runs)?) } else { None };
    Ok(Peak { fma_f32: fma(ctx, timer, DType::F32, warmup, runs)?, fma_f16, copy: copy(ctx, timer, warmup, runs)? })
}

/// FMA throughput with `dtype` arithmetic.
fn fma(ctx: &Context, timer: &Timer, dtype: DType, warmup: usize, runs: usize) -> Result<Measurement> {
    let pipeline = ctx.pipelines.get(ctx.device(), &key("fma_main", dtype))?;
    let threads = FMA_WORKGROUPS * WORKGROUP;
    let sink = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("wattn peak sink"),
        size: threads as u64 * 4,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let time_with = |iterations: u32, warmup: usize, runs: usize| {
        let params = PeakParams { iterations, multiplier: 0.999, addend: 0.001, pad: 0 };
        let uniform = uniform_buffer(ctx, &params);
        let bind_group = bind_buffers(ctx.device(), &pipeline, Kernel::Peak, &[("params", &uniform), ("sink", &sink)])?;
        timer.measure(ctx, warmup, runs, &mut |encoder| {
            dispatch(encoder, &pipeline, &bind_group, FMA_WORKGROUPS);
            Ok(())
        })
    };
    let mut iterations = 16;
    loop {
        let seconds = time_with(iterations, 1, 1)?.median_s;
        if seconds >= TARGET_SECONDS / 2.0 || iterations >= MAX_ITERATIONS {
            break;
        }
        let grow = (TARGET_SECONDS / seconds.max(1e-7)).clamp(2.0, 64.0);
        iterations = (iterations as f64 * grow).min(MAX_ITERATIONS as f64) as u32;
    }
    let flops = threads as f64 * iterations as f64 * FMAS_PER_ITERATION * 2.0;
    Ok(Measurement::new(flops, time_with(iterations, warmup, runs)?))
}

/// Copy bandwidth over the largest buffer up to [`COPY_BYTES`] the device binds.
fn copy(ctx: &Context, timer: &Timer, warmup: usize, runs: usize) -> Result<Measurement> {
    let limits = ctx.limits();
    let bytes = COPY_BYTES.min(limits.max_storage_buffer_binding_size).min(limits.max_buffer_size) / 16 * 16;
    let buffer = |label| {
        ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        })
    };
    let (src, dst) = (buffer("wattn peak copy source"), buffer("wattn peak copy destination"));
    let pipeline = ctx.pipelines.get(ctx.device(), &key("copy_main", DType::F32))?;
    let bind_group = bind_buffers(ctx.device(), &pipeline, Kernel::Peak, &[("src", &src), ("dst", &dst)])?;
    let time = timer.measure(ctx, warmup, runs, &mut |encoder| {
        dispatch(encoder, &pipeline, &bind_group, COPY_WORKGROUPS);
        Ok(())
    })?;
    Ok(Measurement::new(2.0 * bytes as f64, time))
}

fn dispatch(
    encoder: &mut wgpu::CommandEncoder,
    pipeline: &wgpu::ComputePipeline,
    bind_group: &wgpu::BindGroup,
    groups: u32,
) {
    let mut pass =
        encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("wattn peak"), timestamp_writes: None });
    pass.set_pipeline(pipeline);
    pass.set_bind_group(0, bind_group, &[]);
    pass.dispatch_workgroups(groups, 1, 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_layout_matches_the_shader() {
        let source = key("fma_main", DType::F32).source();
        let module = naga::front::wgsl::parse_str(&source).unwrap();
        let (_, ty) = module.types.iter().find(|(_, t)| t.name.as_deref() == Some("Params")).unwrap();
        let naga::TypeInner::Struct { members, span } = &ty.inner else { panic!("Params is not a struct") };
        let offsets: Vec<(&str, u32)> = members.iter().map(|m| (m.name.as_deref().unwrap(), m.offset)).collect();
        let rust = [
            ("iterations", std::mem::offset_of!(PeakParams, iterations)),
            ("multiplier", std::mem::offset_of!(PeakParams, multiplier)),
            ("addend", std::mem::offset_of!(PeakParams, addend)),
            ("pad", std::mem::offset_of!(PeakParams, pad)),
        ];
        assert_eq!(offsets, rust.map(|(n, o)| (n, o as u32)));
        assert_eq!(*span as usize, std::mem::size_of::<PeakParams>());
    }
}
