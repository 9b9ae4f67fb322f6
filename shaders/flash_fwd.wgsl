// Tiled flash-attention forward with online softmax (FlashAttention-2's loop order).
//
// One workgroup owns BLOCK_Q query rows of one (batch, head); each row is shared by
// THREADS_PER_ROW threads. The workgroup walks the key/value tiles of BLOCK_K keys that
// some row of the block can see, staging them through workgroup memory D_CHUNK columns
// at a time so that head dims up to 256 fit in WebGPU's default 16 KiB.
//
// Tiles are held as vec4 (four head-dim columns): every workgroup-memory read feeds four
// FMAs. Thread (row, lane) scores keys lane, lane + THREADS_PER_ROW, ... of each tile and
// owns the vec4 output columns lane, lane + THREADS_PER_ROW, ... of each chunk; the row's
// running max and sum are kept (identically) by every thread of the row.
//
// Software adapters may cap the loop iterations one invocation runs (llvmpipe stops every
// loop after 65535 in total), so the host can split the keys into passes: each dispatch
// walks keys [key_begin, key_end) and carries the row's unnormalised (o, m, l) to the next
// through `state`. On GPUs there is one pass and `state` is never touched.
//
// Constants come from the prelude made by src/shader.rs: Elem (f32 or f16), BLOCK_Q,
// BLOCK_K, THREADS_PER_ROW, D_CHUNK, DQK_PAD, DV_PAD (head dims rounded up to 16) and
// Q_RESIDENT (whole Q rows stay in workgroup memory instead of one chunk).

// Keep in sync with `FlashParams` in src/attention/flash.rs.
struct Params {
    batch: u32,
    q_heads: u32,
    kv_heads: u32,
    n_q: u32,
    n_k: u32,
    d_qk: u32,
    d_v: u32,
    sinks: u32,
    // Visible keys of query i are diag - left ..= diag + right with diag = i + n_k - n_q
    // (bottom-right alignment); -1 means unbounded. Causal is right = 0.
    window_left: i32,
    window_right: i32,
    scale: f32,
    softcap: f32, // 0 = none
    key_begin: u32, // a multiple of BLOCK_K
    key_end: u32,
    pass_flags: u32, // FIRST_PASS | LAST_PASS
    _pad: u32,
}

const FIRST_PASS: u32 = 1u;
const LAST_PASS: u32 = 2u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<Elem>;
@group(0) @binding(2) var<storage, read> k: array<Elem>;
@group(0) @binding(3) var<storage, read> v: array<Elem>;
@group(0) @binding(4) var<storage, read_write> out: array<Elem>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;
// Per row: m, l, then DV_PAD columns of o.
@group(0) @binding(6) var<storage, read_write> state: array<f32>;

const WORKGROUP: u32 = BLOCK_Q * THREADS_PER_ROW;
const KEYS_PER_THREAD: u32 = BLOCK_K / THREADS_PER_ROW;
const CHUNK4: u32 = D_CHUNK / 4u;
const QK4: u32 = DQK_PAD / 4u;
const DV4: u32 = DV_PAD / 4u;
// vec4 columns of o per thread: all chunks, and one chunk.
const O4_PER_THREAD: u32 = DV4 / THREADS_PER_ROW;
const CHUNK_O4_PER_THREAD: u32 = CHUNK4 / THREADS_PER_ROW;
// Odd row stride: the lanes of a row read different keys at the same column, and an
// even stride would put them all in one memory bank.
const KV_STRIDE: u32 = CHUNK4 + 1u;
const Q_STRIDE: u32 = select(CHUNK4, QK4, Q_RESIDENT);
// Masked scores. Finite, so that exp(MASKED - MASKED) is defined; no real logit gets near.
const MASKED: f32 = -3.0e38;

var<workgroup> q_tile: array<vec4<f32>, BLOCK_Q * Q_STRIDE>;
var<workgroup> kv_tile: array<vec4<f32>, BLOCK_K * KV_STRIDE>;
var<workgroup> score_tile: array<f32, BLOCK_Q * BLOCK_K>;
var<workgroup> prob_tile: array<f32, BLOCK_Q * BLOCK_K>;

// Four consecutive elements of `row`'s columns [c, c + 4) of Q, K or V, zero past `dim`.
fn load4(which: u32, base: u32, dim: u32, c: u32) -> vec4<f32> {
    var x = vec4(0.0);
    for (var e = 0u; e < 4u; e++) {
        if c + e < dim {
            switch which {
                case 0u: { x[e] = f32(q[base + c + e]); }
                case 1u: { x[e] = f32(k[base + c + e]); }
                default: { x[e] = f32(v[base + c + e]); }
            }
        }
    }
    return x;
}

