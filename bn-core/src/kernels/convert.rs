//! Conversions between the 16-bit formats (`bf16`, `f16`, as their bits) and `f32`, chosen by
//! the same [`Backend`] as the `f32` kernels.
//!
//! - `bf16 -> f32` is exact: the bits shifted left by 16 (a signaling NaN stays a NaN).
//! - `f32 -> bf16` rounds to nearest, ties to even, with integer operations; a NaN stays a NaN
//!   (quiet, its high payload kept), exactly as [`half::bf16::from_f32`].
//! - `f16 <-> f32` uses F16C (`vcvtph2ps` / `vcvtps2ph`, round to nearest even) on the AVX2 path
//!   when the CPU has it, AVX-512F's 512-bit forms on the AVX-512 path, and `half`'s slice
//!   conversions elsewhere (which detect F16C themselves); all give [`half::f16::from_f32`]'s
//!   bits for every non-NaN value.
//!
//! Whole vectors run the SIMD loop; the few values of a tail the scalar one.

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use super::half16::HalfFormat;
use super::isa::{Isa, Kernel};
use super::Backend;

/// `dst = f32(src)` (`dst.len() == src.len()`).
#[inline]
pub(crate) fn widen(backend: Backend, format: HalfFormat, src: &[u16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "conversion of slices of different lengths");
    if !convert_simd(backend, format, Convert::Widen(src, dst)) {
        widen_portable(format, src, dst);
    }
}

/// `dst = round(src)` to nearest even (`dst.len() == src.len()`).
#[inline]
pub(crate) fn narrow(backend: Backend, format: HalfFormat, src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len(), "conversion of slices of different lengths");
    if !convert_simd(backend, format, Convert::Narrow(src, dst)) {
        narrow_portable(format, src, dst);
    }
}

/// A conversion between equally long slices, either way.
enum Convert<'a> {
    Widen(&'a [u16], &'a mut [f32]),
    Narrow(&'a [f32], &'a mut [u16]),
}

/// [`Convert`] in `bf16` (`BF16`) or `f16`, through the instruction set's [`Isa::load_half`] /
/// [`Isa::store_half`] (the conversions the 16-bit kernels use in registers), whole vectors then
/// a masked tail.
struct ConvertKernel<'a, const BF16: bool>(Convert<'a>);

impl<const BF16: bool> Kernel for ConvertKernel<'_, BF16> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let l = I::LANES;
        match self.0 {
            Convert::Widen(src, dst) => {
                let mut i = 0;
                while i + l <= src.len() {
                    isa.store(&mut dst[i..], isa.load_half::<BF16>(&src[i..]));
                    i += l;
                }
                if i < src.len() {
                    isa.store_tail(&mut dst[i..], isa.load_half_tail::<BF16>(&src[i..]));
                }
            }
            Convert::Narrow(src, dst) => {
                let mut i = 0;
                while i + l <= src.len() {
                    isa.store_half::<BF16>(&mut dst[i..], isa.load(&src[i..]));
                    i += l;
                }
                if i < src.len() {
                    isa.store_half_tail::<BF16>(&mut dst[i..], isa.load_tail(&src[i..]));
                }
            }
        }
    }
}

/// Runs `convert` on the AVX-512 or AVX2 backend (`f16` on AVX2 only with F16C); false, doing
/// nothing, on the others (the portable conversions serve them).
#[inline]
fn convert_simd(backend: Backend, format: HalfFormat, convert: Convert<'_>) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use super::x86::{Avx2, Avx512};
        let bf16 = format == HalfFormat::Bf16;
        macro_rules! run {
            ($isa:expr) => {
                if bf16 {
                    $isa.vectorize(ConvertKernel::<true>(convert))
                } else {
                    $isa.vectorize(ConvertKernel::<false>(convert))
                }
            };
        }
        match backend.usable() {
            Backend::Avx512 => {
                if let Some(isa) = Avx512::new() {
                    run!(isa);
                    return true;
                }
            }
            Backend::Avx2 => {
                if let Some(isa) = Avx2::new() {
                    run!(isa);
                    return true;
                }
            }
            _ => {}
        }
    }
    let _ = (backend, format, convert);
    false
}

