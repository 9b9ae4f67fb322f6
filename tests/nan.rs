//! IEEE semantics in every kernel: a NaN in Q, K or V reaches exactly the outputs that depend
//! on it (the f64 reference says which), and every other output is bit-identical to a run on
//! clean inputs. Kernels: flash (dense options, block mask, key passes), naive, split-KV
//! decode with and without the combine, and the combine on its own.

mod common;

use common::{Inputs, Rng, ctx, own_device};
use wattn::kv::{DecodeOptions, EvictionPolicy, KvCache, KvCacheConfig, PositionMode, combine};
use wattn::{AttentionOptions, AttentionShape, BlockMask, BlockSize, Context, DType, Mask, Tensor, reference};

/// O and LSE as f32.
type Outputs = (Vec<f32>, Vec<f32>);

/// Decode reads Q's head dim for V too, so Dv = Dqk here; other tests cover Dv != Dqk.
const SHAPE: AttentionShape =
    AttentionShape { batch: 1, q_heads: 2, kv_heads: 1, n_q: 40, n_k: 200, d_qk: 32, d_v: 32 };
/// The poisoned query row (of head 0), key and columns. Causal (bottom-right), query i sees
/// keys up to i + 160: rows 0..20 cannot see KEY.
const QUERY: usize = 7;
const KEY: usize = 180;
const Q_COLUMN: usize = 3;
const K_COLUMN: usize = 5;
const V_COLUMN: usize = 2;

/// Inputs with one NaN: in Q (row QUERY), K or V (row KEY).
fn poisoned(clean: &Inputs, tensor: &str) -> Inputs {
    let s = SHAPE;
    let mut x = Inputs { q: clean.q.clone(), k: clean.k.clone(), v: clean.v.clone() };
    match tensor {
        "Q" => x.q[QUERY * s.d_qk + Q_COLUMN] = f32::NAN,
        "K" => x.k[KEY * s.d_qk + K_COLUMN] = f32::NAN,
        _ => x.v[KEY * s.d_v + V_COLUMN] = f32::NAN,
    }
    x
}

/// Every element: NaN exactly where the f64 reference has NaN, and elsewhere the bits of the
/// clean run. Also checks that the case poisons some outputs and leaves others alone, and
/// that the clean run is close to the reference, so that the comparison means something.
fn assert_nan_reaches_exactly(what: &str, got: &Outputs, clean: &Outputs, want: &reference::ReferenceOutput) {
    let mut poisoned = 0;
    for (name, got, clean, want) in [("O", &got.0, &clean.0, &want.out), ("LSE", &got.1, &clean.1, &want.lse)] {
        assert_eq!(got.len(), want.len(), "{what}: {name} length");
        for (i, ((&g, &c), &w)) in got.iter().zip(clean.iter()).zip(want.iter()).enumerate() {
            if w.is_nan() {
                assert!(g.is_nan(), "{what}: {name}[{i}] depends on the NaN but is {g}");
                poisoned += 1;
            } else {
                assert!(
                    g.to_bits() == c.to_bits(),
                    "{what}: {name}[{i}] cannot see the NaN but is {g}, not {c} as on clean inputs"
                );
            }
        }
    }
    assert!(poisoned > 0, "{what}: the case poisons nothing");
    assert!(poisoned < got.0.len() + got.1.len(), "{what}: the case poisons everything");
}

fn assert_close(what: &str, got: &Outputs, want: &reference::ReferenceOutput, tol: f64) {
    let err = common::max_abs_err(&got.0, &want.out).max(common::max_abs_err(&got.1, &want.lse));
    assert!(err <= tol, "{what}: clean run off the reference by {err:.2e}");
}

