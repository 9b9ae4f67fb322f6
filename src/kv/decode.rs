//! Split-KV decode (flash-decoding, `shaders/decode.wgsl` then `shaders/combine.wgsl`):
//! a few queries, or a prefill chunk, against a [`KvCache`].
//!
//! The queries are the last `Nq` tokens appended to the layer; query i sees the cached keys
//! whose position is at most its own (so a chunk attends to the cache and, causally, to
//! itself). The cache's filled slots are cut into `splits` ranges, each scanned by its own
//! workgroups, and the partial (output, LSE) pairs are merged. A workgroup serves all query
//! heads of one KV head (GQA), so each K/V tile is read once for the whole group.

use super::cache::{KvCache, KvParams};
use super::combine::{self, Merge};
use super::{EvictionPolicy, KvCacheConfig, PositionMode, RopeLayout};
use crate::attention::AttentionOutput;
use crate::context::Context;
use crate::dispatch::{bind_buffers, check_grid, scratch, uniform_buffer, wrapped_grid};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shader::{ConstValue, Kernel, ShaderKey, workgroup_array_bytes};
use crate::tensor::{Tensor, TensorView, check_u32_indexing};

/// Uniform parameters of `decode.wgsl`.
/// Keep in sync with `struct Params` there (a test compares the layouts).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DecodeParams {
    /// B.
    pub batch: u32,
    /// Hq.
    pub q_heads: u32,
    /// Hkv.
    pub kv_heads: u32,
    /// Nq: the queries are the last `n_q` tokens appended.
    pub n_q: u32,
    /// D, of Q, K, V and O.
    pub head_dim: u32,
    /// Slots per (sequence, KV head).
    pub capacity: u32,
    /// Slots `[0, len)` hold tokens.
    pub len: u32,
    /// Tokens appended so far; query i has position `seen - n_q + i`.
    pub seen: u32,
    /// Slots per split ([`DecodePlan::keys_per_split`]).
    pub keys_per_split: u32,
    /// RoPE inside the kernel: 0 none, 1 [`RopeLayout::NeoX`], 2 [`RopeLayout::Interleaved`].
    pub rope: u32,
    /// Re-indexing: positions below this (the sinks) are rotated at themselves.
    pub rope_sinks: u32,
    /// Re-indexing: any other position p is rotated at `p - rope_shift`.
    pub rope_shift: u32,
    /// Softmax scale, resolved (1/sqrt(D) by default).
    pub scale: f32,
    /// Paged: log2 of the tokens per page.
    pub page_shift: u32,
    /// Paged: block-table entries of each sequence that hold its first tokens (the sinks).
    pub sink_pages: u32,
    /// Paged: positions below this are retained.
    pub sinks: u32,
    /// Paged: so are the `window` most recent (`u32::MAX`: every token).
    pub window: u32,
    /// Paged int8: the word of the V pool where the scales begin.
    pub scales_at: u32,
    /// Paged int8 with K per channel: the word of the K pool where the channel exponents begin.
    pub k_scales_at: u32,
}

/// How to attend.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DecodeOptions {
    /// Softmax scale; `None` means 1/sqrt(D).
    pub scale: Option<f32>,
    /// Ranges the cache is split into; `None` chooses from the adapter and the cache length
    /// ([`KvCache::plan`]). Never more than the cache has tiles of keys, and never fewer
    /// than an adapter with a loop-iteration cap needs.
    pub splits: Option<u32>,
}

/// The caller's buffers of a decode call: queries `q` `[B, Hq, Nq, D]` and outputs `out`
/// `[B, Hq, Nq, D]` in the cache's dtype, `lse` `[B, Hq, Nq]` f32.
#[derive(Clone, Copy, Debug)]
pub struct DecodeBuffers<'a> {
    /// Queries, `[B, Hq, Nq, D]`: the last Nq tokens appended (before RoPE when re-indexed).
    pub q: TensorView<'a>,
    /// Output O, `[B, Hq, Nq, D]`, written by the call.
    pub out: TensorView<'a>,
    /// Log-sum-exp (natural log), `[B, Hq, Nq]` f32, written by the call.
    pub lse: TensorView<'a>,
}

/// How a decode call is laid out on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    /// Ranges of slots scanned by their own workgroups, then merged.
    pub splits: u32,
    /// Slots per split (the last may have fewer).
    pub keys_per_split: u32,
    /// Query rows (query head of the group × query) per workgroup.
    pub rows_per_block: u32,
    /// Slots per tile: what one group of threads takes at a time (a workgroup takes
    /// several tiles side by side); no split is smaller.
    pub block_k: u32,
}

