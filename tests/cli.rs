//! The `wattn` binary end to end: .npy files written here (with this file's own minimal
//! .npy writer and reader, independent of `wattn::cli::npy`), results compared with the f64
//! reference (block-sparse runs with their masks written out here as plain predicates),
//! `wattn tune` and what `wattn info` then reports, the backward (`--grad`) against the
//! reference gradients, varlen runs (`--seqlens-q`, `--seqlens-k`, with the mask flags per
//! sequence) against the reference per sequence, and every kind of bad input refused with one line and no output file.

mod common;

use common::{Rng, ctx, max_abs_err, quantize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use wattn::{AttentionOptions, AttentionShape, DType};

// ---------------------------------------------------------------------------------------
// A minimal .npy format 1.0 writer and reader.

/// A .npy file: magic, version 1.0, header length, a dict padded with spaces so the data
/// starts at a multiple of 64 bytes, then the raw data.
fn npy_bytes(descr: &str, fortran_order: bool, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: String = shape.iter().map(|d| format!("{d}, ")).collect();
    let order = if fortran_order { "True" } else { "False" };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': ({dims}), }}");
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((dict.len() as u16).to_le_bytes());
    bytes.extend(dict.as_bytes());
    bytes.extend(data);
    bytes
}

fn f32_le(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_le(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect()
}

fn i32_le(data: &[i32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Sequence lengths as int32 or uint32, 1-D.
fn lengths_npy(lengths: &[i32], unsigned: bool) -> Vec<u8> {
    npy_bytes(if unsigned { "<u4" } else { "<i4" }, false, &[lengths.len()], &i32_le(lengths))
}

/// A bool mask as `|b1` (`uint8` false) or `|u1` with arbitrary non-zero values for true.
fn mask_npy(shape: &[usize], bits: &[bool], uint8: bool) -> Vec<u8> {
    let raw: Vec<u8> = bits
        .iter()
        .enumerate()
        .map(|(n, &b)| {
            if !b {
                0
            } else if uint8 {
                1 + (n % 255) as u8
            } else {
                1
            }
        })
        .collect();
    npy_bytes(if uint8 { "|u1" } else { "|b1" }, false, shape, &raw)
}

/// Reads a little-endian float32 C-order .npy file: (shape, data).
fn read_f32_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}", path.display());
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
    };
    let dict = std::str::from_utf8(&bytes[start..start + header_len]).unwrap();
    assert!(dict.contains("'descr': '<f4'") && dict.contains("'fortran_order': False"), "{dict}");
    let dims = dict.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape: Vec<usize> =
        dims.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    let data: Vec<f32> =
        bytes[start + header_len..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(data.len(), shape.iter().product::<usize>(), "{}", path.display());
    (shape, data)
}

// ---------------------------------------------------------------------------------------
// Scratch directories and running the binary.

/// A fresh directory under the system temp dir, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("wattn-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    fn arg(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_owned()
    }
    fn write(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.path(name), bytes).unwrap();
    }
    /// Writes `data` as float32 or float16, as `dtype` says.
    /// Random float32 files (name, shape), and what they hold.
    fn write_random(&self, files: &[(&str, Vec<usize>)], rng: &mut Rng) -> Vec<Vec<f32>> {
        let write = |(name, dims): &(&str, Vec<usize>)| {
            let values = rng.normal_vec(dims.iter().product());
            self.write_array(name, DType::F32, dims, &values);
            values
        };
        files.iter().map(write).collect()
    }

    fn write_array(&self, name: &str, dtype: DType, shape: &[usize], data: &[f32]) {
        let (descr, raw) = match dtype {
            DType::F32 => ("<f4", f32_le(data)),
            DType::F16 => ("<f2", f16_le(data)),
        };
        self.write(name, &npy_bytes(descr, false, shape, &raw));
    }
    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(&self.0).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn wattn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wattn")).args(args).output().expect("running the wattn binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---------------------------------------------------------------------------------------
// Correct runs.

/// One `wattn run` on random inputs, checked against the reference.
struct Case {
    /// 4-D files; otherwise 3-D with batch 1.
    batched: bool,
    shape: AttentionShape,
    /// The dtype of the files.
    file_dtype: DType,
    /// The GPU's storage dtype (differs from `file_dtype` when `--dtype` is passed).
    storage: DType,
    options: AttentionOptions,
    args: &'static [&'static str],
    /// Block-sparse inputs: (flag, .npy bytes), written to FLAG.npy and passed as --FLAG.
    files: Vec<(&'static str, Vec<u8>)>,
    /// Whether query `i` of batch `b`, head `h` sees key `j` beside the options (the
    /// block-sparse flags' meaning, written out here).
    sees: Sees,
}

/// A predicate over (batch, query head, query, key).
type Sees = Box<dyn Fn(usize, usize, usize, usize) -> bool>;

fn dense() -> Sees {
    Box::new(|_, _, _, _| true)
}

/// What a successful run printed.
struct Ran {
    lse: Vec<f32>,
    stdout: String,
    stderr: String,
}

impl Case {
    /// Runs the case and returns what it printed and the LSE it wrote, after checking O and LSE.
    fn check(&self, name: &str) -> Ran {
        let s = Scratch::new(name);
        let sh = self.shape;
        let mut rng = Rng::new(name.len() as u64 * 7919);
        let dims = |h, n, d| if self.batched { vec![sh.batch, h, n, d] } else { vec![h, n, d] };
        let inputs = [
            ("q.npy", dims(sh.q_heads, sh.n_q, sh.d_qk)),
            ("k.npy", dims(sh.kv_heads, sh.n_k, sh.d_qk)),
            ("v.npy", dims(sh.kv_heads, sh.n_k, sh.d_v)),
        ];
        let mut read = Vec::new();
        for (file, shape) in &inputs {
            let data = rng.normal_vec(shape.iter().product());
            s.write_array(file, self.file_dtype, shape, &data);
            // The reference sees what the GPU reads: the file's values rounded to storage.
            read.push(quantize(&quantize(&data, self.file_dtype), self.storage));
        }
        let mut args = vec!["run".to_owned()];
        for flag in ["q", "k", "v", "out", "lse"] {
            args.push(format!("--{flag}"));
            args.push(s.arg(&format!("{flag}.npy")));
        }
        args.extend(self.args.iter().map(|a| a.to_string()));
        for (flag, bytes) in &self.files {
            s.write(&format!("{flag}.npy"), bytes);
            args.push(format!("--{flag}"));
            args.push(s.arg(&format!("{flag}.npy")));
        }
        let run = wattn(&args);
        let (stdout, stderr) = (text(&run.stdout), text(&run.stderr));
        assert!(run.status.success(), "{name}: wattn run failed:\n{stderr}");
        assert!(
            stderr.lines().any(|l| l.starts_with("wattn run: ") && l.contains(" ms")),
            "{name}: no summary:\n{stderr}"
        );

        let want = wattn::reference::attention_masked(&read[0], &read[1], &read[2], &sh, &self.options, &self.sees);
        let (o_shape, out) = read_f32_npy(&s.path("out.npy"));
        let (lse_shape, lse) = read_f32_npy(&s.path("lse.npy"));
        let skip = if self.batched { 0 } else { 1 };
        assert_eq!(o_shape, sh.out_shape()[skip..], "{name}: O shape");
        assert_eq!(lse_shape, sh.lse_shape()[skip..], "{name}: LSE shape");
        let (o_tol, lse_tol) = match self.storage {
            DType::F32 => (1e-5, 1e-5),
            DType::F16 => (2e-3, 1e-4),
        };
        let o_err = max_abs_err(&out, &want.out);
        let lse_err = max_abs_err(&lse, &want.lse);
        eprintln!("{name}: max error O {o_err:.2e}, LSE {lse_err:.2e}");
        assert!(o_err <= o_tol, "{name}: O error {o_err} > {o_tol}");
        assert!(lse_err <= lse_tol, "{name}: LSE error {lse_err} > {lse_tol}");
        let mut expected_files: Vec<String> =
            ["k.npy", "lse.npy", "out.npy", "q.npy", "v.npy"].map(String::from).into();
        expected_files.extend(self.files.iter().map(|(flag, _)| format!("{flag}.npy")));
        expected_files.sort();
        assert_eq!(s.files(), expected_files, "{name}: stray files");
        Ran { lse, stdout, stderr }
    }
}

