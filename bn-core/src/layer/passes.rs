//! The layer's passes over its state: each runs the stateless pass ([`crate::ops`]) with the
//! layer's parameters and statistics, then commits what it changes (the running statistics and
//! the saved batch statistics after a training forward, the gradients after a backward) only
//! when it succeeded.
//!
//! The `*_spec` entry points take the compile-time [`Spec`] of a `#[batch_norm]` layer (the
//! public methods pass [`Dynamic`](crate::spec::Dynamic)).

use super::BatchNorm;
use crate::element::route::{Frozen, Tail};
use crate::kernels;
use crate::ops::backward::{self, Buffers};
use crate::ops::{BatchNormOps, BatchStats};
use crate::spec::Spec;
use crate::{BnError, Element};

impl<E: Element> BatchNorm<E> {
    /// A training step whose statistics `step` computes into the working statistics (given
    /// this layer's passes, gamma and beta): when it succeeds, they update the running
    /// statistics and become the saved statistics; when it fails, nothing changes.
    pub(crate) fn train_step(
        &mut self,
        step: impl FnOnce(&BatchNormOps<E>, &[E::Param], &[E::Param], &mut BatchStats) -> Result<(), BnError>,
    ) -> Result<(), BnError> {
        let mut stats = core::mem::replace(&mut self.scratch, BatchStats::EMPTY);
        let result = step(&self.ops, &self.gamma, &self.beta, &mut stats);
        if result.is_ok() {
            self.commit_train(&mut stats);
        }
        self.scratch = stats;
        result
    }

