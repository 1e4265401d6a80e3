//! Batch normalization without a layer's state: the passes as functions of their inputs.
//!
//! [`BatchNormOps`] holds only what does not change between calls (the [`Layout`], the
//! [`Config`] and the backend); gamma, beta and the running statistics are arguments, and the
//! training forward returns the batch statistics its backward takes back ([`BatchStats`]).
//! That is what a framework's autodiff needs: a module applied twice in one graph keeps one
//! `BatchStats` per application, where a layer would keep only the last.
//!
//! The passes run the same kernels, with the same validation and errors, as
//! [`BatchNorm`](crate::BatchNorm), which is built on them: for the same inputs both give the
//! same bits. The element type is `f32`, `f64`, `bf16` or `f16` ([`Element`]); parameters and
//! statistics are in its [`Element::Param`] type.
//!
//! ```
//! use batchnorm::ops::BatchNormOps;
//! use batchnorm::{Config, Layout, Preset};
//!
//! // NCHW with 2 channels, PyTorch's defaults.
//! let ops = BatchNormOps::<f32>::new(Layout::from_axes(&[2], &[0, 2, 3])?, Config::preset(Preset::Pytorch))?;
//! let shape = [2, 2, 1, 3];
//! let x: Vec<f32> = (0..12).map(|i| i as f32).collect();
//! let (gamma, beta) = ([1.0, 2.0], [0.0, 0.5]);
//! let mut y = vec![0.0; 12];
//! let stats = ops.forward_train(&x, &shape, &gamma, &beta, &mut y)?;
//! assert_eq!(stats.mean(), &[4.0, 7.0]);
//!
//! // The running statistics are the caller's: update them from the batch's.
//! let (mut running_mean, mut running_var) = ([0.0; 2], [1.0; 2]);
//! ops.update_running_stats(&stats, &mut running_mean, &mut running_var, 0)?;
//!
//! // The backward of that forward: dx, dgamma and dbeta in one call.
//! let dy = vec![1.0; 12];
//! let (mut dx, mut dgamma, mut dbeta) = (vec![0.0; 12], [0.0; 2], [0.0; 2]);
//! ops.backward(&x, &dy, &shape, &stats, &gamma, &beta, &mut dx, &mut dgamma, &mut dbeta)?;
//! assert_eq!(dbeta, [6.0, 6.0]);
//!
//! // Inference with the running statistics.
//! ops.forward_eval(&x, &shape, &running_mean, &running_var, &gamma, &beta, &mut y)?;
//! # Ok::<(), batchnorm::BnError>(())
//! ```

pub(crate) mod backward;
mod buffer;
mod check;
mod eval;
mod setup;
mod train;

pub(crate) use check::{check_len, check_running};
pub(crate) use eval::Coefficients;
pub(crate) use train::update_running;

pub use buffer::{output_buffer, HUGE_PAGE_MIN};
pub use setup::{BatchNormOps, BatchStats};

use crate::spec::Dynamic;
use crate::{BnError, Element};

impl<E: Element> BatchNormOps<E> {
    /// The training forward: `y` normalized with the batch's statistics (and the configured
    /// activation), which are returned for the backward and for
    /// [`update_running_stats`](Self::update_running_stats).
    ///
    /// # Errors
    ///
    /// As [`BatchNorm::forward_train`](crate::BatchNorm::forward_train), and
    /// [`BnError::ParamLength`] / [`BnError::NonFinite`] for a gamma or beta of the wrong length
    /// or with a non-finite value, [`BnError::FixedParameter`] for one the configuration fixes
    /// (`scale` or `center` off) that is not 1 or 0. `y` is unspecified after an error.
    pub fn forward_train(
        &self,
        x: &[E],
        shape: &[usize],
        gamma: &[E::Param],
        beta: &[E::Param],
        y: &mut [E],
    ) -> Result<BatchStats, BnError> {
        self.check_params(gamma, beta)?;
        let mut stats = BatchStats::zeroed(self.layout.channels())?;
        self.train::<Dynamic>(x, shape, y, self.activation_tail(), gamma, beta, &mut stats)?;
        Ok(stats)
    }

    /// Folds a training forward's statistics into running statistics as the layer does
    /// (momentum, cumulative average, biased or unbiased variance): `num_batches_tracked` is the
    /// count before this batch (for the cumulative average). Does nothing when the configuration
    /// does not track running statistics.
    ///
    /// # Errors
    ///
    /// [`BnError::ParamLength`] when a buffer does not hold one value per feature, and
    /// [`BnError::NonFinite`] when `stats` hold values the parameter type cannot (checked before
    /// anything is written).
    pub fn update_running_stats(
        &self,
        stats: &BatchStats,
        running_mean: &mut [E::Param],
        running_var: &mut [E::Param],
        num_batches_tracked: u64,
    ) -> Result<(), BnError> {
        let c = self.layout.channels();
        check_len("running_mean", running_mean, c)?;
        check_len("running_var", running_var, c)?;
        check_len("stats", &stats.mean, c)?;
        if !self.config.get_track_running_stats() {
            return Ok(());
        }
        let mut inv_std = vec![0.0; c];
        self.check_statistics_of(c, stats.count, &stats.mean, &stats.var, &mut inv_std, true)?;
        train::update_running(
            &self.config,
            self.backend(),
            stats.count,
            &stats.mean,
            &stats.var,
            running_mean,
            running_var,
            num_batches_tracked.saturating_add(1),
        );
        Ok(())
    }

