use batchnorm::batch_norm;

// The product of the extents alone overflows.
#[batch_norm(features = 64, axes = [0, 2, 3], spatial = [4294967296, 4294967296])]
pub struct Spatial;

// The extents fit; with the features they do not.
#[batch_norm(features = 2147483648, axes = [0, 2], spatial = [8589934592])]
pub struct WithFeatures;

fn main() {}
