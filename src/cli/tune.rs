//! `wattn tune`: the candidate flash configurations timed on this adapter for one head-dim
//! bucket, each dtype and each mask asked for, each winner saved in the tuning cache.

use super::AdapterArgs;
use super::bench::{CausalChoice, check_output_dirs, parse_tokens};
use crate::attention::tuning::TuneCache;
use crate::bench::report::{Provenance, RateUnit, Row, aligned, ms_range, sig3, time_cells, write_json};
use crate::context::Context;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::flash::FlashConfig;
use crate::timing::Timer;
use crate::tune::{Candidate, Outcome, TuneRequest, TuneResult, tune};
use serde::Serialize;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct TuneArgs {
    /// Sequence length the candidates are timed at (queries = keys), e.g. 1024, 4k. The
    /// winner is kept for every length.
    #[arg(long, value_name = "N", default_value = "1024", value_parser = parse_tokens)]
    pub seq: usize,
    /// Query heads (as many K/V heads), batch 1 [default: 32 on GPUs, 2 on other adapters].
    #[arg(long, value_name = "H", value_parser = clap::value_parser!(u32).range(1..))]
    pub heads: Option<u32>,
    /// Head dim D of Q, K and V, or D,DV for a value head of another width.
    #[arg(long, value_name = "D[,DV]", default_value = "128", value_delimiter = ',')]
    pub head_dim: Vec<usize>,
    /// Storage dtype: f32, f16 or both (both: f16 only where the adapter has shader-f16).
    #[arg(long, value_name = "f32|f16|both", default_value = "both")]
    pub dtype: DTypeChoice,
    /// Causal mask: true, false or both.
    #[arg(long, value_name = "true|false|both", default_value = "both")]
    pub causal: CausalChoice,
    /// Timed runs per candidate, after one checked untimed run; the median decides.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Also write every candidate's figures, with the adapter, wattn version and date, as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub adapter: AdapterArgs,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum DTypeChoice {
    F32,
    F16,
    Both,
}

pub fn run(args: TuneArgs) -> Result<()> {
    check_output_dirs(&[&args.json])?;
    let (d_qk, d_v) = match args.head_dim[..] {
        [d] => (d, d),
        [d_qk, d_v] => (d_qk, d_v),
        _ => return Err(Error::Option(format!("--head-dim takes D or D,DV, got {:?}", args.head_dim))),
    };
    let path = TuneCache::default_path().ok_or_else(|| {
        Error::Option("no place for the tuning cache: set WATTN_TUNE_CACHE to a file, or HOME".into())
    })?;
    let ctx = args.adapter.context()?;
    let mut cache = TuneCache::load(&path);
    for warning in cache.warnings() {
        eprintln!("wattn: warning: {warning}");
    }
    let heads = args.heads.map_or_else(|| default_heads(&ctx), |h| h as usize);
    let provenance = Provenance::new(&ctx, Timer::new(&ctx).clock());
    println!("{}", provenance.headline());
    let mut results = Vec::new();
    for dtype in dtypes(args.dtype, &ctx) {
        for causal in args.causal.values() {
            let request = TuneRequest { seq: args.seq, heads, d_qk, d_v, dtype, causal, runs: args.runs as usize };
            let result = tune(&ctx, &request)?;
            print!("\n{}", table(&result));
            match result.entry() {
                Some(entry) => {
                    cache.insert(entry);
                    cache.save()?;
                    println!("{}; saved to {}", winner_line(&result, &ctx), path.display());
                }
                None => println!("no candidate passed the accuracy check: nothing saved"),
            }
            results.push(result);
        }
    }
    if let Some(json) = &args.json {
        let (preset, preset_source) = FlashConfig::preset_for(&ctx);
        let report = TuneReport {
            provenance,
            cache: path.display().to_string(),
            preset: preset.to_string(),
            preset_source: preset_source.to_string(),
            seq: args.seq,
            heads,
            runs: args.runs as usize,
            results: results.iter().map(ResultJson::new).collect(),
        };
        write_json(json, &report)?;
    }
    let failed: Vec<String> = results.iter().filter(|r| r.best.is_none()).map(|r| r.key.describe()).collect();
    if !failed.is_empty() {
        return Err(Error::Gpu(format!(
            "no candidate configuration passed the accuracy check for {}",
            failed.join(", ")
        )));
    }
    Ok(())
}

/// Enough heads to fill a GPU at the default length; on other adapters (CPU rasterisers)
/// two keep the tuning short.
fn default_heads(ctx: &Context) -> usize {
    match ctx.adapter_info().device_type {
        wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu => 32,
        _ => 2,
    }
}

