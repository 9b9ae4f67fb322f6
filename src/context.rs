//! Instance, adapter, device and queue, and what wattn learned about them.
//!
//! [`Context::new`] picks an adapter the way wgpu's own tools do (`WGPU_BACKEND`,
//! `WGPU_ADAPTER_NAME`); [`Context::from_wgpu`] wraps a device the caller already owns, so
//! an engine can run wattn's kernels on its own device, buffers and command encoders.
//!
//! On Linux, a process without a valid `XDG_RUNTIME_DIR` gets a private one before wattn's
//! first instance, so Mesa's drivers do not print a misleading error about it.

use crate::error::{Error, Result};
use crate::pipeline::PipelineCache;

/// Which adapter to open: by default the environment decides, as in wgpu's examples.
#[derive(Clone, Debug, Default)]
pub struct AdapterSelection {
    /// Case-insensitive substring of the adapter name (like `WGPU_ADAPTER_NAME`).
    pub name: Option<String>,
    /// Backends to consider (like `WGPU_BACKEND`); `None` means all wgpu has.
    pub backends: Option<wgpu::Backends>,
}

impl AdapterSelection {
    /// The selection named by `WGPU_ADAPTER_NAME` and `WGPU_BACKEND`.
    pub fn from_env() -> Self {
        Self {
            name: std::env::var("WGPU_ADAPTER_NAME").ok().filter(|s| !s.is_empty()),
            backends: wgpu::Backends::from_env(),
        }
    }
}

/// The optional features wattn uses, and whether the device has them enabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Capabilities {
    /// `SHADER_F16`: f16 storage kernels ([`DType::F16`](crate::DType::F16)).
    pub shader_f16: bool,
    /// `SUBGROUP`: subgroup operations in shaders.
    pub subgroups: bool,
    /// `TIMESTAMP_QUERY`: GPU timestamps, for timing kernels on the GPU's own clock.
    pub timestamps: bool,
}

impl Capabilities {
    /// Which of wattn's optional features `features` (an adapter's or a device's) includes.
    pub fn of(features: wgpu::Features) -> Self {
        Self {
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
        }
    }
}

/// A device and queue with the pipelines wattn built on it.
pub struct Context {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    caps: Capabilities,
    loop_limit: Option<u32>,
    pub(crate) pipelines: PipelineCache,
    unused: [std::sync::OnceLock<wgpu::Buffer>; 2],
    /// Whether wattn opened the device, asking for every feature of [`WANTED_FEATURES`] the
    /// adapter has: then a missing feature is one the adapter lacks.
    opened_here: bool,
}

/// The features wattn asks for when it opens the device itself.
pub const WANTED_FEATURES: wgpu::Features =
    wgpu::Features::SHADER_F16.union(wgpu::Features::SUBGROUP).union(wgpu::Features::TIMESTAMP_QUERY);

impl Context {
    /// Opens the adapter chosen by the environment (`WGPU_BACKEND`, `WGPU_ADAPTER_NAME`).
    pub fn new() -> Result<Self> {
        Self::with_selection(&AdapterSelection::from_env())
    }

