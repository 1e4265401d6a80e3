//! `BatchNorm`: candle-nn's module, run on the fused kernels.

use batchnorm::half::{bf16, f16};
use batchnorm::ops::BatchNormOps;
use batchnorm::{Config, Layout, Preset};
use candle_core::{DType, Result, Tensor, Var};

use crate::element::{candle_error, check_param_dtype, param_dtype, CandleElement};
use crate::op::{EvalOp, Pair, TrainOp};

/// Batch normalization over dim 1 of an `(N, C, ...)` tensor, with the API and semantics of
/// [`candle_nn::BatchNorm`], running on the fused kernels of [`batchnorm::ops`].
///
/// Build it with [`batch_norm`](crate::batch_norm) from a `VarBuilder` (the names `weight`,
/// `bias`, `running_mean`, `running_var`) or with the constructors below, and apply it with
/// [`ModuleT::forward_t`](candle_nn::ModuleT::forward_t): `train = true` normalizes with the
/// batch statistics and updates the running statistics (momentum in PyTorch's convention,
/// unbiased running variance), `train = false` normalizes with the running statistics.
///
/// The running statistics are candle [`Var`]s, updated in place with [`Var::set`] as candle-nn
/// does, so a `VarMap` saves the same state. Clones share them. See the
/// [crate documentation](crate) for what runs on the kernels and what falls back to candle-nn.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    /// candle-nn's module over the same variables: the state, and the fallback.
    inner: candle_nn::BatchNorm,
    remove_mean: bool,
    /// The kernels' configuration (eps, momentum, affine), validated when built.
    config: Config,
}

impl BatchNorm {
    /// Wraps candle-nn's module, checking that the kernels accept its eps and momentum.
    pub(crate) fn from_candle_nn(inner: candle_nn::BatchNorm, remove_mean: bool) -> Result<Self> {
        let (eps, momentum) = (inner.eps(), inner.momentum());
        if !(eps >= 0.0 && eps.is_finite()) {
            candle_core::bail!("batch-norm: eps must be a finite number >= 0, got {eps}")
        }
        if !(0.0..=1.0).contains(&momentum) {
            candle_core::bail!("batch-norm: momentum must be between 0 and 1, got {momentum}")
        }
        // The kernels take eps > 0 and a momentum in (0, 1]: eps = 0 runs them with the smallest
        // positive eps (and refuses a zero variance, see `TrainOp`), and momentum = 0 (running
        // statistics that never change) skips the update.
        let mut config =
            Config::preset(Preset::Pytorch).eps(if eps == 0.0 { f64::MIN_POSITIVE } else { eps });
        if momentum > 0.0 {
            config = config.torch_momentum(momentum);
        }
        if inner.weight_and_bias().is_none() {
            config = config.scale(false).center(false);
        }
        config.validate().map_err(candle_error)?;
        Ok(BatchNorm { inner, remove_mean, config })
    }

    /// A module with affine parameters, momentum 0.1 (as [`candle_nn::BatchNorm::new`]).
    ///
    /// # Errors
    ///
    /// When a tensor does not have shape `[num_features]` or eps is negative or not finite.
    pub fn new(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor,
        bias: Tensor,
        eps: f64,
    ) -> Result<Self> {
        let inner = candle_nn::BatchNorm::new(num_features, running_mean, running_var, weight, bias, eps)?;
        Self::from_candle_nn(inner, true)
    }

