//! The tiled flash-attention forward kernel (`shaders/flash_fwd.wgsl`): its parameters,
//! tile configurations, and the host functions that record a dispatch, dense or
//! restricted to a block mask.

use super::{AttentionBuffers, AttentionOptions, AttentionShape};
use crate::context::Context;
use crate::dispatch::{bind_buffers, check_grid, uniform_buffer, wrapped_grid};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::mask::{BlockSize, GpuBlockMask};
use crate::shader::{ConstValue, Kernel, ShaderKey, workgroup_array_bytes};
use crate::tensor::{TensorView, check_binding_size};

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

/// Head-dim columns per thread above which only 4 rows per thread are allowed.
const MAX_COLUMNS_FOR_8_ROWS: u32 = 64;

/// Head-dim columns per thread of the presets: llvmpipe compiled whole rows of d64 in 8 s
/// and of d128 in three minutes (superlinear in the code per thread).
const MAX_COLUMNS_PER_THREAD: u32 = 64;

/// Tile sizes of the flash kernel. Chosen per adapter class and head dim by
/// [`FlashConfig::for_shape`] from measurements (see docs/tuning.md), or set by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlashConfig {
    /// Query rows per workgroup: a multiple of `rows_per_thread`.
    pub block_q: u32,
    /// Keys per K/V tile: a multiple of 4.
    pub block_k: u32,
    /// Query rows each thread keeps in registers: 4 or 8.
    pub rows_per_thread: u32,
    /// Threads sharing those rows, each owning a slice of the head dims: 1, 2 or 4.
    pub threads_per_row: u32,
    /// How the threads get each K/V tile.
    pub kv_reads: KvReads,
}

/// How the flash kernel's threads get each K/V tile (the `S` of [`FlashConfig`]'s text form).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvReads {
    /// `0`: each thread reads the keys it needs straight from memory (a workgroup of one
    /// subgroup on a CPU adapter, where the threads' reads of a key are one load: no barriers).
    Memory,
    /// `1`: the workgroup stages the tile in workgroup memory (GPUs: coalesced loads shared by
    /// every thread; two barriers per tile).
    Workgroup,
    /// `2`: each thread of a workgroup that is one subgroup reads its slice of the rows of
    /// its own keys and subgroup shuffles hand them to the threads with the same slice: one
    /// load brings a word for every thread instead of the same word to all (llvmpipe: 1.4x
    /// `Memory` at d64). Needs tiles of a multiple of the groups of threads sharing rows and
    /// subgroups of exactly the workgroup's size; threads sharing rows sum their partial
    /// scores by shuffles too (no workgroup memory, no barriers).
    Subgroup,
}

