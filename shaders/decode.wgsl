// Split-KV decode (flash-decoding) of a few queries against a KV cache.
//
// One workgroup per (split, row block, batch * KV head). The rows are the (query head of
// the group, query) pairs of one KV head, row r = g * n_q + i. The workgroup scans the
// cache slots [split * keys_per_split, ...) below `len` with an online softmax and writes
// its normalised partial output and log-sum-exp; combine.wgsl merges the splits.
//
// Register tiles. The workgroup's BLOCK_R rows form ROW_TILES tiles of 4 rows: the query
// heads of the GQA group (and queries), so that each K/V word a thread loads feeds all of
// them. Per head-dim word (4 columns) a tile has two mat4x4s in workgroup memory: qt, the 4
// rows' scaled Q as its rows (q_tile, read by every thread), and o, their outputs as its
// columns (o_tile, one per key group). Keys come 4 at a time (a step); with kc and vc
// holding the 4 keys' words as columns, a thread computes
//     s += qt * kc        (column j: key j's logits for the 4 rows)
//     o += vc * p         (p: column r holds row r's weights of the 4 keys)
// 16 multiply-adds per word loaded. The word loop is the outer one and the STEPS steps of
// a tile run inside it: the tile's logits and weights (s) are indexed by loops the
// compiler unrolls and stay in registers, and qt and o are read (and o written) once per
// word and tile. Keeping qt and o out of private arrays matters on llvmpipe, whose
// compile time grows with the square of a private array's size.
//
// Threads: LANES threads split each key's head dim (thread `lane` owns the words lane,
// lane + LANES, ...: consecutive threads read consecutive 16-byte words, coalesced on GPUs)
// and sum their partial logits through workgroup memory, one barrier per tile; the
// KEY_GROUPS = WORKGROUP / LANES groups take interleaved runs of GROUP_KEYS keys, each with
// its own online softmax, merged at the end. On a CPU adapter LANES = 1: llvmpipe runs 8
// threads as one SIMD vector and loads memory lane by lane, so each thread owns whole keys
// (every element is loaded once) and the key loop has no barrier.
//
// A key is visible to query i iff its position (the absolute stream position stored with
// its slot) is <= the query's, seen - n_q + i. With RoPE re-indexing, keys and queries are
// stored unrotated and rotated here at their index within the cache (see rope_position).
//
// PAGED: the batch is a set of sequences of their own lengths in a page pool (src/kv/paged.rs).
// The `pos` binding then holds the sequences' tables: first one entry of 4 u32 per sequence,
// pos[4b..4b+4] = (tokens seen, start of its block table in pos, slots to scan, logical page
// of its first window page), then the block tables. Slot j of sequence b lives in page
// pos[start + j / PAGE] of the pool [pages, Hkv, PAGE, words of D], at j % PAGE.
// The first sink_pages pages of the table hold the stream's first tokens; the rest are a run
// of consecutive logical pages from the window's first one (StreamingLLM frees the pages in
// between once all their tokens are evicted). Positions are computed, not stored: a slot
// is retained iff its position is below `sinks` or among the `window` most recent tokens.
// PAGED with LOGITS (heavy hitters): a sequence's slots [0, len) all hold tokens, in the
// order of its block table, and their stream positions are stored per pool slot in
// rope_or_positions (the eviction kernel writes them); the logits go to `logits` with a
// row stride of `capacity` (the longest sequence's slots) for the scores.
// Rows of the pool are padded to whole words. INT8: words are 4 int8 (shared/kv_int8.wgsl),
// each row multiplied by its scale; the scales (K's and V's as two f16 in one u32 per slot)
// follow the V words in v, from word scales_at. CHANNEL_K (KIVI): K is scaled per channel
// instead, by 2^e with an exponent e per (page, KV head, channel), 4 signed bytes per u32
// after the K words in k, from word k_scales_at (the scales word's K half is unused).
// (Tables and scales share buffers with other
// data so that the kernel stays within WebGPU's 8 storage buffers per stage.)
//
// Constants come from the prelude made by src/shader.rs: Elem (f32 or f16), WORKGROUP,
// LANES, ROW_TILES, BLOCK_R (= 4 * ROW_TILES), STEPS, D_PAD (head dim rounded up to a
// power of two, at least LANES words), ALIGNED_ROWS (head dim a multiple of 4: every K/V
// row starts on a word), ROPE (rotate Q and K), LOGITS (store the logits for heavy-hitter
// scores), PAGED and INT8 (above) and PARTS (mat4x4s of partial logits); KvWord and
// kv_unpack from shared/kv_float.wgsl or shared/kv_int8.wgsl. Features are constants
// rather than uniforms because a branch left in the key loop, even one never taken, keeps
// llvmpipe from unrolling the steps. MASKED, LOG2E and the softmax steps come from
// shared/softmax.wgsl.

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
    rope: u32, // layout in RoPE variants: ROPE_NEOX or interleaved
    // Re-indexing: a position p below rope_sinks is rotated at p, any other at p - rope_shift.
    // PAGED: rope_shift is the capacity (sinks + window), and each sequence's shift the
    // tokens it has seen past it.
    rope_sinks: u32,
    rope_shift: u32,
    scale: f32,
    // PAGED: log2 of the tokens per page, the table entries holding sinks, and the retained set.
    page_shift: u32,
    sink_pages: u32,
    sinks: u32,
    window: u32,
    scales_at: u32, // INT8: the word of v where the scales begin
    k_scales_at: u32, // CHANNEL_K: the word of k where the channel exponents begin
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<Elem>; // [B, Hq, n_q, D]
// [B, Hkv, capacity, D] in words of 4 elements (the cache rounds its buffers up to whole words);
// PAGED: [pages, Hkv, PAGE, words of D].
@group(0) @binding(2) var<storage, read> k: array<KvWord>;
@group(0) @binding(3) var<storage, read> v: array<KvWord>;
@group(0) @binding(4) var<storage, read> pos: array<u32>; // [B, Hkv, capacity]; PAGED: the tables
// ROPE: the RoPE table [capacity, D / 2] of (cos, sin), as f32 bits; PAGED with LOGITS: the
// stream position of each pool slot [pages, Hkv, PAGE].
@group(0) @binding(5) var<storage, read> rope_or_positions: array<u32>;
@group(0) @binding(6) var<storage, read_write> partial_out: array<f32>; // [splits, B, Hq, n_q, D]
@group(0) @binding(7) var<storage, read_write> partial_lse: array<f32>; // [splits, B, Hq, n_q]
@group(0) @binding(8) var<storage, read_write> logits: array<f32>; // [B, Hkv, group * n_q, capacity]

