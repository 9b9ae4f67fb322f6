//! The one error type of wattn. Every variant carries the numbers that explain it,
//! so a message can be acted on without a debugger.

use std::path::PathBuf;

/// What went wrong, with the offending values.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// [`Context::new`](crate::Context::new) found no adapter, or none whose name matches the
    /// selection.
    #[error(
        "no GPU adapter found ({detail}); on Debian/Ubuntu install Mesa's software Vulkan driver with `sudo apt-get install -y mesa-vulkan-drivers` (or run tools/ensure-adapter.sh)"
    )]
    NoAdapter {
        /// What was looked for and what wgpu saw.
        detail: String,
    },

    /// The adapter refused to open a device with the features and limits wattn asked for.
    #[error("could not open a device on adapter '{adapter}': {detail}")]
    RequestDevice {
        /// The adapter's name.
        adapter: String,
        /// wgpu's reason.
        detail: String,
    },

    /// A tensor has the wrong number of dimensions.
    #[error("{what} must have rank {expected}, got shape {got:?}")]
    Rank {
        /// Which tensor ("Q", "K", "V", ...).
        what: &'static str,
        /// The rank and layout it needs, as "4 [B, H, N, D]".
        expected: String,
        /// The shape it has.
        got: Vec<usize>,
    },

    /// Shapes do not agree with each other, with a buffer's size, or with the data given;
    /// the message names both sides.
    #[error("shape mismatch: {0}")]
    Shape(String),

    /// A tensor has a dimension of 0.
    #[error("{what} is empty (shape {shape:?}): every dimension must be at least 1")]
    Empty {
        /// Which tensor.
        what: &'static str,
        /// Its shape.
        shape: Vec<usize>,
    },

    /// A head dim is 0 or above the largest the kernels support
    /// ([`MAX_HEAD_DIM`](crate::attention::MAX_HEAD_DIM)).
    #[error("head dim {got} of {what} is out of range: wattn supports 1..={max}")]
    HeadDim {
        /// Which head dim ("Q/K", "V", "KV cache").
        what: &'static str,
        /// The head dim given.
        got: usize,
        /// The largest supported.
        max: usize,
    },

    /// The query heads are not a multiple of the KV heads, so GQA cannot group them.
    #[error("{what} has {got} heads and Q has {q_heads}: Hq must be a multiple of Hkv")]
    Heads {
        /// Which KV side ("K", "the KV cache").
        what: &'static str,
        /// Its head count, Hkv.
        got: usize,
        /// The query's head count, Hq.
        q_heads: usize,
    },

    /// Tensors that must share a dtype differ, a tensor that must be f32 (LSE, combine
    /// partials) is not, or a dtype name is unknown.
    #[error("dtype mismatch: {0}")]
    DType(String),

    /// An f16 kernel was asked of an adapter without the `shader-f16` feature.
    #[error("dtype f16 needs the adapter feature shader-f16, which '{adapter}' does not have")]
    F16Unsupported {
        /// The adapter's name.
        adapter: String,
    },

    /// An f16 kernel was asked of a caller's device ([`Context::from_wgpu`](crate::Context::from_wgpu))
    /// opened without `SHADER_F16`.
    #[error(
        "dtype f16 needs wgpu::Features::SHADER_F16, which the device on '{adapter}' was not opened with: request it in DeviceDescriptor::required_features (where adapter.features() has it) before passing the device to Context::from_wgpu"
    )]
    F16NotEnabled {
        /// The adapter's name.
        adapter: String,
    },

    /// A problem exceeds a device limit or one of wattn's own (32-bit indexing, loop
    /// iterations); nothing was recorded.
    #[error("{what} needs {needed} but the adapter allows {allowed} ({limit})")]
    Limit {
        /// What needs it ("Q buffer", "flash tiles ... at head dim 256").
        what: String,
        /// How much it needs, in the limit's unit (bytes, workgroups, threads, elements).
        needed: u64,
        /// How much the limit allows.
        allowed: u64,
        /// The limit's name, as `wgpu::Limits` spells it where it is one of those.
        limit: &'static str,
    },

    /// An append to a [`KvCache`](crate::KvCache) under
    /// [`EvictionPolicy::None`](crate::EvictionPolicy::None) has no room; nothing was recorded.
    #[error(
        "KV cache full: {len} of {capacity} slots hold tokens and {appended} more were appended; eviction policy None never evicts"
    )]
    CacheFull {
        /// Slots per (sequence, KV head).
        capacity: usize,
        /// How many of them hold tokens.
        len: usize,
        /// How many tokens the refused append carried.
        appended: usize,
    },

    /// A step of a [`PagedKvCache`](crate::kv::PagedKvCache) needs more pages than the pool
    /// has free; nothing changed.
    #[error(
        "page pool full: the step needs {needed} new pages and the pool has {free} of {pages} free; remove finished sequences or make the pool bigger"
    )]
    PoolFull {
        /// Pages per layer.
        pages: usize,
        /// Pages free before the step (counting those its evictions free).
        free: usize,
        /// Pages the step's new tokens need.
        needed: usize,
    },

    /// An index into a [`BlockMask`](crate::BlockMask) lies outside it.
    #[error("{what} {index:?} is outside {bounds:?}")]
    OutOfRange {
        /// What was indexed, with the names of the index's parts.
        what: &'static str,
        /// The index given.
        index: Vec<usize>,
        /// The exclusive bounds of each part.
        bounds: Vec<usize>,
    },

    /// A [`KvCache`](crate::KvCache) layer no longer matches the GPU because an append was
    /// dropped unsubmitted beneath later ones; the layer refuses every call from then on.
    #[error(
        "KV cache layer {layer} is out of step with the GPU: the append of {count} tokens at position {position} was recorded into an encoder dropped without being submitted, and later appends were recorded after it; submit encoders in the order they were recorded (an append dropped after every other is undone by itself)"
    )]
    KvOutOfStep {
        /// The layer.
        layer: usize,
        /// The stream position of the dropped append's first token.
        position: u64,
        /// How many tokens it carried.
        count: u64,
    },

    /// An option, configuration or argument is out of its range (a window side below -1, a
    /// non-finite scale, 0 splits, no such layer, ...).
    #[error("invalid option: {0}")]
    Option(String),

    /// wgpu reported an error: validation, out of memory, a failed pipeline build, wait or
    /// readback.
    #[error("GPU error: {0}")]
    Gpu(String),

    /// A file could not be read, parsed or written.
    #[error("{path}: {detail}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong with it.
        detail: String,
    },
}

/// `std::result::Result` with wattn's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<wgpu::Error> for Error {
    fn from(e: wgpu::Error) -> Self {
        Error::Gpu(e.to_string())
    }
}
