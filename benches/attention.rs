//! Criterion benchmarks of the flash kernel and the naive baseline on the small shapes of
//! `wattn::bench::workload::criterion_workloads`, of the flash forward and backward on the
//! same shapes, and of decode unsplit and with automatic splits, with the workloads, the
//! validation and the GPU timer of `wattn bench`. Throughput is reported in attention FLOPs
//! ("elements") for attention (the backward's counted as 2.5 forwards, as FlashAttention
//! does) and in bytes of K and V read for decode.

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use std::time::Duration;
use wattn::bench::backward::{self, BACKWARD_FLOPS_PER_FORWARD, BackwardProblem};
use wattn::bench::decode::{DecodeProblem, DecodeWorkload};
use wattn::bench::prefill::validate;
use wattn::bench::workload::{PathBuffers, criterion_workloads};
use wattn::bench::{Path, Problem, Timer};
use wattn::{Context, DType, FlashConfig};

fn context() -> Context {
    Context::new().unwrap_or_else(|e| {
        panic!("the benchmarks need an adapter: {e}\nInstall one with `sudo apt-get install -y mesa-vulkan-drivers`.")
    })
}

fn attention(c: &mut Criterion) {
    let ctx = context();
    let timer = Timer::new(&ctx);
    let config = FlashConfig::for_adapter(&ctx);
    eprintln!("benchmarking on {}, timed by {}", ctx.describe(), timer.clock().describe());
    let mut group = c.benchmark_group("attention");
    group.sampling_mode(SamplingMode::Flat);
    for workload in criterion_workloads() {
        let problem = Problem::upload(&ctx, &workload).unwrap();
        let run = |path| {
            let bufs = problem.alloc(&ctx, path).unwrap();
            timer.time(&ctx, &mut |e| problem.record(&ctx, &bufs, &config, e)).unwrap();
            bufs
        };
        let (flash, naive) = (run(Path::Flash), run(Path::Naive));
        let validation = validate(&ctx, &problem, &flash, Some(&naive)).unwrap();
        assert!(validation.passed(), "{} seq {}: {validation:?}", workload.series(), workload.shape.n_q);
        group.throughput(Throughput::Elements(workload.flops() as u64));
        for bufs in [&flash, &naive] {
            let name = format!("{:?} {} seq {}", bufs.path(), workload.series(), workload.shape.n_q).to_lowercase();
            group.bench_function(name, |b| {
                b.iter_custom(|iters| time_runs(&ctx, &timer, &problem, bufs, &config, iters))
            });
        }
    }
    group.finish();
}

/// The forward and the backward of each criterion workload, on the same inputs.
fn attention_backward(c: &mut Criterion) {
    let ctx = context();
    let timer = Timer::new(&ctx);
    let mut group = c.benchmark_group("backward");
    group.sampling_mode(SamplingMode::Flat);
    for workload in criterion_workloads() {
        let (validation, _) = backward::validate(&ctx, &workload, false).unwrap();
        assert!(validation.passed(), "backward {} seq {}: {validation:?}", workload.series(), workload.shape.n_q);
        let problem = BackwardProblem::upload(&ctx, &workload).unwrap();
        timer.time(&ctx, &mut |e| problem.record_forward(&ctx, e)).unwrap();
        let label = format!("{} seq {}", workload.series(), workload.shape.n_q);
        group.throughput(Throughput::Elements(workload.flops() as u64));
        group.bench_function(format!("forward {label}"), |b| {
            b.iter_custom(|iters| summed(iters, || timer.time(&ctx, &mut |e| problem.record_forward(&ctx, e)).unwrap()))
        });
        group.throughput(Throughput::Elements((BACKWARD_FLOPS_PER_FORWARD * workload.flops()) as u64));
        group.bench_function(format!("backward {label}"), |b| {
            b.iter_custom(|iters| {
                summed(iters, || timer.time(&ctx, &mut |e| problem.record_backward(&ctx, e)).unwrap())
            })
        });
    }
    group.finish();
}

/// The sum of `iters` runs' seconds, as criterion takes it.
fn summed(iters: u64, mut run: impl FnMut() -> f64) -> Duration {
    Duration::from_secs_f64((0..iters).map(|_| run()).sum())
}

/// One decode step of 8 query / 2 KV heads against a 4K-token cache, unsplit and with
/// automatic splits.
fn decode(c: &mut Criterion) {
    let ctx = context();
    let timer = Timer::new(&ctx);
    let w = DecodeWorkload {
        dtype: DType::F32,
        batch: 1,
        heads: 8,
        kv_heads: 2,
        head_dim: 128,
        queries: 1,
        cache_len: 4096,
    };
    let mut problem = DecodeProblem::upload(&ctx, &w).unwrap();
    let mut group = c.benchmark_group("decode");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Bytes(w.kv_bytes()));
    for splits in [Some(1), None] {
        timer.time(&ctx, &mut |e| problem.record(&ctx, e, splits)).unwrap();
        let validation = problem.validate(&ctx).unwrap();
        assert!(validation.passed(), "decode splits {splits:?}: {validation:?}");
        let setting = splits.map_or("auto".into(), |n| n.to_string());
        group.bench_function(format!("{} cache {} splits {setting}", w.series(), w.cache_len), |b| {
            b.iter_custom(|iters| {
                let seconds: f64 =
                    (0..iters).map(|_| timer.time(&ctx, &mut |e| problem.record(&ctx, e, splits)).unwrap()).sum();
                Duration::from_secs_f64(seconds)
            })
        });
    }
    group.finish();
}

/// The summed GPU (or wall) time of `iters` runs.
fn time_runs(
    ctx: &Context,
    timer: &Timer,
    problem: &Problem,
    bufs: &PathBuffers,
    config: &FlashConfig,
    iters: u64,
) -> Duration {
    let seconds: f64 =
        (0..iters).map(|_| timer.time(ctx, &mut |e| problem.record(ctx, bufs, config, e)).unwrap()).sum();
    Duration::from_secs_f64(seconds)
}

criterion_group! {
    name = benches;
    // Small samples: the whole suite runs in a couple of minutes on a software adapter.
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = attention, attention_backward, decode
}
criterion_main!(benches);
