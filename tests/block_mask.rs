//! Block masks: the builder's classes against brute force, and the block-sparse kernel
//! against the f64 reference with the same predicates written out independently.
//!
//! `WATTN_EXHAUSTIVE=1` runs every (lengths, mask, block size) combination instead of a sample.

mod common;

use common::{Inputs, Rng, ctx, max_abs_err, own_device, second_ctx};
use std::time::Instant;
use wattn::flash;
use wattn::mask::{BlockClass, BlockMask, BlockSize, Mask};
use wattn::reference;
use wattn::{AttentionBuffers, AttentionOptions, AttentionShape, Context, DType, Error, FlashConfig, Tensor};

/// "Query `i` sees key `j`" as a plain closure, for one (batch, head).
type Sees = Box<dyn Fn(usize, usize) -> bool>;

/// A mask and its definition written from the docs, for `n_q` queries and `n_k` keys.
struct Named {
    name: String,
    mask: Mask,
    sees: Sees,
}

fn named(name: impl Into<String>, mask: Mask, sees: impl Fn(usize, usize) -> bool + 'static) -> Named {
    Named { name: name.into(), mask, sees: Box::new(sees) }
}

/// The key position query `i` is aligned to (bottom-right).
fn pos(n_q: usize, n_k: usize, i: usize) -> i64 {
    i as i64 + n_k as i64 - n_q as i64
}

fn in_window(n_q: usize, n_k: usize, left: i64, right: i64, i: usize, j: usize) -> bool {
    let (p, j) = (pos(n_q, n_k, i), j as i64);
    (left < 0 || j >= p - left) && (right < 0 || j <= p + right)
}

/// Random document lengths summing to `n`, some of a single key.
fn random_documents(rng: &mut Rng, n: usize) -> Vec<u32> {
    let mut ids = Vec::with_capacity(n);
    let mut doc = 0;
    while ids.len() < n {
        let len = if rng.below(4) == 0 { 1 } else { 1 + rng.below(n as u64 / 3 + 1) as usize };
        ids.extend(std::iter::repeat_n(doc, len.min(n - ids.len())));
        doc += 1;
    }
    ids
}

fn random_bools(rng: &mut Rng, n: usize, density: f64) -> Vec<bool> {
    (0..n).map(|_| ((rng.next_u64() >> 11) as f64) < density * (1u64 << 53) as f64).collect()
}

