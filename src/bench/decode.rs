//! `wattn bench --decode`: split-KV decode against the unsplit kernel over cache lengths.
//!
//! A decode step reads all of K and V once and does one FMA per element read and query head
//! of its group (4 in Llama-3-8B), so on a GPU it is bound by memory bandwidth, and its figure of merit is the bytes of K and V read per
//! second, quoted against the adapter's measured copy bandwidth. Without splits a step has
//! one workgroup per (sequence, KV head, row block): 8 on a Llama-3-8B layer at batch 1,
//! too few to keep a GPU's memory system busy, which is what splitting the keys fixes.
//!
//! Each point fills a [`KvCache`] (policy None, capacity = cache length) with seeded values,
//! checks every split setting's output against the f64 reference, then times each setting
//! on the same cache and queries.

use super::plot::{Chart, Families, Line, XAxis};
use super::report::{PROVENANCE_CSV_HEADER, Provenance, aligned, csv_field, mib, ms_range, seq_label, sig3};
use super::runner::{Outcome, Validation, catching_gpu_errors, max_error, tolerance};
use super::stats::Stats;
use super::timing::Timer;
use super::workload::input_values;
use crate::attention::{AttentionOptions, AttentionShape};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::kv::{DecodeBuffers, DecodeOptions, DecodePlan, EvictionPolicy, KvCache, KvCacheConfig, PositionMode};
use crate::reference;
use crate::tensor::{DType, Tensor};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Instant;

/// One decode problem: `queries` new tokens per sequence against `cache_len` cached ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DecodeWorkload {
    #[serde(skip)]
    pub dtype: DType,
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Query tokens per sequence (1 for plain decoding, a few for speculative decoding).
    pub queries: usize,
    pub cache_len: usize,
}

impl DecodeWorkload {
    /// Bytes of K and V one step reads: the figure the bandwidth is computed from.
    pub fn kv_bytes(&self) -> u64 {
        (2 * self.batch * self.kv_heads * self.cache_len * self.head_dim * self.dtype.size()) as u64
    }

    /// "f16 d128 32/8 heads": what a line of the plot follows over cache lengths.
    pub fn series(&self) -> String {
        format!("{} d{} {}/{} heads", self.dtype.name(), self.head_dim, self.heads, self.kv_heads)
    }

    fn cache_config(&self) -> KvCacheConfig {
        KvCacheConfig {
            layers: 1,
            batch: self.batch,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            dtype: self.dtype,
            policy: EvictionPolicy::None { capacity: self.cache_len },
            positions: PositionMode::Absolute,
        }
    }
}

/// The points `wattn bench --decode` measures: the product of its lists.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeGrid {
    pub cache_lens: Vec<usize>,
    pub head_dims: Vec<usize>,
    pub dtypes: Vec<DType>,
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub queries: usize,
    /// The split settings timed at every point; `None` is the automatic choice.
    pub splits: Vec<Option<u32>>,
}

impl DecodeGrid {
    /// A Llama-3-8B layer (32 query / 8 KV heads, head dim 128) at batch 1, cache lengths
    /// 1K to 64K, f32 and f16, unsplit against automatic splits.
    pub fn full() -> Self {
        Self {
            cache_lens: (10..=16).map(|p| 1 << p).collect(),
            head_dims: vec![128],
            dtypes: vec![DType::F32, DType::F16],
            batch: 1,
            heads: 32,
            kv_heads: 8,
            queries: 1,
            splits: vec![Some(1), None],
        }
    }

    /// Small enough to finish in well under a minute on a two-core software adapter.
    pub fn quick() -> Self {
        Self { cache_lens: vec![1024, 4096], heads: 8, kv_heads: 2, dtypes: vec![DType::F32], ..Self::full() }
    }

    pub fn workloads(&self) -> Result<Vec<DecodeWorkload>> {
        let Self { batch, heads, kv_heads, queries, .. } = *self;
        if batch == 0 || heads == 0 || kv_heads == 0 || queries == 0 || heads % kv_heads != 0 {
            return Err(Error::Option(format!(
                "decode grid: batch {batch}, {heads} query heads over {kv_heads} KV heads, {queries} queries: \
                 all must be at least 1 and the KV heads must divide the query heads"
            )));
        }
        if self.splits.is_empty() || self.splits.contains(&Some(0)) {
            return Err(Error::Option("decode grid: give split settings of at least 1, or auto".into()));
        }
        let mut points = Vec::new();
        for &dtype in &self.dtypes {
            for &head_dim in &self.head_dims {
                for &cache_len in &self.cache_lens {
                    if cache_len < queries {
                        return Err(Error::Option(format!(
                            "cache length {cache_len} is shorter than the {queries} queries, which are its last tokens"
                        )));
                    }
                    points.push(DecodeWorkload { dtype, batch, heads, kv_heads, head_dim, queries, cache_len });
                }
            }
        }
        if points.is_empty() {
            return Err(Error::Option("the decode grid is empty".into()));
        }
        Ok(points)
    }
}

