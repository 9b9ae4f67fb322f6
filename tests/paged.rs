//! The paged KV cache: thousands of random adds, appends, evictions and removals, after which
//! every sequence decodes equal to the f64 reference over exactly its retained tokens; no
//! page shared by two live sequences; pages never handed out never written; int8 against the
//! reference on its dequantised values and, within the documented bound, on the original
//! ones; heavy hitters against the dense cache's on the same streams; an engine's own pool
//! with guard pages; bad input.

mod common;

use common::{Rng, ctx, quantize};
use std::collections::{BTreeMap, BTreeSet};
use wattn::kv::paged::{self, KvStorage, PagedKvCache, PagedLayout, PoolBuffers, SequenceTables};
use wattn::kv::{
    DecodeBuffers, DecodeOptions, EvictionPolicy, KvCache, KvCacheConfig, PositionMode, Rope, RopeLayout, SequenceId,
};
use wattn::reference::attend_rows;
use wattn::wgpu::{self, util::DeviceExt};
use wattn::{Context, DType, Error, Tensor};

const Q_HEADS: usize = 4;

/// Attention of one row in plain f32 (scores, two-pass softmax, P V): the error a framework
/// makes, which FlashAttention's rule lets the kernel make twice (plus 1e-5).
fn plain_f32_row(q: &[f32], keys: &[&[f32]], values: &[&[f32]], scale: f32) -> Vec<f32> {
    let d = q.len();
    if keys.is_empty() {
        return vec![0.0; d];
    }
    let s: Vec<f32> = keys.iter().map(|k| scale * q.iter().zip(*k).map(|(a, b)| a * b).sum::<f32>()).collect();
    let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let p: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
    let l: f32 = p.iter().sum();
    (0..d).map(|c| p.iter().zip(values).map(|(w, v)| w * v[c]).sum::<f32>() / l).collect()
}

/// One token's K and V rows `[Hkv * D]`.
type Token = (Vec<f32>, Vec<f32>);

/// Each live sequence's tokens as the test wrote them, per layer.
struct Mirror {
    tokens: BTreeMap<SequenceId, Vec<Vec<Token>>>,
}

/// The tokens of (layer, sequence, tokens seen) that a check compares against.
type TokensOf<'a> = &'a dyn Fn(usize, SequenceId, usize) -> Vec<Token>;
/// The error allowed for a row (its query, visible tokens and KV head).
type Bound<'a> = &'a dyn Fn(&[f32], &[Token], usize) -> f64;

/// Whether the token at `p` of a sequence that has seen `seen` is retained by `policy`
/// (heavy hitters: by the GPU's choice, `held`, the positions a KV head holds).
fn retained(policy: EvictionPolicy, held: Option<&[u32]>, seen: usize, p: usize) -> bool {
    match (policy, held) {
        (EvictionPolicy::Streaming { sinks, window }, _) => p < sinks || seen - p <= window,
        (EvictionPolicy::HeavyHitters { .. }, Some(held)) => held.contains(&(p as u32)),
        _ => true,
    }
}

/// `x`, the query or key of the token at position `p` of a sequence that has seen `seen`, as
/// the kernel attends with it: unchanged, or with re-indexed positions rotated at its index
/// in the cache (sinks first, then the window oldest to newest).
fn rotated(positions: PositionMode, policy: EvictionPolicy, seen: usize, p: usize, x: &[f64]) -> Vec<f64> {
    match positions {
        PositionMode::Absolute => x.to_vec(),
        PositionMode::Reindexed(r) => {
            let index = if p < policy.sinks() { p } else { p - seen.saturating_sub(policy.capacity()) };
            wattn::reference::rope(x, index as f64, r.base, r.layout)
        }
    }
}

/// What a heavy-hitter KV head must hold after `seen` tokens: `min(seen, capacity)` distinct
/// positions below `seen`, among them every sink and every one of the `recent` newest.
fn check_heavy_hitters(policy: EvictionPolicy, held: &[u32], seen: usize, what: &str) {
    let EvictionPolicy::HeavyHitters { sinks, recent, capacity } = policy else { unreachable!() };
    let set: BTreeSet<usize> = held.iter().map(|&p| p as usize).collect();
    assert_eq!((held.len(), set.len()), (seen.min(capacity), seen.min(capacity)), "{what}: {held:?}");
    assert!(set.iter().all(|&p| p < seen), "{what}: {held:?} past {seen}");
    let kept = (0..sinks.min(seen)).chain(seen.saturating_sub(recent)..seen);
    assert!(kept.clone().all(|p| set.contains(&p)), "{what}: {held:?} lacks a sink or a recent token");
}

