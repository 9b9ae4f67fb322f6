//! `wattn run`'s block-sparse inputs (`--mask`, `--doc-ids`, `--prefix`, `--block-size`):
//! read, checked against the attention shape, and combined with the dense options into one
//! [`Mask`] per (batch, head), so that the kernel skips every tile none of them needs.
//!
//! With packed sequences (varlen) the batch axis of the masks is the sequence, and every
//! flag means per sequence what it means for a dense batch: `--doc-ids` are packed along the
//! keys like K and split per sequence, `--prefix` is each sequence's first keys, and causal
//! and windows align to each sequence's own lengths. The block mask of a varlen launch is for
//! the longest sequence's lengths, each sequence reading its top-left corner; `--mask` is
//! given in that layout (a padded batch, padding at the end).

use crate::attention::{AttentionOptions, AttentionShape, SeqLens};
use crate::cli::npy;
use crate::error::{Error, Result};
use crate::mask::{BlockMask, BlockSize, Mask};
use std::path::{Path, PathBuf};

/// The block-sparse flags of one run, read and checked.
pub struct SparseInputs {
    /// `--mask`: one element mask per (batch, head) of its file, batch-major.
    elements: Option<Masks>,
    /// `--doc-ids`: one documents mask per batch of its file.
    documents: Option<Masks>,
    prefix: Option<usize>,
    block: Option<BlockSize>,
    /// For the summary line: what was given, e.g. "mask [2, 1, 8, 8] & doc-ids [8]".
    description: String,
    /// Varlen: the packed sequences, which are the masks' batch.
    sequences: Option<SeqLens>,
}

/// Masks for `batch` x `heads` (batch-major); an axis of 1 broadcasts.
pub struct Masks {
    pub masks: Vec<Mask>,
    pub batch: usize,
    pub heads: usize,
}

impl Masks {
    fn one(mask: Mask) -> Self {
        Self { masks: vec![mask], batch: 1, heads: 1 }
    }

    fn get(&self, b: usize, h: usize) -> &Mask {
        let b = if self.batch == 1 { 0 } else { b };
        let h = if self.heads == 1 { 0 } else { h };
        &self.masks[b * self.heads + h]
    }

    /// Whether query `i` of batch `b`, head `h` sees key `j`, for `n_q` x `n_k`.
    pub fn visible(&self, n_q: usize, n_k: usize, b: usize, h: usize, i: usize, j: usize) -> bool {
        self.get(b, h).visible(n_q, n_k, i, j)
    }

    /// The masks compiled onto blocks of `block`.
    pub fn block_mask(&self, n_q: usize, n_k: usize, block: BlockSize) -> Result<BlockMask> {
        BlockMask::build(&self.masks, self.batch, self.heads, n_q, n_k, block)
    }

    /// Masks written for each sequence's own lengths (the batch axis is the sequence),
    /// rewritten for the longest sequence's lengths, as a varlen block mask has them:
    /// sequence `s` sees in the top-left corner of its new mask what it saw at its own
    /// lengths. Masks that align to the lengths (causal, windows, documents) differ in the
    /// corner otherwise, so these are evaluated element by element.
    fn in_corners(&self, seqlens: &SeqLens) -> Masks {
        let (max_q, max_k) = (seqlens.max_q(), seqlens.max_k());
        let masks = (0..seqlens.len() * self.heads).map(|n| {
            let (s, h) = (n / self.heads, n % self.heads);
            let (n_q, n_k) = (seqlens.queries(s).len(), seqlens.keys(s).len());
            let mask = self.get(s, h);
            if (n_q, n_k) == (max_q, max_k) {
                mask.clone()
            } else if n_q == 0 || n_k == 0 {
                Mask::key_prefix(0) // nothing to see
            } else {
                Mask::from_fn(max_q, max_k, |i, j| mask.visible(n_q, n_k, i, j))
            }
        });
        Masks { masks: masks.collect(), batch: seqlens.len(), heads: self.heads }
    }

    /// Visible where both are, per (batch, head), broadcasting each where it broadcasts.
    fn and(&self, other: &Masks) -> Masks {
        let (batch, heads) = (self.batch.max(other.batch), self.heads.max(other.heads));
        let masks = (0..batch * heads).map(|i| {
            let (b, h) = (i / heads, i % heads);
            self.get(b, h).clone() & other.get(b, h).clone()
        });
        Masks { masks: masks.collect(), batch, heads }
    }
}