/// How to run the points.
#[derive(Clone, Debug)]
pub struct DecodeSettings {
    pub warmup: usize,
    pub runs: usize,
    pub splits: Vec<Option<u32>>,
    /// Seconds after which no point is started that is estimated to run past them.
    pub budget_s: Option<f64>,
    /// The adapter's copy bandwidth in bytes/s, which the decode bandwidth is quoted against.
    pub copy_peak: Option<f64>,
}

/// One split setting timed at one point.
#[derive(Clone, Debug, Serialize)]
pub struct SplitResult {
    /// The setting asked for; `None` = automatic.
    pub requested: Option<u32>,
    /// The splits the plan used (the automatic choice, or the request capped at one per key tile).
    pub splits: u32,
    pub time: Stats,
    /// K and V bytes read per second of the median run.
    pub bytes_per_s: f64,
    pub fraction_of_copy: Option<f64>,
    /// The unsplit median over this one, when one split was among the settings.
    pub speedup_vs_unsplit: Option<f64>,
}

impl SplitResult {
    /// "1", "8" or "auto (8)".
    pub fn label(&self) -> String {
        match self.requested {
            Some(n) if n == self.splits => n.to_string(),
            Some(n) => format!("{n} ({})", self.splits),
            None => format!("auto ({})", self.splits),
        }
    }
}

/// A measured decode point: every split setting passed the check before it was timed.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeMeasured {
    pub validation: Validation,
    pub settings: Vec<SplitResult>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DecodePoint {
    pub series: String,
    pub dtype: &'static str,
    #[serde(flatten)]
    pub workload: DecodeWorkload,
    pub kv_bytes: u64,
    #[serde(flatten)]
    pub outcome: Outcome<DecodeMeasured>,
}

impl DecodePoint {
    pub fn settings(&self) -> &[SplitResult] {
        match &self.outcome {
            Outcome::Measured(m) => &m.settings,
            _ => &[],
        }
    }
}

/// `wattn bench --decode`'s result.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeReport {
    #[serde(flatten)]
    pub provenance: Provenance,
    pub warmup: usize,
    pub runs: usize,
    pub budget_s: Option<f64>,
    pub peak: Option<super::peak::Peak>,
    pub points: Vec<DecodePoint>,
}

/// Cache tokens appended per call while filling: bounds the host-side staging.
const FILL_CHUNK: usize = 4096;

/// Runs `workloads`, smallest cache first so that a time budget cuts the largest, and
/// returns their results in the given order. `progress(done, total, next)` is called
/// before each point.
pub fn run(
    ctx: &Context,
    timer: &Timer,
    workloads: &[DecodeWorkload],
    settings: &DecodeSettings,
    progress: &mut dyn FnMut(usize, usize, &DecodeWorkload),
) -> Vec<DecodePoint> {
    let start = Instant::now();
    let mut order: Vec<usize> = (0..workloads.len()).collect();
    order.sort_by_key(|&i| workloads[i].kv_bytes());
    // Wall seconds per byte of K and V read at the last measured point, everything it did
    // (filling, checking, warm-up and timed runs of every setting) counted: what the
    // budget's estimates go by.
    let mut seconds_per_byte: Option<f64> = None;
    let mut results: Vec<Option<DecodePoint>> = vec![None; workloads.len()];
    for (done, &i) in order.iter().enumerate() {
        let w = &workloads[i];
        progress(done, workloads.len(), w);
        let runs = (settings.warmup.max(1) + settings.runs + 1) * settings.splits.len();
        let estimated_s = seconds_per_byte.map(|s| s * (w.kv_bytes() * runs as u64) as f64);
        let left_s = settings.budget_s.map(|b| b - start.elapsed().as_secs_f64());
        let outcome = match (estimated_s, left_s) {
            (Some(estimated_s), Some(left_s)) if estimated_s > left_s => {
                Outcome::Capped { estimated_s, left_s: left_s.max(0.0) }
            }
            _ => {
                let started = Instant::now();
                let outcome = catching_gpu_errors(ctx, || measure(ctx, timer, w, settings))
                    .unwrap_or_else(|e| Outcome::Failed { reason: e.to_string() });
                if matches!(outcome, Outcome::Measured(_)) {
                    seconds_per_byte = Some(started.elapsed().as_secs_f64() / (w.kv_bytes() * runs as u64) as f64);
                }
                outcome
            }
        };
        let point =
            DecodePoint { series: w.series(), dtype: w.dtype.name(), workload: *w, kv_bytes: w.kv_bytes(), outcome };
        results[i] = Some(point);
    }
    results.into_iter().map(|r| r.expect("every point was run")).collect()
}

