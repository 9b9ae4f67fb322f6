//! Every shader variant wattn builds is valid WGSL and translates to every shading language
//! wgpu targets, checked with naga alone (no GPU). The uniform structs of the shaders
//! have the layout of their Rust twins.

use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{Capabilities, ModuleInfo, ValidationFlags, Validator};
use std::mem::{offset_of, size_of};
use wattn::attention::backward::{self, PassRange};
use wattn::attention::flash::{self, FlashParams};
use wattn::attention::varlen::SequenceBlock;
use wattn::dtype::DType;
use wattn::internals::{Kernel, ShaderKey, every_variant};
use wattn::kv::{cache::KvParams, combine::CombineParams, decode::DecodeParams};
use wattn::naive;

fn parse_and_validate(key: &ShaderKey) -> Result<(naga::Module, ModuleInfo), String> {
    let source = key.source();
    let module = naga::front::wgsl::parse_str(&source).map_err(|e| e.emit_to_string(&source))?;
    let info = Validator::new(ValidationFlags::all(), Capabilities::all())
        .validate(&module)
        .map_err(|e| e.emit_to_string(&source))?;
    Ok((module, info))
}

/// Translates the variant's entry point to every backend; returns one message per failure.
fn translate(key: &ShaderKey, module: &naga::Module, info: &ModuleInfo) -> Vec<String> {
    let stage = naga::ShaderStage::Compute;
    let entry = key.entry_point.to_string();
    let mut failures = Vec::new();

    let spv_pipeline = spv::PipelineOptions { shader_stage: stage, entry_point: entry.clone() };
    if let Err(e) = spv::write_vec(module, info, &spv::Options::default(), Some(&spv_pipeline)) {
        failures.push(format!("SPIR-V: {e}"));
    }

    // Metal 2.0 is the oldest version wgpu's Metal backend accepts.
    let msl_options = msl::Options { lang_version: (2, 0), ..Default::default() };
    let msl_pipeline = msl::PipelineOptions { entry_point: Some((stage, entry.clone())), ..Default::default() };
    if let Err(e) = msl::write_string(module, info, &msl_options, &msl_pipeline) {
        failures.push(format!("MSL: {e}"));
    }

    // f16 needs shader model 6.2 (DXC); f32 variants must also work on FXC's 5.1.
    let shader_model = match key.dtype {
        DType::F32 => hlsl::ShaderModel::V5_1,
        DType::F16 => hlsl::ShaderModel::V6_2,
    };
    let hlsl_options = hlsl::Options { shader_model, ..Default::default() };
    let hlsl_pipeline = hlsl::PipelineOptions { entry_point: Some((stage, entry.clone())) };
    let mut hlsl_out = String::new();
    if let Err(e) = hlsl::Writer::new(&mut hlsl_out, &hlsl_options, &hlsl_pipeline).write(module, info, None) {
        failures.push(format!("HLSL {shader_model:?}: {e}"));
    }

    // GLSL (wgpu's GLES backend) has no 16-bit float type, and wgpu never grants SHADER_F16
    // there, so only the f32 variants can reach it.
    if key.dtype == DType::F32 {
        let glsl_options = glsl::Options { version: glsl::Version::new_gles(310), ..Default::default() };
        let glsl_pipeline = glsl::PipelineOptions { shader_stage: stage, entry_point: entry, multiview: None };
        let mut glsl_out = String::new();
        let written = glsl::Writer::new(
            &mut glsl_out,
            module,
            info,
            &glsl_options,
            &glsl_pipeline,
            naga::proc::BoundsCheckPolicies::default(),
        )
        .and_then(|mut w| w.write());
        if let Err(e) = written {
            failures.push(format!("GLSL ES 310: {e}"));
        }
    }
    failures
}

/// Validation and translation of one variant; one message per failure.
fn check_variant(key: &ShaderKey) -> Vec<String> {
    let failures = match parse_and_validate(key) {
        Ok((module, info)) => translate(key, &module, &info),
        Err(e) => vec![format!("WGSL: {e}")],
    };
    failures.into_iter().map(|f| format!("{}\n  {f}", key.label())).collect()
}

#[test]
fn every_variant_validates_and_translates() {
    let keys = every_variant();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = keys.len().div_ceil(threads);
    let failures: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = keys
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().flat_map(check_variant).collect::<Vec<_>>()))
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    eprintln!("checked {} shader variants", keys.len());
    assert!(failures.is_empty(), "{} of {} variants failed:\n{}", failures.len(), keys.len(), failures.join("\n"));
}

#[test]
fn variant_list_covers_every_axis() {
    let keys = flash::validation_keys();
    let has = |name: &str, value: &str| keys.iter().any(|k| k.label().contains(&format!(" {name}={value}")));
    for dtype in [DType::F32, DType::F16] {
        assert!(keys.iter().any(|k| k.dtype == dtype), "no {dtype} variant");
    }
    let axes = [
        ("STAGE_KV", "true"),
        ("STAGE_KV", "false"),
        ("ALIGNED", "false"),
        ("ROW_GROUPS", "2"),
        ("VARLEN", "true"),
        ("SHUFFLE_KV", "true"),
    ];
    for (name, value) in axes {
        assert!(has(name, value), "no variant with {name}={value}");
    }
    for split in ["1", "4"] {
        assert!(has("SPLIT", split), "no variant with SPLIT={split}");
    }
    for pad in ["16", "256"] {
        assert!(has("DQK_PAD", pad) && has("DV_PAD", pad), "no variant with head dim {pad}");
    }
    assert!(has("BLOCK_Q", "32") && has("BLOCK_K", "4") && has("BLOCK_K", "16"), "a preset is missing");
}

