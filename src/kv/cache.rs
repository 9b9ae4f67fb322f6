//! [`KvCache`]: the per-layer buffers, appending new tokens (slot choice and eviction on the
//! GPU, `shaders/kv_cache.wgsl`), and reading the cache's state back for inspection.

use super::{EvictionPolicy, KvCacheConfig, PositionMode, Rope};
use crate::attention::MAX_HEAD_DIM;
use crate::context::Context;
use crate::dispatch::{bind_buffers, check_grid, scratch, uniform_buffer, wrapped_grid};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shader::{ConstValue, Kernel, ShaderKey};
use crate::tensor::{TensorView, byte_size, check_binding_size, check_u32_indexing, read_f32, read_pod};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use wgpu::util::DeviceExt;

/// Uniform parameters of `kv_cache.wgsl`.
/// Keep in sync with `struct Params` there (a test compares the layouts).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct KvParams {
    /// B.
    pub batch: u32,
    /// Hkv.
    pub kv_heads: u32,
    /// Hq (accumulate only).
    pub q_heads: u32,
    /// D, of K and V.
    pub head_dim: u32,
    /// Slots per (sequence, KV head).
    pub capacity: u32,
    /// Tokens appended before this call: token t of the call has position `seen + t`.
    pub seen: u32,
    /// New tokens per sequence (place, evict, append) or queries (accumulate).
    pub count: u32,
    /// Slots holding tokens (accumulate only).
    pub len: u32,
    /// Tokens kept from the start of the stream.
    pub sinks: u32,
    /// StreamingLLM: the ring's size; heavy hitters: recent tokens never evicted.
    pub window: u32,
    /// Workgroups along x; the grid wraps into y.
    pub groups_x: u32,
    /// Paged append into an int8 pool: the word of the V pool where the scales begin.
    pub scales_at: u32,
    /// Paged entry points: tokens per page.
    pub page_size: u32,
    /// Paged append: 1 if the slots are per (token, KV head) (heavy hitters), 0 per token.
    pub row_slots: u32,
    /// Paged append with K per channel: the word of the K pool where the channel exponents begin.
    pub k_scales_at: u32,
}

/// Threads per workgroup of every `kv_cache.wgsl` entry point (a power of two: `place` reduces over it).
pub(crate) const WORKGROUP: u32 = 64;

/// Marks an empty slot in the positions buffer.
pub const EMPTY_SLOT: u32 = u32::MAX;

pub(crate) fn shader_key(entry_point: &'static str, dtype: DType) -> ShaderKey {
    storage_key(entry_point, dtype, false)
}

/// `entry_point` of `kv_cache.wgsl` on new K/V of `dtype`, into a paged pool of int8 words
/// (`int8`) or of `dtype` (the other entry points take `false`).
pub(crate) fn storage_key(entry_point: &'static str, dtype: DType, int8: bool) -> ShaderKey {
    ShaderKey {
        kernel: Kernel::KvCache,
        entry_point,
        dtype,
        constants: vec![("WORKGROUP", ConstValue::U32(WORKGROUP)), ("INT8", ConstValue::Bool(int8))],
    }
}

/// Every variant of `kv_cache.wgsl`.
pub fn shader_keys() -> Vec<ShaderKey> {
    let entries = ["place", "evict", "append", "accumulate"];
    let dtypes = [DType::F32, DType::F16];
    let dense = dtypes.iter().flat_map(|&d| entries.iter().map(move |e| shader_key(e, d)));
    let paged = dtypes.iter().flat_map(|&d| [false, true].map(|int8| storage_key("append_paged", d, int8)));
    let heavy_hitters =
        dtypes.iter().flat_map(|&d| ["evict_paged", "accumulate_paged"].map(|e| storage_key(e, d, false)));
    let channels = dtypes.iter().map(|&d| storage_key("append_paged_channels", d, true));
    dense.chain(paged).chain(heavy_hitters).chain(channels).collect()
}

