//! The layers under test: one `#[batch_norm]` layer per standard shape (the macro path) and the
//! runtime-generic `batchnorm::BatchNorm` (any shape), behind one trait object so the runner
//! treats them alike.

use batchnorm::{batch_norm, BatchNorm, BatchNormLayer, BnError, Config};

use crate::case::Case;

/// A layer of either kind, as the runner holds it.
pub type DynLayer = Box<dyn BatchNormLayer<Elem = f32, Param = f32> + Send>;

/// S1: NC (256, 1024).
#[batch_norm(features = 1024, axes = [0])]
pub struct S1Bn;

/// S2: NCHW (32, 64, 56, 56).
#[batch_norm(features = 64, axes = [0, 2, 3])]
pub struct S2Bn;

/// S3: NHWC (32, 56, 56, 64).
#[batch_norm(features = 64, axes = [0, 1, 2])]
pub struct S3Bn;

/// S4: NCHW (32, 2048, 7, 7).
#[batch_norm(features = 2048, axes = [0, 2, 3])]
pub struct S4Bn;

/// S5: NCL (64, 128, 1000).
#[batch_norm(features = 128, axes = [0, 2])]
pub struct S5Bn;

/// S6: tiny NCHW (1, 64, 8, 8).
#[batch_norm(features = 64, axes = [0, 2, 3])]
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