/// Decodes `n_q` random queries of every listed sequence on every layer and compares each row
/// with the f64 reference over the tokens `keys_of` gives (FlashAttention's rule against the
/// plain f32 error), or within `bound(row)` of it when given. Returns the worst error.
#[allow(clippy::too_many_arguments)]
fn check_decode(
    ctx: &Context,
    cache: &mut PagedKvCache,
    ids: &[SequenceId],
    n_q: usize,
    rng: &mut Rng,
    keys_of: TokensOf<'_>,
    bound: Option<Bound<'_>>,
    what: &str,
) -> f64 {
    let PagedLayout { kv_heads, head_dim: d, policy, dtype, positions, .. } = *cache.layout();
    let layers = cache.layers();
    let scale = 1.0 / (d as f32).sqrt();
    let mut worst = 0.0f64;
    for layer in 0..layers {
        let q = quantize(&rng.normal_vec(ids.len() * Q_HEADS * n_q * d), dtype);
        let q_gpu = Tensor::from_f32(ctx, &[ids.len(), Q_HEADS, n_q, d], &q, dtype).unwrap();
        // Automatic splits (one on a 2-core CPU) or 3, merged by combine.
        let splits = [None, Some(3)][rng.below(2) as usize];
        let result = cache.decode(ctx, layer, ids, &q_gpu, &DecodeOptions { splits, ..Default::default() }).unwrap();
        let (out, lse) = (result.out.to_f32(ctx).unwrap(), result.lse.to_f32(ctx).unwrap());
        for (s, &id) in ids.iter().enumerate() {
            let seen = cache.seen(id).unwrap() as usize;
            let tokens = keys_of(layer, id, seen);
            let held = cache.read_positions(ctx, layer, id).unwrap();
            for (kv, held) in held.iter().flatten().enumerate() {
                check_heavy_hitters(policy, held, seen, &format!("{what}: layer {layer} {id:?} KV head {kv}"));
            }
            for h in 0..Q_HEADS {
                let kv = h / (Q_HEADS / kv_heads);
                let held = held.as_ref().map(|held| held[kv].as_slice());
                for i in 0..n_q {
                    let position = seen - n_q + i;
                    let visible_at: Vec<usize> = (0..=position).filter(|&p| retained(policy, held, seen, p)).collect();
                    let visible: Vec<&Token> = visible_at.iter().map(|&p| &tokens[p]).collect();
                    let key = |t: &Token| t.0[kv * d..][..d].to_vec();
                    let value = |t: &Token| t.1[kv * d..][..d].to_vec();
                    let f64s = |x: &[Vec<f32>]| -> Vec<Vec<f64>> {
                        x.iter().map(|r| r.iter().map(|&e| e as f64).collect()).collect()
                    };
                    let row = (s * Q_HEADS + h) * n_q + i;
                    let q_row = &q[row * d..][..d];
                    let q64 = rotated(positions, policy, seen, position, &f64s(&[q_row.to_vec()])[0]);
                    let keys64: Vec<Vec<f64>> = visible_at
                        .iter()
                        .zip(f64s(&visible.iter().map(|t| key(t)).collect::<Vec<_>>()))
                        .map(|(&p, k)| rotated(positions, policy, seen, p, &k))
                        .collect();
                    let keys: Vec<Vec<f32>> = keys64.iter().map(|k| k.iter().map(|&e| e as f32).collect()).collect();
                    let values: Vec<Vec<f32>> = visible.iter().map(|t| value(t)).collect();
                    let want = attend_rows(&q64, &keys64, &f64s(&values), d, scale as f64);
                    let got = &out[row * d..][..d];
                    let err = got.iter().zip(&want.out).map(|(&g, w)| (g as f64 - w).abs()).fold(0.0, f64::max);
                    let lse_err = (lse[row] as f64 - want.lse).abs();
                    let allowed = match bound {
                        Some(bound) => bound(q_row, &visible.iter().map(|&t| t.clone()).collect::<Vec<_>>(), kv),
                        None => {
                            let k_refs: Vec<&[f32]> = keys.iter().map(|k| k.as_slice()).collect();
                            let v_refs: Vec<&[f32]> = values.iter().map(|v| v.as_slice()).collect();
                            let q32: Vec<f32> = q64.iter().map(|&e| e as f32).collect();
                            let plain = plain_f32_row(&q32, &k_refs, &v_refs, scale);
                            let plain_err =
                                plain.iter().zip(&want.out).map(|(&g, w)| (g as f64 - w).abs()).fold(0.0, f64::max);
                            assert!(lse_err < 1e-4, "{what}: layer {layer} {id:?} row {row}: LSE err {lse_err:.1e}");
                            2.0 * plain_err + 1e-5
                        }
                    };
                    assert!(
                        err <= allowed,
                        "{what}: layer {layer} {id:?} (seen {seen}) head {h} query {i}: O err {err:.2e} > {allowed:.2e}"
                    );
                    worst = worst.max(err);
                }
            }
        }
    }
    worst
}

/// No page is held twice, held plus free is the pool, and no page the cache never handed out
/// holds anything but zeros (nothing was written outside the sequences' pages).
fn check_pages(ctx: &Context, cache: &PagedKvCache, handed_out: &BTreeSet<u32>, what: &str) {
    let layout = *cache.layout();
    let mut held = BTreeSet::new();
    for id in cache.sequence_ids() {
        for (_, page) in cache.block_table(id).unwrap() {
            assert!(held.insert(page), "{what}: page {page} is held by two live sequences");
        }
    }
    assert_eq!(held.len() + cache.free_pages(), layout.pages, "{what}: held and free pages are not the pool");
    let per_page = layout.kv_heads * layout.page_size * layout.head_dim;
    for layer in 0..cache.layers() {
        let (k, v) = cache.read_pool(ctx, layer).unwrap();
        for page in (0..layout.pages as u32).filter(|p| !handed_out.contains(p)) {
            let range = page as usize * per_page..(page as usize + 1) * per_page;
            assert!(
                k[range.clone()].iter().chain(&v[range]).all(|&x| x == 0.0),
                "{what}: layer {layer} page {page} was never handed out but was written"
            );
        }
    }
}

