use batchnorm::batch_norm;

#[batch_norm(features = [4294967296, 4294967296], axes = [0])]
pub struct Huge;

fn main() {}
