use batchnorm::batch_norm;

#[batch_norm(features = 8, axes = [0], eps = 1e-5, eps = 1e-3)]
pub struct TwoEps;

fn main() {}
