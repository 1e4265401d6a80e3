//! Per-vector building blocks of the kernel bodies: where a vector sits in a segment, loads of
//! per-column parameters, and the two formulas every path shares (the normalize and the
//! training `dx`).

use super::simd::Isa;

/// The vectors of `params` at `i`, without bounds checks: a loop over whole vectors that
/// sliced each of an array of parameter slices kept a check per parameter and vector (LLVM does
/// not track the lengths of an array of slices: the rows ReLU `dx` pass would keep seven checks
/// per vector).
///
/// # Safety
/// Every slice of `params` holds at least `i + I::LANES` values.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
pub(crate) unsafe fn load_params<I: Isa, const P: usize>(
    isa: I,
    params: &[&[f32]; P],
    i: usize,
) -> [I::V; P] {
    let mut v = [isa.zero(); P];
    for k in 0..P {
        debug_assert!(params[k].len() >= i + I::LANES);
        // SAFETY: `i..i + LANES` lies in `params[k]` (the caller's contract).
        v[k] = isa.load(unsafe { params[k].get_unchecked(i..i + I::LANES) });
    }
    v
}

/// Where a vector sits in a segment: offset `i` and `n` valid lanes (`LANES` except in the tail).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pos {
    pub i: usize,
    pub n: usize,
}

/// Loads the lanes of `params` at `pos` (per-column parameters of a row); zeros past the tail.
#[inline(always)]
pub(crate) fn load_at<I: Isa>(isa: I, params: &[f32], pos: Pos) -> I::V {
    if pos.n == I::LANES {
        isa.load(&params[pos.i..])
    } else {
        isa.load_tail(&params[pos.i..pos.i + pos.n])
    }
}

/// `y = (x - m) * s + t`, the one formula of every normalize path.
#[inline(always)]
pub(crate) fn affine<I: Isa>(isa: I, x: I::V, m: I::V, s: I::V, t: I::V) -> I::V {
    isa.mul_add(isa.sub(x, m), s, t)
}

/// `dx = k1 * dy + (k2 * (x - m) + k3)`, the one formula of every training `dx` path.
#[inline(always)]
pub(crate) fn dx_train<I: Isa>(isa: I, x: I::V, dy: I::V, m: I::V, k1: I::V, k2: I::V, k3: I::V) -> I::V {
    isa.mul_add(k1, dy, isa.mul_add(k2, isa.sub(x, m), k3))
}
