//! `wattn stream` end to end on a tiny model: its JSON, table and plot, the policies, policy
//! none stopping cleanly at a full cache, and bad flags refused with one line.

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};

/// A tiny model: 4 sinks + 28 window over 300 steps, 4 query / 2 KV heads of dim 32.
const TINY: &[&str] = &["--sinks", "4", "--window", "28", "--heads", "4", "--kv-heads", "2", "--head-dim", "32"];

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wattn-stream-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn wattn_stream(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wattn")).arg("stream").args(args).output().expect("running the wattn binary")
}

/// The tiny model's flags, each replaced by its value in `args`, then the rest of `args`
/// (clap refuses a flag given twice).
fn tiny_with<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut all = Vec::new();
    for pair in TINY.chunks(2) {
        let given = args.iter().position(|a| *a == pair[0]);
        all.extend_from_slice(given.map_or(pair, |i| &args[i..i + 2]));
    }
    let mut rest = args.iter().copied();
    while let Some(arg) = rest.next() {
        match TINY.contains(&arg) && arg.starts_with("--") {
            true => drop(rest.next()),
            false => all.push(arg),
        }
    }
    all
}

/// Runs `wattn stream` with the tiny model, `args` and `--json`, and returns (stdout, JSON);
/// panics with its output unless it succeeds.
fn run_ok(name: &str, args: &[&str]) -> (String, Value) {
    let json = scratch(name).join("s.json");
    let mut all = tiny_with(args);
    all.extend_from_slice(&["--json", json.to_str().unwrap()]);
    let out = wattn_stream(&all);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "wattn stream {all:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    (stdout, serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap())
}

fn number(value: &Value, at: &str) -> f64 {
    value.as_f64().unwrap_or_else(|| panic!("{at} is not a number: {value}"))
}

/// The spec columns every run row and every bucket row of a run carry.
const SPEC: [&str; 13] = [
    "policy",
    "sinks",
    "recent",
    "capacity",
    "layers",
    "batch",
    "q_heads",
    "kv_heads",
    "head_dim",
    "dtype",
    "positions",
    "rope_base",
    "requested_splits",
];

/// Checks run `index` of the JSON: its buckets (the points carrying its label and spec) tile
/// positions 0..steps_run in order, with positive finite figures and cache lengths as the
/// capacity allows, and its headline; returns the memory of each bucket.
fn check_run(json: &Value, index: usize, report_every: u64) -> Vec<u64> {
    let run = &json["runs"][index];
    let label = run["run"].as_str().unwrap();
    let capacity = run["capacity"].as_u64().unwrap();
    let steps_run = run["steps_run"].as_u64().unwrap();
    let buckets: Vec<&Value> = json["points"].as_array().unwrap().iter().filter(|b| b["run"] == label).collect();
    assert_eq!(buckets.len() as u64, steps_run.div_ceil(report_every), "{label}: bucket count");
    for b in &buckets {
        assert!(SPEC.iter().all(|k| b[k] == run[k]), "{label}: a bucket's spec differs from its run's: {b}");
    }
    let mut next = 0;
    let mut memory = Vec::new();
    for (i, b) in buckets.iter().enumerate() {
        let at = format!("{label} bucket {i}");
        let (first, last) = (b["first_position"].as_u64().unwrap(), b["last_position"].as_u64().unwrap());
        assert_eq!(first, next, "{at}: buckets must follow each other");
        assert_eq!(last, (first + report_every).min(steps_run) - 1, "{at}: last position");
        next = last + 1;
        let [median, min, max] = ["median_s", "min_s", "max_s"].map(|k| number(&b[k], &format!("{at} {k}")));
        assert!(min.is_finite() && min > 0.0 && min <= median && median <= max && max.is_finite(), "{at}: {b}");
        assert_eq!(b["runs"].as_u64().unwrap(), last - first + 1, "{at}: steps in the bucket");
        assert_eq!(b["cache_len"].as_u64().unwrap(), (last + 1).min(capacity), "{at}: cache length");
        assert!(b["splits"].as_u64().unwrap() >= 1, "{at}: splits");
        memory.push(b["memory_bytes"].as_u64().filter(|&m| m > 0).unwrap_or_else(|| panic!("{at}: memory")));
    }
    assert_eq!(next, steps_run, "{label}: buckets must cover every step");
    let ratio = number(&run["end_over_reference"], "end_over_reference");
    assert!(ratio.is_finite() && ratio > 0.0, "{label}: ratio {ratio}");
    assert_eq!(run["end_last_position"].as_u64().unwrap(), steps_run - 1, "{label}: headline end");
    assert_eq!(run["memory_bytes_at_end"].as_u64().unwrap(), *memory.last().unwrap(), "{label}: memory at the end");
    memory
}

