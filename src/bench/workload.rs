//! What is benchmarked: attention problems, dense or block-sparse, their FLOP and memory
//! accounting, their GPU buffers, and the grids `wattn bench` walks. The criterion benches
//! use the same types.

use crate::FlashConfig;
use crate::attention::{AttentionBuffers, AttentionOptions, AttentionShape, flash, naive};
use crate::context::Context;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::mask::{BlockMask, BlockSize, GpuBlockMask, Mask};
use crate::tensor::Tensor;

/// One attention problem: self-attention sizes, storage dtype and mask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Workload {
    /// Batch, query and K/V heads, sequence lengths and head dims.
    pub shape: AttentionShape,
    /// Storage dtype of Q, K, V and O (LSE is always f32).
    pub dtype: DType,
    /// Scale, softcap and the dense mask (causal, window, sinks); default for block-sparse problems.
    pub options: AttentionOptions,
    /// The block mask of a block-sparse problem; `None` runs the dense kernel.
    pub sparsity: Option<Sparsity>,
}

/// The block masks `wattn bench` measures. Each is defined for any sequence length and
/// built the same way every time (seeded), so a run can be repeated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pattern {
    /// Each (query block, key block) visited with probability `density`, independently.
    Random(f64),
    /// Causal: about half the blocks.
    Causal,
    /// A causal sliding window of N/8 keys.
    Window,
    /// Packed documents of random lengths between N/16 and 3N/16 (N/8 on average), causal
    /// inside each.
    Documents,
}

/// `which` of [`input_value`] for the random choices of the patterns.
const RANDOM_BLOCKS: u64 = 3;
const DOCUMENT_LENGTHS: u64 = 4;

impl Pattern {
    /// "random", "causal", "window" or "documents".
    pub fn kind(&self) -> &'static str {
        match self {
            Pattern::Random(_) => "random",
            Pattern::Causal => "causal",
            Pattern::Window => "window",
            Pattern::Documents => "documents",
        }
    }

    /// The kind, with the density asked for when random: "random 0.1".
    pub fn name(&self) -> String {
        match self {
            Pattern::Random(density) => format!("random {density}"),
            other => other.kind().into(),
        }
    }

    /// The mask for `n` queries and `n` keys; random patterns choose blocks of `block`.
    pub fn mask(&self, n: usize, block: BlockSize) -> Result<Mask> {
        match *self {
            Pattern::Random(density) => {
                if !(density > 0.0 && density <= 1.0) {
                    return Err(Error::Option(format!("block density {density} is not in (0, 1]")));
                }
                let (q_blocks, k_blocks) = (n.div_ceil(block.q as usize), n.div_ceil(block.k as usize));
                let on: Vec<bool> = (0..q_blocks * k_blocks)
                    .map(|i| (input_value(RANDOM_BLOCKS, i as u64) as f64 + 1.0) / 2.0 < density)
                    .collect();
                Mask::blocks(block, q_blocks, k_blocks, &on)
            }
            Pattern::Causal => Ok(Mask::causal()),
            Pattern::Window => Ok(Mask::window((n / 8).max(1) as i32, 0)),
            Pattern::Documents => {
                let mut lengths = Vec::new();
                let mut left = n;
                while left > 0 {
                    let unit = (input_value(DOCUMENT_LENGTHS, lengths.len() as u64) as f64 + 1.0) / 2.0;
                    let length = ((n as f64 / 16.0) * (1.0 + 2.0 * unit)) as usize;
                    lengths.push(length.clamp(1, left));
                    left -= lengths[lengths.len() - 1];
                }
                Ok(Mask::document_lengths(&lengths)? & Mask::causal())
            }
        }
    }
}

/// A workload's block mask: a pattern compiled onto the flash kernel's tiles.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sparsity {
    /// The mask the blocks are built from.
    pub pattern: Pattern,
    /// The mask's blocks: the flash kernel's tiles it runs with.
    pub block: BlockSize,
    /// The fraction of blocks the kernel visits ([`BlockMask::density`]).
    pub density: f64,
}

