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

use super::engine::{self, Benchmark, Outcome, Repeats, Speeds, Validation, max_error, tolerance};
use super::plot::{Chart, Families, Line, XAxis, seq_label};
use super::report::{Provenance, Report, Row, aligned, mib, ms_range, sig3, time_cells};
use super::workload::input_values;
use crate::attention::{AttentionOptions, AttentionShape};
use crate::context::Context;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kv::{DecodeBuffers, DecodeOptions, DecodePlan, EvictionPolicy, KvCache, KvCacheConfig, PositionMode};
use crate::reference;
use crate::tensor::Tensor;
use crate::timing::{Stats, Timer};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// One decode problem: `queries` new tokens per sequence against `cache_len` cached ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeWorkload {
    /// Storage dtype of the queries, the cache and the output.
    pub dtype: DType,
    /// Sequences decoded together.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// K/V heads, dividing the query heads (grouped-query attention when fewer).
    pub kv_heads: usize,
    /// Head dim of Q, K and V.
    pub head_dim: usize,
    /// Query tokens per sequence (1 for plain decoding, a few for speculative decoding).
    pub queries: usize,
    /// Tokens in the cache per sequence, the queries' own included (they are its last tokens).
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
pub(crate) struct DecodeGrid {
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
pub(crate) struct DecodeSettings {
    pub repeats: Repeats,
    pub splits: Vec<Option<u32>>,
    /// Seconds after which no point is started that is estimated to run past them.
    pub budget_s: Option<f64>,
    /// The adapter's copy bandwidth in bytes/s, which the decode bandwidth is quoted against.
    pub copy_peak: Option<f64>,
}

/// One split setting checked and timed at one point.
#[derive(Clone, Debug)]
pub(crate) struct SplitResult {
    /// The setting asked for; `None` = automatic.
    pub requested: Option<u32>,
    /// The layout it resolved to (the automatic choice, or the request capped at one split
    /// per key tile).
    pub plan: DecodePlan,
    pub validation: Validation,
    pub time: Stats,
    /// K and V bytes read per second of the median run.
    pub bytes_per_s: f64,
    pub fraction_of_copy: Option<f64>,
    /// The first setting before this one that resolved to the same plan: the two time the
    /// same dispatches, so their difference is the spread of repeated timings.
    pub same_plan_as: Option<String>,
    /// The unsplit median over this one, when one split was among the settings and this
    /// setting's plan differs from its plan (the unsplit setting itself: 1).
    pub speedup_vs_unsplit: Option<f64>,
}

impl SplitResult {
    /// "1", "8", "1 (2)" or "auto (8)": the setting, and the splits of its plan where they differ.
    pub fn label(&self) -> String {
        let splits = self.plan.splits;
        match self.requested {
            Some(n) if n == splits => n.to_string(),
            Some(n) => format!("{n} ({splits})"),
            None => format!("auto ({splits})"),
        }
    }

    /// The "vs 1 split" cell: the speed-up, or which setting made the same plan as the
    /// unsplit one (a ratio of two timings of one plan is noise, not a speed-up).
    fn versus_unsplit(&self, unsplit: Option<&SplitResult>) -> String {
        match (self.speedup_vs_unsplit, unsplit) {
            (Some(s), _) => format!("{}x", sig3(s)),
            (None, Some(u)) if u.plan == self.plan => format!("same plan as {}", u.label()),
            _ => "-".into(),
        }
    }
}

/// Fills in which settings repeat an earlier one's plan and the speed-ups over the unsplit
/// setting (the first that asked for 1 split) where the plans differ.
fn compare_settings(results: &mut [SplitResult]) {
    for i in 0..results.len() {
        results[i].same_plan_as = results[..i].iter().find(|r| r.plan == results[i].plan).map(SplitResult::label);
    }
    let Some(unsplit) = results.iter().position(|r| r.requested == Some(1)) else { return };
    let (plan, median_s) = (results[unsplit].plan, results[unsplit].time.median_s);
    for (i, r) in results.iter_mut().enumerate() {
        r.speedup_vs_unsplit = (i == unsplit || r.plan != plan).then(|| median_s / r.time.median_s);
    }
}

/// One decode point and what became of it.
#[derive(Clone, Debug)]
pub(crate) struct DecodePoint {
    pub workload: DecodeWorkload,
    /// [`DecodeWorkload::series`].
    pub series: String,
    /// Measured: every split setting, each checked before it was timed.
    pub outcome: Outcome<Vec<SplitResult>>,
}

impl DecodePoint {
    pub fn settings(&self) -> &[SplitResult] {
        self.outcome.measured().map_or(&[], |s| s)
    }

    /// The setting that asked for one split, if any.
    fn unsplit(&self) -> Option<&SplitResult> {
        self.settings().iter().find(|r| r.requested == Some(1))
    }

