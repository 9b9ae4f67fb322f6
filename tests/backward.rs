//! The backward (dQ, dK, dV) against the f64 reference gradients, with FlashAttention's rule:
//! each gradient's largest error may be at most twice that of a plain materialised backward
//! in the same precision, plus a floor: half a rounding of the largest gradient, and what
//! recomputing the weights does to it. Every weight is exp(score - LSE) with the forward's
//! f32 LSE and a score recomputed in another order than the forward's, two roundings that
//! move each weight by about eps (1 + |LSE|); the plain backward, which keeps one softmax,
//! does not pay them (a row with one key gets exactly 1). Also:
//! bit-identical reruns, NaN semantics, passes under a loop cap, reads without subgroups,
//! varlen batches judged sequence by sequence, and bad input.

mod common;

use common::{
    Inputs, Rng, ctx, max_abs_err, own_device, packed_shape, quantize, round_to, rows_of, second_ctx, sequence,
    varlen_lengths,
};
use wattn::attention::varlen::{self, SeqLens};
use wattn::reference::{self, ReferenceGradients};
use wattn::{
    AttentionBuffers, AttentionOptions, AttentionShape, BlockMask, BlockSize, Context, DType, Error, FlashConfig,
    GradientBuffers, Gradients, Mask, Tensor, backward,
};

/// A backward problem: the forward's inputs, dO, options and an optional mask predicate
/// (compiled onto the adapter's blocks).
struct Case {
    label: String,
    dtype: DType,
    shape: AttentionShape,
    options: AttentionOptions,
    mask: Option<Mask>,
}

fn shape(batch: usize, heads: (usize, usize), lens: (usize, usize), dims: (usize, usize)) -> AttentionShape {
    AttentionShape { batch, q_heads: heads.0, kv_heads: heads.1, n_q: lens.0, n_k: lens.1, d_qk: dims.0, d_v: dims.1 }
}

fn options(causal: bool, window: (i32, i32), sinks: u32, softcap: f32) -> AttentionOptions {
    AttentionOptions { causal, window, sinks, softcap, ..Default::default() }
}

fn case(dtype: DType, shape: AttentionShape, options: AttentionOptions, mask: Option<(&str, Mask)>) -> Case {
    let s = &shape;
    let label = format!(
        "{dtype} B{} H{}/{} N{}x{} D{}/{}{}{}",
        s.batch,
        s.q_heads,
        s.kv_heads,
        s.n_q,
        s.n_k,
        s.d_qk,
        s.d_v,
        options.describe(),
        mask.as_ref().map_or(String::new(), |m| format!(" mask {}", m.0))
    );
    Case { label, dtype, shape, options, mask: mask.map(|m| m.1) }
}

/// The grid, in two halves that run as two tests on two devices (most of their time is
/// llvmpipe compiling pipelines, seconds each: see `second_ctx`). Cases share head dims and dtypes where they
/// can: each new variant is a forward and three backward pipelines to compile.
///
/// Lengths and head dims: (1, 239), (239, 1), causal with Nq > Nk, 256, odd and Dv != Dqk.
fn shape_cases() -> Vec<Case> {
    let plain = AttentionOptions::default();
    vec![
        case(DType::F32, shape(1, (1, 1), (1, 239), (32, 32)), plain, None),
        case(DType::F32, shape(2, (2, 2), (239, 1), (64, 64)), options(true, (-1, -1), 0, 0.0), None),
        case(DType::F32, shape(1, (2, 1), (200, 77), (64, 64)), options(true, (-1, -1), 0, 0.0), None),
        case(DType::F32, shape(1, (1, 1), (64, 130), (256, 256)), options(false, (5, 9), 0, 0.0), None),
        case(DType::F32, shape(1, (3, 1), (97, 160), (3, 5)), options(false, (-1, 7), 0, 2.0), None),
    ]
}

