//! The backend extension: fused batch-norm passes as backend operations, reached from
//! [`Tensor`](burn::tensor::Tensor) through burn's `Dispatch`.
//!
//! [`BatchNormBackend`] is declared with `#[backend_extension(NdArray, Autodiff)]`: burn generates
//! its `Dispatch` implementation, which routes a call to the NdArray implementation here (our
//! kernels on contiguous buffers) or to the Autodiff one ([`crate::autodiff`]: one graph node
//! whose backward is the fused backward kernel). Call it through the functions of
//! [`crate::functional`]; they check the device first ([`crate::is_accelerated`]), since burn's
//! generated dispatch panics on a backend the extension does not list.

// burn 0.22 deprecates its NdArray backend (it recommends Flex); the extension targets NdArray,
// whose deprecation warnings would otherwise fire on every use of its types.
#![allow(deprecated)]

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use batchnorm::kernels;
use batchnorm::ops::{output_buffer, BatchNormOps, BatchStats};
use batchnorm::spec::Dynamic;
use batchnorm::{Activation, BnError, Canonical, Config, Layout, Preset};
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::NdArray;
use burn::backend::{backend_extension, ExtensionType};
use ndarray::{ArcArray, ArrayViewD, IxDyn};

/// The output of [`BatchNormBackend::fused_batch_norm_train`]: the normalized input, the
/// batch's mean and biased variance (shape `[channels]`), and what its backward needs.
#[derive(ExtensionType)]
pub struct FusedTrainOutput<B: burn::backend::Backend> {
    /// The normalized input, shaped as the input.
    pub output: FloatTensor<B>,
    /// The batch mean per channel.
    pub mean: FloatTensor<B>,
    /// The biased batch variance per channel (without epsilon).
    pub variance: FloatTensor<B>,
    /// The batch statistics and parameters of this forward, for its backward.
    pub saved: Saved,
}

/// The gradients of a batch-norm pass with respect to its input, gamma and beta.
#[derive(ExtensionType)]
pub struct FusedGradients<B: burn::backend::Backend> {
    /// Gradient of the input.
    pub x_grad: FloatTensor<B>,
    /// Gradient of gamma, `[channels]`.
    pub gamma_grad: FloatTensor<B>,
    /// Gradient of beta, `[channels]`.
    pub beta_grad: FloatTensor<B>,
}

/// The running statistics after a training batch, from
/// [`BatchNormBackend::fused_running_stats`].
#[derive(ExtensionType)]
pub struct RunningStats<B: burn::backend::Backend> {
    /// The running mean, `[channels]`.
    pub mean: FloatTensor<B>,
    /// The running variance, `[channels]`.
    pub variance: FloatTensor<B>,
}

/// What a training forward leaves for its backward: the kernels' handle, the batch statistics
/// and the gamma and beta it used. Opaque; cheap to clone (shared).
#[derive(Clone)]
pub struct Saved(Arc<SavedInner>);

impl fmt::Debug for Saved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dtype = match &*self.0 {
            SavedInner::F32(_) => "f32",
            SavedInner::F64(_) => "f64",
        };
        f.debug_struct("Saved").field("dtype", &dtype).finish_non_exhaustive()
    }
}

enum SavedInner {
    F32(Pass<f32>),
    F64(Pass<f64>),
}

/// One forward's kernels, statistics and parameters.
struct Pass<E: Float> {
    ops: BatchNormOps<E>,
    stats: BatchStats,
    gamma: Vec<E>,
    beta: Vec<E>,
}

/// The fused batch-norm passes as backend operations.
///
/// Shapes: `x` is `[batch, channels, ...]`, every other tensor `[channels]`; all tensors of one
/// call have the same float dtype (`f32` or `f64`). The operations panic, as burn's own tensor
/// operations do, on a shape or dtype they cannot take and on a batch whose statistics are not
/// finite; use the checked entry points of [`crate::functional`].
#[backend_extension(NdArray, Autodiff)]
pub trait BatchNormBackend: burn::backend::Backend {
    /// The training forward: normalizes `x` with its own statistics and returns them.
    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FusedTrainOutput<Self>;

    /// The backward of a training forward: the gradients of its input, gamma and beta from
    /// one fused kernel call, given its input, the gradient of its output and what it saved.
    fn fused_batch_norm_train_backward(
        x: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
        saved: Saved,
    ) -> FusedGradients<Self>;

