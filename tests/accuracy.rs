//! The flash kernel (and the naive baseline) against the f64 reference, with
//! FlashAttention's rule: the kernel's largest error may be at most twice that of a plain
//! implementation in the same precision, plus a small floor.
//!
//! The shape/option grid is sampled with a seeded RNG so that every value of every axis
//! appears; `WATTN_EXHAUSTIVE=1` samples about ten times as many cases.

mod common;

use common::{Errors, Inputs, Rng, Verdict, ctx, second_ctx};
use wattn::{AttentionOptions, AttentionShape, Context, DType, FlashConfig, KvReads, Tensor, naive};

const HEAD_DIMS: [(usize, usize); 13] = [
    (32, 32),
    (40, 40),
    (59, 59),
    (64, 64),
    (80, 80),
    (96, 96),
    (111, 111),
    (128, 128),
    (160, 160),
    (192, 192),
    (256, 256),
    (192, 128), // MLA: the value head is narrower than the query/key head
    (64, 256),
];
const LENGTHS: [(usize, usize); 7] = [(113, 203), (1, 239), (239, 1), (1023, 1024), (1024, 1023), (64, 64), (300, 77)];
/// (Hq, Hkv): multi-head, GQA, MQA.
const HEADS: [(usize, usize); 4] = [(1, 1), (2, 2), (4, 2), (4, 1)];
const BATCHES: [usize; 2] = [1, 2];
const DTYPES: [DType; 2] = [DType::F32, DType::F16];
const SOFTCAPS: [f32; 2] = [0.0, 1.5];
const CONFIGS: [FlashConfig; 4] = [FlashConfig::PORTABLE, FlashConfig::GPU, FlashConfig::CPU, SPLIT_2];
/// Two threads per row and 8 rows each: the partial-score sum over lanes, and two row groups.
const SPLIT_2: FlashConfig =
    FlashConfig { block_q: 64, block_k: 8, rows_per_thread: 8, threads_per_row: 2, kv_reads: KvReads::Workgroup };

/// Mask options by name: causal, windows open on either side, windows with causal, sinks.
fn masks() -> Vec<(&'static str, AttentionOptions)> {
    let with = |causal, window, sinks| AttentionOptions { causal, window, sinks, ..Default::default() };
    vec![
        ("full", with(false, (-1, -1), 0)),
        ("causal", with(true, (-1, -1), 0)),
        ("window(-1,7)", with(false, (-1, 7), 0)),
        ("window(32,-1)", with(false, (32, -1), 0)),
        ("window(20,0)", with(false, (20, 0), 0)),
        ("window(5,9)", with(false, (5, 9), 0)),
        ("causal+window(48,-1)", with(true, (48, -1), 0)),
        ("causal+window(10,3)", with(true, (10, 3), 0)),
        ("sinks4+window(16,0)", with(false, (16, 0), 4)),
        ("sinks3+causal+window(40,-1)", with(true, (40, -1), 3)),
    ]
}

/// Problems above this many multiply-adds (B·Hq·Nq·Nk·(Dqk+Dv)) run with one batch and one
/// KV head: the f64 reference and llvmpipe both pay for every one.
const BIG_CASE_MACS: usize = 1 << 28;

#[derive(Clone, Debug)]
struct Case {
    dtype: DType,
    batch: usize,
    heads: (usize, usize),
    lens: (usize, usize),
    dims: (usize, usize),
    mask: &'static str,
    options: AttentionOptions,
    config: FlashConfig,
}

impl Case {
    fn shape(&self) -> AttentionShape {
        AttentionShape {
            batch: self.batch,
            q_heads: self.heads.0,
            kv_heads: self.heads.1,
            n_q: self.lens.0,
            n_k: self.lens.1,
            d_qk: self.dims.0,
            d_v: self.dims.1,
        }
    }

    fn macs(&self) -> usize {
        self.batch * self.heads.0 * self.lens.0 * self.lens.1 * (self.dims.0 + self.dims.1)
    }

    fn label(&self) -> String {
        let cap = if self.options.softcap > 0.0 { format!(" softcap {}", self.options.softcap) } else { String::new() };
        format!(
            "{} B{} H{}/{} N{}x{} D{}/{} {}{cap} tiles {}x{}",
            self.dtype,
            self.batch,
            self.heads.0,
            self.heads.1,
            self.lens.0,
            self.lens.1,
            self.dims.0,
            self.dims.1,
            self.mask,
            self.config.block_q,
            self.config.block_k
        )
    }
}