/// The two numbers of `--check`'s line, each below `tolerance`.
fn assert_check_line(stdout: &str, tolerance: f64) {
    let line =
        stdout.lines().find(|l| l.contains("max |O - ref|")).unwrap_or_else(|| panic!("no check line:\n{stdout}"));
    // "max |O - ref| = 1.234e-4, max |LSE - ref| = 5.678e-5": both numbers small.
    for part in line.split(" = ").skip(1) {
        let number: f64 = part.split(',').next().unwrap().trim().parse().unwrap();
        assert!(number < tolerance, "{line}");
    }
}

#[test]
fn f32_4d_gqa_causal_with_more_queries_than_keys() {
    let shape = AttentionShape { batch: 2, q_heads: 4, kv_heads: 2, n_q: 9, n_k: 5, d_qk: 32, d_v: 16 };
    let case = Case {
        batched: true,
        shape,
        file_dtype: DType::F32,
        storage: DType::F32,
        options: AttentionOptions::causal(),
        args: &["--causal"],
        files: Vec::new(),
        sees: dense(),
    };
    let lse = case.check("f32-gqa-causal").lse;
    // Bottom-right causal: query i sees keys j <= i + Nk - Nq, so the first 4 rows see none.
    for (row, value) in lse.iter().enumerate() {
        let i = row % shape.n_q;
        assert_eq!(value.is_infinite(), i < 4, "LSE row {row} (query {i}) = {value}");
        assert!(!value.is_nan());
    }
}

#[test]
fn f16_3d_window_sinks_softcap_with_more_keys_than_queries() {
    let options = AttentionOptions { window: (8, 0), sinks: 2, softcap: 5.0, ..Default::default() };
    Case {
        batched: false,
        shape: AttentionShape { batch: 1, q_heads: 2, kv_heads: 2, n_q: 5, n_k: 33, d_qk: 64, d_v: 64 },
        file_dtype: DType::F16,
        storage: DType::F16,
        options,
        args: &["--window", "8,0", "--sinks", "2", "--softcap", "5"],
        files: Vec::new(),
        sees: dense(),
    }
    .check("f16-3d-window");
}

#[test]
fn dtype_option_converts_f32_files_and_check_reports_errors() {
    let s = Scratch::new("dtype-check");
    let shape = [1, 2, 7, 24];
    let mut rng = Rng::new(11);
    for file in ["q.npy", "k.npy", "v.npy"] {
        s.write_array(file, DType::F32, &shape, &rng.normal_vec(shape.iter().product()));
    }
    let run = wattn(&[
        "run",
        "--q",
        &s.arg("q.npy"),
        "--k",
        &s.arg("k.npy"),
        "--v",
        &s.arg("v.npy"),
        "--out",
        &s.arg("o.npy"),
        "--dtype",
        "f16",
        "--scale=-0.3",
        "--check",
    ]);
    let (stdout, stderr) = (text(&run.stdout), text(&run.stderr));
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains(" f16 ") && stderr.contains("scale -0.3"), "{stderr}");
    assert_check_line(&stdout, 1e-2);
    assert_eq!(s.files(), ["k.npy", "o.npy", "q.npy", "v.npy"]);
    let (o_shape, _) = read_f32_npy(&s.path("o.npy"));
    assert_eq!(o_shape, [1, 2, 7, 24]);
}

/// `--grad` runs the backward after the forward with the same options and mask flags, and
/// writes dQ, dK, dV as float32 in the inputs' layouts (3-D here), next to O.
#[test]
fn grad_writes_the_reference_gradients() {
    let s = Scratch::new("grad");
    let shape = AttentionShape { batch: 1, q_heads: 4, kv_heads: 2, n_q: 40, n_k: 50, d_qk: 24, d_v: 20 };
    let ids: Vec<i32> = (0..50).map(|j| if j < 30 { 0 } else { 1 }).collect();
    let options = AttentionOptions { causal: true, window: (20, -1), softcap: 3.0, ..Default::default() };
    let mut rng = Rng::new(21);
    let files = [
        ("q.npy", vec![4, 40, 24]),
        ("k.npy", vec![2, 50, 24]),
        ("v.npy", vec![2, 50, 20]),
        ("do.npy", vec![4, 40, 20]),
    ];
    let data = s.write_random(&files, &mut rng);
    s.write("ids.npy", &npy_bytes("<i4", false, &[50], &i32_le(&ids)));
    let mut args: Vec<String> = ["run", "--causal", "--window", "20,-1", "--softcap", "3"].map(String::from).into();
    for (flag, file) in [
        ("q", "q"),
        ("k", "k"),
        ("v", "v"),
        ("out", "o"),
        ("grad", "do"),
        ("dq", "dq"),
        ("dk", "dk"),
        ("dv", "dv"),
        ("doc-ids", "ids"),
    ] {
        args.extend([format!("--{flag}"), s.arg(&format!("{file}.npy"))]);
    }
    let run = wattn(&args);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert_eq!(s.files(), ["dk.npy", "do.npy", "dq.npy", "dv.npy", "ids.npy", "k.npy", "o.npy", "q.npy", "v.npy"]);
    // Bottom-right: query i sits at key position i + 10, and sees its own document.
    let sees = |_: usize, _: usize, i: usize, j: usize| same_document(&ids, 40, i, j);
    let want =
        wattn::reference::attention_backward_masked(&data[0], &data[1], &data[2], &data[3], &shape, &options, sees);
    for (file, dims, want) in
        [("dq.npy", [4, 40, 24], &want.dq), ("dk.npy", [2, 50, 24], &want.dk), ("dv.npy", [2, 50, 20], &want.dv)]
    {
        let (got_shape, got) = read_f32_npy(&s.path(file));
        assert_eq!(got_shape, dims, "{file}");
        let err = max_abs_err(&got, want);
        eprintln!("{file}: max error {err:.2e}");
        assert!(err < 1e-5, "{file}: error {err}");
    }
}

// ---------------------------------------------------------------------------------------
// Block-sparse runs: --mask, --doc-ids, --prefix, --block-size.

fn random_bits(rng: &mut Rng, n: usize, density: f64) -> Vec<bool> {
    (0..n).map(|_| ((rng.next_u64() >> 11) as f64) < density * (1u64 << 53) as f64).collect()
}

/// The key position query `i` of `n_q` is aligned to among `n_k` keys (bottom-right).
fn position(n_q: usize, n_k: usize, i: usize) -> i64 {
    i as i64 + n_k as i64 - n_q as i64
}

/// "Query `i` and key `j` are in the same document": the document of a query is that of
/// the key position it is aligned to; a query before the first key has none.
fn same_document(ids: &[i32], n_q: usize, i: usize, j: usize) -> bool {
    let p = position(n_q, ids.len(), i);
    p >= 0 && ids[p as usize] == ids[j]
}

