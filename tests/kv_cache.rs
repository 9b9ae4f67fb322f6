//! The KV cache against a CPU model of its policies: long streams that wrap StreamingLLM's
//! ring many times, heavy-hitter eviction, policy None's refusal to overflow, and bad input.

mod common;
mod kv_model;

use common::{Rng, ctx, second_ctx};
use kv_model::{Harness, Model, assert_matches};
use wattn::bench::stream::{Stream, StreamSpec};
use wattn::kv::cache::EMPTY_SLOT;
use wattn::kv::{DecodeOptions, EvictionPolicy, KvCache, KvCacheConfig, PositionMode, Rope, RopeLayout};
use wattn::{Context, DType, Error, Tensor};

/// Tokens per step, cycled: single-token decode mostly, with chunks that attend causally to themselves.
const STEP_SIZES: [usize; 8] = [1, 1, 2, 1, 1, 5, 1, 3];

fn config(dtype: DType, head_dim: usize, policy: EvictionPolicy, positions: PositionMode) -> KvCacheConfig {
    KvCacheConfig { layers: 1, batch: 2, kv_heads: 2, head_dim, dtype, policy, positions }
}

/// StreamingLLM with 4 sinks + a 28-token window over more than 10x the capacity, in both
/// position modes and both dtypes: every step's output is attention over exactly the sinks
/// and the 28 newest tokens, and the slots hold what the ring puts there. Two tests, by
/// dtype, on two devices, so that their pipelines compile on two cores (see `second_ctx`).
#[test]
fn streaming_matches_dense_attention_over_retained_tokens_in_f32() {
    let neox = PositionMode::Reindexed(Rope { base: 10000.0, layout: RopeLayout::NeoX });
    check_streaming(ctx(), &[(DType::F32, 40, PositionMode::Absolute, 2), (DType::F32, 64, neox, 1)], 0);
}

#[test]
fn streaming_matches_dense_attention_over_retained_tokens_in_f16() {
    let gptj = PositionMode::Reindexed(Rope { base: 500000.0, layout: RopeLayout::Interleaved });
    check_streaming(second_ctx(), &[(DType::F16, 32, gptj, 1), (DType::F16, 48, PositionMode::Absolute, 1)], 2);
}

/// Streams each case (dtype, head dim, positions, layers) on `ctx`, seeded from `seed`.
fn check_streaming(ctx: &Context, cases: &[(DType, usize, PositionMode, usize)], seed: u64) {
    let (sinks, window) = (4, 28);
    let policy = EvictionPolicy::Streaming { sinks, window };
    for (n, &(dtype, head_dim, positions, layers)) in cases.iter().enumerate() {
        let config = KvCacheConfig { layers, ..config(dtype, head_dim, policy, positions) };
        let mut h = Harness::new(ctx, config, 4, seed + n as u64);
        let capacity = h.cache.capacity() as u64;
        let mut step = 0;
        while h.cache.seen(0) < 10 * capacity + 20 {
            let count = STEP_SIZES[step % STEP_SIZES.len()];
            let outcomes = h.step(ctx, count, &DecodeOptions::default());
            let seen = h.cache.seen(0);
            for (layer, outcome) in outcomes.iter().enumerate() {
                let what = format!("{dtype} D={head_dim} {positions:?} layer {layer}, step {step} (tokens 0..{seen})");
                assert_matches(outcome, dtype, &what);
                let model = &h.models[layer];
                let window_start = seen.saturating_sub(window as u64).max(sinks as u64);
                let want: Vec<u64> = (0..(sinks as u64).min(seen)).chain(window_start..seen).collect();
                assert_eq!(model.retained(0), want, "{what}: the model keeps the wrong tokens");
                if step % 5 == 0 {
                    let positions = h.cache.read_positions(ctx, layer).unwrap();
                    assert_eq!(positions, model.positions_buffer(), "{what}: slot positions");
                }
            }
            step += 1;
        }
    }
}

