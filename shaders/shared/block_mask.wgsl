// A block mask as the kernels read it (src/shader.rs prepends this file to flash_fwd and flash_bwd), and
// the helpers that walk it. Each kernel declares `var<storage, read> block_mask: BlockMask`
// and the constants BLOCK_K (keys per block) and MASK_WORDS (words per element mask).

// Keep in sync with `BlockMaskHeader` in src/mask/gpu.rs. `words` holds each mask row's
// first run (one per row, rows = batch * heads * q_blocks, plus the end) from 0, the runs
// from runs_at (3 words: first tile, end tile, FULL_RUN or the index of the first tile's
// element mask), and the partial tiles' element masks from bits_at, MASK_WORDS each with
// bit r * BLOCK_K + j for query r and key j of the tile.
struct BlockMask {
    batch: u32, // 1 = one mask for every batch
    heads: u32, // 1 = one mask for every head
    q_blocks: u32,
    runs_at: u32,
    bits_at: u32,
    words: array<u32>,
}

const FULL_RUN: u32 = 0xffffffffu;

// The mask row of query block `q_block` of (batch, head), broadcast where the mask is.
fn mask_row(batch: u32, head: u32, q_block: u32) -> u32 {
    let mask_batch = select(batch, 0u, block_mask.batch == 1u);
    let mask_head = select(head, 0u, block_mask.heads == 1u);
    return (mask_batch * block_mask.heads + mask_head) * block_mask.q_blocks + q_block;
}

// Field `field` (0 first tile, 1 end tile, 2 element mask) of block-mask run `run`.
fn run_field(run: u32, field: u32) -> u32 {
    return block_mask.words[block_mask.runs_at + 3u * run + field];
}

// The first of the sorted, disjoint runs [lo, hi) that ends after tile `t` (hi if none):
// a binary search.
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

// The key tiles query block `q_block` of (batch, head), rows [row0, last_row] of a sequence of
// n_q queries and n_k keys, walks in a pass over the keys before `pass_end`, from tile
// `first_tile` on (tile indices are absolute within the sequence): the dense range its rows
// may see, skipping the tiles between the sinks and the window, or (BLOCK_SPARSE) the runs its
// block-mask row lists. Each kernel declares `params: Params` and BLOCK_SPARSE.
struct TileWalk {
    t: u32, // the tile to visit, once next_tile has said there is one
    keys_end: i32, // keys at and after this one no row of the block sees in the pass
    tiles_end: u32,
    sink_tiles: u32,
    window_first_tile: u32,
    // Block-sparse: the next run to fetch, the end of the block's runs, the current run.
    run: u32,
    runs_end: u32,
    run_first: u32,
    run_end: u32,
    run_mask: u32,
}

fn sequence_tile_walk(n_q: u32, n_k: u32, first_tile: u32, pass_end: u32, row0: u32, last_row: u32, batch: u32,
    head: u32, q_block: u32) -> TileWalk {
    let offset = i32(n_k) - i32(n_q);
    var key_hi = i32(min(n_k, pass_end));
    if params.window_right >= 0 {
        key_hi = clamp(i32(last_row) + offset + params.window_right + 1, 0, key_hi);
    }
    var key_lo = 0;
    if params.window_left >= 0 {
        key_lo = clamp(i32(row0) + offset - params.window_left, 0, key_hi);
    }
    let sink_end = min(i32(params.sinks), key_hi);
    var walk = TileWalk(first_tile, key_hi, u32(key_hi + i32(BLOCK_K) - 1) / BLOCK_K,
        u32(sink_end + i32(BLOCK_K) - 1) / BLOCK_K, u32(key_lo) / BLOCK_K, 0u, 0u, 0u, 0u, FULL_RUN);
    if BLOCK_SPARSE {
        let row = mask_row(batch, head, q_block);
        walk.runs_end = block_mask.words[row + 1u];
        walk.run = first_run_after(block_mask.words[row], walk.runs_end, first_tile);
    }
    return walk;
}

// Moves `walk` to the next tile to visit, from its tile t on: false when there is none.
fn next_tile(walk: ptr<function, TileWalk>) -> bool {
    if BLOCK_SPARSE {
        if (*walk).t >= (*walk).run_end {
            if (*walk).run == (*walk).runs_end {
                return false;
            }
            (*walk).run_first = run_field((*walk).run, 0u);
            (*walk).run_end = run_field((*walk).run, 1u);
            (*walk).run_mask = run_field((*walk).run, 2u);
            (*walk).t = max((*walk).t, (*walk).run_first);
            (*walk).run += 1u;
        }
    } else if (*walk).t >= (*walk).sink_tiles && (*walk).t < (*walk).window_first_tile {
        // Tiles between the sinks and the window are seen by no row: skip without loading.
        (*walk).t = (*walk).window_first_tile;
    }
    return (*walk).t < (*walk).tiles_end;
}

// The element mask of the walk's tile (a partial block-mask tile), or FULL_RUN for none.
fn tile_bits(walk: TileWalk) -> u32 {
    return select(walk.run_mask + walk.t - walk.run_first, FULL_RUN, walk.run_mask == FULL_RUN);
}
