//! `wattn stream`: a synthetic token-by-token generation on the KV cache
//! ([`crate::bench::stream`]), reporting per-token decode time against stream position and
//! the cache's memory.

use super::AdapterArgs;
use super::bench::{check_output_dirs, parse_tokens};
use super::run::parse_dtype;
use crate::bench::Clock;
use crate::bench::progress::Progress;
use crate::bench::report::{Provenance, Report, write_outputs};
use crate::bench::stream::{self, RunReport, StreamReport, StreamSpec};
use crate::error::{Error, Result};
use crate::kv::{DecodeOptions, EvictionPolicy, PositionMode, Rope, RopeLayout};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct StreamArgs {
    /// Eviction policy: streaming (StreamingLLM: the sinks plus a ring of the window's most
    /// recent tokens), h2o (heavy hitters: the sinks, the window/2 most recent tokens and the
    /// highest-scoring others, capacity sinks + window) or none (keep every token, capacity
    /// sinks + window: the stream stops, with its partial report, when the cache is full).
    #[arg(long, value_name = "streaming|h2o|none", default_value = "streaming")]
    pub policy: String,
    /// First tokens never evicted (attention sinks).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub sinks: usize,
    /// Most recent tokens kept beside the sinks; the cache holds sinks + window tokens.
    #[arg(long, value_name = "N", default_value_t = 1020)]
    pub window: usize,
    /// Tokens to stream, e.g. 20000 or 20k.
    #[arg(long, value_name = "N", default_value = "4096", value_parser = parse_tokens)]
    pub steps: usize,
    /// Also stream the same tokens through a cache that keeps every token (policy none with
    /// capacity = --steps), the full-attention baseline, and draw both lines.
    #[arg(long)]
    pub compare: bool,
    /// Query heads.
    #[arg(long, value_name = "H", default_value_t = 32)]
    pub heads: usize,
    /// K/V heads, dividing the query heads (grouped-query attention).
    #[arg(long, value_name = "H", default_value_t = 8)]
    pub kv_heads: usize,
    /// Head dim of queries, keys and values (at most 256).
    #[arg(long, value_name = "D", default_value_t = 128)]
    pub head_dim: usize,
    /// Layers, each with its own cache, appended and decoded in every step.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub layers: usize,
    /// Sequences streamed together.
    #[arg(long, value_name = "B", default_value_t = 1)]
    pub batch: usize,
    /// Storage dtype of the cache, queries and outputs.
    #[arg(long, value_name = "f32|f16", default_value = "f32")]
    pub dtype: String,
    /// absolute (positions as streamed), or reindexed: RoPE (base 10000, NeoX layout) applied
    /// inside attention at each token's index in the cache (StreamingLLM's re-indexing;
    /// not with h2o).
    #[arg(long, value_name = "absolute|reindexed", default_value = "absolute")]
    pub positions: String,
    /// Ranges the cache is split into for decode (split-KV), or auto to choose from the
    /// adapter and the cache length.
    #[arg(long, value_name = "N|auto", default_value = "auto")]
    pub splits: String,
    /// Positions per reported bucket (median, min and max of their steps) [default: steps / 50].
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
    pub report_every: Option<u64>,
    /// Write the buckets, headline figures, spec, adapter, wattn version and date as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write one CSV row per bucket with the same figures.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Draw per-token milliseconds against stream position as SVG, one line per run.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub adapter: AdapterArgs,
}

const DEFAULT_BUCKETS: u64 = 50;
const ROPE: Rope = Rope { base: 10000.0, layout: RopeLayout::NeoX };

pub fn run(args: StreamArgs) -> Result<()> {
    let spec = args.spec()?;
    let steps = args.steps as u64;
    let mut specs = vec![spec];
    if args.compare {
        if let EvictionPolicy::None { .. } = spec.policy {
            return Err(Error::Option(
                "--compare adds the policy none baseline: give --policy streaming or h2o".into(),
            ));
        }
        specs.push(StreamSpec { policy: EvictionPolicy::None { capacity: args.steps }, ..spec });
    }
    let report_every = args.report_every.unwrap_or((steps / DEFAULT_BUCKETS).max(1));
    check_output_dirs(&[&args.json, &args.csv, &args.plot])?;
    let ctx = args.adapter.context()?;
    let progress = Progress::new();
    let total = specs.len() as u64 * steps;
    let mut runs = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let done_before = i as u64 * steps;
        let label = stream::label(spec);
        let measured = stream::measure(&ctx, spec, steps, &mut |position| {
            progress.show((done_before + position) as usize, total as usize, &format!("{label}: position {position}"));
        });
        progress.finish();
        let (samples, stopped) = measured?;
        runs.push(RunReport::new(spec, steps, &samples, stopped, report_every));
    }
    let report = StreamReport { provenance: Provenance::new(&ctx, Clock::WallClock), report_every, runs };
    print!("{}", report.table());
    write_outputs(&report, args.json.as_deref(), args.csv.as_deref(), args.plot.as_deref())
}

impl StreamArgs {
    /// The stream the flags describe (checked by the library when it starts).
    fn spec(&self) -> Result<StreamSpec> {
        let (sinks, window) = (self.sinks, self.window);
        let policy = match self.policy.as_str() {
            "streaming" => EvictionPolicy::Streaming { sinks, window },
            "h2o" => EvictionPolicy::HeavyHitters { sinks, recent: window / 2, capacity: sinks + window },
            "none" => EvictionPolicy::None { capacity: sinks + window },
            other => return Err(Error::Option(format!("--policy '{other}': use streaming, h2o or none"))),
        };
        let positions = match self.positions.as_str() {
            "absolute" => PositionMode::Absolute,
            "reindexed" => PositionMode::Reindexed(ROPE),
            other => return Err(Error::Option(format!("--positions '{other}': use absolute or reindexed"))),
        };
        let splits = super::parse_splits(&self.splits).map_err(|why| Error::Option(format!("--splits {why}")))?.0;
        Ok(StreamSpec {
            layers: self.layers,
            batch: self.batch,
            q_heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            dtype: parse_dtype(&self.dtype)?,
            policy,
            positions,
            decode: DecodeOptions { scale: None, splits },
        })
    }
}
