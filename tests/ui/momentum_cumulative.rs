use batchnorm::batch_norm;

// The only string `momentum` takes is "cumulative".
#[batch_norm(features = 8, axes = [0], momentum = "cumulativ")]
pub struct Typo;

#[batch_norm(features = 8, axes = [0], momentum = cumulative)]
pub struct NotAString;

// A cumulative average and PyTorch's momentum both set the momentum.
#[batch_norm(features = 8, axes = [0], momentum = "cumulative", torch_momentum = 0.1)]
pub struct Both;

fn main() {}
