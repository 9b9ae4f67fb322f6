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
    /// Nonzero: store each row's logits per slot, for heavy-hitter scores.
    pub write_logits: u32,
    /// Softmax scale, resolved (1/sqrt(D) by default).
    pub scale: f32,
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
    /// Slots per tile.
    pub block_k: u32,
}

const WORKGROUP: u32 = 64;
const MAX_ROWS_PER_BLOCK: u32 = 16;
/// The most splits the automatic choice makes: beyond it the combine costs more than it gains.
pub const MAX_AUTO_SPLITS: u32 = 256;

/// The compile-time shape of one decode pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Variant {
    block_r: u32,
    block_k: u32,
    d_pad: u32,
    d_chunk: u32,
}

impl Variant {
    /// As many rows per workgroup as there are (up to 16), then the larger key tile, then
    /// the wider head-dim chunk, within the device's workgroup memory.
    fn choose(limits: &wgpu::Limits, rows: usize, head_dim: usize) -> Result<Self> {
        let d_pad = (head_dim as u32).next_multiple_of(16);
        let allowed = limits.max_compute_workgroup_storage_size;
        let mut block_r = (rows as u32).next_power_of_two().min(MAX_ROWS_PER_BLOCK);
        loop {
            for (block_k, d_chunk) in [(64, 64), (64, 32), (64, 16), (32, 32), (32, 16)] {
                let v = Self { block_r, block_k, d_pad, d_chunk };
                if d_pad.is_multiple_of(d_chunk) && v.workgroup_bytes() <= allowed {
                    return Ok(v);
                }
            }
            if block_r == 1 {
                return Err(Error::Limit {
                    what: format!("decode tiles at head dim {head_dim}"),
                    needed: Self { block_r, block_k: 32, d_pad, d_chunk: 16 }.workgroup_bytes() as u64,
                    allowed: allowed as u64,
                    limit: "max_compute_workgroup_storage_size",
                });
            }
            block_r /= 2;
        }
    }

    /// Bytes of workgroup memory `decode.wgsl` declares.
    fn workgroup_bytes(&self) -> u32 {
        let Self { block_r, block_k, d_pad, d_chunk } = *self;
        workgroup_array_bytes(block_r * d_pad / 4, 16)
            + workgroup_array_bytes(block_k * (d_chunk / 4 + 1), 16)
            + workgroup_array_bytes(block_k, 4)
            + workgroup_array_bytes(block_r * block_k, 4)
            + 2 * workgroup_array_bytes(block_r, 4)
    }

    /// The most slots one split may scan on an adapter that stops every shader after
    /// `loop_limit` loop iterations in total (see [`Context::loop_iteration_limit`]): all
    /// loops of `decode.wgsl` counted per invocation, with a 10 % margin.
    fn max_keys_per_split(&self, loop_limit: u32) -> u32 {
        let Self { block_r, block_k, d_pad, d_chunk } = *self;
        let (chunks, chunk4) = (d_pad / d_chunk, d_chunk / 4);
        let scores = (block_r * block_k).div_ceil(WORKGROUP);
        let outs = (block_r * chunk4).div_ceil(WORKGROUP);
        // Each staged vec4 runs load4's loop of 4.
        let stage = (block_k * chunk4).div_ceil(WORKGROUP) * 5;
        let per_tile = 1
            + chunks * (1 + stage + scores * (1 + chunk4))
            + 2 * scores
            + 2 * block_k
            + chunks * outs
            + chunks * (1 + stage + outs * (1 + block_k));
        let fixed = (block_r * d_pad / 4).div_ceil(WORKGROUP) * 5 + chunks * outs * 5;
        let budget = (loop_limit as f64 * 0.9) as u32;
        (budget.saturating_sub(fixed) / per_tile).max(1) * block_k
    }

    fn key(&self, dtype: DType) -> ShaderKey {
        ShaderKey {
            kernel: Kernel::Decode,
            entry_point: "main",
            dtype,
            constants: vec![
                ("WORKGROUP", ConstValue::U32(WORKGROUP)),
                ("BLOCK_R", ConstValue::U32(self.block_r)),
                ("BLOCK_K", ConstValue::U32(self.block_k)),
                ("D_PAD", ConstValue::U32(self.d_pad)),
                ("D_CHUNK", ConstValue::U32(self.d_chunk)),
            ],
        }
    }
}

