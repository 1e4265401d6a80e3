//! The forward passes of the fast `f32` kernels (training, inference, the statistics alone) and
//! the gradient of a fused ReLU: the checks of each pass, then the scalar reference on
//! `Backend::Scalar`, else the instruction set of the backend and the layout family of the
//! shape ([`planes`] or [`rows`]).

use super::epilogue::{with_act, Epilogue, MaskGrad};
use super::loops::{InPlace, Io, Split};
use super::simd::with_isa;
use super::{parallel, planes, reference, rows, stats, Backend};
use crate::spec::{specialize, Spec};
use crate::{Canonical, Family};

/// Training forward, fused: per-channel batch mean and biased variance into `mean_out` and
/// `var_out` (`f64`), and `y = (x - mean) * gamma / sqrt(var + eps) + beta`.
///
/// `x` and `y` hold `dims.len()` values; `gamma`, `beta`, `mean_out` and `var_out` hold
/// `dims.channels`; `dims.per_channel() >= 1` (the layer asks for 2). If a statistic is not
/// finite, `y` is unspecified. `Backend::Scalar` runs the `f64` reference kernels.
///
/// ```
/// use batchnorm::kernels::{self, Backend};
/// use batchnorm::{spec::Dynamic, Canonical};
///
/// let dims = Canonical { outer: 2, channels: 1, inner: 2 };
/// let (x, mut y) = ([1.0, 2.0, 3.0, 4.0], [0.0; 4]);
/// let (mut mean, mut var) = ([0.0], [0.0]);
/// kernels::forward_train::<Dynamic>(Backend::detect(), &x, &mut y, dims, &[1.0], &[0.0], 0.0, &mut mean, &mut var);
/// assert_eq!((mean[0], var[0]), (2.5, 1.25));
/// ```
#[allow(clippy::too_many_arguments)]
pub fn forward_train<S: Spec>(
    backend: Backend,
    x: &[f32],
    y: &mut [f32],
    dims: Canonical,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    mean_out: &mut [f64],
    var_out: &mut [f64],
) {
    forward_train_fused::<S>(backend, x, y, Epilogue::None, dims, gamma, beta, eps, mean_out, var_out)
}

/// [`forward_train`] with an [`Epilogue`] fused into its stores: `y = relu(bn(x))` or
/// `y = relu(bn(x) + residual)`. The statistics are those of `x` alone.
///
/// ```
/// use batchnorm::kernels::{self, Backend, Epilogue};
/// use batchnorm::{spec::Dynamic, Canonical};
///
/// let dims = Canonical { outer: 4, channels: 1, inner: 1 };
/// let (x, mut y) = ([1.0, 2.0, 3.0, 4.0], [0.0; 4]);
/// let (mut mean, mut var) = ([0.0], [0.0]);
/// let epilogue = Epilogue::AddRelu(&[0.0, 0.0, 0.0, -10.0]);
/// kernels::forward_train_fused::<Dynamic>(Backend::detect(), &x, &mut y, epilogue, dims, &[1.0], &[0.0], 0.0, &mut mean, &mut var);
/// assert_eq!(&y[..2], &[0.0, 0.0]); // below the mean: negative before the ReLU
/// assert!(y[2] > 0.0 && y[3] == 0.0);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn forward_train_fused<S: Spec>(
    backend: Backend,
    x: &[f32],
    y: &mut [f32],
    epilogue: Epilogue<'_>,
    dims: Canonical,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    mean_out: &mut [f64],
    var_out: &mut [f64],
) {
    let dims = specialize::<S>(dims);
    let c = dims.channels;
    assert!(x.len() == dims.len() && y.len() == dims.len(), "x and y must hold dims.len() values");
    if let Some(r) = epilogue.residual() {
        assert_eq!(r.len(), dims.len(), "the residual must hold dims.len() values");
    }
    assert!(gamma.len() == c && beta.len() == c && mean_out.len() == c && var_out.len() == c);
    if dims.per_channel() == 0 {
        mean_out.fill(f64::NAN);
        var_out.fill(f64::NAN);
        return;
    }
    if c == 0 {
        return;
    }
    match backend.usable() {
        Backend::Scalar => {
            reference::batch_stats(x, dims, mean_out, var_out);
            let inv_std: Vec<f64> = var_out.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
            let affine = reference::Affine { mean: &*mean_out, inv_std: &inv_std, gamma, beta };
            reference::normalize(x, y, dims, affine);
            epilogue.apply_to(y);
        }
        b => {
            with_isa!(b, |isa| with_act!(epilogue, |act| match dims.family() {
                Family::Planes => planes::forward_train::<S, _, _>(
                    isa, x, y, act, dims, gamma, beta, eps, mean_out, var_out
                ),
                Family::Rows =>
                    rows::forward_train::<S, _, _>(isa, x, y, act, dims, gamma, beta, eps, mean_out, var_out),
            }))
        }
    }
}

