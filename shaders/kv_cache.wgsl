// KV cache bookkeeping, all on the GPU:
//   place       picks the slot of each new token (None, StreamingLLM) and records its position
//   evict       the same for heavy hitters, evicting the lowest-scored token
//   append      copies the new tokens' K and V rows into their slots
//   accumulate  adds each cached token's attention probabilities to its heavy-hitter score
//   append_paged  copies new tokens' K and V rows into the pages of a paged pool (quantising
//                 them in int8 pools), at slots the host chose from the block tables
//
// Slots fill in order 0, 1, ... until the cache is full, so slots [0, len) always hold
// tokens. Then StreamingLLM keeps `sinks` slots and reuses the other `window` as a ring
// (token p goes to sinks + (p - sinks) % window); heavy hitters (H2O) reuse, per KV head,
// the slot with the lowest score outside the sinks and the `window` most recent tokens.
//
// Constants from src/shader.rs: Elem (f32 or f16), WORKGROUP (a power of two), INT8 (the
// paged pool's storage; KvWord and kv_pack from shared/kv_float.wgsl or kv_int8.wgsl).
// MASKED (the logit decode.wgsl writes for a slot a query does not see) comes from
// shared/softmax.wgsl.

// Keep in sync with `KvParams` in src/kv/cache.rs.
struct Params {
    batch: u32,
    kv_heads: u32,
    q_heads: u32,
    head_dim: u32,
    capacity: u32,
    seen: u32, // tokens appended before this call; token t of the call has position seen + t
    count: u32, // place, append: new tokens per sequence; accumulate: queries
    len: u32, // accumulate: slots holding tokens
    sinks: u32,
    window: u32, // StreamingLLM: the ring's size; heavy hitters: recent tokens never evicted
    groups_x: u32, // place, append, accumulate: workgroups along x; the grid wraps into y
    scales_at: u32, // append_paged, INT8: the word of pool_v where the scales begin
}
// append_paged reads count (new tokens in all), kv_heads, head_dim, capacity (tokens per
// page), groups_x and scales_at.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src_k: array<Elem>; // [B, Hkv, count, D]
@group(0) @binding(2) var<storage, read> src_v: array<Elem>; // [B, Hkv, count, D]
@group(0) @binding(3) var<storage, read_write> k: array<Elem>; // [B, Hkv, capacity, D]
@group(0) @binding(4) var<storage, read_write> v: array<Elem>; // [B, Hkv, capacity, D]
@group(0) @binding(5) var<storage, read_write> pos: array<u32>; // [B, Hkv, capacity]
@group(0) @binding(6) var<storage, read_write> score: array<f32>; // [B, Hkv, capacity]
@group(0) @binding(7) var<storage, read_write> dest: array<u32>; // [B, Hkv, count]
@group(0) @binding(8) var<storage, read> logits: array<f32>; // [B, Hkv, group * count, capacity]
@group(0) @binding(9) var<storage, read> lse: array<f32>; // [B, Hq, count]
// Paged pools, [pages, Hkv, page, words of D]; INT8: then, in pool_v from word scales_at,
// each slot's scales (K, V) as two f16.
@group(0) @binding(10) var<storage, read_write> pool_k: array<KvWord>;
@group(0) @binding(11) var<storage, read_write> pool_v: array<KvWord>;

const NONE: u32 = 0xffffffffu;

var<workgroup> best_score: array<f32, WORKGROUP>;
var<workgroup> best_pos: array<u32, WORKGROUP>;
var<workgroup> best_slot: array<u32, WORKGROUP>;

fn better(score_a: f32, pos_a: u32, score_b: f32, pos_b: u32) -> bool {
    // Lowest score first; on a tie the older token goes.
    return score_a < score_b || (score_a == score_b && pos_a < pos_b);
}

// The slot of sequence-head `base` to evict for the token at position p (heavy hitters).
// Every thread of the workgroup must call it; thread 0 gets the answer.
fn lowest_score_slot(base: u32, p: u32, tid: u32) -> u32 {
    var s_best = 0.0;
    var p_best = NONE;
    var slot_best = NONE;
    for (var slot = tid; slot < params.capacity; slot += WORKGROUP) {
        let ps = pos[base + slot];
        let evictable = ps >= params.sinks && ps + params.window <= p;
        let sc = score[base + slot];
        if evictable && (p_best == NONE || better(sc, ps, s_best, p_best)) {
            s_best = sc;
            p_best = ps;
            slot_best = slot;
        }
    }
    best_score[tid] = s_best;
    best_pos[tid] = p_best;
    best_slot[tid] = slot_best;
    workgroupBarrier();
    for (var stride = WORKGROUP / 2u; stride > 0u; stride /= 2u) {
        if tid < stride {
            let other = tid + stride;
            let mine_empty = best_pos[tid] == NONE;
            let other_wins = best_pos[other] != NONE
                && (mine_empty || better(best_score[other], best_pos[other], best_score[tid], best_pos[tid]));
            if other_wins {
                best_score[tid] = best_score[other];
                best_pos[tid] = best_pos[other];
                best_slot[tid] = best_slot[other];
            }
        }
        workgroupBarrier();
    }
    return best_slot[0];
}