const ROPE_NEOX: u32 = 1u;
const KEY_GROUPS: u32 = WORKGROUP / LANES;
// Words (4 columns) of the padded head dim.
const D_WORDS: u32 = D_PAD / 4u;
// Keys of one group per tile, and of the workgroup.
const GROUP_KEYS: u32 = 4u * STEPS;
const BLOCK_K: u32 = KEY_GROUPS * GROUP_KEYS;
const EMPTY: u32 = 0xffffffffu;
// Which tensor a load reads.
const FROM_Q: u32 = 0u;
const FROM_K: u32 = 1u;
const FROM_V: u32 = 2u;

// The workgroup's rows' Q (scaled, as the rows of one mat4x4 per row tile and word): every
// thread reads it.
var<workgroup> q_tile: array<mat4x4<f32>, ROW_TILES * D_WORDS>;
// Each key group's unnormalised output of its rows (zero at the start, as all workgroup
// memory), word by word: each thread updates its own words.
var<workgroup> o_tile: array<mat4x4<f32>, KEY_GROUPS * ROW_TILES * D_WORDS>;
// With LANES > 1, each thread's partial logits of a tile (two buffers: tiles alternate, so
// one barrier per tile suffices).
var<workgroup> parts: array<mat4x4<f32>, PARTS>;
// Each key group's running max and sum of its rows, for the merge at the end.
var<workgroup> group_max: array<vec4<f32>, KEY_GROUPS * ROW_TILES>;
var<workgroup> group_sum: array<vec4<f32>, KEY_GROUPS * ROW_TILES>;
// PAGED: the workgroup's sequence entry, loaded once and uniform (it bounds the key loop).
var<workgroup> seq_shared: vec4<u32>;