/// Every kind of mask and some compositions, for `n_q` x `n_k`, with `block` for block patterns.
fn masks(n_q: usize, n_k: usize, block: BlockSize, rng: &mut Rng) -> Vec<Named> {
    let w = move |l, r| move |i, j| in_window(n_q, n_k, l, r, i, j);
    let ids = random_documents(rng, n_k);
    let same_doc = {
        let ids = ids.clone();
        move |i: usize, j: usize| {
            let p = pos(n_q, n_k, i);
            p >= 0 && ids[p as usize] == ids[j]
        }
    };
    let docs = Mask::documents(&ids).unwrap();
    let bits = random_bools(rng, n_q * n_k, 0.5);
    let dense = Mask::dense(n_q, n_k, &bits).unwrap();
    let dense_sees = move |i: usize, j: usize| bits[i * n_k + j];
    let (bq, bk) = (block.q as usize, block.k as usize);
    let k_blocks = n_k.div_ceil(bk);
    let on = random_bools(rng, n_q.div_ceil(bq) * k_blocks, 0.4);
    let blocks = Mask::blocks(block, n_q.div_ceil(bq), k_blocks, &on).unwrap();
    let blocks_sees = move |i: usize, j: usize| on[(i / bq) * k_blocks + j / bk];
    let sinks = move |s: usize, l: i64, r: i64| {
        move |i: usize, j: usize| in_window(n_q, n_k, -1, r, i, j) && (in_window(n_q, n_k, l, -1, i, j) || j < s)
    };
    let (d1, d2, d3) = (same_doc.clone(), same_doc.clone(), same_doc.clone());
    let (b1, b2) = (blocks_sees.clone(), blocks_sees);
    vec![
        named("full", Mask::full(), |_, _| true),
        named("causal", Mask::causal(), w(-1, 0)),
        named("window(20,5)", Mask::window(20, 5), w(20, 5)),
        named("window(3,-1)", Mask::window(3, -1), w(3, -1)),
        named("sinks4+window(16,0)", Mask::sinks_window(4, 16, 0), sinks(4, 16, 0)),
        named("sinks2+window(5,7)", Mask::sinks_window(2, 5, 7), sinks(2, 5, 7)),
        named("prefix_lm(30)", Mask::prefix_lm(30), move |i, j| j < 30 || w(-1, 0)(i, j)),
        named("documents", docs.clone(), same_doc),
        named("documents & causal", docs.clone() & Mask::causal(), move |i, j| d1(i, j) && w(-1, 0)(i, j)),
        named(
            "(documents | keys<8) & window(40,-1)",
            (docs.clone() | Mask::key_prefix(8)) & Mask::window(40, -1),
            move |i, j| (d2(i, j) || j < 8) && w(40, -1)(i, j),
        ),
        named("dense", dense.clone(), dense_sees.clone()),
        named("dense & (causal | window(2,2))", dense & Mask::causal().or(Mask::window(2, 2)), move |i, j| {
            dense_sees(i, j) && (w(-1, 0)(i, j) || w(2, 2)(i, j))
        }),
        named("blocks", blocks.clone(), b1),
        named("blocks & documents | keys<3", blocks & docs | Mask::key_prefix(3), move |i, j| {
            (b2(i, j) && d3(i, j)) || j < 3
        }),
        named("from_fn(i+j odd)", Mask::from_fn(n_q, n_k, |i, j| (i + j) % 2 == 1), |i, j| (i + j) % 2 == 1),
    ]
}

fn exhaustive() -> bool {
    std::env::var("WATTN_EXHAUSTIVE").is_ok_and(|v| v == "1")
}

// ---------------------------------------------------------------------------------------
// The builder, on the CPU.

/// Every block's class is exactly what its elements make it, every element reads back, and
/// each mask means what its docs say.
#[test]
fn block_classes_match_brute_force() {
    let lengths = [(37, 53), (64, 64), (100, 31), (1, 45), (45, 1), (129, 127)];
    let blocks = [
        BlockSize::new(16, 32),
        BlockSize::new(8, 8),
        BlockSize::new(5, 7),
        BlockSize::new(32, 16),
        BlockSize::new(1, 3),
    ];
    let mut rng = Rng::new(11);
    let mut checked = 0;
    for (n_q, n_k) in lengths {
        for block in blocks {
            for m in masks(n_q, n_k, block, &mut rng) {
                let what = format!("{} at {n_q}x{n_k}, blocks {block}", m.name);
                for i in 0..n_q {
                    for j in 0..n_k {
                        assert_eq!(m.mask.visible(n_q, n_k, i, j), (m.sees)(i, j), "{what}: Mask::visible({i}, {j})");
                    }
                }
                let built = BlockMask::new(&m.mask, n_q, n_k, block).unwrap();
                let (bq, bk) = (block.q as usize, block.k as usize);
                for qb in 0..built.q_blocks() {
                    for kb in 0..built.k_blocks() {
                        let rows = qb * bq..((qb + 1) * bq).min(n_q);
                        let keys = kb * bk..((kb + 1) * bk).min(n_k);
                        let count = rows
                            .clone()
                            .flat_map(|i| keys.clone().map(move |j| (i, j)))
                            .filter(|&(i, j)| (m.sees)(i, j))
                            .count();
                        let want = match count {
                            0 => BlockClass::Empty,
                            c if c == rows.len() * keys.len() => BlockClass::Full,
                            _ => BlockClass::Partial,
                        };
                        assert_eq!(built.class(0, 0, qb, kb).unwrap(), want, "{what}: block ({qb}, {kb})");
                    }
                }
                for i in 0..n_q {
                    for j in 0..n_k {
                        assert_eq!(
                            built.visible(0, 0, i, j).unwrap(),
                            (m.sees)(i, j),
                            "{what}: BlockMask::visible({i}, {j})"
                        );
                    }
                }
                for qb in 0..built.q_blocks() {
                    let runs = built.runs(0, 0, qb).unwrap();
                    for pair in runs.windows(2) {
                        let merged = pair[0].end == pair[1].first && pair[0].is_full() == pair[1].is_full();
                        assert!(
                            pair[0].end <= pair[1].first && !merged,
                            "{what}: runs {pair:?} overlap or should be one"
                        );
                    }
                }
                checked += 1;
            }
        }
    }
    eprintln!("checked {checked} block masks element by element");
}

