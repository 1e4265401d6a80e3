//! The synchronized passes of the layer: the local partials, one exchange, the merge in rank
//! order, then the layer's own kernels with the global statistics.

use super::group::StatsGroup;
use super::moments::ChannelMoments;
use super::wire::{dtype_code, exchange, Header, Op};
use crate::kernels::{self, reference};
use crate::layer::{Scratch, Tail};
use crate::spec::Dynamic;
use crate::{BatchNorm, BatchNormLayer, BnError, Canonical, Element, Param, RunningVar};

impl<E: Element> BatchNorm<E> {
    /// This layer's handshake for a call with `shape` (already validated) of `dims`.
    fn sync_header(&self, shape: &[usize], dims: Canonical) -> Header {
        let c = &self.config;
        let momentum = if c.get_cumulative_momentum() { -1.0 } else { c.get_momentum() };
        let running_var = match c.get_running_var() {
            RunningVar::Biased => 0.0,
            RunningVar::Unbiased => 1.0,
        };
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        Header {
            channels: dims.channels,
            count: dims.per_channel() as f64,
            shape: shape.to_vec(),
            batch_axis: self.layout().reduced_axes()[0],
            first_feature_axis: self.layout().feature_axes().start,
            dtype: dtype_code(E::NAME),
            config: [
                c.get_eps(),
                momentum,
                running_var,
                flag(c.get_center()),
                flag(c.get_scale()),
                flag(c.get_track_running_stats()),
            ],
        }
    }

    /// Synchronized training forward: normalizes this rank's shard `x` (of shape `shape`) with
    /// the statistics of the whole group's batch, into `y`; updates the running statistics from
    /// them (the unbiased correction uses the global count) and saves them for
    /// [`backward_sync`](Self::backward_sync). Every rank of `group` must call it together;
    /// all get bit-identical statistics.
    ///
    /// Shards may differ only in the extent of the batch axis (the first reduced axis), which
    /// may be 0 on some ranks; the whole batch needs at least two values per feature. Errors:
    /// those of [`forward_train`](Self::forward_train) (about the whole batch where it applies:
    /// [`BnError::TooFewValues`], [`BnError::NonFinite`]), [`BnError::SyncMismatch`] when ranks
    /// disagree or another rank failed, [`BnError::SyncGroup`]. After an `Err` the layer is
    /// unchanged, on every rank.
    ///
    /// ```
    /// use batchnorm::sync::LocalGroup;
    /// use batchnorm::BatchNorm;
    /// let mut bn = BatchNorm::new(2, [0])?;
    /// let (x, mut y) = ([1.0, 10.0, 3.0, 30.0], [0.0; 4]);
    /// bn.forward_train_sync(&x, &[2, 2], &mut y, &LocalGroup)?;
    /// assert_eq!(bn.num_batches_tracked(), 1);
    /// assert!((bn.running_mean()[1] - 2.0).abs() < 1e-6); // 0.9 * 0 + 0.1 * 20
    /// # Ok::<(), batchnorm::BnError>(())
    /// ```
    pub fn forward_train_sync<G: StatsGroup + ?Sized>(
        &mut self,
        x: &[E],
        shape: &[usize],
        y: &mut [E],
        group: &G,
    ) -> Result<(), BnError> {
        let mut scratch = core::mem::take(&mut self.scratch);
        let result = self.forward_train_sync_with(x, shape, y, group, &mut scratch);
        self.scratch = scratch;
        result
    }

