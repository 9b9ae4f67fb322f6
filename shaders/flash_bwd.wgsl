// Flash-attention backward (FlashAttention-2's algorithm): dQ, dK and dV from Q, K, V, the
// forward's O and LSE, and dO, without materialising the N x N scores. P is recomputed from
// Q, K and the LSE block by block; nothing but per-row statistics and the gradients is stored.
//
// Three entry points, dispatched in this order by src/attention/backward.rs:
//
// - `preprocess`: one thread per query row writes its statistics to the head of `state`:
//   the LSE in base 2 (the forward's is natural-log; the kernels work in base 2, as
//   shared/softmax.wgsl explains) and D = rowsum(dO * O).
// - `dkdv_pass`: KEY_THREADS threads per workgroup, four keys of a KV head each. The
//   workgroup walks, in a fixed order, every query head of the KV head's group and every
//   query block that can see one of its keys (the dense options' bounds, or the block mask's
//   runs of each query block), four query rows at a time; each thread accumulates its keys'
//   dK and dV in registers: dV += P dO, dS = P (dP - D), dK += dS Q. GQA's reduction over the
//   group is that fixed-order loop, so no atomics.
// - `dq_pass`: a thread per four rows of a query block walks the key tiles the block can see,
//   as the forward does, four keys at a time, and accumulates dQ += dS K. A pass of its own
//   instead of float atomics in `dkdv_pass`: every sum runs in a fixed order, so equal inputs
//   give bit-identical gradients.
//
// The main passes are register-tiled, as flash_fwd.wgsl is: a thread's four rows (keys in
// dkdv, queries in dq) and the four rows of the other side it is at meet in a 4 x 4 block,
// held as a mat4x4 with one column per key and one row per query. With Qc, Kc, Gc (dO) and
// Vc the blocks' vec4 column c of the head dims, one row per matrix column,
// S = sum_c transpose(Qc) Kc, dP = sum_c transpose(Gc) Vc, dV_c += Gc P, dK_c += Qc dS and
// dQ_c += Kc transpose(dS): 16 FMAs per vec4 read.
//
// A thread's tiles hold at most 64 columns per head dim: llvmpipe takes minutes to compile
// wider ones. Wider heads are split as flash_fwd.wgsl splits them: SPLIT threads (2 up to
// 128 columns, 4 up to 256) share each group of four rows, each owning the vec4 columns
// part, part + SPLIT, ... of every row, and subgroup shuffles sum their partial S and dP in
// lane order, so that every thread of the group holds the same bits (split_sum). Only
// workgroups of one subgroup split; elsewhere wider rows take the `_wide` entry points at
// the end of this file.
//
// The other side's rows are read straight from memory, or (SHUFFLE_ROWS, where the workgroup
// is exactly one subgroup) each thread reads its slice of the rows of its share of them and
// subgroup shuffles hand them to the threads with the same slice: on llvmpipe every load
// runs once per thread, so this one brings a different row to each. While loading, the
// threads note whether a row holds a non-finite value, so that the NaN-safe products
// (below) are only paid for where one is.
//
// Masked pairs and pairs whose weight is exactly 0 contribute nothing, never 0 times their
// values: dS is 0 there whatever dP holds, and products of data with weights go through
// add_nonzero_products (shared/attention.wgsl) wherever a row may hold a non-finite value. A
// NaN in a row a key cannot see (or in dO of a row that gives the key no weight) stays out of
// its gradients, while a NaN in a pair that counts reaches every gradient that depends on it,
// as IEEE arithmetic says. Rows that see no key (LSE -inf) contribute nothing, and their dQ
// is 0.
//
// Varlen variants (VARLEN) run sequences packed along the sequence axis of one batch, as
// flash_fwd.wgsl's do: each workgroup reads its sequence and block from a table the host
// writes into `state` (workgroup_sequence), and every length, diagonal and row below is that
// sequence's. The dkdv passes' blocks are blocks of keys; the passes under a loop cap walk
// each sequence's own keys (dq) or (head, query block) pairs (dkdv), and a sequence's last
// pass is the one that reaches its end.
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
// WIDE_KEYS_WG (keys per dkdv_wide workgroup, a multiple of BLOCK_K),
// DQK_PAD and DV_PAD (head dims rounded up to 16), ALIGNED (both head dims are multiples of
// 4), SPLIT (1, 2 or 4; more than 1 only with SHUFFLE_ROWS), SHUFFLE_ROWS, BLOCK_SPARSE and
// VARLEN. Params, Sequence, sequence_visible4() and add_nonzero_products come from
// shared/attention.wgsl, the softmax helpers from shared/softmax.wgsl, BlockMask and its walk
// from shared/block_mask.wgsl, the row readers from shared/rows.wgsl, and the lane helpers
// (subgroup_lane, from_lane, on_all_lanes, split_sum, split_any) from
// shared/lanes_subgroup.wgsl or shared/lanes_none.wgsl.

