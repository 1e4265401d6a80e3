//! The backward passes: of a training forward (its batch statistics), and of inference
//! (frozen statistics), each with the fused ReLU's mask.

use super::eval::BatchCoefficients;
use super::setup::{BatchNormOps, BatchStats};
use crate::element::route::{Frozen, Route, Tail, Trained};
use crate::spec::{specialize, Spec};
use crate::{BnError, Element};

/// The running statistics' inference transform and its `1 / sqrt(var + eps)` in the parameter
/// type (the fast kernels' frozen-statistics backward).
pub(crate) type Running<'a, P> = (Frozen<'a, P>, &'a [P]);

/// What a training forward left for its backward: its statistics and the parameters it used.
#[derive(Clone, Copy)]
pub(crate) struct Saved<'a, P> {
    pub(crate) stats: &'a BatchStats,
    pub(crate) gamma: &'a [P],
    pub(crate) beta: &'a [P],
}

impl<'a, P> Saved<'a, P> {
    pub(crate) fn trained(self) -> Trained<'a, P> {
        Trained {
            mean: &self.stats.mean,
            inv_std: &self.stats.inv_std,
            gamma: self.gamma,
            beta: self.beta,
            backend: self.stats.backend,
            reference_y: self.stats.reference_y,
        }
    }
}

/// Reusable buffers of the backward passes (their contents are never state): the masked
/// gradient of a fused ReLU (grown to the largest batch seen) and the `3 C` `f32` coefficients
/// of its fast mask.
#[derive(Clone, Default)]
pub(crate) struct Buffers<E> {
    pub(crate) grad: Vec<E>,
    pub(crate) coefficients: Vec<f32>,
}

/// The masked-gradient buffer: `dresidual` when given, else `grad` grown to `n` values.
pub(crate) fn mask_buffer<'b, E: Element>(
    grad: &'b mut Vec<E>,
    dresidual: Option<&'b mut [E]>,
    n: usize,
) -> &'b mut [E] {
    match dresidual {
        Some(d) => d,
        None => {
            grad.resize(n, E::default());
            &mut grad[..n]
        }
    }
}

impl<E: Element> BatchNormOps<E> {
    /// Checks the buffers of a backward pass; returns the canonical view.
    fn check_backward(
        &self,
        x: &[E],
        dy: &[E],
        shape: &[usize],
        dx: &[E],
        tail: Tail<'_, E>,
        dresidual: Option<&[E]>,
    ) -> Result<crate::Canonical, BnError> {
        let dims = self.check(shape, &[("x", x.len()), ("dy", dy.len()), ("dx", dx.len())])?;
        self.check_residual(shape, tail)?;
        if let Some(d) = dresidual {
            self.check(shape, &[("dresidual", d.len())])?;
        }
        Ok(dims)
    }

