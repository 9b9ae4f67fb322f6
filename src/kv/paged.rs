//! A paged KV cache (vLLM's PagedAttention): per layer one pool of pages of `page_size`
//! tokens, and per sequence a block table of the pages that hold its tokens, so sequences of
//! any lengths share one pool, come and go while others run, and reuse each other's pages.
//!
//! The host owns the tables: [`PagedKvCache::begin_step`] takes each sequence's number of
//! new tokens, frees the pages whose tokens were all evicted (StreamingLLM), takes new pages
//! from a free list (O(1) per page) and chooses every new token's slot; each layer then
//! records one append kernel that writes all sequences' tokens through those slots
//! ([`PagedKvCache::append`], quantising them in an int8 pool) and one decode launch for a
//! batch of sequences of mixed lengths ([`PagedKvCache::attend`]): `shaders/decode.wgsl`'s
//! PAGED variant reads K/V through the block tables, split-KV with `combine.wgsl` where a
//! sequence is long, one workgroup serving a KV head's whole group of query heads. Nothing
//! is read back.
//!
//! A pool is `[pages, Hkv, page_size, words of D]` (rows padded to whole 4-element words):
//! f32 or f16 words, or int8 ([`KvStorage::Int8`]): 4 signed bytes per word and, per (token,
//! KV head), the largest magnitude of its K row and of its V row as two f16 in one u32 (the
//! scales), kept in the V buffer after the V words (`[pages, Hkv, page_size]`; the kernels
//! stay within WebGPU's 8 storage buffers per stage).
//! An element x of a row with scale s is stored as q = round(127 x / s) and read as
//! q s / 127, so its error is at most s / 254 (and the f16 rounding of s, 2^-11 s). Per
//! token and KV head that is `2 * D + 4` bytes against f16's `4 * D`: 0.52x at D = 64,
//! 0.51x at D = 128. Scales are f16: int8 pools take values of magnitude below 65504.
//!
//! Accuracy of int8 (the bound the tests check): with every element of a K row off by at
//! most `e_k = s_k / 254` and of a V row by `e_v`, a logit moves by at most
//! `d = scale * |q|_1 * max e_k`, each softmax weight by a factor within `exp(±2d)`, so each
//! output element is off by at most `(exp(2d) - 1) * max |v| + max e_v` from attention over
//! the original values. Against attention over the dequantised values the kernel is as
//! exact as the float paths (FlashAttention's rule).
//!
//! int8 with K per channel (KIVI, [`KvStorage::Int8ChannelK`]): K's outliers sit in a few
//! channels, so K is scaled per channel over a group of tokens and V per token (as above).
//! The group is the page: each (page, KV head, channel) of K has a scale 2^e, e a signed byte
//! (4 per u32, kept in the K buffer after the K words), the power of two just above the
//! largest magnitude the page's tokens have in that channel. A page fills over several steps,
//! so its scales grow: the append kernel takes one workgroup per (page written, KV head), and
//! where a step's tokens exceed a channel's scale it rounds the tokens already in the page
//! again at the new scale. Power-of-two scales make that an exact halving before the rounding,
//! so a value's error is at most s_0 / 254 from its first rounding plus s_i / 254 from each
//! later one: below 2 s / 254 for the page's final scale s (a geometric sum), and s is under
//! twice the channel's largest magnitude. (KIVI keeps the newest tokens in full precision until
//! a group is complete; here every token is int8 at once, so decode has one path to read.)
//! Per token and KV head that is `2 * D + 4 + D / page_size` bytes (the V scale's word keeps
//! its unused K half): 0.531x f16 at D = 64 with pages of 16, 0.523x at D = 128. It takes
//! absolute positions (RoPE would mix channels of different scales) and no heavy hitters (a
//! token replacing an evicted one would land inside a full page).
//!
//! Heavy hitters (H2O, [`EvictionPolicy::HeavyHitters`]) work per sequence as in the dense
//! [`KvCache`](super::KvCache): a sequence's slots are the first `capacity` of its block
//! table (its pages: `capacity / page_size`, rounded up), filled in order; past them each new
//! token takes, per KV head, the slot of the token it evicts, the one with the lowest
//! attention accumulated by the decodes (never a sink nor one of the `recent` newest). The
//! eviction runs on the GPU in the append launch (`evict_paged`), which keeps each pool
//! slot's stream position and score in two more buffers per layer (8 bytes per token and KV
//! head); the decode reads the positions and writes its logits, and `accumulate_paged`
//! adds them to the scores, so nothing is read back. A sequence's pages stay its own until
//! it is removed: an evicted token's slot is the new token's, so no page ever empties.
//!
//! Engines that own their pool and tables pass them as buffers ([`PoolBuffers`],
//! [`SequenceTables`]) to [`encode_append`] and [`encode_decode`], the functions the cache
//! itself calls, with the same checks.
//!
//! ```no_run
//! use wattn::kv::paged::{KvStorage, PagedKvCache, PagedLayout};
//! use wattn::kv::{DecodeOptions, EvictionPolicy, PositionMode};
//! use wattn::{Context, DType, Tensor};
//! # fn main() -> wattn::Result<()> {
//! let ctx = Context::new()?;
//! let layout = PagedLayout {
//!     kv_heads: 2, head_dim: 64, page_size: 16, pages: 256, dtype: DType::F32,
//!     storage: KvStorage::Int8, policy: EvictionPolicy::None { capacity: 4096 },
//!     positions: PositionMode::Absolute,
//! };
//! let mut cache = PagedKvCache::new(&ctx, 1, layout)?;
//! let (a, b) = (cache.add_sequence(), cache.add_sequence());
//! let step = cache.begin_step(&ctx, &[(a, 5), (b, 1)])?; // 6 new tokens in all
//! let k = Tensor::from_f32(&ctx, &[6, 2, 64], &vec![0.1; 6 * 2 * 64], DType::F32)?; // [T, Hkv, D]
//! let mut encoder = ctx.device().create_command_encoder(&Default::default());
//! cache.append(&ctx, &mut encoder, 0, &step, &k.view(), &k.view())?;
//! ctx.queue().submit([encoder.finish()]);
//! let q = Tensor::from_f32(&ctx, &[2, 8, 1, 64], &vec![0.1; 2 * 8 * 64], DType::F32)?; // [S, Hq, 1, D]
//! let out = cache.decode(&ctx, 0, &[a, b], &q, &DecodeOptions::default())?;
//! # Ok(()) }
//! ```

use super::cache::{
    DONE, DROPPED, KvParams, Scratch, WORKGROUP, evict_loop_iterations, follow, rope_table, storage_key,
};
use super::combine::Merge;
use super::decode::{
    DecodeBuffers, DecodeOptions, DecodeParams, DecodePlan, Features, Launch, MAX_AUTO_SPLITS, Preset, Variant,
    check_query_buffers, decode_into_new_tensors, parallel_workgroups, record, resolved_scale, rope_code, split_plan,
};
use super::{EvictionPolicy, PositionMode, validate_positions};
use crate::attention::{AttentionOutput, MAX_HEAD_DIM};
use crate::context::Context;
use crate::dispatch::{bind_buffers, check_grid, scratch, uniform_buffer, wrapped_grid};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shader::Kernel;
use crate::tensor::{Tensor, TensorView, check_binding_size, check_u32_indexing, read_pod};
use half::f16;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use wgpu::util::DeviceExt;

