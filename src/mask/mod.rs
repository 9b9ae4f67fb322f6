//! Block-sparse attention masks in the manner of FlexAttention.
//!
//! A [`Mask`] says which keys a query sees (causal, windows, sinks, documents, prefix-LM,
//! dense element masks, block patterns, and their `&`/`|` combinations). A [`BlockMask`]
//! compiles masks, one per (batch, head) or broadcast, onto the kernel's tile grid: for
//! each query block, the key blocks to visit, each *full* (every element visible, no
//! per-element test) or *partial* (with a bit per element). [`GpuBlockMask`] is a
//! `BlockMask` uploaded once and reusable across launches.
//!
//! This module is data only: it knows nothing of the kernels. The attention module runs
//! them on a mask ([`crate::attention_masked`], [`crate::flash::encode`] with a mask) and
//! says which block size its tiles take ([`BlockSize::for_adapter`]).
//!
//! FlexAttention keeps `kv_num_blocks`/`kv_indices` (partial blocks) and
//! `full_kv_num_blocks`/`full_kv_indices` per query block. Here a query block's visited
//! key blocks are stored in key order as runs of consecutive blocks of one class
//! ([`KvRun`]): the same information, but a causal or windowed row is one or two runs
//! instead of thousands of indices, and the kernel visits tiles in the same order as the
//! dense kernel, so equivalent masks give the same bits.
//!
//! ```no_run
//! use wattn::{BlockMask, BlockSize, Context, Mask};
//! # fn main() -> wattn::Result<()> {
//! let ctx = Context::new()?;
//! let n = 4096;
//! let docs = Mask::document_lengths(&[1000, 3000, 96])? & Mask::causal();
//! let mask = BlockMask::new(&docs, n, n, BlockSize::for_adapter(&ctx))?;
//! println!("{mask}"); // the block pattern, drawn
//! # Ok(()) }
//! ```

mod gpu;
mod predicate;

pub use gpu::{BlockMaskHeader, GpuBlockMask};
pub use predicate::{BlockClass, Mask};

use crate::error::{Error, Result};
use predicate::{Grid, Runs};

/// Queries and keys per block of a block mask: the flash kernel's tile sizes
/// (`block_q`, `block_k`) of the launches that use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockSize {
    /// Queries per block (`block_q`).
    pub q: u32,
    /// Keys per block (`block_k`).
    pub k: u32,
}

impl BlockSize {
    /// Blocks of `q` queries by `k` keys.
    pub const fn new(q: u32, k: u32) -> Self {
        Self { q, k }
    }

    /// 32-bit words of one partial block's element mask (one bit per element).
    pub fn mask_words(&self) -> usize {
        (self.q as usize * self.k as usize).div_ceil(32)
    }
}

impl std::fmt::Display for BlockSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.q, self.k)
    }
}

/// Consecutive key blocks `first..end` of one class that a query block visits.
/// Keep in sync with the runs read by `shaders/flash_fwd.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct KvRun {
    /// The first key block of the run.
    pub first: u32,
    /// The key block after the run's last (exclusive end).
    pub end: u32,
    /// [`KvRun::FULL`], or the index of block `first`'s element mask among the partial
    /// blocks (the next blocks' masks follow it).
    pub mask_index: u32,
}

impl KvRun {
    /// `mask_index` of a run of full blocks.
    pub const FULL: u32 = u32::MAX;

    /// Whether the run's blocks are full (no element test).
    pub fn is_full(&self) -> bool {
        self.mask_index == Self::FULL
    }

    fn class(&self) -> BlockClass {
        if self.is_full() { BlockClass::Full } else { BlockClass::Partial }
    }
}

/// How many blocks of each class a [`BlockMask`] has, over all its (batch, head) slices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCounts {
    /// Blocks whose every element is visible.
    pub full: usize,
    /// Blocks with some visible elements, tested one by one.
    pub partial: usize,
    /// All blocks, empty ones included: `batch * heads * q_blocks * k_blocks`.
    pub total: usize,
}