/// Options and masks at (113, 203) and square lengths: GQA and MQA, windows, sinks, softcap,
/// an odd head dim, f16, and block masks (documents, random partial blocks with fully masked
/// rows) on head dims split over threads (96 and 128: two threads per row where the workgroup
/// is one subgroup of 8, here the dK/dV pass; a row per thread in the dQ pass, whose workgroup
/// of a 32-row block would be two). f32 and d64 block masks run in the loop-cap test below.
fn option_cases() -> Vec<Case> {
    let mut rng = Rng::new(0xbac4_3a7d);
    let random = Mask::dense(96, 130, &(0..96 * 130).map(|_| rng.below(3) == 0).collect::<Vec<_>>()).unwrap();
    // Rows 40..52 see nothing.
    let random = random & Mask::from_fn(96, 130, |i, _| !(40..52).contains(&i));
    let docs = Mask::document_lengths(&[50, 1, 99, 30]).unwrap() & Mask::causal();
    let plain = AttentionOptions::default();
    vec![
        case(DType::F32, shape(1, (4, 2), (113, 203), (59, 59)), options(false, (20, 0), 3, 0.0), None),
        case(DType::F16, shape(1, (4, 1), (113, 203), (64, 64)), options(true, (-1, -1), 0, 1.5), None),
        case(DType::F16, shape(2, (2, 2), (150, 150), (64, 64)), options(true, (48, -1), 2, 0.0), None),
        case(DType::F16, shape(1, (2, 1), (180, 180), (96, 128)), plain, Some(("documents & causal", docs))),
        case(
            DType::F16,
            shape(2, (2, 1), (96, 130), (96, 128)),
            options(false, (30, -1), 0, 0.0),
            Some(("random", random)),
        ),
    ]
}

/// The GPU's forward and backward on `x` and `d_out`.
fn run(c: &Context, case: &Case, x: &Inputs, d_out: &[f32]) -> wattn::Result<Gradients> {
    let s = &case.shape;
    let (q, k, v) = x.upload(c, s, case.dtype);
    let d_out = Tensor::from_f32(c, &s.out_shape(), d_out, case.dtype)?;
    let mask = match &case.mask {
        Some(m) => Some(BlockMask::new(m, s.n_q, s.n_k, BlockSize::for_adapter(c))?),
        None => None,
    };
    let forward = match &mask {
        Some(m) => wattn::attention_masked(c, &q, &k, &v, m, &case.options)?,
        None => {
            wattn::attention_with(c, &q, &k, &v, &case.options, &FlashConfig::for_adapter(c).fitted(c.limits(), s))?
        }
    };
    wattn::attention_backward(c, &q, &k, &v, &forward.out, &forward.lse, &d_out, &case.options, mask.as_ref())
}

fn read(c: &Context, g: &Gradients) -> [Vec<f32>; 3] {
    [g.dq.to_f32(c).unwrap(), g.dk.to_f32(c).unwrap(), g.dv.to_f32(c).unwrap()]
}

/// Whether query `i` sees key `j` under the case's options: the rule as the option docs
/// state it, written again here.
fn sees(o: &AttentionOptions, s: &AttentionShape, i: usize, j: usize) -> bool {
    let rel = j as i64 - (i as i64 + s.n_k as i64 - s.n_q as i64);
    let (left, right) = o.window;
    let after_ok = !(o.causal && rel > 0) && (right < 0 || rel <= right as i64);
    after_ok && (left < 0 || rel >= -(left as i64) || j < o.sinks as usize)
}

