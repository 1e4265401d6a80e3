//! The `core::arch` instruction sets: AVX2+FMA (8 lanes) and AVX-512F (16 lanes, masked tails).
//!
//! Each token can only be made when the running CPU has its features, so its methods, thin
//! wrappers around intrinsics, are safe to call; [`Isa::vectorize`] enters a
//! `#[target_feature]` function so that the inlined kernel body is compiled for the features.

use core::arch::x86_64::*;

use super::backend::{has_avx2, has_avx512};
use super::isa::{Isa, Kernel};

/// AVX2 + FMA: 8-lane `__m256` vectors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2(());

impl Avx2 {
    /// The token, if the CPU has AVX2 and FMA.
    #[inline]
    pub(crate) fn new() -> Option<Avx2> {
        has_avx2().then_some(Avx2(()))
    }
}

/// AVX-512F: 16-lane `__m512` vectors with masked loads and stores for tails.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512(());

impl Avx512 {
    /// The token, if the CPU has AVX-512F (and AVX2 and FMA).
    #[inline]
    pub(crate) fn new() -> Option<Avx512> {
        has_avx512().then_some(Avx512(()))
    }
}

/// Lane indices 0..8, to build AVX2 tail masks.
#[inline(always)]
fn avx2_tail_mask(n: usize) -> __m256i {
    debug_assert!(n <= 8);
    // SAFETY: AVX2 is available (only called through an `Avx2` token).
    unsafe { _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)) }
}

impl Isa for Avx2 {
    const LANES: usize = 8;
    type V = __m256;

    #[inline(always)]
    fn vectorize<K: Kernel>(self, kernel: K) -> K::Output {
        #[target_feature(enable = "avx2,fma")]
        fn run<K: Kernel>(isa: Avx2, kernel: K) -> K::Output {
            kernel.run(isa)
        }
        // SAFETY: an `Avx2` token exists only when the CPU has AVX2 and FMA.
        unsafe { run(self, kernel) }
    }

