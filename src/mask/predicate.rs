//! Mask predicates: which keys each query may see, for one (batch, head).
//!
//! A block of queries against a block of keys is classified without looking at its
//! elements wherever the predicate allows it:
//! - windows, key prefixes and documents give every query one interval of keys that never
//!   moves left as the query index grows, so a block's class follows from the intervals of
//!   its first and last query alone (O(1) per block, O(1) per run of blocks);
//! - block patterns are read block by block;
//! - dense element masks call every block partial;
//! - `&` and `|` combine the classes of their operands (two partial blocks stay partial).
//!
//! The builder ([`super::BlockMask`]) then settles each partial block from its element bits,
//! so the final classes are exact.

use super::BlockSize;
use crate::error::{Error, Result};
use std::sync::Arc;

/// What one (query block, key block) needs from the kernel, ordered so that `&` is the
/// minimum and `|` the maximum of two classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BlockClass {
    /// No query of the block sees a key of the block: the kernel skips it.
    Empty,
    /// Some elements are visible: the kernel tests each one.
    Partial,
    /// Every element (inside the sequences) is visible: the kernel tests none.
    Full,
}

/// "Query `i` sees key `j`" for one (batch, head) of Nq queries and Nk keys. Offsets
/// between queries and keys are bottom-right aligned like [`AttentionOptions`](crate::AttentionOptions): query `i`
/// sits at key position `i + Nk - Nq`.
///
/// Combine masks with `&` and `|` (or [`Mask::and`], [`Mask::or`]).
#[derive(Clone)]
pub struct Mask(Node);

#[derive(Clone)]
enum Node {
    /// Keys `pos - left ..= pos + right` of the query at position `pos`; -1 = unbounded.
    Window {
        left: i32,
        right: i32,
    },
    /// Keys `0..n`, for every query.
    KeyPrefix(usize),
    Documents(Arc<Documents>),
    Dense(Arc<DenseMask>),
    Blocks(Arc<BlockPattern>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
}

impl Mask {
    /// Every query sees every key.
    pub fn full() -> Self {
        Self::window(-1, -1)
    }

    /// Query `i` sees keys `j <= i + Nk - Nq`, like [`AttentionOptions::causal`](crate::AttentionOptions::causal).
    pub fn causal() -> Self {
        Self::window(-1, 0)
    }

    /// FlashAttention's `window_size`: the query at key position `pos` sees keys
    /// `pos - left ..= pos + right`; -1 leaves that side unbounded.
    pub fn window(left: i32, right: i32) -> Self {
        Self(Node::Window { left, right })
    }

    /// The first `n` keys, visible to every query.
    pub fn key_prefix(n: usize) -> Self {
        Self(Node::KeyPrefix(n))
    }

    /// StreamingLLM: the window `(left, right)` plus the first `sinks` keys, which are
    /// exempt from the window's left bound but not from its right bound (so a causal
    /// window keeps causal sinks), as [`AttentionOptions::sinks`](crate::AttentionOptions::sinks).
    pub fn sinks_window(sinks: usize, left: i32, right: i32) -> Self {
        Self::window(left, right) | (Self::key_prefix(sinks) & Self::window(-1, right))
    }

    /// Prefix-LM: the first `prefix` keys are visible to every query, causal after.
    pub fn prefix_lm(prefix: usize) -> Self {
        Self::key_prefix(prefix) | Self::causal()
    }

    /// Packed sequences: `ids[p]` is the document of key position `p` (non-decreasing, one
    /// per key). A query sees the keys of the document at its own position; queries before
    /// the first key (when Nq > Nk) see nothing. Combine with [`Mask::causal`] for causal
    /// documents.
    pub fn documents(ids: &[u32]) -> Result<Self> {
        if let Some(p) = ids.windows(2).position(|w| w[1] < w[0]) {
            return Err(Error::Option(format!(
                "document ids must be non-decreasing (packed sequences): ids[{}] = {} follows ids[{p}] = {}",
                p + 1,
                ids[p + 1],
                ids[p]
            )));
        }
        let mut starts = vec![0u32];
        let mut doc_of = Vec::with_capacity(ids.len());
        for (p, w) in ids.iter().enumerate() {
            if p > 0 && ids[p - 1] != *w {
                starts.push(p as u32);
            }
            doc_of.push(starts.len() as u32 - 1);
        }
        starts.push(ids.len() as u32);
        Ok(Self(Node::Documents(Arc::new(Documents { doc_of, starts }))))
    }