#[test]
fn masks_broadcast_over_batch_and_heads() {
    let (n_q, n_k, block) = (70, 90, BlockSize::new(16, 16));
    let per = [
        Mask::causal(),
        Mask::window(10, 0),
        Mask::prefix_lm(20),
        Mask::full(),
        Mask::key_prefix(5),
        Mask::window(-1, 3),
    ];
    let alone: Vec<BlockMask> = per.iter().map(|m| BlockMask::new(m, n_q, n_k, block).unwrap()).collect();
    let grid = BlockMask::build(&per, 2, 3, n_q, n_k, block).unwrap();
    let heads = BlockMask::per_head(&per[..3], n_q, n_k, block).unwrap();
    let shared = BlockMask::new(&per[1], n_q, n_k, block).unwrap();
    assert_eq!((grid.batch(), grid.heads(), heads.batch(), heads.heads()), (2, 3, 1, 3));
    // Same runs (element masks are numbered across the whole mask) and same elements.
    let same = |a: &BlockMask, (b, h): (usize, usize), alone: &BlockMask, what: &str| {
        for qb in 0..a.q_blocks() {
            let shape = |m: &BlockMask, b, h| {
                m.runs(b, h, qb).unwrap().iter().map(|r| (r.first, r.end, r.is_full())).collect::<Vec<_>>()
            };
            assert_eq!(shape(a, b, h), shape(alone, 0, 0), "{what}: query block {qb}");
        }
        for i in 0..n_q {
            for j in 0..n_k {
                assert_eq!(a.visible(b, h, i, j).unwrap(), alone.visible(0, 0, i, j).unwrap(), "{what}: ({i}, {j})");
            }
        }
    };
    for b in 0..2 {
        for h in 0..3 {
            same(&grid, (b, h), &alone[b * 3 + h], &format!("batch {b} head {h}"));
            // Any batch reads the broadcast masks, any head the shared one.
            same(&heads, (b + 5, h), &alone[h], &format!("per-head mask, batch {} head {h}", b + 5));
            same(&shared, (b + 5, h + 7), &alone[1], "shared mask");
        }
    }
}

#[test]
fn display_draws_the_blocks_and_density_counts_them() {
    let causal = BlockMask::new(&Mask::causal(), 64, 64, BlockSize::new(16, 16)).unwrap();
    let text = causal.to_string();
    let grid: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(grid, ["+...", "#+..", "##+.", "###+"], "{text}");
    assert!(
        text.starts_with("block mask 64 x 64, blocks of 16x16 (4 x 4), density 0.6250 (6 full, 4 partial of 16)"),
        "{text}"
    );
    assert_eq!(causal.density(), 10.0 / 16.0);

    let heads = BlockMask::per_head(&[Mask::full(), Mask::key_prefix(1)], 32, 48, BlockSize::new(16, 16)).unwrap();
    let text = heads.to_string();
    let grid: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(grid, ["batch 0 head 0:", "###", "###", "batch 0 head 1:", "+..", "+.."], "{text}");

    let big = BlockMask::new(&Mask::causal(), 100_000, 100_000, BlockSize::new(32, 32)).unwrap();
    let text = big.to_string();
    assert!(text.lines().next().unwrap().ends_with("one character per 49 x 49 blocks"), "{text}");
    assert!(text.lines().skip(1).all(|l| l.len() <= 64), "{text}");
    assert!((big.density() - 0.5).abs() < 0.01, "causal density {}", big.density());
}