/// Checks and times every split setting on one filled cache.
fn measure(
    ctx: &Context,
    timer: &Timer,
    w: &DecodeWorkload,
    settings: &DecodeSettings,
) -> Result<Outcome<DecodeMeasured>> {
    let mut problem = DecodeProblem::upload(ctx, w)?;
    let mut validation = Validation { against: "reference", max_error: 0.0, tolerance: tolerance(w.dtype) };
    let mut results: Vec<SplitResult> = Vec::new();
    for &requested in &settings.splits {
        let plan = problem.plan(ctx, requested)?;
        let mut work = |e: &mut wgpu::CommandEncoder| problem.record(ctx, e, requested);
        timer.time(ctx, &mut work)?;
        let checked = problem.validate(ctx)?;
        validation.max_error = validation.max_error.max(checked.max_error);
        if !checked.passed() {
            return Ok(Outcome::Failed {
                reason: format!(
                    "decode with {} splits differs from the f64 reference by {:.3e} (tolerance {:.1e}); not timed",
                    plan.splits, checked.max_error, checked.tolerance
                ),
            });
        }
        let mut work = |e: &mut wgpu::CommandEncoder| problem.record(ctx, e, requested);
        let time = timer.measure(ctx, settings.warmup.saturating_sub(1), settings.runs, &mut work)?;
        let bytes_per_s = w.kv_bytes() as f64 / time.median_s;
        results.push(SplitResult {
            requested,
            splits: plan.splits,
            time,
            bytes_per_s,
            fraction_of_copy: settings.copy_peak.map(|p| bytes_per_s / p),
            speedup_vs_unsplit: None,
        });
    }
    if let Some(unsplit) = results.iter().find(|r| r.requested == Some(1)).map(|r| r.time.median_s) {
        for r in &mut results {
            r.speedup_vs_unsplit = Some(unsplit / r.time.median_s);
        }
    }
    Ok(Outcome::Measured(DecodeMeasured { validation, settings: results }))
}

/// A decode workload on the GPU: a cache filled with `cache_len` tokens of seeded K and V,
/// the queries, the outputs, and what the outputs should be.
pub struct DecodeProblem {
    pub workload: DecodeWorkload,
    cache: KvCache,
    q: Tensor,
    pub out: Tensor,
    pub lse: Tensor,
    expected: Expected,
}

impl DecodeProblem {
    pub fn upload(ctx: &Context, w: &DecodeWorkload) -> Result<Self> {
        let mut cache = KvCache::new(ctx, w.cache_config())?;
        for start in (0..w.cache_len).step_by(FILL_CHUNK) {
            let tokens = start..(start + FILL_CHUNK).min(w.cache_len);
            let shape = [w.batch, w.kv_heads, tokens.len(), w.head_dim];
            let values = |which| -> Vec<f32> {
                let heads = 0..w.batch * w.kv_heads;
                heads.flat_map(|bh| input_values(which, kv_range(w, bh, tokens.clone()), w.dtype)).collect()
            };
            let k = Tensor::from_f32(ctx, &shape, &values(1), w.dtype)?;
            let v = Tensor::from_f32(ctx, &shape, &values(2), w.dtype)?;
            let mut encoder = ctx.device().create_command_encoder(&Default::default());
            cache.append(ctx, &mut encoder, 0, &k.view(), &v.view())?;
            ctx.submit_and_wait(encoder)?;
        }
        let q_shape = [w.batch, w.heads, w.queries, w.head_dim];
        let q = Tensor::from_f32(ctx, &q_shape, &input_values(0, 0..q_shape.iter().product(), w.dtype), w.dtype)?;
        let out = Tensor::zeros(ctx, &q_shape, w.dtype)?;
        let lse = Tensor::zeros(ctx, &q_shape[..3], DType::F32)?;
        Ok(Self { workload: *w, cache, q, out, lse, expected: Expected::new(w) })
    }

    /// The layout a decode with `splits` (`None`: automatic) uses.
    pub fn plan(&self, ctx: &Context, splits: Option<u32>) -> Result<DecodePlan> {
        let w = &self.workload;
        self.cache.plan(ctx, 0, w.heads, w.queries, &DecodeOptions { scale: None, splits })
    }