/// Every decode variant [`KvCache::attend`] can build on devices with 16, 32 or 64 KiB of
/// workgroup memory, for validation.
pub fn validation_keys() -> Vec<ShaderKey> {
    let mut keys: Vec<ShaderKey> = Vec::new();
    for storage in [16 << 10, 32 << 10, 64 << 10] {
        let limits = wgpu::Limits { max_compute_workgroup_storage_size: storage, ..wgpu::Limits::default() };
        for rows in [1, 2, 4, 8, 16] {
            for head_dim in (16..=256).step_by(16) {
                for dtype in [DType::F32, DType::F16] {
                    let key = Variant::choose(&limits, rows, head_dim).expect("fits 16 KiB").key(dtype);
                    if !keys.contains(&key) {
                        keys.push(key);
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

impl KvCache {
    /// The layout a decode of `n_q` queries of `q_heads` heads on `layer` would use now.
    /// Automatic splits: enough workgroups to fill the adapter ([`parallel_workgroups`]),
    /// at most [`MAX_AUTO_SPLITS`]. Any choice is capped at one split per tile of keys, and
    /// raised where the adapter caps loop iterations (llvmpipe) so no invocation exceeds it.
    pub fn plan(
        &self,
        ctx: &Context,
        layer: usize,
        q_heads: usize,
        n_q: usize,
        options: &DecodeOptions,
    ) -> Result<DecodePlan> {
        self.layer(layer)?;
        let KvCacheConfig { batch, kv_heads, head_dim, .. } = self.config;
        let rows = (q_heads / kv_heads).max(1) * n_q;
        let variant = Variant::choose(ctx.limits(), rows, head_dim)?;
        let len = (self.len_at(self.checked_seen(layer)?) as u32).max(1);
        let tiles = len.div_ceil(variant.block_k);
        let requested = match options.splits {
            Some(0) => return Err(Error::Option("splits must be at least 1".into())),
            Some(n) => n,
            None => {
                let row_blocks = (rows as u32).div_ceil(variant.block_r);
                let base = (batch * kv_heads) as u32 * row_blocks;
                parallel_workgroups(ctx.adapter_info()).div_ceil(base).min(MAX_AUTO_SPLITS)
            }
        };
        let fewest = ctx.loop_iteration_limit().map_or(1, |limit| len.div_ceil(variant.max_keys_per_split(limit)));
        let keys_per_split = len.div_ceil(requested.max(fewest).min(tiles));
        Ok(DecodePlan {
            splits: len.div_ceil(keys_per_split),
            keys_per_split,
            rows_per_block: variant.block_r,
            block_k: variant.block_k,
        })
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
        let DecodeBuffers { q, out, lse } = bufs;
        let (q_heads, n_q) = self.check_queries(ctx, layer, bufs)?;
        let scale = options.scale.unwrap_or(1.0 / (self.config.head_dim as f32).sqrt());
        if !scale.is_finite() {
            return Err(Error::Option(format!("scale {scale} is not finite")));
        }
        let plan = self.plan(ctx, layer, q_heads, n_q, options)?;
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
        let (rope, rope_sinks, rope_shift) = match positions {
            PositionMode::Absolute => (0, 0, 0),
            PositionMode::Reindexed(r) => {
                let layout = match r.layout {
                    RopeLayout::NeoX => 1,
                    RopeLayout::Interleaved => 2,
                };
                (layout, policy.sinks() as u32, seen.saturating_sub(capacity as u64) as u32)
            }
        };
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
            write_logits: heavy_hitters as u32,
            scale,
        };

        let query_rows = (batch * q_heads * n_q) as u64;
        let splits = plan.splits as u64;
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

        let variant = Variant::choose(ctx.limits(), rows, head_dim)?;
        let pipeline = ctx.pipelines.get(ctx.device(), &variant.key(dtype))?;
        let params = uniform_buffer(ctx, &params);
        let group = bind_buffers(
            ctx.device(),
            &pipeline,
            Kernel::Decode,
            &[
                ("params", &params),
                ("q", q.buffer()),
                ("k", &l.k),
                ("v", &l.v),
                ("pos", &l.positions),
                ("rope_table", rope_table),
                ("partial_out", partial_out),
                ("partial_lse", partial_lse),
                ("logits", logits),
            ],
        )?;
        let mut pass = encoder
            .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("wattn decode"), timestamp_writes: None });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(plan.splits, row_blocks, sequences);
        let merge = Merge {
            partial_out,
            partial_lse,
            out: out.buffer(),
            lse: lse.buffer(),
            out_dtype: dtype,
            rows: query_rows as usize,
            dim: head_dim,
            splits: plan.splits as usize,
        };
        combine::dispatch(ctx, &mut pass, &merge)?;

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
        let lse_shape = &q.shape()[..q.shape().len().min(3)];
        let output = AttentionOutput {
            out: Tensor::zeros(ctx, q.shape(), q.dtype())?,
            lse: Tensor::zeros(ctx, lse_shape, DType::F32)?,
        };
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        let bufs = DecodeBuffers { q: q.view(), out: output.out.view(), lse: output.lse.view() };
        self.attend(ctx, &mut encoder, layer, &bufs, options)?;
        ctx.queue().submit([encoder.finish()]);
        Ok(output)
    }

    /// Checks the queries and outputs of a decode call and returns (Hq, Nq).
    fn check_queries(&self, ctx: &Context, layer: usize, bufs: &DecodeBuffers<'_>) -> Result<(usize, usize)> {
        let DecodeBuffers { q, out, lse } = bufs;
        let KvCacheConfig { batch, kv_heads, head_dim, dtype, policy, .. } = self.config;
        let seen = self.checked_seen(layer)?;
        if q.shape().len() != 4 {
            return Err(Error::Rank { what: "Q", expected: "4 [B, Hq, Nq, D]".into(), got: q.shape().to_vec() });
        }
        if q.shape().contains(&0) {
            return Err(Error::Empty { what: "Q", shape: q.shape().to_vec() });
        }
        let (b, q_heads, n_q, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
        if b != batch || d != head_dim {
            return Err(Error::Shape(format!(
                "Q {:?} must have the cache's batch {batch} and head dim {head_dim}",
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
        if dtype == DType::F16 {
            ctx.require_f16()?;
        }
        Ok((q_heads, n_q))
    }
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
            for (rows, head_dim) in [(1, 64), (4, 128), (8, 80), (32, 256), (3, 17)] {
                let v = Variant::choose(&limits, rows, head_dim).unwrap();
                assert_eq!(
                    v.workgroup_bytes(),
                    declared_workgroup_bytes(&v.key(DType::F32)),
                    "{rows} rows, d{head_dim}"
                );
            }
        }
    }
}
