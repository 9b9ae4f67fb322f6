// KV cache bookkeeping, all on the GPU:
//   place       picks the slot of each new token (None, StreamingLLM) and records its position
//   evict       the same for heavy hitters, evicting the lowest-scored token
//   append      copies the new tokens' K and V rows into their slots
//   accumulate  adds each cached token's attention probabilities to its heavy-hitter score
//   append_paged  copies new tokens' K and V rows into the pages of a paged pool (quantising
//                 them in int8 pools), at slots the host chose from the block tables (or,
//                 with heavy hitters, that evict_paged chose)
//   append_paged_channels  append_paged for int8 pools with K scaled per channel (KIVI): a
//                 workgroup per (page the step writes, KV head)
//   evict_paged, accumulate_paged  evict and accumulate for heavy hitters in a paged pool:
//                 per sequence, the slots of its block table in order play the dense slots
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
    page_size: u32, // paged entry points: tokens per page
    row_slots: u32, // append_paged: 1 if dest holds a slot per (token, KV head), 0 per token
    k_scales_at: u32, // append_paged_channels: the word of pool_k where the channel exponents begin
}
// append_paged reads count (new tokens in all), kv_heads, head_dim, page_size, groups_x,
// scales_at and row_slots. evict_paged reads kv_heads, capacity (slots per sequence), sinks,
// window and page_size; accumulate_paged batch (sequences), kv_heads, q_heads, count
// (queries), capacity (the logits' row stride), groups_x and page_size.

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
// Paged heavy hitters: first 4 u32 per sequence, then the block tables (pool pages). evict_paged:
// the step's sequences (tokens before the step, new tokens, block table start, its first new
// token's row in src_k); accumulate_paged: the decode's (see decode.wgsl).
// append_paged_channels: 4 u32 per page the step writes (page, first offset written, tokens
// written, the first one's token index in src_k).
@group(0) @binding(12) var<storage, read> tables: array<u32>;

const NONE: u32 = 0xffffffffu;

var<workgroup> best_score: array<f32, WORKGROUP>;
var<workgroup> best_pos: array<u32, WORKGROUP>;
var<workgroup> best_slot: array<u32, WORKGROUP>;

fn better(score_a: f32, pos_a: u32, score_b: f32, pos_b: u32) -> bool {
    // Lowest score first; on a tie the older token goes.
    return score_a < score_b || (score_a == score_b && pos_a < pos_b);
}

// The lowest-scored evictable slot one thread has seen (pos NONE: none yet).
struct Candidate {
    score: f32,
    pos: u32,
    slot: u32,
}

// c, or `slot` (at `index` of pos and score) if it is evictable for the token at position p
// and better.
fn consider(c: Candidate, index: u32, slot: u32, p: u32) -> Candidate {
    let ps = pos[index];
    let sc = score[index];
    let evictable = ps >= params.sinks && ps + params.window <= p;
    if evictable && (c.pos == NONE || better(sc, ps, c.score, c.pos)) {
        return Candidate(sc, ps, slot);
    }
    return c;
}

// The best of the workgroup's candidates. Every thread must call it; thread 0 gets the answer.
fn lowest_of_workgroup(c: Candidate, tid: u32) -> u32 {
    best_score[tid] = c.score;
    best_pos[tid] = c.pos;
    best_slot[tid] = c.slot;
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
            var c = Candidate(0.0, NONE, NONE);
            for (var s = tid; s < params.capacity; s += WORKGROUP) {
                c = consider(c, base + s, s, p);
            }
            slot = lowest_of_workgroup(c, tid);
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
    score[idx] += attention_received(bh, slot);
}

// The probability each query head of the group and each query gave the token in `slot` of
// sequence-head bh (the logits' row stride is capacity).
fn attention_received(bh: u32, slot: u32) -> f32 {
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
    return sum;
}

// Paged heavy hitters: the pool slot (row of pos, score and the pools) of slot j of the
// sequence whose block table starts at tables[table], for one KV head.
fn paged_index(table: u32, kv_head: u32, j: u32) -> u32 {
    let page = tables[table + j / params.page_size];
    return (page * params.kv_heads + kv_head) * params.page_size + j % params.page_size;
}

// The step's sequence entry of a paged eviction's workgroup, uniform across it.
var<workgroup> step_entry: vec4<u32>;

// Paged heavy hitters: one workgroup per (sequence of the step, KV head), placing the
// sequence's new tokens one after another as `evict` does, each into the slot (per KV head)
// it fills or evicts; dest gets every (token, KV head) row's pool slot.
@compute @workgroup_size(WORKGROUP)
fn evict_paged(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let sequence = wg.x / params.kv_heads;
    let kv_head = wg.x % params.kv_heads;
    if tid == 0u {
        let e = 4u * sequence;
        step_entry = vec4(tables[e], tables[e + 1u], tables[e + 2u], tables[e + 3u]);
    }
    // (tokens before the step, new tokens, block table start, first new token's row)
    let entry = workgroupUniformLoad(&step_entry);
    for (var t = 0u; t < entry.y; t++) {
        let p = entry.x + t;
        var slot = p;
        if p >= params.capacity {
            var c = Candidate(0.0, NONE, NONE);
            for (var s = tid; s < params.capacity; s += WORKGROUP) {
                c = consider(c, paged_index(entry.z, kv_head, s), s, p);
            }
            slot = lowest_of_workgroup(c, tid);
        }
        if tid == 0u {
            let index = paged_index(entry.z, kv_head, slot);
            dest[(entry.w + t) * params.kv_heads + kv_head] = index;
            pos[index] = p;
            score[index] = 0.0;
        }
        // The next token's choice reads the positions and scores just written.
        storageBarrier();
        workgroupBarrier();
    }
}

