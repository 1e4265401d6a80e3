//! The 16-bit data formats (`bf16`, `f16`): tensors stored in 16 bits, computed in `f32` by the
//! same kernels as `f32` layers (PyTorch's mixed precision).
//!
//! Every pass cuts the canonical `(outer, C, inner)` view into *blocks*: contiguous ranges of
//! the tensor that are whole rows (`C * inner` small), a range of channels of one row, or a
//! piece of one run (`inner` large). A block is widened into a small `f32` buffer (fast SIMD
//! conversions, chosen by the [`Backend`]), handed to the `f32` kernel of the pass as a tensor of
//! its own (with the parameters of its channels), and the result narrowed back (round to
//! nearest even). So the data moves in 16 bits, half the bytes of `f32`, and the arithmetic is
//! the `f32` kernels'.
//!
//! The reductions and the training `dx` pass have *direct* kernels besides, generic over the
//! instruction set like the `f32` kernels: vectors of 16-bit values are widened in registers
//! (`Isa::load_half`) and `dx` rounded in registers (`Isa::store_half`), with no buffer and
//! no `f32` kernel call per block. They run where a block has whole vectors to work on (runs of
//! at least 32 values, or rows of at least 16 channels); planes shapes whose channels fit in L2
//! go further, channel by channel: the statistics (or backward sums) of a channel, then its
//! normalize (or `dx`) while it is still in cache, so the input is read from memory once.
//!
//! - inference ([`normalize`]): one pass over the blocks, in parallel; buffers on the stack, no
//!   allocation.
//! - training ([`forward_train`]): the statistics of each block ([`kernels::forward_train`](super::forward_train) on
//!   the block), merged per channel with Chan's formula in `f64` in a fixed order; then the
//!   inference pass with the training transform.
//! - backward ([`backward`]): the sums of each block ([`kernels::backward_eval`](super::backward_eval) with the saved
//!   mean and a unit scale), added in a fixed order; then `dx = k1 * dy + k2 * (x - m) + k3`
//!   per block. [`backward_eval`] is one pass (the block's `dx` and sums together).
//!
//! Blocks, and the chunks of blocks whose partial results are combined, are fixed by the shape:
//! results are bit-identical for any number of threads. Reductions keep per-task buffers
//! (reused by each thread) and per-chunk, per-channel partials, never anything the size of the
//! tensor.
//!
//! Files: `blocks.rs` (the cut into blocks and their schedules), `forward.rs` and `backward.rs`
//! (the passes), `direct.rs` (the kernels that widen in registers), `convert.rs` (conversions
//! and the fused affine pass). Each pass has a form generic over the compile-time shape
//! ([`Spec`](crate::spec::Spec), as the `f32` kernels are: `normalize_spec::<S>`, ...) and one
//! for run-time shapes only (`normalize`, ...), which is the former with [`Dynamic`].

mod backward;
mod blocks;
mod convert;
mod direct;
mod forward;

pub use super::simd::bits::HalfFormat;
pub use backward::{backward_eval_spec, backward_spec};
pub use forward::{batch_stats_spec, forward_train_spec, normalize_inplace_spec, normalize_spec};

use super::Backend;
use crate::spec::Dynamic;
use crate::Canonical;

/// Inference on 16-bit data: `y = (x - mean[c]) * scale[c] + shift[c]`, computed in `f32` by
/// [`kernels::normalize`](super::normalize) on blocks widened from `x`, rounded to nearest even
/// into `y`. No allocation.
///
/// `x` and `y` are the bits of `dims.len()` values of `format`; the per-channel slices hold
/// `dims.channels` values.
///
/// ```
/// use batchnorm::kernels::{half16, Backend, HalfFormat};
/// use batchnorm::half::bf16;
/// use batchnorm::Canonical;
///
/// let dims = Canonical { outer: 2, channels: 1, inner: 2 };
/// let x: Vec<u16> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
/// let mut y = vec![0u16; 4];
/// half16::normalize(Backend::detect(), HalfFormat::Bf16, &x, &mut y, dims, &[2.0], &[0.5], &[1.0]);
/// let y: Vec<f32> = y.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
/// assert_eq!(y, [0.5, 1.0, 1.5, 2.0]);
/// ```
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn normalize(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    y: &mut [u16],
    dims: Canonical,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
) {
    normalize_spec::<Dynamic>(backend, format, x, y, dims, mean, scale, shift)
}

/// [`normalize`] in place: bit-identical to it.
///
/// ```
/// use batchnorm::kernels::{half16, Backend, HalfFormat};
/// use batchnorm::half::f16;
/// use batchnorm::Canonical;
///
/// let dims = Canonical { outer: 1, channels: 2, inner: 1 };
/// let mut xy = [f16::from_f32(1.0).to_bits(), f16::from_f32(-1.0).to_bits()];
/// half16::normalize_inplace(Backend::detect(), HalfFormat::F16, &mut xy, dims, &[0.0, 0.0], &[2.0, 3.0], &[0.0, 1.0]);
/// assert_eq!(xy.map(|b| f16::from_bits(b).to_f32()), [2.0, -2.0]);
/// ```
#[inline]
pub fn normalize_inplace(
    backend: Backend,
    format: HalfFormat,
    xy: &mut [u16],
    dims: Canonical,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
) {
    normalize_inplace_spec::<Dynamic>(backend, format, xy, dims, mean, scale, shift)
}

