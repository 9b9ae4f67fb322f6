// Materialised-scores attention: S = scale * Q K^T (masked) into a [B, Hq, Nq, Nk] f32
// buffer, a row softmax in place, then O = P V. Three passes over O(N^2) memory: the
// baseline the flash kernel is measured against, not a path to use.
//
// Constants from the prelude (src/shader.rs): Elem, WORKGROUP. Params and visible() come
// from shared/attention.wgsl, MASKED and the softmax steps from shared/softmax.wgsl.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<Elem>;
@group(0) @binding(2) var<storage, read> k: array<Elem>;
@group(0) @binding(3) var<storage, read> v: array<Elem>;
@group(0) @binding(4) var<storage, read_write> out: array<Elem>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;
@group(0) @binding(6) var<storage, read_write> scores: array<f32>;

// One thread per score: gid.x = key, gid.y = query row, gid.z = batch * q_heads + head.
@compute @workgroup_size(WORKGROUP)
fn scores_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let i = gid.y;
    if j >= params.n_k || i >= params.n_q {
        return;
    }
    let bh = gid.z;
    let kv = (bh / params.q_heads) * params.kv_heads + kv_head_of(bh % params.q_heads, params.q_heads, params.kv_heads);
    let q_row = (bh * params.n_q + i) * params.d_qk;
    let k_row = (kv * params.n_k + j) * params.d_qk;
    var acc = 0.0;
    for (var c = 0u; c < params.d_qk; c++) {
        acc += f32(q[q_row + c]) * f32(k[k_row + c]);
    }
    var x = acc * params.scale;
    if params.softcap > 0.0 {
        x = params.softcap * tanh(x / params.softcap);
    }
    let diag = i32(i) + i32(params.n_k) - i32(params.n_q);
    let ok = visible(diag, i32(j));
    // Base-2 units for the shared softmax steps.
    scores[(bh * params.n_q + i) * params.n_k + j] = select(MASKED, x * LOG2E, ok);
}

// One thread per row: max, exp and sum in place, LSE.
@compute @workgroup_size(WORKGROUP)
fn softmax_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row = gid.x + gid.y * 65535u * WORKGROUP;
    if row >= params.batch * params.q_heads * params.n_q {
        return;
    }
    let base = row * params.n_k;
    var m = MASKED;
    for (var j = 0u; j < params.n_k; j++) {
        m = max(m, scores[base + j]);
    }
    var l = 0.0;
    for (var j = 0u; j < params.n_k; j++) {
        let x = scores[base + j];
        let p = softmax_weight(x, m);
        scores[base + j] = p;
        l += p;
    }
    let inv_l = inverse_sum(l);
    for (var j = 0u; j < params.n_k; j++) {
        scores[base + j] *= inv_l;
    }
    lse[row] = finish_lse(m, l);
}

// One thread per output element: gid.x = column, gid.y = query row, gid.z = batch * head.
@compute @workgroup_size(WORKGROUP)
fn pv_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let i = gid.y;
    if c >= params.d_v || i >= params.n_q {
        return;
    }
    let bh = gid.z;
    let kv = (bh / params.q_heads) * params.kv_heads + kv_head_of(bh % params.q_heads, params.q_heads, params.kv_heads);
    let p_row = (bh * params.n_q + i) * params.n_k;
    var acc = 0.0;
    for (var j = 0u; j < params.n_k; j++) {
        let p = scores[p_row + j];
        // As in flash_fwd.wgsl: a masked key's V never reaches the row, a NaN weight does.
        if !is_zero(p) {
            acc += p * f32(v[(kv * params.n_k + j) * params.d_v + c]);
        }
    }
    out[(bh * params.n_q + i) * params.d_v + c] = Elem(acc);
}
