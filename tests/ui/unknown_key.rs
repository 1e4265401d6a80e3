use batchnorm::batch_norm;

#[batch_norm(featurs = 64, axes = [0, 2, 3])]
pub struct Typo;

#[batch_norm(features = 64, axes = [0, 2, 3], bias = true)]
pub struct NoSuchKey;

fn main() {}
