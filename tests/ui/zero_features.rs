use batchnorm::batch_norm;

#[batch_norm(features = 0, axes = [0, 2, 3])]
pub struct ZeroChannels;

#[batch_norm(features = [55, 0], axes = [0])]
pub struct ZeroExtent;

#[batch_norm(features = [], axes = [0])]
pub struct NoExtents;

fn main() {}
