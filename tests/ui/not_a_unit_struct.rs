use batchnorm::batch_norm;

#[batch_norm(features = 8, axes = [0])]
pub enum Enum {
    A,
}

#[batch_norm(features = 8, axes = [0])]
pub union Union {
    a: f32,
}

#[batch_norm(features = 8, axes = [0])]
pub struct Named {
    gamma: Vec<f32>,
}

#[batch_norm(features = 8, axes = [0])]
pub struct Tuple(Vec<f32>);

#[batch_norm(features = 8, axes = [0])]
pub fn function() {}

fn main() {}
