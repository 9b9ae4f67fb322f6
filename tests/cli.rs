//! The `wattn` binary end to end: .npy files written here (with this file's own minimal
//! .npy writer and reader, independent of `wattn::npy`), results compared with the f64
//! reference, and every kind of bad input refused with one line and no output file.

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
    let shape: Vec<usize> = dims.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    let data: Vec<f32> = bytes[start + header_len..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
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
}

impl Case {
    /// Runs the case and returns the LSE it wrote, after checking O and LSE.
    fn check(&self, name: &str) -> Vec<f32> {
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
        let run = wattn(&args);
        let stderr = text(&run.stderr);
        assert!(run.status.success(), "{name}: wattn run failed:\n{stderr}");
        assert!(stderr.lines().any(|l| l.starts_with("wattn run: ") && l.contains(" ms")), "{name}: no summary:\n{stderr}");

        let want = wattn::reference::attention(&read[0], &read[1], &read[2], &sh, &self.options);
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
        assert_eq!(s.files(), ["k.npy", "lse.npy", "out.npy", "q.npy", "v.npy"], "{name}: stray files");
        lse
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
    };
    let lse = case.check("f32-gqa-causal");
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
        "run", "--q", &s.arg("q.npy"), "--k", &s.arg("k.npy"), "--v", &s.arg("v.npy"), "--out", &s.arg("o.npy"),
        "--dtype", "f16", "--scale=-0.3", "--check",
    ]);
    let (stdout, stderr) = (text(&run.stdout), text(&run.stderr));
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains(" f16 ") && stderr.contains("scale -0.3"), "{stderr}");
    let line = stdout.lines().find(|l| l.contains("max |O - ref|")).unwrap_or_else(|| panic!("no check line:\n{stdout}"));
    // "max |O - ref| = 1.234e-4, max |LSE - ref| = 5.678e-5": both numbers small.
    for part in line.split(" = ").skip(1) {
        let number: f64 = part.split(',').next().unwrap().trim().parse().unwrap();
        assert!(number < 1e-2, "{line}");
    }
    assert_eq!(s.files(), ["k.npy", "o.npy", "q.npy", "v.npy"]);
    let (o_shape, _) = read_f32_npy(&s.path("o.npy"));
    assert_eq!(o_shape, [1, 2, 7, 24]);
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
    refused("missing", |s, f| { f.insert("q", s.arg("nope.npy")); }, &["nope.npy", "cannot read"]);
    refused("not-npy", |s, _| s.write("k.npy", b"1,2,3\n4,5,6\n"), &["k.npy", "not a .npy file"]);
    refused("truncated", |s, _| {
        let bytes = std::fs::read(s.path("v.npy")).unwrap();
        s.write("v.npy", &bytes[..bytes.len() - 3]);
    }, &["v.npy", "truncated"]);
    refused("fortran", |s, _| s.write("q.npy", &npy_bytes("<f4", true, &[2, 4, 16], &f32_le(&[0.0; 128]))), &["q.npy", "Fortran order"]);
    refused("int64", |s, _| s.write("k.npy", &npy_bytes("<i8", false, &[2, 6, 16], &[0; 8 * 192])), &["k.npy", "'<i8' is not supported"]);
    refused("float64", |s, _| s.write("v.npy", &npy_bytes("<f8", false, &[2, 6, 8], &[0; 8 * 96])), &["v.npy", "'<f8' is not supported"]);
    refused("mixed-dtypes", |s, _| s.write_array("k.npy", DType::F16, &[2, 6, 16], &[0.5; 192]), &["K is f16", "--dtype"]);
}

#[test]
fn bad_shapes_are_refused() {
    refused("rank-2", |s, _| f32_file(s, "q.npy", &[4, 16]), &["Q must have rank 3", "[4, 16]"]);
    refused("rank-5", |s, _| f32_file(s, "q.npy", &[1, 1, 2, 4, 16]), &["Q must have rank"]);
    refused("mixed-rank", |s, _| f32_file(s, "k.npy", &[1, 2, 6, 16]), &["K must have rank 3"]);
    refused("head-dim-mismatch", |s, _| f32_file(s, "k.npy", &[2, 6, 8]), &["Q head dim 16 differs from K head dim 8"]);
    refused("v-length", |s, _| f32_file(s, "v.npy", &[2, 7, 8]), &["V [1, 2, 7, 8]"]);
    refused("heads", |s, _| f32_file(s, "q.npy", &[3, 4, 16]), &["K has 2 heads and Q has 3"]);
    refused("batch", |s, _| {
        f32_file(s, "q.npy", &[2, 2, 4, 16]);
        f32_file(s, "k.npy", &[1, 2, 6, 16]);
        f32_file(s, "v.npy", &[1, 2, 6, 8]);
    }, &["batch sizes differ"]);
    refused("empty-keys", |s, _| {
        f32_file(s, "k.npy", &[2, 0, 16]);
        f32_file(s, "v.npy", &[2, 0, 8]);
    }, &["K is empty"]);
    refused("head-dim-300", |s, _| {
        f32_file(s, "q.npy", &[1, 1, 300]);
        f32_file(s, "k.npy", &[1, 1, 300]);
        f32_file(s, "v.npy", &[1, 1, 8]);
    }, &["head dim 300", "256"]);
    refused("check-too-big", |s, f| {
        f32_file(s, "q.npy", &[1, 16385, 1]);
        f32_file(s, "k.npy", &[1, 16385, 1]);
        f32_file(s, "v.npy", &[1, 16385, 1]);
        f.insert("check", String::new());
    }, &["--check", "2^28"]);
}

#[test]
fn bad_options_are_refused() {
    for (name, window) in [("window-text", "abc"), ("window-one", "3"), ("window-half", "1,x")] {
        refused(name, |_, f| { f.insert("window", window.into()); }, &["--window", window]);
    }
    refused("window-negative", |_, f| { f.insert("window", "-2,0".into()); }, &["window (-2, 0)"]);
    refused("scale-nan", |_, f| { f.insert("scale", "nan".into()); }, &["scale NaN is not finite"]);
    refused("softcap", |_, f| { f.insert("softcap", "-1".into()); }, &["softcap -1"]);
    refused("dtype-name", |_, f| { f.insert("dtype", "f64".into()); }, &["--dtype 'f64'"]);
    refused("backend-name", |_, f| { f.insert("backend", "glide".into()); }, &["unknown backend 'glide'"]);
    refused("adapter-name", |_, f| { f.insert("adapter", "no-such-gpu".into()); }, &["no-such-gpu"]);
    refused("same-outputs", |s, f| { f.insert("lse", s.arg("o.npy")); }, &["--out and --lse name the same file"]);
    refused("out-dir-missing", |s, f| { f.insert("out", s.arg("missing/o.npy")); }, &["missing/o.npy", "directory does not exist"]);
    refused("out-is-dir", |s, f| {
        std::fs::create_dir(s.path("sub")).unwrap();
        f.insert("lse", s.arg("sub"));
    }, &["is a directory"]);
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
    refused("f16-unsupported", |_, f| {
        f.insert("dtype", "f16".into());
        f.insert("backend", backend.into());
        f.insert("adapter", info.name.clone());
    }, &["shader-f16", &info.name]);
}
