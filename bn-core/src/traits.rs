//! The trait every layer implements: the `#[batch_norm]` layers and [`BatchNorm`](crate::BatchNorm).

use crate::{BatchNorm, BnError, Config, Element, Layout, StatsGroup};

/// The methods of a batch-normalization layer, implemented by every `#[batch_norm]` layer and by
/// the runtime-generic [`BatchNorm`]. Code generic over layers (a model, a benchmark, a
/// checkpoint loader) takes `impl BatchNormLayer`.
///
/// The layers also have these methods as inherent methods, so calling them needs no import.
///
/// ```
/// use batchnorm::{BatchNorm, BatchNormLayer};
///
/// fn normalize_batch<L: BatchNormLayer<Elem = f32>>(layer: &mut L, x: &[f32], shape: &[usize]) -> Vec<f32> {
///     let mut y = vec![0.0; x.len()];
///     layer.forward_train(x, shape, &mut y).expect("valid batch");
///     y
/// }
/// let mut bn = BatchNorm::new(2, [0])?;
/// let y = normalize_batch(&mut bn, &[1.0, 10.0, 3.0, 30.0], &[2, 2]);
/// assert!((y[0] + 1.0).abs() < 1e-4 && (y[2] - 1.0).abs() < 1e-4);
/// # Ok::<(), batchnorm::BnError>(())
/// ```
pub trait BatchNormLayer {
    /// The element type of the data tensors.
    type Elem: Element;
    /// The type of the parameters and statistics.
    type Param: crate::Param;

    /// Number of features: the product of the feature extents (`gamma().len()`).
    fn features(&self) -> usize;
    /// Rank of the tensors the layer takes.
    fn rank(&self) -> usize;
    /// The layer's configuration.
    fn config(&self) -> &Config;
    /// The layer's layout: rank, feature axes and extents.
    fn layout(&self) -> &Layout;
    /// The runtime-generic layer behind this one (the layer itself for [`BatchNorm`]): code that
    /// extends every layer (synchronized statistics, fused epilogues) works on it.
    fn as_batch_norm(&self) -> &BatchNorm<Self::Elem>;
    /// The same, mutably. The layout of a layer never changes, so this cannot break a
    /// `#[batch_norm]` layer's compile-time shape.
    fn as_batch_norm_mut(&mut self) -> &mut BatchNorm<Self::Elem>;
    /// How many training batches have updated the running statistics (PyTorch's
    /// `num_batches_tracked`; see [`BatchNorm::num_batches_tracked`]).
    fn num_batches_tracked(&self) -> u64;
    /// Sets the number of training batches seen, as loaded from a checkpoint (see
    /// [`BatchNorm::set_num_batches_tracked`]).
    fn set_num_batches_tracked(&mut self, batches: u64);
    /// Training forward (see [`BatchNorm::forward_train`]).
    fn forward_train(
        &mut self,
        x: &[Self::Elem],
        shape: &[usize],
        y: &mut [Self::Elem],
    ) -> Result<(), BnError>;
    /// Inference forward (see [`BatchNorm::forward_eval`]).
    fn forward_eval(&self, x: &[Self::Elem], shape: &[usize], y: &mut [Self::Elem]) -> Result<(), BnError>;
    /// Inference forward in place (see [`BatchNorm::forward_eval_inplace`]).
    fn forward_eval_inplace(&self, xy: &mut [Self::Elem], shape: &[usize]) -> Result<(), BnError>;
    /// Backward of the last training forward (see [`BatchNorm::backward`]).
    fn backward(
        &mut self,
        x: &[Self::Elem],
        dy: &[Self::Elem],
        shape: &[usize],
        dx: &mut [Self::Elem],
    ) -> Result<(), BnError>;
    /// Backward of the inference forward (see [`BatchNorm::backward_eval`]).
    fn backward_eval(
        &mut self,
        x: &[Self::Elem],
        dy: &[Self::Elem],
        shape: &[usize],
        dx: &mut [Self::Elem],
    ) -> Result<(), BnError>;
    /// Training forward of a ResNet block's tail, `y = relu(bn(x) + residual)`, fused (see
    /// [`BatchNorm::forward_train_add_relu`]).
    fn forward_train_add_relu(
        &mut self,
        x: &[Self::Elem],
        residual: &[Self::Elem],
        shape: &[usize],
        y: &mut [Self::Elem],
    ) -> Result<(), BnError> {
        self.as_batch_norm_mut().forward_train_add_relu(x, residual, shape, y)
    }
    /// Inference forward of a ResNet block's tail, fused (see
    /// [`BatchNorm::forward_eval_add_relu`]).
    fn forward_eval_add_relu(
        &self,
        x: &[Self::Elem],
        residual: &[Self::Elem],
        shape: &[usize],
        y: &mut [Self::Elem],
    ) -> Result<(), BnError> {
        self.as_batch_norm().forward_eval_add_relu(x, residual, shape, y)
    }
    /// Backward of [`forward_train_add_relu`](Self::forward_train_add_relu) (see
    /// [`BatchNorm::backward_add_relu`]).
    fn backward_add_relu(
        &mut self,
        x: &[Self::Elem],
        residual: &[Self::Elem],
        dy: &[Self::Elem],
        shape: &[usize],
        dx: &mut [Self::Elem],
        dresidual: &mut [Self::Elem],
    ) -> Result<(), BnError> {
        self.as_batch_norm_mut().backward_add_relu(x, residual, dy, shape, dx, dresidual)
    }
    /// Backward of [`forward_eval_add_relu`](Self::forward_eval_add_relu) (see
    /// [`BatchNorm::backward_eval_add_relu`]).
    fn backward_eval_add_relu(
        &mut self,
        x: &[Self::Elem],
        residual: &[Self::Elem],
        dy: &[Self::Elem],
        shape: &[usize],
        dx: &mut [Self::Elem],
        dresidual: &mut [Self::Elem],
    ) -> Result<(), BnError> {
        self.as_batch_norm_mut().backward_eval_add_relu(x, residual, dy, shape, dx, dresidual)
    }
    /// The scale parameter.
    fn gamma(&self) -> &[Self::Param];
    /// The shift parameter.
    fn beta(&self) -> &[Self::Param];
    /// The running mean.
    fn running_mean(&self) -> &[Self::Param];
    /// The running variance.
    fn running_var(&self) -> &[Self::Param];
    /// The gradient of gamma from the last backward.
    fn gamma_grad(&self) -> &[Self::Param];
    /// The gradient of beta from the last backward.
    fn beta_grad(&self) -> &[Self::Param];
    /// Sets gamma and beta (see [`BatchNorm::update_params`]).
    fn update_params(&mut self, gamma: &[Self::Param], beta: &[Self::Param]) -> Result<(), BnError>;
    /// Sets the running statistics (see [`BatchNorm::set_running_stats`]).
    fn set_running_stats(&mut self, mean: &[Self::Param], var: &[Self::Param]) -> Result<(), BnError>;

