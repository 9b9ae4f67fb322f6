// The adapter's ceilings, measured by `wattn peak`: FMA throughput (fma_main) and
// device-memory copy bandwidth (copy_main). Kernel efficiency is quoted against them.
//
// Constants from the prelude (src/shader.rs): Elem (f32 or f16), WORKGROUP.

// Keep in sync with `PeakParams` in src/bench/peak.rs (a test compares the layouts).
struct Params {
    iterations: u32,
    // The chains compute x <- x * multiplier + addend: runtime values, so that no compiler
    // can fold the loop, chosen so that x stays near 1 (no overflow, no denormals).
    multiplier: f32,
    addend: f32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> sink: array<Elem>;
@group(0) @binding(2) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> dst: array<vec4<u32>>;

// Eight independent vec4 chains per thread (32 scalar FMAs per iteration, none waiting on
// another), so that FMA latency hides behind throughput even with few threads resident.
// Written out by hand rather than as an array, which a compiler may keep in memory.
@compute @workgroup_size(WORKGROUP)
fn fma_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let m = vec4<Elem>(Elem(params.multiplier));
    let c = vec4<Elem>(Elem(params.addend));
    let start = vec4<Elem>(Elem(gid.x % 8u)) * Elem(0.125) + vec4<Elem>(0.0, 0.25, 0.5, 0.75);
    var a0 = start;
    var a1 = start + Elem(0.03125);
    var a2 = start + Elem(0.0625);
    var a3 = start + Elem(0.09375);
    var a4 = start - Elem(0.03125);
    var a5 = start - Elem(0.0625);
    var a6 = start - Elem(0.09375);
    var a7 = start - Elem(0.125);
    for (var i = 0u; i < params.iterations; i++) {
        a0 = fma(a0, m, c);
        a1 = fma(a1, m, c);
        a2 = fma(a2, m, c);
        a3 = fma(a3, m, c);
        a4 = fma(a4, m, c);
        a5 = fma(a5, m, c);
        a6 = fma(a6, m, c);
        a7 = fma(a7, m, c);
    }
    // Every chain reaches the output, so none can be dropped.
    let s = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));
    sink[gid.x] = (s.x + s.y) + (s.z + s.w);
}

// A grid-stride copy of 16-byte elements: each thread moves src[i] to dst[i] for
// i = its index, + the grid's size, ...; consecutive threads touch consecutive elements.
@compute @workgroup_size(WORKGROUP)
fn copy_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let stride = groups.x * WORKGROUP;
    let n = arrayLength(&src);
    for (var i = gid.x; i < n; i += stride) {
        dst[i] = src[i];
    }
}