/// Tokens per page unless a layout says otherwise (vLLM's default block size).
pub const DEFAULT_PAGE_SIZE: usize = 16;

/// How a pool stores K and V.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvStorage {
    /// In the layout's dtype (f32 or f16).
    Float,
    /// int8 with a scale per (token, KV head) for K and one for V (f16); appended K/V,
    /// queries and outputs stay in the layout's dtype.
    Int8,
    /// int8 with K scaled per channel and V per token (KIVI): each (page, KV head, channel)
    /// of K has a power-of-two scale that grows with the page's tokens (see the [module](self)
    /// documentation); V as in [`KvStorage::Int8`]. Absolute positions, no heavy hitters.
    Int8ChannelK,
}

impl KvStorage {
    /// Whether K and V are int8 words.
    fn int8(self) -> bool {
        self != KvStorage::Float
    }
}

/// The shape of a page pool and what it retains: what the kernels need to read and write it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PagedLayout {
    /// KV heads Hkv; queries' heads must be a multiple of them.
    pub kv_heads: usize,
    /// Head dim of K and V (1..=256).
    pub head_dim: usize,
    /// Tokens per page: a power of two ([`DEFAULT_PAGE_SIZE`] is vLLM's).
    pub page_size: usize,
    /// Pages per layer, shared by every sequence.
    pub pages: usize,
    /// Of appended K/V, queries and outputs, and of a float pool.
    pub dtype: DType,
    /// Float or int8 words.
    pub storage: KvStorage,
    /// [`EvictionPolicy::None`] (`capacity`: the most tokens one sequence may hold),
    /// [`EvictionPolicy::Streaming`] (per sequence; pages are freed once all their tokens are
    /// evicted) or [`EvictionPolicy::HeavyHitters`] (per sequence, at most `capacity` slots;
    /// see the [module](self) documentation).
    pub policy: EvictionPolicy,
    /// Whether the caller applies RoPE or the decode kernel does at each token's index in
    /// the sequence's cache (StreamingLLM's re-indexing, as in the dense cache: sinks first,
    /// then the window oldest to newest). Not with heavy hitters.
    pub positions: PositionMode,
}

impl PagedLayout {
    fn validate(&self, ctx: &Context) -> Result<()> {
        let Self { kv_heads, head_dim, page_size, pages, dtype, policy, positions, .. } = *self;
        policy.validate()?;
        validate_positions(positions, policy, head_dim)?;
        if self.storage == KvStorage::Int8ChannelK
            && (positions != PositionMode::Absolute || matches!(policy, EvictionPolicy::HeavyHitters { .. }))
        {
            return Err(Error::Option(
                "int8 with K per channel takes absolute positions (RoPE would mix channels of different scales) and no heavy hitters (a token replacing an evicted one lands inside a full page)".into(),
            ));
        }
        for (what, n) in [("kv_heads", kv_heads), ("pages", pages)] {
            if n == 0 {
                return Err(Error::Option(format!("paged KV cache {what} must be at least 1")));
            }
        }
        if !page_size.is_power_of_two() || page_size > 1 << 16 {
            return Err(Error::Option(format!("page size {page_size} must be a power of two up to 65536")));
        }
        if head_dim == 0 || head_dim > MAX_HEAD_DIM {
            return Err(Error::HeadDim { what: "paged KV cache", got: head_dim, max: MAX_HEAD_DIM });
        }
        if dtype == DType::F16 {
            ctx.require_f16()?;
        }
        // The kernels index the pool's elements in u32; V (with the scales) is the larger buffer.
        check_u32_indexing("page pool", self.slots() * (self.row_words() as u64 * 4 + 1))?;
        check_binding_size(ctx, "page pool V", self.v_bytes())
    }

    /// 4-element words per K or V row.
    fn row_words(&self) -> usize {
        self.head_dim.div_ceil(4)
    }

    /// Bytes of one word of K or V.
    fn word_bytes(&self) -> u64 {
        match self.storage {
            KvStorage::Float => 4 * self.dtype.size() as u64,
            KvStorage::Int8 | KvStorage::Int8ChannelK => 4,
        }
    }

    /// (token, KV head) rows of the pool.
    fn slots(&self) -> u64 {
        (self.pages * self.kv_heads * self.page_size) as u64
    }

    /// Bytes of the K pool: the K words and, with K per channel, then the exponents (4 bytes
    /// per (page, KV head, word of D)).
    pub fn k_bytes(&self) -> u64 {
        let exponents = match self.storage {
            KvStorage::Int8ChannelK => 4 * (self.pages * self.kv_heads * self.row_words()) as u64,
            _ => 0,
        };
        self.words_bytes() + exponents
    }

    /// Bytes of the K or V words.
    fn words_bytes(&self) -> u64 {
        self.slots() * self.row_words() as u64 * self.word_bytes()
    }

    /// Bytes of the V pool: the V words and, in int8 pools, then the scales (4 bytes per
    /// (token, KV head)).
    pub fn v_bytes(&self) -> u64 {
        let scales = if self.storage.int8() { 4 * self.slots() } else { 0 };
        self.words_bytes() + scales
    }

    /// The word of the V pool where an int8 pool's scales begin, and of the K pool where
    /// the channel exponents do.
    fn scales_at(&self) -> u32 {
        (self.slots() * self.row_words() as u64) as u32
    }

    /// Bytes one token takes in one layer: K, V, scales and heavy-hitter state of every KV head.
    pub fn bytes_per_token(&self) -> u64 {
        (self.k_bytes() + self.v_bytes() + self.heavy_hitter_bytes()) / self.pages as u64 / self.page_size as u64
    }

    /// Whether the policy is heavy hitters (H2O).
    fn heavy_hitters(&self) -> bool {
        matches!(self.policy, EvictionPolicy::HeavyHitters { .. })
    }

    /// Bytes of each of the heavy-hitter positions and scores buffers (4 per slot; 0 under
    /// other policies).
    fn heavy_hitter_buffer_bytes(&self) -> u64 {
        if self.heavy_hitters() { 4 * self.slots() } else { 0 }
    }

    /// Bytes of the heavy-hitter state of a layer: positions and scores.
    fn heavy_hitter_bytes(&self) -> u64 {
        2 * self.heavy_hitter_buffer_bytes()
    }

    /// Tokens a sequence holds in its pages after it has seen `seen`: heavy hitters stop at
    /// the capacity (new tokens then replace evicted ones); the others keep every page up to
    /// the last token (StreamingLLM frees the older ones).
    fn held_tokens(&self, seen: u64) -> u64 {
        match self.policy {
            EvictionPolicy::HeavyHitters { capacity, .. } => seen.min(capacity as u64),
            _ => seen,
        }
    }

    /// Block-table entries of every sequence that hold its first tokens (the sinks), which
    /// are never freed; the rest are a run of consecutive logical pages.
    fn sink_pages(&self) -> usize {
        match self.policy {
            EvictionPolicy::Streaming { sinks, .. } => sinks.div_ceil(self.page_size),
            _ => 0,
        }
    }

