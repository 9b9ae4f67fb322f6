//! A CPU model of a KV cache for the tests: which token each slot holds under each eviction
//! policy, defined from the policies' descriptions rather than from the kernels' formulas,
//! and the f64 attention (via `wattn::reference`) of queries over exactly the retained tokens.
#![allow(dead_code)]

use crate::common::{Rng, max_abs_err, quantize};
use wattn::kv::{DecodeBuffers, DecodeOptions, DecodePlan, EvictionPolicy, KvCache, KvCacheConfig, PositionMode};
use wattn::reference::{self, RowAttention};
use wattn::{Context, DType, Tensor};

/// One layer of a cache: every token ever appended (as the GPU stores it) and the slot map.
pub struct Model {
    pub batch: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub policy: EvictionPolicy,
    pub positions: PositionMode,
    /// keys[bh][p], values[bh][p]: the token at stream position p of sequence-head bh.
    keys: Vec<Vec<Vec<f64>>>,
    values: Vec<Vec<Vec<f64>>>,
    /// slots[bh][s]: the position of the token in slot s, if any.
    pub slots: Vec<Vec<Option<u64>>>,
    /// Heavy-hitter scores per slot, accumulated in f64 by `attend`.
    pub scores: Vec<Vec<f64>>,
    pub seen: u64,
}

/// Expected O `[B, Hq, Nq, D]` and LSE `[B, Hq, Nq]`.
pub struct Expected {
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
}

impl Model {
    pub fn new(
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        policy: EvictionPolicy,
        positions: PositionMode,
    ) -> Self {
        let n = batch * kv_heads;
        let capacity = policy.capacity();
        Self {
            batch,
            kv_heads,
            head_dim,
            policy,
            positions,
            keys: vec![Vec::new(); n],
            values: vec![Vec::new(); n],
            slots: vec![vec![None; capacity]; n],
            scores: vec![vec![0.0; capacity]; n],
            seen: 0,
        }
    }

    /// Appends K/V `[B, Hkv, T, D]` (already rounded to the storage dtype). Heavy hitters
    /// pick victims by `gpu_scores` `[B, Hkv, capacity]` (the GPU's own, so that float
    /// rounding cannot flip a choice); the model's f64 scores are checked against them separately.
    pub fn append(&mut self, k: &[f32], v: &[f32], count: usize, gpu_scores: Option<&[f32]>) {
        let d = self.head_dim;
        let capacity = self.policy.capacity();
        for bh in 0..self.batch * self.kv_heads {
            for t in 0..count {
                let row = (bh * count + t) * d;
                let p = self.seen + t as u64;
                self.keys[bh].push(k[row..row + d].iter().map(|&x| x as f64).collect());
                self.values[bh].push(v[row..row + d].iter().map(|&x| x as f64).collect());
                let slot = match self.slots[bh].iter().position(|s| s.is_none()) {
                    Some(free) => free,
                    None => self.victim(bh, p, gpu_scores.map(|s| &s[bh * capacity..(bh + 1) * capacity])),
                };
                self.slots[bh][slot] = Some(p);
                self.scores[bh][slot] = 0.0;
            }
        }
        self.seen += count as u64;
    }

    /// The slot a full cache gives up for the token at position p.
    fn victim(&self, bh: usize, p: u64, gpu_scores: Option<&[f32]>) -> usize {
        let held = self.slots[bh].iter().enumerate().map(|(s, pos)| (s, pos.expect("full")));
        match self.policy {
            EvictionPolicy::None { .. } => panic!("policy None never evicts"),
            // StreamingLLM: the oldest token that is not a sink.
            EvictionPolicy::Streaming { sinks, .. } => {
                held.filter(|&(_, pos)| pos >= sinks as u64).min_by_key(|&(_, pos)| pos).expect("a window token").0
            }
            // H2O: the lowest score outside the sinks and the `recent` newest (the new one included); ties: oldest.
            EvictionPolicy::HeavyHitters { sinks, recent, .. } => {
                let scores = gpu_scores.expect("heavy hitters need the GPU's scores");
                held.filter(|&(_, pos)| pos >= sinks as u64 && pos + recent as u64 <= p)
                    .min_by(|a, b| scores[a.0].total_cmp(&scores[b.0]).then(a.1.cmp(&b.1)))
                    .expect("an evictable token")
                    .0
            }
        }
    }