/// Inference: `y = (x - mean[c]) * scale[c] + shift[c]`, one streaming pass, no allocation.
///
/// `x` and `y` hold `dims.len()` values (an empty tensor is a no-op); `mean`, `scale` and
/// `shift` hold `dims.channels`. `Backend::Scalar` computes in `f64` (the reference's formula
/// with `inv_std = scale`, `gamma = 1`).
pub fn normalize<S: Spec>(
    backend: Backend,
    x: &[f32],
    y: &mut [f32],
    dims: Canonical,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
) {
    normalize_fused::<S>(backend, x, y, Epilogue::None, dims, mean, scale, shift)
}

/// [`normalize`] with an [`Epilogue`] fused into its stores (one pass; with a residual it reads
/// `x` and the residual and writes `y`).
#[allow(clippy::too_many_arguments)]
pub fn normalize_fused<S: Spec>(
    backend: Backend,
    x: &[f32],
    y: &mut [f32],
    epilogue: Epilogue<'_>,
    dims: Canonical,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
) {
    assert!(x.len() == dims.len() && y.len() == dims.len(), "x and y must hold dims.len() values");
    if let Some(r) = epilogue.residual() {
        assert_eq!(r.len(), dims.len(), "the residual must hold dims.len() values");
    }
    parallel::without_alloc(2 * dims.len(), || {
        normalize_split::<S>(backend, x, y, epilogue, dims, mean, scale, shift, true)
    })
}

/// [`normalize_fused`] for a training step (the synchronized forward's normalize): helped from
/// outside the pool like the training kernels, never handed to a worker, and streamed by the
/// training passes' rule.
#[allow(clippy::too_many_arguments)]
pub(crate) fn normalize_fused_helped<S: Spec>(
    backend: Backend,
    x: &[f32],
    y: &mut [f32],
    epilogue: Epilogue<'_>,
    dims: Canonical,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
) {
    normalize_split::<S>(backend, x, y, epilogue, dims, mean, scale, shift, false)
}

/// [`normalize_io`] from `x` into `y` with `epilogue` fused into the stores.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn normalize_split<S: Spec>(
    backend: Backend,
    x: &[f32],
    y: &mut [f32],
    epilogue: Epilogue<'_>,
    dims: Canonical,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
    inference: bool,
) {
    with_act!(epilogue, |act| normalize_io::<S, _>(
        backend,
        Split { x, y, act },
        dims,
        mean,
        scale,
        shift,
        inference
    ))
}

/// [`normalize`] in place: bit-identical to it (the same loop body runs both).
pub fn normalize_inplace<S: Spec>(
    backend: Backend,
    xy: &mut [f32],
    dims: Canonical,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
) {
    normalize_inplace_fused::<S>(backend, xy, Epilogue::None, dims, mean, scale, shift)
}

/// [`normalize_inplace`] with an [`Epilogue`]: bit-identical to [`normalize_fused`].
pub fn normalize_inplace_fused<S: Spec>(
    backend: Backend,
    xy: &mut [f32],
    epilogue: Epilogue<'_>,
    dims: Canonical,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
) {
    assert!(xy.len() == dims.len(), "xy must hold dims.len() values");
    if let Some(r) = epilogue.residual() {
        assert_eq!(r.len(), dims.len(), "the residual must hold dims.len() values");
    }
    parallel::without_alloc(2 * dims.len(), || {
        with_act!(epilogue, |act| normalize_io::<S, _>(
            backend,
            InPlace(xy, act),
            dims,
            mean,
            scale,
            shift,
            true
        ))
    })
}

/// The gradient a fused ReLU passes back: `out = dy` where the forward's pre-activation
/// `(x - mean) * scale + shift (+ residual)` is positive, else `0`.
///
/// The pre-activation is recomputed from `x` by the same arithmetic as [`normalize_fused`] (and,
/// for a training forward, [`forward_train_fused`] on the same backend with the coefficients
/// [`train_coefficients`] gives), so the mask is exactly the forward's `y > 0`. With a
/// residual, `out` is also the gradient of the residual. One pass; like the training and
/// backward kernels it allocates nothing on a worker of the pool, and two small objects per call
/// from outside it (the helpers' job, see `parallel`).
#[allow(clippy::too_many_arguments)]
pub fn relu_grad<S: Spec>(
    backend: Backend,
    x: &[f32],
    dy: &[f32],
    residual: Option<&[f32]>,
    out: &mut [f32],
    dims: Canonical,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
) {
    let n = dims.len();
    assert!(x.len() == n && dy.len() == n && out.len() == n, "x, dy and out must hold dims.len() values");
    if let Some(r) = residual {
        assert_eq!(r.len(), n, "the residual must hold dims.len() values");
    }
    let act = MaskGrad { dy, residual };
    normalize_io::<S, _>(backend, Split { x, y: out, act }, dims, mean, scale, shift, false)
}