/// H2O: per KV head, the slots hold what a CPU simulation of the policy keeps when it is
/// driven by the GPU's scores, and those scores equal the f64 sums of attention probabilities.
#[test]
fn heavy_hitters_match_cpu_simulation() {
    let ctx = ctx();
    let (sinks, recent, capacity) = (2, 6, 80);
    let policy = EvictionPolicy::HeavyHitters { sinks, recent, capacity };
    let config = KvCacheConfig { batch: 1, ..config(DType::F32, 32, policy, PositionMode::Absolute) };
    let mut h = Harness::new(ctx, config, 4, 7);
    // Two splits once past one tile, so the scores see merged LSEs.
    let options = DecodeOptions { splits: Some(2), ..Default::default() };
    let mut step = 0;
    while h.cache.seen(0) < 3 * capacity as u64 {
        let count = [1, 1, 3, 1, 2][step % 5];
        let outcome = &h.step(ctx, count, &options)[0];
        let what = format!("step {step} (tokens 0..{})", h.cache.seen(0));
        assert_matches(outcome, DType::F32, &what);
        let model = &h.models[0];
        assert_eq!(h.cache.read_positions(ctx, 0).unwrap(), model.positions_buffer(), "{what}: slot positions");
        let gpu_scores = h.cache.read_scores(ctx, 0).unwrap();
        for (i, (&got, &want)) in gpu_scores.iter().zip(model.scores.iter().flatten()).enumerate() {
            let tol = 1e-4 + 1e-5 * want.abs();
            assert!((got as f64 - want).abs() <= tol, "{what}: score of slot {i}: GPU {got}, f64 {want}");
        }
        step += 1;
    }
    // Exact ties, written into the scores: the oldest evictable token goes, on the GPU as in the model.
    let tied: Vec<f32> = (0..2 * capacity).map(|i| if i < capacity { 1.0 } else { (i % 7) as f32 }).collect();
    ctx.queue().write_buffer(h.cache.buffers(0).unwrap().scores, 0, bytemuck::cast_slice(&tied));
    for (bh, scores) in h.models[0].scores.iter_mut().enumerate() {
        *scores = tied[bh * capacity..(bh + 1) * capacity].iter().map(|&x| x as f64).collect();
    }
    h.step(ctx, 3, &options);
    assert_eq!(h.cache.read_positions(ctx, 0).unwrap(), h.models[0].positions_buffer(), "evictions among tied scores");

    let model = &h.models[0];
    assert!(
        model.retained(0) != model.retained(1),
        "both KV heads kept the same tokens: per-head eviction is untested"
    );
    let contiguous: Vec<u64> = (model.seen - (capacity - sinks) as u64..model.seen).collect();
    assert!(model.retained(0)[sinks..] != contiguous[..], "H2O kept a plain window: the scores made no difference");
}

/// Policy None fills the cache, then refuses: a refused append records nothing, and slots
/// beyond the filled ones keep a sentinel the whole time.
#[test]
fn policy_none_refuses_overflow_and_writes_nothing_out_of_bounds() {
    let ctx = ctx();
    let capacity = 20;
    let config = config(DType::F32, 16, EvictionPolicy::None { capacity }, PositionMode::Absolute);
    let mut h = Harness::new(ctx, config, 2, 11);
    const SENTINEL: u32 = 0x7fc0_dead; // a NaN: it would also poison any output that read it
    let sentinel = vec![SENTINEL; 2 * 2 * capacity * 16];
    let buffers = h.cache.buffers(0).unwrap();
    ctx.queue().write_buffer(buffers.k, 0, bytemuck::cast_slice(&sentinel));
    ctx.queue().write_buffer(buffers.v, 0, bytemuck::cast_slice(&sentinel));

    let check_slots = |cache: &KvCache, what: &str| {
        let len = cache.len(0);
        let (k, v) = cache.read_kv(ctx, 0).unwrap();
        for (name, data) in [("K", &k), ("V", &v)] {
            for (i, x) in data.iter().enumerate() {
                let slot = i / 16 % capacity;
                let untouched = x.to_bits() == SENTINEL;
                assert_eq!(slot >= len, untouched, "{what}: {name}[{i}] (slot {slot}, {len} filled) is {x}");
            }
        }
        let positions = cache.read_positions(ctx, 0).unwrap();
        for (i, &p) in positions.iter().enumerate() {
            assert_eq!(i % capacity >= len, p == EMPTY_SLOT, "{what}: position of slot {i} is {p}");
        }
        // As bits: the sentinel is a NaN, which equals nothing.
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        (bits(&k), bits(&v))
    };
    for count in [7, 1, 5, 4] {
        let outcome = &h.step(ctx, count, &DecodeOptions::default())[0];
        let what = format!("after appending {count} ({} held)", h.cache.len(0));
        assert_matches(outcome, DType::F32, &what);
        check_slots(&h.cache, &what);
    }

    let refuse = |cache: &mut KvCache, count: usize| {
        let data = vec![1.0; 2 * 2 * count * 16];
        let k = Tensor::from_f32(ctx, &[2, 2, count, 16], &data, DType::F32).unwrap();
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        let result = cache.append(ctx, &mut encoder, 0, &k.view(), &k.view());
        ctx.queue().submit([encoder.finish()]);
        result
    };
    let before = check_slots(&h.cache, "full");
    match refuse(&mut h.cache, 4) {
        Err(Error::CacheFull { capacity: 20, len: 17, appended: 4 }) => {}
        other => panic!("appending 4 to 17 of 20 slots gave {other:?}"),
    }
    assert_eq!(h.cache.seen(0), 17);
    assert!(before == check_slots(&h.cache, "after a refused append"), "a refused append changed the cache");
    h.step(ctx, 3, &DecodeOptions::default());
    assert!(matches!(refuse(&mut h.cache, 1), Err(Error::CacheFull { len: 20, .. })));
    check_slots(&h.cache, "exactly full");
}