    /// [`Mask::documents`] from document lengths in order (they must sum to Nk).
    pub fn document_lengths(lengths: &[usize]) -> Result<Self> {
        if let Some(d) = lengths.iter().position(|&n| n == 0) {
            return Err(Error::Option(format!("document {d} has length 0")));
        }
        let ids: Vec<u32> = lengths.iter().enumerate().flat_map(|(d, &n)| std::iter::repeat_n(d as u32, n)).collect();
        Self::documents(&ids)
    }

    /// An element mask `[n_q, n_k]` in row-major order; `true` = visible.
    pub fn dense(n_q: usize, n_k: usize, visible: &[bool]) -> Result<Self> {
        if visible.len() != n_q * n_k {
            return Err(Error::Shape(format!(
                "dense mask of {} values for {n_q} x {n_k} = {} elements",
                visible.len(),
                n_q * n_k
            )));
        }
        Ok(Self::from_fn(n_q, n_k, |i, j| visible[i * n_k + j]))
    }

    /// An element mask `[n_q, n_k]` from any predicate, evaluated once per element
    /// (FlexAttention's `mask_mod` for one batch and head) and stored bit-packed.
    pub fn from_fn(n_q: usize, n_k: usize, visible: impl Fn(usize, usize) -> bool) -> Self {
        let words_per_row = n_k.div_ceil(64);
        let mut bits = vec![0u64; n_q * words_per_row];
        for i in 0..n_q {
            for j in (0..n_k).filter(|&j| visible(i, j)) {
                bits[i * words_per_row + j / 64] |= 1 << (j % 64);
            }
        }
        Self(Node::Dense(Arc::new(DenseMask { n_q, n_k, words_per_row, bits })))
    }

    /// A block-level mask: `on[qb * k_blocks + kb]` says whether query block `qb` sees key
    /// block `kb` whole, for blocks of `block`. The pattern must cover the sequences
    /// exactly (`q_blocks = ceil(Nq / block.q)`, likewise for keys); it is usually built at
    /// the block size of the [`super::BlockMask`], which then copies it, but any size works.
    pub fn blocks(block: BlockSize, q_blocks: usize, k_blocks: usize, on: &[bool]) -> Result<Self> {
        if block.q == 0 || block.k == 0 {
            return Err(Error::Option(format!("block pattern with block size {block}: both sides must be positive")));
        }
        if on.len() != q_blocks * k_blocks {
            return Err(Error::Shape(format!(
                "block pattern of {} values for {q_blocks} x {k_blocks} = {} blocks",
                on.len(),
                q_blocks * k_blocks
            )));
        }
        let pattern =
            BlockPattern { block_q: block.q as usize, block_k: block.k as usize, q_blocks, k_blocks, on: on.to_vec() };
        Ok(Self(Node::Blocks(Arc::new(pattern))))
    }

    /// Visible where both masks are.
    pub fn and(self, other: Mask) -> Self {
        Self(Node::And(Box::new(self.0), Box::new(other.0)))
    }

    /// Visible where either mask is.
    pub fn or(self, other: Mask) -> Self {
        Self(Node::Or(Box::new(self.0), Box::new(other.0)))
    }

    /// Whether query `i` sees key `j` for `n_q` queries and `n_k` keys. Nothing is visible
    /// outside `n_q` x `n_k`, nor under a mask that does not fit them ([`Mask::check`] says why).
    pub fn visible(&self, n_q: usize, n_k: usize, i: usize, j: usize) -> bool {
        i < n_q && j < n_k && self.check(n_q, n_k).is_ok() && self.0.row_bits(&Extent { n_q, n_k }, i, j, 1) != 0
    }

    /// Errors if the mask does not fit `n_q` queries and `n_k` keys or has a bad window.
    pub fn check(&self, n_q: usize, n_k: usize) -> Result<()> {
        self.0.check(&Extent { n_q, n_k })
    }

