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
// Scores are in base-2 units: the kernels fold log2(e) into the softmax scale, so every
// weight is one exp2 (FlashAttention's choice); finish_lse turns the result back into the
// natural-log LSE the API returns.
//
// Each step comes in a vec4 form (four rows at once, for the register-tiled flash kernel)
// and a scalar form defined by it.
//
// The tests compare bits, never floats: whether `NaN != x` is true depends on the backend
// (SPIR-V has ordered and unordered comparisons; WGSL lets implementations assume there
// are no NaNs), while integer comparisons mean one thing everywhere.

const MASKED: f32 = -3.0e38;
const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;

// -inf, the LSE of a row that sees no key, made at run time: WGSL rejects a
// const-expression that evaluates to an infinity, and a private variable is not one.
var<private> neg_inf_bits: u32 = 0xff800000u;

fn neg_inf() -> f32 {
    return bitcast<f32>(neg_inf_bits);
}

fn is_neg_inf(x: f32) -> bool {
    return bitcast<u32>(x) == 0xff800000u;
}

fn is_masked4(x: vec4<f32>) -> vec4<bool> {
    return bitcast<vec4<u32>>(x) == vec4(bitcast<u32>(MASKED));
}

fn is_masked(x: f32) -> bool {
    return is_masked4(vec4(x)).x;
}

// Whether x is +0.0: a weight of nothing (a masked key, or one that underflowed), or the sum
// of a row that saw no key. False for NaN.
fn is_zero4(x: vec4<f32>) -> vec4<bool> {
    return bitcast<vec4<u32>>(x) == vec4(0u);
}

fn is_zero(x: f32) -> bool {
    return is_zero4(vec4(x)).x;
}

// The unnormalised weight of score x against the running max m: 0 for a masked key,
// NaN for a NaN score.
fn softmax_weight4(x: vec4<f32>, m: vec4<f32>) -> vec4<f32> {
    return select(exp2(x - m), vec4(0.0), is_masked4(x));
}

fn softmax_weight(x: f32, m: f32) -> f32 {
    return softmax_weight4(vec4(x), vec4(m)).x;
}

// The factor rescaling what a row has accumulated when its running max moves from m_old to
// m_new (1 while the row has seen nothing: MASKED - MASKED = 0).
fn rescale_factor4(m_old: vec4<f32>, m_new: vec4<f32>) -> vec4<f32> {
    return exp2(m_old - m_new);
}

fn rescale_factor(m_old: f32, m_new: f32) -> f32 {
    return rescale_factor4(vec4(m_old), vec4(m_new)).x;
}

// 1 / l, or 0 for a row that saw no key (l = 0), so that its output is zeros. NaN stays NaN.
fn inverse_sum4(l: vec4<f32>) -> vec4<f32> {
    return select(1.0 / l, vec4(0.0), is_zero4(l));
}

fn inverse_sum(l: f32) -> f32 {
    return inverse_sum4(vec4(l)).x;
}

// The natural-log LSE of a row with running max m (base 2) and sum l: -inf for a row that
// saw no key, NaN when l is.
fn finish_lse4(m: vec4<f32>, l: vec4<f32>) -> vec4<f32> {
    return select((m + log2(l)) * LN2, vec4(neg_inf()), is_zero4(l));
}

fn finish_lse(m: f32, l: f32) -> f32 {
    return finish_lse4(vec4(m), vec4(l)).x;
}

// The KV head that query head `head` reads (GQA/MQA: q_heads is a multiple of kv_heads).
fn kv_head_of(head: u32, q_heads: u32, kv_heads: u32) -> u32 {
    return head / (q_heads / kv_heads);
}
