//! [`BatchNorm`]: burn-nn's `BatchNorm` (same configuration, fields, record and training rule)
//! running our kernels.

use burn::config::Config;
use burn::module::{Flag, Initializer, Module, Param, RunningState};
use burn::tensor::{assert_shape, Device, Tensor};

use crate::functional;

/// [`BatchNorm`] configuration, as burn-nn's `BatchNormConfig`, with one more option.
///
/// Used to create a [`BatchNorm`] layer with [`BatchNormConfig::init`].
#[derive(Config, Debug)]
pub struct BatchNormConfig {
    /// The number of features. Must be greater than zero.
    pub num_features: usize,
    /// A finite, positive value required for numerical stability. Default: 1e-5
    #[config(default = 1e-5)]
    pub epsilon: f64,
    /// A finite momentum in `[0, 1]` used to update the running statistics (the weight of the
    /// batch's statistics). Default: 0.1
    #[config(default = 0.1)]
    pub momentum: f64,
    /// Update the running variance with the unbiased batch variance (`n / (n - 1)` times the
    /// biased one), as PyTorch does. Default: `false`, burn's biased variance.
    #[config(default = false)]
    pub unbiased_running_var: bool,
}

/// Applies batch normalization over a tensor of shape `[batch_size, channels, ...]`, as
/// burn-nn's `BatchNorm`, on our fused kernels where the device and dtype allow
/// ([`functional::is_accelerated`]) and through burn's implementation everywhere else.
///
/// `Y = norm(X) * γ + β`, statistics over every axis but the channel axis.
///
/// The fields, their names and the record are burn-nn's: a module saved with
/// [`Module::save_file`] loads into either, and burn's PyTorch import maps `weight`, `bias`,
/// `running_mean` and `running_var` as it does for burn-nn.
///
/// Should be created using [`BatchNormConfig`].
#[derive(Module, Debug)]
pub struct BatchNorm {
    /// The learnable weight gamma.
    pub gamma: Param<Tensor<1>>,
    /// The learnable weight beta.
    pub beta: Param<Tensor<1>>,
    /// Whether training behavior is enabled for this layer.
    pub training: Param<Flag>,
    /// The running mean.
    pub running_mean: RunningState<Tensor<1>>,
    /// The running variance.
    pub running_var: RunningState<Tensor<1>>,
    /// Momentum used to update the metrics.
    pub momentum: f64,
    /// A value required for numerical stability.
    pub epsilon: f64,
    /// Whether the running variance is updated with the unbiased batch variance (PyTorch) rather
    /// than the biased one (burn). Configuration, not recorded.
    pub unbiased_running_var: bool,
}

impl BatchNormConfig {
    /// Initializes a new [batch norm](BatchNorm) module: gamma 1, beta 0, running mean 0,
    /// running variance 1, training enabled.
    ///
    /// # Panics
    ///
    /// As burn-nn: if `num_features` is zero, `epsilon` is not finite and positive, or
    /// `momentum` is not finite and within `[0, 1]`.
    pub fn init(&self, device: &Device) -> BatchNorm {
        assert!(self.num_features > 0, "num_features must be greater than zero.");
        assert!(self.epsilon.is_finite() && self.epsilon > 0.0, "epsilon must be finite and positive.");
        assert!(
            self.momentum.is_finite() && (0.0..=1.0).contains(&self.momentum),
            "momentum must be finite and within [0, 1]."
        );

        BatchNorm {
            gamma: Initializer::Ones.init([self.num_features], device),
            beta: Initializer::Zeros.init([self.num_features], device),
            training: Param::from_bool(true),
            running_mean: RunningState::new(Tensor::zeros([self.num_features], device)),
            running_var: RunningState::new(Tensor::ones([self.num_features], device)),
            momentum: self.momentum,
            epsilon: self.epsilon,
            unbiased_running_var: self.unbiased_running_var,
        }
    }
}

impl BatchNorm {
    /// Applies the forward pass on the input tensor.
    ///
    /// Training (batch statistics, running statistics updated) exactly when burn-nn trains: the
    /// input is on an autodiff device and the layer's `training` flag is enabled (not frozen);
    /// inference (running statistics) otherwise.
    ///
    /// # Shapes
    ///
    /// - `input`: ``[batch_size, num_features, ...]``
    /// - `output`: ``[batch_size, num_features, ...]``
    ///
    /// # Panics
    ///
    /// As burn-nn, if the input has rank < 2 or its second axis is not `num_features`. On our
    /// kernels also: when training on a batch whose statistics are not finite (a NaN or
    /// infinite input; burn-nn would return NaNs and write them into the running statistics),
    /// and when training with [`unbiased_running_var`](BatchNormConfig::unbiased_running_var)
    /// on a batch of one value per channel (PyTorch's error; its unbiased variance does not
    /// exist). In inference, for a negative or non-finite running variance. The running
    /// statistics are unchanged when it panics.
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let [num_features] = self.gamma.shape().dims();
        assert_shape!(input, [_, num_features, ..]);

        match input.device().is_autodiff() && self.training.is_enabled() {
            true => self.forward_train(input),
            false => self.forward_inference(input),
        }
    }

    fn forward_inference<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let device = input.device();
        let mean = self.running_mean.value().to_device(&device);
        let var = self.running_var.value().to_device(&device);
        functional::batch_norm(input, self.gamma.val(), self.beta.val(), mean, var, self.epsilon)
    }

    fn forward_train<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let device = input.device();
        let [channels] = self.gamma.shape().dims();
        let count = input.shape().num_elements() / channels;
        if self.unbiased_running_var && count < 2 {
            panic!(
                "bn-burn batch norm: expected more than 1 value per channel when training with the unbiased running variance, got input size {:?}",
                input.dims()
            );
        }

        let result = functional::batch_norm_train(input, self.gamma.val(), self.beta.val(), self.epsilon);

        let variance_factor = match self.unbiased_running_var {
            true => count as f64 / (count - 1) as f64,
            false => 1.0,
        };
        let on_device = |t: Tensor<1>| if t.device() == device { t } else { t.to_device(&device) };
        let (running_mean, running_var) = functional::update_running_stats(
            on_device(self.running_mean.value_sync()),
            on_device(self.running_var.value_sync()),
            result.mean,
            result.variance,
            self.momentum,
            variance_factor,
        );

        self.running_mean.update(running_mean);
        self.running_var.update(running_var);

        result.output
    }
}
