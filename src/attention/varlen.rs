//! Variable-length attention (FlashAttention's `flash_attn_varlen_func`): sequences of
//! different lengths packed along the sequence axis of one batch, each attending only within
//! itself, in one launch of the flash kernel's varlen variant.
//!
//! Sequence `s` owns query rows `seqlens_q[0] + .. + seqlens_q[s - 1]` onwards of Q
//! `[1, Hq, total_q, Dqk]` and O, and key rows likewise of K `[1, Hkv, total_k, Dqk]` and V;
//! every option applies per sequence (causal and windows aligned bottom-right to the
//! sequence's own lengths, sinks its first keys). A sequence may have no queries (it gets no
//! work) or no keys (its rows see nothing: zeros, LSE -inf). With a block mask, the mask's
//! batch axis is the sequence (1 = the same mask for every sequence) and its lengths are the
//! longest sequence's: sequence `s` reads the top-left corner of its mask that its lengths
//! cover.

use super::flash::{self, FlashConfig, PackedGrid};
use super::{AttentionBuffers, AttentionOptions, AttentionOutput, AttentionShape, alloc_output};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::mask::GpuBlockMask;
use crate::tensor::{Tensor, check_binding_size};
use std::ops::Range;
use wgpu::util::DeviceExt;

/// One sequence: its first rows in the packed Q and K/V, and its lengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    q_start: u32,
    k_start: u32,
    n_q: u32,
    n_k: u32,
}

/// One workgroup's block of a sequence as the kernels read it: its sequence, its block within
/// that sequence (of query rows, or of keys in the backward's dK/dV pass), and the sequence's
/// [`SeqLens::queries`] start and length and [`SeqLens::keys`] start and length. Keep in sync
/// with `struct SequenceBlock` in flash_fwd.wgsl (a test compares the layouts) and the
/// tables of flash_bwd.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SequenceBlock {
    /// Index of the sequence.
    pub sequence: u32,
    /// The block's index among the sequence's blocks.
    pub block: u32,
    /// The sequence's first query row.
    pub q_start: u32,
    /// The sequence's first key row.
    pub k_start: u32,
    /// The sequence's queries.
    pub n_q: u32,
    /// The sequence's keys.
    pub n_k: u32,
}

/// The per-sequence lengths of a packed batch, checked once: at least one sequence, as many
/// key lengths as query lengths, and totals that fit the kernels' 32-bit row indices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqLens {
    spans: Vec<Span>,
    total_q: u32,
    total_k: u32,
}

impl SeqLens {
    /// The lengths of sequences `0..seqlens_q.len()`: `seqlens_q[s]` queries and `seqlens_k[s]`
    /// keys (FlashAttention's `cu_seqlens` are their running sums).
    pub fn new(seqlens_q: &[u32], seqlens_k: &[u32]) -> Result<Self> {
        if seqlens_q.len() != seqlens_k.len() {
            return Err(Error::Shape(format!(
                "varlen: {} query lengths but {} key lengths: give one of each per sequence",
                seqlens_q.len(),
                seqlens_k.len()
            )));
        }
        if seqlens_q.is_empty() {
            return Err(Error::Shape("varlen: no sequences: give at least one length".into()));
        }
        let mut spans = Vec::with_capacity(seqlens_q.len());
        let (mut total_q, mut total_k) = (0u64, 0u64);
        for (&n_q, &n_k) in seqlens_q.iter().zip(seqlens_k) {
            spans.push(Span { q_start: total_q as u32, k_start: total_k as u32, n_q, n_k });
            total_q += n_q as u64;
            total_k += n_k as u64;
            for (what, total) in [("query", total_q), ("key", total_k)] {
                if total > u32::MAX as u64 {
                    return Err(Error::Limit {
                        what: format!("varlen {what} lengths' sum"),
                        needed: total,
                        allowed: u32::MAX as u64,
                        limit: "32-bit indexing",
                    });
                }
            }
        }
        Ok(Self { spans, total_q: total_q as u32, total_k: total_k as u32 })
    }

    /// The number of sequences (at least 1).
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Always false: there is at least one sequence.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The packed query rows, the sum of the query lengths.
    pub fn total_q(&self) -> usize {
        self.total_q as usize
    }

    /// The packed key rows, the sum of the key lengths.
    pub fn total_k(&self) -> usize {
        self.total_k as usize
    }

    /// The longest sequence's queries.
    pub fn max_q(&self) -> usize {
        self.spans.iter().map(|s| s.n_q).max().unwrap_or(0) as usize
    }

    /// The longest sequence's keys.
    pub fn max_k(&self) -> usize {
        self.spans.iter().map(|s| s.n_k).max().unwrap_or(0) as usize
    }

