use batchnorm::batch_norm;

#[batch_norm(features = 64, axes = [0, 2, 3], activation = "gelu")]
pub struct Gelu;

#[batch_norm(features = 64, axes = [0, 2, 3], activation = relu)]
pub struct Unquoted;

fn main() {}
