// Split-KV decode (flash-decoding) of a few queries against a KV cache.
//
// One workgroup per (split, row block, batch * KV head). The rows are the (query head of
// the group, query) pairs of one KV head, row r = g * n_q + i, so a K/V tile is loaded
// once for the whole group. The workgroup scans the cache slots
// [split * keys_per_split, ...) below `len` in tiles of BLOCK_K with an online softmax
// and writes its normalised partial output and log-sum-exp; combine.wgsl merges the splits.
//
// A key is visible to query i iff its position (the absolute stream position stored with
// its slot) is <= the query's, seen - n_q + i. With RoPE re-indexing, keys and queries are
// stored unrotated and rotated here at their index within the cache (see rope_position).
//
// Constants come from the prelude made by src/shader.rs: Elem (f32 or f16), WORKGROUP,
// BLOCK_R (rows per workgroup), BLOCK_K (slots per tile), D_PAD (head dim rounded up) and
// D_CHUNK (head-dim columns staged at a time, divides D_PAD). MASKED and the softmax steps
// come from shared/softmax.wgsl.

// Keep in sync with `DecodeParams` in src/kv/decode.rs.
struct Params {
    batch: u32,
    q_heads: u32,
    kv_heads: u32,
    n_q: u32,
    head_dim: u32,
    capacity: u32,
    len: u32, // slots [0, len) hold tokens
    seen: u32, // tokens appended so far
    keys_per_split: u32,
    rope: u32, // ROPE_*
    // Re-indexing: a position p below rope_sinks is rotated at p, any other at p - rope_shift.
    rope_sinks: u32,
    rope_shift: u32,
    write_logits: u32, // nonzero: store each row's logits per slot (heavy-hitter scores)
    scale: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<Elem>; // [B, Hq, n_q, D]
@group(0) @binding(2) var<storage, read> k: array<Elem>; // [B, Hkv, capacity, D]
@group(0) @binding(3) var<storage, read> v: array<Elem>; // [B, Hkv, capacity, D]
@group(0) @binding(4) var<storage, read> pos: array<u32>; // [B, Hkv, capacity]
@group(0) @binding(5) var<storage, read> rope_table: array<vec2<f32>>; // [capacity, D / 2] (cos, sin)
@group(0) @binding(6) var<storage, read_write> partial_out: array<f32>; // [splits, B, Hq, n_q, D]
@group(0) @binding(7) var<storage, read_write> partial_lse: array<f32>; // [splits, B, Hq, n_q]
@group(0) @binding(8) var<storage, read_write> logits: array<f32>; // [B, Hkv, group * n_q, capacity]

const ROPE_NONE: u32 = 0u;
const ROPE_NEOX: u32 = 1u;
// Tiles hold vec4s (four head-dim columns): every workgroup-memory read feeds four FMAs.
const CHUNK4: u32 = D_CHUNK / 4u;
const D4: u32 = D_PAD / 4u;
// Odd row stride: threads read different slots at the same column.
const KV_STRIDE: u32 = CHUNK4 + 1u;
const SCORES_PER_THREAD: u32 = (BLOCK_R * BLOCK_K + WORKGROUP - 1u) / WORKGROUP;
const OUTS_PER_CHUNK: u32 = (BLOCK_R * CHUNK4 + WORKGROUP - 1u) / WORKGROUP;
const CHUNKS: u32 = D_PAD / D_CHUNK;
const EMPTY: u32 = 0xffffffffu;

var<workgroup> q_tile: array<vec4<f32>, BLOCK_R * D4>;
var<workgroup> kv_tile: array<vec4<f32>, BLOCK_K * KV_STRIDE>;
var<workgroup> key_pos: array<u32, BLOCK_K>;
// Scores of the tile, turned into probabilities in place.
var<workgroup> score_tile: array<f32, BLOCK_R * BLOCK_K>;
var<workgroup> row_max: array<f32, BLOCK_R>;
// The factor rescaling a row's output this tile; at the end, the row's sum.
var<workgroup> row_scale: array<f32, BLOCK_R>;

// Where StreamingLLM's re-indexing puts the token at stream position p: its index in the cache.
fn rope_position(p: u32) -> u32 {
    return select(p - params.rope_shift, p, p < params.rope_sinks);
}

// RoPE rotates pairs: NeoX pairs column c with c ± D/2, GPT-J (interleaved) 2i with 2i + 1.
fn rope_partner(c: u32) -> u32 {
    if params.rope == ROPE_NEOX {
        let half = params.head_dim / 2u;
        return select(c - half, c + half, c < half);
    }
    return c ^ 1u;
}

// Column c of a vector rotated to `rope_pos`, given x = column c and partner = its pair.
fn rotate(x: f32, partner: f32, c: u32, rope_pos: u32) -> f32 {
    let half = params.head_dim / 2u;
    var first = (c & 1u) == 0u;
    var freq = c / 2u;
    if params.rope == ROPE_NEOX {
        first = c < half;
        freq = select(c - half, c, first);
    }
    let cs = rope_table[rope_pos * half + freq];
    return select(x * cs.x + partner * cs.y, x * cs.x - partner * cs.y, first);
}

// Element `i` of Q (which = 0), K (1) or V (2).
fn load(which: u32, i: u32) -> f32 {
    switch which {
        case 0u: { return f32(q[i]); }
        case 1u: { return f32(k[i]); }
        default: { return f32(v[i]); }
    }
}

// Columns [c, c + 4) of the vector at `row` (an element index) of Q, K or V, rotated to
// `rope_pos` unless it is V or RoPE is off; zeros past the head dim.
fn load4(which: u32, row: u32, c: u32, rope_pos: u32) -> vec4<f32> {
    var x = vec4(0.0);
    for (var e = 0u; e < 4u; e++) {
        let col = c + e;
        if col < params.head_dim {
            x[e] = load(which, row + col);
            if which != 2u && params.rope != ROPE_NONE {
                x[e] = rotate(x[e], load(which, row + rope_partner(col)), col, rope_pos);
            }
        }
    }
    return x;
}

fn query_position(i: u32) -> u32 {
    return params.seen - params.n_q + i;
}

// Index of row r's query (or output) row in [B, Hq, n_q].
fn query_row(b: u32, kv_head: u32, r: u32) -> u32 {
    let group = params.q_heads / params.kv_heads;
    let head = kv_head * group + r / params.n_q;
    return (b * params.q_heads + head) * params.n_q + r % params.n_q;
}

// Columns [d0, d0 + D_CHUNK) of slots [key0, key0 + BLOCK_K) of K (1, rotated) or V (2); zeros past hi.
fn stage_kv(which: u32, slot_base: u32, key0: u32, hi: u32, d0: u32, tid: u32) {
    for (var e = tid; e < BLOCK_K * CHUNK4; e += WORKGROUP) {
        let j = e / CHUNK4;
        let c4 = e % CHUNK4;
        var x = vec4(0.0);
        if key0 + j < hi {
            x = load4(which, (slot_base + key0 + j) * params.head_dim, d0 + 4u * c4, rope_position(key_pos[j]));
        }
        kv_tile[j * KV_STRIDE + c4] = x;
    }
}

@compute @workgroup_size(WORKGROUP)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let split = wg.x;
    let row0 = wg.y * BLOCK_R;
    let bh = wg.z; // b * kv_heads + kv_head
    let b = bh / params.kv_heads;
    let kv_head = bh % params.kv_heads;
    let rows = (params.q_heads / params.kv_heads) * params.n_q;
    let dim = params.head_dim;
    let slot_base = bh * params.capacity;
    let lo = split * params.keys_per_split;
    let hi = min(lo + params.keys_per_split, params.len);

