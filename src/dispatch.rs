//! What every kernel's host code does per call, in one place: uniform buffers, scratch
//! buffers kept between calls, bind groups by binding name, and workgroup grids checked
//! against the device's limits.

use crate::context::Context;
use crate::error::{Error, Result};
use crate::shader::Kernel;
use crate::tensor::check_binding_size;
use wgpu::util::DeviceExt;

/// A kernel's parameters as a uniform buffer.
pub(crate) fn uniform_buffer<T: bytemuck::Pod>(ctx: &Context, params: &T) -> wgpu::Buffer {
    ctx.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("wattn params"),
        contents: bytemuck::bytes_of(params),
        usage: wgpu::BufferUsages::UNIFORM,
    })
}

/// The buffer in `slot`, replaced by a bigger one if it holds fewer than `bytes`.
pub(crate) fn scratch<'a>(
    ctx: &Context,
    slot: &'a mut Option<wgpu::Buffer>,
    what: &str,
    bytes: u64,
) -> Result<&'a wgpu::Buffer> {
    let bytes = bytes.max(4);
    if slot.as_ref().is_none_or(|b| b.size() < bytes) {
        check_binding_size(ctx, what, bytes)?;
        *slot = Some(ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some(what),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        }));
    }
    Ok(slot.get_or_insert_with(|| unreachable!("filled above")))
}

/// A bind group for group 0 of `pipeline`, a variant of `kernel`, with whole buffers bound
/// by name (see [`Kernel::bindings`]). A name the kernel does not have is a bug in wattn,
/// reported as [`Error::Gpu`].
pub(crate) fn bind_buffers(
    device: &wgpu::Device,
    pipeline: &wgpu::ComputePipeline,
    kernel: Kernel,
    entries: &[(&str, &wgpu::Buffer)],
) -> Result<wgpu::BindGroup> {
    let names = kernel.bindings();
    let entries = entries
        .iter()
        .map(|&(name, buffer)| {
            let binding = names.iter().position(|n| *n == name).ok_or_else(|| {
                Error::Gpu(format!("{} has no binding named {name} (it has {names:?})", kernel.file_name()))
            })?;
            Ok(wgpu::BindGroupEntry { binding: binding as u32, resource: buffer.as_entire_binding() })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    }))
}

/// Errors if a grid of `count` workgroups along one dimension is over the device's limit.
pub(crate) fn check_grid(limits: &wgpu::Limits, what: &str, count: u32) -> Result<()> {
    if count > limits.max_compute_workgroups_per_dimension {
        return Err(Error::Limit {
            what: what.to_string(),
            needed: count as u64,
            allowed: limits.max_compute_workgroups_per_dimension as u64,
            limit: "max_compute_workgroups_per_dimension",
        });
    }
    Ok(())
}

/// A 1-D grid of `workgroups`, wrapped into y when it exceeds the per-dimension limit.
/// Returns `[x, y]`; the kernels compute their index as `(y * x_count + x) * WORKGROUP + lid`.
pub(crate) fn wrapped_grid(limits: &wgpu::Limits, what: &str, workgroups: u64) -> Result<[u32; 2]> {
    let max = limits.max_compute_workgroups_per_dimension as u64;
    let x = workgroups.clamp(1, max);
    let y = workgroups.div_ceil(x);
    check_grid(limits, what, y.min(u32::MAX as u64) as u32)?;
    Ok([x as u32, y as u32])
}