/// Interval reasoning keeps the build linear in the visited runs: 128K x 128K in well
/// under a second with optimisations. The bound is loose; it catches a quadratic build.
#[test]
fn builds_128k_masks_quickly() {
    let n = 128 * 1024;
    let block = BlockSize::new(32, 32);
    let mut rng = Rng::new(3);
    let docs = Mask::documents(&random_documents(&mut rng, n)).unwrap();
    for (name, mask) in [
        ("causal", Mask::causal()),
        ("documents & causal", docs & Mask::causal()),
        ("sinks4+window(4096,0)", Mask::sinks_window(4, 4096, 0)),
    ] {
        let start = Instant::now();
        let built = BlockMask::new(&mask, n, n, block).unwrap();
        let took = start.elapsed();
        let c = built.block_counts();
        eprintln!(
            "{name} at {n} x {n}: built in {took:.2?}, {} full + {} partial blocks, density {:.4}",
            c.full,
            c.partial,
            built.density()
        );
        assert!(took.as_secs_f64() < 5.0, "building {name} at {n} took {took:?}");
    }
}

#[test]
fn bad_masks_are_errors() {
    let block = BlockSize::new(16, 16);
    let option = |r: wattn::Result<BlockMask>| matches!(r, Err(Error::Option(_)));
    let shape = |r: wattn::Result<BlockMask>| matches!(r, Err(Error::Shape(_)));
    assert!(matches!(Mask::documents(&[0, 0, 2, 1]), Err(Error::Option(m)) if m.contains("ids[3] = 1")));
    assert!(Mask::document_lengths(&[3, 0]).is_err());
    assert!(matches!(Mask::dense(3, 4, &[true; 11]), Err(Error::Shape(_))));
    assert!(matches!(Mask::blocks(block, 2, 2, &[true; 3]), Err(Error::Shape(_))));
    assert!(option(BlockMask::new(&Mask::window(-2, 0), 10, 10, block)));
    assert!(option(BlockMask::new(&Mask::causal(), 10, 10, BlockSize::new(0, 16))));
    assert!(option(BlockMask::new(&Mask::causal(), 0, 10, block)));
    assert!(shape(BlockMask::new(&Mask::document_lengths(&[4, 5]).unwrap(), 10, 10, block)));
    assert!(shape(BlockMask::new(&Mask::from_fn(10, 9, |_, _| true), 10, 10, block)));
    assert!(shape(BlockMask::new(&Mask::blocks(block, 1, 2, &[true; 2]).unwrap(), 20, 20, block)));
    assert!(shape(BlockMask::build(&[Mask::causal(), Mask::full()], 1, 3, 10, 10, block)));
}

// ---------------------------------------------------------------------------------------
// The kernel, against the f64 reference.

fn shape(batch: usize, heads: (usize, usize), lens: (usize, usize), d: usize) -> AttentionShape {
    AttentionShape { batch, q_heads: heads.0, kv_heads: heads.1, n_q: lens.0, n_k: lens.1, d_qk: d, d_v: d }
}

fn download(ctx: &Context, out: &wattn::AttentionOutput) -> (Vec<f32>, Vec<f32>) {
    (out.out.to_f32(ctx).unwrap(), out.lse.to_f32(ctx).unwrap())
}

/// Checks O and LSE against the f64 reference where query `i` of (b, h) also needs
/// `sees(b, h, i, j)`: one rounding of the largest output (f16 storage) or 4e-6 of it
/// (f32), and 2e-6 of the largest LSE. Returns the O error.
fn assert_close(
    what: &str,
    got: &(Vec<f32>, Vec<f32>),
    x: &Inputs,
    s: &AttentionShape,
    options: &AttentionOptions,
    dtype: DType,
    sees: impl Fn(usize, usize, usize, usize) -> bool,
) -> f64 {
    let want = reference::attention_masked(&x.q, &x.k, &x.v, s, options, sees);
    let largest = |xs: &[f64]| xs.iter().filter(|x| x.is_finite()).fold(1.0f64, |m, x| m.max(x.abs()));
    let out_bound = largest(&want.out) * if dtype == DType::F16 { half::f16::EPSILON.to_f64() } else { 4e-6 };
    let lse_bound = largest(&want.lse) * 2e-6;
    let (out, lse) = (max_abs_err(&got.0, &want.out), max_abs_err(&got.1, &want.lse));
    eprintln!("{what}: O err {out:.2e} (bound {out_bound:.2e}), LSE err {lse:.2e} (bound {lse_bound:.2e})");
    assert!(
        out <= out_bound && lse <= lse_bound,
        "{what}: O err {out:.3e} > {out_bound:.3e} or LSE err {lse:.3e} > {lse_bound:.3e}"
    );
    out
}