/// The GPU buffers of one layer, for engines that read or fill them directly.
#[derive(Clone, Copy, Debug)]
pub struct LayerBuffers<'a> {
    /// `[B, Hkv, capacity, D]` in the cache's dtype.
    pub k: &'a wgpu::Buffer,
    /// `[B, Hkv, capacity, D]` in the cache's dtype.
    pub v: &'a wgpu::Buffer,
    /// `[B, Hkv, capacity]` u32: the stream position of each slot's token, [`EMPTY_SLOT`] if none.
    pub positions: &'a wgpu::Buffer,
    /// `[B, Hkv, capacity]` f32: accumulated attention (heavy hitters; zeros otherwise).
    pub scores: &'a wgpu::Buffer,
}

pub(crate) struct Layer {
    pub(crate) k: wgpu::Buffer,
    pub(crate) v: wgpu::Buffer,
    pub(crate) positions: wgpu::Buffer,
    pub(crate) scores: wgpu::Buffer,
    /// Tokens appended by every append recorded so far, submitted or not.
    recorded: u64,
    /// The recorded appends whose work is not yet known to be done, oldest first.
    unconfirmed: Vec<RecordedAppend>,
}

// Why the cache follows each append's encoder
//
// An append is recorded into the caller's encoder: the host must plan the next call (slots,
// positions, the decode's length) before any of it runs, so it counts the tokens when it
// records them. If that encoder is then dropped instead of submitted, the GPU never sees the
// tokens and the host's count is ahead of it: every later position would be wrong, silently.
// Keeping the count on the GPU would need a readback before every plan, against the point of
// recording; a token the caller must commit after submitting would be one more thing to get
// wrong. Instead each append asks its encoder for a callback (`on_submitted_work_done`):
// wgpu runs it once the submitted work is done, and drops it unrun with an encoder that is
// dropped unsubmitted, which `Watch` notices. The next call then undoes the dropped appends
// when nothing was recorded after them (the usual case: an error path dropped the encoder),
// and refuses with [`Error::KvOutOfStep`] when later appends were recorded on top of them.

// What became of the encoder one append was recorded into.
const PENDING: u8 = 0;
pub(crate) const DONE: u8 = 1;
pub(crate) const DROPPED: u8 = 2;

/// One recorded append: where it started and what became of its encoder.
struct RecordedAppend {
    first: u64,
    fate: Arc<AtomicU8>,
}

/// Lives in the encoder's callback: marks the append DONE when the callback runs, DROPPED
/// when the callback is dropped unrun (its encoder was dropped without being submitted).
struct Watch(Arc<AtomicU8>);

