//! `wattn run`: attention on .npy files, dense, block-sparse or varlen (packed sequences),
//! and optionally its backward.

mod block_sparse;
mod varlen;

use super::AdapterArgs;
use super::npy::{self, NpyArray};
use crate::attention::backward::{self, GradientBuffers};
use crate::attention::{AttentionBuffers, AttentionOptions, AttentionShape, SeqLens};
use crate::context::Context;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::flash::{self, FlashConfig};
use crate::mask::BlockMask;
use crate::tensor::Tensor;
use block_sparse::SparseInputs;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Queries: [B, Hq, Nq, D], or [Hq, Nq, D] for B = 1; float32 or float16, C order.
    #[arg(long, value_name = "Q.npy")]
    pub q: PathBuf,
    /// Keys: [B, Hkv, Nk, D] (Hq a multiple of Hkv), or [Hkv, Nk, D].
    #[arg(long, value_name = "K.npy")]
    pub k: PathBuf,
    /// Values: [B, Hkv, Nk, Dv], or [Hkv, Nk, Dv].
    #[arg(long, value_name = "V.npy")]
    pub v: PathBuf,
    /// Output O, float32 [B, Hq, Nq, Dv] (3-D when the inputs are).
    #[arg(long, value_name = "O.npy")]
    pub out: PathBuf,
    /// Also write the log-sum-exp, float32 [B, Hq, Nq] (natural log; -inf where a row sees no key).
    #[arg(long, value_name = "LSE.npy")]
    pub lse: Option<PathBuf>,
    /// Causal mask, aligned bottom-right when Nq != Nk.
    #[arg(long)]
    pub causal: bool,
    /// Softmax scale; default 1/sqrt(D).
    #[arg(long, value_name = "S", allow_negative_numbers = true)]
    pub scale: Option<f32>,
    /// Sliding window LEFT,RIGHT in keys around the diagonal; -1 = unbounded on that side.
    #[arg(long, value_name = "LEFT,RIGHT", allow_hyphen_values = true)]
    pub window: Option<String>,
    /// Keep the first N keys visible beside the window (attention sinks).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub sinks: u32,
    /// Logit softcap C: scores become C * tanh(scores / C); 0 = none.
    #[arg(long, value_name = "C", default_value_t = 0.0, allow_negative_numbers = true)]
    pub softcap: f32,
    /// Storage dtype on the GPU, f32 or f16; default: the inputs' dtype.
    #[arg(long, value_name = "f32|f16")]
    pub dtype: Option<String>,
    /// Also compute the f64 CPU reference and print the max abs error of O and LSE.
    #[arg(long)]
    pub check: bool,
    /// Block-sparse: an element mask, bool or uint8, [Nq, Nk] or [B|1, Hq|1, Nq, Nk]; true = attend.
    /// Varlen: [S|1, Hq|1, Nq, Nk] or [Nq, Nk] of the longest sequence's lengths, a padded
    /// batch: sequence s reads the top-left corner its lengths cover.
    #[arg(long, value_name = "MASK.npy")]
    pub mask: Option<PathBuf>,
    /// Block-sparse: the document of each key position, int32 [Nk] or [B, Nk], non-decreasing
    /// (packed sequences); a query sees the keys of the document at its own position (bottom-right).
    /// Varlen: int32 [total Nk], packed like K and split per sequence (non-decreasing within
    /// each), positions aligned to each sequence's own lengths.
    #[arg(long, value_name = "IDS.npy")]
    pub doc_ids: Option<PathBuf>,
    /// Block-sparse: prefix-LM, the first P keys visible to every query, causal after
    /// (varlen: each sequence's first P keys, causal within it).
    #[arg(long, value_name = "P")]
    pub prefix: Option<usize>,
    /// Block-sparse: the kernel's tiles, which are the mask's blocks [default: the adapter's flash config].
    #[arg(long, value_name = "BQ,BK")]
    pub block_size: Option<String>,
    /// Draw the block mask on stderr: '#' full, '+' partial, '.' empty blocks.
    #[arg(long)]
    pub show_mask: bool,
    /// Varlen: the query length of each sequence packed along Q's sequence axis, int32 or
    /// uint32 [S], summing to Nq; each sequence attends only to its own keys, every option
    /// and mask flag per sequence, and --grad. O, LSE and the gradients are packed like the inputs. Needs --seqlens-k.
    #[arg(long, value_name = "LQ.npy")]
    pub seqlens_q: Option<PathBuf>,
    /// Varlen: the key length of each sequence packed along K's and V's sequence axis,
    /// int32 or uint32 [S], summing to Nk (0 = rows that see nothing). Needs --seqlens-q.
    #[arg(long, value_name = "LK.npy")]
    pub seqlens_k: Option<PathBuf>,
    /// Backward: dO, the loss's gradient with respect to O, in O's shape (float32 or float16);
    /// runs the backward after the forward with the same options and mask. Needs --dq, --dk, --dv.
    #[arg(long, value_name = "DO.npy")]
    pub grad: Option<PathBuf>,
    /// Backward: write dQ, float32 in Q's shape.
    #[arg(long, value_name = "DQ.npy")]
    pub dq: Option<PathBuf>,
    /// Backward: write dK, float32 in K's shape.
    #[arg(long, value_name = "DK.npy")]
    pub dk: Option<PathBuf>,
    /// Backward: write dV, float32 in V's shape.
    #[arg(long, value_name = "DV.npy")]
    pub dv: Option<PathBuf>,
    #[command(flatten)]
    pub adapter: AdapterArgs,
}