/// The most splits the automatic choice makes: beyond it the combine costs more than it gains.
pub const MAX_AUTO_SPLITS: u32 = 256;
/// The fewest workgroup tiles of keys an automatic split gets: a split pays for loading its
/// Q tile, merging its key groups and writing a partial, about what a tile of keys costs.
const MIN_AUTO_TILES_PER_SPLIT: u32 = 4;
/// The most 4-row register tiles one thread holds.
const MAX_ROW_TILES: u32 = 4;

/// The features of a cache that change the decode kernel (compile-time constants: a branch
/// left in the key loop, even never taken, keeps llvmpipe from unrolling it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Features {
    /// RoPE inside the kernel (re-indexed positions).
    pub(crate) rope: bool,
    /// Store each row's logits per slot, for heavy-hitter scores.
    pub(crate) logits: bool,
    /// K/V in a page pool, read through block tables (`super::paged`).
    pub(crate) paged: bool,
    /// K/V words of int8 with a scale per row (paged pools only).
    pub(crate) int8: bool,
    /// With int8: K scaled per (page, KV head, channel) instead of per row.
    pub(crate) channel_k: bool,
}

impl Features {
    pub(crate) const DENSE: Features =
        Features { rope: false, logits: false, paged: false, int8: false, channel_k: false };

    /// Every combination a cache can have (heavy hitters need absolute positions; K per
    /// channel needs both absolute positions and no heavy hitters).
    const ALL: [Features; 10] = [
        Features::DENSE,
        Features { rope: true, ..Features::DENSE },
        Features { logits: true, ..Features::DENSE },
        Features { paged: true, ..Features::DENSE },
        Features { paged: true, int8: true, ..Features::DENSE },
        Features { paged: true, logits: true, ..Features::DENSE },
        Features { paged: true, int8: true, logits: true, ..Features::DENSE },
        Features { paged: true, rope: true, ..Features::DENSE },
        Features { paged: true, int8: true, rope: true, ..Features::DENSE },
        Features { paged: true, int8: true, channel_k: true, ..Features::DENSE },
    ];
}

/// The compile-time shape of one decode pipeline (see the header of `shaders/decode.wgsl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Variant {
    workgroup: u32,
    /// Threads splitting each key's head dim; the workgroup has `workgroup / lanes` key groups.
    lanes: u32,
    /// 4-row register tiles per thread: `4 * row_tiles` rows per workgroup.
    row_tiles: u32,
    /// 4-key steps per key group and tile.
    steps: u32,
    /// The head dim rounded up to a power of two (few variants; threads skip the words
    /// past the head dim).
    d_pad: u32,
    /// The head dim is a multiple of 4, so every K/V row starts on a word.
    aligned_rows: bool,
    features: Features,
}

impl Variant {
    /// The first shape of the adapter class's preset that the device's workgroup memory
    /// admits, with as many row tiles as `rows` need (fewer if none fits).
    ///
    /// CPU adapters (llvmpipe runs 8 threads as one SIMD vector and loads memory lane by
    /// lane, so each K/V element should be loaded by one thread only): 8 threads, each
    /// owning whole keys (`lanes` 1), 8 keys per thread and tile with one row tile (the
    /// step loop must stay small enough for the compiler to unroll); more lanes where the
    /// key groups' outputs do not fit. GPUs: 8 threads per key (16 past D = 128), so that
    /// consecutive threads read consecutive 16-byte words; 64 threads, 8 keys per group
    /// and tile, or 32 threads and 4 keys where that does not fit.
    pub(crate) fn choose(
        preset: Preset,
        limits: &wgpu::Limits,
        rows: usize,
        head_dim: usize,
        features: Features,
    ) -> Result<Self> {
        let head = head_dim as u32;
        // The shapes of `row_tiles` tiles in order of preference.
        let shapes = |row_tiles: u32| -> Vec<Self> {
            let shape = |lanes: u32, workgroup: u32, steps: u32| Self {
                workgroup,
                lanes,
                row_tiles,
                steps,
                d_pad: head.next_power_of_two().max(4 * lanes).max(16),
                // Paged pools pad their rows to whole words.
                aligned_rows: head_dim.is_multiple_of(4) || features.paged,
                features,
            };
            if preset == Preset::Cpu {
                let steps = (2 / row_tiles).max(1);
                [1, 2, 4, 8].map(|lanes| shape(lanes, 8, steps)).to_vec()
            } else {
                let lanes = if head <= 128 { 8 } else { 16 };
                [(lanes, 64, 2), (lanes, 64, 1), (lanes, 32, 2), (lanes, 32, 1), (2 * lanes, 32, 1)]
                    .map(|(lanes, workgroup, steps)| shape(lanes, workgroup, steps))
                    .to_vec()
            }
        };
        let allowed = limits.max_compute_workgroup_storage_size;
        let mut row_tiles = (rows as u32).div_ceil(4).next_power_of_two().min(MAX_ROW_TILES);
        loop {
            if let Some(v) = shapes(row_tiles).into_iter().find(|v| v.workgroup_bytes() <= allowed) {
                return Ok(v);
            }
            if row_tiles == 1 {
                return Err(Error::Limit {
                    what: format!("decode tiles at head dim {head_dim}"),
                    needed: shapes(1).iter().map(Self::workgroup_bytes).min().unwrap_or(0) as u64,
                    allowed: allowed as u64,
                    limit: "max_compute_workgroup_storage_size",
                });
            }
            row_tiles /= 2;
        }
    }