impl Sparsity {
    /// `pattern` on `n` x `n` elements in blocks of `block`, built once to learn its density.
    pub fn new(pattern: Pattern, n: usize, block: BlockSize) -> Result<Self> {
        let density = BlockMask::new(&pattern.mask(n, block)?, n, n, block)?.density();
        Ok(Self { pattern, block, density })
    }

    /// The mask and its blocks, as [`Sparsity::new`] built them.
    fn build(&self, n: usize) -> Result<(Mask, BlockMask)> {
        let mask = self.pattern.mask(n, self.block)?;
        let blocks = BlockMask::new(&mask, n, n, self.block)?;
        Ok((mask, blocks))
    }
}

/// The two ways of computing attention that are timed against each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    /// The tiled kernel (`flash::encode`) with a given tile configuration.
    Flash,
    /// The materialised-scores baseline (`naive::encode`).
    Naive,
}

impl Workload {
    /// Self-attention over `seq` tokens with `heads` query heads sharing `kv_heads` K/V
    /// heads (grouped-query attention when fewer).
    pub fn new(
        batch: usize,
        heads: usize,
        kv_heads: usize,
        seq: usize,
        head_dim: usize,
        dtype: DType,
        options: AttentionOptions,
    ) -> Self {
        let shape =
            AttentionShape { batch, q_heads: heads, kv_heads, n_q: seq, n_k: seq, d_qk: head_dim, d_v: head_dim };
        Self { shape, dtype, options, sparsity: None }
    }

    /// This problem without options, restricted to `pattern` on blocks of `block`.
    pub fn block_sparse(&self, pattern: Pattern, block: BlockSize) -> Result<Self> {
        let sparsity = Sparsity::new(pattern, self.shape.n_q, block)?;
        Ok(Self { options: AttentionOptions::default(), sparsity: Some(sparsity), ..*self })
    }

    /// The dense problem a block-sparse one is measured against: the same shape and dtype,
    /// no mask at all.
    pub fn dense_baseline(&self) -> Self {
        Self { options: AttentionOptions::default(), sparsity: None, ..*self }
    }

    fn q_shape(&self) -> [usize; 4] {
        self.shape.q_shape()
    }
    fn k_shape(&self) -> [usize; 4] {
        let s = &self.shape;
        [s.batch, s.kv_heads, s.n_k, s.d_qk]
    }
    fn v_shape(&self) -> [usize; 4] {
        let s = &self.shape;
        [s.batch, s.kv_heads, s.n_k, s.d_v]
    }

    /// Checks the sizes the way the kernels will.
    pub fn check(&self) -> Result<()> {
        AttentionShape::from_shapes(&self.q_shape(), &self.k_shape(), &self.v_shape())?;
        self.options.validate()
    }

    /// Floating-point operations of one forward: per visible query-key pair, a dot product
    /// over Dqk and a weighted sum over Dv, 2 FLOPs per multiply-add, so 4·B·Hq·Nq·Nk·D
    /// when dense. K/V heads do not enter: grouped-query attention does the same arithmetic.
    /// Block-sparse problems count the pairs of the blocks visited, partial ones whole: the
    /// work the kernel does.
    pub fn flops(&self) -> f64 {
        let s = &self.shape;
        let pairs = match &self.sparsity {
            Some(sparsity) => s.n_q as f64 * s.n_k as f64 * sparsity.density,
            None => counted_pairs(s.n_q, s.n_k, &self.options),
        };
        2.0 * (s.batch * s.q_heads) as f64 * pairs * (s.d_qk + s.d_v) as f64
    }

    /// A name for the series this workload belongs to: everything but the sequence
    /// length and the batch, which the grids trade against each other.
    pub fn series(&self) -> String {
        let s = &self.shape;
        let mut name = format!("{} d{}", self.dtype, s.d_qk);
        if s.d_v != s.d_qk {
            name += &format!("/{}", s.d_v);
        }
        match &self.sparsity {
            Some(sparsity) => name += &format!(" sparse {}", sparsity.pattern.name()),
            None => {
                let options = self.options.describe();
                name += if options.is_empty() { " dense" } else { &options };
            }
        }
        if s.kv_heads != s.q_heads {
            name += &format!(" gqa {}/{}", s.q_heads, s.kv_heads);
        }
        name
    }

