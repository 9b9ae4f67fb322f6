//! `wattn stream`: a synthetic token-by-token generation on the KV cache
//! ([`crate::bench::stream::Stream`]), reporting per-token decode time against stream position and the
//! cache's memory, in buckets of positions so that long streams read (and plot) well.

use super::AdapterArgs;
use super::bench::{check_output_dirs, parse_tokens};
use super::run::parse_dtype;
use crate::bench::plot::{self, Chart, Line, XAxis};
use crate::bench::progress::Progress;
use crate::bench::report::{Provenance, aligned, mib, sig3, write_file, write_json};
use crate::bench::stream::{StepReport, Stream, StreamSpec};
use crate::bench::{Clock, Stats};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::kv::{DecodeOptions, EvictionPolicy, PositionMode, Rope, RopeLayout};
use serde::Serialize;
use std::fmt::Write;
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
    /// Draw per-token milliseconds against stream position as SVG, one line per run.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub adapter: AdapterArgs,
}

/// StreamingLLM's usual cache (4 sinks + 1020 window) fills at position 1K: the per-token
/// time there against the time at the end says whether decode cost stays flat.
const REFERENCE_POSITION: u64 = 1024;
const DEFAULT_BUCKETS: u64 = 50;
const ROPE: Rope = Rope { base: 10000.0, layout: RopeLayout::NeoX };

/// `wattn stream`'s result, written as JSON as it is.
#[derive(Clone, Debug, Serialize)]
pub struct StreamReport {
    #[serde(flatten)]
    pub provenance: Provenance,
    pub report_every: u64,
    pub runs: Vec<RunReport>,
}

/// One stream: its configuration, how far it went, its headline figures and its buckets.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub label: String,
    pub spec: SpecRecord,
    pub steps_requested: u64,
    pub steps_run: u64,
    /// Set when the stream ended before `steps_requested` (policy none with a full cache).
    pub stopped: Option<Stopped>,
    pub headline: Headline,
    pub buckets: Vec<Bucket>,
}

