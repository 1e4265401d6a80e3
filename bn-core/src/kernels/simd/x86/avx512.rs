//! AVX-512F: the [`Isa`] of the [`Avx512`] tokens, 16-lane `__m512` vectors with masked
//! tails; `Avx512<true>` converts `bf16` with AVX512-BF16's instructions.

use core::arch::x86_64::*;

use super::{stream_u16, stream_values, Avx512};
use crate::kernels::simd::{bits, Isa, Kernel};

/// The `#[target_feature]` entry of each AVX-512 token (its features differ).
trait Enter: Sized {
    fn enter<K: Kernel>(self, kernel: K) -> K::Output;
}

impl Enter for Avx512<false> {
    #[inline(always)]
    fn enter<K: Kernel>(self, kernel: K) -> K::Output {
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        fn run<K: Kernel>(isa: Avx512<false>, kernel: K) -> K::Output {
            kernel.run(isa)
        }
        // SAFETY: an `Avx512` token exists only when the CPU has AVX-512F, AVX2 and FMA (F16C
        // comes with AVX2, see `has_avx2`).
        unsafe { run(self, kernel) }
    }
}

impl Enter for Avx512<true> {
    #[inline(always)]
    fn enter<K: Kernel>(self, kernel: K) -> K::Output {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")]
        fn run<K: Kernel>(isa: Avx512<true>, kernel: K) -> K::Output {
            kernel.run(isa)
        }
        // SAFETY: an `Avx512Bf16` token exists only when the CPU has all these features.
        unsafe { run(self, kernel) }
    }
}

/// The mask of the first `n` (at most 16) lanes.
#[inline(always)]
fn avx512_tail_mask(n: usize) -> __mmask16 {
    debug_assert!(n <= 16);
    ((1u32 << n) - 1) as __mmask16
}