    for (var e = tid; e < BLOCK_R * D4; e += WORKGROUP) {
        let r = row0 + e / D4;
        var x = vec4(0.0);
        if r < rows {
            let rope_pos = rope_position(query_position(r % params.n_q));
            x = load4(0u, query_row(b, kv_head, r) * dim, 4u * (e % D4), rope_pos);
        }
        q_tile[e] = x;
    }

    // Thread r < BLOCK_R keeps row r's running max and sum.
    var m = MASKED;
    var l = 0.0;
    // Thread tid owns the vec4 outputs e = tid + i * WORKGROUP (row e / CHUNK4, column
    // 4 * (e % CHUNK4)) of each chunk.
    var o = array<vec4<f32>, CHUNKS * OUTS_PER_CHUNK>();

    for (var key0 = lo; key0 < hi; key0 += BLOCK_K) {
        if tid < BLOCK_K {
            key_pos[tid] = select(EMPTY, pos[slot_base + key0 + tid], key0 + tid < hi);
        }
        workgroupBarrier();

        // S = Q K^T for this tile, D_CHUNK columns at a time.
        var s = array<f32, SCORES_PER_THREAD>();
        for (var d0 = 0u; d0 < D_PAD; d0 += D_CHUNK) {
            stage_kv(1u, slot_base, key0, hi, d0, tid);
            workgroupBarrier();
            for (var i = 0u; i < SCORES_PER_THREAD; i++) {
                let e = tid + i * WORKGROUP;
                if e < BLOCK_R * BLOCK_K {
                    let q_row = (e / BLOCK_K) * D4 + d0 / 4u;
                    let k_row = (e % BLOCK_K) * KV_STRIDE;
                    var acc = 0.0;
                    for (var c4 = 0u; c4 < CHUNK4; c4++) {
                        acc += dot(q_tile[q_row + c4], kv_tile[k_row + c4]);
                    }
                    s[i] += acc;
                }
            }
            workgroupBarrier();
        }

        // Scale and mask; keep the logits for heavy-hitter scores.
        for (var i = 0u; i < SCORES_PER_THREAD; i++) {
            let e = tid + i * WORKGROUP;
            if e < BLOCK_R * BLOCK_K {
                let r = row0 + e / BLOCK_K;
                let j = e % BLOCK_K;
                let seen_by_row = r < rows && key_pos[j] <= query_position(r % params.n_q);
                let x = select(MASKED, s[i] * params.scale, seen_by_row);
                // Base-2 units for the softmax steps; natural ones for the heavy-hitter scores.
                score_tile[e] = select(MASKED, x * LOG2E, seen_by_row);
                if params.write_logits != 0u && r < rows && key0 + j < hi {
                    logits[(bh * rows + r) * params.capacity + key0 + j] = x;
                }
            }
        }
        workgroupBarrier();

        // Online softmax: each row's new max and the factor rescaling what it has so far.
        if tid < BLOCK_R {
            var m_tile = MASKED;
            for (var j = 0u; j < BLOCK_K; j++) {
                m_tile = max(m_tile, score_tile[tid * BLOCK_K + j]);
            }
            let m_new = max(m, m_tile);
            row_scale[tid] = rescale_factor(m, m_new);
            row_max[tid] = m_new;
            m = m_new;
        }
        workgroupBarrier();
        for (var i = 0u; i < SCORES_PER_THREAD; i++) {
            let e = tid + i * WORKGROUP;
            if e < BLOCK_R * BLOCK_K {
                let x = score_tile[e];
                score_tile[e] = softmax_weight(x, row_max[e / BLOCK_K]);
            }
        }
        workgroupBarrier();
        if tid < BLOCK_R {
            var tile_sum = 0.0;
            for (var j = 0u; j < BLOCK_K; j++) {
                tile_sum += score_tile[tid * BLOCK_K + j];
            }
            l = l * row_scale[tid] + tile_sum;
        }
        for (var i = 0u; i < CHUNKS * OUTS_PER_CHUNK; i++) {
            let e = tid + (i % OUTS_PER_CHUNK) * WORKGROUP;
            if e < BLOCK_R * CHUNK4 {
                o[i] *= row_scale[e / CHUNK4];
            }
        }

        // O += P V, D_CHUNK columns at a time.
        for (var d0 = 0u; d0 < D_PAD; d0 += D_CHUNK) {
            stage_kv(2u, slot_base, key0, hi, d0, tid);
            workgroupBarrier();
            for (var i = 0u; i < OUTS_PER_CHUNK; i++) {
                let e = tid + i * WORKGROUP;
                if e < BLOCK_R * CHUNK4 {
                    let p_row = (e / CHUNK4) * BLOCK_K;
                    let c4 = e % CHUNK4;
                    var acc = vec4(0.0);
                    for (var j = 0u; j < BLOCK_K; j++) {
                        // Skipping p == 0 keeps a NaN in a masked slot's V out of the row
                        // (0 * NaN would be NaN); a NaN weight is not 0 and reaches it.
                        let p = score_tile[p_row + j];
                        if !is_zero(p) {
                            acc += p * kv_tile[j * KV_STRIDE + c4];
                        }
                    }
                    o[(d0 / D_CHUNK) * OUTS_PER_CHUNK + i] += acc;
                }
            }
            workgroupBarrier();
        }
    }

    // The partial of this split: normalised output and LSE; zeros and -inf for a row that saw no key.
    if tid < BLOCK_R {
        row_max[tid] = m;
        row_scale[tid] = l;
    }
    workgroupBarrier();
    let row_stride = params.batch * params.q_heads * params.n_q;
    for (var i = 0u; i < CHUNKS * OUTS_PER_CHUNK; i++) {
        let e = tid + (i % OUTS_PER_CHUNK) * WORKGROUP;
        let r = row0 + e / CHUNK4;
        if e < BLOCK_R * CHUNK4 && r < rows {
            let sum = row_scale[e / CHUNK4];
            let x = o[i] * inverse_sum(sum);
            let out_row = (split * row_stride + query_row(b, kv_head, r)) * dim;
            let c = (i / OUTS_PER_CHUNK) * D_CHUNK + 4u * (e % CHUNK4);
            for (var t = 0u; t < 4u; t++) {
                if c + t < dim {
                    partial_out[out_row + c + t] = x[t];
                }
            }
        }
    }
    if tid < BLOCK_R && row0 + tid < rows {
        let lse = finish_lse(m, l);
        partial_lse[split * row_stride + query_row(b, kv_head, row0 + tid)] = lse;
    }
}
