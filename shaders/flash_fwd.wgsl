// Register-tiled flash-attention forward with online softmax (FlashAttention-2's loop order).
//
// One workgroup owns BLOCK_Q query rows of one (batch, head) and walks the key/value tiles
// of BLOCK_K keys that some row of the block can see. Each thread owns ROWS = 4 ROW_GROUPS
// query rows in registers, as groups of four: a 4 x 4 tile of scores is a mat4x4, so
// S = Q K^T for four keys is `transpose(Kc) * Qc` and O += P V is `Vc * P^T` for each vec4
// column c of the head dims, matrix expressions that compilers turn into straight-line FMAs
// (16 per vec4 loaded). Each thread keeps its rows' Q and O in registers for the whole key
// loop.
//
// SPLIT threads may share a row group, each owning the vec4 columns c = lane, lane + SPLIT,
// ... of Q and O: each computes a partial S over its columns, and the partials are summed
// in a fixed order (through workgroup memory, or by shuffles with SHUFFLE_KV), so every
// thread of the group holds the same S and the same softmax state. SPLIT = 1 keeps whole rows per thread (CPU adapters: registers
// are plentiful); GPUs split the head dims to bound registers per thread.
//
// K/V tiles are staged through workgroup memory by the whole workgroup (STAGE_KV: coalesced
// vec4 loads, shared by all row groups; two barriers per tile), read by each thread straight
// from memory (a workgroup of one subgroup on a CPU adapter, where the threads' reads of the
// same key are one load and there are no barriers at all), or (SHUFFLE_KV) read by each
// thread for its own keys, its slice of their columns, and handed by subgroup shuffles to
// the threads with the same slice: on llvmpipe every load runs once per thread anyway, so
// this one brings a different word to each (the host runs it only where the workgroup is
// exactly one subgroup).
//
// Loads are vec4 words of the tensors (array<vec4<Elem>>): rows whose head dim is not a
// multiple of 4 (ALIGNED false) start inside a word and are read from two words. The hot
// loop reads them unmasked where that is safe (see k_columns): a select per load halved the
// kernel's speed on llvmpipe.
//
// Tiles every row of a thread sees whole take the fast path. Other tiles test each element
// (window, causal diagonal, block-mask bits) and accumulate P V element by element, skipping
// zero weights: a masked key's V may hold a NaN, and 0 * NaN in a matrix product would leak
// it into rows that cannot see it.
//
// Software adapters may cap the loop iterations one invocation runs (llvmpipe stops every
// loop after 65535 in total), so the host can split the keys into passes: each dispatch
// walks keys [key_begin, key_end) and carries the rows' unnormalised (o, m, l) to the next
// through `state`. On GPUs there is one pass and `state` is never touched.
//
// Block-sparse variants (BLOCK_SPARSE) visit only the tiles a block mask lists for the
// workgroup's (batch, head, query block): runs of consecutive tiles in key order, each
// full (no element test) or partial (one mask bit per element). The mask's blocks are the
// tiles. The dense options (window, sinks) still apply on top.
//
// Varlen variants (VARLEN) run sequences packed along the sequence axis of one batch: the
// grid's x (wrapped into z past the device's limit) counts the (query block, head) pairs of
// every sequence, a block's heads adjacent so that neighbouring workgroups read the same
// sequence's K/V (in sequence-major order, llvmpipe ran 7% slower than one launch per
// sequence). `query_blocks` gives each block its sequence, its block within it, and the
// sequence's first query and key rows and its lengths. Every length and diagonal below is the
// sequence's (`seq`), so a sequence sees only its own keys, aligned bottom-right to its own
// queries, and no workgroup or tile exists for what is not there. Key passes walk
// per-sequence key ranges: a sequence's last pass is the one that reaches its last key (or
// the first, when it has none), and the passes after it return at once. The block mask's
// batch axis is the sequence.
//
// Constants come from the prelude made by src/shader.rs: Elem (f32 or f16), BLOCK_Q,
// BLOCK_K (a multiple of 4), ROW_GROUPS, SPLIT, STAGE_KV, SHUFFLE_KV, DQK_PAD, DV_PAD (head dims rounded
// up to 16), ALIGNED, QK_TAIL (Dqk is not a multiple of 16), BLOCK_SPARSE and VARLEN. Params, Sequence, sequence_visible4() and add_nonzero_products come from shared/attention.wgsl, the row readers (q_word, k_word, v_word) from shared/rows.wgsl,
// MASKED and the softmax steps (base 2) from shared/softmax.wgsl, the block mask's layout
// and walk from shared/block_mask.wgsl, and the lane helpers (subgroup_lane, from_lane,
// on_all_lanes) from shared/lanes_subgroup.wgsl or shared/lanes_none.wgsl.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<Elem>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<Elem>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<Elem>>;
@group(0) @binding(4) var<storage, read_write> out: array<Elem>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;
// Per row: m, l, then DV_PAD columns of o.
@group(0) @binding(6) var<storage, read_write> state: array<f32>;