impl<const BF16_INSN: bool> Isa for Avx512<BF16_INSN>
where
    Avx512<BF16_INSN>: Enter,
{
    const LANES: usize = 16;
    type V = __m512;

    #[inline(always)]
    fn vectorize<K: Kernel>(self, kernel: K) -> K::Output {
        self.enter(kernel)
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
    fn relu(self, v: __m512) -> __m512 {
        // SAFETY: the token proves AVX-512F. As the AVX2 `relu`: `max(0, v)` returns `v` for NaN
        // and -0.0, 0 for `v < 0`.
        unsafe { _mm512_max_ps(_mm512_setzero_ps(), v) }
    }
    #[inline(always)]
    fn pass_positive(self, v: __m512, g: __m512) -> __m512 {
        // SAFETY: the token proves AVX-512F. The ordered compare is false for NaN.
        unsafe { _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, _mm512_setzero_ps()), g) }
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
        // SAFETY: the token proves AVX-512F (and so AVX and SSE3).
        unsafe {
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            let s8 = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
            let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)))
        }
    }
    #[inline(always)]
    fn sums(self, v: &[__m512], out: &mut [f32]) {
        let n = v.len();
        assert!(n <= 16 && out.len() >= n);
        let mut w = [self.zero(); 16];
        w[..n].copy_from_slice(v);
        // SAFETY: the token proves AVX-512F. The network pairs lanes exactly as `sum` does:
        // (i, i + 8), then (i, i + 4), (i, i + 2), (i, i + 1), four vectors at a time.
        let s = unsafe {
            let mut p = [self.zero(); 8];
            for k in 0..8 {
                let (a, b) = (w[2 * k], w[2 * k + 1]);
                p[k] = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b));
            }
            let mut q = [self.zero(); 4];
            for k in 0..4 {
                let (a, b) = (p[2 * k], p[2 * k + 1]);
                q[k] = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b));
            }
            let mut r = [self.zero(); 2];
            for k in 0..2 {
                let (a, b) = (q[2 * k], q[2 * k + 1]);
                r[k] = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(a, b), _mm512_shuffle_ps::<0xEE>(a, b));
            }
            let s =
                _mm512_add_ps(_mm512_shuffle_ps::<0x88>(r[0], r[1]), _mm512_shuffle_ps::<0xDD>(r[0], r[1]));
            // Lane 4j + t holds the sum of vector 4t + j.
            let index = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
            _mm512_permutexvar_ps(index, s)
        };
        let mut all = [0.0f32; 16];
        self.store(&mut all, s);
        out[..n].copy_from_slice(&all[..n]);
    }
    #[inline(always)]
    fn stream(self, s: &mut [f32], v: __m512) {
        assert!(s.len() >= 16 && (s.as_ptr() as usize).is_multiple_of(64));
        // SAFETY: the token proves AVX-512F; `s` holds at least 16 values and is 64-byte
        // aligned (both checked).
        unsafe { _mm512_stream_ps(s.as_mut_ptr(), v) }
    }
    #[inline(always)]
    fn stream_tail(self, s: &mut [f32], v: __m512) {
        let mut lanes = [0.0f32; 16];
        self.store(&mut lanes, v);
        stream_values(s, &lanes);
    }
    #[inline(always)]
    fn fence(self) {
        // SAFETY: SSE is part of x86-64.
        unsafe { _mm_sfence() }
    }
    #[inline(always)]
    fn load_half<const BF16: bool>(self, s: &[u16]) -> __m512 {
        assert!(s.len() >= 16);
        // SAFETY: the token proves AVX-512F and AVX2; `s` holds at least 16 values (checked);
        // unaligned load.
        unsafe {
            let h = _mm256_loadu_si256(s.as_ptr() as *const __m256i);
            if BF16 {
                bits::x86::bf16x16_to_f32(h)
            } else {
                _mm512_cvtph_ps(h)
            }
        }
    }
    #[inline(always)]
    fn load_pair_order<const BF16: bool>(self, s: &[f32]) -> (__m512, __m512) {
        if !BF16 {
            return (self.load(s), self.load(&s[16..]));
        }
        let (a, b) = (self.load(s), self.load(&s[16..]));
        // SAFETY: the token proves AVX-512F. Even-indexed values first, then odd ones: the
        // order of `load_half2`.
        unsafe {
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            (_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b))
        }
    }
    #[inline(always)]
    fn load_half2<const BF16: bool>(self, s: &[u16]) -> (__m512, __m512) {
        if !BF16 {
            return (self.load_half::<BF16>(s), self.load_half::<BF16>(&s[16..]));
        }
        assert!(s.len() >= 32);
        // SAFETY: the token proves AVX-512F; `s` holds at least 32 values (checked); unaligned
        // load. Each 32-bit lane holds an even-indexed value in its low half and the next one in
        // its high half: shifted left, the even values are `f32`; masked, the odd ones. No
        // shuffle.
        unsafe {
            let v = _mm512_loadu_si512(s.as_ptr() as *const __m512i);
            let even = _mm512_slli_epi32::<16>(v);
            let odd = _mm512_and_si512(v, _mm512_set1_epi32(0xffff_0000u32 as i32));
            (_mm512_castsi512_ps(even), _mm512_castsi512_ps(odd))
        }
    }
    #[inline(always)]
    fn store_half2<const BF16: bool>(self, s: &mut [u16], a: __m512, b: __m512) {
        assert!(s.len() >= 32);
        let h = self.half2_bits::<BF16>(a, b);
        // SAFETY: the token proves AVX-512F; `s` holds at least 32 values (checked); unaligned
        // store.
        unsafe { _mm512_storeu_si512(s.as_mut_ptr() as *mut __m512i, h) }
    }
    #[inline(always)]
    fn stream_half2<const BF16: bool>(self, s: &mut [u16], a: __m512, b: __m512) {
        assert!(s.len() >= 32 && (s.as_ptr() as usize).is_multiple_of(64));
        let h = self.half2_bits::<BF16>(a, b);
        // SAFETY: the token proves AVX-512F; `s` holds at least 32 values and is 64-byte
        // aligned (both checked).
        unsafe { _mm512_stream_si512(s.as_mut_ptr() as *mut __m512i, h) }
    }
    #[inline(always)]
    fn stream_half_part<const BF16: bool>(self, s: &mut [u16], v: __m512) {
        assert!(s.len() <= 16);
        let mut bits = [0u16; 16];
        self.store_half::<BF16>(&mut bits, v);
        stream_u16(s, &bits);
    }
    #[inline(always)]
    fn load_half_tail<const BF16: bool>(self, s: &[u16]) -> __m512 {
        assert!(s.len() < 16);
        let h = if has_avx512bw() {
            // SAFETY: AVX-512BW and VL were detected just above; only the first `s.len()` lanes
            // are enabled in the mask, and masked-off lanes are neither read nor able to fault.
            unsafe { load_u16_tail(s) }
        } else {
            let mut a = [0u16; 16];
            a[..s.len()].copy_from_slice(s);
            // SAFETY: the token proves AVX; `a` holds 16 values.
            unsafe { _mm256_loadu_si256(a.as_ptr() as *const __m256i) }
        };
        // SAFETY: the token proves AVX-512F and AVX2.
        unsafe {
            if BF16 {
                bits::x86::bf16x16_to_f32(h)
            } else {
                _mm512_cvtph_ps(h)
            }
        }
    }
    #[inline(always)]
    fn store_half<const BF16: bool>(self, s: &mut [u16], v: __m512) {
        assert!(s.len() >= 16);
        let h = self.half_bits::<BF16>(v);
        // SAFETY: the token proves AVX; `s` holds at least 16 values (checked); unaligned store.
        unsafe { _mm256_storeu_si256(s.as_mut_ptr() as *mut __m256i, h) }
    }
    #[inline(always)]
    fn store_half_tail<const BF16: bool>(self, s: &mut [u16], v: __m512) {
        assert!(s.len() < 16);
        let h = self.half_bits::<BF16>(v);
        if has_avx512bw() {
            // SAFETY: AVX-512BW and VL were detected just above; only the first `s.len()` lanes
            // are enabled in the mask, and masked-off lanes are neither written nor able to
            // fault.
            unsafe { store_u16_tail(s, h) }
        } else {
            let mut a = [0u16; 16];
            // SAFETY: the token proves AVX; `a` holds 16 values.
            unsafe { _mm256_storeu_si256(a.as_mut_ptr() as *mut __m256i, h) };
            let n = s.len();
            s.copy_from_slice(&a[..n]);
        }
    }
}