/// The block-mask summary line `wattn run` prints, e.g. "block mask 37 x 45, blocks of 16x32, ... density 0.4".
fn mask_line(stderr: &str) -> &str {
    stderr.lines().find(|l| l.starts_with("wattn run: block mask")).unwrap_or_else(|| panic!("no mask line:\n{stderr}"))
}

/// One varlen `wattn run` on random packed 3-D inputs: sequences of `lengths` (queries,
/// keys), files in `dtype`, `heads` (Hq, Hkv) and head dims `dims` (Dqk, Dv), the flags
/// `args` and the mask files `files` (flag, .npy bytes), with `--check`. O and LSE are
/// compared, sequence by sequence, with the f64 reference where query `i` of sequence `s`,
/// head `h` also needs `sees(s, h, i, j)` to see key `j` (indices within the sequence).
/// Returns what the run printed (stdout, stderr) and the O and LSE it wrote.
#[allow(clippy::too_many_arguments)]
fn check_varlen(
    name: &str,
    lengths: (&[u32], &[u32]),
    dtype: DType,
    heads: (usize, usize),
    dims: (usize, usize),
    options: &AttentionOptions,
    args: &[&str],
    files: &[(&str, Vec<u8>)],
    sees: impl Fn(usize, usize, usize, usize) -> bool,
) -> (String, String, Vec<f32>, Vec<f32>) {
    let s = Scratch::new(name);
    let seqlens = wattn::SeqLens::new(lengths.0, lengths.1).unwrap();
    let (total_q, total_k) = (seqlens.total_q(), seqlens.total_k());
    let shape = AttentionShape {
        batch: 1,
        q_heads: heads.0,
        kv_heads: heads.1,
        n_q: total_q,
        n_k: total_k,
        d_qk: dims.0,
        d_v: dims.1,
    };
    let mut rng = Rng::new(name.len() as u64 * 31);
    let mut read = Vec::new();
    for (file, dims) in [
        ("q.npy", [heads.0, total_q, dims.0]),
        ("k.npy", [heads.1, total_k, dims.0]),
        ("v.npy", [heads.1, total_k, dims.1]),
    ] {
        let data = rng.normal_vec(dims.iter().product());
        s.write_array(file, dtype, &dims, &data);
        read.push(quantize(&data, dtype));
    }
    let to_i32 = |n: &[u32]| n.iter().map(|&n| n as i32).collect::<Vec<i32>>();
    s.write("lq.npy", &lengths_npy(&to_i32(lengths.0), false));
    s.write("lk.npy", &lengths_npy(&to_i32(lengths.1), true));
    let mut argv: Vec<String> = vec!["run".into(), "--check".into()];
    argv.extend(args.iter().map(|a| a.to_string()));
    for (flag, file) in
        [("q", "q"), ("k", "k"), ("v", "v"), ("out", "out"), ("lse", "lse"), ("seqlens-q", "lq"), ("seqlens-k", "lk")]
    {
        argv.extend([format!("--{flag}"), s.arg(&format!("{file}.npy"))]);
    }
    for (flag, bytes) in files {
        s.write(&format!("{flag}.npy"), bytes);
        argv.extend([format!("--{flag}"), s.arg(&format!("{flag}.npy"))]);
    }
    let run = wattn(&argv);
    let (stdout, stderr) = (text(&run.stdout), text(&run.stderr));
    assert!(run.status.success(), "{name}: wattn run failed:\n{stderr}");
    let (max_q, max_k) = (seqlens.max_q(), seqlens.max_k());
    let summary = format!("varlen {} sequences, longest {max_q} x {max_k}", seqlens.len());
    assert!(stderr.contains(&summary), "{name}: {stderr}");
    let (o_tol, lse_tol) = match dtype {
        DType::F32 => (1e-5, 1e-5),
        DType::F16 => (2e-3, 1e-4),
    };
    assert_check_line(&stdout, o_tol);

    let want = wattn::reference::attention_varlen_masked(&read[0], &read[1], &read[2], &shape, &seqlens, options, sees);
    let (o_shape, out) = read_f32_npy(&s.path("out.npy"));
    let (lse_shape, lse) = read_f32_npy(&s.path("lse.npy"));
    assert_eq!((o_shape, lse_shape), (vec![heads.0, total_q, dims.1], vec![heads.0, total_q]), "{name}");
    let (o_err, lse_err) = (max_abs_err(&out, &want.out), max_abs_err(&lse, &want.lse));
    eprintln!("{name}: max error O {o_err:.2e}, LSE {lse_err:.2e}");
    assert!(o_err <= o_tol && lse_err <= lse_tol, "{name}: O error {o_err}, LSE error {lse_err}");
    let mut expected_files: Vec<String> =
        ["k.npy", "lk.npy", "lq.npy", "lse.npy", "out.npy", "q.npy", "v.npy"].map(String::from).into();
    expected_files.extend(files.iter().map(|(flag, _)| format!("{flag}.npy")));
    expected_files.sort();
    assert_eq!(s.files(), expected_files, "{name}: stray files");
    (stdout, stderr, out, lse)
}

/// Packed 3-D inputs of sequences of 5 x 3, 0 x 4, 6 x 0 (rows that see nothing) and 1 x 9
/// queries x keys, lengths in int32 and uint32, every dense option; O and LSE packed.
#[test]
fn varlen_runs_each_sequence_alone_with_every_option() {
    let options = AttentionOptions { causal: true, window: (6, -1), sinks: 1, softcap: 3.0, ..Default::default() };
    let args = ["--causal", "--window", "6,-1", "--sinks", "1", "--softcap", "3"];
    let lengths: (&[u32], &[u32]) = (&[5, 0, 6, 1], &[3, 4, 0, 9]);
    let (_, _, out, lse) =
        check_varlen("varlen", lengths, DType::F16, (4, 2), (24, 8), &options, &args, &[], |_, _, _, _| true);
    // The third sequence (rows 5..11 of each head) has no keys: LSE -inf, O zeros.
    for h in 0..4 {
        assert!(lse[h * 12 + 5..h * 12 + 11].iter().all(|&x| x == f32::NEG_INFINITY), "head {h}: {lse:?}");
        assert!(out[(h * 12 + 5) * 8..(h * 12 + 11) * 8].iter().all(|&x| x == 0.0), "head {h}");
    }
}

