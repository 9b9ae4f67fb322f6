//! The tiled flash-attention forward kernel (`shaders/flash_fwd.wgsl`): its parameters,
//! tile configurations, and the host functions that record a dispatch, dense or
//! restricted to a block mask.

use super::{AttentionBuffers, AttentionOptions, AttentionShape};
use crate::context::Context;
use crate::dispatch::{bind_buffers, check_grid, uniform_buffer};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::mask::{BlockSize, GpuBlockMask};
use crate::shader::{ConstValue, Kernel, ShaderKey, workgroup_array_bytes};
use crate::tensor::check_binding_size;

/// Uniform parameters of `flash_fwd.wgsl` and `naive.wgsl`.
/// Keep in sync with `struct Params` in both shaders (a test compares the layouts).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FlashParams {
    /// B.
    pub batch: u32,
    /// Hq.
    pub q_heads: u32,
    /// Hkv.
    pub kv_heads: u32,
    /// Nq.
    pub n_q: u32,
    /// Nk.
    pub n_k: u32,
    /// Dqk, the head dim of Q and K.
    pub d_qk: u32,
    /// Dv, the head dim of V and O.
    pub d_v: u32,
    /// Attention sinks: the first `sinks` keys are exempt from the window's left bound.
    pub sinks: u32,
    /// Keys visible left of the diagonal (i + Nk - Nq); -1 = unbounded.
    pub window_left: i32,
    /// Keys visible right of the diagonal, with causality folded in (0 when causal); -1 = unbounded.
    pub window_right: i32,
    /// Softmax scale, resolved (1/sqrt(Dqk) by default).
    pub scale: f32,
    /// Logit softcap; 0 = none.
    pub softcap: f32,
    /// This pass's keys, `[key_begin, key_end)` (see [`FlashConfig::keys_per_pass`]); `key_begin`
    /// is a multiple of the key tile.
    pub key_begin: u32,
    /// End (exclusive) of this pass's keys.
    pub key_end: u32,
    /// [`FIRST_PASS`] | [`LAST_PASS`].
    pub pass_flags: u32,
    /// Pads the struct to a multiple of 16 bytes; always 0.
    pub _pad: u32,
}

/// [`FlashParams::pass_flags`] bit: the pass starts each row's softmax state afresh instead of
/// loading the previous pass's.
pub const FIRST_PASS: u32 = 1;
/// [`FlashParams::pass_flags`] bit: the pass normalises and writes O and LSE instead of
/// storing the state for the next pass.
pub const LAST_PASS: u32 = 2;

impl FlashParams {
    /// The parameters of a single pass over all `shape.n_k` keys.
    pub fn new(shape: &AttentionShape, options: &AttentionOptions) -> Self {
        let (window_left, window_right) = options.effective_window();
        Self {
            batch: shape.batch as u32,
            q_heads: shape.q_heads as u32,
            kv_heads: shape.kv_heads as u32,
            n_q: shape.n_q as u32,
            n_k: shape.n_k as u32,
            d_qk: shape.d_qk as u32,
            d_v: shape.d_v as u32,
            sinks: options.sinks,
            window_left,
            window_right,
            scale: options.scale_for(shape.d_qk),
            softcap: options.softcap,
            key_begin: 0,
            key_end: shape.n_k as u32,
            pass_flags: FIRST_PASS | LAST_PASS,
            _pad: 0,
        }
    }
}

/// Head dims are rounded up to this for the compiled variants, so one pipeline serves
/// 16 head dims and the loops over the head dim have compile-time bounds.
pub const HEAD_DIM_GRANULE: u32 = 16;

/// Tile sizes of the flash kernel. Chosen per adapter class by
/// [`FlashConfig::for_adapter`] from measurements (see README), or set by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlashConfig {
    /// Query rows per workgroup.
    pub block_q: u32,
    /// Keys per K/V tile.
    pub block_k: u32,
    /// Threads sharing one query row: 1, 2 or 4.
    pub threads_per_row: u32,
    /// Head-dim columns staged at a time (a multiple of 16).
    pub d_chunk: u32,
}