    pub(crate) fn classify_row(&self, grid: &Grid, qb: usize) -> Runs {
        self.0.classify_row(grid, qb)
    }

    /// Bits `0..count` (at most 32) of the result say whether query `i` sees keys
    /// `k0..k0 + count`; all of them must be keys of the sequence.
    pub(crate) fn row_bits(&self, grid: &Grid, i: usize, k0: usize, count: usize) -> u32 {
        self.0.row_bits(&grid.extent(), i, k0, count)
    }
}

impl std::ops::BitAnd for Mask {
    type Output = Mask;
    fn bitand(self, other: Mask) -> Mask {
        self.and(other)
    }
}

impl std::ops::BitOr for Mask {
    type Output = Mask;
    fn bitor(self, other: Mask) -> Mask {
        self.or(other)
    }
}

/// Short and readable: `causal`, `window(64,0)`, `(keys<4 | causal)`, `documents(12)`.
impl std::fmt::Display for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Debug for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mask({self})")
    }
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::Window { left: -1, right: -1 } => write!(f, "full"),
            Node::Window { left: -1, right: 0 } => write!(f, "causal"),
            Node::Window { left, right } => write!(f, "window({left},{right})"),
            Node::KeyPrefix(n) => write!(f, "keys<{n}"),
            Node::Documents(d) => write!(f, "documents({})", d.starts.len() - 1),
            Node::Dense(d) => write!(f, "dense({}x{})", d.n_q, d.n_k),
            Node::Blocks(p) => write!(f, "blocks({}x{} of {}x{})", p.q_blocks, p.k_blocks, p.block_q, p.block_k),
            Node::And(a, b) => write!(f, "({a} & {b})"),
            Node::Or(a, b) => write!(f, "({a} | {b})"),
        }
    }
}

/// Document boundaries: `doc_of[p]` is the document of key position `p`, whose keys are
/// `starts[d]..starts[d + 1]`.
struct Documents {
    doc_of: Vec<u32>,
    starts: Vec<u32>,
}

/// An element mask, one bit per (query, key), rows padded to whole words.
struct DenseMask {
    n_q: usize,
    n_k: usize,
    words_per_row: usize,
    bits: Vec<u64>,
}

impl DenseMask {
    /// Bits `k0..k0 + count` (count <= 32) of row `i`.
    fn row_bits(&self, i: usize, k0: usize, count: usize) -> u32 {
        let row = &self.bits[i * self.words_per_row..][..self.words_per_row];
        let (w, shift) = (k0 / 64, k0 % 64);
        let mut x = row[w] >> shift;
        if shift > 0 && w + 1 < row.len() {
            x |= row[w + 1] << (64 - shift);
        }
        x as u32 & low_bits(count)
    }
}

/// A block-level mask at its own block size.
struct BlockPattern {
    block_q: usize,
    block_k: usize,
    q_blocks: usize,
    k_blocks: usize,
    on: Vec<bool>,
}

impl BlockPattern {
    fn on(&self, qb: usize, kb: usize) -> bool {
        self.on[qb * self.k_blocks + kb]
    }

    /// The class of queries `rows` against keys `keys` (both inclusive ranges).
    fn classify(&self, rows: (usize, usize), keys: (usize, usize)) -> BlockClass {
        let (mut any, mut all) = (false, true);
        for qb in rows.0 / self.block_q..=rows.1 / self.block_q {
            for kb in keys.0 / self.block_k..=keys.1 / self.block_k {
                let on = self.on(qb, kb);
                any |= on;
                all &= on;
            }
        }
        match (any, all) {
            (_, true) => BlockClass::Full,
            (true, false) => BlockClass::Partial,
            (false, false) => BlockClass::Empty,
        }
    }
}

/// The number of queries and keys a predicate is evaluated over.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Extent {
    n_q: usize,
    n_k: usize,
}

impl Extent {
    /// The key position query `i` is aligned to (bottom-right); negative when Nq > Nk.
    fn position(&self, i: usize) -> i64 {
        i as i64 + self.n_k as i64 - self.n_q as i64
    }
}