/// The dtypes `choice` names; f16 is left out of `both` (with a note) where the adapter
/// lacks shader-f16, and asked for alone it is the tuner's error.
fn dtypes(choice: DTypeChoice, ctx: &Context) -> Vec<DType> {
    match choice {
        DTypeChoice::F32 => vec![DType::F32],
        DTypeChoice::F16 => vec![DType::F16],
        DTypeChoice::Both if ctx.capabilities().shader_f16 => vec![DType::F32, DType::F16],
        DTypeChoice::Both => {
            println!("f16 left out: the adapter has no shader-f16");
            vec![DType::F32]
        }
    }
}

/// One request's candidates: configuration, time, throughput and the accuracy check.
fn table(result: &TuneResult) -> String {
    let r = &result.request;
    let out = format!(
        "{}: seq {}, {} heads; {} candidates, median of {} runs\n",
        result.key.describe(),
        r.seq,
        r.heads,
        result.candidates.len(),
        r.runs
    );
    let fastest = result.best().and_then(Candidate::median_s).map_or(0.0, |s| r.flops() / s);
    let unit = RateUnit::for_max(fastest);
    let mut rows = vec![["config", "ms (min-max)", unit.name, "accuracy"].map(String::from).to_vec()];
    for c in &result.candidates {
        let mut row = vec![c.config.to_string()];
        match &c.outcome {
            Outcome::Timed { accuracy, time } => row.extend([
                ms_range(time),
                sig3(r.flops() / time.median_s / unit.per),
                format!("ok (O {:.1e}, LSE {:.1e})", accuracy.out_error, accuracy.lse_error),
            ]),
            Outcome::Inaccurate(a) => row.extend([
                "-".into(),
                "-".into(),
                format!(
                    "fail: O {:.1e} (bound {:.1e}), LSE {:.1e} (bound {:.1e})",
                    a.out_error, a.out_bound, a.lse_error, a.lse_bound
                ),
            ]),
            Outcome::Failed(why) => row.push(format!("did not run: {why}")),
        }
        rows.push(row);
    }
    out + &aligned(&rows, &[false, true, true, false])
}

/// "winner 64,4,4,4,1: 1.15x the speed of preset CPU (32,4,4,4,1)".
fn winner_line(result: &TuneResult, ctx: &Context) -> String {
    let best = result.best().expect("a winner");
    let (preset, source) = FlashConfig::preset_for(ctx);
    // The candidates hold the preset as fitted to the shape.
    let preset = result.request.shape().map_or(preset, |shape| preset.fitted(ctx.limits(), &shape));
    let preset_time = result.candidates.iter().find(|c| c.config == preset).and_then(Candidate::median_s);
    let against = match (best.median_s(), preset_time) {
        _ if best.config == preset => format!(", the {source}"),
        (Some(best), Some(preset_s)) => format!(": {}x the speed of {source} ({preset})", sig3(preset_s / best)),
        _ => format!(" ({source}, {preset}, was not timed)"),
    };
    format!("winner {}{against}", best.config)
}

/// `wattn tune --json`.
#[derive(Serialize)]
struct TuneReport {
    #[serde(flatten)]
    provenance: Provenance,
    /// The cache file the winners were saved to.
    cache: String,
    /// What runs where nothing is tuned, and its name ("preset CPU").
    preset: String,
    preset_source: String,
    seq: usize,
    heads: usize,
    runs: usize,
    results: Vec<ResultJson>,
}

/// One request: its bucket, the winner and every candidate as a row.
#[derive(Serialize)]
struct ResultJson {
    bucket: String,
    dtype: &'static str,
    d_qk: usize,
    d_v: usize,
    causal: bool,
    flops: f64,
    winner: Option<String>,
    candidates: Vec<Row>,
}

impl ResultJson {
    fn new(result: &TuneResult) -> Self {
        let r = &result.request;
        let candidates = result
            .candidates
            .iter()
            .map(|c| {
                let (time, accuracy, failure) = match &c.outcome {
                    Outcome::Timed { accuracy, time } => (Some(time), Some(accuracy), None),
                    Outcome::Inaccurate(accuracy) => (None, Some(accuracy), None),
                    Outcome::Failed(why) => (None, None, Some(why.as_str())),
                };
                Row::default()
                    .with("config", c.config.to_string())
                    .with_all("", time_cells(time))
                    .with("flops_per_s", time.map(|t| r.flops() / t.median_s))
                    .with("accurate", accuracy.map(|a| a.passes()))
                    .with("out_error", accuracy.map(|a| a.out_error))
                    .with("out_bound", accuracy.map(|a| a.out_bound))
                    .with("lse_error", accuracy.map(|a| a.lse_error))
                    .with("lse_bound", accuracy.map(|a| a.lse_bound))
                    .with("failure", failure)
            })
            .collect();
        Self {
            bucket: result.key.describe(),
            dtype: r.dtype.name(),
            d_qk: r.d_qk,
            d_v: r.d_v,
            causal: r.causal,
            flops: r.flops(),
            winner: result.best().map(|c| c.config.to_string()),
            candidates,
        }
    }
}
