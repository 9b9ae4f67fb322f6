//! The `wattn` command line: one module per subcommand, each a thin layer over the library.

mod bench;
mod info;
mod npy;
mod peak;
mod run;
mod shaders;
mod stream;
mod tune;

use crate::context::{AdapterSelection, Context};
use crate::error::{Error, Result};

/// The parsed command line: `Cli::parse()` (from [`clap::Parser`]), then [`dispatch`].
#[derive(clap::Parser, Debug)]
#[command(name = "wattn", version, about = "FlashAttention-class attention kernels on any GPU (WGSL + wgpu)")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// The adapters wgpu sees, the features and limits wattn uses, and which adapter it picks.
    Info(info::InfoArgs),
    /// Attention on .npy files: O (and LSE) written as float32 .npy.
    Run(run::RunArgs),
    /// Benchmark the flash kernel against the naive baseline (or, with --decode, split-KV decode).
    Bench(bench::BenchArgs),
    /// Measure the adapter's FMA throughput and memory bandwidth.
    Peak(peak::PeakArgs),
    /// Stream synthetic tokens through the KV cache: per-token decode time against position, and memory.
    Stream(stream::StreamArgs),
    /// Write every shader variant as WGSL with a manifest (bindings, layouts), for checks on other WGSL compilers.
    Shaders(shaders::ShadersArgs),
    /// Time the candidate flash configurations on this adapter, each checked first, and save the fastest per head-dim bucket, dtype and mask.
    Tune(tune::TuneArgs),
}

/// Runs the subcommand `cli` names; its error is what `wattn` prints before exiting with failure.
pub fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Run(a) => run::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Peak(a) => peak::run(a),
        Command::Stream(a) => stream::run(a),
        Command::Shaders(a) => shaders::run(a),
        Command::Tune(a) => tune::run(a),
    }
}

/// `--adapter NAME` and `--backend vulkan|metal|dx12|gl`, shared by the subcommands.
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct AdapterArgs {
    /// Use the first adapter whose name contains NAME (case-insensitive); default: $WGPU_ADAPTER_NAME or wgpu's choice.
    #[arg(long, value_name = "NAME")]
    pub adapter: Option<String>,
    /// Restrict to one backend: vulkan, metal, dx12 or gl; default: $WGPU_BACKEND or all.
    #[arg(long, value_name = "BACKEND")]
    pub backend: Option<String>,
}

impl AdapterArgs {
    pub fn selection(&self) -> Result<AdapterSelection> {
        let mut sel = AdapterSelection::from_env();
        if let Some(name) = &self.adapter {
            sel.name = Some(name.clone());
        }
        if let Some(b) = &self.backend {
            sel.backends = Some(match b.to_lowercase().as_str() {
                "vulkan" | "vk" => wgpu::Backends::VULKAN,
                "metal" | "mtl" => wgpu::Backends::METAL,
                "dx12" | "d3d12" => wgpu::Backends::DX12,
                "gl" | "gles" | "opengl" => wgpu::Backends::GL,
                other => {
                    return Err(Error::Option(format!("unknown backend '{other}': use vulkan, metal, dx12 or gl")));
                }
            });
        }
        Ok(sel)
    }

    pub fn context(&self) -> Result<Context> {
        Context::with_selection(&self.selection()?)
    }
}

/// `--splits N|auto` of the decode commands; `None` is the automatic choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SplitChoice(pub Option<u32>);

pub(crate) fn parse_splits(text: &str) -> std::result::Result<SplitChoice, String> {
    match text.trim() {
        "auto" => Ok(SplitChoice(None)),
        t => match t.parse::<u32>() {
            Ok(n) if n > 0 => Ok(SplitChoice(Some(n))),
            _ => Err(format!("'{text}': use a number >= 1 or auto")),
        },
    }
}
