//! Varlen attention (sequences packed along the sequence axis) against the f64 reference run
//! on each sequence alone, with FlashAttention's rule: lengths of 1, sequences without keys
//! (zeros, LSE -inf) and without queries, causal with more and with fewer queries than keys,
//! GQA, windows with sinks, softcap, f16, key passes, block masks; and the errors for packed
//! tensors that do not match the lengths.

mod common;

use common::{Inputs, Verdict, ctx, own_device, packed_shape, rows_of, sequence, varlen_lengths};
use wattn::attention::varlen::{self, SeqLens};
use wattn::{
    AttentionBuffers, AttentionOptions, AttentionShape, BlockMask, Context, DType, Error, FlashConfig, Mask, Tensor,
};

/// Random packed inputs for `seqlens`, uploaded.
fn packed_inputs(c: &Context, p: &AttentionShape, dtype: DType, seed: u64) -> (Inputs, [Tensor; 3]) {
    let x = Inputs::random(p, dtype, seed);
    let (q, k, v) = x.upload(c, p, dtype);
    (x, [q, k, v])
}

/// Judges packed O and LSE sequence by sequence against the f64 reference on that sequence
/// alone (where query i also needs `sees(s, i, j)`), by FlashAttention's rule; returns the
/// failures. Every sequence's rows are compared, so a row written to another sequence's
/// place, or not written, shows.
#[allow(clippy::too_many_arguments)]
fn judge(
    what: &str,
    got: (&[f32], &[f32]),
    x: &Inputs,
    p: &AttentionShape,
    seqlens: &SeqLens,
    options: &AttentionOptions,
    dtype: DType,
    sees: impl Fn(usize, usize, usize) -> bool,
) -> Vec<String> {
    let mut failures = Vec::new();
    for s in 0..seqlens.len() {
        let (shape, inputs) = sequence(x, p, seqlens, s);
        if shape.n_q == 0 {
            continue;
        }
        let queries = seqlens.queries(s);
        let out = rows_of(got.0, p.q_heads, p.n_q, &queries, p.d_v);
        let lse = rows_of(got.1, p.q_heads, p.n_q, &queries, 1);
        let verdict = Verdict::new_masked(&out, &lse, &inputs, &shape, options, dtype, |i, j| sees(s, i, j));
        let line = format!("{what} sequence {s} ({} x {}): {}", shape.n_q, shape.n_k, verdict.describe());
        if !verdict.passes() {
            failures.push(line);
        } else if s < 6 {
            eprintln!("{line}");
        }
    }
    failures
}

