//! The naive baseline: the NumPy reference `BatchNormalization` class, ported operation by operation to
//! ndarray.
//!
//! Every NumPy expression of that class becomes one ndarray expression that allocates its result,
//! as NumPy does: statistics with `mean_axis` / `var_axis` over the reduced axes, then
//! broadcasting `gamma * (x - mean) / sqrt(var + eps) + beta` with the parameters and statistics
//! reshaped to broadcast over the feature axes. Nothing is fused, reused or vectorized by hand:
//! this is the yardstick the speedups of the real layers are quoted against, so it must stay the
//! straightforward algorithm a user would otherwise write.
//!
//! It works for any layout: the feature axes may sit anywhere and there may be several of them
//! (the class's own example normalizes `(96, 55, 55)` over axis 0 with `(55, 55)` parameters).
//! Momentum is the weight of the old running value (the NumPy class's and Keras's convention).

use ndarray::{Array1, ArrayD, ArrayViewD, Axis, CowArray, Ix2, IxDyn};

/// What the NumPy class's `forward(training=True)` keeps for `backward`.
#[derive(Debug, Clone)]
struct Cache {
    /// `(x - mean) / std`, the full tensor.
    x_hat: ArrayD<f32>,
    /// `sqrt(var + eps)`, in the broadcast shape.
    std: ArrayD<f32>,
    /// gamma at the time of the forward, in the broadcast shape.
    gamma: ArrayD<f32>,
}

/// The NumPy class's batch normalization written with ndarray broadcasting (f32, like the benchmarks).
#[derive(Debug, Clone)]
pub struct NaiveBatchNorm {
    rank: usize,
    /// The reduced axes, ascending.
    reduced_axes: Vec<usize>,
    /// The kept axes, ascending; gamma has their extents.
    feature_axes: Vec<usize>,
    /// The extents of the feature axes (the shape of gamma, beta and the running statistics).
    feature_shape: Vec<usize>,
    /// The shape the parameters take to broadcast against x: 1 on every reduced axis.
    broadcast_shape: Vec<usize>,
    momentum: f32,
    eps: f32,
    unbiased: bool,
    gamma: ArrayD<f32>,
    beta: ArrayD<f32>,
    running_mean: ArrayD<f32>,
    running_var: ArrayD<f32>,
    dgamma: ArrayD<f32>,
    dbeta: ArrayD<f32>,
    cache: Option<Cache>,
}

/// Why a naive layer cannot be built: the axes do not describe a layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NaiveLayoutError(pub String);

impl std::fmt::Display for NaiveLayoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NaiveLayoutError {}

impl NaiveBatchNorm {
    /// A layer for tensors of shape `shape` (only the extents of the feature axes matter), with
    /// statistics over `reduced_axes`; gamma 1, beta 0, running mean 0, running variance 1.
    ///
    /// `momentum` is the weight of the old running value; `unbiased` updates the running
    /// variance with `var * n / (n - 1)` (PyTorch) instead of the biased `var` (the NumPy class, Keras).
    pub fn new(
        shape: &[usize],
        reduced_axes: &[usize],
        momentum: f64,
        eps: f64,
        unbiased: bool,
    ) -> Result<Self, NaiveLayoutError> {
        let rank = shape.len();
        let mut seen = vec![false; rank];
        for &a in reduced_axes {
            if a >= rank {
                return Err(NaiveLayoutError(format!("axis {a} is out of range for rank {rank}")));
            }
            if seen[a] {
                return Err(NaiveLayoutError(format!("axis {a} is given twice")));
            }
            seen[a] = true;
        }
        let mut reduced_axes = reduced_axes.to_vec();
        reduced_axes.sort_unstable();
        let feature_axes: Vec<usize> = (0..rank).filter(|&a| !seen[a]).collect();
        if reduced_axes.is_empty() || feature_axes.is_empty() {
            return Err(NaiveLayoutError(format!(
                "need at least one reduced and one feature axis, got reduced axes {reduced_axes:?} of rank {rank}"
            )));
        }
        let feature_shape: Vec<usize> = feature_axes.iter().map(|&a| shape[a]).collect();
        let broadcast_shape: Vec<usize> = (0..rank).map(|a| if seen[a] { 1 } else { shape[a] }).collect();
        let params = |v: f32| ArrayD::from_elem(IxDyn(&feature_shape), v);
        Ok(NaiveBatchNorm {
            rank,
            reduced_axes,
            feature_axes,
            broadcast_shape,
            momentum: momentum as f32,
            eps: eps as f32,
            unbiased,
            gamma: params(1.0),
            beta: params(0.0),
            running_mean: params(0.0),
            running_var: params(1.0),
            dgamma: params(0.0),
            dbeta: params(0.0),
            feature_shape,
            cache: None,
        })
    }

    /// The extents of the feature axes: the shape of gamma, beta and the running statistics.
    pub fn feature_shape(&self) -> &[usize] {
        &self.feature_shape
    }

    /// The scale parameter (feature shape).
    pub fn gamma(&self) -> &ArrayD<f32> {
        &self.gamma
    }

