//! CPU attention in f64: the independent reference tests and `wattn run --check` compare with,
//! forward and backward. Plain loops over the definition, sharing no code with the kernels
//! beyond the options.

use crate::attention::{AttentionOptions, AttentionShape, SeqLens};
use crate::kv::RopeLayout;
use std::ops::Range;

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
    /// O, `[B, Hq, Nq, Dv]` row-major.
    pub out: Vec<f64>,
    /// LSE (natural log), `[B, Hq, Nq]`.
    pub lse: Vec<f64>,
}

/// Attention over f32 inputs laid out as Q `[B, Hq, Nq, D]`, K `[B, Hkv, Nk, D]`, V `[B, Hkv, Nk, Dv]`.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: &AttentionShape,
    options: &AttentionOptions,
) -> ReferenceOutput {
    attention_masked(q, k, v, shape, options, |_, _, _, _| true)
}

/// [`attention`] where query `i` of batch `b`, query head `h` also needs `mask(b, h, i, j)`
/// to see key `j` (the options' mask still applies).
pub fn attention_masked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: &AttentionShape,
    options: &AttentionOptions,
    mask: impl Fn(usize, usize, usize, usize) -> bool,
) -> ReferenceOutput {
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
                let mut sees_any = false;
                for (j, s) in scores.iter_mut().enumerate() {
                    if !visible(options, n_q, n_k, i, j) || !mask(b, h, i, j) {
                        *s = f64::NEG_INFINITY;
                        continue;
                    }
                    sees_any = true;
                    let kj = &k[(k_off + j) * d_qk..(k_off + j + 1) * d_qk];
                    let dot: f64 = qi.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let mut x = dot * scale;
                    if cap > 0.0 {
                        x = cap * (x / cap).tanh();
                    }
                    *s = x;
                    // f64::max ignores a NaN score; it reaches the row through exp(NaN - max).
                    max = max.max(x);
                }
                if !sees_any {
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

/// Varlen attention over packed f32 inputs (`shape` is the packed tensors', batch 1): each
/// sequence of `seqlens` run alone through [`attention`], its O and LSE rows put back in
/// the packed layout.
pub fn attention_varlen(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: &AttentionShape,
    seqlens: &SeqLens,
    options: &AttentionOptions,
) -> ReferenceOutput {
    attention_varlen_masked(q, k, v, shape, seqlens, options, |_, _, _, _| true)
}

/// [`attention_varlen`] where query `i` of sequence `s`, query head `h` also needs
/// `mask(s, h, i, j)` to see key `j`, both indices within the sequence (each sequence run
/// alone through [`attention_masked`]).
pub fn attention_varlen_masked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: &AttentionShape,
    seqlens: &SeqLens,
    options: &AttentionOptions,
    mask: impl Fn(usize, usize, usize, usize) -> bool,
) -> ReferenceOutput {
    let AttentionShape { q_heads, n_q: total_q, d_v, .. } = *shape;
    let mut out = vec![0.0; q_heads * total_q * d_v];
    let mut lse = vec![f64::NEG_INFINITY; q_heads * total_q];
    for s in 0..seqlens.len() {
        let (alone, [q_s, k_s, v_s]) = sequence_alone(shape, seqlens, s, [q, k, v]);
        let want = attention_masked(&q_s, &k_s, &v_s, &alone, options, |_, h, i, j| mask(s, h, i, j));
        let queries = seqlens.queries(s);
        put_rows(&mut out, q_heads, total_q, &queries, d_v, &want.out);
        put_rows(&mut lse, q_heads, total_q, &queries, 1, &want.lse);
    }
    ReferenceOutput { out, lse }
}

/// The gradients of [`attention_varlen_masked`] ([`attention_backward_masked`] of each
/// sequence alone), packed like Q, K and V; `d_out` is packed like O.
#[allow(clippy::too_many_arguments)]
pub fn attention_varlen_backward_masked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_out: &[f32],
    shape: &AttentionShape,
    seqlens: &SeqLens,
    options: &AttentionOptions,
    mask: impl Fn(usize, usize, usize, usize) -> bool,
) -> ReferenceGradients {
    let AttentionShape { q_heads, kv_heads, n_q: total_q, n_k: total_k, d_qk, d_v, .. } = *shape;
    let mut dq = vec![0.0; q_heads * total_q * d_qk];
    let mut dk = vec![0.0; kv_heads * total_k * d_qk];
    let mut dv = vec![0.0; kv_heads * total_k * d_v];
    for s in 0..seqlens.len() {
        let (alone, [q_s, k_s, v_s]) = sequence_alone(shape, seqlens, s, [q, k, v]);
        let (queries, keys) = (seqlens.queries(s), seqlens.keys(s));
        let d_out_s = packed_rows(d_out, q_heads, total_q, &queries, d_v);
        let want =
            attention_backward_masked(&q_s, &k_s, &v_s, &d_out_s, &alone, options, |_, h, i, j| mask(s, h, i, j));
        put_rows(&mut dq, q_heads, total_q, &queries, d_qk, &want.dq);
        put_rows(&mut dk, kv_heads, total_k, &keys, d_qk, &want.dk);
        put_rows(&mut dv, kv_heads, total_k, &keys, d_v, &want.dv);
    }
    ReferenceGradients { dq, dk, dv }
}

