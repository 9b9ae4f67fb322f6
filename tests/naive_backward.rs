//! The naive materialised backward (`wattn::naive::attention_backward`), the baseline
//! `wattn bench --backward` times the flash backward against, on the f64 reference gradients:
//! each gradient's largest error may be at most twice the flash backward's on the same inputs
//! plus the floor the backward tests use (half a rounding of the largest gradient, and what
//! recomputing the weights from the forward's f32 LSE does to it). Small shapes with the
//! dense options: causal with Nq > Nk (rows that see nothing), window and sinks, softcap,
//! GQA and MQA, odd head dims, f32 and f16.

mod common;

use common::{Inputs, Rng, ctx, max_abs_err, quantize};
use wattn::{AttentionOptions, AttentionShape, DType, Gradients, Tensor, reference};

fn shape(heads: (usize, usize), lens: (usize, usize), dims: (usize, usize)) -> AttentionShape {
    AttentionShape {
        batch: 1,
        q_heads: heads.0,
        kv_heads: heads.1,
        n_q: lens.0,
        n_k: lens.1,
        d_qk: dims.0,
        d_v: dims.1,
    }
}

fn options(causal: bool, window: (i32, i32), sinks: u32, softcap: f32) -> AttentionOptions {
    AttentionOptions { causal, window, sinks, softcap, ..Default::default() }
}

#[test]
fn naive_gradients_match_reference() {
    let c = ctx();
    let cases = [
        (DType::F32, shape((1, 1), (1, 239), (32, 32)), AttentionOptions::default()),
        (DType::F32, shape((4, 2), (113, 203), (59, 59)), options(false, (20, 0), 3, 0.0)),
        (DType::F16, shape((4, 1), (113, 203), (64, 64)), options(true, (-1, -1), 0, 1.5)),
        (DType::F32, shape((2, 1), (200, 77), (64, 64)), options(true, (-1, -1), 0, 0.0)),
        (DType::F32, shape((3, 1), (97, 160), (3, 5)), options(false, (-1, 7), 0, 2.0)),
    ];
    let mut failures = Vec::new();
    for (n, (dtype, s, o)) in cases.into_iter().enumerate() {
        let label = format!("{dtype} H{}/{} N{}x{} D{}/{}{}", s.q_heads, s.kv_heads, s.n_q, s.n_k, s.d_qk, s.d_v, {
            o.describe()
        });
        let x = Inputs::random(&s, dtype, 9100 + n as u64);
        let d_out_host = quantize(&Rng::new(9200 + n as u64).normal_vec(s.out_shape().iter().product()), dtype);
        let (q, k, v) = x.upload(c, &s, dtype);
        let d_out = Tensor::from_f32(c, &s.out_shape(), &d_out_host, dtype).unwrap();
        let forward = wattn::attention(c, &q, &k, &v, &o).unwrap();
        let read = |g: Gradients| [g.dq.to_f32(c).unwrap(), g.dk.to_f32(c).unwrap(), g.dv.to_f32(c).unwrap()];
        let naive = wattn::naive::attention_backward(c, &q, &k, &v, &forward.out, &forward.lse, &d_out, &o);
        let naive = read(naive.unwrap_or_else(|e| panic!("{label}: {e}")));
        let flash =
            read(wattn::attention_backward(c, &q, &k, &v, &forward.out, &forward.lse, &d_out, &o, None).unwrap());
        let want = reference::attention_backward(&x.q, &x.k, &x.v, &d_out_host, &s, &o);
        let lse = reference::attention(&x.q, &x.k, &x.v, &s, &o).lse;
        let largest_lse = lse.iter().filter(|x| x.is_finite()).fold(0.0f64, |m, x| m.max(x.abs()));
        let eps = match dtype {
            DType::F32 => f32::EPSILON as f64,
            DType::F16 => half::f16::EPSILON.to_f64(),
        };
        let mut line = format!("{label:<48}");
        for (name, i, want) in [("dQ", 0, &want.dq), ("dK", 1, &want.dk), ("dV", 2, &want.dv)] {
            let largest = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
            let (err, flash_err) = (max_abs_err(&naive[i], want), max_abs_err(&flash[i], want));
            let recomputed = 2.0 * f32::EPSILON as f64 * (1.0 + largest_lse);
            let bound = 2.0 * flash_err + (0.5 * eps + recomputed) * largest;
            line += &format!("  {name} {err:.2e} (flash {flash_err:.2e}, bound {bound:.2e})");
            if err > bound {
                failures.push(format!("{label}: {name} error {err:.3e} above {bound:.3e}"));
            }
        }
        eprintln!("{line}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The scratch is checked against the shape it is used for, with the numbers.
#[test]
fn naive_backward_rejects_a_small_scratch() {
    let c = ctx();
    let s = shape((1, 1), (16, 16), (8, 8));
    let x = Inputs::random(&s, DType::F32, 1);
    let (q, k, v) = x.upload(c, &s, DType::F32);
    let o = AttentionOptions::default();
    let forward = wattn::attention(c, &q, &k, &v, &o).unwrap();
    let small = AttentionShape { n_q: 8, ..s };
    let scratch = wattn::naive::BackwardScratch::alloc(c, &small).unwrap();
    let zeros = |dims: &[usize]| Tensor::zeros(c, dims, DType::F32).unwrap();
    let (dq, dk, dv) = (zeros(q.shape()), zeros(k.shape()), zeros(v.shape()));
    let bufs = wattn::GradientBuffers {
        forward: wattn::AttentionBuffers {
            q: q.view(),
            k: k.view(),
            v: v.view(),
            out: forward.out.view(),
            lse: forward.lse.view(),
        },
        d_out: forward.out.view(),
        dq: dq.view(),
        dk: dk.view(),
        dv: dv.view(),
    };
    let mut encoder = c.device().create_command_encoder(&Default::default());
    let err = wattn::naive::encode_backward(c, &mut encoder, &bufs, &scratch, &o).unwrap_err().to_string();
    assert!(err.contains("needs 1024 and 64"), "{err}");
}

/// Under a loop cap its loops cannot run past, the naive backward is refused with the numbers
/// (`wattn bench --backward` then reports it skipped with this reason).
#[test]
fn naive_backward_refuses_loops_past_the_cap() {
    let c = wattn::Context::new().unwrap().with_loop_iteration_limit(100);
    let s = shape((2, 1), (64, 64), (8, 8));
    let x = Inputs::random(&s, DType::F32, 2);
    let (q, k, v) = x.upload(&c, &s, DType::F32);
    let o = AttentionOptions::default();
    let forward = wattn::attention(&c, &q, &k, &v, &o).unwrap();
    let err = wattn::naive::attention_backward(&c, &q, &k, &v, &forward.out, &forward.lse, &forward.out, &o);
    let err = err.err().expect("130 iterations are past a cap of 100").to_string();
    assert!(err.contains("130") && err.contains("100"), "{err}");
}
