//! `wattn run --seqlens-q LQ.npy --seqlens-k LK.npy`: varlen attention on packed Q, K, V,
//! with the dense options and the block-sparse flags per sequence (see `block_sparse`), and
//! optionally its backward.

use super::{
    Backward, MAX_CHECK_PAIRS, OnGpu, RunArgs, check_outputs, check_ranks, common_dtype, flash_config, gradient_paths,
    in_storage, max_abs_diff, output_flags, print_gradient_check, read_d_out, read_sparse, report_mask,
    stage_gradients,
};
use crate::attention::backward;
use crate::attention::varlen::{self, SeqLens};
use crate::attention::{AttentionOptions, AttentionShape};
use crate::cli::npy;
use crate::dtype::DType;
use crate::error::{Error, Result};

pub(super) fn run(args: &RunArgs, options: &AttentionOptions, dtype_override: Option<DType>) -> Result<()> {
    let (Some(lq_path), Some(lk_path)) = (&args.seqlens_q, &args.seqlens_k) else {
        return Err(Error::Option(
            "--seqlens-q and --seqlens-k go together: the query and the key length of each packed sequence".into(),
        ));
    };
    let gradient_paths = gradient_paths(args)?;
    check_outputs(&output_flags(args, &gradient_paths))?;

    let q = npy::read_array(&args.q)?;
    let k = npy::read_array(&args.k)?;
    let v = npy::read_array(&args.v)?;
    let batched = check_ranks(&q, &k, &v)?;
    let lift = |a: &npy::NpyArray| if batched { a.shape.clone() } else { [&[1], &a.shape[..]].concat() };
    let (q_shape, k_shape, v_shape) = (lift(&q), lift(&k), lift(&v));
    let shape = AttentionShape::from_shapes(&q_shape, &k_shape, &v_shape)?;
    let seqlens = SeqLens::new(&npy::read_lengths(lq_path)?, &npy::read_lengths(lk_path)?)?;
    seqlens.check(&shape)?;
    let d_out = read_d_out(args, &shape, batched)?;
    let dtype = match dtype_override {
        Some(d) => d,
        None => common_dtype(&q, &k, &v)?,
    };
    let sparse = read_sparse(args, &shape, Some(&seqlens))?;
    let pairs: usize =
        (0..seqlens.len()).map(|s| shape.q_heads * seqlens.queries(s).len() * seqlens.keys(s).len()).sum();
    if args.check && pairs > MAX_CHECK_PAIRS {
        return Err(Error::Option(format!(
            "--check: the CPU reference would score {pairs} query-key pairs, more than the 2^28 it allows; check a smaller problem"
        )));
    }
    let (q_data, k_data, v_data) = (in_storage(q.data, dtype), in_storage(k.data, dtype), in_storage(v.data, dtype));

    let ctx = args.adapter.context()?;
    let (max_q, max_k) = (seqlens.max_q(), seqlens.max_k());
    let longest = AttentionShape { n_q: max_q.max(1), n_k: max_k.max(1), ..shape };
    let config = flash_config(&ctx, sparse.as_ref(), &longest, dtype, options)?;
    // One mask per sequence (the batch axis) for the longest sequence's lengths.
    let masks = sparse.as_ref().map(|s| s.masks(options));
    let block_mask = masks.as_ref().map(|m| m.block_mask(max_q, max_k, config.block_size())).transpose()?;
    let gpu_mask = block_mask.as_ref().map(|m| m.upload(&ctx)).transpose()?;
    let gpu = OnGpu::upload(&ctx, [(&q_shape, &q_data), (&k_shape, &k_data), (&v_shape, &v_data)], &shape, dtype)?;
    let bufs = gpu.buffers();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    varlen::encode(&ctx, &mut encoder, &bufs, &seqlens, gpu_mask.as_ref(), options, &config)?;
    let d_out_data = d_out.map(|d| in_storage(d.data, dtype));
    let gradients = d_out_data
        .as_ref()
        .map(|data| {
            Backward::record(&ctx, &gpu, data, dtype, |grads| {
                backward::encode_varlen(&ctx, &mut encoder, grads, &seqlens, gpu_mask.as_ref(), options)
            })
        })
        .transpose()?;
    let start = std::time::Instant::now();
    ctx.submit_and_wait(encoder)?;
    let gpu_time = start.elapsed();
    let out = gpu.out.to_f32(&ctx)?;
    let lse = gpu.lse.to_f32(&ctx)?;
    let gradients = gradients.map(|g| g.read(&ctx)).transpose()?;

    // As the dense path: the inputs' rank, every file staged before any is committed.
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
        "wattn run: {} | Q {:?} K {:?} V {:?} {dtype}{}{} | varlen {} sequences, longest {max_q} x {max_k} | GPU {:.3} ms",
        ctx.describe(),
        q.shape,
        k.shape,
        v.shape,
        options.describe(),
        sparse.as_ref().map_or(String::new(), |s| format!(" block-sparse {}", s.describe())),
        seqlens.len(),
        gpu_time.as_secs_f64() * 1e3
    );
    if let Some(mask) = &block_mask {
        report_mask(mask, args.show_mask);
    }
    if args.check {
        // Query i of sequence s sees key j (both within the sequence) where its corner of the mask shows it.
        let visible =
            |s: usize, h: usize, i: usize, j: usize| masks.as_ref().is_none_or(|m| m.visible(max_q, max_k, s, h, i, j));
        let want =
            crate::reference::attention_varlen_masked(&q_data, &k_data, &v_data, &shape, &seqlens, options, visible);
        println!(
            "check against the f64 CPU reference: max |O - ref| = {:.3e}, max |LSE - ref| = {:.3e}",
            max_abs_diff(&out, &want.out),
            max_abs_diff(&lse, &want.lse)
        );
        if let (Some(d_out), Some(got)) = (&d_out_data, &gradients) {
            let want = crate::reference::attention_varlen_backward_masked(
                &q_data, &k_data, &v_data, d_out, &shape, &seqlens, options, visible,
            );
            print_gradient_check(got, &want);
        }
    }
    Ok(())
}
