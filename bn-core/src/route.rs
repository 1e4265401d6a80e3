//! Which kernels run a pass, decided by the element type.
//!
//! Every element type names its route ([`Element::Route`]; the contract, `Route`, is in
//! `element.rs`): `f32` runs the fast kernels ([`kernels`]), `bf16` and `f16` the 16-bit kernels
//! that widen blocks to `f32` ([`kernels::half16`]), `f64` the `f64` reference ([`reference`]).
//! A route runs every pass it has kernels for and hands the others to the reference. The passes
//! above (the stateless operations, the layer, the synchronized passes) call
//! `E::Route::pass(..)` and never look at the element type themselves.
//!
//! The [`Backend::Scalar`] backend is the `f64` reference: on it the 16-bit route is the
//! reference too (the `f32` kernels run their own scalar reference loops).

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::element::route::{Fast32, Frozen, Half16, Reference, Route, Tail, Trained, TrainedY};
use crate::kernels::reference::{self, Affine};
use crate::kernels::{self, half16, Backend, HalfFormat};
use crate::spec::Spec;
use crate::{Canonical, Element, Param};

impl<'r> Tail<'r, f32> {
    /// The fast kernels' epilogue.
    fn epilogue(self) -> kernels::Epilogue<'r> {
        match self {
            Tail::Plain => kernels::Epilogue::None,
            Tail::Relu => kernels::Epilogue::Relu,
            Tail::AddRelu(r) => kernels::Epilogue::AddRelu(r),
        }
    }
}

fn frozen_affine<'a, P: Param>(k: Frozen<'a, P>, gamma: &'a [P], beta: &'a [P]) -> Affine<'a, P, P> {
    Affine { mean: k.mean, inv_std: k.inv_std, gamma, beta }
}