impl FlashConfig {
    /// Fits WebGPU's default 16 KiB of workgroup memory for every head dim.
    pub const PORTABLE: Self = Self { block_q: 16, block_k: 16, threads_per_row: 4, d_chunk: 64 };
    /// Software rasterisers (llvmpipe, SwiftShader, WARP): the fastest of those measured on
    /// llvmpipe (see docs/tuning.md).
    pub const CPU: Self = Self { block_q: 32, block_k: 32, threads_per_row: 2, d_chunk: 64 };
    /// Discrete and integrated GPUs with at least 32 KiB of workgroup memory.
    pub const GPU: Self = Self { block_q: 32, block_k: 32, threads_per_row: 4, d_chunk: 64 };
    /// Every preset with its name, as `wattn info` and the tuner name them.
    pub const PRESETS: [(&'static str, Self); 3] =
        [("PORTABLE", Self::PORTABLE), ("CPU", Self::CPU), ("GPU", Self::GPU)];

    /// The configuration for `ctx`'s adapter class, falling back to [`Self::PORTABLE`]
    /// when the preferred one does not fit the device's limits.
    pub fn for_adapter(ctx: &Context) -> Self {
        let preferred = match ctx.adapter_info().device_type {
            wgpu::DeviceType::Cpu => Self::CPU,
            wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu => Self::GPU,
            _ => Self::PORTABLE,
        };
        let widest = AttentionShape { batch: 1, q_heads: 1, kv_heads: 1, n_q: 1, n_k: 1, d_qk: 256, d_v: 256 };
        if preferred.check(ctx.limits(), &widest).is_ok() { preferred } else { Self::PORTABLE }
    }

    /// The tiles as a block mask's block size.
    pub fn block_size(&self) -> BlockSize {
        BlockSize::new(self.block_q, self.block_k)
    }

    /// This configuration with tiles of `block` (a block mask's), other settings kept.
    pub fn with_block_size(self, block: BlockSize) -> Self {
        Self { block_q: block.q, block_k: block.k, ..self }
    }

    fn workgroup_size(&self) -> u32 {
        self.block_q * self.threads_per_row
    }

    /// Bytes of workgroup memory the kernel declares for this shape (see the shader:
    /// Q and K/V tiles of vec4, the K/V rows padded by one vec4, and two score tiles).
    fn workgroup_bytes(&self, q_resident: bool, dqk_pad: u32, d_chunk: u32) -> u32 {
        let q_stride = if q_resident { dqk_pad } else { d_chunk };
        let score_tile = workgroup_array_bytes(self.block_q * self.block_k, 4);
        workgroup_array_bytes(self.block_q * q_stride / 4, 16)
            + workgroup_array_bytes(self.block_k * (d_chunk / 4 + 1), 16)
            + 2 * score_tile
    }

    /// Checks the configuration against the kernel's rules and the device's limits.
    pub fn check(&self, limits: &wgpu::Limits, shape: &AttentionShape) -> Result<()> {
        let tpr = self.threads_per_row;
        let bad = |why: String| Err(Error::Option(format!("flash config {self:?}: {why}")));
        // A row's threads split each chunk's vec4 columns, and the last chunk may hold only
        // HEAD_DIM_GRANULE / 4 of them.
        if !(tpr.is_power_of_two() && tpr <= HEAD_DIM_GRANULE / 4) {
            return bad("threads_per_row must be 1, 2 or 4".into());
        }
        if self.block_q == 0 || self.block_k == 0 || !self.block_k.is_multiple_of(tpr) {
            return bad("block_q and block_k must be positive, block_k a multiple of threads_per_row".into());
        }
        if self.d_chunk == 0 || !self.d_chunk.is_multiple_of(HEAD_DIM_GRANULE) {
            return bad("d_chunk must be a positive multiple of 16".into());
        }
        let wg = self.workgroup_size();
        if wg > limits.max_compute_invocations_per_workgroup || wg > limits.max_compute_workgroup_size_x {
            return Err(Error::Limit {
                what: format!("flash workgroup of {wg} threads"),
                needed: wg as u64,
                allowed: limits.max_compute_invocations_per_workgroup.min(limits.max_compute_workgroup_size_x) as u64,
                limit: "max_compute_invocations_per_workgroup",
            });
        }
        let v = Variant::new(self, limits, shape);
        let bytes = self.workgroup_bytes(v.q_resident, v.dqk_pad, v.d_chunk);
        if bytes > limits.max_compute_workgroup_storage_size {
            return Err(Error::Limit {
                what: format!("flash tiles {self:?} at head dim {}", shape.d_qk.max(shape.d_v)),
                needed: bytes as u64,
                allowed: limits.max_compute_workgroup_storage_size as u64,
                limit: "max_compute_workgroup_storage_size",
            });
        }
        Ok(())
    }
}

// The text form of a configuration, "BQ,BK,TPR,DC" (block_q, block_k, threads_per_row,
// d_chunk): what `wattn bench --config` takes and the tuning cache stores. Keep both in step
// with the fields.

impl std::fmt::Display for FlashConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{},{},{}", self.block_q, self.block_k, self.threads_per_row, self.d_chunk)
    }
}

