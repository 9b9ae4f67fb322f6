//! Pipelines are built once per [`ShaderKey`] and reused: per call, only bind groups,
//! uniforms and the dispatch are made (see `src/dispatch.rs`).

use crate::error::{Error, Result};
use crate::shader::ShaderKey;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The compute pipelines one device has built, by [`ShaderKey`]; each [`Context`](crate::Context)
/// owns one.
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
}
