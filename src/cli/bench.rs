//! `wattn bench`: the flash kernel against the naive baseline over a grid of problems,
//! block-sparse masks against the dense kernel, (`--backward`) the flash backward against
//! the forward, and (`--decode`) split-KV decode against the unsplit kernel.

use super::{AdapterArgs, SplitChoice, parse_splits};
use crate::bench::backward::{self, BackwardReport, BackwardSettings};
use crate::bench::decode::{self, DecodeGrid, DecodeReport, DecodeSettings};
use crate::bench::engine::Repeats;
use crate::bench::peak::Peak;
use crate::bench::plot::seq_label;
use crate::bench::prefill::{self, BenchReport, Settings};
use crate::bench::progress::Progress;
use crate::bench::report::{Provenance, Report, write_outputs};
use crate::bench::workload::{Grid, Pattern};
use crate::bench::{Timer, peak};
use crate::context::Context;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::flash::FlashConfig;
use crate::kv::paged::KvStorage;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A small grid that finishes in under a minute on a software adapter: sequence lengths
    /// 256, 512 and 1K, head dim 64, batch 1, 2 heads, f32 and f16, causal and not (with
    /// --decode: caches of 1K and 4K tokens, 8 query / 2 KV heads, f32). The other flags change it.
    #[arg(long)]
    pub quick: bool,
    /// Split-KV decode instead of prefill: one query token per sequence (--queries) against
    /// a KV cache of each --seq length, unsplit and with automatic splits (--splits), timed
    /// as K/V bandwidth against the copy peak. Defaults: a Llama-3-8B layer (32 query / 8 KV
    /// heads, head dim 128), batch 1, caches of 1K to 64K tokens, f32 and f16.
    #[arg(long, conflicts_with_all = ["density", "pattern", "causal", "window", "config", "no_naive"])]
    pub decode: bool,
    /// The flash backward (dQ, dK, dV) instead of the forward against naive: for each point,
    /// the forward and the backward timed on the same inputs, their ratio, GFLOP/s with
    /// FlashAttention's accounting (backward = 2.5 x forward FLOPs), and the speed-up over a
    /// naive materialised backward where its two N x N matrices fit (--no-naive: not timed).
    /// The grid flags apply. With --varlen: its three paths each run forward and backward.
    #[arg(long, conflicts_with_all = ["decode", "density", "pattern", "config", "serve"])]
    pub backward: bool,
    /// A server's decode step: --requests requests (seeded, lengths log-uniform from 128 to
    /// --max-len) in one paged launch (f32 and int8 pools, int8 also with K per channel) against
    /// the same batch padded to the longest and against one launch per request; tokens/s and K/V
    /// memory, and int8's bytes per token against f16. Model: --heads (8), --kv-heads (2), --head-dim (64). Prints a table
    /// and writes --json and --csv (no --plot).
    #[arg(long, conflicts_with_all = [
        "decode", "backward", "density", "pattern", "causal", "window", "config", "no_naive", "seq", "batch", "dtype",
        "plot", "quick",
    ])]
    pub serve: bool,
    /// A server's causal prefill: --requests prompts (the lengths --serve draws, up to
    /// --max-len) in one varlen launch over the packed prompts against the same prompts padded
    /// to the longest and against one launch per prompt; tokens/s and K/V memory. Model as
    /// --serve; prints a table. With --backward, training steps: forward and backward.
    #[arg(long, conflicts_with_all = [
        "serve", "decode", "density", "pattern", "causal", "window", "config", "no_naive", "seq", "batch",
        "dtype", "json", "csv", "plot", "quick",
    ])]
    pub varlen: bool,
    /// With --serve or --varlen: requests in the batch [default: 64; with --varlen 16].
    #[arg(long, value_name = "N")]
    pub requests: Option<usize>,
    /// With --serve or --varlen: the longest request, e.g. 32k [default: 32K; with --varlen 2K].
    #[arg(long, value_name = "N", value_parser = parse_tokens)]
    pub max_len: Option<usize>,
    /// With --decode: the split settings to time at every point, e.g. 1,4,16,auto [default: 1,auto].
    #[arg(long, value_name = "N|auto,...", value_delimiter = ',', value_parser = parse_splits, requires = "decode")]
    pub splits: Option<Vec<SplitChoice>>,
    /// With --decode: query tokens per sequence and step (the last tokens of the cache).
    #[arg(long, value_name = "N", requires = "decode")]
    pub queries: Option<usize>,
    /// Sequence lengths (with --decode, cache lengths), e.g. 512,2k,16K [default: 512 to 16K, doubling].
    #[arg(long, value_name = "N,...", value_delimiter = ',', value_parser = parse_tokens)]
    pub seq: Option<Vec<usize>>,
    /// Head dims [default: 64,128; with --decode 128].
    #[arg(long, value_name = "D,...", value_delimiter = ',')]
    pub head_dim: Option<Vec<usize>>,
    /// Query heads [default: 2048 / head dim; with --decode 32].
    #[arg(long, value_name = "H")]
    pub heads: Option<usize>,
    /// K/V heads, dividing the query heads (grouped-query attention) [default: as many as
    /// query heads; with --decode 8].
    #[arg(long, value_name = "H")]
    pub kv_heads: Option<usize>,
    /// Batch size [default: 16384 / sequence length, so each point has 16K tokens; with --decode 1].
    #[arg(long, value_name = "B")]
    pub batch: Option<usize>,
    /// Causal mask: true, false or both [default: both].
    #[arg(long, value_name = "true|false|both")]
    pub causal: Option<CausalChoice>,
    /// Storage dtypes [default: f32,f16].
    #[arg(long, value_name = "f32,f16", value_delimiter = ',')]
    pub dtype: Option<Vec<DType>>,
    /// Sliding window LEFT,RIGHT in keys around the diagonal; -1 = unbounded on that side.
    #[arg(long, value_name = "LEFT,RIGHT", value_delimiter = ',', allow_hyphen_values = true)]
    pub window: Option<Vec<i32>>,
    /// Block-sparse: random block masks of these densities (seeded), each timed against the
    /// dense kernel on the same shape, e.g. 0.05,0.1,0.3,1.0. With --density or --pattern,
    /// --causal defaults to false (the dense points are the baseline).
    #[arg(long, value_name = "D,...", value_delimiter = ',', value_parser = parse_density)]
    pub density: Option<Vec<f64>>,
    /// Block-sparse: structured masks timed against the dense kernel: causal, window (causal,
    /// N/8 keys), documents (causal inside packed documents of N/16 to 3N/16 keys).
    #[arg(long, value_name = "causal,window,documents", value_delimiter = ',')]
    pub pattern: Option<Vec<PatternChoice>>,
    /// Timed runs per path and point; the median is reported with min and max.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Untimed runs before the timed ones; the run whose output is checked is the first.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub warmup: u32,
    /// Flash tiles block_q,block_k,rows_per_thread,threads_per_row,kv_reads (0 memory, 1 workgroup, 2 subgroup) [default: per shape: tuned, else the preset].
    #[arg(long, value_name = "BQ,BK,R,T,S")]
    pub config: Option<FlashConfig>,
    /// Do not measure the adapter's peak (no fraction-of-peak column).
    #[arg(long)]
    pub no_peak: bool,
    /// Do not time the naive baseline (no speed-up column); flash outputs are then checked
    /// against the f64 CPU reference on sampled rows.
    #[arg(long)]
    pub no_naive: bool,
    /// Seconds for the points: a point estimated to end past them is capped (not run, and
    /// listed as such), and so is a naive run; 0 = no limit.
    #[arg(long, value_name = "SECONDS", default_value_t = 180.0)]
    pub budget: f64,
    /// Write every figure, with the adapter, wattn version and date, as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write one CSV row per point with the same figures.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Draw flash throughput against sequence length as SVG, one line per series.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Time with the wall clock around submit-and-wait even where GPU timestamps exist.
    #[arg(long)]
    pub wall_clock: bool,
    #[command(flatten)]
    pub adapter: AdapterArgs,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum CausalChoice {
    True,
    False,
    Both,
}