    fn forward_train_sync_with<G: StatsGroup + ?Sized>(
        &mut self,
        x: &[E],
        shape: &[usize],
        y: &mut [E],
        group: &G,
        scratch: &mut Scratch,
    ) -> Result<(), BnError> {
        let checked = self.check(shape, &[("x", x.len()), ("y", y.len())]);
        let local = checked.map(|dims| {
            let payload = self.local_moments(x, dims, scratch);
            (self.sync_header(shape, dims), payload)
        });
        let gathered = exchange(group, Op::Forward, local)?;
        // The exchange returned this rank's own error if its checks failed.
        let dims = self.layout().canonical(shape)?;
        let c = dims.channels;
        // Rank order, on every rank: bit-identical results.
        for c in 0..c {
            let mut total = ChannelMoments::EMPTY;
            for (count, p) in gathered.counts.iter().zip(&gathered.payloads) {
                total = total.merge(ChannelMoments { count: *count, mean: p[c], m2: p[c + p.len() / 2] });
            }
            scratch.mean[c] = total.mean;
            scratch.var[c] = total.variance();
        }
        // Every partial passed `check_payload`, so Chan's merge of them cannot go negative; the
        // running variance must never take a negative value, whatever arrived.
        if let Some(c) = scratch.var[..c].iter().position(|&v| v < 0.0) {
            return Err(BnError::SyncGroup(format!(
                "the merged variance of feature {c} is negative ({})",
                scratch.var[c]
            )));
        }
        let n: f64 = gathered.counts.iter().sum();
        if n == 0.0 || c == 0 {
            return Err(BnError::EmptyBatch { shape: gathered.global_shape });
        }
        if n < 2.0 {
            return Err(BnError::TooFewValues { shape: gathered.global_shape });
        }
        let track = self.config.get_track_running_stats();
        self.check_statistics_of(c, n, &scratch.mean, &scratch.var, &mut scratch.inv_std, track)?;
        // Validated: from here on nothing fails.
        let reference_y = if dims.is_empty() { false } else { self.normalize_shard(x, y, dims, scratch) };
        self.commit_train(scratch, n, shape, self.backend(), reference_y);
        Ok(())
    }

    /// The local partials: `[mean (C), m2 (C)]` of this shard (zeros when it is empty), with the
    /// mean and variance left in `scratch`.
    fn local_moments(&self, x: &[E], dims: Canonical, scratch: &mut Scratch) -> Vec<f64> {
        let c = dims.channels;
        let n = dims.per_channel();
        let (mean, var) = (&mut scratch.mean[..c], &mut scratch.var[..c]);
        if n == 0 {
            mean.fill(0.0);
            var.fill(0.0);
        } else {
            match E::slice_as_f32(x) {
                Some(x32) => {
                    kernels::batch_stats::<Dynamic>(self.backend(), x32, dims, mean, var);
                    // The fast kernels sum squared deviations in f32 within a block, which can
                    // overflow where the variance fits: the f64 reference decides (as in
                    // `forward_train`).
                    if mean.iter().chain(var.iter()).any(|v| !v.is_finite()) {
                        reference::batch_stats(x, dims, mean, var);
                    }
                }
                None => reference::batch_stats(x, dims, mean, var),
            }
        }
        let mut payload = Vec::with_capacity(2 * c);
        payload.extend_from_slice(mean);
        payload.extend(var.iter().map(|v| v * n as f64));
        payload
    }

    /// `y` of the shard with the global statistics in `scratch`, and the layer's activation.
    /// Returns whether the reference kernels' formula computed it (else the fast kernels' with
    /// [`kernels::train_coefficients`], which a fused ReLU's backward recomputes).
    fn normalize_shard(&self, x: &[E], y: &mut [E], dims: Canonical, scratch: &Scratch) -> bool {
        let c = dims.channels;
        let p32 = E::Param::slice_as_f32;
        let tail = self.activation_tail();
        match (E::slice_as_f32(x), E::slice_as_f32_mut(y), p32(&self.gamma), p32(&self.beta), tail.epilogue())
        {
            (Some(x), Some(y), Some(gamma), Some(beta), Some(epilogue)) => {
                // The fast kernels' transform: y = (x - m) * s + t, m the mean rounded to f32
                // and t absorbing that rounding.
                let (mut m, mut s, mut t) = (vec![0.0f32; c], vec![0.0f32; c], vec![0.0f32; c]);
                for i in 0..c {
                    (m[i], s[i], t[i]) =
                        kernels::train_coefficients(scratch.mean[i], scratch.inv_std[i], gamma[i], beta[i]);
                }
                kernels::normalize_fused_helped::<Dynamic>(self.backend(), x, y, epilogue, dims, &m, &s, &t);
                false
            }
            _ => {
                let affine = reference::Affine {
                    mean: &scratch.mean[..c],
                    inv_std: &scratch.inv_std[..c],
                    gamma: &self.gamma,
                    beta: &self.beta,
                };
                reference::normalize(x, y, dims, affine);
                tail.apply(y);
                true
            }
        }
    }