/// `attention_masked` on random inputs of shape `s`: the inputs and (O, LSE).
fn run_masked(
    c: &Context,
    s: &AttentionShape,
    dtype: DType,
    mask: &BlockMask,
    options: &AttentionOptions,
    seed: u64,
) -> (Inputs, (Vec<f32>, Vec<f32>)) {
    let x = Inputs::random(s, dtype, seed);
    let (q, k, v) = x.upload(c, s, dtype);
    let out = wattn::attention_masked(c, &q, &k, &v, mask, options).unwrap();
    (x, download(c, &out))
}

fn f16_ok() -> bool {
    ctx().capabilities().shader_f16
}

fn dtypes() -> Vec<DType> {
    if f16_ok() { vec![DType::F32, DType::F16] } else { vec![DType::F32] }
}

#[test]
fn random_block_patterns_at_every_density() {
    // A second device (see `second_ctx`): its pipelines compile beside the other tests'.
    let c = second_ctx();
    let block = BlockSize::new(16, 16);
    let s = shape(2, (2, 1), (200, 250), 64);
    let (q_blocks, k_blocks) = (s.n_q.div_ceil(16), s.n_k.div_ceil(16));
    let mut rng = Rng::new(5);
    for (n, density) in [0.0, 0.1, 0.3, 0.7, 1.0].into_iter().enumerate() {
        // A pattern per (batch, head).
        let patterns: Vec<Vec<bool>> = (0..4).map(|_| random_bools(&mut rng, q_blocks * k_blocks, density)).collect();
        let masks: Vec<Mask> = patterns.iter().map(|p| Mask::blocks(block, q_blocks, k_blocks, p).unwrap()).collect();
        let mask = BlockMask::build(&masks, 2, 2, s.n_q, s.n_k, block).unwrap();
        let dtype = dtypes()[n % dtypes().len()];
        let (x, got) = run_masked(c, &s, dtype, &mask, &AttentionOptions::default(), 40 + n as u64);
        let sees = |b: usize, h: usize, i: usize, j: usize| patterns[b * 2 + h][(i / 16) * k_blocks + j / 16];
        let what = format!("blocks density {density} (built {:.3}) {dtype}", mask.density());
        assert_close(&what, &got, &x, &s, &AttentionOptions::default(), dtype, sees);
    }
}

/// Rows that see nothing come out as zeros with LSE = -inf, whether their whole query
/// block is empty or only the row is.
#[test]
fn rows_that_see_nothing_are_zero_with_lse_minus_inf() {
    let c = ctx();
    let s = shape(1, (2, 2), (100, 90), 32);
    let block = BlockSize::for_adapter(c);
    let blind = |i: usize| i < block.q as usize || i % 7 == 3;
    let mask = Mask::from_fn(s.n_q, s.n_k, |i, j| !blind(i) && (i + j) % 3 != 0);
    let built = BlockMask::new(&mask, s.n_q, s.n_k, block).unwrap();
    assert!(built.runs(0, 0, 0).unwrap().is_empty(), "the first query block sees nothing");
    let (x, (out, lse)) = run_masked(c, &s, DType::F32, &built, &AttentionOptions::default(), 9);
    for row in 0..s.q_heads * s.n_q {
        if blind(row % s.n_q) {
            assert_eq!(lse[row], f32::NEG_INFINITY, "row {row}");
            assert!(out[row * s.d_v..][..s.d_v].iter().all(|&o| o == 0.0), "row {row} is not zero");
        }
    }
    let sees = |_, _, i, j| mask.visible(s.n_q, s.n_k, i, j);
    assert_close("blind rows", &(out, lse), &x, &s, &AttentionOptions::default(), DType::F32, sees);
}