#[test]
fn bad_input_gives_typed_errors() {
    let ctx = ctx();
    let streaming = EvictionPolicy::Streaming { sinks: 2, window: 6 };
    let rope = PositionMode::Reindexed(Rope { base: 10000.0, layout: RopeLayout::NeoX });
    let h2o = EvictionPolicy::HeavyHitters { sinks: 2, recent: 4, capacity: 12 };
    let new = |c: KvCacheConfig| KvCache::new(ctx, c).err();
    let base = config(DType::F32, 16, streaming, PositionMode::Absolute);
    assert!(matches!(new(KvCacheConfig { head_dim: 300, ..base }), Some(Error::HeadDim { got: 300, max: 256, .. })));
    assert!(matches!(new(KvCacheConfig { head_dim: 0, ..base }), Some(Error::HeadDim { got: 0, .. })));
    assert!(matches!(new(KvCacheConfig { head_dim: 15, positions: rope, ..base }), Some(Error::Option(_))));
    assert!(matches!(new(KvCacheConfig { policy: h2o, positions: rope, ..base }), Some(Error::Option(_))));
    assert!(matches!(new(KvCacheConfig { kv_heads: 0, ..base }), Some(Error::Option(_))));
    let no_room = EvictionPolicy::HeavyHitters { sinks: 4, recent: 8, capacity: 10 };
    assert!(matches!(new(KvCacheConfig { policy: no_room, ..base }), Some(Error::Option(_))));
    assert!(matches!(
        new(KvCacheConfig { policy: EvictionPolicy::None { capacity: 0 }, ..base }),
        Some(Error::Option(_))
    ));

    let mut cache = KvCache::new(ctx, base).unwrap();
    let tensor = |shape: &[usize], dtype| Tensor::zeros(ctx, shape, dtype).unwrap();
    let good = tensor(&[2, 2, 1, 16], DType::F32);
    let mut append = |k: &Tensor, v: &Tensor, layer: usize| {
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        let result = cache.append(ctx, &mut encoder, layer, &k.view(), &v.view());
        ctx.queue().submit([encoder.finish()]);
        result
    };
    let wrong_dim = tensor(&[2, 2, 1, 8], DType::F32);
    let wrong_heads = tensor(&[2, 3, 1, 16], DType::F32);
    let longer = tensor(&[2, 2, 2, 16], DType::F32);
    assert!(matches!(append(&wrong_dim, &wrong_dim, 0), Err(Error::Shape(_))));
    assert!(matches!(append(&wrong_heads, &wrong_heads, 0), Err(Error::Shape(_))));
    assert!(matches!(append(&good, &longer, 0), Err(Error::Shape(_))));
    assert!(matches!(append(&tensor(&[2, 2, 16], DType::F32), &good, 0), Err(Error::Rank { .. })));
    assert!(matches!(append(&good, &tensor(&[2, 2, 1, 16], DType::F16), 0), Err(Error::DType(_))));
    let empty = tensor(&[2, 2, 0, 16], DType::F32);
    assert!(matches!(append(&empty, &empty, 0), Err(Error::Empty { .. })));
    assert!(matches!(append(&good, &good, 1), Err(Error::Option(_))));
    let too_many = tensor(&[2, 2, 7, 16], DType::F32);
    assert!(matches!(append(&too_many, &too_many, 0), Err(Error::Option(_))), "more than the window at once");
    append(&longer, &longer, 0).unwrap();

    let decode = |cache: &mut KvCache, shape: &[usize], dtype| {
        cache.decode(ctx, 0, &tensor(shape, dtype), &DecodeOptions::default()).err()
    };
    assert!(matches!(decode(&mut cache, &[2, 5, 1, 16], DType::F32), Some(Error::Heads { got: 2, q_heads: 5, .. })));
    assert!(matches!(decode(&mut cache, &[2, 4, 1, 32], DType::F32), Some(Error::Shape(_))));
    assert!(matches!(decode(&mut cache, &[1, 4, 1, 16], DType::F32), Some(Error::Shape(_))));
    assert!(matches!(decode(&mut cache, &[2, 4, 1, 16], DType::F16), Some(Error::DType(_))));
    assert!(matches!(decode(&mut cache, &[2, 4, 0, 16], DType::F32), Some(Error::Empty { .. })));
    assert!(
        matches!(decode(&mut cache, &[2, 4, 3, 16], DType::F32), Some(Error::Option(_))),
        "more queries than tokens"
    );
    let zero_splits = DecodeOptions { splits: Some(0), ..Default::default() };
    assert!(matches!(cache.decode(ctx, 0, &tensor(&[2, 4, 1, 16], DType::F32), &zero_splits), Err(Error::Option(_))));
    assert!(decode(&mut cache, &[2, 4, 2, 16], DType::F32).is_none());
}