    /// The fewest slots an automatic split gets.
    pub(crate) fn min_auto_split_keys(&self) -> u32 {
        MIN_AUTO_TILES_PER_SPLIT * self.block_k()
    }

    fn key_groups(&self) -> u32 {
        self.workgroup / self.lanes
    }

    /// Rows per workgroup.
    fn block_r(&self) -> u32 {
        4 * self.row_tiles
    }

    /// Slots one key group takes at a time.
    fn group_keys(&self) -> u32 {
        4 * self.steps
    }

    /// Slots the workgroup takes at a time.
    fn block_k(&self) -> u32 {
        self.key_groups() * self.group_keys()
    }

    /// mat4x4s of the lanes' partial logits of two tiles (one, unused, with a single lane).
    fn parts(&self) -> u32 {
        if self.lanes > 1 { 2 * self.workgroup * self.row_tiles * self.steps } else { 1 }
    }

    /// Bytes of workgroup memory `decode.wgsl` declares.
    fn workgroup_bytes(&self) -> u32 {
        let tile_words = self.row_tiles * self.d_pad / 4;
        workgroup_array_bytes(tile_words, 64)
            + workgroup_array_bytes(self.key_groups() * tile_words, 64)
            + workgroup_array_bytes(self.parts(), 64)
            + 2 * workgroup_array_bytes(self.key_groups() * self.row_tiles, 16)
            + workgroup_array_bytes(1, 16)
    }

    /// The most slots one split may scan on an adapter that stops every shader after
    /// `loop_limit` loop iterations in total (see [`Context::loop_iteration_limit`]): the
    /// iterations of every loop of `decode.wgsl` and its barriers, counted per invocation,
    /// with a 10 % margin.
    fn max_keys_per_split(&self, loop_limit: u32) -> u32 {
        let Self { lanes, row_tiles: rt, steps, workgroup, .. } = *self;
        let (groups, row_words) = (self.key_groups(), self.d_pad / 4);
        let words = row_words.div_ceil(lanes);
        let slots = 1 + steps;
        let scores = 1 + words * (1 + rt + steps * (1 + rt));
        let reduce = if lanes > 1 { 1 + 2 * (1 + rt * steps) + rt * steps * lanes } else { 0 };
        let logit_writes = if self.features.logits { 4 * 5 } else { 0 };
        let softmax = 1 + rt * (1 + steps * (2 + logit_writes));
        let values = 1 + words * (1 + 2 * rt + steps * (1 + rt));
        let per_tile = 1 + slots + scores + reduce + softmax + values;
        let per_thread = (rt * row_words).div_ceil(workgroup);
        let queries = rt * 5 + 1 + per_thread * (1 + 4) + 1;
        let merge = 1 + rt + 1 + rt * (2 + 2 * groups) + 1 + per_thread * (1 + groups + 4 * 5) + rt * 5;
        let budget = (loop_limit as f64 * 0.9) as u32;
        (budget.saturating_sub(queries + merge) / per_tile).max(1) * self.block_k()
    }

    pub(crate) fn key(&self, dtype: DType) -> ShaderKey {
        ShaderKey {
            kernel: Kernel::Decode,
            entry_point: "main",
            dtype,
            constants: vec![
                ("WORKGROUP", ConstValue::U32(self.workgroup)),
                ("LANES", ConstValue::U32(self.lanes)),
                ("ROW_TILES", ConstValue::U32(self.row_tiles)),
                ("BLOCK_R", ConstValue::U32(self.block_r())),
                ("STEPS", ConstValue::U32(self.steps)),
                ("D_PAD", ConstValue::U32(self.d_pad)),
                ("ALIGNED_ROWS", ConstValue::Bool(self.aligned_rows)),
                ("ROPE", ConstValue::Bool(self.features.rope)),
                ("LOGITS", ConstValue::Bool(self.features.logits)),
                ("PAGED", ConstValue::Bool(self.features.paged)),
                ("INT8", ConstValue::Bool(self.features.int8)),
                ("CHANNEL_K", ConstValue::Bool(self.features.channel_k)),
                ("PARTS", ConstValue::U32(self.parts())),
            ],
        }
    }
}

