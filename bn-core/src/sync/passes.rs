//! The synchronized passes of the layer: the local partials, one exchange, the merge in rank
//! order, then the layer's own kernels with the global statistics.
//!
//! They see a layer only through its stateless passes ([`BatchNormOps`]), its parameters and
//! its saved statistics, and change it only through `train_step` and `backward_step`, which
//! commit a step when it succeeds and leave the layer unchanged when it fails.

use super::group::StatsGroup;
use super::moments::ChannelMoments;
use super::wire::{dtype_code, exchange, Header, Op};
use crate::element::route::{Route, Tail};
use crate::ops::backward::{mask_buffer, Buffers, Saved};
use crate::ops::{BatchNormOps, BatchStats};
use crate::spec::{specialize, Dynamic, Spec};
use crate::{BatchNorm, BatchNormLayer, BnError, Canonical, Element, RunningVar};

impl<E: Element> BatchNorm<E> {
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
        self.forward_train_sync_spec::<Dynamic, G>(x, shape, y, group)
    }

    #[doc(hidden)]
    #[inline]
    pub fn forward_train_sync_spec<S: Spec, G: StatsGroup + ?Sized>(
        &mut self,
        x: &[E],
        shape: &[usize],
        y: &mut [E],
        group: &G,
    ) -> Result<(), BnError> {
        self.train_step(|ops, gamma, beta, stats| {
            forward_train_sync::<S, E, G>(ops, gamma, beta, x, shape, y, group, stats)
        })
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
        self.backward_sync_spec::<Dynamic, G>(x, dy, shape, dx, group)
    }

    #[doc(hidden)]
    #[inline]
    pub fn backward_sync_spec<S: Spec, G: StatsGroup + ?Sized>(
        &mut self,
        x: &[E],
        dy: &[E],
        shape: &[usize],
        dx: &mut [E],
        group: &G,
    ) -> Result<(), BnError> {
        self.backward_step(|bn, sums, buffers| {
            backward_sync::<S, E, G>(bn.ops(), bn.saved(), x, dy, shape, dx, group, sums, buffers)
        })
    }
}

