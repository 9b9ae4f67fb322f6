//! The one place shader variants are made.
//!
//! A kernel's WGSL file in `shaders/` uses constants it does not declare (tile sizes,
//! padded head dims) and the element type `Elem`. [`ShaderKey::source`] prepends a prelude
//! that declares them: `enable f16;` when the storage is f16, `alias Elem = f32|f16;`, and
//! one `const NAME: TYPE = VALUE;` per constant, then the files of `shaders/shared/` the
//! kernel uses ([`Kernel::shared`]; for decode and kv_cache, the K/V word storage chosen by
//! the constant `INT8`, for flash_fwd and flash_bwd the register sharing chosen by `SHUFFLE_KV` and `SHUFFLE_ROWS`).
//! That is the whole preprocessor. Plain
//! `const`s (rather than `override`s) let workgroup arrays and private arrays be sized by
//! them on every backend, and let the compiler unroll the inner loops.

use crate::dtype::DType;
use std::fmt::Write;

/// The kernel families, one WGSL file each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Tiled flash-attention forward (`shaders/flash_fwd.wgsl`).
    FlashForward,
    /// Flash-attention backward: preprocess, dK/dV and dQ passes (`shaders/flash_bwd.wgsl`).
    FlashBackward,
    /// Materialised-scores baseline (`shaders/naive.wgsl`), for benchmarks.
    Naive,
    /// Materialised-scores backward baseline (`shaders/naive_bwd.wgsl`), for benchmarks.
    NaiveBackward,
    /// Split-KV decode against a KV cache (`shaders/decode.wgsl`).
    Decode,
    /// Merge of partial attention results (`shaders/combine.wgsl`).
    Combine,
    /// KV cache slot placement, append and heavy-hitter scores (`shaders/kv_cache.wgsl`).
    KvCache,
    /// FMA throughput and copy bandwidth microbenchmarks (`shaders/peak.wgsl`).
    Peak,
}

impl Kernel {
    /// The kernel's WGSL file in `shaders/`, as "flash_fwd.wgsl".
    pub fn file_name(self) -> &'static str {
        match self {
            Kernel::FlashForward => "flash_fwd.wgsl",
            Kernel::FlashBackward => "flash_bwd.wgsl",
            Kernel::Naive => "naive.wgsl",
            Kernel::NaiveBackward => "naive_bwd.wgsl",
            Kernel::Decode => "decode.wgsl",
            Kernel::Combine => "combine.wgsl",
            Kernel::KvCache => "kv_cache.wgsl",
            Kernel::Peak => "peak.wgsl",
        }
    }

    /// The WGSL of the kernel's own file, without the prelude or the shared files.
    pub fn body(self) -> &'static str {
        match self {
            Kernel::FlashForward => include_str!("../shaders/flash_fwd.wgsl"),
            Kernel::FlashBackward => include_str!("../shaders/flash_bwd.wgsl"),
            Kernel::Naive => include_str!("../shaders/naive.wgsl"),
            Kernel::NaiveBackward => include_str!("../shaders/naive_bwd.wgsl"),
            Kernel::Decode => include_str!("../shaders/decode.wgsl"),
            Kernel::Combine => include_str!("../shaders/combine.wgsl"),
            Kernel::KvCache => include_str!("../shaders/kv_cache.wgsl"),
            Kernel::Peak => include_str!("../shaders/peak.wgsl"),
        }
    }

    /// The kernel's group-0 bindings by name, in binding order: binding `i` is the WGSL
    /// global named `bindings()[i]`. Hosts bind by name (`dispatch::bind_buffers`);
    /// the shader tests check the table against naga's reflection of every variant.
    pub fn bindings(self) -> &'static [&'static str] {
        match self {
            Kernel::FlashForward => &["params", "q", "k", "v", "out", "lse", "state", "block_mask", "query_blocks"],
            Kernel::FlashBackward => {
                &["params", "range", "q", "k", "v", "out", "d_out", "lse", "dq", "dk", "dv", "state", "block_mask"]
            }
            Kernel::Naive => &["params", "q", "k", "v", "out", "lse", "scores"],
            Kernel::NaiveBackward => {
                &["params", "q", "k", "v", "out", "d_out", "lse", "dq", "dk", "dv", "probs", "grad_scores", "deltas"]
            }
            Kernel::Decode => {
                &["params", "q", "k", "v", "pos", "rope_or_positions", "partial_out", "partial_lse", "logits"]
            }
            Kernel::Combine => &["params", "partial_out", "partial_lse", "out", "lse"],
            Kernel::KvCache => &[
                "params", "src_k", "src_v", "k", "v", "pos", "score", "dest", "logits", "lse", "pool_k", "pool_v",
                "tables",
            ],
            Kernel::Peak => &["params", "sink", "src", "dst"],
        }
    }

    /// Files of `shaders/shared/` this kernel uses, prepended to its body in this order.
    pub fn shared(self) -> &'static [&'static str] {
        const SOFTMAX: &str = include_str!("../shaders/shared/softmax.wgsl");
        const ATTENTION: &str = include_str!("../shaders/shared/attention.wgsl");
        const BLOCK_MASK: &str = include_str!("../shaders/shared/block_mask.wgsl");
        const ROWS: &str = include_str!("../shaders/shared/rows.wgsl");
        match self {
            Kernel::FlashForward | Kernel::FlashBackward => &[SOFTMAX, ATTENTION, BLOCK_MASK, ROWS],
            Kernel::Naive | Kernel::NaiveBackward => &[SOFTMAX, ATTENTION],
            Kernel::Decode | Kernel::Combine | Kernel::KvCache => &[SOFTMAX],
            Kernel::Peak => &[],
        }
    }
}