    /// Bytes of Q, K, V, O and LSE: what the flash path allocates.
    pub fn flash_bytes(&self) -> u64 {
        let elems = |s: [usize; 4]| s.iter().product::<usize>() as u64;
        let elem = self.dtype.size() as u64;
        let inputs = (elems(self.q_shape()) + elems(self.k_shape()) + elems(self.v_shape())) * elem;
        let outputs =
            elems(self.shape.out_shape()) * elem + self.shape.lse_shape().iter().product::<usize>() as u64 * 4;
        inputs + outputs
    }

    /// The flash path's bytes plus the f32 score matrix.
    pub fn naive_bytes(&self) -> u64 {
        self.flash_bytes() + naive::scores_bytes(&self.shape)
    }

    /// The same problem with the batch, then the heads, halved until it does at most
    /// `flops` work (or cannot shrink further): a cheap way to learn a path's speed
    /// before committing to the full problem.
    pub fn shrunk_to(&self, flops: f64) -> Self {
        let mut w = *self;
        while w.flops() > flops && w.shape.batch > 1 {
            w.shape.batch = w.shape.batch.div_ceil(2);
        }
        while w.flops() > flops && w.shape.kv_heads > 1 && w.shape.kv_heads.is_multiple_of(2) {
            w.shape.kv_heads /= 2;
            w.shape.q_heads /= 2;
        }
        w
    }
}

/// The query-key pairs FLOPs are counted over, per (batch, head): all Nq·Nk when dense,
/// half of them when causal (FlashAttention's convention, so figures compare with
/// published ones), and the pairs actually visible when a window or sinks shape the mask.
pub fn counted_pairs(n_q: usize, n_k: usize, options: &AttentionOptions) -> f64 {
    if options.window == (-1, -1) && options.sinks == 0 {
        let dense = n_q as f64 * n_k as f64;
        return if options.causal { dense / 2.0 } else { dense };
    }
    (0..n_q).map(|i| visible_keys(n_q, n_k, i, options)).sum::<u64>() as f64
}

/// How many keys query `i` sees (the definitions of [`AttentionOptions`], in closed form).
fn visible_keys(n_q: usize, n_k: usize, i: usize, options: &AttentionOptions) -> u64 {
    let (left, right) = options.effective_window();
    let diag = i as i64 + n_k as i64 - n_q as i64;
    let last = if right >= 0 { (diag + right as i64).min(n_k as i64 - 1) } else { n_k as i64 - 1 };
    let first = if left >= 0 { (diag - left as i64).max(0) } else { 0 };
    let in_window = (last - first + 1).max(0);
    // Sinks below the window that are not past its right end.
    let sinks_outside = (options.sinks as i64).min(first).min(last + 1).max(0);
    (in_window + sinks_outside) as u64
}