/// Each kind of mask and some compositions, with lengths that cut blocks off at the end
/// of both sequences, Nq < Nk and Nq > Nk, at several block sizes.
#[test]
fn every_mask_kind_matches_the_reference() {
    let c = ctx();
    let lengths = [(113, 203), (203, 77), (64, 64), (1, 150), (150, 1)];
    let blocks = [BlockSize::for_adapter(c), BlockSize::new(16, 16), BlockSize::new(48, 8)];
    let mut rng = Rng::new(17);
    let mut case = 0;
    for (l, &lens) in lengths.iter().enumerate() {
        for (bi, &block) in blocks.iter().enumerate() {
            for (mi, m) in masks(lens.0, lens.1, block, &mut rng).into_iter().enumerate() {
                case += 1;
                // A sample in which every (lengths, block, mask) pair still appears.
                if !exhaustive() && (mi + l + 2 * bi) % 3 != 0 {
                    continue;
                }
                let dtype = dtypes()[case % dtypes().len()];
                let s = shape(1, (2, 1), lens, 48);
                let built = BlockMask::new(&m.mask, lens.0, lens.1, block).unwrap();
                let (x, got) = run_masked(c, &s, dtype, &built, &AttentionOptions::default(), case as u64);
                let what = format!("{} N{}x{} blocks {block} {dtype}", m.name, lens.0, lens.1);
                assert_close(&what, &got, &x, &s, &AttentionOptions::default(), dtype, |_, _, i, j| (m.sees)(i, j));
            }
        }
    }
}

/// DuoAttention: retrieval heads see everything, streaming heads sinks and a window, in
/// one launch; GQA; one mask for both batches.
#[test]
fn per_head_masks_in_one_launch() {
    let c = ctx();
    let s = shape(2, (4, 2), (180, 180), 64);
    let streaming = Mask::sinks_window(4, 32, 0);
    let heads = [Mask::full(), streaming.clone(), Mask::causal(), streaming];
    let built = BlockMask::per_head(&heads, s.n_q, s.n_k, BlockSize::for_adapter(c)).unwrap();
    let options = AttentionOptions { softcap: 8.0, ..Default::default() };
    let (x, got) = run_masked(c, &s, DType::F32, &built, &options, 21);
    let sees = |_, h: usize, i, j| heads[h].visible(s.n_q, s.n_k, i, j);
    assert_close(&format!("duo heads, density {:.3}", built.density()), &got, &x, &s, &options, DType::F32, sees);
}

/// The dense options and the block mask that means the same give the same bits: the
/// sparse path visits the same tiles in the same order and masks the same elements.
#[test]
fn dense_options_equal_their_block_masks() {
    // A second device (see `second_ctx`): its pipelines compile beside the other tests'.
    let c = second_ctx();
    let opts = |causal, window, sinks| AttentionOptions { causal, window, sinks, ..Default::default() };
    let options = [
        opts(false, (-1, -1), 0),
        opts(true, (-1, -1), 0),
        opts(false, (20, 0), 0),
        opts(false, (16, 0), 4),
        opts(false, (5, 9), 0),
        opts(true, (48, -1), 3),
    ];
    let config = FlashConfig::for_adapter(c);
    for (n, lens) in [(113, 203), (203, 113), (256, 256)].into_iter().enumerate() {
        for (m, o) in options.iter().enumerate() {
            let dtype = dtypes()[(n + m) % dtypes().len()];
            let s = shape(1, (2, 2), lens, 64);
            let x = Inputs::random(&s, dtype, (10 * n + m) as u64);
            let (q, k, v) = x.upload(c, &s, dtype);
            let dense = download(c, &wattn::attention_with(c, &q, &k, &v, o, &config).unwrap());
            let built = BlockMask::new(&Mask::from_options(o), lens.0, lens.1, config.block_size()).unwrap();
            let masked =
                download(c, &wattn::attention_masked(c, &q, &k, &v, &built, &AttentionOptions::default()).unwrap());
            let what = format!("{o:?} N{}x{} {dtype}", lens.0, lens.1);
            assert!(
                dense.0 == masked.0 && dense.1.iter().zip(&masked.1).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what}: O or LSE differ"
            );
        }
    }
}

