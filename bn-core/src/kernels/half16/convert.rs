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
//! The conversions and the fused affine pass ([`affine`]: `y = round((x - m) * s + t)`, the
//! 16-bit inference and training normalization) are generic kernels over the instruction set
//! ([`Isa::load_half`] / [`Isa::store_half`] and their pair and tail forms): whole vectors, then
//! a masked tail. On AVX-512 with AVX512-BF16, `bf16` rounds with `vcvtne(2)ps2bf16`, to the
//! same bits.

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use crate::kernels::simd::bits::{bf16_bits_to_f32, f32_to_bf16_bits, HalfFormat};
use crate::kernels::simd::{with_isa, Isa, Kernel};
use crate::kernels::Backend;

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

/// Runs `convert` on the AVX-512 or AVX2 backend; false, doing nothing, on the others (the
/// portable conversions serve them).
#[inline]
fn convert_simd(backend: Backend, format: HalfFormat, convert: Convert<'_>) -> bool {
    match format {
        HalfFormat::Bf16 => run_simd(backend, format, ConvertKernel::<true>(convert)).is_ok(),
        HalfFormat::F16 => run_simd(backend, format, ConvertKernel::<false>(convert)).is_ok(),
    }
}

/// Runs `kernel` on the `core::arch` instruction set of `backend` (for `bf16` on AVX-512, the
/// token with AVX512-BF16's conversions where the CPU has them: the same bits); gives the
/// kernel back on the other backends.
#[inline]
fn run_simd<K: Kernel>(backend: Backend, format: HalfFormat, kernel: K) -> Result<K::Output, K> {
    match format {
        HalfFormat::Bf16 => {
            with_isa!(backend.usable(), bf16, |isa| Ok(isa.vectorize(kernel)), else Err(kernel))
        }
        HalfFormat::F16 => with_isa!(backend.usable(), |isa| Ok(isa.vectorize(kernel)), else Err(kernel)),
    }
}