/// Sequence `s` of packed Q, K and V alone: its dense shape (batch 1) and its rows.
fn sequence_alone(
    shape: &AttentionShape,
    seqlens: &SeqLens,
    s: usize,
    [q, k, v]: [&[f32]; 3],
) -> (AttentionShape, [Vec<f32>; 3]) {
    let AttentionShape { q_heads, kv_heads, n_q: total_q, n_k: total_k, d_qk, d_v, .. } = *shape;
    let (queries, keys) = (seqlens.queries(s), seqlens.keys(s));
    let alone = AttentionShape { batch: 1, n_q: queries.len(), n_k: keys.len(), ..*shape };
    let rows = [
        packed_rows(q, q_heads, total_q, &queries, d_qk),
        packed_rows(k, kv_heads, total_k, &keys, d_qk),
        packed_rows(v, kv_heads, total_k, &keys, d_v),
    ];
    (alone, rows)
}

/// Rows `rows` of every head of a packed `[1, heads, total, width]` tensor.
fn packed_rows<T: Copy>(x: &[T], heads: usize, total: usize, rows: &Range<usize>, width: usize) -> Vec<T> {
    (0..heads).flat_map(|h| &x[(h * total + rows.start) * width..(h * total + rows.end) * width]).copied().collect()
}

/// The inverse of [`packed_rows`]: `from` (`[heads, rows, width]`) into those rows of `x`.
fn put_rows(x: &mut [f64], heads: usize, total: usize, rows: &Range<usize>, width: usize, from: &[f64]) {
    let n = rows.len() * width;
    for h in 0..heads {
        let at = (h * total + rows.start) * width;
        x[at..at + n].copy_from_slice(&from[h * n..(h + 1) * n]);
    }
}

/// dQ `[B, Hq, Nq, Dqk]`, dK `[B, Hkv, Nk, Dqk]` and dV `[B, Hkv, Nk, Dv]` in f64.
pub struct ReferenceGradients {
    /// dQ.
    pub dq: Vec<f64>,
    /// dK: the sum over the query heads that read each KV head.
    pub dk: Vec<f64>,
    /// dV, likewise.
    pub dv: Vec<f64>,
}