/// The header of this rank's message: what every rank must agree on.
fn sync_header<E: Element>(ops: &BatchNormOps<E>, shape: &[usize], dims: Canonical) -> Header {
    let c = ops.config();
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
        batch_axis: ops.layout().reduced_axes()[0],
        first_feature_axis: ops.layout().feature_axes().start,
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

/// The synchronized training forward into `stats` (see [`BatchNorm::forward_train_sync`]).
#[allow(clippy::too_many_arguments)]
fn forward_train_sync<S: Spec, E: Element, G: StatsGroup + ?Sized>(
    ops: &BatchNormOps<E>,
    gamma: &[E::Param],
    beta: &[E::Param],
    x: &[E],
    shape: &[usize],
    y: &mut [E],
    group: &G,
    stats: &mut BatchStats,
) -> Result<(), BnError> {
    let checked = ops.check(shape, &[("x", x.len()), ("y", y.len())]);
    let checked = checked.and_then(|dims| S::check_shape(shape).map(|()| specialize::<S>(dims)));
    let local = checked.map(|dims| {
        let payload = local_moments::<S, E>(ops, x, dims, stats);
        (sync_header(ops, shape, dims), payload)
    });
    let gathered = exchange(group, Op::Forward, local)?;
    // The exchange returned this rank's own error if its checks failed.
    let dims = specialize::<S>(ops.layout().canonical(shape)?);
    let c = dims.channels;
    // Rank order, on every rank: bit-identical results.
    for c in 0..c {
        let mut total = ChannelMoments::EMPTY;
        for (count, p) in gathered.counts.iter().zip(&gathered.payloads) {
            total = total.merge(ChannelMoments { count: *count, mean: p[c], m2: p[c + p.len() / 2] });
        }
        stats.mean[c] = total.mean;
        stats.var[c] = total.variance();
    }
    // Every partial passed `check_payload`, so Chan's merge of them cannot go negative; the
    // running variance must never take a negative value, whatever arrived.
    if let Some(c) = stats.var[..c].iter().position(|&v| v < 0.0) {
        return Err(BnError::SyncGroup(format!(
            "the merged variance of feature {c} is negative ({})",
            stats.var[c]
        )));
    }
    let n: f64 = gathered.counts.iter().sum();
    if n == 0.0 || c == 0 {
        return Err(BnError::EmptyBatch { shape: gathered.global_shape });
    }
    if n < 2.0 {
        return Err(BnError::TooFewValues { shape: gathered.global_shape });
    }
    let track = ops.config().get_track_running_stats();
    ops.check_statistics_of(c, n, &stats.mean, &stats.var, &mut stats.inv_std, track)?;
    // Validated: from here on nothing fails.
    let backend = ops.backend();
    let tail = ops.activation_tail();
    let (mean, inv_std) = (&stats.mean, &stats.inv_std);
    let reference_y = !dims.is_empty()
        && E::Route::normalize_trained::<S>(backend, x, y, tail, dims, mean, inv_std, gamma, beta);
    stats.shape.clear();
    stats.shape.extend_from_slice(shape);
    stats.count = n;
    stats.backend = backend;
    stats.reference_y = reference_y;
    Ok(())
}

/// This rank's message payload: the mean and the sum of squared deviations of each feature
/// (zeros for an empty shard), computed into `stats.mean` and `stats.var`.
fn local_moments<S: Spec, E: Element>(
    ops: &BatchNormOps<E>,
    x: &[E],
    dims: Canonical,
    stats: &mut BatchStats,
) -> Vec<f64> {
    let c = dims.channels;
    let n = dims.per_channel();
    let (mean, var) = (&mut stats.mean[..c], &mut stats.var[..c]);
    if n == 0 {
        mean.fill(0.0);
        var.fill(0.0);
    } else {
        E::Route::batch_stats::<S>(ops.backend(), x, dims, mean, var);
    }
    let mut payload = Vec::with_capacity(2 * c);
    payload.extend_from_slice(mean);
    payload.extend(var.iter().map(|v| v * n as f64));
    payload
}

/// The synchronized backward: `dx` and the group's sums into `sums.mean` and `sums.var` (see
/// [`BatchNorm::backward_sync`]).
#[allow(clippy::too_many_arguments)]
fn backward_sync<S: Spec, E: Element, G: StatsGroup + ?Sized>(
    ops: &BatchNormOps<E>,
    saved: Option<Saved<'_, E::Param>>,
    x: &[E],
    dy: &[E],
    shape: &[usize],
    dx: &mut [E],
    group: &G,
    sums: &mut BatchStats,
    buffers: &mut Buffers<E>,
) -> Result<(), BnError> {
    let checked = ops.check(shape, &[("x", x.len()), ("dy", dy.len()), ("dx", dx.len())]).and_then(|dims| {
        S::check_shape(shape)?;
        let dims = specialize::<S>(dims);
        let saved = saved.ok_or(BnError::NoForward)?;
        if saved.stats.shape != shape {
            return Err(BnError::BackwardShape { expected: saved.stats.shape.clone(), got: shape.to_vec() });
        }
        Ok((dims, saved))
    });
    // With a fused ReLU, the gradient that reaches the normalization is dy masked by the
    // forward's y > 0 (recomputed from x with that forward's arithmetic).
    let dy: &[E] = match (&checked, ops.activation_tail()) {
        (Ok((dims, saved)), Tail::Relu) => {
            let masked = mask_buffer(&mut buffers.grad, None, dims.len());
            let coefficients = &mut buffers.coefficients;
            E::Route::train_mask::<S>(x, dy, None, masked, *dims, saved.trained(), coefficients);
            masked
        }
        _ => dy,
    };
    let local = checked
        .map(|(dims, saved)| (sync_header(ops, shape, dims), local_sums::<S, E>(ops, x, dy, dims, saved)));
    let gathered = exchange(group, Op::Backward, local)?;
    // The exchange returned this rank's own error if its checks failed.
    let dims = specialize::<S>(ops.layout().canonical(shape)?);
    let saved = saved.ok_or(BnError::NoForward)?;
    let c = dims.channels;
    let (sum_dy, sum_dy_xhat) = (&mut sums.mean[..c], &mut sums.var[..c]);
    sum_dy.fill(0.0);
    sum_dy_xhat.fill(0.0);
    for p in &gathered.payloads {
        for i in 0..c {
            sum_dy[i] += p[i];
            sum_dy_xhat[i] += p[c + i];
        }
    }
    let n: f64 = gathered.counts.iter().sum();
    if n != saved.stats.count {
        return Err(BnError::SyncMismatch {
            rank: group.rank(),
            message: format!(
                "differentiates a forward of {} values per feature but the group's batch has {n}: \
                 backward_sync must follow forward_train_sync over the same group",
                saved.stats.count
            ),
        });
    }
    // Validated: from here on nothing fails.
    if !dims.is_empty() {
        let (mean, inv_std) = (&saved.stats.mean, &saved.stats.inv_std);
        let backend = ops.backend();
        E::Route::backward_dx::<S>(
            backend,
            x,
            dy,
            dx,
            dims,
            n,
            mean,
            inv_std,
            saved.gamma,
            sum_dy,
            sum_dy_xhat,
        );
    }
    Ok(())
}

/// This rank's backward payload: the sums of `dy` and `dy * xhat` of each feature.
fn local_sums<S: Spec, E: Element>(
    ops: &BatchNormOps<E>,
    x: &[E],
    dy: &[E],
    dims: Canonical,
    saved: Saved<'_, E::Param>,
) -> Vec<f64> {
    let c = dims.channels;
    let (mut sum_dy, mut sum_dy_xhat) = (vec![0.0; c], vec![0.0; c]);
    if !dims.is_empty() {
        let (mean, inv_std) = (&saved.stats.mean, &saved.stats.inv_std);
        E::Route::backward_sums::<S>(
            ops.backend(),
            x,
            dy,
            dims,
            mean,
            inv_std,
            &mut sum_dy,
            &mut sum_dy_xhat,
        );
    }
    sum_dy.extend(sum_dy_xhat);
    sum_dy
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
        self.__forward_train_sync(x, shape, y, &group)
    }

    fn backward_sync<G: StatsGroup + ?Sized>(
        &mut self,
        x: &[Self::Elem],
        dy: &[Self::Elem],
        shape: &[usize],
        dx: &mut [Self::Elem],
        group: &G,
    ) -> Result<(), BnError> {
        self.__backward_sync(x, dy, shape, dx, &group)
    }
}