/// The adapter classes decode has a preset for (see [`Variant::choose`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Preset {
    Cpu,
    Gpu,
}

impl Preset {
    pub(crate) fn for_adapter(info: &wgpu::AdapterInfo) -> Self {
        if info.device_type == wgpu::DeviceType::Cpu { Preset::Cpu } else { Preset::Gpu }
    }
}

/// Every decode variant [`KvCache::attend`] can build on CPU adapters and GPUs with 16, 32
/// or 64 KiB of workgroup memory, for validation.
pub fn validation_keys() -> Vec<ShaderKey> {
    let mut keys: Vec<ShaderKey> = Vec::new();
    for preset in [Preset::Cpu, Preset::Gpu] {
        for storage in [16 << 10, 32 << 10, 64 << 10] {
            let limits = wgpu::Limits { max_compute_workgroup_storage_size: storage, ..wgpu::Limits::default() };
            for rows in [1, 2, 4, 8, 16] {
                // Every padded head dim, with rows on whole words and not, with each feature set.
                for head_dim in (16..=256).step_by(16).flat_map(|d| [d, d - 2]) {
                    for (features, dtype) in Features::ALL.iter().flat_map(|&f| [(f, DType::F32), (f, DType::F16)]) {
                        let variant = Variant::choose(preset, &limits, rows, head_dim, features).expect("fits 16 KiB");
                        let key = variant.key(dtype);
                        if !keys.contains(&key) {
                            keys.push(key);
                        }
                    }
                }
            }
        }
    }
    keys
}

/// Workgroups that keep the adapter busy. wgpu does not report compute units, so this goes
/// by adapter class: a CPU adapter runs one workgroup per core; a GPU runs several small
/// workgroups per compute unit, and 512 fills the biggest (132 SMs) a few times over.
pub fn parallel_workgroups(info: &wgpu::AdapterInfo) -> u32 {
    match info.device_type {
        wgpu::DeviceType::Cpu => std::thread::available_parallelism().map_or(4, |n| n.get() as u32),
        wgpu::DeviceType::DiscreteGpu => 512,
        wgpu::DeviceType::IntegratedGpu => 128,
        _ => 64,
    }
}

/// The plan that cuts `len` slots into `requested` splits (`None`: `auto()`), capped at one
/// split per tile of keys and raised where the adapter caps loop iterations.
pub(crate) fn split_plan(
    ctx: &Context,
    variant: &Variant,
    len: u32,
    requested: Option<u32>,
    auto: impl FnOnce() -> u32,
) -> Result<DecodePlan> {
    let requested = match requested {
        Some(0) => return Err(Error::Option("splits must be at least 1".into())),
        Some(n) => n,
        None => auto(),
    };
    let tiles = len.div_ceil(variant.group_keys());
    let fewest = ctx.loop_iteration_limit().map_or(1, |limit| len.div_ceil(variant.max_keys_per_split(limit)));
    let keys_per_split = len.div_ceil(requested.max(fewest).min(tiles));
    Ok(DecodePlan {
        splits: len.div_ceil(keys_per_split),
        keys_per_split,
        rows_per_block: variant.block_r(),
        block_k: variant.group_keys(),
    })
}

/// One decode launch, recorded by [`record`]: the kernel with its buffers bound by name, its
/// grid, and the merge of its splits.
pub(crate) struct Launch<'a> {
    pub(crate) pipeline: &'a wgpu::ComputePipeline,
    pub(crate) bindings: Vec<(&'static str, &'a wgpu::Buffer)>,
    pub(crate) grid: [u32; 3],
    pub(crate) merge: Merge<'a>,
}

/// Records `launch` (decode then combine) into `pass`.
pub(crate) fn record(ctx: &Context, pass: &mut wgpu::ComputePass<'_>, launch: &Launch<'_>) -> Result<()> {
    let group = bind_buffers(ctx.device(), launch.pipeline, Kernel::Decode, &launch.bindings)?;
    pass.set_pipeline(launch.pipeline);
    pass.set_bind_group(0, &group, &[]);
    let [x, y, z] = launch.grid;
    pass.dispatch_workgroups(x, y, z);
    combine::dispatch(ctx, pass, &launch.merge)
}

