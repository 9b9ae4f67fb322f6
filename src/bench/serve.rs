//! `wattn bench --serve`: one decode step of a server's batch, a seeded set of requests of
//! mixed lengths, three ways: one paged launch over a page pool (`kv::paged`), the same
//! requests in a dense cache padded to the longest, and one dense launch per request (all
//! recorded into one encoder). Tokens/s is decoded tokens (one per request) per second; memory
//! is each layout's K/V bytes. The paged output is checked against the per-request launches
//! before anything is timed; int8 storage is timed too, and its bytes per token set against f16.

use crate::bench::plot::{Chart, XAxis};
use crate::bench::report::{Provenance, Report, Row};
use crate::bench::{Stats, Timer};
use crate::context::Context;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kv::paged::{KvStorage, PagedKvCache, PagedLayout, SequenceId};
use crate::kv::{DecodeBuffers, DecodeOptions, EvictionPolicy, KvCache, KvCacheConfig, PositionMode};
use crate::tensor::Tensor;

/// The batch and model of one `--serve` run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ServeSettings {
    /// Requests in the batch.
    pub requests: usize,
    /// Shortest and longest request (tokens in its cache), drawn log-uniformly between them.
    pub lengths: (usize, usize),
    /// Query heads, KV heads, head dim.
    pub q_heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Head dim.
    pub head_dim: usize,
    /// Tokens per page.
    pub page_size: usize,
    /// Seed of the lengths and values.
    pub seed: u64,
    /// Untimed and timed runs per path.
    pub warmup: usize,
    /// Timed runs per path.
    pub runs: usize,
}

/// One timed path.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ServeRow {
    /// "paged", "paged int8", "paged int8 K/ch" (K per channel), "padded", "per request".
    pub path: &'static str,
    /// Decode launches per step.
    pub launches: usize,
    /// Time of one step (`None`: skipped).
    pub stats: Option<Stats>,
    /// Decoded tokens per second (one per request and step).
    pub tokens_per_s: f64,
    /// Bytes of K/V (and scales) the path holds.
    pub kv_bytes: u64,
    /// Why the path did not run (an adapter limit), if it did not.
    pub skipped: Option<String>,
}

impl ServeRow {
    /// A path that ran: `tokens` per step, timed by `stats`.
    pub fn measured(path: &'static str, launches: usize, tokens: usize, stats: Stats, kv_bytes: u64) -> Self {
        let tokens_per_s = tokens as f64 / stats.median_s;
        Self { path, launches, stats: Some(stats), tokens_per_s, kv_bytes, skipped: None }
    }

    /// `result`, or a skipped row saying why when the adapter's limits refused the path.
    pub fn skipped_on_limit(path: &'static str, result: Result<Self>) -> Result<Self> {
        match result {
            Err(e @ Error::Limit { .. }) => Ok(Self {
                path,
                launches: 0,
                stats: None,
                tokens_per_s: f64::NAN,
                kv_bytes: 0,
                skipped: Some(e.to_string()),
            }),
            other => other,
        }
    }
}

/// The requests' lengths: seeded, log-uniform in `lengths`.
pub fn request_lengths(settings: &ServeSettings) -> Vec<usize> {
    let (lo, hi) = settings.lengths;
    let mut state = settings.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..settings.requests)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 11) as f64 / (1u64 << 53) as f64;
            ((lo as f64).ln() + u * ((hi as f64).ln() - (lo as f64).ln())).exp().round() as usize
        })
        .collect()
}

/// Deterministic values in [-1, 1) for `n` elements, from `seed` (queries).
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0).collect()
}

/// Element `c` of KV head `head` of request `request`'s token at `position`, in [-1, 1): the
/// same in every layout, so that the paths' outputs can be compared.
fn kv_value(request: usize, position: usize, head: usize, c: usize) -> f32 {
    ((request * 7919 + position * 104_729 + head * 31 + c * 13) % 2003) as f32 / 1001.5 - 1.0
}

