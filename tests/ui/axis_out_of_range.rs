use batchnorm::batch_norm;

// 3 reduced axes + 1 feature axis: rank 4, so axis 4 does not exist.
#[batch_norm(features = 64, axes = [0, 2, 4])]
pub struct OutOfRange;

// 1 reduced axis + 2 feature axes: rank 3.
#[batch_norm(features = [55, 55], axes = [3])]
pub struct SeedTypo;

fn main() {}
