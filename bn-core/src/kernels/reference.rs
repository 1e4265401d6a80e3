//! The scalar reference kernels: f64 accumulation, two-pass statistics, written for clarity.
//!
//! They are the oracle every faster path is tested against. Each kernel walks the canonical view
//! `(outer, C, inner)` run by run: run `(o, c)` is the `inner` contiguous values of channel `c` in
//! outer slice `o`, at offset `(o * C + c) * inner`.

use crate::{Canonical, Element, Param};

/// Calls `f(c, start)` for every contiguous run of one channel, in memory order.
#[inline]
fn for_each_run(dims: Canonical, mut f: impl FnMut(usize, usize)) {
    for o in 0..dims.outer {
        for c in 0..dims.channels {
            f(c, (o * dims.channels + c) * dims.inner);
        }
    }
}

/// Per-channel mean and biased variance `sum((x - mean)^2) / n`, accumulated in f64 in two
/// passes (so the result stays accurate when `|mean| >> std`).
///
/// `x.len()` must be `dims.len()`; `mean` and `var` must hold `dims.channels` values. A channel
/// with no values gets NaN.
pub fn batch_stats<E: Element>(x: &[E], dims: Canonical, mean: &mut [f64], var: &mut [f64]) {
    assert_eq!(x.len(), dims.len());
    let n = dims.per_channel() as f64;
    mean.fill(0.0);
    for_each_run(dims, |c, start| {
        mean[c] += x[start..start + dims.inner].iter().map(|v| v.to_f64()).sum::<f64>();
    });
    mean.iter_mut().for_each(|m| *m /= n);
    var.fill(0.0);
    for_each_run(dims, |c, start| {
        let m = mean[c];
        var[c] += x[start..start + dims.inner]
            .iter()
            .map(|v| {
                let d = v.to_f64() - m;
                d * d
            })
            .sum::<f64>();
    });
    var.iter_mut().for_each(|v| *v /= n);
    if mean.iter().chain(var.iter()).any(|s| !s.is_finite()) {
        rescale_overflowed(x, dims, mean, var);
    }
}

/// The channels of [`batch_stats`] whose sums overflowed although all their values are finite
/// (`f64` data near the type's limit, e.g. a constant `1e308`): recomputed from the values
/// divided by a power of two (exact), so that a statistic is non-finite only when it overflows
/// itself. Channels with a NaN or an infinity keep their non-finite statistics. Only taken when
/// a statistic is not finite; one pass per sum over the whole tensor.
fn rescale_overflowed<E: Element>(x: &[E], dims: Canonical, mean: &mut [f64], var: &mut [f64]) {
    let c = dims.channels;
    let n = dims.per_channel() as f64;
    // The largest magnitude of each channel; NaN once the channel has a non-finite value.
    let mut scale = vec![0.0f64; c];
    for_each_run(dims, |ch, start| {
        for v in &x[start..start + dims.inner] {
            let a = v.to_f64().abs();
            scale[ch] = if a.is_finite() && scale[ch].is_finite() { scale[ch].max(a) } else { f64::NAN };
        }
    });
    let mut redo = vec![false; c];
    for ch in 0..c {
        let exponent = f64::from_bits(scale[ch].to_bits() & (0x7FF << 52)); // a power of two <= max
        redo[ch] = !(mean[ch].is_finite() && var[ch].is_finite()) && scale[ch].is_finite() && exponent > 0.0;
        if redo[ch] {
            (scale[ch], mean[ch], var[ch]) = (exponent, 0.0, 0.0);
        }
    }
    for_each_run(dims, |ch, start| {
        if redo[ch] {
            mean[ch] += x[start..start + dims.inner].iter().map(|v| v.to_f64() / scale[ch]).sum::<f64>();
        }
    });
    for_each_run(dims, |ch, start| {
        if redo[ch] {
            let m = mean[ch] / n;
            var[ch] += x[start..start + dims.inner]
                .iter()
                .map(|v| (v.to_f64() / scale[ch] - m).powi(2))
                .sum::<f64>();
        }
    });
    for ch in (0..c).filter(|&ch| redo[ch]) {
        mean[ch] = mean[ch] / n * scale[ch];
        var[ch] = var[ch] / n * scale[ch] * scale[ch];
    }
}

/// The per-channel transform `y = (x - mean) * inv_std * gamma + beta`.
#[derive(Debug, Clone, Copy)]
pub struct Affine<'a, M, P> {
    /// The mean subtracted (batch mean in training, running mean in inference).
    pub mean: &'a [M],
    /// `1 / sqrt(var + eps)`.
    pub inv_std: &'a [f64],
    /// The scale.
    pub gamma: &'a [P],
    /// The shift.
    pub beta: &'a [P],
}

impl<M: Param, P: Param> Affine<'_, M, P> {
    #[inline]
    fn apply<E: Element>(&self, c: usize, x: E) -> E {
        let xhat = (x.to_f64() - self.mean[c].to_f64()) * self.inv_std[c];
        E::from_f64(xhat * self.gamma[c].to_f64() + self.beta[c].to_f64())
    }
}

/// `y = (x - mean) * inv_std * gamma + beta`, per channel, computed in f64.
pub fn normalize<E: Element, M: Param, P: Param>(
    x: &[E],
    y: &mut [E],
    dims: Canonical,
    affine: Affine<'_, M, P>,
) {
    assert!(x.len() == dims.len() && y.len() == dims.len());
    for_each_run(dims, |c, start| {
        let run = start..start + dims.inner;
        for (yv, &xv) in y[run.clone()].iter_mut().zip(&x[run]) {
            *yv = affine.apply(c, xv);
        }
    });
}