    /// (sinks, window) of the kernels' retention test: every token under policy None.
    fn retention(&self) -> (u32, u32) {
        match self.policy {
            EvictionPolicy::Streaming { sinks, window } => (sinks as u32, window as u32),
            _ => (0, u32::MAX),
        }
    }
}

/// A pool's GPU buffers: the cache's ([`PagedKvCache::buffers`]) or an engine's own.
#[derive(Clone, Copy, Debug)]
pub struct PoolBuffers<'a> {
    /// K, `[pages, Hkv, page_size, words of D]` ([`PagedLayout::k_bytes`] at least).
    pub k: &'a wgpu::Buffer,
    /// V, like K; in int8 pools followed by the scales, `[pages, Hkv, page_size]` u32 holding
    /// K's and V's scale as two f16 (K's in the low half) ([`PagedLayout::v_bytes`] at least).
    pub v: &'a wgpu::Buffer,
}

/// The block tables of a batch of sequences, as the decode kernel reads them.
#[derive(Clone, Copy, Debug)]
pub struct SequenceTables<'a> {
    /// u32: first 4 per sequence: tokens seen (its queries are the last ones), where its block
    /// table starts in this same buffer, the slots to scan (tokens in its table's pages, up to
    /// the last one seen), and the logical page of its first entry past the sink pages (0
    /// without eviction); then the block tables, page indices each below the layout's `pages`.
    pub tables: &'a wgpu::Buffer,
    /// Sequences S.
    pub count: usize,
    /// Slots of the longest sequence: no sequence may have more (the splits cover this many).
    pub longest: usize,
}

/// Checks that `pool` holds `layout`'s pool.
fn check_pool(layout: &PagedLayout, pool: &PoolBuffers<'_>) -> Result<()> {
    check_storage("pool K", pool.k, layout.k_bytes())?;
    check_storage("pool V", pool.v, layout.v_bytes())
}

fn check_storage(what: &str, buffer: &wgpu::Buffer, bytes: u64) -> Result<()> {
    if buffer.size() < bytes {
        return Err(Error::Shape(format!("{what} has {} bytes, the layout needs {bytes}", buffer.size())));
    }
    if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
        return Err(Error::Option(format!("{what} needs BufferUsages::STORAGE")));
    }
    Ok(())
}

/// Records the append of new tokens to `pool`: K and V `[T, Hkv, D]` in the layout's dtype
/// (every sequence's new tokens one after another), token t written at pool slot
/// `slots[t] + h * page_size` for KV head h (`slots`: T u32, `(page * Hkv) * page_size +
/// offset in the page`, vLLM's slot mapping per KV head). One launch whatever the sequences.
pub fn encode_append(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    layout: &PagedLayout,
    pool: &PoolBuffers<'_>,
    slots: &wgpu::Buffer,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
) -> Result<()> {
    append_rows(ctx, encoder, layout, pool, slots, false, k, v)
}

/// Checks new K and V `[T, Hkv, D]` against `layout`.
fn check_new_rows(layout: &PagedLayout, k: &TensorView<'_>, v: &TensorView<'_>) -> Result<()> {
    let PagedLayout { kv_heads, head_dim, dtype, .. } = *layout;
    for (what, t) in [("appended K", k), ("appended V", v)] {
        if t.shape().len() != 3 || t.shape()[1..] != [kv_heads, head_dim] || t.shape()[0] == 0 {
            return Err(Error::Shape(format!(
                "{what} has shape {:?}, the pool takes [T, Hkv, D] = [T >= 1, {kv_heads}, {head_dim}]",
                t.shape()
            )));
        }
        if t.dtype() != dtype {
            return Err(Error::DType(format!("{what} is {} but the pool takes {dtype}", t.dtype())));
        }
    }
    if k.shape() != v.shape() {
        return Err(Error::Shape(format!("appended K {:?} and V {:?} differ", k.shape(), v.shape())));
    }
    Ok(())
}

/// [`encode_append`] with a slot per token (`row_slots` false) or per (token, KV head) row,
/// `T * Hkv` u32 (heavy hitters).
#[allow(clippy::too_many_arguments)]
fn append_rows(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    layout: &PagedLayout,
    pool: &PoolBuffers<'_>,
    slots: &wgpu::Buffer,
    row_slots: bool,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
) -> Result<()> {
    layout.validate(ctx)?;
    let PagedLayout { kv_heads, head_dim, page_size, dtype, storage, .. } = *layout;
    if storage == KvStorage::Int8ChannelK {
        return Err(Error::Option(
            "int8 with K per channel appends a page's tokens together (its scales grow with them): append through PagedKvCache".into(),
        ));
    }
    check_pool(layout, pool)?;
    check_new_rows(layout, k, v)?;
    let tokens = k.shape()[0];
    let rows = (tokens * kv_heads) as u64;
    check_storage("slot mapping", slots, 4 * if row_slots { rows } else { tokens as u64 })?;
    let grid = wrapped_grid(ctx.limits(), "paged append grid", rows.div_ceil(WORKGROUP as u64))?;
    let params = KvParams {
        kv_heads: kv_heads as u32,
        head_dim: head_dim as u32,
        count: tokens as u32,
        groups_x: grid[0],
        scales_at: layout.scales_at(),
        page_size: page_size as u32,
        row_slots: row_slots as u32,
        ..KvParams::default()
    };
    let params = uniform_buffer(ctx, &params);
    let pipeline = ctx.pipelines.get(ctx.device(), &storage_key("append_paged", dtype, storage.int8()))?;
    let group = bind_buffers(
        ctx.device(),
        &pipeline,
        Kernel::KvCache,
        &[
            ("params", &params),
            ("src_k", k.buffer()),
            ("src_v", v.buffer()),
            ("dest", slots),
            ("pool_k", pool.k),
            ("pool_v", pool.v),
        ],
    )?;
    let mut pass = encoder
        .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("wattn paged append"), timestamp_writes: None });
    pass.set_pipeline(&pipeline);
    pass.set_bind_group(0, &group, &[]);
    pass.dispatch_workgroups(grid[0], grid[1], 1);
    Ok(())
}

/// Records attention of a batch of sequences' queries to their tokens in `pool`: Q
/// `[S, Hq, Nq, D]`, sequence s's queries the last Nq tokens it has seen, each seeing its
/// retained tokens up to its own position (so Nq > 1 is a causal chunk, aligned bottom-right);
/// writes O `[S, Hq, Nq, D]` and LSE `[S, Hq, Nq]`. One decode launch and one combine.
pub fn encode_decode(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    layout: &PagedLayout,
    pool: &PoolBuffers<'_>,
    tables: &SequenceTables<'_>,
    bufs: &DecodeBuffers<'_>,
    options: &DecodeOptions,
) -> Result<DecodePlan> {
    if layout.heavy_hitters() || layout.positions != PositionMode::Absolute {
        return Err(Error::Option(
            "heavy hitters (each slot's position and score) and re-indexed positions (the RoPE table) need the cache's own buffers: decode through PagedKvCache"
                .into(),
        ));
    }
    decode_with(ctx, encoder, layout, pool, None, None, tables, bufs, options, &mut Scratch::default())
}