/// A paged cache holding `lengths` tokens per request, the pool just big enough.
fn paged_cache(
    ctx: &Context,
    s: &ServeSettings,
    lengths: &[usize],
    storage: KvStorage,
) -> Result<(PagedKvCache, Vec<SequenceId>)> {
    let pages = lengths.iter().map(|n| n.div_ceil(s.page_size)).sum();
    let layout = PagedLayout {
        kv_heads: s.kv_heads,
        head_dim: s.head_dim,
        page_size: s.page_size,
        pages,
        dtype: DType::F32,
        storage,
        policy: EvictionPolicy::None { capacity: lengths.iter().copied().max().unwrap_or(1) },
        positions: PositionMode::Absolute,
    };
    let mut cache = PagedKvCache::new(ctx, 1, layout)?;
    let ids: Vec<SequenceId> = lengths.iter().map(|_| cache.add_sequence()).collect();
    // Filled a chunk of each request per step, so that no upload is large.
    let chunk = 2048;
    let mut filled = 0;
    while lengths.iter().any(|&n| n > filled) {
        let plan: Vec<(SequenceId, usize)> = ids
            .iter()
            .zip(lengths)
            .filter(|(_, n)| **n > filled)
            .map(|(&id, &n)| (id, (n - filled).min(chunk)))
            .collect();
        let step = cache.begin_step(ctx, &plan)?;
        let shape = [step.tokens(), s.kv_heads, s.head_dim];
        let mut data = Vec::with_capacity(shape.iter().product());
        for &(id, count) in &plan {
            let request = ids.iter().position(|&other| other == id).unwrap_or(0);
            for position in filled..filled + count {
                for head in 0..s.kv_heads {
                    data.extend((0..s.head_dim).map(|c| kv_value(request, position, head, c)));
                }
            }
        }
        let kv = Tensor::from_f32(ctx, &shape, &data, DType::F32)?;
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        cache.append(ctx, &mut encoder, 0, &step, &kv.view(), &kv.view())?;
        ctx.submit_and_wait(encoder)?;
        filled += chunk;
    }
    Ok((cache, ids))
}

/// A dense cache of `batch` sequences of `len` tokens each, from request `first_request` on.
fn dense_cache(ctx: &Context, s: &ServeSettings, first_request: usize, batch: usize, len: usize) -> Result<KvCache> {
    let config = KvCacheConfig {
        layers: 1,
        batch,
        kv_heads: s.kv_heads,
        head_dim: s.head_dim,
        dtype: DType::F32,
        policy: EvictionPolicy::None { capacity: len },
        positions: PositionMode::Absolute,
    };
    let mut cache = KvCache::new(ctx, config)?;
    let chunk = 2048;
    for first in (0..len).step_by(chunk) {
        let shape = [batch, s.kv_heads, chunk.min(len - first), s.head_dim];
        let mut data = Vec::with_capacity(shape.iter().product());
        for b in 0..batch {
            for head in 0..s.kv_heads {
                for position in first..first + shape[2] {
                    data.extend((0..s.head_dim).map(|c| kv_value(first_request + b, position, head, c)));
                }
            }
        }
        let kv = Tensor::from_f32(ctx, &shape, &data, DType::F32)?;
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        cache.append(ctx, &mut encoder, 0, &kv.view(), &kv.view())?;
        ctx.submit_and_wait(encoder)?;
    }
    Ok(cache)
}