    /// The inference forward with the given (running) statistics.
    fn fused_batch_norm_eval(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self>;

    /// The backward of the inference forward (statistics held constant).
    #[allow(clippy::too_many_arguments)]
    fn fused_batch_norm_eval_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        output_grad: FloatTensor<Self>,
    ) -> FusedGradients<Self>;

    /// The running statistics after a training batch, as burn-nn's `BatchNorm` updates them,
    /// in one operation: `running * (1 - momentum) + batch * momentum` per channel, the batch
    /// variance first multiplied by `variance_factor` (1 for burn's biased running variance,
    /// `n / (n - 1)` for PyTorch's unbiased one). The same element arithmetic, in the same
    /// order, as burn's tensor operations, so the same bits. Not differentiable (the running
    /// statistics never are).
    fn fused_running_stats(
        running_mean: FloatTensor<Self>,
        running_var: FloatTensor<Self>,
        batch_mean: FloatTensor<Self>,
        batch_var: FloatTensor<Self>,
        momentum: f64,
        variance_factor: f64,
    ) -> RunningStats<Self>;
}

/// The float types the kernels run on NdArray: `f32` and `f64`, their own parameter type.
trait Float: batchnorm::Element<Param = Self> + Clone + Send + Sync + 'static {
    /// The tensor's values, without a copy, when it holds this type.
    fn view(tensor: &NdArrayTensor) -> Option<ArrayViewD<'_, Self>>;
    fn tensor(array: ArcArray<Self, IxDyn>) -> NdArrayTensor;
    /// `running * keep + batch * factor * take`, each product and the sum rounded to `Self`
    /// as burn's `mul_scalar` and `add` round them (scalars converted to `Self` first).
    fn blend(running: &[Self], batch: &[Self], keep: f64, take: f64, factor: f64) -> Vec<Self>;
    fn saved(pass: Pass<Self>) -> Saved;
    fn pass(saved: &Saved) -> Option<&Pass<Self>>;
}

/// A tensor's values as the kernels take them: the tensor itself when its values are
/// contiguous and row-major, a row-major copy otherwise (made once).
struct Values<E> {
    tensor: NdArrayTensor,
    copy: Option<ArcArray<E, IxDyn>>,
}

impl<E: Float> Values<E> {
    fn view(&self) -> ArrayViewD<'_, E> {
        match &self.copy {
            Some(copy) => copy.view(),
            // `values` checked the dtype.
            None => E::view(&self.tensor).unwrap_or_else(|| unreachable!("bn-burn: dtype checked")),
        }
    }
}

macro_rules! float {
    ($ty:ty, $variant:ident) => {
        impl Float for $ty {
            fn view(tensor: &NdArrayTensor) -> Option<ArrayViewD<'_, Self>> {
                match tensor {
                    // Zero-copy for owned and borrowed (loaded) storage alike.
                    NdArrayTensor::$variant(storage) => Some(storage.view()),
                    _ => None,
                }
            }

            fn tensor(array: ArcArray<Self, IxDyn>) -> NdArrayTensor {
                NdArrayTensor::from(array)
            }

            fn blend(running: &[Self], batch: &[Self], keep: f64, take: f64, factor: f64) -> Vec<Self> {
                let (keep, take, factor) = (keep as $ty, take as $ty, factor as $ty);
                running.iter().zip(batch).map(|(&r, &b)| r * keep + b * factor * take).collect()
            }

            fn saved(pass: Pass<Self>) -> Saved {
                Saved(Arc::new(SavedInner::$variant(pass)))
            }

            fn pass(saved: &Saved) -> Option<&Pass<Self>> {
                match &*saved.0 {
                    SavedInner::$variant(pass) => Some(pass),
                    _ => None,
                }
            }
        }
    };
}

float!(f32, F32);
float!(f64, F64);

/// The kernels' handle for an input of `shape` (features at axis 1, statistics over the others)
/// with burn's epsilon. burn's momentum convention is applied by the module, not the kernels.
fn kernel_ops<E: Float>(shape: &[usize], epsilon: f64) -> Result<BatchNormOps<E>, BnError> {
    if shape.len() < 2 {
        return Err(BnError::InvalidLayout(format!(
            "batch norm needs an input of rank >= 2 ([batch, channels, ...]), got shape {shape:?}"
        )));
    }
    let axes: Vec<usize> = std::iter::once(0).chain(2..shape.len()).collect();
    let layout = Layout::from_axes(&[shape[1]], &axes)?;
    BatchNormOps::new(layout, Config::preset(Preset::Pytorch).eps(epsilon))
}