impl Watch {
    fn done(self) {
        self.0.store(DONE, Ordering::Release);
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.0.compare_exchange(PENDING, DROPPED, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// Follows `encoder`: the fate turns [`DONE`] once its submitted work is done, [`DROPPED`] if
/// it is dropped without being submitted.
pub(crate) fn follow(encoder: &wgpu::CommandEncoder) -> Arc<AtomicU8> {
    let fate = Arc::new(AtomicU8::new(PENDING));
    let watch = Watch(fate.clone());
    encoder.on_submitted_work_done(move || watch.done());
    fate
}

impl Layer {
    fn new(k: wgpu::Buffer, v: wgpu::Buffer, positions: wgpu::Buffer, scores: wgpu::Buffer) -> Self {
        Self { k, v, positions, scores, recorded: 0, unconfirmed: Vec::new() }
    }

    /// The unconfirmed appends to keep: all but those dropped after every live one. Errors
    /// if a dropped append has a live one after it (layer `index`, for the message).
    fn live_appends(&self, index: usize) -> Result<usize> {
        let fate = |a: &RecordedAppend| a.fate.load(Ordering::Acquire);
        let live = self.unconfirmed.iter().rposition(|a| fate(a) != DROPPED).map_or(0, |i| i + 1);
        if let Some(i) = self.unconfirmed[..live].iter().position(|a| fate(a) == DROPPED) {
            let (first, next) = (self.unconfirmed[i].first, self.unconfirmed[i + 1].first);
            return Err(Error::KvOutOfStep { layer: index, position: first, count: next - first });
        }
        Ok(live)
    }

    /// Tokens the GPU holds once the work recorded so far, less dropped appends, is submitted.
    fn seen(&self, index: usize) -> Result<u64> {
        let live = self.live_appends(index)?;
        Ok(self.unconfirmed.get(live).map_or(self.recorded, |dropped| dropped.first))
    }

    /// Forgets the appends that are done and undoes those dropped after every live one.
    fn settle(&mut self, index: usize) -> Result<u64> {
        let live = self.live_appends(index)?;
        if let Some(dropped) = self.unconfirmed.get(live) {
            self.recorded = dropped.first;
        }
        self.unconfirmed.truncate(live);
        let done = self.unconfirmed.iter().take_while(|a| a.fate.load(Ordering::Acquire) == DONE).count();
        self.unconfirmed.drain(..done);
        Ok(self.recorded)
    }

    /// Counts `count` tokens appended by work just recorded into `encoder`.
    fn record(&mut self, encoder: &wgpu::CommandEncoder, count: usize) {
        let fate = follow(encoder);
        self.unconfirmed.push(RecordedAppend { first: self.recorded, fate });
        self.recorded += count as u64;
    }
}

/// Buffers that depend on the call's shape (new tokens, queries, splits), grown on demand
/// and reused: consecutive kernels in one encoder may share them, wgpu orders the passes.
#[derive(Default)]
pub(crate) struct Scratch {
    pub(crate) dest: Option<wgpu::Buffer>,
    pub(crate) partial_out: Option<wgpu::Buffer>,
    pub(crate) partial_lse: Option<wgpu::Buffer>,
    pub(crate) logits: Option<wgpu::Buffer>,
    /// Bound where a kernel's variant does not read the binding.
    pub(crate) unused: Option<wgpu::Buffer>,
}

/// A GPU-resident KV cache: per layer, K and V of fixed capacity for B sequences × Hkv heads,
/// the positions of their tokens, and the eviction policy's state. See the [module docs](super).
pub struct KvCache {
    pub(crate) config: KvCacheConfig,
    pub(crate) layers: Vec<Layer>,
    /// `[capacity, D / 2]` (cos, sin) for re-indexed positions; 8 unused bytes otherwise.
    pub(crate) rope_table: wgpu::Buffer,
    pub(crate) scratch: Scratch,
}

impl KvCache {
    /// Allocates the cache: K/V zeroed, every slot empty.
    pub fn new(ctx: &Context, config: KvCacheConfig) -> Result<Self> {
        validate_config(ctx, &config)?;
        let KvCacheConfig { layers, batch, kv_heads, head_dim, dtype, policy, positions } = config;
        let capacity = policy.capacity();
        let slots = batch * kv_heads * capacity;
        // Whole 16-byte words: decode.wgsl reads K and V as arrays of 4-element words.
        let kv_bytes = byte_size(slots * head_dim, dtype).next_multiple_of(16);
        check_binding_size(ctx, "KV cache K", kv_bytes)?;
        let device = ctx.device();
        let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let zeroed = |label: &str, size: u64| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: storage,
                mapped_at_creation: false,
            })
        };
        let layers = (0..layers)
            .map(|_| {
                Layer::new(
                    zeroed("wattn kv cache K", kv_bytes),
                    zeroed("wattn kv cache V", kv_bytes),
                    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: Some("wattn kv cache positions"),
                        contents: bytemuck::cast_slice(&vec![EMPTY_SLOT; slots]),
                        usage: storage,
                    }),
                    zeroed("wattn kv cache scores", 4 * slots as u64),
                )
            })
            .collect();
        let table = match positions {
            PositionMode::Reindexed(rope) => rope_table(&rope, capacity, head_dim),
            PositionMode::Absolute => vec![0.0; 2],
        };
        let rope_table = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("wattn rope table"),
            contents: bytemuck::cast_slice(&table),
            usage: wgpu::BufferUsages::STORAGE,
        });
        Ok(Self { config, layers, rope_table, scratch: Scratch::default() })
    }

    /// The configuration the cache was made with.
    pub fn config(&self) -> &KvCacheConfig {
        &self.config
    }

    /// Slots per (sequence, KV head).
    pub fn capacity(&self) -> usize {
        self.config.policy.capacity()
    }

    /// Tokens appended to `layer` so far; the next one gets this position. Appends recorded
    /// into an encoder that was then dropped unsubmitted do not count (see [`Self::append`]).
    pub fn seen(&self, layer: usize) -> u64 {
        self.layers.get(layer).map_or(0, |l| l.seen(layer).unwrap_or(l.recorded))
    }

    /// Tokens `layer` holds (per sequence and KV head): slots `[0, len)` are filled.
    pub fn len(&self, layer: usize) -> usize {
        self.len_at(self.seen(layer))
    }

    /// Tokens held after `seen` were appended.
    pub(crate) fn len_at(&self, seen: u64) -> usize {
        seen.min(self.capacity() as u64) as usize
    }

    /// [`Self::seen`], or the reason `layer` cannot be used ([`Error::KvOutOfStep`], or no such layer).
    pub(crate) fn checked_seen(&self, layer: usize) -> Result<u64> {
        self.layer(layer)?.seen(layer)
    }

    /// Whether `layer` holds no token yet ([`Self::seen`] is 0).
    pub fn is_empty(&self, layer: usize) -> bool {
        self.seen(layer) == 0
    }

    /// The GPU buffers of `layer`, or [`Error::Option`] if there is no such layer.
    pub fn buffers(&self, layer: usize) -> Result<LayerBuffers<'_>> {
        let l = self.layer(layer)?;
        Ok(LayerBuffers { k: &l.k, v: &l.v, positions: &l.positions, scores: &l.scores })
    }

    /// Bytes of GPU memory the cache holds: every layer's buffers, the RoPE table and the
    /// scratch buffers of the largest call so far. Fixed by the configuration and the call
    /// shapes, never by the stream's length.
    pub fn memory_bytes(&self) -> u64 {
        let layers: u64 =
            self.layers.iter().map(|l| l.k.size() + l.v.size() + l.positions.size() + l.scores.size()).sum();
        let s = &self.scratch;
        let scratch: u64 = [&s.dest, &s.partial_out, &s.partial_lse, &s.logits]
            .iter()
            .filter_map(|b| b.as_ref())
            .map(|b| b.size())
            .sum();
        layers + self.rope_table.size() + scratch
    }

    pub(crate) fn layer(&self, layer: usize) -> Result<&Layer> {
        let n = self.layers.len();
        self.layers
            .get(layer)
            .ok_or_else(|| Error::Option(format!("layer {layer} does not exist: the cache has {n} layers")))
    }

    /// Records the append of one step's new tokens to `layer`: K and V `[B, Hkv, T, D]` in
    /// the cache's dtype, copied into their slots by kernels (evicting per the policy) with no
    /// host round trip. The cache counts the tokens as appended when this returns; submit
    /// encoders in the order they were recorded. If `encoder` is dropped without being
    /// submitted, the next call on this layer finds out and undoes the append, unless another
    /// append was recorded after it: that one would place its tokens at the wrong positions,
    /// so the layer then refuses every call with [`Error::KvOutOfStep`].
    ///
    /// Errors: shapes or dtype that differ from the cache's, T = 0, more than the policy's
    /// window (StreamingLLM) or recent tokens (heavy hitters) at once, or, under policy None,
    /// more tokens than the free slots ([`Error::CacheFull`], and nothing is recorded).
    pub fn append(
        &mut self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        layer: usize,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
    ) -> Result<()> {
        self.layer(layer)?;
        let seen = self.layers[layer].settle(layer)?;
        let count = self.check_append(k, v)?;
        let KvCacheConfig { batch, kv_heads, head_dim, dtype, policy, .. } = self.config;
        let capacity = policy.capacity();
        let len = self.len_at(seen);
        match policy {
            EvictionPolicy::None { .. } if len + count > capacity => {
                return Err(Error::CacheFull { capacity, len, appended: count });
            }
            _ => {}
        }
        if let Some(recent) = policy.recent().filter(|&r| count > r) {
            return Err(Error::Option(format!(
                "{count} tokens appended at once, but policy {} keeps only the {recent} most recent: append at most {recent} per call",
                policy.name()
            )));
        }
        // Positions are u32 on the GPU, with room for `position + window` in the eviction test.
        let end = seen + count as u64 + capacity as u64;
        if end > EMPTY_SLOT as u64 {
            return Err(Error::Limit {
                what: format!("stream position {}", seen + count as u64),
                needed: end,
                allowed: EMPTY_SLOT as u64,
                limit: "32-bit positions",
            });
        }

        let heavy_hitters = matches!(policy, EvictionPolicy::HeavyHitters { .. });
        // `evict` runs every new token through one workgroup, scanning every slot for each.
        if let (true, Some(limit)) = (heavy_hitters, ctx.loop_iteration_limit()) {
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
        let (sinks, window) = match policy {
            EvictionPolicy::None { .. } => (0, 0),
            EvictionPolicy::Streaming { sinks, window } => (sinks, window),
            EvictionPolicy::HeavyHitters { sinks, recent, .. } => (sinks, recent),
        };
        let sequences = (batch * kv_heads) as u32;
        let tokens = sequences as u64 * count as u64;
        let place_grid = wrapped_grid(ctx.limits(), "KV place grid", tokens.div_ceil(WORKGROUP as u64))?;
        let copy_grid =
            wrapped_grid(ctx.limits(), "KV append grid", (tokens * head_dim as u64).div_ceil(WORKGROUP as u64))?;
        let params = KvParams {
            batch: batch as u32,
            kv_heads: kv_heads as u32,
            head_dim: head_dim as u32,
            capacity: capacity as u32,
            seen: seen as u32,
            count: count as u32,
            sinks: sinks as u32,
            window: window as u32,
            ..KvParams::default()
        };
        let place_params = uniform_buffer(ctx, &KvParams { groups_x: place_grid[0], ..params });
        let copy_params = uniform_buffer(ctx, &KvParams { groups_x: copy_grid[0], ..params });
        let dest = scratch(ctx, &mut self.scratch.dest, "wattn kv slots of new tokens", 4 * tokens)?;
        let l = &self.layers[layer];
        let (place_entry, place_groups) = match heavy_hitters {
            true => ("evict", [sequences, 1]),
            false => ("place", place_grid),
        };
        let place = ctx.pipelines.get(ctx.device(), &shader_key(place_entry, dtype))?;
        let copy = ctx.pipelines.get(ctx.device(), &shader_key("append", dtype))?;
        let mut place_bindings = vec![("params", &place_params), ("pos", &l.positions), ("dest", dest)];
        if heavy_hitters {
            place_bindings.push(("score", &l.scores));
        }
        let place_group = bind_buffers(ctx.device(), &place, Kernel::KvCache, &place_bindings)?;
        let copy_group = bind_buffers(
            ctx.device(),
            &copy,
            Kernel::KvCache,
            &[
                ("params", &copy_params),
                ("src_k", k.buffer()),
                ("src_v", v.buffer()),
                ("k", &l.k),
                ("v", &l.v),
                ("dest", dest),
            ],
        )?;
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("wattn kv append"),
            timestamp_writes: None,
        });
        pass.set_pipeline(&place);
        pass.set_bind_group(0, &place_group, &[]);
        pass.dispatch_workgroups(place_groups[0], place_groups[1], 1);
        pass.set_pipeline(&copy);
        pass.set_bind_group(0, &copy_group, &[]);
        pass.dispatch_workgroups(copy_grid[0], copy_grid[1], 1);
        drop(pass);
        self.layers[layer].record(encoder, count);
        Ok(())
    }

    /// Checks new K/V against the cache and returns T.
    fn check_append(&self, k: &TensorView<'_>, v: &TensorView<'_>) -> Result<usize> {
        let KvCacheConfig { batch, kv_heads, head_dim, dtype, .. } = self.config;
        for (what, t) in [("appended K", k), ("appended V", v)] {
            if t.shape().len() != 4 {
                return Err(Error::Rank { what, expected: "4 [B, Hkv, T, D]".into(), got: t.shape().to_vec() });
            }
            if t.shape().contains(&0) {
                return Err(Error::Empty { what, shape: t.shape().to_vec() });
            }
            let want = [batch, kv_heads, t.shape()[2], head_dim];
            if t.shape() != want {
                return Err(Error::Shape(format!(
                    "{what} has shape {:?}, the cache takes [B, Hkv, T, D] = {want:?}",
                    t.shape()
                )));
            }
            if t.dtype() != dtype {
                return Err(Error::DType(format!("{what} is {} but the cache stores {dtype}", t.dtype())));
            }
        }
        if k.shape() != v.shape() {
            return Err(Error::Shape(format!("appended K {:?} and V {:?} differ", k.shape(), v.shape())));
        }
        Ok(k.shape()[2])
    }

    /// The positions buffer of `layer`, `[B, Hkv, capacity]` ([`EMPTY_SLOT`] = empty). Waits for the GPU.
    pub fn read_positions(&self, ctx: &Context, layer: usize) -> Result<Vec<u32>> {
        read_pod(ctx, &self.layer(layer)?.positions)
    }

    /// The heavy-hitter scores of `layer`, `[B, Hkv, capacity]`. Waits for the GPU.
    pub fn read_scores(&self, ctx: &Context, layer: usize) -> Result<Vec<f32>> {
        read_pod(ctx, &self.layer(layer)?.scores)
    }

    /// K and V of `layer` as f32, `[B, Hkv, capacity, D]` each. Waits for the GPU.
    pub fn read_kv(&self, ctx: &Context, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let l = self.layer(layer)?;
        let KvCacheConfig { batch, kv_heads, head_dim, .. } = self.config;
        let n = batch * kv_heads * self.capacity() * head_dim;
        let dtype = self.config.dtype;
        Ok((read_f32(ctx, &l.k, n, dtype)?, read_f32(ctx, &l.v, n, dtype)?))
    }
}