// The block mask (shared/block_mask.wgsl); unused by dense variants.
@group(0) @binding(7) var<storage, read> block_mask: BlockMask;

// Keep in sync with `SequenceBlock` in src/attention/varlen.rs (a test compares the layouts).
// A query block of the varlen grid: its sequence, its block within that sequence, and the
// sequence's first rows in the packed Q and K/V and its lengths. One binding, not a table of
// sequences beside one of blocks: WebGPU's default limit is 8 storage buffers per stage.
struct SequenceBlock {
    sequence: u32,
    block: u32,
    q_start: u32,
    k_start: u32,
    n_q: u32,
    n_k: u32,
}

// VARLEN only (dense variants bind a stand-in they never read).
@group(0) @binding(8) var<storage, read> query_blocks: array<SequenceBlock>;

fn workgroup_sequence(wg: vec3<u32>, groups_x: u32) -> Sequence {
    if VARLEN {
        let x = varlen_workgroup(wg, groups_x);
        let b = query_blocks[x / params.q_heads];
        return Sequence(0u, b.sequence, b.block, x % params.q_heads, b.q_start, b.k_start, b.n_q, b.n_k);
    }
    return Sequence(wg.z, wg.z, wg.x, wg.y, 0u, 0u, params.n_q, params.n_k);
}

const ROWS: u32 = 4u * ROW_GROUPS;
const WORKGROUP: u32 = BLOCK_Q / ROWS * SPLIT;
const STEPS: u32 = BLOCK_K / 4u;
const QK4: u32 = DQK_PAD / 4u;
const DV4: u32 = DV_PAD / 4u;
// vec4 columns of Q and O per thread (SPLIT divides both: it is at most 4, and the padded
// head dims are multiples of 16).
const QK4_T: u32 = QK4 / SPLIT;
const DV4_T: u32 = DV4 / SPLIT;
const MASK_WORDS: u32 = (BLOCK_Q * BLOCK_K + 31u) / 32u;
// Workgroup arrays cannot be empty: a variant that does not use one declares one element.
const KV_TILE_QK: u32 = select(1u, BLOCK_K * QK4, STAGE_KV);
const KV_TILE_V: u32 = select(1u, BLOCK_K * DV4, STAGE_KV);
const PARTIALS: u32 = select(1u, WORKGROUP * ROW_GROUPS * STEPS, SPLIT > 1u && !SHUFFLE_KV);
// SHUFFLE_KV: the keys of a tile each thread holds, its own slice of their columns. The
// threads of row group h hold keys u * HOLDERS + h, so every slice of every key is on the
// thread that uses the same slice.
const HOLDERS: u32 = WORKGROUP / SPLIT;
const KEYS_PER_LANE: u32 = select(1u, BLOCK_K / HOLDERS, SHUFFLE_KV);
const LANE_QK: u32 = select(1u, KEYS_PER_LANE * QK4_T, SHUFFLE_KV);
const LANE_V: u32 = select(1u, KEYS_PER_LANE * DV4_T, SHUFFLE_KV);

var<workgroup> k_tile: array<vec4<f32>, KV_TILE_QK>;
var<workgroup> v_tile: array<vec4<f32>, KV_TILE_V>;
var<workgroup> partial_s: array<mat4x4<f32>, PARTIALS>;
var<private> k_lane: array<vec4<f32>, LANE_QK>;
var<private> v_lane: array<vec4<f32>, LANE_V>;

