//! Bad input is a typed [`wattn::Error`] whose message carries the offending numbers,
//! never a panic and never a wrong answer.

mod common;

use common::{ctx, ctx_adapter, own_device};
use wattn::attention::flash::{self, FlashConfig, KvReads};
use wattn::{AttentionBuffers, AttentionOptions, Context, DType, Error, Tensor, TensorView};

fn zeros(c: &Context, shape: &[usize], dtype: DType) -> Tensor {
    Tensor::zeros(c, shape, dtype).unwrap()
}

/// Flash attention on zero tensors of the given shapes and dtype.
fn attend(
    q: &[usize],
    k: &[usize],
    v: &[usize],
    dtype: DType,
    o: &AttentionOptions,
) -> wattn::Result<wattn::AttentionOutput> {
    let c = ctx();
    wattn::attention(c, &zeros(c, q, dtype), &zeros(c, k, dtype), &zeros(c, v, dtype), o)
}

/// The error of `result`, which must be one: `what` names the bad input.
fn refused<T>(result: wattn::Result<T>, what: &str) -> Error {
    match result {
        Ok(_) => panic!("{what} was accepted"),
        Err(e) => e,
    }
}

fn attend_shapes(q: &[usize], k: &[usize], v: &[usize]) -> Error {
    refused(attend(q, k, v, DType::F32, &AttentionOptions::default()), &format!("Q {q:?}, K {k:?}, V {v:?}"))
}

fn attend_options(o: AttentionOptions) -> Error {
    let s = [1, 1, 4, 16];
    refused(attend(&s, &s, &s, DType::F32, &o), &format!("{o:?}"))
}

/// Asserts the message of `e` mentions every one of `numbers`.
fn assert_mentions(e: &Error, numbers: &[&str]) {
    let msg = e.to_string();
    for n in numbers {
        assert!(msg.contains(n), "the message '{msg}' should mention {n}");
    }
}

#[test]
fn tensors_must_have_rank_four() {
    let good = [1, 2, 8, 16];
    for (what, q, k, v) in [
        ("Q", &[2, 8, 16][..], &good[..], &good[..]),
        ("K", &good, &[1, 2, 8, 16, 1], &good),
        ("V", &good, &good, &[16]),
    ] {
        let e = attend_shapes(q, k, v);
        let got = if what == "Q" {
            q
        } else if what == "K" {
            k
        } else {
            v
        };
        assert!(matches!(&e, Error::Rank { what: w, got: g, .. } if *w == what && g.as_slice() == got), "{e:?}");
        assert_mentions(&e, &[what, &format!("{got:?}")]);
    }
}

#[test]
fn empty_dimensions_are_refused() {
    let e = attend_shapes(&[1, 2, 0, 16], &[1, 2, 8, 16], &[1, 2, 8, 16]);
    assert!(matches!(&e, Error::Empty { what: "Q", .. }), "{e:?}");
    assert_mentions(&e, &["[1, 2, 0, 16]"]);
    let e = attend_shapes(&[1, 2, 8, 16], &[1, 2, 8, 16], &[1, 2, 8, 0]);
    assert!(matches!(&e, Error::Empty { what: "V", .. }), "{e:?}");
}

#[test]
fn inconsistent_shapes_are_refused() {
    let e = attend_shapes(&[2, 2, 8, 16], &[3, 2, 8, 16], &[2, 2, 8, 16]);
    assert!(matches!(e, Error::Shape(_)), "batch mismatch: {e:?}");
    assert_mentions(&e, &["2", "3"]);

    let e = attend_shapes(&[1, 4, 8, 16], &[1, 2, 9, 16], &[1, 2, 7, 16]);
    assert!(matches!(e, Error::Shape(_)), "V length differs from K's: {e:?}");
    assert_mentions(&e, &["[1, 2, 7, 16]", "[1, 2, 9, 16]"]);

    let e = attend_shapes(&[1, 4, 8, 16], &[1, 2, 9, 16], &[1, 1, 9, 16]);
    assert!(matches!(e, Error::Shape(_)), "V heads differ from K's: {e:?}");

    let e = attend_shapes(&[1, 4, 8, 64], &[1, 2, 9, 48], &[1, 2, 9, 64]);
    assert!(matches!(e, Error::Shape(_)), "Q/K head dims differ: {e:?}");
    assert_mentions(&e, &["64", "48"]);
}

#[test]
fn query_heads_must_be_a_multiple_of_kv_heads() {
    let e = attend_shapes(&[1, 8, 4, 16], &[1, 3, 4, 16], &[1, 3, 4, 16]);
    assert!(matches!(e, Error::Heads { got: 3, q_heads: 8, .. }), "{e:?}");
    assert_mentions(&e, &["3", "8"]);
}

