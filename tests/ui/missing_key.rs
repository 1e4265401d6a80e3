use batchnorm::batch_norm;

#[batch_norm]
pub struct NoArguments;

#[batch_norm(features = 64)]
pub struct NoAxes;

#[batch_norm(axes = [0], eps = 1e-3)]
pub struct NoFeatures;

fn main() {}