/// Records an append of `count` zero tokens to layer 0 of `cache` into a new encoder:
/// the append's result and the encoder.
fn try_append(cache: &mut KvCache, count: usize) -> (wattn::Result<()>, wgpu::CommandEncoder) {
    let ctx = ctx();
    let KvCacheConfig { batch, kv_heads, head_dim, dtype, .. } = *cache.config();
    let t = Tensor::zeros(ctx, &[batch, kv_heads, count, head_dim], dtype).unwrap();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    (cache.append(ctx, &mut encoder, 0, &t.view(), &t.view()), encoder)
}

/// [`try_append`] that must succeed: the encoder holding the append.
fn record_append(cache: &mut KvCache, count: usize) -> wgpu::CommandEncoder {
    let (result, encoder) = try_append(cache, count);
    result.unwrap();
    encoder
}

/// An append whose encoder is dropped unsubmitted never reaches the GPU, so the cache undoes
/// it: the next tokens get the positions the dropped ones would have had, and decode agrees
/// with a model that never saw them.
#[test]
fn an_append_whose_encoder_is_dropped_is_undone() {
    let ctx = ctx();
    let policy = EvictionPolicy::Streaming { sinks: 2, window: 10 };
    let mut h = Harness::new(ctx, config(DType::F32, 16, policy, PositionMode::Absolute), 4, 21);
    h.step(ctx, 3, &DecodeOptions::default());
    let encoder = record_append(&mut h.cache, 2);
    assert_eq!(h.cache.seen(0), 5, "a recorded append counts at once");
    drop(encoder);
    assert_eq!(h.cache.seen(0), 3, "a dropped append is undone");
    // The same, dropped after being finished into a command buffer.
    drop(record_append(&mut h.cache, 4).finish());
    assert_eq!(h.cache.seen(0), 3);
    for (step, count) in [2, 1, 9, 1].into_iter().enumerate() {
        let outcome = &h.step(ctx, count, &DecodeOptions::default())[0];
        let what = format!("step {step} after the dropped appends ({} tokens)", h.cache.seen(0));
        assert_matches(outcome, DType::F32, &what);
        assert_eq!(h.cache.read_positions(ctx, 0).unwrap(), h.models[0].positions_buffer(), "{what}: positions");
    }
    assert_eq!(h.cache.seen(0), 16);
}

