//! The custom ops: one application of the training or inference forward (`cpu_fwd` runs the
//! fused kernel) and its backward (`bwd` runs the fused backward kernel, which gives the
//! gradients of x, weight and bias from one call).
//!
//! Each application of a module builds its own op instance, and the training op keeps the batch
//! statistics of its forward: a module applied twice in one graph differentiates each
//! application with its own statistics. The gradients are computed from tensor values, outside
//! candle's graph: second-order gradients through these ops are not supported.

use std::cell::OnceCell;
use std::sync::{Arc, OnceLock};

use batchnorm::ops::{output_buffer, BatchNormOps, BatchStats};
use batchnorm::Param;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};

use crate::element::{candle_error, CandleElement};

/// Two per-feature vectors: gamma and beta, or their gradients, or the running mean and
/// variance.
pub(crate) type Pair<P> = (Vec<P>, Vec<P>);

/// Gamma and beta as an op reads them (`None`: fixed at 1 and 0).
type Params<'a, P> = Option<(&'a [P], &'a [P])>;

/// The contiguous values of a CPU storage, as the layout selects them.
fn values<'a, T: WithDType>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("batch-norm: {what} must be contiguous")
    };
    Ok(&storage.as_slice::<T>()?[start..end])
}

/// The fixed gamma (1) and beta (0) of a module without affine parameters.
fn unit_params<P: Param>(channels: usize) -> Pair<P> {
    (vec![P::ONE; channels], vec![P::ZERO; channels])
}

/// One application of the training forward.
pub(crate) struct TrainOp<E: CandleElement> {
    ops: BatchNormOps<E>,
    /// `eps = 0` runs the kernels with the smallest positive eps and refuses a batch with a
    /// zero variance (where the division by zero would give inf or NaN).
    zero_eps: bool,
    stats: Arc<OnceLock<BatchStats>>,
}

impl<E: CandleElement> TrainOp<E> {
    /// The op, and where its forward leaves the batch statistics.
    pub(crate) fn new(ops: BatchNormOps<E>, zero_eps: bool) -> (Self, Arc<OnceLock<BatchStats>>) {
        let stats = Arc::new(OnceLock::new());
        (TrainOp { ops, zero_eps, stats: Arc::clone(&stats) }, stats)
    }

    fn forward(
        &self,
        x: (&CpuStorage, &Layout),
        params: Params<'_, E::Param>,
    ) -> Result<(CpuStorage, Shape)> {
        let (storage, layout) = x;
        let x = values::<E>(storage, layout, "the input")?;
        let unit;
        let (gamma, beta) = match params {
            Some(params) => params,
            None => {
                unit = unit_params(self.ops.layout().channels());
                (&unit.0[..], &unit.1[..])
            }
        };
        let mut y = output_buffer::<E>(x.len());
        let stats = self.ops.forward_train(x, layout.dims(), gamma, beta, &mut y).map_err(candle_error)?;
        if self.zero_eps {
            if let Some(c) = stats.var().iter().position(|&v| v == 0.0) {
                candle_core::bail!(
                    "batch-norm: eps = 0 and feature {c} has zero variance in this batch (the normalization would divide by zero)"
                )
            }
        }
        if self.stats.set(stats).is_err() {
            candle_core::bail!("batch-norm: a training op instance was run twice")
        }
        Ok((E::to_cpu_storage_owned(y), layout.shape().clone()))
    }

    /// dx, dgamma and dbeta from one backward kernel call.
    fn backward(
        &self,
        x: &Tensor,
        params: Option<(&Tensor, &Tensor)>,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let Some(stats) = self.stats.get() else {
            candle_core::bail!("batch-norm: backward of a training forward that did not run")
        };
        run_backward(&self.ops, Frozen::Train(stats), x, params, grad)
    }
}

/// One application of the inference forward, with the running statistics it read.
pub(crate) struct EvalOp<E: CandleElement> {
    ops: BatchNormOps<E>,
    running_mean: Vec<E::Param>,
    running_var: Vec<E::Param>,
}

impl<E: CandleElement> EvalOp<E> {
    pub(crate) fn new(ops: BatchNormOps<E>, running_mean: Vec<E::Param>, running_var: Vec<E::Param>) -> Self {
        EvalOp { ops, running_mean, running_var }
    }

    fn forward(
        &self,
        x: (&CpuStorage, &Layout),
        params: Params<'_, E::Param>,
    ) -> Result<(CpuStorage, Shape)> {
        let (storage, layout) = x;
        let x = values::<E>(storage, layout, "the input")?;
        let unit;
        let (gamma, beta) = match params {
            Some(params) => params,
            None => {
                unit = unit_params(self.ops.layout().channels());
                (&unit.0[..], &unit.1[..])
            }
        };
        let mut y = output_buffer::<E>(x.len());
        self.ops
            .forward_eval(x, layout.dims(), &self.running_mean, &self.running_var, gamma, beta, &mut y)
            .map_err(candle_error)?;
        Ok((E::to_cpu_storage_owned(y), layout.shape().clone()))
    }

