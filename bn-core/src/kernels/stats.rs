//! The `f64` side of the kernels: moments of blocks and their merge, and the per-channel
//! coefficients the vector loops apply.
//!
//! Statistics are computed two-pass over cache-resident blocks (a block's mean, then the sums of
//! the deviations from it) and blocks are combined with Chan's parallel-variance merge, always in
//! an order fixed by the shape alone, never by the thread count. No raw sum of squares appears
//! anywhere, so `|mean| >> std` loses nothing.

/// `value` rounded to `f32`, with finite values beyond its range at `±f32::MAX` (infinities
/// and NaN, which come from non-finite data, pass through): the per-channel coefficients go
/// through it. A tiny `eps` on a
/// constant channel makes `gamma / sqrt(var + eps)` exceed `f32`, and an infinite scale times
/// the channel's zero deviations would be NaN where the answer is `beta`. Every value that
/// rounds to a finite `f32` keeps its bits.
#[inline(always)]
pub(crate) fn saturate_f32(value: f64) -> f32 {
    // A finite value that `clamp` moves would have rounded to an infinity or to the bound
    // itself, so finite results keep their bits.
    if value.is_finite() {
        value.clamp(-(f32::MAX as f64), f32::MAX as f64) as f32
    } else {
        value as f32
    }
}

/// Count, mean and sum of squared deviations of a set of values (Chan et al.).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Moments {
    pub n: f64,
    pub mean: f64,
    pub m2: f64,
}

impl Moments {
    /// No values.
    pub const EMPTY: Moments = Moments { n: 0.0, mean: 0.0, m2: 0.0 };

    /// The moments of `n` values (`inv_n = 1 / n`) from the sums of their deviations from `shift`:
    /// `ds = sum(x - shift)` and `qs = sum((x - shift)^2)`. The correction `ds^2 / n` removes
    /// the error of a shift that is not exactly the mean (the corrected two-pass algorithm).
    #[inline(always)]
    pub fn from_deviations(n: f64, inv_n: f64, shift: f32, ds: f64, qs: f64) -> Moments {
        let mean_ds = ds * inv_n;
        let m2 = qs - ds * mean_ds;
        // `m2 < 0` is rounding; NaN stays NaN so that a non-finite input is reported.
        Moments { n, mean: shift as f64 + mean_ds, m2: if m2 < 0.0 { 0.0 } else { m2 } }
    }

    /// Whether sums of deviations from a pilot shift (`ds = sum(x - shift)`,
    /// `qs = sum((x - shift)^2)` over `n` values) should be taken again around the mean they
    /// give: the correction `ds^2 / n` would remove over half of `qs` (the pilot is far from the
    /// mean, and the subtraction would amplify rounding), or a sum is not finite (squares of
    /// deviations from a far pilot can overflow where those from the mean do not).
    ///
    /// Written without a division (`ds^2 <= n qs / 2`, false for NaN), so that a tile's columns
    /// are tested in a few vector instructions: a division per column cost the rows family's
    /// statistics as much as its pass over the data on short blocks.
    #[inline(always)]
    #[allow(clippy::neg_cmp_op_on_partial_ord)] // on purpose: true when either side is NaN
    pub fn pilot_is_far(n: f64, ds: f64, qs: f64) -> bool {
        !(ds * ds <= 0.5 * n * qs)
    }

    /// Chan's merge of two disjoint sets. Merging into [`Moments::EMPTY`] returns `other`
    /// exactly, so folding from `EMPTY` starts with the first block's own values.
    #[inline(always)]
    pub fn merge(self, other: Moments) -> Moments {
        if self.n == 0.0 {
            return other;
        }
        if other.n == 0.0 {
            return self;
        }
        let n = self.n + other.n;
        let delta = other.mean - self.mean;
        Moments {
            n,
            mean: self.mean + delta * (other.n / n),
            m2: self.m2 + other.m2 + delta * delta * (self.n * other.n / n),
        }
    }
}