/// The parameters of a fused affine pass: one `(m, s, t)` per run of consecutive runs of one
/// channel each, or one per value (a row of channels).
#[derive(Clone, Copy)]
pub(crate) enum Params<'a> {
    /// Consecutive runs of `inner` values, run `r` with `(m[r % p], s[r % p], t[r % p])`, `p`
    /// the slices' common length (a block of whole runs of `p` channels).
    Runs { inner: usize, m: &'a [f32], s: &'a [f32], t: &'a [f32] },
    /// `y[i] = (x[i] - m[i % p]) * s[i % p] + t[i % p]` with `p` the slices' common length:
    /// one row of per-column parameters (`p >= n`), or several rows when `p` divides `n`.
    Lanes(&'a [f32], &'a [f32], &'a [f32]),
}

/// Whether [`affine`] has a fused kernel for `backend` and `format` (else the caller widens into
/// a buffer and runs the `f32` kernel): the `core::arch` instruction sets, which convert in
/// registers; the portable one converts lane by lane.
#[inline]
pub(crate) fn has_affine(backend: Backend, format: HalfFormat) -> bool {
    let _ = format;
    matches!(backend.usable(), Backend::Avx512 | Backend::Avx2)
}

/// `y = round((widen(x) - m) * s + t)` in one pass (fused multiply-add). Only where
/// [`has_affine`] (checked: panics otherwise).
#[inline]
pub(crate) fn affine(backend: Backend, format: HalfFormat, x: &[u16], y: &mut [u16], p: Params<'_>) {
    assert_eq!(x.len(), y.len(), "affine of slices of different lengths");
    affine_any(backend, format, Some(x), y, p, false);
}

/// [`affine`] writing `y` with non-temporal stores where `p` is [`Params::Runs`] and the
/// instruction set has them (rows store the regular way): the same bits. The caller runs
/// [`store_fence`](crate::kernels::parallel::store_fence) before other threads read `y`.
#[inline]
pub(crate) fn affine_stream(backend: Backend, format: HalfFormat, x: &[u16], y: &mut [u16], p: Params<'_>) {
    assert_eq!(x.len(), y.len(), "affine of slices of different lengths");
    affine_any(backend, format, Some(x), y, p, true);
}

/// [`affine`] in place: the same bits.
#[inline]
pub(crate) fn affine_inplace(backend: Backend, format: HalfFormat, xy: &mut [u16], p: Params<'_>) {
    affine_any(backend, format, None, xy, p, false);
}

/// [`affine`] from `x`, or in place from `y` when `x` is `None`.
#[inline]
fn affine_any(
    backend: Backend,
    format: HalfFormat,
    x: Option<&[u16]>,
    y: &mut [u16],
    p: Params<'_>,
    stream: bool,
) {
    let n = y.len();
    match p {
        Params::Runs { inner, m, s, t } => {
            let period = m.len();
            assert!(s.len() == period && t.len() == period, "affine parameters of different lengths");
            assert!(period > 0 && inner > 0 && n.is_multiple_of(inner), "affine runs do not tile the data");
        }
        Params::Lanes(m, s, t) => {
            let period = m.len();
            assert!(s.len() == period && t.len() == period, "affine parameters of different lengths");
            assert!(
                period >= n || (period > 0 && n.is_multiple_of(period)),
                "affine parameters neither cover the row nor tile the rows"
            );
        }
    }
    assert!(has_affine(backend, format), "no fused affine kernel for {backend} {format:?}");
    let done = match format {
        HalfFormat::Bf16 => run_simd(backend, format, AffineKernel::<true> { x, y, p, stream }).is_ok(),
        HalfFormat::F16 => run_simd(backend, format, AffineKernel::<false> { x, y, p, stream }).is_ok(),
    };
    assert!(done, "has_affine promised a kernel");
}

/// The fused affine pass in `bf16` (`BF16`) or `f16` on one instruction set: per run, pairs
/// of vectors in the instruction set's order ([`Isa::load_half2`]; the parameters are the same
/// for every value), one more vector, then a masked tail; per row, vectors of columns with
/// their parameters. Runs are written with non-temporal stores when `stream` (unfenced).
struct AffineKernel<'a, const BF16: bool> {
    x: Option<&'a [u16]>,
    y: &'a mut [u16],
    p: Params<'a>,
    stream: bool,
}

impl<const BF16: bool> Kernel for AffineKernel<'_, BF16> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let AffineKernel { x, y, p, stream } = self;
        let l = I::LANES;
        match p {
            Params::Runs { inner, m, s, t } => {
                let period = m.len();
                for (r, yr) in y.chunks_exact_mut(inner).enumerate() {
                    let c = r % period;
                    let xr = x.map(|x| &x[r * inner..(r + 1) * inner]);
                    affine_run::<I, BF16>(isa, xr, yr, [m[c], s[c], t[c]], stream);
                }
            }
            Params::Lanes(m, s, t) if m.len() == 2 * l && y.len().is_multiple_of(m.len()) => {
                pair_rows::<I, BF16, 1>(isa, x, y, [m, s, t])
            }
            Params::Lanes(m, s, t) if m.len() == 4 * l && y.len().is_multiple_of(m.len()) => {
                pair_rows::<I, BF16, 2>(isa, x, y, [m, s, t])
            }
            Params::Lanes(m, s, t) if m.len() == 8 * l && y.len().is_multiple_of(m.len()) => {
                pair_rows::<I, BF16, 4>(isa, x, y, [m, s, t])
            }
            Params::Lanes(m, s, t) if m.len().is_multiple_of(l) && y.len().is_multiple_of(m.len()) => {
                // Rows of whole vectors.
                let period = m.len();
                match x {
                    Some(x) => {
                        for (yr, xr) in y.chunks_exact_mut(period).zip(x.chunks_exact(period)) {
                            lanes_row::<I, BF16>(isa, Some(xr), yr, [m, s, t]);
                        }
                    }
                    None => {
                        for yr in y.chunks_exact_mut(period) {
                            lanes_row::<I, BF16>(isa, None, yr, [m, s, t]);
                        }
                    }
                }
            }
            Params::Lanes(m, s, t) => {
                let period = m.len().min(y.len()).max(1);
                for (r, yr) in y.chunks_mut(period).enumerate() {
                    let w = yr.len();
                    let xr = x.map(|x| &x[r * period..r * period + w]);
                    let (m, s, t) = (&m[..w], &s[..w], &t[..w]);
                    let mut c = 0;
                    while c + l <= w {
                        let v = isa.load_half::<BF16>(&xr.unwrap_or(yr)[c..]);
                        let k = [isa.load(&m[c..]), isa.load(&s[c..]), isa.load(&t[c..])];
                        isa.store_half::<BF16>(&mut yr[c..], affine_value(isa, v, k));
                        c += l;
                    }
                    if c < w {
                        let v = isa.load_half_tail::<BF16>(&xr.unwrap_or(yr)[c..]);
                        let k = [isa.load_tail(&m[c..]), isa.load_tail(&s[c..]), isa.load_tail(&t[c..])];
                        isa.store_half_tail::<BF16>(&mut yr[c..], affine_value(isa, v, k));
                    }
                }
            }
        }
    }
}