/// Runs `kernel` on clean and on each poisoned input and checks them against the reference
/// under `visible` (the options' mask and, for block masks, the mask's own).
fn check_kernel(
    what: &str,
    dtype: DType,
    options: &AttentionOptions,
    visible: impl Fn(usize, usize) -> bool,
    kernel: impl Fn(&Inputs) -> Outputs,
) {
    let s = SHAPE;
    let clean = Inputs::random(&s, dtype, 41);
    let clean_out = kernel(&clean);
    let tol = if dtype == DType::F16 { 5e-3 } else { 1e-5 };
    let want_clean = reference::attention_masked(&clean.q, &clean.k, &clean.v, &s, options, |_, _, i, j| visible(i, j));
    assert_close(what, &clean_out, &want_clean, tol);
    for tensor in ["Q", "K", "V"] {
        let x = poisoned(&clean, tensor);
        let want = reference::attention_masked(&x.q, &x.k, &x.v, &s, options, |_, _, i, j| visible(i, j));
        let label = format!("{what}, {dtype}, NaN in {tensor}");
        eprintln!("{label}");
        assert_nan_reaches_exactly(&label, &kernel(&x), &clean_out, &want);
    }
}

fn download(c: &Context, out: &wattn::AttentionOutput) -> Outputs {
    (out.out.to_f32(c).unwrap(), out.lse.to_f32(c).unwrap())
}

fn flash(c: &Context, x: &Inputs, options: &AttentionOptions, dtype: DType) -> Outputs {
    let (q, k, v) = x.upload(c, &SHAPE, dtype);
    download(c, &wattn::attention(c, &q, &k, &v, options).unwrap())
}

fn causal(i: usize, j: usize) -> bool {
    j <= i + SHAPE.n_k - SHAPE.n_q
}

#[test]
fn flash_dense() {
    for dtype in [DType::F32, DType::F16] {
        if dtype == DType::F16 && !ctx().capabilities().shader_f16 {
            continue;
        }
        let options = AttentionOptions::causal();
        check_kernel("flash causal", dtype, &options, causal, |x| flash(ctx(), x, &options, dtype));
    }
    // A window and sinks: only rows 18..27 see the key.
    let options = AttentionOptions { window: (6, 2), sinks: 2, ..Default::default() };
    check_kernel("flash window", DType::F32, &options, |_, _| true, |x| flash(ctx(), x, &options, DType::F32));
}

#[test]
fn flash_key_passes() {
    let (device, queue) = own_device(ctx().device().features(), ctx().limits().clone());
    // A cap this low walks the keys in several dispatches carrying (m, l, o).
    let capped = Context::from_wgpu(device, queue).with_loop_iteration_limit(600);
    let config = wattn::FlashConfig::for_adapter(&capped);
    let per_pass = config.keys_per_pass(&SHAPE, capped.loop_iteration_limit()).unwrap() as usize;
    assert!(SHAPE.n_k.div_ceil(per_pass) >= 2, "the cap should force passes, got {per_pass} keys per pass");
    let options = AttentionOptions::causal();
    check_kernel("flash key passes", DType::F32, &options, causal, |x| flash(&capped, x, &options, DType::F32));
}

#[test]
fn flash_block_mask() {
    // Causal with every third diagonal removed: partial blocks everywhere, each row blind to
    // some keys of every block it visits.
    let sees = |i: usize, j: usize| causal(i, j) && !(i + j).is_multiple_of(3);
    let mask = Mask::from_fn(SHAPE.n_q, SHAPE.n_k, sees);
    let mask = BlockMask::new(&mask, SHAPE.n_q, SHAPE.n_k, BlockSize::for_adapter(ctx())).unwrap();
    let options = AttentionOptions::default();
    check_kernel("flash block mask", DType::F32, &options, sees, |x| {
        let (q, k, v) = x.upload(ctx(), &SHAPE, DType::F32);
        download(ctx(), &wattn::attention_masked(ctx(), &q, &k, &v, &mask, &options).unwrap())
    });
}

#[test]
fn naive() {
    let options = AttentionOptions::causal();
    check_kernel("naive causal", DType::F32, &options, causal, |x| {
        let (q, k, v) = x.upload(ctx(), &SHAPE, DType::F32);
        download(ctx(), &wattn::naive::attention(ctx(), &q, &k, &v, &options).unwrap())
    });
}

