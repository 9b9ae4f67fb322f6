//! `wattn shaders --emit DIR`: every shader variant the crate builds, as WGSL files, and a
//! `manifest.json` that says what each one is (kernel, entry point, dtype, constants) and
//! how to run it (bindings, uniform struct layouts, workgroup size and memory), read from
//! naga's reflection of the parsed source. Other WGSL implementations check the files
//! against it: `tools/webgpu-check.sh` compiles and runs them in Chromium's WebGPU.

use crate::error::{Error, Result};
use crate::shader::{ConstValue, ShaderKey, every_variant};
use naga::common::wgsl::TypeContext;
use naga::valid::{Capabilities, ValidationFlags, Validator};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct ShadersArgs {
    /// Write every variant as DIR/NNN-<label>.wgsl plus DIR/manifest.json. DIR must be new,
    /// empty, or hold an earlier emission (which is replaced whole).
    #[arg(long, value_name = "DIR")]
    pub emit: PathBuf,
}

pub fn run(args: ShadersArgs) -> Result<()> {
    // Refused before the seconds of validation below, not after.
    let replaces_earlier = check_target(&args.emit)?;
    let keys = every_variant();
    let mut files: Vec<(String, String)> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| (format!("{i:03}-{}.wgsl", file_label(key)), key.webgpu_source()))
        .collect();
    // naga's validation of some 600 variants takes seconds: spread it over the cores.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = keys.len().div_ceil(threads);
    let variants: Vec<Result<Variant>> = std::thread::scope(|s| {
        let workers: Vec<_> = keys
            .chunks(chunk)
            .zip(files.chunks(chunk))
            .map(|(keys, files)| {
                s.spawn(move || {
                    keys.iter()
                        .zip(files)
                        .map(|(key, (file, _))| describe(key, &key.source(), file))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("describing a variant does not panic")).collect()
    });
    let variants = variants.into_iter().collect::<Result<Vec<_>>>()?;
    let manifest = Manifest { wattn: env!("CARGO_PKG_VERSION"), variants };
    let json = serde_json::to_string_pretty(&manifest).expect("the manifest is plain data");
    files.push((MANIFEST.to_string(), json + "\n"));
    write_directory(&args.emit, replaces_earlier, &files)?;
    println!("wrote {} shader variants and {MANIFEST} to {}", keys.len(), args.emit.display());
    Ok(())
}

const MANIFEST: &str = "manifest.json";

#[derive(Serialize)]
struct Manifest {
    wattn: &'static str,
    variants: Vec<Variant>,
}

#[derive(Serialize)]
struct Variant {
    file: String,
    label: String,
    /// The kernel's WGSL file without `.wgsl`: `flash_fwd`, `decode`, ...
    kernel: &'static str,
    entry_point: &'static str,
    dtype: String,
    /// Whether the variant uses subgroup operations (the WebGPU feature `subgroups`).
    subgroups: bool,
    constants: BTreeMap<&'static str, serde_json::Value>,
    workgroup_size: [u32; 3],
    /// The entry point's workgroup variables, each rounded up to 16 bytes as Dawn counts
    /// them against `maxComputeWorkgroupStorageSize`.
    workgroup_memory_bytes: u32,
    /// The buffers the entry point uses, as a `layout: 'auto'` pipeline has them.
    bindings: Vec<Binding>,
}

#[derive(Serialize)]
struct Binding {
    group: u32,
    binding: u32,
    name: String,
    /// `uniform` or `storage`.
    space: &'static str,
    /// `read` or `read_write` for storage buffers.
    #[serde(skip_serializing_if = "Option::is_none")]
    access: Option<&'static str>,
    #[serde(rename = "type")]
    ty: String,
    /// Present when the buffer's type is a struct.
    #[serde(skip_serializing_if = "Option::is_none")]
    layout: Option<StructLayout>,
}

#[derive(Serialize)]
struct StructLayout {
    size: u32,
    members: Vec<Member>,
}

#[derive(Serialize)]
struct Member {
    name: String,
    offset: u32,
    #[serde(rename = "type")]
    ty: String,
}

/// The label as a file name: `flash_fwd-main-f32-BLOCK_Q=16-...`.
fn file_label(key: &ShaderKey) -> String {
    key.label().replace(".wgsl:", "-").replace(' ', "-")
}

/// The manifest entry of one variant, from naga's parse and validation of `source`.
fn describe(key: &ShaderKey, source: &str, file: &str) -> Result<Variant> {
    let rejected = |e: String| Error::Gpu(format!("naga rejects shader variant {}: {e}", key.label()));
    let module = naga::front::wgsl::parse_str(source).map_err(|e| rejected(e.emit_to_string(source)))?;
    let info = Validator::new(ValidationFlags::all(), Capabilities::all())
        .validate(&module)
        .map_err(|e| rejected(e.emit_to_string(source)))?;
    let (index, entry) = module
        .entry_points
        .iter()
        .enumerate()
        .find(|(_, e)| e.name == key.entry_point)
        .ok_or_else(|| rejected(format!("no entry point {}", key.entry_point)))?;
    let uses = info.get_entry_point(index);
    let ctx = module.to_ctx();
    let mut bindings = Vec::new();
    let mut workgroup_memory_bytes = 0;
    for (handle, global) in module.global_variables.iter() {
        if uses[handle].is_empty() {
            continue;
        }
        let ty = &module.types[global.ty];
        match global.space {
            naga::AddressSpace::WorkGroup => {
                let size = ty.inner.try_size(ctx).ok_or_else(|| rejected("a workgroup array is too large".into()))?;
                workgroup_memory_bytes += size.next_multiple_of(16);
            }
            naga::AddressSpace::Uniform | naga::AddressSpace::Storage { .. } => {
                let Some(rb) = &global.binding else { continue };
                let (space, access) = match global.space {
                    naga::AddressSpace::Uniform => ("uniform", None),
                    naga::AddressSpace::Storage { access } if access.contains(naga::StorageAccess::STORE) => {
                        ("storage", Some("read_write"))
                    }
                    _ => ("storage", Some("read")),
                };
                let layout = match &ty.inner {
                    naga::TypeInner::Struct { members, span } => Some(StructLayout {
                        size: *span,
                        members: members
                            .iter()
                            .map(|m| Member {
                                name: m.name.clone().unwrap_or_default(),
                                offset: m.offset,
                                ty: ctx.type_to_string(m.ty),
                            })
                            .collect(),
                    }),
                    _ => None,
                };
                bindings.push(Binding {
                    group: rb.group,
                    binding: rb.binding,
                    name: global.name.clone().unwrap_or_default(),
                    space,
                    access,
                    ty: ctx.type_to_string(global.ty),
                    layout,
                });
            }
            _ => {}
        }
    }
    bindings.sort_by_key(|b| (b.group, b.binding));
    let constants = key
        .constants
        .iter()
        .map(|&(name, value)| {
            let value = match value {
                ConstValue::U32(x) => serde_json::Value::from(x),
                ConstValue::Bool(b) => serde_json::Value::from(b),
            };
            (name, value)
        })
        .collect();
    Ok(Variant {
        file: file.to_string(),
        label: key.label(),
        kernel: key.kernel.file_name().trim_end_matches(".wgsl"),
        entry_point: key.entry_point,
        dtype: key.dtype.to_string(),
        subgroups: key.uses_subgroups(),
        constants,
        workgroup_size: entry.workgroup_size,
        workgroup_memory_bytes,
        bindings,
    })
}

/// Whether `dir` may be written: it must not exist yet (in a directory that does), be
/// empty, or hold an earlier emission (a manifest.json), which the new one replaces.
/// Returns whether it exists.
fn check_target(dir: &Path) -> Result<bool> {
    let fail = |detail: String| Error::File { path: dir.to_path_buf(), detail };
    if dir.file_name().is_none() {
        return Err(fail("is not a directory name".into()));
    }
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() && !dir.join(MANIFEST).is_file() {
                return Err(fail(format!("exists and holds no {MANIFEST}: refusing to replace it")));
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if parent.is_dir() { Ok(false) } else { Err(fail(format!("{} is not a directory", parent.display()))) }
        }
        Err(e) if dir.exists() => Err(fail(format!("is not a directory ({e})"))),
        Err(e) => Err(fail(e.to_string())),
    }
}

/// Writes `files` (name, contents) as the directory `dir` ([`check_target`]), all or
/// nothing: into a temporary directory beside it, then renamed into place, replacing an
/// earlier emission when `existing`.
fn write_directory(dir: &Path, existing: bool, files: &[(String, String)]) -> Result<()> {
    let fail = |detail: String| Error::File { path: dir.to_path_buf(), detail };
    let name = dir.file_name().ok_or_else(|| fail("is not a directory name".into()))?;
    let beside = |suffix: &str| {
        let mut n = std::ffi::OsString::from(".");
        n.push(name);
        n.push(format!(".{}.{suffix}", std::process::id()));
        dir.with_file_name(n)
    };
    let staged = StagedDir { path: beside("tmp") };
    std::fs::create_dir(&staged.path).map_err(|e| fail(format!("cannot create {}: {e}", staged.path.display())))?;
    for (file, contents) in files {
        let path = staged.path.join(file);
        std::fs::write(&path, contents).map_err(|e| fail(format!("cannot write {}: {e}", path.display())))?;
    }
    // Move an earlier emission aside first: rename does not replace a non-empty directory.
    let old = existing.then(|| StagedDir { path: beside("old") });
    if let Some(old) = &old {
        std::fs::rename(dir, &old.path).map_err(|e| fail(format!("cannot replace: {e}")))?;
    }
    if let Err(e) = std::fs::rename(&staged.path, dir) {
        if let Some(old) = &old {
            let _ = std::fs::rename(&old.path, dir);
        }
        return Err(fail(format!("cannot write: {e}")));
    }
    Ok(())
}

/// A directory removed with its contents when dropped, unless it has been renamed away.
struct StagedDir {
    path: PathBuf,
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
