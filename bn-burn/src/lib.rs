//! The batchnorm kernels inside burn.
//!
//! - [`BatchNorm`] / [`BatchNormConfig`]: burn-nn's `BatchNorm`, same API, fields and record, on
//!   our fused kernels: swap the import.
//! - [`functional`]: `batch_norm_train` and `batch_norm` on tensors, as burn's
//!   `burn::tensor::module` functions.
//! - [`BatchNormBackend`]: the backend extension underneath (burn's
//!   `#[backend_extension(NdArray, Autodiff)]`), with one autodiff node per pass whose backward
//!   is the fused backward kernel.
//!
//! Our kernels run on NdArray devices (and autodiff over them) for `f32` and `f64`; any other
//! device or dtype runs burn's own implementation, chosen at run time
//! ([`functional::is_accelerated`]).
//!
//! ```
//! use bn_burn::{BatchNorm, BatchNormConfig};
//! use burn::tensor::{Device, Tensor, TensorData};
//!
//! # #[allow(deprecated)] // burn 0.22 deprecates NdArray (the backend we accelerate)
//! let device = Device::ndarray().autodiff();
//! let bn: BatchNorm = BatchNormConfig::new(3).with_momentum(0.1).init(&device);
//! let x = Tensor::<4>::from_data(
//!     TensorData::new((0..24).map(|i| i as f32).collect::<Vec<_>>(), [2, 3, 2, 2]),
//!     &device,
//! )
//! .require_grad();
//! let y = bn.forward(x.clone()); // training: autodiff device, layer not frozen
//! let grads = y.clone().mul(y).sum().backward();
//! assert!(x.grad(&grads).is_some());
//! // The running mean moved 10% of the way to the batch mean (7.5, 11.5, 15.5).
//! let mean = bn.running_mean.value_sync().into_data().try_into_vec::<f32>().unwrap();
//! assert!((mean[0] - 0.75).abs() < 1e-5);
//! ```
#![deny(missing_docs)]

mod autodiff;
mod backend;
pub mod functional;
mod module;

pub use backend::{BatchNormBackend, FusedGradients, FusedTrainOutput, RunningStats, Saved};
pub use functional::is_accelerated;
pub use module::{BatchNorm, BatchNormConfig};