impl FlashConfig {
    /// Fits WebGPU's default 16 KiB of workgroup memory and 256 invocations for every head
    /// dim: 32 rows of 8 threads' 4 rows, the head dims split over 4 threads, K/V tiles of 4
    /// keys staged in workgroup memory.
    pub const PORTABLE: Self =
        Self { block_q: 32, block_k: 4, rows_per_thread: 4, threads_per_row: 4, kv_reads: KvReads::Workgroup };
    /// Software rasterisers (llvmpipe, SwiftShader, WARP): whole rows per thread and K/V read
    /// straight from memory by a workgroup of 8 threads (one subgroup on llvmpipe: no
    /// barriers), with head dims above 64 split over 2 or 4 threads ([`Self::fitted`]).
    /// 2.2x [`Self::PORTABLE`] on llvmpipe at d64 (docs/tuning.md).
    pub const CPU: Self =
        Self { block_q: 32, block_k: 16, rows_per_thread: 4, threads_per_row: 1, kv_reads: KvReads::Memory };
    /// [`Self::CPU`] with K/V rows handed out by subgroup shuffles, for CPU adapters whose
    /// subgroups are exactly its 8 threads (llvmpipe): 1.4x [`Self::CPU`] at d64. Head dims
    /// above 64 keep the workgroup one subgroup with fewer rows ([`Self::fitted`]).
    pub const CPU_SUBGROUP: Self = Self { kv_reads: KvReads::Subgroup, ..Self::CPU };
    /// [`Self::CPU_SUBGROUP`] for CPU adapters whose subgroups are 4 threads (SwiftShader,
    /// Chromium's WebGPU without a GPU): 16 rows per workgroup of 4 threads.
    pub const CPU_SUBGROUP_4: Self = Self { block_q: 16, ..Self::CPU_SUBGROUP };
    /// Discrete and integrated GPUs: as portable, with tiles of 8 keys.
    pub const GPU: Self =
        Self { block_q: 32, block_k: 8, rows_per_thread: 4, threads_per_row: 4, kv_reads: KvReads::Workgroup };
    /// Every preset with its name, as `wattn info` and the tuner name them.
    pub const PRESETS: [(&'static str, Self); 5] = [
        ("PORTABLE", Self::PORTABLE),
        ("CPU", Self::CPU),
        ("CPU_SUBGROUP", Self::CPU_SUBGROUP),
        ("CPU_SUBGROUP_4", Self::CPU_SUBGROUP_4),
        ("GPU", Self::GPU),
    ];

    /// The preset for `ctx`'s adapter class (for a CPU adapter whose subgroups are exactly
    /// 8 or 4 threads, the subgroup preset of that size), falling back to [`Self::PORTABLE`]
    /// when the preferred one does not fit the device's limits. Its block size is what block masks
    /// use ([`crate::BlockSize::for_adapter`]).
    pub fn for_adapter(ctx: &Context) -> Self {
        let mut preferred = Self::class_preset(ctx.adapter_info().device_type);
        if preferred == Self::CPU {
            let sized = [Self::CPU_SUBGROUP, Self::CPU_SUBGROUP_4].into_iter().find(|c| c.check_subgroups(ctx).is_ok());
            preferred = sized.unwrap_or(preferred);
        }
        let widest = AttentionShape { batch: 1, q_heads: 1, kv_heads: 1, n_q: 1, n_k: 1, d_qk: 256, d_v: 256 };
        if preferred.fitted(ctx.limits(), &widest).check(ctx.limits(), &widest).is_ok() {
            preferred
        } else {
            Self::PORTABLE
        }
    }

    /// This configuration fitted to `shape`'s head dims: a thread that would hold whole rows
    /// of more than [`MAX_COLUMNS_PER_THREAD`] columns shares them with 1 or 3 others, and 4
    /// rows per thread where 8 would hold more than [`MAX_COLUMNS_FOR_8_ROWS`] columns.
    /// Threads sharing rows with subgroup K/V reads keep the workgroup one subgroup by taking
    /// as many times fewer rows (llvmpipe: d128 in 0.68x the time of K/V staged in workgroup
    /// memory); the others keep the block size and stage K/V where the tiles fit.
    pub fn fitted(self, limits: &wgpu::Limits, shape: &AttentionShape) -> Self {
        let head_dim = Variant::new(shape).widest();
        let mut fitted = self;
        if self.threads_per_row == 1 && head_dim > MAX_COLUMNS_PER_THREAD {
            let threads_per_row = head_dim.div_ceil(MAX_COLUMNS_PER_THREAD).next_power_of_two().min(4);
            let shuffled = Self { block_q: self.block_q / threads_per_row, threads_per_row, ..self };
            let staged = Self { threads_per_row, kv_reads: KvReads::Workgroup, ..self };
            let direct = Self { threads_per_row, kv_reads: KvReads::Memory, ..self };
            fitted = match self.kv_reads {
                KvReads::Subgroup if shuffled.check(limits, shape).is_ok() => shuffled,
                _ if staged.check(limits, shape).is_ok() => staged,
                _ => direct,
            };
        }
        let four = Self { rows_per_thread: 4, ..fitted };
        if fitted.check(limits, shape).is_err() && four.check(limits, shape).is_ok() { four } else { fitted }
    }

    fn class_preset(device_type: wgpu::DeviceType) -> Self {
        match device_type {
            wgpu::DeviceType::Cpu => Self::CPU,
            wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu => Self::GPU,
            _ => Self::PORTABLE,
        }
    }

    /// The tiles as a block mask's block size.
    pub fn block_size(&self) -> BlockSize {
        BlockSize::new(self.block_q, self.block_k)
    }

    /// This configuration with tiles of `block` (a block mask's), other settings kept
    /// except rows per thread, which drop to 4 when `block.q` is not a multiple of 8, and
    /// subgroup K/V reads, which become reads from memory when the workgroup would no longer
    /// be the same subgroup or the tile not a multiple of its groups of threads sharing rows.
    pub fn with_block_size(self, block: BlockSize) -> Self {
        let rows_per_thread = if block.q.is_multiple_of(self.rows_per_thread) { self.rows_per_thread } else { 4 };
        let resized = Self { block_q: block.q, block_k: block.k, rows_per_thread, ..self };
        let wg = resized.workgroup_size();
        let same_subgroup = wg == self.workgroup_size() && block.k.is_multiple_of(resized.key_holders());
        match self.kv_reads {
            KvReads::Subgroup if !same_subgroup => Self { kv_reads: KvReads::Memory, ..resized },
            _ => resized,
        }
    }

    /// This configuration [fitted](Self::fitted) to `shape` with tiles of `block` (a block
    /// mask's): where fitting changes the tiles (subgroup reads of wide heads), the fitting
    /// of the same configuration reading K/V from memory, as the tiles stay.
    pub fn fitted_to_block(self, limits: &wgpu::Limits, shape: &AttentionShape, block: BlockSize) -> Self {
        let fitted = self.fitted(limits, shape);
        let keeps_tiles = if fitted.block_size() == self.block_size() {
            fitted
        } else {
            Self { kv_reads: KvReads::Memory, ..self }.fitted(limits, shape)
        };
        keeps_tiles.with_block_size(block)
    }

    fn workgroup_size(&self) -> u32 {
        self.block_q / self.rows_per_thread * self.threads_per_row
    }

    /// The threads that hold a tile's keys with subgroup K/V reads: one per group of threads
    /// sharing rows.
    fn key_holders(&self) -> u32 {
        self.block_q / self.rows_per_thread
    }

    /// Bytes of workgroup memory the kernel declares (see the shader: the staged K and V
    /// tiles, and the partial score tiles when threads share rows; one element each when
    /// unused).
    fn workgroup_bytes(&self, dqk_pad: u32, dv_pad: u32) -> u32 {
        let staged = |dim: u32| if self.kv_reads == KvReads::Workgroup { self.block_k * dim / 4 } else { 1 };
        let partials = if self.threads_per_row > 1 && self.kv_reads != KvReads::Subgroup {
            self.workgroup_size() * self.rows_per_thread / 4 * self.block_k / 4
        } else {
            1
        };
        workgroup_array_bytes(staged(dqk_pad), 16)
            + workgroup_array_bytes(staged(dv_pad), 16)
            + workgroup_array_bytes(partials, 64)
    }

    /// Checks the configuration against the kernel's rules and the device's limits.
    pub fn check(&self, limits: &wgpu::Limits, shape: &AttentionShape) -> Result<()> {
        let bad = |why: &str| Err(Error::Option(format!("flash config {self} ({self:?}): {why}")));
        if !matches!(self.rows_per_thread, 4 | 8) {
            return bad("rows_per_thread must be 4 or 8");
        }
        // A thread's slice of the head dims is whole vec4 columns of every padded head dim.
        if !matches!(self.threads_per_row, 1 | 2 | 4) {
            return bad("threads_per_row must be 1, 2 or 4");
        }
        if self.block_q == 0 || !self.block_q.is_multiple_of(self.rows_per_thread) {
            return bad("block_q must be a positive multiple of rows_per_thread");
        }
        if self.block_k == 0 || !self.block_k.is_multiple_of(4) {
            return bad("block_k must be a positive multiple of 4");
        }
        // Measured on llvmpipe: 8 rows of d128 per thread took minutes to compile, and spill
        // on GPUs. 8 rows per thread only while each thread holds at most 64 columns.
        let head_dim = Variant::new(shape).widest();
        if self.rows_per_thread == 8 && head_dim / self.threads_per_row > MAX_COLUMNS_FOR_8_ROWS {
            return bad(&format!(
                "8 rows of head dim {head_dim} over {} threads hold more than {MAX_COLUMNS_FOR_8_ROWS} columns per thread; use 4 rows",
                self.threads_per_row
            ));
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
        let holders = self.key_holders();
        if self.kv_reads == KvReads::Subgroup && !self.block_k.is_multiple_of(holders) {
            return bad(&format!(
                "subgroup K/V reads need block_k a multiple of the {holders} groups of threads sharing rows"
            ));
        }
        let v = Variant::new(shape);
        let bytes = self.workgroup_bytes(v.dqk_pad, v.dv_pad);
        if bytes > limits.max_compute_workgroup_storage_size {
            return Err(Error::Limit {
                what: format!("flash tiles {self} at head dim {}", shape.d_qk.max(shape.d_v)),
                needed: bytes as u64,
                allowed: limits.max_compute_workgroup_storage_size as u64,
                limit: "max_compute_workgroup_storage_size",
            });
        }
        Ok(())
    }

    /// Checks that `ctx`'s device runs this configuration's workgroup as one subgroup, which
    /// [`KvReads::Subgroup`] needs: subgroups of exactly the workgroup's size. Other
    /// configurations pass.
    pub fn check_subgroups(&self, ctx: &Context) -> Result<()> {
        if self.kv_reads != KvReads::Subgroup {
            return Ok(());
        }
        let info = ctx.adapter_info();
        let wg = self.workgroup_size();
        let (min, max) = (info.subgroup_min_size, info.subgroup_max_size);
        if ctx.capabilities().subgroups && min == wg && max == wg {
            return Ok(());
        }
        let has =
            if ctx.capabilities().subgroups { format!("subgroups of {min} to {max}") } else { "no subgroups".into() };
        Err(Error::Option(format!(
            "flash config {self} reads K/V through subgroup shuffles, which needs subgroups of exactly {wg} threads; this device has {has}"
        )))
    }

    /// How many keys one dispatch may walk on an adapter that stops loops after
    /// `loop_limit` iterations per invocation (llvmpipe), or `None` for no limit.
    /// The count is an upper bound on the iterations of the shader's loops per K/V tile,
    /// assuming the compiler unrolls none of them and every tile takes the element-wise
    /// path: keep it in sync with flash_fwd.wgsl.
    pub fn keys_per_pass(&self, shape: &AttentionShape, loop_limit: Option<u32>) -> Option<u32> {
        let loop_limit = loop_limit?;
        let v = Variant::new(shape);
        let wg = self.workgroup_size();
        let (rg, tpr, steps) = (self.rows_per_thread / 4, self.threads_per_row, self.block_k / 4);
        let (qk4, dv4) = (v.dqk_pad / 4, v.dv_pad / 4);
        let (qk4_t, dv4_t) = (qk4 / tpr, dv4 / tpr);
        let staging = match self.kv_reads {
            KvReads::Memory => 0,
            KvReads::Workgroup => (self.block_k * qk4).div_ceil(wg) + (self.block_k * dv4).div_ceil(wg),
            KvReads::Subgroup => (self.block_k / self.key_holders()) * (1 + qk4_t + dv4_t),
        };
        let scores = steps * (1 + qk4_t * (1 + 4 + rg));
        let partials = if tpr > 1 { rg * steps * (2 + tpr) } else { 0 };
        let softmax = rg * (1 + 2 * steps * (1 + 4));
        let pv = dv4_t * (1 + 2 * rg + steps * (1 + 4 + rg * (1 + 4 * (1 + 4))));
        let per_tile = 1 + staging + scores + partials + softmax + pv;
        // Once per pass: loading Q and the state, storing the state or O, and (block-sparse
        // variants) the binary search for the pass's first run, at most 32 steps.
        let per_pass = rg * (qk4_t * 5 + 2 * 4 * (1 + dv4_t * 5)) + 32;
        let budget = (loop_limit as f64 * 0.9) as u32;
        let tiles = (budget.saturating_sub(per_pass) / per_tile).max(1);
        Some(tiles * self.block_k)
    }
}

/// `BQ,BK,R,T,S`: block_q, block_k, rows_per_thread, threads_per_row and kv_reads (0 memory,
/// 1 workgroup, 2 subgroup), the form `wattn bench --config` takes.
impl std::fmt::Display for FlashConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self { block_q, block_k, rows_per_thread, threads_per_row, kv_reads } = self;
        let s = match kv_reads {
            KvReads::Memory => 0,
            KvReads::Workgroup => 1,
            KvReads::Subgroup => 2,
        };
        write!(f, "{block_q},{block_k},{rows_per_thread},{threads_per_row},{s}")
    }
}