/// The gradients of a loss with gradient `d_out` (O's layout) with respect to O, through
/// [`attention_masked`]'s attention, by the analytic formulas: with P the softmax of the
/// scores x = cap(s), s = scale q.k, dV = P^T dO, dP = dO V^T, dx = P (dP - rowsum(dO * O)),
/// ds = dx (1 - tanh^2(s / cap)) under a softcap, dQ = scale ds K, dK = scale ds^T Q.
/// Rows that see no key contribute nothing.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_masked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_out: &[f32],
    shape: &AttentionShape,
    options: &AttentionOptions,
    mask: impl Fn(usize, usize, usize, usize) -> bool,
) -> ReferenceGradients {
    let AttentionShape { batch, q_heads, kv_heads, n_q, n_k, d_qk, d_v } = *shape;
    let group = q_heads / kv_heads;
    let scale = options.scale_for(d_qk) as f64;
    let cap = options.softcap as f64;
    let mut grads = ReferenceGradients {
        dq: vec![0.0; batch * q_heads * n_q * d_qk],
        dk: vec![0.0; batch * kv_heads * n_k * d_qk],
        dv: vec![0.0; batch * kv_heads * n_k * d_v],
    };
    for b in 0..batch {
        for h in 0..q_heads {
            let k_off = (b * kv_heads + h / group) * n_k;
            for i in 0..n_q {
                let row = (b * q_heads + h) * n_q + i;
                let qi: Vec<f64> = q[row * d_qk..(row + 1) * d_qk].iter().map(|&x| x as f64).collect();
                let gi: Vec<f64> = d_out[row * d_v..(row + 1) * d_v].iter().map(|&x| x as f64).collect();
                let keys: Vec<usize> =
                    (0..n_k).filter(|&j| visible(options, n_q, n_k, i, j) && mask(b, h, i, j)).collect();
                if keys.is_empty() {
                    continue;
                }
                // (s, x) per visible key: the scaled product and the (capped) score.
                let scores: Vec<(f64, f64)> = keys
                    .iter()
                    .map(|&j| {
                        let kj = &k[(k_off + j) * d_qk..(k_off + j + 1) * d_qk];
                        let s = scale * qi.iter().zip(kj).map(|(a, &b)| a * b as f64).sum::<f64>();
                        (s, if cap > 0.0 { cap * (s / cap).tanh() } else { s })
                    })
                    .collect();
                let max = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s.1 - max).exp()).sum();
                let probs: Vec<f64> = scores.iter().map(|s| (s.1 - max).exp() / sum).collect();
                let value = |j: usize| &v[(k_off + j) * d_v..(k_off + j + 1) * d_v];
                let mut o = vec![0.0; d_v];
                for (&j, p) in keys.iter().zip(&probs) {
                    for (oc, &vc) in o.iter_mut().zip(value(j)) {
                        *oc += p * vc as f64;
                    }
                }
                let delta: f64 = gi.iter().zip(&o).map(|(g, o)| g * o).sum();
                for ((&j, p), (s, _)) in keys.iter().zip(&probs).zip(&scores) {
                    let dp: f64 = gi.iter().zip(value(j)).map(|(g, &vc)| g * vc as f64).sum();
                    let mut ds = p * (dp - delta);
                    if cap > 0.0 {
                        ds *= 1.0 - (s / cap).tanh().powi(2);
                    }
                    let kj = &k[(k_off + j) * d_qk..(k_off + j + 1) * d_qk];
                    for (dq, &kc) in grads.dq[row * d_qk..(row + 1) * d_qk].iter_mut().zip(kj) {
                        *dq += scale * ds * kc as f64;
                    }
                    for (dk, qc) in grads.dk[(k_off + j) * d_qk..(k_off + j + 1) * d_qk].iter_mut().zip(&qi) {
                        *dk += scale * ds * qc;
                    }
                    for (dv, g) in grads.dv[(k_off + j) * d_v..(k_off + j + 1) * d_v].iter_mut().zip(&gi) {
                        *dv += p * g;
                    }
                }
            }
        }
    }
    grads
}

/// [`attention_backward_masked`] with the options' mask alone.
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_out: &[f32],
    shape: &AttentionShape,
    options: &AttentionOptions,
) -> ReferenceGradients {
    attention_backward_masked(q, k, v, d_out, shape, options, |_, _, _, _| true)
}

/// RoPE in f64: the head vector `x` rotated to `position`, pair i by `position * base^(-2i/D)`.
/// [`RopeLayout::NeoX`] pairs column i with i + D/2, [`RopeLayout::Interleaved`] 2i with 2i + 1.
pub fn rope(x: &[f64], position: f64, base: f64, layout: RopeLayout) -> Vec<f64> {
    let d = x.len();
    let half = d / 2;
    let mut y = x.to_vec();
    for i in 0..half {
        let (a, b) = match layout {
            RopeLayout::NeoX => (i, i + half),
            RopeLayout::Interleaved => (2 * i, 2 * i + 1),
        };
        let (sin, cos) = (position * base.powf(-2.0 * i as f64 / d as f64)).sin_cos();
        y[a] = x[a] * cos - x[b] * sin;
        y[b] = x[b] * cos + x[a] * sin;
    }
    y
}