impl<const BF16_INSN: bool> Avx512<BF16_INSN> {
    /// The 32 16-bit values `store_half2` writes for `a` and `b`, in the order of
    /// `load_half2`.
    #[inline(always)]
    fn half2_bits<const BF16: bool>(self, a: __m512, b: __m512) -> __m512i {
        if !BF16 {
            let (a, b) = (self.half_bits::<BF16>(a), self.half_bits::<BF16>(b));
            // SAFETY: the token proves AVX-512F. The first vector's values in the low half.
            return unsafe { _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b) };
        }
        if BF16_INSN {
            // SAFETY: `BF16_INSN` tokens prove AVX512-BF16 and BW (and are entered with them
            // enabled). `vcvtne2ps2bf16` rounds as `f32_to_bf16_bits` except that it reads
            // subnormal inputs as zero: a pair holding one takes the integer path below. The
            // even values land in words 0..16 and the odd ones in 16..32; one word permutation
            // interleaves them into the order of `load_half2`.
            unsafe {
                let subnormal = _mm512_fpclass_ps_mask::<0x20>(a) | _mm512_fpclass_ps_mask::<0x20>(b);
                if subnormal == 0 {
                    let h: __m512i = core::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
                    let index = _mm512_set_epi16(
                        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5,
                        20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
                    );
                    return _mm512_permutexvar_epi16(index, h);
                }
            }
        }
        // SAFETY: the token proves AVX-512F. The rounded bits (below 0x10000) of the even values
        // go to the low halves of the 32-bit lanes, those of the odd values to the high halves:
        // the order of `load_half2`.
        unsafe {
            let even = bits::x86::f32x16_to_bf16_u32(a);
            let odd = bits::x86::f32x16_to_bf16_u32(b);
            _mm512_or_si512(even, _mm512_slli_epi32::<16>(odd))
        }
    }
    /// `v` rounded to nearest even into 16-bit values (`bf16` when `BF16`, else `f16`).
    #[inline(always)]
    fn half_bits<const BF16: bool>(self, v: __m512) -> __m256i {
        // SAFETY: the token proves AVX-512F and AVX2 (and with `BF16_INSN`, AVX512-BF16).
        // `vcvtneps2bf16` reads subnormal inputs as zero: a vector holding one is rounded the
        // integer way.
        unsafe {
            if BF16 && BF16_INSN && _mm512_fpclass_ps_mask::<0x20>(v) == 0 {
                core::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v))
            } else if BF16 {
                _mm512_cvtepi32_epi16(bits::x86::f32x16_to_bf16_u32(v))
            } else {
                _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)
            }
        }
    }
}

/// Stores the low `s.len() < 16` values of `h` into `s` by one masked store.
///
/// # Safety
///
/// The CPU has AVX-512BW and AVX-512VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
unsafe fn store_u16_tail(s: &mut [u16], h: __m256i) {
    debug_assert!(s.len() < 16);
    let mask = ((1u32 << s.len()) - 1) as __mmask16;
    // SAFETY: only the first `s.len()` lanes are enabled in the mask; masked-off lanes are
    // neither written nor able to fault.
    unsafe { _mm256_mask_storeu_epi16(s.as_mut_ptr() as *mut i16, mask, h) }
}

/// Whether the CPU has AVX-512BW and VL (masked 16-bit loads; cached by `std`).
#[inline(always)]
fn has_avx512bw() -> bool {
    std::arch::is_x86_feature_detected!("avx512bw") && std::arch::is_x86_feature_detected!("avx512vl")
}

/// The `s.len() < 16` values of `s` in the low lanes, zeros above, by one masked load.
///
/// # Safety
///
/// The CPU has AVX-512BW and AVX-512VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
unsafe fn load_u16_tail(s: &[u16]) -> __m256i {
    debug_assert!(s.len() < 16);
    let mask = ((1u32 << s.len()) - 1) as __mmask16;
    // SAFETY: only the first `s.len()` lanes are enabled in the mask; masked-off lanes are
    // neither read nor able to fault.
    unsafe { _mm256_maskz_loadu_epi16(mask, s.as_ptr() as *const i16) }
}
