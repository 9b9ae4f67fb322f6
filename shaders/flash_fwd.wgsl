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
// Block-sparse variants (BLOCK_SPARSE) visit only the tiles a block mask lists for the
// workgroup's (batch, head, query block): runs of consecutive tiles in key order, each
// full (no element test) or partial (one mask bit per element). The mask's blocks are the
// tiles. Walking them in key order, as the dense variant does, makes equivalent masks give
// the same bits. The dense options (window, sinks) still apply on top.
//
// Constants come from the prelude made by src/shader.rs: Elem (f32 or f16), BLOCK_Q,
// BLOCK_K, THREADS_PER_ROW, D_CHUNK, DQK_PAD, DV_PAD (head dims rounded up to 16),
// Q_RESIDENT (whole Q rows stay in workgroup memory instead of one chunk) and BLOCK_SPARSE.
// Params and visible() come from shared/attention.wgsl, MASKED and the softmax steps from
// shared/softmax.wgsl.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<Elem>;
@group(0) @binding(2) var<storage, read> k: array<Elem>;
@group(0) @binding(3) var<storage, read> v: array<Elem>;
@group(0) @binding(4) var<storage, read_write> out: array<Elem>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;
// Per row: m, l, then DV_PAD columns of o.
@group(0) @binding(6) var<storage, read_write> state: array<f32>;

// Keep in sync with `BlockMaskHeader` in src/mask/gpu.rs. `words` holds each mask row's
// first run (one per row, rows = batch * heads * q_blocks, plus the end) from 0, the runs
// from runs_at (3 words: first tile, end tile, FULL_RUN or the index of the first tile's
// element mask), and the partial tiles' element masks from bits_at, MASK_WORDS each with
// bit r * BLOCK_K + j for query r and key j of the tile. Unused by dense variants.
struct BlockMask {
    batch: u32, // 1 = one mask for every batch
    heads: u32, // 1 = one mask for every head
    q_blocks: u32,
    runs_at: u32,
    bits_at: u32,
    words: array<u32>,
}
@group(0) @binding(7) var<storage, read> block_mask: BlockMask;

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
const FULL_RUN: u32 = 0xffffffffu;
const MASK_WORDS: u32 = (BLOCK_Q * BLOCK_K + 31u) / 32u;

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

// Field `field` (0 first tile, 1 end tile, 2 element mask) of block-mask run `run`.
fn run_field(run: u32, field: u32) -> u32 {
    return block_mask.words[block_mask.runs_at + 3u * run + field];
}

// The first of the sorted, disjoint runs [lo, hi) that ends after tile `t` (hi if none):
// a binary search, so that a later key pass does not walk the runs before it.
fn first_run_after(lo: u32, hi: u32, t: u32) -> u32 {
    var a = lo;
    var b = hi;
    while a < b {
        let mid = (a + b) / 2u;
        if run_field(mid, 1u) <= t {
            a = mid + 1u;
        } else {
            b = mid;
        }
    }
    return a;
}

// Whether query `r`, key `j` of the partial tile whose element mask is number `tile_mask` is visible.
fn mask_bit(tile_mask: u32, r: u32, j: u32) -> bool {
    let bit = r * BLOCK_K + j;
    let word = block_mask.words[block_mask.bits_at + tile_mask * MASK_WORDS + bit / 32u];
    return ((word >> (bit % 32u)) & 1u) != 0u;
}

@compute @workgroup_size(WORKGROUP)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let row0 = wg.x * BLOCK_Q;
    let head = wg.y;
    let batch = wg.z;
    let kv_head = kv_head_of(head, params.q_heads, params.kv_heads);
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
    var o = array<vec4<f32>, O4_PER_THREAD>();
    if (params.pass_flags & FIRST_PASS) == 0u {
        m = state[state_base];
        l = state[state_base + 1u];
        for (var i = 0u; i < O4_PER_THREAD; i++) {
            let at = state_base + 2u + column(i, lane);
            o[i] = vec4(state[at], state[at + 1u], state[at + 2u], state[at + 3u]);
        }
    }

    var t = params.key_begin / BLOCK_K;
    // Block-sparse: the next run to fetch, the end of this row's runs, the current run.
    var run = 0u;
    var runs_end = 0u;
    var run_first = 0u;
    var run_end = 0u;
    var run_mask = FULL_RUN;
    if BLOCK_SPARSE {
        let mask_batch = select(batch, 0u, block_mask.batch == 1u);
        let mask_head = select(head, 0u, block_mask.heads == 1u);
        let mask_row = (mask_batch * block_mask.heads + mask_head) * block_mask.q_blocks + wg.x;
        runs_end = block_mask.words[mask_row + 1u];
        run = first_run_after(block_mask.words[mask_row], runs_end, t);
    }
    loop {
        if BLOCK_SPARSE {
            if t >= run_end {
                if run == runs_end {
                    break;
                }
                run_first = run_field(run, 0u);
                run_end = run_field(run, 1u);
                run_mask = run_field(run, 2u);
                t = max(t, run_first);
                run += 1u;
            }
        } else if t >= sink_tiles && t < window_first_tile {
            // Tiles between the sinks and the window are seen by no row: skip without loading.
            t = window_first_tile;
        }
        if t >= tiles_end {
            break;
        }
        let key0 = t * BLOCK_K;

        // S = Q K^T for this tile, D_CHUNK columns at a time.
        var s = array<f32, KEYS_PER_THREAD>();
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

        // Scale, cap, mask. A tile every row sees whole needs no per-element test; a partial
        // tile of a block mask also tests its element bits.
        let partial = BLOCK_SPARSE && run_mask != FULL_RUN;
        let tile_last = i32(key0 + BLOCK_K) - 1;
        let whole = !partial && tile_last < i32(params.n_k)
            && (params.window_right < 0 || tile_last <= diag_first + params.window_right)
            && (params.window_left < 0 || i32(key0) >= diag_last - params.window_left
                || tile_last < i32(params.sinks));
        for (var i = 0u; i < KEYS_PER_THREAD; i++) {
            let j = lane + i * THREADS_PER_ROW;
            var x = s[i] * params.scale;
            if params.softcap > 0.0 {
                x = params.softcap * tanh(x / params.softcap);
            }
            x *= LOG2E;
            if !whole && !(visible(diag, i32(key0 + j)) && (!partial || mask_bit(run_mask + t - run_first, r, j))) {
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
        let alpha = rescale_factor(m, m_new);
        for (var i = 0u; i < KEYS_PER_THREAD; i++) {
            let j = lane + i * THREADS_PER_ROW;
            let x = score_tile[r * BLOCK_K + j];
            prob_tile[r * BLOCK_K + j] = softmax_weight(x, m_new);
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
                // Skipping p == 0 keeps a NaN in a masked key's V out of rows that cannot see
                // it (0 * NaN would be NaN); a NaN weight is not 0 and reaches o.
                if !is_zero(p) {
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
    // A row that saw no key gets zeros and LSE = -inf; one that saw a NaN, NaN.
    let inv_l = inverse_sum(l);
    for (var i = 0u; i < O4_PER_THREAD; i++) {
        let c = column(i, lane);
        for (var e = 0u; e < 4u; e++) {
            if c + e < params.d_v {
                out[o_base + c + e] = Elem(o[i][e] * inv_l);
            }
        }
    }
    if lane == 0u {
        lse[(batch * params.q_heads + head) * params.n_q + row] = finish_lse(m, l);
    }
}