// Policies None and StreamingLLM: one thread per new token (of every batch * KV head).
@compute @workgroup_size(WORKGROUP)
fn place(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let token = (wg.y * params.groups_x + wg.x) * WORKGROUP + tid; // (b * kv_heads + kv_head) * count + t
    if token >= params.batch * params.kv_heads * params.count {
        return;
    }
    let bh = token / params.count;
    let p = params.seen + token % params.count;
    // Policy None never gets past the capacity: the host refuses the append.
    var slot = p;
    if p >= params.capacity {
        slot = params.sinks + (p - params.sinks) % params.window;
    }
    dest[token] = slot;
    pos[bh * params.capacity + slot] = p;
}

// Heavy hitters: one workgroup per (batch, KV head), placing the new tokens one after another.
@compute @workgroup_size(WORKGROUP)
fn evict(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let bh = wg.x;
    let base = bh * params.capacity;
    for (var t = 0u; t < params.count; t++) {
        let p = params.seen + t;
        var slot = p;
        if p >= params.capacity {
            slot = lowest_score_slot(base, p, tid);
        }
        if tid == 0u {
            dest[bh * params.count + t] = slot;
            pos[base + slot] = p;
            score[base + slot] = 0.0;
        }
        // The next token's choice reads the positions and scores just written.
        storageBarrier();
        workgroupBarrier();
    }
}

// One thread per element of the new K/V rows.
@compute @workgroup_size(WORKGROUP)
fn append(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let idx = (wg.y * params.groups_x + wg.x) * WORKGROUP + tid;
    if idx >= params.batch * params.kv_heads * params.count * params.head_dim {
        return;
    }
    let c = idx % params.head_dim;
    let token = idx / params.head_dim; // (b * kv_heads + kv_head) * count + t
    let bh = token / params.count;
    let to = (bh * params.capacity + dest[token]) * params.head_dim + c;
    k[to] = src_k[idx];
    v[to] = src_v[idx];
}

// One thread per (batch, KV head, slot): adds the probability each query head of the
// group and each query gave the slot's token (logit - LSE of the row, exponentiated).
@compute @workgroup_size(WORKGROUP)
fn accumulate(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let idx = (wg.y * params.groups_x + wg.x) * WORKGROUP + tid;
    let slot = idx % params.capacity;
    let bh = idx / params.capacity;
    if bh >= params.batch * params.kv_heads || slot >= params.len {
        return;
    }
    let b = bh / params.kv_heads;
    let kv_head = bh % params.kv_heads;
    let group = params.q_heads / params.kv_heads;
    let rows = group * params.count;
    var sum = 0.0;
    for (var r = 0u; r < rows; r++) {
        let x = logits[(bh * rows + r) * params.capacity + slot];
        if !is_masked(x) {
            let head = kv_head * group + r / params.count;
            sum += exp(x - lse[(b * params.q_heads + head) * params.count + r % params.count]);
        }
    }
    score[idx] += sum;
}

// Word w of the new row at element `start` of src_k (k = true) or src_v; zeros past the head dim.
fn new_word(k: bool, start: u32, w: u32) -> vec4<f32> {
    var x = vec4(0.0);
    for (var i = 0u; i < 4u; i++) {
        let c = 4u * w + i;
        if c < params.head_dim {
            x[i] = select(f32(src_v[start + c]), f32(src_k[start + c]), k);
        }
    }
    return x;
}

// 1 / s, or 0 for a row of zeros (scale 0).
fn inverse_scale(s: f32) -> f32 {
    return select(1.0 / s, 0.0, s == 0.0);
}

// Paged pools: one thread per (new token, KV head) row of src_k/src_v [count, Hkv, D], the
// tokens of every sequence of the step one after another. dest[token] is the pool slot of
// the token's KV head 0; head h is h * capacity (a page) slots further. INT8 rows are
// divided by their largest magnitude (its f16, as stored) and rounded to int8.
@compute @workgroup_size(WORKGROUP)
fn append_paged(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let row = (wg.y * params.groups_x + wg.x) * WORKGROUP + tid; // token * kv_heads + kv_head
    if row >= params.count * params.kv_heads {
        return;
    }
    let slot = dest[row / params.kv_heads] + (row % params.kv_heads) * params.capacity;
    let start = row * params.head_dim;
    let words = (params.head_dim + 3u) / 4u;
    var inverse = vec2(1.0);
    if INT8 {
        var largest = vec2(0.0);
        for (var c = 0u; c < params.head_dim; c++) {
            largest = max(largest, abs(vec2(f32(src_k[start + c]), f32(src_v[start + c]))));
        }
        let packed = pack2x16float(largest);
        pool_v[params.scales_at + slot] = kv_word_of_bits(packed);
        let stored = unpack2x16float(packed);
        inverse = vec2(inverse_scale(stored.x), inverse_scale(stored.y));
    }
    for (var w = 0u; w < words; w++) {
        pool_k[slot * words + w] = kv_pack(new_word(true, start, w) * inverse.x);
        pool_v[slot * words + w] = kv_pack(new_word(false, start, w) * inverse.y);
    }
}