fn trained_affine<P: Param>(t: Trained<'_, P>) -> Affine<'_, f64, P> {
    Affine { mean: t.mean, inv_std: t.inv_std, gamma: t.gamma, beta: t.beta }
}

/// The `f64` reference for every pass.
#[allow(clippy::too_many_arguments)]
impl<E: Element> Route<E> for Reference {
    fn forward_train<S: Spec>(
        _backend: Backend,
        x: &[E],
        _y: &mut [E],
        _tail: Tail<'_, E>,
        dims: Canonical,
        _gamma: &[E::Param],
        _beta: &[E::Param],
        _eps: f64,
        mean: &mut [f64],
        var: &mut [f64],
    ) -> TrainedY {
        reference::batch_stats(x, dims, mean, var);
        TrainedY::Pending
    }

    fn normalize<S: Spec>(
        _backend: Backend,
        x: &[E],
        y: &mut [E],
        tail: Tail<'_, E>,
        dims: Canonical,
        k: Frozen<'_, E::Param>,
        gamma: &[E::Param],
        beta: &[E::Param],
    ) {
        reference::normalize(x, y, dims, frozen_affine(k, gamma, beta));
        tail.apply(y);
    }

    fn normalize_inplace<S: Spec>(
        _backend: Backend,
        xy: &mut [E],
        tail: Tail<'_, E>,
        dims: Canonical,
        k: Frozen<'_, E::Param>,
        gamma: &[E::Param],
        beta: &[E::Param],
    ) {
        reference::normalize_inplace(xy, dims, frozen_affine(k, gamma, beta));
        tail.apply(xy);
    }

    fn eval_mask<S: Spec>(
        _backend: Backend,
        x: &[E],
        dy: &[E],
        residual: Option<&[E]>,
        out: &mut [E],
        dims: Canonical,
        k: Frozen<'_, E::Param>,
        gamma: &[E::Param],
        beta: &[E::Param],
    ) {
        reference::relu_grad(x, dy, residual, out, dims, frozen_affine(k, gamma, beta));
    }

    fn train_mask<S: Spec>(
        x: &[E],
        dy: &[E],
        residual: Option<&[E]>,
        out: &mut [E],
        dims: Canonical,
        t: Trained<'_, E::Param>,
        _coefficients: &mut Vec<f32>,
    ) {
        reference::relu_grad(x, dy, residual, out, dims, trained_affine(t));
    }

    fn backward<S: Spec>(
        _backend: Backend,
        x: &[E],
        dy: &[E],
        dx: &mut [E],
        dims: Canonical,
        mean: &[f64],
        inv_std: &[f64],
        gamma: &[E::Param],
        sum_dy: &mut [f64],
        sum_dy_xhat: &mut [f64],
    ) {
        reference::backward_sums(x, dy, dims, mean, inv_std, sum_dy, sum_dy_xhat);
        reference::backward_train_dx(x, dy, dx, dims, mean, inv_std, gamma, sum_dy, sum_dy_xhat);
    }

    fn backward_eval<S: Spec>(
        _backend: Backend,
        x: &[E],
        dy: &[E],
        dx: &mut [E],
        dims: Canonical,
        k: Frozen<'_, E::Param>,
        _inv_std_p: &[E::Param],
        gamma: &[E::Param],
        sum_dy: &mut [f64],
        sum_dy_xhat: &mut [f64],
    ) {
        reference::backward_sums(x, dy, dims, k.mean, k.inv_std, sum_dy, sum_dy_xhat);
        reference::backward_eval_dx(dy, dx, dims, k.inv_std, gamma);
    }

    fn backward_relu<S: Spec>(
        _backend: Backend,
        _x: &[E],
        _dy: &[E],
        _residual: Option<&[E]>,
        _dresidual: Option<&mut [E]>,
        _dx: &mut [E],
        _dims: Canonical,
        _t: Trained<'_, E::Param>,
        _coefficients: &mut Vec<f32>,
        _sum_dy: &mut [f64],
        _sum_dy_xhat: &mut [f64],
    ) -> bool {
        false
    }

    fn backward_eval_relu<S: Spec>(
        _backend: Backend,
        _x: &[E],
        _dy: &[E],
        _residual: Option<&[E]>,
        _dresidual: Option<&mut [E]>,
        _dx: &mut [E],
        _dims: Canonical,
        _k: Frozen<'_, E::Param>,
        _inv_std_p: &[E::Param],
        _gamma: &[E::Param],
        _beta: &[E::Param],
        _sum_dy: &mut [f64],
        _sum_dy_xhat: &mut [f64],
    ) -> bool {
        false
    }

    fn batch_stats<S: Spec>(_backend: Backend, x: &[E], dims: Canonical, mean: &mut [f64], var: &mut [f64]) {
        reference::batch_stats(x, dims, mean, var);
    }

    fn normalize_trained<S: Spec>(
        _backend: Backend,
        x: &[E],
        y: &mut [E],
        tail: Tail<'_, E>,
        dims: Canonical,
        mean: &[f64],
        inv_std: &[f64],
        gamma: &[E::Param],
        beta: &[E::Param],
    ) -> bool {
        let c = dims.channels;
        let affine = Affine { mean: &mean[..c], inv_std: &inv_std[..c], gamma, beta };
        reference::normalize(x, y, dims, affine);
        tail.apply(y);
        true
    }

    fn backward_sums<S: Spec>(
        _backend: Backend,
        x: &[E],
        dy: &[E],
        dims: Canonical,
        mean: &[f64],
        inv_std: &[f64],
        sum_dy: &mut [f64],
        sum_dy_xhat: &mut [f64],
    ) {
        reference::backward_sums(x, dy, dims, mean, inv_std, sum_dy, sum_dy_xhat);
    }

    fn backward_dx<S: Spec>(
        _backend: Backend,
        x: &[E],
        dy: &[E],
        dx: &mut [E],
        dims: Canonical,
        n: f64,
        mean: &[f64],
        inv_std: &[f64],
        gamma: &[E::Param],
        sum_dy: &[f64],
        sum_dy_xhat: &[f64],
    ) {
        reference::backward_train_dx_with_count(
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
        );
    }
}

/// The fast `f32` kernels for every pass.
#[allow(clippy::too_many_arguments)]
impl Route<f32> for Fast32 {
    #[inline]
    fn forward_train<S: Spec>(
        backend: Backend,
        x: &[f32],
        y: &mut [f32],
        tail: Tail<'_, f32>,
        dims: Canonical,
        gamma: &[f32],
        beta: &[f32],
        eps: f64,
        mean: &mut [f64],
        var: &mut [f64],
    ) -> TrainedY {
        kernels::forward_train_fused::<S>(backend, x, y, tail.epilogue(), dims, gamma, beta, eps, mean, var);
        TrainedY::Written { tail_done: true, reference_y: backend == Backend::Scalar }
    }

    #[inline]
    fn normalize<S: Spec>(
        backend: Backend,
        x: &[f32],
        y: &mut [f32],
        tail: Tail<'_, f32>,
        dims: Canonical,
        k: Frozen<'_, f32>,
        _gamma: &[f32],
        beta: &[f32],
    ) {
        kernels::normalize_fused::<S>(backend, x, y, tail.epilogue(), dims, k.mean, k.scale, beta)
    }

    #[inline]
    fn normalize_inplace<S: Spec>(
        backend: Backend,
        xy: &mut [f32],
        tail: Tail<'_, f32>,
        dims: Canonical,
        k: Frozen<'_, f32>,
        _gamma: &[f32],
        beta: &[f32],
    ) {
        kernels::normalize_inplace_fused::<S>(backend, xy, tail.epilogue(), dims, k.mean, k.scale, beta)
    }

    #[inline]
    fn eval_mask<S: Spec>(
        backend: Backend,
        x: &[f32],
        dy: &[f32],
        residual: Option<&[f32]>,
        out: &mut [f32],
        dims: Canonical,
        k: Frozen<'_, f32>,
        _gamma: &[f32],
        beta: &[f32],
    ) {
        kernels::relu_grad::<S>(backend, x, dy, residual, out, dims, k.mean, k.scale, beta)
    }

    #[inline]
    fn train_mask<S: Spec>(
        x: &[f32],
        dy: &[f32],
        residual: Option<&[f32]>,
        out: &mut [f32],
        dims: Canonical,
        t: Trained<'_, f32>,
        coefficients: &mut Vec<f32>,
    ) {
        if t.reference_y {
            return reference::relu_grad(x, dy, residual, out, dims, trained_affine(t));
        }
        let (m, s, sh) = train_coefficients(dims.channels, t, coefficients);
        kernels::relu_grad::<S>(t.backend, x, dy, residual, out, dims, m, s, sh)
    }

    #[inline]
    fn backward<S: Spec>(
        backend: Backend,
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        dims: Canonical,
        mean: &[f64],
        inv_std: &[f64],
        gamma: &[f32],
        sum_dy: &mut [f64],
        sum_dy_xhat: &mut [f64],
    ) {
        kernels::backward::<S>(backend, x, dy, dx, dims, mean, inv_std, gamma, sum_dy, sum_dy_xhat)
    }

    #[inline]
    fn backward_eval<S: Spec>(
        backend: Backend,
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        dims: Canonical,
        k: Frozen<'_, f32>,
        inv_std_p: &[f32],
        gamma: &[f32],
        sum_dy: &mut [f64],
        sum_dy_xhat: &mut [f64],
    ) {
        kernels::backward_eval::<S>(backend, x, dy, dx, dims, k.mean, inv_std_p, gamma, sum_dy, sum_dy_xhat)
    }

    #[inline]
    fn backward_relu<S: Spec>(
        backend: Backend,
        x: &[f32],
        dy: &[f32],
        residual: Option<&[f32]>,
        dresidual: Option<&mut [f32]>,
        dx: &mut [f32],
        dims: Canonical,
        t: Trained<'_, f32>,
        coefficients: &mut Vec<f32>,
        sum_dy: &mut [f64],
        sum_dy_xhat: &mut [f64],
    ) -> bool {
        if t.reference_y || t.backend != backend {
            return false;
        }
        let (mean, scale, shift) = train_coefficients(dims.channels, t, coefficients);
        let relu = kernels::FusedRelu { mean, scale, shift, residual };
        kernels::backward_relu::<S>(
            t.backend,
            x,
            dy,
            relu,
            dresidual,
            dx,
            dims,
            t.mean,
            t.inv_std,
            t.gamma,
            sum_dy,
            sum_dy_xhat,
        );
        true
    }

    #[inline]
    fn backward_eval_relu<S: Spec>(
        backend: Backend,
        x: &[f32],
        dy: &[f32],
        residual: Option<&[f32]>,
        dresidual: Option<&mut [f32]>,
        dx: &mut [f32],
        dims: Canonical,
        k: Frozen<'_, f32>,
        inv_std_p: &[f32],
        gamma: &[f32],
        beta: &[f32],
        sum_dy: &mut [f64],
        sum_dy_xhat: &mut [f64],
    ) -> bool {
        let relu = kernels::FusedRelu { mean: k.mean, scale: k.scale, shift: beta, residual };
        kernels::backward_eval_relu::<S>(
            backend,
            x,
            dy,
            relu,
            dresidual,
            dx,
            dims,
            k.mean,
            inv_std_p,
            gamma,
            sum_dy,
            sum_dy_xhat,
        );
        true
    }

    #[inline]
    fn batch_stats<S: Spec>(backend: Backend, x: &[f32], dims: Canonical, mean: &mut [f64], var: &mut [f64]) {
        kernels::batch_stats::<S>(backend, x, dims, mean, var);
        // The fast kernels sum squared deviations in f32 within a block, which can overflow
        // where the variance fits: the f64 reference decides (as in the training forward).
        if mean.iter().chain(var.iter()).any(|v| !v.is_finite()) {
            reference::batch_stats(x, dims, mean, var);
        }
    }

    #[inline]
    fn normalize_trained<S: Spec>(
        backend: Backend,
        x: &[f32],
        y: &mut [f32],
        tail: Tail<'_, f32>,
        dims: Canonical,
        mean: &[f64],
        inv_std: &[f64],
        gamma: &[f32],
        beta: &[f32],
    ) -> bool {
        // The fast kernels' transform: y = (x - m) * s + t, m the mean rounded to f32 and t
        // absorbing that rounding.
        let c = dims.channels;
        let (mut m, mut s, mut t) = (vec![0.0f32; c], vec![0.0f32; c], vec![0.0f32; c]);
        for i in 0..c {
            (m[i], s[i], t[i]) = kernels::train_coefficients(mean[i], inv_std[i], gamma[i], beta[i]);
        }
        kernels::normalize_fused_helped::<S>(backend, x, y, tail.epilogue(), dims, &m, &s, &t);
        false
    }

    #[inline]
    fn backward_sums<S: Spec>(
        backend: Backend,
        x: &[f32],
        dy: &[f32],
        dims: Canonical,
        mean: &[f64],
        inv_std: &[f64],
        sum_dy: &mut [f64],
        sum_dy_xhat: &mut [f64],
    ) {
        kernels::backward_sums::<S>(backend, x, dy, dims, mean, inv_std, sum_dy, sum_dy_xhat)
    }

    #[inline]
    fn backward_dx<S: Spec>(
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
        kernels::backward_dx::<S>(backend, x, dy, dx, dims, n, mean, inv_std, gamma, sum_dy, sum_dy_xhat)
    }
}

/// The fast kernels' transform of a training forward, `(mean, scale, shift)` per feature, in
/// `coefficients` (resized to `3 C`).
fn train_coefficients<'c>(
    c: usize,
    t: Trained<'_, f32>,
    coefficients: &'c mut Vec<f32>,
) -> (&'c [f32], &'c [f32], &'c [f32]) {
    coefficients.resize(3 * c, 0.0);
    let (m, rest) = coefficients.split_at_mut(c);
    let (s, sh) = rest.split_at_mut(c);
    for j in 0..c {
        (m[j], s[j], sh[j]) = kernels::train_coefficients(t.mean[j], t.inv_std[j], t.gamma[j], t.beta[j]);
    }
    (m, s, sh)
}

