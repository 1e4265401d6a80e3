//! AVX2 + FMA + F16C: the [`Isa`] of the [`Avx2`] token, 8-lane `__m256` vectors; tails by
//! masked loads and stores (`vmaskmovps`), `f16` by F16C, `bf16` by integer operations.

use core::arch::x86_64::*;

use super::{stream_u16, stream_values, Avx2};
use crate::kernels::simd::{bits, Isa, Kernel};

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
        #[target_feature(enable = "avx2,fma,f16c")]
        fn run<K: Kernel>(isa: Avx2, kernel: K) -> K::Output {
            kernel.run(isa)
        }
        // SAFETY: an `Avx2` token exists only when the CPU has AVX2, FMA and F16C.
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
    fn relu(self, v: __m256) -> __m256 {
        // SAFETY: the token proves AVX. `max(0, v)` returns its second operand `v` when `v` is
        // NaN or equal to 0 (so -0.0 stays), and 0 when `v < 0`: the scalar `relu`.
        unsafe { _mm256_max_ps(_mm256_setzero_ps(), v) }
    }
    #[inline(always)]
    fn pass_positive(self, v: __m256, g: __m256) -> __m256 {
        // SAFETY: the token proves AVX. The ordered compare is false for NaN.
        unsafe { _mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(v, _mm256_setzero_ps()), g) }
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
        assert!(s.len() >= 8 && (s.as_ptr() as usize).is_multiple_of(32));
        // SAFETY: the token proves AVX; `s` holds at least 8 values and is 32-byte aligned
        // (both checked).
        unsafe { _mm256_stream_ps(s.as_mut_ptr(), v) }
    }
    #[inline(always)]
    fn stream_tail(self, s: &mut [f32], v: __m256) {
        let mut lanes = [0.0f32; 8];
        self.store(&mut lanes, v);
        stream_values(s, &lanes);
    }
    #[inline(always)]
    fn fence(self) {
        // SAFETY: SSE is part of x86-64.
        unsafe { _mm_sfence() }
    }
    #[inline(always)]
    fn load_half<const BF16: bool>(self, s: &[u16]) -> __m256 {
        assert!(s.len() >= 8);
        if BF16 {
            // SAFETY: the token proves AVX2; `s` holds at least 8 values (checked); unaligned
            // load. `bf16 -> f32` is the bits shifted into the high half.
            unsafe {
                let h = _mm_loadu_si128(s.as_ptr() as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
        } else {
            // SAFETY: the token proves F16C; `s` holds at least 8 values (checked).
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr() as *const __m128i)) }
        }
    }
    #[inline(always)]
    fn store_half<const BF16: bool>(self, s: &mut [u16], v: __m256) {
        assert!(s.len() >= 8);
        let h = self.half_bits::<BF16>(v);
        // SAFETY: the token proves AVX; `s` holds at least 8 values (checked); unaligned store.
        unsafe { _mm_storeu_si128(s.as_mut_ptr() as *mut __m128i, h) }
    }
    #[inline(always)]
    fn load_pair_order<const BF16: bool>(self, s: &[f32]) -> (__m256, __m256) {
        let (a, b) = (self.load(s), self.load(&s[8..]));
        if !BF16 {
            return (a, b);
        }
        // SAFETY: the token proves AVX2. Even-indexed values first, then odd ones (the order of
        // `load_half2`): within each 128-bit half, lanes 0 and 2 (1 and 3) of `a` then of `b`;
        // the 64-bit permutation puts `a`'s pairs before `b`'s.
        unsafe {
            let even = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
            let odd = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
            (
                _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(even))),
                _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(odd))),
            )
        }
    }
    #[inline(always)]
    fn load_half2<const BF16: bool>(self, s: &[u16]) -> (__m256, __m256) {
        if !BF16 {
            return (self.load_half::<BF16>(s), self.load_half::<BF16>(&s[8..]));
        }
        assert!(s.len() >= 16);
        // SAFETY: the token proves AVX2; `s` holds at least 16 values (checked); unaligned load.
        // Each 32-bit lane holds an even-indexed value in its low half and the next one in its
        // high half: shifted left, the even values are `f32`; masked, the odd ones. No shuffle.
        unsafe {
            let v = _mm256_loadu_si256(s.as_ptr() as *const __m256i);
            let even = _mm256_slli_epi32::<16>(v);
            let odd = _mm256_and_si256(v, _mm256_set1_epi32(0xffff_0000u32 as i32));
            (_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd))
        }
    }
    #[inline(always)]
    fn store_half2<const BF16: bool>(self, s: &mut [u16], a: __m256, b: __m256) {
        assert!(s.len() >= 16);
        let h = self.half2_bits::<BF16>(a, b);
        // SAFETY: the token proves AVX; `s` holds at least 16 values (checked); unaligned store.
        unsafe { _mm256_storeu_si256(s.as_mut_ptr() as *mut __m256i, h) }
    }
    #[inline(always)]
    fn stream_half2<const BF16: bool>(self, s: &mut [u16], a: __m256, b: __m256) {
        assert!(s.len() >= 16 && (s.as_ptr() as usize).is_multiple_of(32));
        let h = self.half2_bits::<BF16>(a, b);
        // SAFETY: the token proves AVX; `s` holds at least 16 values and is 32-byte aligned
        // (both checked).
        unsafe { _mm256_stream_si256(s.as_mut_ptr() as *mut __m256i, h) }
    }
    #[inline(always)]
    fn stream_half_part<const BF16: bool>(self, s: &mut [u16], v: __m256) {
        assert!(s.len() <= 8);
        let mut bits = [0u16; 8];
        self.store_half::<BF16>(&mut bits, v);
        stream_u16(s, &bits);
    }
}

impl Avx2 {
    /// The 16 16-bit values `store_half2` writes for `a` and `b`, in the order of `load_half2`:
    /// for `bf16`, the rounded bits (below 0x10000) of `a` (the even values) in the low halves of
    /// the 32-bit lanes and those of `b` in the high halves, no shuffle; for `f16`, `a` then `b`.
    #[inline(always)]
    fn half2_bits<const BF16: bool>(self, a: __m256, b: __m256) -> __m256i {
        if BF16 {
            // SAFETY: the token proves AVX2.
            unsafe {
                let even = bits::x86::f32x8_to_bf16_u32(a);
                let odd = bits::x86::f32x8_to_bf16_u32(b);
                _mm256_or_si256(even, _mm256_slli_epi32::<16>(odd))
            }
        } else {
            let (a, b) = (self.half_bits::<BF16>(a), self.half_bits::<BF16>(b));
            // SAFETY: the token proves AVX.
            unsafe { _mm256_set_m128i(b, a) }
        }
    }
    /// `v` rounded to nearest even into 8 16-bit values (`bf16` when `BF16`, else `f16`).
    #[inline(always)]
    fn half_bits<const BF16: bool>(self, v: __m256) -> __m128i {
        if BF16 {
            // SAFETY: the token proves AVX2. Every lane of the rounded bits is below 0x10000, so
            // the saturating pack is exact; the permutation gathers the two 64-bit halves
            // holding lanes 0-3 and 4-7.
            unsafe {
                let b = bits::x86::f32x8_to_bf16_u32(v);
                let packed = _mm256_permute4x64_epi64::<0b00_00_10_00>(_mm256_packus_epi32(b, b));
                _mm256_castsi256_si128(packed)
            }
        } else {
            // SAFETY: the token proves F16C.
            unsafe { _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v) }
        }
    }
}
