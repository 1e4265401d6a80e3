//! The layers under test: one `#[batch_norm]` layer per standard shape (the macro path, with
//! the shape's static extents given as `spatial`, as a user who knows them would) and the
//! runtime-generic `batchnorm::BatchNorm` (any shape), behind one trait object so the runner
//! treats them alike.

use std::any::Any;
use std::hint::black_box;
use std::sync::Arc;

use batchnorm::half::{bf16, f16};
use batchnorm::{batch_norm, BatchNorm, BatchNormLayer, BnError, Config, Element, Layout, Param};

use crate::case::{Case, Dtype, Mode};

/// A layer of either kind, as the runner holds it.
pub type DynLayer = Box<dyn BatchNormLayer<Elem = f32, Param = f32> + Send>;

/// S1: NC (256, 1024).
#[batch_norm(features = 1024, axes = [0])]
pub struct S1Bn;

/// S2: NCHW (32, 64, 56, 56).
#[batch_norm(features = 64, axes = [0, 2, 3], spatial = [56, 56])]
pub struct S2Bn;

/// S3: NHWC (32, 56, 56, 64).
#[batch_norm(features = 64, axes = [0, 1, 2], spatial = [56, 56])]
pub struct S3Bn;

/// S4: NCHW (32, 2048, 7, 7).
#[batch_norm(features = 2048, axes = [0, 2, 3], spatial = [7, 7])]
pub struct S4Bn;

/// S5: NCL (64, 128, 1000).
#[batch_norm(features = 128, axes = [0, 2], spatial = [1000])]
pub struct S5Bn;

/// S6: tiny NCHW (1, 64, 8, 8).
#[batch_norm(features = 64, axes = [0, 2, 3], spatial = [8, 8])]
pub struct S6Bn;

/// The `#[batch_norm]` layer of the case's standard shape; `None` for a custom shape.
pub fn macro_layer(case: &Case) -> Option<DynLayer> {
    let layer: DynLayer = match case.standard_shape()?.name {
        "S1" => Box::new(S1Bn::new()),
        "S2" => Box::new(S2Bn::new()),
        "S3" => Box::new(S3Bn::new()),
        "S4" => Box::new(S4Bn::new()),
        "S5" => Box::new(S5Bn::new()),
        "S6" => Box::new(S6Bn::new()),
        _ => return None,
    };
    Some(layer)
}

/// The runtime-generic layer for the case (default configuration, the `seed` preset, as the
/// macro layers).
pub fn runtime_layer(case: &Case) -> Result<DynLayer, BnError> {
    Ok(Box::new(BatchNorm::with_config(case.features(), &case.axes, Config::new())?))
}

/// S1..S6 again with `dtype = "bf16"`: the macro path of `--dtype bf16`.
pub mod bf16_layers {
    use batchnorm::batch_norm;

    /// S1 in bf16.
    #[batch_norm(features = 1024, axes = [0], dtype = "bf16")]
    pub struct S1Bf16;
    /// S2 in bf16.
    #[batch_norm(features = 64, axes = [0, 2, 3], dtype = "bf16")]
    pub struct S2Bf16;
    /// S3 in bf16.
    #[batch_norm(features = 64, axes = [0, 1, 2], dtype = "bf16")]
    pub struct S3Bf16;
    /// S4 in bf16.
    #[batch_norm(features = 2048, axes = [0, 2, 3], dtype = "bf16")]
    pub struct S4Bf16;
    /// S5 in bf16.
    #[batch_norm(features = 128, axes = [0, 2], dtype = "bf16")]
    pub struct S5Bf16;
    /// S6 in bf16.
    #[batch_norm(features = 64, axes = [0, 2, 3], dtype = "bf16")]
    pub struct S6Bf16;
}

/// A layer of any dtype with its own inputs and output, as the runner times it: the element type
/// is erased so that one workload holds the layers of its case's dtype.
pub trait Runner: Send {
    /// Brings the layer into the state every mode needs: the parameters, then one training
    /// forward (so inference has running statistics and backward a forward to differentiate).
    fn prepare(&mut self, gamma: &[f32], beta: &[f32], shape: &[usize]) -> Result<(), BnError>;
    /// One call of `mode`.
    fn run(&mut self, mode: Mode, shape: &[usize]) -> Result<(), BnError>;
}

/// A workload's input tensors in its case's dtype, converted once and shared by all its layers:
/// every layer reads the same bytes (as the copy's two variants share theirs), so what one
/// call leaves in the caches helps the next alike, and no layer gets colder inputs than another.
#[derive(Clone)]
pub struct Inputs {
    x: Arc<dyn Any + Send + Sync>,
    dy: Arc<dyn Any + Send + Sync>,
    residual: Option<Arc<dyn Any + Send + Sync>>,
}

impl Inputs {
    /// `x`, `dy` and (for the residual form) `residual`, converted to `dtype`.
    pub fn new(dtype: Dtype, x: &[f32], dy: &[f32], residual: Option<&[f32]>) -> Inputs {
        match dtype {
            Dtype::F32 => Self::of::<f32>(x, dy, residual),
            Dtype::F64 => Self::of::<f64>(x, dy, residual),
            Dtype::Bf16 => Self::of::<bf16>(x, dy, residual),
            Dtype::F16 => Self::of::<f16>(x, dy, residual),
        }
    }

    fn of<E: Element>(x: &[f32], dy: &[f32], residual: Option<&[f32]>) -> Inputs {
        fn convert<E: Element>(v: &[f32]) -> Arc<dyn Any + Send + Sync> {
            Arc::new(v.iter().map(|&v| E::from_f64(v as f64)).collect::<Vec<E>>())
        }
        Inputs { x: convert::<E>(x), dy: convert::<E>(dy), residual: residual.map(convert::<E>) }
    }