/// Per-channel batch mean and biased variance of 16-bit data (`f64`), from the `f32` kernel's
/// statistics of each block merged with Chan's formula in a fixed order.
///
/// `dims.per_channel()` must be at least 1.
///
/// ```
/// use batchnorm::kernels::{half16, Backend, HalfFormat};
/// use batchnorm::half::bf16;
/// use batchnorm::Canonical;
///
/// let dims = Canonical { outer: 4, channels: 1, inner: 1 };
/// let x: Vec<u16> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
/// let (mut mean, mut var) = ([0.0], [0.0]);
/// half16::batch_stats(Backend::detect(), HalfFormat::Bf16, &x, dims, &mut mean, &mut var);
/// assert_eq!((mean[0], var[0]), (2.5, 1.25));
/// ```
#[inline]
pub fn batch_stats(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    dims: Canonical,
    mean_out: &mut [f64],
    var_out: &mut [f64],
) {
    batch_stats_spec::<Dynamic>(backend, format, x, dims, mean_out, var_out)
}

/// Training forward on 16-bit data: [`batch_stats`] into `mean_out` and `var_out`, then
/// `y = (x - mean) * gamma / sqrt(var + eps) + beta` by the [`normalize`] pass; on shapes with
/// channels that fit in L2, channel by channel instead (`forward_train_channels`: `x` read
/// once). If a statistic is not finite, `y` is unspecified (as for `f32` data): the channels
/// with finite statistics may have been written.
///
/// ```
/// use batchnorm::kernels::{half16, Backend, HalfFormat};
/// use batchnorm::half::bf16;
/// use batchnorm::Canonical;
///
/// let dims = Canonical { outer: 2, channels: 1, inner: 2 };
/// let x: Vec<u16> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
/// let mut y = vec![0u16; 4];
/// let (mut mean, mut var) = ([0.0], [0.0]);
/// half16::forward_train(Backend::detect(), HalfFormat::Bf16, &x, &mut y, dims, &[1.0], &[0.0], 0.0, &mut mean, &mut var);
/// assert_eq!((mean[0], var[0]), (2.5, 1.25));
/// let y0 = bf16::from_bits(y[0]).to_f32();
/// assert!((y0 + 1.3416).abs() < 0.01);
/// ```
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn forward_train(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    y: &mut [u16],
    dims: Canonical,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    mean_out: &mut [f64],
    var_out: &mut [f64],
) {
    forward_train_spec::<Dynamic>(backend, format, x, y, dims, gamma, beta, eps, mean_out, var_out)
}

/// Training backward on 16-bit data: per-channel `sum_dy = sum(dy)` and
/// `sum_dy_xhat = sum(dy * xhat)` with `xhat = (x - mean) * inv_std`, then
/// `dx = gamma * inv_std * (dy - sum_dy / n - xhat * sum_dy_xhat / n)`, `n = outer * inner`.
///
/// ```
/// use batchnorm::kernels::{half16, Backend, HalfFormat};
/// use batchnorm::half::f16;
/// use batchnorm::Canonical;
///
/// let dims = Canonical { outer: 2, channels: 1, inner: 1 };
/// let bits = |v: &[f32]| v.iter().map(|&v| f16::from_f32(v).to_bits()).collect::<Vec<u16>>();
/// let (x, dy) = (bits(&[-1.0, 1.0]), bits(&[1.0, 1.0]));
/// let mut dx = vec![0u16; 2];
/// let (mut sum_dy, mut sum_dy_xhat) = ([0.0], [0.0]);
/// half16::backward(Backend::detect(), HalfFormat::F16, &x, &dy, &mut dx, dims, &[0.0], &[1.0], &[1.0], &mut sum_dy, &mut sum_dy_xhat);
/// assert_eq!((sum_dy[0], sum_dy_xhat[0]), (2.0, 0.0));
/// assert_eq!(dx, bits(&[0.0, 0.0]));
/// ```
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn backward(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    dy: &[u16],
    dx: &mut [u16],
    dims: Canonical,
    mean: &[f64],
    inv_std: &[f64],
    gamma: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    backward_spec::<Dynamic>(
        backend,
        format,
        x,
        dy,
        dx,
        dims,
        mean,
        inv_std,
        gamma,
        sum_dy_out,
        sum_dy_xhat_out,
    )
}

/// Backward with frozen statistics on 16-bit data: the sums of [`backward`] with the given
/// `mean` and `inv_std`, and `dx = dy * gamma * inv_std`, in one pass.
///
/// ```
/// use batchnorm::kernels::{half16, Backend, HalfFormat};
/// use batchnorm::half::bf16;
/// use batchnorm::Canonical;
///
/// let dims = Canonical { outer: 2, channels: 1, inner: 1 };
/// let bits = |v: &[f32]| v.iter().map(|&v| bf16::from_f32(v).to_bits()).collect::<Vec<u16>>();
/// let (x, dy) = (bits(&[0.0, 2.0]), bits(&[1.0, 3.0]));
/// let mut dx = vec![0u16; 2];
/// let (mut sum_dy, mut sum_dy_xhat) = ([0.0], [0.0]);
/// half16::backward_eval(Backend::detect(), HalfFormat::Bf16, &x, &dy, &mut dx, dims, &[1.0], &[0.5], &[2.0], &mut sum_dy, &mut sum_dy_xhat);
/// assert_eq!((sum_dy[0], sum_dy_xhat[0]), (4.0, 1.0));
/// assert_eq!(dx, bits(&[1.0, 3.0]));
/// ```
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn backward_eval(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    dy: &[u16],
    dx: &mut [u16],
    dims: Canonical,
    mean: &[f32],
    inv_std: &[f32],
    gamma: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    backward_eval_spec::<Dynamic>(
        backend,
        format,
        x,
        dy,
        dx,
        dims,
        mean,
        inv_std,
        gamma,
        sum_dy_out,
        sum_dy_xhat_out,
    )
}