/// Thousands of random operations on a small model under `policy`, checked every 60.
fn random_operations(policy: EvictionPolicy, positions: PositionMode, seed: u64) {
    let ctx = ctx();
    let layout = PagedLayout {
        kv_heads: 2,
        head_dim: 18, // rows padded to 5 words
        page_size: 4,
        pages: 160,
        dtype: DType::F32,
        storage: KvStorage::Float,
        policy,
        positions,
    };
    let layers = 2;
    let mut cache = PagedKvCache::new(ctx, layers, layout).unwrap();
    let mut rng = Rng::new(seed);
    let mut mirror = Mirror { tokens: BTreeMap::new() };
    let mut handed_out = BTreeSet::new();
    let row = layout.kv_heads * layout.head_dim;
    let max_step = policy.recent().unwrap_or(5).min(5);
    let (mut steps, mut removed, mut pool_full) = (0, 0, 0);
    for op in 0..2400 {
        let live: Vec<SequenceId> = mirror.tokens.keys().copied().collect();
        match rng.below(10) {
            0 | 1 if live.len() < 10 => {
                mirror.tokens.insert(cache.add_sequence(), vec![Vec::new(); layers]);
            }
            2 if !live.is_empty() => {
                let id = live[rng.below(live.len() as u64) as usize];
                cache.remove_sequence(id).unwrap();
                mirror.tokens.remove(&id);
                removed += 1;
            }
            _ if !live.is_empty() => {
                let capacity = match policy {
                    EvictionPolicy::None { capacity } => capacity,
                    _ => usize::MAX,
                };
                let mut plan: Vec<(SequenceId, usize)> = Vec::new();
                for &id in &live {
                    let n = 1 + rng.below(max_step as u64) as usize;
                    if rng.below(3) > 0 && cache.seen(id).unwrap() as usize + n <= capacity {
                        plan.push((id, n));
                    }
                }
                if plan.is_empty() {
                    continue;
                }
                // Sequences in any order.
                if rng.below(2) == 0 {
                    plan.reverse();
                }
                let free_before = cache.free_pages();
                let step = match cache.begin_step(ctx, &plan) {
                    Ok(step) => step,
                    Err(Error::PoolFull { .. }) => {
                        assert_eq!(cache.free_pages(), free_before, "a refused step changes nothing");
                        pool_full += 1;
                        let id = live[rng.below(live.len() as u64) as usize];
                        cache.remove_sequence(id).unwrap();
                        mirror.tokens.remove(&id);
                        continue;
                    }
                    Err(e) => panic!("op {op}: {e}"),
                };
                for &(id, _) in &plan {
                    handed_out.extend(cache.block_table(id).unwrap().into_iter().map(|(_, p)| p));
                }
                let mut encoder = ctx.device().create_command_encoder(&Default::default());
                let mut uploads = Vec::new();
                for layer in 0..layers {
                    let (k, v) = (rng.normal_vec(step.tokens() * row), rng.normal_vec(step.tokens() * row));
                    let mut t = 0;
                    for &(id, n) in &plan {
                        for _ in 0..n {
                            let rows = (k[t * row..][..row].to_vec(), v[t * row..][..row].to_vec());
                            mirror.tokens.get_mut(&id).unwrap()[layer].push(rows);
                            t += 1;
                        }
                    }
                    let shape = [step.tokens(), layout.kv_heads, layout.head_dim];
                    let k_gpu = Tensor::from_f32(ctx, &shape, &k, DType::F32).unwrap();
                    let v_gpu = Tensor::from_f32(ctx, &shape, &v, DType::F32).unwrap();
                    cache.append(ctx, &mut encoder, layer, &step, &k_gpu.view(), &v_gpu.view()).unwrap();
                    uploads.push((k_gpu, v_gpu));
                }
                ctx.queue().submit([encoder.finish()]);
                steps += 1;
            }
            _ => {}
        }
        if op % 60 == 59 {
            let what = format!("{policy:?} seed {seed} op {op}");
            check_pages(ctx, &cache, &handed_out, &what);
            let ids: Vec<SequenceId> =
                mirror.tokens.keys().copied().filter(|&id| cache.seen(id).unwrap() >= 2).collect();
            if ids.is_empty() {
                continue;
            }
            let n_q = 1 + rng.below(2) as usize;
            let keys_of = |layer: usize, id: SequenceId, _seen: usize| mirror.tokens[&id][layer].clone();
            check_decode(ctx, &mut cache, &ids, n_q, &mut rng, &keys_of, None, &what);
        }
    }
    assert!(steps > 500 && removed > 50, "{steps} steps, {removed} removals");
    eprintln!("{policy:?}: {steps} steps, {removed} removals, {pool_full} full pools");
}

#[test]
fn random_operations_without_eviction() {
    random_operations(EvictionPolicy::None { capacity: 300 }, PositionMode::Absolute, 1);
}

#[test]
fn random_operations_with_streaming_eviction() {
    // Sinks off the page grid, so a sink page also holds evictable tokens.
    random_operations(EvictionPolicy::Streaming { sinks: 5, window: 13 }, PositionMode::Absolute, 2);
}

#[test]
fn random_operations_with_streaming_eviction_and_reindexed_rope() {
    let rope = Rope { base: 10000.0, layout: RopeLayout::NeoX };
    random_operations(EvictionPolicy::Streaming { sinks: 3, window: 14 }, PositionMode::Reindexed(rope), 12);
}

#[test]
fn random_operations_with_heavy_hitters() {
    // A capacity off the page grid: the last page of each sequence is partly used.
    random_operations(EvictionPolicy::HeavyHitters { sinks: 3, recent: 5, capacity: 18 }, PositionMode::Absolute, 10);
}