/// Checks queries `bufs.q` `[S, Hq, Nq, D]` of `dtype` and their outputs against a cache of
/// `sequences` sequences (or batch) of `kv_heads` heads of `head_dim`; returns (Hq, Nq).
pub(crate) fn check_query_buffers(
    ctx: &Context,
    bufs: &DecodeBuffers<'_>,
    sequences: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
) -> Result<(usize, usize)> {
    let DecodeBuffers { q, out, lse } = bufs;
    if q.shape().len() != 4 {
        return Err(Error::Rank { what: "Q", expected: "4 [B, Hq, Nq, D]".into(), got: q.shape().to_vec() });
    }
    if q.shape().contains(&0) {
        return Err(Error::Empty { what: "Q", shape: q.shape().to_vec() });
    }
    let (b, q_heads, n_q, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    if b != sequences || d != head_dim {
        return Err(Error::Shape(format!(
            "Q {:?} must have the cache's batch {sequences} and head dim {head_dim}",
            q.shape()
        )));
    }
    if q_heads % kv_heads != 0 {
        return Err(Error::Heads { what: "the KV cache", got: kv_heads, q_heads });
    }
    for (what, t) in [("Q", q), ("O", out)] {
        if t.dtype() != dtype {
            return Err(Error::DType(format!("{what} is {} but the cache stores {dtype}", t.dtype())));
        }
    }
    if lse.dtype() != DType::F32 {
        return Err(Error::DType(format!("LSE must be f32, got {}", lse.dtype())));
    }
    if out.shape() != q.shape() {
        return Err(Error::Shape(format!("O has shape {:?}, expected {:?}", out.shape(), q.shape())));
    }
    if lse.shape() != &q.shape()[..3] {
        return Err(Error::Shape(format!("LSE has shape {:?}, expected {:?}", lse.shape(), &q.shape()[..3])));
    }
    check_u32_indexing("Q", q.numel() as u64)?;
    if dtype == DType::F16 {
        ctx.require_f16()?;
    }
    Ok((q_heads, n_q))
}

/// [`DecodeParams::rope`] of `positions`.
pub(crate) fn rope_code(positions: PositionMode) -> u32 {
    match positions {
        PositionMode::Absolute => 0,
        PositionMode::Reindexed(r) => match r.layout {
            RopeLayout::NeoX => 1,
            RopeLayout::Interleaved => 2,
        },
    }
}

/// The softmax scale of `options` for head dim `head_dim`, checked.
pub(crate) fn resolved_scale(options: &DecodeOptions, head_dim: usize) -> Result<f32> {
    let scale = options.scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
    if !scale.is_finite() {
        return Err(Error::Option(format!("scale {scale} is not finite")));
    }
    Ok(scale)
}

impl KvCache {
    /// The decode variant for `rows` rows per KV head.
    fn variant(&self, ctx: &Context, preset: Preset, rows: usize) -> Result<Variant> {
        let features = Features {
            rope: matches!(self.config.positions, PositionMode::Reindexed(_)),
            logits: matches!(self.config.policy, EvictionPolicy::HeavyHitters { .. }),
            ..Features::DENSE
        };
        Variant::choose(preset, ctx.limits(), rows, self.config.head_dim, features)
    }

    /// The layout a decode of `n_q` queries of `q_heads` heads on `layer` would use now.
    ///
    /// Automatic splits: enough workgroups to fill the adapter ([`parallel_workgroups`]: one
    /// per core on a CPU, 512 on a discrete GPU), but no split under 4 workgroup tiles of
    /// keys, and at most [`MAX_AUTO_SPLITS`]. On llvmpipe (2 cores) a Llama-3-8B layer's 8
    /// KV heads already keep every core busy, and more splits only add per-split work
    /// (8 and 16 splits of a 1K cache run at 0.82x and 0.70x of one, docs/decode-llvmpipe.md),
    /// so it gets one; on a GPU with a hundred compute units the same layer needs tens of
    /// splits per head.
    /// Any choice is capped at one split per tile of keys, and raised where the adapter
    /// caps loop iterations (llvmpipe) so no invocation exceeds it.
    pub fn plan(
        &self,
        ctx: &Context,
        layer: usize,
        q_heads: usize,
        n_q: usize,
        options: &DecodeOptions,
    ) -> Result<DecodePlan> {
        self.plan_for(ctx, Preset::for_adapter(ctx.adapter_info()), layer, q_heads, n_q, options)
    }

    /// [`Self::plan`] with `preset`'s kernel.
    fn plan_for(
        &self,
        ctx: &Context,
        preset: Preset,
        layer: usize,
        q_heads: usize,
        n_q: usize,
        options: &DecodeOptions,
    ) -> Result<DecodePlan> {
        self.layer(layer)?;
        let KvCacheConfig { batch, kv_heads, .. } = self.config;
        let rows = (q_heads / kv_heads).max(1) * n_q;
        let variant = self.variant(ctx, preset, rows)?;
        let len = (self.len_at(self.checked_seen(layer)?) as u32).max(1);
        let auto = || {
            let row_blocks = (rows as u32).div_ceil(variant.block_r());
            let base = (batch * kv_heads) as u32 * row_blocks;
            let worth_splitting = len / variant.min_auto_split_keys();
            parallel_workgroups(ctx.adapter_info()).div_ceil(base).min(worth_splitting).clamp(1, MAX_AUTO_SPLITS)
        };
        split_plan(ctx, &variant, len, options.splits, auto)
    }

    /// Records attention of the queries `bufs.q` (the last `Nq` tokens appended to `layer`)
    /// to the cache, writing `bufs.out` and `bufs.lse`. Under heavy hitters it also adds each
    /// token's attention to its score. With re-indexed positions, `q` is given before RoPE.
    pub fn attend(
        &mut self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        layer: usize,
        bufs: &DecodeBuffers<'_>,
        options: &DecodeOptions,
    ) -> Result<DecodePlan> {
        self.attend_with(ctx, Preset::for_adapter(ctx.adapter_info()), encoder, layer, bufs, options)
    }

    /// [`Self::attend`] with `preset`'s kernel.
    fn attend_with(
        &mut self,
        ctx: &Context,
        preset: Preset,
        encoder: &mut wgpu::CommandEncoder,
        layer: usize,
        bufs: &DecodeBuffers<'_>,
        options: &DecodeOptions,
    ) -> Result<DecodePlan> {
        let DecodeBuffers { q, out, lse } = bufs;
        let (q_heads, n_q) = self.check_queries(ctx, layer, bufs)?;
        let scale = resolved_scale(options, self.config.head_dim)?;
        let plan = self.plan_for(ctx, preset, layer, q_heads, n_q, options)?;
        let KvCacheConfig { batch, kv_heads, head_dim, dtype, policy, positions, .. } = self.config;
        let capacity = policy.capacity();
        let seen = self.checked_seen(layer)?;
        let len = self.len_at(seen);
        let rows = q_heads / kv_heads * n_q;
        let row_blocks = (rows as u32).div_ceil(plan.rows_per_block);
        let sequences = (batch * kv_heads) as u32;
        for (what, n) in [("splits", plan.splits), ("row blocks", row_blocks), ("sequence heads", sequences)] {
            check_grid(ctx.limits(), &format!("decode grid: {n} {what}"), n)?;
        }
        let rope_shift = seen.saturating_sub(capacity as u64) as u32;
        let (rope, rope_sinks, rope_shift) = (rope_code(positions), policy.sinks() as u32, rope_shift);
        let heavy_hitters = matches!(policy, EvictionPolicy::HeavyHitters { .. });
        let params = DecodeParams {
            batch: batch as u32,
            q_heads: q_heads as u32,
            kv_heads: kv_heads as u32,
            n_q: n_q as u32,
            head_dim: head_dim as u32,
            capacity: capacity as u32,
            len: len as u32,
            seen: seen as u32,
            keys_per_split: plan.keys_per_split,
            rope,
            rope_sinks,
            rope_shift,
            scale,
            page_shift: 0,
            sink_pages: 0,
            sinks: 0,
            window: 0,
            scales_at: 0,
            k_scales_at: 0,
        };

        let query_rows = (batch * q_heads * n_q) as u64;
        let splits = plan.splits as u64;
        let pipeline = ctx.pipelines.get(ctx.device(), &self.variant(ctx, preset, rows)?.key(dtype))?;
        let logits_bytes = if heavy_hitters { 4 * (sequences as u64) * rows as u64 * capacity as u64 } else { 4 };
        let Self { layers, scratch: s, rope_table, .. } = self;
        let l = &layers[layer];
        let partial_out = scratch(
            ctx,
            &mut s.partial_out,
            "wattn decode partial outputs",
            4 * splits * query_rows * head_dim as u64,
        )?;
        let partial_lse = scratch(ctx, &mut s.partial_lse, "wattn decode partial LSE", 4 * splits * query_rows)?;
        let logits = scratch(ctx, &mut s.logits, "wattn decode logits", logits_bytes)?;
        let params = uniform_buffer(ctx, &params);
        let launch = Launch {
            pipeline: &pipeline,
            bindings: vec![
                ("params", &params),
                ("q", q.buffer()),
                ("k", &l.k),
                ("v", &l.v),
                ("pos", &l.positions),
                ("rope_or_positions", rope_table),
                ("partial_out", partial_out),
                ("partial_lse", partial_lse),
                ("logits", logits),
            ],
            grid: [plan.splits, row_blocks, sequences],
            merge: Merge {
                partial_out,
                partial_lse,
                out: out.buffer(),
                lse: lse.buffer(),
                out_dtype: dtype,
                rows: query_rows as usize,
                dim: head_dim,
                splits: plan.splits as usize,
            },
        };
        let mut pass = encoder
            .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("wattn decode"), timestamp_writes: None });
        record(ctx, &mut pass, &launch)?;

        if heavy_hitters {
            let slots = sequences as u64 * capacity as u64;
            let grid = wrapped_grid(ctx.limits(), "score grid", slots.div_ceil(64))?;
            let params = KvParams {
                batch: batch as u32,
                kv_heads: kv_heads as u32,
                q_heads: q_heads as u32,
                head_dim: head_dim as u32,
                capacity: capacity as u32,
                seen: seen as u32,
                count: n_q as u32,
                len: len as u32,
                groups_x: grid[0],
                ..KvParams::default()
            };
            let params = uniform_buffer(ctx, &params);
            let pipeline = ctx.pipelines.get(ctx.device(), &super::cache::shader_key("accumulate", dtype))?;
            let group = bind_buffers(
                ctx.device(),
                &pipeline,
                Kernel::KvCache,
                &[("params", &params), ("score", &l.scores), ("logits", logits), ("lse", lse.buffer())],
            )?;
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups(grid[0], grid[1], 1);
        }
        Ok(plan)
    }

    /// [`Self::attend`] on tensors wattn allocates: records, submits, returns O and LSE.
    pub fn decode(
        &mut self,
        ctx: &Context,
        layer: usize,
        q: &Tensor,
        options: &DecodeOptions,
    ) -> Result<AttentionOutput> {
        decode_into_new_tensors(ctx, q, |encoder, bufs| self.attend(ctx, encoder, layer, bufs, options).map(|_| ()))
    }

    /// Checks the queries and outputs of a decode call and returns (Hq, Nq).
    fn check_queries(&self, ctx: &Context, layer: usize, bufs: &DecodeBuffers<'_>) -> Result<(usize, usize)> {
        let KvCacheConfig { batch, kv_heads, head_dim, dtype, policy, .. } = self.config;
        let seen = self.checked_seen(layer)?;
        let (q_heads, n_q) = check_query_buffers(ctx, bufs, batch, kv_heads, head_dim, dtype)?;
        if n_q as u64 > seen {
            return Err(Error::Option(format!(
                "{n_q} queries but layer {layer} has {seen} tokens: the queries are the last tokens appended"
            )));
        }
        if let Some(recent) = policy.recent().filter(|&r| n_q > r) {
            return Err(Error::Option(format!(
                "{n_q} queries but policy {} keeps only the {recent} most recent tokens: the queries must still be cached",
                policy.name()
            )));
        }
        Ok((q_heads, n_q))
    }
}

