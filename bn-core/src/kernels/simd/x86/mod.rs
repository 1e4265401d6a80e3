//! The `core::arch` instruction sets: AVX2+FMA+F16C (8 lanes) and AVX-512F (16 lanes, masked
//! tails; `Avx512<true>` adds AVX512-BF16's conversions).
//!
//! Each token can only be made when the running CPU has its features, so its methods, thin
//! wrappers around intrinsics, are safe to call; [`Isa::vectorize`](super::Isa::vectorize) enters a
//! `#[target_feature]` function so that the inlined kernel body is compiled for the features.
//!
//! Files: [`avx2`] and [`avx512`], each token's implementation of [`Isa`]; here the tokens,
//! their detection and the streaming stores both use.

use core::arch::x86_64::*;

use super::backend::{has_avx2, has_avx512};

mod avx2;
mod avx512;

/// AVX2 + FMA + F16C: 8-lane `__m256` vectors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2(());

impl Avx2 {
    /// The token, if the CPU has AVX2, FMA and F16C.
    #[inline]
    pub(crate) fn new() -> Option<Avx2> {
        has_avx2().then_some(Avx2(()))
    }
}

/// AVX-512F: 16-lane `__m512` vectors with masked loads and stores for tails.
///
/// `Avx512<true>` ([`Avx512Bf16`]) is the same instruction set where the CPU also has
/// AVX512-BF16 (and BW, VL, DQ): its kernels round `f32` to `bf16` with `vcvtne2ps2bf16` /
/// `vcvtneps2bf16` instead of seven integer instructions per vector, to the same bits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512<const BF16_INSN: bool = false>(());

/// [`Avx512`] with AVX512-BF16's conversion instructions.
pub(crate) type Avx512Bf16 = Avx512<true>;

impl Avx512 {
    /// The token, if the CPU has AVX-512F (and AVX2 and FMA).
    #[inline]
    pub(crate) fn new() -> Option<Avx512> {
        has_avx512().then_some(Avx512(()))
    }
}

impl Avx512Bf16 {
    /// The token, if the CPU has AVX-512F, BW, VL, DQ and BF16 (cached by `std`).
    #[inline]
    pub(crate) fn with_bf16() -> Option<Avx512Bf16> {
        // Asked once per kernel call: one cached flag instead of five detections.
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let has = *HAS.get_or_init(|| {
            has_avx512()
                && std::arch::is_x86_feature_detected!("avx512bf16")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512dq")
        });
        has.then_some(Avx512(()))
    }
}

/// Writes `s.len()` values of `values` (which holds at least as many) into `s` with
/// non-temporal stores only: 16-byte `movntps` where `s` is 16-byte aligned and four values
/// remain, 4-byte `movnti` elsewhere (`s` is always 4-byte aligned). Follow with `sfence` before
/// other threads read `s`, as after every streaming store.
#[inline(always)]
pub(super) fn stream_values(s: &mut [f32], values: &[f32]) {
    let n = s.len();
    assert!(values.len() >= n);
    let mut j = 0;
    while j < n {
        let p = s[j..].as_mut_ptr();
        if j + 4 <= n && (p as usize).is_multiple_of(16) {
            // SAFETY: SSE is part of x86-64; `s[j..j + 4]` and `values[j..j + 4]` are in bounds
            // (`j + 4 <= n <= values.len()`) and `p` is 16-byte aligned (checked).
            unsafe { _mm_stream_ps(p, _mm_loadu_ps(values[j..].as_ptr())) };
            j += 4;
        } else {
            // SAFETY: SSE2 is part of x86-64; `p` points at `s[j]`, `j < n`, an aligned `f32`
            // (so an aligned `i32`: same size and alignment).
            unsafe { _mm_stream_si32(p as *mut i32, values[j].to_bits() as i32) };
            j += 1;
        }
    }
}

