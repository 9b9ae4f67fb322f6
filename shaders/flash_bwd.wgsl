// Flash-attention backward (FlashAttention-2's algorithm): dQ, dK and dV from Q, K, V, the
// forward's O and LSE, and dO, without materialising the N x N scores. P is recomputed key by
// key from Q, K and the LSE; nothing but per-row statistics and the gradients is stored.
//
// Three entry points, dispatched in this order by src/attention/backward.rs:
//
// - `preprocess`: one thread per query row writes its statistics to the head of `state`:
//   the LSE in base 2 (the forward's is natural-log; the kernels work in base 2, as
//   shared/softmax.wgsl explains) and D = rowsum(dO * O).
// - `dkdv_pass`: one thread per key of a KV head. The workgroup walks, in a fixed order,
//   every query head of the KV head's group and every query block that can see one of its
//   keys (the dense options' bounds, or the block mask's runs of each query block); each
//   thread accumulates its key's dK and dV in registers: dV += P dO, dS = P (dP - D),
//   dK += dS Q. GQA's reduction over the group is that fixed-order loop, so no atomics.
// - `dq_pass`: one thread per query row walks the key tiles its block can see, as the
//   forward does, and accumulates dQ += dS K. A pass of its own instead of float atomics in
//   `dkdv_pass`: every sum runs in a fixed order, so equal inputs give bit-identical
//   gradients.
//
// The row statistics and the carried accumulators share one buffer (`state`) so that no
// pass binds more than eight storage buffers, WebGPU's default limit.
//
// Threads of a workgroup walk the other side's rows together, so a row of Q, dO (dkdv) or
// K, V (dq) is the same address in every thread: one load for the whole subgroup on a CPU
// adapter. There is no workgroup memory and no barrier.
//
// Masked pairs and pairs whose weight is exactly 0 are skipped by test, never multiplied by
// 0: a NaN in a row a key cannot see (or in dO of a row that gives the key no weight) stays
// out of its gradients, while a NaN in a pair that counts reaches every gradient that
// depends on it, as IEEE arithmetic says. Rows that see no key (LSE -inf) contribute
// nothing, and their dQ is 0.
//
// Softcap C: the score is C tanh(s / C) for s = scale q.k, so dS picks up the derivative
// 1 - tanh^2.
//
// Software adapters cap the loop iterations of an invocation (see flash_fwd.wgsl), so the
// host splits each of the two main passes into dispatches over `range`, carrying the
// accumulators in `state` after the statistics. FIRST_PASS starts them at zero, LAST_PASS
// writes the gradients in the storage type.
//
// Constants come from the prelude made by src/shader.rs: Elem (f32 or f16), BLOCK_Q (query
// rows per dq workgroup and per query block of the dkdv walk), BLOCK_K (keys per tile),
// KEYS_WG (keys per dkdv workgroup, a multiple of BLOCK_K), DQK_PAD and DV_PAD (head dims
// rounded up to 16), ALIGNED (both head dims are multiples of 4) and BLOCK_SPARSE. Params
// and visible() come from shared/attention.wgsl, the softmax helpers from
// shared/softmax.wgsl, BlockMask and its walk from shared/block_mask.wgsl.

