// Materialised-scores backward: the gradients of attention through two [B, Hq, Nq, Nk] f32
// matrices, P and dS, one simple kernel per product and one thread per element it writes.
// O(N^2) memory: the baseline the flash backward (flash_bwd.wgsl) is measured against, not a
// path to use. Dispatched in this order by src/attention/naive.rs:
//
// - probs_main: P = exp(score - LSE) from Q, K and the forward's LSE (natural log), 0 where
//   the key is masked; and, in grad_scores, the score's derivative with respect to scale q.k:
//   1, or 1 - tanh^2 under a softcap.
// - deltas_main: D = rowsum(dO * O) per query row.
// - grad_scores_main: dS = P (dP - D) times that derivative, in its place, with dP = dO V^T.
// - dv_main: dV = P^T dO and dk_main: dK = scale dS^T Q, each summed over the query heads of a
//   KV head in order (GQA), so reruns give the same bits.
// - dq_main: dQ = scale dS K.
//
// As in naive.wgsl, a zero weight (a masked key, a row that sees no key) is left out of the
// sums rather than multiplied, so a NaN a row cannot see stays out of its gradients.
//
// Constants from the prelude (src/shader.rs): Elem, WORKGROUP. Params and visible() come
// from shared/attention.wgsl, is_zero and kv_head_of from shared/softmax.wgsl.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<Elem>;
@group(0) @binding(2) var<storage, read> k: array<Elem>;
@group(0) @binding(3) var<storage, read> v: array<Elem>;
@group(0) @binding(4) var<storage, read> out: array<Elem>;
@group(0) @binding(5) var<storage, read> d_out: array<Elem>;
@group(0) @binding(6) var<storage, read> lse: array<f32>;
@group(0) @binding(7) var<storage, read_write> dq: array<Elem>;
@group(0) @binding(8) var<storage, read_write> dk: array<Elem>;
@group(0) @binding(9) var<storage, read_write> dv: array<Elem>;
@group(0) @binding(10) var<storage, read_write> probs: array<f32>;
@group(0) @binding(11) var<storage, read_write> grad_scores: array<f32>;
@group(0) @binding(12) var<storage, read_write> deltas: array<f32>;

// The (batch, KV head) index that (batch, query head) index `bh` reads.
fn kv_of(bh: u32) -> u32 {
    return (bh / params.q_heads) * params.kv_heads + kv_head_of(bh % params.q_heads, params.q_heads, params.kv_heads);
}

// One thread per score: gid.x = key, gid.y = query row, gid.z = batch * q_heads + head.
@compute @workgroup_size(WORKGROUP)
fn probs_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let i = gid.y;
    if j >= params.n_k || i >= params.n_q {
        return;
    }
    let bh = gid.z;
    let row = bh * params.n_q + i;
    let q_row = row * params.d_qk;
    let k_row = (kv_of(bh) * params.n_k + j) * params.d_qk;
    var acc = 0.0;
    for (var c = 0u; c < params.d_qk; c++) {
        acc += f32(q[q_row + c]) * f32(k[k_row + c]);
    }
    var x = acc * params.scale;
    var derivative = 1.0;
    if params.softcap > 0.0 {
        let t = tanh(x / params.softcap);
        x = params.softcap * t;
        derivative = 1.0 - t * t;
    }
    let diag = i32(i) + i32(params.n_k) - i32(params.n_q);
    // A row that sees no key has LSE -inf: every one of its keys is masked, so it never
    // reaches exp(x + inf).
    let p = select(0.0, exp(x - lse[row]), visible(diag, i32(j)));
    probs[row * params.n_k + j] = p;
    grad_scores[row * params.n_k + j] = derivative;
}

// One thread per query row, spread over (x, y) as naive.wgsl's softmax_main.
@compute @workgroup_size(WORKGROUP)
fn deltas_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row = gid.x + gid.y * 65535u * WORKGROUP;
    if row >= params.batch * params.q_heads * params.n_q {
        return;
    }
    var acc = 0.0;
    for (var c = 0u; c < params.d_v; c++) {
        acc += f32(d_out[row * params.d_v + c]) * f32(out[row * params.d_v + c]);
    }
    deltas[row] = acc;
}

// One thread per score, as probs_main.
@compute @workgroup_size(WORKGROUP)
fn grad_scores_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let i = gid.y;
    if j >= params.n_k || i >= params.n_q {
        return;
    }
    let bh = gid.z;
    let row = bh * params.n_q + i;
    let at = row * params.n_k + j;
    let p = probs[at];
    var ds = 0.0;
    if !is_zero(p) {
        let v_row = (kv_of(bh) * params.n_k + j) * params.d_v;
        var dp = 0.0;
        for (var c = 0u; c < params.d_v; c++) {
            dp += f32(d_out[row * params.d_v + c]) * f32(v[v_row + c]);
        }
        ds = p * (dp - deltas[row]) * grad_scores[at];
    }
    grad_scores[at] = ds;
}

// sum over the query heads of KV head `kv` (batch * kv_heads + head) and their rows i of
// weights[row i, key j] * x[row i, column c]: column c of key j's dV (weights P, x dO) or,
// unscaled, of its dK (weights dS, x Q). `dim` is x's head dim.
fn key_column(weights_are_probs: bool, kv: u32, j: u32, c: u32, dim: u32) -> f32 {
    let group = params.q_heads / params.kv_heads;
    let b = kv / params.kv_heads;
    let first_head = b * params.q_heads + (kv % params.kv_heads) * group;
    var acc = 0.0;
    for (var h = first_head; h < first_head + group; h++) {
        for (var i = 0u; i < params.n_q; i++) {
            let row = h * params.n_q + i;
            if weights_are_probs {
                let p = probs[row * params.n_k + j];
                if !is_zero(p) {
                    acc += p * f32(d_out[row * dim + c]);
                }
            } else {
                let ds = grad_scores[row * params.n_k + j];
                if !is_zero(ds) {
                    acc += ds * f32(q[row * dim + c]);
                }
            }
        }
    }
    return acc;
}

// One thread per element of dV: gid.x = column, gid.y = key, gid.z = batch * kv_heads + head.
@compute @workgroup_size(WORKGROUP)
fn dv_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let j = gid.y;
    if c >= params.d_v || j >= params.n_k {
        return;
    }
    dv[(gid.z * params.n_k + j) * params.d_v + c] = Elem(key_column(true, gid.z, j, c, params.d_v));
}

// One thread per element of dK, as dv_main.
@compute @workgroup_size(WORKGROUP)
fn dk_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let j = gid.y;
    if c >= params.d_qk || j >= params.n_k {
        return;
    }
    let sum = key_column(false, gid.z, j, c, params.d_qk);
    dk[(gid.z * params.n_k + j) * params.d_qk + c] = Elem(params.scale * sum);
}

// One thread per element of dQ: gid.x = column, gid.y = query row, gid.z = batch * q_heads + head.
@compute @workgroup_size(WORKGROUP)
fn dq_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let i = gid.y;
    if c >= params.d_qk || i >= params.n_q {
        return;
    }
    let bh = gid.z;
    let row = bh * params.n_q + i;
    let k_rows = kv_of(bh) * params.n_k;
    var acc = 0.0;
    for (var j = 0u; j < params.n_k; j++) {
        let ds = grad_scores[row * params.n_k + j];
        if !is_zero(ds) {
            acc += ds * f32(k[(k_rows + j) * params.d_qk + c]);
        }
    }
    dq[row * params.d_qk + c] = Elem(params.scale * acc);
}
