use batchnorm::batch_norm;

// Three mistakes, three errors in one build, and none where the layer is used.
#[batch_norm(features = 0, axes = [0, 2, 3], eps = -1e-5, preset = "tf")]
pub struct StemBn;

fn main() {
    let mut bn = StemBn::new();
    let x = vec![0.0f32; 8];
    let mut y = vec![0.0f32; 8];
    bn.forward_train(&x, &[2, 4, 1, 1], &mut y).unwrap();
    assert_eq!(bn.gamma().len(), StemBn::FEATURES);
}
