use batchnorm::batch_norm;

// Our momentum is the weight of the old value: 1 would never update.
#[batch_norm(features = 8, axes = [0], momentum = 1.0)]
pub struct Frozen;

#[batch_norm(features = 8, axes = [0], momentum = -0.1)]
pub struct Negative;

// PyTorch's momentum is the weight of the new value: 0 would never update.
#[batch_norm(features = 8, axes = [0], torch_momentum = 0)]
pub struct TorchZero;

#[batch_norm(features = 8, axes = [0], torch_momentum = 1.5)]
pub struct TorchTooLarge;

fn main() {}