/// The parameters of a fused affine pass: one `(m, s, t)` for the whole run (a run of one
/// channel), or one per value (a row of channels).
#[derive(Clone, Copy)]
pub(crate) enum Params<'a> {
    /// `y = (x - m) * s + t` for every value.
    Run(f32, f32, f32),
    /// `y[i] = (x[i] - m[i % p]) * s[i % p] + t[i % p]` with `p` the slices' common length:
    /// one row of per-column parameters (`p >= n`), or several rows when `p` is a multiple of
    /// 16 dividing `n`.
    Lanes(&'a [f32], &'a [f32], &'a [f32]),
}

/// Whether [`affine`] has a fused kernel for `backend` and `format` (else the caller widens into
/// a buffer and runs the `f32` kernel).
#[inline]
pub(crate) fn has_affine(backend: Backend, format: HalfFormat) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match (backend.usable(), format) {
            (Backend::Avx512 | Backend::Avx2, _) => true,
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (backend, format);
        false
    }
}

/// `y = round((widen(x) - m) * s + t)` in one pass (fused multiply-add). Only where
/// [`has_affine`] (checked: panics otherwise).
#[inline]
pub(crate) fn affine(backend: Backend, format: HalfFormat, x: &[u16], y: &mut [u16], p: Params<'_>) {
    assert_eq!(x.len(), y.len(), "affine of slices of different lengths");
    // SAFETY: two distinct slices of the same length.
    unsafe { affine_raw(backend, format, x.as_ptr(), y.as_mut_ptr(), x.len(), p) }
}

/// [`affine`] in place: the same bits.
#[inline]
pub(crate) fn affine_inplace(backend: Backend, format: HalfFormat, xy: &mut [u16], p: Params<'_>) {
    let ptr = xy.as_mut_ptr();
    // SAFETY: one slice read and written at the same positions (each vector is loaded before it
    // is stored).
    unsafe { affine_raw(backend, format, ptr, ptr, xy.len(), p) }
}

/// # Safety
///
/// `src` and `dst` hold `n` values; they are equal or do not overlap.
#[inline]
unsafe fn affine_raw(
    backend: Backend,
    format: HalfFormat,
    src: *const u16,
    dst: *mut u16,
    n: usize,
    p: Params<'_>,
) {
    if let Params::Lanes(m, s, t) = p {
        let period = m.len();
        assert!(s.len() == period && t.len() == period, "affine parameters of different lengths");
        assert!(
            period >= n || (period.is_multiple_of(16) && n.is_multiple_of(period)),
            "affine parameters neither cover the run nor tile it in whole vectors"
        );
    }
    assert!(has_affine(backend, format), "no fused affine kernel for {backend} {format:?}");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract for the data, the parameters hold `n` (checked), and
    // `has_affine` detected the kernel's features.
    unsafe {
        x86::affine(backend.usable(), format, src, dst, n, p)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (src, dst, n);
}

/// The portable widening: a shift for `bf16` (which the compiler vectorizes), `half`'s slice
/// conversion for `f16`.
#[inline]
fn widen_portable(format: HalfFormat, src: &[u16], dst: &mut [f32]) {
    match format {
        HalfFormat::Bf16 => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = bf16_bits_to_f32(s);
            }
        }
        HalfFormat::F16 => {
            let src: &[f16] = src.reinterpret_cast();
            src.convert_to_f32_slice(dst);
        }
    }
}

/// The portable narrowing (see [`widen_portable`]).
#[inline]
fn narrow_portable(format: HalfFormat, src: &[f32], dst: &mut [u16]) {
    match format {
        HalfFormat::Bf16 => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = f32_to_bf16_bits(s);
            }
        }
        HalfFormat::F16 => {
            let dst: &mut [f16] = dst.reinterpret_cast_mut();
            dst.convert_from_f32_slice(src);
        }
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

