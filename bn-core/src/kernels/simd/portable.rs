//! The portable instruction set: `wide::f32x8`, whose instructions are fixed when `wide` is
//! compiled (SSE2 on a default x86-64 build, NEON on aarch64, AVX2 or AVX-512 under
//! `-C target-cpu=native`). No run-time detection: it runs everywhere.

use wide::f32x8;

use super::{Isa, Kernel};

/// The `wide` token: always available.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wide;

impl Isa for Wide {
    const LANES: usize = 8;
    type V = f32x8;

    #[inline(always)]
    fn vectorize<K: Kernel>(self, kernel: K) -> K::Output {
        kernel.run(self)
    }

    #[inline(always)]
    fn splat(self, x: f32) -> f32x8 {
        f32x8::splat(x)
    }
    #[inline(always)]
    fn add(self, a: f32x8, b: f32x8) -> f32x8 {
        a + b
    }
    #[inline(always)]
    fn sub(self, a: f32x8, b: f32x8) -> f32x8 {
        a - b
    }
    #[inline(always)]
    fn mul(self, a: f32x8, b: f32x8) -> f32x8 {
        a * b
    }
    #[inline(always)]
    fn mul_add(self, a: f32x8, b: f32x8, c: f32x8) -> f32x8 {
        a.mul_add(b, c)
    }
    #[inline(always)]
    fn relu(self, v: f32x8) -> f32x8 {
        v.simd_lt(f32x8::ZERO).select(f32x8::ZERO, v)
    }
    #[inline(always)]
    fn pass_positive(self, v: f32x8, g: f32x8) -> f32x8 {
        v.simd_gt(f32x8::ZERO) & g
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> f32x8 {
        let a: [f32; 8] = s[..8].try_into().expect("8 values");
        f32x8::new(a)
    }
    #[inline(always)]
    fn store(self, s: &mut [f32], v: f32x8) {
        s[..8].copy_from_slice(v.as_array());
    }
    #[inline(always)]
    fn load_tail(self, s: &[f32]) -> f32x8 {
        // Lane by lane, not `copy_from_slice`: a variable-length copy becomes a `memcpy` call.
        assert!(s.len() <= 8);
        let mut a = [0.0f32; 8];
        for (i, v) in a.iter_mut().enumerate() {
            if i < s.len() {
                *v = s[i];
            }
        }
        f32x8::new(a)
    }
    #[inline(always)]
    fn store_tail(self, s: &mut [f32], v: f32x8) {
        assert!(s.len() <= 8);
        let a = v.to_array();
        for (i, &v) in a.iter().enumerate() {
            if i < s.len() {
                s[i] = v;
            }
        }
    }
    #[inline(always)]
    fn zero_from(self, v: f32x8, n: usize) -> f32x8 {
        let mut a = v.to_array();
        a.iter_mut().skip(n).for_each(|x| *x = 0.0);
        f32x8::new(a)
    }
    #[inline(always)]
    fn sum(self, v: f32x8) -> f32 {
        let a = v.to_array();
        ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
    }
}
