use batchnorm::batch_norm;

#[batch_norm(features = 6.4, axes = 0)]
pub struct NotIntegers;

#[batch_norm(features = [55, -1], axes = [0])]
pub struct NegativeExtent;

#[batch_norm(features = 8, axes = [0], eps = "1e-5", center = 1, preset = keras)]
pub struct WrongLiterals;

#[batch_norm(features = 8, axes = [0], scale, crate = batchnorm)]
pub struct NoValue;

fn main() {}