#[test]
fn head_dims_above_256_are_refused() {
    let e = attend_shapes(&[1, 1, 4, 257], &[1, 1, 4, 257], &[1, 1, 4, 16]);
    assert!(matches!(e, Error::HeadDim { got: 257, max: 256, .. }), "{e:?}");
    assert_mentions(&e, &["257", "256"]);
    let e = attend_shapes(&[1, 1, 4, 16], &[1, 1, 4, 16], &[1, 1, 4, 300]);
    assert!(matches!(e, Error::HeadDim { what: "V", got: 300, .. }), "{e:?}");
}

#[test]
fn dtypes_must_agree() {
    let c = ctx();
    let s = [1, 1, 4, 16];
    let (q, k) = (zeros(c, &s, DType::F32), zeros(c, &s, DType::F16));
    let e = refused(wattn::attention(c, &q, &k, &q, &AttentionOptions::default()), "f32 Q with f16 K");
    assert!(matches!(e, Error::DType(_)), "{e:?}");
    assert_mentions(&e, &["K", "f16", "f32"]);
}

/// Runs [`flash::encode`] with O and LSE described by the given shapes and dtypes.
fn encode_with_outputs(out_shape: &[usize], lse_shape: &[usize], lse_dtype: DType) -> Error {
    let c = ctx();
    let s = [1, 2, 4, 16];
    let q = zeros(c, &s, DType::F32);
    let out = zeros(c, out_shape, DType::F32);
    let lse = zeros(c, lse_shape, lse_dtype);
    let bufs = AttentionBuffers { q: q.view(), k: q.view(), v: q.view(), out: out.view(), lse: lse.view() };
    let mut encoder = c.device().create_command_encoder(&Default::default());
    let result = flash::encode(c, &mut encoder, &bufs, None, &AttentionOptions::default(), &FlashConfig::PORTABLE);
    refused(result, &format!("O {out_shape:?}, LSE {lse_shape:?} {lse_dtype}"))
}

#[test]
fn outputs_must_have_the_right_shape_and_dtype() {
    let e = encode_with_outputs(&[1, 2, 4, 16], &[1, 2, 4], DType::F16);
    assert!(matches!(e, Error::DType(_)), "f16 LSE: {e:?}");
    assert_mentions(&e, &["LSE", "f16"]);

    let e = encode_with_outputs(&[1, 2, 5, 16], &[1, 2, 4], DType::F32);
    assert!(matches!(e, Error::Shape(_)), "wrong O shape: {e:?}");
    assert_mentions(&e, &["[1, 2, 5, 16]", "[1, 2, 4, 16]"]);

    let e = encode_with_outputs(&[1, 2, 4, 16], &[1, 2, 4, 1], DType::F32);
    assert!(matches!(e, Error::Shape(_)), "wrong LSE shape: {e:?}");
}

#[test]
fn bad_options_are_refused() {
    for (o, numbers) in [
        (AttentionOptions { window: (-2, 0), ..Default::default() }, &["-2"][..]),
        (AttentionOptions { window: (3, -7), ..Default::default() }, &["-7"]),
        (AttentionOptions { softcap: -1.0, ..Default::default() }, &["-1"]),
        (AttentionOptions { softcap: f32::NAN, ..Default::default() }, &["NaN"]),
        (AttentionOptions { scale: Some(f32::NAN), ..Default::default() }, &["NaN"]),
        (AttentionOptions { scale: Some(f32::INFINITY), ..Default::default() }, &["inf"]),
    ] {
        let e = attend_options(o);
        assert!(matches!(e, Error::Option(_)), "{o:?}: {e:?}");
        assert_mentions(&e, numbers);
    }
}

#[test]
fn tensor_constructors_check_sizes() {
    let c = ctx();
    let e = refused(Tensor::from_f32(c, &[2, 3], &[0.0; 5], DType::F32), "5 values for 6 elements");
    assert!(matches!(e, Error::Shape(_)), "{e:?}");
    assert_mentions(&e, &["5", "6", "[2, 3]"]);

    let buffer = c.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 40,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let e = refused(TensorView::new(&buffer, &[3, 4], DType::F32), "a 40-byte buffer for 48 bytes");
    assert!(matches!(e, Error::Shape(_)), "{e:?}");
    assert_mentions(&e, &["40", "48"]);

    // Sizes whose byte count does not fit in memory are refused, not overflowed.
    let huge = [usize::MAX / 2, 3];
    let e = refused(TensorView::new(&buffer, &huge, DType::F32), "a shape past usize");
    assert!(matches!(e, Error::Shape(_)), "{e:?}");
    assert_mentions(&e, &[&format!("{huge:?}")]);
    let e = refused(Tensor::zeros(c, &huge, DType::F16), "zeros past usize");
    assert!(matches!(e, Error::Shape(_)), "{e:?}");
    let e = refused(Tensor::from_f32(c, &huge, &[0.0; 4], DType::F32), "data for a shape past usize");
    assert!(matches!(e, Error::Shape(_)), "{e:?}");
}

