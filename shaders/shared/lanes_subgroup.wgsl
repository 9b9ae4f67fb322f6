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

// The sum of x over the `split` lanes from group * split on, in lane order, so that every
// lane of the group gets the same bits: the partial products of threads that share rows,
// each over its slice of the head dims.
fn split_sum(x: mat4x4<f32>, group: u32, split: u32) -> mat4x4<f32> {
    if split == 1u {
        return x;
    }
    var total = mat4x4<f32>();
    for (var p = 0u; p < split; p++) {
        let holder = group * split + p;
        total += mat4x4(from_lane(x[0], holder), from_lane(x[1], holder), from_lane(x[2], holder),
            from_lane(x[3], holder));
    }
    return total;
}

// Whether b holds on any of the `split` lanes from group * split on (`|`, not `||`: every
// lane runs every shuffle).
fn split_any(b: bool, group: u32, split: u32) -> bool {
    if split == 1u {
        return b;
    }
    var any_lane = false;
    for (var p = 0u; p < split; p++) {
        any_lane = any_lane | (subgroupShuffle(select(0u, 1u, b), group * split + p) != 0u);
    }
    return any_lane;
}