/// A Rust struct's field names with offsets, and its size, written as
/// `rust_layout!(Type { field, ... })`.
macro_rules! rust_layout {
    ($ty:ty { $($field:ident),* $(,)? }) => {
        (vec![$((stringify!($field), offset_of!($ty, $field) as u32)),*], size_of::<$ty>() as u32)
    };
}

/// The members (name, offset) and size of the WGSL struct `name` as naga lays it out.
fn wgsl_layout(key: &ShaderKey, name: &str) -> (Vec<(String, u32)>, u32) {
    let (module, _) = parse_and_validate(key).unwrap_or_else(|e| panic!("{}: {e}", key.label()));
    let ty = module
        .types
        .iter()
        .find(|(_, t)| t.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("{} declares no struct {name}", key.kernel.file_name()));
    match &ty.1.inner {
        naga::TypeInner::Struct { members, span } => {
            (members.iter().map(|m| (m.name.clone().unwrap_or_default(), m.offset)).collect(), *span)
        }
        other => panic!("{name} in {} is not a struct: {other:?}", key.kernel.file_name()),
    }
}

#[test]
fn uniform_structs_match_rust() {
    let flash_key = flash::validation_keys().into_iter().next().unwrap();
    let naive_keys = naive::shader_keys();
    let naive_key = &naive_keys[0];
    let naive_backward_key = naive_keys.iter().find(|k| k.kernel == Kernel::NaiveBackward).expect("a naive backward");
    assert_eq!(flash_key.kernel, Kernel::FlashForward);
    assert_eq!(naive_key.kernel, Kernel::Naive);
    let flash_params = rust_layout!(FlashParams {
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
    let kv_keys = wattn::kv::validation_keys();
    let kv_key = |kernel: Kernel| kv_keys.iter().find(|k| k.kernel == kernel).expect("a variant of each kv kernel");
    let decode_params = rust_layout!(DecodeParams {
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
    let varlen_key = flash::validation_keys()
        .into_iter()
        .find(|k| k.label().contains(" VARLEN=true"))
        .expect("a varlen flash variant");
    let query_block = rust_layout!(SequenceBlock { sequence, block, q_start, k_start, n_q, n_k });
    let combine_params = rust_layout!(CombineParams { rows, dim, splits, groups_x });
    let backward_key = backward::validation_keys().into_iter().next().unwrap();
    assert_eq!(backward_key.kernel, Kernel::FlashBackward);
    let pass_range = rust_layout!(PassRange { begin, end, flags, table_at });
    let kv_params = rust_layout!(KvParams {
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
    // One line per (shader, WGSL struct, Rust layout).
    let pairs = [
        (&flash_key, "Params", &flash_params),
        (&varlen_key, "SequenceBlock", &query_block),
        (naive_key, "Params", &flash_params),
        (naive_backward_key, "Params", &flash_params),
        (&backward_key, "Params", &flash_params),
        (&backward_key, "PassRange", &pass_range),
        (kv_key(Kernel::Decode), "Params", &decode_params),
        (kv_key(Kernel::Combine), "Params", &combine_params),
        (kv_key(Kernel::KvCache), "Params", &kv_params),
    ];
    for (key, name, (rust_fields, rust_size)) in pairs {
        let (wgsl_fields, wgsl_size) = wgsl_layout(key, name);
        let rust_fields: Vec<(String, u32)> = rust_fields.iter().map(|&(n, o)| (n.to_string(), o)).collect();
        let file = key.kernel.file_name();
        assert_eq!(wgsl_fields, rust_fields, "{file}: struct {name} members (name, offset) differ from Rust's");
        assert_eq!(wgsl_size, *rust_size, "{file}: struct {name} is {wgsl_size} bytes, Rust's is {rust_size}");
    }
}

/// Hosts bind by name through `Kernel::bindings`: every variant's group-0 globals must sit at
/// the binding the table gives their name, and the table must name nothing the shader lacks.
#[test]
fn binding_tables_match_the_shaders() {
    let mut failures = Vec::new();
    let mut kernels_seen = Vec::new();
    for key in every_variant() {
        let (module, _) = parse_and_validate(&key).unwrap_or_else(|e| panic!("{}: {e}", key.label()));
        let names = key.kernel.bindings();
        let mut declared = Vec::new();
        for (_, var) in module.global_variables.iter() {
            let (Some(binding), Some(name)) = (&var.binding, &var.name) else { continue };
            declared.push(name.clone());
            let expected = names.iter().position(|n| n == name).map(|i| (0, i as u32));
            if expected != Some((binding.group, binding.binding)) {
                failures.push(format!(
                    "{}: `{name}` is at group {} binding {}, the table says {expected:?}",
                    key.label(),
                    binding.group,
                    binding.binding
                ));
            }
        }
        for name in names {
            if !declared.iter().any(|d| d == name) {
                failures.push(format!("{}: the table names `{name}`, the shader does not declare it", key.label()));
            }
        }
        if !kernels_seen.contains(&key.kernel) {
            kernels_seen.push(key.kernel);
        }
    }
    // The peak kernels belong to the benchmarks, behind the cli feature.
    let families = if cfg!(feature = "cli") { 8 } else { 7 };
    assert_eq!(kernels_seen.len(), families, "every kernel family has variants: {kernels_seen:?}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
