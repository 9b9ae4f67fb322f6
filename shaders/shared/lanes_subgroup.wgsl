// How the threads of a flash workgroup that is one subgroup share registers (SHUFFLE_KV
// variants; src/shader.rs includes this file or lanes_none.wgsl by that constant, because a
// device without subgroups rejects subgroup operations even in code a constant disables).

// This thread's lane: its rank among the subgroup's threads (all of them are active where the
// kernel asks), which is the id subgroupShuffle takes.
fn subgroup_lane() -> u32 {
    return subgroupExclusiveAdd(1u);
}

// Lane `lane`'s x.
fn from_lane(x: vec4<f32>, lane: u32) -> vec4<f32> {
    return subgroupShuffle(x, lane);
}

// Whether b holds on every lane: branches on it stay uniform, so the shuffles inside see
// every lane.
fn on_all_lanes(b: bool) -> bool {
    return subgroupAll(b);
}