/// The decode variant of `layout` for `rows` rows per KV head.
fn variant(ctx: &Context, layout: &PagedLayout, rows: usize) -> Result<Variant> {
    let features = Features {
        paged: true,
        int8: layout.storage.int8(),
        channel_k: layout.storage == KvStorage::Int8ChannelK,
        logits: layout.heavy_hitters(),
        rope: layout.positions != PositionMode::Absolute,
    };
    Variant::choose(Preset::for_adapter(ctx.adapter_info()), ctx.limits(), rows, layout.head_dim, features)
}

/// The plan of a paged decode: splits as long as the longest sequence needs, so that no
/// workgroup takes more than a quarter of a core's (or compute unit's) share of `keys`, the
/// keys all (sequence, KV head) pairs scan at most (the host does not know the engine's
/// tables, so this is the longest times the pairs); short sequences' later splits find no key
/// and return at once.
fn plan(ctx: &Context, variant: &Variant, longest: u32, keys: u64, options: &DecodeOptions) -> Result<DecodePlan> {
    let auto = || {
        let share = keys / (4 * parallel_workgroups(ctx.adapter_info()) as u64);
        let keys = share.max(variant.min_auto_split_keys() as u64).min(u32::MAX as u64) as u32;
        longest.div_ceil(keys).clamp(1, MAX_AUTO_SPLITS)
    };
    split_plan(ctx, variant, longest.max(1), options.splits, auto)
}

#[allow(clippy::too_many_arguments)]
fn decode_with(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    layout: &PagedLayout,
    pool: &PoolBuffers<'_>,
    heavy: Option<&HeavyHitterState>,
    rope_table: Option<&wgpu::Buffer>,
    tables: &SequenceTables<'_>,
    bufs: &DecodeBuffers<'_>,
    options: &DecodeOptions,
    s: &mut Scratch,
) -> Result<DecodePlan> {
    layout.validate(ctx)?;
    check_pool(layout, pool)?;
    let PagedLayout { kv_heads, head_dim, page_size, dtype, policy, .. } = *layout;
    let (q_heads, n_q) = check_query_buffers(ctx, bufs, tables.count, kv_heads, head_dim, dtype)?;
    if let Some(recent) = policy.recent().filter(|&r| n_q > r) {
        return Err(Error::Option(format!(
            "{n_q} queries but policy {} keeps only the {recent} most recent tokens: the queries must still be cached",
            policy.name()
        )));
    }
    check_storage("sequence tables", tables.tables, 16 * tables.count as u64)?;
    let longest = u32::try_from(tables.longest)
        .map_err(|_| Error::Option(format!("{} slots in one sequence do not fit in u32", tables.longest)))?;
    let scale = resolved_scale(options, head_dim)?;
    let rows = q_heads / kv_heads * n_q;
    let variant = variant(ctx, layout, rows)?;
    let keys = tables.longest as u64 * (tables.count * kv_heads) as u64;
    let plan = plan(ctx, &variant, longest, keys, options)?;
    let row_blocks = (rows as u32).div_ceil(plan.rows_per_block);
    let heads = (tables.count * kv_heads) as u32;
    for (what, n) in [("splits", plan.splits), ("row blocks", row_blocks), ("sequence heads", heads)] {
        check_grid(ctx.limits(), &format!("paged decode grid: {n} {what}"), n)?;
    }
    let (sinks, window) = layout.retention();
    let params = DecodeParams {
        batch: tables.count as u32,
        q_heads: q_heads as u32,
        kv_heads: kv_heads as u32,
        n_q: n_q as u32,
        head_dim: head_dim as u32,
        // Heavy hitters: the logits' row stride.
        capacity: longest,
        len: 0,
        seen: 0,
        keys_per_split: plan.keys_per_split,
        rope: rope_code(layout.positions),
        rope_sinks: policy.sinks() as u32,
        // Each sequence's shift is what it has seen past the capacity.
        rope_shift: policy.capacity() as u32,
        scale,
        page_shift: page_size.ilog2(),
        sink_pages: layout.sink_pages() as u32,
        sinks,
        window,
        scales_at: layout.scales_at(),
        k_scales_at: layout.scales_at(),
    };
    let query_rows = (tables.count * q_heads * n_q) as u64;
    let splits = plan.splits as u64;
    let pipeline = ctx.pipelines.get(ctx.device(), &variant.key(dtype))?;
    let partial_out =
        scratch(ctx, &mut s.partial_out, "wattn decode partial outputs", 4 * splits * query_rows * head_dim as u64)?;
    let partial_lse = scratch(ctx, &mut s.partial_lse, "wattn decode partial LSE", 4 * splits * query_rows)?;
    let logits_bytes = match heavy {
        Some(_) => 4 * heads as u64 * rows as u64 * longest as u64,
        None => 4,
    };
    let logits = scratch(ctx, &mut s.logits, "wattn decode logits", logits_bytes)?;
    let unused = scratch(ctx, &mut s.unused, "wattn unused binding", 16)?;
    let params = uniform_buffer(ctx, &params);
    let launch = Launch {
        pipeline: &pipeline,
        bindings: vec![
            ("params", &params),
            ("q", bufs.q.buffer()),
            ("k", pool.k),
            ("v", pool.v),
            ("pos", tables.tables),
            ("rope_or_positions", heavy.map(|h| &h.positions).or(rope_table).unwrap_or(unused)),
            ("partial_out", partial_out),
            ("partial_lse", partial_lse),
            ("logits", logits),
        ],
        grid: [plan.splits, row_blocks, heads],
        merge: Merge {
            partial_out,
            partial_lse,
            out: bufs.out.buffer(),
            lse: bufs.lse.buffer(),
            out_dtype: dtype,
            rows: query_rows as usize,
            dim: head_dim,
            splits: plan.splits as usize,
        },
    };
    let mut pass = encoder
        .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("wattn paged decode"), timestamp_writes: None });
    record(ctx, &mut pass, &launch)?;
    if let Some(heavy) = heavy {
        // Each sequence's tokens' scores += the attention its queries gave them.
        let slots = heads as u64 * longest as u64;
        let grid = wrapped_grid(ctx.limits(), "paged score grid", slots.div_ceil(WORKGROUP as u64))?;
        let params = KvParams {
            batch: tables.count as u32,
            kv_heads: kv_heads as u32,
            q_heads: q_heads as u32,
            count: n_q as u32,
            capacity: longest,
            groups_x: grid[0],
            page_size: page_size as u32,
            ..KvParams::default()
        };
        let params = uniform_buffer(ctx, &params);
        let pipeline = ctx.pipelines.get(ctx.device(), &storage_key("accumulate_paged", dtype, false))?;
        let group = bind_buffers(
            ctx.device(),
            &pipeline,
            Kernel::KvCache,
            &[
                ("params", &params),
                ("score", &heavy.scores),
                ("logits", logits),
                ("lse", bufs.lse.buffer()),
                ("tables", tables.tables),
            ],
        )?;
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(grid[0], grid[1], 1);
    }
    Ok(plan)
}