/// A dropped append with another recorded after it cannot be undone (that one places its
/// tokens after the missing ones): the layer refuses appends and decodes with the numbers,
/// and recovers only if the later append is dropped too.
#[test]
fn appends_recorded_after_a_dropped_one_are_refused() {
    let ctx = ctx();
    let base = config(DType::F32, 16, EvictionPolicy::None { capacity: 32 }, PositionMode::Absolute);
    let q = Tensor::zeros(ctx, &[2, 4, 1, 16], DType::F32).unwrap();
    let out_of_step = |cache: &mut KvCache| {
        let refusals = [
            try_append(cache, 1).0.err(),
            cache.decode(ctx, 0, &q, &DecodeOptions::default()).err(),
            cache.plan(ctx, 0, 4, 1, &DecodeOptions::default()).err(),
        ];
        for e in refusals {
            match e {
                Some(Error::KvOutOfStep { layer: 0, position: 3, count: 2 }) => {
                    let e = e.unwrap();
                    for n in ["layer 0", "2 tokens", "position 3", "dropped"] {
                        assert!(e.to_string().contains(n), "'{e}' should mention {n}");
                    }
                }
                other => panic!("expected the layer to be out of step, got {other:?}"),
            }
        }
    };

    for submit_later in [false, true] {
        let mut cache = KvCache::new(ctx, base).unwrap();
        ctx.queue().submit([record_append(&mut cache, 3).finish()]);
        let dropped = record_append(&mut cache, 2);
        let later = record_append(&mut cache, 1);
        drop(dropped);
        out_of_step(&mut cache);
        if submit_later {
            // Its tokens reached the GPU at positions 5..6: nothing can bring the layer back.
            ctx.submit_and_wait(later).unwrap();
            out_of_step(&mut cache);
        } else {
            drop(later);
            assert_eq!(cache.seen(0), 3, "both dropped: both undone");
            ctx.submit_and_wait(record_append(&mut cache, 1)).unwrap();
            assert_eq!(cache.read_positions(ctx, 0).unwrap()[..5], [0, 1, 2, 3, EMPTY_SLOT]);
            cache.decode(ctx, 0, &q, &DecodeOptions::default()).unwrap();
        }
    }
}

/// The model itself: StreamingLLM's victim is the oldest non-sink, so slots cycle like a ring.
#[test]
fn model_streaming_slots_form_a_ring() {
    let mut model = Model::new(1, 1, 1, EvictionPolicy::Streaming { sinks: 2, window: 3 }, PositionMode::Absolute);
    let mut rng = Rng::new(3);
    for _ in 0..9 {
        let x = rng.normal_vec(1);
        model.append(&x, &x, 1, None);
    }
    // Positions 0, 1 are sinks; 6, 7, 8 the window, in slots 2 + (p - 2) % 3.
    assert_eq!(model.slots[0], vec![Some(0), Some(1), Some(8), Some(6), Some(7)]);
}

/// The stream driver: one token per step on every layer, constant memory under eviction,
/// and policy None stops with CacheFull at capacity.
#[test]
fn stream_steps_until_policy_none_is_full() {
    let ctx = ctx();
    let spec = |policy| StreamSpec {
        layers: 2,
        batch: 1,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 32,
        dtype: DType::F32,
        policy,
        positions: PositionMode::Absolute,
        decode: DecodeOptions::default(),
    };
    let mut stream = Stream::new(ctx, &spec(EvictionPolicy::Streaming { sinks: 2, window: 6 })).unwrap();
    let first = stream.step(ctx).unwrap();
    let memory = stream.cache().memory_bytes();
    for position in 1..20 {
        let step = stream.step(ctx).unwrap();
        assert_eq!((step.position, step.cache_len), (position, (position as usize + 1).min(8)));
        assert!(step.seconds > 0.0 && step.splits >= 1);
    }
    assert_eq!((first.position, first.cache_len), (0, 1));
    assert_eq!(stream.cache().memory_bytes(), memory, "memory grew while streaming");

    let mut stream = Stream::new(ctx, &spec(EvictionPolicy::None { capacity: 5 })).unwrap();
    for _ in 0..5 {
        stream.step(ctx).unwrap();
    }
    assert!(matches!(stream.step(ctx), Err(Error::CacheFull { capacity: 5, len: 5, appended: 1 })));
    assert_eq!(stream.position(), 5);
}