/// `--grad` with `--seqlens-q/-k`: the varlen backward after the varlen forward, each
/// sequence's gradients those of its own attention (a sequence without queries gets zero dK
/// and dV, one without keys zero dQ), packed like the inputs, and `--check` reports them.
#[test]
fn varlen_grad_writes_each_sequences_gradients() {
    let s = Scratch::new("varlen-grad");
    let seqlens = wattn::SeqLens::new(&[5, 0, 6, 1, 30], &[3, 4, 0, 9, 41]).unwrap();
    let (total_q, total_k) = (seqlens.total_q(), seqlens.total_k());
    let shape = AttentionShape { batch: 1, q_heads: 4, kv_heads: 2, n_q: total_q, n_k: total_k, d_qk: 24, d_v: 20 };
    let options = AttentionOptions { causal: true, window: (6, -1), softcap: 3.0, ..Default::default() };
    let mut rng = Rng::new(23);
    let files = [
        ("q.npy", vec![4, total_q, 24]),
        ("k.npy", vec![2, total_k, 24]),
        ("v.npy", vec![2, total_k, 20]),
        ("do.npy", vec![4, total_q, 20]),
    ];
    let data = s.write_random(&files, &mut rng);
    s.write("lq.npy", &lengths_npy(&[5, 0, 6, 1, 30], false));
    s.write("lk.npy", &lengths_npy(&[3, 4, 0, 9, 41], true));
    let mut args: Vec<String> =
        ["run", "--check", "--causal", "--window", "6,-1", "--softcap", "3"].map(String::from).into();
    for flag in ["q", "k", "v", "out", "grad", "dq", "dk", "dv", "seqlens-q", "seqlens-k"] {
        let file = match flag {
            "grad" => "do",
            "seqlens-q" => "lq",
            "seqlens-k" => "lk",
            f => f,
        };
        args.extend([format!("--{flag}"), s.arg(&format!("{file}.npy"))]);
    }
    let run = wattn(&args);
    let stdout = text(&run.stdout);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(stdout.contains("max |dQ - ref|"), "--check reports the gradients: {stdout}");
    let files_written =
        ["dk.npy", "do.npy", "dq.npy", "dv.npy", "k.npy", "lk.npy", "lq.npy", "out.npy", "q.npy", "v.npy"];
    assert_eq!(s.files(), files_written);
    let want = wattn::reference::attention_varlen_backward_masked(
        &data[0],
        &data[1],
        &data[2],
        &data[3],
        &shape,
        &seqlens,
        &options,
        |_, _, _, _| true,
    );
    for (file, dims, want) in [
        ("dq.npy", [4, total_q, 24], &want.dq),
        ("dk.npy", [2, total_k, 24], &want.dk),
        ("dv.npy", [2, total_k, 20], &want.dv),
    ] {
        let (got_shape, got) = read_f32_npy(&s.path(file));
        assert_eq!(got_shape, dims, "{file}");
        let err = max_abs_err(&got, want);
        eprintln!("{file}: max error {err:.2e}");
        assert!(err < 1e-5, "{file}: error {err}");
    }
}

/// Varlen with a per-sequence, per-head element mask (a padded batch: each sequence's
/// top-left corner of [S, Hq, longest Nq, longest Nk]) and document ids packed like K, causal
/// bottom-right per sequence: sequences with more keys than queries, more queries than keys
/// (queries before the first key see nothing), no keys, one query and one key.
#[test]
fn varlen_mask_per_sequence_and_head_with_packed_document_ids() {
    let (lq, lk): (&[u32], &[u32]) = (&[20, 33, 1, 6, 1], &[35, 21, 0, 6, 1]);
    let (max_q, max_k, heads) = (33, 35, 2);
    let bits = random_bits(&mut Rng::new(21), lq.len() * heads * max_q * max_k, 0.75);
    // Sequence 0: documents of 10, 1 and 24 keys; sequence 1: runs of 8 (ids restart per
    // sequence); sequence 3: one document; sequence 4: its only key.
    let per_sequence: [Vec<i32>; 5] = [
        (0..35)
            .map(|p| {
                if p < 10 {
                    0
                } else if p < 11 {
                    2
                } else {
                    5
                }
            })
            .collect(),
        (0..21).map(|p| p / 8).collect(),
        Vec::new(),
        vec![7; 6],
        vec![0],
    ];
    let ids: Vec<i32> = per_sequence.concat();
    let files = [
        ("mask", mask_npy(&[lq.len(), heads, max_q, max_k], &bits, true)),
        ("doc-ids", npy_bytes("<i4", false, &[ids.len()], &i32_le(&ids))),
    ];
    let sees = |s: usize, h: usize, i: usize, j: usize| {
        bits[((s * heads + h) * max_q + i) * max_k + j] && same_document(&per_sequence[s], lq[s] as usize, i, j)
    };
    let (_, stderr, _, lse) = check_varlen(
        "varlen-mask-docs",
        (lq, lk),
        DType::F32,
        (heads, 1),
        (32, 16),
        &AttentionOptions::causal(),
        &["--causal"],
        &files,
        sees,
    );
    let line = mask_line(&stderr);
    assert!(line.contains("33 x 35") && line.contains("density"), "{line}");
    assert!(stderr.contains("block-sparse mask [5, 2, 33, 35] & doc-ids [63]"), "{stderr}");
    // Sequence 1 (rows 20..52) has 12 more queries than keys: its first 12 queries see nothing.
    assert!(lse[20..32].iter().all(|&x| x == f32::NEG_INFINITY), "{:?}", &lse[20..53]);
}

/// Varlen prefix-LM (each sequence's first keys, causal after, bottom-right per sequence)
/// with a window, a mask broadcast to every sequence and head, and small blocks drawn.
#[test]
fn varlen_prefix_lm_with_a_window_a_broadcast_mask_and_small_blocks() {
    let (lq, lk): (&[u32], &[u32]) = (&[17, 1, 30, 9], &[17, 12, 26, 40]);
    let (max_q, max_k, prefix) = (30, 40, 5);
    let bits = random_bits(&mut Rng::new(4), max_q * max_k, 0.8);
    let options = AttentionOptions { window: (10, -1), ..Default::default() };
    let sees = |s: usize, _: usize, i: usize, j: usize| {
        let diagonal = i as i64 + lk[s] as i64 - lq[s] as i64;
        bits[i * max_k + j] && (j < prefix || j as i64 <= diagonal)
    };
    let files = [("mask", mask_npy(&[max_q, max_k], &bits, false))];
    let args = ["--prefix", "5", "--window", "10,-1", "--block-size", "8,16", "--show-mask"];
    let (_, stderr, _, _) =
        check_varlen("varlen-prefix", (lq, lk), DType::F32, (2, 2), (16, 16), &options, &args, &files, sees);
    let line = mask_line(&stderr);
    assert!(line.contains("30 x 40") && line.contains("blocks of 8x16"), "{line}");
}

#[test]
fn two_dimensional_bool_mask_with_causal_and_block_size() {
    let shape = AttentionShape { batch: 1, q_heads: 2, kv_heads: 2, n_q: 37, n_k: 45, d_qk: 32, d_v: 32 };
    let bits = random_bits(&mut Rng::new(5), 37 * 45, 0.6);
    let ran = Case {
        batched: false,
        shape,
        file_dtype: DType::F32,
        storage: DType::F32,
        options: AttentionOptions::causal(),
        args: &["--causal", "--block-size", "16,32", "--show-mask"],
        files: vec![("mask", mask_npy(&[37, 45], &bits, false))],
        sees: Box::new(move |_, _, i, j| bits[i * 45 + j]),
    }
    .check("mask-2d-bool");
    let line = mask_line(&ran.stderr);
    assert!(line.contains("37 x 45") && line.contains("blocks of 16x32") && line.contains("density"), "{line}");
    // --show-mask draws 3 rows of 2 blocks: causal with 8 more keys than queries leaves the
    // last key block of the first query block empty.
    let after_mask_line = ran.stderr.lines().skip_while(|l| !l.starts_with("wattn run: block mask")).skip(1);
    let drawing: Vec<&str> = after_mask_line.take(3).collect();
    assert_eq!(drawing.len(), 3, "{}", ran.stderr);
    assert!(drawing.iter().all(|l| l.len() == 2 && l.chars().all(|c| "#+.".contains(c))), "{drawing:?}");
    assert_eq!(&drawing[0][1..], ".", "{drawing:?}");
}