    /// Synchronized backward of the last [`forward_train_sync`](Self::forward_train_sync):
    /// combines `sum(dy)` and `sum(dy * xhat)` over the group (in rank order, bit-identical on
    /// every rank), writes this shard's `dx` (with the global count) and stores the global
    /// sums as `gamma_grad()` / `beta_grad()`. Every rank must call it together, with the shape
    /// of its last synchronized forward.
    ///
    /// Errors: those of [`backward`](Self::backward), [`BnError::SyncMismatch`] when ranks
    /// disagree, another rank failed, or the last forward was not synchronized over this group,
    /// and [`BnError::SyncGroup`]. After an `Err` the layer is unchanged.
    ///
    /// ```
    /// use batchnorm::sync::LocalGroup;
    /// use batchnorm::BatchNorm;
    /// let mut bn = BatchNorm::new(1, [0])?;
    /// let (x, mut y, mut dx) = ([1.0, 3.0], [0.0; 2], [0.0; 2]);
    /// bn.forward_train_sync(&x, &[2, 1], &mut y, &LocalGroup)?;
    /// bn.backward_sync(&x, &[1.0, 1.0], &[2, 1], &mut dx, &LocalGroup)?;
    /// assert_eq!(bn.beta_grad(), &[2.0]);
    /// assert!(dx.iter().all(|d| d.abs() < 1e-6)); // a constant dy has no gradient through x
    /// # Ok::<(), batchnorm::BnError>(())
    /// ```
    pub fn backward_sync<G: StatsGroup + ?Sized>(
        &mut self,
        x: &[E],
        dy: &[E],
        shape: &[usize],
        dx: &mut [E],
        group: &G,
    ) -> Result<(), BnError> {
        let mut grad = core::mem::take(&mut self.grad);
        let result = self.backward_sync_with(x, dy, shape, dx, group, &mut grad);
        self.grad = grad;
        result
    }

    /// [`backward_sync`](Self::backward_sync), with the layer's buffer for a fused ReLU's
    /// masked gradient taken out.
    fn backward_sync_with<G: StatsGroup + ?Sized>(
        &mut self,
        x: &[E],
        dy: &[E],
        shape: &[usize],
        dx: &mut [E],
        group: &G,
        grad: &mut Vec<E>,
    ) -> Result<(), BnError> {
        let checked =
            self.check(shape, &[("x", x.len()), ("dy", dy.len()), ("dx", dx.len())]).and_then(|dims| {
                if !self.saved.valid {
                    return Err(BnError::NoForward);
                }
                if self.saved.shape != shape {
                    return Err(BnError::BackwardShape {
                        expected: self.saved.shape.clone(),
                        got: shape.to_vec(),
                    });
                }
                Ok(dims)
            });
        // With a fused ReLU, the gradient that reaches the normalization is dy masked by the
        // forward's y > 0 (recomputed from x with that forward's arithmetic).
        let tail = self.activation_tail();
        let dy: &[E] = match (&checked, tail) {
            (Ok(dims), Tail::Relu) => {
                let masked = Self::mask_buffer(grad, None, dims.len());
                let mut coefficients = Vec::new();
                self.train_mask::<Dynamic>(x, dy, masked, *dims, tail, &mut coefficients);
                masked
            }
            _ => dy,
        };
        let local = checked.map(|dims| (self.sync_header(shape, dims), self.local_sums(x, dy, dims)));
        let gathered = exchange(group, Op::Backward, local)?;
        // The exchange returned this rank's own error if its checks failed.
        let dims = self.layout().canonical(shape)?;
        let c = dims.channels;
        let (mut sum_dy, mut sum_dy_xhat) = (vec![0.0; c], vec![0.0; c]);
        for p in &gathered.payloads {
            for i in 0..c {
                sum_dy[i] += p[i];
                sum_dy_xhat[i] += p[c + i];
            }
        }
        let n: f64 = gathered.counts.iter().sum();
        if n != self.saved.count {
            return Err(BnError::SyncMismatch {
                rank: group.rank(),
                message: format!(
                    "differentiates a forward of {} values per feature but the group's batch has {n}: \
                     backward_sync must follow forward_train_sync over the same group",
                    self.saved.count
                ),
            });
        }
        // Validated: from here on nothing fails.
        if !dims.is_empty() {
            let saved = &self.saved;
            match (E::slice_as_f32(x), E::slice_as_f32(dy), E::slice_as_f32_mut(dx), p32(&saved.gamma)) {
                (Some(x), Some(dy), Some(dx), Some(gamma)) => kernels::backward_dx::<Dynamic>(
                    self.backend(),
                    x,
                    dy,
                    dx,
                    dims,
                    n,
                    &saved.mean,
                    &saved.inv_std,
                    gamma,
                    &sum_dy,
                    &sum_dy_xhat,
                ),
                _ => reference::backward_train_dx_with_count(
                    x,
                    dy,
                    dx,
                    dims,
                    n,
                    &saved.mean,
                    &saved.inv_std,
                    &saved.gamma,
                    &sum_dy,
                    &sum_dy_xhat,
                ),
            }
        }
        self.store_grads(&sum_dy, &sum_dy_xhat);
        Ok(())
    }