/// The 16-bit storage of an element type.
pub trait HalfBits: Element<Param = f32> {
    /// Its format.
    const FORMAT: HalfFormat;
    /// The values' bits.
    fn bits(values: &[Self]) -> &[u16];
    /// The values' bits, writable.
    fn bits_mut(values: &mut [Self]) -> &mut [u16];
}

macro_rules! half_bits {
    ($t:ty, $format:expr) => {
        impl HalfBits for $t {
            const FORMAT: HalfFormat = $format;
            #[inline(always)]
            fn bits(values: &[Self]) -> &[u16] {
                values.reinterpret_cast()
            }
            #[inline(always)]
            fn bits_mut(values: &mut [Self]) -> &mut [u16] {
                values.reinterpret_cast_mut()
            }
        }
    };
}

half_bits!(bf16, HalfFormat::Bf16);
half_bits!(f16, HalfFormat::F16);

/// The 16-bit kernels for `bf16` and `f16`: blocks widened to `f32`, computed as the `f32`
/// kernels compute them, rounded back. The masks of a fused ReLU and the synchronized passes
/// are the reference's.
#[allow(clippy::too_many_arguments)]
impl<E: HalfBits> Route<E> for Half16 {
    #[inline]
    fn forward_train<S: Spec>(
        backend: Backend,
        x: &[E],
        y: &mut [E],
        tail: Tail<'_, E>,
        dims: Canonical,
        gamma: &[f32],
        beta: &[f32],
        eps: f64,
        mean: &mut [f64],
        var: &mut [f64],
    ) -> TrainedY {
        if backend == Backend::Scalar {
            return Reference::forward_train::<S>(backend, x, y, tail, dims, gamma, beta, eps, mean, var);
        }
        let (x, y) = (E::bits(x), E::bits_mut(y));
        half16::forward_train_spec::<S>(backend, E::FORMAT, x, y, dims, gamma, beta, eps, mean, var);
        // The 16-bit kernels have no epilogue: the activation is a second pass (in the format:
        // the ReLU commutes with its rounding; the residual form rounds the sum).
        TrainedY::Written { tail_done: false, reference_y: true }
    }