/// Bytes a `var<workgroup>` array of `elements` values of `element_bytes` each takes against
/// the device's `max_compute_workgroup_storage_size`: Dawn (WebGPU in Chromium) rounds every
/// workgroup variable up to 16 bytes, so estimates that add raw sizes can pass here and fail
/// there.
pub(crate) fn workgroup_array_bytes(elements: u32, element_bytes: u32) -> u32 {
    (elements * element_bytes).next_multiple_of(16)
}

/// A compile-time constant of a shader variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConstValue {
    /// Declared as `const NAME: u32`.
    U32(u32),
    /// Declared as `const NAME: bool`.
    Bool(bool),
}

/// Everything that makes one compiled variant: also the key of the pipeline cache.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ShaderKey {
    /// The kernel family, hence the WGSL file.
    pub kernel: Kernel,
    /// The entry point the pipeline runs.
    pub entry_point: &'static str,
    /// The storage type, declared as `Elem`.
    pub dtype: DType,
    /// The prelude's constants, by WGSL name, in declaration order.
    pub constants: Vec<(&'static str, ConstValue)>,
}

impl ShaderKey {
    /// The full WGSL source of this variant: prelude + kernel body.
    pub fn source(&self) -> String {
        let mut s = String::new();
        if self.dtype == DType::F16 {
            s.push_str("enable f16;\n");
        }
        let elem = match self.dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
        };
        writeln!(s, "alias Elem = {elem};").unwrap();
        for (name, value) in &self.constants {
            match value {
                ConstValue::U32(x) => writeln!(s, "const {name}: u32 = {x}u;").unwrap(),
                ConstValue::Bool(b) => writeln!(s, "const {name}: bool = {b};").unwrap(),
            }
        }
        for shared in self.kernel.shared() {
            s.push_str(shared);
        }
        if let Some(chosen) = self.chosen_shared() {
            s.push_str(chosen);
        }
        s.push_str(self.kernel.body());
        s
    }

    /// The shared file a constant of the variant chooses: for decode and kv_cache how K/V
    /// words are stored (`KvWord`, `kv_unpack`, `kv_pack`; int8 where `INT8`, else the element
    /// type), for flash_fwd and flash_bwd how threads share registers (subgroup operations where
    /// `SHUFFLE_KV` or `SHUFFLE_ROWS`, else stand-ins without them).
    fn chosen_shared(&self) -> Option<&'static str> {
        let on =
            |constant| self.constants.iter().any(|&(name, value)| name == constant && value == ConstValue::Bool(true));
        match self.kernel {
            Kernel::Decode | Kernel::KvCache => Some(match on("INT8") {
                true => include_str!("../shaders/shared/kv_int8.wgsl"),
                false => include_str!("../shaders/shared/kv_float.wgsl"),
            }),
            Kernel::FlashForward | Kernel::FlashBackward => Some(match on("SHUFFLE_KV") || on("SHUFFLE_ROWS") {
                true => include_str!("../shaders/shared/lanes_subgroup.wgsl"),
                false => include_str!("../shaders/shared/lanes_none.wgsl"),
            }),
            _ => None,
        }
    }

    /// Whether the variant uses subgroup operations.
    pub fn uses_subgroups(&self) -> bool {
        self.chosen_shared() == Some(include_str!("../shaders/shared/lanes_subgroup.wgsl"))
    }

    /// [`Self::source`] as WebGPU's WGSL takes it: where the variant uses subgroups, with
    /// `enable subgroups;` (which naga, as wgpu 30 has it, refuses while it takes the builtins
    /// without it) and subgroup_uniformity off (the kernel branches on `on_all_lanes`, uniform
    /// across the subgroup, which the static analysis cannot see).
    pub fn webgpu_source(&self) -> String {
        match self.uses_subgroups() {
            true => format!("enable subgroups;\ndiagnostic(off, subgroup_uniformity);\n{}", self.source()),
            false => self.source(),
        }
    }

    /// A readable label, used for the pipeline and in error messages.
    pub fn label(&self) -> String {
        let mut s = format!("{}:{} {}", self.kernel.file_name(), self.entry_point, self.dtype);
        for (name, value) in &self.constants {
            match value {
                ConstValue::U32(x) => write!(s, " {name}={x}").unwrap(),
                ConstValue::Bool(b) => write!(s, " {name}={b}").unwrap(),
            }
        }
        s
    }
}

/// Every variant the crate can build, in a stable order: the flash forward, the flash
/// backward, the naive baselines (forward and backward), the KV cache, decode and combine kernels, and (with the `cli` feature, which
/// has the benchmark runner) the peak microbenchmarks. The shader tests validate each one;
/// `wattn shaders --emit` writes them out.
pub fn every_variant() -> Vec<ShaderKey> {
    let mut keys = crate::flash::validation_keys();
    keys.extend(crate::attention::backward::validation_keys());
    keys.extend(crate::naive::shader_keys());
    keys.extend(crate::kv::validation_keys());
    #[cfg(feature = "cli")]
    keys.extend(crate::bench::peak::shader_keys());
    keys
}

#[cfg(test)]
pub(crate) mod tests {
    use super::ShaderKey;

    /// The workgroup memory `key`'s WGSL declares, each variable rounded up to 16 bytes as
    /// Dawn counts it: what the hosts' estimates must match.
    pub(crate) fn declared_workgroup_bytes(key: &ShaderKey) -> u32 {
        let source = key.source();
        let module = naga::front::wgsl::parse_str(&source).unwrap_or_else(|e| panic!("{}: {e}", key.label()));
        let ctx = module.to_ctx();
        module
            .global_variables
            .iter()
            .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
            .map(|(_, g)| module.types[g.ty].inner.size(ctx).next_multiple_of(16))
            .sum()
    }
}
