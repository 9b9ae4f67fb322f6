//! Times CubeK's flash attention (crate `cubek-attention`, the kernel Burn calls FlashUnit:
//! `Strategy::Unit` with the blueprint CubeK infers) on the default wgpu adapter, over the
//! shapes `wattn bench` takes, with the wall clock around launch-and-sync as `wattn bench
//! --wall-clock` times its own kernel. Each point's output is first checked against an f64
//! reference on a few rows, so a kernel that gives wrong results is not timed.
//!
//! cubek-peer --seq 512,1024 --head-dim 64,128 --dtype f32,f16 --causal both --batch 1 --heads 2 --runs 5 --json out.json

use cubecl::prelude::*;
use cubecl::std::tensor::TensorHandle;
use cubek_attention::forward::definition::{AccumulatorPrecision, AttentionGlobalTypes, AttentionOptions};
use cubek_attention::forward::launch::{self, BlueprintStrategy, Strategy};
use std::time::Instant;

struct Args {
    seq: Vec<usize>,
    head_dim: Vec<usize>,
    dtype: Vec<String>,
    causal: Vec<bool>,
    batch: usize,
    heads: usize,
    runs: usize,
    json: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seq: vec![512, 1024, 2048],
        head_dim: vec![64],
        dtype: vec!["f32".into()],
        causal: vec![false],
        batch: 1,
        heads: 2,
        runs: 5,
        json: None,
    };
    let list = |v: &str| -> Result<Vec<usize>, String> {
        v.split(',').map(|x| parse_len(x).ok_or_else(|| format!("not a size: {x}"))).collect()
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--seq" => args.seq = list(&value)?,
            "--head-dim" => args.head_dim = list(&value)?,
            "--dtype" => args.dtype = value.split(',').map(String::from).collect(),
            "--causal" => {
                args.causal = match value.as_str() {
                    "both" => vec![false, true],
                    "true" => vec![true],
                    "false" => vec![false],
                    _ => return Err(format!("--causal true|false|both, not {value}")),
                }
            }
            "--batch" => args.batch = value.parse().map_err(|_| format!("--batch {value}"))?,
            "--heads" => args.heads = value.parse().map_err(|_| format!("--heads {value}"))?,
            "--runs" => args.runs = value.parse().map_err(|_| format!("--runs {value}"))?,
            "--json" => args.json = Some(value),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if args.dtype.iter().any(|d| d != "f32" && d != "f16") {
        return Err("--dtype takes f32 and f16".into());
    }
    Ok(args)
}

/// 512, 2k, 2K.
fn parse_len(x: &str) -> Option<usize> {
    match x.strip_suffix(['k', 'K']) {
        Some(n) => n.parse::<usize>().ok().map(|n| n * 1024),
        None => x.parse().ok(),
    }
}

/// Deterministic inputs in [-0.5, 0.5).
fn inputs(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 + seed * 104729) % 1000) as f32 / 1000.0 - 0.5).collect()
}

fn upload(client: &cubecl::client::Client, shape: [usize; 4], data: &[f32], f16: bool) -> TensorHandle {
    let (bytes, elem): (Vec<u8>, ElemType) = if f16 {
        let halves: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
        (halves.iter().flat_map(|h| h.to_le_bytes()).collect(), half::f16::elem_type_native())
    } else {
        (data.iter().flat_map(|x| x.to_le_bytes()).collect(), f32::elem_type_native())
    };
    TensorHandle::new_contiguous(shape, client.create_from_slice(&bytes), elem)
}

