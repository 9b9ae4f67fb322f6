// Merges partial attention results over disjoint key sets (the splits of decode.wgsl):
// out = sum_s w_s out_s / sum_s w_s and lse = m + log(sum_s w_s), w_s = exp(lse_s - m),
// m = max_s lse_s. Partials with lse = -inf (saw no key) carry no weight; a row whose
// partials all have -inf gets zeros and -inf, never NaN. A NaN partial (lse NaN) is not
// -inf: it reaches the row's output and LSE.
//
// neg_inf() and is_neg_inf() come from shared/softmax.wgsl.
//
// One thread per output element. Constants from src/shader.rs: Elem, WORKGROUP.

// Keep in sync with `CombineParams` in src/kv/combine.rs.
struct Params {
    rows: u32,
    dim: u32,
    splits: u32,
    groups_x: u32, // workgroups along x; the grid wraps into y
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> partial_out: array<f32>; // [splits, rows, dim]
@group(0) @binding(2) var<storage, read> partial_lse: array<f32>; // [splits, rows]
@group(0) @binding(3) var<storage, read_write> out: array<Elem>; // [rows, dim]
@group(0) @binding(4) var<storage, read_write> lse: array<f32>; // [rows]

@compute @workgroup_size(WORKGROUP)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let idx = (wg.y * params.groups_x + wg.x) * WORKGROUP + tid;
    if idx >= params.rows * params.dim {
        return;
    }
    let row = idx / params.dim;
    let c = idx % params.dim;

    var m = 0.0;
    var any = false;
    for (var s = 0u; s < params.splits; s++) {
        let x = partial_lse[s * params.rows + row];
        if !is_neg_inf(x) {
            m = select(x, max(m, x), any);
            any = true;
        }
    }
    if !any {
        out[idx] = Elem(0.0);
        if c == 0u {
            lse[row] = neg_inf();
        }
        return;
    }
    var weight_sum = 0.0;
    var acc = 0.0;
    for (var s = 0u; s < params.splits; s++) {
        let x = partial_lse[s * params.rows + row];
        if !is_neg_inf(x) {
            let w = exp(x - m);
            weight_sum += w;
            acc += w * partial_out[(s * params.rows + row) * params.dim + c];
        }
    }
    out[idx] = Elem(acc / weight_sum);
    if c == 0u {
        lse[row] = m + log(weight_sum);
    }
}
