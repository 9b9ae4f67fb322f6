// The online softmax every attention kernel shares (src/shader.rs prepends this file to
// flash_fwd, naive, decode, combine and kv_cache).
//
// A key a row cannot see has the score MASKED: finite, so that the rescale factor
// exp(MASKED - MASKED) of a row that has seen nothing yet is 1, and far below any real
// logit. Masked keys get the weight 0 by test, not by arithmetic, so a NaN score (a NaN in
// Q or K, or inf - inf) is not taken for a masked one: it reaches the row's weights, sum,
// output and LSE, as IEEE arithmetic says, while rows that cannot see the poisoned key
// never touch it.
//
// The tests compare bits, never floats: whether `NaN != x` is true depends on the backend
// (SPIR-V has ordered and unordered comparisons; WGSL lets implementations assume there
// are no NaNs), while integer comparisons mean one thing everywhere.

const MASKED: f32 = -3.0e38;

// -inf, the LSE of a row that sees no key, made at run time: WGSL rejects a
// const-expression that evaluates to an infinity, and a private variable is not one.
var<private> neg_inf_bits: u32 = 0xff800000u;

fn neg_inf() -> f32 {
    return bitcast<f32>(neg_inf_bits);
}

fn is_neg_inf(x: f32) -> bool {
    return bitcast<u32>(x) == 0xff800000u;
}

fn is_masked(x: f32) -> bool {
    return bitcast<u32>(x) == bitcast<u32>(MASKED);
}

// Whether x is +0.0: a weight of nothing (a masked key, or one that underflowed), or the sum
// of a row that saw no key. False for NaN.
fn is_zero(x: f32) -> bool {
    return bitcast<u32>(x) == 0u;
}

// The unnormalised weight of score x against the running max m: 0 for a masked key,
// NaN for a NaN score.
fn softmax_weight(x: f32, m: f32) -> f32 {
    return select(exp(x - m), 0.0, is_masked(x));
}

// The factor rescaling what a row has accumulated when its running max moves from m_old to
// m_new (1 while the row has seen nothing: MASKED - MASKED = 0).
fn rescale_factor(m_old: f32, m_new: f32) -> f32 {
    return exp(m_old - m_new);
}

// 1 / l, or 0 for a row that saw no key (l = 0), so that its output is zeros. NaN stays NaN.
fn inverse_sum(l: f32) -> f32 {
    return select(1.0 / l, 0.0, is_zero(l));
}

// The natural-log LSE of a row with running max m and sum l: -inf for a row that saw no
// key, NaN when l is.
fn finish_lse(m: f32, l: f32) -> f32 {
    return select(m + log(l), neg_inf(), is_zero(l));
}

// The KV head that query head `head` reads (GQA/MQA: q_heads is a multiple of kv_heads).
fn kv_head_of(head: u32, q_heads: u32, kv_heads: u32) -> u32 {
    return head / (q_heads / kv_heads);
}