    fn backward(
        &self,
        x: &Tensor,
        params: Option<(&Tensor, &Tensor)>,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let frozen = Frozen::Eval { running_mean: &self.running_mean, running_var: &self.running_var };
        run_backward(&self.ops, frozen, x, params, grad)
    }
}

/// The two kinds of op as the custom-op traits: `CustomOp3` over (x, weight, bias) for an
/// affine module, `CustomOp1` over x without affine parameters.
macro_rules! custom_ops {
    ($op:ident, $name:literal) => {
        impl<E: CandleElement> CustomOp3 for $op<E> {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                s1: &CpuStorage,
                l1: &Layout,
                s2: &CpuStorage,
                l2: &Layout,
                s3: &CpuStorage,
                l3: &Layout,
            ) -> Result<(CpuStorage, Shape)> {
                let gamma = values::<E::Param>(s2, l2, "the weight")?;
                let beta = values::<E::Param>(s3, l3, "the bias")?;
                self.forward((s1, l1), Some((gamma, beta)))
            }

            fn bwd(
                &self,
                x: &Tensor,
                weight: &Tensor,
                bias: &Tensor,
                _res: &Tensor,
                grad: &Tensor,
            ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
                let (dx, dweight, dbias) = self.backward(x, Some((weight, bias)), grad)?;
                Ok((Some(dx), Some(dweight), Some(dbias)))
            }
        }

        impl<E: CandleElement> CustomOp1 for $op<E> {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
                self.forward((storage, layout), None)
            }

            fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
                Ok(Some(self.backward(x, None, grad)?.0))
            }
        }
    };
}

custom_ops!(TrainOp, "bn-candle-batch-norm-train");
custom_ops!(EvalOp, "bn-candle-batch-norm-eval");

/// What a backward differentiates: a training forward (its batch statistics) or an inference
/// forward (the running statistics it used).
enum Frozen<'a, P> {
    Train(&'a BatchStats),
    Eval { running_mean: &'a [P], running_var: &'a [P] },
}

/// Runs the backward kernel on `x` and the gradient of the output, as a custom op over those two
/// tensors (no autodiff of its own): dx as its output, dgamma and dbeta as small tensors.
fn run_backward<E: CandleElement>(
    ops: &BatchNormOps<E>,
    frozen: Frozen<'_, E::Param>,
    x: &Tensor,
    params: Option<(&Tensor, &Tensor)>,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let channels = ops.layout().channels();
    let (gamma, beta) = match params {
        Some((weight, bias)) => (weight.to_vec1::<E::Param>()?, bias.to_vec1::<E::Param>()?),
        None => unit_params(channels),
    };
    let pass = BackwardPass { ops, frozen, gamma: &gamma, beta: &beta, grads: OnceCell::new() };
    let dy = grad.contiguous()?;
    let dx = x.contiguous()?.apply_op2_no_bwd(&dy, &pass)?;
    let Some((dgamma, dbeta)) = pass.grads.into_inner() else {
        candle_core::bail!("batch-norm: the backward kernel did not run")
    };
    let device = x.device();
    Ok((dx, Tensor::from_vec(dgamma, channels, device)?, Tensor::from_vec(dbeta, channels, device)?))
}

/// The backward kernel as a custom op over (x, dy), leaving dgamma and dbeta in `grads`.
struct BackwardPass<'a, E: CandleElement> {
    ops: &'a BatchNormOps<E>,
    frozen: Frozen<'a, E::Param>,
    gamma: &'a [E::Param],
    beta: &'a [E::Param],
    grads: OnceCell<Pair<E::Param>>,
}

impl<E: CandleElement> CustomOp2 for BackwardPass<'_, E> {
    fn name(&self) -> &'static str {
        "bn-candle-batch-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = values::<E>(s1, l1, "the input")?;
        let dy = values::<E>(s2, l2, "the output gradient")?;
        if l1.dims() != l2.dims() {
            candle_core::bail!(
                "batch-norm: the output gradient has shape {:?}, the input {:?}",
                l2.dims(),
                l1.dims()
            )
        }
        let channels = self.ops.layout().channels();
        let mut dx = output_buffer::<E>(x.len());
        let (mut dgamma, mut dbeta) = (vec![E::Param::ZERO; channels], vec![E::Param::ZERO; channels]);
        let (ops, shape, gamma, beta) = (self.ops, l1.dims(), self.gamma, self.beta);
        match self.frozen {
            Frozen::Train(stats) => {
                ops.backward(x, dy, shape, stats, gamma, beta, &mut dx, &mut dgamma, &mut dbeta)
            }
            Frozen::Eval { running_mean, running_var } => ops.backward_eval(
                x,
                dy,
                shape,
                running_mean,
                running_var,
                gamma,
                beta,
                &mut dx,
                &mut dgamma,
                &mut dbeta,
            ),
        }
        .map_err(candle_error)?;
        // A pass instance runs once: `run_backward` builds one per backward.
        let _ = self.grads.set((dgamma, dbeta));
        Ok((E::to_cpu_storage_owned(dx), l1.shape().clone()))
    }
}