// Loads head-dim columns [d0, d0 + 4 Q_STRIDE) of rows [row0, row0 + BLOCK_Q) of Q; zeros outside.
fn stage_q(q_base: u32, row0: u32, d0: u32, tid: u32) {
    for (var e = tid; e < BLOCK_Q * Q_STRIDE; e += WORKGROUP) {
        let r = e / Q_STRIDE;
        var x = vec4(0.0);
        if row0 + r < params.n_q {
            x = load4(0u, q_base + (row0 + r) * params.d_qk, params.d_qk, d0 + 4u * (e % Q_STRIDE));
        }
        q_tile[e] = x;
    }
}

// Loads columns [d0, d0 + D_CHUNK) of keys [key0, key0 + BLOCK_K) of K (which = 1) or
// V (which = 2); zeros outside.
fn stage_kv(which: u32, base: u32, key0: u32, d0: u32, dim: u32, tid: u32) {
    for (var e = tid; e < BLOCK_K * CHUNK4; e += WORKGROUP) {
        let j = e / CHUNK4;
        var x = vec4(0.0);
        if key0 + j < params.n_k {
            x = load4(which, base + (key0 + j) * dim, dim, d0 + 4u * (e % CHUNK4));
        }
        kv_tile[j * KV_STRIDE + e % CHUNK4] = x;
    }
}

// The first output column of o[i] of thread `lane` of a row.
fn column(i: u32, lane: u32) -> u32 {
    return (i / CHUNK_O4_PER_THREAD) * D_CHUNK + 4u * (lane + (i % CHUNK_O4_PER_THREAD) * THREADS_PER_ROW);
}

fn visible(diag: i32, key: i32) -> bool {
    let left = params.window_left;
    let right = params.window_right;
    let below_right = right < 0 || key <= diag + right;
    let above_left = left < 0 || key >= diag - left || key < i32(params.sinks);
    return key < i32(params.n_k) && below_right && above_left;
}