    /// What the last successful training forward left for its backward, if any.
    pub(crate) fn saved(&self) -> Option<backward::Saved<'_, E::Param>> {
        let saved = &self.saved;
        saved.valid.then_some(backward::Saved { stats: &saved.stats, gamma: &saved.gamma, beta: &saved.beta })
    }

    /// The stateless passes (layout, configuration, backend).
    pub(crate) fn ops(&self) -> &BatchNormOps<E> {
        &self.ops
    }

    /// A backward step whose sums (`sum_dy`, `sum_dy_xhat`) `step` writes into the working
    /// statistics, given this layer (read-only) and its reusable buffers: when it succeeds they
    /// become the gradients of gamma and beta.
    pub(crate) fn backward_step(
        &mut self,
        step: impl FnOnce(&Self, &mut BatchStats, &mut Buffers<E>) -> Result<(), BnError>,
    ) -> Result<(), BnError> {
        let mut sums = core::mem::replace(&mut self.scratch, BatchStats::EMPTY);
        let mut buffers = core::mem::take(&mut self.buffers);
        let result = step(self, &mut sums, &mut buffers);
        if result.is_ok() {
            self.ops.store_grads(&sums.mean, &sums.var, &mut self.gamma_grad, &mut self.beta_grad);
        }
        self.scratch = sums;
        self.buffers = buffers;
        result
    }

    /// The end of a successful training step whose statistics are in `stats`: updates the
    /// running statistics (when tracked) and `num_batches_tracked`, and saves the statistics
    /// and parameters for backward (swapped with `stats`, whose contents are then unspecified).
    fn commit_train(&mut self, stats: &mut BatchStats) {
        let config = *self.ops.config();
        if config.get_track_running_stats() {
            let batches = self.num_batches_tracked.saturating_add(1);
            let backend = self.backend();
            let (mean, var) = (&stats.mean, &stats.var);
            let (running_mean, running_var) = (&mut self.running.mean, &mut self.running_var);
            crate::ops::update_running(
                &config,
                backend,
                stats.count,
                mean,
                var,
                running_mean,
                running_var,
                batches,
            );
            kernels::vectorized(
                backend,
                #[inline(always)]
                || self.refresh_eval(),
            );
            self.num_batches_tracked = batches;
        }
        core::mem::swap(&mut self.saved.stats, stats);
        self.saved.gamma.copy_from_slice(&self.gamma);
        self.saved.beta.copy_from_slice(&self.beta);
        self.saved.valid = true;
    }

    /// The running statistics' inference transform, when they are tracked (else inference
    /// uses the batch's).
    fn frozen(&self) -> Option<Frozen<'_, E::Param>> {
        self.config().get_track_running_stats().then(|| self.running.frozen())
    }

    fn train<S: Spec>(
        &mut self,
        x: &[E],
        shape: &[usize],
        y: &mut [E],
        tail: Tail<'_, E>,
    ) -> Result<(), BnError> {
        self.train_step(|ops, gamma, beta, stats| ops.train::<S>(x, shape, y, tail, gamma, beta, stats))
    }

    fn eval<S: Spec>(&self, x: &[E], shape: &[usize], y: &mut [E], tail: Tail<'_, E>) -> Result<(), BnError> {
        self.ops.eval::<S>(x, shape, y, tail, self.frozen(), &self.gamma, &self.beta)
    }

    fn backward_train<S: Spec>(
        &mut self,
        x: &[E],
        dy: &[E],
        shape: &[usize],
        dx: &mut [E],
        tail: Tail<'_, E>,
        dresidual: Option<&mut [E]>,
    ) -> Result<(), BnError> {
        self.backward_step(|bn, sums, buffers| {
            bn.ops.backward_train::<S>(x, dy, shape, dx, tail, dresidual, bn.saved(), sums, buffers)
        })
    }

    fn backward_frozen<S: Spec>(
        &mut self,
        x: &[E],
        dy: &[E],
        shape: &[usize],
        dx: &mut [E],
        tail: Tail<'_, E>,
        dresidual: Option<&mut [E]>,
    ) -> Result<(), BnError> {
        self.backward_step(|bn, sums, buffers| {
            let running = bn.frozen().map(|k| (k, &bn.running.inv_std_p[..]));
            let (gamma, beta) = (&bn.gamma, &bn.beta);
            bn.ops
                .backward_frozen::<S>(x, dy, shape, dx, tail, dresidual, running, gamma, beta, sums, buffers)
        })
    }

    #[doc(hidden)]
    #[inline]
    pub fn forward_train_spec<S: Spec>(
        &mut self,
        x: &[E],
        shape: &[usize],
        y: &mut [E],
    ) -> Result<(), BnError> {
        self.train::<S>(x, shape, y, self.ops.activation_tail())
    }

    #[doc(hidden)]
    #[inline]
    pub fn forward_train_add_relu_spec<S: Spec>(
        &mut self,
        x: &[E],
        residual: &[E],
        shape: &[usize],
        y: &mut [E],
    ) -> Result<(), BnError> {
        self.train::<S>(x, shape, y, Tail::AddRelu(residual))
    }

    #[doc(hidden)]
    #[inline]
    pub fn forward_eval_spec<S: Spec>(&self, x: &[E], shape: &[usize], y: &mut [E]) -> Result<(), BnError> {
        self.eval::<S>(x, shape, y, self.ops.activation_tail())
    }

    #[doc(hidden)]
    #[inline]
    pub fn forward_eval_add_relu_spec<S: Spec>(
        &self,
        x: &[E],
        residual: &[E],
        shape: &[usize],
        y: &mut [E],
    ) -> Result<(), BnError> {
        self.eval::<S>(x, shape, y, Tail::AddRelu(residual))
    }

    #[doc(hidden)]
    #[inline]
    pub fn forward_eval_inplace_spec<S: Spec>(&self, xy: &mut [E], shape: &[usize]) -> Result<(), BnError> {
        self.ops.eval_inplace::<S>(xy, shape, self.frozen(), &self.gamma, &self.beta)
    }

    #[doc(hidden)]
    #[inline]
    pub fn backward_spec<S: Spec>(
        &mut self,
        x: &[E],
        dy: &[E],
        shape: &[usize],
        dx: &mut [E],
    ) -> Result<(), BnError> {
        self.backward_train::<S>(x, dy, shape, dx, self.ops.activation_tail(), None)
    }

    #[doc(hidden)]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub fn backward_add_relu_spec<S: Spec>(
        &mut self,
        x: &[E],
        residual: &[E],
        dy: &[E],
        shape: &[usize],
        dx: &mut [E],
        dresidual: &mut [E],
    ) -> Result<(), BnError> {
        self.backward_train::<S>(x, dy, shape, dx, Tail::AddRelu(residual), Some(dresidual))
    }

    #[doc(hidden)]
    #[inline]
    pub fn backward_eval_spec<S: Spec>(
        &mut self,
        x: &[E],
        dy: &[E],
        shape: &[usize],
        dx: &mut [E],
    ) -> Result<(), BnError> {
        self.backward_frozen::<S>(x, dy, shape, dx, self.ops.activation_tail(), None)
    }

    #[doc(hidden)]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub fn backward_eval_add_relu_spec<S: Spec>(
        &mut self,
        x: &[E],
        residual: &[E],
        dy: &[E],
        shape: &[usize],
        dx: &mut [E],
        dresidual: &mut [E],
    ) -> Result<(), BnError> {
        self.backward_frozen::<S>(x, dy, shape, dx, Tail::AddRelu(residual), Some(dresidual))
    }
}
