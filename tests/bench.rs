//! The benchmark runner: `wattn bench` and `wattn peak` end to end (their JSON, CSV and SVG),
//! the validation that guards every timed point, and the GPU timer.

mod common;

use common::ctx;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;
use wattn::bench::runner::validate;
use wattn::bench::workload::criterion_workloads;
use wattn::bench::{Clock, Path, Problem, Timer, Workload};
use wattn::{AttentionOptions, DType, FlashConfig};

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wattn-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs the `wattn` binary; panics with its output unless it succeeds.
fn wattn(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_wattn")).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "wattn {args:?} failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    text
}

fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every number under `value` (recursively) whose key is in `keys` must be finite and > 0.
fn assert_positive(value: &Value, keys: &[&str], at: &str) -> usize {
    match value {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                if keys.contains(&k.as_str()) {
                    let x = v.as_f64().unwrap_or_else(|| panic!("{at}.{k} is not a number: {v}"));
                    assert!(x.is_finite() && x > 0.0, "{at}.{k} = {x}");
                }
                assert_positive(v, keys, &format!("{at}.{k}")) + usize::from(keys.contains(&k.as_str()))
            })
            .sum(),
        Value::Array(items) => {
            items.iter().enumerate().map(|(i, v)| assert_positive(v, keys, &format!("{at}[{i}]"))).sum()
        }
        _ => 0,
    }
}

const FIGURES: &[&str] =
    &["median_s", "min_s", "max_s", "flops_per_s", "bytes", "fraction_of_peak", "speedup", "flops", "rate", "work"];

fn assert_provenance(report: &Value) {
    assert_eq!(report["wattn_version"], env!("CARGO_PKG_VERSION"));
    let date = report["date"].as_str().unwrap();
    assert!(date.len() == 20 && date.ends_with('Z') && date.as_bytes()[10] == b'T', "date {date}");
    for key in ["name", "backend", "device_type", "driver"] {
        assert!(report["adapter"][key].is_string(), "adapter.{key} missing");
    }
    assert!(["gpu_timestamps", "wall_clock"].contains(&report["clock"].as_str().unwrap()));
}