impl std::str::FromStr for FlashConfig {
    type Err = Error;

    /// Parses the form [`Display`](std::fmt::Display) writes; the numbers are checked when the
    /// configuration is used ([`FlashConfig::check`]).
    fn from_str(text: &str) -> Result<Self> {
        let bad = |why: &str| Error::Option(format!("flash config '{text}': {why}"));
        let numbers: Vec<u32> = text
            .split(',')
            .map(|s| s.trim().parse::<u32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(&e.to_string()))?;
        let [block_q, block_k, threads_per_row, d_chunk] = numbers[..] else {
            return Err(bad("expected four numbers BQ,BK,TPR,DC, e.g. 16,32,4,64"));
        };
        Ok(Self { block_q, block_k, threads_per_row, d_chunk })
    }
}

impl FlashConfig {
    /// How many keys one dispatch may walk on an adapter that stops loops after
    /// `loop_limit` iterations per invocation (llvmpipe), or `None` for no limit.
    /// The count is an upper bound on the iterations of the shader's loops per K/V tile,
    /// assuming the compiler unrolls none of them: keep it in sync with flash_fwd.wgsl.
    pub fn keys_per_pass(&self, limits: &wgpu::Limits, shape: &AttentionShape, loop_limit: Option<u32>) -> Option<u32> {
        let loop_limit = loop_limit?;
        let v = Variant::new(self, limits, shape);
        let wg = self.workgroup_size();
        let (bq, bk, tpr, dc) = (self.block_q, self.block_k, self.threads_per_row, v.d_chunk);
        let keys_per_thread = bk / tpr;
        let (chunk4, q_stride4) = (dc / 4, if v.q_resident { v.dqk_pad / 4 } else { dc / 4 });
        // Staging loops, each with load4's loop of 4.
        let stage_kv = (bk * chunk4).div_ceil(wg) * 5;
        let stage_q = (bq * q_stride4).div_ceil(wg) * 5;
        let qk_chunks = v.dqk_pad.div_ceil(dc);
        let v_chunks = v.dv_pad.div_ceil(dc);
        let o4 = v.dv_pad / 4 / tpr;
        let per_qk_chunk = if v.q_resident { 0 } else { stage_q } + stage_kv + chunk4 * (1 + keys_per_thread);
        let per_v_chunk = stage_kv + bk * (1 + chunk4 / tpr);
        let per_tile = 1 + qk_chunks * per_qk_chunk + 2 * keys_per_thread + bk + o4 + v_chunks * per_v_chunk;
        // Once per pass: staging resident Q, loading and storing the state, writing O, and
        // (block-sparse variants) the binary search for the pass's first run, at most 32 steps.
        let per_pass = stage_q + 3 * o4 * 5 + 32;
        let budget = (loop_limit as f64 * 0.9) as u32;
        let tiles = (budget.saturating_sub(per_pass) / per_tile).max(1);
        Some(tiles * bk)
    }
}

/// The compile-time shape of one flash pipeline.
struct Variant {
    dqk_pad: u32,
    dv_pad: u32,
    d_chunk: u32,
    q_resident: bool,
}

impl Variant {
    fn new(config: &FlashConfig, limits: &wgpu::Limits, shape: &AttentionShape) -> Self {
        let dqk_pad = (shape.d_qk as u32).next_multiple_of(HEAD_DIM_GRANULE);
        let dv_pad = (shape.d_v as u32).next_multiple_of(HEAD_DIM_GRANULE);
        let d_chunk = config.d_chunk.min(dqk_pad.max(dv_pad));
        // Keep whole Q rows in workgroup memory when they fit: Q is then read once, not once per tile.
        let q_resident = dqk_pad <= d_chunk
            || config.workgroup_bytes(true, dqk_pad, d_chunk) <= limits.max_compute_workgroup_storage_size;
        Self { dqk_pad, dv_pad, d_chunk, q_resident }
    }
}

