//! The training forward: the batch statistics, checked, and `y` normalized with them; the
//! running statistics' update.

use super::setup::{BatchNormOps, BatchStats};
use crate::element::route::{Route, Tail, TrainedY};
use crate::kernels::reference::{self, Affine};
use crate::kernels::{self, Backend};
use crate::spec::{specialize, Spec};
use crate::{BnError, Config, Element, Param, RunningVar};

impl<E: Element> BatchNormOps<E> {
    /// The training forward into `stats` (whose buffers hold one value per feature): on `Ok`
    /// they hold this batch's statistics; after an `Err` their contents and `y` are unspecified.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn train<S: Spec>(
        &self,
        x: &[E],
        shape: &[usize],
        y: &mut [E],
        tail: Tail<'_, E>,
        gamma: &[E::Param],
        beta: &[E::Param],
        stats: &mut BatchStats,
    ) -> Result<(), BnError> {
        let dims = self.check(shape, &[("x", x.len()), ("y", y.len())])?;
        self.check_residual(shape, tail)?;
        Self::check_batch(dims, shape)?;
        let dims = specialize::<S>(dims);
        let backend = self.backend();
        let eps = self.config.get_eps();
        let track = self.config.get_track_running_stats();
        let BatchStats { mean, var, inv_std, .. } = stats;
        // The route computes the statistics and, where its kernels fuse the two, y (which is
        // unspecified after an Err).
        let mut trained =
            E::Route::forward_train::<S>(backend, x, y, tail, dims, gamma, beta, eps, mean, var);
        let mut checked =
            self.check_statistics_of(dims.channels, dims.per_channel() as f64, mean, var, inv_std, track);
        if checked.is_err() && trained != TrainedY::Pending {
            // The fast kernels sum squared deviations in f32 within a block, which can overflow
            // where the variance itself fits (|x - mean| above ~1e17): only the f64 reference's
            // statistics decide that a batch is non-finite. (Its normalize then rewrites y.)
            reference::batch_stats(x, dims, mean, var);
            checked =
                self.check_statistics_of(dims.channels, dims.per_channel() as f64, mean, var, inv_std, track);
            trained = TrainedY::Pending;
        }
        checked?;
        // Validated: from here on nothing fails.
        let reference_y = match trained {
            TrainedY::Pending => {
                let affine = Affine { mean: &mean[..], inv_std: &inv_std[..], gamma, beta };
                reference::normalize(x, y, dims, affine);
                tail.apply(y);
                true
            }
            TrainedY::Written { tail_done, reference_y } => {
                if !tail_done {
                    tail.apply(y);
                }
                reference_y
            }
        };
        stats.shape.clear();
        stats.shape.extend_from_slice(shape);
        stats.count = dims.per_channel() as f64;
        stats.backend = backend;
        stats.reference_y = reference_y;
        Ok(())
    }
}

/// Folds batch statistics (mean and biased variance of `n` values per feature) into running
/// ones, as batch number `batches` (counting from 1) for the cumulative average.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn update_running<P: Param>(
    config: &Config,
    backend: Backend,
    n: f64,
    mean: &[f64],
    var: &[f64],
    running_mean: &mut [P],
    running_var: &mut [P],
    batches: u64,
) {
    // Batch k (counting from 1) has weight 1/k in a cumulative average.
    let m = if config.get_cumulative_momentum() { 1.0 - 1.0 / batches as f64 } else { config.get_momentum() };
    let correction = match config.get_running_var() {
        RunningVar::Biased => 1.0,
        RunningVar::Unbiased => n / (n - 1.0),
    };
    kernels::vectorized(
        backend,
        #[inline(always)]
        || {
            // Iterators over disjoint buffers: a loop the compiler vectorizes.
            let running = running_mean.iter_mut().zip(running_var.iter_mut());
            for ((rm, rv), (&mean, &var)) in running.zip(mean.iter().zip(var)) {
                *rm = P::from_f64(m * rm.to_f64() + (1.0 - m) * mean);
                *rv = P::from_f64(m * rv.to_f64() + (1.0 - m) * var * correction);
            }
        },
    );
}