#[test]
fn tiles_too_big_for_workgroup_memory_name_the_limit() {
    let s = [1, 1, 64, 256];
    let config =
        FlashConfig { block_q: 64, block_k: 64, rows_per_thread: 4, threads_per_row: 4, kv_reads: KvReads::Workgroup };
    let c = ctx();
    let t = zeros(c, &s, DType::F32);
    let e = refused(wattn::attention_with(c, &t, &t, &t, &AttentionOptions::default(), &config), "huge tiles");
    let allowed = c.limits().max_compute_workgroup_storage_size as u64;
    assert!(
        matches!(e, Error::Limit { limit: "max_compute_workgroup_storage_size", needed, allowed: a, .. } if needed > a && a == allowed),
        "{e:?}"
    );
    assert_mentions(&e, &["max_compute_workgroup_storage_size", &allowed.to_string()]);

    // Subgroup K/V reads need a tile of keys for every group of threads sharing rows, and a
    // workgroup that is one subgroup: 16 threads are more than any adapter's subgroups of 8
    // or fewer, and fewer than those of 32 or more.
    let short = FlashConfig { block_k: 4, ..FlashConfig::CPU_SUBGROUP };
    let e = refused(wattn::attention_with(c, &t, &t, &t, &AttentionOptions::default(), &short), "short subgroup tiles");
    assert_mentions(&e, &["subgroup K/V reads need block_k a multiple of the 8 groups"]);
    let wide = FlashConfig { block_q: 64, ..FlashConfig::CPU_SUBGROUP };
    let small = [1, 1, 64, 16];
    let u = zeros(c, &small, DType::F32);
    let e =
        refused(wattn::attention_with(c, &u, &u, &u, &AttentionOptions::default(), &wide), "16-thread subgroup reads");
    assert_mentions(&e, &["needs subgroups of exactly 16 threads"]);

    let bad_lanes = FlashConfig { threads_per_row: 3, ..FlashConfig::PORTABLE };
    let e = refused(wattn::attention_with(c, &t, &t, &t, &AttentionOptions::default(), &bad_lanes), "3 lanes per row");
    assert!(matches!(e, Error::Option(_)), "{e:?}");
    assert_mentions(&e, &["threads_per_row: 3"]);
}

#[test]
fn tensors_beyond_the_binding_limit_are_refused() {
    let limit = 1 << 16;
    let limits = wgpu::Limits { max_storage_buffer_binding_size: limit, ..wgpu::Limits::default() };
    let (device, queue) = own_device(wgpu::Features::empty(), limits);
    let c = Context::from_wgpu(device, queue);
    let data = vec![0.0f32; limit as usize / 4 + 1];
    let e = refused(Tensor::from_f32(&c, &[data.len()], &data, DType::F32), "a tensor over the limit");
    assert!(
        matches!(e, Error::Limit { needed, allowed, .. } if needed == 4 * data.len() as u64 && allowed == limit),
        "{e:?}"
    );
    assert_mentions(&e, &["max_storage_buffer_binding_size", &limit.to_string(), &(4 * data.len()).to_string()]);

    // The caller's own Q/K buffer, bigger than one binding may be: refused before recording.
    let n = limit as usize / 128 + 1;
    let (qk_shape, v_shape) = ([1, 1, n, 32], [1, 1, n, 1]);
    let big = c.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("bigger than a binding"),
        size: 4 * 32 * n as u64,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let qk = TensorView::new(&big, &qk_shape, DType::F32).unwrap();
    let (v, out, lse) =
        (zeros(&c, &v_shape, DType::F32), zeros(&c, &v_shape, DType::F32), zeros(&c, &v_shape[..3], DType::F32));
    let bufs = AttentionBuffers { q: qk, k: qk, v: v.view(), out: out.view(), lse: lse.view() };
    let mut encoder = c.device().create_command_encoder(&Default::default());
    let result = flash::encode(&c, &mut encoder, &bufs, None, &AttentionOptions::default(), &FlashConfig::PORTABLE);
    let e = refused(result, "a caller's buffer over the binding limit");
    assert!(
        matches!(e, Error::Limit { limit: "max_storage_buffer_binding_size", needed, .. } if needed == 4 * 32 * n as u64),
        "{e:?}"
    );
}

