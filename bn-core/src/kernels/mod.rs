//! Kernels over the canonical `(outer, C, inner)` view.
//!
//! [`reference`](mod@reference) is the scalar oracle (f64 accumulation, two-pass statistics) every other path
//! is tested against. The functions of this module are the fast `f32` paths the layers call:
//! each takes a [`Backend`] ([`Backend::detect`] for the process-wide choice) and a
//! [`Spec`] whose constants (channels, inner extent) become the loops' trip counts.
//!
//! # How the fast kernels are built
//!
//! - **One body per kernel, every instruction set.** Kernel bodies are generic over an
//!   instruction-set token (`Wide`: `wide::f32x8`; `Avx2`; `Avx512`: masked tails), the way
//!   matrixmultiply and pulp do it, and entered through a `#[target_feature]` wrapper so that the
//!   same source compiles to AVX2 and AVX-512. Odd extents (`C` or `inner` of 1, 7, 49, 70, ...)
//!   run whole vectors plus one masked vector; in the rows family a small `C` is widened to
//!   virtual rows of `lcm(C, 16)` values.
//! - **Two families.** Planes (`inner > 1`): parameters broadcast along contiguous runs; a
//!   training task owns whole channels and normalizes each right after its statistics, while the
//!   channel is in cache. Rows (`inner == 1`): per-lane parameters; statistics over tiles of
//!   row blocks, then a streaming pass.
//! - **Statistics.** Deviations from a shift over each cache-resident block, corrected by their
//!   sum: the block's mean from a first pass (`f32` planes), or a pilot (the mean so far or of
//!   the first values; rows and 16-bit data) with a second pass only where it is far; blocks
//!   combined with Chan's merge in `f64`: accurate when `|mean| >> std`.
//! - **Parallelism.** On the caller's Rayon pool, serially below a work threshold. The calling
//!   thread starts on a kernel's tasks at once and helpers from the pool join it, the caller
//!   claiming tasks from the front and helpers from the back (waking a sleeping worker costs as
//!   much as a small kernel; the caller does not wait for it). Every block, chunk and merge order is fixed by the shape: results
//!   are bit-identical for any number of threads (not across backends).
//! - **Memory.** Inference is one pass and allocates nothing: called from outside the pool it
//!   hands itself to a worker (or runs serially when small), since helping from outside means
//!   spawning. Training and backward allocate at most a few per-channel arrays, never anything
//!   the size of the tensor, plus, from outside the pool, the helpers' job (two small objects per
//!   parallel phase).

pub mod half16;
pub mod reference;

mod convert;
mod epilogue;
mod loops;
mod parallel;
mod planes;
mod rows;
mod simd;
pub(crate) mod stats;
mod vector;

pub use simd::backend::{Backend, ParseBackendError, BACKEND_ENV};
pub use simd::bits::HalfFormat;

use crate::spec::{specialize, Spec};
use crate::{Canonical, Family};
pub use epilogue::{Epilogue, FusedRelu};

use epilogue::{with_act, MaskGrad, MaskParams, ADD_RELU, PLAIN, RELU};
use loops::{InPlace, Io, Split};
use simd::{with_isa, Isa as _, Serial};

/// Runs `f` compiled for `backend`'s instruction set, so that its loops are vectorized for it
/// (the layers' per-feature bookkeeping: square roots and divisions of `C` statistics).
/// `Scalar` and `Wide` run it as it is. Mark the closure `#[inline(always)]`. The results are
/// those of the plain code: vectorizing changes no rounding (Rust contracts nothing into fused
/// multiply-adds).
#[inline]
pub(crate) fn vectorized<R>(backend: Backend, f: impl FnOnce() -> R) -> R {
    with_isa!(backend.usable(), |isa| isa.vectorize(Serial(f)))
}

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
        normalize_fused_helped::<S>(backend, x, y, epilogue, dims, mean, scale, shift)
    })
}