    /// One row per split setting, or one saying why the point was not measured.
    pub fn rows(&self) -> Vec<Row> {
        let w = &self.workload;
        let lead = Row::default()
            .with("series", self.series.as_str())
            .with("dtype", w.dtype.name())
            .with("head_dim", w.head_dim)
            .with("batch", w.batch)
            .with("heads", w.heads)
            .with("kv_heads", w.kv_heads)
            .with("queries", w.queries)
            .with("cache_len", w.cache_len)
            .with("kv_bytes", w.kv_bytes())
            .with_all("", self.outcome.cells());
        let setting = |r: Option<&SplitResult>| {
            Row::default()
                .with("setting", r.map(SplitResult::label))
                .with("requested_splits", r.and_then(|r| r.requested))
                .with("splits", r.map(|r| r.plan.splits))
                .with("same_plan_as", r.and_then(|r| r.same_plan_as.clone()))
                .with_all("", time_cells(r.map(|r| &r.time)))
                .with("bytes_per_s", r.map(|r| r.bytes_per_s))
                .with("fraction_of_copy", r.and_then(|r| r.fraction_of_copy))
                .with("speedup_vs_unsplit", r.and_then(|r| r.speedup_vs_unsplit))
                .with("max_error", r.map(|r| r.validation.max_error))
                .with("tolerance", r.map(|r| r.validation.tolerance))
        };
        match self.settings() {
            [] => vec![lead.with_all("", setting(None))],
            settings => settings.iter().map(|r| lead.clone().with_all("", setting(Some(r)))).collect(),
        }
    }
}

/// `wattn bench --decode`'s result.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct DecodeReport {
    #[serde(flatten)]
    pub provenance: Provenance,
    pub warmup: usize,
    pub runs: usize,
    pub budget_s: Option<f64>,
    pub peak: Option<super::peak::Peak>,
    /// In the JSON as their rows, one per split setting (see [`Report::rows`]).
    #[serde(skip)]
    pub points: Vec<DecodePoint>,
}

/// Cache tokens appended per call while filling: bounds the host-side staging.
const FILL_CHUNK: usize = 4096;

/// Runs `workloads` on the engine and returns their results in the given order.
/// `progress(done, total, next)` is called before each point.
pub(crate) fn run(
    ctx: &Context,
    timer: &Timer,
    workloads: &[DecodeWorkload],
    settings: &DecodeSettings,
    progress: &mut dyn FnMut(usize, usize, &DecodeWorkload),
) -> Vec<DecodePoint> {
    let outcomes = engine::run(ctx, &Decode { ctx, timer, settings }, workloads, settings.budget_s, progress);
    workloads
        .iter()
        .zip(outcomes)
        .map(|(w, outcome)| DecodePoint { workload: *w, series: w.series(), outcome })
        .collect()
}

struct Decode<'a> {
    ctx: &'a Context,
    timer: &'a Timer,
    settings: &'a DecodeSettings,
}

impl Benchmark for Decode<'_> {
    type Workload = DecodeWorkload;
    type Measured = Vec<SplitResult>;

    /// Bytes of K and V read by every run of every setting, and once more for filling the cache.
    fn work(&self, w: &DecodeWorkload) -> f64 {
        (w.kv_bytes() * ((self.settings.repeats.per_setting() + 1) * self.settings.splits.len()) as u64) as f64
    }

    fn series(&self, w: &DecodeWorkload) -> String {
        w.series()
    }

    /// Checks and times every split setting on one filled cache.
    fn measure(&self, w: &DecodeWorkload, _: &mut Speeds, _: Option<f64>) -> Result<Outcome<Vec<SplitResult>>> {
        let (ctx, timer) = (self.ctx, self.timer);
        let mut problem = DecodeProblem::upload(ctx, w)?;
        let mut results: Vec<SplitResult> = Vec::new();
        for &requested in &self.settings.splits {
            let plan = problem.plan(ctx, requested)?;
            let mut work = |e: &mut wgpu::CommandEncoder| problem.record(ctx, e, requested);
            timer.time(ctx, &mut work)?;
            let validation = problem.validate(ctx)?;
            if !validation.passed() {
                return Ok(validation.failure(&format!("decode with {} splits", plan.splits)));
            }
            let mut work = |e: &mut wgpu::CommandEncoder| problem.record(ctx, e, requested);
            let time = self.settings.repeats.time(ctx, timer, &mut work)?;
            let bytes_per_s = w.kv_bytes() as f64 / time.median_s;
            results.push(SplitResult {
                requested,
                plan,
                validation,
                time,
                bytes_per_s,
                fraction_of_copy: self.settings.copy_peak.map(|p| bytes_per_s / p),
                same_plan_as: None,
                speedup_vs_unsplit: None,
            });
        }
        compare_settings(&mut results);
        Ok(Outcome::Measured(results))
    }
}

/// A decode workload on the GPU: a cache filled with `cache_len` tokens of seeded K and V,
/// the queries, the outputs, and what the outputs should be.
pub struct DecodeProblem {
    workload: DecodeWorkload,
    cache: KvCache,
    q: Tensor,
    /// O `[batch, heads, queries, head_dim]` of the last step recorded, in the workload's dtype.
    pub out: Tensor,
    lse: Tensor,
    expected: Expected,
}