/// `--check` refuses problems with more query-key pairs than this: beyond it the CPU
/// reference takes minutes to hours.
const MAX_CHECK_PAIRS: usize = 1 << 28;

pub fn run(args: RunArgs) -> Result<()> {
    let options = AttentionOptions {
        scale: args.scale,
        causal: args.causal,
        window: args.window.as_deref().map(parse_window).transpose()?.unwrap_or((-1, -1)),
        sinks: args.sinks,
        softcap: args.softcap,
    };
    options.validate()?;
    let dtype_override = args.dtype.as_deref().map(parse_dtype).transpose()?;
    if args.seqlens_q.is_some() || args.seqlens_k.is_some() {
        return varlen::run(&args, &options, dtype_override);
    }
    let gradient_paths = gradient_paths(&args)?;
    check_outputs(&output_flags(&args, &gradient_paths))?;

    let q = npy::read_array(&args.q)?;
    let k = npy::read_array(&args.k)?;
    let v = npy::read_array(&args.v)?;
    let batched = check_ranks(&q, &k, &v)?;
    let lift = |a: &NpyArray| if batched { a.shape.clone() } else { [&[1], &a.shape[..]].concat() };
    let (q_shape, k_shape, v_shape) = (lift(&q), lift(&k), lift(&v));
    let shape = AttentionShape::from_shapes(&q_shape, &k_shape, &v_shape)?;
    let d_out = read_d_out(&args, &shape, batched)?;
    let dtype = match dtype_override {
        Some(d) => d,
        None => common_dtype(&q, &k, &v)?,
    };
    let sparse = read_sparse(&args, &shape, None)?;
    let pairs = [shape.batch, shape.q_heads, shape.n_q, shape.n_k].iter().fold(1usize, |a, &b| a.saturating_mul(b));
    if args.check && pairs > MAX_CHECK_PAIRS {
        return Err(Error::Option(format!(
            "--check: the CPU reference would score {pairs} query-key pairs, more than the 2^28 it allows; check a smaller problem"
        )));
    }
    // What the GPU reads, so the CPU reference sees the same values.
    let (q_data, k_data, v_data) = (in_storage(q.data, dtype), in_storage(k.data, dtype), in_storage(v.data, dtype));

    let ctx = args.adapter.context()?;
    // The masks hold the dense options too, so that the kernel skips the tiles they hide.
    let masks = sparse.as_ref().map(|s| s.masks(&options));
    let config = flash_config(&ctx, sparse.as_ref(), &shape, dtype, &options)?;
    let block_mask = masks.as_ref().map(|m| m.block_mask(shape.n_q, shape.n_k, config.block_size())).transpose()?;
    let gpu_mask = block_mask.as_ref().map(|m| m.upload(&ctx)).transpose()?;
    let gpu = OnGpu::upload(&ctx, [(&q_shape, &q_data), (&k_shape, &k_data), (&v_shape, &v_data)], &shape, dtype)?;
    let bufs = gpu.buffers();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    // Recording builds the pipelines, so the timed part below is only the GPU's work.
    flash::encode(&ctx, &mut encoder, &bufs, gpu_mask.as_ref(), &options, &config)?;
    let d_out_data = d_out.map(|d| in_storage(d.data, dtype));
    let gradients = d_out_data
        .as_ref()
        .map(|data| {
            Backward::record(&ctx, &gpu, data, dtype, |grads| {
                backward::encode(&ctx, &mut encoder, grads, gpu_mask.as_ref(), &options)
            })
        })
        .transpose()?;
    let start = std::time::Instant::now();
    ctx.submit_and_wait(encoder)?;
    let gpu_time = start.elapsed();
    let out = gpu.out.to_f32(&ctx)?;
    let lse = gpu.lse.to_f32(&ctx)?;
    let gradients = gradients.map(|g| g.read(&ctx)).transpose()?;

    // Outputs mirror the inputs' rank: drop the batch axis again for 3-D inputs. Every file
    // is staged before any is committed, so a failure leaves none behind.
    let skip = if batched { 0 } else { 1 };
    let mut staged = vec![npy::stage_f32(&args.out, &shape.out_shape()[skip..], &out)?];
    if let Some(path) = &args.lse {
        staged.push(npy::stage_f32(path, &shape.lse_shape()[skip..], &lse)?);
    }
    if let (Some(paths), Some(grads)) = (&gradient_paths, &gradients) {
        staged.extend(stage_gradients(paths, [&q_shape, &k_shape, &v_shape], grads, skip)?);
    }
    for file in staged {
        file.commit()?;
    }
    eprintln!(
        "wattn run: {} | Q {:?} K {:?} V {:?} {dtype}{}{} | GPU {:.3} ms",
        ctx.describe(),
        q.shape,
        k.shape,
        v.shape,
        options.describe(),
        sparse.as_ref().map_or(String::new(), |s| format!(" block-sparse {}", s.describe())),
        gpu_time.as_secs_f64() * 1e3
    );
    if let Some(mask) = &block_mask {
        report_mask(mask, args.show_mask);
    }

    if args.check {
        let visible = |b: usize, h: usize, i: usize, j: usize| {
            masks.as_ref().is_none_or(|m| m.visible(shape.n_q, shape.n_k, b, h, i, j))
        };
        let want = crate::reference::attention_masked(&q_data, &k_data, &v_data, &shape, &options, visible);
        println!(
            "check against the f64 CPU reference: max |O - ref| = {:.3e}, max |LSE - ref| = {:.3e}",
            max_abs_diff(&out, &want.out),
            max_abs_diff(&lse, &want.lse)
        );
        if let (Some(d_out), Some(got)) = (&d_out_data, &gradients) {
            let want = crate::reference::attention_backward_masked(
                &q_data, &k_data, &v_data, d_out, &shape, &options, visible,
            );
            print_gradient_check(got, &want);
        }
    }
    Ok(())
}

