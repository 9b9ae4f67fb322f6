//! `wattn shaders --emit DIR` end to end: every variant the crate builds is written with
//! its exact source, the manifest describes it, a page filling the uniform structs by
//! member name from the manifest gets the Rust host's bytes, and bad targets are refused
//! with one line, leaving nothing behind.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use wattn::attention::backward::PassRange;
use wattn::attention::flash::FlashParams;
use wattn::internals::{ConstValue, every_variant};
use wattn::kv::{cache::KvParams, combine::CombineParams, decode::DecodeParams};
use wattn::mask::BlockMaskHeader;

fn wattn(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wattn")).args(args).output().expect("running the wattn binary")
}

fn emit(dir: &Path) -> Output {
    wattn(&["shaders".as_ref(), "--emit".as_ref(), dir.as_os_str()])
}

/// A fresh, empty scratch directory for one test (the emission targets go inside it).
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wattn-emit-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn manifest(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

/// Runs `wattn shaders --emit` into a fresh directory once for the tests that read it.
fn emitted() -> &'static (PathBuf, Value) {
    static EMITTED: std::sync::OnceLock<(PathBuf, Value)> = std::sync::OnceLock::new();
    EMITTED.get_or_init(|| {
        let dir = scratch("shared").join("shaders");
        let out = emit(&dir);
        assert!(out.status.success(), "wattn shaders --emit failed: {}", String::from_utf8_lossy(&out.stderr));
        let manifest = manifest(&dir);
        (dir, manifest)
    })
}

#[test]
fn every_variant_is_written_with_its_source_and_description() {
    let (dir, manifest) = emitted();
    let keys = every_variant();
    let variants = manifest["variants"].as_array().unwrap();
    assert_eq!(variants.len(), keys.len(), "one manifest entry per variant");
    let mut files = vec!["manifest.json".to_string()];
    for (key, v) in keys.iter().zip(variants) {
        let file = v["file"].as_str().unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join(file)).unwrap(),
            key.webgpu_source(),
            "{file} is not the variant's source"
        );
        assert_eq!(v["label"], key.label());
        assert_eq!(v["kernel"], key.kernel.file_name().trim_end_matches(".wgsl"));
        assert_eq!(v["entry_point"], key.entry_point);
        assert_eq!(v["dtype"], key.dtype.to_string());
        for (name, value) in &key.constants {
            let want = match value {
                ConstValue::U32(x) => Value::from(*x),
                ConstValue::Bool(b) => Value::from(*b),
            };
            assert_eq!(v["constants"][name], want, "{}: constant {name}", key.label());
        }
        assert_eq!(v["constants"].as_object().unwrap().len(), key.constants.len());
        let size: u64 = v["workgroup_size"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).product();
        assert!(size > 0 && v["workgroup_memory_bytes"].as_u64().unwrap() % 16 == 0, "{}", key.label());
        assert!(!v["bindings"].as_array().unwrap().is_empty(), "{} lists no binding", key.label());
        files.push(file.to_string());
    }
    files.sort();
    assert_eq!(names_in(dir), files, "the directory holds exactly the manifest's files");
}

#[test]
fn flash_variants_describe_their_bindings_and_workgroup() {
    let (_, manifest) = emitted();
    let flash = manifest["variants"].as_array().unwrap().iter().find(|v| v["kernel"] == "flash_fwd").unwrap();
    let bindings: Vec<(u64, &str, &str, Option<&str>)> = flash["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["binding"].as_u64().unwrap(),
                b["name"].as_str().unwrap(),
                b["space"].as_str().unwrap(),
                b["access"].as_str(),
            )
        })
        .collect();
    let (read, write) = (Some("read"), Some("read_write"));
    assert_eq!(
        bindings,
        [
            (0, "params", "uniform", None),
            (1, "q", "storage", read),
            (2, "k", "storage", read),
            (3, "v", "storage", read),
            (4, "out", "storage", write),
            (5, "lse", "storage", write),
            (6, "state", "storage", write),
            (7, "block_mask", "storage", read),
            (8, "query_blocks", "storage", read),
        ]
    );
    let c = &flash["constants"];
    let [block_q, row_groups, split] = ["BLOCK_Q", "ROW_GROUPS", "SPLIT"].map(|name| c[name].as_u64().unwrap());
    let threads = block_q / (4 * row_groups) * split;
    assert_eq!(flash["workgroup_size"], serde_json::json!([threads, 1, 1]));
}

/// Distinct bits per field name (FNV-1a), so that a member filled under the wrong name shows.
fn bits_of(name: &str) -> u32 {
    name.bytes().fold(0x811c9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x01000193))
}

trait FromBits {
    fn from_bits(bits: u32) -> Self;
}
impl FromBits for u32 {
    fn from_bits(bits: u32) -> Self {
        bits
    }
}
impl FromBits for i32 {
    fn from_bits(bits: u32) -> Self {
        bits as i32
    }
}
impl FromBits for f32 {
    fn from_bits(bits: u32) -> Self {
        f32::from_bits(bits)
    }
}

/// The Rust struct with every field set to [`bits_of`] its name: `distinct!(Type { field, ... })`.
/// The struct literal makes the compiler check that the list is complete.
macro_rules! distinct {
    ($ty:ident { $($field:ident),* $(,)? }) => {
        $ty { $($field: FromBits::from_bits(bits_of(stringify!($field)))),* }
    };
}