    /// A module without affine parameters, momentum 0.1 (as
    /// [`candle_nn::BatchNorm::new_no_bias`]).
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new).
    pub fn new_no_bias(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        eps: f64,
    ) -> Result<Self> {
        let inner = candle_nn::BatchNorm::new_no_bias(num_features, running_mean, running_var, eps)?;
        Self::from_candle_nn(inner, true)
    }

    /// A module with affine parameters and the given momentum (PyTorch's convention: the weight
    /// of the batch statistics, in `[0, 1]`).
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new), and for a momentum outside `[0, 1]`.
    pub fn new_with_momentum(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor,
        bias: Tensor,
        eps: f64,
        momentum: f64,
    ) -> Result<Self> {
        let inner = candle_nn::BatchNorm::new_with_momentum(
            num_features,
            running_mean,
            running_var,
            weight,
            bias,
            eps,
            momentum,
        )?;
        Self::from_candle_nn(inner, true)
    }

    /// A module without affine parameters, with the given momentum.
    ///
    /// # Errors
    ///
    /// As [`new_with_momentum`](Self::new_with_momentum).
    pub fn new_no_bias_with_momentum(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        eps: f64,
        momentum: f64,
    ) -> Result<Self> {
        let inner = candle_nn::BatchNorm::new_no_bias_with_momentum(
            num_features,
            running_mean,
            running_var,
            eps,
            momentum,
        )?;
        Self::from_candle_nn(inner, true)
    }

    /// The running mean (a variable: training updates it in place).
    pub fn running_mean(&self) -> &Tensor {
        self.inner.running_mean()
    }

    /// The running variance, unbiased (a variable: training updates it in place).
    pub fn running_var(&self) -> &Tensor {
        self.inner.running_var()
    }

    /// The epsilon added to the variance.
    pub fn eps(&self) -> f64 {
        self.inner.eps()
    }

    /// The momentum, PyTorch's convention: `running = (1 - momentum) * running + momentum * batch`.
    pub fn momentum(&self) -> f64 {
        self.inner.momentum()
    }

    /// The weight (gamma) and bias (beta), when the module is affine.
    pub fn weight_and_bias(&self) -> Option<(&Tensor, &Tensor)> {
        self.inner.weight_and_bias()
    }

    /// The training forward: normalizes `x` with its batch statistics (one fused kernel call,
    /// differentiable through the fused backward) and updates the running statistics.
    ///
    /// # Errors
    ///
    /// For an input of rank < 2 or with the wrong number of features at dim 1, fewer than 2
    /// values per feature, a non-finite batch mean or variance, a non-finite weight or bias, a
    /// dtype other than f32, f64, bf16 or f16, or parameters of another dtype (16-bit input also
    /// takes f32 parameters). Nothing changes on error.
    pub fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        if !x.device().is_cpu() || !self.remove_mean {
            return self.inner.forward_train(x);
        }
        match x.dtype() {
            DType::F32 => self.train::<f32>(x),
            DType::F64 => self.train::<f64>(x),
            DType::BF16 => self.train::<bf16>(x),
            DType::F16 => self.train::<f16>(x),
            dtype => candle_core::bail!("batch-norm: the input must be f32, f64, bf16 or f16, got {dtype:?}"),
        }
    }

    /// The inference forward: `x * s + t` per feature from the running statistics, one fused
    /// kernel call (differentiable: the running statistics are held constant).
    fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        if !x.device().is_cpu() {
            return candle_nn::ModuleT::forward_t(&self.inner, x, false);
        }
        match x.dtype() {
            DType::F32 => self.eval::<f32>(x),
            DType::F64 => self.eval::<f64>(x),
            DType::BF16 => self.eval::<bf16>(x),
            DType::F16 => self.eval::<f16>(x),
            dtype => candle_core::bail!("batch-norm: the input must be f32, f64, bf16 or f16, got {dtype:?}"),
        }
    }

    fn train<E: CandleElement>(&self, x: &Tensor) -> Result<Tensor> {
        let ops = self.ops::<E>(x)?;
        let params = self.params::<E>()?;
        let (running_mean, running_var) = self.running_stats::<E>()?;
        let (op, stats) = TrainOp::new(ops.clone(), self.eps() == 0.0);
        let x = x.contiguous()?;
        let y = match &params {
            Some((weight, bias)) => x.apply_op3(weight, bias, op)?,
            None => x.apply_op1(op)?,
        };
        let Some(stats) = stats.get() else {
            candle_core::bail!("batch-norm: the training kernel did not run")
        };
        if self.momentum() > 0.0 {
            let (mut mean, mut var) = (running_mean, running_var);
            ops.update_running_stats(stats, &mut mean, &mut var, 0).map_err(candle_error)?;
            let (mean, var) = (self.as_running(mean)?, self.as_running(var)?);
            Var::from_tensor(self.running_mean())?.set(&mean)?;
            Var::from_tensor(self.running_var())?.set(&var)?;
        }
        Ok(y)
    }

    fn eval<E: CandleElement>(&self, x: &Tensor) -> Result<Tensor> {
        let ops = self.ops::<E>(x)?;
        let params = self.params::<E>()?;
        let (running_mean, running_var) = self.running_stats::<E>()?;
        if self.eps() == 0.0 {
            if let Some(c) = running_var.iter().position(|&v| v == Default::default()) {
                candle_core::bail!(
                    "batch-norm: eps = 0 and running_var[{c}] = 0 (the normalization would divide by zero)"
                )
            }
        }
        let op = EvalOp::new(ops, running_mean, running_var);
        let x = x.contiguous()?;
        match &params {
            Some((weight, bias)) => x.apply_op3(weight, bias, op),
            None => x.apply_op1(op),
        }
    }

    /// The kernels for the rank of `x`: features at dim 1, statistics over the others.
    fn ops<E: CandleElement>(&self, x: &Tensor) -> Result<BatchNormOps<E>> {
        let rank = x.rank();
        if rank < 2 {
            candle_core::bail!(
                "batch-norm: the input must have at least two dimensions (N, C, ...), got {:?}",
                x.shape()
            )
        }
        let channels = self.running_mean().dim(0)?;
        let axes: Vec<usize> = std::iter::once(0).chain(2..rank).collect();
        let layout = Layout::from_axes(&[channels], &axes).map_err(candle_error)?;
        BatchNormOps::new(layout, self.config).map_err(candle_error)
    }

    /// The weight and bias in the kernels' parameter dtype, contiguous (`None` when not affine).
    fn params<E: CandleElement>(&self) -> Result<Option<(Tensor, Tensor)>> {
        let Some((weight, bias)) = self.weight_and_bias() else { return Ok(None) };
        check_param_dtype::<E>("the weight", weight.dtype())?;
        check_param_dtype::<E>("the bias", bias.dtype())?;
        let dtype = param_dtype::<E>();
        Ok(Some((weight.to_dtype(dtype)?.contiguous()?, bias.to_dtype(dtype)?.contiguous()?)))
    }

    /// The running statistics' values in the kernels' parameter type.
    fn running_stats<E: CandleElement>(&self) -> Result<Pair<E::Param>> {
        let (mean, var) = (self.running_mean(), self.running_var());
        check_param_dtype::<E>("running_mean", mean.dtype())?;
        check_param_dtype::<E>("running_var", var.dtype())?;
        let dtype = param_dtype::<E>();
        Ok((mean.to_dtype(dtype)?.to_vec1()?, var.to_dtype(dtype)?.to_vec1()?))
    }

    /// Updated running values as a tensor of the running statistics' dtype and device.
    fn as_running<P: candle_core::WithDType>(&self, values: Vec<P>) -> Result<Tensor> {
        let running = self.running_mean();
        Tensor::from_vec(values, running.dims(), running.device())?.to_dtype(running.dtype())
    }
}

impl candle_nn::ModuleT for BatchNorm {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            self.forward_train(xs)
        } else {
            self.forward_eval(xs)
        }
    }
}