#[test]
fn four_dimensional_uint8_mask_broadcast_over_the_batch_with_a_fully_masked_row() {
    let shape = AttentionShape { batch: 2, q_heads: 4, kv_heads: 2, n_q: 40, n_k: 40, d_qk: 16, d_v: 24 };
    let mut bits = random_bits(&mut Rng::new(8), 4 * 40 * 40, 0.3);
    // Head 2, query 5 sees nothing: zeros and LSE -inf.
    bits[(2 * 40 + 5) * 40..][..40].fill(false);
    let ran = Case {
        batched: true,
        shape,
        file_dtype: DType::F32,
        storage: DType::F32,
        options: AttentionOptions::default(),
        args: &["--check"],
        files: vec![("mask", mask_npy(&[1, 4, 40, 40], &bits, true))],
        sees: Box::new(move |_, h, i, j| bits[(h * 40 + i) * 40 + j]),
    }
    .check("mask-4d-uint8");
    assert_check_line(&ran.stdout, 1e-5);
    for b in 0..2 {
        assert_eq!(ran.lse[(b * 4 + 2) * 40 + 5], f32::NEG_INFINITY, "batch {b}");
    }
    assert!(mask_line(&ran.stderr).contains("density"));
}

#[test]
fn per_batch_mask_and_document_ids_in_f16() {
    let shape = AttentionShape { batch: 2, q_heads: 2, kv_heads: 1, n_q: 24, n_k: 30, d_qk: 32, d_v: 32 };
    let bits = random_bits(&mut Rng::new(13), 2 * 24 * 30, 0.7);
    // Batch 0: documents of 11, 1 and 18 keys (ids need not be consecutive); batch 1: runs of 7.
    let first = (0..30).map(|p| {
        if p < 11 {
            0
        } else if p < 12 {
            4
        } else {
            9
        }
    });
    let ids: Vec<i32> = first.chain((0..30).map(|p| p / 7)).collect();
    let ids_bytes = npy_bytes("<i4", false, &[2, 30], &i32_le(&ids));
    Case {
        batched: true,
        shape,
        file_dtype: DType::F16,
        storage: DType::F16,
        options: AttentionOptions::default(),
        args: &[],
        files: vec![("mask", mask_npy(&[2, 1, 24, 30], &bits, false)), ("doc-ids", ids_bytes)],
        sees: Box::new(move |b, _, i, j| bits[(b * 24 + i) * 30 + j] && same_document(&ids[b * 30..][..30], 24, i, j)),
    }
    .check("mask-docs-f16");
}

#[test]
fn document_ids_with_causal_both_ways_round() {
    // More keys than queries, then more queries than keys (the first 12 queries see nothing).
    for (n_q, n_k, name) in [(20, 50, "docs-more-keys"), (62, 50, "docs-more-queries")] {
        let ids: Vec<i32> =
            (0..n_k as i32).map(|p| [0, 3, 3, 7][(p as usize * 4 / n_k).min(3)] + (p > 45) as i32).collect();
        let ids_in_test = ids.clone();
        let ran = Case {
            batched: false,
            shape: AttentionShape { batch: 1, q_heads: 2, kv_heads: 2, n_q, n_k, d_qk: 64, d_v: 64 },
            file_dtype: DType::F32,
            storage: DType::F32,
            options: AttentionOptions::causal(),
            args: &["--causal"],
            files: vec![("doc-ids", npy_bytes("<i4", false, &[n_k], &i32_le(&ids)))],
            sees: Box::new(move |_, _, i, j| same_document(&ids_in_test, n_q, i, j)),
        }
        .check(name);
        let hidden = ran.lse.iter().take(n_q).filter(|x| x.is_infinite()).count();
        assert_eq!(hidden, n_q.saturating_sub(n_k), "{name}");
    }
}

#[test]
fn prefix_lm_with_a_window_and_small_blocks() {
    let (n, prefix) = (33, 7);
    Case {
        batched: false,
        shape: AttentionShape { batch: 1, q_heads: 3, kv_heads: 3, n_q: n, n_k: n, d_qk: 48, d_v: 16 },
        file_dtype: DType::F32,
        storage: DType::F32,
        options: AttentionOptions { window: (12, -1), softcap: 4.0, ..Default::default() },
        args: &["--prefix", "7", "--window", "12,-1", "--softcap", "4", "--block-size", "8,16"],
        files: Vec::new(),
        sees: Box::new(move |_, _, i, j| j < prefix || j <= i),
    }
    .check("prefix-lm");
}

#[test]
fn info_names_the_chosen_adapter() {
    let run = wattn(&["info"]);
    let stdout = text(&run.stdout);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let chosen = stdout.lines().find(|l| l.starts_with("chosen: ")).unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(chosen, format!("chosen: {}", ctx().describe()));
    for needle in ["shader-f16", "subgroups", "timestamps", "workgroup storage", "storage binding", "flash config"] {
        assert!(stdout.contains(needle), "info lacks {needle}:\n{stdout}");
    }
}

/// `wattn` with its tuning cache at `cache`.
fn wattn_tuned<S: AsRef<std::ffi::OsStr>>(cache: &Path, args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wattn"))
        .env("WATTN_TUNE_CACHE", cache)
        .args(args)
        .output()
        .expect("running the wattn binary")
}

/// `wattn info`'s line for a bucket, e.g. "f32 d64 causal".
fn info_line(stdout: &str, bucket: &str) -> String {
    let line = stdout.lines().find(|l| l.trim_start().starts_with(&format!("{bucket} ")));
    line.unwrap_or_else(|| panic!("no line for {bucket}:\n{stdout}")).trim().to_owned()
}

const TINY_TUNE: [&str; 12] =
    ["tune", "--seq", "64", "--heads", "1", "--head-dim", "64", "--dtype", "f32", "--causal", "true", "--runs"];