/// Paged heavy hitters on several sequences against one dense KvCache per sequence fed the
/// same stream (steps of different sizes, a decode after each with the same queries): the
/// same tokens retained per KV head (the same scores from the same logits) and the same outputs.
#[test]
fn heavy_hitters_match_the_dense_cache() {
    let ctx = ctx();
    let policy = EvictionPolicy::HeavyHitters { sinks: 2, recent: 4, capacity: 22 };
    let (kv_heads, d, sequences) = (2, 32, 3);
    let layout = PagedLayout {
        kv_heads,
        head_dim: d,
        page_size: 8,
        pages: 12,
        dtype: DType::F32,
        storage: KvStorage::Float,
        policy,
        positions: PositionMode::Absolute,
    };
    let mut paged = PagedKvCache::new(ctx, 1, layout).unwrap();
    let config = KvCacheConfig {
        layers: 1,
        batch: 1,
        kv_heads,
        head_dim: d,
        dtype: DType::F32,
        policy,
        positions: PositionMode::Absolute,
    };
    let mut dense: Vec<KvCache> = (0..sequences).map(|_| KvCache::new(ctx, config).unwrap()).collect();
    let ids: Vec<SequenceId> = (0..sequences).map(|_| paged.add_sequence()).collect();
    let mut rng = Rng::new(11);
    let options = DecodeOptions { splits: Some(1), ..Default::default() };
    for step_index in 0..40 {
        let plan: Vec<(SequenceId, usize)> = ids.iter().map(|&id| (id, 1 + rng.below(4) as usize)).collect();
        let step = paged.begin_step(ctx, &plan).unwrap();
        let row = kv_heads * d;
        let (k, v) = (rng.normal_vec(step.tokens() * row), rng.normal_vec(step.tokens() * row));
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        let shape = [step.tokens(), kv_heads, d];
        let (k_gpu, v_gpu) = (
            Tensor::from_f32(ctx, &shape, &k, DType::F32).unwrap(),
            Tensor::from_f32(ctx, &shape, &v, DType::F32).unwrap(),
        );
        paged.append(ctx, &mut encoder, 0, &step, &k_gpu.view(), &v_gpu.view()).unwrap();
        // The dense caches take [1, Hkv, T, D]: the step's rows [T, Hkv, D] of the sequence, transposed.
        let mut uploads = Vec::new();
        let mut first = 0;
        for (cache, &(_, n)) in dense.iter_mut().zip(&plan) {
            let transposed = |x: &[f32]| -> Vec<f32> {
                (0..kv_heads)
                    .flat_map(|h| (first..first + n).flat_map(move |t| (0..d).map(move |c| (t, h, c))))
                    .map(|(t, h, c)| x[(t * kv_heads + h) * d + c])
                    .collect()
            };
            let dense_shape = [1, kv_heads, n, d];
            let k_dense = Tensor::from_f32(ctx, &dense_shape, &transposed(&k), DType::F32).unwrap();
            let v_dense = Tensor::from_f32(ctx, &dense_shape, &transposed(&v), DType::F32).unwrap();
            cache.append(ctx, &mut encoder, 0, &k_dense.view(), &v_dense.view()).unwrap();
            uploads.push((k_dense, v_dense));
            first += n;
        }
        ctx.queue().submit([encoder.finish()]);

        let q = rng.normal_vec(sequences * Q_HEADS * d);
        let q_gpu = Tensor::from_f32(ctx, &[sequences, Q_HEADS, 1, d], &q, DType::F32).unwrap();
        let out = paged.decode(ctx, 0, &ids, &q_gpu, &options).unwrap().out.to_f32(ctx).unwrap();
        for (s, cache) in dense.iter_mut().enumerate() {
            let what = format!("step {step_index} sequence {s}");
            let q_dense =
                Tensor::from_f32(ctx, &[1, Q_HEADS, 1, d], &q[s * Q_HEADS * d..][..Q_HEADS * d], DType::F32).unwrap();
            let want = cache.decode(ctx, 0, &q_dense, &options).unwrap().out.to_f32(ctx).unwrap();
            let got = &out[s * Q_HEADS * d..][..Q_HEADS * d];
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(err < 1e-5, "{what}: O differs from the dense cache's by {err:.1e}");
            let dense_positions = cache.read_positions(ctx, 0).unwrap();
            let paged_positions = paged.read_positions(ctx, 0, ids[s]).unwrap().unwrap();
            for (h, held) in paged_positions.iter().enumerate() {
                let set = |x: &[u32]| -> BTreeSet<u32> { x.iter().copied().filter(|&p| p != u32::MAX).collect() };
                let capacity = policy.capacity();
                assert_eq!(set(held), set(&dense_positions[h * capacity..][..capacity]), "{what} KV head {h}");
            }
        }
    }
}

/// Appends `lengths` tokens of random K/V (scaled by `spread`) to new sequences of an int8
/// (or float) cache in a few steps; returns the cache, the ids and the original tokens.
fn filled_cache(
    dtype: DType,
    storage: KvStorage,
    policy: EvictionPolicy,
    lengths: &[usize],
    spread: f32,
    seed: u64,
) -> (PagedKvCache, Vec<SequenceId>, Mirror) {
    let ctx = ctx();
    let layout = PagedLayout {
        kv_heads: 2,
        head_dim: 64,
        page_size: 16,
        pages: 128,
        dtype,
        storage,
        policy,
        positions: PositionMode::Absolute,
    };
    let mut cache = PagedKvCache::new(ctx, 1, layout).unwrap();
    let ids: Vec<SequenceId> = lengths.iter().map(|_| cache.add_sequence()).collect();
    let mut mirror = Mirror { tokens: ids.iter().map(|&id| (id, vec![Vec::new()])).collect() };
    let mut rng = Rng::new(seed);
    let row = 2 * 64;
    let chunk = policy.recent().unwrap_or(usize::MAX).min(40);
    loop {
        let plan: Vec<(SequenceId, usize)> = ids
            .iter()
            .zip(lengths)
            .filter_map(|(&id, &n)| {
                let left = n - cache.seen(id).unwrap() as usize;
                (left > 0).then_some((id, left.min(chunk)))
            })
            .collect();
        if plan.is_empty() {
            break;
        }
        let step = cache.begin_step(ctx, &plan).unwrap();
        let mut values =
            || quantize(&rng.normal_vec(step.tokens() * row).iter().map(|x| x * spread).collect::<Vec<_>>(), dtype);
        let (k, v) = (values(), values());
        let mut t = 0;
        for &(id, n) in &plan {
            for _ in 0..n {
                mirror.tokens.get_mut(&id).unwrap()[0]
                    .push((k[t * row..][..row].to_vec(), v[t * row..][..row].to_vec()));
                t += 1;
            }
        }
        let shape = [step.tokens(), 2, 64];
        let (k_gpu, v_gpu) =
            (Tensor::from_f32(ctx, &shape, &k, dtype).unwrap(), Tensor::from_f32(ctx, &shape, &v, dtype).unwrap());
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        cache.append(ctx, &mut encoder, 0, &step, &k_gpu.view(), &v_gpu.view()).unwrap();
        ctx.queue().submit([encoder.finish()]);
    }
    (cache, ids, mirror)
}