/// Dense options apply on top of a block mask, element by element.
#[test]
fn dense_options_apply_on_top_of_a_block_mask() {
    let c = ctx();
    let s = shape(1, (2, 1), (150, 170), 64);
    let docs = Mask::document_lengths(&[40, 1, 70, 59]).unwrap();
    let built = BlockMask::new(&docs, s.n_q, s.n_k, BlockSize::for_adapter(c)).unwrap();
    let options = AttentionOptions { causal: true, window: (30, -1), sinks: 2, ..Default::default() };
    let (x, got) = run_masked(c, &s, DType::F32, &built, &options, 31);
    assert_close("documents + dense causal window sinks", &got, &x, &s, &options, DType::F32, |_, _, i, j| {
        docs.visible(s.n_q, s.n_k, i, j)
    });
}

/// On an adapter that caps loop iterations, the keys are split into passes: each pass
/// starts at its first run and stops at its last key.
#[test]
fn key_passes_walk_the_runs() {
    let (device, queue) = own_device(ctx().device().features(), ctx().limits().clone());
    let capped = Context::from_wgpu(device, queue).with_loop_iteration_limit(4000);
    let s = shape(1, (2, 1), (70, 900), 32);
    let block = BlockSize::for_adapter(&capped);
    let config = FlashConfig::for_adapter(&capped);
    let passes = s.n_k.div_ceil(config.keys_per_pass(&s, capped.loop_iteration_limit()).unwrap() as usize);
    assert!(passes >= 3, "the cap should force several passes, got {passes}");
    let mut rng = Rng::new(8);
    let k_blocks = s.n_k.div_ceil(block.k as usize);
    let q_blocks = s.n_q.div_ceil(block.q as usize);
    let pattern = random_bools(&mut rng, q_blocks * k_blocks, 0.3);
    let heads = [
        Mask::blocks(block, q_blocks, k_blocks, &pattern).unwrap() | Mask::window(5, 5),
        Mask::document_lengths(&[300, 1, 599]).unwrap() & Mask::causal(),
    ];
    let built = BlockMask::per_head(&heads, s.n_q, s.n_k, block).unwrap();
    let (x, got) = run_masked(&capped, &s, DType::F32, &built, &AttentionOptions::default(), 4);
    let sees = |_, h: usize, i, j| heads[h].visible(s.n_q, s.n_k, i, j);
    assert_close(&format!("{passes} key passes"), &got, &x, &s, &AttentionOptions::default(), DType::F32, sees);
}

/// One uploaded mask serves several launches recorded into one encoder.
#[test]
fn an_uploaded_mask_serves_many_launches() {
    let c = ctx();
    let s = shape(1, (1, 1), (90, 90), 64);
    let mask = Mask::prefix_lm(20) & Mask::window(40, -1);
    let config = FlashConfig::for_adapter(c);
    let gpu_mask = BlockMask::new(&mask, s.n_q, s.n_k, config.block_size()).unwrap().upload(c).unwrap();
    let inputs: Vec<Inputs> = (0..3).map(|seed| Inputs::random(&s, DType::F32, 60 + seed)).collect();
    let mut encoder = c.device().create_command_encoder(&Default::default());
    let mut results = Vec::new();
    for x in &inputs {
        let (q, k, v) = x.upload(c, &s, DType::F32);
        let out = Tensor::zeros(c, &s.out_shape(), DType::F32).unwrap();
        let lse = Tensor::zeros(c, &s.lse_shape(), DType::F32).unwrap();
        let bufs = AttentionBuffers { q: q.view(), k: k.view(), v: v.view(), out: out.view(), lse: lse.view() };
        flash::encode(c, &mut encoder, &bufs, Some(&gpu_mask), &AttentionOptions::default(), &config).unwrap();
        results.push((q, k, v, out, lse));
    }
    c.submit_and_wait(encoder).unwrap();
    for (n, (x, r)) in inputs.iter().zip(&results).enumerate() {
        let got = (r.3.to_f32(c).unwrap(), r.4.to_f32(c).unwrap());
        assert_close(&format!("launch {n}"), &got, x, &s, &AttentionOptions::default(), DType::F32, |_, _, i, j| {
            mask.visible(s.n_q, s.n_k, i, j)
        });
    }
}