/// One query's attention over an explicit list of keys, in f64.
pub struct RowAttention {
    /// The output row, of width `d_v`; zeros when there is no key.
    pub out: Vec<f64>,
    /// Natural log; -inf when there is no key.
    pub lse: f64,
    /// The softmax probability of each key.
    pub probs: Vec<f64>,
}

/// Softmax attention of the query `q` over exactly `keys` and `values` (one row each, values
/// of width `d_v`): what a KV cache holding just these tokens must give. No keys gives zeros and -inf.
pub fn attend_rows(q: &[f64], keys: &[Vec<f64>], values: &[Vec<f64>], d_v: usize, scale: f64) -> RowAttention {
    if keys.is_empty() {
        return RowAttention { out: vec![0.0; d_v], lse: f64::NEG_INFINITY, probs: Vec::new() };
    }
    let scores: Vec<f64> = keys.iter().map(|k| scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>()).collect();
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let sum: f64 = weights.iter().sum();
    let probs: Vec<f64> = weights.iter().map(|w| w / sum).collect();
    let mut out = vec![0.0; d_v];
    for (p, v) in probs.iter().zip(values) {
        for (o, x) in out.iter_mut().zip(v) {
            *o += p * x;
        }
    }
    RowAttention { out, lse: max + sum.ln(), probs }
}

/// Merges partial results over disjoint key sets, each (output normalised over its keys,
/// LSE), into the result over all their keys. Partials with LSE -inf carry no weight; if
/// all have it, the result is zeros and -inf.
pub fn merge_partials(parts: &[(Vec<f64>, f64)]) -> (Vec<f64>, f64) {
    let dim = parts.first().map_or(0, |p| p.0.len());
    let max = parts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    if parts.iter().all(|p| p.1 == f64::NEG_INFINITY) {
        return (vec![0.0; dim], f64::NEG_INFINITY);
    }
    let mut out = vec![0.0; dim];
    let mut sum = 0.0;
    for (o, lse) in parts {
        let w = (lse - max).exp();
        sum += w;
        for (acc, x) in out.iter_mut().zip(o) {
            *acc += w * x;
        }
    }
    (out.iter().map(|x| x / sum).collect(), max + sum.ln())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The analytic gradients against central finite differences of the loss sum(dO * O) on a
    /// tiny GQA case with causality (one row sees nothing), a window, a sink and a softcap.
    #[test]
    fn backward_matches_finite_differences() {
        let shape = AttentionShape { batch: 1, q_heads: 2, kv_heads: 1, n_q: 4, n_k: 3, d_qk: 3, d_v: 2 };
        let options = AttentionOptions { causal: true, window: (1, -1), sinks: 1, softcap: 2.0, scale: Some(0.7) };
        let values = |n: usize, seed: usize| -> Vec<f32> {
            (0..n).map(|i| (((i * 7 + seed * 13) % 11) as f32 - 5.0) / 4.0).collect()
        };
        let (q, k, v) = (values(24, 1), values(9, 2), values(6, 3));
        let d_out = values(16, 4);
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            let o = attention(q, k, v, &shape, &options).out;
            o.iter().zip(&d_out).map(|(o, &g)| o * g as f64).sum()
        };
        let grads = attention_backward(&q, &k, &v, &d_out, &shape, &options);
        // f32 inputs: steps of 2^-10 are exact, and the loss is smooth at this scale.
        let h = 1.0 / 1024.0;
        let numeric = |which: usize, at: usize| -> f64 {
            let mut inputs = [q.clone(), k.clone(), v.clone()];
            inputs[which][at] += h;
            let up = loss(&inputs[0], &inputs[1], &inputs[2]);
            inputs[which][at] -= 2.0 * h;
            let down = loss(&inputs[0], &inputs[1], &inputs[2]);
            (up - down) / (2.0 * h as f64)
        };
        for (which, name, analytic) in [(0, "dQ", &grads.dq), (1, "dK", &grads.dk), (2, "dV", &grads.dv)] {
            for (at, &a) in analytic.iter().enumerate() {
                let n = numeric(which, at);
                assert!((a - n).abs() <= 1e-5 * (1.0 + a.abs()), "{name}[{at}]: analytic {a}, finite differences {n}");
            }
        }
        // The row that sees no key (row 0 of each head: causal with Nq > Nk) has dQ = 0.
        assert!(grads.dq[..3].iter().chain(&grads.dq[12..15]).all(|&x| x == 0.0));
    }
}