/// Masks compiled onto a block grid: for each (batch, head, query block) the runs of key
/// blocks to visit, and the element bits of the partial ones. `batch` and `heads` are the
/// number of distinct masks along each axis: 1 broadcasts over that axis.
#[derive(Clone)]
pub struct BlockMask {
    grid: Grid,
    block: BlockSize,
    batch: usize,
    heads: usize,
    /// Mask row `((b * heads + h) * q_blocks + qb)` owns `runs[row_starts[row]..row_starts[row + 1]]`.
    row_starts: Vec<u32>,
    runs: Vec<KvRun>,
    /// [`BlockSize::mask_words`] words per partial block in run order; bit `r * block.k + c`
    /// is query `r`, key `c` of the block. Bits outside the sequences are 0.
    bits: Vec<u32>,
}

impl BlockMask {
    /// One mask for every batch and head.
    pub fn new(mask: &Mask, n_q: usize, n_k: usize, block: BlockSize) -> Result<Self> {
        Self::build(std::slice::from_ref(mask), 1, 1, n_q, n_k, block)
    }

    /// One mask per query head (the same for every batch), e.g. DuoAttention's retrieval
    /// heads (full) and streaming heads (sinks + window).
    pub fn per_head(masks: &[Mask], n_q: usize, n_k: usize, block: BlockSize) -> Result<Self> {
        Self::build(masks, 1, masks.len(), n_q, n_k, block)
    }

    /// `batch * heads` masks, batch-major; `batch` or `heads` = 1 broadcasts over that axis.
    pub fn build(masks: &[Mask], batch: usize, heads: usize, n_q: usize, n_k: usize, block: BlockSize) -> Result<Self> {
        if block.q == 0 || block.k == 0 {
            return Err(Error::Option(format!("block size {block}: both sides must be positive")));
        }
        if n_q == 0 || n_k == 0 || n_q > u32::MAX as usize || n_k > u32::MAX as usize {
            return Err(Error::Option(format!("a block mask needs 1 to 2^32 - 1 queries and keys, got {n_q} x {n_k}")));
        }
        if batch == 0 || heads == 0 || masks.len() != batch * heads {
            return Err(Error::Shape(format!(
                "{} masks given for {batch} batch x {heads} heads (batch-major; 1 broadcasts)",
                masks.len()
            )));
        }
        for mask in masks {
            mask.check(n_q, n_k)?;
        }
        let grid = Grid::new(n_q, n_k, block);
        let mut built = Self { grid, block, batch, heads, row_starts: vec![0], runs: Vec::new(), bits: Vec::new() };
        for mask in masks {
            for qb in 0..grid.q_blocks {
                built.push_row(mask, qb)?;
            }
        }
        Ok(built)
    }

    /// Appends the runs of query block `qb`, settling partial blocks from their bits.
    fn push_row(&mut self, mask: &Mask, qb: usize) -> Result<()> {
        let Runs(classes) = mask.classify_row(&self.grid, qb);
        let mut start = 0;
        for (end, class) in classes {
            match class {
                BlockClass::Empty => {}
                BlockClass::Full => self.push_run(start, end, BlockClass::Full),
                BlockClass::Partial => {
                    for kb in start..end {
                        let (class, bits) = self.element_bits(mask, qb, kb);
                        if class == BlockClass::Partial {
                            self.bits.extend_from_slice(&bits);
                        }
                        self.push_run(kb, kb + 1, class);
                    }
                }
            }
            start = end;
        }
        let runs = u32::try_from(self.runs.len()).map_err(|_| too_big("runs"))?;
        if self.bits.len() > u32::MAX as usize {
            return Err(too_big("element mask words"));
        }
        self.row_starts.push(runs);
        Ok(())
    }

    /// Appends blocks `first..end` of `class` to the current row, extending its last run
    /// when that run ends at `first` with the same class.
    fn push_run(&mut self, first: usize, end: usize, class: BlockClass) {
        let mask_index = match class {
            BlockClass::Empty => return,
            BlockClass::Full => KvRun::FULL,
            // This block's bits were just appended (and partial runs are appended in order).
            BlockClass::Partial => (self.bits.len() / self.block.mask_words() - (end - first)) as u32,
        };
        // `row_starts` begins with 0 and only grows.
        let row_start = self.row_starts.last().copied().unwrap_or(0) as usize;
        if let Some(last) = self.runs[row_start..].last_mut() {
            if last.end as usize == first && last.class() == class {
                last.end = end as u32;
                return;
            }
        }
        self.runs.push(KvRun { first: first as u32, end: end as u32, mask_index });
    }

