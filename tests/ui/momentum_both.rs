use batchnorm::batch_norm;

#[batch_norm(features = 8, axes = [0], momentum = 0.9, torch_momentum = 0.1)]
pub struct Both;

fn main() {}