/// Writes `s.len()` 16-bit values of `values` (which holds at least as many) into `s` with
/// non-temporal stores where x86 has them: 16-byte `movntdq` where `s` is 16-byte aligned and
/// eight values remain, 4-byte `movnti` for two values where it is 4-byte aligned, and a regular
/// 2-byte store for a single value (x86 has no 2-byte non-temporal store). Follow with `sfence`
/// before other threads read `s`, as after every streaming store.
#[inline(always)]
pub(super) fn stream_u16(s: &mut [u16], values: &[u16]) {
    let n = s.len();
    assert!(values.len() >= n);
    let mut j = 0;
    while j < n {
        let p = s[j..].as_mut_ptr();
        if j + 8 <= n && (p as usize).is_multiple_of(16) {
            // SAFETY: SSE2 is part of x86-64; `s[j..j + 8]` and `values[j..j + 8]` are in bounds
            // (`j + 8 <= n <= values.len()`) and `p` is 16-byte aligned (checked).
            unsafe {
                _mm_stream_si128(p as *mut __m128i, _mm_loadu_si128(values[j..].as_ptr() as *const __m128i))
            };
            j += 8;
        } else if j + 2 <= n && (p as usize).is_multiple_of(4) {
            // Little-endian: `values[j]` is the low half, at the lower address.
            let pair = u32::from(values[j]) | (u32::from(values[j + 1]) << 16);
            // SAFETY: SSE2 is part of x86-64; `s[j..j + 2]` is in bounds and `p` is 4-byte
            // aligned (checked).
            unsafe { _mm_stream_si32(p as *mut i32, pair as i32) };
            j += 2;
        } else {
            s[j] = values[j];
            j += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::simd::Isa;

    /// `stream_tail` writes exactly the first `n` values of the vector, at every alignment of
    /// the output and for every `n < LANES`, and nothing past them.
    #[test]
    fn stream_tail_writes_the_partial_vector_only() {
        fn check<I: Isa>(isa: I, name: &str) {
            let l = I::LANES;
            let src: Vec<f32> = (0..l).map(|i| i as f32 + 0.5).collect();
            let v = isa.load(&src);
            for offset in 0..l {
                for n in 0..l {
                    let mut buf = vec![-1.0f32; 3 * l];
                    isa.stream_tail(&mut buf[offset..offset + n], v);
                    isa.fence();
                    for (i, &got) in buf.iter().enumerate() {
                        let want = if (offset..offset + n).contains(&i) { src[i - offset] } else { -1.0 };
                        assert_eq!(got, want, "{name}: offset {offset}, {n} values: value {i}");
                    }
                }
            }
        }
        match Avx2::new() {
            Some(isa) => check(isa, "avx2"),
            None => println!("skipping AVX2: not on this CPU"),
        }
        match Avx512::new() {
            Some(isa) => check(isa, "avx512"),
            None => println!("skipping AVX-512: not on this CPU"),
        }
    }

    /// `stream_half_part` writes exactly the first `n <= LANES` rounded values, at every 2-byte
    /// alignment of the output (16-byte, 4-byte and single-value stores), and nothing past them;
    /// `stream_half2` writes the values `store_half2` writes. Both formats.
    #[test]
    fn streamed_16_bit_stores_write_what_regular_stores_write() {
        fn check<I: Isa, const BF16: bool>(isa: I, name: &str) {
            let l = I::LANES;
            let src: Vec<f32> = (0..2 * l).map(|i| i as f32 * 1.37 - 9.1).collect();
            let (a, b) = (isa.load(&src), isa.load(&src[l..]));
            let mut want = vec![0u16; 2 * l];
            isa.store_half::<BF16>(&mut want, a);
            for offset in 0..2 * l {
                for n in 0..=l {
                    let mut buf = vec![0xdeadu16; 4 * l];
                    isa.stream_half_part::<BF16>(&mut buf[offset..offset + n], a);
                    isa.fence();
                    for (i, &got) in buf.iter().enumerate() {
                        let w = if (offset..offset + n).contains(&i) { want[i - offset] } else { 0xdead };
                        assert_eq!(got, w, "{name} bf16={BF16}: offset {offset}, {n} values: value {i}");
                    }
                }
            }
            isa.store_half2::<BF16>(&mut want, a, b);
            // A 4 * LANES-byte boundary inside a buffer of 4 pairs.
            let mut buf = vec![0xdeadu16; 8 * l];
            let start = (4 * l - (buf.as_ptr() as usize) % (4 * l)) % (4 * l) / 2;
            isa.stream_half2::<BF16>(&mut buf[start..start + 2 * l], a, b);
            isa.fence();
            assert_eq!(&buf[start..start + 2 * l], &want[..], "{name} bf16={BF16}: stream_half2");
            assert!(buf[..start].iter().chain(&buf[start + 2 * l..]).all(|&v| v == 0xdead));
        }
        match Avx2::new() {
            Some(isa) => {
                check::<_, true>(isa, "avx2");
                check::<_, false>(isa, "avx2");
            }
            None => println!("skipping AVX2: not on this CPU"),
        }
        match Avx512::new() {
            Some(isa) => {
                check::<_, true>(isa, "avx512");
                check::<_, false>(isa, "avx512");
            }
            None => println!("skipping AVX-512: not on this CPU"),
        }
        match Avx512Bf16::with_bf16() {
            Some(isa) => check::<_, true>(isa, "avx512-bf16"),
            None => println!("skipping AVX512-BF16: not on this CPU"),
        }
    }

    /// `sums` computes every lane's `sum` bit for bit (the two must share their order).
    #[test]
    fn transposed_sums_match_sum() {
        let Some(isa) = Avx512::new() else {
            println!("skipping: no AVX-512F");
            return;
        };
        let mut state = 0x1234_5678_9abc_def1u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 20) as f32 - 8.0
        };
        for n in 0..=16 {
            let data: Vec<[f32; 16]> =
                (0..n).map(|_| core::array::from_fn(|_| next() * 1e3 + next())).collect();
            let v: Vec<__m512> = data.iter().map(|d| isa.load(d)).collect();
            let mut out = [f32::NAN; 16];
            isa.sums(&v, &mut out[..n]);
            for j in 0..n {
                assert_eq!(out[j].to_bits(), isa.sum(v[j]).to_bits(), "vector {j} of {n}");
            }
        }
    }
}