/// `(v - m) * s + t` (one fused multiply-add), the formula of every path.
#[inline(always)]
fn affine_value<I: Isa>(isa: I, v: I::V, [m, s, t]: [I::V; 3]) -> I::V {
    isa.mul_add(isa.sub(v, m), s, t)
}

/// The parameter vectors of one vector of columns (a function: a closure would not inherit the
/// kernel's target features).
#[inline(always)]
fn load3<I: Isa>(isa: I, ((m, s), t): ((&[f32], &[f32]), &[f32])) -> [I::V; 3] {
    [isa.load(m), isa.load(s), isa.load(t)]
}

/// Rows of `P` pairs of vectors of columns: the parameters loaded once, in the order of
/// [`Isa::load_half2`] ([`Isa::load_pair_order`]), and kept in registers; each row's values in
/// pairs (on AVX-512, 32 `bf16` values per 64-byte load and store).
#[inline(always)]
fn pair_rows<I: Isa, const BF16: bool, const P: usize>(
    isa: I,
    x: Option<&[u16]>,
    y: &mut [u16],
    [m, s, t]: [&[f32]; 3],
) {
    let l2 = 2 * I::LANES;
    let mut k = [[[isa.zero(); 3]; 2]; P];
    for (p, kp) in k.iter_mut().enumerate() {
        let c = p * l2;
        let (m, s, t) = (
            isa.load_pair_order::<BF16>(&m[c..]),
            isa.load_pair_order::<BF16>(&s[c..]),
            isa.load_pair_order::<BF16>(&t[c..]),
        );
        *kp = [[m.0, s.0, t.0], [m.1, s.1, t.1]];
    }
    let width = P * l2;
    match x {
        Some(x) => {
            for (yr, xr) in y.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
                for (p, (yv, xv)) in yr.chunks_exact_mut(l2).zip(xr.chunks_exact(l2)).enumerate() {
                    let (a, b) = isa.load_half2::<BF16>(xv);
                    isa.store_half2::<BF16>(yv, affine_value(isa, a, k[p][0]), affine_value(isa, b, k[p][1]));
                }
            }
        }
        None => {
            for yr in y.chunks_exact_mut(width) {
                for (p, yv) in yr.chunks_exact_mut(l2).enumerate() {
                    let (a, b) = isa.load_half2::<BF16>(yv);
                    isa.store_half2::<BF16>(yv, affine_value(isa, a, k[p][0]), affine_value(isa, b, k[p][1]));
                }
            }
        }
    }
}

