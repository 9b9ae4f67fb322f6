//! Shared by the integration tests: the GPU context, a seeded RNG, and the comparison rule.
#![allow(dead_code)]

use std::sync::OnceLock;
use wattn::{Context, DType};

/// The adapter every GPU test runs on. No adapter is a failure with instructions, never a skip.
pub fn ctx() -> &'static Context {
    static CTX: OnceLock<Context> = OnceLock::new();
    CTX.get_or_init(|| match Context::new() {
        Ok(c) => {
            eprintln!("wattn tests on {}", c.describe());
            c
        }
        Err(e) => panic!(
            "GPU tests need an adapter: {e}\n\
             Install one with `sudo apt-get install -y mesa-vulkan-drivers` or run `bash tools/ensure-adapter.sh`."
        ),
    })
}

/// SplitMix64: small, seeded, reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// Gaussian-ish values (sum of uniforms), like the randn inputs of FlashAttention's tests.
    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| (0..4).map(|_| self.uniform()).sum::<f32>() * 0.866).collect()
    }
}

/// Rounds `x` to what the kernel actually reads in `dtype`.
pub fn quantize(x: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => x.to_vec(),
        DType::F16 => x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
    }
}

/// Max |a - b| over finite pairs; infinities must match exactly, NaN never passes.
pub fn max_abs_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let mut worst = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g as f64;
        if w.is_infinite() || g.is_infinite() {
            assert!(g == w, "index {i}: got {g}, want {w}");
            continue;
        }
        let e = (g - w).abs();
        assert!(e.is_finite(), "index {i}: got {g}, want {w}");
        worst = worst.max(e);
    }
    worst
}
