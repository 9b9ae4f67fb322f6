//! `wattn run --seqlens-q LQ.npy --seqlens-k LK.npy`: varlen attention on packed Q, K, V.

use super::{MAX_CHECK_PAIRS, OnGpu, RunArgs, check_outputs, check_ranks, common_dtype, in_storage, max_abs_diff};
use crate::attention::varlen::{self, SeqLens};
use crate::attention::{AttentionOptions, AttentionShape};
use crate::cli::npy;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::flash::FlashConfig;
use std::path::Path;

pub(super) fn run(args: &RunArgs, options: &AttentionOptions, dtype_override: Option<DType>) -> Result<()> {
    let (Some(lq_path), Some(lk_path)) = (&args.seqlens_q, &args.seqlens_k) else {
        return Err(Error::Option(
            "--seqlens-q and --seqlens-k go together: the query and the key length of each packed sequence".into(),
        ));
    };
    let others = [
        ("--mask", args.mask.is_some()),
        ("--doc-ids", args.doc_ids.is_some()),
        ("--prefix", args.prefix.is_some()),
        ("--block-size", args.block_size.is_some()),
        ("--show-mask", args.show_mask),
        ("--grad", args.grad.is_some()),
        ("--dq", args.dq.is_some()),
        ("--dk", args.dk.is_some()),
        ("--dv", args.dv.is_some()),
    ];
    if let Some((flag, _)) = others.iter().find(|f| f.1) {
        return Err(Error::Option(format!(
            "{flag} does not go with --seqlens-q/--seqlens-k: varlen runs take the dense options (causal, window, sinks, softcap, scale) and the forward only"
        )));
    }
    let mut outputs: Vec<(&str, &Path)> = vec![("--out", &args.out)];
    outputs.extend(args.lse.as_deref().map(|p| ("--lse", p)));
    check_outputs(&outputs)?;

    let q = npy::read_array(&args.q)?;
    let k = npy::read_array(&args.k)?;
    let v = npy::read_array(&args.v)?;
    let batched = check_ranks(&q, &k, &v)?;
    let lift = |a: &npy::NpyArray| if batched { a.shape.clone() } else { [&[1], &a.shape[..]].concat() };
    let (q_shape, k_shape, v_shape) = (lift(&q), lift(&k), lift(&v));
    let shape = AttentionShape::from_shapes(&q_shape, &k_shape, &v_shape)?;
    let seqlens = SeqLens::new(&npy::read_lengths(lq_path)?, &npy::read_lengths(lk_path)?)?;
    seqlens.check(&shape)?;
    let dtype = match dtype_override {
        Some(d) => d,
        None => common_dtype(&q, &k, &v)?,
    };
    let pairs: usize =
        (0..seqlens.len()).map(|s| shape.q_heads * seqlens.queries(s).len() * seqlens.keys(s).len()).sum();
    if args.check && pairs > MAX_CHECK_PAIRS {
        return Err(Error::Option(format!(
            "--check: the CPU reference would score {pairs} query-key pairs, more than the 2^28 it allows; check a smaller problem"
        )));
    }
    let (q_data, k_data, v_data) = (in_storage(q.data, dtype), in_storage(k.data, dtype), in_storage(v.data, dtype));

    let ctx = args.adapter.context()?;
    let longest = AttentionShape { n_q: seqlens.max_q().max(1), n_k: seqlens.max_k().max(1), ..shape };
    let config = FlashConfig::for_shape(&ctx, &longest, dtype, options.causal).0;
    let gpu = OnGpu::upload(&ctx, [(&q_shape, &q_data), (&k_shape, &k_data), (&v_shape, &v_data)], &shape, dtype)?;
    let bufs = gpu.buffers();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    varlen::encode(&ctx, &mut encoder, &bufs, &seqlens, None, options, &config)?;
    let start = std::time::Instant::now();
    ctx.submit_and_wait(encoder)?;
    let gpu_time = start.elapsed();
    let out = gpu.out.to_f32(&ctx)?;
    let lse = gpu.lse.to_f32(&ctx)?;

    // As the dense path: the inputs' rank, every file staged before any is committed.
    let skip = if batched { 0 } else { 1 };
    let mut staged = vec![npy::stage_f32(&args.out, &shape.out_shape()[skip..], &out)?];
    if let Some(path) = &args.lse {
        staged.push(npy::stage_f32(path, &shape.lse_shape()[skip..], &lse)?);
    }
    for file in staged {
        file.commit()?;
    }
    eprintln!(
        "wattn run: {} | Q {:?} K {:?} V {:?} {dtype}{} | varlen {} sequences, longest {} x {} | GPU {:.3} ms",
        ctx.describe(),
        q.shape,
        k.shape,
        v.shape,
        options.describe(),
        seqlens.len(),
        seqlens.max_q(),
        seqlens.max_k(),
        gpu_time.as_secs_f64() * 1e3
    );
    if args.check {
        let want = crate::reference::attention_varlen(&q_data, &k_data, &v_data, &shape, &seqlens, options);
        println!(
            "check against the f64 CPU reference: max |O - ref| = {:.3e}, max |LSE - ref| = {:.3e}",
            max_abs_diff(&out, &want.out),
            max_abs_diff(&lse, &want.lse)
        );
    }
    Ok(())
}