    /// Opens the adapter matching `sel`, with every feature of [`WANTED_FEATURES`] it has
    /// and the adapter's own limits (not WebGPU's defaults), so big problems fit.
    pub fn with_selection(sel: &AdapterSelection) -> Result<Self> {
        let instance = instance(sel);
        let adapter = choose_adapter(&instance, sel)?;
        let features = adapter.features() & WANTED_FEATURES;
        let desc = wgpu::DeviceDescriptor {
            label: Some("wattn"),
            required_features: features,
            required_limits: adapter.limits(),
            ..Default::default()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc))
            .map_err(|e| Error::RequestDevice { adapter: adapter.get_info().name, detail: e.to_string() })?;
        Ok(Self { opened_here: true, ..Self::from_wgpu(device, queue) })
    }

    /// Wraps a device the caller owns. wattn uses whatever features and limits it was
    /// created with: f16 kernels need `SHADER_F16`, GPU timing needs `TIMESTAMP_QUERY`.
    pub fn from_wgpu(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        let info = device.adapter_info();
        let limits = device.limits();
        let caps = Capabilities::of(device.features());
        let loop_limit = loop_iteration_limit(&info);
        Self {
            device,
            queue,
            info,
            limits,
            caps,
            loop_limit,
            pipelines: PipelineCache::default(),
            unused: Default::default(),
            opened_here: false,
        }
    }

    /// The device wattn's buffers and pipelines live on.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }
    /// The queue wattn submits to.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }
    /// The adapter's name, backend, device type and driver.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }
    /// The limits the device was opened with, which wattn checks every launch against.
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }
    /// Which of wattn's optional features the device has enabled.
    pub fn capabilities(&self) -> Capabilities {
        self.caps
    }
    /// Errors unless the device can run f16 kernels, saying whether the adapter lacks
    /// `SHADER_F16` or the caller's device was opened without it.
    pub(crate) fn require_f16(&self) -> Result<()> {
        let adapter = self.info.name.clone();
        match (self.caps.shader_f16, self.opened_here) {
            (true, _) => Ok(()),
            (false, true) => Err(Error::F16Unsupported { adapter }),
            (false, false) => Err(Error::F16NotEnabled { adapter }),
        }
    }

    /// How many pipelines this context has built (each is built once per variant).
    pub fn pipeline_count(&self) -> usize {
        self.pipelines.len()
    }

    /// The most loop iterations one shader invocation may run on this adapter, if it has
    /// such a cap. Kernels whose loops grow with the sequence split their work to stay below it.
    pub fn loop_iteration_limit(&self) -> Option<u32> {
        self.loop_limit
    }

    /// Plans for a loop-iteration cap of at most `limit` (it can only lower the adapter's own),
    /// so kernels split their work as they would on such an adapter: a way to exercise that
    /// path anywhere.
    pub fn with_loop_iteration_limit(mut self, limit: u32) -> Self {
        self.loop_limit = Some(self.loop_limit.map_or(limit, |own| own.min(limit)));
        self
    }

    /// A small storage buffer, made once, for a binding a shader variant declares but never
    /// touches. `slot` 0 and 1 are distinct buffers, so one bind group can fill two such
    /// bindings (one of them read-write) without a usage conflict.
    pub(crate) fn unused_binding(&self, slot: usize) -> &wgpu::Buffer {
        self.unused[slot].get_or_init(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("wattn unused binding"),
                size: 256,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        })
    }

    /// A one-line description: name, backend, type, driver.
    pub fn describe(&self) -> String {
        describe_adapter(&self.info)
    }

    /// Submits `encoder` and blocks until the GPU is done with it.
    pub fn submit_and_wait(&self, encoder: wgpu::CommandEncoder) -> Result<()> {
        let index = self.queue.submit([encoder.finish()]);
        self.wait_for(Some(index))
    }

    /// Runs `f`, turning the out-of-memory and validation errors wgpu raises meanwhile (which
    /// would otherwise reach the device's uncaptured-error handler, a panic by default) into
    /// [`Error::Gpu`]: for work whose size the limits do not fully predict.
    pub fn catching_gpu_errors<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let out_of_memory = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let result = f();
        let validation = pollster::block_on(validation.pop());
        let out_of_memory = pollster::block_on(out_of_memory.pop());
        match out_of_memory.or(validation) {
            Some(e) => Err(Error::Gpu(e.to_string())),
            None => result,
        }
    }

    pub(crate) fn wait_for(&self, index: Option<wgpu::SubmissionIndex>) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait { submission_index: index, timeout: None })
            .map(|_| ())
            .map_err(|e| Error::Gpu(format!("waiting for the GPU failed: {e}")))
    }
}

/// llvmpipe (Mesa's software rasteriser, lavapipe's core) ends every loop of a shader once
/// they have run 65535 iterations in total (`LP_MAX_TGSI_LOOP_ITERATIONS`), silently: the
/// results are simply wrong. No other adapter is known to do this.
fn loop_iteration_limit(info: &wgpu::AdapterInfo) -> Option<u32> {
    let llvmpipe = [&info.name, &info.driver].iter().any(|s| s.to_lowercase().contains("llvmpipe"));
    llvmpipe.then_some(65535)
}

