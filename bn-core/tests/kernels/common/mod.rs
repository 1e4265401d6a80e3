//! Helpers shared by bn-core's integration tests: a small deterministic random generator and the
//! backends of this machine. Each test crate uses a different subset of this module.
#![allow(dead_code)]

use bn_core::kernels::Backend;

/// A small deterministic generator (xorshift64*), uniform in `[lo, hi)` or normal.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `[lo, hi)` from 24 random bits.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
    /// Uniform in `[lo, hi)` from 53 random bits.
    pub fn uniform_f64(&mut self, lo: f64, hi: f64) -> f64 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        lo + (hi - lo) * u
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (-2.0 * u1.ln()).sqrt() * (2.0 * core::f64::consts::PI * u2).cos()
    }
    /// `n` values of [`uniform`](Self::uniform).
    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// Every backend of this machine (the scalar reference included), printing a line for each one
/// it lacks.
pub fn backends() -> Vec<Backend> {
    for b in [Backend::Avx2, Backend::Avx512] {
        if !b.is_available() {
            println!("skipping backend {b}: not supported by this CPU");
        }
    }
    Backend::available()
}

/// The fast backends of this machine (all but the scalar reference); prints a line for each one
/// it lacks.
pub fn fast_backends() -> Vec<Backend> {
    backends().into_iter().filter(|&b| b != Backend::Scalar).collect()
}