/// Panics with the kernels' error, as burn's operations panic on invalid input.
#[track_caller]
fn fail(error: BnError) -> ! {
    panic!("bn-burn batch norm: {error}")
}

/// The contiguous values of a tensor of dtype `E` (copied into row-major order once when the
/// tensor is a strided view).
fn values<E: Float>(tensor: NdArrayTensor, what: &str) -> (Values<E>, Vec<usize>) {
    let (copy, shape) = match E::view(&tensor) {
        Some(view) if view.is_standard_layout() => (None, view.shape().to_vec()),
        Some(view) => (Some(view.as_standard_layout().into_owned().into_shared()), view.shape().to_vec()),
        None => panic!(
            "bn-burn batch norm: {what} has dtype {}, expected {}",
            tensor_dtype(&tensor),
            std::any::type_name::<E>()
        ),
    };
    (Values { tensor, copy }, shape)
}

fn tensor_dtype(tensor: &NdArrayTensor) -> String {
    use burn::backend::TensorMetadata;
    format!("{:?}", tensor.dtype())
}

/// The slice of a standard-layout array.
fn slice<'a, E: Clone>(view: &'a ArrayViewD<'a, E>) -> &'a [E] {
    match view.as_slice() {
        Some(values) => values,
        // `values` made every array standard-layout.
        None => unreachable!("bn-burn: a tensor was not made contiguous"),
    }
}

fn vector<E: Float>(tensor: NdArrayTensor, channels: usize, what: &str) -> Vec<E> {
    let (source, shape) = values::<E>(tensor, what);
    if shape != [channels] {
        panic!("bn-burn batch norm: {what} has shape {shape:?}, expected [{channels}]")
    }
    let view = source.view();
    slice(&view).to_vec()
}

fn array<E: Float>(shape: &[usize], data: Vec<E>) -> NdArrayTensor {
    match ArcArray::from_shape_vec(IxDyn(shape), data) {
        Ok(array) => E::tensor(array),
        Err(error) => panic!("bn-burn batch norm: output of shape {shape:?}: {error}"),
    }
}

fn stats_vector<E: Float>(values: &[f64]) -> NdArrayTensor {
    array(&[values.len()], values.iter().map(|&v| <E as batchnorm::Element>::from_f64(v)).collect())
}

fn train<E: Float>(
    x: NdArrayTensor,
    gamma: NdArrayTensor,
    beta: NdArrayTensor,
    epsilon: f64,
) -> FusedTrainOutput<NdArray> {
    let (x, shape) = values::<E>(x, "the input");
    let ops = kernel_ops::<E>(&shape, epsilon).unwrap_or_else(|e| fail(e));
    let channels = shape[1];
    let gamma = vector::<E>(gamma, channels, "gamma");
    let beta = vector::<E>(beta, channels, "beta");
    let view = x.view();
    let x = slice(&view);
    let mut y = output_buffer::<E>(x.len());
    let stats = ops.forward_train(x, &shape, &gamma, &beta, &mut y).unwrap_or_else(|e| fail(e));
    FusedTrainOutput {
        output: array(&shape, y),
        mean: stats_vector::<E>(stats.mean()),
        variance: stats_vector::<E>(stats.var()),
        saved: E::saved(Pass { ops, stats, gamma, beta }),
    }
}

fn train_backward<E: Float>(
    x: NdArrayTensor,
    output_grad: NdArrayTensor,
    pass: &Pass<E>,
) -> FusedGradients<NdArray> {
    let (x, shape) = values::<E>(x, "the input");
    let f32_pass =
        (&x as &dyn Any).downcast_ref::<Values<f32>>().zip((pass as &dyn Any).downcast_ref::<Pass<f32>>());
    let output_grad = match f32_pass {
        Some((x, pass)) => match in_place_f32(x, &shape, output_grad, pass) {
            Ok(gradients) => return gradients,
            Err(output_grad) => output_grad,
        },
        None => output_grad,
    };
    let Pass { ops, stats, gamma, beta } = pass;
    gradients(&x, &shape, output_grad, gamma.len(), |x, dy, dx, dgamma, dbeta| {
        ops.backward(x, dy, &shape, stats, gamma, beta, dx, dgamma, dbeta)
    })
}