    /// The local backward sums `[sum(dy) (C), sum(dy * xhat) (C)]` with the saved statistics.
    fn local_sums(&self, x: &[E], dy: &[E], dims: Canonical) -> Vec<f64> {
        let c = dims.channels;
        let (mut sum_dy, mut sum_dy_xhat) = (vec![0.0; c], vec![0.0; c]);
        if !dims.is_empty() {
            let (mean, inv_std) = (&self.saved.mean, &self.saved.inv_std);
            match (E::slice_as_f32(x), E::slice_as_f32(dy)) {
                (Some(x), Some(dy)) => kernels::backward_sums::<Dynamic>(
                    self.backend(),
                    x,
                    dy,
                    dims,
                    mean,
                    inv_std,
                    &mut sum_dy,
                    &mut sum_dy_xhat,
                ),
                _ => reference::backward_sums(x, dy, dims, mean, inv_std, &mut sum_dy, &mut sum_dy_xhat),
            }
        }
        sum_dy.extend(sum_dy_xhat);
        sum_dy
    }
}

fn p32<P: Param>(values: &[P]) -> Option<&[f32]> {
    P::slice_as_f32(values)
}

/// Synchronized training for every layer: the `#[batch_norm]` layers and [`BatchNorm`] (through
/// [`BatchNormLayer::as_batch_norm_mut`]). See [`BatchNorm::forward_train_sync`] and
/// [`BatchNorm::backward_sync`].
///
/// ```
/// use batchnorm::sync::{LocalGroup, SyncBatchNormExt};
/// use batchnorm::{BatchNorm, BatchNormLayer};
///
/// fn step<L: BatchNormLayer<Elem = f32>>(layer: &mut L, x: &[f32], shape: &[usize]) -> Vec<f32> {
///     let mut y = vec![0.0; x.len()];
///     layer.forward_train_sync(x, shape, &mut y, &LocalGroup).expect("valid batch");
///     y
/// }
/// let mut bn = BatchNorm::new(1, [0])?;
/// assert!(step(&mut bn, &[0.0, 2.0], &[2, 1])[1] > 0.99);
/// # Ok::<(), batchnorm::BnError>(())
/// ```
pub trait SyncBatchNormExt: BatchNormLayer {
    /// See [`BatchNorm::forward_train_sync`].
    fn forward_train_sync<G: StatsGroup + ?Sized>(
        &mut self,
        x: &[Self::Elem],
        shape: &[usize],
        y: &mut [Self::Elem],
        group: &G,
    ) -> Result<(), BnError>;

    /// See [`BatchNorm::backward_sync`].
    fn backward_sync<G: StatsGroup + ?Sized>(
        &mut self,
        x: &[Self::Elem],
        dy: &[Self::Elem],
        shape: &[usize],
        dx: &mut [Self::Elem],
        group: &G,
    ) -> Result<(), BnError>;
}

impl<L: BatchNormLayer + ?Sized> SyncBatchNormExt for L {
    fn forward_train_sync<G: StatsGroup + ?Sized>(
        &mut self,
        x: &[Self::Elem],
        shape: &[usize],
        y: &mut [Self::Elem],
        group: &G,
    ) -> Result<(), BnError> {
        self.as_batch_norm_mut().forward_train_sync(x, shape, y, group)
    }

    fn backward_sync<G: StatsGroup + ?Sized>(
        &mut self,
        x: &[Self::Elem],
        dy: &[Self::Elem],
        shape: &[usize],
        dx: &mut [Self::Elem],
        group: &G,
    ) -> Result<(), BnError> {
        self.as_batch_norm_mut().backward_sync(x, dy, shape, dx, group)
    }
}
