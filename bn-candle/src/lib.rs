//! The fused batch-normalization kernels of [`batchnorm`] as a drop-in for candle-nn's
//! `BatchNorm`, with candle's autodiff.
//!
//! # How to use it
//!
//! Change one import: `use bn_candle::batch_norm;` instead of `use candle_nn::batch_norm;`. The
//! function, the module ([`BatchNorm`]), its constructors and accessors have candle-nn's names
//! and semantics, and it reads the same `VarBuilder` names (`weight`, `bias`, `running_mean`,
//! `running_var`), so checkpoints and optimizers see the same variables.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{ModuleT, VarBuilder, VarMap};
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let bn = bn_candle::batch_norm(3, 1e-5, vb.pp("bn"))?;
//! let x = Tensor::randn(0f32, 1.0, (8, 3, 4, 4), &Device::Cpu)?;
//! let y = bn.forward_t(&x, true)?; // batch statistics; running statistics updated
//! let grads = y.sqr()?.sum_all()?.backward()?; // the fused backward
//! assert!(grads.get(bn.weight_and_bias().unwrap().0).is_some());
//! let y = bn.forward_t(&x, false)?; // running statistics
//! # let _ = y;
//! # Ok::<(), candle_core::Error>(())
//! ```
//!
//! # What runs on the kernels
//!
//! On the CPU, for f32, f64, bf16 and f16 tensors of any rank >= 2 (features at dim 1):
//!
//! - training (`forward_t(x, true)`): one fused kernel call for the statistics and the output,
//!   as a candle custom op whose backward is one fused call giving the gradients of x, weight and
//!   bias; the running statistics are then updated in place;
//! - inference (`forward_t(x, false)`): one fused pass `y = x * s + t`, whose backward (for
//!   fine-tuning in eval mode) holds the running statistics constant.
//!
//! 16-bit tensors are computed in f32, and take weights and running statistics either in their
//! own dtype or in f32; f32 and f64 tensors take parameters of their own dtype. A non-contiguous
//! input is made contiguous first.
//!
//! Each op writes a fresh output (candle owns it afterwards) from
//! [`batchnorm::ops::output_buffer`]: on Linux, outputs of 8 MiB and more are advised for
//! transparent huge pages (`madvise`), so their first write does not fault once per 4 KiB page.
//!
//! The kernels run on the current Rayon pool, as candle's own convolutions do: the global pool
//! (`RAYON_NUM_THREADS`), or candle's inside `Device::with_context`.
//!
//! # What falls back to candle-nn
//!
//! Tensors on another device (CUDA, Metal) and the training forward of a module built with
//! `remove_mean = false` (normalization by the uncentred mean square) run candle-nn's own
//! implementation, with its semantics, on the same variables.
//!
//! # Differences from candle-nn
//!
//! Where candle-nn silently produces inf or NaN, this crate returns an error and changes
//! nothing: a batch with a non-finite mean or variance, `eps = 0` on a channel of zero
//! variance, a single value per channel in training, a non-finite weight or bias, and in
//! inference a non-finite running statistic or a negative running variance. candle-nn's 16-bit
//! training forward fails on a dtype mismatch; here it runs, in f32.
//! Second-order gradients (differentiating the gradients again) are not supported: the
//! gradients are computed by the kernels, outside candle's graph.

#![deny(missing_docs)]

mod element;
mod module;
mod op;

pub use candle_nn::BatchNormConfig;
pub use module::BatchNorm;

/// A [`BatchNorm`] of `num_features` features with its variables from `vb`: `running_mean`
/// (initialized to 0) and `running_var` (1), and when `config.affine`, `weight` (1) and `bias`
/// (0); as [`candle_nn::batch_norm()`].
///
/// # Errors
///
/// As [`candle_nn::batch_norm()`], and for an eps that is negative or not finite or a momentum
/// outside `[0, 1]`.
pub fn batch_norm<C: Into<BatchNormConfig>>(
    num_features: usize,
    config: C,
    vb: candle_nn::VarBuilder,
) -> candle_core::Result<BatchNorm> {
    let config = config.into();
    let inner = candle_nn::batch_norm(num_features, config, vb)?;
    BatchNorm::from_candle_nn(inner, config.remove_mean)
}