#[test]
fn tune_saves_the_winner_where_the_variable_says_and_info_reports_it() {
    let s = Scratch::new("tune");
    // A directory that does not exist yet: the first save makes it.
    let cache = s.path("cache/tuning");
    let json = s.path("tune.json");
    let before = wattn_tuned(&cache, &["info"]);
    assert!(before.status.success(), "{}", text(&before.stderr));
    let stdout = text(&before.stdout);
    assert!(stdout.contains(&format!("tuning cache: {} (none yet", cache.display())), "{stdout}");
    assert!(info_line(&stdout, "f32 d64 causal").contains("preset"), "{stdout}");

    let run = wattn_tuned(&cache, &[&TINY_TUNE[..], &["1", "--json", json.to_str().unwrap()]].concat());
    let stdout = text(&run.stdout);
    assert!(run.status.success(), "{}\n{stdout}", text(&run.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let result = &report["results"][0];
    assert_eq!((result["bucket"].as_str(), result["causal"].as_bool()), (Some("f32 d64 causal"), Some(true)));
    let winner = result["winner"].as_str().unwrap().to_owned();
    let candidates = result["candidates"].as_array().unwrap();
    assert!(candidates.len() >= 2, "{result}");
    for c in candidates {
        assert_eq!(c["accurate"], true, "{c}");
        assert!(
            c["median_s"].as_f64().unwrap() > 0.0
                && c["out_error"].as_f64().unwrap() <= c["out_bound"].as_f64().unwrap(),
            "{c}"
        );
        assert!(stdout.contains(c["config"].as_str().unwrap()), "{stdout}");
    }
    assert!(
        stdout.contains(&format!("winner {winner}")) && stdout.contains(&format!("saved to {}", cache.display())),
        "{stdout}"
    );
    let saved = std::fs::read_to_string(&cache).unwrap();
    assert!(
        saved.starts_with("wattn-tuning 1\n") && saved.contains(&format!("\t64\t64\tf32\ttrue\t{winner}\t64\t")),
        "{saved}"
    );
    assert_eq!(std::fs::read_dir(s.path("cache")).unwrap().count(), 1, "no temporary file is left");

    let after = wattn_tuned(&cache, &["info"]);
    let stdout = text(&after.stdout);
    assert!(
        after.status.success() && text(&after.stderr).lines().all(|l| !l.starts_with("wattn")),
        "{}",
        text(&after.stderr)
    );
    assert!(stdout.contains(&format!("tuning cache: {} (1 entries", cache.display())), "{stdout}");
    assert_eq!(
        info_line(&stdout, "f32 d64 causal"),
        format!("f32 d64 causal   {winner:<12} tuned, from {}", cache.display())
    );
    assert!(info_line(&stdout, "f32 d64 dense").contains("preset"), "only the tuned bucket is tuned:\n{stdout}");
    assert!(info_line(&stdout, "f32 d128 causal").contains("preset"), "{stdout}");
}

#[test]
fn a_corrupt_tuning_cache_is_ignored_with_a_warning() {
    let s = Scratch::new("tune-corrupt");
    let cache = s.path("tuning");
    let good_line = "llvmpipe\tVulkan\tMesa\t0.1.0\t64\t64\tf32\tfalse\t32,4,4,4,1\t512\t1.5";
    for (name, bytes, warning) in [
        ("binary", vec![0x93, 0xff, 0x00, 0x12], "not text"),
        ("foreign", b"wattn-tuning 9\nwhatever\n".to_vec(), "is not a wattn-tuning 1 file"),
        ("bad lines", format!("wattn-tuning 1\n{good_line}\nhalf\ta line\n").into_bytes(), "line 3 skipped: 2 fields"),
    ] {
        std::fs::write(&cache, &bytes).unwrap();
        let info = wattn_tuned(&cache, &["info"]);
        let stderr = text(&info.stderr);
        assert!(info.status.success(), "{name}: {stderr}");
        let ours: Vec<&str> = stderr.lines().filter(|l| l.starts_with("wattn")).collect();
        assert_eq!(ours.len(), 1, "{name}: {stderr}");
        assert!(
            ours[0].starts_with("wattn: warning: tuning cache ") && ours[0].contains(warning),
            "{name}: {}",
            ours[0]
        );
        assert!(info_line(&text(&info.stdout), "f32 d64 causal").contains("preset"), "{name}");
        assert_eq!(std::fs::read(&cache).unwrap(), bytes, "{name}: info does not write the cache");
    }
    // Tuning warns too, then replaces the file with a valid one that keeps the good entries.
    let run = wattn_tuned(&cache, &[&TINY_TUNE[..], &["1"]].concat());
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(text(&run.stderr).contains("wattn: warning: tuning cache"), "{}", text(&run.stderr));
    let saved = std::fs::read_to_string(&cache).unwrap();
    assert!(saved.contains(good_line) && !saved.contains("half") && saved.lines().count() == 4, "{saved}");
}

#[test]
fn bad_tune_options_are_refused_with_one_line() {
    let s = Scratch::new("tune-bad");
    let cache = s.path("tuning");
    for (args, needle) in [
        (&["tune", "--head-dim", "64,64,64"][..], "--head-dim takes D or D,DV"),
        (&["tune", "--head-dim", "300", "--dtype", "f32", "--causal", "false"], "head dim 300"),
        (&["tune", "--runs", "0"], "--runs"),
        (&["tune", "--seq", "0"], "not a sequence length"),
    ] {
        let run = wattn_tuned(&cache, args);
        let stderr = text(&run.stderr);
        assert!(!run.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!cache.exists(), "{args:?} wrote the cache");
    }
}

// ---------------------------------------------------------------------------------------
// Bad input: one line naming the problem, non-zero exit, no output written.

/// Valid 3-D inputs: Q [2, 4, 16], K [2, 6, 16], V [2, 6, 8].
fn write_valid_inputs(s: &Scratch) {
    let mut rng = Rng::new(3);
    s.write_array("q.npy", DType::F32, &[2, 4, 16], &rng.normal_vec(2 * 4 * 16));
    s.write_array("k.npy", DType::F32, &[2, 6, 16], &rng.normal_vec(2 * 6 * 16));
    s.write_array("v.npy", DType::F32, &[2, 6, 8], &rng.normal_vec(2 * 6 * 8));
}

/// Command-line flags of one run; a flag with an empty value is a switch.
type Flags = BTreeMap<&'static str, String>;

/// Runs `wattn run` on valid inputs after `spoil` changes files or flags, and checks that
/// it fails with one `wattn: error:` line containing every string of `expect`, leaving
/// the directory as it was (pre-existing o.npy and lse.npy untouched).
fn refused(name: &str, spoil: impl FnOnce(&Scratch, &mut Flags), expect: &[&str]) {
    let s = Scratch::new(&format!("bad-{name}"));
    write_valid_inputs(&s);
    s.write("o.npy", b"previous O");
    s.write("lse.npy", b"previous LSE");
    let mut flags = Flags::new();
    for flag in ["q", "k", "v"] {
        flags.insert(flag, s.arg(&format!("{flag}.npy")));
    }
    flags.insert("out", s.arg("o.npy"));
    flags.insert("lse", s.arg("lse.npy"));
    spoil(&s, &mut flags);
    let before = s.files();

    let mut args = vec!["run".to_owned()];
    for (flag, value) in &flags {
        args.push(format!("--{flag}"));
        if !value.is_empty() {
            args.push(value.clone());
        }
    }
    let run = wattn(&args);
    let stderr = text(&run.stderr);
    assert!(!run.status.success(), "{name}: succeeded on bad input");
    // Drivers may print their own notices; wattn's part is exactly one line.
    let ours: Vec<&str> = stderr.lines().filter(|l| l.starts_with("wattn")).collect();
    assert_eq!(ours.len(), 1, "{name}: expected one line from wattn:\n{stderr}");
    assert!(ours[0].starts_with("wattn: error: "), "{name}: {}", ours[0]);
    for needle in expect {
        assert!(ours[0].contains(needle), "{name}: message lacks '{needle}': {}", ours[0]);
    }
    assert_eq!(s.files(), before, "{name}: files changed");
    assert_eq!(std::fs::read(s.path("o.npy")).unwrap(), b"previous O", "{name}: o.npy clobbered");
    assert_eq!(std::fs::read(s.path("lse.npy")).unwrap(), b"previous LSE", "{name}: lse.npy clobbered");
}

fn f32_file(s: &Scratch, name: &str, shape: &[usize]) {
    s.write_array(name, DType::F32, shape, &vec![0.5; shape.iter().product()]);
}

#[test]
fn bad_files_are_refused() {
    refused(
        "missing",
        |s, f| {
            f.insert("q", s.arg("nope.npy"));
        },
        &["nope.npy", "cannot read"],
    );
    refused("not-npy", |s, _| s.write("k.npy", b"1,2,3\n4,5,6\n"), &["k.npy", "not a .npy file"]);
    refused(
        "truncated",
        |s, _| {
            let bytes = std::fs::read(s.path("v.npy")).unwrap();
            s.write("v.npy", &bytes[..bytes.len() - 3]);
        },
        &["v.npy", "truncated"],
    );
    refused(
        "fortran",
        |s, _| s.write("q.npy", &npy_bytes("<f4", true, &[2, 4, 16], &f32_le(&[0.0; 128]))),
        &["q.npy", "Fortran order"],
    );
    refused(
        "int64",
        |s, _| s.write("k.npy", &npy_bytes("<i8", false, &[2, 6, 16], &[0; 8 * 192])),
        &["k.npy", "'<i8' is not supported"],
    );
    refused(
        "float64",
        |s, _| s.write("v.npy", &npy_bytes("<f8", false, &[2, 6, 8], &[0; 8 * 96])),
        &["v.npy", "'<f8' is not supported"],
    );
    refused(
        "mixed-dtypes",
        |s, _| s.write_array("k.npy", DType::F16, &[2, 6, 16], &[0.5; 192]),
        &["K is f16", "--dtype"],
    );
}

#[test]
fn bad_shapes_are_refused() {
    refused("rank-2", |s, _| f32_file(s, "q.npy", &[4, 16]), &["Q must have rank 3", "[4, 16]"]);
    refused("rank-5", |s, _| f32_file(s, "q.npy", &[1, 1, 2, 4, 16]), &["Q must have rank"]);
    refused("mixed-rank", |s, _| f32_file(s, "k.npy", &[1, 2, 6, 16]), &["K must have rank 3"]);
    refused("head-dim-mismatch", |s, _| f32_file(s, "k.npy", &[2, 6, 8]), &["Q head dim 16 differs from K head dim 8"]);
    refused("v-length", |s, _| f32_file(s, "v.npy", &[2, 7, 8]), &["V [1, 2, 7, 8]"]);
    refused("heads", |s, _| f32_file(s, "q.npy", &[3, 4, 16]), &["K has 2 heads and Q has 3"]);
    refused(
        "batch",
        |s, _| {
            f32_file(s, "q.npy", &[2, 2, 4, 16]);
            f32_file(s, "k.npy", &[1, 2, 6, 16]);
            f32_file(s, "v.npy", &[1, 2, 6, 8]);
        },
        &["batch sizes differ"],
    );
    refused(
        "empty-keys",
        |s, _| {
            f32_file(s, "k.npy", &[2, 0, 16]);
            f32_file(s, "v.npy", &[2, 0, 8]);
        },
        &["K is empty"],
    );
    refused(
        "head-dim-300",
        |s, _| {
            f32_file(s, "q.npy", &[1, 1, 300]);
            f32_file(s, "k.npy", &[1, 1, 300]);
            f32_file(s, "v.npy", &[1, 1, 8]);
        },
        &["head dim 300", "256"],
    );
    refused(
        "check-too-big",
        |s, f| {
            f32_file(s, "q.npy", &[1, 16385, 1]);
            f32_file(s, "k.npy", &[1, 16385, 1]);
            f32_file(s, "v.npy", &[1, 16385, 1]);
            f.insert("check", String::new());
        },
        &["--check", "2^28"],
    );
}

#[test]
fn bad_backward_inputs_are_refused() {
    let with_grad = |f: &mut Flags, s: &Scratch, skip: &str| {
        for (flag, file) in [("grad", "do.npy"), ("dq", "dq.npy"), ("dk", "dk.npy"), ("dv", "dv.npy")] {
            if flag != skip {
                f.insert(flag, s.arg(file));
            }
        }
    };
    refused(
        "grad-without-dv",
        |s, f| {
            f32_file(s, "do.npy", &[2, 4, 8]);
            with_grad(f, s, "dv");
        },
        &["--grad, --dq, --dk and --dv go together", "missing --dv"],
    );
    refused(
        "dq-alone",
        |s, f| {
            f.insert("dq", s.arg("dq.npy"));
        },
        &["missing --grad, --dk, --dv"],
    );
    refused(
        "grad-shape",
        |s, f| {
            f32_file(s, "do.npy", &[2, 4, 16]);
            with_grad(f, s, "");
        },
        &["do.npy", "dO has shape [2, 4, 16], expected O's [2, 4, 8]"],
    );
    refused(
        "grad-same-file",
        |s, f| {
            f32_file(s, "do.npy", &[2, 4, 8]);
            with_grad(f, s, "");
            f.insert("dk", s.arg("dq.npy"));
        },
        &["--dq and --dk name the same file"],
    );
}

#[test]
fn bad_block_sparse_inputs_are_refused() {
    // The valid inputs are 3-D: 2 heads, 4 queries, 6 keys.
    let mask = |shape: &'static [usize], bits: usize| {
        move |s: &Scratch, f: &mut Flags| {
            s.write("m.npy", &mask_npy(shape, &vec![true; bits], false));
            f.insert("mask", s.arg("m.npy"));
        }
    };
    refused("mask-shape", mask(&[4, 5], 20), &["m.npy", "mask shape [4, 5] does not broadcast"]);
    refused("mask-heads", mask(&[1, 3, 4, 6], 72), &["m.npy", "does not broadcast"]);
    refused("mask-batch", mask(&[2, 1, 4, 6], 48), &["m.npy", "does not broadcast"]);
    refused(
        "mask-int64",
        |s, f| {
            s.write("m.npy", &npy_bytes("<i8", false, &[4, 6], &[0; 8 * 24]));
            f.insert("mask", s.arg("m.npy"));
        },
        &["m.npy", "'<i8' is not supported: use bool or uint8"],
    );
    let ids = |shape: &'static [usize], values: &'static [i32]| {
        move |s: &Scratch, f: &mut Flags| {
            s.write("ids.npy", &npy_bytes("<i4", false, shape, &i32_le(values)));
            f.insert("doc-ids", s.arg("ids.npy"));
        }
    };
    refused("ids-length", ids(&[5], &[0, 0, 1, 1, 1]), &["ids.npy", "do not fit"]);
    refused("ids-order", ids(&[6], &[0, 0, 1, 0, 1, 1]), &["ids.npy", "non-decreasing", "ids[3] = 0"]);
    refused("ids-negative", ids(&[6], &[-1, 0, 0, 0, 0, 0]), &["ids.npy", ">= 0"]);
    refused(
        "ids-float",
        |s, f| {
            f32_file(s, "ids.npy", &[6]);
            f.insert("doc-ids", s.arg("ids.npy"));
        },
        &["ids.npy", "use int32"],
    );
    let block = |size: &'static str| {
        move |_: &Scratch, f: &mut Flags| {
            f.insert("block-size", size.into());
        }
    };
    refused("block-threads", block("32,33"), &["multiple of 4"]);
    refused("block-limit", block("8192,32"), &["workgroup", "max_compute_invocations_per_workgroup"]);
    refused("block-text", block("32"), &["--block-size '32'"]);
    refused("block-zero", block("0,32"), &["--block-size '0,32'"]);
    refused(
        "show-mask-alone",
        |_, f| {
            f.insert("show-mask", String::new());
        },
        &["--show-mask"],
    );
}

