//! The passes on [`Tensor`]s: our kernels where the extension covers the device and dtype,
//! burn's own [`batch_norm`](burn::tensor::module::batch_norm) and
//! [`batch_norm_train`](burn::tensor::module::batch_norm_train) everywhere else.
//!
//! The choice is made at run time, per call, by [`is_accelerated`]: the input's device is an
//! NdArray device or an autodiff device over NdArray, the input and the per-channel tensors are
//! all `f32` or all `f64`, and (for training) each channel has at least two values. Anything
//! else (another backend compiled into burn, `f16`/`bf16`, a batch of one value per channel)
//! runs burn's implementation, with burn's results.

use burn::backend::{Dispatch, DispatchDevice};
use burn::tensor::module::BatchNormTrainOutput;
use burn::tensor::{DType, Device, Tensor};

use crate::backend::BatchNormBackend;

/// Whether the extension runs our kernels on `device` for tensors of `dtype`: an NdArray
/// device (directly or under autodiff) and `f32` or `f64`.
pub fn is_accelerated(device: &Device, dtype: DType) -> bool {
    is_covered_device(device.as_dispatch()) && matches!(dtype, DType::F32 | DType::F64)
}

/// NdArray, or autodiff over NdArray.
fn is_covered_device(device: &DispatchDevice) -> bool {
    match device {
        DispatchDevice::Autodiff(inner) => matches!(**inner, DispatchDevice::NdArray(_)),
        other => matches!(other, DispatchDevice::NdArray(_)),
    }
}

/// The checks burn's own functions make, with their messages.
fn check_shapes<const D: usize>(input: &Tensor<D>, per_channel: &[(&str, &Tensor<1>)]) -> usize {
    assert!(D >= 2, "batch norm requires an input rank of at least 2");
    let channels = input.dims()[1];
    for (what, tensor) in per_channel {
        assert_eq!(tensor.dims(), [channels], "invalid batch norm {what} shape");
    }
    channels
}

/// Whether every tensor of one call runs on our kernels.
fn accelerated<const D: usize>(input: &Tensor<D>, per_channel: &[(&str, &Tensor<1>)]) -> bool {
    let dtype = input.dtype();
    is_accelerated(&input.device(), dtype) && per_channel.iter().all(|(_, t)| t.dtype() == dtype)
}

/// Batch normalization with the statistics of the batch itself, as
/// [`burn::tensor::module::batch_norm_train`]: the normalized input, the batch mean and the
/// biased batch variance (both detached).
///
/// On an autodiff device the output's gradient flows to `input`, `gamma` and `beta` through
/// one graph node whose backward is our fused backward kernel.
///
/// # Panics
///
/// As burn's function, for a rank below 2 or per-channel tensors of the wrong shape; and, on
/// our kernels, when the batch's statistics are not finite (a non-finite input), before any
/// output exists.
pub fn batch_norm_train<const D: usize>(
    input: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
) -> BatchNormTrainOutput<D> {
    let channels = check_shapes(&input, &[("gamma", &gamma), ("beta", &beta)]);
    let per_channel = input.shape().num_elements() / channels.max(1);
    if !accelerated(&input, &[("gamma", &gamma), ("beta", &beta)]) || per_channel < 2 {
        return burn::tensor::module::batch_norm_train(input, gamma, beta, epsilon);
    }
    let result = Dispatch::fused_batch_norm_train(
        input.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        epsilon,
    );
    BatchNormTrainOutput {
        output: Tensor::from_dispatch(result.output),
        mean: Tensor::from_dispatch(result.mean),
        variance: Tensor::from_dispatch(result.variance),
    }
}

/// Batch normalization with the given statistics, as [`burn::tensor::module::batch_norm`].
///
/// On an autodiff device the output's gradient flows to `input`, `gamma` and `beta` (the
/// statistics are constants) through one graph node whose backward is our fused kernel.
///
/// # Panics
///
/// As burn's function, for a rank below 2 or per-channel tensors of the wrong shape; and, on
/// our kernels, for a negative or non-finite variance.
pub fn batch_norm<const D: usize>(
    input: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    mean: Tensor<1>,
    variance: Tensor<1>,
    epsilon: f64,
) -> Tensor<D> {
    let per_channel = [("gamma", &gamma), ("beta", &beta), ("mean", &mean), ("variance", &variance)];
    let _ = check_shapes(&input, &per_channel);
    if !accelerated(&input, &per_channel) || input.shape().num_elements() == 0 {
        return burn::tensor::module::batch_norm(input, gamma, beta, mean, variance, epsilon);
    }
    Tensor::from_dispatch(Dispatch::fused_batch_norm_eval(
        input.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        mean.into_dispatch(),
        variance.into_dispatch(),
        epsilon,
    ))
}

/// The running statistics after a training batch, as burn-nn's `BatchNorm` updates them:
/// `running * (1 - momentum) + batch * momentum` per channel, the batch variance first
/// multiplied by `variance_factor` (1 for burn's biased running variance, `n / (n - 1)` for
/// PyTorch's unbiased one). Returns the new mean and variance, untracked.
///
/// One operation where the extension covers the device and dtype (the same bits as burn's
/// tensor operations, which run everywhere else).
///
/// # Panics
///
/// As burn's tensor operations, when the four tensors differ in shape.
pub fn update_running_stats(
    running_mean: Tensor<1>,
    running_var: Tensor<1>,
    batch_mean: Tensor<1>,
    batch_var: Tensor<1>,
    momentum: f64,
    variance_factor: f64,
) -> (Tensor<1>, Tensor<1>) {
    let dtype = running_mean.dtype();
    let covered = is_accelerated(&running_mean.device(), dtype)
        && [&running_var, &batch_mean, &batch_var]
            .iter()
            .all(|t| t.dtype() == dtype && t.dims() == running_mean.dims());
    if !covered {
        let keep = 1.0 - momentum;
        return (
            running_mean.mul_scalar(keep).add(batch_mean.mul_scalar(momentum)),
            running_var.mul_scalar(keep).add(batch_var.mul_scalar(variance_factor).mul_scalar(momentum)),
        );
    }
    let result = Dispatch::fused_running_stats(
        running_mean.into_dispatch(),
        running_var.into_dispatch(),
        batch_mean.into_dispatch(),
        batch_var.into_dispatch(),
        momentum,
        variance_factor,
    );
    (Tensor::from_dispatch(result.mean), Tensor::from_dispatch(result.variance))
}