    /// The shift parameter (feature shape).
    pub fn beta(&self) -> &ArrayD<f32> {
        &self.beta
    }

    /// The running mean (feature shape).
    pub fn running_mean(&self) -> &ArrayD<f32> {
        &self.running_mean
    }

    /// The running variance (feature shape).
    pub fn running_var(&self) -> &ArrayD<f32> {
        &self.running_var
    }

    /// The gradient of gamma from the last `backward` (zeros before any).
    pub fn gamma_grad(&self) -> &ArrayD<f32> {
        &self.dgamma
    }

    /// The gradient of beta from the last `backward` (zeros before any).
    pub fn beta_grad(&self) -> &ArrayD<f32> {
        &self.dbeta
    }

    /// The NumPy class's `update_params`: gamma and beta as flat slices in row-major feature order.
    /// Returns `false` (and changes nothing) when a length is wrong.
    pub fn update_params(&mut self, gamma: &[f32], beta: &[f32]) -> bool {
        match (self.feature_array(gamma), self.feature_array(beta)) {
            (Some(g), Some(b)) => {
                self.gamma = g;
                self.beta = b;
                true
            }
            _ => false,
        }
    }

    /// Sets the running statistics from flat slices in row-major feature order. Returns `false`
    /// (and changes nothing) when a length is wrong.
    pub fn set_running_stats(&mut self, mean: &[f32], var: &[f32]) -> bool {
        match (self.feature_array(mean), self.feature_array(var)) {
            (Some(m), Some(v)) => {
                self.running_mean = m;
                self.running_var = v;
                true
            }
            _ => false,
        }
    }

    fn feature_array(&self, values: &[f32]) -> Option<ArrayD<f32>> {
        ArrayD::from_shape_vec(IxDyn(&self.feature_shape), values.to_vec()).ok()
    }

    /// A feature-shaped array reshaped to broadcast against x (1 on the reduced axes).
    fn broadcastable(&self, a: &ArrayD<f32>) -> ArrayD<f32> {
        a.to_shape(IxDyn(&self.broadcast_shape))
            .expect("feature arrays have the feature extents")
            .into_owned()
    }

