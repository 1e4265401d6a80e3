use batchnorm::batch_norm;

#[batch_norm(features = 64, axes = [0, 2, 3], spatial = [56])]
pub struct TooFew;

#[batch_norm(features = 64, axes = [0], spatial = [56])]
pub struct NoLaterAxes;

#[batch_norm(features = 64, axes = [0, 2, 3], spatial = [56, 0])]
pub struct ZeroExtent;

fn main() {}