    /// The element bits of block (`qb`, `kb`) and the class they make it.
    fn element_bits(&self, mask: &Mask, qb: usize, kb: usize) -> (BlockClass, Vec<u32>) {
        let g = &self.grid;
        let mut words = vec![0u32; self.block.mask_words()];
        let ((r0, r1), (k0, k1)) = (g.rows(qb), g.keys(kb));
        let (mut any, mut all) = (false, true);
        for i in r0..=r1 {
            for c0 in (k0..=k1).step_by(32) {
                let count = (k1 + 1 - c0).min(32);
                let x = mask.row_bits(g, i, c0, count);
                any |= x != 0;
                all &= x.count_ones() as usize == count;
                let bit = (i - r0) * g.block_k + (c0 - k0);
                let (w, shift) = (bit / 32, bit % 32);
                words[w] |= x << shift;
                if shift > 0 && shift + count > 32 {
                    words[w + 1] |= x >> (32 - shift);
                }
            }
        }
        let class = match (any, all) {
            (_, true) => BlockClass::Full,
            (true, false) => BlockClass::Partial,
            (false, false) => BlockClass::Empty,
        };
        (class, words)
    }

    /// Queries the mask was built for, Nq.
    pub fn n_q(&self) -> usize {
        self.grid.n_q
    }
    /// Keys the mask was built for, Nk.
    pub fn n_k(&self) -> usize {
        self.grid.n_k
    }
    /// The block size it was compiled onto.
    pub fn block_size(&self) -> BlockSize {
        self.block
    }
    /// Distinct masks along the batch axis (1 = broadcast).
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Distinct masks along the head axis (1 = broadcast).
    pub fn heads(&self) -> usize {
        self.heads
    }
    /// Query blocks per mask: Nq / `block.q`, rounded up.
    pub fn q_blocks(&self) -> usize {
        self.grid.q_blocks
    }
    /// Key blocks per mask: Nk / `block.k`, rounded up.
    pub fn k_blocks(&self) -> usize {
        self.grid.k_blocks
    }

    /// The mask row of (`b`, `h`, `qb`), broadcasting `b` and `h` where the mask does.
    fn row(&self, b: usize, h: usize, qb: usize) -> Result<usize> {
        let (mb, mh) = (if self.batch == 1 { 0 } else { b }, if self.heads == 1 { 0 } else { h });
        if mb >= self.batch || mh >= self.heads || qb >= self.grid.q_blocks {
            return Err(Error::OutOfRange {
                what: "block mask (batch, head, query block)",
                index: vec![b, h, qb],
                bounds: vec![self.batch, self.heads, self.grid.q_blocks],
            });
        }
        Ok((mb * self.heads + mh) * self.grid.q_blocks + qb)
    }

    /// The runs of mask row `row` (in range).
    fn row_runs(&self, row: usize) -> &[KvRun] {
        &self.runs[self.row_starts[row] as usize..self.row_starts[row + 1] as usize]
    }

    /// The key blocks query block `qb` of batch `b`, head `h` visits, in key order.
    /// An axis the mask broadcasts (1 mask) takes any index.
    pub fn runs(&self, b: usize, h: usize, qb: usize) -> Result<&[KvRun]> {
        Ok(self.row_runs(self.row(b, h, qb)?))
    }

    /// The run of `runs` holding key block `kb`, if any.
    fn run_of(runs: &[KvRun], kb: usize) -> Option<&KvRun> {
        runs.iter().find(|r| (r.first as usize..r.end as usize).contains(&kb))
    }

    /// The class of key block `kb` for query block `qb` of batch `b`, head `h`.
    pub fn class(&self, b: usize, h: usize, qb: usize, kb: usize) -> Result<BlockClass> {
        let runs = self.runs(b, h, qb)?;
        if kb >= self.grid.k_blocks {
            return Err(Error::OutOfRange {
                what: "block mask key block",
                index: vec![kb],
                bounds: vec![self.grid.k_blocks],
            });
        }
        Ok(Self::run_of(runs, kb).map_or(BlockClass::Empty, KvRun::class))
    }

