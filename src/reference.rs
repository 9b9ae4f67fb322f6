//! CPU attention in f64: the independent reference tests and `wattn run --check` compare with.
//! Plain loops over the definition, sharing no code with the kernels beyond the options.

use crate::attention::{AttentionOptions, AttentionShape};

/// Whether query `i` may see key `j`, straight from the definitions in [`AttentionOptions`].
pub fn visible(options: &AttentionOptions, n_q: usize, n_k: usize, i: usize, j: usize) -> bool {
    let diag = i as i64 + n_k as i64 - n_q as i64;
    let j = j as i64;
    let (left, right) = options.window;
    if options.causal && j > diag {
        return false;
    }
    if right >= 0 && j > diag + right as i64 {
        return false;
    }
    let in_sinks = j < options.sinks as i64;
    if left >= 0 && j < diag - left as i64 && !in_sinks {
        return false;
    }
    true
}

/// O `[B, Hq, Nq, Dv]` and LSE `[B, Hq, Nq]` in f64. Rows that see no key get zeros and -inf.
pub struct ReferenceOutput {
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
}

/// Attention over f32 inputs laid out as Q `[B, Hq, Nq, D]`, K `[B, Hkv, Nk, D]`, V `[B, Hkv, Nk, Dv]`.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], shape: &AttentionShape, options: &AttentionOptions) -> ReferenceOutput {
    let AttentionShape { batch, q_heads, kv_heads, n_q, n_k, d_qk, d_v } = *shape;
    let group = q_heads / kv_heads;
    let scale = options.scale_for(d_qk) as f64;
    let cap = options.softcap as f64;
    let mut out = vec![0.0; batch * q_heads * n_q * d_v];
    let mut lse = vec![f64::NEG_INFINITY; batch * q_heads * n_q];
    let mut scores = vec![0.0f64; n_k];
    for b in 0..batch {
        for h in 0..q_heads {
            let kvh = h / group;
            let k_off = (b * kv_heads + kvh) * n_k;
            for i in 0..n_q {
                let row = (b * q_heads + h) * n_q + i;
                let qi = &q[row * d_qk..(row + 1) * d_qk];
                let mut max = f64::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    if !visible(options, n_q, n_k, i, j) {
                        *s = f64::NEG_INFINITY;
                        continue;
                    }
                    let kj = &k[(k_off + j) * d_qk..(k_off + j + 1) * d_qk];
                    let dot: f64 = qi.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let mut x = dot * scale;
                    if cap > 0.0 {
                        x = cap * (x / cap).tanh();
                    }
                    *s = x;
                    max = max.max(x);
                }
                if max == f64::NEG_INFINITY {
                    continue;
                }
                let mut sum = 0.0;
                let o = &mut out[row * d_v..(row + 1) * d_v];
                for (j, &s) in scores.iter().enumerate() {
                    if s == f64::NEG_INFINITY {
                        continue;
                    }
                    let p = (s - max).exp();
                    sum += p;
                    let vj = &v[(k_off + j) * d_v..(k_off + j + 1) * d_v];
                    for (oc, &vc) in o.iter_mut().zip(vj) {
                        *oc += p * vc as f64;
                    }
                }
                for oc in o.iter_mut() {
                    *oc /= sum;
                }
                lse[row] = max + sum.ln();
            }
        }
    }
    ReferenceOutput { out, lse }
}
