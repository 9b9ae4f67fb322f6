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