    /// Sequence `s`'s query rows in the packed Q, O and LSE.
    pub fn queries(&self, s: usize) -> Range<usize> {
        let span = self.spans[s];
        span.q_start as usize..(span.q_start + span.n_q) as usize
    }

    /// Sequence `s`'s key rows in the packed K and V.
    pub fn keys(&self, s: usize) -> Range<usize> {
        let span = self.spans[s];
        span.k_start as usize..(span.k_start + span.n_k) as usize
    }

    /// Errors unless `shape` (of the packed Q, K, V) has one batch and the lengths' sums.
    pub fn check(&self, shape: &AttentionShape) -> Result<()> {
        if shape.batch != 1 {
            return Err(Error::Shape(format!(
                "varlen: packed tensors have batch 1 (sequences go along the sequence axis), Q has batch {}",
                shape.batch
            )));
        }
        for (what, tensor, total, packed) in
            [("query", "Q", self.total_q, shape.n_q), ("key", "K and V", self.total_k, shape.n_k)]
        {
            if total as usize != packed {
                return Err(Error::Shape(format!(
                    "varlen: the {} {what} lengths sum to {total}, but {tensor} pack {packed} rows",
                    self.len()
                )));
            }
        }
        Ok(())
    }

    /// The query blocks of `block_q` rows of every sequence, each with its sequence, the
    /// longest work first: sequences by keys, and a sequence's later blocks (which see more
    /// keys when causal) before its earlier ones. Workgroups start roughly in grid order, so
    /// the long blocks of a long sequence do not start last and run on alone (on llvmpipe,
    /// sequence order made the launch 7% slower than one launch per sequence).
    pub(crate) fn query_blocks(&self, block_q: u32) -> Vec<SequenceBlock> {
        let mut blocks = self.blocks(|s| s.n_q, block_q);
        blocks.sort_by_key(|b| std::cmp::Reverse((b.n_k, b.block)));
        blocks
    }

    /// The blocks of `block_k` keys of every sequence, the longest work first as in
    /// [`Self::query_blocks`]: sequences by queries, and a sequence's earlier blocks (which
    /// more queries see when causal) before its later ones.
    pub(crate) fn key_blocks(&self, block_k: u32) -> Vec<SequenceBlock> {
        let mut blocks = self.blocks(|s| s.n_k, block_k);
        blocks.sort_by_key(|b| (std::cmp::Reverse(b.n_q), b.block));
        blocks
    }

    /// Every sequence's blocks of `size` of its `rows(span)` rows, in sequence order.
    fn blocks(&self, rows: fn(&Span) -> u32, size: u32) -> Vec<SequenceBlock> {
        let blocks = |(sequence, span): (usize, &Span)| {
            let Span { q_start, k_start, n_q, n_k } = *span;
            (0..rows(span).div_ceil(size)).map(move |block| SequenceBlock {
                sequence: sequence as u32,
                block,
                q_start,
                k_start,
                n_q,
                n_k,
            })
        };
        self.spans.iter().enumerate().flat_map(blocks).collect()
    }

    /// The problem the block mask of a launch over these sequences describes: one batch per
    /// sequence, the longest sequence's lengths.
    pub(crate) fn mask_shape(&self, packed: &AttentionShape) -> AttentionShape {
        AttentionShape { batch: self.len(), n_q: self.max_q(), n_k: self.max_k(), ..*packed }
    }
}

/// A read-only storage buffer holding `data`.
fn storage_buffer<T: bytemuck::Pod>(ctx: &Context, what: &str, data: &[T]) -> Result<wgpu::Buffer> {
    let bytes = bytemuck::cast_slice(data);
    check_binding_size(ctx, what, bytes.len() as u64)?;
    Ok(ctx.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(what),
        contents: bytes,
        usage: wgpu::BufferUsages::STORAGE,
    }))
}

/// Records varlen flash attention into `encoder` on the caller's packed buffers (Q
/// `[1, Hq, total_q, Dqk]`, K `[1, Hkv, total_k, Dqk]`, V `[1, Hkv, total_k, Dv]`, O
/// `[1, Hq, total_q, Dv]`, LSE `[1, Hq, total_q]`), as [`flash::encode`] does for dense ones.
/// Nothing is submitted. The table of query blocks goes to the GPU in a small buffer made here.
///
/// With a `mask`, its batch axis is the sequence and its lengths the longest sequence's (see
/// the module's documentation); its blocks must be `config`'s tiles.
pub fn encode(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    bufs: &AttentionBuffers<'_>,
    seqlens: &SeqLens,
    mask: Option<&GpuBlockMask>,
    options: &AttentionOptions,
    config: &FlashConfig,
) -> Result<()> {
    options.validate()?;
    let shape = bufs.validate(ctx)?;
    seqlens.check(&shape)?;
    if let Some(mask) = mask {
        mask.check(&seqlens.mask_shape(&shape), config)?;
    }
    let blocks = seqlens.query_blocks(config.block_q);
    let query_blocks = storage_buffer(ctx, "wattn varlen query blocks", &blocks)?;
    let grid = PackedGrid { query_blocks: &query_blocks, blocks: blocks.len() as u32, max_n_k: seqlens.max_k() as u32 };
    flash::record(ctx, encoder, bufs, &shape, mask, options, config, Some(&grid))
}