/// `n` indices into an axis of `len` values: shuffled rounds of 0..len, so every value
/// appears once per `len` cases.
fn spread(rng: &mut Rng, len: usize, n: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(n + len);
    while out.len() < n {
        let mut round: Vec<usize> = (0..len).collect();
        for i in (1..len).rev() {
            round.swap(i, rng.below(i as u64 + 1) as usize);
        }
        out.extend(round);
    }
    out.truncate(n);
    out
}

/// Combinations that random sampling could miss, always run.
fn pinned_cases() -> Vec<Case> {
    let options =
        |causal, window, sinks, softcap| AttentionOptions { causal, window, sinks, softcap, ..Default::default() };
    let case = |dtype, heads, lens, dims, mask, options| Case {
        dtype,
        batch: 2,
        heads,
        lens,
        dims,
        mask,
        options,
        config: FlashConfig::CPU,
    };
    vec![
        // Causal with Nq > Nk: the first 123 rows see no key.
        case(DType::F32, (2, 1), (200, 77), (64, 64), "causal", options(true, (-1, -1), 0, 0.0)),
        case(DType::F16, (4, 2), (131, 130), (96, 96), "causal", options(true, (-1, -1), 0, 0.0)),
        // MLA shape, causal, f16.
        case(DType::F16, (4, 1), (97, 160), (192, 128), "causal", options(true, (-1, -1), 0, 0.0)),
        // GQA with sinks, a window and a softcap at once.
        case(DType::F32, (4, 2), (150, 150), (80, 80), "sinks2+window(24,0)", options(false, (24, 0), 2, 5.0)),
        // K/V rows handed out by subgroup shuffles: a tile past n_k (the last key stands in),
        // a head dim that straddles words and masks K's tail, and GQA.
        Case {
            config: FlashConfig::CPU_SUBGROUP,
            ..case(DType::F32, (4, 2), (45, 203), (37, 37), "causal", options(true, (-1, -1), 0, 0.0))
        },
        Case {
            config: FlashConfig::CPU_SUBGROUP,
            ..case(DType::F16, (2, 2), (64, 64), (64, 64), "window(5,9)", options(false, (5, 9), 0, 1.5))
        },
        // Wide heads: threads sharing rows sum their partial scores by shuffles (2 threads
        // per row of an unaligned head dim, 4 per row of an MLA shape).
        Case {
            config: FlashConfig::CPU_SUBGROUP,
            ..case(DType::F32, (4, 2), (113, 203), (111, 111), "causal", options(true, (-1, -1), 0, 0.0))
        },
        Case {
            config: FlashConfig::CPU_SUBGROUP,
            ..case(DType::F16, (2, 1), (70, 77), (192, 128), "sinks4+window(16,0)", options(false, (16, 0), 4, 0.0))
        },
        // Whole rows of 8 per thread, K/V read from memory.
        Case {
            config: FlashConfig { rows_per_thread: 8, ..FlashConfig::CPU },
            ..case(DType::F32, (2, 1), (70, 203), (32, 32), "causal", options(true, (-1, -1), 0, 0.0))
        },
    ]
}

fn sampled_cases(n: usize) -> Vec<Case> {
    let masks = masks();
    let mut rng = Rng::new(0x5eed_a77e);
    let mut axis = |len| spread(&mut rng, len, n);
    let (dt, ba, he, le, di, ma, sc, co) = (
        axis(DTYPES.len()),
        axis(BATCHES.len()),
        axis(HEADS.len()),
        axis(LENGTHS.len()),
        axis(HEAD_DIMS.len()),
        axis(masks.len()),
        axis(SOFTCAPS.len()),
        axis(CONFIGS.len()),
    );
    (0..n)
        .map(|i| {
            let (mask, mut options) = masks[ma[i]];
            options.softcap = SOFTCAPS[sc[i]];
            let mut case = Case {
                dtype: DTYPES[dt[i]],
                batch: BATCHES[ba[i]],
                heads: HEADS[he[i]],
                lens: LENGTHS[le[i]],
                dims: HEAD_DIMS[di[i]],
                mask,
                options,
                config: CONFIGS[co[i]],
            };
            if case.macs() > BIG_CASE_MACS {
                // Keep the GQA ratio on a single KV head, unless even that is too much.
                case.batch = 1;
                case.heads = (case.heads.0 / case.heads.1, 1);
                if case.macs() > BIG_CASE_MACS {
                    case.heads = (1, 1);
                }
            }
            case
        })
        .collect()
}

fn cases() -> Vec<Case> {
    let exhaustive = std::env::var("WATTN_EXHAUSTIVE").is_ok_and(|v| v == "1");
    let mut cases = pinned_cases();
    cases.extend(sampled_cases(if exhaustive { 500 } else { 24 }));
    cases
}