@compute @workgroup_size(WORKGROUP)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let row0 = wg.x * BLOCK_Q;
    let head = wg.y;
    let batch = wg.z;
    let kv_head = head / (params.q_heads / params.kv_heads);
    let q_base = (batch * params.q_heads + head) * params.n_q * params.d_qk;
    let k_base = (batch * params.kv_heads + kv_head) * params.n_k * params.d_qk;
    let v_base = (batch * params.kv_heads + kv_head) * params.n_k * params.d_v;

    let r = tid / THREADS_PER_ROW;
    let lane = tid % THREADS_PER_ROW;
    let offset = i32(params.n_k) - i32(params.n_q);
    let diag = i32(row0 + r) + offset;

    // The keys any row of this block may see in this pass: [key_lo, key_hi), plus the sinks.
    let last_row = min(row0 + BLOCK_Q, params.n_q) - 1u;
    let diag_first = i32(row0) + offset;
    let diag_last = i32(last_row) + offset;
    var key_hi = i32(min(params.n_k, params.key_end));
    if params.window_right >= 0 {
        key_hi = clamp(diag_last + params.window_right + 1, 0, key_hi);
    }
    var key_lo = 0;
    if params.window_left >= 0 {
        key_lo = clamp(diag_first - params.window_left, 0, key_hi);
    }
    let sink_end = min(i32(params.sinks), key_hi);
    // Tile indices are absolute: this pass starts at tile key_begin / BLOCK_K.
    let tiles_end = u32(key_hi + i32(BLOCK_K) - 1) / BLOCK_K;
    let sink_tiles = u32(sink_end + i32(BLOCK_K) - 1) / BLOCK_K;
    let window_first_tile = u32(key_lo) / BLOCK_K;

    if Q_RESIDENT {
        stage_q(q_base, row0, 0u, tid);
    }

    let row = row0 + r;
    let state_base = ((batch * params.q_heads + head) * params.n_q + min(row, params.n_q - 1u)) * (DV_PAD + 2u);
    var m = MASKED;
    var l = 0.0;
    var o: array<vec4<f32>, O4_PER_THREAD>;
    if (params.pass_flags & FIRST_PASS) == 0u {
        m = state[state_base];
        l = state[state_base + 1u];
        for (var i = 0u; i < O4_PER_THREAD; i++) {
            let at = state_base + 2u + column(i, lane);
            o[i] = vec4(state[at], state[at + 1u], state[at + 2u], state[at + 3u]);
        }
    }

    var t = params.key_begin / BLOCK_K;
    loop {
        // Tiles between the sinks and the window are seen by no row: skip without loading.
        if t >= sink_tiles && t < window_first_tile {
            t = window_first_tile;
        }
        if t >= tiles_end {
            break;
        }
        let key0 = t * BLOCK_K;

        // S = Q K^T for this tile, D_CHUNK columns at a time.
        var s: array<f32, KEYS_PER_THREAD>;
        for (var d0 = 0u; d0 < DQK_PAD; d0 += D_CHUNK) {
            if !Q_RESIDENT {
                stage_q(q_base, row0, d0, tid);
            }
            stage_kv(1u, k_base, key0, d0, params.d_qk, tid);
            workgroupBarrier();
            let q_col0 = select(0u, d0 / 4u, Q_RESIDENT);
            let width = min(CHUNK4, QK4 - d0 / 4u);
            for (var c = 0u; c < width; c++) {
                let qc = q_tile[r * Q_STRIDE + q_col0 + c];
                for (var i = 0u; i < KEYS_PER_THREAD; i++) {
                    s[i] += dot(qc, kv_tile[(lane + i * THREADS_PER_ROW) * KV_STRIDE + c]);
                }
            }
            workgroupBarrier();
        }

        // Scale, cap, mask. A tile every row sees whole needs no per-element test.
        let tile_last = i32(key0 + BLOCK_K) - 1;
        let whole = tile_last < i32(params.n_k)
            && (params.window_right < 0 || tile_last <= diag_first + params.window_right)
            && (params.window_left < 0 || i32(key0) >= diag_last - params.window_left
                || tile_last < i32(params.sinks));
        for (var i = 0u; i < KEYS_PER_THREAD; i++) {
            let j = lane + i * THREADS_PER_ROW;
            var x = s[i] * params.scale;
            if params.softcap > 0.0 {
                x = params.softcap * tanh(x / params.softcap);
            }
            if !whole && !visible(diag, i32(key0 + j)) {
                x = MASKED;
            }
            score_tile[r * BLOCK_K + j] = x;
        }
        workgroupBarrier();

        // Online softmax: new running max, rescale factor, this tile's probabilities.
        var m_tile = MASKED;
        for (var j = 0u; j < BLOCK_K; j++) {
            m_tile = max(m_tile, score_tile[r * BLOCK_K + j]);
        }
        let m_new = max(m, m_tile);
        let alpha = exp(m - m_new);
        for (var i = 0u; i < KEYS_PER_THREAD; i++) {
            let j = lane + i * THREADS_PER_ROW;
            let x = score_tile[r * BLOCK_K + j];
            prob_tile[r * BLOCK_K + j] = select(0.0, exp(x - m_new), x > MASKED);
        }
        m = m_new;
        for (var i = 0u; i < O4_PER_THREAD; i++) {
            o[i] *= alpha;
        }
        l *= alpha;

        // O += P V, D_CHUNK columns at a time. The first barrier also publishes prob_tile.
        for (var d0 = 0u; d0 < DV_PAD; d0 += D_CHUNK) {
            stage_kv(2u, v_base, key0, d0, params.d_v, tid);
            workgroupBarrier();
            let o0 = d0 / 4u / THREADS_PER_ROW;
            let cols = min(CHUNK4, DV4 - d0 / 4u) / THREADS_PER_ROW;
            for (var j = 0u; j < BLOCK_K; j++) {
                let p = prob_tile[r * BLOCK_K + j];
                if d0 == 0u {
                    l += p;
                }
                // Skipping p == 0 keeps a NaN in a masked key's V out of rows that cannot see it.
                if p != 0.0 {
                    for (var i = 0u; i < cols; i++) {
                        o[o0 + i] += p * kv_tile[j * KV_STRIDE + lane + i * THREADS_PER_ROW];
                    }
                }
            }
            workgroupBarrier();
        }
        t += 1u;
    }

    if row >= params.n_q {
        return;
    }
    if (params.pass_flags & LAST_PASS) == 0u {
        if lane == 0u {
            state[state_base] = m;
            state[state_base + 1u] = l;
        }
        for (var i = 0u; i < O4_PER_THREAD; i++) {
            let at = state_base + 2u + column(i, lane);
            for (var e = 0u; e < 4u; e++) {
                state[at + e] = o[i][e];
            }
        }
        return;
    }
    let o_base = ((batch * params.q_heads + head) * params.n_q + row) * params.d_v;
    // A row that saw no key gets zeros and LSE = -inf. (l is NaN, not 0, if an input was.)
    let empty = l == 0.0;
    let inv_l = select(1.0 / l, 0.0, empty);
    for (var i = 0u; i < O4_PER_THREAD; i++) {
        let c = column(i, lane);
        for (var e = 0u; e < 4u; e++) {
            if c + e < params.d_v {
                out[o_base + c + e] = Elem(o[i][e] * inv_l);
            }
        }
    }
    if lane == 0u {
        lse[(batch * params.q_heads + head) * params.n_q + row] =
            select(m + log(l), bitcast<f32>(0xff800000u), empty);
    }
}