#[test]
fn bad_varlen_inputs_are_refused() {
    // The valid inputs pack 4 queries and 6 keys per head.
    let lengths = |s: &Scratch, f: &mut Flags, q: &[u8], k: &[u8]| {
        s.write("lq.npy", q);
        s.write("lk.npy", k);
        f.insert("seqlens-q", s.arg("lq.npy"));
        f.insert("seqlens-k", s.arg("lk.npy"));
    };
    refused(
        "varlen-query-sum",
        |s, f| lengths(s, f, &lengths_npy(&[1, 2], false), &lengths_npy(&[6, 0], false)),
        &["query lengths sum to 3, but Q pack 4 rows"],
    );
    refused(
        "varlen-key-sum",
        |s, f| lengths(s, f, &lengths_npy(&[1, 3], true), &lengths_npy(&[6, 1], true)),
        &["key lengths sum to 7, but K and V pack 6 rows"],
    );
    refused(
        "varlen-count",
        |s, f| lengths(s, f, &lengths_npy(&[4], false), &lengths_npy(&[3, 3], false)),
        &["1 query lengths but 2 key lengths"],
    );
    refused(
        "varlen-negative",
        |s, f| lengths(s, f, &lengths_npy(&[5, -1], false), &lengths_npy(&[6, 0], false)),
        &["lq.npy", "length 1 is -1"],
    );
    refused(
        "varlen-2d",
        |s, f| lengths(s, f, &npy_bytes("<i4", false, &[1, 2], &i32_le(&[1, 3])), &lengths_npy(&[6, 0], false)),
        &["lq.npy", "1-D"],
    );
    refused(
        "varlen-float",
        |s, f| lengths(s, f, &npy_bytes("<f4", false, &[2], &f32_le(&[1.0, 3.0])), &lengths_npy(&[6, 0], false)),
        &["lq.npy", "use int32 or uint32"],
    );
    refused(
        "varlen-alone",
        |s, f| {
            s.write("lq.npy", &lengths_npy(&[1, 3], false));
            f.insert("seqlens-q", s.arg("lq.npy"));
        },
        &["--seqlens-q and --seqlens-k go together"],
    );
    refused(
        "varlen-grad-shape",
        |s, f| {
            lengths(s, f, &lengths_npy(&[1, 3], false), &lengths_npy(&[6, 0], false));
            f32_file(s, "do.npy", &[2, 4, 7]);
            for (flag, file) in [("grad", "do.npy"), ("dq", "dq.npy"), ("dk", "dk.npy"), ("dv", "dv.npy")] {
                f.insert(flag, s.arg(file));
            }
        },
        &["dO has shape [2, 4, 7], expected O's [2, 4, 8]"],
    );
}

