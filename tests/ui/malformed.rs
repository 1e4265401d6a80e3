use batchnorm::batch_norm;

#[batch_norm(features: 64, axes = [0, 2, 3])]
pub struct Colon;

#[batch_norm(features = 64 axes = [0, 2, 3])]
pub struct NoComma;

#[batch_norm(eps = 1e-4, features)]
pub struct NoValue;

fn main() {}
