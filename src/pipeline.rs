//! Pipelines are built once per [`ShaderKey`] and reused: per call, only bind groups,
//! uniforms and the dispatch are made.

use crate::error::{Error, Result};
use crate::shader::ShaderKey;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct PipelineCache {
    pipelines: Mutex<HashMap<ShaderKey, Arc<wgpu::ComputePipeline>>>,
}

impl PipelineCache {
    /// The pipeline for `key`, compiled on first use. Compilation errors (which would be a
    /// bug in wattn or a driver) come back as [`Error::Gpu`] rather than a panic.
    pub fn get(&self, device: &wgpu::Device, key: &ShaderKey) -> Result<Arc<wgpu::ComputePipeline>> {
        if let Some(p) = self.pipelines.lock().unwrap().get(key) {
            return Ok(p.clone());
        }
        let label = key.label();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&label),
            source: wgpu::ShaderSource::Wgsl(key.source().into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: None,
            module: &module,
            entry_point: Some(key.entry_point),
            compilation_options: Default::default(),
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu(format!("building pipeline {label}: {e}")));
        }
        let pipeline = Arc::new(pipeline);
        self.pipelines.lock().unwrap().insert(key.clone(), pipeline.clone());
        Ok(pipeline)
    }

    /// How many pipelines have been built.
    pub fn len(&self) -> usize {
        self.pipelines.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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

/// A bind group for group 0 of `pipeline` with whole buffers at the given bindings.
pub(crate) fn bind_buffers(
    device: &wgpu::Device,
    pipeline: &wgpu::ComputePipeline,
    entries: &[(u32, &wgpu::Buffer)],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry> = entries
        .iter()
        .map(|(binding, buffer)| wgpu::BindGroupEntry { binding: *binding, resource: buffer.as_entire_binding() })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    })
}
