// Shared by flash_fwd.wgsl, flash_bwd.wgsl and naive.wgsl (src/shader.rs prepends it after
// softmax.wgsl): their parameters, the one definition of which keys a query sees (four queries
// at a time for the register-tiled kernels), and the register tiles' NaN-safe product. Each kernel declares
// `var<uniform> params: Params`.

// Keep in sync with `FlashParams` in src/attention/flash.rs (a test compares the layouts).
struct Params {
    batch: u32,
    q_heads: u32,
    kv_heads: u32,
    n_q: u32,
    n_k: u32,
    d_qk: u32,
    d_v: u32,
    sinks: u32,
    // Visible keys of query i are diag - left ..= diag + right with diag = i + n_k - n_q
    // (bottom-right alignment); -1 means unbounded. Causal is right = 0.
    window_left: i32,
    window_right: i32,
    scale: f32,
    softcap: f32, // 0 = none
    key_begin: u32, // a multiple of BLOCK_K
    key_end: u32,
    pass_flags: u32, // FIRST_PASS | LAST_PASS
    _pad: u32,
}

// What a workgroup's rows belong to: dense, the whole problem of one batch; VARLEN, one
// packed sequence. The lengths and diagonals a kernel uses are these. A value passed on, not
// a private variable: WGSL's uniformity analysis takes private variables for non-uniform,
// and barriers may depend on the lengths.
struct Sequence {
    batch: u32, // the batch of Q, K and V (VARLEN: 0, the packed tensors have one)
    mask_batch: u32, // the block mask's batch: the batch, or (VARLEN) the sequence
    block: u32, // the workgroup's block within the sequence: of queries, or of keys (dK/dV)
    head: u32, // the workgroup's head: a query head, or a KV head (dK/dV)
    q_start: u32, // the sequence's first query and key rows (dense: 0)
    k_start: u32,
    n_q: u32,
    n_k: u32,
}

// VARLEN: the workgroup's index in a grid wrapped into z past the per-dimension limit.
fn varlen_workgroup(wg: vec3<u32>, groups_x: u32) -> u32 {
    return wg.z * groups_x + wg.x;
}

const FIRST_PASS: u32 = 1u;
const LAST_PASS: u32 = 2u;

// Which of the queries on diagonals `diag` (their rows + n_k - n_q) see key `key` of a
// sequence of `n_k` keys (in a varlen launch, the queries' own sequence's).
fn sequence_visible4(diag: vec4<i32>, key: i32, n_k: u32) -> vec4<bool> {
    let left = params.window_left;
    let right = params.window_right;
    let below_right = vec4(right < 0) | (vec4(key) <= diag + right);
    let above_left = vec4(left < 0 || key < i32(params.sinks)) | (vec4(key) >= diag - left);
    return vec4(key < i32(n_k)) & below_right & above_left;
}

// sequence_visible4 over the problem's params.n_k keys.
fn visible4(diag: vec4<i32>, key: i32) -> vec4<bool> {
    return sequence_visible4(diag, key, params.n_k);
}

// Whether the query on diagonal `diag` sees key `key`.
fn visible(diag: i32, key: i32) -> bool {
    return visible4(vec4(diag), key).x;
}

// a + vc * p, leaving out the products of zero weights p[r][j] (column j of vc is a row of V,
// or of the backward's Q, dO or K; p[r][j] its weight in column r). Finite values go through the
// matrix product, as on whole tiles, so that a row gets the same bits whatever a key it cannot
// see holds and a block mask gives the bits of the dense options it expresses; only a
// non-finite value is added element by element, to the columns that weigh it.
fn add_nonzero_products(a: mat4x4<f32>, vc: mat4x4<f32>, p: mat4x4<f32>) -> mat4x4<f32> {
    let exponent = vec4(0x7f800000u);
    var finite = vc;
    var bad = array<vec4<bool>, 4>();
    var any_bad = false;
    for (var j = 0u; j < 4u; j++) {
        bad[j] = (bitcast<vec4<u32>>(vc[j]) & exponent) == exponent;
        finite[j] = select(vc[j], vec4(0.0), bad[j]);
        any_bad = any_bad || any(bad[j]);
    }
    var sum = a + finite * p;
    if any_bad {
        for (var r = 0u; r < 4u; r++) {
            for (var j = 0u; j < 4u; j++) {
                let w = p[r][j];
                sum[r] += select(vec4(0.0), vc[j] * w, bad[j] & vec4(!is_zero(w)));
            }
        }
    }
    return sum;
}