/// The tokens of sequence `id` as the pool holds them (dequantised), by position; evicted
/// positions get zeros (never read).
fn pool_tokens(ctx: &Context, cache: &PagedKvCache, id: SequenceId) -> Vec<Token> {
    let layout = *cache.layout();
    let (p, d, h) = (layout.page_size, layout.head_dim, layout.kv_heads);
    let (k, v) = cache.read_pool(ctx, 0).unwrap();
    let seen = cache.seen(id).unwrap() as usize;
    let mut tokens = vec![(vec![0.0; h * d], vec![0.0; h * d]); seen];
    for (logical, page) in cache.block_table(id).unwrap() {
        for offset in 0..p {
            let position = logical as usize * p + offset;
            if position >= seen {
                break;
            }
            for head in 0..h {
                let from = ((page as usize * h + head) * p + offset) * d;
                tokens[position].0[head * d..][..d].copy_from_slice(&k[from..][..d]);
                tokens[position].1[head * d..][..d].copy_from_slice(&v[from..][..d]);
            }
        }
    }
    tokens
}

/// int8 under each policy, K per token and per channel: against the reference on the
/// dequantised values (FlashAttention's rule), each dequantised element within its bound of the
/// original, and on the original values within the bound of src/kv/paged.rs.
#[test]
fn int8_matches_the_reference_on_dequantised_and_original_values() {
    let ctx = ctx();
    let (none, streaming) =
        (EvictionPolicy::None { capacity: 600 }, EvictionPolicy::Streaming { sinks: 4, window: 100 });
    for (storage, policy, seed) in [
        (KvStorage::Int8, none, 3),
        (KvStorage::Int8, streaming, 4),
        (KvStorage::Int8ChannelK, none, 13),
        (KvStorage::Int8ChannelK, streaming, 14),
    ] {
        let lengths = [1, 17, 250, 513];
        let (mut cache, ids, mirror) = filled_cache(DType::F32, storage, policy, &lengths, 2.0, seed);
        let mut rng = Rng::new(seed + 100);
        let dequantised: BTreeMap<SequenceId, Vec<_>> =
            ids.iter().map(|&id| (id, pool_tokens(ctx, &cache, id))).collect();
        let what = format!("{storage:?} {policy:?}");
        let on_pool = |_: usize, id: SequenceId, _: usize| dequantised[&id].clone();
        check_decode(ctx, &mut cache, &ids, 1, &mut rng, &on_pool, None, &format!("{what}, dequantised"));

        // Per element, with s the row's largest magnitude (K per token, and V): s / 254 and the
        // f16 rounding of s. K per channel: 2 S / 254 with S the power of two above the channel's
        // largest magnitude in the page, here bounded by the sequence's (its KV head's) largest.
        let amax = |x: &[f32]| x.iter().fold(0.0f64, |m, &e| m.max(e.abs() as f64));
        let row_error = |s: f64| s / 254.0 + s * 2f64.powi(-11);
        let pow2_above = |m: f64| if m == 0.0 { 0.0 } else { 2f64.powi(m.log2().floor() as i32 + 1) };
        let channel_errors = |tokens: &[Token], kv: usize| -> Vec<f64> {
            let largest = |c: usize| tokens.iter().fold(0.0f64, |m, t| m.max(t.0[kv * 64 + c].abs() as f64));
            (0..64).map(|c| 2.0 * pow2_above(largest(c)) / 254.0).collect()
        };
        let key_errors = |k: &[f32], channel: &[f64]| -> Vec<f64> {
            match storage {
                KvStorage::Int8ChannelK => channel.to_vec(),
                _ => vec![row_error(amax(k)); 64],
            }
        };
        for &id in &ids {
            let original = &mirror.tokens[&id][0];
            let seen = original.len();
            for kv in 0..2 {
                let channel = channel_errors(original, kv);
                for p in (0..seen).filter(|&p| retained(policy, None, seen, p)) {
                    let (k, v) = (&original[p].0[kv * 64..][..64], &original[p].1[kv * 64..][..64]);
                    let (dk, dv) = (&dequantised[&id][p].0[kv * 64..][..64], &dequantised[&id][p].1[kv * 64..][..64]);
                    let k_allowed = key_errors(k, &channel);
                    for c in 0..64 {
                        let (k_err, v_err) = ((dk[c] - k[c]).abs() as f64, (dv[c] - v[c]).abs() as f64);
                        assert!(
                            k_err <= k_allowed[c] + 1e-6 && v_err <= row_error(amax(v)) + 1e-6,
                            "{what}: {id:?} position {p} KV head {kv} channel {c}: K {} for {}, V {} for {}",
                            dk[c],
                            k[c],
                            dv[c],
                            v[c]
                        );
                    }
                }
            }
        }

        // The bound: with e_k,c the error of K's channel c (above), logits move by at most
        // d = scale sum_c |q_c| max e_k,c; O by (exp(2d) - 1) max |v| + max e_v.
        let scale = 1.0 / 8.0;
        let bound = |q: &[f32], tokens: &[Token], kv: usize| -> f64 {
            let channel = match storage {
                KvStorage::Int8ChannelK => {
                    let all: Vec<Token> = mirror.tokens.values().flat_map(|t| t[0].clone()).collect();
                    channel_errors(&all, kv)
                }
                _ => vec![0.0; 64],
            };
            let (mut e_k, mut e_v, mut v_max) = (vec![0.0f64; 64], 0.0f64, 0.0f64);
            for (k, v) in tokens {
                let (k, v) = (&k[kv * 64..][..64], &v[kv * 64..][..64]);
                for (e, k_err) in e_k.iter_mut().zip(key_errors(k, &channel)) {
                    *e = e.max(k_err);
                }
                e_v = e_v.max(row_error(amax(v)));
                v_max = v_max.max(amax(v));
            }
            let d = scale * q.iter().zip(&e_k).map(|(&x, e)| x.abs() as f64 * e).sum::<f64>();
            (2.0 * d).exp_m1() * v_max + e_v + 1e-5
        };
        let on_original = |_: usize, id: SequenceId, _: usize| mirror.tokens[&id][0].clone();
        let worst =
            check_decode(ctx, &mut cache, &ids, 1, &mut rng, &on_original, Some(&bound), &format!("{what}, original"));
        eprintln!("{what}: worst error against the original values {worst:.2e}");
    }
}