/// One row of whole vectors with per-column parameters `[m, s, t]` (as long as the row), from
/// `x`, or in place when `x` is `None`. Zipped exact chunks: no bounds checks in the loop.
#[inline(always)]
fn lanes_row<I: Isa, const BF16: bool>(isa: I, x: Option<&[u16]>, y: &mut [u16], [m, s, t]: [&[f32]; 3]) {
    let l = I::LANES;
    let params = m.chunks_exact(l).zip(s.chunks_exact(l)).zip(t.chunks_exact(l));
    match x {
        Some(x) => {
            for ((yv, xv), p) in y.chunks_exact_mut(l).zip(x.chunks_exact(l)).zip(params) {
                isa.store_half::<BF16>(yv, affine_value(isa, isa.load_half::<BF16>(xv), load3(isa, p)));
            }
        }
        None => {
            for (yv, p) in y.chunks_exact_mut(l).zip(params) {
                let v = isa.load_half::<BF16>(yv);
                isa.store_half::<BF16>(yv, affine_value(isa, v, load3(isa, p)));
            }
        }
    }
}

/// One run of [`AffineKernel`] with the parameters `k`: pairs of vectors (the order of the
/// values within a pair does not matter, the parameters being the same), one more vector, then
/// a masked tail. With `stream`, every store is non-temporal ([`Isa::stream_half2`],
/// [`Isa::stream_half_part`]; the caller fences), to the same bits.
#[inline(always)]
pub(crate) fn affine_run<I: Isa, const BF16: bool>(
    isa: I,
    x: Option<&[u16]>,
    y: &mut [u16],
    k: [f32; 3],
    stream: bool,
) {
    let k = [isa.splat(k[0]), isa.splat(k[1]), isa.splat(k[2])];
    let l = I::LANES;
    // Pairs store `4 * LANES` bytes: first align the output to that (a store across two cache
    // lines costs two, and a streaming store needs it), by at most one vector and a part.
    let head = ((4 * l - (y.as_ptr() as usize) % (4 * l)) % (4 * l) / 2).min(y.len());
    let (yh, y) = y.split_at_mut(head);
    let (xh, x) = match x {
        Some(x) => (Some(&x[..head]), Some(&x[head..])),
        None => (None, None),
    };
    let mut i = 0;
    if head >= l {
        let v = affine_value(isa, isa.load_half::<BF16>(xh.unwrap_or(yh)), k);
        put_half::<I, BF16>(isa, &mut yh[..l], v, stream);
        i = l;
    }
    if i < head {
        let v = isa.load_half_tail::<BF16>(&xh.unwrap_or(yh)[i..]);
        put_half::<I, BF16>(isa, &mut yh[i..], affine_value(isa, v, k), stream);
    }
    let n = y.len();
    let pairs = n / (2 * l) * (2 * l);
    match x {
        Some(x) => {
            for (yv, xv) in y[..pairs].chunks_exact_mut(2 * l).zip(x.chunks_exact(2 * l)) {
                let (a, b) = isa.load_half2::<BF16>(xv);
                put_half2::<I, BF16>(isa, yv, affine_value(isa, a, k), affine_value(isa, b, k), stream);
            }
        }
        None => {
            for yv in y[..pairs].chunks_exact_mut(2 * l) {
                let (a, b) = isa.load_half2::<BF16>(yv);
                put_half2::<I, BF16>(isa, yv, affine_value(isa, a, k), affine_value(isa, b, k), stream);
            }
        }
    }
    let mut i = pairs;
    if i + l <= n {
        let v = affine_value(isa, isa.load_half::<BF16>(&x.unwrap_or(y)[i..]), k);
        put_half::<I, BF16>(isa, &mut y[i..i + l], v, stream);
        i += l;
    }
    if i < n {
        let v = isa.load_half_tail::<BF16>(&x.unwrap_or(y)[i..]);
        put_half::<I, BF16>(isa, &mut y[i..], affine_value(isa, v, k), stream);
    }
}