    /// Records one decode step with `splits` into `encoder`.
    pub fn record(&mut self, ctx: &Context, encoder: &mut wgpu::CommandEncoder, splits: Option<u32>) -> Result<()> {
        let bufs = DecodeBuffers { q: self.q.view(), out: self.out.view(), lse: self.lse.view() };
        self.cache.attend(ctx, encoder, 0, &bufs, &DecodeOptions { scale: None, splits })?;
        Ok(())
    }

    /// Compares the outputs of the first and the last (sequence, query head) with the f64 reference.
    pub fn validate(&self, ctx: &Context) -> Result<Validation> {
        let (out, lse) = (self.out.to_f32(ctx)?, self.lse.to_f32(ctx)?);
        let max_error = self.expected.max_error(&self.workload, &out, &lse);
        Ok(Validation { against: "reference", max_error, tolerance: tolerance(self.workload.dtype) })
    }
}

/// Where the values of `tokens` of (sequence, KV head) `bh` lie in one tensor
/// `[B, Hkv, cache_len, D]`, so that the reference can take any head's keys as a slice.
fn kv_range(w: &DecodeWorkload, bh: usize, tokens: std::ops::Range<usize>) -> std::ops::Range<usize> {
    (bh * w.cache_len + tokens.start) * w.head_dim..(bh * w.cache_len + tokens.end) * w.head_dim
}

/// The f64 reference for the first and the last (sequence, query head): each query sees
/// the cache up to its own position (the queries are the cache's last tokens).
struct Expected {
    /// (first output row, O `[Nq, D]`, LSE `[Nq]`) per checked head.
    heads: Vec<(usize, reference::ReferenceOutput)>,
}

impl Expected {
    fn new(w: &DecodeWorkload) -> Self {
        let shape = AttentionShape {
            batch: 1,
            q_heads: 1,
            kv_heads: 1,
            n_q: w.queries,
            n_k: w.cache_len,
            d_qk: w.head_dim,
            d_v: w.head_dim,
        };
        let options = AttentionOptions { causal: true, ..Default::default() };
        let group = w.heads / w.kv_heads;
        let heads = [(0, 0), (w.batch - 1, w.heads - 1)]
            .into_iter()
            .map(|(b, h)| {
                let first_row = (b * w.heads + h) * w.queries;
                let q = input_values(0, first_row * w.head_dim..(first_row + w.queries) * w.head_dim, w.dtype);
                let bh = b * w.kv_heads + h / group;
                let k = input_values(1, kv_range(w, bh, 0..w.cache_len), w.dtype);
                let v = input_values(2, kv_range(w, bh, 0..w.cache_len), w.dtype);
                (first_row, reference::attention(&q, &k, &v, &shape, &options))
            })
            .collect();
        Self { heads }
    }

    /// The largest error of the checked heads' outputs and LSE.
    fn max_error(&self, w: &DecodeWorkload, out: &[f32], lse: &[f32]) -> f64 {
        let d = w.head_dim;
        self.heads.iter().fold(0.0, |worst, (row, want)| {
            let rows = *row..row + w.queries;
            let o = max_error(&out[rows.start * d..rows.end * d], want.out.iter().copied());
            worst.max(o).max(max_error(&lse[rows], want.lse.iter().copied()))
        })
    }
}

impl DecodeReport {
    /// The aligned table `wattn bench --decode` prints: a row per point and split setting.
    pub fn table(&self) -> String {
        let mut out = self.provenance.headline() + "\n";
        let first = self.points.first().map(|p| p.workload);
        if let Some(w) = first {
            let s = if w.queries == 1 { "" } else { "s" };
            writeln!(out, "decode: {} query token{s} per sequence, batch {}", w.queries, w.batch).unwrap();
        }
        writeln!(out, "median of {} runs after {} warm-up", self.runs, self.warmup).unwrap();
        if let Some(p) = &self.peak {
            writeln!(out, "peak copy bandwidth {} GB/s (bytes read + written)", sig3(p.copy.rate / 1e9)).unwrap();
        }
        let header =
            ["series", "cache", "KV MiB", "splits", "ms (min-max)", "GB/s", "of copy", "vs 1 split", "checked"];
        let mut rows = vec![header.map(String::from).to_vec()];
        for p in &self.points {
            let lead = vec![p.series.clone(), seq_label(p.workload.cache_len), mib(p.kv_bytes)];
            match &p.outcome {
                Outcome::Measured(DecodeMeasured { validation, settings }) => {
                    for r in settings {
                        let mut row = lead.clone();
                        row.extend([
                            r.label(),
                            ms_range(&r.time),
                            sig3(r.bytes_per_s / 1e9),
                            r.fraction_of_copy.map_or("-".into(), |f| format!("{:.0}%", f * 100.0)),
                            r.speedup_vs_unsplit.map_or("-".into(), |s| format!("{}x", sig3(s))),
                            format!("{:.0e}", validation.max_error),
                        ]);
                        rows.push(row);
                    }
                }
                other => {
                    let why = format!("{}: {}", other.status(), other.reason().unwrap_or_default());
                    rows.push(lead.into_iter().chain([why]).collect());
                }
            }
        }
        out.push('\n');
        out + &aligned(&rows, &[false, true, true, true, true, true, true, true, true])
    }