/// f16 queries and outputs (f32 accumulation) on an f16 pool and an int8 one, against the
/// reference on the values the pool holds, within f16 output rounding, under both policies.
#[test]
fn f16_pool_matches_the_reference() {
    let ctx = ctx();
    if !ctx.capabilities().shader_f16 {
        // The error is the test's result: f16 pools need shader-f16.
        let layout = PagedLayout {
            kv_heads: 1,
            head_dim: 16,
            page_size: 16,
            pages: 1,
            dtype: DType::F16,
            storage: KvStorage::Float,
            policy: EvictionPolicy::None { capacity: 16 },
            positions: PositionMode::Absolute,
        };
        assert!(matches!(
            PagedKvCache::new(ctx, 1, layout),
            Err(Error::F16Unsupported { .. } | Error::F16NotEnabled { .. })
        ));
        return;
    }
    let cases = [
        (EvictionPolicy::None { capacity: 400 }, KvStorage::Float, 5),
        (EvictionPolicy::Streaming { sinks: 2, window: 70 }, KvStorage::Float, 6),
        (EvictionPolicy::Streaming { sinks: 2, window: 70 }, KvStorage::Int8, 7),
        (EvictionPolicy::Streaming { sinks: 2, window: 70 }, KvStorage::Int8ChannelK, 8),
    ];
    for (policy, storage, seed) in cases {
        let (mut cache, ids, _) = filled_cache(DType::F16, storage, policy, &[3, 64, 130, 333], 1.0, seed);
        let mut rng = Rng::new(seed + 100);
        let on_pool: BTreeMap<SequenceId, Vec<Token>> =
            ids.iter().map(|&id| (id, pool_tokens(ctx, &cache, id))).collect();
        let keys_of = |_: usize, id: SequenceId, _: usize| on_pool[&id].clone();
        // f16 output: half an ulp of values below 4, plus the f32 accumulation.
        let f16_rounding = |_: &[f32], _: &[Token], _: usize| 2.0f64.powi(-10) + 1e-5;
        let what = format!("f16 {storage:?} {policy:?}");
        check_decode(ctx, &mut cache, &ids, 2, &mut rng, &keys_of, Some(&f16_rounding), &what);
    }
}

/// int8 takes at most 0.53x the memory of f16 per token.
#[test]
fn int8_memory_is_at_most_053_of_f16() {
    for head_dim in [64, 128] {
        let layout = |storage, dtype| PagedLayout {
            kv_heads: 8,
            head_dim,
            page_size: 16,
            pages: 64,
            dtype,
            storage,
            policy: EvictionPolicy::None { capacity: 1024 },
            positions: PositionMode::Absolute,
        };
        let int8 = layout(KvStorage::Int8, DType::F32).bytes_per_token() as f64;
        let f16 = layout(KvStorage::Float, DType::F16).bytes_per_token() as f64;
        assert!(int8 / f16 <= 0.53, "D {head_dim}: int8 {int8} B, f16 {f16} B per token");
        // K per channel: a byte per channel and page (of 16 tokens) more, per KV head.
        let channel_k = layout(KvStorage::Int8ChannelK, DType::F32).bytes_per_token();
        assert_eq!(channel_k, 8 * (2 * head_dim + 4 + head_dim / 16) as u64, "D {head_dim}");
        eprintln!("D {head_dim}: int8 {:.3}x f16, K per channel {:.3}x", int8 / f16, channel_k as f64 / f16);
    }
}

