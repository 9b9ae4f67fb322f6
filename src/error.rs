//! The one error type of wattn. Every variant carries the numbers that explain it,
//! so a message can be acted on without a debugger.

use std::path::PathBuf;

/// What went wrong, with the offending values.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no GPU adapter found ({detail}); on Debian/Ubuntu install Mesa's software Vulkan driver with `sudo apt-get install -y mesa-vulkan-drivers` (or run tools/ensure-adapter.sh)"
    )]
    NoAdapter { detail: String },

    #[error("could not open a device on adapter '{adapter}': {detail}")]
    RequestDevice { adapter: String, detail: String },

    #[error("{what} must have rank {expected}, got shape {got:?}")]
    Rank { what: &'static str, expected: String, got: Vec<usize> },

    #[error("shape mismatch: {0}")]
    Shape(String),

    #[error("{what} is empty (shape {shape:?}): every dimension must be at least 1")]
    Empty { what: &'static str, shape: Vec<usize> },

    #[error("head dim {got} of {what} is out of range: wattn supports 1..={max}")]
    HeadDim { what: &'static str, got: usize, max: usize },

    #[error("{what} has {got} heads and Q has {q_heads}: Hq must be a multiple of Hkv")]
    Heads { what: &'static str, got: usize, q_heads: usize },

    #[error("dtype mismatch: {0}")]
    DType(String),

    #[error("dtype f16 needs the adapter feature shader-f16, which '{adapter}' does not have")]
    F16Unsupported { adapter: String },

    #[error(
        "dtype f16 needs wgpu::Features::SHADER_F16, which the device on '{adapter}' was not opened with: request it in DeviceDescriptor::required_features (where adapter.features() has it) before passing the device to Context::from_wgpu"
    )]
    F16NotEnabled { adapter: String },

    #[error("{what} needs {needed} but the adapter allows {allowed} ({limit})")]
    Limit { what: String, needed: u64, allowed: u64, limit: &'static str },

    #[error(
        "KV cache full: {len} of {capacity} slots hold tokens and {appended} more were appended; eviction policy None never evicts"
    )]
    CacheFull { capacity: usize, len: usize, appended: usize },

    #[error("{what} {index:?} is outside {bounds:?}")]
    OutOfRange { what: &'static str, index: Vec<usize>, bounds: Vec<usize> },

    #[error(
        "KV cache layer {layer} is out of step with the GPU: the append of {count} tokens at position {position} was recorded into an encoder dropped without being submitted, and later appends were recorded after it; submit encoders in the order they were recorded (an append dropped after every other is undone by itself)"
    )]
    KvOutOfStep { layer: usize, position: u64, count: u64 },

    #[error("invalid option: {0}")]
    Option(String),

    #[error("GPU error: {0}")]
    Gpu(String),

    #[error("{path}: {detail}")]
    File { path: PathBuf, detail: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<wgpu::Error> for Error {
    fn from(e: wgpu::Error) -> Self {
        Error::Gpu(e.to_string())
    }
}