// Where StreamingLLM's re-indexing puts the token at stream position p: its index in the cache.
// The workgroup's re-indexing shift: params.rope_shift, or with PAGED its sequence's.
var<private> rope_shift: u32;

fn rope_position(p: u32) -> u32 {
    return select(p - rope_shift, p, p < params.rope_sinks);
}

// RoPE rotates pairs: NeoX pairs column c with c ± D/2, GPT-J (interleaved) 2i with 2i + 1.
fn rope_partner(c: u32) -> u32 {
    if params.rope == ROPE_NEOX {
        let half = params.head_dim / 2u;
        return select(c - half, c + half, c < half);
    }
    return c ^ 1u;
}

// Rotating column c to `rope_pos` is x * f.x + partner * f.y: (cos, -sin) for the first
// column of a pair, (cos, sin) for the second.
fn rope_factors(c: u32, rope_pos: u32) -> vec2<f32> {
    let half = params.head_dim / 2u;
    var first = (c & 1u) == 0u;
    var freq = c / 2u;
    if params.rope == ROPE_NEOX {
        first = c < half;
        freq = select(c - half, c, first);
    }
    let at = 2u * (rope_pos * half + freq);
    let cs = vec2(bitcast<f32>(rope_or_positions[at]), bitcast<f32>(rope_or_positions[at + 1u]));
    return vec2(cs.x, select(cs.y, -cs.y, first));
}

// Element i of Q, K or V (a flat index).
fn element(src: u32, i: u32) -> f32 {
    switch src {
        case FROM_Q: { return f32(q[i]); }
        case FROM_K: { return kv_unpack(k[i / 4u])[i % 4u]; }
        default: { return kv_unpack(v[i / 4u])[i % 4u]; }
    }
}

// Column c of the vector at element `start` of Q, K or V (or with `partner`, the column
// RoPE pairs it with); 0 past the head dim.
fn gather(src: u32, start: u32, c: u32, partner: bool) -> f32 {
    if c >= params.head_dim {
        return 0.0;
    }
    return element(src, start + select(c, rope_partner(c), partner));
}

// Columns 4w..4w+3 of that vector (or their partners), element by element.
fn gather_word(src: u32, start: u32, w: u32, partners: bool) -> vec4<f32> {
    let c = 4u * w;
    return vec4(
        gather(src, start, c, partners),
        gather(src, start, c + 1u, partners),
        gather(src, start, c + 2u, partners),
        gather(src, start, c + 3u, partners),
    );
}

// Word w of the vector at element `start` of Q or K rotated to `rope_pos` (RoPE variants).
fn rotated_word(src: u32, start: u32, w: u32, x: vec4<f32>, rope_pos: u32) -> vec4<f32> {
    if !ROPE {
        return x;
    }
    let f0 = rope_factors(4u * w, rope_pos);
    let f1 = rope_factors(4u * w + 1u, rope_pos);
    let f2 = rope_factors(4u * w + 2u, rope_pos);
    let f3 = rope_factors(4u * w + 3u, rope_pos);
    let partner = gather_word(src, start, w, true);
    return x * vec4(f0.x, f1.x, f2.x, f3.x) + partner * vec4(f0.y, f1.y, f2.y, f3.y);
}

// The element where the slot's K or V row starts: rows of D elements, or with PAGED rows
// padded to whole words.
fn kv_row_start(slot: u32) -> u32 {
    return slot * select(params.head_dim, 4u * ((params.head_dim + 3u) / 4u), PAGED);
}