    #[inline(always)]
    fn splat(self, x: f32) -> __m256 {
        // SAFETY: the token proves AVX (implied by AVX2).
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    fn add(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: the token proves AVX.
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: the token proves AVX.
        unsafe { _mm256_sub_ps(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: the token proves AVX.
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    fn mul_add(self, a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: the token proves FMA.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> __m256 {
        assert!(s.len() >= 8);
        // SAFETY: the token proves AVX; `s` holds at least 8 values (checked); unaligned load.
        unsafe { _mm256_loadu_ps(s.as_ptr()) }
    }
    #[inline(always)]
    fn store(self, s: &mut [f32], v: __m256) {
        assert!(s.len() >= 8);
        // SAFETY: the token proves AVX; `s` holds at least 8 values (checked); unaligned store.
        unsafe { _mm256_storeu_ps(s.as_mut_ptr(), v) }
    }
    #[inline(always)]
    fn load_tail(self, s: &[f32]) -> __m256 {
        assert!(s.len() <= 8);
        // SAFETY: the token proves AVX2; only the first `s.len()` lanes are enabled in the mask
        // and masked-off lanes are neither read nor able to fault.
        unsafe { _mm256_maskload_ps(s.as_ptr(), avx2_tail_mask(s.len())) }
    }
    #[inline(always)]
    fn store_tail(self, s: &mut [f32], v: __m256) {
        assert!(s.len() <= 8);
        // SAFETY: as `load_tail`: only the first `s.len()` lanes are written.
        unsafe { _mm256_maskstore_ps(s.as_mut_ptr(), avx2_tail_mask(s.len()), v) }
    }
    #[inline(always)]
    fn zero_from(self, v: __m256, n: usize) -> __m256 {
        // SAFETY: the token proves AVX2.
        unsafe { _mm256_and_ps(v, _mm256_castsi256_ps(avx2_tail_mask(n.min(8)))) }
    }
    #[inline(always)]
    fn sum(self, v: __m256) -> f32 {
        // SAFETY: the token proves AVX.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }
    }
    #[inline(always)]
    fn stream(self, s: &mut [f32], v: __m256) {
        assert!(s.len() >= 8 && s.as_ptr() as usize % 32 == 0);
        // SAFETY: the token proves AVX; `s` holds at least 8 values and is 32-byte aligned
        // (both checked).
        unsafe { _mm256_stream_ps(s.as_mut_ptr(), v) }
    }
    #[inline(always)]
    fn fence(self) {
        // SAFETY: SSE is part of x86-64.
        unsafe { _mm_sfence() }
    }
}

/// The mask of the first `n` (at most 16) lanes.
#[inline(always)]
fn avx512_tail_mask(n: usize) -> __mmask16 {
    debug_assert!(n <= 16);
    ((1u32 << n) - 1) as __mmask16
}

impl Isa for Avx512 {
    const LANES: usize = 16;
    type V = __m512;

    #[inline(always)]
    fn vectorize<K: Kernel>(self, kernel: K) -> K::Output {
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn run<K: Kernel>(isa: Avx512, kernel: K) -> K::Output {
            kernel.run(isa)
        }
        // SAFETY: an `Avx512` token exists only when the CPU has AVX-512F, AVX2 and FMA.
        unsafe { run(self, kernel) }
    }

    #[inline(always)]
    fn splat(self, x: f32) -> __m512 {
        // SAFETY: the token proves AVX-512F.
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    fn add(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: the token proves AVX-512F.
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: the token proves AVX-512F.
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: the token proves AVX-512F.
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    fn mul_add(self, a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: the token proves AVX-512F.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> __m512 {
        assert!(s.len() >= 16);
        // SAFETY: the token proves AVX-512F; `s` holds at least 16 values (checked).
        unsafe { _mm512_loadu_ps(s.as_ptr()) }
    }
    #[inline(always)]
    fn store(self, s: &mut [f32], v: __m512) {
        assert!(s.len() >= 16);
        // SAFETY: the token proves AVX-512F; `s` holds at least 16 values (checked).
        unsafe { _mm512_storeu_ps(s.as_mut_ptr(), v) }
    }
    #[inline(always)]
    fn load_tail(self, s: &[f32]) -> __m512 {
        assert!(s.len() <= 16);
        // SAFETY: the token proves AVX-512F; only the first `s.len()` lanes are enabled in the
        // mask, and masked-off lanes are neither read nor able to fault.
        unsafe { _mm512_maskz_loadu_ps(avx512_tail_mask(s.len()), s.as_ptr()) }
    }
    #[inline(always)]
    fn store_tail(self, s: &mut [f32], v: __m512) {
        assert!(s.len() <= 16);
        // SAFETY: as `load_tail`: only the first `s.len()` lanes are written.
        unsafe { _mm512_mask_storeu_ps(s.as_mut_ptr(), avx512_tail_mask(s.len()), v) }
    }
    #[inline(always)]
    fn zero_from(self, v: __m512, n: usize) -> __m512 {
        // SAFETY: the token proves AVX-512F.
        unsafe { _mm512_maskz_mov_ps(avx512_tail_mask(n.min(16)), v) }
    }
    #[inline(always)]
    fn sum(self, v: __m512) -> f32 {
        // SAFETY: the token proves AVX-512F.
        unsafe { _mm512_reduce_add_ps(v) }
    }
    #[inline(always)]
    fn stream(self, s: &mut [f32], v: __m512) {
        assert!(s.len() >= 16 && s.as_ptr() as usize % 64 == 0);
        // SAFETY: the token proves AVX-512F; `s` holds at least 16 values and is 64-byte
        // aligned (both checked).
        unsafe { _mm512_stream_ps(s.as_mut_ptr(), v) }
    }
    #[inline(always)]
    fn fence(self) {
        // SAFETY: SSE is part of x86-64.
        unsafe { _mm_sfence() }
    }
}