impl CausalChoice {
    /// The settings of `causal` it names.
    pub fn values(self) -> Vec<bool> {
        match self {
            CausalChoice::True => vec![true],
            CausalChoice::False => vec![false],
            CausalChoice::Both => vec![false, true],
        }
    }
}

/// The structured block-sparse patterns `--pattern` takes.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum PatternChoice {
    Causal,
    Window,
    Documents,
}

impl From<PatternChoice> for Pattern {
    fn from(choice: PatternChoice) -> Self {
        match choice {
            PatternChoice::Causal => Pattern::Causal,
            PatternChoice::Window => Pattern::Window,
            PatternChoice::Documents => Pattern::Documents,
        }
    }
}

impl BenchArgs {
    /// The grid the flags describe: `--quick` or the full grid, then each flag given.
    pub fn grid(&self) -> Result<Grid> {
        let mut grid = if self.quick { Grid::quick() } else { Grid::full() };
        if let Some(seq) = &self.seq {
            grid.seqs = seq.clone();
        }
        if let Some(d) = &self.head_dim {
            grid.head_dims = d.clone();
        }
        if let Some(dtypes) = &self.dtype {
            grid.dtypes = dtypes.clone();
        }
        let densities = self.density.iter().flatten().map(|&d| Pattern::Random(d));
        grid.sparse = densities.chain(self.pattern.iter().flatten().map(|&p| p.into())).collect();
        if !grid.sparse.is_empty() {
            // The block-sparse points' baseline is the dense kernel without a mask.
            grid.causal = vec![false];
        }
        if let Some(causal) = self.causal {
            grid.causal = causal.values();
        }
        if let Some(w) = &self.window {
            let [left, right] = w[..] else {
                return Err(Error::Option(format!("--window takes LEFT,RIGHT (two integers), got {w:?}")));
            };
            grid.window = (left, right);
        }
        grid.batch = self.batch.or(grid.batch);
        grid.heads = self.heads.or(grid.heads);
        grid.kv_heads = self.kv_heads.or(grid.kv_heads);
        Ok(grid)
    }

