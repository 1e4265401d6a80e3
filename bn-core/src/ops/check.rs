//! The checks every pass makes before it writes anything: shapes and buffer lengths, the batch,
//! the statistics, the parameters.

use super::setup::BatchNormOps;
use crate::element::route::Tail;
use crate::kernels;
use crate::{Activation, BnError, Canonical, Element, Param, RunningVar};

impl<E: Element> BatchNormOps<E> {
    /// Validates `shape` and the lengths of the data buffers; returns the canonical view.
    pub(crate) fn check(
        &self,
        shape: &[usize],
        buffers: &[(&'static str, usize)],
    ) -> Result<Canonical, BnError> {
        let dims = self.layout.canonical(shape)?;
        for &(buffer, got) in buffers {
            if got != dims.len() {
                return Err(BnError::BufferLength {
                    buffer,
                    expected: dims.len(),
                    got,
                    shape: shape.to_vec(),
                });
            }
        }
        Ok(dims)
    }

    /// Validates the residual's length against `shape` (the other buffers are checked first).
    pub(crate) fn check_residual(&self, shape: &[usize], tail: Tail<'_, E>) -> Result<(), BnError> {
        match tail.residual() {
            Some(r) => self.check(shape, &[("residual", r.len())]).map(drop),
            None => Ok(()),
        }
    }

    /// Checks the batch can give statistics: non-empty, at least two values per feature.
    pub(crate) fn check_batch(dims: Canonical, shape: &[usize]) -> Result<(), BnError> {
        if dims.is_empty() {
            return Err(BnError::EmptyBatch { shape: shape.to_vec() });
        }
        if dims.per_channel() < 2 {
            return Err(BnError::TooFewValues { shape: shape.to_vec() });
        }
        Ok(())
    }

    /// Checks the statistics of `channels` features, computed from `n` values each (a whole
    /// group's when synchronized), are finite in the parameter type, and computes `inv_std`.
    /// `updates_running`: the unbiased variance the running variance would take must fit too.
    pub(crate) fn check_statistics_of(
        &self,
        channels: usize,
        n: f64,
        mean: &[f64],
        var: &[f64],
        inv_std: &mut [f64],
        updates_running: bool,
    ) -> Result<(), BnError> {
        let unbiased = updates_running && self.config.get_running_var() == RunningVar::Unbiased;
        let eps = self.config.get_eps();
        let correction = if unbiased { n / (n - 1.0) } else { 1.0 };
        // The common case first, in a loop without exits (which the compiler vectorizes): every
        // statistic fits. The loop below finds the first that does not only when one does not.
        let fits = |v: f64| E::Param::from_f64(v).is_finite();
        let all_fit = kernels::vectorized(
            self.backend(),
            #[inline(always)]
            || {
                let pairs = mean[..channels].iter().zip(&var[..channels]);
                pairs.fold(true, |ok, (&m, &v)| ok & fits(m) & fits(v) & fits(v * correction))
            },
        );
        if !all_fit {
            for c in 0..channels {
                if !fits(mean[c]) {
                    return Err(BnError::NonFinite { what: "batch mean", index: c, value: mean[c] });
                }
                let v = var[c] * correction;
                if !fits(var[c]) || !fits(v) {
                    return Err(BnError::NonFinite { what: "batch variance", index: c, value: v });
                }
            }
        }
        // Checked: a loop without exits, which the compiler vectorizes (for the backend's
        // instruction set: the square roots and divisions are most of this bookkeeping).
        kernels::vectorized(
            self.backend(),
            #[inline(always)]
            || {
                for (s, &v) in inv_std[..channels].iter_mut().zip(&var[..channels]) {
                    *s = 1.0 / (v + eps).sqrt();
                }
            },
        );
        Ok(())
    }

    /// Gamma and beta as the layer's `update_params` accepts them.
    pub(crate) fn check_params(&self, gamma: &[E::Param], beta: &[E::Param]) -> Result<(), BnError> {
        let c = self.layout.channels();
        check_len("gamma", gamma, c)?;
        check_len("beta", beta, c)?;
        check_finite("gamma", gamma)?;
        check_finite("beta", beta)?;
        if !self.config.get_scale() {
            check_fixed("gamma", "scale", gamma, E::Param::ONE)?;
        }
        if !self.config.get_center() {
            check_fixed("beta", "center", beta, E::Param::ZERO)?;
        }
        Ok(())
    }

    /// The lengths of gradient buffers.
    pub(crate) fn check_grads(&self, dgamma: &[E::Param], dbeta: &[E::Param]) -> Result<(), BnError> {
        let c = self.layout.channels();
        check_len("dgamma", dgamma, c)?;
        check_len("dbeta", dbeta, c)
    }

    /// The tail the configured activation asks for.
    pub(crate) fn activation_tail<'r>(&self) -> Tail<'r, E> {
        match self.config.get_activation() {
            Activation::Identity => Tail::Plain,
            Activation::Relu => Tail::Relu,
        }
    }
}

/// Running statistics as the layer's `set_running_stats` accepts them (lengths checked by the
/// caller): finite, variances not negative.
pub(crate) fn check_running<P: Param>(mean: &[P], var: &[P]) -> Result<(), BnError> {
    check_finite("running_mean", mean)?;
    check_finite("running_var", var)?;
    if let Some((index, v)) = var.iter().enumerate().find(|(_, v)| v.to_f64() < 0.0) {
        return Err(BnError::NegativeVariance { index, value: v.to_f64() });
    }
    Ok(())
}

pub(crate) fn check_len<P>(name: &'static str, values: &[P], expected: usize) -> Result<(), BnError> {
    if values.len() != expected {
        return Err(BnError::ParamLength { name, expected, got: values.len() });
    }
    Ok(())
}

pub(crate) fn check_finite<P: Param>(what: &'static str, values: &[P]) -> Result<(), BnError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(BnError::NonFinite { what, index, value: values[index].to_f64() }),
        None => Ok(()),
    }
}

pub(crate) fn check_fixed<P: Param>(
    name: &'static str,
    option: &'static str,
    values: &[P],
    fixed: P,
) -> Result<(), BnError> {
    match values.iter().position(|&v| v != fixed) {
        Some(index) => Err(BnError::FixedParameter {
            name,
            option,
            fixed: fixed.to_f64(),
            index,
            value: values[index].to_f64(),
        }),
        None => Ok(()),
    }
}