/// Varlen flash attention on tensors wattn owns: records, submits, and returns O
/// `[1, Hq, total_q, Dv]` and LSE `[1, Hq, total_q]`, packed like Q. Runs the
/// [`FlashConfig`] chosen for the longest sequence ([`FlashConfig::for_shape`]).
///
/// Errors if the tensors are not packed (batch 1) or the lengths do not sum to their rows.
pub fn attention_varlen(
    ctx: &Context,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens: &SeqLens,
    options: &AttentionOptions,
) -> Result<AttentionOutput> {
    let shape = AttentionShape::from_shapes(q.shape(), k.shape(), v.shape())?;
    seqlens.check(&shape)?;
    let longest = AttentionShape { n_q: seqlens.max_q().max(1), n_k: seqlens.max_k().max(1), ..shape };
    let (config, _) = FlashConfig::for_shape(ctx, &longest, q.dtype(), options.causal);
    attention_varlen_with(ctx, q, k, v, seqlens, options, &config)
}

/// [`attention_varlen`] with an explicit tile configuration.
pub fn attention_varlen_with(
    ctx: &Context,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens: &SeqLens,
    options: &AttentionOptions,
    config: &FlashConfig,
) -> Result<AttentionOutput> {
    let output = alloc_output(ctx, q, k, v)?;
    let bufs =
        AttentionBuffers { q: q.view(), k: k.view(), v: v.view(), out: output.out.view(), lse: output.lse.view() };
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    encode(ctx, &mut encoder, &bufs, seqlens, None, options, config)?;
    ctx.queue().submit([encoder.finish()]);
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_give_spans_and_query_blocks() {
        let seqlens = SeqLens::new(&[3, 0, 40, 1], &[5, 7, 0, 2]).unwrap();
        assert_eq!((seqlens.total_q(), seqlens.total_k(), seqlens.max_q(), seqlens.max_k()), (44, 14, 40, 7));
        assert_eq!((seqlens.queries(2), seqlens.keys(2)), (3..43, 12..12));
        assert_eq!((seqlens.queries(3), seqlens.keys(3)), (43..44, 12..14));
        let blocks: Vec<(u32, u32)> = seqlens.query_blocks(32).iter().map(|b| (b.sequence, b.block)).collect();
        assert_eq!(blocks, [(0, 0), (3, 0), (2, 1), (2, 0)], "no block for the sequence without queries");
        let blocks: Vec<(u32, u32)> = seqlens.key_blocks(4).iter().map(|b| (b.sequence, b.block)).collect();
        assert_eq!(blocks, [(0, 0), (0, 1), (3, 0), (1, 0), (1, 1)], "no block for the sequence without keys");
    }

    #[test]
    fn bad_lengths_are_errors() {
        assert!(matches!(SeqLens::new(&[1, 2], &[1]), Err(Error::Shape(_))));
        assert!(matches!(SeqLens::new(&[], &[]), Err(Error::Shape(_))));
        let e = SeqLens::new(&[u32::MAX, 1], &[1, 1]).unwrap_err();
        assert!(matches!(e, Error::Limit { needed, .. } if needed == u32::MAX as u64 + 1), "{e}");
        let seqlens = SeqLens::new(&[3, 4], &[5, 6]).unwrap();
        let shape = AttentionShape { batch: 1, q_heads: 2, kv_heads: 1, n_q: 7, n_k: 11, d_qk: 8, d_v: 8 };
        seqlens.check(&shape).unwrap();
        for (bad, words) in [
            (AttentionShape { n_q: 8, ..shape }, "query lengths sum to 7, but Q pack 8"),
            (AttentionShape { n_k: 10, ..shape }, "key lengths sum to 11, but K and V pack 10"),
            (AttentionShape { batch: 2, ..shape }, "batch 2"),
        ] {
            let e = seqlens.check(&bad).unwrap_err();
            assert!(matches!(e, Error::Shape(_)) && e.to_string().contains(words), "{e}");
        }
    }
}