/// Stores the low `s.len() <= LANES` lanes of `v` rounded to 16 bits: non-temporal when
/// `stream` ([`Isa::stream_half_part`]), else [`Isa::store_half`] or [`Isa::store_half_tail`].
#[inline(always)]
pub(crate) fn put_half<I: Isa, const BF16: bool>(isa: I, s: &mut [u16], v: I::V, stream: bool) {
    if stream {
        isa.stream_half_part::<BF16>(s, v)
    } else if s.len() == I::LANES {
        isa.store_half::<BF16>(s, v)
    } else {
        isa.store_half_tail::<BF16>(s, v)
    }
}

/// [`Isa::store_half2`], or [`Isa::stream_half2`] when `stream` (`s` then on a `4 * LANES`-byte
/// boundary).
#[inline(always)]
pub(crate) fn put_half2<I: Isa, const BF16: bool>(isa: I, s: &mut [u16], a: I::V, b: I::V, stream: bool) {
    if stream {
        isa.stream_half2::<BF16>(s, a, b)
    } else {
        isa.store_half2::<BF16>(s, a, b)
    }
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
                    let one_run = Params::Runs { inner: n, m: &[m], s: &[sc], t: &[t] };
                    affine(backend, format, &x, &mut y, one_run);
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
                // Rows of 32, 64 and 128 columns (pairs with the parameters in registers), 48
                // (whole vectors) and 20 (a masked tail), out of place and in place.
                for period in [32, 64, 128, 48, 20] {
                    let mp: Vec<f32> = (0..period).map(|j| j as f32 * 0.1).collect();
                    let sp: Vec<f32> =
                        (0..period).map(|j| if j % 3 == 0 { 1e-39 } else { 0.5 + j as f32 }).collect();
                    let tp: Vec<f32> = (0..period).map(|j| -(j as f32)).collect();
                    let rows = n / period;
                    let (xr, mut yr) = (&x[..rows * period], vec![0u16; rows * period]);
                    affine(backend, format, xr, &mut yr, Params::Lanes(&mp, &sp, &tp));
                    let mut inplace = xr.to_vec();
                    affine_inplace(backend, format, &mut inplace, Params::Lanes(&mp, &sp, &tp));
                    for i in 0..rows * period {
                        let k = i % period;
                        let expected = reference_narrow(
                            format,
                            (reference_widen(format, xr[i]) - mp[k]).mul_add(sp[k], tp[k]),
                        );
                        let same = yr[i] == expected
                            || (reference_widen(format, yr[i]).is_nan()
                                && reference_widen(format, expected).is_nan());
                        let at = format!("{backend} {format:?} rows of {period} [{i}]");
                        assert!(same, "{at}: {:#06x} vs {expected:#06x}", yr[i]);
                        assert_eq!(inplace[i], yr[i], "{at} in place");
                    }
                }
                // Consecutive runs of 3 channels (runs of 37, 16 and 69 values: pairs, one
                // vector, masked tails), out of place and in place.
                for inner in [37, 16, 69] {
                    let len = (n / inner / 3) * 3 * inner;
                    let (xr, mut yr) = (&x[..len], vec![0u16; len]);
                    let (m3, s3, t3) = ([0.5f32, -2.0, 0.0], [1e-39f32, 3.0, 0.25], [1.0f32, 0.0, -1e-38]);
                    let p = Params::Runs { inner, m: &m3, s: &s3, t: &t3 };
                    affine(backend, format, xr, &mut yr, p);
                    let mut inplace = xr.to_vec();
                    affine_inplace(backend, format, &mut inplace, p);
                    for i in 0..len {
                        let c = (i / inner) % 3;
                        let expected = reference_narrow(
                            format,
                            (reference_widen(format, xr[i]) - m3[c]).mul_add(s3[c], t3[c]),
                        );
                        let same = yr[i] == expected
                            || (reference_widen(format, yr[i]).is_nan()
                                && reference_widen(format, expected).is_nan());
                        assert!(
                            same,
                            "{backend} {format:?} runs of {inner} [{i}]: {:#06x} vs {expected:#06x}",
                            yr[i]
                        );
                        assert_eq!(inplace[i], yr[i], "{backend} {format:?} runs of {inner} in place [{i}]");
                    }
                }
            }
        }
    }
}