impl DecodeProblem {
    /// Fills a cache with `w.cache_len` tokens of seeded K and V, uploads the queries,
    /// allocates the outputs and computes the f64 reference of the heads
    /// [`validate`](Self::validate) checks.
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

impl Report for DecodeReport {
    /// A row per point and split setting.
    fn table(&self) -> String {
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
            let lead = vec![p.series.clone(), seq_label(p.workload.cache_len), mib(p.workload.kv_bytes())];
            match &p.outcome {
                Outcome::Measured(settings) => {
                    for r in settings {
                        let mut row = lead.clone();
                        row.extend([
                            r.label(),
                            ms_range(&r.time),
                            sig3(r.bytes_per_s / 1e9),
                            r.fraction_of_copy.map_or("-".into(), |f| format!("{:.0}%", f * 100.0)),
                            r.versus_unsplit(p.unsplit()),
                            format!("{:.0e}", r.validation.max_error),
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

    fn lead(&self) -> Row {
        self.provenance.row().with("peak_copy_bytes_per_s", self.peak.as_ref().map(|p| p.copy.rate))
    }

    fn rows(&self) -> Vec<Row> {
        self.points.iter().flat_map(DecodePoint::rows).collect()
    }

    /// K and V bandwidth against cache length: a colour per series, a line per split
    /// setting, the unsplit one dashed.
    fn chart(&self) -> Chart {
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
        Chart {
            title: self.provenance.title("split-KV decode"),
            x_label: "cache length (tokens)".into(),
            y_label: "K and V read, GB/s".into(),
            x_axis: XAxis::Log2,
            lines,
            empty_note: "no point was measured".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::{Adapter, Cell};
    use crate::timing::Clock;

    /// A setting that asked for `requested` and resolved to `splits`, timed at `median_s`.
    fn setting(requested: Option<u32>, splits: u32, median_s: f64) -> SplitResult {
        SplitResult {
            requested,
            plan: DecodePlan { splits, keys_per_split: 4096 / splits, rows_per_block: 4, block_k: 64 },
            validation: Validation { against: "reference", max_error: 1e-7, tolerance: 1e-4 },
            time: Stats::of(&[median_s]).unwrap(),
            bytes_per_s: 1.0 / median_s,
            fraction_of_copy: None,
            same_plan_as: None,
            speedup_vs_unsplit: None,
        }
    }

    #[test]
    fn settings_of_one_plan_are_not_compared_as_speedups() {
        // auto resolves to the unsplit plan; 8 is capped to the plan of 4.
        let mut settings =
            vec![setting(Some(1), 1, 2.0), setting(Some(4), 4, 1.0), setting(None, 1, 6.0), setting(Some(8), 4, 0.5)];
        compare_settings(&mut settings);
        let same: Vec<Option<&str>> = settings.iter().map(|s| s.same_plan_as.as_deref()).collect();
        assert_eq!(same, [None, None, Some("1"), Some("4")]);
        let speedups: Vec<Option<f64>> = settings.iter().map(|s| s.speedup_vs_unsplit).collect();
        assert_eq!(speedups, [Some(1.0), Some(2.0), None, Some(4.0)], "no ratio between timings of one plan");

        let workload = DecodeWorkload {
            dtype: DType::F32,
            batch: 1,
            heads: 8,
            kv_heads: 2,
            head_dim: 128,
            queries: 1,
            cache_len: 4096,
        };
        let point = DecodePoint { workload, series: workload.series(), outcome: Outcome::Measured(settings) };
        let rows = point.rows();
        assert_eq!(rows[2].get("same_plan_as"), Some(&"1".into()));
        assert_eq!(rows[2].get("speedup_vs_unsplit"), Some(&Cell::Empty));
        assert_eq!(rows[3].get("setting"), Some(&"8 (4)".into()));

        let adapter = Adapter {
            name: "test".into(),
            backend: "Vulkan".into(),
            device_type: "Cpu".into(),
            driver: String::new(),
            driver_info: String::new(),
        };
        let provenance =
            Provenance { wattn_version: "0", date: "1970-01-01T00:00:00Z".into(), adapter, clock: Clock::WallClock };
        let report = DecodeReport { provenance, warmup: 1, runs: 1, budget_s: None, peak: None, points: vec![point] };
        let table = report.table();
        let cell = |setting: &str| {
            let rows = table.lines().filter(|l| l.starts_with("f32"));
            let line =
                rows.into_iter().find(|l| l.contains(&format!(" {setting} "))).unwrap_or_else(|| panic!("{table}"));
            line.split("  ").filter(|c| !c.trim().is_empty()).nth(7).unwrap().trim().to_string()
        };
        assert_eq!(cell("1"), "1.00x");
        assert_eq!(cell("4"), "2.00x");
        assert_eq!(cell("auto (1)"), "same plan as 1", "{table}");
        assert_eq!(cell("8 (4)"), "4.00x");
    }
}