/// Decode of the 40 queries as a chunk against a cache holding the 200 keys (the queries are
/// the last 40 tokens): causal by stream position, the reference's bottom-right causal mask.
fn decode(x: &Inputs, dtype: DType, splits: u32) -> Outputs {
    let c = ctx();
    let s = SHAPE;
    let config = KvCacheConfig {
        layers: 1,
        batch: s.batch,
        kv_heads: s.kv_heads,
        head_dim: s.d_qk,
        dtype,
        policy: EvictionPolicy::None { capacity: s.n_k },
        positions: PositionMode::Absolute,
    };
    let mut cache = KvCache::new(c, config).unwrap();
    let kv_shape = [s.batch, s.kv_heads, s.n_k, s.d_qk];
    let k = Tensor::from_f32(c, &kv_shape, &x.k, dtype).unwrap();
    let v = Tensor::from_f32(c, &kv_shape, &x.v, dtype).unwrap();
    let mut encoder = c.device().create_command_encoder(&Default::default());
    cache.append(c, &mut encoder, 0, &k.view(), &v.view()).unwrap();
    c.queue().submit([encoder.finish()]);
    let q = Tensor::from_f32(c, &[s.batch, s.q_heads, s.n_q, s.d_qk], &x.q, dtype).unwrap();
    let options = DecodeOptions { splits: Some(splits), ..Default::default() };
    assert_eq!(cache.plan(c, 0, s.q_heads, s.n_q, &options).unwrap().splits, splits);
    download(c, &cache.decode(c, 0, &q, &options).unwrap())
}

#[test]
fn decode_and_combine() {
    let options = AttentionOptions::causal();
    for dtype in [DType::F32, DType::F16] {
        if dtype == DType::F16 && !ctx().capabilities().shader_f16 {
            continue;
        }
        // One split writes its partial straight out; three go through the combine.
        for splits in [1, 3] {
            check_kernel(&format!("decode, {splits} splits"), dtype, &options, causal, |x| decode(x, dtype, splits));
        }
    }
}

/// The combine alone: a partial with a NaN LSE (a split that saw a NaN score) poisons its row;
/// a NaN in one column of a partial output poisons that column; other rows are exact.
#[test]
fn combine_of_nan_partials() {
    let c = ctx();
    let (splits, rows, dim) = (3, 4, 8);
    let mut rng = Rng::new(3);
    let mut outs = rng.normal_vec(splits * rows * dim);
    let mut lses = rng.normal_vec(splits * rows);
    let run = |outs: &[f32], lses: &[f32]| {
        let partial_out = Tensor::from_f32(c, &[splits, rows, dim], outs, DType::F32).unwrap();
        let partial_lse = Tensor::from_f32(c, &[splits, rows], lses, DType::F32).unwrap();
        let out = Tensor::zeros(c, &[rows, dim], DType::F32).unwrap();
        let lse = Tensor::zeros(c, &[rows], DType::F32).unwrap();
        let mut encoder = c.device().create_command_encoder(&Default::default());
        combine::encode(c, &mut encoder, &partial_out.view(), &partial_lse.view(), &out.view(), &lse.view()).unwrap();
        c.submit_and_wait(encoder).unwrap();
        (out.to_f32(c).unwrap(), lse.to_f32(c).unwrap())
    };
    let clean = run(&outs, &lses);
    // Row 1: split 2's LSE is NaN. Row 2: split 0's output column 5 is NaN.
    lses[2 * rows + 1] = f32::NAN;
    outs[2 * dim + 5] = f32::NAN;
    let got = run(&outs, &lses);
    let mut want = reference::ReferenceOutput { out: Vec::new(), lse: Vec::new() };
    for r in 0..rows {
        let (o, l) = reference::merge_partials(&common::row_partials(&outs, &lses, splits, rows, dim, r));
        want.out.extend(o);
        want.lse.push(l);
    }
    assert!(want.lse[1].is_nan() && want.out[2 * dim + 5].is_nan() && !want.lse[2].is_nan());
    assert_nan_reaches_exactly("combine", &got, &clean, &want);
}