    fn typed<E: Element>(values: &Arc<dyn Any + Send + Sync>) -> Arc<Vec<E>> {
        Arc::clone(values).downcast::<Vec<E>>().expect("the inputs are in the case's dtype")
    }
}

/// A layer of element `E` with its own output, on the workload's shared inputs; with a residual
/// (and its gradient's buffer), it runs the residual form `relu(bn(x) + residual)`
/// (`forward_*_add_relu`, `backward_add_relu`).
struct Typed<E: Element> {
    layer: Box<dyn BatchNormLayer<Elem = E, Param = E::Param> + Send>,
    x: Arc<Vec<E>>,
    dy: Arc<Vec<E>>,
    out: Vec<E>,
    residual: Option<(Arc<Vec<E>>, Vec<E>)>,
}

impl<E: Element> Runner for Typed<E> {
    fn prepare(&mut self, gamma: &[f32], beta: &[f32], shape: &[usize]) -> Result<(), BnError> {
        let p = |v: &[f32]| v.iter().map(|&g| Param::from_f64(g as f64)).collect::<Vec<E::Param>>();
        self.layer.update_params(&p(gamma), &p(beta))?;
        match &self.residual {
            Some((r, _)) => self.layer.forward_train_add_relu(&self.x, r, shape, &mut self.out),
            None => self.layer.forward_train(&self.x, shape, &mut self.out),
        }
    }

    fn run(&mut self, mode: Mode, shape: &[usize]) -> Result<(), BnError> {
        let (x, dy, out) = (&self.x, &self.dy, &mut self.out);
        match (mode, &mut self.residual) {
            (Mode::Train, None) => self.layer.forward_train(x, shape, out)?,
            (Mode::Eval, None) => self.layer.forward_eval(x, shape, out)?,
            (Mode::Backward, None) => self.layer.backward(x, dy, shape, out)?,
            (Mode::Train, Some((r, _))) => self.layer.forward_train_add_relu(x, r, shape, out)?,
            (Mode::Eval, Some((r, _))) => self.layer.forward_eval_add_relu(x, r, shape, out)?,
            (Mode::Backward, Some((r, dr))) => {
                self.layer.backward_add_relu(x, r, dy, shape, out, dr)?;
                black_box(dr);
            }
        }
        black_box(&mut self.out);
        Ok(())
    }
}

fn typed<E: Element>(
    layer: Box<dyn BatchNormLayer<Elem = E, Param = E::Param> + Send>,
    inputs: &Inputs,
) -> Box<dyn Runner> {
    typed_with(layer, inputs, false)
}

/// The runner of `layer` on `inputs`; with `residual`, in the residual form (`inputs` must
/// then have a residual).
fn typed_with<E: Element>(
    layer: Box<dyn BatchNormLayer<Elem = E, Param = E::Param> + Send>,
    inputs: &Inputs,
    residual: bool,
) -> Box<dyn Runner> {
    let (x, dy) = (Inputs::typed::<E>(&inputs.x), Inputs::typed::<E>(&inputs.dy));
    let residual = inputs.residual.as_ref().filter(|_| residual).map(|r| {
        let r = Inputs::typed::<E>(r);
        let gradient = vec![E::default(); r.len()];
        (r, gradient)
    });
    let out = vec![E::default(); x.len()];
    Box::new(Typed { layer, x, dy, out, residual })
}

/// The `#[batch_norm]` layer of the case's standard shape and dtype (`f32` and `bf16` have one),
/// on the data `x` and `dy` converted to its dtype; `None` otherwise.
pub fn macro_runner(case: &Case, inputs: &Inputs) -> Option<Box<dyn Runner>> {
    use bf16_layers::*;
    let name = case.standard_shape()?.name;
    match case.dtype {
        Dtype::F32 => Some(typed(macro_layer(case)?, inputs)),
        Dtype::Bf16 => {
            type L = Box<dyn BatchNormLayer<Elem = bf16, Param = f32> + Send>;
            let layer: L = match name {
                "S1" => Box::new(S1Bf16::new()),
                "S2" => Box::new(S2Bf16::new()),
                "S3" => Box::new(S3Bf16::new()),
                "S4" => Box::new(S4Bf16::new()),
                "S5" => Box::new(S5Bf16::new()),
                "S6" => Box::new(S6Bf16::new()),
                _ => return None,
            };
            Some(typed(layer, inputs))
        }
        Dtype::F16 | Dtype::F64 => None,
    }
}

/// The runtime-generic layer of the case's dtype (default configuration), on `x` and `dy`
/// converted to its dtype.
pub fn runtime_runner(case: &Case, inputs: &Inputs) -> Result<Box<dyn Runner>, BnError> {
    runtime_runner_with(case, Config::new(), inputs, false)
}

/// The runtime-generic layer of the case's dtype with `config`, on `inputs`; with `residual`,
/// in the residual form.
pub fn runtime_runner_with(
    case: &Case,
    config: Config,
    inputs: &Inputs,
    residual: bool,
) -> Result<Box<dyn Runner>, BnError> {
    let layout = Layout::from_axes(&case.features(), &case.axes)?;
    let r = residual;
    Ok(match case.dtype {
        Dtype::F32 => typed_with(Box::new(BatchNorm::<f32>::with_layout(layout, config)?), inputs, r),
        Dtype::Bf16 => typed_with(Box::new(BatchNorm::<bf16>::with_layout(layout, config)?), inputs, r),
        Dtype::F16 => typed_with(Box::new(BatchNorm::<f16>::with_layout(layout, config)?), inputs, r),
        Dtype::F64 => typed_with(Box::new(BatchNorm::<f64>::with_layout(layout, config)?), inputs, r),
    })
}
