// K/V storage in int8: a word is 4 signed bytes q (one u32), read as q / 127 (snorm, core
// WGSL) and multiplied by its row's scale, the row's largest magnitude, kept per
// (token, KV head) as f16 beside V's in one more word (after the pool's V words):
// value = kv_unpack(word) * scale.

alias KvWord = u32;

fn kv_unpack(w: KvWord) -> vec4<f32> {
    return unpack4x8snorm(w);
}

// The word holding x, already divided by its row's scale: round(clamp(x, -1, 1) * 127).
fn kv_pack(x: vec4<f32>) -> KvWord {
    return pack4x8snorm(x);
}

// The u32 of a scales word (two f16: K's scale, V's).
fn kv_bits(w: KvWord) -> u32 {
    return w;
}

fn kv_word_of_bits(bits: u32) -> KvWord {
    return bits;
}

// Per-channel K scales (CHANNEL_K): a word holds the exponents e of 4 channels as signed
// bytes, each channel's scale 2^e.
fn kv_channel_scales(w: KvWord) -> vec4<f32> {
    return exp2(vec4<f32>(kv_exponents(w)));
}

fn kv_exponents(w: KvWord) -> vec4<i32> {
    let b = bitcast<i32>(w);
    return vec4(b << 24u, b << 16u, b << 8u, b) >> vec4(24u);
}

fn kv_word_of_exponents(e: vec4<i32>) -> KvWord {
    let b = vec4<u32>(e) & vec4(0xffu);
    return b.x | (b.y << 8u) | (b.z << 16u) | (b.w << 24u);
}