/// Widens the scalar `f16` bits.
#[inline(always)]
fn f16_bits_to_f32(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// Narrows to `f16` bits.
#[inline(always)]
fn f32_to_f16_bits(value: f32) -> u16 {
    f16::from_f32(value).to_bits()
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    //! The AVX2 (+F16C) and AVX-512F conversion primitives (which the instruction sets'
    //! [`Isa::load_half`](crate::kernels::isa::Isa::load_half) family uses) and the fused affine
    //! kernels. Each `#[target_feature]` function is entered only after the backend (or F16C)
    //! was detected.

    use core::arch::x86_64::*;

    use super::{bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits, Params};
    use crate::kernels::backend::has_avx512;
    use crate::kernels::{Backend, HalfFormat};

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

    /// The fused affine pass of [`super::affine`].
    ///
    /// # Safety
    ///
    /// `src` and `dst` hold `n` values (they may be equal, not otherwise overlapping), the
    /// `Lanes` parameters at least `n`, and the CPU has the backend's features (and F16C for
    /// `f16` on AVX2).
    pub(super) unsafe fn affine(
        backend: Backend,
        format: HalfFormat,
        src: *const u16,
        dst: *mut u16,
        n: usize,
        p: Params<'_>,
    ) {
        let run: [f32; 3] = match p {
            Params::Run(m, s, t) => [m, s, t],
            Params::Lanes(..) => [0.0; 3],
        };
        let (lanes, m, s, t) = match p {
            Params::Run(..) => (false, &run[0] as *const f32, &run[1] as *const f32, &run[2] as *const f32),
            Params::Lanes(m, s, t) => (true, m.as_ptr(), s.as_ptr(), t.as_ptr()),
        };
        // Rows of `period` values (a whole number of vectors, or one partial row).
        let period = match p {
            Params::Run(..) => 1,
            Params::Lanes(m, ..) => m.len().min(n).max(1),
        };
        // SAFETY: forwarded from the caller; the match picks a kernel whose features it detected.
        unsafe {
            match (backend, format, lanes) {
                (Backend::Avx512, HalfFormat::Bf16, false) if has_avx512_bf16() => {
                    affine_avx512_bf16::<false>(src, dst, n, m, s, t, period)
                }
                (Backend::Avx512, HalfFormat::Bf16, true) if has_avx512_bf16() => {
                    affine_avx512_bf16::<true>(src, dst, n, m, s, t, period)
                }
                (Backend::Avx512, HalfFormat::Bf16, false) => {
                    affine_avx512::<true, false>(src, dst, n, m, s, t, period)
                }
                (Backend::Avx512, HalfFormat::Bf16, true) => {
                    affine_avx512::<true, true>(src, dst, n, m, s, t, period)
                }
                (Backend::Avx512, HalfFormat::F16, false) => {
                    affine_avx512::<false, false>(src, dst, n, m, s, t, period)
                }
                (Backend::Avx512, HalfFormat::F16, true) => {
                    affine_avx512::<false, true>(src, dst, n, m, s, t, period)
                }
                (_, HalfFormat::Bf16, false) => affine_avx2::<true, false>(src, dst, n, m, s, t, period),
                (_, HalfFormat::Bf16, true) => affine_avx2::<true, true>(src, dst, n, m, s, t, period),
                (_, HalfFormat::F16, false) => affine_avx2_f16c::<false>(src, dst, n, m, s, t, period),
                (_, HalfFormat::F16, true) => affine_avx2_f16c::<true>(src, dst, n, m, s, t, period),
            }
        }
    }

    /// The scalar tail of the fused kernels: the same arithmetic (a fused multiply-add).
    ///
    /// # Safety
    ///
    /// As [`affine`], for the values `i..n`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn affine_tail<const BF16: bool, const LANES: bool>(
        src: *const u16,
        dst: *mut u16,
        i: usize,
        n: usize,
        m: *const f32,
        s: *const f32,
        t: *const f32,
        period: usize,
    ) {
        for j in i..n {
            let k = if LANES { j % period } else { 0 };
            // SAFETY: `j < n` and `k < n` (or 0) are in bounds per the caller's contract.
            unsafe {
                let x = *src.add(j);
                let v = if BF16 { bf16_bits_to_f32(x) } else { f16_bits_to_f32(x) };
                let r = (v - *m.add(k)).mul_add(*s.add(k), *t.add(k));
                *dst.add(j) = if BF16 { f32_to_bf16_bits(r) } else { f32_to_f16_bits(r) };
            }
        }
    }

    /// Whether the CPU converts `f32` to `bf16` in one instruction (AVX512-BF16), cached.
    #[inline]
    fn has_avx512_bf16() -> bool {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            has_avx512()
                && std::arch::is_x86_feature_detected!("avx512bf16")
                && std::arch::is_x86_feature_detected!("avx512dq")
        })
    }

    /// [`affine_avx512`] for `bf16` with AVX512-BF16's conversion (`vcvtneps2bf16`: to nearest
    /// even, NaN made quiet, as [`f32_to_bf16_bits`]). The instruction flushes subnormal inputs
    /// to zero, so a vector holding a subnormal result is rounded the integer way instead: the
    /// bits are [`affine_avx512`]'s in every case.
    ///
    /// # Safety
    ///
    /// As [`affine`], with AVX-512F, AVX-512DQ and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512dq,avx512bf16,avx2,fma")]
    unsafe fn affine_avx512_bf16<const LANES: bool>(
        src: *const u16,
        dst: *mut u16,
        n: usize,
        m: *const f32,
        s: *const f32,
        t: *const f32,
        period: usize,
    ) {
        // SAFETY: every access is below `n` (the loop bound), per the caller's contract.
        unsafe {
            let (bm, bs, bt) = (_mm512_set1_ps(*m), _mm512_set1_ps(*s), _mm512_set1_ps(*t));
            let (mut i, mut k) = (0, 0);
            while i + 16 <= n {
                let x = bf16x16_to_f32(_mm256_loadu_si256(src.add(i) as *const __m256i));
                let (mv, sv, tv) = if LANES {
                    (_mm512_loadu_ps(m.add(k)), _mm512_loadu_ps(s.add(k)), _mm512_loadu_ps(t.add(k)))
                } else {
                    (bm, bs, bt)
                };
                let y = _mm512_fmadd_ps(_mm512_sub_ps(x, mv), sv, tv);
                // Class 0x20: subnormal.
                let h = if _mm512_fpclass_ps_mask::<0x20>(y) == 0 {
                    core::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(y))
                } else {
                    _mm512_cvtepi32_epi16(f32x16_to_bf16_u32(y))
                };
                _mm256_storeu_si256(dst.add(i) as *mut __m256i, h);
                i += 16;
                k += 16;
                if k >= period {
                    k = 0;
                }
            }
            affine_tail::<true, LANES>(src, dst, i, n, m, s, t, period);
        }
    }

    /// # Safety
    ///
    /// As [`affine`], with AVX-512F.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn affine_avx512<const BF16: bool, const LANES: bool>(
        src: *const u16,
        dst: *mut u16,
        n: usize,
        m: *const f32,
        s: *const f32,
        t: *const f32,
        period: usize,
    ) {
        // SAFETY: every access is below `n` (the loop bound), per the caller's contract.
        unsafe {
            let (bm, bs, bt) = (_mm512_set1_ps(*m), _mm512_set1_ps(*s), _mm512_set1_ps(*t));
            let (mut i, mut k) = (0, 0);
            while i + 16 <= n {
                let h = _mm256_loadu_si256(src.add(i) as *const __m256i);
                let x = if BF16 { bf16x16_to_f32(h) } else { _mm512_cvtph_ps(h) };
                let (mv, sv, tv) = if LANES {
                    (_mm512_loadu_ps(m.add(k)), _mm512_loadu_ps(s.add(k)), _mm512_loadu_ps(t.add(k)))
                } else {
                    (bm, bs, bt)
                };
                let y = _mm512_fmadd_ps(_mm512_sub_ps(x, mv), sv, tv);
                let h = if BF16 {
                    _mm512_cvtepi32_epi16(f32x16_to_bf16_u32(y))
                } else {
                    _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y)
                };
                _mm256_storeu_si256(dst.add(i) as *mut __m256i, h);
                i += 16;
                k += 16;
                if k >= period {
                    k = 0;
                }
            }
            affine_tail::<BF16, LANES>(src, dst, i, n, m, s, t, period);
        }
    }

    /// # Safety
    ///
    /// As [`affine`], with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn affine_avx2<const BF16: bool, const LANES: bool>(
        src: *const u16,
        dst: *mut u16,
        n: usize,
        m: *const f32,
        s: *const f32,
        t: *const f32,
        period: usize,
    ) {
        // SAFETY: every access is below `n` (the loop bound), per the caller's contract.
        unsafe {
            let (bm, bs, bt) = (_mm256_set1_ps(*m), _mm256_set1_ps(*s), _mm256_set1_ps(*t));
            let (mut i, mut k) = (0, 0);
            while i + 16 <= n {
                let mut out = [_mm256_setzero_si256(); 2];
                for (half, o) in out.iter_mut().enumerate() {
                    let j = i + 8 * half;
                    let h = _mm_loadu_si128(src.add(j) as *const __m128i);
                    let x = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
                    let q = k + 8 * half;
                    let (mv, sv, tv) = if LANES {
                        (_mm256_loadu_ps(m.add(q)), _mm256_loadu_ps(s.add(q)), _mm256_loadu_ps(t.add(q)))
                    } else {
                        (bm, bs, bt)
                    };
                    *o = f32x8_to_bf16_u32(_mm256_fmadd_ps(_mm256_sub_ps(x, mv), sv, tv));
                }
                let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(out[0], out[1]));
                _mm256_storeu_si256(dst.add(i) as *mut __m256i, packed);
                i += 16;
                k += 16;
                if k >= period {
                    k = 0;
                }
            }
            affine_tail::<BF16, LANES>(src, dst, i, n, m, s, t, period);
        }
    }

    /// # Safety
    ///
    /// As [`affine`], with AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn affine_avx2_f16c<const LANES: bool>(
        src: *const u16,
        dst: *mut u16,
        n: usize,
        m: *const f32,
        s: *const f32,
        t: *const f32,
        period: usize,
    ) {
        // SAFETY: every access is below `n` (the loop bound), per the caller's contract.
        unsafe {
            let (bm, bs, bt) = (_mm256_set1_ps(*m), _mm256_set1_ps(*s), _mm256_set1_ps(*t));
            let (mut i, mut k) = (0, 0);
            while i + 8 <= n {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(src.add(i) as *const __m128i));
                let (mv, sv, tv) = if LANES {
                    (_mm256_loadu_ps(m.add(k)), _mm256_loadu_ps(s.add(k)), _mm256_loadu_ps(t.add(k)))
                } else {
                    (bm, bs, bt)
                };
                let y = _mm256_fmadd_ps(_mm256_sub_ps(x, mv), sv, tv);
                _mm_storeu_si128(dst.add(i) as *mut __m128i, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y));
                i += 8;
                k += 8;
                if k >= period {
                    k = 0;
                }
            }
            affine_tail::<false, LANES>(src, dst, i, n, m, s, t, period);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn formats() -> [HalfFormat; 2] {
        [HalfFormat::Bf16, HalfFormat::F16]
    }

    fn reference_widen(format: HalfFormat, bits: u16) -> f32 {
        match format {
            HalfFormat::Bf16 => bf16::from_bits(bits).to_f32(),
            HalfFormat::F16 => f16::from_bits(bits).to_f32(),
        }
    }

    fn reference_narrow(format: HalfFormat, v: f32) -> u16 {
        match format {
            HalfFormat::Bf16 => bf16::from_f32(v).to_bits(),
            HalfFormat::F16 => f16::from_f32(v).to_bits(),
        }
    }

    #[test]
    fn every_bit_pattern_round_trips_on_every_backend() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        for backend in Backend::available() {
            for format in formats() {
                let mut wide = vec![0.0f32; all.len()];
                widen(backend, format, &all, &mut wide);
                let mut back = vec![0u16; all.len()];
                narrow(backend, format, &wide, &mut back);
                for (i, (&bits, (&w, &b))) in all.iter().zip(wide.iter().zip(&back)).enumerate() {
                    let expected = reference_widen(format, bits);
                    if expected.is_nan() {
                        assert!(w.is_nan(), "{backend} {format:?} {i:#06x}: NaN widened to {w}");
                        let back_value = reference_widen(format, b);
                        assert!(
                            back_value.is_nan(),
                            "{backend} {format:?} {i:#06x}: NaN narrowed to {b:#06x}"
                        );
                    } else {
                        assert_eq!(w.to_bits(), expected.to_bits(), "{backend} {format:?} widen {i:#06x}");
                        assert_eq!(b, bits, "{backend} {format:?} round trip {i:#06x}");
                    }
                }
            }
        }
    }

    /// Values around every rounding boundary: ties (exactly half an ulp of the format), just
    /// above and below them, subnormals of both formats, overflow to infinity, infinities, NaNs.
    fn tricky_values() -> Vec<f32> {
        let mut v = vec![
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::from_bits(0x8000_0001),
            65504.0,
            65520.0,
            65519.996,
            6.1e-5,
            5.96e-8,
            2.98e-8,
            1.0e-9,
            3.4e38,
        ];
        // Every f32 whose low 16 bits are at or next to the bf16 tie, over many high parts.
        let mut state = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let high = (state >> 32) as u32 & 0xffff_0000;
            for low in [0x0000, 0x0001, 0x7fff, 0x8000, 0x8001, 0xffff, (state >> 16) as u32 & 0xffff] {
                v.push(f32::from_bits(high | low));
            }
            // f16 ties: 13 dropped bits.
            let base = (state >> 20) as u32 & !0x1fff;
            for low in [0x0fff, 0x1000, 0x1001] {
                v.push(f32::from_bits(base | low));
            }
        }
        v
    }

    #[test]
    fn narrowing_matches_half_on_every_backend() {
        let values = tricky_values();
        for backend in Backend::available() {
            for format in formats() {
                // Offsets 0..3 put values both in whole vectors and in tails.
                for offset in 0..3 {
                    let src = &values[offset..];
                    let mut out = vec![0u16; src.len()];
                    narrow(backend, format, src, &mut out);
                    for (&v, &b) in src.iter().zip(&out) {
                        let expected = reference_narrow(format, v);
                        if v.is_nan() {
                            assert!(
                                reference_widen(format, b).is_nan(),
                                "{backend} {format:?}: NaN -> {b:#06x}"
                            );
                        } else {
                            assert_eq!(b, expected, "{backend} {format:?}: {v:e} ({:#010x})", v.to_bits());
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn scalar_bf16_matches_half() {
        for v in tricky_values() {
            if !v.is_nan() {
                assert_eq!(f32_to_bf16_bits(v), bf16::from_f32(v).to_bits(), "{v:e}");
            }
        }
    }

    /// The fused kernels against widen, the scalar fused multiply-add and `half`'s rounding, bit
    /// for bit: one value per channel (`Run`) and per-column parameters repeating over rows
    /// (`Lanes` with a period), with results that are subnormal in the format (where AVX512-BF16's
    /// one-instruction conversion would flush them, and the kernel must not), ties and NaN.
    #[test]
    fn fused_affine_matches_widen_fma_narrow_on_every_backend() {
        let n = 16 * 24 + 5;
        let x_f32: Vec<f32> =
            (0..n).map(|i| if i == 7 { f32::NAN } else { (i as f32 - 150.0) * 0.37 }).collect();
        for backend in Backend::available() {
            for format in formats() {
                if !has_affine(backend, format) {
                    println!("skipping {backend} {format:?}: no fused kernel");
                    continue;
                }
                let x: Vec<u16> = x_f32.iter().map(|&v| reference_narrow(format, v)).collect();
                // Scales giving normal, subnormal and zero results in both formats.
                for &(m, sc, t) in
                    &[(1.5f32, 0.75f32, -0.25f32), (0.0, 1e-40, 0.0), (3.0, 1e-9, 1e-38), (0.0, 0.0, 0.0)]
                {
                    let mut y = vec![0u16; n];
                    affine(backend, format, &x, &mut y, Params::Run(m, sc, t));
                    for i in 0..n {
                        let v = reference_widen(format, x[i]);
                        let expected = reference_narrow(format, (v - m).mul_add(sc, t));
                        let same = y[i] == expected
                            || (reference_widen(format, y[i]).is_nan()
                                && reference_widen(format, expected).is_nan());
                        assert!(
                            same,
                            "{backend} {format:?} run ({m}, {sc}, {t}) [{i}]: {:#06x} vs {expected:#06x}",
                            y[i]
                        );
                    }
                }
                let period = 32;
                let mp: Vec<f32> = (0..period).map(|j| j as f32 * 0.1).collect();
                let sp: Vec<f32> =
                    (0..period).map(|j| if j % 3 == 0 { 1e-39 } else { 0.5 + j as f32 }).collect();
                let tp: Vec<f32> = (0..period).map(|j| -(j as f32)).collect();
                let rows = 12;
                let (xr, mut yr) = (&x[..rows * period], vec![0u16; rows * period]);
                affine(backend, format, xr, &mut yr, Params::Lanes(&mp, &sp, &tp));
                for i in 0..rows * period {
                    let k = i % period;
                    let expected = reference_narrow(
                        format,
                        (reference_widen(format, xr[i]) - mp[k]).mul_add(sp[k], tp[k]),
                    );
                    let same = yr[i] == expected
                        || (reference_widen(format, yr[i]).is_nan()
                            && reference_widen(format, expected).is_nan());
                    assert!(same, "{backend} {format:?} rows [{i}]: {:#06x} vs {expected:#06x}", yr[i]);
                }
            }
        }
    }
}