fn variant_key(
    config: &FlashConfig,
    limits: &wgpu::Limits,
    dtype: DType,
    shape: &AttentionShape,
    block_sparse: bool,
) -> ShaderKey {
    let v = Variant::new(config, limits, shape);
    ShaderKey {
        kernel: Kernel::FlashForward,
        entry_point: "main",
        dtype,
        constants: vec![
            ("BLOCK_Q", ConstValue::U32(config.block_q)),
            ("BLOCK_K", ConstValue::U32(config.block_k)),
            ("THREADS_PER_ROW", ConstValue::U32(config.threads_per_row)),
            ("D_CHUNK", ConstValue::U32(v.d_chunk)),
            ("DQK_PAD", ConstValue::U32(v.dqk_pad)),
            ("DV_PAD", ConstValue::U32(v.dv_pad)),
            ("Q_RESIDENT", ConstValue::Bool(v.q_resident)),
            ("BLOCK_SPARSE", ConstValue::Bool(block_sparse)),
        ],
    }
}

/// Records the flash forward into `encoder` on the caller's buffers. Nothing is
/// submitted and nothing is read back.
///
/// With a `mask` ([`crate::BlockMask::upload`]) the kernel visits only the key blocks the
/// mask lists, testing elements only in its partial blocks; the tiles of `config` must be
/// the mask's blocks ([`FlashConfig::with_block_size`]). The dense options (causal, window,
/// sinks) apply on top, element by element: express them in the mask to skip their tiles.
pub fn encode(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    bufs: &AttentionBuffers<'_>,
    mask: Option<&GpuBlockMask>,
    options: &AttentionOptions,
    config: &FlashConfig,
) -> Result<()> {
    options.validate()?;
    let shape = bufs.validate(ctx)?;
    config.check(ctx.limits(), &shape)?;
    if let Some(mask) = mask {
        mask.check(&shape, config)?;
    }
    let groups = [(shape.n_q as u32).div_ceil(config.block_q), shape.q_heads as u32, shape.batch as u32];
    for (what, g) in ["query blocks", "query heads", "batch"].iter().zip(groups) {
        check_grid(ctx.limits(), &format!("flash grid: {g} {what}"), g)?;
    }
    let key = variant_key(config, ctx.limits(), bufs.q.dtype(), &shape, mask.is_some());
    let pipeline = ctx.pipelines.get(ctx.device(), &key)?;
    let n_k = shape.n_k as u32;
    let keys_per_pass = config.keys_per_pass(ctx.limits(), &shape, ctx.loop_iteration_limit()).unwrap_or(n_k);
    let passes = n_k.div_ceil(keys_per_pass);
    // The carried (m, l, o) of every row, only when there is more than one pass.
    let own_state;
    let state = if passes > 1 {
        let floats =
            shape.batch * shape.q_heads * shape.n_q * (Variant::new(config, ctx.limits(), &shape).dv_pad as usize + 2);
        let bytes = 4 * floats as u64;
        check_binding_size(ctx, "flash pass state", bytes)?;
        own_state = ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("wattn flash pass state"),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        &own_state
    } else {
        ctx.unused_binding(0)
    };
    // The dense variant never reads the mask binding, but its layout still has it.
    let mask_buffer = mask.map_or_else(|| ctx.unused_binding(1), |m| m.buffer());
    let base = FlashParams::new(&shape, options);
    for p in 0..passes {
        let params = FlashParams {
            key_begin: p * keys_per_pass,
            key_end: ((p + 1) * keys_per_pass).min(n_k),
            pass_flags: if p == 0 { FIRST_PASS } else { 0 } | if p + 1 == passes { LAST_PASS } else { 0 },
            ..base
        };
        let params = uniform_buffer(ctx, &params);
        let bind_group = bind_buffers(
            ctx.device(),
            &pipeline,
            Kernel::FlashForward,
            &[
                ("params", &params),
                ("q", bufs.q.buffer()),
                ("k", bufs.k.buffer()),
                ("v", bufs.v.buffer()),
                ("out", bufs.out.buffer()),
                ("lse", bufs.lse.buffer()),
                ("state", state),
                ("block_mask", mask_buffer),
            ],
        )?;
        // One compute pass per key pass, so each sees the state the previous one wrote.
        let mut pass = encoder
            .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("wattn flash"), timestamp_writes: None });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
    }
    Ok(())
}