/// The backward as an unfused framework computes it in `dtype`: f32 arithmetic, with every
/// stored intermediate (P, O, dP, dS) and each gradient rounded to f16 when the storage is,
/// as PyTorch's fp16 math path does. Shares no code with `wattn::reference`.
fn plain_backward(case: &Case, x: &Inputs, d_out: &[f32]) -> [Vec<f32>; 3] {
    let (s, o, dt) = (&case.shape, &case.options, case.dtype);
    let scale = o.scale.unwrap_or(1.0 / (s.d_qk as f32).sqrt());
    let r = |v: f32| round_to(v, dt);
    let mut dq = vec![0.0f32; x.q.len()];
    let mut dk = vec![0.0f32; x.k.len()];
    let mut dv = vec![0.0f32; x.v.len()];
    for bh in 0..s.batch * s.q_heads {
        let (b, h) = (bh / s.q_heads, bh % s.q_heads);
        let kv = (b * s.kv_heads + h / (s.q_heads / s.kv_heads)) * s.n_k;
        for i in 0..s.n_q {
            let row = bh * s.n_q + i;
            let qi = &x.q[row * s.d_qk..][..s.d_qk];
            let gi = &d_out[row * s.d_v..][..s.d_v];
            let keys: Vec<usize> = (0..s.n_k)
                .filter(|&j| sees(o, s, i, j) && case.mask.as_ref().is_none_or(|m| m.visible(s.n_q, s.n_k, i, j)))
                .collect();
            if keys.is_empty() {
                continue;
            }
            let raw: Vec<f32> = keys
                .iter()
                .map(|&j| qi.iter().zip(&x.k[(kv + j) * s.d_qk..][..s.d_qk]).map(|(a, b)| a * b).sum::<f32>() * scale)
                .collect();
            let x_scores: Vec<f32> =
                raw.iter().map(|&t| if o.softcap > 0.0 { o.softcap * (t / o.softcap).tanh() } else { t }).collect();
            let max = x_scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = x_scores.iter().map(|t| (t - max).exp()).sum();
            let p: Vec<f32> = x_scores.iter().map(|t| r((t - max).exp() / sum)).collect();
            let mut out = vec![0.0f32; s.d_v];
            for (&j, &pj) in keys.iter().zip(&p) {
                for (oc, vc) in out.iter_mut().zip(&x.v[(kv + j) * s.d_v..][..s.d_v]) {
                    *oc += pj * vc;
                }
            }
            let delta: f32 = gi.iter().zip(&out).map(|(g, oc)| g * r(*oc)).sum();
            for ((&j, &pj), &t) in keys.iter().zip(&p).zip(&raw) {
                let vj = &x.v[(kv + j) * s.d_v..][..s.d_v];
                let dp = r(gi.iter().zip(vj).map(|(g, v)| g * v).sum::<f32>());
                let cap = if o.softcap > 0.0 { 1.0 - (t / o.softcap).tanh().powi(2) } else { 1.0 };
                let ds = r(pj * (dp - delta) * cap);
                for (a, kc) in dq[row * s.d_qk..][..s.d_qk].iter_mut().zip(&x.k[(kv + j) * s.d_qk..][..s.d_qk]) {
                    *a += ds * kc * scale;
                }
                for (a, qc) in dk[(kv + j) * s.d_qk..][..s.d_qk].iter_mut().zip(qi) {
                    *a += ds * qc * scale;
                }
                for (a, g) in dv[(kv + j) * s.d_v..][..s.d_v].iter_mut().zip(gi) {
                    *a += pj * g;
                }
            }
        }
    }
    [quantize(&dq, dt), quantize(&dk, dt), quantize(&dv, dt)]
}

fn reference_of(case: &Case, x: &Inputs, d_out: &[f32]) -> ReferenceGradients {
    let s = case.shape;
    match &case.mask {
        Some(m) => reference::attention_backward_masked(&x.q, &x.k, &x.v, d_out, &s, &case.options, |_, _, i, j| {
            m.visible(s.n_q, s.n_k, i, j)
        }),
        None => reference::attention_backward(&x.q, &x.k, &x.v, d_out, &s, &case.options),
    }
}

fn inputs(case: &Case, seed: u64) -> (Inputs, Vec<f32>) {
    let x = Inputs::random(&case.shape, case.dtype, seed);
    let d_out = quantize(&Rng::new(seed ^ 0xd0).normal_vec(case.shape.out_shape().iter().product()), case.dtype);
    (x, d_out)
}

#[test]
fn gradients_match_reference_over_lengths_and_head_dims() {
    check_gradients(ctx(), &shape_cases(), 7000);
}

#[test]
fn gradients_match_reference_over_options_and_masks() {
    check_gradients(second_ctx(), &option_cases(), 7100);
}