/// [`normalize_fused`] for a training step (the synchronized forward's normalize): helped from
/// outside the pool like the training kernels, never handed to a worker.
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
    with_act!(epilogue, |act| normalize_io::<S, _>(backend, Split { x, y, act }, dims, mean, scale, shift))
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
        with_act!(epilogue, |act| normalize_io::<S, _>(backend, InPlace(xy, act), dims, mean, scale, shift))
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
    normalize_io::<S, _>(backend, Split { x, y: out, act }, dims, mean, scale, shift)
}

/// The `f32` coefficients `(mean, scale, shift)` of channel `c`'s transform in a training
/// forward of the fast kernels, from the batch mean and `inv_std = 1 / sqrt(var + eps)`:
/// passing them to [`relu_grad`] recomputes exactly the values that forward normalized.
pub fn train_coefficients(mean: f64, inv_std: f64, gamma: f32, beta: f32) -> (f32, f32, f32) {
    let a = stats::Affine32::train_from_inv_std(mean, inv_std, gamma, beta);
    (a.m, a.s, a.t)
}

fn normalize_io<S: Spec, T: Io>(
    backend: Backend,
    io: T,
    dims: Canonical,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
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
            Family::Planes => planes::normalize::<S, _, T>(isa, io, dims, mean, scale, shift),
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

/// Training backward, fused: per-channel `sum_dy = sum(dy)` and `sum_dy_xhat = sum(dy * xhat)`
/// with `xhat = (x - mean) * inv_std`, then
/// `dx = gamma * inv_std * (dy - sum_dy / n - xhat * sum_dy_xhat / n)`, `n = outer * inner`.
///
/// `x`, `dy` and `dx` hold `dims.len()` values; the per-channel slices hold `dims.channels`.
#[allow(clippy::too_many_arguments)]
pub fn backward<S: Spec>(
    backend: Backend,
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dims: Canonical,
    mean: &[f64],
    inv_std: &[f64],
    gamma: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    let dims = specialize::<S>(dims);
    check_backward(x, dy, dx, dims, mean.len(), inv_std.len(), gamma.len(), sum_dy_out, sum_dy_xhat_out);
    if dims.is_empty() {
        sum_dy_out.fill(0.0);
        sum_dy_xhat_out.fill(0.0);
        return;
    }
    if backend.usable() == Backend::Scalar {
        reference::backward_sums(x, dy, dims, mean, inv_std, sum_dy_out, sum_dy_xhat_out);
        reference::backward_train_dx(x, dy, dx, dims, mean, inv_std, gamma, sum_dy_out, sum_dy_xhat_out);
        return;
    }
    let mask = MaskParams::default();
    backward_of::<S, PLAIN>(
        backend,
        x,
        dy,
        mask,
        None,
        dx,
        dims,
        mean,
        inv_std,
        gamma,
        sum_dy_out,
        sum_dy_xhat_out,
    )
}

/// [`backward`] of the gradient behind a fused ReLU: with `g` = [`relu_grad`]'s output for
/// `relu`, the sums of `g` and the `dx` of `g`, bit for bit what `relu_grad` followed by
/// [`backward`] gives on the same backend, without the extra pass: the kernels recompute the
/// forward's pre-activation from `x` as they read `dy`. `g` itself is written to `dg` when
/// given (the gradient of the residual), else nowhere. `Backend::Scalar` runs that composition.
///
/// ```
/// use batchnorm::kernels::{self, Backend, FusedRelu};
/// use batchnorm::{spec::Dynamic, Canonical};
///
/// let dims = Canonical { outer: 4, channels: 1, inner: 1 };
/// let (x, dy) = ([-1.0, 0.5, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0]);
/// // The forward computed relu(x - 0.0) (mean 0, scale 1, shift 0): the first value was cut.
/// let relu = FusedRelu { mean: &[0.0], scale: &[1.0], shift: &[0.0], residual: None };
/// let (mut dx, mut g) = ([0.0; 4], [9.0; 4]);
/// let (mut sum_dy, mut sum_dy_xhat) = ([0.0], [0.0]);
/// kernels::backward_relu::<Dynamic>(Backend::detect(), &x, &dy, relu, Some(&mut g), &mut dx, dims,
///     &[0.625], &[1.0], &[1.0], &mut sum_dy, &mut sum_dy_xhat);
/// assert_eq!(g, [0.0, 1.0, 1.0, 1.0]);
/// assert_eq!(sum_dy[0], 3.0);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn backward_relu<S: Spec>(
    backend: Backend,
    x: &[f32],
    dy: &[f32],
    relu: FusedRelu<'_>,
    dg: Option<&mut [f32]>,
    dx: &mut [f32],
    dims: Canonical,
    mean: &[f64],
    inv_std: &[f64],
    gamma: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    let dims = specialize::<S>(dims);
    check_backward(x, dy, dx, dims, mean.len(), inv_std.len(), gamma.len(), sum_dy_out, sum_dy_xhat_out);
    relu.check(dims);
    if let Some(d) = &dg {
        assert_eq!(d.len(), dims.len(), "dg must hold dims.len() values");
    }
    if dims.is_empty() || backend.usable() == Backend::Scalar {
        let mut scratch = Vec::new();
        let g = masked_gradient(backend, x, dy, relu, dg, &mut scratch, dims);
        return backward::<S>(backend, x, g, dx, dims, mean, inv_std, gamma, sum_dy_out, sum_dy_xhat_out);
    }
    let (mask, sums) = (relu.mask(), (sum_dy_out, sum_dy_xhat_out));
    match relu.residual {
        None => {
            backward_of::<S, RELU>(backend, x, dy, mask, dg, dx, dims, mean, inv_std, gamma, sums.0, sums.1)
        }
        Some(_) => backward_of::<S, ADD_RELU>(
            backend, x, dy, mask, dg, dx, dims, mean, inv_std, gamma, sums.0, sums.1,
        ),
    }
}