/// One GPU path (flash or naive) run on a case's tensors.
type GpuRun = fn(&Context, &Case, &Tensor, &Tensor, &Tensor) -> wattn::Result<wattn::AttentionOutput>;

fn run_flash(c: &Context, case: &Case, q: &Tensor, k: &Tensor, v: &Tensor) -> wattn::Result<wattn::AttentionOutput> {
    let mut config = case.config.fitted(c.limits(), &case.shape());
    if let Err(e) = config.check(c.limits(), &case.shape()).and_then(|()| config.check_subgroups(c)) {
        config = FlashConfig::for_adapter(c);
        eprintln!("{}: preset does not fit this adapter ({e}), running {config:?}", case.label());
    }
    wattn::attention_with(c, q, k, v, &case.options, &config)
}

fn run_naive(c: &Context, case: &Case, q: &Tensor, k: &Tensor, v: &Tensor) -> wattn::Result<wattn::AttentionOutput> {
    naive::attention(c, q, k, v, &case.options)
}

/// Runs `gpu` on `c` over `cases`, prints each case's errors and the largest per dtype, and
/// fails with every case that broke the rule.
fn check_cases(c: &Context, what: &str, cases: &[Case], gpu: GpuRun) {
    let mut failures = Vec::new();
    let mut worst: Vec<(DType, Errors, Errors)> =
        DTYPES.iter().map(|&d| (d, Errors::default(), Errors::default())).collect();
    for (n, case) in cases.iter().enumerate() {
        let shape = case.shape();
        let x = Inputs::random(&shape, case.dtype, 1000 + n as u64);
        let (q, k, v) = x.upload(c, &shape, case.dtype);
        let result = gpu(c, case, &q, &k, &v).unwrap_or_else(|e| panic!("{what} {}: {e}", case.label()));
        let (out, lse) = (result.out.to_f32(c).unwrap(), result.lse.to_f32(c).unwrap());
        let verdict = Verdict::new(&out, &lse, &x, &shape, &case.options, case.dtype);
        eprintln!("{what} {:<68} {}", case.label(), verdict.describe());
        let slot = worst.iter_mut().find(|w| w.0 == case.dtype).unwrap();
        (slot.1, slot.2) = (slot.1.max(verdict.got), slot.2.max(verdict.plain));
        if !verdict.passes() {
            failures.push(format!("{what} {}: {}", case.label(), verdict.describe()));
        }
    }
    for (dtype, got, plain) in &worst {
        eprintln!(
            "{what} largest {dtype} errors: O {:.3e} (plain {:.3e}), LSE {:.3e} (plain {:.3e})",
            got.out, plain.out, got.lse, plain.lse
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases broke the rule:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn grid_covers_every_axis() {
    let cases = cases();
    let masks = masks();
    let missing = |what: &str, found: bool| assert!(found, "no sampled case has {what}");
    for d in DTYPES {
        missing(&format!("dtype {d}"), cases.iter().any(|c| c.dtype == d));
    }
    for b in BATCHES {
        missing(&format!("batch {b}"), cases.iter().any(|c| c.batch == b));
    }
    for h in HEADS {
        missing(&format!("heads {h:?}"), cases.iter().any(|c| c.heads == h));
    }
    for l in LENGTHS {
        missing(&format!("lengths {l:?}"), cases.iter().any(|c| c.lens == l));
    }
    for d in HEAD_DIMS {
        missing(&format!("head dims {d:?}"), cases.iter().any(|c| c.dims == d));
    }
    for (name, _) in &masks {
        missing(&format!("mask {name}"), cases.iter().any(|c| c.mask == *name));
    }
    for s in SOFTCAPS {
        missing(&format!("softcap {s}"), cases.iter().any(|c| c.options.softcap == s));
    }
    for cfg in CONFIGS {
        missing(&format!("config {cfg:?}"), cases.iter().any(|c| c.config == cfg));
    }
}

/// Every other case, from `first`: the flash cases run as two tests on two devices (most of
/// their time is llvmpipe compiling a pipeline per variant, see [`second_ctx`]).
fn every_other_case(first: usize) -> Vec<Case> {
    cases().into_iter().skip(first).step_by(2).collect()
}

#[test]
fn flash_matches_reference_on_even_cases() {
    check_cases(ctx(), "flash", &every_other_case(0), run_flash);
}

#[test]
fn flash_matches_reference_on_odd_cases() {
    check_cases(second_ctx(), "flash", &every_other_case(1), run_flash);
}

/// The benchmark baseline must be right too: every third case.
#[test]
fn naive_matches_reference() {
    let subset: Vec<Case> = cases().into_iter().step_by(3).collect();
    check_cases(ctx(), "naive", &subset, run_naive);
}