    #[inline]
    fn normalize<S: Spec>(
        backend: Backend,
        x: &[E],
        y: &mut [E],
        tail: Tail<'_, E>,
        dims: Canonical,
        k: Frozen<'_, f32>,
        gamma: &[f32],
        beta: &[f32],
    ) {
        if backend == Backend::Scalar {
            return Reference::normalize::<S>(backend, x, y, tail, dims, k, gamma, beta);
        }
        half16::normalize_spec::<S>(
            backend,
            E::FORMAT,
            E::bits(x),
            E::bits_mut(y),
            dims,
            k.mean,
            k.scale,
            beta,
        );
        tail.apply(y);
    }

    #[inline]
    fn normalize_inplace<S: Spec>(
        backend: Backend,
        xy: &mut [E],
        tail: Tail<'_, E>,
        dims: Canonical,
        k: Frozen<'_, f32>,
        gamma: &[f32],
        beta: &[f32],
    ) {
        if backend == Backend::Scalar {
            return Reference::normalize_inplace::<S>(backend, xy, tail, dims, k, gamma, beta);
        }
        half16::normalize_inplace_spec::<S>(backend, E::FORMAT, E::bits_mut(xy), dims, k.mean, k.scale, beta);
        tail.apply(xy);
    }

    #[inline]
    fn backward<S: Spec>(
        backend: Backend,
        x: &[E],
        dy: &[E],
        dx: &mut [E],
        dims: Canonical,
        mean: &[f64],
        inv_std: &[f64],
        gamma: &[f32],
        sum_dy: &mut [f64],
        sum_dy_xhat: &mut [f64],
    ) {
        if backend == Backend::Scalar {
            return Reference::backward::<S>(
                backend,
                x,
                dy,
                dx,
                dims,
                mean,
                inv_std,
                gamma,
                sum_dy,
                sum_dy_xhat,
            );
        }
        let (x, dy, dx) = (E::bits(x), E::bits(dy), E::bits_mut(dx));
        half16::backward_spec::<S>(
            backend,
            E::FORMAT,
            x,
            dy,
            dx,
            dims,
            mean,
            inv_std,
            gamma,
            sum_dy,
            sum_dy_xhat,
        );
    }