/// Records the append of new tokens K and V `[T, Hkv, D]` to an int8 pool with K per
/// channel: one workgroup per (page written, KV head), `runs` of them (see `page_runs`).
#[allow(clippy::too_many_arguments)]
fn append_pages(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    layout: &PagedLayout,
    pool: &PoolBuffers<'_>,
    page_runs: &wgpu::Buffer,
    runs: usize,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
) -> Result<()> {
    check_new_rows(layout, k, v)?;
    let workgroups = (runs * layout.kv_heads) as u32;
    check_grid(ctx.limits(), &format!("paged append grid: {workgroups} page heads"), workgroups)?;
    let params = KvParams {
        kv_heads: layout.kv_heads as u32,
        head_dim: layout.head_dim as u32,
        count: k.shape()[0] as u32,
        scales_at: layout.scales_at(),
        k_scales_at: layout.scales_at(),
        page_size: layout.page_size as u32,
        ..KvParams::default()
    };
    let params = uniform_buffer(ctx, &params);
    let pipeline = ctx.pipelines.get(ctx.device(), &storage_key("append_paged_channels", layout.dtype, true))?;
    let group = bind_buffers(
        ctx.device(),
        &pipeline,
        Kernel::KvCache,
        &[
            ("params", &params),
            ("src_k", k.buffer()),
            ("src_v", v.buffer()),
            ("tables", page_runs),
            ("pool_k", pool.k),
            ("pool_v", pool.v),
        ],
    )?;
    let mut pass = encoder
        .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("wattn paged append"), timestamp_writes: None });
    pass.set_pipeline(&pipeline);
    pass.set_bind_group(0, &group, &[]);
    pass.dispatch_workgroups(workgroups, 1, 1);
    Ok(())
}

/// Records the heavy-hitter eviction of `step`'s tokens in one layer: one workgroup per
/// (sequence of the step, KV head) fills or evicts a slot for each new token, records its
/// position and a zero score, and writes every (token, KV head) row's pool slot to the
/// step's slot mapping.
fn encode_evict(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    layout: &PagedLayout,
    heavy: &HeavyHitterState,
    step: &PagedStep,
    evict_tables: &wgpu::Buffer,
) -> Result<()> {
    let EvictionPolicy::HeavyHitters { sinks, recent, capacity } = layout.policy else {
        unreachable!("called for heavy hitters only")
    };
    // Each workgroup places its sequence's new tokens one after another, scanning every slot for each.
    if let Some(limit) = ctx.loop_iteration_limit() {
        let count = step.sequences.iter().map(|&(_, n)| n).max().unwrap_or(0);
        let needed = count * evict_loop_iterations(capacity);
        if needed > limit as usize {
            return Err(Error::Limit {
                what: format!("heavy-hitter eviction of {count} tokens over {capacity} slots at once"),
                needed: needed as u64,
                allowed: limit as u64,
                limit: "loop iterations per invocation",
            });
        }
    }
    let workgroups = (step.sequences.len() * layout.kv_heads) as u32;
    check_grid(ctx.limits(), &format!("paged eviction grid: {workgroups} sequence heads"), workgroups)?;
    let params = KvParams {
        kv_heads: layout.kv_heads as u32,
        capacity: capacity as u32,
        sinks: sinks as u32,
        window: recent as u32,
        page_size: layout.page_size as u32,
        ..KvParams::default()
    };
    let params = uniform_buffer(ctx, &params);
    let pipeline = ctx.pipelines.get(ctx.device(), &storage_key("evict_paged", layout.dtype, false))?;
    let group = bind_buffers(
        ctx.device(),
        &pipeline,
        Kernel::KvCache,
        &[
            ("params", &params),
            ("pos", &heavy.positions),
            ("score", &heavy.scores),
            ("dest", &step.slots),
            ("tables", evict_tables),
        ],
    )?;
    let mut pass = encoder
        .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("wattn paged evict"), timestamp_writes: None });
    pass.set_pipeline(&pipeline);
    pass.set_bind_group(0, &group, &[]);
    pass.dispatch_workgroups(workgroups, 1, 1);
    Ok(())
}

/// A sequence of a [`PagedKvCache`], valid until it is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SequenceId(u64);

/// One sequence's tokens: which pages hold them.
#[derive(Debug, Default)]
struct Sequence {
    /// Pages of the logical pages below the layout's sink pages, in order.
    sink_pages: Vec<u32>,
    /// Pages of consecutive logical pages from `window_page`.
    window_pages: VecDeque<u32>,
    /// The logical page of `window_pages[0]`.
    window_page: u64,
    /// Tokens appended so far.
    seen: u64,
}

impl Sequence {
    /// The pool page of logical page `logical`, which must be held.
    fn page(&self, logical: u64) -> u32 {
        match self.sink_pages.get(logical as usize) {
            Some(&page) => page,
            None => self.window_pages[(logical - self.window_page) as usize],
        }
    }

    /// The pages in block-table order.
    fn table(&self) -> impl Iterator<Item = u32> + '_ {
        self.sink_pages.iter().chain(&self.window_pages).copied()
    }

    /// Slots the decode kernel scans: the table's pages up to the last token held.
    fn slots(&self, layout: &PagedLayout) -> usize {
        let entries = self.sink_pages.len() + self.window_pages.len();
        let last_page_tokens = (layout.held_tokens(self.seen) - 1) as usize % layout.page_size + 1;
        (entries - 1) * layout.page_size + last_page_tokens
    }
}

/// What one sequence's part of a step changes: pages freed and taken.
struct Growth {
    new_window_page: u64,
    freed: usize,
    new_pages: usize,
}

/// One step's new tokens, planned by [`PagedKvCache::begin_step`]: every layer appends them
/// with [`PagedKvCache::append`] before the next step begins and before it decodes.
#[derive(Debug)]
pub struct PagedStep {
    generation: u64,
    tokens: usize,
    /// T u32: each new token's pool slot (KV head 0); heavy hitters: T * Hkv u32, each
    /// (token, KV head) row's, written by the eviction kernel.
    slots: wgpu::Buffer,
    /// Heavy hitters: the eviction kernel's tables (per sequence of the step: tokens before
    /// it, new tokens, block table start, first new token's row; then the block tables).
    evict_tables: Option<wgpu::Buffer>,
    /// K per channel: the pages the step writes (page, first offset, tokens, first token's
    /// row, 4 u32 each) and how many.
    page_runs: Option<(wgpu::Buffer, usize)>,
    sequences: Vec<(SequenceId, usize)>,
}

impl PagedStep {
    /// New tokens of all sequences: the T of the appended K/V `[T, Hkv, D]`.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The sequences and their new tokens, in the order their rows come in K/V.
    pub fn sequences(&self) -> &[(SequenceId, usize)] {
        &self.sequences
    }
}

/// Heavy hitters: a layer's per pool slot state, `[pages, Hkv, page_size]` each.
struct HeavyHitterState {
    /// u32: the stream position of the slot's token.
    positions: wgpu::Buffer,
    /// f32: the attention the token has received.
    scores: wgpu::Buffer,
}

