//! The layer's route to the 16-bit kernels ([`kernels::half16`]): each function runs the pass
//! when `E` is a 16-bit format (`bf16`, `f16`) and the backend is not the `f64` reference, and
//! returns whether it did. Every other case goes on to the layer's `f32` or reference path.

use crate::kernels::{self, half16, Backend};
use crate::{Canonical, Element, Param};

/// The 16-bit format of `E`, unless `backend` is the `f64` reference (which runs on any `E`).
#[inline(always)]
fn format<E: Element>(backend: Backend) -> Option<kernels::HalfFormat> {
    E::HALF.filter(|_| backend != Backend::Scalar)
}

/// The parameters as `f32` (the parameter type of 16-bit layers).
#[inline(always)]
fn p32<P: Param>(values: &[P]) -> Option<&[f32]> {
    P::slice_as_f32(values)
}

/// [`half16::forward_train`].
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) fn forward_train<E: Element>(
    backend: Backend,
    x: &[E],
    y: &mut [E],
    dims: Canonical,
    gamma: &[E::Param],
    beta: &[E::Param],
    eps: f64,
    mean_out: &mut [f64],
    var_out: &mut [f64],
) -> bool {
    let Some(format) = format::<E>(backend) else { return false };
    match (E::slice_as_bits(x), E::slice_as_bits_mut(y), p32(gamma), p32(beta)) {
        (Some(x), Some(y), Some(gamma), Some(beta)) => {
            half16::forward_train(backend, format, x, y, dims, gamma, beta, eps, mean_out, var_out);
            true
        }
        _ => false,
    }
}

/// [`half16::normalize`].
#[inline]
pub(crate) fn normalize<E: Element>(
    backend: Backend,
    x: &[E],
    y: &mut [E],
    dims: Canonical,
    mean: &[E::Param],
    scale: &[E::Param],
    shift: &[E::Param],
) -> bool {
    let Some(format) = format::<E>(backend) else { return false };
    match (E::slice_as_bits(x), E::slice_as_bits_mut(y), p32(mean), p32(scale), p32(shift)) {
        (Some(x), Some(y), Some(mean), Some(scale), Some(shift)) => {
            half16::normalize(backend, format, x, y, dims, mean, scale, shift);
            true
        }
        _ => false,
    }
}

/// [`half16::normalize_inplace`].
#[inline]
pub(crate) fn normalize_inplace<E: Element>(
    backend: Backend,
    xy: &mut [E],
    dims: Canonical,
    mean: &[E::Param],
    scale: &[E::Param],
    shift: &[E::Param],
) -> bool {
    let Some(format) = format::<E>(backend) else { return false };
    match (E::slice_as_bits_mut(xy), p32(mean), p32(scale), p32(shift)) {
        (Some(xy), Some(mean), Some(scale), Some(shift)) => {
            half16::normalize_inplace(backend, format, xy, dims, mean, scale, shift);
            true
        }
        _ => false,
    }
}

/// [`half16::backward`].
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) fn backward<E: Element>(
    backend: Backend,
    x: &[E],
    dy: &[E],
    dx: &mut [E],
    dims: Canonical,
    mean: &[f64],
    inv_std: &[f64],
    gamma: &[E::Param],
    sum_dy: &mut [f64],
    sum_dy_xhat: &mut [f64],
) -> bool {
    let Some(format) = format::<E>(backend) else { return false };
    match (E::slice_as_bits(x), E::slice_as_bits(dy), E::slice_as_bits_mut(dx), p32(gamma)) {
        (Some(x), Some(dy), Some(dx), Some(gamma)) => {
            half16::backward(backend, format, x, dy, dx, dims, mean, inv_std, gamma, sum_dy, sum_dy_xhat);
            true
        }
        _ => false,
    }
}

/// [`half16::backward_eval`].
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) fn backward_eval<E: Element>(
    backend: Backend,
    x: &[E],
    dy: &[E],
    dx: &mut [E],
    dims: Canonical,
    mean: &[E::Param],
    inv_std: &[E::Param],
    gamma: &[E::Param],
    sum_dy: &mut [f64],
    sum_dy_xhat: &mut [f64],
) -> bool {
    let Some(format) = format::<E>(backend) else { return false };
    match (
        E::slice_as_bits(x),
        E::slice_as_bits(dy),
        E::slice_as_bits_mut(dx),
        p32(mean),
        p32(inv_std),
        p32(gamma),
    ) {
        (Some(x), Some(dy), Some(dx), Some(mean), Some(inv_std), Some(gamma)) => {
            half16::backward_eval(
                backend,
                format,
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
            true
        }
        _ => false,
    }
}