    /// The backward of the training forward `saved` (`None`: there was none): `dx`, the
    /// masked gradient into `dresidual` when given, and the sums of `dy` and `dy * xhat` into
    /// `sums.mean` and `sums.var`. Nothing is written on error.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward_train<S: Spec>(
        &self,
        x: &[E],
        dy: &[E],
        shape: &[usize],
        dx: &mut [E],
        tail: Tail<'_, E>,
        mut dresidual: Option<&mut [E]>,
        saved: Option<Saved<'_, E::Param>>,
        sums: &mut BatchStats,
        buffers: &mut Buffers<E>,
    ) -> Result<(), BnError> {
        let dims = self.check_backward(x, dy, shape, dx, tail, dresidual.as_deref())?;
        let saved = saved.ok_or(BnError::NoForward)?;
        if saved.stats.shape != shape {
            return Err(BnError::BackwardShape { expected: saved.stats.shape.clone(), got: shape.to_vec() });
        }
        let dims = specialize::<S>(dims);
        let backend = self.backend();
        let t = saved.trained();
        let (sum_dy, sum_dy_xhat) = (&mut sums.mean[..], &mut sums.var[..]);
        let residual = tail.residual();
        if !matches!(tail, Tail::Plain) {
            let dg = dresidual.as_deref_mut();
            let coefficients = &mut buffers.coefficients;
            if E::Route::backward_relu::<S>(
                backend,
                x,
                dy,
                residual,
                dg,
                dx,
                dims,
                t,
                coefficients,
                sum_dy,
                sum_dy_xhat,
            ) {
                return Ok(());
            }
        }
        let dy = if let Tail::Plain = tail {
            dy
        } else {
            let masked = mask_buffer(&mut buffers.grad, dresidual, dims.len());
            E::Route::train_mask::<S>(x, dy, residual, masked, dims, t, &mut buffers.coefficients);
            &*masked
        };
        E::Route::backward::<S>(backend, x, dy, dx, dims, t.mean, t.inv_std, t.gamma, sum_dy, sum_dy_xhat);
        Ok(())
    }

    /// The backward of inference with the running statistics' transform `running` and its
    /// `1 / sqrt(var + eps)` in the parameter type (`None`: inference used the batch's
    /// statistics, and this is the training backward of this batch). Writes as
    /// [`backward_train`](Self::backward_train).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward_frozen<S: Spec>(
        &self,
        x: &[E],
        dy: &[E],
        shape: &[usize],
        dx: &mut [E],
        tail: Tail<'_, E>,
        mut dresidual: Option<&mut [E]>,
        running: Option<Running<'_, E::Param>>,
        gamma: &[E::Param],
        beta: &[E::Param],
        sums: &mut BatchStats,
        buffers: &mut Buffers<E>,
    ) -> Result<(), BnError> {
        let dims = self.check_backward(x, dy, shape, dx, tail, dresidual.as_deref())?;
        let c = dims.channels;
        if dims.is_empty() {
            sums.mean[..c].fill(0.0);
            sums.var[..c].fill(0.0);
            return Ok(());
        }
        let dims = specialize::<S>(dims);
        let backend = self.backend();
        let residual = tail.residual();
        if let (false, Some((k, inv_std_p))) = (matches!(tail, Tail::Plain), running) {
            let dg = dresidual.as_deref_mut();
            let (sum_dy, sum_dy_xhat) = (&mut sums.mean[..], &mut sums.var[..]);
            if E::Route::backward_eval_relu::<S>(
                backend,
                x,
                dy,
                residual,
                dg,
                dx,
                dims,
                k,
                inv_std_p,
                gamma,
                beta,
                sum_dy,
                sum_dy_xhat,
            ) {
                return Ok(());
            }
        }
        // Without running statistics, inference used the batch's: computed once, for the mask
        // and for the backward.
        let batch = match running {
            Some(_) => None,
            None => Some(self.reference_statistics(x, dims, shape)?),
        };
        let dy = match tail {
            Tail::Plain => dy,
            _ => {
                let coefficients;
                let k = match (running, &batch) {
                    (Some((k, _)), _) => k,
                    (None, Some((mean, inv_std))) => {
                        coefficients = BatchCoefficients::of(mean, inv_std.clone(), gamma);
                        coefficients.frozen()
                    }
                    (None, None) => unreachable!("computed above"),
                };
                let masked = mask_buffer(&mut buffers.grad, dresidual, dims.len());
                E::Route::eval_mask::<S>(backend, x, dy, residual, masked, dims, k, gamma, beta);
                &*masked
            }
        };
        let (sum_dy, sum_dy_xhat) = (&mut sums.mean[..], &mut sums.var[..]);
        match (running, &batch) {
            (Some((k, inv_std_p)), _) => E::Route::backward_eval::<S>(
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
            ),
            (None, Some((mean, inv_std))) => {
                E::Route::backward::<S>(backend, x, dy, dx, dims, mean, inv_std, gamma, sum_dy, sum_dy_xhat)
            }
            (None, None) => unreachable!("computed above"),
        }
        Ok(())
    }
}