#[test]
fn quick_bench_writes_json_csv_and_plot_with_positive_figures() {
    let dir = scratch("quick");
    let (json, csv, svg) = (dir.join("b.json"), dir.join("b.csv"), dir.join("b.svg"));
    let table = wattn(&[
        "bench",
        "--quick",
        "--seq",
        "64,128",
        "--runs",
        "2",
        "--json",
        json.to_str().unwrap(),
        "--csv",
        csv.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(table.contains("f16 d64 causal") || table.contains("f32 d64 causal"), "{table}");

    let report = read_json(&json);
    assert_provenance(&report);
    assert_eq!(report["runs"], 2);
    assert!(report["flash_config"]["block_q"].as_u64().unwrap() > 0);
    let points = report["points"].as_array().unwrap();
    let dtypes = if ctx().capabilities().shader_f16 { 2 } else { 1 };
    let measured: Vec<&Value> = points.iter().filter(|p| p["status"] == "measured").collect();
    assert_eq!(points.len(), 2 * 2 * 2, "2 seqs x 2 dtypes x causal or not");
    assert_eq!(measured.len(), 2 * 2 * dtypes, "{points:#?}");
    for p in &measured {
        assert_eq!(p["validation"]["against"], "naive");
        let v = &p["validation"];
        assert!(v["max_error"].as_f64().unwrap() <= v["tolerance"].as_f64().unwrap());
        assert!(p["naive"]["bytes"].as_u64() > p["flash"]["bytes"].as_u64(), "naive adds the score matrix");
        assert!(p["speedup"].as_f64().is_some() && p["fraction_of_peak"].as_f64().is_some());
    }
    // Every timing, rate, size and ratio, of the points and of the peak, is positive and finite.
    let checked = assert_positive(&report, FIGURES, "report");
    assert!(checked >= 13 * measured.len() + 15, "only {checked} figures found");

    let csv = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 1 + points.len());
    assert!(lines[0].starts_with("wattn_version,date,adapter,"));
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 1 + 2 * dtypes, "axes + one line per series");
    assert!(svg.contains("sequence length") && svg.contains("FLOP/s"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn without_naive_points_are_checked_against_the_reference_and_budget_caps_are_recorded() {
    let dir = scratch("reference");
    let json = dir.join("r.json");
    wattn(&[
        "bench",
        "--seq",
        "96",
        "--head-dim",
        "40",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--batch",
        "2",
        "--dtype",
        "f32",
        "--causal",
        "true",
        "--window",
        "20,0",
        "--no-naive",
        "--no-peak",
        "--runs",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    let report = read_json(&json);
    let p = &report["points"][0];
    assert_eq!(p["status"], "measured", "{p:#}");
    assert_eq!(p["validation"]["against"], "reference");
    assert!(p["naive"].is_null() && p["naive_skipped"].is_null() && p["speedup"].is_null());
    assert!(report["peak"].is_null() && p["fraction_of_peak"].is_null());
    let expected = Workload::new(
        2,
        4,
        2,
        96,
        40,
        DType::F32,
        AttentionOptions { causal: true, window: (20, 0), ..Default::default() },
    );
    assert_eq!(p["flops"].as_f64().unwrap(), expected.flops());
    assert_eq!(p["kv_heads"], 2);

    wattn(&[
        "bench",
        "--quick",
        "--seq",
        "128",
        "--dtype",
        "f32",
        "--no-peak",
        "--budget",
        "0.001",
        "--json",
        json.to_str().unwrap(),
    ]);
    for p in read_json(&json)["points"].as_array().unwrap() {
        assert_eq!(p["status"], "capped", "{p:#}");
        assert!(p["estimated_s"].as_f64().unwrap() > p["left_s"].as_f64().unwrap(), "{p:#}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_point_over_a_limit_is_recorded_and_the_run_goes_on() {
    let dir = scratch("limit");
    let json = dir.join("l.json");
    // 1024 query rows x 4 threads each is past every adapter's workgroup limit.
    let table = wattn(&[
        "bench",
        "--quick",
        "--seq",
        "64,128",
        "--dtype",
        "f32",
        "--causal",
        "false",
        "--no-peak",
        "--config",
        "1024,16,4,64",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(table.contains("failed:"), "{table}");
    let points = read_json(&json)["points"].as_array().unwrap().clone();
    assert_eq!(points.len(), 2);
    for p in &points {
        assert_eq!(p["status"], "failed");
        assert!(p["reason"].as_str().unwrap().contains("workgroup"), "{p:#}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn peak_reports_positive_ceilings() {
    let dir = scratch("peak");
    let json = dir.join("p.json");
    let table = wattn(&["peak", "--runs", "2", "--json", json.to_str().unwrap()]);
    assert!(table.contains("f32 FMA") && table.contains("copy"), "{table}");
    let report = read_json(&json);
    assert_provenance(&report);
    assert_eq!(report["peak"]["fma_f16"].is_object(), ctx().capabilities().shader_f16);
    assert!(assert_positive(&report["peak"], &["rate", "work", "median_s", "min_s", "max_s"], "peak") >= 10);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Runs `path` once on `problem` and returns its buffers.
fn run_once(problem: &Problem, path: Path) -> wattn::bench::workload::PathBuffers {
    let ctx = ctx();
    let bufs = problem.alloc(ctx, path).unwrap();
    let config = FlashConfig::for_adapter(ctx);
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    problem.record(ctx, &bufs, &config, &mut encoder).unwrap();
    ctx.submit_and_wait(encoder).unwrap();
    bufs
}

/// Overwrites one element of the last query row of the last head of `bufs.out`.
fn corrupt_last_row(problem: &Problem, bufs: &wattn::bench::workload::PathBuffers) {
    let elem = problem.workload.dtype.size() as u64;
    let offset = (bufs.out.numel() as u64 - 1) * elem / 4 * 4;
    ctx().queue().write_buffer(bufs.out.buffer(), offset, &[0x55; 4]);
}

#[test]
fn validation_catches_a_wrong_output_against_either_baseline() {
    let ctx = ctx();
    for dtype in [DType::F32, DType::F16] {
        if dtype == DType::F16 && !ctx.capabilities().shader_f16 {
            continue;
        }
        let options = AttentionOptions::causal();
        let problem = Problem::upload(ctx, &Workload::new(1, 2, 1, 70, 24, dtype, options)).unwrap();
        let flash = run_once(&problem, Path::Flash);
        let naive = run_once(&problem, Path::Naive);
        for baseline in [Some(&naive), None] {
            let v = validate(ctx, &problem, &flash, baseline).unwrap();
            assert!(v.passed(), "{dtype} {v:?}");
        }
        corrupt_last_row(&problem, &flash);
        for baseline in [Some(&naive), None] {
            let v = validate(ctx, &problem, &flash, baseline).unwrap();
            assert!(!v.passed(), "{dtype}: a corrupted output passed against {}: {v:?}", v.against);
        }
    }
}

#[test]
fn gpu_time_is_positive_and_within_the_wall_time_around_it() {
    let ctx = ctx();
    let timer = Timer::new(ctx);
    assert_eq!(timer.clock() == Clock::GpuTimestamps, ctx.capabilities().timestamps);
    let problem = Problem::upload(ctx, &criterion_workloads()[0]).unwrap();
    let bufs = problem.alloc(ctx, Path::Flash).unwrap();
    let config = FlashConfig::for_adapter(ctx);
    let mut work = |e: &mut wgpu::CommandEncoder| problem.record(ctx, &bufs, &config, e);
    timer.time(ctx, &mut work).unwrap();
    let start = Instant::now();
    let seconds = timer.time(ctx, &mut work).unwrap();
    let wall = start.elapsed().as_secs_f64();
    assert!(seconds > 0.0 && seconds <= wall, "timer says {seconds} s, wall clock {wall} s");
}