/// Runs `record` on O and LSE tensors allocated for queries `q` (O shaped as `q`, LSE as its
/// first three dims), submits, and returns them: the `decode` of the dense and the paged caches.
pub(crate) fn decode_into_new_tensors(
    ctx: &Context,
    q: &Tensor,
    record: impl FnOnce(&mut wgpu::CommandEncoder, &DecodeBuffers<'_>) -> Result<()>,
) -> Result<AttentionOutput> {
    let lse_shape = &q.shape()[..q.shape().len().min(3)];
    let output = AttentionOutput {
        out: Tensor::zeros(ctx, q.shape(), q.dtype())?,
        lse: Tensor::zeros(ctx, lse_shape, DType::F32)?,
    };
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    let bufs = DecodeBuffers { q: q.view(), out: output.out.view(), lse: output.lse.view() };
    record(&mut encoder, &bufs)?;
    ctx.queue().submit([encoder.finish()]);
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shader::tests::declared_workgroup_bytes;

    /// The estimate that picks decode tiles is what the shader declares, as Dawn counts it.
    #[test]
    fn workgroup_estimate_matches_the_shader() {
        for storage in [16 << 10, 32 << 10, 64 << 10] {
            let limits = wgpu::Limits { max_compute_workgroup_storage_size: storage, ..wgpu::Limits::default() };
            let shapes = [(1, 64), (4, 128), (8, 80), (32, 256), (3, 17)];
            for (preset, (rows, head_dim)) in
                [Preset::Cpu, Preset::Gpu].into_iter().flat_map(|p| shapes.map(|s| (p, s)))
            {
                let v = Variant::choose(preset, &limits, rows, head_dim, Features::ALL[0]).unwrap();
                assert_eq!(
                    v.workgroup_bytes(),
                    declared_workgroup_bytes(&v.key(DType::F32)),
                    "{preset:?}, {rows} rows, d{head_dim}"
                );
            }
        }
    }

    /// Both presets on this adapter, whatever its class (so the GPU preset's lanes, which
    /// sum their partial logits through workgroup memory, run on llvmpipe too), against the
    /// f64 reference: a GQA chunk of 3 queries (causal among themselves), head dims on and
    /// off the word grid and past 128 (16 lanes), RoPE, several splits.
    #[test]
    fn both_presets_match_the_reference() {
        use super::super::{Rope, RopeLayout};
        use crate::reference;
        let ctx = Context::new().expect("the decode tests need an adapter: run tools/ensure-adapter.sh");
        let (q_heads, kv_heads, n_q, n) = (8, 2, 3, 203);
        let neox = PositionMode::Reindexed(Rope { base: 10000.0, layout: RopeLayout::NeoX });
        for (head_dim, positions, splits) in [
            (128, PositionMode::Absolute, 1),
            (40, PositionMode::Absolute, 3),
            (34, neox, 2),
            (200, PositionMode::Absolute, 1),
        ] {
            let config = KvCacheConfig {
                layers: 1,
                batch: 1,
                kv_heads,
                head_dim,
                dtype: DType::F32,
                policy: EvictionPolicy::None { capacity: n },
                positions,
            };
            // Deterministic values in [-1, 1).
            let data = |count: usize, seed: usize| -> Vec<f32> {
                (0..count).map(|i| ((i * 7919 + seed * 104729) % 2003) as f32 / 1001.5 - 1.0).collect()
            };
            let (k, v) = (data(kv_heads * n * head_dim, 1), data(kv_heads * n * head_dim, 2));
            let q = data(q_heads * n_q * head_dim, 3);
            let kv_shape = [1, kv_heads, n, head_dim];
            let q_shape = [1, q_heads, n_q, head_dim];
            for preset in [Preset::Cpu, Preset::Gpu] {
                let mut cache = KvCache::new(&ctx, config).unwrap();
                let mut encoder = ctx.device().create_command_encoder(&Default::default());
                let (k_gpu, v_gpu) = (
                    Tensor::from_f32(&ctx, &kv_shape, &k, DType::F32).unwrap(),
                    Tensor::from_f32(&ctx, &kv_shape, &v, DType::F32).unwrap(),
                );
                cache.append(&ctx, &mut encoder, 0, &k_gpu.view(), &v_gpu.view()).unwrap();
                let q_gpu = Tensor::from_f32(&ctx, &q_shape, &q, DType::F32).unwrap();
                let (out, lse) = (
                    Tensor::zeros(&ctx, &q_shape, DType::F32).unwrap(),
                    Tensor::zeros(&ctx, &q_shape[..3], DType::F32).unwrap(),
                );
                let bufs = DecodeBuffers { q: q_gpu.view(), out: out.view(), lse: lse.view() };
                let options = DecodeOptions { splits: Some(splits), ..Default::default() };
                let plan = cache.attend_with(&ctx, preset, &mut encoder, 0, &bufs, &options).unwrap();
                ctx.submit_and_wait(encoder).unwrap();
                let (out, lse) = (out.to_f32(&ctx).unwrap(), lse.to_f32(&ctx).unwrap());
                let what = format!("{preset:?} d{head_dim} {positions:?} {plan:?}");
                assert_eq!(plan.splits, splits, "{what}");
                let rotated = |x: &[f32], p: usize| -> Vec<f64> {
                    let x: Vec<f64> = x.iter().map(|&e| e as f64).collect();
                    match positions {
                        PositionMode::Reindexed(r) => reference::rope(&x, p as f64, r.base, r.layout),
                        PositionMode::Absolute => x,
                    }
                };
                let scale = 1.0 / (head_dim as f64).sqrt();
                for head in 0..q_heads {
                    let kv = head / (q_heads / kv_heads);
                    let key = |j: usize| &k[(kv * n + j) * head_dim..][..head_dim];
                    let value = |j: usize| v[(kv * n + j) * head_dim..][..head_dim].iter().map(|&e| e as f64).collect();
                    for i in 0..n_q {
                        let position = n - n_q + i;
                        let keys: Vec<Vec<f64>> = (0..=position).map(|j| rotated(key(j), j)).collect();
                        let values: Vec<Vec<f64>> = (0..=position).map(value).collect();
                        let row = head * n_q + i;
                        let query = rotated(&q[row * head_dim..][..head_dim], position);
                        let want = reference::attend_rows(&query, &keys, &values, head_dim, scale);
                        let got = &out[row * head_dim..][..head_dim];
                        let err = got.iter().zip(&want.out).map(|(&g, w)| (g as f64 - w).abs()).fold(0.0, f64::max);
                        let lse_err = (lse[row] as f64 - want.lse).abs();
                        assert!(
                            err < 2e-5 && lse_err < 2e-5,
                            "{what}, row {row}: O err {err:.1e}, LSE err {lse_err:.1e}"
                        );
                    }
                }
            }
        }
    }
}
