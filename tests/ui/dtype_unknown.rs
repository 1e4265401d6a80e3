use batchnorm::batch_norm;

#[batch_norm(features = 8, axes = [0], dtype = "f8")]
pub struct UnknownDtype;

#[batch_norm(features = 8, axes = [0], dtype = bf16)]
pub struct UnquotedDtype;

fn main() {
    let _ = UnknownDtype::new();
}