/// Input element `index` of tensor `which` (0 Q, 1 K, 2 V): a hash of both mapped to
/// [-1, 1), so that any slice can be made again without keeping the tensor on the host.
pub fn input_value(which: u64, index: u64) -> f32 {
    // SplitMix64's finaliser.
    let mut z = (which << 58 ^ index).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// Input values `range` of tensor `which`, rounded to what the GPU stores in `dtype`.
pub fn input_values(which: u64, range: std::ops::Range<usize>, dtype: DType) -> Vec<f32> {
    range
        .map(|i| {
            let x = input_value(which, i as u64);
            match dtype {
                DType::F32 => x,
                DType::F16 => half::f16::from_f32(x).to_f32(),
            }
        })
        .collect()
}

/// A workload's inputs on the GPU, shared by both paths, and its block mask.
pub struct Problem {
    /// The workload uploaded.
    pub workload: Workload,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Option<UploadedMask>,
}

/// A block-sparse problem's mask: the predicate, for the reference, and its blocks on the GPU.
struct UploadedMask {
    mask: Mask,
    blocks: GpuBlockMask,
}

/// The buffers one path writes: O, LSE and, for the naive path, the score matrix.
pub struct PathBuffers {
    /// O `[batch, q_heads, n_q, d_v]`, in the workload's dtype.
    pub out: Tensor,
    pub(crate) lse: Tensor,
    /// Present exactly for the naive path.
    scores: Option<wgpu::Buffer>,
}

impl PathBuffers {
    /// The path these buffers were allocated for.
    pub fn path(&self) -> Path {
        if self.scores.is_some() { Path::Naive } else { Path::Flash }
    }

    /// Bytes of the buffers this path allocated beyond the shared inputs.
    pub fn bytes(&self) -> u64 {
        self.out.buffer().size() + self.lse.buffer().size() + self.scores.as_ref().map_or(0, |s| s.size())
    }
}

impl Problem {
    /// Uploads Q, K and V filled by [`input_value`], and the block mask if there is one.
    pub fn upload(ctx: &Context, workload: &Workload) -> Result<Self> {
        workload.check()?;
        let tensor = |which: u64, shape: [usize; 4]| {
            let data = input_values(which, 0..shape.iter().product(), workload.dtype);
            Tensor::from_f32(ctx, &shape, &data, workload.dtype)
        };
        let mask = match &workload.sparsity {
            Some(sparsity) => {
                let (mask, blocks) = sparsity.build(workload.shape.n_q)?;
                Some(UploadedMask { mask, blocks: blocks.upload(ctx)? })
            }
            None => None,
        };
        Ok(Self {
            workload: *workload,
            q: tensor(0, workload.q_shape())?,
            k: tensor(1, workload.k_shape())?,
            v: tensor(2, workload.v_shape())?,
            mask,
        })
    }

    /// Bytes of the input buffers, the block mask's included.
    pub fn input_bytes(&self) -> u64 {
        let mask = self.mask.as_ref().map_or(0, |m| m.blocks.buffer().size());
        [&self.q, &self.k, &self.v].iter().map(|t| t.buffer().size()).sum::<u64>() + mask
    }

    /// Whether query `i` sees key `j` under the block mask (always, without one); the
    /// options' mask is separate.
    pub fn mask_allows(&self, i: usize, j: usize) -> bool {
        let s = &self.workload.shape;
        self.mask.as_ref().is_none_or(|m| m.mask.visible(s.n_q, s.n_k, i, j))
    }

    /// Allocates the outputs of `path` (and the naive path's score matrix, checked
    /// against the adapter's limits).
    pub fn alloc(&self, ctx: &Context, path: Path) -> Result<PathBuffers> {
        let shape = &self.workload.shape;
        let scores = match path {
            Path::Flash => None,
            Path::Naive if self.mask.is_some() => {
                return Err(Error::Option("the naive baseline takes no block mask".into()));
            }
            Path::Naive => Some(naive::alloc_scores(ctx, shape)?),
        };
        Ok(PathBuffers {
            out: Tensor::zeros(ctx, &shape.out_shape(), self.workload.dtype)?,
            lse: Tensor::zeros(ctx, &shape.lse_shape(), DType::F32)?,
            scores,
        })
    }

    /// Records one forward of `bufs`' path into `encoder`.
    pub fn record(
        &self,
        ctx: &Context,
        bufs: &PathBuffers,
        config: &FlashConfig,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<()> {
        let views = AttentionBuffers {
            q: self.q.view(),
            k: self.k.view(),
            v: self.v.view(),
            out: bufs.out.view(),
            lse: bufs.lse.view(),
        };
        let options = &self.workload.options;
        match &bufs.scores {
            None => flash::encode(ctx, encoder, &views, self.mask.as_ref().map(|m| &m.blocks), options, config),
            Some(scores) => naive::encode(ctx, encoder, &views, scores, options),
        }
    }
}

/// FlashAttention's benchmark protocol: every point processes this many tokens
/// (batch = 16384 / seq) ...
pub const TOKENS_PER_POINT: usize = 16384;
/// ... in a model this wide (heads = 2048 / head dim), so that all points do work of the
/// same order and short sequences still fill the device.
pub const MODEL_WIDTH: usize = 2048;

/// The points `wattn bench` measures: the product of its lists.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Grid {
    pub seqs: Vec<usize>,
    pub head_dims: Vec<usize>,
    pub dtypes: Vec<DType>,
    pub causal: Vec<bool>,
    /// Sliding window `(left, right)`; (-1, -1) for none.
    pub window: (i32, i32),
    /// `None`: [`TOKENS_PER_POINT`] / seq (at least 1).
    pub batch: Option<usize>,
    /// `None`: [`MODEL_WIDTH`] / head dim (at least 1).
    pub heads: Option<usize>,
    /// `None`: as many as query heads.
    pub kv_heads: Option<usize>,
    /// Block-sparse patterns, each measured at every (dtype, head dim, sequence length)
    /// against the dense point of that shape (so `causal` must hold `false` and there must
    /// be no window).
    pub sparse: Vec<Pattern>,
}

impl Grid {
    /// Sequence lengths 512 to 16K, head dims 64 and 128, f32 and f16, causal and not,
    /// sized by FlashAttention's protocol.
    pub fn full() -> Self {
        Self {
            seqs: (9..=14).map(|p| 1 << p).collect(),
            head_dims: vec![64, 128],
            dtypes: vec![DType::F32, DType::F16],
            causal: vec![false, true],
            window: (-1, -1),
            batch: None,
            heads: None,
            kv_heads: None,
            sparse: Vec::new(),
        }
    }

    /// Small enough to finish in under a minute on a two-core software adapter.
    pub fn quick() -> Self {
        Self { seqs: vec![256, 512, 1024], head_dims: vec![64], batch: Some(1), heads: Some(2), ..Self::full() }
    }

    /// The points in grid order (dtype, head dim, causal, sequence length), each checked,
    /// then the block-sparse ones (dtype, head dim, sequence length, pattern), whose masks
    /// have blocks of `block`: the flash tiles they will run with.
    pub fn workloads(&self, block: BlockSize) -> Result<Vec<Workload>> {
        if !self.sparse.is_empty() && (!self.causal.contains(&false) || self.window != (-1, -1)) {
            return Err(Error::Option(
                "block-sparse points are measured against the dense kernel without a mask: \
                 keep causal false (or both) and no window"
                    .into(),
            ));
        }
        let mut points = Vec::new();
        for &dtype in &self.dtypes {
            for &head_dim in &self.head_dims {
                for &causal in &self.causal {
                    for &seq in &self.seqs {
                        let heads = self.heads.unwrap_or((MODEL_WIDTH / head_dim.max(1)).max(1));
                        let kv_heads = self.kv_heads.unwrap_or(heads);
                        let batch = self.batch.unwrap_or((TOKENS_PER_POINT / seq.max(1)).max(1));
                        let options = AttentionOptions { causal, window: self.window, ..Default::default() };
                        let w = Workload::new(batch, heads, kv_heads, seq, head_dim, dtype, options);
                        w.check()?;
                        points.push(w);
                    }
                }
            }
        }
        if points.is_empty() {
            return Err(Error::Option("the benchmark grid is empty".into()));
        }
        let baselines: Vec<Workload> = points.iter().filter(|w| !w.options.causal).copied().collect();
        for dense in baselines {
            for &pattern in &self.sparse {
                points.push(dense.block_sparse(pattern, block)?);
            }
        }
        Ok(points)
    }
}

/// The small shapes the criterion benches time (both paths each).
pub fn criterion_workloads() -> Vec<Workload> {
    [(256, false), (512, true)]
        .into_iter()
        .map(|(seq, causal)| {
            let options = AttentionOptions { causal, ..Default::default() };
            Workload::new(1, 4, 4, seq, 64, DType::F32, options)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::visible;

    fn options(causal: bool, window: (i32, i32), sinks: u32) -> AttentionOptions {
        AttentionOptions { causal, window, sinks, ..Default::default() }
    }

    #[test]
    fn dense_and_causal_flops_follow_flash_attention() {
        let dense = Workload::new(2, 8, 8, 1024, 64, DType::F32, AttentionOptions::default());
        assert_eq!(dense.flops(), 4.0 * 2.0 * 8.0 * 1024.0 * 1024.0 * 64.0);
        let causal = Workload { options: AttentionOptions::causal(), ..dense };
        assert_eq!(causal.flops(), dense.flops() / 2.0);
    }

    #[test]
    fn grouped_query_heads_do_not_change_flops() {
        let mha = Workload::new(1, 32, 32, 512, 128, DType::F16, AttentionOptions::causal());
        let gqa = Workload::new(1, 32, 4, 512, 128, DType::F16, AttentionOptions::causal());
        assert_eq!(gqa.flops(), mha.flops());
        assert!(gqa.flash_bytes() < mha.flash_bytes());
    }

    #[test]
    fn windowed_flops_count_the_visible_pairs() {
        // Query i of 8 sees keys i-2..=i: 1 + 2 + 3 * 6 = 21 pairs.
        let w = Workload::new(1, 1, 1, 8, 16, DType::F32, options(true, (2, 0), 0));
        assert_eq!(w.flops(), 4.0 * 21.0 * 16.0);
    }

    #[test]
    fn counted_pairs_match_the_reference_mask() {
        let masks = [
            options(false, (3, 1), 0),
            options(true, (3, -1), 0),
            options(false, (0, 0), 0),
            options(true, (2, 5), 2),
            options(false, (1, -1), 3),
            options(false, (-1, 2), 0),
            options(false, (4, 4), 10),
        ];
        for (n_q, n_k) in [(7, 7), (5, 13), (13, 5), (1, 9), (9, 1)] {
            for opts in &masks {
                let brute = (0..n_q)
                    .flat_map(|i| (0..n_k).map(move |j| (i, j)))
                    .filter(|&(i, j)| visible(opts, n_q, n_k, i, j))
                    .count();
                assert_eq!(counted_pairs(n_q, n_k, opts), brute as f64, "{n_q}x{n_k} {opts:?}");
            }
        }
    }

    #[test]
    fn memory_accounting_adds_the_score_matrix_for_naive() {
        let w = Workload::new(2, 4, 2, 100, 64, DType::F16, AttentionOptions::default());
        let q = 2 * 4 * 100 * 64 * 2;
        let kv = 2 * 2 * 100 * 64 * 2;
        let lse = 2 * 4 * 100 * 4;
        assert_eq!(w.flash_bytes(), (q + 2 * kv + q + lse) as u64);
        assert_eq!(w.naive_bytes() - w.flash_bytes(), 2 * 4 * 100 * 100 * 4);
    }

    #[test]
    fn grids_follow_the_token_protocol_and_check_heads() {
        let points = Grid::full().workloads(FlashConfig::CPU.block_size()).unwrap();
        assert_eq!(points.len(), 6 * 2 * 2 * 2);
        for w in &points {
            assert_eq!(w.shape.batch * w.shape.n_q, TOKENS_PER_POINT);
            assert_eq!(w.shape.q_heads * w.shape.d_qk, MODEL_WIDTH);
        }
        let bad = Grid { kv_heads: Some(3), ..Grid::quick() };
        assert!(matches!(bad.workloads(FlashConfig::CPU.block_size()), Err(Error::Heads { .. })));
    }

    #[test]
    fn shrinking_keeps_the_sequence_and_the_head_ratio() {
        let w = Workload::new(32, 32, 8, 512, 64, DType::F32, AttentionOptions::default());
        let small = w.shrunk_to(1e9);
        assert!(small.flops() <= 1e9 && small.flops() > 1e9 / 4.0, "{small:?}");
        assert_eq!((small.shape.n_q, small.shape.d_qk), (512, 64));
        assert_eq!(small.shape.q_heads / small.shape.kv_heads, 4);
    }

    #[test]
    fn block_sparse_patterns_mean_what_they_say() {
        let block = BlockSize::new(32, 32);
        // 256 x 256 blocks: the realised density is close to the one asked for.
        for density in [0.05, 0.3, 1.0] {
            let s = Sparsity::new(Pattern::Random(density), 8192, block).unwrap();
            assert!((s.density - density).abs() < 0.01, "{density}: {}", s.density);
        }
        assert_eq!(Sparsity::new(Pattern::Random(1.0), 100, block).unwrap().density, 1.0);
        assert!(Pattern::Random(0.0).mask(64, block).is_err() && Pattern::Random(1.5).mask(64, block).is_err());
        let n = 1000;
        let sees = |pattern: Pattern, i: usize, j: usize| pattern.mask(n, block).unwrap().visible(n, n, i, j);
        // Window: causal, n/8 = 125 keys back.
        assert!(
            sees(Pattern::Window, 500, 375) && !sees(Pattern::Window, 500, 374) && !sees(Pattern::Window, 500, 501)
        );
        assert!(sees(Pattern::Causal, 500, 500) && !sees(Pattern::Causal, 500, 501));
        // Documents: causal runs of n/16 to 3n/16 keys (the last one cut to fit).
        let mask = Pattern::Documents.mask(n, block).unwrap();
        let starts: Vec<usize> = (0..n).filter(|&i| i == 0 || !mask.visible(n, n, i, i - 1)).collect();
        let lengths: Vec<usize> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(lengths.len() >= 4 && lengths.iter().all(|&l| (n / 16..=3 * n / 16).contains(&l)), "{starts:?}");
        assert!(!mask.visible(n, n, starts[1], starts[1] + 1), "causal inside documents");
        assert_eq!(Pattern::Documents.mask(n, block).unwrap().to_string(), mask.to_string(), "seeded");
    }

    #[test]
    fn block_sparse_workloads_count_the_blocks_they_visit() {
        let dense = Workload::new(2, 4, 4, 512, 64, DType::F32, AttentionOptions::causal());
        let sparse = dense.block_sparse(Pattern::Causal, BlockSize::new(64, 64)).unwrap();
        // 8 query blocks: 36 of 64 blocks on or below the diagonal.
        assert_eq!(sparse.sparsity.unwrap().density, 36.0 / 64.0);
        assert_eq!(sparse.flops(), dense.dense_baseline().flops() * 36.0 / 64.0);
        assert_eq!(sparse.options, AttentionOptions::default());
        assert_eq!(sparse.series(), "f32 d64 sparse causal");
        assert_eq!(sparse.dense_baseline(), Workload { options: AttentionOptions::default(), ..dense });
        let grid = Grid { sparse: vec![Pattern::Random(0.5), Pattern::Window], causal: vec![false], ..Grid::quick() };
        let points = grid.workloads(BlockSize::new(32, 32)).unwrap();
        assert_eq!(points.len(), 6 + 6 * 2, "3 seqs x 2 dtypes, each dense and with two patterns");
        for w in points.iter().filter(|w| w.sparsity.is_some()) {
            assert!(points.contains(&w.dense_baseline()), "{w:?}");
        }
        let causal_only = Grid { causal: vec![true], ..grid };
        assert!(matches!(causal_only.workloads(BlockSize::new(32, 32)), Err(Error::Option(_))));
    }

    #[test]
    fn inputs_are_reproducible_and_in_range() {
        let a = input_values(1, 10..20, DType::F32);
        assert_eq!(a, input_values(1, 0..20, DType::F32)[10..]);
        assert_ne!(a, input_values(2, 10..20, DType::F32));
        let all = input_values(0, 0..10_000, DType::F32);
        assert!(all.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = all.iter().sum::<f32>() / all.len() as f32;
        assert!(mean.abs() < 0.05, "mean {mean}");
    }
}
