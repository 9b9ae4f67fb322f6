//! Split-KV decode and chunked prefill against the f64 reference, and the combine of partials.

mod common;
mod kv_model;

use common::{Rng, ctx, max_abs_err};
use kv_model::{Harness, Outcome, assert_matches};
use wattn::kv::{DecodeOptions, EvictionPolicy, KvCacheConfig, PositionMode, Rope, RopeLayout, combine};
use wattn::reference;
use wattn::{AttentionOptions, AttentionShape, DType, Tensor};

struct Case {
    dtype: DType,
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Tokens in the cache before the decoded chunk.
    prefix: usize,
    n_q: usize,
    positions: PositionMode,
}

/// Decodes `case` with 1, 3, automatic and more splits than tiles: each equals the reference,
/// and the split ones equal the unsplit one within float rounding.
fn check_splits(case: &Case, seed: u64) {
    let ctx = ctx();
    let Case { dtype, batch, q_heads, kv_heads, head_dim, prefix, n_q, positions } = *case;
    let capacity = prefix + n_q;
    let config = KvCacheConfig {
        layers: 1,
        batch,
        kv_heads,
        head_dim,
        dtype,
        policy: EvictionPolicy::None { capacity },
        positions,
    };
    let what =
        format!("{dtype} B={batch} Hq={q_heads} Hkv={kv_heads} D={head_dim} {prefix}+{n_q} tokens {positions:?}");
    let mut unsplit: Option<Outcome> = None;
    for splits in [Some(1), Some(3), None, Some(1000)] {
        // Same seed: the same tokens every time.
        let mut h = Harness::new(ctx, config, q_heads, seed);
        h.fill(ctx, prefix);
        let outcome = h.step(ctx, n_q, &DecodeOptions { splits, ..Default::default() }).remove(0);
        let label = format!("{what}, splits {splits:?} -> {:?}", outcome.plan);
        eprintln!("{label}");
        assert_matches(&outcome, dtype, &label);
        match &unsplit {
            None => {
                assert_eq!(outcome.plan.splits, 1);
                unsplit = Some(outcome);
            }
            Some(one) => {
                let tiles = capacity.div_ceil(outcome.plan.block_k as usize) as u32;
                assert_eq!(outcome.plan.splits, splits.unwrap_or(outcome.plan.splits).min(tiles), "{label}");
                let rounding = if dtype == DType::F16 { 2e-3 } else { 2e-6 };
                let to_f64 = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
                let out_diff = max_abs_err(&outcome.out, &to_f64(&one.out));
                let lse_diff = max_abs_err(&outcome.lse, &to_f64(&one.lse));
                assert!(
                    out_diff <= rounding && lse_diff <= 2e-6,
                    "{label}: split vs unsplit O {out_diff:.1e}, LSE {lse_diff:.1e}"
                );
            }
        }
    }
}

#[test]
fn split_kv_decode_matches_unsplit_and_reference() {
    let neox = PositionMode::Reindexed(Rope { base: 10000.0, layout: RopeLayout::NeoX });
    let cases = [
        // GQA, single-token decode, several tiles.
        Case {
            dtype: DType::F32,
            batch: 2,
            q_heads: 8,
            kv_heads: 2,
            head_dim: 64,
            prefix: 649,
            n_q: 1,
            positions: PositionMode::Absolute,
        },
        // MHA, one sequence-head: the automatic choice splits (on 2 cores or more: the
        // cache has keys for 2 splits of 4 tiles). A head dim off the 16 grid.
        Case {
            dtype: DType::F32,
            batch: 1,
            q_heads: 1,
            kv_heads: 1,
            head_dim: 40,
            prefix: 700,
            n_q: 1,
            positions: PositionMode::Absolute,
        },
        // A short prefill chunk with RoPE inside the kernel.
        Case {
            dtype: DType::F32,
            batch: 1,
            q_heads: 4,
            kv_heads: 1,
            head_dim: 32,
            prefix: 257,
            n_q: 3,
            positions: neox,
        },
        Case {
            dtype: DType::F16,
            batch: 1,
            q_heads: 6,
            kv_heads: 2,
            head_dim: 128,
            prefix: 200,
            n_q: 2,
            positions: PositionMode::Absolute,
        },
    ];
    for (seed, case) in cases.iter().enumerate() {
        check_splits(case, seed as u64);
    }
}

/// A cache long enough that one workgroup scanning all of it would run past llvmpipe's cap
/// on loop iterations (which silently ends loops; at head dim 128 one split may take about
/// 8,800 keys): the plan splits it even when asked not to.
#[test]
fn long_cache_stays_within_the_loop_cap() {
    let ctx = ctx();
    let prefix = 30000;
    let config = KvCacheConfig {
        layers: 1,
        batch: 1,
        kv_heads: 1,
        head_dim: 128,
        dtype: DType::F32,
        policy: EvictionPolicy::None { capacity: prefix + 1 },
        positions: PositionMode::Absolute,
    };
    let mut h = Harness::new(ctx, config, 4, 21);
    h.fill(ctx, prefix);
    let outcome = h.step(ctx, 1, &DecodeOptions { splits: Some(1), ..Default::default() }).remove(0);
    eprintln!("{} keys, loop cap {:?}: {:?}", prefix + 1, ctx.loop_iteration_limit(), outcome.plan);
    if ctx.loop_iteration_limit().is_some() {
        assert!(outcome.plan.splits > 1, "one split over {} keys would pass the loop cap", prefix + 1);
    }
    assert_matches(&outcome, DType::F32, "decode over 30001 keys");
}

