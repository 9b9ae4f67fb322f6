//! `wattn stream`: a token-by-token generation loop on a [`KvCache`], timed per step, and
//! its report: per-token decode time against stream position and the cache's memory, in
//! buckets of positions so that long streams read (and plot) well.
//!
//! Each step appends one token's K/V to every layer and decodes its query against the
//! layer's cache, then waits for the GPU. The token data is synthetic (a small pool of
//! fixed pseudo-random tokens on the GPU, so no step uploads anything).

use super::plot::{Chart, Line, XAxis};
use super::report::{Provenance, Report, Row, aligned, mib, sig3, time_cells};
use crate::context::Context;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kv::{DecodeBuffers, DecodeOptions, EvictionPolicy, KvCache, KvCacheConfig, PositionMode};
use crate::tensor::Tensor;
use crate::timing::Stats;
use serde::Serialize;
use std::fmt::Write;
use std::time::Instant;

/// The model shape and cache of a stream.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StreamSpec {
    /// Layers, each with its own cache; every step appends and decodes on all of them.
    pub layers: usize,
    /// Sequences streamed together.
    pub batch: usize,
    /// Query heads.
    pub q_heads: usize,
    /// K/V heads, dividing the query heads.
    pub kv_heads: usize,
    /// Head dim of Q, K and V.
    pub head_dim: usize,
    /// Storage dtype of the cache, the queries and the output.
    pub dtype: DType,
    /// Which tokens the cache keeps once it is full.
    pub policy: EvictionPolicy,
    /// How keys and queries carry their positions: absolute, or re-indexed within the cache.
    pub positions: PositionMode,
    /// The scale and splits of every decode.
    pub decode: DecodeOptions,
}

/// One step of a stream.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Stream position of the step's token (0 for the first).
    pub position: u64,
    /// Tokens each (sequence, KV head) of a layer attended to.
    pub cache_len: usize,
    /// Splits of the decode.
    pub splits: u32,
    /// Wall time from recording the step to the GPU finishing it.
    pub seconds: f64,
}

/// Distinct synthetic tokens the stream cycles through.
const TOKEN_POOL: usize = 8;

struct Token {
    k: Tensor,
    v: Tensor,
    q: Tensor,
}

/// A running stream: its cache, its synthetic tokens and its output buffers.
pub struct Stream {
    cache: KvCache,
    tokens: Vec<Token>,
    out: Tensor,
    lse: Tensor,
    decode: DecodeOptions,
}

impl Stream {
    /// An empty cache for `spec` and its pool of synthetic tokens, at position 0.
    pub fn new(ctx: &Context, spec: &StreamSpec) -> Result<Self> {
        let StreamSpec { layers, batch, q_heads, kv_heads, head_dim, dtype, policy, positions, decode } = *spec;
        let cache = KvCache::new(ctx, KvCacheConfig { layers, batch, kv_heads, head_dim, dtype, policy, positions })?;
        if q_heads == 0 || q_heads % kv_heads != 0 {
            return Err(Error::Heads { what: "the KV cache", got: kv_heads, q_heads });
        }
        let kv_shape = [batch, kv_heads, 1, head_dim];
        let q_shape = [batch, q_heads, 1, head_dim];
        let mut seed = 0u64;
        let mut tensor = |shape: &[usize]| {
            seed += 1;
            let data = synthetic(seed, shape.iter().product());
            Tensor::from_f32(ctx, shape, &data, dtype)
        };
        let tokens = (0..TOKEN_POOL)
            .map(|_| Ok(Token { k: tensor(&kv_shape)?, v: tensor(&kv_shape)?, q: tensor(&q_shape)? }))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cache,
            tokens,
            out: Tensor::zeros(ctx, &q_shape, dtype)?,
            lse: Tensor::zeros(ctx, &q_shape[..3], DType::F32)?,
            decode,
        })
    }

    /// The KV cache the stream appends to.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Tokens streamed so far.
    pub fn position(&self) -> u64 {
        self.cache.seen(0)
    }

    /// Appends the next token to every layer and decodes it; blocks until the GPU is done.
    /// Under policy None this fails with [`Error::CacheFull`] once the cache is full, having
    /// recorded nothing.
    pub fn step(&mut self, ctx: &Context) -> Result<StepReport> {
        let position = self.position();
        let token = &self.tokens[position as usize % TOKEN_POOL];
        let start = Instant::now();
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        let mut splits = 0;
        for layer in 0..self.cache.config().layers {
            self.cache.append(ctx, &mut encoder, layer, &token.k.view(), &token.v.view())?;
            let bufs = DecodeBuffers { q: token.q.view(), out: self.out.view(), lse: self.lse.view() };
            let plan = self.cache.attend(ctx, &mut encoder, layer, &bufs, &self.decode)?;
            splits = plan.splits;
        }
        ctx.submit_and_wait(encoder)?;
        Ok(StepReport { position, cache_len: self.cache.len(0), splits, seconds: start.elapsed().as_secs_f64() })
    }
}

