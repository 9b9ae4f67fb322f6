//! The benchmark engine: `wattn bench` and `wattn peak` end to end (their JSON, CSV and SVG),
//! block-sparse sweeps against the dense kernel, split-KV decode against unsplit decode,
//! the validation that guards every timed point, and the GPU timer.

mod common;

use common::ctx;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;
use wattn::bench::decode::{DecodeProblem, DecodeWorkload};
use wattn::bench::prefill::validate;
use wattn::bench::workload::{Pattern, criterion_workloads};
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

/// The fields of one CSV line, unquoted (quotes only wrap fields holding commas here).
fn csv_cells(line: &str) -> Vec<String> {
    let mut cells = vec![String::new()];
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => cells.push(String::new()),
            _ => cells.last_mut().unwrap().push(c),
        }
    }
    cells
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

/// The figures of a measured prefill point with the naive baseline.
const FIGURES: &[&str] = &[
    "flash_median_s",
    "flash_min_s",
    "flash_max_s",
    "flash_flops_per_s",
    "flash_bytes",
    "fraction_of_peak",
    "naive_median_s",
    "naive_min_s",
    "naive_max_s",
    "naive_flops_per_s",
    "naive_bytes",
    "speedup",
    "flops",
];

/// The JSON and CSV hold the same rows: one CSV line per JSON point, the provenance and the
/// run's settings first, then every key of the point with the same value.
fn assert_csv_matches_json(csv: &str, points: &[Value]) {
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 1 + points.len());
    assert!(lines[0].starts_with("wattn_version,date,adapter,backend,device_type,driver,clock,"), "{}", lines[0]);
    let header = csv_cells(lines[0]);
    for (line, point) in lines[1..].iter().zip(points) {
        let cells = csv_cells(line);
        assert_eq!(cells.len(), header.len(), "{line}");
        let point = point.as_object().unwrap();
        let lead = header.len() - point.len();
        let mut columns: Vec<&String> = header[lead..].iter().collect();
        columns.sort(); // as the parsed JSON keeps its keys
        assert!(columns.into_iter().eq(point.keys()), "CSV columns and JSON keys: {header:?}");
        for (key, cell) in header[lead..].iter().zip(&cells[lead..]) {
            let want = match &point[key] {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            match (want.parse::<f64>(), cell.parse::<f64>()) {
                (Ok(a), Ok(b)) => assert!(a == b || (a - b).abs() <= 1e-12 * a.abs(), "{key}: {want} vs {cell}"),
                _ => assert_eq!(&want, cell, "{key}"),
            }
        }
    }
}

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
    let measured: Vec<Value> = points.iter().filter(|p| p["status"] == "measured").cloned().collect();
    assert_eq!(points.len(), 2 * 2 * 2, "2 seqs x 2 dtypes x causal or not");
    assert_eq!(measured.len(), 2 * 2 * dtypes, "{points:#?}");
    for p in &measured {
        assert_eq!(p["validated_against"], "naive");
        assert!(p["max_error"].as_f64().unwrap() <= p["tolerance"].as_f64().unwrap());
        assert!(p["naive_bytes"].as_u64() > p["flash_bytes"].as_u64(), "naive adds the score matrix");
        assert_eq!(p["flash_runs"], 2);
    }
    // Every timing, rate, size and ratio of the measured points and of the peak is positive and finite.
    let checked = assert_positive(&Value::Array(measured.clone()), FIGURES, "points");
    assert_eq!(checked, FIGURES.len() * measured.len(), "a figure is missing");
    assert!(assert_positive(&report["peak"], &["rate", "work", "median_s", "min_s", "max_s"], "peak") >= 15);

    let csv = std::fs::read_to_string(&csv).unwrap();
    assert_csv_matches_json(&csv, points);
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
    assert_eq!(p["validated_against"], "reference");
    assert!(p["naive_median_s"].is_null() && p["naive_skipped"].is_null() && p["speedup"].is_null());
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
fn block_sparse_sweep_reports_speedups_against_the_dense_point() {
    let dir = scratch("sparse");
    let (json, csv, svg) = (dir.join("s.json"), dir.join("s.csv"), dir.join("s.svg"));
    let table = wattn(&[
        "bench",
        "--density",
        "0.1,1.0",
        "--pattern",
        "causal,window,documents",
        "--seq",
        "256",
        "--head-dim",
        "64",
        "--batch",
        "1",
        "--heads",
        "2",
        "--dtype",
        "f32",
        "--no-peak",
        "--runs",
        "1",
        "--json",
        json.to_str().unwrap(),
        "--csv",
        csv.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(
        table.contains("block-sparse") && table.contains("sparse random 0.1") && table.contains("of ideal"),
        "{table}"
    );

    let report = read_json(&json);
    let points = report["points"].as_array().unwrap();
    assert_eq!(points.len(), 1 + 5, "the dense point and five block-sparse ones: {points:#?}");
    let dense = &points[0];
    assert!(dense["block_pattern"].is_null() && !dense["causal"].as_bool().unwrap(), "{dense:#}");
    assert_eq!(dense["validated_against"], "naive", "the dense point keeps its naive baseline");
    let dense_s = dense["flash_median_s"].as_f64().unwrap();
    let block = [&report["flash_config"]["block_q"], &report["flash_config"]["block_k"]].map(|v| v.as_u64().unwrap());
    let q_blocks = 256u64.div_ceil(block[0]) as f64;
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs();
    let mut patterns = Vec::new();
    for p in &points[1..] {
        assert_eq!(p["status"], "measured", "{p:#}");
        patterns.push(p["block_pattern"].as_str().unwrap().to_owned());
        assert_eq!([&p["block_q"], &p["block_k"]].map(|v| v.as_u64().unwrap()), block, "{p:#}");
        let density = p["block_density"].as_f64().unwrap();
        assert!(density > 0.0 && density <= 1.0, "{p:#}");
        match (p["block_pattern"].as_str().unwrap(), p["block_requested_density"].as_f64()) {
            ("random", Some(1.0)) => assert_eq!(density, 1.0),
            ("random", Some(d)) => assert!((d / 2.0..d * 3.0).contains(&density), "{p:#}"),
            // Square causal: the blocks on and below the diagonal.
            ("causal", None) => assert!(close(density, (q_blocks + 1.0) / (2.0 * q_blocks)), "{p:#}"),
            ("window" | "documents", None) => assert!(density < 0.5, "{p:#}"),
            other => panic!("unexpected pattern {other:?}"),
        }
        // Checked against the f64 reference with its mask (the naive path takes none), then timed.
        assert_eq!(p["validated_against"], "reference");
        assert!(p["max_error"].as_f64().unwrap() <= p["tolerance"].as_f64().unwrap());
        assert!(p["naive_median_s"].is_null() && p["speedup"].is_null());
        assert!(close(p["flops"].as_f64().unwrap(), dense["flops"].as_f64().unwrap() * density), "{p:#}");
        let own_s = p["flash_median_s"].as_f64().unwrap();
        let ideal = p["ideal_speedup"].as_f64().unwrap();
        let speedup = p["speedup_vs_dense"].as_f64().unwrap();
        assert!(close(ideal, 1.0 / density) && close(p["dense_median_s"].as_f64().unwrap(), dense_s), "{p:#}");
        assert!(close(speedup, dense_s / own_s), "{p:#}");
        assert!(close(p["fraction_of_ideal"].as_f64().unwrap(), speedup / ideal), "{p:#}");
    }
    patterns.sort();
    assert_eq!(patterns, ["causal", "documents", "random", "random", "window"]);

    let csv = std::fs::read_to_string(&csv).unwrap();
    assert_csv_matches_json(&csv, points);
    let lines: Vec<&str> = csv.lines().collect();
    let header = csv_cells(lines[0]);
    let column = |name: &str| header.iter().position(|h| h == name).unwrap_or_else(|| panic!("no column {name}"));
    for line in &lines[2..] {
        assert!(csv_cells(line)[column("speedup_vs_dense")].parse::<f64>().unwrap() > 0.0, "{line}");
    }
    assert_eq!(csv_cells(lines[1])[column("block_pattern")], "", "the dense row has no pattern");
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.contains("block density") && svg.contains("speed-up over the dense kernel"), "{svg}");
    // Axes, random, its ideal, and one per structured pattern.
    assert_eq!(svg.matches("<polyline").count(), 1 + 2 + 3);

    // Block-sparse points need the dense kernel's point to compare with.
    let refused = |args: &[&str], expect: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_wattn")).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(expect), "{args:?}: {stderr}");
    };
    refused(&["bench", "--density", "0.5", "--causal", "true"], "measured against the dense kernel");
    refused(&["bench", "--density", "0"], "(0, 1]");
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
        "1024,16,4,4,1",
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

#[test]
fn backward_bench_times_forward_backward_and_naive_backward_with_flash_attention_accounting() {
    let dir = scratch("backward");
    let (json, csv, svg) = (dir.join("b.json"), dir.join("b.csv"), dir.join("b.svg"));
    #[rustfmt::skip]
    let table = wattn(&[
        "bench", "--backward", "--seq", "96,200", "--head-dim", "32", "--heads", "2", "--batch", "1",
        "--dtype", "f32", "--causal", "both", "--runs", "2",
        "--json", json.to_str().unwrap(), "--csv", csv.to_str().unwrap(), "--plot", svg.to_str().unwrap(),
    ]);
    assert!(table.contains("bwd/fwd") && table.contains("2.5 x forward") && table.contains("speed-up"), "{table}");
    let report = read_json(&json);
    assert_provenance(&report);
    assert_eq!(report["backward_flops_per_forward"], 2.5);
    let rows = report["points"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "a row per length and causality: {rows:#?}");
    for row in rows {
        assert_eq!(row["status"], "measured", "{row:#}");
        assert!(row["max_error"].as_f64().unwrap() <= 1e-4, "{row}");
        let figures = [
            "forward_median_s",
            "backward_median_s",
            "backward_over_forward",
            "forward_flops_per_s",
            "backward_flops_per_s",
            "backward_fraction_of_peak",
            "naive_median_s",
            "speedup",
            "naive_bytes",
        ];
        assert_eq!(assert_positive(row, &figures, "point"), figures.len(), "{row}");
        assert!(row["naive_skipped"].is_null(), "{row}");
        let per_s = |key: &str| row[key].as_f64().unwrap();
        let (forward, backward) = (per_s("forward_median_s"), per_s("backward_median_s"));
        assert!((per_s("backward_over_forward") - backward / forward).abs() < 1e-9);
        assert!((per_s("speedup") - per_s("naive_median_s") / backward).abs() < 1e-9, "{row}");
        // The naive backward's P and dS: two f32 matrices of 2 heads x seq x seq.
        let seq = per_s("seq");
        assert!(per_s("naive_bytes") >= 2.0 * 2.0 * seq * seq * 4.0, "{row}");
        let accounting = per_s("backward_flops_per_s") * backward / (per_s("forward_flops_per_s") * forward);
        assert!((accounting - 2.5).abs() < 1e-9, "the backward counts 2.5 forwards: {row}");
    }
    assert_csv_matches_json(&std::fs::read_to_string(&csv).unwrap(), rows);
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 1 + 4, "axes + forward and backward per series");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn decode_bench_times_split_settings_against_the_unsplit_kernel() {
    let dir = scratch("decode");
    let (json, csv, svg) = (dir.join("d.json"), dir.join("d.csv"), dir.join("d.svg"));
    // 3 keys are less than a tile (at least one step of 4 keys): 3 splits resolve to the unsplit plan there.
    #[rustfmt::skip]
    let table = wattn(&[
        "bench", "--decode", "--quick", "--seq", "3,200,700", "--head-dim", "48", "--heads", "6", "--kv-heads", "2",
        "--queries", "2", "--splits", "1,3,auto", "--runs", "2",
        "--json", json.to_str().unwrap(), "--csv", csv.to_str().unwrap(), "--plot", svg.to_str().unwrap(),
    ]);
    assert!(table.contains("f32 d48 6/2 heads") && table.contains("auto ("), "{table}");

    let report = read_json(&json);
    assert_provenance(&report);
    let rows = report["points"].as_array().unwrap();
    assert_eq!(rows.len(), 3 * 3, "a row per point and split setting: {rows:#?}");
    for (settings, cache_len) in rows.chunks(3).zip([3, 200, 700]) {
        let requested: Vec<&Value> = settings.iter().map(|s| &s["requested_splits"]).collect();
        assert_eq!(requested, [&Value::from(1), &Value::from(3), &Value::Null]);
        let unsplit = &settings[0];
        assert_eq!((unsplit["splits"].as_u64(), unsplit["speedup_vs_unsplit"].as_f64()), (Some(1), Some(1.0)));
        let expected_splits = if cache_len == 3 { 1 } else { 3 };
        assert_eq!(settings[1]["splits"], expected_splits, "a request stands up to one split per tile of keys");
        for s in settings {
            assert_eq!(s["status"], "measured", "{s:#}");
            assert_eq!((s["cache_len"].as_u64(), s["queries"].as_u64()), (Some(cache_len), Some(2)));
            assert_eq!(s["kv_bytes"].as_u64(), Some(2 * 2 * cache_len * 48 * 4), "K and V of 2 KV heads, f32");
            assert!(s["max_error"].as_f64().unwrap() <= s["tolerance"].as_f64().unwrap(), "{s}");
            let bytes_per_s = s["bytes_per_s"].as_f64().unwrap();
            let median = s["median_s"].as_f64().unwrap();
            assert!((bytes_per_s * median / s["kv_bytes"].as_f64().unwrap() - 1.0).abs() < 1e-9, "{s}");
            let mut figures = vec!["median_s", "min_s", "max_s", "bytes_per_s", "fraction_of_copy", "kv_bytes"];
            // One split is one plan: another setting that makes it is no speed-up, whatever its time.
            if s == unsplit {
                assert!(s["same_plan_as"].is_null(), "{s}");
            } else if s["splits"] == 1 {
                assert_eq!(s["same_plan_as"], "1", "{s}");
                assert!(s["speedup_vs_unsplit"].is_null(), "a ratio of one plan's timings: {s}");
            } else {
                figures.push("speedup_vs_unsplit");
            }
            assert_eq!(assert_positive(s, &figures, "setting"), figures.len(), "{s}");
        }
    }
    let same_plan = |setting: &str| {
        let line = table.lines().find(|l| l.contains(" 3 ") && l.contains(&format!(" {setting} "))).unwrap();
        line.contains("same plan as 1") && !line.contains('x')
    };
    assert!(same_plan("3 (1)") && same_plan("auto (1)"), "{table}");

    let csv = std::fs::read_to_string(&csv).unwrap();
    assert_csv_matches_json(&csv, rows);
    let lines: Vec<&str> = csv.lines().collect();
    let header = csv_cells(lines[0]);
    let column = |name: &str| header.iter().position(|h| h == name).unwrap();
    for line in &lines[1..] {
        assert!(csv_cells(line)[column("peak_copy_bytes_per_s")].parse::<f64>().unwrap() > 0.0);
    }
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 1 + 3, "axes + one line per split setting");
    assert!(svg.contains("cache length") && svg.contains("GB/s"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn decode_validation_catches_a_wrong_output() {
    let ctx = ctx();
    let w =
        DecodeWorkload { dtype: DType::F32, batch: 2, heads: 4, kv_heads: 2, head_dim: 32, queries: 3, cache_len: 300 };
    let mut problem = DecodeProblem::upload(ctx, &w).unwrap();
    for splits in [Some(1), Some(4), None] {
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        problem.record(ctx, &mut encoder, splits).unwrap();
        ctx.submit_and_wait(encoder).unwrap();
        let v = problem.validate(ctx).unwrap();
        assert!(v.passed(), "splits {splits:?}: {v:?}");
    }
    // The last output element belongs to the last head's last query, which is checked.
    let offset = (problem.out.numel() as u64 - 1) * 4;
    ctx.queue().write_buffer(problem.out.buffer(), offset, &7.0f32.to_le_bytes());
    assert!(!problem.validate(ctx).unwrap().passed(), "a corrupted output passed");
}

#[test]
fn decode_flags_are_refused_without_decode_and_prefill_flags_with_it() {
    for args in [
        &["bench", "--splits", "2"][..],
        &["bench", "--queries", "2"],
        &["bench", "--decode", "--density", "0.1"],
        &["bench", "--decode", "--causal", "true"],
        &["bench", "--decode", "--splits", "0"],
        &["bench", "--decode", "--quick", "--heads", "6", "--kv-heads", "4", "--no-peak"],
        &["bench", "--decode", "--quick", "--seq", "4", "--queries", "8", "--no-peak"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_wattn")).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("error"), "{args:?} was accepted:\n{stderr}");
    }
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
fn validation_catches_a_wrong_block_sparse_output() {
    let ctx = ctx();
    let block = FlashConfig::for_adapter(ctx).block_size();
    let dense = Workload::new(1, 2, 2, 100, 32, DType::F32, AttentionOptions::default());
    for pattern in [Pattern::Random(0.3), Pattern::Documents] {
        let workload = dense.block_sparse(pattern, block).unwrap();
        let problem = Problem::upload(ctx, &workload).unwrap();
        assert!(problem.alloc(ctx, Path::Naive).is_err(), "the naive path takes no block mask");
        let flash = run_once(&problem, Path::Flash);
        let v = validate(ctx, &problem, &flash, None).unwrap();
        assert!(v.passed(), "{pattern:?} {v:?}");
        // The same output does not pass as the dense problem's: the mask is part of the check.
        let unmasked = Problem::upload(ctx, &dense).unwrap();
        assert!(!validate(ctx, &unmasked, &flash, None).unwrap().passed(), "{pattern:?}");
        corrupt_last_row(&problem, &flash);
        assert!(!validate(ctx, &problem, &flash, None).unwrap().passed(), "{pattern:?}: a corrupted output passed");
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

/// `wattn bench --serve`: every path timed (the paged output checked against the per-request
/// launches first), and int8's bytes per token against f16.
#[test]
fn serve_bench_times_paged_against_padded_and_per_request() {
    let table = wattn(&["bench", "--serve", "--requests", "5", "--max-len", "300", "--runs", "1", "--warmup", "0"]);
    for path in
        ["| per request | 5 |", "| paged | 1 |", "| paged int8 | 1 |", "| paged int8 K/ch | 1 |", "| padded | 1 |"]
    {
        assert!(table.contains(path), "{path} missing:\n{table}");
    }
    assert!(table.contains("int8 KV bytes per token: 0.516x f16"), "{table}");
    let out = Command::new(env!("CARGO_BIN_EXE_wattn")).args(["bench", "--serve", "--plot", "x.svg"]).output().unwrap();
    assert!(!out.status.success(), "--serve draws no chart, so it refuses --plot");
}

/// `wattn bench --serve --json --csv`: a row per path in both, with the settings and int8's
/// memory ratio.
#[test]
fn serve_bench_writes_json_and_csv() {
    let dir = scratch("serve");
    let (json, csv) = (dir.join("serve.json"), dir.join("serve.csv"));
    let (json_arg, csv_arg) = (json.to_str().unwrap(), csv.to_str().unwrap());
    let args = ["bench", "--serve", "--requests", "3", "--max-len", "200", "--runs", "1", "--warmup", "0"];
    wattn(&[&args[..], &["--json", json_arg, "--csv", csv_arg]].concat());
    let report = read_json(&json);
    assert_eq!(report["settings"]["requests"], 3);
    assert!((report["int8_bytes_vs_f16"].as_f64().unwrap() - 0.516).abs() < 1e-3, "{report}");
    assert!((report["int8_channel_k_bytes_vs_f16"].as_f64().unwrap() - 0.531).abs() < 1e-3, "{report}");
    let points = report["points"].as_array().unwrap();
    let paths: Vec<&str> = points.iter().map(|p| p["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["per request", "paged", "paged int8", "paged int8 K/ch", "padded"]);
    assert!(points.iter().all(|p| p["tokens_per_s"].as_f64().unwrap() > 0.0), "{report}");
    let text = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "a header and a line per path:\n{text}");
    assert!(lines[0].contains("requests") && lines[0].contains("vs_per_request"), "{}", lines[0]);
}

/// `wattn bench --varlen`: the three prefill paths timed (the varlen output checked against
/// the per-prompt launches first), forward only and (--backward) forward and backward;
/// --requests alone is refused.
#[test]
fn varlen_bench_times_one_launch_against_padded_and_per_request() {
    let args = ["bench", "--varlen", "--requests", "4", "--max-len", "200", "--head-dim", "32", "--runs", "1"];
    let steps: [&[&str]; 2] = [&[], &["--backward"]];
    for training in steps {
        let table = wattn(&[&args[..], &["--warmup", "0"], training].concat());
        for path in ["| per request | 4 |", "| varlen | 1 |", "| padded | 1 |"] {
            assert!(table.contains(path), "{training:?}: {path} missing:\n{table}");
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_wattn")).args(["bench", "--requests", "4"]).output().unwrap();
    assert!(!out.status.success(), "--requests without --serve or --varlen");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--requests and --max-len go with --serve or --varlen"));
}
