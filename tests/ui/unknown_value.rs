use batchnorm::batch_norm;

#[batch_norm(features = 8, axes = [0], preset = "tensorflow")]
pub struct UnknownPreset;

#[batch_norm(features = 8, axes = [0], running_var = "sample")]
pub struct UnknownRunningVar;

#[batch_norm(features = 8, axes = [0], crate = "not a path")]
pub struct BadCratePath;

fn main() {}