    /// One row per point and split setting, each with the provenance and the copy peak.
    pub fn csv(&self) -> String {
        #[rustfmt::skip]
        let header = [
            "series", "dtype", "head_dim", "batch", "heads", "kv_heads", "queries", "cache_len", "kv_bytes",
            "status", "reason", "requested_splits", "splits", "median_s", "min_s", "max_s", "bytes_per_s",
            "fraction_of_copy", "speedup_vs_unsplit", "max_error", "tolerance", "peak_copy_bytes_per_s",
        ];
        let num = |x: Option<f64>| x.map_or(String::new(), |v| v.to_string());
        let peak = num(self.peak.as_ref().map(|p| p.copy.rate));
        let columns = PROVENANCE_CSV_HEADER.len() + header.len();
        let mut out = PROVENANCE_CSV_HEADER.join(",") + "," + &header.join(",") + "\n";
        for p in &self.points {
            let w = &p.workload;
            let mut lead = self.provenance.csv_cells();
            lead.extend([
                p.series.clone(),
                p.dtype.into(),
                w.head_dim.to_string(),
                w.batch.to_string(),
                w.heads.to_string(),
                w.kv_heads.to_string(),
                w.queries.to_string(),
                w.cache_len.to_string(),
                p.kv_bytes.to_string(),
            ]);
            let mut rows: Vec<Vec<String>> = Vec::new();
            match &p.outcome {
                Outcome::Measured(DecodeMeasured { validation, settings }) => {
                    for r in settings {
                        let mut row = lead.clone();
                        row.extend(["measured".into(), String::new()]);
                        row.push(r.requested.map_or("auto".into(), |n| n.to_string()));
                        row.push(r.splits.to_string());
                        row.extend(
                            [Some(r.time.median_s), Some(r.time.min_s), Some(r.time.max_s), Some(r.bytes_per_s)]
                                .map(num),
                        );
                        row.extend([num(r.fraction_of_copy), num(r.speedup_vs_unsplit)]);
                        row.extend([validation.max_error.to_string(), validation.tolerance.to_string()]);
                        rows.push(row);
                    }
                }
                other => {
                    let (status, reason) = (other.status().into(), other.reason().unwrap_or_default());
                    rows.push(lead.iter().cloned().chain([status, reason]).collect());
                }
            }
            for mut row in rows {
                row.resize(columns - 1, String::new());
                row.push(peak.clone());
                out += &row.iter().map(|c| csv_field(c)).collect::<Vec<_>>().join(",");
                out.push('\n');
            }
        }
        out
    }

    /// K and V bandwidth against cache length: a colour per series, a line per split
    /// setting, the unsplit one dashed.
    pub fn chart(&self) -> Chart {
        let mut series: BTreeMap<(String, String), Vec<(f64, f64)>> = BTreeMap::new();
        for p in &self.points {
            for r in p.settings() {
                let setting = match r.requested {
                    Some(1) => "unsplit".to_string(),
                    Some(n) => format!("{n} splits"),
                    None => "auto splits".to_string(),
                };
                let point = (p.workload.cache_len as f64, r.bytes_per_s / 1e9);
                series.entry((p.series.clone(), setting)).or_default().push(point);
            }
        }
        let mut families = Families::default();
        let mut lines = Vec::new();
        for ((family, setting), mut points) in series {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let color = families.color(&family);
            lines.push(Line { name: format!("{family} {setting}"), color, dashed: setting == "unsplit", points });
        }
        let pv = &self.provenance;
        Chart {
            title: format!("wattn {} split-KV decode on {} ({})", pv.wattn_version, pv.adapter.name, pv.date),
            x_label: "cache length (tokens)".into(),
            y_label: "K and V read, GB/s".into(),
            x_axis: XAxis::Log2,
            lines,
            empty_note: "no point was measured".into(),
        }
    }
}