/// One layer's pool and how far it has appended.
struct Layer {
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    /// Heavy hitters only.
    heavy: Option<HeavyHitterState>,
    /// The last step this layer appended (0: none).
    appended: u64,
    /// The steps whose append's encoder is not yet known to be done, and what became of it
    /// (see "Why the cache follows each append's encoder" in `cache.rs`).
    unconfirmed: Vec<(u64, Arc<AtomicU8>)>,
}

impl Layer {
    /// Forgets the appends that are done; errors if one was recorded into an encoder dropped
    /// without being submitted: the pool lacks that step's tokens, and the layer refuses every
    /// call from then on (the host's tables have moved past them).
    fn check_submitted(&mut self, index: usize) -> Result<()> {
        self.unconfirmed.retain(|(_, fate)| fate.load(Ordering::Acquire) != DONE);
        match self.unconfirmed.iter().find(|(_, fate)| fate.load(Ordering::Acquire) == DROPPED) {
            Some((step, _)) => Err(Error::Option(format!(
                "layer {index} appended step {step} into an encoder that was dropped without being submitted, so its pool lacks that step's tokens; the layer refuses every call from now on"
            ))),
            None => Ok(()),
        }
    }
}

/// A paged KV cache: per layer a pool of `pages` pages, shared by any number of sequences
/// (see the [module](self) documentation).
pub struct PagedKvCache {
    layout: PagedLayout,
    layers: Vec<Layer>,
    /// Pages no sequence holds; the last is taken first.
    free: Vec<u32>,
    sequences: BTreeMap<SequenceId, Sequence>,
    next_id: u64,
    /// Steps begun so far: step g is the g-th (from 1).
    generation: u64,
    /// Re-indexed positions: `[capacity, D / 2]` (cos, sin).
    rope_table: Option<wgpu::Buffer>,
    scratch: Scratch,
}