/// The block-sparse flags read and checked against `shape` (and the packed `sequences`),
/// or `None` when none is given.
fn read_sparse(args: &RunArgs, shape: &AttentionShape, sequences: Option<&SeqLens>) -> Result<Option<SparseInputs>> {
    let (mask, doc_ids, block_size) = (args.mask.as_deref(), args.doc_ids.as_deref(), args.block_size.as_deref());
    let sparse = SparseInputs::read(mask, doc_ids, args.prefix, block_size, shape, sequences)?;
    if args.show_mask && sparse.is_none() {
        return Err(Error::Option(
            "--show-mask draws a block mask: give --mask, --doc-ids, --prefix or --block-size".into(),
        ));
    }
    Ok(sparse)
}

/// The kernel's configuration for `shape` (varlen: the longest sequence's), checked. Block
/// masks run on the preset with their blocks as tiles; dense runs on what is tuned for the
/// shape, else the preset.
fn flash_config(
    ctx: &Context,
    sparse: Option<&SparseInputs>,
    shape: &AttentionShape,
    dtype: DType,
    options: &AttentionOptions,
) -> Result<FlashConfig> {
    let config = match sparse {
        Some(s) => {
            let preset = FlashConfig::for_adapter(ctx);
            preset.fitted_to_block(ctx.limits(), shape, s.block_size(preset.block_size()))
        }
        None => FlashConfig::for_shape(ctx, shape, dtype, options.causal).0,
    };
    config.check(ctx.limits(), shape)?;
    Ok(config)
}

/// Prints the block mask's summary line (size, blocks, density), or with `show` its drawing.
fn report_mask(mask: &BlockMask, show: bool) {
    let drawing = mask.to_string();
    let shown = if show { drawing.as_str() } else { drawing.lines().next().unwrap_or_default() };
    eprintln!("wattn run: {}", shown.trim_end());
}