/// [`normalize`] in place: bit-identical to it, element by element.
pub fn normalize_inplace<E: Element, M: Param, P: Param>(
    xy: &mut [E],
    dims: Canonical,
    affine: Affine<'_, M, P>,
) {
    assert_eq!(xy.len(), dims.len());
    for_each_run(dims, |c, start| {
        for v in &mut xy[start..start + dims.inner] {
            *v = affine.apply(c, *v);
        }
    });
}

/// The gradient a fused ReLU passes back, recomputing the forward's pre-activation with
/// [`normalize`]'s arithmetic: `out = dy` where `round(affine(x)) (+ residual, rounded)` is
/// positive, else 0.
pub fn relu_grad<E: Element, M: Param, P: Param>(
    x: &[E],
    dy: &[E],
    residual: Option<&[E]>,
    out: &mut [E],
    dims: Canonical,
    affine: Affine<'_, M, P>,
) {
    assert!(x.len() == dims.len() && dy.len() == dims.len() && out.len() == dims.len());
    if let Some(r) = residual {
        assert_eq!(r.len(), dims.len());
    }
    for_each_run(dims, |c, start| {
        for i in start..start + dims.inner {
            let mut v = affine.apply(c, x[i]);
            if let Some(r) = residual {
                v = E::from_f64(v.to_f64() + r[i].to_f64());
            }
            out[i] = if v.to_f64() > 0.0 { dy[i] } else { E::from_f64(0.0) };
        }
    });
}

/// The two reductions of the backward pass, per channel, in f64:
/// `sum_dy = sum(dy)` and `sum_dy_xhat = sum(dy * xhat)` with `xhat = (x - mean) * inv_std`.
pub fn backward_sums<E: Element, M: Param>(
    x: &[E],
    dy: &[E],
    dims: Canonical,
    mean: &[M],
    inv_std: &[f64],
    sum_dy: &mut [f64],
    sum_dy_xhat: &mut [f64],
) {
    assert!(x.len() == dims.len() && dy.len() == dims.len());
    sum_dy.fill(0.0);
    sum_dy_xhat.fill(0.0);
    for_each_run(dims, |c, start| {
        let (m, s) = (mean[c].to_f64(), inv_std[c]);
        let run = start..start + dims.inner;
        for (&xv, &g) in x[run.clone()].iter().zip(&dy[run]) {
            let g = g.to_f64();
            sum_dy[c] += g;
            sum_dy_xhat[c] += g * (xv.to_f64() - m) * s;
        }
    });
}

/// The input gradient of the training forward:
/// `dx = gamma * inv_std * (dy - sum_dy / n - xhat * sum_dy_xhat / n)`.
#[allow(clippy::too_many_arguments)]
pub fn backward_train_dx<E: Element, M: Param, P: Param>(
    x: &[E],
    dy: &[E],
    dx: &mut [E],
    dims: Canonical,
    mean: &[M],
    inv_std: &[f64],
    gamma: &[P],
    sum_dy: &[f64],
    sum_dy_xhat: &[f64],
) {
    let n = dims.per_channel() as f64;
    backward_train_dx_with_count(x, dy, dx, dims, n, mean, inv_std, gamma, sum_dy, sum_dy_xhat);
}

/// The input gradient of the inference forward (frozen statistics): `dx = dy * gamma * inv_std`.
pub fn backward_eval_dx<E: Element, P: Param>(
    dy: &[E],
    dx: &mut [E],
    dims: Canonical,
    inv_std: &[f64],
    gamma: &[P],
) {
    assert!(dy.len() == dims.len() && dx.len() == dims.len());
    for_each_run(dims, |c, start| {
        let k = gamma[c].to_f64() * inv_std[c];
        let run = start..start + dims.inner;
        for (d, &g) in dx[run.clone()].iter_mut().zip(&dy[run]) {
            *d = E::from_f64(g.to_f64() * k);
        }
    });
}

/// [`backward_train_dx`] with the number of reduced values `n` given rather than taken from
/// `dims`: the input gradient of a shard when the statistics and sums are those of a larger
/// batch (synchronized statistics, [`crate::sync`]).
#[allow(clippy::too_many_arguments)]
pub fn backward_train_dx_with_count<E: Element, M: Param, P: Param>(
    x: &[E],
    dy: &[E],
    dx: &mut [E],
    dims: Canonical,
    n: f64,
    mean: &[M],
    inv_std: &[f64],
    gamma: &[P],
    sum_dy: &[f64],
    sum_dy_xhat: &[f64],
) {
    assert!(x.len() == dims.len() && dy.len() == dims.len() && dx.len() == dims.len());
    for_each_run(dims, |c, start| {
        let (m, s) = (mean[c].to_f64(), inv_std[c]);
        let k = gamma[c].to_f64() * s;
        let (mean_dy, mean_dy_xhat) = (sum_dy[c] / n, sum_dy_xhat[c] / n);
        let run = start..start + dims.inner;
        for ((d, &xv), &g) in dx[run.clone()].iter_mut().zip(&x[run.clone()]).zip(&dy[run]) {
            let xhat = (xv.to_f64() - m) * s;
            *d = E::from_f64(k * (g.to_f64() - mean_dy - xhat * mean_dy_xhat));
        }
    });
}
