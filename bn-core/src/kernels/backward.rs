//! The backward passes of the fast `f32` kernels (of the training forward, of the inference
//! forward, behind a fused ReLU, and the two halves the synchronized backward combines): the
//! checks of each pass, then the scalar reference on `Backend::Scalar`, else the instruction
//! set of the backend and the layout family of the shape ([`planes`] or [`rows`]).

use super::epilogue::{FusedRelu, ADD_RELU, NONE, RELU};
use super::forward::relu_grad;
use super::simd::{with_isa, Isa};
use super::{planes, reference, rows, stats, Backend};
use crate::spec::{specialize, Spec};
use crate::{Canonical, Family};

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
    let mask = FusedRelu::default();
    backward_of::<S, NONE>(
        backend,
        x,
        Some(dy),
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

/// [`backward`] with `dx` written over `dy`: `dy_dx` holds the output gradient on entry and the
/// input gradient on return, to the same bits as [`backward`] gives into a separate buffer on
/// the same backend.
///
/// For a caller that owns the output gradient and has no further use for it (an autodiff
/// engine's last reference): no second activation-sized buffer is needed, and the fused
/// schedule still reads `x` and `dy` once, each run's `dx` stored over the gradient it has just
/// read. `Backend::Scalar` computes in `f64` (from a copy of `dy`).
///
/// ```
/// use batchnorm::kernels::{self, Backend};
/// use batchnorm::{spec::Dynamic, Canonical};
///
/// let dims = Canonical { outer: 4, channels: 1, inner: 1 };
/// let x = [0.0, 1.0, 2.0, 3.0];
/// let (mean, inv_std) = ([1.5], [1.0]);
/// let (mut sum_dy, mut sum_dy_xhat) = ([0.0], [0.0]);
/// // The same gradient on every output: the normalization cancels it, dx is zero.
/// let mut dy_dx = [1.0; 4];
/// kernels::backward_in_place::<Dynamic>(Backend::detect(), &x, &mut dy_dx, dims, &mean, &inv_std,
///     &[1.0], &mut sum_dy, &mut sum_dy_xhat);
/// assert_eq!((sum_dy[0], sum_dy_xhat[0]), (4.0, 0.0));
/// assert!(dy_dx.iter().all(|v| v.abs() < 1e-6));
/// ```
#[allow(clippy::too_many_arguments)]
pub fn backward_in_place<S: Spec>(
    backend: Backend,
    x: &[f32],
    dy_dx: &mut [f32],
    dims: Canonical,
    mean: &[f64],
    inv_std: &[f64],
    gamma: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    let dims = specialize::<S>(dims);
    check_backward(
        x,
        dy_dx,
        dy_dx,
        dims,
        mean.len(),
        inv_std.len(),
        gamma.len(),
        sum_dy_out,
        sum_dy_xhat_out,
    );
    if dims.is_empty() {
        sum_dy_out.fill(0.0);
        sum_dy_xhat_out.fill(0.0);
        return;
    }
    if backend.usable() == Backend::Scalar {
        let dy = dy_dx.to_vec();
        return backward::<S>(
            backend,
            x,
            &dy,
            dy_dx,
            dims,
            mean,
            inv_std,
            gamma,
            sum_dy_out,
            sum_dy_xhat_out,
        );
    }
    let mask = FusedRelu::default();
    backward_of::<S, NONE>(
        backend,
        x,
        None,
        mask,
        None,
        dy_dx,
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
    let (mask, sums) = (relu, (sum_dy_out, sum_dy_xhat_out));
    match relu.residual {
        None => backward_of::<S, RELU>(
            backend,
            x,
            Some(dy),
            mask,
            dg,
            dx,
            dims,
            mean,
            inv_std,
            gamma,
            sums.0,
            sums.1,
        ),
        Some(_) => backward_of::<S, ADD_RELU>(
            backend,
            x,
            Some(dy),
            mask,
            dg,
            dx,
            dims,
            mean,
            inv_std,
            gamma,
            sums.0,
            sums.1,
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

/// The fast training backward of the gradient of kind `MASK` (not `Scalar`, not empty); `dy:
/// None` when the gradient is in `dx`, which is written over it (then `dr` is `None`).
#[allow(clippy::too_many_arguments)]
fn backward_of<S: Spec, const MASK: u8>(
    backend: Backend,
    x: &[f32],
    dy: Option<&[f32]>,
    mask: FusedRelu<'_>,
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
    with_isa!(b, |isa| {
        if matches!(dims.family(), Family::Planes) && planes::fuses_backward(dims) {
            planes::backward_fused::<S, _, MASK>(
                isa, x, dy, mask, dr, dx, dims, mean, inv_std, gamma, sums.0, sums.1,
            )
        } else {
            backward_split::<S, _, MASK>(isa, x, dy, mask, dr, dx, dims, mean, inv_std, gamma, sums.0, sums.1)
        }
    })
}

/// The split schedule of the training backward, either family: the two reductions (writing the
/// masked gradient when wanted), then the `dx` pass (the pieces the synchronized backward runs
/// with the group's sums in between), which reads that gradient back where it was written.
/// `dy: None`: the gradient is in `dx`, which the `dx` pass overwrites.
#[allow(clippy::too_many_arguments)]
fn backward_split<S: Spec, I: Isa, const MASK: u8>(
    isa: I,
    x: &[f32],
    dy: Option<&[f32]>,
    mask: FusedRelu<'_>,
    dr: Option<&mut [f32]>,
    dx: &mut [f32],
    dims: Canonical,
    mean: &[f64],
    inv_std: &[f64],
    gamma: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    let sums = (sum_dy_out, sum_dy_xhat_out);
    let n = dims.per_channel() as f64;
    match (dr, dy) {
        (Some(dr), Some(dy)) => {
            train_backward_sums::<S, I, MASK>(
                isa,
                x,
                dy,
                mask,
                Some(&mut *dr),
                dims,
                mean,
                inv_std,
                sums.0,
                sums.1,
            );
            let (no_mask, dr) = (FusedRelu::default(), &*dr);
            train_backward_dx::<S, I, NONE>(
                isa,
                x,
                Some(dr),
                no_mask,
                dx,
                dims,
                n,
                mean,
                inv_std,
                gamma,
                sums.0,
                sums.1,
            );
        }
        (None, Some(dy)) => {
            train_backward_sums::<S, I, MASK>(isa, x, dy, mask, None, dims, mean, inv_std, sums.0, sums.1);
            train_backward_dx::<S, I, MASK>(
                isa,
                x,
                Some(dy),
                mask,
                dx,
                dims,
                n,
                mean,
                inv_std,
                gamma,
                sums.0,
                sums.1,
            );
        }
        (None, None) => {
            train_backward_sums::<S, I, MASK>(isa, x, dx, mask, None, dims, mean, inv_std, sums.0, sums.1);
            train_backward_dx::<S, I, MASK>(
                isa, x, None, mask, dx, dims, n, mean, inv_std, gamma, sums.0, sums.1,
            );
        }
        (Some(_), None) => unreachable!("the masked gradient needs the gradient apart from dx"),
    }
}

/// The two reductions of the training backward by the family of `dims`: `sum(g)` and
/// `sum(g * xhat)` per channel, `g` the gradient of kind `MASK`.
#[allow(clippy::too_many_arguments)]
fn train_backward_sums<S: Spec, I: Isa, const MASK: u8>(
    isa: I,
    x: &[f32],
    dy: &[f32],
    mask: FusedRelu<'_>,
    dr: Option<&mut [f32]>,
    dims: Canonical,
    mean: &[f64],
    inv_std: &[f64],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    match dims.family() {
        Family::Planes => planes::train_backward_sums::<S, I, MASK>(
            isa,
            x,
            dy,
            mask,
            dr,
            dims,
            mean,
            inv_std,
            sum_dy_out,
            sum_dy_xhat_out,
        ),
        Family::Rows => rows::train_backward_sums::<S, I, MASK>(
            isa,
            x,
            dy,
            mask,
            dr,
            dims,
            mean,
            inv_std,
            sum_dy_out,
            sum_dy_xhat_out,
        ),
    }
}

/// The `dx` pass of the training backward by the family of `dims`, from given sums over `n`
/// values, for the gradient of kind `MASK`; `dy: None` when the gradient is in `dx`.
#[allow(clippy::too_many_arguments)]
fn train_backward_dx<S: Spec, I: Isa, const MASK: u8>(
    isa: I,
    x: &[f32],
    dy: Option<&[f32]>,
    mask: FusedRelu<'_>,
    dx: &mut [f32],
    dims: Canonical,
    n: f64,
    mean: &[f64],
    inv_std: &[f64],
    gamma: &[f32],
    sum_dy: &[f64],
    sum_dy_xhat: &[f64],
) {
    match dims.family() {
        Family::Planes => planes::train_backward_dx::<S, I, MASK>(
            isa,
            x,
            dy,
            mask,
            dx,
            dims,
            n,
            mean,
            inv_std,
            gamma,
            sum_dy,
            sum_dy_xhat,
        ),
        Family::Rows => rows::train_backward_dx::<S, I, MASK>(
            isa,
            x,
            dy,
            mask,
            dx,
            dims,
            n,
            mean,
            inv_std,
            gamma,
            sum_dy,
            sum_dy_xhat,
        ),
    }
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
    let mask = FusedRelu::default();
    backward_eval_of::<S, NONE>(
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
    let (mask, sums) = (relu, (sum_dy_out, sum_dy_xhat_out));
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
    mask: FusedRelu<'_>,
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
            let no_mask = FusedRelu::default();
            with_isa!(b, |isa| train_backward_sums::<S, _, NONE>(
                isa,
                x,
                dy,
                no_mask,
                None,
                dims,
                mean,
                inv_std,
                sum_dy_out,
                sum_dy_xhat_out
            ))
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
            let no_mask = FusedRelu::default();
            with_isa!(b, |isa| train_backward_dx::<S, _, NONE>(
                isa,
                x,
                Some(dy),
                no_mask,
                dx,
                dims,
                n,
                mean,
                inv_std,
                gamma,
                sum_dy,
                sum_dy_xhat
            ))
        }
    }
}

/// Channels whose per-call `f32` coefficients live on the stack.
const STACK_CHANNELS: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Dynamic;

    /// [`backward_in_place`] against [`backward`] on small shapes of every schedule (fused runs,
    /// fused spans, split, rows), small enough for Miri, which checks that no reference to the
    /// gradient outlives the writes of `dx` over it.
    #[test]
    fn in_place_is_backward_on_every_schedule() {
        let shapes = [(4, 8, 300), (20, 4, 49), (2, 1, 600), (33, 7, 1), (16, 16, 1)];
        for (outer, channels, inner) in shapes {
            let dims = Canonical { outer, channels, inner };
            let value = |i: usize, k: usize| ((i * k) % 97) as f32 / 48.0 - 1.0;
            let x: Vec<f32> = (0..dims.len()).map(|i| value(i, 31)).collect();
            let dy: Vec<f32> = (0..dims.len()).map(|i| value(i, 53)).collect();
            let c = channels;
            let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
            reference::batch_stats(&x, dims, &mut mean, &mut var);
            let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
            let gamma: Vec<f32> = (0..c).map(|j| 0.5 + j as f32 / 8.0).collect();
            let b = Backend::detect();
            let (mut dx, mut s1, mut s2) = (vec![0.0; dims.len()], vec![0.0; c], vec![0.0; c]);
            backward::<Dynamic>(b, &x, &dy, &mut dx, dims, &mean, &inv_std, &gamma, &mut s1, &mut s2);
            let (mut dydx, mut t1, mut t2) = (dy.clone(), vec![0.0; c], vec![0.0; c]);
            backward_in_place::<Dynamic>(b, &x, &mut dydx, dims, &mean, &inv_std, &gamma, &mut t1, &mut t2);
            assert_ne!(dx, dy, "{dims:?}: a test that dx differs from dy");
            assert_eq!(dx, dydx, "{dims:?}: dx");
            assert_eq!((s1, s2), (t1, t2), "{dims:?}: sums");
        }
    }
}