// Word w (within the row) of the slot's K (src = FROM_K) or V, as one 4-element load where
// rows start on words; zeros past the head dim. INT8: before its row's scale.
fn kv_word(src: u32, slot: u32, w: u32) -> vec4<f32> {
    if !ALIGNED_ROWS {
        return gather_word(src, kv_row_start(slot), w, false);
    }
    let i = slot * ((params.head_dim + 3u) / 4u) + w;
    if src == FROM_K {
        return kv_unpack(k[i]);
    }
    return kv_unpack(v[i]);
}

// INT8: m (a column per slot) times each slot's scale of K (src = FROM_K) or V.
fn dequantised(m: mat4x4<f32>, slots: vec4<u32>, src: u32) -> mat4x4<f32> {
    if !INT8 {
        return m;
    }
    let which = select(1u, 0u, src == FROM_K);
    let at = vec4(params.scales_at) + slots;
    let f = vec4(
        unpack2x16float(kv_bits(v[at.x]))[which],
        unpack2x16float(kv_bits(v[at.y]))[which],
        unpack2x16float(kv_bits(v[at.z]))[which],
        unpack2x16float(kv_bits(v[at.w]))[which],
    );
    return scale_columns(m, f);
}

// PAGED: the pool slots of a sequence's slots j (its block table at pos[table]), for one KV head.
fn paged_slots(j: vec4<u32>, table: u32, kv_head: u32) -> vec4<u32> {
    let in_page = j & vec4((1u << params.page_shift) - 1u);
    let page = vec4(
        pos[table + (j.x >> params.page_shift)],
        pos[table + (j.y >> params.page_shift)],
        pos[table + (j.z >> params.page_shift)],
        pos[table + (j.w >> params.page_shift)],
    );
    return ((page * params.kv_heads + kv_head) << vec4(params.page_shift)) + in_page;
}

// PAGED: the stream positions of a sequence's slots j, its window starting at logical page
// `window_page`.
fn paged_positions(j: vec4<u32>, window_page: u32) -> vec4<u32> {
    let entry = j >> vec4(params.page_shift);
    let sink = entry < vec4(params.sink_pages);
    let logical = select(entry - params.sink_pages + window_page, entry, sink);
    return (logical << vec4(params.page_shift)) + (j & vec4((1u << params.page_shift) - 1u));
}

// PAGED: whether the tokens at positions p (all below `seen`) are retained.
fn retained(p: vec4<u32>, seen: u32) -> vec4<bool> {
    return (p < vec4(params.sinks)) | (vec4(seen) - p <= vec4(params.window));
}

fn query_position(seen: u32, i: u32) -> u32 {
    return seen - params.n_q + i;
}

// Index of row r's query (or output) row in [B, Hq, n_q].
fn query_row(b: u32, kv_head: u32, r: u32) -> u32 {
    let group = params.q_heads / params.kv_heads;
    let head = kv_head * group + r / params.n_q;
    return (b * params.q_heads + head) * params.n_q + r % params.n_q;
}

// Word w of the 4 slots' K (a column each), rotated at `at` (RoPE variants).
fn key_words(slots: vec4<u32>, w: u32, at: vec4<u32>) -> mat4x4<f32> {
    let m = mat4x4(
        rotated_word(FROM_K, kv_row_start(slots.x), w, kv_word(FROM_K, slots.x, w), at.x),
        rotated_word(FROM_K, kv_row_start(slots.y), w, kv_word(FROM_K, slots.y, w), at.y),
        rotated_word(FROM_K, kv_row_start(slots.z), w, kv_word(FROM_K, slots.z, w), at.z),
        rotated_word(FROM_K, kv_row_start(slots.w), w, kv_word(FROM_K, slots.w, w), at.w),
    );
    if CHANNEL_K {
        return mat4x4(
            m[0] * key_channel_scales(slots.x, w),
            m[1] * key_channel_scales(slots.y, w),
            m[2] * key_channel_scales(slots.z, w),
            m[3] * key_channel_scales(slots.w, w),
        );
    }
    return dequantised(m, slots, FROM_K);
}

