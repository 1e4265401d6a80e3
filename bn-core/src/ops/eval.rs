//! The inference forward: a frozen per-feature transform, from the running statistics or (when
//! they are not tracked) from the batch.

use super::setup::BatchNormOps;
use crate::alloc::try_filled_vec;
use crate::element::route::{Frozen, Route, Tail};
use crate::kernels::reference;
use crate::spec::{specialize, Spec};
use crate::{BnError, Canonical, Config, Element, Param};

/// The inference transform of running statistics, owned: what a layer keeps in step with its
/// gamma and running variance.
#[derive(Clone)]
pub(crate) struct Coefficients<P> {
    /// The running mean.
    pub(crate) mean: Vec<P>,
    /// `1 / sqrt(running_var + eps)` (the reference's).
    pub(crate) inv_std: Vec<f64>,
    /// The same in the parameter type (the fast kernels' frozen-statistics backward).
    pub(crate) inv_std_p: Vec<P>,
    /// `gamma / sqrt(running_var + eps)` (the fast inference scale).
    pub(crate) scale: Vec<P>,
}

impl<P: Param> Coefficients<P> {
    /// Coefficients of `c` features, all zero.
    pub(crate) fn zeroed(c: usize) -> Result<Self, BnError> {
        let what = "the inference coefficients";
        Ok(Coefficients {
            mean: try_filled_vec(P::ZERO, c, what)?,
            inv_std: try_filled_vec(0.0, c, what)?,
            inv_std_p: try_filled_vec(P::ZERO, c, what)?,
            scale: try_filled_vec(P::ZERO, c, what)?,
        })
    }

    /// Recomputes the scales from the running variance and gamma (the mean is set by the
    /// caller).
    #[inline(always)]
    pub(crate) fn refresh(&mut self, config: &Config, running_var: &[P], gamma: &[P]) {
        let eps = config.get_eps();
        for (s, v) in self.inv_std.iter_mut().zip(running_var) {
            *s = 1.0 / (v.to_f64() + eps).sqrt();
        }
        let coefficients = self.inv_std_p.iter_mut().zip(&mut self.scale);
        for (((p, scale), &s), g) in coefficients.zip(&self.inv_std).zip(gamma) {
            *p = P::saturating_from_f64(s);
            *scale = P::saturating_from_f64(g.to_f64() * s);
        }
    }

    /// The route's view of them.
    pub(crate) fn frozen(&self) -> Frozen<'_, P> {
        Frozen { mean: &self.mean, inv_std: &self.inv_std, scale: &self.scale }
    }
}

/// The transform of one inference call: the running statistics', or the batch's.
pub(crate) struct BatchCoefficients<P> {
    mean: Vec<P>,
    inv_std: Vec<f64>,
    scale: Vec<P>,
}

impl<P: Param> BatchCoefficients<P> {
    /// The transform of batch statistics `(mean, inv_std)` with `gamma`.
    pub(crate) fn of(mean: &[f64], inv_std: Vec<f64>, gamma: &[P]) -> Self {
        let scale = gamma.iter().zip(&inv_std).map(|(g, s)| P::saturating_from_f64(g.to_f64() * s)).collect();
        let mean = mean.iter().map(|&m| P::from_f64(m)).collect();
        BatchCoefficients { mean, inv_std, scale }
    }

    pub(crate) fn frozen(&self) -> Frozen<'_, P> {
        Frozen { mean: &self.mean, inv_std: &self.inv_std, scale: &self.scale }
    }
}

impl<E: Element> BatchNormOps<E> {
    /// The batch's transform (inference without running statistics), computed from `x` by the
    /// reference and checked.
    pub(crate) fn batch_coefficients(
        &self,
        x: &[E],
        dims: Canonical,
        shape: &[usize],
        gamma: &[E::Param],
    ) -> Result<BatchCoefficients<E::Param>, BnError> {
        let (mean, inv_std) = self.reference_statistics(x, dims, shape)?;
        Ok(BatchCoefficients::of(&mean, inv_std, gamma))
    }

    /// Batch statistics computed by the reference kernel and checked: `(mean, inv_std)`.
    pub(crate) fn reference_statistics(
        &self,
        x: &[E],
        dims: Canonical,
        shape: &[usize],
    ) -> Result<(Vec<f64>, Vec<f64>), BnError> {
        Self::check_batch(dims, shape)?;
        let c = dims.channels;
        let (mut mean, mut var, mut inv_std) = (vec![0.0; c], vec![0.0; c], vec![0.0; c]);
        reference::batch_stats(x, dims, &mut mean, &mut var);
        self.check_statistics_of(c, dims.per_channel() as f64, &mean, &var, &mut inv_std, false)?;
        Ok((mean, inv_std))
    }

    /// The inference forward with the running statistics' transform `running` (`None`: the
    /// batch's).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn eval<S: Spec>(
        &self,
        x: &[E],
        shape: &[usize],
        y: &mut [E],
        tail: Tail<'_, E>,
        running: Option<Frozen<'_, E::Param>>,
        gamma: &[E::Param],
        beta: &[E::Param],
    ) -> Result<(), BnError> {
        let dims = self.check(shape, &[("x", x.len()), ("y", y.len())])?;
        self.check_residual(shape, tail)?;
        if dims.is_empty() {
            return Ok(());
        }
        let dims = specialize::<S>(dims);
        let batch;
        let k = match running {
            Some(k) => k,
            None => {
                batch = self.batch_coefficients(x, dims, shape, gamma)?;
                batch.frozen()
            }
        };
        E::Route::normalize::<S>(self.backend(), x, y, tail, dims, k, gamma, beta);
        Ok(())
    }

    /// [`eval`](Self::eval) in place, with the configured activation.
    pub(crate) fn eval_inplace<S: Spec>(
        &self,
        xy: &mut [E],
        shape: &[usize],
        running: Option<Frozen<'_, E::Param>>,
        gamma: &[E::Param],
        beta: &[E::Param],
    ) -> Result<(), BnError> {
        let dims = self.check(shape, &[("xy", xy.len())])?;
        if dims.is_empty() {
            return Ok(());
        }
        let dims = specialize::<S>(dims);
        let batch;
        let k = match running {
            Some(k) => k,
            None => {
                batch = self.batch_coefficients(xy, dims, shape, gamma)?;
                batch.frozen()
            }
        };
        E::Route::normalize_inplace::<S>(self.backend(), xy, self.activation_tail(), dims, k, gamma, beta);
        Ok(())
    }
}
