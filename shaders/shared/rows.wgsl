// Vec4 words of the rows of Q, K and V (src/shader.rs prepends this file to flash_fwd and
// flash_bwd, which declare `q`, `k` and `v` as array<vec4<Elem>> and the constant ALIGNED).

// Vec4 column c (elements [4c, 4c + 4)) of the row of Q, K or V that starts at element
// `row_start`: a word, or for unaligned rows (ALIGNED false) parts of two. Past the row's
// end it holds the next row's elements: the callers mask what they must. One function per
// tensor because WGSL passes no storage pointers without an extension not every browser has.
fn q_word(row_start: u32, c: u32) -> vec4<f32> {
    let w = (row_start + 4u * c) / 4u;
    var hi = vec4(0.0);
    if !ALIGNED {
        hi = vec4<f32>(q[w + 1u]);
    }
    return assemble(vec4<f32>(q[w]), hi, row_start);
}

fn k_word(row_start: u32, c: u32) -> vec4<f32> {
    let w = (row_start + 4u * c) / 4u;
    var hi = vec4(0.0);
    if !ALIGNED {
        hi = vec4<f32>(k[w + 1u]);
    }
    return assemble(vec4<f32>(k[w]), hi, row_start);
}

fn v_word(row_start: u32, c: u32) -> vec4<f32> {
    let w = (row_start + 4u * c) / 4u;
    var hi = vec4(0.0);
    if !ALIGNED {
        hi = vec4<f32>(v[w + 1u]);
    }
    return assemble(vec4<f32>(v[w]), hi, row_start);
}

// The four elements from `row_start % 4` on of the eight in lo, hi.
fn assemble(lo: vec4<f32>, hi: vec4<f32>, row_start: u32) -> vec4<f32> {
    var x = lo;
    if !ALIGNED {
        let shift = row_start % 4u;
        x = select(x, vec4(lo.yzw, hi.x), shift == 1u);
        x = select(x, vec4(lo.zw, hi.xy), shift == 2u);
        x = select(x, vec4(lo.w, hi.xyz), shift == 3u);
    }
    return x;
}