/// A prefill chunk longer than a workgroup's rows attends to the cache and causally to
/// itself: the same as causal flash-style attention (bottom-right aligned) over all tokens.
#[test]
fn chunked_prefill_equals_causal_attention() {
    let ctx = ctx();
    let (batch, q_heads, kv_heads, head_dim, prefix, chunk) = (1, 4, 2, 48, 150, 40);
    let config = KvCacheConfig {
        layers: 1,
        batch,
        kv_heads,
        head_dim,
        dtype: DType::F32,
        policy: EvictionPolicy::None { capacity: 256 },
        positions: PositionMode::Absolute,
    };
    let mut cache = wattn::KvCache::new(ctx, config).unwrap();
    let mut rng = Rng::new(5);
    let n_k = prefix + chunk;
    let k = rng.normal_vec(batch * kv_heads * n_k * head_dim);
    let v = rng.normal_vec(batch * kv_heads * n_k * head_dim);
    let q = rng.normal_vec(batch * q_heads * chunk * head_dim);
    // Tokens [from, to) of every sequence-head, as a [B, Hkv, to - from, D] tensor.
    let tokens = |data: &[f32], from: usize, to: usize| {
        let rows: Vec<f32> =
            data.chunks(n_k * head_dim).flat_map(|head| head[from * head_dim..to * head_dim].to_vec()).collect();
        Tensor::from_f32(ctx, &[batch, kv_heads, to - from, head_dim], &rows, DType::F32).unwrap()
    };
    for (from, to) in [(0, prefix), (prefix, n_k)] {
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        cache.append(ctx, &mut encoder, 0, &tokens(&k, from, to).view(), &tokens(&v, from, to).view()).unwrap();
        ctx.queue().submit([encoder.finish()]);
    }
    let q_gpu = Tensor::from_f32(ctx, &[batch, q_heads, chunk, head_dim], &q, DType::F32).unwrap();
    let got = cache.decode(ctx, 0, &q_gpu, &DecodeOptions { splits: Some(2), ..Default::default() }).unwrap();
    let shape = AttentionShape { batch, q_heads, kv_heads, n_q: chunk, n_k, d_qk: head_dim, d_v: head_dim };
    let want = reference::attention(&q, &k, &v, &shape, &AttentionOptions::causal());
    let out_err = max_abs_err(&got.out.to_f32(ctx).unwrap(), &want.out);
    let lse_err = max_abs_err(&got.lse.to_f32(ctx).unwrap(), &want.lse);
    assert!(
        out_err < 2e-5 && lse_err < 2e-5,
        "prefill of {chunk} after {prefix}: O err {out_err:.1e}, LSE err {lse_err:.1e}"
    );
}

/// The combine on hand-made partials: rows whose partials all saw no key (LSE -inf, both of
/// two or all of three) give zeros and -inf, never NaN; others equal the f64 merge.
#[test]
fn combine_merges_partials_and_empty_rows_give_zeros() {
    let ctx = ctx();
    let (rows, dim) = (6, 8);
    let inf = f32::NEG_INFINITY;
    let mut rng = Rng::new(9);
    for (splits, lses) in [
        (2, vec![inf, inf, 0.5, inf, -3.0, 2.0, inf, 1.0, 40.0, -40.0, 1.5, 1.5]),
        (3, vec![inf, 0.1, inf, 2.0, inf, 7.0, inf, inf, inf, inf, inf, -1.0, inf, inf, 3.0, inf, 0.0, 0.0]),
    ] {
        // [S, rows] for the LSE; outputs are zero where a partial saw nothing, as decode writes them.
        let outs: Vec<f32> = (0..splits * rows)
            .flat_map(|i| {
                let x = rng.normal_vec(dim);
                if lses[i] == inf { vec![0.0; dim] } else { x }
            })
            .collect();
        let upload = |shape: &[usize], data: &[f32]| Tensor::from_f32(ctx, shape, data, DType::F32).unwrap();
        let partial_out = upload(&[splits, 2, 3, dim], &outs);
        let partial_lse = upload(&[splits, 2, 3], &lses);
        for dtype in [DType::F32, DType::F16] {
            let out = Tensor::zeros(ctx, &[2, 3, dim], dtype).unwrap();
            let lse = Tensor::zeros(ctx, &[2, 3], DType::F32).unwrap();
            let mut encoder = ctx.device().create_command_encoder(&Default::default());
            combine::encode(ctx, &mut encoder, &partial_out.view(), &partial_lse.view(), &out.view(), &lse.view())
                .unwrap();
            ctx.submit_and_wait(encoder).unwrap();
            let (got_out, got_lse) = (out.to_f32(ctx).unwrap(), lse.to_f32(ctx).unwrap());
            for r in 0..rows {
                let parts = common::row_partials(&outs, &lses, splits, rows, dim, r);
                let (want_out, want_lse) = reference::merge_partials(&parts);
                let tol = if dtype == DType::F16 { 2e-3 } else { 1e-6 };
                let err = max_abs_err(&got_out[r * dim..(r + 1) * dim], &want_out);
                assert!(err <= tol, "{splits} splits, {dtype}, row {r}: O err {err:.1e}");
                let lse_err = max_abs_err(&got_lse[r..r + 1], &[want_lse]);
                assert!(lse_err <= 1e-5, "{splits} splits, row {r}: LSE {} vs {want_lse}", got_lse[r]);
            }
        }
    }
    // Shapes that do not line up are refused.
    let t = |shape: &[usize]| Tensor::zeros(ctx, shape, DType::F32).unwrap();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    let result = combine::encode(
        ctx,
        &mut encoder,
        &t(&[2, 4, 8]).view(),
        &t(&[3, 4]).view(),
        &t(&[4, 8]).view(),
        &t(&[4]).view(),
    );
    assert!(matches!(result, Err(wattn::Error::Shape(_))));
}