/// Runs every case on `c` (inputs seeded by `seed` + its index) and fails with those whose
/// errors break the rule.
fn check_gradients(c: &Context, cases: &[Case], seed: u64) {
    let mut failures = Vec::new();
    for (n, case) in cases.iter().enumerate() {
        let start = std::time::Instant::now();
        if case.dtype == DType::F16 && !c.capabilities().shader_f16 {
            panic!("{}: the test adapter has no shader-f16", case.label);
        }
        let (x, d_out) = inputs(case, seed + n as u64);
        let got = read(c, &run(c, case, &x, &d_out).unwrap_or_else(|e| panic!("{}: {e}", case.label)));
        let (line, broken) = judge(case, &x, &d_out, &got);
        eprintln!("{line}  {:.1} s", start.elapsed().as_secs_f64());
        failures.extend(broken);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The errors of gradients `got` of `case` on `x` and `d_out` against the f64 reference, by
/// the rule (see the top): a line that reports them, and the gradients that break it.
fn judge(case: &Case, x: &Inputs, d_out: &[f32], got: &[Vec<f32>; 3]) -> (String, Vec<String>) {
    let want = reference_of(case, x, d_out);
    let plain = plain_backward(case, x, d_out);
    let eps = match case.dtype {
        DType::F32 => f32::EPSILON as f64,
        DType::F16 => half::f16::EPSILON.to_f64(),
    };
    let s = &case.shape;
    let lse = match &case.mask {
        Some(m) => {
            reference::attention_masked(&x.q, &x.k, &x.v, s, &case.options, |_, _, i, j| m.visible(s.n_q, s.n_k, i, j))
        }
        None => reference::attention(&x.q, &x.k, &x.v, s, &case.options),
    }
    .lse;
    let largest_lse = lse.iter().filter(|x| x.is_finite()).fold(0.0f64, |m, x| m.max(x.abs()));
    let mut line = format!("{:<64}", case.label);
    let mut failures = Vec::new();
    for (name, got, plain, want) in [
        ("dQ", &got[0], &plain[0], &want.dq),
        ("dK", &got[1], &plain[1], &want.dk),
        ("dV", &got[2], &plain[2], &want.dv),
    ] {
        let largest = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
        let (err, plain_err) = (max_abs_err(got, want), max_abs_err(plain, want));
        let recomputed = 2.0 * f32::EPSILON as f64 * (1.0 + largest_lse);
        let bound = 2.0 * plain_err + (0.5 * eps + recomputed) * largest;
        line += &format!("  {name} {err:.2e} (plain {plain_err:.2e}, bound {bound:.2e})");
        if err > bound {
            failures.push(format!("{}: {name} error {err:.3e} above {bound:.3e}", case.label));
        }
    }
    (line, failures)
}

/// A varlen batch: the forward and the backward of `seqlens` packed, with `options` and, for
/// `pattern`, a block mask per sequence (`pattern(s, i, j)`: query i of sequence s sees key
/// j, on the longest sequence's lengths, each sequence reading its corner). Every sequence's
/// gradients are judged against the reference on that sequence alone; rows of sequences
/// without keys or queries must be zeros. The gradients start as NaN, so a row left
/// unwritten, or written to another sequence's place, shows.
#[allow(clippy::too_many_arguments)]
fn check_varlen(
    c: &Context,
    what: &str,
    seqlens: &SeqLens,
    heads: (usize, usize),
    dims: (usize, usize),
    dtype: DType,
    options: &AttentionOptions,
    pattern: Option<fn(usize, usize, usize) -> bool>,
    seed: u64,
) -> Vec<String> {
    let p = packed_shape(seqlens, heads, dims);
    let x = Inputs::random(&p, dtype, seed);
    let d_out = quantize(&Rng::new(seed ^ 0xd0).normal_vec(p.out_shape().iter().product()), dtype);
    let (q, k, v) = x.upload(c, &p, dtype);
    let nan = |dims: &[usize]| Tensor::from_f32(c, dims, &vec![f32::NAN; dims.iter().product()], dtype).unwrap();
    let (out, lse, dq, dk, dv) = (
        nan(&p.out_shape()),
        Tensor::zeros(c, &p.lse_shape(), DType::F32).unwrap(),
        nan(&p.q_shape()),
        nan(k.shape()),
        nan(v.shape()),
    );
    let d_out_t = Tensor::from_f32(c, &p.out_shape(), &d_out, dtype).unwrap();
    let config = FlashConfig::for_adapter(c).fitted(c.limits(), &p);
    let (max_q, max_k) = (seqlens.max_q(), seqlens.max_k());
    let mask = pattern.map(|sees| {
        let masks: Vec<Mask> =
            (0..seqlens.len()).map(|s| Mask::from_fn(max_q, max_k, move |i, j| sees(s, i, j))).collect();
        BlockMask::build(&masks, seqlens.len(), 1, max_q, max_k, config.block_size()).unwrap().upload(c).unwrap()
    });
    let forward = AttentionBuffers { q: q.view(), k: k.view(), v: v.view(), out: out.view(), lse: lse.view() };
    let bufs = GradientBuffers { forward, d_out: d_out_t.view(), dq: dq.view(), dk: dk.view(), dv: dv.view() };
    let mut encoder = c.device().create_command_encoder(&Default::default());
    varlen::encode(c, &mut encoder, &forward, seqlens, mask.as_ref(), options, &config).unwrap();
    backward::encode_varlen(c, &mut encoder, &bufs, seqlens, mask.as_ref(), options).unwrap();
    c.queue().submit([encoder.finish()]);
    let got = read(c, &Gradients { dq, dk, dv });

    let mut failures = Vec::new();
    for s in 0..seqlens.len() {
        let (shape, inputs) = sequence(&x, &p, seqlens, s);
        let (queries, keys) = (seqlens.queries(s), seqlens.keys(s));
        let rows = [
            rows_of(&got[0], p.q_heads, p.n_q, &queries, p.d_qk),
            rows_of(&got[1], p.kv_heads, p.n_k, &keys, p.d_qk),
            rows_of(&got[2], p.kv_heads, p.n_k, &keys, p.d_v),
        ];
        let label = format!("{what} sequence {s} ({} x {})", shape.n_q, shape.n_k);
        if shape.n_q == 0 || shape.n_k == 0 {
            if !rows.iter().flatten().all(|&x| x == 0.0) {
                failures.push(format!("{label}: gradients of a sequence without queries or keys are not zeros"));
            }
            continue;
        }
        let case = Case {
            label,
            dtype,
            shape,
            options: *options,
            mask: pattern.map(|sees| Mask::from_fn(shape.n_q, shape.n_k, move |i, j| sees(s, i, j))),
        };
        let d_out = rows_of(&d_out, p.q_heads, p.n_q, &queries, p.d_v);
        let (line, broken) = judge(&case, &inputs, &d_out, &rows);
        if s < 6 {
            eprintln!("{line}");
        }
        failures.extend(broken);
    }
    failures
}

/// Every sequence of a packed batch alone, on head dims split over threads (96 and 128: two
/// threads per row in both passes on a device whose subgroups are 8), f16, GQA: causal, and a
/// window with sinks and softcap.
#[test]
fn varlen_gradients_match_each_sequence_alone() {
    let (lq, lk) = varlen_lengths(3, 21);
    let seqlens = SeqLens::new(&lq, &lk).unwrap();
    let causal = AttentionOptions { causal: true, ..Default::default() };
    let window = AttentionOptions { window: (20, -1), sinks: 2, softcap: 1.5, ..Default::default() };
    let mut failures = Vec::new();
    for (n, (name, options)) in [("causal", causal), ("window + sinks + softcap", window)].iter().enumerate() {
        let what = format!("f16 H4/2 D96/128 {name}");
        let seed = 60 + n as u64;
        failures.extend(check_varlen(
            second_ctx(),
            &what,
            &seqlens,
            (4, 2),
            (96, 128),
            DType::F16,
            options,
            None,
            seed,
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Under a loop cap each sequence's passes walk its own keys and pairs, and a grid capped at 6
/// workgroups per dimension wraps the tables into z; with a block mask per sequence and
/// without; and without subgroups, where head dims above 64 run a row per thread.
#[test]
fn varlen_gradients_under_a_loop_cap_with_masks_and_without_subgroups() {
    let limits = wgpu::Limits { max_compute_workgroups_per_dimension: 6, ..ctx().limits().clone() };
    let (device, queue) = own_device(ctx().device().features(), limits);
    let capped = Context::from_wgpu(device, queue).with_loop_iteration_limit(3000);
    let seqlens = SeqLens::new(&[40, 3, 90, 0, 17, 60], &[200, 0, 150, 20, 17, 60]).unwrap();
    let options = AttentionOptions { causal: true, window: (120, -1), sinks: 4, ..Default::default() };
    let pattern: fn(usize, usize, usize) -> bool =
        |s, i, j| (i / 7 + j / 5 + s).is_multiple_of(3) || (i as i64 - j as i64).abs() < 4 + s as i64;
    let mut failures = Vec::new();
    for (what, mask) in [("capped", None), ("capped, block mask", Some(pattern))] {
        failures.extend(check_varlen(&capped, what, &seqlens, (2, 1), (32, 32), DType::F32, &options, mask, 64));
    }
    let features = ctx().device().features() - wgpu::Features::SUBGROUP;
    let (device, queue) = own_device(features, ctx().limits().clone());
    let plain = Context::from_wgpu(device, queue);
    let what = "no subgroups, D80/72";
    failures.extend(check_varlen(&plain, what, &seqlens, (4, 2), (80, 72), DType::F32, &options, None, 65));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The same inputs give the same bits: every sum runs in a fixed order.
#[test]
fn reruns_are_bit_identical() {
    let c = ctx();
    let case = case(DType::F32, shape(2, (4, 1), (150, 97), (64, 64)), options(true, (40, -1), 2, 0.0), None);
    let (x, d_out) = inputs(&case, 11);
    let bits = |g: [Vec<f32>; 3]| g.map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>());
    let first = bits(read(c, &run(c, &case, &x, &d_out).unwrap()));
    for _ in 0..2 {
        assert!(bits(read(c, &run(c, &case, &x, &d_out).unwrap())) == first, "a rerun gave different bits");
    }
}

/// On an adapter that caps loop iterations both main passes split into several
/// dispatches, carrying their accumulators: the gradients are those of one pass.
#[test]
fn passes_under_a_loop_cap_match_one_pass() {
    let (device, queue) = own_device(ctx().device().features(), ctx().limits().clone());
    let capped = Context::from_wgpu(device, queue).with_loop_iteration_limit(3000);
    let docs = Mask::document_lengths(&[70, 200]).unwrap();
    for mask in [None, Some(("documents", docs))] {
        let case = case(DType::F32, shape(1, (4, 2), (150, 270), (32, 32)), options(true, (-1, -1), 0, 0.0), mask);
        let (x, d_out) = inputs(&case, 12);
        let whole = read(ctx(), &run(ctx(), &case, &x, &d_out).unwrap());
        let split = read(&capped, &run(&capped, &case, &x, &d_out).unwrap());
        let want = reference_of(&case, &x, &d_out);
        for (name, (a, b), want) in [
            ("dQ", (&whole[0], &split[0]), &want.dq),
            ("dK", (&whole[1], &split[1]), &want.dk),
            ("dV", (&whole[2], &split[2]), &want.dv),
        ] {
            let (e1, e2) = (max_abs_err(a, want), max_abs_err(b, want));
            assert!(e2 <= 2.0 * e1 + 1e-5, "{}: {name} error {e2:.3e} in passes, {e1:.3e} in one", case.label);
        }
    }
}

/// Without subgroups the register-tiled passes read the other side's rows straight from
/// memory (the path of devices whose workgroups are not one subgroup), and head dims above 64
/// run a row per thread: gradients within the rule, with a block mask and without.
#[test]
fn passes_without_subgroups_match_the_reference() {
    let features = ctx().device().features() - wgpu::Features::SUBGROUP;
    let (device, queue) = own_device(features, ctx().limits().clone());
    let plain = Context::from_wgpu(device, queue);
    assert!(!plain.capabilities().subgroups);
    let docs = Mask::document_lengths(&[70, 60]).unwrap() & Mask::causal();
    let (tiled, wide) = ((32, 32), (80, 72));
    let cases = [(tiled, None), (tiled, Some(("documents & causal", docs))), (wide, None)].map(|(dims, mask)| {
        case(DType::F32, shape(1, (4, 2), (130, 130), dims), options(false, (40, -1), 2, 0.0), mask)
    });
    check_gradients(&plain, &cases, 15);
}

/// A NaN in one key reaches the gradients of the rows that see it and of every key those
/// rows see; the rest get the bits of a clean run. A row that sees nothing gets dQ = 0.
/// At head dim 256 (four threads per row, the NaN in the second one's columns) as at 32.
#[test]
fn nan_reaches_only_what_depends_on_it() {
    let c = ctx();
    for d in [32, 256] {
        // Query i sees keys i + 15 ..= i + 20, so key 45 is seen by queries 25..=30, which see keys 40..=50.
        let window = case(DType::F32, shape(1, (1, 1), (40, 60), (d, d)), options(true, (5, -1), 0, 0.0), None);
        let (mut x, d_out) = inputs(&window, 13);
        let clean = read(c, &run(c, &window, &x, &d_out).unwrap());
        x.k[45 * d + 5] = f32::NAN;
        let got = read(c, &run(c, &window, &x, &d_out).unwrap());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (name, rows, poisoned) in [("dQ", 40, 25..=30), ("dK", 60, 40..=50), ("dV", 60, 40..=50)] {
            let which = ["dQ", "dK", "dV"].iter().position(|n| *n == name).unwrap();
            for r in 0..rows {
                let (row, clean_row) = (&got[which][r * d..(r + 1) * d], &clean[which][r * d..(r + 1) * d]);
                if poisoned.contains(&r) {
                    assert!(row.iter().all(|x| x.is_nan()), "d{d}: {name} row {r} depends on the NaN: {row:?}");
                } else {
                    assert_eq!(bits(row), bits(clean_row), "d{d}: {name} row {r} does not depend on the NaN");
                }
            }
        }
    }

    // Causal with Nq > Nk: the first rows see nothing; their dQ is 0 and nothing is NaN.
    let empty = case(DType::F32, shape(1, (2, 1), (50, 10), (32, 32)), options(true, (-1, -1), 0, 0.0), None);
    let (x, d_out) = inputs(&empty, 14);
    let got = read(c, &run(c, &empty, &x, &d_out).unwrap());
    assert!(got.iter().flatten().all(|x| x.is_finite()));
    for h in 0..2 {
        assert!(got[0][h * 50 * 32..(h * 50 + 40) * 32].iter().all(|&x| x == 0.0), "head {h}: rows that see nothing");
    }
}

#[test]
fn bad_input_is_an_error() {
    let c = ctx();
    let t = |dims: &[usize]| Tensor::zeros(c, dims, DType::F32).unwrap();
    let (q, k, v) = (t(&[1, 2, 8, 16]), t(&[1, 1, 12, 16]), t(&[1, 1, 12, 8]));
    let (out, lse) = (t(&[1, 2, 8, 8]), t(&[1, 2, 8]));
    let backward =
        |out: &Tensor, lse: &Tensor, d_out: &Tensor, options: &AttentionOptions, mask: Option<&BlockMask>| {
            wattn::attention_backward(c, &q, &k, &v, out, lse, d_out, options, mask).err().map(|e| e.to_string())
        };
    let plain = AttentionOptions::default();
    assert_eq!(backward(&out, &lse, &t(&[1, 2, 8, 8]), &plain, None), None);
    let wrong_d_out = backward(&out, &lse, &t(&[1, 2, 8, 16]), &plain, None).unwrap();
    assert!(wrong_d_out.contains("dO has shape [1, 2, 8, 16], expected [1, 2, 8, 8]"), "{wrong_d_out}");
    let wrong_lse = backward(&out, &t(&[1, 2, 7]), &t(&[1, 2, 8, 8]), &plain, None).unwrap();
    assert!(wrong_lse.contains("LSE has shape"), "{wrong_lse}");
    let bad_window = backward(&out, &lse, &t(&[1, 2, 8, 8]), &AttentionOptions { window: (-2, 0), ..plain }, None);
    assert!(bad_window.unwrap().contains("window (-2, 0)"));
    let mask = BlockMask::new(&Mask::causal(), 8, 13, BlockSize::for_adapter(c)).unwrap();
    let wrong_mask = backward(&out, &lse, &t(&[1, 2, 8, 8]), &plain, Some(&mask)).unwrap();
    assert!(wrong_mask.contains("block mask is for 8 queries x 13 keys"), "{wrong_mask}");
    if c.capabilities().shader_f16 {
        let half = Tensor::zeros(c, &[1, 2, 8, 8], DType::F16).unwrap();
        let e = wattn::attention_backward(c, &q, &k, &v, &out, &lse, &half, &plain, None).err().unwrap();
        assert!(matches!(e, Error::DType(_)) && e.to_string().contains("dO is f16 but Q is f32"), "{e}");
    }
}