/// The flash variants a build should compile: each preset × dtype × head-dim bucket
/// (every equal pair up to 256 and a few asymmetric ones, as in MLA) on WebGPU's default
/// 16 KiB of workgroup memory and on 32 and 64 KiB devices, which moves Q in or out of
/// workgroup memory, each dense and block-sparse. Variants whose tiles a limit does not
/// admit are left out, as [`encode`] would refuse them. The shader tests validate and
/// translate every one.
pub fn validation_keys() -> Vec<ShaderKey> {
    let equal = (1..=16).map(|i| (16 * i, 16 * i));
    let asymmetric = [(192, 128), (64, 256), (256, 16), (128, 64), (16, 256), (96, 32)];
    let head_dims: Vec<(usize, usize)> = equal.chain(asymmetric).collect();
    let mut keys: Vec<ShaderKey> = Vec::new();
    for storage in [16 << 10, 32 << 10, 64 << 10] {
        let limits = wgpu::Limits { max_compute_workgroup_storage_size: storage, ..wgpu::Limits::default() };
        for config in [FlashConfig::PORTABLE, FlashConfig::CPU, FlashConfig::GPU] {
            for dtype in [DType::F32, DType::F16] {
                for &(d_qk, d_v) in &head_dims {
                    let shape = AttentionShape { batch: 1, q_heads: 1, kv_heads: 1, n_q: 1, n_k: 1, d_qk, d_v };
                    for block_sparse in [false, true] {
                        let key = variant_key(&config, &limits, dtype, &shape, block_sparse);
                        if config.check(&limits, &shape).is_ok() && !keys.contains(&key) {
                            keys.push(key);
                        }
                    }
                }
            }
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shader::tests::declared_workgroup_bytes;

    #[test]
    fn text_form_round_trips_and_refuses_other_text() {
        for (_, preset) in FlashConfig::PRESETS {
            assert_eq!(preset.to_string().parse::<FlashConfig>().unwrap(), preset);
        }
        assert_eq!(
            " 16, 32,4 ,64".parse::<FlashConfig>().unwrap(),
            FlashConfig { block_q: 16, block_k: 32, threads_per_row: 4, d_chunk: 64 }
        );
        for bad in ["16,32,4", "16,32,4,64,1", "a,b,c,d", "", "16,32,-4,64"] {
            let e = bad.parse::<FlashConfig>().unwrap_err();
            assert!(matches!(e, Error::Option(_)) && e.to_string().contains(&format!("'{bad}'")), "{bad}: {e}");
        }
    }

    /// The estimate [`FlashConfig::check`] holds against the device's limit is what the
    /// shader declares, as Dawn counts it.
    #[test]
    fn workgroup_estimate_matches_the_shader() {
        for storage in [16 << 10, 32 << 10, 64 << 10] {
            let limits = wgpu::Limits { max_compute_workgroup_storage_size: storage, ..wgpu::Limits::default() };
            for config in [
                FlashConfig::PORTABLE,
                FlashConfig::CPU,
                FlashConfig::GPU,
                FlashConfig { block_q: 1, block_k: 2, threads_per_row: 2, d_chunk: 16 },
            ] {
                for (d_qk, d_v) in [(16, 16), (64, 64), (128, 128), (80, 48), (256, 256)] {
                    let shape = AttentionShape { batch: 1, q_heads: 1, kv_heads: 1, n_q: 1, n_k: 1, d_qk, d_v };
                    let v = Variant::new(&config, &limits, &shape);
                    let key = variant_key(&config, &limits, DType::F32, &shape, false);
                    let estimate = config.workgroup_bytes(v.q_resident, v.dqk_pad, v.d_chunk);
                    assert_eq!(estimate, declared_workgroup_bytes(&key), "{}", key.label());
                }
            }
        }
    }
}
