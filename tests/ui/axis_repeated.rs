use batchnorm::batch_norm;

#[batch_norm(features = 64, axes = [0, 2, 2])]
pub struct Repeated;

fn main() {}
