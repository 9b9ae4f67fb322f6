//! `wattn info`: what wgpu offers here and what wattn would use.

use super::AdapterArgs;
use crate::context::{Capabilities, describe_adapter, enumerate_adapters};
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
    println!("    flash config: {} (block_q,block_k,threads_per_row,d_chunk)", FlashConfig::for_adapter(&ctx));
    Ok(())
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