/// `n` values in [-1, 1) from a hash of (seed, index): fixed, varied, and cheap.
fn synthetic(seed: u64, n: usize) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut z = (seed << 32 ^ i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z ^= z >> 29;
            z = z.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// One timed step and the cache's memory after it.
pub(crate) struct Sample {
    pub step: StepReport,
    pub memory_bytes: u64,
}

/// Why a stream ended before its last step.
#[derive(Clone, Debug)]
pub(crate) struct Stopped {
    /// The position of the token that could not be appended.
    pub position: u64,
    pub reason: String,
}

/// Runs `steps` steps of a fresh stream, calling `progress` now and then with the position.
/// A full cache under policy None ends the stream early with the reason; other errors fail it.
pub(crate) fn measure(
    ctx: &Context,
    spec: &StreamSpec,
    steps: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<(Vec<Sample>, Option<Stopped>)> {
    // The warm-up: the first step builds the pipelines, so a throwaway stream takes that
    // cost and position 0 of the timed one is not an outlier.
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

/// StreamingLLM's usual cache (4 sinks + 1020 window) fills at position 1K: the per-token
/// time there against the time at the end says whether decode cost stays flat.
const REFERENCE_POSITION: u64 = 1024;

/// `wattn stream`'s result. Its JSON holds a row per run (`runs`: the spec, how far it went
/// and the headline figures) and a row per bucket of positions (`points`, also the CSV).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct StreamReport {
    #[serde(flatten)]
    pub provenance: Provenance,
    pub report_every: u64,
    #[serde(serialize_with = "serialize_runs")]
    pub runs: Vec<RunReport>,
}

fn serialize_runs<S: serde::Serializer>(runs: &[RunReport], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(runs.iter().map(RunReport::row))
}

/// One stream: its configuration, how far it went, its headline figures and its buckets.
#[derive(Clone, Debug)]
pub(crate) struct RunReport {
    pub label: String,
    pub spec: StreamSpec,
    pub steps_requested: u64,
    pub steps_run: u64,
    /// Set when the stream ended before `steps_requested` (policy none with a full cache).
    pub stopped: Option<Stopped>,
    pub headline: Headline,
    pub buckets: Vec<Bucket>,
}

/// The figures of consecutive steps: positions `first_position..=last_position`.
#[derive(Clone, Debug)]
pub(crate) struct Bucket {
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
#[derive(Clone, Debug)]
pub(crate) struct Headline {
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

#[derive(Clone, Copy, Debug)]
pub(crate) struct BucketTime {
    pub first_position: u64,
    pub last_position: u64,
    pub median_s: f64,
}

impl BucketTime {
    fn cells(&self) -> Row {
        Row::default()
            .with("first_position", self.first_position)
            .with("last_position", self.last_position)
            .with("median_s", self.median_s)
    }
}

/// A name short enough for the plot's legend: "streaming 4 + 1020", "h2o 4 + 510, 1024 slots",
/// "none, 8192 slots".
pub fn label(spec: &StreamSpec) -> String {
    match spec.policy {
        EvictionPolicy::Streaming { sinks, window } => format!("streaming {sinks} + {window}"),
        EvictionPolicy::HeavyHitters { sinks, recent, capacity } => format!("h2o {sinks} + {recent}, {capacity} slots"),
        EvictionPolicy::None { capacity } => format!("none, {capacity} slots"),
    }
}

/// The cells of `spec`, opening each row of its run.
fn spec_cells(spec: &StreamSpec) -> Row {
    let (positions, rope_base) = match spec.positions {
        PositionMode::Absolute => ("absolute", None),
        PositionMode::Reindexed(rope) => ("reindexed", Some(rope.base)),
    };
    Row::default()
        .with("policy", spec.policy.name())
        .with("sinks", spec.policy.sinks())
        // Most recent tokens always kept (the window; H2O's recent tokens); empty for policy none.
        .with("recent", spec.policy.recent())
        .with("capacity", spec.policy.capacity())
        .with("layers", spec.layers)
        .with("batch", spec.batch)
        .with("q_heads", spec.q_heads)
        .with("kv_heads", spec.kv_heads)
        .with("head_dim", spec.head_dim)
        .with("dtype", spec.dtype.name())
        .with("positions", positions)
        .with("rope_base", rope_base)
        // Empty when chosen automatically.
        .with("requested_splits", spec.decode.splits)
}

/// "policy streaming, 4 sinks + 1020 recent, 1024 slots; 1 layer, batch 1, 32 query / 8 KV
/// heads, head dim 128, f32, absolute positions, splits auto".
fn describe(spec: &StreamSpec) -> String {
    let p = &spec.policy;
    let policy = match p.recent() {
        Some(recent) => format!("{} sinks + {recent} recent, {} slots", p.sinks(), p.capacity()),
        None => format!("{} slots", p.capacity()),
    };
    let layers = if spec.layers == 1 { "layer" } else { "layers" };
    let positions = match spec.positions {
        PositionMode::Reindexed(rope) => format!("re-indexed positions (RoPE base {})", rope.base),
        PositionMode::Absolute => "absolute positions".into(),
    };
    let splits = spec.decode.splits.map_or("auto".into(), |n| n.to_string());
    format!(
        "policy {}, {policy}; {} {layers}, batch {}, {} query / {} KV heads, head dim {}, {}, {positions}, splits {splits}",
        p.name(),
        spec.layers,
        spec.batch,
        spec.q_heads,
        spec.kv_heads,
        spec.head_dim,
        spec.dtype.name()
    )
}

impl RunReport {
    /// The report of one stream's `samples`, in buckets of `report_every` positions.
    pub fn new(spec: &StreamSpec, steps: u64, samples: &[Sample], stopped: Option<Stopped>, report_every: u64) -> Self {
        let buckets: Vec<Bucket> = samples.chunks(report_every as usize).map(Bucket::of).collect();
        Self {
            label: label(spec),
            spec: *spec,
            steps_requested: steps,
            steps_run: samples.len() as u64,
            stopped,
            headline: Headline::of(samples, &buckets, spec.policy.capacity()),
            buckets,
        }
    }

    /// The run as one row: its spec, how far it went, and its headline figures.
    fn row(&self) -> Row {
        let h = &self.headline;
        Row::default()
            .with("run", self.label.as_str())
            .with_all("", spec_cells(&self.spec))
            .with("steps_requested", self.steps_requested)
            .with("steps_run", self.steps_run)
            .with("stopped_position", self.stopped.as_ref().map(|s| s.position))
            .with("stopped_reason", self.stopped.as_ref().map(|s| s.reason.clone()))
            .with_all("reference", h.reference.cells())
            .with_all("end", h.end.cells())
            .with("end_over_reference", h.end_over_reference)
            .with("cache_full_at", h.cache_full_at)
            .with("memory_bytes_at_end", h.memory_bytes_at_end)
            .with("memory_constant", h.memory_constant)
    }

    /// A row per bucket, each opened by the run's label and spec.
    fn bucket_rows(&self) -> impl Iterator<Item = Row> + '_ {
        self.buckets.iter().map(|b| {
            Row::default()
                .with("run", self.label.as_str())
                .with_all("", spec_cells(&self.spec))
                .with("first_position", b.first_position)
                .with("last_position", b.last_position)
                .with_all("", time_cells(Some(&b.time)))
                .with("cache_len", b.cache_len)
                .with("splits", b.splits)
                .with("memory_bytes", b.memory_bytes)
        })
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

impl Report for StreamReport {
    /// The provenance, then per run its spec, buckets and headline.
    fn table(&self) -> String {
        let mut out = self.provenance.headline() + "\n";
        for run in &self.runs {
            writeln!(out, "\n{}", describe(&run.spec)).unwrap();
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

    fn lead(&self) -> Row {
        self.provenance.row().with("report_every", self.report_every)
    }

    fn rows(&self) -> Vec<Row> {
        self.runs.iter().flat_map(RunReport::bucket_rows).collect()
    }

    /// Median per-token milliseconds against stream position (each bucket at its middle).
    fn chart(&self) -> Chart {
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
        Chart {
            title: self.provenance.title("stream decode"),
            x_label: "stream position (tokens)".into(),
            y_label: format!("ms per token (median of {} positions)", self.report_every),
            x_axis: XAxis::Linear,
            lines,
            empty_note: "no step was measured".into(),
        }
    }
}