/// An engine's own pool (with a guard page on each side, filled with a sentinel) and block
/// tables: appends and decodes through the public encode functions; the guard pages and the
/// pages no table names keep their sentinel.
#[test]
fn engine_pool_and_tables_with_guard_pages() {
    let ctx = ctx();
    let device = ctx.device();
    let (kv_heads, d, p) = (2usize, 16usize, 4usize);
    // Pages 0 and 9 are guards; the engine gives its two sequences pages 5, 2 and 7, 3, 8.
    let pages = 10;
    let layout = PagedLayout {
        kv_heads,
        head_dim: d,
        page_size: p,
        pages,
        dtype: DType::F32,
        storage: KvStorage::Float,
        policy: EvictionPolicy::None { capacity: 64 },
        positions: PositionMode::Absolute,
    };
    let sentinel = f32::from_bits(0x7fc0_dead);
    let pool_floats = pages * kv_heads * p * d;
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
    let init =
        |contents: &[u8]| device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: None, contents, usage });
    let filled = || Tensor::from_f32(ctx, &[pool_floats], &vec![sentinel; pool_floats], DType::F32).unwrap();
    let (k_pool, v_pool) = (filled(), filled());
    let pool = PoolBuffers { k: k_pool.buffer(), v: v_pool.buffer() };
    let tables: [(Vec<u32>, usize); 2] = [(vec![5, 2], 6), (vec![7, 3, 8], 11)];
    let mut rng = Rng::new(9);
    let row = kv_heads * d;
    let total: usize = tables.iter().map(|t| t.1).sum();
    let (k, v) = (rng.normal_vec(total * row), rng.normal_vec(total * row));
    let slots: Vec<u32> = tables
        .iter()
        .flat_map(|(pages, n)| (0..*n).map(move |t| (pages[t / p] as usize * kv_heads * p + t % p) as u32))
        .collect();
    let slots = init(bytemuck::cast_slice(&slots));
    let shape = [total, kv_heads, d];
    let (k_gpu, v_gpu) = (
        Tensor::from_f32(ctx, &shape, &k, DType::F32).unwrap(),
        Tensor::from_f32(ctx, &shape, &v, DType::F32).unwrap(),
    );
    let mut encoder = device.create_command_encoder(&Default::default());
    paged::encode_append(ctx, &mut encoder, &layout, &pool, &slots, &k_gpu.view(), &v_gpu.view()).unwrap();
    // Each sequence's entry (seen, table start, slots, first window page), then the tables.
    let mut entries: Vec<u32> = vec![6, 8, 6, 0, 11, 10, 11, 0];
    entries.extend(tables.iter().flat_map(|t| t.0.clone()));
    let entries = init(bytemuck::cast_slice(&entries));
    let seq_tables = SequenceTables { tables: &entries, count: 2, longest: 11 };
    let q = rng.normal_vec(2 * Q_HEADS * d);
    let q_gpu = Tensor::from_f32(ctx, &[2, Q_HEADS, 1, d], &q, DType::F32).unwrap();
    let out = Tensor::zeros(ctx, &[2, Q_HEADS, 1, d], DType::F32).unwrap();
    let lse = Tensor::zeros(ctx, &[2, Q_HEADS, 1], DType::F32).unwrap();
    let bufs = DecodeBuffers { q: q_gpu.view(), out: out.view(), lse: lse.view() };
    paged::encode_decode(ctx, &mut encoder, &layout, &pool, &seq_tables, &bufs, &DecodeOptions::default()).unwrap();
    ctx.submit_and_wait(encoder).unwrap();
    let out = out.to_f32(ctx).unwrap();
    let mut first = 0;
    for (s, (_, n)) in tables.iter().enumerate() {
        for h in 0..Q_HEADS {
            let kv = h / (Q_HEADS / kv_heads);
            let rows = |x: &[f32]| -> Vec<Vec<f64>> {
                (first..first + n).map(|t| x[t * row + kv * d..][..d].iter().map(|&e| e as f64).collect()).collect()
            };
            let r = s * Q_HEADS + h;
            let q64: Vec<f64> = q[r * d..][..d].iter().map(|&e| e as f64).collect();
            let want = attend_rows(&q64, &rows(&k), &rows(&v), d, 0.25);
            let err = out[r * d..][..d].iter().zip(&want.out).map(|(&g, w)| (g as f64 - w).abs()).fold(0.0, f64::max);
            assert!(err < 2e-5, "sequence {s} head {h}: O err {err:.1e}");
        }
        first += n;
    }
    let per_page = kv_heads * p * d;
    for pool in [&k_pool, &v_pool] {
        let bits: Vec<u32> = pool.to_f32(ctx).unwrap().iter().map(|x| x.to_bits()).collect();
        for page in [0, 1, 4, 6, 9] {
            assert!(
                bits[page * per_page..][..per_page].iter().all(|&b| b == sentinel.to_bits()),
                "page {page}, named by no table, was written"
            );
        }
    }
}