impl SparseInputs {
    /// Reads the files the flags name and checks them against `shape` (for packed
    /// sequences, the packed tensors' shape and the `sequences`); `None` when no
    /// block-sparse flag is given.
    pub fn read(
        mask: Option<&Path>,
        doc_ids: Option<&Path>,
        prefix: Option<usize>,
        block_size: Option<&str>,
        shape: &AttentionShape,
        sequences: Option<&SeqLens>,
    ) -> Result<Option<Self>> {
        if mask.is_none() && doc_ids.is_none() && prefix.is_none() && block_size.is_none() {
            return Ok(None);
        }
        let block = block_size.map(parse_block_size).transpose()?;
        let mut parts = Vec::new();
        let elements = mask.map(|path| read_mask(path, shape, sequences, &mut parts)).transpose()?;
        let documents = match sequences {
            None => doc_ids.map(|path| read_documents(path, shape, &mut parts)).transpose()?,
            Some(seqlens) => doc_ids.map(|path| read_packed_documents(path, seqlens, &mut parts)).transpose()?,
        };
        if let Some(p) = prefix {
            parts.push(format!("prefix-LM {p}"));
        }
        let mut description = parts.join(" & ");
        if let Some(b) = block {
            description += &format!(" blocks {b}");
        }
        Ok(Some(Self { elements, documents, prefix, block, description, sequences: sequences.cloned() }))
    }

    /// `--block-size`, or the tiles of the adapter's flash configuration.
    pub fn block_size(&self, default: BlockSize) -> BlockSize {
        self.block.unwrap_or(default)
    }

    pub fn describe(&self) -> &str {
        &self.description
    }

    /// The masks of the run: the element mask, the documents, the prefix-LM and the dense
    /// options (causal, window, sinks), all of them required. For packed sequences, one per
    /// sequence for the longest sequence's lengths ([`Masks::in_corners`]).
    pub fn masks(&self, options: &AttentionOptions) -> Masks {
        let mut combined = Masks::one(Mask::from_options(options));
        if let Some(p) = self.prefix {
            combined = combined.and(&Masks::one(Mask::prefix_lm(p)));
        }
        if let Some(documents) = &self.documents {
            combined = combined.and(documents);
        }
        // What aligns to each sequence's lengths moves to its corner; element masks are
        // already given there, and a mask that aligns to nothing is the same in every corner.
        let aligned = options.effective_window() != (-1, -1) || self.prefix.is_some() || self.documents.is_some();
        if let (Some(seqlens), true) = (&self.sequences, aligned) {
            combined = combined.in_corners(seqlens);
        }
        if let Some(elements) = &self.elements {
            combined = combined.and(elements);
        }
        combined
    }
}

/// `--mask`: bool or uint8, `[Nq, Nk]` or `[B or 1, Hq or 1, Nq, Nk]`; for packed
/// sequences `[S or 1, Hq or 1, Nq, Nk]` of the longest sequence's lengths.
fn read_mask(
    path: &Path,
    shape: &AttentionShape,
    sequences: Option<&SeqLens>,
    parts: &mut Vec<String>,
) -> Result<Masks> {
    let array = npy::read_bools(path)?;
    let (batch_axis, all, n_q, n_k) = match sequences {
        None => ("B", shape.batch, shape.n_q, shape.n_k),
        Some(seqlens) => ("S", seqlens.len(), seqlens.max_q(), seqlens.max_k()),
    };
    let (batch, heads) = match array.shape[..] {
        [q, k] if (q, k) == (n_q, n_k) => (1, 1),
        [b, h, q, k] if (b == 1 || b == all) && (h == 1 || h == shape.q_heads) && (q, k) == (n_q, n_k) => (b, h),
        _ => {
            let corner = if sequences.is_some() {
                " of the longest sequence's lengths (each sequence reads its top-left corner)"
            } else {
                ""
            };
            return Err(in_file(
                path,
                format!(
                    "mask shape {:?} does not broadcast to [{batch_axis}, Hq, Nq, Nk] = [{all}, {}, {n_q}, {n_k}]: \
                     use [Nq, Nk] or [{batch_axis} or 1, Hq or 1, Nq, Nk]{corner}",
                    array.shape, shape.q_heads
                ),
            ));
        }
    };
    parts.push(format!("mask {:?}", array.shape));
    let masks = array.data.chunks(n_q * n_k).map(|slice| Mask::dense(n_q, n_k, slice)).collect::<Result<_>>()?;
    Ok(Masks { masks, batch, heads })
}

/// `--doc-ids`: int32 `[Nk]` or `[B, Nk]`, non-negative and non-decreasing along the keys.
fn read_documents(path: &Path, shape: &AttentionShape, parts: &mut Vec<String>) -> Result<Masks> {
    let array = npy::read_i32(path)?;
    let n_k = shape.n_k;
    let batch = match array.shape[..] {
        [k] if k == n_k => 1,
        [b, k] if (b == 1 || b == shape.batch) && k == n_k => b,
        _ => {
            return Err(in_file(
                path,
                format!(
                    "document ids of shape {:?} do not fit {} batch x {n_k} keys: use [Nk] or [B, Nk]",
                    array.shape, shape.batch
                ),
            ));
        }
    };
    parts.push(format!("doc-ids {:?}", array.shape));
    let batches: Vec<&[i32]> = array.data.chunks(n_k).collect();
    documents(path, &array.data, &batches, if batch > 1 { "batch" } else { "" })
}