/// [`relu_grad`] into `dg` (or `scratch`), for the paths that compose it with a plain backward.
fn masked_gradient<'g>(
    backend: Backend,
    x: &[f32],
    dy: &[f32],
    relu: FusedRelu<'_>,
    dg: Option<&'g mut [f32]>,
    scratch: &'g mut Vec<f32>,
    dims: Canonical,
) -> &'g [f32] {
    let g = match dg {
        Some(d) => d,
        None => {
            scratch.resize(dims.len(), 0.0);
            &mut scratch[..]
        }
    };
    if !dims.is_empty() {
        let FusedRelu { mean, scale, shift, residual } = relu;
        relu_grad::<crate::spec::Dynamic>(backend, x, dy, residual, g, dims, mean, scale, shift);
    }
    g
}

#[allow(clippy::too_many_arguments)]
fn check_backward(
    x: &[f32],
    dy: &[f32],
    dx: &[f32],
    dims: Canonical,
    mean: usize,
    inv_std: usize,
    gamma: usize,
    sum_dy_out: &[f64],
    sum_dy_xhat_out: &[f64],
) {
    let c = dims.channels;
    assert!(x.len() == dims.len() && dy.len() == dims.len() && dx.len() == dims.len());
    assert!(mean == c && inv_std == c && gamma == c);
    assert!(sum_dy_out.len() == c && sum_dy_xhat_out.len() == c);
}

/// The fast training backward of the gradient of kind `MASK` (not `Scalar`, not empty).
#[allow(clippy::too_many_arguments)]
fn backward_of<S: Spec, const MASK: u8>(
    backend: Backend,
    x: &[f32],
    dy: &[f32],
    mask: MaskParams<'_>,
    dr: Option<&mut [f32]>,
    dx: &mut [f32],
    dims: Canonical,
    mean: &[f64],
    inv_std: &[f64],
    gamma: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    let (sums, b) = ((sum_dy_out, sum_dy_xhat_out), backend.usable());
    with_isa!(b, |isa| match dims.family() {
        Family::Planes => planes::backward::<S, _, MASK>(
            isa, x, dy, mask, dr, dx, dims, mean, inv_std, gamma, sums.0, sums.1
        ),
        Family::Rows => {
            rows::backward::<S, _, MASK>(isa, x, dy, mask, dr, dx, dims, mean, inv_std, gamma, sums.0, sums.1)
        }
    })
}

