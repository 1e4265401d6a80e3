use batchnorm::batch_norm;

#[batch_norm(features = [2147483648, 2147483648, 4], axes = [0])]
pub struct Huge;

fn main() {}