/// The block grid of a build: `n_q` x `n_k` elements in blocks of `block_q` x `block_k`,
/// the last row and column of blocks possibly cut off.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Grid {
    pub n_q: usize,
    pub n_k: usize,
    pub block_q: usize,
    pub block_k: usize,
    pub q_blocks: usize,
    pub k_blocks: usize,
}

impl Grid {
    pub fn new(n_q: usize, n_k: usize, block: BlockSize) -> Self {
        let (block_q, block_k) = (block.q as usize, block.k as usize);
        Self { n_q, n_k, block_q, block_k, q_blocks: n_q.div_ceil(block_q), k_blocks: n_k.div_ceil(block_k) }
    }

    fn extent(&self) -> Extent {
        Extent { n_q: self.n_q, n_k: self.n_k }
    }

    /// First and last query of query block `qb`.
    pub fn rows(&self, qb: usize) -> (usize, usize) {
        (qb * self.block_q, ((qb + 1) * self.block_q).min(self.n_q) - 1)
    }

    /// First and last key of key block `kb`.
    pub fn keys(&self, kb: usize) -> (usize, usize) {
        (kb * self.block_k, ((kb + 1) * self.block_k).min(self.n_k) - 1)
    }
}

/// The classes of one query block's key blocks `0..k_blocks` as consecutive runs:
/// `(end, class)` covers the blocks from the previous run's end to `end`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Runs(pub Vec<(usize, BlockClass)>);

impl Runs {
    /// Extends the last run, or starts one, to end at `end`; empty runs vanish.
    fn push(&mut self, end: usize, class: BlockClass) {
        let start = self.0.last().map_or(0, |r| r.0);
        if end <= start {
            return;
        }
        match self.0.last_mut() {
            Some(last) if last.1 == class => last.0 = end,
            _ => self.0.push((end, class)),
        }
    }

    fn per_block(k_blocks: usize, class: impl Fn(usize) -> BlockClass) -> Self {
        let mut runs = Self::default();
        for kb in 0..k_blocks {
            runs.push(kb + 1, class(kb));
        }
        runs
    }

    /// Block by block `combine(a, b)`, walking both run lists once.
    fn zip(a: &Runs, b: &Runs, combine: fn(BlockClass, BlockClass) -> BlockClass) -> Self {
        let mut out = Self::default();
        let (mut ia, mut ib) = (0, 0);
        while ia < a.0.len() && ib < b.0.len() {
            let (ea, ca) = a.0[ia];
            let (eb, cb) = b.0[ib];
            let end = ea.min(eb);
            out.push(end, combine(ca, cb));
            ia += (ea == end) as usize;
            ib += (eb == end) as usize;
        }
        out
    }
}

/// A mask with bits `0..count` set.
fn low_bits(count: usize) -> u32 {
    if count >= 32 { u32::MAX } else { (1u32 << count) - 1 }
}

impl Node {
    fn check(&self, e: &Extent) -> Result<()> {
        match self {
            Node::Window { left, right } if *left < -1 || *right < -1 => Err(Error::Option(format!(
                "mask window ({left}, {right}): each side must be >= 0, or -1 for unbounded"
            ))),
            Node::Documents(d) if d.doc_of.len() != e.n_k => {
                Err(Error::Shape(format!("document ids cover {} keys, the mask has {} keys", d.doc_of.len(), e.n_k)))
            }
            Node::Dense(d) if (d.n_q, d.n_k) != (e.n_q, e.n_k) => Err(Error::Shape(format!(
                "dense mask is {} x {}, the mask has {} queries and {} keys",
                d.n_q, d.n_k, e.n_q, e.n_k
            ))),
            Node::Blocks(p) if (p.q_blocks, p.k_blocks) != (e.n_q.div_ceil(p.block_q), e.n_k.div_ceil(p.block_k)) => {
                Err(Error::Shape(format!(
                    "block pattern of {} x {} blocks of {}x{} does not cover {} queries and {} keys (needs {} x {})",
                    p.q_blocks,
                    p.k_blocks,
                    p.block_q,
                    p.block_k,
                    e.n_q,
                    e.n_k,
                    e.n_q.div_ceil(p.block_q),
                    e.n_k.div_ceil(p.block_k)
                )))
            }
            Node::And(a, b) | Node::Or(a, b) => a.check(e).and_then(|_| b.check(e)),
            _ => Ok(()),
        }
    }