/// Runs the three paths (and int8) on `ctx`; `progress` hears each path's name first. A path
/// over one of the adapter's limits (the padded cache of a long batch, say) is skipped.
pub fn run(ctx: &Context, timer: &Timer, s: &ServeSettings, progress: &mut dyn FnMut(&str)) -> Result<Vec<ServeRow>> {
    let lengths = request_lengths(s);
    let n = s.requests;
    let q_shape = [n, s.q_heads, 1, s.head_dim];
    let q_data = values(q_shape.iter().product(), 7);
    let q = Tensor::from_f32(ctx, &q_shape, &q_data, DType::F32)?;
    let out = Tensor::zeros(ctx, &q_shape, DType::F32)?;
    let lse = Tensor::zeros(ctx, &q_shape[..3], DType::F32)?;
    let bufs = DecodeBuffers { q: q.view(), out: out.view(), lse: lse.view() };
    let options = DecodeOptions::default();
    let row = |path, launches, stats, kv_bytes| ServeRow::measured(path, launches, n, stats, kv_bytes);
    let skipped_on_limit = ServeRow::skipped_on_limit;
    let mut rows = Vec::new();

    progress("per request");
    let mut want = None;
    let per_request = (|| {
        let mut singles = Vec::new();
        for (request, &len) in lengths.iter().enumerate() {
            singles.push(dense_cache(ctx, s, request, 1, len)?);
        }
        let one_q = [1, s.q_heads, 1, s.head_dim];
        let per = one_q.iter().product::<usize>();
        let tensors = |data: Option<&[f32]>, shape: &[usize]| {
            (0..n)
                .map(|i| match data {
                    Some(d) => Tensor::from_f32(ctx, shape, &d[i * per..][..per], DType::F32),
                    None => Tensor::zeros(ctx, shape, DType::F32),
                })
                .collect::<Result<Vec<_>>>()
        };
        let (qs, outs, lses) = (tensors(Some(&q_data), &one_q)?, tensors(None, &one_q)?, tensors(None, &one_q[..3])?);
        let mut step = |encoder: &mut wgpu::CommandEncoder| -> Result<()> {
            for (i, cache) in singles.iter_mut().enumerate() {
                let bufs = DecodeBuffers { q: qs[i].view(), out: outs[i].view(), lse: lses[i].view() };
                cache.attend(ctx, encoder, 0, &bufs, &options)?;
            }
            Ok(())
        };
        let stats = timer.measure(ctx, s.warmup, s.runs, &mut step)?;
        want = Some(outs.iter().map(|t| t.to_f32(ctx)).collect::<Result<Vec<_>>>()?.concat());
        Ok(row("per request", n, stats, singles.iter().map(kv_bytes).sum()))
    })();
    rows.push(skipped_on_limit("per request", per_request)?);

    let pools =
        [("paged", KvStorage::Float), ("paged int8", KvStorage::Int8), ("paged int8 K/ch", KvStorage::Int8ChannelK)];
    for (path, storage) in pools {
        progress(path);
        let paged = (|| {
            let (mut cache, ids) = paged_cache(ctx, s, &lengths, storage)?;
            let mut step =
                |encoder: &mut wgpu::CommandEncoder| cache.attend(ctx, encoder, 0, &ids, &bufs, &options).map(|_| ());
            let stats = timer.measure(ctx, s.warmup, s.runs, &mut step)?;
            if let (KvStorage::Float, Some(want)) = (storage, &want) {
                let got = out.to_f32(ctx)?;
                let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                if got.iter().any(|x| !x.is_finite()) || err > 1e-4 {
                    return Err(Error::Gpu(format!("paged decode differs from the per-request launches by {err:e}")));
                }
            }
            let layout = cache.layout();
            Ok(row(path, 1, stats, layout.k_bytes() + layout.v_bytes()))
        })();
        rows.push(skipped_on_limit(path, paged)?);
    }

    progress("padded");
    let padded = (|| {
        let longest = lengths.iter().copied().max().unwrap_or(1);
        let mut padded = dense_cache(ctx, s, 0, n, longest)?;
        let mut step = |encoder: &mut wgpu::CommandEncoder| padded.attend(ctx, encoder, 0, &bufs, &options).map(|_| ());
        let stats = timer.measure(ctx, s.warmup, s.runs, &mut step)?;
        Ok(row("padded", 1, stats, kv_bytes(&padded)))
    })();
    rows.push(skipped_on_limit("padded", padded)?);
    Ok(rows)
}

/// Bytes of a dense cache's K and V.
fn kv_bytes(cache: &KvCache) -> u64 {
    cache.buffers(0).map_or(0, |b| b.k.size() + b.v.size())
}

/// A `storage` pool's bytes per token against an f16 pool's, for `settings`' model.
pub fn memory_ratio(s: &ServeSettings, storage: KvStorage) -> f64 {
    let layout = |storage, dtype| PagedLayout {
        kv_heads: s.kv_heads,
        head_dim: s.head_dim,
        page_size: s.page_size,
        pages: 1,
        dtype,
        storage,
        policy: EvictionPolicy::None { capacity: 1 },
        positions: PositionMode::Absolute,
    };
    layout(storage, DType::F32).bytes_per_token() as f64 / layout(KvStorage::Float, DType::F16).bytes_per_token() as f64
}