impl PagedKvCache {
    /// A cache of `layers` pools of `layout`, every page free. Errors on a layout out of
    /// range, a pool over the adapter's binding size, or f16 without `shader-f16`.
    pub fn new(ctx: &Context, layers: usize, layout: PagedLayout) -> Result<Self> {
        layout.validate(ctx)?;
        if layers == 0 {
            return Err(Error::Option("paged KV cache layers must be at least 1".into()));
        }
        let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let buffer = |label: &str, size: u64| {
            ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: storage,
                mapped_at_creation: false,
            })
        };
        let rope_table = match layout.positions {
            PositionMode::Reindexed(rope) => Some(ctx.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("wattn rope table"),
                contents: bytemuck::cast_slice(&rope_table(&rope, layout.policy.capacity(), layout.head_dim)),
                usage: wgpu::BufferUsages::STORAGE,
            })),
            PositionMode::Absolute => None,
        };
        let layers = (0..layers)
            .map(|_| Layer {
                k: buffer("wattn page pool K", layout.k_bytes()),
                v: buffer("wattn page pool V", layout.v_bytes()),
                heavy: layout.heavy_hitters().then(|| HeavyHitterState {
                    positions: buffer("wattn page pool positions", layout.heavy_hitter_buffer_bytes()),
                    scores: buffer("wattn page pool scores", layout.heavy_hitter_buffer_bytes()),
                }),
                appended: 0,
                unconfirmed: Vec::new(),
            })
            .collect();
        Ok(Self {
            layout,
            layers,
            free: (0..layout.pages as u32).rev().collect(),
            sequences: BTreeMap::new(),
            next_id: 0,
            generation: 0,
            rope_table,
            scratch: Scratch::default(),
        })
    }

    /// The layout the cache was made with.
    pub fn layout(&self) -> &PagedLayout {
        &self.layout
    }

    /// Layers, each with its own pool.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// A new, empty sequence. It holds no page until a step gives it tokens.
    pub fn add_sequence(&mut self) -> SequenceId {
        let id = SequenceId(self.next_id);
        self.next_id += 1;
        self.sequences.insert(id, Sequence::default());
        id
    }

    /// Removes a sequence and frees its pages for others (at once: wgpu orders work
    /// recorded later after work recorded earlier).
    pub fn remove_sequence(&mut self, id: SequenceId) -> Result<()> {
        let sequence = self.sequences.remove(&id).ok_or_else(|| unknown(id))?;
        self.free.extend(sequence.table());
        Ok(())
    }

    /// Sequences in the cache, in the order they were added.
    pub fn sequence_ids(&self) -> Vec<SequenceId> {
        self.sequences.keys().copied().collect()
    }

    /// Tokens appended to sequence `id`, or `None` if there is no such sequence.
    pub fn seen(&self, id: SequenceId) -> Option<u64> {
        self.sequences.get(&id).map(|s| s.seen)
    }

    /// The block table of sequence `id`: (logical page, pool page) of each page it holds;
    /// logical page L holds the tokens at positions `L * page_size ..`.
    pub fn block_table(&self, id: SequenceId) -> Option<Vec<(u64, u32)>> {
        let s = self.sequences.get(&id)?;
        let sinks = (0..).zip(s.sink_pages.iter().copied());
        Some(sinks.chain((s.window_page..).zip(s.window_pages.iter().copied())).collect())
    }

    /// Pages no sequence holds.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// The pool buffers of `layer`.
    pub fn buffers(&self, layer: usize) -> Result<PoolBuffers<'_>> {
        let l = self.layer(layer)?;
        Ok(PoolBuffers { k: &l.k, v: &l.v })
    }

    /// Bytes of GPU memory the cache holds: every layer's pool and the scratch buffers of the
    /// largest decode so far.
    pub fn memory_bytes(&self) -> u64 {
        let pools: u64 = self.layers.iter().map(|l| l.k.size() + l.v.size() + self.layout.heavy_hitter_bytes()).sum();
        let s = &self.scratch;
        let scratch: u64 = [&s.partial_out, &s.partial_lse, &s.logits, &s.unused]
            .iter()
            .filter_map(|b| b.as_ref())
            .map(|b| b.size())
            .sum();
        pools + self.rope_table.as_ref().map_or(0, |t| t.size()) + scratch
    }

    fn layer(&self, layer: usize) -> Result<&Layer> {
        let n = self.layers.len();
        self.layers
            .get(layer)
            .ok_or_else(|| Error::Option(format!("layer {layer} does not exist: the cache has {n} layers")))
    }

    /// Plans a step: `tokens` new tokens for each listed sequence (each at least 1, each
    /// sequence once; under StreamingLLM at most the window, under heavy hitters at most the
    /// recent tokens). Frees the pages of tokens the policy evicts, takes the pages the new
    /// tokens need and chooses their slots (heavy hitters: the append kernel does, past the
    /// capacity). Every
    /// layer must then [`Self::append`] the step before it decodes and before the next step.
    ///
    /// Errors, with nothing changed: an unknown sequence, a layer that has not appended the
    /// previous step, [`Error::CacheFull`] past policy None's capacity, [`Error::PoolFull`].
    pub fn begin_step(&mut self, ctx: &Context, tokens: &[(SequenceId, usize)]) -> Result<PagedStep> {
        for (index, layer) in self.layers.iter_mut().enumerate() {
            layer.check_submitted(index)?;
        }
        if let Some(layer) = self.layers.iter().position(|l| l.appended != self.generation) {
            return Err(Error::Option(format!(
                "layer {layer} has not appended step {}: every layer appends a step before the next begins",
                self.generation
            )));
        }
        let growth = tokens
            .iter()
            .enumerate()
            .map(|(i, &(id, count))| {
                if tokens[..i].iter().any(|&(other, _)| other == id) {
                    return Err(Error::Option(format!("{id:?} is listed twice in one step")));
                }
                self.growth(self.sequences.get(&id).ok_or_else(|| unknown(id))?, count)
            })
            .collect::<Result<Vec<_>>>()?;
        let needed: usize = growth.iter().map(|g| g.new_pages).sum();
        let free = self.free.len() + growth.iter().map(|g| g.freed).sum::<usize>();
        if needed > free {
            return Err(Error::PoolFull { pages: self.layout.pages, free, needed });
        }

        let total: usize = tokens.iter().map(|&(_, count)| count).sum();
        let p = self.layout.page_size as u64;
        let sink_pages = self.layout.sink_pages() as u64;
        let kv_heads = self.layout.kv_heads as u64;
        let heavy = self.layout.heavy_hitters();
        let channel_k = self.layout.storage == KvStorage::Int8ChannelK;
        let mut slots = Vec::with_capacity(total);
        // K per channel: per page written, (page, first offset, tokens, first token's row).
        let mut page_runs: Vec<u32> = Vec::new();
        let mut evict_tables = vec![0u32; if heavy { 4 * tokens.len() } else { 0 }];
        let mut first_row = 0;
        // Evictions first, so that this step's new pages may reuse the freed ones.
        for (&(id, _), g) in tokens.iter().zip(&growth) {
            let s = self.sequences.get_mut(&id).expect("checked above");
            self.free.extend(s.window_pages.drain(..g.freed));
            s.window_page = g.new_window_page;
        }
        for (i, &(id, count)) in tokens.iter().enumerate() {
            let s = self.sequences.get_mut(&id).expect("checked above");
            let seen_before = s.seen;
            for position in s.seen..s.seen + count as u64 {
                let logical = position / p;
                if position % p == 0 && position < self.layout.held_tokens(position + 1) {
                    let page = self.free.pop().expect("counted above");
                    match logical < sink_pages {
                        true => s.sink_pages.push(page),
                        false => s.window_pages.push_back(page),
                    }
                }
                if channel_k && (position == seen_before || position % p == 0) {
                    page_runs.extend([s.page(logical), (position % p) as u32, 0, slots.len() as u32]);
                }
                if channel_k {
                    let last = page_runs.len() - 2;
                    page_runs[last] += 1;
                }
                if !heavy {
                    slots.push((s.page(logical) as u64 * kv_heads * p + position % p) as u32);
                }
            }
            s.seen += count as u64;
            if heavy {
                let entry = [seen_before as u32, count as u32, evict_tables.len() as u32, first_row as u32];
                evict_tables[4 * i..][..4].copy_from_slice(&entry);
                evict_tables.extend(s.table());
                first_row += count;
            }
        }
        self.generation += 1;
        let init = |label: &str, contents: &[u32]| {
            ctx.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytemuck::cast_slice(contents),
                usage: wgpu::BufferUsages::STORAGE,
            })
        };
        let (slots, evict_tables) = match heavy {
            // The eviction kernel writes each row's slot.
            true => (
                init("wattn paged slots of new rows", &vec![0; total * kv_heads as usize]),
                Some(init("wattn paged eviction tables", &evict_tables)),
            ),
            false => (init("wattn paged slots of new tokens", if slots.is_empty() { &[0] } else { &slots }), None),
        };
        let page_runs = channel_k.then(|| (init("wattn paged pages written", &page_runs), page_runs.len() / 4));
        let sequences = tokens.to_vec();
        Ok(PagedStep { generation: self.generation, tokens: total, slots, evict_tables, page_runs, sequences })
    }

    /// What `count` new tokens do to sequence `s`, or why they cannot come.
    fn growth(&self, s: &Sequence, count: usize) -> Result<Growth> {
        let PagedLayout { page_size, policy, .. } = self.layout;
        let p = page_size as u64;
        if count == 0 {
            return Err(Error::Option("a step gives each listed sequence at least 1 token".into()));
        }
        let seen = s.seen + count as u64;
        // Heavy hitters' eviction test adds the recent tokens to a position.
        let margin = if self.layout.heavy_hitters() { policy.recent().unwrap_or(0) as u64 } else { 0 };
        if seen + p + margin >= u32::MAX as u64 {
            return Err(Error::Limit {
                what: format!("stream position {seen}"),
                needed: seen + p + margin,
                allowed: u32::MAX as u64,
                limit: "32-bit positions",
            });
        }
        let sink_pages = self.layout.sink_pages() as u64;
        let mut new_window_page = s.window_page.max(sink_pages);
        match policy {
            EvictionPolicy::None { capacity } if seen > capacity as u64 => {
                return Err(Error::CacheFull { capacity, len: s.seen as usize, appended: count });
            }
            EvictionPolicy::Streaming { window: recent, .. } | EvictionPolicy::HeavyHitters { recent, .. }
                if count > recent =>
            {
                return Err(Error::Option(format!(
                    "{count} tokens appended at once, but policy {} keeps only the {recent} most recent: append at most {recent} per step",
                    policy.name()
                )));
            }
            EvictionPolicy::Streaming { window, .. } => {
                // Logical pages whose every token is older than the window (and past the sinks) go.
                new_window_page = new_window_page.max(seen.saturating_sub(window as u64) / p);
            }
            _ => {}
        }
        let held = self.layout.held_tokens(s.seen).div_ceil(p);
        let new_pages = self.layout.held_tokens(seen).div_ceil(p) - held;
        let freed = new_window_page.saturating_sub(s.window_page.max(sink_pages)).min(s.window_pages.len() as u64);
        Ok(Growth { new_window_page, freed: freed as usize, new_pages: new_pages as usize })
    }

    /// Records `layer`'s append of `step`'s new tokens: K and V `[T, Hkv, D]` in the
    /// layout's dtype, the step's sequences' rows one after another in its order. One launch.
    pub fn append(
        &mut self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        layer: usize,
        step: &PagedStep,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
    ) -> Result<()> {
        self.layer(layer)?;
        self.layers[layer].check_submitted(layer)?;
        let l = &self.layers[layer];
        if step.generation != self.generation || l.appended + 1 != step.generation {
            return Err(Error::Option(format!(
                "layer {layer} cannot append step {} (the latest step is {}, the layer has appended step {})",
                step.generation, self.generation, l.appended
            )));
        }
        if k.shape().first() != Some(&step.tokens) {
            return Err(Error::Shape(format!(
                "appended K has shape {:?}, the step has {} new tokens: [T, Hkv, D] = [{}, {}, {}]",
                k.shape(),
                step.tokens,
                step.tokens,
                self.layout.kv_heads,
                self.layout.head_dim
            )));
        }
        let pool = PoolBuffers { k: &l.k, v: &l.v };
        if let (Some(heavy), Some(evict_tables)) = (&l.heavy, &step.evict_tables) {
            encode_evict(ctx, encoder, &self.layout, heavy, step, evict_tables)?;
        }
        match &step.page_runs {
            Some((runs, count)) => append_pages(ctx, encoder, &self.layout, &pool, runs, *count, k, v)?,
            None => append_rows(ctx, encoder, &self.layout, &pool, &step.slots, l.heavy.is_some(), k, v)?,
        }
        let l = &mut self.layers[layer];
        l.appended = step.generation;
        l.unconfirmed.push((step.generation, follow(encoder)));
        Ok(())
    }

    /// Records attention of the queries `bufs.q` `[S, Hq, Nq, D]` of sequences `ids` (each
    /// its last Nq tokens, Nq at most every one's length) to their retained tokens in
    /// `layer`, writing `bufs.out` and `bufs.lse`. One launch (and one combine).
    pub fn attend(
        &mut self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        layer: usize,
        ids: &[SequenceId],
        bufs: &DecodeBuffers<'_>,
        options: &DecodeOptions,
    ) -> Result<DecodePlan> {
        self.layer(layer)?;
        self.layers[layer].check_submitted(layer)?;
        let l = &self.layers[layer];
        if l.appended != self.generation {
            return Err(Error::Option(format!(
                "layer {layer} has not appended step {}: append before decoding",
                self.generation
            )));
        }
        if ids.is_empty() {
            return Err(Error::Option("a paged decode needs at least one sequence".into()));
        }
        let n_q = bufs.q.shape().get(2).copied().unwrap_or(0) as u64;
        // The sequences' entries, then their block tables.
        let mut tables: Vec<u32> = vec![0; 4 * ids.len()];
        let mut longest = 0;
        for (i, &id) in ids.iter().enumerate() {
            let s = self.sequences.get(&id).ok_or_else(|| unknown(id))?;
            if s.seen < n_q.max(1) {
                return Err(Error::Option(format!(
                    "{n_q} queries but {id:?} has {} tokens: the queries are the last tokens appended",
                    s.seen
                )));
            }
            let slots = s.slots(&self.layout);
            longest = longest.max(slots);
            let entry = [s.seen as u32, tables.len() as u32, slots as u32, s.window_page as u32];
            tables[4 * i..][..4].copy_from_slice(&entry);
            tables.extend(s.table());
        }
        check_u32_indexing("block tables", tables.len() as u64)?;
        // A new buffer per call: a write into a shared one would land before work already recorded.
        let tables_buffer = ctx.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("wattn paged sequence tables"),
            contents: bytemuck::cast_slice(&tables),
            usage: wgpu::BufferUsages::STORAGE,
        });
        let tables = SequenceTables { tables: &tables_buffer, count: ids.len(), longest };
        let Self { layers, scratch, layout, rope_table, .. } = self;
        let l = &layers[layer];
        let pool = PoolBuffers { k: &l.k, v: &l.v };
        let heavy = l.heavy.as_ref();
        decode_with(ctx, encoder, layout, &pool, heavy, rope_table.as_ref(), &tables, bufs, options, scratch)
    }

    /// [`Self::attend`] on tensors wattn allocates: records, submits, returns O and LSE.
    pub fn decode(
        &mut self,
        ctx: &Context,
        layer: usize,
        ids: &[SequenceId],
        q: &Tensor,
        options: &DecodeOptions,
    ) -> Result<AttentionOutput> {
        decode_into_new_tensors(ctx, q, |encoder, bufs| {
            self.attend(ctx, encoder, layer, ids, bufs, options).map(|_| ())
        })
    }

    /// Heavy hitters: the stream position of the token in each slot sequence `id` holds in
    /// `layer`, per KV head (`[Hkv][slots]`, slots in block-table order); `None` under
    /// other policies. Waits for the GPU.
    pub fn read_positions(&self, ctx: &Context, layer: usize, id: SequenceId) -> Result<Option<Vec<Vec<u32>>>> {
        let Some(heavy) = &self.layer(layer)?.heavy else { return Ok(None) };
        let s = self.sequences.get(&id).ok_or_else(|| unknown(id))?;
        let positions: Vec<u32> = read_pod(ctx, &heavy.positions)?;
        let (p, kv_heads) = (self.layout.page_size, self.layout.kv_heads);
        let slots = if s.seen == 0 { 0 } else { s.slots(&self.layout) };
        let table: Vec<u32> = s.table().collect();
        let position = |h: usize, j: usize| positions[(table[j / p] as usize * kv_heads + h) * p + j % p];
        Ok(Some((0..kv_heads).map(|h| (0..slots).map(|j| position(h, j)).collect()).collect()))
    }

    /// K and V of `layer`'s whole pool as f32, `[pages, Hkv, page_size, D]` each, int8
    /// dequantised as the kernels read it. Waits for the GPU.
    pub fn read_pool(&self, ctx: &Context, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let l = self.layer(layer)?;
        let layout = &self.layout;
        let v_words: Vec<u32> = read_pod(ctx, &l.v)?;
        let scales = &v_words[(layout.scales_at() as usize).min(v_words.len())..];
        let (words, d, p) = (layout.row_words(), layout.head_dim, layout.page_size);
        let rows = layout.slots() as usize;
        let read = |buffer: &wgpu::Buffer, is_k: bool| -> Result<Vec<f32>> {
            let buffer_words: Vec<u32> = read_pod(ctx, buffer)?;
            let elements: Vec<f32> = match (layout.storage, layout.dtype) {
                (KvStorage::Float, DType::F32) => bytemuck::cast_slice(&buffer_words).to_vec(),
                (KvStorage::Float, DType::F16) => {
                    let halves: &[u16] = bytemuck::cast_slice(&buffer_words);
                    halves.iter().map(|&h| f16::from_bits(h).to_f32()).collect()
                }
                _ => buffer_words[..rows * words]
                    .iter()
                    .flat_map(|w| w.to_le_bytes().map(|b| (b as i8 as f32 / 127.0).max(-1.0)))
                    .collect(),
            };
            // K per channel: 2^e per (page, KV head, channel), a signed byte each after the words.
            let exponents: &[u8] =
                bytemuck::cast_slice(&buffer_words[(layout.scales_at() as usize).min(buffer_words.len())..]);
            let scale = |row: usize, c: usize| match layout.storage {
                KvStorage::Float => 1.0,
                KvStorage::Int8ChannelK if is_k => 2f32.powi(exponents[row / p * 4 * words + c] as i8 as i32),
                _ => f16::from_bits((scales[row] >> if is_k { 0 } else { 16 }) as u16).to_f32(),
            };
            let mut out = Vec::with_capacity(rows * d);
            for row in 0..rows {
                out.extend(elements[row * 4 * words..][..d].iter().enumerate().map(|(c, &x)| x * scale(row, c)));
            }
            Ok(out)
        };
        Ok((read(&l.k, true)?, read(&l.v, false)?))
    }
}

fn unknown(id: SequenceId) -> Error {
    Error::Option(format!("{id:?} is not in the cache (never added, or removed)"))
}