impl std::str::FromStr for FlashConfig {
    type Err = Error;

    /// Parses [`FlashConfig`]'s `Display` form; the configuration is checked when used.
    fn from_str(text: &str) -> Result<Self> {
        let bad = || Error::Option(format!("flash config '{text}': expected BQ,BK,R,T,S (e.g. 64,16,8,1,0)"));
        let numbers: Vec<u32> = text
            .split(',')
            .map(|s| s.trim().parse::<u32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad())?;
        let [block_q, block_k, rows_per_thread, threads_per_row, stage] = numbers[..] else {
            return Err(bad());
        };
        let kv_reads = match stage {
            0 => KvReads::Memory,
            1 => KvReads::Workgroup,
            2 => KvReads::Subgroup,
            _ => return Err(bad()),
        };
        Ok(Self { block_q, block_k, rows_per_thread, threads_per_row, kv_reads })
    }
}

/// The compile-time shape of one flash pipeline, besides its configuration.
struct Variant {
    dqk_pad: u32,
    dv_pad: u32,
    /// Whether every row starts on a vec4 word: both head dims are multiples of 4.
    aligned: bool,
    /// Whether Dqk has columns short of its padded width, which K's loads must zero.
    qk_tail: bool,
}

impl Variant {
    /// The wider padded head dim.
    fn widest(&self) -> u32 {
        self.dqk_pad.max(self.dv_pad)
    }

