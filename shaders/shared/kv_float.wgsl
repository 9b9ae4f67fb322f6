// K/V storage in the element type: a word is 4 elements of Elem (src/shader.rs includes this
// file, or kv_int8.wgsl, in decode and kv_cache by the INT8 constant).

alias KvWord = vec4<Elem>;

fn kv_unpack(w: KvWord) -> vec4<f32> {
    return vec4<f32>(w);
}

// The word holding x, already divided by its row's scale (1 for float storage).
fn kv_pack(x: vec4<f32>) -> KvWord {
    return KvWord(x);
}

// The u32 of a scales word: float pools have none.
fn kv_bits(w: KvWord) -> u32 {
    return 0u;
}

fn kv_word_of_bits(bits: u32) -> KvWord {
    return KvWord();
}

// Per-channel K scales exist in int8 pools only.
fn kv_channel_scales(w: KvWord) -> vec4<f32> {
    return vec4(1.0);
}

fn kv_exponents(w: KvWord) -> vec4<i32> {
    return vec4(0);
}

fn kv_word_of_exponents(e: vec4<i32>) -> KvWord {
    return KvWord();
}