/// The bytes a page writes for struct binding `binding` of the first `kernel` variant, filling
/// each member by name with [`bits_of`], as tools/webgpu/cases.js does; every variant of the
/// kernel must have the same layout. A trailing runtime-sized array is left out.
fn filled_by_name(manifest: &Value, kernel: &str, binding: &str) -> Vec<u8> {
    let layouts: Vec<&Value> = manifest["variants"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["kernel"] == kernel)
        .flat_map(|v| v["bindings"].as_array().unwrap().iter().filter(|b| b["name"] == binding))
        .map(|b| &b["layout"])
        .collect();
    assert!(!layouts.is_empty(), "no {kernel} variant binds {binding}");
    assert!(layouts.iter().all(|l| l == &layouts[0]), "{kernel} variants lay out {binding} differently");
    let members = layouts[0]["members"].as_array().unwrap();
    let runtime_array = members.iter().find(|m| m["type"].as_str().unwrap().starts_with("array<"));
    let size = runtime_array.map_or(layouts[0]["size"].as_u64().unwrap(), |m| m["offset"].as_u64().unwrap());
    let mut bytes = vec![0u8; size as usize];
    for m in members.iter().filter(|m| Some(*m) != runtime_array) {
        let (name, offset) = (m["name"].as_str().unwrap(), m["offset"].as_u64().unwrap() as usize);
        assert!(
            ["u32", "i32", "f32"].contains(&m["type"].as_str().unwrap()),
            "{kernel} {binding}.{name}: {}",
            m["type"]
        );
        bytes[offset..offset + 4].copy_from_slice(&bits_of(name).to_le_bytes());
    }
    bytes
}

#[test]
fn uniform_layouts_filled_by_name_give_the_rust_bytes() {
    let (_, manifest) = emitted();
    let flash = distinct!(FlashParams {
        batch,
        q_heads,
        kv_heads,
        n_q,
        n_k,
        d_qk,
        d_v,
        sinks,
        window_left,
        window_right,
        scale,
        softcap,
        key_begin,
        key_end,
        pass_flags,
        _pad
    });
    let decode = distinct!(DecodeParams {
        batch,
        q_heads,
        kv_heads,
        n_q,
        head_dim,
        capacity,
        len,
        seen,
        keys_per_split,
        rope,
        rope_sinks,
        rope_shift,
        scale,
        page_shift,
        sink_pages,
        sinks,
        window,
        scales_at,
        k_scales_at
    });
    let combine = distinct!(CombineParams { rows, dim, splits, groups_x });
    let kv = distinct!(KvParams {
        batch,
        kv_heads,
        q_heads,
        head_dim,
        capacity,
        seen,
        count,
        len,
        sinks,
        window,
        groups_x,
        scales_at,
        page_size,
        row_slots,
        k_scales_at
    });
    let mask = distinct!(BlockMaskHeader { batch, heads, q_blocks, runs_at, bits_at });
    let range = distinct!(PassRange { begin, end, flags, table_at });
    let cases: [(&str, &str, &[u8]); 9] = [
        ("flash_fwd", "params", bytemuck::bytes_of(&flash)),
        ("naive", "params", bytemuck::bytes_of(&flash)),
        ("decode", "params", bytemuck::bytes_of(&decode)),
        ("combine", "params", bytemuck::bytes_of(&combine)),
        ("kv_cache", "params", bytemuck::bytes_of(&kv)),
        ("flash_fwd", "block_mask", bytemuck::bytes_of(&mask)),
        ("flash_bwd", "params", bytemuck::bytes_of(&flash)),
        ("flash_bwd", "range", bytemuck::bytes_of(&range)),
        ("flash_bwd", "block_mask", bytemuck::bytes_of(&mask)),
    ];
    for (kernel, binding, rust) in cases {
        assert_eq!(filled_by_name(manifest, kernel, binding), rust, "{kernel}: {binding} filled by member name");
    }
}

#[test]
fn emitting_again_replaces_an_earlier_emission_whole() {
    let root = scratch("again");
    let dir = root.join("shaders");
    assert!(emit(&dir).status.success());
    std::fs::write(dir.join("stale.wgsl"), "left from an older build").unwrap();
    let out = emit(&dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!dir.join("stale.wgsl").exists(), "the old emission is replaced, not merged");
    assert_eq!(manifest(&dir)["variants"].as_array().unwrap().len(), every_variant().len());
    assert_eq!(names_in(&root), ["shaders"], "no temporary directory is left beside it");
}

/// One `wattn: error:` line naming the path, and the scratch directory as it was.
fn assert_refused(out: &Output, root: &Path, before: &[&str], says: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a refusal, got success");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("wattn: error: ") && stderr.contains(says), "unclear error: {stderr}");
    assert_eq!(names_in(root), before, "a refused emission leaves nothing behind");
}

#[test]
fn bad_targets_are_refused_with_nothing_written() {
    let root = scratch("refused");
    let missing_parent = root.join("no-such-dir").join("shaders");
    assert_refused(&emit(&missing_parent), &root, &[], "no-such-dir");

    // Someone else's directory is never replaced.
    let theirs = root.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("notes.txt"), "keep me").unwrap();
    assert_refused(&emit(&theirs), &root, &["theirs"], "holds no manifest.json");
    assert_eq!(std::fs::read_to_string(theirs.join("notes.txt")).unwrap(), "keep me");

    let file = root.join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    assert_refused(&emit(&file), &root, &["a-file", "theirs"], "is not a directory");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a directory");
}