/// The f32 training backward with `dx` written over the output gradient
/// ([`kernels::backward_in_place`]), when burn hands that over as the sole owner of a contiguous
/// buffer of the input's shape (as its autodiff does with a gradient no other node holds);
/// otherwise the gradient is given back.
///
/// A fresh activation-sized `dx` per step can cost more than the backward kernels: the
/// allocator returns such blocks to the system and their pages fault in again (burn-ndarray's
/// own elementwise operations reuse a uniquely held buffer the same way). The in-place kernel
/// gives the same values as [`BatchNormOps::backward`] and reads `x` and the gradient once.
fn in_place_f32(
    x: &Values<f32>,
    shape: &[usize],
    output_grad: NdArrayTensor,
    pass: &Pass<f32>,
) -> Result<FusedGradients<NdArray>, NdArrayTensor> {
    let NdArrayTensor::F32(storage) = output_grad else { return Err(output_grad) };
    let eligible = storage.is_unique() && {
        let view = storage.view();
        view.is_standard_layout() && view.shape() == shape
    };
    if !eligible || shape.len() < 2 || pass.ops.config().get_activation() != Activation::Identity {
        return Err(NdArrayTensor::F32(storage));
    }
    let Pass { ops, stats, gamma, .. } = pass;
    let mut grad = storage.into_owned();
    let Some(dy_dx) = grad.as_slice_mut() else {
        unreachable!("bn-burn: a standard-layout gradient is contiguous")
    };
    let x_view = x.view();
    let x = slice(&x_view);
    let channels = gamma.len();
    let dims = Canonical { outer: shape[0], channels, inner: shape[2..].iter().product() };
    let (mut sum_dy, mut sum_dy_xhat) = (vec![0.0; channels], vec![0.0; channels]);
    kernels::backward_in_place::<Dynamic>(
        ops.backend(),
        x,
        dy_dx,
        dims,
        stats.mean(),
        stats.inv_std(),
        gamma,
        &mut sum_dy,
        &mut sum_dy_xhat,
    );
    let narrow = |sums: &[f64]| sums.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    Ok(FusedGradients {
        x_grad: NdArrayTensor::from(grad),
        gamma_grad: array(&[channels], narrow(&sum_dy_xhat)),
        beta_grad: array(&[channels], narrow(&sum_dy)),
    })
}

/// The gradients of a pass over `x` (of `shape`) from the gradient of its output: `backward`
/// runs the kernel on the contiguous values into dx, dgamma and dbeta.
fn gradients<E: Float>(
    x: &Values<E>,
    shape: &[usize],
    output_grad: NdArrayTensor,
    channels: usize,
    backward: impl FnOnce(&[E], &[E], &mut [E], &mut [E], &mut [E]) -> Result<(), BnError>,
) -> FusedGradients<NdArray> {
    let (dy, dy_shape) = values::<E>(output_grad, "the output gradient");
    if dy_shape != shape {
        panic!("bn-burn batch norm: the output gradient has shape {dy_shape:?}, the input {shape:?}")
    }
    let (x_view, dy_view) = (x.view(), dy.view());
    let (x, dy) = (slice(&x_view), slice(&dy_view));
    let mut dx = output_buffer::<E>(x.len());
    let (mut dgamma, mut dbeta) = (vec![E::default(); channels], vec![E::default(); channels]);
    backward(x, dy, &mut dx, &mut dgamma, &mut dbeta).unwrap_or_else(|e| fail(e));
    FusedGradients {
        x_grad: array(shape, dx),
        gamma_grad: array(&[channels], dgamma),
        beta_grad: array(&[channels], dbeta),
    }
}

/// The inputs of an inference pass, as the kernels take them.
struct EvalInputs<E: Float> {
    ops: BatchNormOps<E>,
    x: Values<E>,
    shape: Vec<usize>,
    gamma: Vec<E>,
    beta: Vec<E>,
    mean: Vec<E>,
    variance: Vec<E>,
}

fn eval_inputs<E: Float>(
    x: NdArrayTensor,
    gamma: NdArrayTensor,
    beta: NdArrayTensor,
    mean: NdArrayTensor,
    variance: NdArrayTensor,
    epsilon: f64,
) -> EvalInputs<E> {
    let (x, shape) = values::<E>(x, "the input");
    let ops = kernel_ops::<E>(&shape, epsilon).unwrap_or_else(|e| fail(e));
    let channels = shape[1];
    EvalInputs {
        ops,
        x,
        gamma: vector(gamma, channels, "gamma"),
        beta: vector(beta, channels, "beta"),
        mean: vector(mean, channels, "the mean"),
        variance: vector(variance, channels, "the variance"),
        shape,
    }
}