/// Loop iterations `evict` runs per new token over `capacity` slots, counted the way a
/// loop-capped adapter (llvmpipe) counts them: the scan, the reduction, and every barrier
/// in the token loop's body as one more iteration.
pub(crate) fn evict_loop_iterations(capacity: usize) -> usize {
    let reduction_steps = WORKGROUP.ilog2() as usize;
    let barriers = 1 + reduction_steps + 2;
    1 + barriers + capacity.div_ceil(WORKGROUP as usize) + 2 * reduction_steps
}

fn validate_config(ctx: &Context, config: &KvCacheConfig) -> Result<()> {
    let KvCacheConfig { layers, batch, kv_heads, head_dim, dtype, policy, positions } = *config;
    policy.validate()?;
    for (what, n) in [("layers", layers), ("batch", batch), ("kv_heads", kv_heads)] {
        if n == 0 {
            return Err(Error::Option(format!("KV cache {what} must be at least 1")));
        }
    }
    if head_dim == 0 || head_dim > MAX_HEAD_DIM {
        return Err(Error::HeadDim { what: "KV cache", got: head_dim, max: MAX_HEAD_DIM });
    }
    if dtype == DType::F16 {
        ctx.require_f16()?;
    }
    super::validate_positions(positions, policy, head_dim)?;
    let elements = (batch * kv_heads * policy.capacity()) as u64 * head_dim as u64;
    check_u32_indexing("KV cache", elements)?;
    check_grid(ctx.limits(), &format!("KV cache grid: {} sequence heads", batch * kv_heads), (batch * kv_heads) as u32)
}

/// (cos, sin) of every position `[0, capacity)` and frequency `[0, D/2)`, computed in f64.
/// The layout (which columns pair up) is the kernel's business, not the table's.
pub(crate) fn rope_table(rope: &Rope, capacity: usize, head_dim: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut table = Vec::with_capacity(2 * capacity * half);
    for p in 0..capacity {
        for i in 0..half {
            let angle = p as f64 * rope.base.powf(-2.0 * i as f64 / head_dim as f64);
            table.extend([angle.cos() as f32, angle.sin() as f32]);
        }
    }
    table
}