// Keep in sync with `PassRange` in src/attention/backward.rs (a test compares the layouts).
struct PassRange {
    // dq: keys [begin, end), begin a multiple of BLOCK_K. dkdv: the (query head of the
    // group, query block) pairs [begin, end), numbered head-major.
    begin: u32,
    end: u32,
    flags: u32, // FIRST_PASS | LAST_PASS
    table_at: u32, // VARLEN: where the pass's table of blocks starts in `state`
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<uniform> range: PassRange;
@group(0) @binding(2) var<storage, read> q: array<vec4<Elem>>;
@group(0) @binding(3) var<storage, read> k: array<vec4<Elem>>;
@group(0) @binding(4) var<storage, read> v: array<vec4<Elem>>;
@group(0) @binding(5) var<storage, read> out: array<Elem>;
@group(0) @binding(6) var<storage, read> d_out: array<vec4<Elem>>;
@group(0) @binding(7) var<storage, read> lse: array<f32>;
@group(0) @binding(8) var<storage, read_write> dq: array<Elem>;
@group(0) @binding(9) var<storage, read_write> dk: array<Elem>;
@group(0) @binding(10) var<storage, read_write> dv: array<Elem>;
// u32 words, f32 values as bits: per query row the LSE in base 2, then D; from
// accumulators_at() on, only between passes, DQK_PAD floats per query row (dq_pass) or
// DQK_PAD + DV_PAD per key row (dkdv_pass); VARLEN, from range.table_at on, the pass's table
// of blocks (workgroup_sequence).
@group(0) @binding(11) var<storage, read_write> state: array<u32>;
@group(0) @binding(12) var<storage, read> block_mask: BlockMask;

const QK4: u32 = DQK_PAD / 4u;
const DV4: u32 = DV_PAD / 4u;
// The vec4 columns of a thread's slice of a row (the tiled passes).
const QK4_T: u32 = QK4 / SPLIT;
const DV4_T: u32 = DV4 / SPLIT;
const MASK_WORDS: u32 = (BLOCK_Q * BLOCK_K + 31u) / 32u;
// Threads per workgroup of preprocess, one row each.
const ROW_WG: u32 = 64u;
// dkdv_pass: threads per workgroup, their groups of four keys, and the query rows of a block
// it walks at a time, CHUNK_PER_LANE per group.
const KEY_THREADS: u32 = 8u;
const KEY_GROUPS: u32 = KEY_THREADS / SPLIT;
const KEYS_WG: u32 = 4u * KEY_GROUPS;
const CHUNK_PER_LANE: u32 = 4u;
const CHUNK: u32 = CHUNK_PER_LANE * KEY_GROUPS;
// dq_pass: groups of four rows of the query block, threads per workgroup, and groups of four
// keys of a tile.
const ROW_GROUPS: u32 = (BLOCK_Q + 3u) / 4u;
const ROW_THREADS: u32 = ROW_GROUPS * SPLIT;
const TILE_GROUPS: u32 = (BLOCK_K + 3u) / 4u;
const TILE_PER_LANE: u32 = (4u * TILE_GROUPS + ROW_GROUPS - 1u) / ROW_GROUPS;
// SHUFFLE_ROWS: the rows of the other side a thread holds for the others (row x at the
// thread of group x % groups with the same slice, slot x / groups): ROW_WORDS vec4 words of
// its slice each, Q then dO (dkdv) or K then V (dq), and per row (base-2 LSE, D, 1 where
// the row holds a non-finite value in any slice, 0).
const ROW_WORDS: u32 = QK4_T + DV4_T;
const LANE_SLOTS: u32 = max(CHUNK_PER_LANE, TILE_PER_LANE);
const LANE_WORDS: u32 = select(1u, LANE_SLOTS * ROW_WORDS, SHUFFLE_ROWS);

var<private> lane_rows: array<vec4<f32>, LANE_WORDS>;
var<private> lane_stats: array<vec4<f32>, LANE_SLOTS>;

// VARLEN: each pass's table of blocks in `state`, from range.table_at: its length, then per
// block of a sequence (the dq passes' query blocks, the dkdv passes' blocks of keys) six
// words, `SequenceBlock` in src/attention/varlen.rs: the sequence, the block within it, the
// sequence's first query and key rows, its queries and its keys. The grid's x counts the
// blocks (wrapped into z), its y the heads.
const BLOCK_WORDS: u32 = 6u;

// VARLEN: whether the workgroup lies past the table's last block.
fn past_the_blocks(wg: vec3<u32>, groups_x: u32) -> bool {
    return VARLEN && varlen_workgroup(wg, groups_x) >= state[range.table_at];
}

// The workgroup's Sequence (shared/attention.wgsl): dense, batch wg.z and block wg.x of the
// whole problem; VARLEN, its block of the table. Head wg.y either way.
fn workgroup_sequence(wg: vec3<u32>, groups_x: u32) -> Sequence {
    if VARLEN {
        let at = range.table_at + 1u + BLOCK_WORDS * varlen_workgroup(wg, groups_x);
        return Sequence(0u, state[at], state[at + 1u], wg.y, state[at + 2u], state[at + 3u], state[at + 4u],
            state[at + 5u]);
    }
    return Sequence(wg.z, wg.z, wg.x, wg.y, 0u, 0u, params.n_q, params.n_k);
}

// VARLEN: whether a pass from key `begin` (dq) or pair `begin` (dkdv) on has nothing of a
// sequence of `count` keys or pairs left: its last pass has written its rows.
fn sequence_done(begin: u32, count: u32) -> bool {
    return VARLEN && begin > 0u && begin >= count;
}

// Whether this pass is the last of a sequence of `count` keys (dq) or pairs (dkdv).
fn sequence_last_pass(count: u32) -> bool {
    return (range.flags & LAST_PASS) != 0u || (VARLEN && range.end >= count);
}

// What a dK/dV workgroup of keys [key0, key_last] of sequence `seq` walks: the (query head of
// the group, query block) pairs [range.begin, pairs_end) of the sequence's q_blocks blocks per
// head, of which only blocks [block_lo, block_hi) may see one of its keys.
struct KeyWalk {
    key0: u32,
    key_last: u32,
    q_blocks: u32,
    pairs: u32,
    pairs_end: u32,
    block_lo: u32,
    block_hi: u32,
}

fn key_walk(seq: Sequence, keys_per_workgroup: u32) -> KeyWalk {
    let key0 = seq.block * keys_per_workgroup;
    let key_last = min(key0 + keys_per_workgroup, seq.n_k) - 1u;
    // Query i sees key j only if i + offset - left <= j (unless j is a sink) and
    // j <= i + offset + right.
    let offset = i32(seq.n_k) - i32(seq.n_q);
    let n_q = i32(seq.n_q);
    var q_lo = 0;
    if params.window_right >= 0 {
        q_lo = clamp(i32(key0) - params.window_right - offset, 0, n_q);
    }
    var q_hi = n_q;
    if params.window_left >= 0 && key0 >= params.sinks {
        q_hi = clamp(i32(key_last) + params.window_left - offset + 1, q_lo, n_q);
    }
    let q_blocks = (seq.n_q + BLOCK_Q - 1u) / BLOCK_Q;
    let pairs = params.q_heads / params.kv_heads * q_blocks;
    return KeyWalk(key0, key_last, q_blocks, pairs, min(range.end, pairs), u32(q_lo) / BLOCK_Q,
        (u32(q_hi) + BLOCK_Q - 1u) / BLOCK_Q);
}

// The first pair from t on whose query block may see the walk's keys (pairs_end or more if none).
fn next_pair(walk: KeyWalk, t: u32) -> u32 {
    let h = t / walk.q_blocks;
    let block = t % walk.q_blocks;
    if block < walk.block_lo {
        return h * walk.q_blocks + walk.block_lo;
    }
    if block >= walk.block_hi {
        return (h + 1u) * walk.q_blocks + walk.block_lo;
    }
    return t;
}

// Block-sparse: the runs of mask row `row` from the first that ends after the walk's first
// key tile, (run, runs_end); run = runs_end where none reaches into the walk's tiles.
fn walk_runs(walk: KeyWalk, row: u32) -> vec2<u32> {
    let runs_end = block_mask.words[row + 1u];
    let run = first_run_after(block_mask.words[row], runs_end, walk.key0 / BLOCK_K);
    if run == runs_end || run_field(run, 0u) > walk.key_last / BLOCK_K {
        return vec2(runs_end);
    }
    return vec2(run, runs_end);
}

// Block-sparse: how the runs (run, runs_end) list `tile`: (1 if they do, else 0; its element
// mask, FULL_RUN for a whole tile).
fn tile_listing(runs: vec2<u32>, tile: u32) -> vec2<u32> {
    let mine = first_run_after(runs.x, runs.y, tile);
    if mine == runs.y || run_field(mine, 0u) > tile {
        return vec2(0u, FULL_RUN);
    }
    let bits = run_field(mine, 2u);
    return vec2(1u, select(bits + tile - run_field(mine, 0u), FULL_RUN, bits == FULL_RUN));
}

// Where the carried accumulators start in `state`: after two statistics per query row.
fn accumulators_at() -> u32 {
    return 2u * params.batch * params.q_heads * params.n_q;
}

// The f32 values `state` holds, as bits.
fn state_f32(at: u32) -> f32 {
    return bitcast<f32>(state[at]);
}

fn state4(at: u32) -> vec4<f32> {
    return bitcast<vec4<f32>>(vec4(state[at], state[at + 1u], state[at + 2u], state[at + 3u]));
}

fn store_state(at: u32, x: f32) {
    state[at] = bitcast<u32>(x);
}

// Vec4 column c (elements [4c, 4c + 4)) of the row of a tensor that starts at element
// `row_start`, zeros past a head dim of `dim` (the loops run over the padded head dims): Q,
// K and V through shared/rows.wgsl, dO through d_out_word (the same for its binding), O
// element by element (only the preprocess reads it).
fn q4(row_start: u32, c: u32, dim: u32) -> vec4<f32> {
    return inside(q_word(row_start, c), c, dim);
}

fn k4(row_start: u32, c: u32, dim: u32) -> vec4<f32> {
    return inside(k_word(row_start, c), c, dim);
}

fn v4(row_start: u32, c: u32, dim: u32) -> vec4<f32> {
    return inside(v_word(row_start, c), c, dim);
}

fn d_out_word(row_start: u32, c: u32) -> vec4<f32> {
    let w = (row_start + 4u * c) / 4u;
    var hi = vec4(0.0);
    if !ALIGNED {
        hi = vec4<f32>(d_out[w + 1u]);
    }
    return assemble(vec4<f32>(d_out[w]), hi, row_start);
}

fn d_out4(row_start: u32, c: u32, dim: u32) -> vec4<f32> {
    return inside(d_out_word(row_start, c), c, dim);
}

fn out4(row_start: u32, c: u32, dim: u32) -> vec4<f32> {
    let a = row_start + 4u * c;
    return inside(vec4(f32(out[a]), f32(out[a + 1u]), f32(out[a + 2u]), f32(out[a + 3u])), c, dim);
}

// x with zeros in the elements of vec4 column c past a head dim of `dim`: they belong to
// the next row (or lie past the buffer), and 0 * NaN is not 0.
fn inside(x: vec4<f32>, c: u32, dim: u32) -> vec4<f32> {
    if ALIGNED {
        return select(vec4(0.0), x, 4u * c < dim);
    }
    return select(vec4(0.0), x, vec4(4u * c) + vec4(0u, 1u, 2u, 3u) < vec4(dim));
}

// The vec4 columns a head dim of `dim` has.
fn columns(dim: u32) -> u32 {
    return (dim + 3u) / 4u;
}

fn nonfinite4(x: vec4<f32>) -> bool {
    let exponent = vec4(0x7f800000u);
    return any((bitcast<vec4<u32>>(x) & exponent) == exponent);
}

fn is_neg_inf4(x: vec4<f32>) -> vec4<bool> {
    return bitcast<vec4<u32>>(x) == vec4(0xff800000u);
}

// Word `word` of slice `part` of a row (< QK4_T: of Q or K, else of dO or V) for rows
// 4g..4g+3 of what the threads of `groups` groups hold (SHUFFLE_ROWS), one row per matrix
// column.
fn from_lanes(g: u32, word: u32, groups: u32, part: u32) -> mat4x4<f32> {
    var m = mat4x4<f32>();
    for (var r = 0u; r < 4u; r++) {
        let x = 4u * g + r;
        m[r] = from_lane(lane_rows[min(x / groups * ROW_WORDS + word, LANE_WORDS - 1u)], x % groups * SPLIT + part);
    }
    return m;
}

// The statistics of rows 4g..4g+3 the threads hold, one row per matrix column.
fn stats_from_lanes(g: u32, groups: u32, part: u32) -> mat4x4<f32> {
    var m = mat4x4<f32>();
    for (var r = 0u; r < 4u; r++) {
        let x = 4u * g + r;
        m[r] = from_lane(lane_stats[x / groups], x % groups * SPLIT + part);
    }
    return m;
}

// Vec4 column i of slice `part` of a row.
fn slice_column(i: u32, part: u32) -> u32 {
    return part + i * SPLIT;
}

// Which pairs of a 4 x 4 block count, one vec4 per key over the block's queries: those the
// options let the queries on diagonals `diag` (row + n_k - n_q) of a sequence of n_k keys
// see (sequence_visible4, which also drops keys past n_k), of rows `rows_ok` and keys
// `keys_ok`, and under a block mask the bits `bits[j]` of key j's partial tile (FULL_RUN for
// a whole one), for queries `local` of the mask's query block.
fn block_sees(
    diag: vec4<i32>,
    rows_ok: vec4<bool>,
    keys: vec4<u32>,
    keys_ok: vec4<bool>,
    bits: vec4<u32>,
    local: vec4<u32>,
    n_k: u32,
) -> array<vec4<bool>, 4> {
    var sees = array<vec4<bool>, 4>();
    for (var j = 0u; j < 4u; j++) {
        var seen = rows_ok & vec4(keys_ok[j]) & sequence_visible4(diag, i32(keys[j]), n_k);
        if BLOCK_SPARSE && bits[j] != FULL_RUN {
            let kj = keys[j] % BLOCK_K;
            seen = seen & vec4(mask_bit(bits[j], local.x, kj), mask_bit(bits[j], local.y, kj),
                mask_bit(bits[j], local.z, kj), mask_bit(bits[j], local.w, kj));
        }
        sees[j] = seen;
    }
    return sees;
}

fn sees_none(sees: array<vec4<bool>, 4>) -> bool {
    return !(any(sees[0]) || any(sees[1]) || any(sees[2]) || any(sees[3]));
}

// The weights P of a block from its raw products s = q.k against the rows' base-2 LSE (0
// where a pair does not count), and the factor d(score)/d(scale s) that turns P (dP - D)
// into dS: 1, or 1 - tanh^2 under a softcap.
struct BlockWeights {
    p: mat4x4<f32>,
    dscore: mat4x4<f32>,
}

fn block_weights(s: mat4x4<f32>, lse2: vec4<f32>, sees: array<vec4<bool>, 4>) -> BlockWeights {
    var w = BlockWeights(mat4x4<f32>(), mat4x4(vec4(1.0), vec4(1.0), vec4(1.0), vec4(1.0)));
    for (var j = 0u; j < 4u; j++) {
        var x = s[j] * (params.scale * LOG2E);
        if params.softcap > 0.0 {
            let t = tanh(s[j] * (params.scale / params.softcap));
            x = params.softcap * t * LOG2E;
            w.dscore[j] = 1.0 - t * t;
        }
        w.p[j] = select(vec4(0.0), exp2(x - lse2), sees[j]);
    }
    return w;
}

// dS = P (dP - D) d(score)/d(scale s), 0 where the weight is: a NaN in dP stays out.
fn block_ds(w: BlockWeights, dp: mat4x4<f32>, d: vec4<f32>) -> mat4x4<f32> {
    var ds = mat4x4<f32>();
    for (var j = 0u; j < 4u; j++) {
        ds[j] = select(w.p[j] * (dp[j] - d) * w.dscore[j], vec4(0.0), is_zero4(w.p[j]));
    }
    return ds;
}

// n, through a value only known at run time (n_k is never 0), so that compilers keep the
// loops over the head dims rolled: unrolled, the register tiles of a d64 pass took llvmpipe
// twice as long to compile (tens of seconds per pipeline) and ran no faster.
fn rolled(n: u32) -> u32 {
    return select(n, 0u, params.n_k == 0u);
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
    store_state(2u * row, lse[row] * LOG2E);
    store_state(2u * row + 1u, d);
}

// dkdv_pass: vec4 column i of slice `part` of Q (or of dO) for the chunk's rows 4g..4g+3,
// whose rows of q are `rows`.
fn chunk_q(rows: vec4<u32>, g: u32, i: u32, part: u32) -> mat4x4<f32> {
    if SHUFFLE_ROWS {
        return from_lanes(g, i, KEY_GROUPS, part);
    }
    let c = slice_column(i, part);
    return mat4x4(q4(rows.x * params.d_qk, c, params.d_qk), q4(rows.y * params.d_qk, c, params.d_qk),
        q4(rows.z * params.d_qk, c, params.d_qk), q4(rows.w * params.d_qk, c, params.d_qk));
}

fn chunk_d_out(rows: vec4<u32>, g: u32, i: u32, part: u32) -> mat4x4<f32> {
    if SHUFFLE_ROWS {
        return from_lanes(g, QK4_T + i, KEY_GROUPS, part);
    }
    let c = slice_column(i, part);
    return mat4x4(d_out4(rows.x * params.d_v, c, params.d_v), d_out4(rows.y * params.d_v, c, params.d_v),
        d_out4(rows.z * params.d_v, c, params.d_v), d_out4(rows.w * params.d_v, c, params.d_v));
}

@compute @workgroup_size(KEY_THREADS)
fn dkdv_pass(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    if past_the_blocks(wg, groups.x) {
        return;
    }
    let seq = workgroup_sequence(wg, groups.x);
    let walk = key_walk(seq, KEYS_WG);
    if sequence_done(range.begin, walk.pairs) {
        return;
    }
    let key0 = walk.key0;
    let kv_head = seq.head;
    let batch = seq.batch;
    let group = params.q_heads / params.kv_heads;
    let offset = i32(seq.n_k) - i32(seq.n_q);
    // This thread: keys 4 key_group.. of the workgroup, slice `part` of their columns.
    // SHUFFLE_ROWS numbers the threads by subgroup lane, the ids shuffles take.
    let thread = select(tid, subgroup_lane(), SHUFFLE_ROWS);
    let key_group = thread / SPLIT;
    let part = thread % SPLIT;

    // This thread's keys, one per matrix column of its K, V, dK and dV tiles.
    let keys = vec4(key0 + 4u * key_group) + vec4(0u, 1u, 2u, 3u);
    let keys_valid = keys < vec4(seq.n_k);
    let kv_rows_before = (batch * params.kv_heads + kv_head) * params.n_k + seq.k_start;
    let key_rows = vec4(kv_rows_before) + min(keys, vec4(seq.n_k - 1u));
    var km = array<mat4x4<f32>, QK4_T>();
    var vm = array<mat4x4<f32>, DV4_T>();
    var dk_acc = array<mat4x4<f32>, QK4_T>();
    var dv_acc = array<mat4x4<f32>, DV4_T>();
    let carried = (range.flags & FIRST_PASS) == 0u;
    for (var j = 0u; j < 4u; j++) {
        let at = accumulators_at() + key_rows[j] * (DQK_PAD + DV_PAD);
        for (var i = 0u; i < rolled(QK4_T); i++) {
            let c = slice_column(i, part);
            km[i][j] = k4(key_rows[j] * params.d_qk, c, params.d_qk);
            if carried {
                dk_acc[i][j] = state4(at + 4u * c);
            }
        }
        for (var i = 0u; i < rolled(DV4_T); i++) {
            let c = slice_column(i, part);
            vm[i][j] = v4(key_rows[j] * params.d_v, c, params.d_v);
            if carried {
                dv_acc[i][j] = state4(at + DQK_PAD + 4u * c);
            }
        }
    }

    var t = range.begin;
    loop {
        // (Checked before next_pair too: a sequence without queries has no blocks to divide by.)
        if t >= walk.pairs_end {
            break;
        }
        t = next_pair(walk, t);
        if t >= walk.pairs_end {
            break;
        }
        let h = t / walk.q_blocks;
        let block = t % walk.q_blocks;
        let head = kv_head * group + h;

        // Block-sparse: skip, without loading it, a query block that lists none of this
        // workgroup's tiles; else find how each of this thread's keys' tiles is listed.
        var listed = vec4(true);
        var bits = vec4(FULL_RUN);
        if BLOCK_SPARSE {
            let runs = walk_runs(walk, mask_row(seq.mask_batch, head, block));
            if runs.x == runs.y {
                t += 1u;
                continue;
            }
            for (var j = 0u; j < 4u; j++) {
                let listing = tile_listing(runs, min(keys[j], walk.key_last) / BLOCK_K);
                listed[j] = listing.x == 1u;
                bits[j] = listing.y;
            }
        }
        let keys_ok = keys_valid & listed;

        let rows_before = (batch * params.q_heads + head) * params.n_q + seq.q_start;
        let block_rows = min(BLOCK_Q, seq.n_q - block * BLOCK_Q);
        for (var chunk0 = 0u; chunk0 < block_rows; chunk0 += CHUNK) {
            let first = block * BLOCK_Q + chunk0;
            let chunk_rows = min(CHUNK, block_rows - chunk0);
            if SHUFFLE_ROWS {
                // This thread's rows of the chunk, its slice of them, for the others.
                for (var u = 0u; u < CHUNK_PER_LANE; u++) {
                    let row = rows_before + min(first + u * KEY_GROUPS + key_group, seq.n_q - 1u);
                    var bad = false;
                    for (var i = 0u; i < rolled(QK4_T); i++) {
                        let x = q4(row * params.d_qk, slice_column(i, part), params.d_qk);
                        lane_rows[u * ROW_WORDS + i] = x;
                        bad = bad || nonfinite4(x);
                    }
                    for (var i = 0u; i < rolled(DV4_T); i++) {
                        let x = d_out4(row * params.d_v, slice_column(i, part), params.d_v);
                        lane_rows[u * ROW_WORDS + QK4_T + i] = x;
                        bad = bad || nonfinite4(x);
                    }
                    bad = split_any(bad, key_group, SPLIT);
                    lane_stats[u] = vec4(state_f32(2u * row), state_f32(2u * row + 1u), select(0.0, 1.0, bad), 0.0);
                }
            }
            for (var g = 0u; 4u * g < chunk_rows; g++) {
                let x = vec4(4u * g) + vec4(0u, 1u, 2u, 3u);
                let queries = vec4(first) + x;
                let rows = vec4(rows_before) + min(queries, vec4(seq.n_q - 1u));
                var stats = mat4x4<f32>();
                if SHUFFLE_ROWS {
                    stats = transpose(stats_from_lanes(g, KEY_GROUPS, part));
                } else {
                    for (var r = 0u; r < 4u; r++) {
                        stats[0][r] = state_f32(2u * rows[r]);
                        stats[1][r] = state_f32(2u * rows[r] + 1u);
                    }
                    stats[2] = vec4(1.0);
                }
                let lse2 = stats[0];
                let bad = any(stats[2] != vec4(0.0));
                let rows_ok = (x < vec4(chunk_rows)) & !is_neg_inf4(lse2);
                let diag = vec4<i32>(queries) + vec4(offset);
                let sees = block_sees(diag, rows_ok, keys, keys_ok, bits, vec4(chunk0) + x, seq.n_k);
                if !on_all_lanes(sees_none(sees)) {
                    var s = mat4x4<f32>();
                    for (var i = 0u; i < rolled(QK4_T); i++) {
                        s += transpose(chunk_q(rows, g, i, part)) * km[i];
                    }
                    s = split_sum(s, key_group, SPLIT);
                    let w = block_weights(s, lse2, sees);
                    var dp = mat4x4<f32>();
                    if bad {
                        for (var i = 0u; i < rolled(DV4_T); i++) {
                            let gc = chunk_d_out(rows, g, i, part);
                            dp += transpose(gc) * vm[i];
                            dv_acc[i] = add_nonzero_products(dv_acc[i], gc, w.p);
                        }
                    } else {
                        for (var i = 0u; i < rolled(DV4_T); i++) {
                            let gc = chunk_d_out(rows, g, i, part);
                            dp += transpose(gc) * vm[i];
                            dv_acc[i] += gc * w.p;
                        }
                    }
                    let ds = block_ds(w, split_sum(dp, key_group, SPLIT), stats[1]);
                    if bad {
                        for (var i = 0u; i < rolled(QK4_T); i++) {
                            dk_acc[i] = add_nonzero_products(dk_acc[i], chunk_q(rows, g, i, part), ds);
                        }
                    } else {
                        for (var i = 0u; i < rolled(QK4_T); i++) {
                            dk_acc[i] += chunk_q(rows, g, i, part) * ds;
                        }
                    }
                }
            }
        }
        t += 1u;
    }

    let last = sequence_last_pass(walk.pairs);
    for (var j = 0u; j < 4u; j++) {
        if !keys_valid[j] {
            break;
        }
        let at = accumulators_at() + key_rows[j] * (DQK_PAD + DV_PAD);
        for (var i = 0u; i < rolled(QK4_T); i++) {
            for (var e = 0u; e < 4u; e++) {
                let column = 4u * slice_column(i, part) + e;
                if !last {
                    store_state(at + column, dk_acc[i][j][e]);
                } else if column < params.d_qk {
                    dk[key_rows[j] * params.d_qk + column] = Elem(dk_acc[i][j][e] * params.scale);
                }
            }
        }
        for (var i = 0u; i < rolled(DV4_T); i++) {
            for (var e = 0u; e < 4u; e++) {
                let column = 4u * slice_column(i, part) + e;
                if !last {
                    store_state(at + DQK_PAD + column, dv_acc[i][j][e]);
                } else if column < params.d_v {
                    dv[key_rows[j] * params.d_v + column] = Elem(dv_acc[i][j][e]);
                }
            }
        }
    }
}

// dq_pass: vec4 column i of slice `part` of K (or of V) for the tile's keys 4g..4g+3, whose
// rows of k are `rows`.
fn tile_k(rows: vec4<u32>, g: u32, i: u32, part: u32) -> mat4x4<f32> {
    if SHUFFLE_ROWS {
        return from_lanes(g, i, ROW_GROUPS, part);
    }
    let c = slice_column(i, part);
    return mat4x4(k4(rows.x * params.d_qk, c, params.d_qk), k4(rows.y * params.d_qk, c, params.d_qk),
        k4(rows.z * params.d_qk, c, params.d_qk), k4(rows.w * params.d_qk, c, params.d_qk));
}

fn tile_v(rows: vec4<u32>, g: u32, i: u32, part: u32) -> mat4x4<f32> {
    if SHUFFLE_ROWS {
        return from_lanes(g, QK4_T + i, ROW_GROUPS, part);
    }
    let c = slice_column(i, part);
    return mat4x4(v4(rows.x * params.d_v, c, params.d_v), v4(rows.y * params.d_v, c, params.d_v),
        v4(rows.z * params.d_v, c, params.d_v), v4(rows.w * params.d_v, c, params.d_v));
}

@compute @workgroup_size(ROW_THREADS)
fn dq_pass(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    if past_the_blocks(wg, groups.x) {
        return;
    }
    let seq = workgroup_sequence(wg, groups.x);
    if sequence_done(range.begin, seq.n_k) {
        return;
    }
    let row0 = seq.block * BLOCK_Q;
    let head = seq.head;
    let batch = seq.batch;
    let kv_head = kv_head_of(head, params.q_heads, params.kv_heads);
    let k_base = (batch * params.kv_heads + kv_head) * params.n_k + seq.k_start;
    let offset = i32(seq.n_k) - i32(seq.n_q);
    // This thread: rows 4 row_group.. of the block, slice `part` of their columns.
    let thread = select(tid, subgroup_lane(), SHUFFLE_ROWS);
    let row_group = thread / SPLIT;
    let part = thread % SPLIT;

    // This thread's rows (of the block, and of q), one per matrix column of its Q, dO and dQ
    // tiles.
    let local = vec4(4u * row_group) + vec4(0u, 1u, 2u, 3u);
    let queries = vec4(row0) + local;
    let rows_valid = (local < vec4(BLOCK_Q)) & (queries < vec4(seq.n_q));
    let rows_before = (batch * params.q_heads + head) * params.n_q + seq.q_start;
    let rows = vec4(rows_before) + min(queries, vec4(seq.n_q - 1u));
    var lse2 = vec4(0.0);
    var d = vec4(0.0);
    var qm = array<mat4x4<f32>, QK4_T>();
    var gm = array<mat4x4<f32>, DV4_T>();
    var dq_acc = array<mat4x4<f32>, QK4_T>();
    let carried = (range.flags & FIRST_PASS) == 0u;
    for (var r = 0u; r < 4u; r++) {
        lse2[r] = state_f32(2u * rows[r]);
        d[r] = state_f32(2u * rows[r] + 1u);
        let at = accumulators_at() + rows[r] * DQK_PAD;
        for (var i = 0u; i < rolled(QK4_T); i++) {
            let c = slice_column(i, part);
            qm[i][r] = q4(rows[r] * params.d_qk, c, params.d_qk);
            if carried {
                dq_acc[i][r] = state4(at + 4u * c);
            }
        }
        for (var i = 0u; i < rolled(DV4_T); i++) {
            gm[i][r] = d_out4(rows[r] * params.d_v, slice_column(i, part), params.d_v);
        }
    }
    let rows_ok = rows_valid & !is_neg_inf4(lse2);
    let diag = vec4<i32>(queries) + vec4(offset);

    // The tiles this block sees in this pass (shared/block_mask.wgsl).
    let last_row = min(row0 + BLOCK_Q, seq.n_q) - 1u;
    var walk = sequence_tile_walk(seq.n_q, seq.n_k, range.begin / BLOCK_K, range.end, row0, last_row, seq.mask_batch,
        head, seq.block);
    while next_tile(&walk) {
        let key0 = walk.t * BLOCK_K;
        let bits = vec4(tile_bits(walk));
        let tile_keys = u32(min(walk.keys_end - i32(key0), i32(BLOCK_K)));
        if SHUFFLE_ROWS {
            // This thread's keys of the tile, its slice of them, for the others.
            for (var u = 0u; u < TILE_PER_LANE; u++) {
                let key = k_base + min(key0 + u * ROW_GROUPS + row_group, seq.n_k - 1u);
                var bad = false;
                for (var i = 0u; i < rolled(QK4_T); i++) {
                    let x = k4(key * params.d_qk, slice_column(i, part), params.d_qk);
                    lane_rows[u * ROW_WORDS + i] = x;
                    bad = bad || nonfinite4(x);
                }
                for (var i = 0u; i < rolled(DV4_T); i++) {
                    let x = v4(key * params.d_v, slice_column(i, part), params.d_v);
                    lane_rows[u * ROW_WORDS + QK4_T + i] = x;
                    bad = bad || nonfinite4(x);
                }
                bad = split_any(bad, row_group, SPLIT);
                lane_stats[u] = vec4(0.0, 0.0, select(0.0, 1.0, bad), 0.0);
            }
        }
        for (var g = 0u; 4u * g < tile_keys; g++) {
            let x = vec4(4u * g) + vec4(0u, 1u, 2u, 3u);
            let keys = vec4(key0) + x;
            let keys_ok = (x < vec4(BLOCK_K)) & (vec4<i32>(keys) < vec4(walk.keys_end));
            let key_rows = vec4(k_base) + min(keys, vec4(seq.n_k - 1u));
            var bad = true;
            if SHUFFLE_ROWS {
                bad = any(transpose(stats_from_lanes(g, ROW_GROUPS, part))[2] != vec4(0.0));
            }
            let sees = block_sees(diag, rows_ok, keys, keys_ok, bits, local, seq.n_k);
            if !on_all_lanes(sees_none(sees)) {
                var s = mat4x4<f32>();
                for (var i = 0u; i < rolled(QK4_T); i++) {
                    s += transpose(qm[i]) * tile_k(key_rows, g, i, part);
                }
                let w = block_weights(split_sum(s, row_group, SPLIT), lse2, sees);
                var dp = mat4x4<f32>();
                for (var i = 0u; i < rolled(DV4_T); i++) {
                    dp += transpose(gm[i]) * tile_v(key_rows, g, i, part);
                }
                let ds = transpose(block_ds(w, split_sum(dp, row_group, SPLIT), d));
                if bad {
                    for (var i = 0u; i < rolled(QK4_T); i++) {
                        dq_acc[i] = add_nonzero_products(dq_acc[i], tile_k(key_rows, g, i, part), ds);
                    }
                } else {
                    for (var i = 0u; i < rolled(QK4_T); i++) {
                        dq_acc[i] += tile_k(key_rows, g, i, part) * ds;
                    }
                }
            }
        }
        walk.t += 1u;
    }

    let last = sequence_last_pass(seq.n_k);
    for (var r = 0u; r < 4u; r++) {
        if !rows_valid[r] {
            break;
        }
        let at = accumulators_at() + rows[r] * DQK_PAD;
        for (var i = 0u; i < rolled(QK4_T); i++) {
            for (var e = 0u; e < 4u; e++) {
                let column = 4u * slice_column(i, part) + e;
                if !last {
                    store_state(at + column, dq_acc[i][r][e]);
                } else if column < params.d_qk {
                    dq[rows[r] * params.d_qk + column] = Elem(dq_acc[i][r][e] * params.scale);
                }
            }
        }
    }
}

// Head dims above 64 where a pass's workgroup is not one subgroup: `dkdv_wide` and
// `dq_wide` give each thread one key (WIDE_KEYS_WG per workgroup) or one query row and read
// the other side's rows word by word, 4 FMAs per vec4 read.

// The weight P of a pair with raw product s = q.k against the row's base-2 LSE, and the
// factor d(score)/d(scale s) that turns P (dP - D) into dS: 1, or 1 - tanh^2 under a softcap.
fn weight(s: f32, lse2: f32) -> vec2<f32> {
    if params.softcap > 0.0 {
        let t = tanh(s * params.scale / params.softcap);
        return vec2(exp2(params.softcap * t * LOG2E - lse2), 1.0 - t * t);
    }
    return vec2(exp2(s * (params.scale * LOG2E) - lse2), 1.0);
}

@compute @workgroup_size(WIDE_KEYS_WG)
fn dkdv_wide(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    if past_the_blocks(wg, groups.x) {
        return;
    }
    let seq = workgroup_sequence(wg, groups.x);
    let walk = key_walk(seq, WIDE_KEYS_WG);
    if sequence_done(range.begin, walk.pairs) {
        return;
    }
    let kv_head = seq.head;
    let batch = seq.batch;
    let key = walk.key0 + tid;
    let valid = key < seq.n_k;
    let group = params.q_heads / params.kv_heads;
    let key_row = (batch * params.kv_heads + kv_head) * params.n_k + seq.k_start + min(key, seq.n_k - 1u);
    let offset = i32(seq.n_k) - i32(seq.n_q);
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
                dk_acc[c] = state4(s);
            }
        }
    }
    for (var c = 0u; c < DV4; c++) {
        if c < v_columns && valid {
            vr[c] = v4(key_row * params.d_v, c, params.d_v);
            if (range.flags & FIRST_PASS) == 0u {
                let s = at + DQK_PAD + 4u * c;
                dv_acc[c] = state4(s);
            }
        }
    }

    var t = range.begin;
    loop {
        // (Checked before next_pair too: a sequence without queries has no blocks to divide by.)
        if t >= walk.pairs_end {
            break;
        }
        t = next_pair(walk, t);
        if t >= walk.pairs_end {
            break;
        }
        let h = t / walk.q_blocks;
        let block = t % walk.q_blocks;
        let head = kv_head * group + h;

        // Block-sparse: skip, without loading it, a query block that lists none of this
        // workgroup's tiles; else find how this thread's tile is listed.
        var listed = true;
        var bits = FULL_RUN;
        if BLOCK_SPARSE {
            let runs = walk_runs(walk, mask_row(seq.mask_batch, head, block));
            if runs.x == runs.y {
                t += 1u;
                continue;
            }
            let listing = tile_listing(runs, min(key, walk.key_last) / BLOCK_K);
            listed = listing.x == 1u;
            bits = listing.y;
        }

        let rows_before = (batch * params.q_heads + head) * params.n_q + seq.q_start;
        for (var r = 0u; r < BLOCK_Q; r++) {
            let i = block * BLOCK_Q + r;
            if i >= seq.n_q {
                break;
            }
            let row = rows_before + i;
            let q_start = row * params.d_qk;
            let o_start = row * params.d_v;
            let lse2 = state_f32(2u * row);
            let diag = vec4(i32(i) + offset);
            var sees = valid && listed && !is_neg_inf(lse2) && sequence_visible4(diag, i32(key), seq.n_k).x;
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
                let ds = p * (dp - state_f32(2u * row + 1u)) * w.y;
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
    let last = sequence_last_pass(walk.pairs);
    for (var c = 0u; c < QK4; c++) {
        for (var e = 0u; e < 4u; e++) {
            let column = 4u * c + e;
            if !last {
                store_state(at + column, dk_acc[c][e]);
            } else if column < params.d_qk {
                dk[key_row * params.d_qk + column] = Elem(dk_acc[c][e] * params.scale);
            }
        }
    }
    for (var c = 0u; c < DV4; c++) {
        for (var e = 0u; e < 4u; e++) {
            let column = 4u * c + e;
            if !last {
                store_state(at + DQK_PAD + column, dv_acc[c][e]);
            } else if column < params.d_v {
                dv[key_row * params.d_v + column] = Elem(dv_acc[c][e]);
            }
        }
    }
}

@compute @workgroup_size(BLOCK_Q)
fn dq_wide(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    if past_the_blocks(wg, groups.x) {
        return;
    }
    let seq = workgroup_sequence(wg, groups.x);
    if sequence_done(range.begin, seq.n_k) {
        return;
    }
    let row0 = seq.block * BLOCK_Q;
    let head = seq.head;
    let batch = seq.batch;
    let i = row0 + tid;
    let valid = i < seq.n_q;
    let kv_head = kv_head_of(head, params.q_heads, params.kv_heads);
    let row = (batch * params.q_heads + head) * params.n_q + seq.q_start + min(i, seq.n_q - 1u);
    let k_base = (batch * params.kv_heads + kv_head) * params.n_k + seq.k_start;
    let offset = i32(seq.n_k) - i32(seq.n_q);
    let qk_columns = columns(params.d_qk);
    let v_columns = columns(params.d_v);
    let lse2 = state_f32(2u * row);
    let d = state_f32(2u * row + 1u);
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
                dq_acc[c] = state4(at + 4u * c);
            }
        }
    }
    for (var c = 0u; c < DV4; c++) {
        if c < v_columns && valid {
            gr[c] = d_out4(row * params.d_v, c, params.d_v);
        }
    }

    // The tiles this block sees in this pass (shared/block_mask.wgsl).
    let last_row = min(row0 + BLOCK_Q, seq.n_q) - 1u;
    var walk = sequence_tile_walk(seq.n_q, seq.n_k, range.begin / BLOCK_K, range.end, row0, last_row, seq.mask_batch,
        head, seq.block);
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
            var sees = sees_any && sequence_visible4(vec4(diag), i32(key), seq.n_k).x;
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
    let last = sequence_last_pass(seq.n_k);
    for (var c = 0u; c < QK4; c++) {
        for (var e = 0u; e < 4u; e++) {
            let column = 4u * c + e;
            if !last {
                store_state(at + column, dq_acc[c][e]);
            } else if column < params.d_qk {
                dq[row * params.d_qk + column] = Elem(dq_acc[c][e] * params.scale);
            }
        }
    }
}
