//! `wattn info`: what wgpu offers here and what wattn would use, down to the flash
//! configuration of common shapes.

use super::AdapterArgs;
use crate::attention::AttentionShape;
use crate::attention::tuning::{CACHE_ENV, TuneCache, TuneKey};
use crate::context::{Capabilities, Context, describe_adapter, enumerate_adapters};
use crate::dtype::DType;
use crate::error::Result;
use crate::flash::FlashConfig;

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub adapter: AdapterArgs,
}

pub fn run(args: InfoArgs) -> Result<()> {
    let sel = args.adapter.selection()?;
    let adapters = enumerate_adapters(&sel);
    println!("adapters wgpu sees: {}", adapters.len());
    for (i, adapter) in adapters.iter().enumerate() {
        println!("[{i}] {}", describe_adapter(&adapter.get_info()));
        print_features_and_limits(Capabilities::of(adapter.features()), &adapter.limits());
    }
    // Opening the device is what `wattn run` does, so a failure here is the error a run would give.
    let ctx = args.adapter.context()?;
    println!("chosen: {}", ctx.describe());
    println!(
        "    flash config: {} (block_q,block_k,rows_per_thread,threads_per_row,kv_reads) by default",
        FlashConfig::for_adapter(&ctx)
    );
    print_configs_per_shape(&ctx);
    Ok(())
}

/// Which flash configuration runs a few common shapes and why: tuned (from which file) or
/// the preset. Warns about what the cache file holds that could not be read.
fn print_configs_per_shape(ctx: &Context) {
    let Some(cache) = TuneCache::load_default() else {
        println!("    tuning cache: none (set {CACHE_ENV} to a file, or HOME); presets only");
        return;
    };
    for warning in cache.warnings() {
        eprintln!("wattn: warning: {warning}");
    }
    let state = if cache.path().exists() { format!("{} entries", cache.entries().len()) } else { "none yet".into() };
    println!("    tuning cache: {} ({state}; `wattn tune` adds to it)", cache.path().display());
    println!("    flash config per shape (any sequence length):");
    let dtypes = if ctx.capabilities().shader_f16 { &[DType::F32, DType::F16][..] } else { &[DType::F32] };
    for &dtype in dtypes {
        for d in [64, 128] {
            for causal in [false, true] {
                let shape = AttentionShape { batch: 1, q_heads: 1, kv_heads: 1, n_q: 1024, n_k: 1024, d_qk: d, d_v: d };
                let (config, source) = cache.choose(ctx, &shape, dtype, causal);
                let config = config.to_string();
                let bucket = TuneKey::new(ctx, d, d, dtype, causal).describe();
                println!("      {bucket:<16} {config:<12} {source}");
            }
        }
    }
}

fn print_features_and_limits(caps: Capabilities, limits: &wgpu::Limits) {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    println!(
        "    features: shader-f16 {}, subgroups {}, timestamps {}",
        yes_no(caps.shader_f16),
        yes_no(caps.subgroups),
        yes_no(caps.timestamps)
    );
    println!(
        "    limits: workgroup storage {}, invocations per workgroup {}, storage binding {}, buffer {}, workgroups per dimension {}",
        bytes(limits.max_compute_workgroup_storage_size as u64),
        limits.max_compute_invocations_per_workgroup,
        bytes(limits.max_storage_buffer_binding_size),
        bytes(limits.max_buffer_size),
        limits.max_compute_workgroups_per_dimension
    );
}

/// Bytes in the largest binary unit that keeps the number at least 1.
fn bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", units[unit]) }
}