/// `wattn bench --serve`'s result.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct ServeReport {
    #[serde(flatten)]
    pub provenance: Provenance,
    pub settings: ServeSettings,
    /// The int8 pool's bytes per token against an f16 pool's ([`memory_ratio`]).
    pub int8_bytes_vs_f16: f64,
    /// The same with K per channel.
    pub int8_channel_k_bytes_vs_f16: f64,
    /// In the JSON as their rows (see [`Report::rows`]).
    #[serde(skip)]
    pub paths: Vec<ServeRow>,
}

impl Report for ServeReport {
    fn table(&self) -> String {
        format!(
            "{}\n{}int8 KV bytes per token: {:.3}x f16 ({:.3}x with K per channel)\n",
            self.provenance.headline(),
            table(&self.paths),
            self.int8_bytes_vs_f16,
            self.int8_channel_k_bytes_vs_f16
        )
    }

    fn lead(&self) -> Row {
        let s = &self.settings;
        self.provenance
            .row()
            .with("requests", s.requests)
            .with("shortest", s.lengths.0)
            .with("longest", s.lengths.1)
            .with("q_heads", s.q_heads)
            .with("kv_heads", s.kv_heads)
            .with("head_dim", s.head_dim)
            .with("page_size", s.page_size)
            .with("seed", s.seed)
            .with("warmup", s.warmup)
            .with("runs", s.runs)
            .with("int8_bytes_vs_f16", self.int8_bytes_vs_f16)
            .with("int8_channel_k_bytes_vs_f16", self.int8_channel_k_bytes_vs_f16)
    }

    /// A row per path, its speed against the padded and per-request paths.
    fn rows(&self) -> Vec<Row> {
        let (padded, per_request) = (tokens_per_s(&self.paths, "padded"), tokens_per_s(&self.paths, "per request"));
        self.paths
            .iter()
            .map(|r| {
                let speed = r.stats.map(|_| r.tokens_per_s);
                Row::default()
                    .with("path", r.path)
                    .with("launches", r.launches)
                    .with("median_s", r.stats.map(|s| s.median_s))
                    .with("min_s", r.stats.map(|s| s.min_s))
                    .with("max_s", r.stats.map(|s| s.max_s))
                    .with("tokens_per_s", speed)
                    .with("vs_padded", speed.map(|t| t / padded))
                    .with("vs_per_request", speed.map(|t| t / per_request))
                    .with("kv_bytes", r.stats.map(|_| r.kv_bytes))
                    .with("skipped", r.skipped.clone())
            })
            .collect()
    }

    /// None: the paths are a handful of numbers, the table says it all (`--plot` is refused).
    fn chart(&self) -> Chart {
        Chart {
            title: self.provenance.title("bench --serve"),
            x_label: String::new(),
            y_label: String::new(),
            x_axis: XAxis::Linear,
            lines: Vec::new(),
            empty_note: "bench --serve draws no chart".into(),
        }
    }
}

/// Tokens/s of `path` (NaN if it is missing or was skipped).
fn tokens_per_s(rows: &[ServeRow], path: &str) -> f64 {
    rows.iter().find(|r| r.path == path && r.stats.is_some()).map_or(f64::NAN, |r| r.tokens_per_s)
}

/// The rows as a markdown table, each path's speed against the padded and per-request ones.
pub fn table(rows: &[ServeRow]) -> String {
    let (padded, per_request) = (tokens_per_s(rows, "padded"), tokens_per_s(rows, "per request"));
    let mut s = String::from(
        "| path | launches | step ms (median, min-max) | tokens/s | vs padded | vs per request | K/V MiB |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let Some(stats) = r.stats else {
            s.push_str(&format!("| {} | skipped: {} | | | | | |\n", r.path, r.skipped.as_deref().unwrap_or("")));
            continue;
        };
        s.push_str(&format!(
            "| {} | {} | {:.2} ({:.2}-{:.2}) | {:.0} | {:.2}x | {:.2}x | {:.1} |\n",
            r.path,
            r.launches,
            stats.median_s * 1e3,
            stats.min_s * 1e3,
            stats.max_s * 1e3,
            r.tokens_per_s,
            r.tokens_per_s / padded,
            r.tokens_per_s / per_request,
            r.kv_bytes as f64 / (1 << 20) as f64
        ));
    }
    s
}
