//! Batch normalization compiled into shape-specialized, SIMD-vectorized, Rayon-parallel kernels.
//!
//! # How to use batchnorm
//!
//! Annotate a unit struct with [`#[batch_norm]`](macro@batch_norm), naming the feature extents
//! and the reduced axes. The struct becomes a layer with private state (gamma, beta, the running
//! statistics, the statistics saved for backward, the gradients) and the methods of
//! [`BatchNormLayer`]:
//!
//! ```
//! use batchnorm::{batch_norm, BnError};
//!
//! /// NCHW with 8 channels; statistics over N, H and W; PyTorch's defaults.
//! #[batch_norm(features = 8, axes = [0, 2, 3], preset = "pytorch")]
//! pub struct ConvBn;
//!
//! # fn main() -> Result<(), BnError> {
//! let mut bn = ConvBn::new();
//! let shape = [4, 8, 5, 5];
//! let x: Vec<f32> = (0..4 * 8 * 25).map(|i| (i % 11) as f32 * 0.3).collect();
//! let mut y = vec![0.0; x.len()];
//!
//! // Training: batch statistics; running statistics updated with momentum 0.9 (torch's 0.1).
//! bn.forward_train(&x, &shape, &mut y)?;
//!
//! // Backward of that forward: dx, and the gradients of gamma and beta.
//! let dy = vec![0.1f32; x.len()];
//! let mut dx = vec![0.0; x.len()];
//! bn.backward(&x, &dy, &shape, &mut dx)?;
//! assert_eq!(bn.beta_grad().len(), ConvBn::FEATURES);
//!
//! // A step of plain SGD on the parameters.
//! let gamma: Vec<f32> = bn.gamma().iter().zip(bn.gamma_grad()).map(|(g, d)| g - 0.01 * d).collect();
//! let beta: Vec<f32> = bn.beta().iter().zip(bn.beta_grad()).map(|(b, d)| b - 0.01 * d).collect();
//! bn.update_params(&gamma, &beta)?;
//!
//! // Inference: y = x * s + t with the running statistics; in place if you like.
//! let mut xy = x.clone();
//! bn.forward_eval_inplace(&mut xy, &shape)?;
//! # Ok(())
//! # }
//! ```
//!
//! The same kernels are reached two more ways. When the features and axes are known only at
//! run time, [`BatchNorm`] takes them as values:
//!
//! ```
//! use batchnorm::{BatchNorm, Config, Preset};
//!
//! let mut bn = BatchNorm::with_config(8, [0, 1, 2], Config::preset(Preset::Keras))?; // NHWC
//! let x: Vec<f32> = (0..2 * 3 * 3 * 8).map(|i| (i % 5) as f32).collect();
//! let mut y = vec![0.0; x.len()];
//! bn.forward_train(&x, &[2, 3, 3, 8], &mut y)?;
//! # Ok::<(), batchnorm::BnError>(())
//! ```
//!
//! And [`BatchNormArrayExt`] gives every layer entry points on ndarray arrays of any memory
//! order, returning new arrays (the ndarray it takes is re-exported as [`ndarray`]):
//!
//! ```
//! use batchnorm::ndarray::Array2;
//! use batchnorm::{BatchNorm, BatchNormArrayExt};
//!
//! let mut bn = BatchNorm::new(3, [0])?;
//! let x = Array2::from_shape_fn((4, 3), |(n, c)| (n * 3 + c) as f32);
//! let y = bn.forward_train_array(&x)?;
//! let dx = bn.backward_array(&x, &y)?;
//! assert_eq!(dx.dim(), (4, 3));
//! # Ok::<(), batchnorm::BnError>(())
//! ```
//!
//! Beyond these: [`checkpoint`] (safetensors in PyTorch's and Keras's names), [`fold`] (folding
//! into the neighbouring convolution or linear layer), [`sync`] (statistics synchronized across
//! processes), [`kernels`] (the kernels themselves) and the [`Activation`] fused after the
//! normalization.
//!
//! # Layouts
//!
//! Slices are row-major in the order of `shape`. A layer has one or more adjacent *feature
//! axes* (gamma has their extents) and the other axes are *reduced*: the statistics of a feature
//! are over every value of the reduced axes. Every such layout is the canonical view
//! `(outer, C, inner)` ([`Layout::canonical`]): NCHW is `(N, C, H*W)`, NHWC `(N*H*W, C, 1)`, NC
//! `(N, C, 1)`, and the NumPy class's example `(96, 55, 55)` normalized over axis 0 is
//! `(96, 3025, 1)`.
//!
//! | layout | attribute |
//! |---|---|
//! | NC (dense) | `features = 1024, axes = [0]` |
//! | NCL (1-d conv) | `features = 128, axes = [0, 2]` |
//! | NCHW | `features = 64, axes = [0, 2, 3]` |
//! | NHWC | `features = 64, axes = [0, 1, 2]` |
//! | per position of a 55 x 55 grid | `features = [55, 55], axes = [0]` |
//!
//! # Configuration
//!
//! A [`Preset`] (`numpy`, the default: the NumPy `BatchNormalization` class this crate
//! reproduces; `pytorch`; `keras`) sets momentum, eps and the running variance's bias; explicit
//! keys override it ([`Config`] is the same at run time).
//! **`momentum` is the weight of the old running value** (the NumPy class's and Keras's
//! convention); PyTorch's momentum `p` is written `torch_momentum = p`, and with
//! `preset = "pytorch"` a plain `momentum` is refused so that a ported `0.1` cannot silently mean
//! the opposite.
//!
//! # Run-time layers
//!
//! [`BatchNorm`] takes its features, axes and [`Config`] at run time and runs the same kernels;
//! `BatchNorm<f64>` keeps everything in `f64`; `BatchNorm<half::bf16>` and `BatchNorm<half::f16>`
//! (and `dtype = "bf16" | "f16"` in the attribute) store the data in 16 bits with `f32`
//! parameters, computed by the `f32` kernels ([`half`] is re-exported). Both kinds implement [`BatchNormLayer`], and
//! [`BatchNormArrayExt`] adds ndarray entry points to both.
//!
//! # Deployment
//!
//! [`checkpoint`] loads and saves a layer's state as safetensors in PyTorch's `state_dict` names
//! (or Keras's, or your own), and [`fold`] folds a trained layer's inference transform into the
//! convolution or linear layer next to it. `momentum = "cumulative"` is PyTorch's
//! `momentum=None` (a plain average of the batches seen, counted by `num_batches_tracked`).
//!
//! # Errors
//!
//! Every entry point validates its input (rank, feature extents, buffer lengths, overflow,
//! parameter lengths and values) before it writes anything and returns a [`BnError`]; after an
//! `Err` the layer is bit for bit unchanged. A training batch with a non-finite mean or variance
//! is `Err(BnError::NonFinite { .. })` and leaves the running statistics untouched. Nothing
//! panics on user input.
//!
//! A layer has at most [`MAX_FEATURES`] (2^31) features: more is a compile error of
//! `#[batch_norm]` and an error of the run-time constructors. Buffers sized by input are
//! allocated fallibly: `BatchNorm::new` and a generated layer's `try_new()` return
//! [`BnError::Allocation`] when the state does not fit in memory (a generated layer's `new()`
//! aborts then, as `Vec` does), and [`checkpoint`] loads a [`BnError::Checkpoint`] naming the
//! tensor.
//!
//! # Threads
//!
//! Kernels run on the caller's current Rayon pool: wrap calls in `ThreadPool::install` to choose
//! the threads. Results do not depend on the number of threads.
#![deny(missing_docs)]

pub use bn_core::*;
pub use bn_macros::batch_norm;

/// What the code generated by `#[batch_norm]` uses. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use bn_core::half;
    pub use bn_core::spec::{Dynamic, Spec};
    pub use bn_core::{
        Activation, BatchNorm, BatchNormLayer, BnError, Config, Element, Layout, Preset, RunningVar,
        StatsGroup,
    };
}

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
