//! Timing recorded GPU work: GPU timestamps where the adapter has them, else wall time;
//! [`Stats`] summarises repeated runs (median, min, max).
//!
//! The kernels' `encode` functions begin their own compute pass, so the timer cannot put
//! timestamp writes on that pass. wgpu 30 offers two other ways: `CommandEncoder::write_timestamp`,
//! which needs `TIMESTAMP_QUERY_INSIDE_ENCODERS` (a native-only extension that wattn does
//! not request), and the pass timestamps of WebGPU core (`TIMESTAMP_QUERY` alone, which
//! llvmpipe has). The timer uses the second: it brackets the work with two empty compute
//! passes, the first writing its beginning timestamp and the second its end timestamp.
//! Timestamps are taken at the bottom of the pipe, so the end one waits for every
//! dispatch recorded before it.
//!
//! The benchmarks (`wattn bench`, behind the `cli` feature) and the tuner ([`crate::tune`])
//! share it; with the `cli` feature the types also serialise into the benchmark reports.

use crate::context::Context;
use crate::error::{Error, Result};
use crate::tensor::read_buffer;
use std::time::Instant;

/// How durations are measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(serde::Serialize), serde(rename_all = "snake_case"))]
pub enum Clock {
    /// GPU timestamp queries around the work: the GPU's own time, no submission overhead.
    GpuTimestamps,
    /// Host time around submit-and-wait: includes submission and the wait's wake-up.
    WallClock,
}

impl Clock {
    /// The name in JSON and CSV.
    pub fn name(self) -> &'static str {
        match self {
            Clock::GpuTimestamps => "gpu_timestamps",
            Clock::WallClock => "wall_clock",
        }
    }

    /// In words, for headlines: "GPU timestamps" or "wall clock around submit-and-wait".
    pub fn describe(self) -> &'static str {
        match self {
            Clock::GpuTimestamps => "GPU timestamps",
            Clock::WallClock => "wall clock around submit-and-wait",
        }
    }
}

/// Work to time: records its commands into the encoder it is given.
pub type Work<'a> = dyn FnMut(&mut wgpu::CommandEncoder) -> Result<()> + 'a;

/// Times recorded GPU work, one submission per run.
pub struct Timer {
    timestamps: Option<Timestamps>,
}

struct Timestamps {
    queries: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    /// Nanoseconds per timestamp tick.
    period_ns: f64,
}

/// Bytes of the two resolved u64 timestamps.
const RESOLVED_BYTES: u64 = 16;

impl Timer {
    /// GPU timestamps when the device has `TIMESTAMP_QUERY`, else the wall clock.
    pub fn new(ctx: &Context) -> Self {
        if !ctx.capabilities().timestamps {
            return Self::wall_clock();
        }
        let queries = ctx.device().create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("wattn timer"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let resolved = ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("wattn timer resolve"),
            size: RESOLVED_BYTES,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let period_ns = ctx.queue().get_timestamp_period() as f64;
        Self { timestamps: Some(Timestamps { queries, resolved, period_ns }) }
    }

    /// A timer that always uses the wall clock.
    pub fn wall_clock() -> Self {
        Self { timestamps: None }
    }

    /// The clock this timer measures with.
    pub fn clock(&self) -> Clock {
        if self.timestamps.is_some() { Clock::GpuTimestamps } else { Clock::WallClock }
    }

    /// Records `work` into a fresh encoder, runs it and returns its duration in seconds.
    pub fn time(&self, ctx: &Context, work: &mut Work<'_>) -> Result<f64> {
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        let Some(ts) = &self.timestamps else {
            work(&mut encoder)?;
            let start = Instant::now();
            ctx.submit_and_wait(encoder)?;
            return Ok(start.elapsed().as_secs_f64());
        };
        let bracket = |encoder: &mut wgpu::CommandEncoder, index: u32, at_start: bool| {
            let writes = wgpu::ComputePassTimestampWrites {
                query_set: &ts.queries,
                beginning_of_pass_write_index: at_start.then_some(index),
                end_of_pass_write_index: (!at_start).then_some(index),
            };
            encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("wattn timer"),
                timestamp_writes: Some(writes),
            });
        };
        bracket(&mut encoder, 0, true);
        work(&mut encoder)?;
        bracket(&mut encoder, 1, false);
        encoder.resolve_query_set(&ts.queries, 0..2, &ts.resolved, 0);
        ctx.submit_and_wait(encoder)?;
        let bytes = read_buffer(ctx, &ts.resolved, RESOLVED_BYTES)?;
        let [start, end]: [u64; 2] = bytemuck::pod_read_unaligned(&bytes[..RESOLVED_BYTES as usize]);
        if end <= start {
            return Err(Error::Gpu(format!(
                "GPU timestamps read {start} then {end}: they are unusable on this adapter; time with --wall-clock"
            )));
        }
        Ok((end - start) as f64 * ts.period_ns * 1e-9)
    }

    /// Runs `work` `warmup` times, discarding the times, then `runs` times timed.
    pub fn measure(&self, ctx: &Context, warmup: usize, runs: usize, work: &mut Work<'_>) -> Result<Stats> {
        for _ in 0..warmup {
            self.time(ctx, work)?;
        }
        let samples = (0..runs).map(|_| self.time(ctx, work)).collect::<Result<Vec<f64>>>()?;
        Stats::of(&samples).ok_or_else(|| Error::Option("at least one timed run is needed".into()))
    }
}

/// Seconds per run over the timed runs.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "cli", derive(serde::Serialize))]
pub struct Stats {
    /// Median seconds per run.
    pub median_s: f64,
    /// Seconds of the fastest run.
    pub min_s: f64,
    /// Seconds of the slowest run.
    pub max_s: f64,
    /// Number of timed runs.
    pub runs: usize,
}

impl Stats {
    /// Summarises `samples` (seconds); `None` when there are none. The median of an even
    /// count is the mean of the two middle values.
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median_s = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
        Some(Self { median_s, min_s: sorted[0], max_s: sorted[n - 1], runs: n })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_count_takes_the_middle_value() {
        let s = Stats::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!(s, Stats { median_s: 2.0, min_s: 1.0, max_s: 3.0, runs: 3 });
    }

    #[test]
    fn even_count_averages_the_two_middle_values() {
        let s = Stats::of(&[4.0, 1.0, 3.0, 10.0]).unwrap();
        assert_eq!(s, Stats { median_s: 3.5, min_s: 1.0, max_s: 10.0, runs: 4 });
    }

    #[test]
    fn single_and_empty() {
        assert_eq!(Stats::of(&[0.5]).unwrap(), Stats { median_s: 0.5, min_s: 0.5, max_s: 0.5, runs: 1 });
        assert_eq!(Stats::of(&[]), None);
    }
}
