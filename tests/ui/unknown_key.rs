use batchnorm::batch_norm;

#[batch_norm(featurs = 64, axes = [0, 2, 3])]
pub struct Typo;

#[batch_norm(features = 64, axes = [0, 2, 3], spatial = [56, 56])]
pub struct NotYet;

fn main() {}