/// Backward with frozen statistics (of the inference forward): the same sums with the given
/// `mean` and `inv_std`, and `dx = dy * gamma * inv_std`. One pass over `x`, `dy` and `dx`.
#[allow(clippy::too_many_arguments)]
pub fn backward_eval<S: Spec>(
    backend: Backend,
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dims: Canonical,
    mean: &[f32],
    inv_std: &[f32],
    gamma: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    let dims = specialize::<S>(dims);
    check_backward(x, dy, dx, dims, mean.len(), inv_std.len(), gamma.len(), sum_dy_out, sum_dy_xhat_out);
    if dims.is_empty() {
        sum_dy_out.fill(0.0);
        sum_dy_xhat_out.fill(0.0);
        return;
    }
    if backend.usable() == Backend::Scalar {
        let inv_std: Vec<f64> = inv_std.iter().map(|&s| s as f64).collect();
        reference::backward_sums(x, dy, dims, mean, &inv_std, sum_dy_out, sum_dy_xhat_out);
        reference::backward_eval_dx(dy, dx, dims, &inv_std, gamma);
        return;
    }
    let mask = MaskParams::default();
    backward_eval_of::<S, PLAIN>(
        backend,
        x,
        dy,
        mask,
        None,
        dx,
        dims,
        mean,
        inv_std,
        gamma,
        sum_dy_out,
        sum_dy_xhat_out,
    )
}

/// [`backward_eval`] of the gradient behind a fused ReLU, as [`backward_relu`] is to
/// [`backward`]: bit for bit [`relu_grad`] followed by `backward_eval` on the same backend, in
/// one pass; `g` is written to `dg` when given.
#[allow(clippy::too_many_arguments)]
pub fn backward_eval_relu<S: Spec>(
    backend: Backend,
    x: &[f32],
    dy: &[f32],
    relu: FusedRelu<'_>,
    dg: Option<&mut [f32]>,
    dx: &mut [f32],
    dims: Canonical,
    mean: &[f32],
    inv_std: &[f32],
    gamma: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    let dims = specialize::<S>(dims);
    check_backward(x, dy, dx, dims, mean.len(), inv_std.len(), gamma.len(), sum_dy_out, sum_dy_xhat_out);
    relu.check(dims);
    if let Some(d) = &dg {
        assert_eq!(d.len(), dims.len(), "dg must hold dims.len() values");
    }
    if dims.is_empty() || backend.usable() == Backend::Scalar {
        let mut scratch = Vec::new();
        let g = masked_gradient(backend, x, dy, relu, dg, &mut scratch, dims);
        return backward_eval::<S>(
            backend,
            x,
            g,
            dx,
            dims,
            mean,
            inv_std,
            gamma,
            sum_dy_out,
            sum_dy_xhat_out,
        );
    }
    let (mask, sums) = (relu.mask(), (sum_dy_out, sum_dy_xhat_out));
    match relu.residual {
        None => backward_eval_of::<S, RELU>(
            backend, x, dy, mask, dg, dx, dims, mean, inv_std, gamma, sums.0, sums.1,
        ),
        Some(_) => backward_eval_of::<S, ADD_RELU>(
            backend, x, dy, mask, dg, dx, dims, mean, inv_std, gamma, sums.0, sums.1,
        ),
    }
}