/// Max |error| of rows `rows` of head 0, batch 0 against an f64 softmax(Q K^T / sqrt(d)) V.
fn check(q: &[f32], k: &[f32], v: &[f32], out: &[f32], n: usize, d: usize, causal: bool) -> f64 {
    let mut err = 0.0f64;
    for row in [0, 1, n / 2, n - 1] {
        let keys = if causal { row + 1 } else { n };
        let scores: Vec<f64> = (0..keys)
            .map(|j| (0..d).map(|c| q[row * d + c] as f64 * k[j * d + c] as f64).sum::<f64>() / (d as f64).sqrt())
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = weights.iter().sum();
        for c in 0..d {
            let want = (0..keys).map(|j| weights[j] * v[j * d + c] as f64).sum::<f64>() / sum;
            err = err.max((want - out[row * d + c] as f64).abs());
        }
    }
    err
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cubek-peer: error: {e}");
            std::process::exit(2);
        }
    };
    let client = cubecl::Device::default().client();
    println!("CubeK (cubek-attention 0.3.1, Strategy::Unit, inferred blueprint) on {}", client.name());
    let mut points = Vec::new();
    for dtype in &args.dtype {
        let f16 = dtype == "f16";
        for &d in &args.head_dim {
            for &causal in &args.causal {
                for &n in &args.seq {
                    let shape = [args.batch, args.heads, n, d];
                    let numel = shape.iter().product::<usize>();
                    let (q, k, v) = (inputs(numel, 1), inputs(numel, 2), inputs(numel, 3));
                    let elem = if f16 { half::f16::elem_type_native() } else { f32::elem_type_native() };
                    let types =
                        AttentionGlobalTypes::from_single_float_dtype(elem, AttentionGlobalTypes::mask_dtype(&client));
                    let (qh, kh, vh) = (
                        upload(&client, shape, &q, f16),
                        upload(&client, shape, &k, f16),
                        upload(&client, shape, &v, f16),
                    );
                    let out = TensorHandle::empty(&client, shape, elem);
                    let options = AttentionOptions { causal, accumulator_precision: AccumulatorPrecision::default() };
                    let run = || {
                        launch::launch_ref(
                            Strategy::Unit(BlueprintStrategy::Inferred(())),
                            &client,
                            qh.clone().binding(),
                            kh.clone().binding(),
                            vh.clone().binding(),
                            None,
                            out.clone().binding(),
                            &types,
                            options.clone(),
                        )
                        .map_err(|e| format!("{e:?}"))?;
                        cubecl::future::block_on(client.sync()).map_err(|e| format!("{e:?}"))
                    };
                    let series = format!("{dtype} d{d} {}", if causal { "causal" } else { "dense" });
                    if let Err(e) = run() {
                        println!("{series} seq {n}: CubeK refused: {e}");
                        continue;
                    }
                    let bytes = match client.read_one(out.handle.clone()) {
                        Ok(b) => b,
                        Err(e) => {
                            println!("{series} seq {n}: reading CubeK's output failed: {e:?}");
                            continue;
                        }
                    };
                    let got: Vec<f32> = if f16 {
                        bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
                    } else {
                        bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
                    };
                    let round = |x: &[f32]| -> Vec<f32> {
                        if f16 { x.iter().map(|&y| half::f16::from_f32(y).to_f32()).collect() } else { x.to_vec() }
                    };
                    let error = check(&round(&q), &round(&k), &round(&v), &got, n, d, causal);
                    let tolerance = if f16 { 1e-2 } else { 1e-4 };
                    let mut times = Vec::new();
                    if error <= tolerance {
                        for _ in 0..args.runs {
                            let start = Instant::now();
                            run().expect("ran once already");
                            times.push(start.elapsed().as_secs_f64());
                        }
                        times.sort_by(f64::total_cmp);
                    }
                    let median = times.get(times.len() / 2).copied();
                    match median {
                        Some(t) => println!("{series} seq {n}: {:.2} ms (error {error:.1e})", t * 1e3),
                        None => println!("{series} seq {n}: not timed, error {error:.1e} over {tolerance:.0e}"),
                    }
                    points.push(serde_json::json!({
                        "series": series, "dtype": dtype, "head_dim": d, "causal": causal, "seq": n,
                        "batch": args.batch, "heads": args.heads, "median_s": median, "runs_s": times, "max_error": error,
                    }));
                }
            }
        }
    }
    if let Some(path) = &args.json {
        let report = serde_json::json!({ "kernel": "cubek-attention 0.3.1 Strategy::Unit", "adapter": client.name(), "points": points });
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).expect("write the JSON");
    }
}
