// K/V storage in int8: a word is 4 signed bytes q (one u32), read as q / 127 (snorm, core
// WGSL) and multiplied by its row's scale, the row's largest magnitude, kept per
// (token, KV head) as f16 beside V's: value = kv_unpack(word) * scale.

alias KvWord = u32;

fn kv_unpack(w: KvWord) -> vec4<f32> {
    return unpack4x8snorm(w);
}

// The word holding x, already divided by its row's scale: round(clamp(x, -1, 1) * 127).
fn kv_pack(x: vec4<f32>) -> KvWord {
    return pack4x8snorm(x);
}