/// The fast frozen-statistics backward of the gradient of kind `MASK` (not `Scalar`, not
/// empty).
#[allow(clippy::too_many_arguments)]
fn backward_eval_of<S: Spec, const MASK: u8>(
    backend: Backend,
    x: &[f32],
    dy: &[f32],
    mask: MaskParams<'_>,
    dr: Option<&mut [f32]>,
    dx: &mut [f32],
    dims: Canonical,
    mean: &[f32],
    inv_std: &[f32],
    gamma: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    let c = dims.channels;
    let mut stack = [0.0f32; STACK_CHANNELS];
    let mut heap = Vec::new();
    let scale = if c <= STACK_CHANNELS {
        &mut stack[..c]
    } else {
        heap.resize(c, 0.0);
        &mut heap[..]
    };
    for ((s, &g), &i) in scale.iter_mut().zip(gamma).zip(inv_std) {
        *s = stats::saturate_f32(g as f64 * i as f64);
    }
    let (scale, sums, b) = (&*scale, (sum_dy_out, sum_dy_xhat_out), backend.usable());
    with_isa!(b, |isa| match dims.family() {
        Family::Planes => planes::backward_eval::<S, _, MASK>(
            isa, x, dy, mask, dr, dx, dims, mean, inv_std, scale, sums.0, sums.1
        ),
        Family::Rows => {
            rows::backward_eval::<S, _, MASK>(
                isa, x, dy, mask, dr, dx, dims, mean, inv_std, scale, sums.0, sums.1,
            )
        }
    })
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

/// The two reductions of the training backward, without `dx`: per-channel `sum_dy = sum(dy)` and
/// `sum_dy_xhat = sum(dy * xhat)` with `xhat = (x - mean) * inv_std` (the same blocks and order
/// as [`backward`]'s split schedule), for sums combined across processes ([`crate::sync`]).
///
/// `x` and `dy` hold `dims.len()` values (an empty tensor gives zeros); the per-channel slices
/// hold `dims.channels`. `Backend::Scalar` runs [`reference::backward_sums`].
///
/// ```
/// use batchnorm::kernels::{self, Backend};
/// use batchnorm::{spec::Dynamic, Canonical};
///
/// let dims = Canonical { outer: 2, channels: 1, inner: 2 };
/// let (x, dy) = ([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, -1.0]);
/// let (mut sum_dy, mut sum_dy_xhat) = ([0.0], [0.0]);
/// kernels::backward_sums::<Dynamic>(Backend::detect(), &x, &dy, dims, &[2.5], &[1.0], &mut sum_dy, &mut sum_dy_xhat);
/// assert_eq!((sum_dy[0], sum_dy_xhat[0]), (2.0, -3.0));
/// ```
#[allow(clippy::too_many_arguments)]
pub fn backward_sums<S: Spec>(
    backend: Backend,
    x: &[f32],
    dy: &[f32],
    dims: Canonical,
    mean: &[f64],
    inv_std: &[f64],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    let dims = specialize::<S>(dims);
    let c = dims.channels;
    assert!(x.len() == dims.len() && dy.len() == dims.len(), "x and dy must hold dims.len() values");
    assert!(mean.len() == c && inv_std.len() == c);
    assert!(sum_dy_out.len() == c && sum_dy_xhat_out.len() == c);
    if dims.is_empty() {
        sum_dy_out.fill(0.0);
        sum_dy_xhat_out.fill(0.0);
        return;
    }
    match backend.usable() {
        Backend::Scalar => reference::backward_sums(x, dy, dims, mean, inv_std, sum_dy_out, sum_dy_xhat_out),
        b => {
            with_isa!(b, |isa| match dims.family() {
                Family::Planes => planes::train_backward_sums::<S, _, PLAIN>(
                    isa,
                    x,
                    dy,
                    MaskParams::default(),
                    None,
                    dims,
                    mean,
                    inv_std,
                    sum_dy_out,
                    sum_dy_xhat_out
                ),
                Family::Rows => rows::train_backward_sums::<S, _, PLAIN>(
                    isa,
                    x,
                    dy,
                    MaskParams::default(),
                    None,
                    dims,
                    mean,
                    inv_std,
                    sum_dy_out,
                    sum_dy_xhat_out
                ),
            })
        }
    }
}

/// The `dx` pass of the training backward, from sums over `n` values per channel that the caller
/// supplies (a shard's gradient with the sums of the whole batch, [`crate::sync`]):
/// `dx = gamma * inv_std * (dy - sum_dy / n - xhat * sum_dy_xhat / n)`.
///
/// With `n = dims.per_channel()` and the sums of [`backward_sums`] it is [`backward`]'s `dx`.
/// `x`, `dy` and `dx` hold `dims.len()` values (an empty tensor is a no-op); the per-channel
/// slices hold `dims.channels`. `Backend::Scalar` computes in `f64`.
///
/// ```
/// use batchnorm::kernels::{self, Backend};
/// use batchnorm::{spec::Dynamic, Canonical};
///
/// let dims = Canonical { outer: 1, channels: 1, inner: 2 };
/// let mut dx = [0.0; 2];
/// // A shard of two values of a batch of four whose sums are 4 and 0: dx = dy - 1.
/// kernels::backward_dx::<Dynamic>(Backend::detect(), &[1.0, 2.0], &[3.0, 1.0], &mut dx, dims, 4.0,
///     &[1.5], &[1.0], &[1.0], &[4.0], &[0.0]);
/// assert_eq!(dx, [2.0, 0.0]);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn backward_dx<S: Spec>(
    backend: Backend,
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dims: Canonical,
    n: f64,
    mean: &[f64],
    inv_std: &[f64],
    gamma: &[f32],
    sum_dy: &[f64],
    sum_dy_xhat: &[f64],
) {
    let dims = specialize::<S>(dims);
    let c = dims.channels;
    assert!(x.len() == dims.len() && dy.len() == dims.len() && dx.len() == dims.len());
    assert!(mean.len() == c && inv_std.len() == c && gamma.len() == c);
    assert!(sum_dy.len() == c && sum_dy_xhat.len() == c);
    if dims.is_empty() {
        return;
    }
    match backend.usable() {
        Backend::Scalar => reference::backward_train_dx_with_count(
            x,
            dy,
            dx,
            dims,
            n,
            mean,
            inv_std,
            gamma,
            sum_dy,
            sum_dy_xhat,
        ),
        b => {
            with_isa!(b, |isa| match dims.family() {
                Family::Planes => planes::train_backward_dx::<S, _, PLAIN>(
                    isa,
                    x,
                    dy,
                    MaskParams::default(),
                    dx,
                    dims,
                    n,
                    mean,
                    inv_std,
                    gamma,
                    sum_dy,
                    sum_dy_xhat
                ),
                Family::Rows => rows::train_backward_dx::<S, _, PLAIN>(
                    isa,
                    x,
                    dy,
                    MaskParams::default(),
                    dx,
                    dims,
                    n,
                    mean,
                    inv_std,
                    gamma,
                    sum_dy,
                    sum_dy_xhat
                ),
            })
        }
    }
}

/// Copies `src` into `dst` (same length) in chunks of `chunk` values, scheduled the way the
/// training and backward kernels schedule their tasks (the calling thread copies while helpers
/// from the current pool join it; see the `parallel` module). The bench's copy: its yardstick gets
/// the same scheduling as what it measures. Not part of the stable API.
#[doc(hidden)]
pub fn __copy_scheduled(src: &[f32], dst: &mut [f32], chunk: usize) {
    let n = src.len();
    assert!(dst.len() == n, "src and dst must have one length");
    parallel::for_each_chunk_mut(parallel::use_pool(2 * n), dst, chunk, |_, r, d| d.copy_from_slice(&src[r]));
}

/// Forces non-temporal (streaming) stores for every out-of-place output on (`Some(true)`) or off
/// (`Some(false)`), or restores the size rule (`None`: outputs of 14 MiB and more, in runs of
/// at least 256 values). Results are the same bits either way; for tests and measurements.
/// The environment variable `BN_STREAM=0|1`, read on first use, does the same.
#[doc(hidden)]
pub fn __force_streaming(on: Option<bool>) {
    parallel::force_streaming(on);
}

/// Channels whose per-call `f32` coefficients live on the stack.
const STACK_CHANNELS: usize = 1024;