#[test]
fn streaming_reports_buckets_headline_and_constant_memory() {
    let dir = scratch("plot");
    let (svg, csv) = (dir.join("s.svg"), dir.join("s.csv"));
    #[rustfmt::skip]
    let (stdout, json) = run_ok(
        "streaming",
        &["--steps", "300", "--report-every", "25", "--plot", svg.to_str().unwrap(), "--csv", csv.to_str().unwrap()],
    );
    assert_eq!(json["wattn_version"], env!("CARGO_PKG_VERSION"));
    let date = json["date"].as_str().unwrap();
    assert!(date.len() == 20 && date.ends_with('Z') && date.as_bytes()[10] == b'T', "date {date}");
    for key in ["name", "backend", "device_type", "driver"] {
        assert!(json["adapter"][key].is_string(), "adapter.{key} missing");
    }
    assert_eq!(json["clock"], "wall_clock");
    assert_eq!(json["report_every"], 25);
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    for (key, want) in
        [("sinks", 4), ("recent", 28), ("capacity", 32), ("q_heads", 4), ("kv_heads", 2), ("head_dim", 32)]
    {
        assert_eq!(run[key], want, "{key}");
    }
    assert_eq!(run["policy"], "streaming");
    assert_eq!(run["positions"], "absolute");
    assert!(run["requested_splits"].is_null(), "splits are automatic by default");
    assert_eq!((run["steps_requested"].as_u64(), run["steps_run"].as_u64()), (Some(300), Some(300)));
    assert!(run["stopped_position"].is_null() && run["stopped_reason"].is_null());

    let memory = check_run(&json, 0, 25);
    // The cache fills at position 31; from the next bucket on nothing may grow.
    assert_eq!(run["cache_full_at"], 31);
    assert_eq!(run["memory_constant"], true);
    assert!(memory[2..].iter().all(|&m| m == memory[1]), "memory changed while streaming: {memory:?}");
    assert!(
        run["reference_first_position"].as_u64().unwrap() <= 149
            && run["reference_last_position"].as_u64().unwrap() >= 149
    );

    assert!(stdout.contains("end / reference =") && stdout.contains("constant from position 31"), "{stdout}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("275-299 ")).count(), 1, "no last bucket row:\n{stdout}");
    // The CSV holds the JSON's points, each line opened by the provenance.
    let csv = std::fs::read_to_string(&csv).unwrap();
    let points = json["points"].as_array().unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 1 + points.len());
    assert!(lines[0].starts_with("wattn_version,date,adapter,"), "{csv}");
    // The last columns are the points' keys (which the parsed JSON keeps sorted).
    let mut columns: Vec<&str> = lines[0].split(',').rev().take(points[0].as_object().unwrap().len()).collect();
    columns.sort();
    assert!(columns.iter().eq(points[0].as_object().unwrap().keys()), "{csv}");
    // Counted from the end: the adapter's name may hold a comma (a quoted field).
    let median = lines[0].split(',').rev().position(|c| c == "median_s").unwrap();
    for (line, point) in lines[1..].iter().zip(points) {
        let cell: f64 = line.split(',').rev().nth(median).unwrap().parse().unwrap();
        assert_eq!(cell, point["median_s"].as_f64().unwrap(), "{line}");
    }
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 2, "axes + one line");
    assert_eq!(svg.matches("<circle").count(), 12, "one marker per bucket");
    assert!(svg.contains("stream position") && svg.contains("ms per token"));
}

