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
// D_CHUNK (head-dim columns staged at a time, divides D_PAD).

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
// Odd row stride: threads read different slots at the same column.
const KV_STRIDE: u32 = D_CHUNK + 1u;
const SCORES_PER_THREAD: u32 = (BLOCK_R * BLOCK_K + WORKGROUP - 1u) / WORKGROUP;
const OUTS_PER_CHUNK: u32 = (BLOCK_R * D_CHUNK + WORKGROUP - 1u) / WORKGROUP;
const CHUNKS: u32 = D_PAD / D_CHUNK;
// Masked scores. Finite, so that exp(MASKED - MASKED) is defined; no real logit gets near.
const MASKED: f32 = -3.0e38;
const EMPTY: u32 = 0xffffffffu;

var<workgroup> q_tile: array<f32, BLOCK_R * D_PAD>;
var<workgroup> kv_tile: array<f32, BLOCK_K * KV_STRIDE>;
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

fn query_position(i: u32) -> u32 {
    return params.seen - params.n_q + i;
}

// Index of row r's query (or output) row in [B, Hq, n_q].
fn query_row(b: u32, kv_head: u32, r: u32) -> u32 {
    let group = params.q_heads / params.kv_heads;
    let head = kv_head * group + r / params.n_q;
    return (b * params.q_heads + head) * params.n_q + r % params.n_q;
}

// Columns [d0, d0 + D_CHUNK) of slots [key0, key0 + BLOCK_K) of K (rotated) or V; zeros past hi.
fn stage_kv(from_v: bool, slot_base: u32, key0: u32, hi: u32, d0: u32, tid: u32) {
    let dim = params.head_dim;
    for (var e = tid; e < BLOCK_K * D_CHUNK; e += WORKGROUP) {
        let j = e / D_CHUNK;
        let c = d0 + e % D_CHUNK;
        var x = 0.0;
        if key0 + j < hi && c < dim {
            let row = (slot_base + key0 + j) * dim;
            if from_v {
                x = f32(v[row + c]);
            } else {
                x = f32(k[row + c]);
                if params.rope != ROPE_NONE {
                    x = rotate(x, f32(k[row + rope_partner(c)]), c, rope_position(key_pos[j]));
                }
            }
        }
        kv_tile[j * KV_STRIDE + e % D_CHUNK] = x;
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

    for (var e = tid; e < BLOCK_R * D_PAD; e += WORKGROUP) {
        let r = row0 + e / D_PAD;
        let c = e % D_PAD;
        var x = 0.0;
        if r < rows && c < dim {
            let qrow = query_row(b, kv_head, r) * dim;
            x = f32(q[qrow + c]);
            if params.rope != ROPE_NONE {
                let rope_pos = rope_position(query_position(r % params.n_q));
                x = rotate(x, f32(q[qrow + rope_partner(c)]), c, rope_pos);
            }
        }
        q_tile[e] = x;
    }

    // Thread r < BLOCK_R keeps row r's running max and sum.
    var m = MASKED;
    var l = 0.0;
    // Thread tid owns outputs e = tid + i * WORKGROUP (row e / D_CHUNK, column e % D_CHUNK) of each chunk.
    var o: array<f32, CHUNKS * OUTS_PER_CHUNK>;

    for (var key0 = lo; key0 < hi; key0 += BLOCK_K) {
        if tid < BLOCK_K {
            key_pos[tid] = select(EMPTY, pos[slot_base + key0 + tid], key0 + tid < hi);
        }
        workgroupBarrier();

        // S = Q K^T for this tile, D_CHUNK columns at a time.
        var s: array<f32, SCORES_PER_THREAD>;
        for (var d0 = 0u; d0 < D_PAD; d0 += D_CHUNK) {
            stage_kv(false, slot_base, key0, hi, d0, tid);
            workgroupBarrier();
            for (var i = 0u; i < SCORES_PER_THREAD; i++) {
                let e = tid + i * WORKGROUP;
                if e < BLOCK_R * BLOCK_K {
                    let q_row = (e / BLOCK_K) * D_PAD + d0;
                    let k_row = (e % BLOCK_K) * KV_STRIDE;
                    var acc = 0.0;
                    for (var c = 0u; c < D_CHUNK; c++) {
                        acc += q_tile[q_row + c] * kv_tile[k_row + c];
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
                score_tile[e] = x;
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
            row_scale[tid] = exp(m - m_new);
            row_max[tid] = m_new;
            m = m_new;
        }
        workgroupBarrier();
        for (var i = 0u; i < SCORES_PER_THREAD; i++) {
            let e = tid + i * WORKGROUP;
            if e < BLOCK_R * BLOCK_K {
                let x = score_tile[e];
                score_tile[e] = select(0.0, exp(x - row_max[e / BLOCK_K]), x > MASKED);
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
            if e < BLOCK_R * D_CHUNK {
                o[i] *= row_scale[e / D_CHUNK];
            }
        }

        // O += P V, D_CHUNK columns at a time.
        for (var d0 = 0u; d0 < D_PAD; d0 += D_CHUNK) {
            stage_kv(true, slot_base, key0, hi, d0, tid);
            workgroupBarrier();
            for (var i = 0u; i < OUTS_PER_CHUNK; i++) {
                let e = tid + i * WORKGROUP;
                if e < BLOCK_R * D_CHUNK {
                    let p_row = (e / D_CHUNK) * BLOCK_K;
                    let c = e % D_CHUNK;
                    var acc = 0.0;
                    for (var j = 0u; j < BLOCK_K; j++) {
                        acc += score_tile[p_row + j] * kv_tile[j * KV_STRIDE + c];
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
        let r = row0 + e / D_CHUNK;
        let c = (i / OUTS_PER_CHUNK) * D_CHUNK + e % D_CHUNK;
        if e < BLOCK_R * D_CHUNK && r < rows && c < dim {
            let sum = row_scale[e / D_CHUNK];
            let out_row = split * row_stride + query_row(b, kv_head, r);
            partial_out[out_row * dim + c] = select(o[i] / sum, 0.0, sum == 0.0);
        }
    }
    if tid < BLOCK_R && row0 + tid < rows {
        let lse = select(m + log(l), bitcast<f32>(0xff800000u), l == 0.0);
        partial_lse[split * row_stride + query_row(b, kv_head, row0 + tid)] = lse;
    }
}