    /// GPU timestamps where the adapter has them, unless --wall-clock.
    fn timer(&self, ctx: &Context) -> Timer {
        if self.wall_clock { Timer::wall_clock() } else { Timer::new(ctx) }
    }

    /// The adapter's ceilings, unless --no-peak.
    fn peak(&self, ctx: &Context, timer: &Timer, progress: &Progress, points: usize) -> Result<Option<Peak>> {
        if self.no_peak {
            return Ok(None);
        }
        progress.show(0, points, "measuring the adapter's peak");
        Ok(Some(peak::measure(ctx, timer, self.warmup as usize, self.runs as usize)?))
    }

    /// Prints the report's table and writes the --json, --csv and --plot files asked for.
    fn report(&self, report: &impl Report) -> Result<()> {
        print!("{}", report.table());
        write_outputs(report, self.json.as_deref(), self.csv.as_deref(), self.plot.as_deref())
    }

    /// --warmup and --runs.
    fn repeats(&self) -> Repeats {
        Repeats { warmup: self.warmup as usize, runs: self.runs as usize }
    }

    /// The decode grid the flags describe: `--quick` or the full grid, then each flag given.
    pub fn decode_grid(&self) -> DecodeGrid {
        let mut grid = if self.quick { DecodeGrid::quick() } else { DecodeGrid::full() };
        if let Some(seq) = &self.seq {
            grid.cache_lens = seq.clone();
        }
        if let Some(d) = &self.head_dim {
            grid.head_dims = d.clone();
        }
        if let Some(dtypes) = &self.dtype {
            grid.dtypes = dtypes.clone();
        }
        if let Some(splits) = &self.splits {
            grid.splits = splits.iter().map(|s| s.0).collect();
        }
        grid.batch = self.batch.unwrap_or(grid.batch);
        grid.heads = self.heads.unwrap_or(grid.heads);
        grid.kv_heads = self.kv_heads.unwrap_or(grid.kv_heads);
        grid.queries = self.queries.unwrap_or(grid.queries);
        grid
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.budget.is_nan() || args.budget < 0.0 {
        return Err(Error::Option(format!("--budget {}: give seconds >= 0 (0 = no limit)", args.budget)));
    }
    check_output_dirs(&[&args.json, &args.csv, &args.plot])?;
    if args.decode {
        return run_decode(&args);
    }
    if args.backward && !args.varlen {
        return run_backward(&args);
    }
    if args.serve || args.varlen {
        return run_serve(&args);
    }
    if args.requests.is_some() || args.max_len.is_some() {
        return Err(Error::Option("--requests and --max-len go with --serve or --varlen".into()));
    }
    let grid = args.grid()?;
    let ctx = args.adapter.context()?;
    let (config, config_source) = match args.config {
        Some(config) => (config, "--config".to_string()),
        None => {
            let (preset, source) = FlashConfig::preset_for(&ctx);
            (preset, source.to_string())
        }
    };
    // Block masks are built on the tiles they will run with.
    let workloads = grid.workloads(config.block_size())?;
    // Rule violations do not depend on the shape; limits do and are reported per point.
    if let Err(e @ Error::Option(_)) = config.check(ctx.limits(), &workloads[0].shape) {
        return Err(e);
    }
    let timer = args.timer(&ctx);
    let progress = Progress::new();
    let peak = args.peak(&ctx, &timer, &progress, workloads.len())?;
    let budget_s = (args.budget > 0.0).then_some(args.budget);
    let settings = Settings {
        repeats: args.repeats(),
        config,
        config_source,
        per_shape: args.config.is_none(),
        budget_s,
        peak_flops: peak.as_ref().map(|p| p.fma_f32.rate),
        naive: !args.no_naive,
    };
    let points = prefill::run(&ctx, &timer, &workloads, &settings, &mut |done, total, w| {
        progress.show(done, total, &format!("{} seq {}", w.series(), seq_label(w.shape.n_q)));
    });
    progress.finish();
    let provenance = Provenance::new(&ctx, timer.clock());
    let report = BenchReport {
        provenance,
        flash_config: config.into(),
        flash_config_source: if settings.per_shape {
            format!("{}; dense points: a tuned one where `wattn tune` saved one", settings.config_source)
        } else {
            settings.config_source.clone()
        },
        warmup: settings.repeats.warmup,
        runs: settings.repeats.runs,
        budget_s,
        peak,
        naive_baseline: settings.naive,
        points,
    };
    args.report(&report)
}

/// `wattn bench --serve` (the table of paged decode against padded and per request, --json
/// and --csv) and `--varlen` (the table of varlen prefill against the same).
fn run_serve(args: &BenchArgs) -> Result<()> {
    let (flag, requests, max_len) = if args.varlen { ("--varlen", 16, 2 << 10) } else { ("--serve", 64, 32 << 10) };
    let settings = crate::bench::serve::ServeSettings {
        requests: args.requests.unwrap_or(requests),
        lengths: (128, args.max_len.unwrap_or(max_len)),
        q_heads: args.heads.unwrap_or(8),
        kv_heads: args.kv_heads.unwrap_or(2),
        head_dim: args.head_dim.as_ref().and_then(|d| d.first().copied()).unwrap_or(64),
        page_size: crate::kv::paged::DEFAULT_PAGE_SIZE,
        seed: 12,
        warmup: args.warmup as usize,
        runs: args.runs as usize,
    };
    if settings.requests == 0 || settings.lengths.1 < settings.lengths.0 {
        return Err(Error::Option(format!("{flag} needs at least 1 request and --max-len >= {}", settings.lengths.0)));
    }
    let ctx = args.adapter.context()?;
    let timer = args.timer(&ctx);
    eprintln!("bench {flag} on {}: {settings:?}", ctx.describe());
    let mut progress = |path: &str| eprintln!("timing {path}");
    if args.varlen {
        if args.backward {
            eprintln!("each step: the forward and the backward (dO of O's shape), tokens/s of training tokens");
        }
        let rows = crate::bench::varlen::run(&ctx, &timer, &settings, args.backward, &mut progress)?;
        print!("{}", crate::bench::serve::table(&rows));
        return Ok(());
    }
    let paths = crate::bench::serve::run(&ctx, &timer, &settings, &mut progress)?;
    use crate::bench::serve::{ServeReport, memory_ratio};
    let int8_bytes_vs_f16 = memory_ratio(&settings, KvStorage::Int8);
    let int8_channel_k_bytes_vs_f16 = memory_ratio(&settings, KvStorage::Int8ChannelK);
    let provenance = Provenance::new(&ctx, timer.clock());
    args.report(&ServeReport { provenance, settings, int8_bytes_vs_f16, int8_channel_k_bytes_vs_f16, paths })
}

/// `wattn bench --decode`.
fn run_decode(args: &BenchArgs) -> Result<()> {
    let grid = args.decode_grid();
    let workloads = grid.workloads()?;
    let ctx = args.adapter.context()?;
    let timer = args.timer(&ctx);
    let progress = Progress::new();
    let peak = args.peak(&ctx, &timer, &progress, workloads.len())?;
    let settings = DecodeSettings {
        repeats: args.repeats(),
        splits: grid.splits.clone(),
        budget_s: (args.budget > 0.0).then_some(args.budget),
        copy_peak: peak.as_ref().map(|p| p.copy.rate),
    };
    let points = decode::run(&ctx, &timer, &workloads, &settings, &mut |done, total, w| {
        progress.show(done, total, &format!("decode {} cache {}", w.series(), seq_label(w.cache_len)));
    });
    progress.finish();
    let provenance = Provenance::new(&ctx, timer.clock());
    let Repeats { warmup, runs } = settings.repeats;
    let report = DecodeReport { provenance, warmup, runs, budget_s: settings.budget_s, peak, points };
    args.report(&report)
}

/// `wattn bench --backward`.
fn run_backward(args: &BenchArgs) -> Result<()> {
    let ctx = args.adapter.context()?;
    let workloads = args.grid()?.workloads(FlashConfig::for_adapter(&ctx).block_size())?;
    let timer = args.timer(&ctx);
    let progress = Progress::new();
    let peak = args.peak(&ctx, &timer, &progress, workloads.len())?;
    let settings = BackwardSettings {
        repeats: args.repeats(),
        budget_s: (args.budget > 0.0).then_some(args.budget),
        peak_flops: peak.as_ref().map(|p| p.fma_f32.rate),
        naive: !args.no_naive,
    };
    let points = backward::run(&ctx, &timer, &workloads, &settings, &mut |done, total, w| {
        progress.show(done, total, &format!("backward {} seq {}", w.series(), seq_label(w.shape.n_q)));
    });
    progress.finish();
    let provenance = Provenance::new(&ctx, timer.clock());
    let Repeats { warmup, runs } = settings.repeats;
    let report = BackwardReport {
        provenance,
        warmup,
        runs,
        budget_s: settings.budget_s,
        backward_flops_per_forward: backward::BACKWARD_FLOPS_PER_FORWARD,
        naive_baseline: settings.naive,
        peak,
        points,
    };
    args.report(&report)
}

/// Refuses, before any work, output files whose directory does not exist.
pub(super) fn check_output_dirs(paths: &[&Option<PathBuf>]) -> Result<()> {
    for path in paths.iter().copied().flatten() {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !dir.is_dir() || path.is_dir() {
            let detail = if path.is_dir() { "is a directory" } else { "its directory does not exist" };
            return Err(Error::File { path: path.clone(), detail: detail.into() });
        }
    }
    Ok(())
}

/// A token count: 512, 2k, 16K.
pub(super) fn parse_tokens(text: &str) -> std::result::Result<usize, String> {
    let t = text.trim();
    let (digits, scale) = match t.strip_suffix(['k', 'K']) {
        Some(d) => (d, 1024),
        None => (t, 1),
    };
    match digits.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n * scale),
        _ => Err(format!("'{text}' is not a sequence length (e.g. 512, 2k)")),
    }
}

/// A block density in (0, 1].
fn parse_density(text: &str) -> std::result::Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(d) if d > 0.0 && d <= 1.0 => Ok(d),
        _ => Err(format!("'{text}' is not a density in (0, 1], e.g. 0.1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_counts_take_k_suffixes() {
        assert_eq!(parse_tokens("512"), Ok(512));
        assert_eq!(parse_tokens("2k"), Ok(2048));
        assert_eq!(parse_tokens("16K"), Ok(16384));
        assert!(parse_tokens("0").is_err() && parse_tokens("k").is_err() && parse_tokens("1.5k").is_err());
    }
}