    /// `a` seen as (reduced values, features): the reduced axes moved to the front and merged,
    /// the feature axes merged. Copies when the layout needs it, as NumPy's reductions over
    /// several axes do.
    fn as_rows<'a>(&self, a: &ArrayViewD<'a, f32>) -> CowArray<'a, f32, Ix2> {
        let order: Vec<usize> = self.reduced_axes.iter().chain(&self.feature_axes).copied().collect();
        let features: usize = self.feature_shape.iter().product();
        let n = a.len() / features.max(1);
        let moved = a.clone().permuted_axes(IxDyn(&order));
        if moved.is_standard_layout() {
            moved.into_shape_with_order((n, features)).expect("element count is n * features").into()
        } else {
            moved
                .as_standard_layout()
                .into_owned()
                .into_shape_with_order((n, features))
                .expect("element count is n * features")
                .into()
        }
    }

    /// `a.mean(axis=reduced_axes)` in the feature shape.
    fn mean(&self, a: &ArrayViewD<'_, f32>) -> ArrayD<f32> {
        let rows = self.as_rows(a);
        let mean: Array1<f32> = rows.mean_axis(Axis(0)).expect("the batch is not empty");
        mean.into_shape_with_order(IxDyn(&self.feature_shape)).expect("one value per feature")
    }

    /// `a.var(axis=reduced_axes)` (biased, as NumPy's default) in the feature shape.
    fn var(&self, a: &ArrayViewD<'_, f32>) -> ArrayD<f32> {
        let rows = self.as_rows(a);
        let var: Array1<f32> = rows.var_axis(Axis(0), 0.0);
        var.into_shape_with_order(IxDyn(&self.feature_shape)).expect("one value per feature")
    }

    /// `a.sum(axis=reduced_axes)` in the feature shape.
    fn sum(&self, a: &ArrayViewD<'_, f32>) -> ArrayD<f32> {
        let rows = self.as_rows(a);
        rows.sum_axis(Axis(0))
            .into_shape_with_order(IxDyn(&self.feature_shape))
            .expect("one value per feature")
    }

    /// Number of values each feature's statistics are taken over.
    fn per_feature(&self, x: &ArrayViewD<'_, f32>) -> usize {
        self.reduced_axes.iter().map(|&a| x.shape()[a]).product()
    }

    fn check_shape(&self, x: &ArrayViewD<'_, f32>) {
        assert_eq!(x.ndim(), self.rank, "naive baseline: rank mismatch");
        for (&a, &e) in self.feature_axes.iter().zip(&self.feature_shape) {
            assert_eq!(x.shape()[a], e, "naive baseline: feature extent mismatch on axis {a}");
        }
    }

    /// The NumPy class's `forward(X, training=True)`: normalizes with the batch statistics, updates the
    /// running statistics with momentum and caches what `backward` needs.
    ///
    /// Panics when `x` does not have the layer's rank and feature extents (it is a baseline, not
    /// an API: the callers in this crate pass the shapes they built it with).
    pub fn forward_train(&mut self, x: ArrayViewD<'_, f32>) -> ArrayD<f32> {
        self.check_shape(&x);
        let n = self.per_feature(&x) as f32;
        // mean = X.mean(axis=axes); var = X.var(axis=axes)
        let mean = self.mean(&x);
        let var = self.var(&x);
        // x_hat = (X - mean) / np.sqrt(var + eps)
        let mean_b = self.broadcastable(&mean);
        let std = self.broadcastable(&(&var + self.eps).mapv(f32::sqrt));
        let x_hat = (&x - &mean_b) / &std;
        // out = gamma * x_hat + beta
        let gamma = self.broadcastable(&self.gamma);
        let out = &gamma * &x_hat + &self.broadcastable(&self.beta);
        // running_mean = momentum * running_mean + (1 - momentum) * mean (same for var)
        let m = self.momentum;
        let batch_var = if self.unbiased { &var * (n / (n - 1.0)) } else { var };
        self.running_mean = &self.running_mean * m + &(&mean * (1.0 - m));
        self.running_var = &self.running_var * m + &(&batch_var * (1.0 - m));
        self.cache = Some(Cache { x_hat, std, gamma });
        out
    }

    /// The NumPy class's `forward(X, training=False)`: normalizes with the running statistics.
    ///
    /// Panics when `x` does not have the layer's rank and feature extents.
    pub fn forward_eval(&self, x: ArrayViewD<'_, f32>) -> ArrayD<f32> {
        self.check_shape(&x);
        // out = gamma * (X - running_mean) / np.sqrt(running_var + eps) + beta
        let mean_b = self.broadcastable(&self.running_mean);
        let std = self.broadcastable(&(&self.running_var + self.eps).mapv(f32::sqrt));
        let gamma = self.broadcastable(&self.gamma);
        let beta = self.broadcastable(&self.beta);
        &gamma * &((&x - &mean_b) / &std) + &beta
    }

    /// The textbook backward of the last `forward_train`, in the same style:
    /// `dbeta = sum(dy)`, `dgamma = sum(dy * x_hat)`,
    /// `dx = gamma / std * (dy - dbeta / n - x_hat * dgamma / n)`.
    ///
    /// Returns `None` when no training forward came before. Panics when `dy` does not have the
    /// shape of that forward's input.
    pub fn backward(&mut self, dy: ArrayViewD<'_, f32>) -> Option<ArrayD<f32>> {
        let cache = self.cache.as_ref()?;
        assert_eq!(dy.shape(), cache.x_hat.shape(), "naive baseline: dy must have the shape of x");
        let n = self.per_feature(&dy) as f32;
        // dbeta = dy.sum(axis=axes); dgamma = (dy * x_hat).sum(axis=axes)
        let dbeta = self.sum(&dy);
        let dy_xhat = &dy * &cache.x_hat;
        let dgamma = self.sum(&dy_xhat.view());
        // dx = gamma / std * (dy - dbeta / n - x_hat * dgamma / n)
        let dbeta_b = self.broadcastable(&dbeta);
        let dgamma_b = self.broadcastable(&dgamma);
        let dx =
            &(&cache.gamma / &cache.std) * &(&(&dy - &(&dbeta_b / n)) - &(&cache.x_hat * &(&dgamma_b / n)));
        self.dgamma = dgamma;
        self.dbeta = dbeta;
        Some(dx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_each_feature() {
        // NHWC-like (2, 2, 3): features on the last axis.
        let x = ArrayD::from_shape_vec(IxDyn(&[2, 2, 3]), (0..12).map(|i| (i * i) as f32).collect()).unwrap();
        let mut bn = NaiveBatchNorm::new(&[2, 2, 3], &[0, 1], 0.9, 1e-5, false).unwrap();
        let y = bn.forward_train(x.view());
        for c in 0..3 {
            let col: Vec<f32> = y.index_axis(Axis(2), c).iter().copied().collect();
            let mean = col.iter().sum::<f32>() / 4.0;
            let var = col.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 4.0;
            assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-3, "feature {c}: {mean} {var}");
        }
        let dx = bn.backward(y.view()).unwrap();
        assert_eq!(dx.shape(), &[2, 2, 3]);
    }

    #[test]
    fn rejects_bad_axes() {
        assert!(NaiveBatchNorm::new(&[2, 3], &[2], 0.9, 1e-5, false).is_err());
        assert!(NaiveBatchNorm::new(&[2, 3], &[0, 0], 0.9, 1e-5, false).is_err());
        assert!(NaiveBatchNorm::new(&[2, 3], &[0, 1], 0.9, 1e-5, false).is_err());
        assert!(NaiveBatchNorm::new(&[2, 3], &[0], 0.9, 1e-5, true)
            .unwrap()
            .backward(ArrayD::zeros(IxDyn(&[2, 3])).view())
            .is_none());
    }
}