// Keep in sync with `PassRange` in src/attention/backward.rs (a test compares the layouts).
struct PassRange {
    // dq: keys [begin, end), begin a multiple of BLOCK_K. dkdv: the (query head of the
    // group, query block) pairs [begin, end), numbered head-major.
    begin: u32,
    end: u32,
    flags: u32, // FIRST_PASS | LAST_PASS
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<uniform> range: PassRange;
@group(0) @binding(2) var<storage, read> q: array<Elem>;
@group(0) @binding(3) var<storage, read> k: array<Elem>;
@group(0) @binding(4) var<storage, read> v: array<Elem>;
@group(0) @binding(5) var<storage, read> out: array<Elem>;
@group(0) @binding(6) var<storage, read> d_out: array<Elem>;
@group(0) @binding(7) var<storage, read> lse: array<f32>;
@group(0) @binding(8) var<storage, read_write> dq: array<Elem>;
@group(0) @binding(9) var<storage, read_write> dk: array<Elem>;
@group(0) @binding(10) var<storage, read_write> dv: array<Elem>;
// Per query row: the LSE in base 2, then D. From accumulators_at() on, only between passes:
// DQK_PAD floats per query row (dq_pass), or DQK_PAD + DV_PAD per key row (dkdv_pass).
@group(0) @binding(11) var<storage, read_write> state: array<f32>;
@group(0) @binding(12) var<storage, read> block_mask: BlockMask;

const QK4: u32 = DQK_PAD / 4u;
const DV4: u32 = DV_PAD / 4u;
const MASK_WORDS: u32 = (BLOCK_Q * BLOCK_K + 31u) / 32u;
// Threads per workgroup of preprocess, one row each.
const ROW_WG: u32 = 64u;

// Where the carried accumulators start in `state`: after two statistics per query row.
fn accumulators_at() -> u32 {
    return 2u * params.batch * params.q_heads * params.n_q;
}

// Vec4 column c (elements [4c, 4c + 4)) of the row of a tensor that starts at element
// `row_start`, zeros past a head dim of `dim`. Callers read only the columns below
// ceil(dim / 4). One function per tensor because WGSL passes no storage pointers without an
// extension not every browser has.
fn q4(row_start: u32, c: u32, dim: u32) -> vec4<f32> {
    let a = row_start + 4u * c;
    return inside(vec4(f32(q[a]), f32(q[a + 1u]), f32(q[a + 2u]), f32(q[a + 3u])), c, dim);
}

fn k4(row_start: u32, c: u32, dim: u32) -> vec4<f32> {
    let a = row_start + 4u * c;
    return inside(vec4(f32(k[a]), f32(k[a + 1u]), f32(k[a + 2u]), f32(k[a + 3u])), c, dim);
}

fn v4(row_start: u32, c: u32, dim: u32) -> vec4<f32> {
    let a = row_start + 4u * c;
    return inside(vec4(f32(v[a]), f32(v[a + 1u]), f32(v[a + 2u]), f32(v[a + 3u])), c, dim);
}

fn out4(row_start: u32, c: u32, dim: u32) -> vec4<f32> {
    let a = row_start + 4u * c;
    return inside(vec4(f32(out[a]), f32(out[a + 1u]), f32(out[a + 2u]), f32(out[a + 3u])), c, dim);
}

fn d_out4(row_start: u32, c: u32, dim: u32) -> vec4<f32> {
    let a = row_start + 4u * c;
    return inside(vec4(f32(d_out[a]), f32(d_out[a + 1u]), f32(d_out[a + 2u]), f32(d_out[a + 3u])), c, dim);
}

// x with zeros in the elements of vec4 column c past a head dim of `dim`: they belong to
// the next row (or lie past the buffer), and 0 * NaN is not 0. Aligned rows end on a whole
// column, which the callers never pass.
fn inside(x: vec4<f32>, c: u32, dim: u32) -> vec4<f32> {
    if ALIGNED {
        return x;
    }
    return select(vec4(0.0), x, vec4(4u * c) + vec4(0u, 1u, 2u, 3u) < vec4(dim));
}

// The vec4 columns a head dim of `dim` has.
fn columns(dim: u32) -> u32 {
    return (dim + 3u) / 4u;
}

// The weight P of a pair with raw product s = q.k against the row's base-2 LSE, and the
// factor d(score)/d(scale s) that turns P (dP - D) into dS: 1, or 1 - tanh^2 under a softcap.
fn weight(s: f32, lse2: f32) -> vec2<f32> {
    if params.softcap > 0.0 {
        let t = tanh(s * params.scale / params.softcap);
        return vec2(exp2(params.softcap * t * LOG2E - lse2), 1.0 - t * t);
    }
    return vec2(exp2(s * (params.scale * LOG2E) - lse2), 1.0);
}

// A 1-D grid of ROW_WG-thread workgroups, wrapped into y past the per-dimension limit.
fn grid_row(wg: vec3<u32>, groups: vec3<u32>, tid: u32) -> u32 {
    return (wg.y * groups.x + wg.x) * ROW_WG + tid;
}

@compute @workgroup_size(ROW_WG)
fn preprocess(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let row = grid_row(wg, groups, tid);
    if row >= params.batch * params.q_heads * params.n_q {
        return;
    }
    var d = 0.0;
    for (var c = 0u; c < columns(params.d_v); c++) {
        d += dot(out4(row * params.d_v, c, params.d_v), d_out4(row * params.d_v, c, params.d_v));
    }
    state[2u * row] = lse[row] * LOG2E;
    state[2u * row + 1u] = d;
}

@compute @workgroup_size(KEYS_WG)
fn dkdv_pass(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let key0 = wg.x * KEYS_WG;
    let kv_head = wg.y;
    let batch = wg.z;
    let key = key0 + tid;
    let valid = key < params.n_k;
    let group = params.q_heads / params.kv_heads;
    let key_row = (batch * params.kv_heads + kv_head) * params.n_k + min(key, params.n_k - 1u);
    let offset = i32(params.n_k) - i32(params.n_q);
    let qk_columns = columns(params.d_qk);
    let v_columns = columns(params.d_v);

    var kr = array<vec4<f32>, QK4>();
    var vr = array<vec4<f32>, DV4>();
    var dk_acc = array<vec4<f32>, QK4>();
    var dv_acc = array<vec4<f32>, DV4>();
    let at = accumulators_at() + key_row * (DQK_PAD + DV_PAD);
    for (var c = 0u; c < QK4; c++) {
        if c < qk_columns && valid {
            kr[c] = k4(key_row * params.d_qk, c, params.d_qk);
            if (range.flags & FIRST_PASS) == 0u {
                let s = at + 4u * c;
                dk_acc[c] = vec4(state[s], state[s + 1u], state[s + 2u], state[s + 3u]);
            }
        }
    }
    for (var c = 0u; c < DV4; c++) {
        if c < v_columns && valid {
            vr[c] = v4(key_row * params.d_v, c, params.d_v);
            if (range.flags & FIRST_PASS) == 0u {
                let s = at + DQK_PAD + 4u * c;
                dv_acc[c] = vec4(state[s], state[s + 1u], state[s + 2u], state[s + 3u]);
            }
        }
    }

    // The queries that may see a key of [key0, key_last]: query i sees key j only if
    // i + offset - left <= j (unless j is a sink) and j <= i + offset + right.
    let key_last = min(key0 + KEYS_WG, params.n_k) - 1u;
    let n_q = i32(params.n_q);
    var q_lo = 0;
    if params.window_right >= 0 {
        q_lo = clamp(i32(key0) - params.window_right - offset, 0, n_q);
    }
    var q_hi = n_q;
    if params.window_left >= 0 && key0 >= params.sinks {
        q_hi = clamp(i32(key_last) + params.window_left - offset + 1, q_lo, n_q);
    }
    let q_blocks = (params.n_q + BLOCK_Q - 1u) / BLOCK_Q;
    let block_lo = u32(q_lo) / BLOCK_Q;
    let block_hi = (u32(q_hi) + BLOCK_Q - 1u) / BLOCK_Q;
    let my_tile = min(key, key_last) / BLOCK_K;

    var t = range.begin;
    loop {
        if t >= range.end {
            break;
        }
        let h = t / q_blocks;
        let block = t % q_blocks;
        if block < block_lo {
            t = h * q_blocks + block_lo;
            continue;
        }
        if block >= block_hi {
            t = (h + 1u) * q_blocks;
            continue;
        }
        let head = kv_head * group + h;

        // Block-sparse: skip, without loading it, a query block that lists none of this
        // workgroup's tiles; else find how this thread's tile is listed.
        var listed = true;
        var bits = FULL_RUN;
        if BLOCK_SPARSE {
            let row = mask_row(batch, head, block);
            let runs_end = block_mask.words[row + 1u];
            let run = first_run_after(block_mask.words[row], runs_end, key0 / BLOCK_K);
            if run == runs_end || run_field(run, 0u) > key_last / BLOCK_K {
                t += 1u;
                continue;
            }
            let mine = first_run_after(run, runs_end, my_tile);
            listed = mine < runs_end && run_field(mine, 0u) <= my_tile;
            if listed && run_field(mine, 2u) != FULL_RUN {
                bits = run_field(mine, 2u) + my_tile - run_field(mine, 0u);
            }
        }

        let bh = batch * params.q_heads + head;
        for (var r = 0u; r < BLOCK_Q; r++) {
            let i = block * BLOCK_Q + r;
            if i >= params.n_q {
                break;
            }
            let row = bh * params.n_q + i;
            let q_start = row * params.d_qk;
            let o_start = row * params.d_v;
            let lse2 = state[2u * row];
            var sees = valid && listed && !is_neg_inf(lse2) && visible(i32(i) + offset, i32(key));
            if BLOCK_SPARSE && bits != FULL_RUN {
                sees = sees && mask_bit(bits, r, key % BLOCK_K);
            }
            var s = 0.0;
            for (var c = 0u; c < qk_columns; c++) {
                s += dot(q4(q_start, c, params.d_qk), kr[c]);
            }
            let w = weight(s, lse2);
            let p = select(0.0, w.x, sees);
            if !is_zero(p) {
                var dp = 0.0;
                for (var c = 0u; c < v_columns; c++) {
                    let g = d_out4(o_start, c, params.d_v);
                    dp += dot(g, vr[c]);
                    dv_acc[c] += p * g;
                }
                let ds = p * (dp - state[2u * row + 1u]) * w.y;
                for (var c = 0u; c < qk_columns; c++) {
                    dk_acc[c] += ds * q4(q_start, c, params.d_qk);
                }
            }
        }
        t += 1u;
    }

    if !valid {
        return;
    }
    let last = (range.flags & LAST_PASS) != 0u;
    for (var c = 0u; c < QK4; c++) {
        for (var e = 0u; e < 4u; e++) {
            let column = 4u * c + e;
            if !last {
                state[at + column] = dk_acc[c][e];
            } else if column < params.d_qk {
                dk[key_row * params.d_qk + column] = Elem(dk_acc[c][e] * params.scale);
            }
        }
    }
    for (var c = 0u; c < DV4; c++) {
        for (var e = 0u; e < 4u; e++) {
            let column = 4u * c + e;
            if !last {
                state[at + DQK_PAD + column] = dv_acc[c][e];
            } else if column < params.d_v {
                dv[key_row * params.d_v + column] = Elem(dv_acc[c][e]);
            }
        }
    }
}

@compute @workgroup_size(BLOCK_Q)
fn dq_pass(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let row0 = wg.x * BLOCK_Q;
    let head = wg.y;
    let batch = wg.z;
    let i = row0 + tid;
    let valid = i < params.n_q;
    let kv_head = kv_head_of(head, params.q_heads, params.kv_heads);
    let row = (batch * params.q_heads + head) * params.n_q + min(i, params.n_q - 1u);
    let k_base = (batch * params.kv_heads + kv_head) * params.n_k;
    let offset = i32(params.n_k) - i32(params.n_q);
    let qk_columns = columns(params.d_qk);
    let v_columns = columns(params.d_v);
    let lse2 = state[2u * row];
    let d = state[2u * row + 1u];
    let sees_any = valid && !is_neg_inf(lse2);
    let diag = i32(i) + offset;

    var qr = array<vec4<f32>, QK4>();
    var gr = array<vec4<f32>, DV4>();
    var dq_acc = array<vec4<f32>, QK4>();
    let at = accumulators_at() + row * DQK_PAD;
    for (var c = 0u; c < QK4; c++) {
        if c < qk_columns && valid {
            qr[c] = q4(row * params.d_qk, c, params.d_qk);
            if (range.flags & FIRST_PASS) == 0u {
                dq_acc[c] = vec4(state[at + 4u * c], state[at + 4u * c + 1u], state[at + 4u * c + 2u],
                    state[at + 4u * c + 3u]);
            }
        }
    }
    for (var c = 0u; c < DV4; c++) {
        if c < v_columns && valid {
            gr[c] = d_out4(row * params.d_v, c, params.d_v);
        }
    }

    // The tiles this block sees in this pass (shared/block_mask.wgsl).
    let last_row = min(row0 + BLOCK_Q, params.n_q) - 1u;
    var walk = tile_walk(range.begin / BLOCK_K, range.end, row0, last_row, batch, head, wg.x);
    while next_tile(&walk) {
        let t = walk.t;
        let key_hi = walk.keys_end;
        let bits = tile_bits(walk);
        for (var j = 0u; j < BLOCK_K; j++) {
            let key = t * BLOCK_K + j;
            if i32(key) >= key_hi {
                break;
            }
            let k_start = (k_base + key) * params.d_qk;
            let v_start = (k_base + key) * params.d_v;
            var sees = sees_any && visible(diag, i32(key));
            if BLOCK_SPARSE && bits != FULL_RUN {
                sees = sees && mask_bit(bits, tid, j);
            }
            var s = 0.0;
            for (var c = 0u; c < qk_columns; c++) {
                s += dot(qr[c], k4(k_start, c, params.d_qk));
            }
            let w = weight(s, lse2);
            let p = select(0.0, w.x, sees);
            if !is_zero(p) {
                var dp = 0.0;
                for (var c = 0u; c < v_columns; c++) {
                    dp += dot(gr[c], v4(v_start, c, params.d_v));
                }
                let ds = p * (dp - d) * w.y;
                for (var c = 0u; c < qk_columns; c++) {
                    dq_acc[c] += ds * k4(k_start, c, params.d_qk);
                }
            }
        }
        walk.t += 1u;
    }

    if !valid {
        return;
    }
    for (var c = 0u; c < QK4; c++) {
        for (var e = 0u; e < 4u; e++) {
            let column = 4u * c + e;
            if (range.flags & LAST_PASS) == 0u {
                state[at + column] = dq_acc[c][e];
            } else if column < params.d_qk {
                dq[row * params.d_qk + column] = Elem(dq_acc[c][e] * params.scale);
            }
        }
    }
}