    fn new(shape: &AttentionShape) -> Self {
        let dqk_pad = (shape.d_qk as u32).next_multiple_of(HEAD_DIM_GRANULE);
        let dv_pad = (shape.d_v as u32).next_multiple_of(HEAD_DIM_GRANULE);
        let aligned = shape.d_qk.is_multiple_of(4) && shape.d_v.is_multiple_of(4);
        Self { dqk_pad, dv_pad, aligned, qk_tail: dqk_pad != shape.d_qk as u32 }
    }
}

/// What a launch runs besides its tiles, dtype and head dims: the `BLOCK_SPARSE` and `VARLEN`
/// constants of the variant (of the forward's and the backward's kernels).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Only the tiles a block mask lists.
    pub block_sparse: bool,
    /// Sequences packed along the sequence axis ([`super::varlen`]).
    pub varlen: bool,
}

fn variant_key(config: &FlashConfig, dtype: DType, shape: &AttentionShape, layout: Layout) -> ShaderKey {
    let v = Variant::new(shape);
    ShaderKey {
        kernel: Kernel::FlashForward,
        entry_point: "main",
        dtype,
        constants: vec![
            ("BLOCK_Q", ConstValue::U32(config.block_q)),
            ("BLOCK_K", ConstValue::U32(config.block_k)),
            ("ROW_GROUPS", ConstValue::U32(config.rows_per_thread / 4)),
            ("SPLIT", ConstValue::U32(config.threads_per_row)),
            ("STAGE_KV", ConstValue::Bool(config.kv_reads == KvReads::Workgroup)),
            ("SHUFFLE_KV", ConstValue::Bool(config.kv_reads == KvReads::Subgroup)),
            ("DQK_PAD", ConstValue::U32(v.dqk_pad)),
            ("DV_PAD", ConstValue::U32(v.dv_pad)),
            ("ALIGNED", ConstValue::Bool(v.aligned)),
            ("QK_TAIL", ConstValue::Bool(v.qk_tail)),
            ("BLOCK_SPARSE", ConstValue::Bool(layout.block_sparse)),
            ("VARLEN", ConstValue::Bool(layout.varlen)),
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
    if let Some(mask) = mask {
        mask.check(&shape, config)?;
    }
    record(ctx, encoder, bufs, &shape, mask, options, config, None)
}

/// The grid of a launch over packed sequences and what its kernel reads of them
/// ([`super::varlen`]).
pub(crate) struct PackedGrid<'a> {
    /// Each query block's `SequenceBlock`.
    pub query_blocks: &'a wgpu::Buffer,
    /// The query blocks of every sequence.
    pub blocks: u32,
    /// The longest sequence's keys: the key passes walk `0..max_n_k` in each sequence's own keys.
    pub max_n_k: u32,
}

/// Records the passes of one flash launch of `shape` (for packed sequences, the packed
/// tensors' shape) on buffers and a mask already checked against it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn record(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    bufs: &AttentionBuffers<'_>,
    shape: &AttentionShape,
    mask: Option<&GpuBlockMask>,
    options: &AttentionOptions,
    config: &FlashConfig,
    packed: Option<&PackedGrid<'_>>,
) -> Result<()> {
    config.check(ctx.limits(), shape)?;
    config.check_subgroups(ctx)?;
    let heads = shape.q_heads as u32;
    let groups = match packed {
        // (Query block, head) pairs, wrapped into z past the per-dimension limit (the packed
        // tensors' batch is 1).
        Some(p) => {
            let pairs = p.blocks as u64 * heads as u64;
            let [x, z] = wrapped_grid(ctx.limits(), &format!("flash grid: {pairs} query blocks x heads"), pairs)?;
            [x, 1, z]
        }
        None => [(shape.n_q as u32).div_ceil(config.block_q), heads, shape.batch as u32],
    };
    for (what, g) in ["query blocks", "query heads", "batch"].iter().zip(groups) {
        check_grid(ctx.limits(), &format!("flash grid: {g} {what}"), g)?;
    }
    for (what, view) in [("Q", &bufs.q), ("K", &bufs.k), ("V", &bufs.v)] {
        check_whole_words(what, view)?;
    }
    let layout = Layout { block_sparse: mask.is_some(), varlen: packed.is_some() };
    let key = variant_key(config, bufs.q.dtype(), shape, layout);
    let pipeline = ctx.pipelines.get(ctx.device(), &key)?;
    let n_k = packed.map_or(shape.n_k as u32, |p| p.max_n_k);
    let keys_per_pass = config.keys_per_pass(shape, ctx.loop_iteration_limit()).unwrap_or(n_k);
    let passes = n_k.div_ceil(keys_per_pass);
    // The carried (m, l, o) of every row, only when there is more than one pass.
    let own_state;
    let state = if passes > 1 {
        let floats = shape.batch * shape.q_heads * shape.n_q * (Variant::new(shape).dv_pad as usize + 2);
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
    // Dense variants never read the mask or the query blocks, but their layouts still have
    // them: one read-only stand-in serves both.
    let mask_buffer = mask.map_or_else(|| ctx.unused_binding(1), |m| m.buffer());
    let query_blocks = packed.map_or_else(|| ctx.unused_binding(1), |p| p.query_blocks);
    let base = FlashParams::new(shape, options);
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
                ("query_blocks", query_blocks),
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

/// The flash variants a build should compile: each preset and the CPU preset with 8 rows per
/// thread, each [fitted](FlashConfig::fitted) to the shape, × dtype × head-dim bucket (every equal pair up to 256, a few asymmetric
/// ones as in MLA, and a few not multiples of 4) on WebGPU's default 16 KiB of workgroup
/// memory and on 32 KiB devices, each dense and block-sparse; the varlen variants of a few of
/// those head dims (one aligned, one not, the widest), dense and block-sparse. Variants whose
/// tiles a limit does not admit are left out, as [`encode`] would refuse them. The shader
/// tests validate and translate every one.
pub fn validation_keys() -> Vec<ShaderKey> {
    let equal = (1..=16).map(|i| (16 * i, 16 * i));
    let asymmetric = [(192, 128), (64, 256), (256, 16), (128, 64), (16, 256), (96, 32)];
    // Not multiples of 16 (K's tail columns masked), and not of 4 (rows straddling words).
    let unaligned = [(40, 40), (90, 30), (3, 3), (37, 21), (255, 255)];
    let head_dims: Vec<(usize, usize)> = equal.chain(asymmetric).chain(unaligned).collect();
    let varlen_head_dims = [(64, 64), (37, 21), (256, 256)];
    let cpu_8_rows = FlashConfig { rows_per_thread: 8, ..FlashConfig::CPU };
    let mut keys: Vec<ShaderKey> = Vec::new();
    for storage in [16 << 10, 32 << 10] {
        let limits = wgpu::Limits { max_compute_workgroup_storage_size: storage, ..wgpu::Limits::default() };
        for preset in FlashConfig::PRESETS.map(|(_, preset)| preset).into_iter().chain([cpu_8_rows]) {
            for dtype in [DType::F32, DType::F16] {
                for &(d_qk, d_v) in &head_dims {
                    let shape = AttentionShape { batch: 1, q_heads: 1, kv_heads: 1, n_q: 1, n_k: 1, d_qk, d_v };
                    let config = preset.fitted(&limits, &shape);
                    let varlen_too = varlen_head_dims.contains(&(d_qk, d_v));
                    for varlen in [false, true].into_iter().filter(|&v| !v || varlen_too) {
                        for block_sparse in [false, true] {
                            let key = variant_key(&config, dtype, &shape, Layout { block_sparse, varlen });
                            if config.check(&limits, &shape).is_ok() && !keys.contains(&key) {
                                keys.push(key);
                            }
                        }
                    }
                }
            }
        }
    }
    keys
}

/// Checks that `view`'s buffer holds its elements rounded up to whole vec4 words, which the
/// kernel reads; always true when the head dim is a multiple of 4, and for [`Tensor`]s.
pub(crate) fn check_whole_words(what: &str, view: &TensorView<'_>) -> Result<()> {
    let word = 4 * view.dtype().size() as u64;
    let needed = (view.numel() as u64 * view.dtype().size() as u64).next_multiple_of(word);
    if view.buffer().size() < needed {
        return Err(Error::Shape(format!(
            "{what}: buffer of {} bytes; the flash kernel reads whole {word}-byte words, so it needs {needed}",
            view.buffer().size()
        )));
    }
    Ok(())
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
            " 64, 16,8 ,1,0".parse::<FlashConfig>().unwrap(),
            FlashConfig { block_q: 64, block_k: 16, rows_per_thread: 8, threads_per_row: 1, kv_reads: KvReads::Memory }
        );
        for bad in ["16,32,4,64", "64,16,8,1,3", "a,b,c,d,e", "", "16,32,-4,64,1"] {
            let e = bad.parse::<FlashConfig>().unwrap_err();
            assert!(matches!(e, Error::Option(_)) && e.to_string().contains(&format!("'{bad}'")), "{bad}: {e}");
        }
    }

    /// The estimate [`FlashConfig::check`] holds against the device's limit is what the
    /// shader declares, as Dawn counts it.
    #[test]
    fn workgroup_estimate_matches_the_shader() {
        let small = FlashConfig {
            block_q: 8,
            block_k: 8,
            rows_per_thread: 8,
            threads_per_row: 2,
            kv_reads: KvReads::Workgroup,
        };
        for config in [FlashConfig::PORTABLE, FlashConfig::GPU, FlashConfig::CPU, small] {
            for (d_qk, d_v) in [(16, 16), (64, 64), (128, 128), (80, 48), (256, 256)] {
                let shape = AttentionShape { batch: 1, q_heads: 1, kv_heads: 1, n_q: 1, n_k: 1, d_qk, d_v };
                let v = Variant::new(&shape);
                let key = variant_key(&config, DType::F32, &shape, Layout { block_sparse: false, varlen: false });
                let estimate = config.workgroup_bytes(v.dqk_pad, v.dv_pad);
                assert_eq!(estimate, declared_workgroup_bytes(&key), "{}", key.label());
            }
        }
    }

    /// The presets fit WebGPU's defaults, or the devices they are for.
    #[test]
    fn presets_fit_their_devices() {
        let widest = AttentionShape { batch: 1, q_heads: 1, kv_heads: 1, n_q: 1, n_k: 1, d_qk: 256, d_v: 256 };
        let webgpu = wgpu::Limits::default();
        FlashConfig::PORTABLE.check(&webgpu, &widest).unwrap();
        let cpu_8_rows = FlashConfig { rows_per_thread: 8, ..FlashConfig::CPU };
        for config in [FlashConfig::CPU, cpu_8_rows] {
            let fitted = config.fitted(&webgpu, &widest);
            fitted.check(&webgpu, &widest).unwrap();
            assert_eq!(fitted.threads_per_row, 4, "d256 over 4 threads");
        }
        assert!(cpu_8_rows.check(&webgpu, &widest).is_err(), "8 rows of d256 per thread");
        let gpu = wgpu::Limits { max_compute_workgroup_storage_size: 32 << 10, ..webgpu };
        FlashConfig::GPU.check(&gpu, &widest).unwrap();
    }

    /// Subgroup reads of wide heads keep the workgroup (one subgroup) and give up rows; a
    /// block mask's tiles stay as they are.
    #[test]
    fn subgroup_fitting_keeps_the_workgroup_and_masks_keep_their_tiles() {
        let limits = wgpu::Limits::default();
        let cases = [(64, 1), (128, 2), (192, 4), (256, 4)];
        for (preset, d, threads_per_row) in cases
            .map(|(d, t)| (FlashConfig::CPU_SUBGROUP, d, t))
            .into_iter()
            .chain(cases.map(|(d, t)| (FlashConfig::CPU_SUBGROUP_4, d, t)))
        {
            let block_q = preset.block_q / threads_per_row;
            let shape = AttentionShape { batch: 1, q_heads: 1, kv_heads: 1, n_q: 1, n_k: 1, d_qk: d, d_v: d };
            let fitted = preset.fitted(&limits, &shape);
            assert_eq!(
                (fitted.block_q, fitted.threads_per_row, fitted.kv_reads),
                (block_q, threads_per_row, KvReads::Subgroup)
            );
            assert_eq!(fitted.workgroup_size(), preset.workgroup_size(), "{preset} d{d}");
            fitted.check(&limits, &shape).unwrap();
            let masked = preset.fitted_to_block(&limits, &shape, preset.block_size());
            assert_eq!(masked.block_size(), preset.block_size(), "d{d}");
            masked.check(&limits, &shape).unwrap();
        }
    }
}
