//! `wattn peak`: the adapter's measured FMA throughput and copy bandwidth.

use super::AdapterArgs;
use crate::bench::report::{PeakReport, Provenance, write_json};
use crate::bench::{Timer, peak};
use crate::error::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct PeakArgs {
    /// Timed runs per measurement; the median is reported with min and max.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Untimed runs before the timed ones.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub warmup: u32,
    /// Also write every figure, with the adapter, wattn version and date, as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Time with the wall clock around submit-and-wait even where GPU timestamps exist.
    #[arg(long)]
    pub wall_clock: bool,
    #[command(flatten)]
    pub adapter: AdapterArgs,
}

pub fn run(args: PeakArgs) -> Result<()> {
    super::bench::check_output_dirs(&[&args.json])?;
    let ctx = args.adapter.context()?;
    let timer = if args.wall_clock { Timer::wall_clock() } else { Timer::new(&ctx) };
    let (warmup, runs) = (args.warmup as usize, args.runs as usize);
    let peak = peak::measure(&ctx, &timer, warmup, runs)?;
    let report = PeakReport { provenance: Provenance::new(&ctx, timer.clock()), warmup, runs, peak };
    print!("{}", report.table());
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(())
}