// Paged heavy hitters: `accumulate` for one thread per (sequence of the decode, KV head, slot
// up to the longest's), the decode's tables giving each sequence's slots and block table.
@compute @workgroup_size(WORKGROUP)
fn accumulate_paged(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let idx = (wg.y * params.groups_x + wg.x) * WORKGROUP + tid;
    let slot = idx % params.capacity;
    let bh = idx / params.capacity;
    if bh >= params.batch * params.kv_heads {
        return;
    }
    let sequence = bh / params.kv_heads;
    if slot >= tables[4u * sequence + 2u] {
        return;
    }
    let index = paged_index(tables[4u * sequence + 1u], bh % params.kv_heads, slot);
    score[index] += attention_received(bh, slot);
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

// The largest magnitude of the new row at element `start` of src_k (k = true) or src_v.
fn row_largest(k: bool, start: u32) -> f32 {
    var largest = 0.0;
    for (var c = 0u; c < params.head_dim; c++) {
        largest = max(largest, abs(select(f32(src_v[start + c]), f32(src_k[start + c]), k)));
    }
    return largest;
}

// Writes the new row at element `start` of src_k (k = true) or src_v, times `inverse`, to
// pool slot `slot`.
fn store_row(k: bool, start: u32, slot: u32, inverse: f32) {
    let words = (params.head_dim + 3u) / 4u;
    for (var w = 0u; w < words; w++) {
        let word = kv_pack(new_word(k, start, w) * inverse);
        if k {
            pool_k[slot * words + w] = word;
        } else {
            pool_v[slot * words + w] = word;
        }
    }
}

// The exponents e (2^e > m, at least -126) of the power-of-two scales of magnitudes m.
fn exponents_above(m: vec4<f32>) -> vec4<i32> {
    // The biased exponent b of a normal m gives 2^(b - 127) <= m < 2^(b - 126).
    return vec4<i32>((bitcast<vec4<u32>>(m) >> vec4(23u)) & vec4(0xffu)) - vec4(126);
}

// Int8 pools with K per channel (KIVI): one workgroup per (page the step writes, KV head).
// Thread w owns word w (4 channels) of K in every row of the page: the page's channel
// exponents grow to cover the new tokens (a page first written starts afresh), the rows
// already there are rounded again where a channel's scale grew (an exact halving per step of
// the exponent before rounding: their error stays within one step of the new scale), and the
// new rows are rounded at the page's scales. V is scaled per token, as in append_paged.
@compute @workgroup_size(WORKGROUP)
fn append_paged_channels(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let run = 4u * (wg.x / params.kv_heads);
    let kv_head = wg.x % params.kv_heads;
    let page = tables[run];
    let offset = tables[run + 1u];
    let count = tables[run + 2u];
    let first = tables[run + 3u];
    let page_head = page * params.kv_heads + kv_head;
    let base = page_head * params.page_size; // pool slot of the page's first token for this head
    let words = (params.head_dim + 3u) / 4u;
    for (var w = tid; w < words; w += WORKGROUP) {
        let at = params.k_scales_at + page_head * words + w;
        var largest = vec4(0.0);
        for (var t = 0u; t < count; t++) {
            largest = max(largest, abs(new_word(true, ((first + t) * params.kv_heads + kv_head) * params.head_dim, w)));
        }
        var e = exponents_above(largest);
        if offset > 0u {
            let old = kv_exponents(pool_k[at]);
            e = max(e, old);
            if any(e != old) {
                let factor = exp2(vec4<f32>(old - e));
                for (var j = 0u; j < offset; j++) {
                    let i = (base + j) * words + w;
                    pool_k[i] = kv_pack(kv_unpack(pool_k[i]) * factor);
                }
            }
        }
        pool_k[at] = kv_word_of_exponents(e);
        let inverse = exp2(-vec4<f32>(e));
        for (var t = 0u; t < count; t++) {
            let start = ((first + t) * params.kv_heads + kv_head) * params.head_dim;
            pool_k[(base + offset + t) * words + w] = kv_pack(new_word(true, start, w) * inverse);
        }
    }
    for (var t = tid; t < count; t += WORKGROUP) {
        let start = ((first + t) * params.kv_heads + kv_head) * params.head_dim;
        let slot = base + offset + t;
        let packed = pack2x16float(vec2(0.0, row_largest(false, start)));
        pool_v[params.scales_at + slot] = kv_word_of_bits(packed);
        store_row(false, start, slot, inverse_scale(unpack2x16float(packed).y));
    }
}

// Paged pools: one thread per (new token, KV head) row of src_k/src_v [count, Hkv, D], the
// tokens of every sequence of the step one after another. dest[token] is the pool slot of
// the token's KV head 0; head h is h * page_size (a page) slots further; with row_slots,
// dest[row] is the row's own slot. INT8 rows are
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
    var slot = dest[row / params.kv_heads] + (row % params.kv_heads) * params.page_size;
    if params.row_slots == 1u {
        slot = dest[row];
    }
    let start = row * params.head_dim;
    var inverse = vec2(1.0);
    if INT8 {
        let packed = pack2x16float(vec2(row_largest(true, start), row_largest(false, start)));
        pool_v[params.scales_at + slot] = kv_word_of_bits(packed);
        let stored = unpack2x16float(packed);
        inverse = vec2(inverse_scale(stored.x), inverse_scale(stored.y));
    }
    store_row(true, start, slot, inverse.x);
    store_row(false, start, slot, inverse.y);
}