/// The `f32` coefficients `(mean, scale, shift)` of channel `c`'s transform in a training
/// forward of the fast kernels, from the batch mean and `inv_std = 1 / sqrt(var + eps)`:
/// passing them to [`relu_grad`] recomputes exactly the values that forward normalized.
pub fn train_coefficients(mean: f64, inv_std: f64, gamma: f32, beta: f32) -> (f32, f32, f32) {
    let a = stats::Affine32::train_from_inv_std(mean, inv_std, gamma, beta);
    (a.m, a.s, a.t)
}

/// The normalize of every entry point above; `inference` picks the streaming rule of the planes
/// family (inference's, or the training passes' for the synchronized forward and [`relu_grad`]).
#[allow(clippy::too_many_arguments)]
fn normalize_io<S: Spec, T: Io>(
    backend: Backend,
    io: T,
    dims: Canonical,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
    inference: bool,
) {
    let c = dims.channels;
    assert!(mean.len() == c && scale.len() == c && shift.len() == c);
    if dims.is_empty() {
        return;
    }
    let dims = specialize::<S>(dims);
    match backend.usable() {
        Backend::Scalar => scalar_normalize(io, dims, mean, scale, shift),
        b => with_isa!(b, |isa| match dims.family() {
            Family::Planes => planes::normalize::<S, _, T>(isa, io, dims, mean, scale, shift, inference),
            Family::Rows => rows::normalize::<S, _, T>(isa, io, dims, mean, scale, shift),
        }),
    }
}

/// The scalar inference: `((x - mean) * scale + shift)` in `f64`, rounded once.
fn scalar_normalize<T: Io>(mut io: T, dims: Canonical, mean: &[f32], scale: &[f32], shift: &[f32]) {
    let inner = dims.inner;
    for (r, start) in (0..dims.len()).step_by(inner).enumerate() {
        let c = r % dims.channels;
        let (m, s, t) = (mean[c] as f64, scale[c] as f64, shift[c] as f64);
        for i in start..start + inner {
            let v = io.get(i);
            io.set(i, ((v as f64 - m) * s + t) as f32);
        }
    }
}

/// Per-channel batch mean and biased variance of `x`, without the normalize: the statistics half
/// of [`forward_train`] (the same blocks, chunks and merge order as its split schedule), for
/// statistics combined across processes ([`crate::sync`]).
///
/// `x` holds `dims.len()` values; `mean_out` and `var_out` hold `dims.channels`. A tensor with
/// no values per channel gives NaN. `Backend::Scalar` runs [`reference::batch_stats`].
///
/// ```
/// use batchnorm::kernels::{self, Backend};
/// use batchnorm::{spec::Dynamic, Canonical};
///
/// let dims = Canonical { outer: 2, channels: 1, inner: 2 };
/// let (mut mean, mut var) = ([0.0], [0.0]);
/// kernels::batch_stats::<Dynamic>(Backend::detect(), &[1.0, 2.0, 3.0, 4.0], dims, &mut mean, &mut var);
/// assert_eq!((mean[0], var[0]), (2.5, 1.25));
/// ```
pub fn batch_stats<S: Spec>(
    backend: Backend,
    x: &[f32],
    dims: Canonical,
    mean_out: &mut [f64],
    var_out: &mut [f64],
) {
    let dims = specialize::<S>(dims);
    let c = dims.channels;
    assert!(x.len() == dims.len(), "x must hold dims.len() values");
    assert!(mean_out.len() == c && var_out.len() == c);
    if dims.per_channel() == 0 {
        mean_out.fill(f64::NAN);
        var_out.fill(f64::NAN);
        return;
    }
    if c == 0 {
        return;
    }
    match backend.usable() {
        Backend::Scalar => reference::batch_stats(x, dims, mean_out, var_out),
        b => {
            with_isa!(b, |isa| match dims.family() {
                Family::Planes => planes::statistics::<S, _>(
                    isa,
                    x,
                    dims,
                    parallel::use_pool(dims.len()),
                    mean_out,
                    var_out
                ),
                Family::Rows => rows::batch_stats::<S, _>(isa, x, dims, mean_out, var_out),
            })
        }
    }
}