    /// The keys `[lo, hi)` query `i` sees, for the predicates whose rows are one interval
    /// each, with `lo` and `hi` non-decreasing in `i`.
    fn interval(&self, e: &Extent, i: usize) -> Option<(usize, usize)> {
        let pos = e.position(i);
        let clamp = |x: i64| x.clamp(0, e.n_k as i64) as usize;
        match self {
            Node::Window { left, right } => {
                let lo = if *left < 0 { 0 } else { clamp(pos - *left as i64) };
                let hi = if *right < 0 { e.n_k } else { clamp(pos + *right as i64 + 1) };
                Some((lo, hi.max(lo)))
            }
            Node::KeyPrefix(n) => Some((0, (*n).min(e.n_k))),
            Node::Documents(d) => Some(if pos < 0 {
                (0, 0)
            } else {
                let doc = d.doc_of[pos as usize] as usize;
                (d.starts[doc] as usize, d.starts[doc + 1] as usize)
            }),
            _ => None,
        }
    }

    fn row_bits(&self, e: &Extent, i: usize, k0: usize, count: usize) -> u32 {
        match self {
            Node::Dense(d) => d.row_bits(i, k0, count),
            Node::Blocks(p) => {
                (0..count).filter(|&c| p.on(i / p.block_q, (k0 + c) / p.block_k)).fold(0, |x, c| x | 1 << c)
            }
            Node::And(a, b) => a.row_bits(e, i, k0, count) & b.row_bits(e, i, k0, count),
            Node::Or(a, b) => a.row_bits(e, i, k0, count) | b.row_bits(e, i, k0, count),
            _ => {
                let (lo, hi) = self.interval(e, i).expect("interval predicate");
                let (from, to) = (lo.clamp(k0, k0 + count), hi.clamp(k0, k0 + count));
                low_bits(to - k0) & !low_bits(from - k0)
            }
        }
    }

    fn classify_row(&self, grid: &Grid, qb: usize) -> Runs {
        let e = grid.extent();
        match self {
            Node::And(a, b) => Runs::zip(&a.classify_row(grid, qb), &b.classify_row(grid, qb), BlockClass::min),
            Node::Or(a, b) => Runs::zip(&a.classify_row(grid, qb), &b.classify_row(grid, qb), BlockClass::max),
            Node::Dense(_) => Runs(vec![(grid.k_blocks, BlockClass::Partial)]),
            Node::Blocks(p) => Runs::per_block(grid.k_blocks, |kb| p.classify(grid.rows(qb), grid.keys(kb))),
            _ => {
                let (first, last) = grid.rows(qb);
                let (lo_first, hi_first) = self.interval(&e, first).expect("interval predicate");
                let (lo_last, hi_last) = self.interval(&e, last).expect("interval predicate");
                interval_runs(grid, (lo_first, hi_first), (lo_last, hi_last))
            }
        }
    }
}

/// The runs of a query block whose first query sees keys `first` = `[lo, hi)` and last
/// query `last`, both ends non-decreasing over the block. Every query's keys lie in
/// `[first.lo, last.hi)` and include `[last.lo, first.hi)`: blocks inside the latter are
/// full, blocks outside the former empty, the rest partial.
fn interval_runs(grid: &Grid, first: (usize, usize), last: (usize, usize)) -> Runs {
    let bk = grid.block_k;
    let mut runs = Runs::default();
    if first.0 >= last.1 {
        runs.push(grid.k_blocks, BlockClass::Empty);
        return runs;
    }
    let touched = (first.0 / bk, last.1.div_ceil(bk));
    // The last block, cut off at the end of the keys, is full when the interval reaches the end.
    let full_end = if first.1 >= grid.n_k { grid.k_blocks } else { first.1 / bk };
    let full_start = last.0.div_ceil(bk);
    runs.push(touched.0, BlockClass::Empty);
    if full_start < full_end {
        runs.push(full_start, BlockClass::Partial);
        runs.push(full_end, BlockClass::Full);
    }
    runs.push(touched.1, BlockClass::Partial);
    runs.push(grid.k_blocks, BlockClass::Empty);
    runs
}