    /// The inference forward: `y` normalized with the running statistics (or, when the
    /// configuration does not track them, with the batch's; the running ones are then unused).
    ///
    /// # Errors
    ///
    /// As [`BatchNorm::forward_eval`](crate::BatchNorm::forward_eval), and the errors of
    /// [`BatchNorm::update_params`](crate::BatchNorm::update_params) and
    /// [`BatchNorm::set_running_stats`](crate::BatchNorm::set_running_stats) for the parameters
    /// and running statistics.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_eval(
        &self,
        x: &[E],
        shape: &[usize],
        running_mean: &[E::Param],
        running_var: &[E::Param],
        gamma: &[E::Param],
        beta: &[E::Param],
        y: &mut [E],
    ) -> Result<(), BnError> {
        self.check_params(gamma, beta)?;
        let k = self.running_coefficients(running_mean, running_var, gamma)?;
        self.eval::<Dynamic>(x, shape, y, self.activation_tail(), k.as_ref().map(|k| k.frozen()), gamma, beta)
    }

    /// The backward of a training forward: `dx`, and the gradients of gamma and beta (zeros for
    /// a parameter the configuration fixes). `stats` are what that forward returned, `gamma`
    /// and `beta` what it was given.
    ///
    /// # Errors
    ///
    /// As [`BatchNorm::backward`](crate::BatchNorm::backward) ([`BnError::BackwardShape`] when
    /// `shape` is not the forward's), and [`BnError::ParamLength`] for buffers of the wrong
    /// length. Nothing is written on error.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        x: &[E],
        dy: &[E],
        shape: &[usize],
        stats: &BatchStats,
        gamma: &[E::Param],
        beta: &[E::Param],
        dx: &mut [E],
        dgamma: &mut [E::Param],
        dbeta: &mut [E::Param],
    ) -> Result<(), BnError> {
        self.check_params(gamma, beta)?;
        self.check_grads(dgamma, dbeta)?;
        check_len("stats", &stats.mean, self.layout.channels())?;
        let mut sums = BatchStats::zeroed(self.layout.channels())?;
        let mut scratch = backward::Buffers::default();
        let saved = backward::Saved { stats, gamma, beta };
        let tail = self.activation_tail();
        self.backward_train::<Dynamic>(x, dy, shape, dx, tail, None, Some(saved), &mut sums, &mut scratch)?;
        self.store_grads(&sums.mean, &sums.var, dgamma, dbeta);
        Ok(())
    }

    /// The backward of the inference forward with the same running statistics: `dx` and the
    /// gradients of gamma and beta, the statistics held constant. (When the configuration does
    /// not track running statistics, inference used the batch's: this is then the training
    /// backward of this batch.)
    ///
    /// # Errors
    ///
    /// As [`forward_eval`](Self::forward_eval), and [`BnError::ParamLength`] for gradient
    /// buffers of the wrong length. Nothing is written on error.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_eval(
        &self,
        x: &[E],
        dy: &[E],
        shape: &[usize],
        running_mean: &[E::Param],
        running_var: &[E::Param],
        gamma: &[E::Param],
        beta: &[E::Param],
        dx: &mut [E],
        dgamma: &mut [E::Param],
        dbeta: &mut [E::Param],
    ) -> Result<(), BnError> {
        self.check_params(gamma, beta)?;
        self.check_grads(dgamma, dbeta)?;
        let k = self.running_coefficients(running_mean, running_var, gamma)?;
        let mut sums = BatchStats::zeroed(self.layout.channels())?;
        let mut scratch = backward::Buffers::default();
        let frozen = k.as_ref().map(|k| (k.frozen(), &k.inv_std_p[..]));
        let tail = self.activation_tail();
        self.backward_frozen::<Dynamic>(
            x,
            dy,
            shape,
            dx,
            tail,
            None,
            frozen,
            gamma,
            beta,
            &mut sums,
            &mut scratch,
        )?;
        self.store_grads(&sums.mean, &sums.var, dgamma, dbeta);
        Ok(())
    }

    /// The inference coefficients of running statistics, checked (`None` when the
    /// configuration does not track them).
    fn running_coefficients(
        &self,
        running_mean: &[E::Param],
        running_var: &[E::Param],
        gamma: &[E::Param],
    ) -> Result<Option<Coefficients<E::Param>>, BnError> {
        let c = self.layout.channels();
        check_len("running_mean", running_mean, c)?;
        check_len("running_var", running_var, c)?;
        if !self.config.get_track_running_stats() {
            return Ok(None);
        }
        check_running(running_mean, running_var)?;
        let mut k = Coefficients::zeroed(c)?;
        k.mean.copy_from_slice(running_mean);
        k.refresh(&self.config, running_var, gamma);
        Ok(Some(k))
    }
}