    #[inline]
    fn backward_eval<S: Spec>(
        backend: Backend,
        x: &[E],
        dy: &[E],
        dx: &mut [E],
        dims: Canonical,
        k: Frozen<'_, f32>,
        inv_std_p: &[f32],
        gamma: &[f32],
        sum_dy: &mut [f64],
        sum_dy_xhat: &mut [f64],
    ) {
        if backend == Backend::Scalar {
            return Reference::backward_eval::<S>(
                backend,
                x,
                dy,
                dx,
                dims,
                k,
                inv_std_p,
                gamma,
                sum_dy,
                sum_dy_xhat,
            );
        }
        let (x, dy, dx) = (E::bits(x), E::bits(dy), E::bits_mut(dx));
        half16::backward_eval_spec::<S>(
            backend,
            E::FORMAT,
            x,
            dy,
            dx,
            dims,
            k.mean,
            inv_std_p,
            gamma,
            sum_dy,
            sum_dy_xhat,
        );
    }

    fn eval_mask<S: Spec>(
        backend: Backend,
        x: &[E],
        dy: &[E],
        residual: Option<&[E]>,
        out: &mut [E],
        dims: Canonical,
        k: Frozen<'_, f32>,
        gamma: &[f32],
        beta: &[f32],
    ) {
        Reference::eval_mask::<S>(backend, x, dy, residual, out, dims, k, gamma, beta)
    }