/// `attention_varlen` on `c` with every option set in `cases` on one packing: one shader.
fn check_options(
    c: &Context,
    seqlens: &SeqLens,
    heads: (usize, usize),
    dims: (usize, usize),
    dtype: DType,
    cases: &[(&str, AttentionOptions)],
) {
    let p = packed_shape(seqlens, heads, dims);
    let mut failures = Vec::new();
    for (n, (name, options)) in cases.iter().enumerate() {
        let (x, [q, k, v]) = packed_inputs(c, &p, dtype, 40 + n as u64);
        let result = wattn::attention_varlen(c, &q, &k, &v, seqlens, options).unwrap();
        let (out, lse) = (result.out.to_f32(c).unwrap(), result.lse.to_f32(c).unwrap());
        let what = format!("{dtype} H{}/{} D{}/{} {name}", heads.0, heads.1, dims.0, dims.1);
        failures.extend(judge(&what, (&out, &lse), &x, &p, seqlens, options, dtype, |_, _, _| true));
    }
    assert!(failures.is_empty(), "{} sequences broke the rule:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn every_sequence_matches_the_reference_alone() {
    let (q, k) = varlen_lengths(5, 7);
    let seqlens = SeqLens::new(&q, &k).unwrap();
    let with =
        |causal, window, sinks, softcap| AttentionOptions { causal, window, sinks, softcap, ..Default::default() };
    let cases = [
        ("full", with(false, (-1, -1), 0, 0.0)),
        ("causal", with(true, (-1, -1), 0, 0.0)),
        ("sinks3+window(16,0)", with(false, (16, 0), 3, 0.0)),
        ("softcap5+window(-1,7) scale 0.2", AttentionOptions { scale: Some(0.2), ..with(false, (-1, 7), 0, 5.0) }),
    ];
    check_options(ctx(), &seqlens, (4, 2), (32, 32), DType::F32, &cases);
}

#[test]
fn f16_unaligned_head_dims_and_mqa() {
    if !ctx().capabilities().shader_f16 {
        eprintln!("this adapter has no shader f16: the f16 case is not run (the f32 ones are)");
        return;
    }
    let (q, k) = varlen_lengths(3, 8);
    let seqlens = SeqLens::new(&q, &k).unwrap();
    let cases = [("causal+window(24,-1)", AttentionOptions { window: (24, -1), ..AttentionOptions::causal() })];
    check_options(ctx(), &seqlens, (3, 1), (19, 13), DType::F16, &cases);
}

/// The key passes a loop-capped adapter needs, forced small: passes in each sequence's own
/// keys, sequences that end before the last pass, state rows in the packed layout. On a
/// device with WebGPU's default limits (8 storage buffers per stage, say) but for a grid of
/// at most 6 workgroups per dimension, so that the 14 (query block, head) pairs wrap into z
/// (6 x 3, the last 4 workgroups past the end).
#[test]
fn key_passes_walk_each_sequences_own_keys() {
    let limits = wgpu::Limits { max_compute_workgroups_per_dimension: 6, ..wgpu::Limits::default() };
    let (device, queue) = own_device(ctx().device().features(), limits);
    let capped = Context::from_wgpu(device, queue).with_loop_iteration_limit(4000);
    let seqlens = SeqLens::new(&[40, 3, 90, 0, 17], &[400, 0, 150, 20, 17]).unwrap();
    let p = packed_shape(&seqlens, (2, 1), (32, 32));
    let longest = AttentionShape { n_k: seqlens.max_k(), ..p };
    let config = FlashConfig::for_adapter(&capped).fitted(capped.limits(), &p);
    let per_pass = config.keys_per_pass(&longest, capped.loop_iteration_limit()).unwrap() as usize;
    let passes = seqlens.max_k().div_ceil(per_pass);
    assert!(passes >= 3, "the cap should force several passes, got {passes}");
    let options = AttentionOptions { causal: true, window: (120, -1), sinks: 4, ..Default::default() };
    let (x, [q, k, v]) = packed_inputs(&capped, &p, DType::F32, 5);
    let result = varlen::attention_varlen_with(&capped, &q, &k, &v, &seqlens, &options, &config).unwrap();
    let (out, lse) = (result.out.to_f32(&capped).unwrap(), result.lse.to_f32(&capped).unwrap());
    let what = format!("{passes} passes of {per_pass} keys");
    let failures = judge(&what, (&out, &lse), &x, &p, &seqlens, &options, DType::F32, |_, _, _| true);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A block mask per sequence (its batch axis), built for the longest sequence's lengths:
/// each sequence sees the corner its lengths cover, on top of the dense options.
#[test]
fn block_masks_index_by_sequence() {
    let c = ctx();
    let seqlens = SeqLens::new(&[50, 1, 33, 0], &[70, 64, 0, 5]).unwrap();
    let p = packed_shape(&seqlens, (2, 2), (32, 32));
    let config = FlashConfig::for_adapter(c).fitted(c.limits(), &p);
    let (max_q, max_k) = (seqlens.max_q(), seqlens.max_k());
    let pattern = |s: usize| {
        move |i: usize, j: usize| (i / 7 + j / 5 + s).is_multiple_of(3) || (i as i64 - j as i64).abs() < 4 + s as i64
    };
    let masks: Vec<Mask> = (0..seqlens.len()).map(|s| Mask::from_fn(max_q, max_k, pattern(s))).collect();
    let block_mask = BlockMask::build(&masks, seqlens.len(), 1, max_q, max_k, config.block_size()).unwrap();
    let gpu_mask = block_mask.upload(c).unwrap();
    let options = AttentionOptions { window: (40, -1), ..Default::default() };
    let (x, [q, k, v]) = packed_inputs(c, &p, DType::F32, 9);
    let (out, lse) = (Tensor::zeros(c, &p.out_shape(), DType::F32).unwrap(), lse_tensor(c, &p));
    let bufs = AttentionBuffers { q: q.view(), k: k.view(), v: v.view(), out: out.view(), lse: lse.view() };
    let mut encoder = c.device().create_command_encoder(&Default::default());
    varlen::encode(c, &mut encoder, &bufs, &seqlens, Some(&gpu_mask), &options, &config).unwrap();
    c.queue().submit([encoder.finish()]);
    let (out, lse) = (out.to_f32(c).unwrap(), lse.to_f32(c).unwrap());
    let sees = |s: usize, i: usize, j: usize| pattern(s)(i, j);
    let failures = judge("block mask", (&out, &lse), &x, &p, &seqlens, &options, DType::F32, sees);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn lse_tensor(c: &Context, p: &AttentionShape) -> Tensor {
    Tensor::zeros(c, &p.lse_shape(), DType::F32).unwrap()
}

/// Packed tensors that do not match the lengths, or are not packed, are errors before any
/// work; so are masks for other lengths or another number of sequences.
#[test]
fn inputs_that_do_not_match_the_lengths_are_errors() {
    let c = ctx();
    let seqlens = SeqLens::new(&[3, 4], &[5, 6]).unwrap();
    let tensor = |dims: &[usize]| Tensor::zeros(c, dims, DType::F32).unwrap();
    let (q, k, v) = (tensor(&[1, 2, 7, 16]), tensor(&[1, 1, 11, 16]), tensor(&[1, 1, 11, 16]));
    let options = AttentionOptions::default();
    let shape_error = |result: wattn::Result<wattn::AttentionOutput>, words: &str| match result {
        Err(e @ Error::Shape(_)) => assert!(e.to_string().contains(words), "{e}"),
        Err(e) => panic!("expected a shape error with '{words}', got {e}"),
        Ok(_) => panic!("expected a shape error with '{words}'"),
    };
    shape_error(wattn::attention_varlen(c, &tensor(&[1, 2, 8, 16]), &k, &v, &seqlens, &options), "sum to 7");
    let short = tensor(&[1, 1, 10, 16]);
    shape_error(wattn::attention_varlen(c, &q, &short, &short, &seqlens, &options), "sum to 11");
    let batched = SeqLens::new(&[2, 2], &[3, 3]).unwrap();
    let (q2, k2) = (tensor(&[2, 2, 2, 16]), tensor(&[2, 1, 3, 16]));
    shape_error(wattn::attention_varlen(c, &q2, &k2, &k2, &batched, &options), "batch 2");
    match wattn::attention_varlen(c, &tensor(&[2, 7, 16]), &k, &v, &seqlens, &options) {
        Err(Error::Rank { what: "Q", .. }) => {}
        other => panic!("expected a rank error, got {:?}", other.err()),
    }

    // A mask for 2 sequences of the longest lengths (4 x 6) passes the checks; others do not.
    let config = FlashConfig::for_adapter(c);
    let block = config.block_size();
    let lse = tensor(&[1, 2, 7]);
    let out = tensor(&[1, 2, 7, 16]);
    let bufs = AttentionBuffers { q: q.view(), k: k.view(), v: v.view(), out: out.view(), lse: lse.view() };
    for (mask, words) in [
        (BlockMask::build(&[Mask::full(), Mask::full(), Mask::full()], 3, 1, 4, 6, block), "3 batch"),
        (BlockMask::new(&Mask::full(), 7, 11, block), "7 queries x 11 keys"),
    ] {
        let gpu = mask.unwrap().upload(c).unwrap();
        let mut encoder = c.device().create_command_encoder(&Default::default());
        let e = varlen::encode(c, &mut encoder, &bufs, &seqlens, Some(&gpu), &options, &config).unwrap_err();
        assert!(matches!(e, Error::Shape(_)) && e.to_string().contains(words), "{words}: {e}");
    }
}
