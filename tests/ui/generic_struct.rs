use batchnorm::batch_norm;

#[batch_norm(features = 8, axes = [0])]
pub struct Generic<T>;

#[batch_norm(features = 8, axes = [0])]
pub struct Lifetime<'a>
where
    'a: 'static;

fn main() {}