/// --compare adds a cache that keeps every token; h2o and re-indexed positions run too.
#[test]
fn compare_h2o_and_reindexed_runs_succeed() {
    let dir = scratch("compare");
    let svg = dir.join("c.svg");
    let (_, json) = run_ok("compare", &["--steps", "100", "--compare", "--plot", svg.to_str().unwrap()]);
    assert_eq!(json["report_every"], 2, "default: steps / 50");
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!((&runs[1]["policy"], &runs[1]["capacity"]), (&"none".into(), &100.into()));
    for index in 0..runs.len() {
        check_run(&json, index, 2);
    }
    assert_eq!(runs[1]["cache_full_at"], 99);
    assert_eq!(std::fs::read_to_string(&svg).unwrap().matches("<polyline").count(), 3, "axes + two lines");

    let (_, json) = run_ok("h2o", &["--steps", "80", "--policy", "h2o", "--report-every", "10"]);
    let run = &json["runs"][0];
    assert_eq!((&run["policy"], &run["recent"], &run["capacity"]), (&"h2o".into(), &14.into(), &32.into()));
    check_run(&json, 0, 10);

    let (_, json) = run_ok(
        "reindexed",
        &["--steps", "80", "--positions", "reindexed", "--splits", "2", "--layers", "2", "--batch", "2"],
    );
    let spec = &json["runs"][0];
    assert_eq!(
        (&spec["positions"], &spec["rope_base"], &spec["requested_splits"]),
        (&"reindexed".into(), &10000.0.into(), &2.into())
    );
    assert_eq!(json["report_every"], 1, "at least one position per bucket");
    check_run(&json, 0, 1);
}

/// Policy none never evicts: the stream stops at the full cache, says where, and keeps its
/// partial report; that is the baseline's expected end, so the exit status is 0.
#[test]
fn policy_none_stops_cleanly_at_a_full_cache() {
    let (stdout, json) =
        run_ok("none", &["--policy", "none", "--window", "60", "--steps", "200", "--report-every", "50"]);
    let run = &json["runs"][0];
    assert_eq!(run["capacity"], 64);
    assert_eq!((run["steps_requested"].as_u64(), run["steps_run"].as_u64()), (Some(200), Some(64)));
    assert_eq!(run["stopped_position"], 64);
    assert!(run["stopped_reason"].as_str().unwrap().contains("KV cache full"), "{run}");
    check_run(&json, 0, 50);
    assert!(stdout.contains("stopped at position 64: KV cache full"), "{stdout}");
}

#[test]
fn bad_flags_are_refused_with_one_line() {
    let dir = scratch("bad");
    let json = dir.join("never.json");
    let cases: &[(&[&str], &[&str])] = &[
        (&["--window", "0"], &["window must be at least 1"]),
        (&["--policy", "lru"], &["--policy 'lru'", "streaming, h2o or none"]),
        (&["--head-dim", "300"], &["head dim 300", "256"]),
        (&["--heads", "3"], &["Hq must be a multiple of Hkv"]),
        (&["--splits", "0"], &["--splits '0'"]),
        (&["--positions", "rope"], &["--positions 'rope'"]),
        (&["--dtype", "f64"], &["--dtype 'f64'"]),
        (&["--policy", "h2o", "--positions", "reindexed"], &["heavy hitters"]),
        (&["--policy", "none", "--compare"], &["--compare"]),
        (&["--plot", "/nonexistent-dir/s.svg"], &["directory does not exist"]),
    ];
    for (flags, expect) in cases {
        let mut args = tiny_with(flags);
        args.extend_from_slice(&["--steps", "10", "--json", json.to_str().unwrap()]);
        let out = wattn_stream(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?}: succeeded");
        // Drivers may print their own notices; wattn's part is exactly one line.
        let ours: Vec<&str> = stderr.lines().filter(|l| l.starts_with("wattn")).collect();
        assert_eq!(ours.len(), 1, "{flags:?}: expected one line from wattn:\n{stderr}");
        assert!(ours[0].starts_with("wattn: error: "), "{flags:?}: {}", ours[0]);
        for needle in *expect {
            assert!(ours[0].contains(needle), "{flags:?}: message lacks '{needle}': {}", ours[0]);
        }
        assert!(out.stdout.is_empty(), "{flags:?}: printed a report");
        assert!(!json.exists(), "{flags:?}: wrote the JSON");
    }
}