// CHANNEL_K: the scales of word w's 4 channels of K in the slot's page (slot >> page_shift
// is its (page, KV head)).
fn key_channel_scales(slot: u32, w: u32) -> vec4<f32> {
    return kv_channel_scales(k[params.k_scales_at + (slot >> params.page_shift) * ((params.head_dim + 3u) / 4u) + w]);
}

// s + this word's share of the tile's logits: qt_c, the row tiles' Q at word w.
fn add_scores(
    s: array<mat4x4<f32>, ROW_TILES * STEPS>,
    qt_c: array<mat4x4<f32>, ROW_TILES>,
    slots: array<vec4<u32>, STEPS>,
    w: u32,
    rope_at: array<vec4<u32>, STEPS>,
) -> array<mat4x4<f32>, ROW_TILES * STEPS> {
    var sum = s;
    for (var st = 0u; st < STEPS; st++) {
        let kc = key_words(slots[st], w, rope_at[st]);
        for (var t = 0u; t < ROW_TILES; t++) {
            sum[t * STEPS + st] += qt_c[t] * kc;
        }
    }
    return sum;
}

// Word w of the 4 slots' V (a column each).
fn value_words(slots: vec4<u32>, w: u32) -> mat4x4<f32> {
    let m = mat4x4(
        kv_word(FROM_V, slots.x, w),
        kv_word(FROM_V, slots.y, w),
        kv_word(FROM_V, slots.z, w),
        kv_word(FROM_V, slots.w, w),
    );
    return dequantised(m, slots, FROM_V);
}

// Column r of o + vc * p (r's weights p_r) leaving out the keys of weight 0: 0 * NaN would
// carry a NaN in the V of a key the row cannot see into its output.
fn add_visible_column(o_r: vec4<f32>, vc: mat4x4<f32>, p_r: vec4<f32>) -> vec4<f32> {
    let hidden = is_zero4(p_r);
    let seen = mat4x4(
        select(vc[0], vec4(0.0), hidden.x),
        select(vc[1], vec4(0.0), hidden.y),
        select(vc[2], vec4(0.0), hidden.z),
        select(vc[3], vec4(0.0), hidden.w),
    );
    return o_r + seen * p_r;
}

// o + vc * p, where unless every weight is nonzero (`whole`) each row leaves out its keys
// of weight 0.
fn add_values(o: mat4x4<f32>, vc: mat4x4<f32>, p: mat4x4<f32>, whole: bool) -> mat4x4<f32> {
    if whole {
        return o + vc * p;
    }
    return mat4x4(
        add_visible_column(o[0], vc, p[0]),
        add_visible_column(o[1], vc, p[1]),
        add_visible_column(o[2], vc, p[2]),
        add_visible_column(o[3], vc, p[3]),
    );
}

// The row tiles' outputs o_c at word w plus the tile's values weighted by p (transposed
// weights, see main). `whole`: every weight of the tile is nonzero (callers pass a constant,
// so that the loop holds one of add_values's two paths and unrolls).
fn add_tile_values(
    o_c: array<mat4x4<f32>, ROW_TILES>,
    p: array<mat4x4<f32>, ROW_TILES * STEPS>,
    slots: array<vec4<u32>, STEPS>,
    w: u32,
    whole: bool,
) -> array<mat4x4<f32>, ROW_TILES> {
    var sum = o_c;
    for (var st = 0u; st < STEPS; st++) {
        let vc = value_words(slots[st], w);
        for (var t = 0u; t < ROW_TILES; t++) {
            sum[t] = add_values(sum[t], vc, p[t * STEPS + st], whole);
        }
    }
    return sum;
}

// The logits x of one key for 4 rows, MASKED where a row's query is before the key.
fn visible_only(x: vec4<f32>, key_pos: u32, query_pos: vec4<u32>) -> vec4<f32> {
    return select(vec4(MASKED), x, vec4(key_pos) <= query_pos);
}