/// A device of the caller's opened without `SHADER_F16` on an adapter that may have it: the
/// error says how to open the device, not that the adapter lacks the feature.
#[test]
fn f16_needs_a_device_opened_with_shader_f16() {
    let (device, queue) = own_device(wgpu::Features::empty(), wgpu::Limits::default());
    let c = Context::from_wgpu(device, queue);
    let s = [1, 1, 4, 16];
    let t = zeros(&c, &s, DType::F16);
    let e = refused(wattn::attention(&c, &t, &t, &t, &AttentionOptions::default()), "f16 without SHADER_F16");
    assert!(matches!(&e, Error::F16NotEnabled { adapter } if *adapter == c.adapter_info().name), "{e:?}");
    assert_mentions(&e, &["SHADER_F16", "not opened with", "required_features", &c.adapter_info().name]);
}

/// wattn opens its own device with shader-f16 exactly when the adapter has it, so on its
/// devices [`Error::F16Unsupported`] ("the adapter does not have it") tells the truth.
#[test]
fn f16_on_a_device_wattn_opened_is_missing_only_when_the_adapter_lacks_it() {
    let c = ctx();
    let name = &c.adapter_info().name;
    let adapter_has = ctx_adapter().features().contains(wgpu::Features::SHADER_F16);
    assert_eq!(c.capabilities().shader_f16, adapter_has, "shader-f16 on {name}");
    let t = zeros(c, &[1, 1, 4, 16], DType::F16);
    match wattn::attention(c, &t, &t, &t, &AttentionOptions::default()) {
        Ok(_) => assert!(adapter_has, "f16 ran without shader-f16"),
        Err(e) => {
            assert!(!adapter_has, "f16 refused on an adapter with shader-f16: {e}");
            assert!(matches!(&e, Error::F16Unsupported { adapter } if adapter == name), "{e:?}");
            assert_mentions(&e, &["shader-f16", name, "does not have"]);
        }
    }
}

#[test]
fn block_mask_accessors_refuse_indices_outside_the_mask() {
    use wattn::mask::BlockClass;
    use wattn::{BlockMask, BlockSize, Mask};
    // 2 heads, broadcast over the batch; 40 x 50 elements in blocks of 16: 3 x 4 blocks.
    let mask = BlockMask::per_head(&[Mask::causal(), Mask::full()], 40, 50, BlockSize::new(16, 16)).unwrap();
    assert_eq!(mask.class(7, 1, 2, 3).unwrap(), BlockClass::Full, "any batch index broadcasts");
    assert!(mask.visible(0, 0, 39, 49).unwrap() && !mask.visible(0, 0, 0, 49).unwrap());
    for (what, e) in [
        ("head 2", mask.runs(0, 2, 0).unwrap_err()),
        ("query block 3", mask.runs(0, 0, 3).unwrap_err()),
        ("key block 4", mask.class(0, 0, 0, 4).unwrap_err()),
        ("head 5 of class", mask.class(0, 5, 0, 0).unwrap_err()),
    ] {
        assert!(matches!(e, Error::OutOfRange { .. }), "{what}: {e:?}");
    }
    let e = mask.runs(0, 2, 0).unwrap_err();
    assert_mentions(&e, &["[0, 2, 0]", "[1, 2, 3]"]);
    let e = mask.visible(0, 0, 40, 0).unwrap_err();
    assert!(matches!(&e, Error::OutOfRange { index, bounds, .. } if *index == [40, 0] && *bounds == [40, 50]), "{e:?}");
    assert_mentions(&e, &["[40, 0]", "[40, 50]"]);
    assert!(mask.visible(0, 0, 0, 50).is_err() && mask.visible(0, 3, 0, 0).is_err());

    // The mask predicate itself answers outside its extent, and for masks that do not fit, without panicking.
    let dense = Mask::from_fn(4, 4, |_, _| true);
    assert!(dense.visible(4, 4, 3, 3));
    assert!(!dense.visible(4, 4, 4, 0) && !dense.visible(8, 8, 7, 7), "outside the extent, or a 4 x 4 mask on 8 x 8");
}

/// The flash kernel reads whole 16-byte words, so a caller's buffer that ends inside one
/// (head dim 3, 5 rows: 60 bytes) is refused with the size it needs.
#[test]
fn caller_buffers_must_hold_whole_words() {
    let c = ctx();
    let s = [1, 1, 5, 3];
    let exact = c.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 60,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let view = wattn::TensorView::new(&exact, &s, DType::F32).unwrap();
    let (out, lse) = (zeros(c, &s, DType::F32), zeros(c, &[1, 1, 5], DType::F32));
    let bufs = AttentionBuffers { q: view, k: view, v: view, out: out.view(), lse: lse.view() };
    let mut encoder = c.device().create_command_encoder(&Default::default());
    let result = flash::encode(c, &mut encoder, &bufs, None, &AttentionOptions::default(), &FlashConfig::PORTABLE);
    let e = refused(result, "a 60-byte Q");
    assert!(matches!(e, Error::Shape(_)), "{e:?}");
    assert_mentions(&e, &["Q", "60", "64"]);
}