    /// [`SyncBatchNormExt::forward_train_sync`](crate::SyncBatchNormExt::forward_train_sync),
    /// which a `#[batch_norm]` layer runs with its compile-time shape.
    #[doc(hidden)]
    fn __forward_train_sync(
        &mut self,
        x: &[Self::Elem],
        shape: &[usize],
        y: &mut [Self::Elem],
        group: &dyn StatsGroup,
    ) -> Result<(), BnError> {
        self.as_batch_norm_mut().forward_train_sync(x, shape, y, group)
    }

    /// [`SyncBatchNormExt::backward_sync`](crate::SyncBatchNormExt::backward_sync), as
    /// [`__forward_train_sync`](Self::__forward_train_sync).
    #[doc(hidden)]
    fn __backward_sync(
        &mut self,
        x: &[Self::Elem],
        dy: &[Self::Elem],
        shape: &[usize],
        dx: &mut [Self::Elem],
        group: &dyn StatsGroup,
    ) -> Result<(), BnError> {
        self.as_batch_norm_mut().backward_sync(x, dy, shape, dx, group)
    }
}

impl<E: Element> BatchNormLayer for BatchNorm<E> {
    type Elem = E;
    type Param = E::Param;

    fn features(&self) -> usize {
        BatchNorm::features(self)
    }
    fn rank(&self) -> usize {
        BatchNorm::rank(self)
    }
    fn config(&self) -> &Config {
        BatchNorm::config(self)
    }
    fn layout(&self) -> &Layout {
        BatchNorm::layout(self)
    }
    fn as_batch_norm(&self) -> &BatchNorm<E> {
        self
    }
    fn as_batch_norm_mut(&mut self) -> &mut BatchNorm<E> {
        self
    }
    fn num_batches_tracked(&self) -> u64 {
        BatchNorm::num_batches_tracked(self)
    }
    fn set_num_batches_tracked(&mut self, batches: u64) {
        BatchNorm::set_num_batches_tracked(self, batches)
    }
    fn forward_train(&mut self, x: &[E], shape: &[usize], y: &mut [E]) -> Result<(), BnError> {
        BatchNorm::forward_train(self, x, shape, y)
    }
    fn forward_eval(&self, x: &[E], shape: &[usize], y: &mut [E]) -> Result<(), BnError> {
        BatchNorm::forward_eval(self, x, shape, y)
    }
    fn forward_eval_inplace(&self, xy: &mut [E], shape: &[usize]) -> Result<(), BnError> {
        BatchNorm::forward_eval_inplace(self, xy, shape)
    }
    fn backward(&mut self, x: &[E], dy: &[E], shape: &[usize], dx: &mut [E]) -> Result<(), BnError> {
        BatchNorm::backward(self, x, dy, shape, dx)
    }
    fn backward_eval(&mut self, x: &[E], dy: &[E], shape: &[usize], dx: &mut [E]) -> Result<(), BnError> {
        BatchNorm::backward_eval(self, x, dy, shape, dx)
    }
    fn gamma(&self) -> &[E::Param] {
        BatchNorm::gamma(self)
    }
    fn beta(&self) -> &[E::Param] {
        BatchNorm::beta(self)
    }
    fn running_mean(&self) -> &[E::Param] {
        BatchNorm::running_mean(self)
    }
    fn running_var(&self) -> &[E::Param] {
        BatchNorm::running_var(self)
    }
    fn gamma_grad(&self) -> &[E::Param] {
        BatchNorm::gamma_grad(self)
    }
    fn beta_grad(&self) -> &[E::Param] {
        BatchNorm::beta_grad(self)
    }
    fn update_params(&mut self, gamma: &[E::Param], beta: &[E::Param]) -> Result<(), BnError> {
        BatchNorm::update_params(self, gamma, beta)
    }
    fn set_running_stats(&mut self, mean: &[E::Param], var: &[E::Param]) -> Result<(), BnError> {
        BatchNorm::set_running_stats(self, mean, var)
    }
}