/// The [`StreamSpec`] of a run, flattened for JSON.
#[derive(Clone, Debug, Serialize)]
pub struct SpecRecord {
    pub policy: &'static str,
    pub sinks: usize,
    /// Most recent tokens always kept (the window; H2O's recent tokens); `None` for policy none.
    pub recent: Option<usize>,
    pub capacity: usize,
    pub layers: usize,
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: &'static str,
    /// "absolute" or "reindexed".
    pub positions: &'static str,
    pub rope_base: Option<f64>,
    /// `None` when chosen automatically.
    pub splits: Option<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Stopped {
    /// The position of the token that could not be appended.
    pub position: u64,
    pub reason: String,
}

/// The figures of consecutive steps: positions `first_position..=last_position`.
#[derive(Clone, Debug, Serialize)]
pub struct Bucket {
    pub first_position: u64,
    pub last_position: u64,
    /// Seconds per token, from recording the step to the GPU finishing it.
    pub time: Stats,
    /// At the bucket's last step.
    pub cache_len: usize,
    pub splits: u32,
    pub memory_bytes: u64,
}

/// What the run says about the streaming targets: flat per-token time, constant memory.
#[derive(Clone, Debug, Serialize)]
pub struct Headline {
    /// The bucket holding position 1024 (or, in shorter runs, the middle position).
    pub reference: BucketTime,
    /// The last bucket.
    pub end: BucketTime,
    /// `end.median_s / reference.median_s`.
    pub end_over_reference: f64,
    /// The first position at which the cache was full; `None` if it never was.
    pub cache_full_at: Option<u64>,
    pub memory_bytes_at_end: u64,
    /// Whether the memory stayed the same from `cache_full_at` (or the first step) to the end.
    pub memory_constant: bool,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct BucketTime {
    pub first_position: u64,
    pub last_position: u64,
    pub median_s: f64,
}

/// One timed step and the cache's memory after it.
struct Sample {
    step: StepReport,
    memory_bytes: u64,
}

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
    check_output_dirs(&[&args.json, &args.plot])?;
    let ctx = args.adapter.context()?;
    let progress = Progress::new();
    let total = specs.len() as u64 * steps;
    let mut runs = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let done_before = i as u64 * steps;
        let label = label(spec);
        let samples_and_stop = stream(&ctx, spec, steps, &mut |position| {
            progress.show((done_before + position) as usize, total as usize, &format!("{label}: position {position}"));
        });
        progress.finish();
        let (samples, stopped) = samples_and_stop?;
        runs.push(RunReport::new(label, spec, steps, &samples, stopped, report_every));
    }
    let report = StreamReport { provenance: Provenance::new(&ctx, Clock::WallClock), report_every, runs };
    print!("{}", report.table());
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    if let Some(path) = &args.plot {
        write_file(path, &plot::draw(&report.chart()))?;
    }
    Ok(())
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

/// Runs `steps` steps of a fresh stream, calling `progress` now and then with the position.
/// A full cache under policy None ends the stream early with the reason; other errors fail it.
fn stream(
    ctx: &Context,
    spec: &StreamSpec,
    steps: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<(Vec<Sample>, Option<Stopped>)> {
    // The first step builds the pipelines: a throwaway stream takes that cost so that
    // position 0 of the timed one is not an outlier.
    Stream::new(ctx, spec)?.step(ctx)?;
    let mut stream = Stream::new(ctx, spec)?;
    let redraw_every = (steps / 200).max(1);
    let mut samples = Vec::with_capacity(steps as usize);
    for _ in 0..steps {
        match stream.step(ctx) {
            Ok(step) => samples.push(Sample { step, memory_bytes: stream.cache().memory_bytes() }),
            Err(e @ Error::CacheFull { .. }) => {
                return Ok((samples, Some(Stopped { position: stream.position(), reason: e.to_string() })));
            }
            Err(e) => return Err(e),
        }
        if stream.position() % redraw_every == 0 {
            progress(stream.position());
        }
    }
    Ok((samples, None))
}

/// A name short enough for the plot's legend: "streaming 4 + 1020", "h2o 4 + 510, 1024 slots",
/// "none, 8192 slots".
fn label(spec: &StreamSpec) -> String {
    match spec.policy {
        EvictionPolicy::Streaming { sinks, window } => format!("streaming {sinks} + {window}"),
        EvictionPolicy::HeavyHitters { sinks, recent, capacity } => format!("h2o {sinks} + {recent}, {capacity} slots"),
        EvictionPolicy::None { capacity } => format!("none, {capacity} slots"),
    }
}

impl RunReport {
    fn new(
        label: String,
        spec: &StreamSpec,
        steps: u64,
        samples: &[Sample],
        stopped: Option<Stopped>,
        report_every: u64,
    ) -> Self {
        let buckets: Vec<Bucket> = samples.chunks(report_every as usize).map(Bucket::of).collect();
        Self {
            label,
            spec: SpecRecord::of(spec),
            steps_requested: steps,
            steps_run: samples.len() as u64,
            stopped,
            headline: Headline::of(samples, &buckets, spec.policy.capacity()),
            buckets,
        }
    }
}

impl SpecRecord {
    fn of(spec: &StreamSpec) -> Self {
        let (positions, rope_base) = match spec.positions {
            PositionMode::Absolute => ("absolute", None),
            PositionMode::Reindexed(rope) => ("reindexed", Some(rope.base)),
        };
        Self {
            policy: spec.policy.name(),
            sinks: spec.policy.sinks(),
            recent: spec.policy.recent(),
            capacity: spec.policy.capacity(),
            layers: spec.layers,
            batch: spec.batch,
            q_heads: spec.q_heads,
            kv_heads: spec.kv_heads,
            head_dim: spec.head_dim,
            dtype: spec.dtype.name(),
            positions,
            rope_base,
            splits: spec.decode.splits,
        }
    }

    /// "policy streaming, 4 sinks + 1020 recent, 1024 slots; 1 layer, batch 1, 32 query / 8 KV heads, head dim 128, f32, absolute positions, auto splits".
    fn describe(&self) -> String {
        let policy = match self.recent {
            Some(recent) => format!("{} sinks + {recent} recent, {} slots", self.sinks, self.capacity),
            None => format!("{} slots", self.capacity),
        };
        let layers = if self.layers == 1 { "layer" } else { "layers" };
        let positions = match self.rope_base {
            Some(base) => format!("re-indexed positions (RoPE base {base})"),
            None => format!("{} positions", self.positions),
        };
        let splits = self.splits.map_or("auto".into(), |n| n.to_string());
        format!(
            "policy {}, {policy}; {} {layers}, batch {}, {} query / {} KV heads, head dim {}, {}, {positions}, splits {splits}",
            self.policy, self.layers, self.batch, self.q_heads, self.kv_heads, self.head_dim, self.dtype
        )
    }
}

impl Bucket {
    /// The figures of `samples`, which is never empty.
    fn of(samples: &[Sample]) -> Self {
        let seconds: Vec<f64> = samples.iter().map(|s| s.step.seconds).collect();
        let (first, last) = (&samples[0], &samples[samples.len() - 1]);
        Self {
            first_position: first.step.position,
            last_position: last.step.position,
            time: Stats::of(&seconds).expect("a bucket holds at least one step"),
            cache_len: last.step.cache_len,
            splits: last.step.splits,
            memory_bytes: last.memory_bytes,
        }
    }

    fn time(&self) -> BucketTime {
        BucketTime {
            first_position: self.first_position,
            last_position: self.last_position,
            median_s: self.time.median_s,
        }
    }
}

impl Headline {
    /// `samples` and their `buckets` are never empty (every stream runs at least one step).
    fn of(samples: &[Sample], buckets: &[Bucket], capacity: usize) -> Self {
        let end = buckets[buckets.len() - 1].time();
        let target = REFERENCE_POSITION.min(end.last_position / 2);
        let reference = buckets.iter().find(|b| b.last_position >= target).unwrap_or(&buckets[0]).time();
        let full_from = samples.iter().position(|s| s.step.cache_len == capacity);
        let steady = &samples[full_from.unwrap_or(0)..];
        let memory_bytes_at_end = samples[samples.len() - 1].memory_bytes;
        Self {
            reference,
            end,
            end_over_reference: end.median_s / reference.median_s,
            cache_full_at: full_from.map(|i| samples[i].step.position),
            memory_bytes_at_end,
            memory_constant: steady.iter().all(|s| s.memory_bytes == memory_bytes_at_end),
        }
    }

    /// Two lines: per-token time at the reference against the end, and the memory.
    fn describe(&self) -> String {
        let (r, e) = (&self.reference, &self.end);
        let mut out = format!(
            "per-token ms: {} at positions {}-{}, {} at the end ({}-{}): end / reference = {:.2}x\n",
            sig3(r.median_s * 1e3),
            r.first_position,
            r.last_position,
            sig3(e.median_s * 1e3),
            e.first_position,
            e.last_position,
            self.end_over_reference
        );
        let bytes = format!("{} MiB ({} bytes)", mib(self.memory_bytes_at_end), self.memory_bytes_at_end);
        let since = match self.cache_full_at {
            Some(p) => format!("from position {p} (cache full)"),
            None => "from the first step (the cache never filled)".into(),
        };
        let verdict = if self.memory_constant { "constant" } else { "NOT constant" };
        writeln!(out, "cache memory at the end: {bytes}; {verdict} {since} to the end").unwrap();
        out
    }
}

impl StreamReport {
    /// The table on stdout: provenance, then per run its spec, buckets and headline.
    pub fn table(&self) -> String {
        let mut out = self.provenance.headline() + "\n";
        for run in &self.runs {
            writeln!(out, "\n{}", run.spec.describe()).unwrap();
            let bucket = match self.report_every {
                1 => "per position".to_string(),
                k => format!("median, min and max over buckets of {k} positions"),
            };
            writeln!(out, "{} of {} steps; per-token decode time, {bucket}\n", run.steps_run, run.steps_requested)
                .unwrap();
            let header = ["positions", "median ms", "min ms", "max ms", "cache len", "splits", "memory bytes"];
            let mut rows = vec![header.map(String::from).to_vec()];
            for b in &run.buckets {
                rows.push(vec![
                    match b.first_position == b.last_position {
                        true => b.first_position.to_string(),
                        false => format!("{}-{}", b.first_position, b.last_position),
                    },
                    sig3(b.time.median_s * 1e3),
                    sig3(b.time.min_s * 1e3),
                    sig3(b.time.max_s * 1e3),
                    b.cache_len.to_string(),
                    b.splits.to_string(),
                    b.memory_bytes.to_string(),
                ]);
            }
            out += &aligned(&rows, &[false, true, true, true, true, true, true]);
            if let Some(stop) = &run.stopped {
                writeln!(out, "stopped at position {}: {}", stop.position, stop.reason).unwrap();
            }
            out += &run.headline.describe();
        }
        out
    }

    /// Median per-token milliseconds against stream position (each bucket at its middle).
    pub fn chart(&self) -> Chart {
        let lines = self
            .runs
            .iter()
            .enumerate()
            .map(|(i, run)| Line {
                name: run.label.clone(),
                color: i,
                dashed: false,
                points: run
                    .buckets
                    .iter()
                    .map(|b| ((b.first_position + b.last_position) as f64 / 2.0, b.time.median_s * 1e3))
                    .collect(),
            })
            .collect();
        let pv = &self.provenance;
        Chart {
            title: format!("wattn {} stream decode on {} ({})", pv.wattn_version, pv.adapter.name, pv.date),
            x_label: "stream position (tokens)".into(),
            y_label: format!("ms per token (median of {} positions)", self.report_every),
            x_axis: XAxis::Linear,
            lines,
            empty_note: "no step was measured".into(),
        }
    }
}