/// `--doc-ids` for packed sequences: int32 `[total_k]` (or `[1, total_k]`), packed along the
/// keys like K, each sequence's ids non-negative and non-decreasing.
fn read_packed_documents(path: &Path, seqlens: &SeqLens, parts: &mut Vec<String>) -> Result<Masks> {
    let array = npy::read_i32(path)?;
    let total_k = seqlens.total_k();
    if !matches!(array.shape[..], [k] | [1, k] if k == total_k) {
        return Err(in_file(
            path,
            format!(
                "document ids of shape {:?} do not fit {total_k} packed keys: use [total_k], packed like K",
                array.shape
            ),
        ));
    }
    parts.push(format!("doc-ids {:?}", array.shape));
    let sequences: Vec<&[i32]> = (0..seqlens.len()).map(|s| &array.data[seqlens.keys(s)]).collect();
    documents(path, &array.data, &sequences, "sequence")
}

/// One documents mask per slice of `path`'s ids `all`; errors name the slice by `word` and
/// its index ("batch 1", "sequence 3"), or not at all for an empty `word`.
fn documents(path: &Path, all: &[i32], slices: &[&[i32]], word: &str) -> Result<Masks> {
    if let Some(p) = all.iter().position(|&id| id < 0) {
        return Err(in_file(path, format!("document ids must be >= 0, got {} at index {p}", all[p])));
    }
    let masks: Vec<Mask> = slices
        .iter()
        .enumerate()
        .map(|(n, ids)| {
            let ids: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
            Mask::documents(&ids).map_err(|e| match e {
                Error::Option(why) if !word.is_empty() => in_file(path, format!("{word} {n}: {why}")),
                Error::Option(why) => in_file(path, why),
                other => other,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Masks { batch: masks.len(), masks, heads: 1 })
}

fn in_file(path: &Path, detail: String) -> Error {
    Error::File { path: PathBuf::from(path), detail }
}

/// `BQ,BK` as a block size (checked against the device when the kernel is configured).
fn parse_block_size(text: &str) -> Result<BlockSize> {
    let parsed = text.split_once(',').and_then(|(q, k)| Some((q.trim().parse().ok()?, k.trim().parse().ok()?)));
    match parsed {
        Some((q, k)) if q > 0 && k > 0 => Ok(BlockSize::new(q, k)),
        _ => Err(Error::Option(format!("--block-size '{text}': expected BQ,BK, two positive integers, e.g. 32,32"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_take_two_positive_numbers() {
        assert_eq!(parse_block_size("16, 64").unwrap(), BlockSize::new(16, 64));
        for bad in ["16", "0,32", "a,b", "16,32,4", "-1,8"] {
            assert!(parse_block_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn masks_broadcast_each_axis_when_combined() {
        let by_head = Masks { masks: vec![Mask::causal(), Mask::full()], batch: 1, heads: 2 };
        let by_batch = Masks { masks: vec![Mask::full(), Mask::key_prefix(1)], batch: 2, heads: 1 };
        let both = by_head.and(&by_batch);
        assert_eq!((both.batch, both.heads, both.masks.len()), (2, 2, 4));
        // Batch 1, head 0: causal and key 0 only; batch 0, head 1: everything.
        assert!(both.visible(4, 4, 1, 0, 3, 0) && !both.visible(4, 4, 1, 0, 3, 1) && !both.visible(4, 4, 1, 0, 0, 1));
        assert!(both.visible(4, 4, 0, 1, 0, 3));
    }

    #[test]
    fn causal_moves_to_each_sequences_corner() {
        // Sequences of 2 x 5 (query i at key position i + 3), 4 x 3 (at i - 1) and 4 x 5,
        // the longest lengths: a mask each for 4 x 5, causal to the sequence's own lengths.
        let seqlens = SeqLens::new(&[2, 4, 4], &[5, 3, 5]).unwrap();
        let placed = Masks::one(Mask::causal()).in_corners(&seqlens);
        assert_eq!((placed.batch, placed.heads), (3, 1));
        let sees = |s: usize, i: usize| (0..5).filter(|&j| placed.visible(4, 5, s, 0, i, j)).collect::<Vec<_>>();
        assert_eq!((sees(0, 0), sees(0, 1), sees(0, 2)), (vec![0, 1, 2, 3], vec![0, 1, 2, 3, 4], vec![]));
        assert_eq!((sees(1, 0), sees(1, 1), sees(1, 3)), (vec![], vec![0], vec![0, 1, 2]));
        assert_eq!((sees(2, 0), sees(2, 3)), (vec![0, 1], vec![0, 1, 2, 3, 4]));
    }
}