#[test]
fn bad_launches_are_errors() {
    let c = ctx();
    let s = shape(2, (4, 2), (40, 50), 32);
    let x = Inputs::random(&s, DType::F32, 1);
    let (q, k, v) = x.upload(c, &s, DType::F32);
    let block = BlockSize::for_adapter(c);
    let run = |mask: &BlockMask| wattn::attention_masked(c, &q, &k, &v, mask, &AttentionOptions::default()).map(|_| ());
    let err = |r: wattn::Result<()>| r.expect_err("should be refused").to_string();

    let wrong_len = BlockMask::new(&Mask::causal(), 40, 51, block).unwrap();
    assert!(err(run(&wrong_len)).contains("40 queries x 51 keys"));
    let three_heads = BlockMask::per_head(&[Mask::causal(), Mask::full(), Mask::causal()], 40, 50, block).unwrap();
    assert!(err(run(&three_heads)).contains("3 query heads"));
    let huge_blocks = BlockMask::new(&Mask::causal(), 40, 50, BlockSize::new(8192, 32)).unwrap();
    assert!(matches!(
        wattn::attention_masked(c, &q, &k, &v, &huge_blocks, &AttentionOptions::default()),
        Err(Error::Limit { .. })
    ));

    // encode with a mask and tiles other than the mask's blocks.
    let other =
        BlockMask::new(&Mask::causal(), 40, 50, BlockSize::new(block.q, block.k * 2)).unwrap().upload(c).unwrap();
    let out = Tensor::zeros(c, &s.out_shape(), DType::F32).unwrap();
    let lse = Tensor::zeros(c, &s.lse_shape(), DType::F32).unwrap();
    let bufs = AttentionBuffers { q: q.view(), k: k.view(), v: v.view(), out: out.view(), lse: lse.view() };
    let mut encoder = c.device().create_command_encoder(&Default::default());
    let config = FlashConfig::for_adapter(c);
    let e = err(flash::encode(c, &mut encoder, &bufs, Some(&other), &AttentionOptions::default(), &config));
    assert!(e.contains("with_block_size"), "{e}");
}

/// The header the host writes has the layout of the shader's `struct BlockMask`.
#[test]
fn mask_header_matches_the_shader() {
    let key = flash::validation_keys()
        .into_iter()
        .find(|k| k.label().contains("BLOCK_SPARSE=true"))
        .expect("a block-sparse variant");
    let module = naga::front::wgsl::parse_str(&key.source()).unwrap();
    let (_, ty) = module.types.iter().find(|(_, t)| t.name.as_deref() == Some("BlockMask")).expect("struct BlockMask");
    let naga::TypeInner::Struct { members, .. } = &ty.inner else { panic!("BlockMask is not a struct") };
    let wgsl: Vec<(String, u32)> = members.iter().map(|m| (m.name.clone().unwrap(), m.offset)).collect();
    use std::mem::offset_of;
    use wattn::mask::BlockMaskHeader as H;
    let rust = [
        ("batch", offset_of!(H, batch)),
        ("heads", offset_of!(H, heads)),
        ("q_blocks", offset_of!(H, q_blocks)),
        ("runs_at", offset_of!(H, runs_at)),
        ("bits_at", offset_of!(H, bits_at)),
        ("words", size_of::<H>()),
    ];
    let rust: Vec<(String, u32)> = rust.iter().map(|&(n, o)| (n.to_string(), o as u32)).collect();
    assert_eq!(wgsl, rust);
    assert_eq!(size_of::<wattn::mask::KvRun>(), 12, "runs are 3 words in the shader");
}