/// The output flags and paths of a run: O, the LSE if asked, and the gradients if asked.
fn output_flags<'a>(args: &'a RunArgs, gradient_paths: &'a Option<[PathBuf; 3]>) -> Vec<(&'static str, &'a Path)> {
    let mut outputs: Vec<(&str, &Path)> = vec![("--out", &args.out)];
    outputs.extend(args.lse.as_deref().map(|p| ("--lse", p)));
    if let Some([dq, dk, dv]) = gradient_paths {
        outputs.extend([("--dq", dq.as_path()), ("--dk", dk.as_path()), ("--dv", dv.as_path())]);
    }
    outputs
}

/// dO from `--grad`, checked to have O's shape (3-D when the inputs are), or `None` without it.
fn read_d_out(args: &RunArgs, shape: &AttentionShape, batched: bool) -> Result<Option<NpyArray>> {
    let Some(path) = &args.grad else { return Ok(None) };
    let d_out = npy::read_array(path)?;
    let skip = if batched { 0 } else { 1 };
    if d_out.shape[..] != shape.out_shape()[skip..] {
        return Err(Error::Shape(format!(
            "--grad {}: dO has shape {:?}, expected O's {:?}",
            path.display(),
            d_out.shape,
            &shape.out_shape()[skip..]
        )));
    }
    Ok(Some(d_out))
}

/// The backward of a run: dO on the GPU and the gradients it writes (zeros until then), in
/// the inputs' layouts.
struct Backward {
    _d_out: Tensor,
    gradients: [Tensor; 3],
}

