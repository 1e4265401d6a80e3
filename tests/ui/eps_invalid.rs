use batchnorm::batch_norm;

#[batch_norm(features = 8, axes = [0], eps = 0.0)]
pub struct Zero;

#[batch_norm(features = 8, axes = [0], eps = -1e-5)]
pub struct Negative;

#[batch_norm(features = 8, axes = [0], eps = 1e999)]
pub struct Infinite;

fn main() {}