/// A one-line description of an adapter: name, backend, type, driver.
pub fn describe_adapter(info: &wgpu::AdapterInfo) -> String {
    let driver = [info.driver.as_str(), info.driver_info.as_str()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    format!("{} ({:?}, {:?}, {})", info.name, info.backend, info.device_type, driver)
}

fn instance(sel: &AdapterSelection) -> wgpu::Instance {
    quiet_missing_runtime_dir();
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if let Some(b) = sel.backends {
        desc.backends = b;
    }
    wgpu::Instance::new(desc)
}

/// Every adapter wgpu can see under `sel`'s backends.
pub fn enumerate_adapters(sel: &AdapterSelection) -> Vec<wgpu::Adapter> {
    let instance = instance(sel);
    pollster::block_on(instance.enumerate_adapters(sel.backends.unwrap_or(wgpu::Backends::all())))
}

/// The adapter `sel` asks for: the first whose name matches, else wgpu's high-performance
/// choice, else any adapter at all (a CPU one included).
fn choose_adapter(instance: &wgpu::Instance, sel: &AdapterSelection) -> Result<wgpu::Adapter> {
    let backends = sel.backends.unwrap_or(wgpu::Backends::all());
    let all = pollster::block_on(instance.enumerate_adapters(backends));
    if let Some(name) = &sel.name {
        let want = name.to_lowercase();
        let seen: Vec<String> = all.iter().map(|a| a.get_info().name).collect();
        return all.into_iter().find(|a| a.get_info().name.to_lowercase().contains(&want)).ok_or_else(|| {
            Error::NoAdapter { detail: format!("no adapter name contains '{name}'; adapters seen: {seen:?}") }
        });
    }
    let opts =
        wgpu::RequestAdapterOptions { power_preference: wgpu::PowerPreference::HighPerformance, ..Default::default() };
    if let Ok(a) = pollster::block_on(instance.request_adapter(&opts)) {
        return Ok(a);
    }
    all.into_iter()
        .next()
        .ok_or_else(|| Error::NoAdapter { detail: format!("wgpu found no adapter on backends {backends:?}") })
}

/// Gives the process a private `XDG_RUNTIME_DIR` when it has none.
///
/// Mesa's Vulkan drivers look for a Wayland display through libwayland, which prints
/// `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` whenever that variable
/// is unset or not an absolute path: 4 to 6 times per process on a server or in CI, where no
/// session sets it. Nothing is wrong (wattn never draws), so before wattn's first instance
/// this points the variable at `<temp dir>/wattn-runtime-<uid>`, a directory of mode 0700
/// that only this user owns, as the XDG spec asks. A variable that names an existing
/// directory is left alone, and so is everything when the directory cannot be made safely.
#[cfg(target_os = "linux")]
fn quiet_missing_runtime_dir() {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let current = std::env::var_os("XDG_RUNTIME_DIR").map(std::path::PathBuf::from);
        if current.is_some_and(|dir| dir.is_absolute() && dir.is_dir()) {
            return;
        }
        // The owner of /proc/self is the process's effective user.
        let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else { return };
        let dir = std::env::temp_dir().join(format!("wattn-runtime-{uid}"));
        let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
        // Someone else's directory, or a link, in a shared temp dir is not ours to use.
        let Ok(meta) = std::fs::symlink_metadata(&dir) else { return };
        if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o777 != 0o700 {
            return;
        }
        // SAFETY: setting a variable races with any thread reading the environment through
        // libc without std's lock. This runs once (the `Once`), before the first wgpu instance
        // wattn creates, so before Mesa, the Vulkan loader or wgpu start threads of their own
        // in this process through wattn; Rust code that reads the environment meanwhile takes
        // std's lock. What remains is a program that reads the environment from C on another
        // thread at this very moment while calling into wattn for the first time: rare
        // enough, and the price of the alternative is a misleading error on every run.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
    });
}

/// Only Linux's Mesa drivers complain about `XDG_RUNTIME_DIR`.
#[cfg(not(target_os = "linux"))]
fn quiet_missing_runtime_dir() {}
