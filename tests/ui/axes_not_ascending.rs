use batchnorm::batch_norm;

#[batch_norm(features = 64, axes = [0, 3, 2])]
pub struct Descending;

fn main() {}