fn eval<E: Float>(inputs: EvalInputs<E>) -> NdArrayTensor {
    let EvalInputs { ops, x, shape, gamma, beta, mean, variance } = inputs;
    let view = x.view();
    let x = slice(&view);
    let mut y = output_buffer::<E>(x.len());
    ops.forward_eval(x, &shape, &mean, &variance, &gamma, &beta, &mut y).unwrap_or_else(|e| fail(e));
    array(&shape, y)
}

fn eval_backward<E: Float>(inputs: EvalInputs<E>, output_grad: NdArrayTensor) -> FusedGradients<NdArray> {
    let EvalInputs { ops, x, shape, gamma, beta, mean, variance } = inputs;
    gradients(&x, &shape, output_grad, gamma.len(), |x, dy, dx, dgamma, dbeta| {
        ops.backward_eval(x, dy, &shape, &mean, &variance, &gamma, &beta, dx, dgamma, dbeta)
    })
}

fn running_stats<E: Float>(
    [running_mean, running_var, batch_mean, batch_var]: [NdArrayTensor; 4],
    momentum: f64,
    variance_factor: f64,
) -> RunningStats<NdArray> {
    let (running_mean, shape) = values::<E>(running_mean, "the running mean");
    let &[channels] = shape.as_slice() else {
        panic!("bn-burn batch norm: the running mean has shape {shape:?}, expected one axis")
    };
    let view = running_mean.view();
    let running_mean = slice(&view);
    let running_var = vector::<E>(running_var, channels, "the running variance");
    let batch_mean = vector::<E>(batch_mean, channels, "the batch mean");
    let batch_var = vector::<E>(batch_var, channels, "the batch variance");
    let keep = 1.0 - momentum;
    RunningStats {
        mean: array(&[channels], E::blend(running_mean, &batch_mean, keep, momentum, 1.0)),
        variance: array(&[channels], E::blend(&running_var, &batch_var, keep, momentum, variance_factor)),
    }
}

/// Runs `$body` with `$E` bound to the element type of `$x` (`f32` or `f64`).
macro_rules! with_float {
    ($x:expr, $E:ident => $body:expr) => {
        match &$x {
            NdArrayTensor::F32(_) => {
                type $E = f32;
                $body
            }
            NdArrayTensor::F64(_) => {
                type $E = f64;
                $body
            }
            other => panic!(
                "bn-burn batch norm: dtype {} is not accelerated (f32 and f64 are)",
                tensor_dtype(other)
            ),
        }
    };
}

impl BatchNormBackend for NdArray {
    fn fused_batch_norm_train(
        x: NdArrayTensor,
        gamma: NdArrayTensor,
        beta: NdArrayTensor,
        epsilon: f64,
    ) -> FusedTrainOutput<Self> {
        with_float!(x, E => train::<E>(x, gamma, beta, epsilon))
    }

    fn fused_batch_norm_train_backward(
        x: NdArrayTensor,
        output_grad: NdArrayTensor,
        saved: Saved,
    ) -> FusedGradients<Self> {
        with_float!(x, E => match E::pass(&saved) {
            Some(pass) => train_backward::<E>(x, output_grad, pass),
            None => panic!("bn-burn batch norm: the backward's input has another dtype than its forward's"),
        })
    }

    fn fused_batch_norm_eval(
        x: NdArrayTensor,
        gamma: NdArrayTensor,
        beta: NdArrayTensor,
        mean: NdArrayTensor,
        variance: NdArrayTensor,
        epsilon: f64,
    ) -> NdArrayTensor {
        with_float!(x, E => eval::<E>(eval_inputs(x, gamma, beta, mean, variance, epsilon)))
    }

    fn fused_batch_norm_eval_backward(
        x: NdArrayTensor,
        gamma: NdArrayTensor,
        beta: NdArrayTensor,
        mean: NdArrayTensor,
        variance: NdArrayTensor,
        epsilon: f64,
        output_grad: NdArrayTensor,
    ) -> FusedGradients<Self> {
        with_float!(x, E => eval_backward::<E>(eval_inputs(x, gamma, beta, mean, variance, epsilon), output_grad))
    }

    fn fused_running_stats(
        running_mean: NdArrayTensor,
        running_var: NdArrayTensor,
        batch_mean: NdArrayTensor,
        batch_var: NdArrayTensor,
        momentum: f64,
        variance_factor: f64,
    ) -> RunningStats<Self> {
        let tensors = [running_mean, running_var, batch_mean, batch_var];
        with_float!(tensors[0], E => running_stats::<E>(tensors, momentum, variance_factor))
    }
}