// x with zeros in the elements of vec4 column c past a head dim of `dim`, or everywhere
// when !valid.
fn inside(x: vec4<f32>, c: u32, dim: u32, valid: bool) -> vec4<f32> {
    let columns = vec4(4u * c) + vec4(0u, 1u, 2u, 3u) < vec4(dim);
    return select(vec4(0.0), x, columns & vec4(valid));
}

// Column c = lane + SPLIT i of keys [key0 + j0, key0 + j0 + 4) of K, one key per matrix
// column: from the staged tile, from the threads holding them (SHUFFLE_KV: the thread of
// the key's row group with the same lane), or from memory, where keys past n_k are left as they are (their scores are
// masked) and so are V's columns past Dv (never written), but K's columns past Dqk must be
// zeros (QK_TAIL): Q's are, and 0 * NaN is not.
fn k_columns(k_base: u32, key0: u32, j0: u32, lane: u32, i: u32) -> mat4x4<f32> {
    let c = lane + i * SPLIT;
    var keys = mat4x4<f32>();
    for (var j = 0u; j < 4u; j++) {
        let key = j0 + j;
        if STAGE_KV {
            keys[j] = k_tile[min(key * QK4 + c, KV_TILE_QK - 1u)];
        } else if SHUFFLE_KV {
            keys[j] = from_lane(k_lane[min(key / HOLDERS * QK4_T + i, LANE_QK - 1u)], key % HOLDERS * SPLIT + lane);
        } else {
            keys[j] = k_word(k_base + (key0 + j0 + j) * params.d_qk, c);
            if QK_TAIL {
                keys[j] = inside(keys[j], c, params.d_qk, true);
            }
        }
    }
    return keys;
}

// The same for V.
fn v_columns(v_base: u32, key0: u32, j0: u32, lane: u32, i: u32) -> mat4x4<f32> {
    let c = lane + i * SPLIT;
    var values = mat4x4<f32>();
    for (var j = 0u; j < 4u; j++) {
        let key = j0 + j;
        if STAGE_KV {
            values[j] = v_tile[min(key * DV4 + c, KV_TILE_V - 1u)];
        } else if SHUFFLE_KV {
            values[j] = from_lane(v_lane[min(key / HOLDERS * DV4_T + i, LANE_V - 1u)], key % HOLDERS * SPLIT + lane);
        } else {
            values[j] = v_word(v_base + (key0 + j0 + j) * params.d_v, c);
        }
    }
    return values;
}

// Softcapped scores, in base-2 units (the scale is already in Q).
fn capped(x: vec4<f32>) -> vec4<f32> {
    return params.softcap * tanh(x / params.softcap) * LOG2E;
}

// Scores x (column j: key key0 + j0 + j for rows row..row + 3, `local`.. within the block)
// with MASKED where a row does not see the key: window, causal, n_k, and the element mask
// number `bits` of a partial block-mask tile (FULL_RUN for none), in sequence `seq`.
fn masked_scores(x: mat4x4<f32>, row: u32, local: u32, key0: u32, j0: u32, bits: u32, seq: Sequence) -> mat4x4<f32> {
    let diag = vec4(i32(row) + i32(seq.n_k) - i32(seq.n_q)) + vec4(0, 1, 2, 3);
    var masked = x;
    for (var j = 0u; j < 4u; j++) {
        let kj = j0 + j;
        var seen = sequence_visible4(diag, i32(key0 + kj), seq.n_k);
        if bits != FULL_RUN {
            seen = seen & vec4(mask_bit(bits, local, kj), mask_bit(bits, local + 1u, kj),
                mask_bit(bits, local + 2u, kj), mask_bit(bits, local + 3u, kj));
        }
        masked[j] = select(vec4(MASKED), x[j], seen);
    }
    return masked;
}

// The first head-dim column of vec4 column i of a thread's slice.
fn slice_column(i: u32, lane: u32) -> u32 {
    return 4u * (lane + i * SPLIT);
}