    /// Whether query `i` of batch `b`, head `h` sees key `j`, read back from the blocks.
    pub fn visible(&self, b: usize, h: usize, i: usize, j: usize) -> Result<bool> {
        let g = &self.grid;
        if i >= g.n_q || j >= g.n_k {
            return Err(Error::OutOfRange {
                what: "block mask element (query, key)",
                index: vec![i, j],
                bounds: vec![g.n_q, g.n_k],
            });
        }
        let (qb, kb) = (i / g.block_q, j / g.block_k);
        let Some(run) = Self::run_of(self.runs(b, h, qb)?, kb) else {
            return Ok(false);
        };
        if run.is_full() {
            return Ok(true);
        }
        let block = run.mask_index as usize + kb - run.first as usize;
        let bit = (i % g.block_q) * g.block_k + j % g.block_k;
        Ok(self.bits[block * self.block.mask_words() + bit / 32] >> (bit % 32) & 1 == 1)
    }

    /// Blocks of each class over every (batch, head) slice the mask stores.
    pub fn block_counts(&self) -> BlockCounts {
        let (mut full, mut partial) = (0, 0);
        for run in &self.runs {
            let n = (run.end - run.first) as usize;
            if run.is_full() { full += n } else { partial += n }
        }
        BlockCounts { full, partial, total: self.batch * self.heads * self.grid.q_blocks * self.grid.k_blocks }
    }

    /// The fraction of blocks the kernel visits (full or partial): its work relative to
    /// dense attention.
    pub fn density(&self) -> f64 {
        let c = self.block_counts();
        (c.full + c.partial) as f64 / c.total as f64
    }

    /// Row starts, runs and element bits, for the upload.
    fn parts(&self) -> (&[u32], &[KvRun], &[u32]) {
        (&self.row_starts, &self.runs, &self.bits)
    }
}

fn too_big(what: &str) -> Error {
    Error::Limit {
        what: format!("block mask {what}"),
        needed: u32::MAX as u64 + 1,
        allowed: u32::MAX as u64,
        limit: "32-bit indexing",
    }
}

/// At most this many characters per side in [`BlockMask`]'s drawing; bigger grids are
/// drawn with one character for several blocks.
const DRAWING_SIDE: usize = 64;

/// Draws each (batch, head) slice: `#` full, `+` partial, `.` empty, one character per
/// block, or per group of blocks on big grids (`+` then means mixed).
impl std::fmt::Display for BlockMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = &self.grid;
        let c = self.block_counts();
        let (per_row, per_col) = (g.q_blocks.div_ceil(DRAWING_SIDE), g.k_blocks.div_ceil(DRAWING_SIDE));
        write!(
            f,
            "block mask {} x {}, blocks of {} ({} x {}), density {:.4} ({} full, {} partial of {})",
            g.n_q,
            g.n_k,
            self.block,
            g.q_blocks,
            g.k_blocks,
            self.density(),
            c.full,
            c.partial,
            c.total
        )?;
        if per_row * per_col > 1 {
            write!(f, ", one character per {per_row} x {per_col} blocks")?;
        }
        writeln!(f)?;
        let (cols, lines) = (g.k_blocks.div_ceil(per_col), g.q_blocks.div_ceil(per_row));
        for b in 0..self.batch {
            for h in 0..self.heads {
                if self.batch * self.heads > 1 {
                    writeln!(f, "batch {b} head {h}:")?;
                }
                for line in 0..lines {
                    // Per character: (saw a visited block, saw a block that is not full).
                    let mut cells = vec![(false, false); cols];
                    for qb in line * per_row..((line + 1) * per_row).min(g.q_blocks) {
                        let mut kb = 0;
                        for run in self.row_runs((b * self.heads + h) * g.q_blocks + qb) {
                            for k in kb..run.end as usize {
                                let cell = &mut cells[k / per_col];
                                let visited = k >= run.first as usize;
                                cell.0 |= visited;
                                cell.1 |= !(visited && run.is_full());
                            }
                            kb = run.end as usize;
                        }
                        for k in kb..g.k_blocks {
                            cells[k / per_col].1 = true;
                        }
                    }
                    let text: String = cells
                        .iter()
                        .map(|&cell| match cell {
                            (true, false) => '#',
                            (true, true) => '+',
                            (false, _) => '.',
                        })
                        .collect();
                    writeln!(f, "{text}")?;
                }
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for BlockMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = self.block_counts();
        write!(
            f,
            "BlockMask {{ n_q: {}, n_k: {}, block: {}, batch: {}, heads: {}, full: {}, partial: {} }}",
            self.grid.n_q, self.grid.n_k, self.block, self.batch, self.heads, c.full, c.partial
        )
    }
}
