use batchnorm::batch_norm;

// Rank 4; the feature axes would be 1 and 3.
#[batch_norm(features = [5, 4], axes = [0, 2])]
pub struct Split;

fn main() {}