@compute @workgroup_size(WORKGROUP)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    if VARLEN && varlen_workgroup(wg, groups.x) >= arrayLength(&query_blocks) * params.q_heads {
        return; // past the last query block of a grid wrapped into z
    }
    let seq = workgroup_sequence(wg, groups.x);
    if VARLEN && params.key_begin > 0u && params.key_begin >= seq.n_k {
        return; // the sequence's last pass has written its rows
    }
    let last_pass = (params.pass_flags & LAST_PASS) != 0u || (VARLEN && params.key_end >= seq.n_k);
    let row0 = seq.block * BLOCK_Q;
    let head = seq.head;
    let kv_head = kv_head_of(head, params.q_heads, params.kv_heads);
    let bh = seq.batch * params.q_heads + head;
    // The rows of O, LSE and the pass state, and of K/V, before the sequence's first.
    let rows_before = bh * params.n_q + seq.q_start;
    let kv_rows_before = (seq.batch * params.kv_heads + kv_head) * params.n_k + seq.k_start;
    let q_base = rows_before * params.d_qk;
    let k_base = kv_rows_before * params.d_qk;
    let v_base = kv_rows_before * params.d_v;
    let offset = i32(seq.n_k) - i32(seq.n_q);

    // This thread: rows [my_row0, my_row0 + ROWS) of the block, vec4 columns lane + SPLIT i.
    // SHUFFLE_KV numbers the threads by subgroup lane, the ids shuffles take.
    let thread = select(tid, subgroup_lane(), SHUFFLE_KV);
    let group = thread / SPLIT;
    let lane = thread % SPLIT;
    let my_local0 = group * ROWS;
    let my_row0 = row0 + my_local0;

    let last_row = min(row0 + BLOCK_Q, seq.n_q) - 1u;
    // This thread's first and last diagonals, for its own whole-tile test.
    let my_diag_first = i32(my_row0) + offset;
    let my_diag_last = i32(min(my_row0 + ROWS, seq.n_q) - 1u) + offset;

    // The scores' scale: with a softcap the scale goes inside the tanh and log2(e) after it.
    let q_scale = params.scale * select(LOG2E, 1.0, params.softcap > 0.0);
    var qm = array<mat4x4<f32>, ROW_GROUPS * QK4_T>();
    for (var g = 0u; g < ROW_GROUPS; g++) {
        for (var i = 0u; i < QK4_T; i++) {
            let c = lane + i * SPLIT;
            var cols = mat4x4<f32>();
            for (var r = 0u; r < 4u; r++) {
                let row = my_row0 + 4u * g + r;
                cols[r] = inside(q_word(q_base + row * params.d_qk, c), c, params.d_qk, row < seq.n_q);
            }
            qm[g * QK4_T + i] = cols;
        }
    }

    var m = array<vec4<f32>, ROW_GROUPS>();
    var l = array<vec4<f32>, ROW_GROUPS>();
    var o = array<mat4x4<f32>, ROW_GROUPS * DV4_T>();
    let state_stride = DV_PAD + 2u;
    for (var g = 0u; g < ROW_GROUPS; g++) {
        m[g] = vec4(MASKED);
        if (params.pass_flags & FIRST_PASS) == 0u {
            for (var r = 0u; r < 4u; r++) {
                let at = (rows_before + min(my_row0 + 4u * g + r, seq.n_q - 1u)) * state_stride;
                m[g][r] = state[at];
                l[g][r] = state[at + 1u];
                for (var i = 0u; i < DV4_T; i++) {
                    let c = at + 2u + slice_column(i, lane);
                    o[g * DV4_T + i][r] = vec4(state[c], state[c + 1u], state[c + 2u], state[c + 3u]);
                }
            }
        }
    }

    // The tiles this block sees in this pass (shared/block_mask.wgsl).
    var walk = sequence_tile_walk(seq.n_q, seq.n_k, params.key_begin / BLOCK_K, params.key_end, row0, last_row,
        seq.mask_batch, head, seq.block);
    while next_tile(&walk) {
        let t = walk.t;
        let key0 = t * BLOCK_K;

        if STAGE_KV {
            // The previous tile's readers are done; stage this tile's K and V rows.
            workgroupBarrier();
            for (var e = tid; e < BLOCK_K * QK4; e += WORKGROUP) {
                let key = key0 + e / QK4;
                k_tile[e] = inside(k_word(k_base + key * params.d_qk, e % QK4), e % QK4, params.d_qk, key < seq.n_k);
            }
            for (var e = tid; e < BLOCK_K * DV4; e += WORKGROUP) {
                let key = key0 + e / DV4;
                v_tile[e] = inside(v_word(v_base + key * params.d_v, e % DV4), e % DV4, params.d_v, key < seq.n_k);
            }
            workgroupBarrier();
        }
        if SHUFFLE_KV {
            // This thread's keys of the tile, its slice of their columns; past n_k the last key
            // stands in (its scores are masked, and such tiles take the element path that
            // skips zero weights).
            for (var u = 0u; u < KEYS_PER_LANE; u++) {
                let key = min(key0 + u * HOLDERS + group, seq.n_k - 1u);
                for (var i = 0u; i < QK4_T; i++) {
                    let c = lane + i * SPLIT;
                    k_lane[u * QK4_T + i] = inside(k_word(k_base + key * params.d_qk, c), c, params.d_qk, true);
                }
                for (var i = 0u; i < DV4_T; i++) {
                    v_lane[u * DV4_T + i] = v_word(v_base + key * params.d_v, lane + i * SPLIT);
                }
            }
        }

        // S = Q K^T for this tile: s[g * STEPS + step] holds rows 4g.. x keys 4 step.., one
        // column per row (this thread's columns only when SPLIT > 1). The inner loops touch
        // the register arrays only by their own counters, so compilers can unroll them.
        var s = array<mat4x4<f32>, ROW_GROUPS * STEPS>();
        for (var step = 0u; step < STEPS; step++) {
            var acc = array<mat4x4<f32>, ROW_GROUPS>();
            for (var i = 0u; i < QK4_T; i++) {
                let kc = transpose(k_columns(k_base, key0, 4u * step, lane, i));
                for (var g = 0u; g < ROW_GROUPS; g++) {
                    acc[g] += kc * qm[g * QK4_T + i];
                }
            }
            for (var g = 0u; g < ROW_GROUPS; g++) {
                s[g * STEPS + step] = acc[g];
            }
        }
        if SPLIT > 1u && SHUFFLE_KV {
            // Sum the group's partial scores, in lane order for every thread of the group.
            for (var i = 0u; i < ROW_GROUPS * STEPS; i++) {
                s[i] = split_sum(s[i], group, SPLIT);
            }
        } else if SPLIT > 1u {
            // The same through workgroup memory.
            for (var i = 0u; i < ROW_GROUPS * STEPS; i++) {
                partial_s[min(tid * ROW_GROUPS * STEPS + i, PARTIALS - 1u)] = s[i];
            }
            workgroupBarrier();
            for (var i = 0u; i < ROW_GROUPS * STEPS; i++) {
                var total = mat4x4<f32>();
                for (var p = 0u; p < SPLIT; p++) {
                    total += partial_s[min((group * SPLIT + p) * ROW_GROUPS * STEPS + i, PARTIALS - 1u)];
                }
                s[i] = total;
            }
        }

        // Which keys of the tile this thread's rows see: all of them (whole), or by element.
        let bits = tile_bits(walk);
        let partial = BLOCK_SPARSE && bits != FULL_RUN;
        let tile_last = i32(key0 + BLOCK_K) - 1;
        // With SHUFFLE_KV, whole for every lane or none: the P V branches hold shuffles.
        let whole = on_all_lanes(!partial && tile_last < i32(seq.n_k)
            && (params.window_right < 0 || tile_last <= my_diag_first + params.window_right)
            && (params.window_left < 0 || i32(key0) >= my_diag_last - params.window_left
                || tile_last < i32(params.sinks)));

        // Online softmax per row group: cap, mask, new running max, rescale, weights.
        var alphas = array<vec4<f32>, ROW_GROUPS>();
        for (var g = 0u; g < ROW_GROUPS; g++) {
            var m_new = m[g];
            for (var step = 0u; step < STEPS; step++) {
                // x[j]: key 4 step + j's scores for the group's four rows.
                var x = transpose(s[g * STEPS + step]) * q_scale;
                if params.softcap > 0.0 {
                    x = mat4x4(capped(x[0]), capped(x[1]), capped(x[2]), capped(x[3]));
                }
                if !whole {
                    x = masked_scores(x, my_row0 + 4u * g, my_local0 + 4u * g, key0, 4u * step, bits, seq);
                }
                m_new = max(m_new, max(max(x[0], x[1]), max(x[2], x[3])));
                s[g * STEPS + step] = x;
            }
            let alpha = rescale_factor4(m[g], m_new);
            m[g] = m_new;
            var sum = vec4(0.0);
            for (var step = 0u; step < STEPS; step++) {
                let x = s[g * STEPS + step];
                let p = mat4x4(softmax_weight4(x[0], m_new), softmax_weight4(x[1], m_new),
                    softmax_weight4(x[2], m_new), softmax_weight4(x[3], m_new));
                sum += p[0] + p[1] + p[2] + p[3];
                // Back to one column per row: p[r][j] is row r's weight of key 4 step + j.
                s[g * STEPS + step] = transpose(p);
            }
            l[g] = l[g] * alpha + sum;
            alphas[g] = alpha;
        }

        // O = alpha O + P V in one pass over O per tile: each vec4 column of the head dims goes
        // through every key of the tile before the next. O is the largest state a thread
        // holds and compilers keep it in memory, so passes over it cost: on llvmpipe a
        // separate pass for the rescale made the kernel 1.6x slower. Whole tiles take the
        // matrix product, others skip zero weights (see the top; a NaN weight is not zero and
        // reaches o).
        for (var i = 0u; i < DV4_T; i++) {
            var acc = array<mat4x4<f32>, ROW_GROUPS>();
            for (var g = 0u; g < ROW_GROUPS; g++) {
                let a = o[g * DV4_T + i];
                let alpha = alphas[g];
                acc[g] = mat4x4(a[0] * alpha.x, a[1] * alpha.y, a[2] * alpha.z, a[3] * alpha.w);
            }
            if whole {
                for (var step = 0u; step < STEPS; step++) {
                    let vc = v_columns(v_base, key0, 4u * step, lane, i);
                    for (var g = 0u; g < ROW_GROUPS; g++) {
                        acc[g] += vc * s[g * STEPS + step];
                    }
                }
            } else {
                for (var step = 0u; step < STEPS; step++) {
                    let vc = v_columns(v_base, key0, 4u * step, lane, i);
                    for (var g = 0u; g < ROW_GROUPS; g++) {
                        acc[g] = add_nonzero_products(acc[g], vc, s[g * STEPS + step]);
                    }
                }
            }
            for (var g = 0u; g < ROW_GROUPS; g++) {
                o[g * DV4_T + i] = acc[g];
            }
        }
        walk.t += 1u;
    }

    for (var g = 0u; g < ROW_GROUPS; g++) {
        let inv_l = inverse_sum4(l[g]);
        let row_lse = finish_lse4(m[g], l[g]);
        for (var r = 0u; r < 4u; r++) {
            let row = my_row0 + 4u * g + r;
            if row >= seq.n_q {
                continue;
            }
            let at = (rows_before + row) * state_stride;
            let o_base = (rows_before + row) * params.d_v;
            if !last_pass {
                if lane == 0u {
                    state[at] = m[g][r];
                    state[at + 1u] = l[g][r];
                }
                for (var i = 0u; i < DV4_T; i++) {
                    let c = slice_column(i, lane);
                    for (var e = 0u; e < 4u; e++) {
                        state[at + 2u + c + e] = o[g * DV4_T + i][r][e];
                    }
                }
                continue;
            }
            // A row that saw no key gets zeros and LSE = -inf; one that saw a NaN, NaN.
            for (var i = 0u; i < DV4_T; i++) {
                let c = slice_column(i, lane);
                for (var e = 0u; e < 4u; e++) {
                    if c + e < params.d_v {
                        out[o_base + c + e] = Elem(o[g * DV4_T + i][r][e] * inv_l[r]);
                    }
                }
            }
            if lane == 0u {
                lse[rows_before + row] = row_lse[r];
            }
        }
    }
}