    fn train_mask<S: Spec>(
        x: &[E],
        dy: &[E],
        residual: Option<&[E]>,
        out: &mut [E],
        dims: Canonical,
        t: Trained<'_, f32>,
        coefficients: &mut Vec<f32>,
    ) {
        Reference::train_mask::<S>(x, dy, residual, out, dims, t, coefficients)
    }

    fn backward_relu<S: Spec>(
        _backend: Backend,
        _x: &[E],
        _dy: &[E],
        _residual: Option<&[E]>,
        _dresidual: Option<&mut [E]>,
        _dx: &mut [E],
        _dims: Canonical,
        _t: Trained<'_, f32>,
        _coefficients: &mut Vec<f32>,
        _sum_dy: &mut [f64],
        _sum_dy_xhat: &mut [f64],
    ) -> bool {
        false
    }

    fn backward_eval_relu<S: Spec>(
        _backend: Backend,
        _x: &[E],
        _dy: &[E],
        _residual: Option<&[E]>,
        _dresidual: Option<&mut [E]>,
        _dx: &mut [E],
        _dims: Canonical,
        _k: Frozen<'_, f32>,
        _inv_std_p: &[f32],
        _gamma: &[f32],
        _beta: &[f32],
        _sum_dy: &mut [f64],
        _sum_dy_xhat: &mut [f64],
    ) -> bool {
        false
    }

    fn batch_stats<S: Spec>(backend: Backend, x: &[E], dims: Canonical, mean: &mut [f64], var: &mut [f64]) {
        Reference::batch_stats::<S>(backend, x, dims, mean, var)
    }

    fn normalize_trained<S: Spec>(
        backend: Backend,
        x: &[E],
        y: &mut [E],
        tail: Tail<'_, E>,
        dims: Canonical,
        mean: &[f64],
        inv_std: &[f64],
        gamma: &[f32],
        beta: &[f32],
    ) -> bool {
        Reference::normalize_trained::<S>(backend, x, y, tail, dims, mean, inv_std, gamma, beta)
    }

    fn backward_sums<S: Spec>(
        backend: Backend,
        x: &[E],
        dy: &[E],
        dims: Canonical,
        mean: &[f64],
        inv_std: &[f64],
        sum_dy: &mut [f64],
        sum_dy_xhat: &mut [f64],
    ) {
        Reference::backward_sums::<S>(backend, x, dy, dims, mean, inv_std, sum_dy, sum_dy_xhat)
    }

    fn backward_dx<S: Spec>(
        backend: Backend,
        x: &[E],
        dy: &[E],
        dx: &mut [E],
        dims: Canonical,
        n: f64,
        mean: &[f64],
        inv_std: &[f64],
        gamma: &[f32],
        sum_dy: &[f64],
        sum_dy_xhat: &[f64],
    ) {
        Reference::backward_dx::<S>(backend, x, dy, dx, dims, n, mean, inv_std, gamma, sum_dy, sum_dy_xhat)
    }
}
