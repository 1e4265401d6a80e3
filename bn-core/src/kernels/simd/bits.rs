//! The 16-bit data formats and their bit conversions to and from `f32`: one value at a time,
//! and (on x86-64) the AVX2 and AVX-512F register forms that the instruction sets' 16-bit loads
//! and stores use.
//!
//! - `bf16 -> f32` is exact: the bits shifted left by 16 (a signaling NaN stays a NaN).
//! - `f32 -> bf16` rounds to nearest, ties to even, with integer operations; a NaN stays a NaN
//!   (quiet, its high payload kept), exactly as [`half::bf16::from_f32`].
//! - `f16 <-> f32` is `half`'s.

/// A 16-bit storage format of the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HalfFormat {
    /// bfloat16 ([`half::bf16`]): 8 exponent bits (the range of `f32`), 8 significant bits.
    Bf16,
    /// IEEE 754 binary16 ([`half::f16`]): 5 exponent bits (largest finite value 65504),
    /// 11 significant bits.
    F16,
}

/// One 16-bit value (`bf16` bits when `BF16`, else `f16` bits) widened to `f32`, exactly.
#[inline(always)]
pub(crate) fn half_to_f32<const BF16: bool>(bits: u16) -> f32 {
    if BF16 {
        bf16_bits_to_f32(bits)
    } else {
        half::f16::from_bits(bits).to_f32()
    }
}

/// One `f32` rounded to nearest even into 16 bits (`bf16` when `BF16`, else `f16`).
#[inline(always)]
pub(crate) fn f32_to_half<const BF16: bool>(v: f32) -> u16 {
    if BF16 {
        f32_to_bf16_bits(v)
    } else {
        half::f16::from_f32(v).to_bits()
    }
}

/// `bf16 -> f32`: exact.
#[inline(always)]
pub(crate) fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// `f32 -> bf16`, to nearest even; a NaN stays a quiet NaN (as `half::bf16::from_f32`).
#[inline(always)]
pub(crate) fn f32_to_bf16_bits(value: f32) -> u16 {
    let x = value.to_bits();
    if x & 0x7fff_ffff > 0x7f80_0000 {
        return ((x >> 16) | 0x40) as u16;
    }
    // Adding 0x7fff plus the lowest kept bit carries exactly when the dropped half is above
    // one half, or equal to it with an odd kept part.
    ((x + 0x7fff + ((x >> 16) & 1)) >> 16) as u16
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    //! The AVX2 and AVX-512F `bf16` conversion primitives (which the instruction sets'
    //! [`Isa::load_half`](crate::kernels::simd::Isa::load_half) family uses). Each
    //! `#[target_feature]` function is called only by a token that proves its features.

    use core::arch::x86_64::*;

    /// `bf16 -> f32` of 16 lanes: widen each `u16` to `u32`, shift into the high half.
    #[target_feature(enable = "avx512f,avx2")]
    #[inline]
    pub(crate) fn bf16x16_to_f32(h: __m256i) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    /// `f32 -> bf16` bits of 16 lanes in the low 16 bits of each `u32` lane, to nearest even,
    /// NaNs quiet (bit-identical to [`f32_to_bf16_bits`]).
    #[target_feature(enable = "avx512f,avx2")]
    #[inline]
    pub(crate) fn f32x16_to_bf16_u32(v: __m512) -> __m512i {
        let x = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
        let rounded =
            _mm512_srli_epi32::<16>(_mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))));
        let nan = _mm512_or_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(0x40));
        let is_nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        _mm512_mask_blend_epi32(is_nan, rounded, nan)
    }

    /// [`f32x16_to_bf16_u32`] on 8 lanes.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) fn f32x8_to_bf16_u32(v: __m256) -> __m256i {
        let x = _mm256_castps_si256(v);
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(1));
        let rounded =
            _mm256_srli_epi32::<16>(_mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))));
        let nan = _mm256_or_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(0x40));
        let is_nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        _mm256_blendv_epi8(rounded, nan, is_nan)
    }
}