    /// What the GPU's positions buffer `[B, Hkv, capacity]` must hold.
    pub fn positions_buffer(&self) -> Vec<u32> {
        self.slots.iter().flatten().map(|s| s.map_or(wattn::kv::cache::EMPTY_SLOT, |p| p as u32)).collect()
    }

    /// The retained positions of sequence-head bh, oldest first.
    pub fn retained(&self, bh: usize) -> Vec<u64> {
        let mut held: Vec<u64> = self.slots[bh].iter().flatten().copied().collect();
        held.sort_unstable();
        held
    }

    /// Attention of the queries `[B, Hq, Nq, D]` (the last Nq tokens appended) over the
    /// retained tokens they may see (position <= their own), adding each token's probability
    /// to its heavy-hitter score. Re-indexed positions rotate keys and queries at their rank
    /// in the cache.
    pub fn attend(&mut self, q: &[f32], q_heads: usize, n_q: usize, scale: f64) -> Expected {
        let d = self.head_dim;
        let group = q_heads / self.kv_heads;
        let mut out = vec![0.0; self.batch * q_heads * n_q * d];
        let mut lse = vec![0.0; self.batch * q_heads * n_q];
        for b in 0..self.batch {
            for h in 0..q_heads {
                let bh = b * self.kv_heads + h / group;
                let retained = self.retained(bh);
                let cache_index = |p: u64| retained.iter().position(|&x| x == p).expect("query is retained") as f64;
                for i in 0..n_q {
                    let row = (b * q_heads + h) * n_q + i;
                    let qpos = self.seen - n_q as u64 + i as u64;
                    let mut query: Vec<f64> = q[row * d..(row + 1) * d].iter().map(|&x| x as f64).collect();
                    let visible: Vec<u64> = retained.iter().copied().filter(|&p| p <= qpos).collect();
                    let mut keys: Vec<Vec<f64>> = visible.iter().map(|&p| self.keys[bh][p as usize].clone()).collect();
                    let values: Vec<Vec<f64>> = visible.iter().map(|&p| self.values[bh][p as usize].clone()).collect();
                    if let PositionMode::Reindexed(rope) = self.positions {
                        query = reference::rope(&query, cache_index(qpos), rope.base, rope.layout);
                        for (key, &p) in keys.iter_mut().zip(&visible) {
                            *key = reference::rope(key, cache_index(p), rope.base, rope.layout);
                        }
                    }
                    let RowAttention { out: o, lse: l, probs } =
                        reference::attend_rows(&query, &keys, &values, d, scale);
                    out[row * d..(row + 1) * d].copy_from_slice(&o);
                    lse[row] = l;
                    for (&p, prob) in visible.iter().zip(probs) {
                        let slot = self.slots[bh].iter().position(|&s| s == Some(p)).unwrap();
                        self.scores[bh][slot] += prob;
                    }
                }
            }
        }
        Expected { out, lse }
    }
}

/// A GPU cache and its CPU model side by side, fed the same random tokens.
pub struct Harness {
    pub cache: KvCache,
    /// One model per layer.
    pub models: Vec<Model>,
    pub q_heads: usize,
    rng: Rng,
}

/// What one layer's decode gave and what it should have.
pub struct Outcome {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
    pub plan: DecodePlan,
    pub want: Expected,
}

impl Harness {
    pub fn new(ctx: &Context, config: KvCacheConfig, q_heads: usize, seed: u64) -> Self {
        let cache = KvCache::new(ctx, config).unwrap_or_else(|e| panic!("{config:?}: {e}"));
        let KvCacheConfig { layers, batch, kv_heads, head_dim, policy, positions, .. } = config;
        let models = (0..layers).map(|_| Model::new(batch, kv_heads, head_dim, policy, positions)).collect();
        Self { cache, models, q_heads, rng: Rng::new(seed) }
    }

