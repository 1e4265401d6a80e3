use batchnorm::batch_norm;

#[batch_norm(features = 64, axes = [])]
pub struct NothingReduced;

fn main() {}
