// PyTorch's momentum is the weight of the new value: `momentum = 0.1` under the pytorch preset
// would silently mean the opposite, so it is refused in either order of the keys.
use batchnorm::batch_norm;

#[batch_norm(features = 4, axes = [0], preset = "pytorch", momentum = 0.1)]
pub struct PresetFirst;

#[batch_norm(features = 4, axes = [0], momentum = 0.1, preset = "pytorch")]
pub struct MomentumFirst;

fn main() {}