    /// Appends `count` new random tokens to every layer without attending.
    pub fn fill(&mut self, ctx: &Context, count: usize) {
        for layer in 0..self.models.len() {
            let mut encoder = ctx.device().create_command_encoder(&Default::default());
            self.append(ctx, &mut encoder, layer, count);
            ctx.queue().submit([encoder.finish()]);
        }
    }

    /// Records the append of `count` new random tokens to `layer`, in the model too.
    fn append(&mut self, ctx: &Context, encoder: &mut wgpu::CommandEncoder, layer: usize, count: usize) {
        let KvCacheConfig { batch, kv_heads, head_dim, dtype, .. } = *self.cache.config();
        let kv_shape = [batch, kv_heads, count, head_dim];
        let k = quantize(&self.rng.normal_vec(kv_shape.iter().product()), dtype);
        let v = quantize(&self.rng.normal_vec(kv_shape.iter().product()), dtype);
        let scores = matches!(self.models[layer].policy, EvictionPolicy::HeavyHitters { .. })
            .then(|| self.cache.read_scores(ctx, layer).unwrap());
        self.models[layer].append(&k, &v, count, scores.as_deref());
        let upload = |data: &[f32]| Tensor::from_f32(ctx, &kv_shape, data, dtype).unwrap();
        self.cache.append(ctx, encoder, layer, &upload(&k).view(), &upload(&v).view()).unwrap();
    }

    /// Appends `count` new random tokens to every layer, then decodes their queries.
    pub fn step(&mut self, ctx: &Context, count: usize, options: &DecodeOptions) -> Vec<Outcome> {
        let KvCacheConfig { layers, batch, head_dim, dtype, .. } = *self.cache.config();
        let q_shape = [batch, self.q_heads, count, head_dim];
        let mut outcomes = Vec::new();
        for layer in 0..layers {
            let mut encoder = ctx.device().create_command_encoder(&Default::default());
            self.append(ctx, &mut encoder, layer, count);
            let q = quantize(&self.rng.normal_vec(q_shape.iter().product()), dtype);
            let q_gpu = Tensor::from_f32(ctx, &q_shape, &q, dtype).unwrap();
            let out = Tensor::zeros(ctx, &q_shape, dtype).unwrap();
            let lse = Tensor::zeros(ctx, &q_shape[..3], DType::F32).unwrap();
            let bufs = DecodeBuffers { q: q_gpu.view(), out: out.view(), lse: lse.view() };
            let plan = self.cache.attend(ctx, &mut encoder, layer, &bufs, options).unwrap();
            ctx.queue().submit([encoder.finish()]);

            let scale = options.scale.map_or(1.0 / (head_dim as f64).sqrt(), |s| s as f64);
            let want = self.models[layer].attend(&q, self.q_heads, count, scale);
            outcomes.push(Outcome { out: out.to_f32(ctx).unwrap(), lse: lse.to_f32(ctx).unwrap(), plan, want });
        }
        outcomes
    }
}

/// Asserts O and LSE against the model within the dtype's tolerance.
pub fn assert_matches(outcome: &Outcome, dtype: DType, what: &str) {
    // f16 rounds the stored output (half an ulp is 2^-11 relative); accumulation is f32.
    let (out_tol, lse_tol) = match dtype {
        DType::F32 => (2e-5, 2e-5),
        DType::F16 => (2e-3, 2e-4),
    };
    let out_err = max_abs_err(&outcome.out, &outcome.want.out);
    let lse_err = max_abs_err(&outcome.lse, &outcome.want.lse);
    assert!(out_err <= out_tol, "{what}: O differs from the reference by {out_err:.2e} > {out_tol:.0e}");
    assert!(lse_err <= lse_tol, "{what}: LSE differs from the reference by {lse_err:.2e} > {lse_tol:.0e}");
}