// Stores the logits x of 4 keys (columns) for 4 rows, from row `row` and key `key` on
// (heavy-hitter scores): MASKED where a row cannot see the key, none past the rows or hi.
fn store_logits(x: mat4x4<f32>, kp: vec4<u32>, qp: vec4<u32>, row_base: u32, row: u32, rows: u32, key: u32, hi: u32) {
    for (var j = 0u; j < 4u; j++) {
        let logit = visible_only(x[j], kp[j], qp);
        for (var i = 0u; i < 4u; i++) {
            if row + i < rows && key + j < hi {
                logits[(row_base + row + i) * params.capacity + key + j] = logit[i];
            }
        }
    }
}

// The columns of m scaled by f (one factor per row).
fn scale_columns(m: mat4x4<f32>, f: vec4<f32>) -> mat4x4<f32> {
    return mat4x4(m[0] * f.x, m[1] * f.y, m[2] * f.z, m[3] * f.w);
}

@compute @workgroup_size(WORKGROUP)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let lane = tid % LANES;
    let key_group = tid / LANES;
    let split = wg.x;
    let row0 = wg.y * BLOCK_R;
    let bh = wg.z; // b * kv_heads + kv_head
    let b = bh / params.kv_heads;
    let kv_head = bh % params.kv_heads;
    let rows = (params.q_heads / params.kv_heads) * params.n_q;
    let dim = params.head_dim;
    let slot_base = bh * params.capacity;
    // (tokens seen, block table start, slots to scan, first window page), see the header.
    var seq = vec4(params.seen, 0u, params.len, 0u);
    if PAGED {
        if tid == 0u {
            seq_shared = vec4(pos[4u * b], pos[4u * b + 1u], pos[4u * b + 2u], pos[4u * b + 3u]);
        }
        seq = workgroupUniformLoad(&seq_shared);
    }
    let seen = seq.x;
    rope_shift = params.rope_shift;
    if PAGED {
        rope_shift = seen - min(seen, params.rope_shift);
    }
    let lo = split * params.keys_per_split;
    let hi = min(lo + params.keys_per_split, seq.z);
    // The row's words, and those of this thread (lane, lane + LANES, ...); the others are
    // never read, nor written.
    let row_words = (dim + 3u) / 4u;
    let words = (row_words + LANES - 1u - lane) / LANES;

    // Rows past the last repeat it, so that tiles stay whole; they are not written.
    var query_pos = array<vec4<u32>, ROW_TILES>();
    for (var t = 0u; t < ROW_TILES; t++) {
        for (var i = 0u; i < 4u; i++) {
            query_pos[t][i] = query_position(seen, min(row0 + 4u * t + i, rows - 1u) % params.n_q);
        }
    }
    for (var e = tid; e < ROW_TILES * row_words; e += WORKGROUP) {
        let t = e / row_words;
        let w = e % row_words;
        var rows_q = mat4x4<f32>();
        for (var i = 0u; i < 4u; i++) {
            let start = query_row(b, kv_head, min(row0 + 4u * t + i, rows - 1u)) * dim;
            let x = gather_word(FROM_Q, start, w, false);
            rows_q[i] = rotated_word(FROM_Q, start, w, x, rope_position(query_pos[t][i])) * params.scale;
        }
        q_tile[t * D_WORDS + w] = transpose(rows_q);
    }
    workgroupBarrier();

    // The key group's online softmax of each row (base 2); its output is in o_tile.
    var m = array<vec4<f32>, ROW_TILES>();
    var l = array<vec4<f32>, ROW_TILES>();
    for (var t = 0u; t < ROW_TILES; t++) {
        m[t] = vec4(MASKED);
    }
    let o_base = key_group * ROW_TILES * D_WORDS;
    var parity = 0u;
    for (var key0 = lo; key0 < hi; key0 += BLOCK_K) {
        // The group's slots, 4 per step; slots past hi read the last one (in bounds) and are masked.
        let first = key0 + key_group * GROUP_KEYS;
        var slots = array<vec4<u32>, STEPS>();
        var key_pos = array<vec4<u32>, STEPS>();
        var rope_at = array<vec4<u32>, STEPS>();
        for (var st = 0u; st < STEPS; st++) {
            let keys = vec4(first + 4u * st) + vec4(0u, 1u, 2u, 3u);
            let j = min(keys, vec4(hi - 1u));
            var sl = vec4(slot_base) + j;
            var p: vec4<u32>;
            var kept = keys < vec4(hi);
            if PAGED && LOGITS {
                sl = paged_slots(j, seq.y, kv_head);
                p = vec4(
                    rope_or_positions[sl.x],
                    rope_or_positions[sl.y],
                    rope_or_positions[sl.z],
                    rope_or_positions[sl.w],
                );
            } else if PAGED {
                sl = paged_slots(j, seq.y, kv_head);
                p = paged_positions(j, seq.w);
                kept = kept & retained(p, seen);
            } else {
                p = vec4(pos[sl.x], pos[sl.y], pos[sl.z], pos[sl.w]);
            }
            slots[st] = sl;
            key_pos[st] = select(vec4(EMPTY), p, kept);
            rope_at[st] = vec4(rope_position(p.x), rope_position(p.y), rope_position(p.z), rope_position(p.w));
        }

        // This thread's share of the logits, word by word.
        var s = array<mat4x4<f32>, ROW_TILES * STEPS>();
        for (var c = 0u; c < words; c++) {
            let w = lane + c * LANES;
            var qt_c = array<mat4x4<f32>, ROW_TILES>();
            for (var t = 0u; t < ROW_TILES; t++) {
                qt_c[t] = q_tile[t * D_WORDS + w];
            }
            s = add_scores(s, qt_c, slots, w, rope_at);
        }
        if LANES > 1u {
            // Sum the lanes' shares: every lane of the group adds them in the same order.
            let base = (parity * KEY_GROUPS + key_group) * ROW_TILES * STEPS;
            for (var ts = 0u; ts < ROW_TILES * STEPS; ts++) {
                parts[(base + ts) * LANES + lane] = s[ts];
            }
            workgroupBarrier();
            for (var ts = 0u; ts < ROW_TILES * STEPS; ts++) {
                var sum = mat4x4<f32>();
                for (var from_lane = 0u; from_lane < LANES; from_lane++) {
                    sum += parts[(base + ts) * LANES + from_lane];
                }
                s[ts] = sum;
            }
            parity ^= 1u;
        }

        // Per row tile: mask (keeping the logits for heavy-hitter scores), then the online
        // softmax in base 2: the weights against the new max (transposed: column r is row
        // r's), and the factor rescaling what the rows have so far (exactly 1 where the max
        // did not move).
        var alpha = array<vec4<f32>, ROW_TILES>();
        var whole = true;
        for (var t = 0u; t < ROW_TILES; t++) {
            let qp = query_pos[t];
            var m_tile = vec4(MASKED);
            for (var st = 0u; st < STEPS; st++) {
                let x = s[t * STEPS + st];
                let kp = key_pos[st];
                if LOGITS && lane == 0u {
                    store_logits(x, kp, qp, bh * rows, row0 + 4u * t, rows, first + 4u * st, hi);
                }
                let y = mat4x4(
                    visible_only(x[0] * LOG2E, kp.x, qp),
                    visible_only(x[1] * LOG2E, kp.y, qp),
                    visible_only(x[2] * LOG2E, kp.z, qp),
                    visible_only(x[3] * LOG2E, kp.w, qp),
                );
                s[t * STEPS + st] = y;
                m_tile = max(m_tile, max(max(y[0], y[1]), max(y[2], y[3])));
            }
            let m_new = max(m[t], m_tile);
            let moved = bitcast<vec4<u32>>(m_new) != bitcast<vec4<u32>>(m[t]);
            alpha[t] = select(vec4(1.0), rescale_factor4(m[t], m_new), moved);
            l[t] *= alpha[t];
            m[t] = m_new;
            for (var st = 0u; st < STEPS; st++) {
                let y = s[t * STEPS + st];
                let p = mat4x4(
                    softmax_weight4(y[0], m_new),
                    softmax_weight4(y[1], m_new),
                    softmax_weight4(y[2], m_new),
                    softmax_weight4(y[3], m_new),
                );
                l[t] += (p[0] + p[1]) + (p[2] + p[3]);
                let zero = is_zero4(p[0]) | is_zero4(p[1]) | is_zero4(p[2]) | is_zero4(p[3]);
                whole = whole && !any(zero);
                s[t * STEPS + st] = transpose(p);
            }
        }

        // O += P V, word by word.
        for (var c = 0u; c < words; c++) {
            let w = lane + c * LANES;
            var o_c = array<mat4x4<f32>, ROW_TILES>();
            for (var t = 0u; t < ROW_TILES; t++) {
                o_c[t] = scale_columns(o_tile[o_base + t * D_WORDS + w], alpha[t]);
            }
            if whole {
                o_c = add_tile_values(o_c, s, slots, w, true);
            } else {
                o_c = add_tile_values(o_c, s, slots, w, false);
            }
            for (var t = 0u; t < ROW_TILES; t++) {
                o_tile[o_base + t * D_WORDS + w] = o_c[t];
            }
        }
    }

    // Merge the key groups: out = sum_g f_g o_g with f_g = exp2(m_g - m) / sum_g exp2(m_g - m) l_g
    // and m = max_g m_g; zeros and -inf for a row that saw no key.
    if lane == 0u {
        for (var t = 0u; t < ROW_TILES; t++) {
            group_max[key_group * ROW_TILES + t] = m[t];
            group_sum[key_group * ROW_TILES + t] = l[t];
        }
    }
    workgroupBarrier();
    var m_all = array<vec4<f32>, ROW_TILES>();
    var l_all = array<vec4<f32>, ROW_TILES>();
    for (var t = 0u; t < ROW_TILES; t++) {
        m_all[t] = vec4(MASKED);
        for (var g = 0u; g < KEY_GROUPS; g++) {
            m_all[t] = max(m_all[t], group_max[g * ROW_TILES + t]);
        }
        for (var g = 0u; g < KEY_GROUPS; g++) {
            let i = g * ROW_TILES + t;
            l_all[t] += group_sum[i] * rescale_factor4(group_max[i], m_all[t]);
        }
    }
    let row_stride = params.batch * params.q_heads * params.n_q;
    for (var e = tid; e < ROW_TILES * row_words; e += WORKGROUP) {
        let t = e / row_words;
        let w = e % row_words;
        var sum = mat4x4<f32>();
        for (var g = 0u; g < KEY_GROUPS; g++) {
            let f = rescale_factor4(group_max[g * ROW_TILES + t], m_all[t]) * inverse_sum4(l_all[t]);
            sum += scale_columns(o_tile[(g * ROW_TILES + t) * D_WORDS + w], f);
        }
        for (var i = 0u; i < 4u; i++) {
            let r = row0 + 4u * t + i;
            let out_row = (split * row_stride + query_row(b, kv_head, min(r, rows - 1u))) * dim;
            for (var j = 0u; j < 4u; j++) {
                if r < rows && 4u * w + j < dim {
                    partial_out[out_row + 4u * w + j] = sum[i][j];
                }
            }
        }
    }
    if tid == 0u {
        for (var t = 0u; t < ROW_TILES; t++) {
            let lse = finish_lse4(m_all[t], l_all[t]);
            for (var i = 0u; i < 4u; i++) {
                let r = row0 + 4u * t + i;
                if r < rows {
                    partial_lse[split * row_stride + query_row(b, kv_head, r)] = lse[i];
                }
            }
        }
    }
}