#[test]
fn bad_input_is_an_error() {
    let ctx = ctx();
    let layout = PagedLayout {
        kv_heads: 2,
        head_dim: 16,
        page_size: 4,
        pages: 4,
        dtype: DType::F32,
        storage: KvStorage::Float,
        policy: EvictionPolicy::None { capacity: 8 },
        positions: PositionMode::Absolute,
    };
    let bad = |l: PagedLayout| PagedKvCache::new(ctx, 1, l).err().expect("refused").to_string();
    assert!(bad(PagedLayout { page_size: 3, ..layout }).contains("power of two"));
    assert!(bad(PagedLayout { head_dim: 300, ..layout }).contains("300"));
    assert!(bad(PagedLayout { pages: 0, ..layout }).contains("pages"));
    let h2o = EvictionPolicy::HeavyHitters { sinks: 1, recent: 2, capacity: 1 };
    assert!(bad(PagedLayout { policy: h2o, ..layout }).contains("capacity"));
    // Heavy hitters: not with re-indexed positions; no more than the recent tokens at once; an
    // engine's tables lack the scores.
    let heavy = PagedLayout { policy: EvictionPolicy::HeavyHitters { sinks: 1, recent: 2, capacity: 8 }, ..layout };
    let rope = PositionMode::Reindexed(Rope { base: 10000.0, layout: RopeLayout::Interleaved });
    assert!(bad(PagedLayout { positions: rope, ..heavy }).contains("heavy hitters"));
    assert!(bad(PagedLayout { positions: rope, head_dim: 15, ..layout }).contains("even head dim"));
    let channel_k = PagedLayout { storage: KvStorage::Int8ChannelK, ..layout };
    assert!(bad(PagedLayout { positions: rope, ..channel_k }).contains("per channel"));
    assert!(bad(PagedLayout { policy: heavy.policy, ..channel_k }).contains("per channel"));
    let mut cache = PagedKvCache::new(ctx, 1, heavy).unwrap();
    let a = cache.add_sequence();
    assert!(cache.begin_step(ctx, &[(a, 3)]).unwrap_err().to_string().contains("at most 2"));
    let tables = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 64,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let q = Tensor::from_f32(ctx, &[1, 4, 1, 16], &[0.1; 64], DType::F32).unwrap();
    let (out, lse) =
        (Tensor::zeros(ctx, &[1, 4, 1, 16], DType::F32).unwrap(), Tensor::zeros(ctx, &[1, 4, 1], DType::F32).unwrap());
    let bufs = DecodeBuffers { q: q.view(), out: out.view(), lse: lse.view() };
    let sequence_tables = SequenceTables { tables: &tables, count: 1, longest: 4 };
    let pool = cache.buffers(0).unwrap();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    let err =
        paged::encode_decode(ctx, &mut encoder, &heavy, &pool, &sequence_tables, &bufs, &DecodeOptions::default());
    assert!(err.unwrap_err().to_string().contains("heavy hitters"));

    let mut cache = PagedKvCache::new(ctx, 2, layout).unwrap();
    let a = cache.add_sequence();
    let gone = cache.add_sequence();
    cache.remove_sequence(gone).unwrap();
    assert!(cache.remove_sequence(gone).is_err());
    assert!(matches!(cache.begin_step(ctx, &[(gone, 1)]), Err(Error::Option(_))));
    assert!(matches!(cache.begin_step(ctx, &[(a, 1), (a, 1)]), Err(Error::Option(_))));
    assert!(matches!(cache.begin_step(ctx, &[(a, 0)]), Err(Error::Option(_))));
    assert!(matches!(cache.begin_step(ctx, &[(a, 9)]), Err(Error::CacheFull { capacity: 8, .. })));
    let b = cache.add_sequence();
    let c = cache.add_sequence();
    // 3 sequences of 8 tokens need 6 pages of 4; the pool has 4. Nothing changes.
    assert!(matches!(
        cache.begin_step(ctx, &[(a, 8), (b, 8), (c, 8)]),
        Err(Error::PoolFull { needed: 6, free: 4, .. })
    ));
    assert_eq!((cache.free_pages(), cache.seen(a)), (4, Some(0)));

    let step = cache.begin_step(ctx, &[(a, 3), (b, 2)]).unwrap();
    let data = vec![0.5f32; 5 * 2 * 16];
    let kv = Tensor::from_f32(ctx, &[5, 2, 16], &data, DType::F32).unwrap();
    let short = Tensor::from_f32(ctx, &[4, 2, 16], &data[..128], DType::F32).unwrap();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    assert!(matches!(cache.append(ctx, &mut encoder, 0, &step, &short.view(), &short.view()), Err(Error::Shape(_))));
    assert!(cache.append(ctx, &mut encoder, 5, &step, &kv.view(), &kv.view()).is_err());
    cache.append(ctx, &mut encoder, 0, &step, &kv.view(), &kv.view()).unwrap();
    // Twice, decoding a layer before it appended, and a new step before every layer appended.
    assert!(cache.append(ctx, &mut encoder, 0, &step, &kv.view(), &kv.view()).is_err());
    let q = Tensor::from_f32(ctx, &[2, 4, 1, 16], &vec![0.1; 128], DType::F32).unwrap();
    assert!(cache.decode(ctx, 1, &[a, b], &q, &DecodeOptions::default()).is_err());
    assert!(cache.begin_step(ctx, &[(a, 1)]).unwrap_err().to_string().contains("layer 1"));
    cache.append(ctx, &mut encoder, 1, &step, &kv.view(), &kv.view()).unwrap();
    ctx.queue().submit([encoder.finish()]);
    // Q of the wrong batch, 3 queries for a 2-token sequence, heads not a multiple, dtype.
    let q3 = Tensor::from_f32(ctx, &[3, 4, 1, 16], &vec![0.1; 192], DType::F32).unwrap();
    assert!(matches!(cache.decode(ctx, 0, &[a, b], &q3, &DecodeOptions::default()), Err(Error::Shape(_))));
    let chunk = Tensor::from_f32(ctx, &[2, 4, 3, 16], &vec![0.1; 384], DType::F32).unwrap();
    assert!(
        cache
            .decode(ctx, 0, &[a, b], &chunk, &DecodeOptions::default())
            .err()
            .unwrap()
            .to_string()
            .contains("3 queries")
    );
    let odd = Tensor::from_f32(ctx, &[2, 3, 1, 16], &vec![0.1; 96], DType::F32).unwrap();
    assert!(matches!(cache.decode(ctx, 0, &[a, b], &odd, &DecodeOptions::default()), Err(Error::Heads { .. })));
    assert!(cache.decode(ctx, 0, &[], &q, &DecodeOptions::default()).is_err());
    assert!(cache.decode(ctx, 0, &[a, b], &q, &DecodeOptions { splits: Some(0), ..Default::default() }).is_err());
    cache.decode(ctx, 0, &[a, b], &q, &DecodeOptions::default()).unwrap();

    // An append recorded into an encoder dropped unsubmitted: the layer refuses from then on.
    let step = cache.begin_step(ctx, &[(a, 1)]).unwrap();
    let one = Tensor::from_f32(ctx, &[1, 2, 16], &data[..32], DType::F32).unwrap();
    let mut dropped = ctx.device().create_command_encoder(&Default::default());
    cache.append(ctx, &mut dropped, 0, &step, &one.view(), &one.view()).unwrap();
    drop(dropped);
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    cache.append(ctx, &mut encoder, 1, &step, &one.view(), &one.view()).unwrap();
    ctx.queue().submit([encoder.finish()]);
    let err = cache.decode(ctx, 0, &[a, b], &q, &DecodeOptions::default()).err().expect("refused");
    assert!(err.to_string().contains("dropped without being submitted"), "{err}");
    cache.decode(ctx, 1, &[a, b], &q, &DecodeOptions::default()).unwrap();
    assert!(cache.begin_step(ctx, &[(b, 1)]).is_err());

    // An engine's pool too small for its layout.
    let small = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 64,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let pool = PoolBuffers { k: &small, v: &small };
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    let err = paged::encode_append(ctx, &mut encoder, &layout, &pool, &small, &kv.view(), &kv.view()).unwrap_err();
    assert!(err.to_string().contains("pool K has 64 bytes"), "{err}");
    // K per channel: an engine's slot mapping does not say which tokens share a page.
    let err = paged::encode_append(ctx, &mut encoder, &channel_k, &pool, &small, &kv.view(), &kv.view()).unwrap_err();
    assert!(err.to_string().contains("through PagedKvCache"), "{err}");
    // An int8 pool whose V has room for its words but not for the scales after them.
    let int8 = PagedLayout { storage: KvStorage::Int8, ..layout };
    let words_only = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: int8.k_bytes(),
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let pool = PoolBuffers { k: &words_only, v: &words_only };
    let err = paged::encode_append(ctx, &mut encoder, &int8, &pool, &small, &kv.view(), &kv.view()).unwrap_err();
    assert!(err.to_string().contains("pool V"), "{err}");
}
