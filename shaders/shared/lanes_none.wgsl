// Stand-ins for lanes_subgroup.wgsl in variants that share no registers (SHUFFLE_KV false): no
// subgroup operation, so that every device compiles them.

fn subgroup_lane() -> u32 {
    return 0u;
}

fn from_lane(x: vec4<f32>, lane: u32) -> vec4<f32> {
    return x;
}

fn on_all_lanes(b: bool) -> bool {
    return b;
}

// Without shuffles no two threads share a row (split is 1).
fn split_sum(x: mat4x4<f32>, group: u32, split: u32) -> mat4x4<f32> {
    return x;
}

fn split_any(b: bool, group: u32, split: u32) -> bool {
    return b;
}