#[test]
fn bad_varlen_mask_inputs_are_refused() {
    // The valid inputs pack 4 queries and 6 keys per head: sequences of 1 x 2 and 3 x 4.
    let packed = |s: &Scratch, f: &mut Flags| {
        s.write("lq.npy", &lengths_npy(&[1, 3], false));
        s.write("lk.npy", &lengths_npy(&[2, 4], false));
        f.insert("seqlens-q", s.arg("lq.npy"));
        f.insert("seqlens-k", s.arg("lk.npy"));
    };
    let mask = |shape: &'static [usize]| {
        move |s: &Scratch, f: &mut Flags| {
            packed(s, f);
            s.write("m.npy", &mask_npy(shape, &vec![true; shape.iter().product()], false));
            f.insert("mask", s.arg("m.npy"));
        }
    };
    // The packed problem's [Nq, Nk] is not the varlen layout: the longest sequence's 3 x 4 is.
    let layout = ["m.npy", "does not broadcast to [S, Hq, Nq, Nk] = [2, 2, 3, 4]", "top-left corner"];
    refused("varlen-mask-packed", mask(&[4, 6]), &layout);
    refused("varlen-mask-sequences", mask(&[3, 1, 3, 4]), &layout);
    refused("varlen-mask-heads", mask(&[2, 3, 3, 4]), &layout);
    refused(
        "varlen-mask-float",
        |s, f| {
            packed(s, f);
            f32_file(s, "m.npy", &[3, 4]);
            f.insert("mask", s.arg("m.npy"));
        },
        &["m.npy", "'<f4' is not supported: use bool or uint8"],
    );
    let ids = |shape: &'static [usize], values: &'static [i32]| {
        move |s: &Scratch, f: &mut Flags| {
            packed(s, f);
            s.write("ids.npy", &npy_bytes("<i4", false, shape, &i32_le(values)));
            f.insert("doc-ids", s.arg("ids.npy"));
        }
    };
    refused("varlen-ids-length", ids(&[4], &[0, 0, 1, 1]), &["ids.npy", "do not fit 6 packed keys", "[total_k]"]);
    refused("varlen-ids-2d", ids(&[2, 3], &[0, 0, 0, 1, 1, 1]), &["ids.npy", "do not fit 6 packed keys"]);
    // Ids restart per sequence (key 2 starts sequence 1), but within one they must not decrease.
    refused(
        "varlen-ids-order",
        ids(&[6], &[3, 3, 0, 1, 1, 0]),
        &["ids.npy", "sequence 1: document ids must be non-decreasing", "ids[3] = 0 follows ids[2] = 1"],
    );
    refused("varlen-ids-negative", ids(&[6], &[0, 0, 0, -2, 0, 0]), &["ids.npy", ">= 0", "index 3"]);
    refused(
        "varlen-ids-float",
        |s, f| {
            packed(s, f);
            f32_file(s, "ids.npy", &[6]);
            f.insert("doc-ids", s.arg("ids.npy"));
        },
        &["ids.npy", "use int32"],
    );
    refused(
        "varlen-block-size",
        |s, f| {
            packed(s, f);
            f.insert("block-size", "32,33".into());
        },
        &["multiple of 4"],
    );
}

#[test]
fn bad_options_are_refused() {
    for (name, window) in [("window-text", "abc"), ("window-one", "3"), ("window-half", "1,x")] {
        refused(
            name,
            |_, f| {
                f.insert("window", window.into());
            },
            &["--window", window],
        );
    }
    refused(
        "window-negative",
        |_, f| {
            f.insert("window", "-2,0".into());
        },
        &["window (-2, 0)"],
    );
    refused(
        "scale-nan",
        |_, f| {
            f.insert("scale", "nan".into());
        },
        &["scale NaN is not finite"],
    );
    refused(
        "softcap",
        |_, f| {
            f.insert("softcap", "-1".into());
        },
        &["softcap -1"],
    );
    refused(
        "dtype-name",
        |_, f| {
            f.insert("dtype", "f64".into());
        },
        &["--dtype 'f64'"],
    );
    refused(
        "backend-name",
        |_, f| {
            f.insert("backend", "glide".into());
        },
        &["unknown backend 'glide'"],
    );
    refused(
        "adapter-name",
        |_, f| {
            f.insert("adapter", "no-such-gpu".into());
        },
        &["no-such-gpu"],
    );
    refused(
        "same-outputs",
        |s, f| {
            f.insert("lse", s.arg("o.npy"));
        },
        &["--out and --lse name the same file"],
    );
    refused(
        "out-dir-missing",
        |s, f| {
            f.insert("out", s.arg("missing/o.npy"));
        },
        &["missing/o.npy", "directory does not exist"],
    );
    refused(
        "out-is-dir",
        |s, f| {
            std::fs::create_dir(s.path("sub")).unwrap();
            f.insert("lse", s.arg("sub"));
        },
        &["is a directory"],
    );
}

/// f16 storage needs shader-f16; an adapter without it must refuse rather than compute.
/// Mesa's OpenGL llvmpipe lacks it; where every adapter has it, there is nothing to refuse.
#[test]
fn f16_on_an_adapter_without_shader_f16_is_refused() {
    let adapters = wattn::context::enumerate_adapters(&Default::default());
    let Some(adapter) = adapters.iter().find(|a| !wattn::Capabilities::of(a.features()).shader_f16) else {
        eprintln!("note: every adapter here has shader-f16; the refusal cannot be exercised");
        return;
    };
    let info = adapter.get_info();
    let backend = match info.backend {
        wgpu::Backend::Vulkan => "vulkan",
        wgpu::Backend::Metal => "metal",
        wgpu::Backend::Dx12 => "dx12",
        _ => "gl",
    };
    refused(
        "f16-unsupported",
        |_, f| {
            f.insert("dtype", "f16".into());
            f.insert("backend", backend.into());
            f.insert("adapter", info.name.clone());
        },
        &["shader-f16", &info.name],
    );
}