/// The `f32` transform `y = (x - m) * s + t` equal (to rounding) to
/// `gamma * (x - mean) / sqrt(var + eps) + beta`: `m` is the mean rounded to `f32` (so `x - m`
/// is exact or nearly) and `t` absorbs the rounding `m - mean`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Affine32 {
    pub m: f32,
    pub s: f32,
    pub t: f32,
}

impl Affine32 {
    /// The training forward's transform of one channel.
    #[inline(always)]
    pub fn train(mean: f64, var: f64, eps: f64, gamma: f32, beta: f32) -> Affine32 {
        Self::train_from_inv_std(mean, 1.0 / (var + eps).sqrt(), gamma, beta)
    }

    /// [`Affine32::train`] from `inv_std = 1 / sqrt(var + eps)`.
    #[inline(always)]
    pub fn train_from_inv_std(mean: f64, inv_std: f64, gamma: f32, beta: f32) -> Affine32 {
        let m = mean as f32;
        let k = gamma as f64 * inv_std;
        Affine32 { m, s: saturate_f32(k), t: saturate_f32(beta as f64 + (m as f64 - mean) * k) }
    }
}

/// [`Affine32::train`] of up to `L` channels at once, as arrays (so that the square roots and
/// divisions of a group of channels are vector instructions): lane `j` is bit-identical to
/// `Affine32::train(mean[j], var[j], eps, gamma[j], beta[j])`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AffineGroup<const L: usize> {
    pub m: [f32; L],
    pub s: [f32; L],
    pub t: [f32; L],
}

impl<const L: usize> AffineGroup<L> {
    #[inline(always)]
    pub fn train(mean: &[f64; L], var: &[f64; L], eps: f64, gamma: &[f32; L], beta: &[f32; L]) -> Self {
        let mut out = AffineGroup { m: [0.0; L], s: [0.0; L], t: [0.0; L] };
        for j in 0..L {
            let inv_std = 1.0 / (var[j] + eps).sqrt();
            let m = mean[j] as f32;
            let k = gamma[j] as f64 * inv_std;
            out.m[j] = m;
            out.s[j] = saturate_f32(k);
            out.t[j] = saturate_f32(beta[j] as f64 + (m as f64 - mean[j]) * k);
        }
        out
    }
}

/// The training backward's `dx = k1 * dy + k2 * (x - m) + k3` for one channel, equal (to
/// rounding) to `gamma * inv_std * (dy - sum_dy / n - xhat * sum_dy_xhat / n)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DxCoefficients {
    pub m: f32,
    pub k1: f32,
    pub k2: f32,
    pub k3: f32,
}

/// Finishes the backward reductions of one channel. `sum_dy` and `sum_dy_xm = sum(dy * (x - m))`
/// were accumulated with the shift `m = f32(mean)`; returns `sum(dy * xhat)`, exact in the shift.
#[inline(always)]
pub(crate) fn sum_dy_xhat(mean: f64, m: f32, inv_std: f64, sum_dy: f64, sum_dy_xm: f64) -> f64 {
    inv_std * (sum_dy_xm + (m as f64 - mean) * sum_dy)
}

impl DxCoefficients {
    /// The coefficients from the channel's statistics and finished sums.
    #[inline(always)]
    pub fn train(mean: f64, inv_std: f64, gamma: f32, n: f64, sum_dy: f64, sum_dy_xhat: f64) -> Self {
        let m = mean as f32;
        let mut k1 = gamma as f64 * inv_std;
        if k1.is_finite() && (k1 as f32).is_infinite() {
            // A scale beyond `f32` (a tiny `eps` on a constant channel): the coefficients of the
            // largest finite scale, so that `k1 * dy + k3` still cancels for a constant `dy`.
            k1 = saturate_f32(k1) as f64;
        }
        let k2 = -k1 * inv_std * sum_dy_xhat / n;
        let k3 = -k1 * sum_dy / n + k2 * (m as f64 - mean);
        DxCoefficients { m, k1: k1 as f32, k2: saturate_f32(k2), k3: saturate_f32(k3) }
    }
}