impl Backward {
    /// Allocates dO (from `d_out`) and the gradients of the run on `gpu`, and has `record`
    /// record the backward that writes them.
    fn record(
        ctx: &Context,
        gpu: &OnGpu,
        d_out: &[f32],
        dtype: DType,
        record: impl FnOnce(&GradientBuffers<'_>) -> Result<()>,
    ) -> Result<Self> {
        let forward = gpu.buffers();
        let d_out = Tensor::from_f32(ctx, gpu.out.shape(), d_out, dtype)?;
        let zeros = |view: crate::tensor::TensorView<'_>| Tensor::zeros(ctx, view.shape(), dtype);
        let gradients = [zeros(forward.q)?, zeros(forward.k)?, zeros(forward.v)?];
        let [dq, dk, dv] = &gradients;
        record(&GradientBuffers { forward, d_out: d_out.view(), dq: dq.view(), dk: dk.view(), dv: dv.view() })?;
        Ok(Self { _d_out: d_out, gradients })
    }

    /// The gradients, read back as f32.
    fn read(&self, ctx: &Context) -> Result<[Vec<f32>; 3]> {
        let [dq, dk, dv] = &self.gradients;
        Ok([dq.to_f32(ctx)?, dk.to_f32(ctx)?, dv.to_f32(ctx)?])
    }
}

/// The gradient files staged: `grads` [dQ, dK, dV] in the shapes `dims` of Q, K and V
/// (without the first `skip` axes).
fn stage_gradients(
    paths: &[PathBuf; 3],
    dims: [&[usize]; 3],
    grads: &[Vec<f32>; 3],
    skip: usize,
) -> Result<Vec<npy::StagedFile>> {
    paths.iter().zip(dims).zip(grads).map(|((path, dims), data)| npy::stage_f32(path, &dims[skip..], data)).collect()
}

/// Prints the gradients' largest errors against the reference's.
fn print_gradient_check(got: &[Vec<f32>; 3], want: &crate::reference::ReferenceGradients) {
    println!(
        "check against the f64 CPU reference: max |dQ - ref| = {:.3e}, max |dK - ref| = {:.3e}, max |dV - ref| = {:.3e}",
        max_abs_diff(&got[0], &want.dq),
        max_abs_diff(&got[1], &want.dk),
        max_abs_diff(&got[2], &want.dv)
    );
}

/// The backward's output paths [dQ, dK, dV] when `--grad` asks for it; the four flags go together.
fn gradient_paths(args: &RunArgs) -> Result<Option<[PathBuf; 3]>> {
    let flags = [("--grad", &args.grad), ("--dq", &args.dq), ("--dk", &args.dk), ("--dv", &args.dv)];
    let missing: Vec<&str> = flags.iter().filter(|f| f.1.is_none()).map(|f| f.0).collect();
    match (missing.len(), &args.dq, &args.dk, &args.dv) {
        (0, Some(dq), Some(dk), Some(dv)) => Ok(Some([dq.clone(), dk.clone(), dv.clone()])),
        (4, ..) => Ok(None),
        _ => Err(Error::Option(format!(
            "--grad, --dq, --dk and --dv go together (the backward reads dO and writes the three gradients): missing {}",
            missing.join(", ")
        ))),
    }
}

/// `LEFT,RIGHT` as two integers.
fn parse_window(text: &str) -> Result<(i32, i32)> {
    let parsed = text.split_once(',').and_then(|(l, r)| Some((l.trim().parse().ok()?, r.trim().parse().ok()?)));
    parsed.ok_or_else(|| {
        Error::Option(format!(
            "--window '{text}': expected LEFT,RIGHT, two integers (-1 = unbounded), e.g. --window 256,0"
        ))
    })
}

pub(super) fn parse_dtype(text: &str) -> Result<DType> {
    text.parse().map_err(|_| Error::Option(format!("--dtype '{text}': use f32 or f16")))
}

/// Refuses output paths (flag, path) that cannot be written or that name one file twice,
/// before any work is done.
fn check_outputs(outputs: &[(&str, &Path)]) -> Result<()> {
    for (n, (flag, path)) in outputs.iter().enumerate() {
        if let Some((other, _)) = outputs[..n].iter().find(|o| o.1 == *path) {
            return Err(Error::Option(format!("{other} and {flag} name the same file")));
        }
    }
    for &(_, path) in outputs {
        let fail = |detail: &str| Error::File { path: path.to_path_buf(), detail: detail.into() };
        if path.is_dir() {
            return Err(fail("is a directory"));
        }
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !dir.is_dir() {
            return Err(fail("its directory does not exist"));
        }
    }
    Ok(())
}

/// Q, K and V must all be 4-D, or all 3-D (one batch); returns whether they are 4-D.
fn check_ranks(q: &NpyArray, k: &NpyArray, v: &NpyArray) -> Result<bool> {
    let rank = q.shape.len();
    if rank != 3 && rank != 4 {
        return Err(Error::Rank { what: "Q", expected: "3 [H, N, D] or 4 [B, H, N, D]".into(), got: q.shape.clone() });
    }
    for (what, a) in [("K", k), ("V", v)] {
        if a.shape.len() != rank {
            return Err(Error::Rank { what, expected: format!("{rank}, like Q"), got: a.shape.clone() });
        }
    }
    Ok(rank == 4)
}

fn common_dtype(q: &NpyArray, k: &NpyArray, v: &NpyArray) -> Result<DType> {
    if k.dtype != q.dtype || v.dtype != q.dtype {
        return Err(Error::DType(format!(
            "Q is {}, K is {}, V is {}: save them with one dtype or pass --dtype",
            q.dtype, k.dtype, v.dtype
        )));
    }
    Ok(q.dtype)
}

/// Rounds to what a tensor of `dtype` holds (exact for values that came from f16).
fn in_storage(data: Vec<f32>, dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => data,
        DType::F16 => data.into_iter().map(|x| half::f16::from_f32(x).to_f32()).collect(),
    }
}

/// Max |got - want|; -inf against -inf counts as equal, any NaN makes the result NaN.
fn max_abs_diff(got: &[f32], want: &[f64]) -> f64 {
    got.iter().zip(want).fold(0.0, |worst: f64, (&g, &w)| {
        let g = g as f64;
        let diff = if g == w { 0.0 } else { (g - w).abs() };
        if diff.is_nan() || worst.is_nan() { f64::NAN } else { worst.max(diff) }
    })
}

/// Q, K and V uploaded in the run's dtype, with O and LSE for `shape` to write.
struct OnGpu {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
}

impl OnGpu {
    fn upload(ctx: &Context, qkv: [(&[usize], &[f32]); 3], shape: &AttentionShape, dtype: DType) -> Result<Self> {
        let [q, k, v] = qkv.map(|(dims, data)| Tensor::from_f32(ctx, dims, data, dtype));
        Ok(Self {
            q: q?,
            k: k?,
            v: v?,
            out: Tensor::zeros(ctx, &shape.out_shape(), dtype)?,
            lse: Tensor::zeros(ctx, &shape.lse_shape(), DType::F32)?,
        })
    }

    fn buffers(&self) -> AttentionBuffers<'_> {
        AttentionBuffers {
            q: self.q.view(),
            k: self.k.view(),
            v: self.v.view(),
            out: self.out.view(),
            lse: self.lse.view(),
        }
    }
}
