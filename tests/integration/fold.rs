//! Folding a layer's inference transform into the convolution or linear layer next to it,
//! checked on the real PyTorch model of `tests/data/conformance` (see its README):
//! `Sequential(Conv2d(3,16,3,padding=1), BatchNorm2d(16), ReLU, Conv2d(16,32,3,padding=1,bias=False),
//! BatchNorm2d(32), ReLU, Flatten, Linear(2048,24), BatchNorm1d(24))`, and on random following
//! linear layers.

use crate::common;

use batchnorm::checkpoint::{self, Naming};
use batchnorm::fold::{self, ScaleShift};
use batchnorm::{batch_norm, BatchNorm, BatchNormLayer, BnError, Config, Layout, Preset};
use common::{assert_close_shaped, conformance_dir, Rng, Tensors, Tol, FWD, GRAD};

#[batch_norm(features = 16, axes = [0, 2, 3], preset = "pytorch")]
struct Bn1;

#[batch_norm(features = 32, axes = [0, 2, 3], preset = "pytorch")]
struct Bn2;

#[batch_norm(features = 24, axes = [0], preset = "pytorch")]
struct Bn3;

/// The layer under `prefix` of the PyTorch checkpoint.
fn load<L: BatchNormLayer>(mut layer: L, prefix: &str) -> L {
    let path = conformance_dir().join("torch_state_dict.safetensors");
    checkpoint::load_state_from_file(&mut layer, path, prefix, Naming::pytorch())
        .unwrap_or_else(|e| panic!("loading {prefix}: {e}"));
    layer
}

/// A direct 2-d convolution, stride 1, zero padding 1, NCHW input, weight (out, in, kh, kw),
/// accumulated in f64.
fn conv2d(
    x: &[f32],
    x_shape: [usize; 4],
    weight: &[f32],
    w_shape: [usize; 4],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let [n, cin, h, w] = x_shape;
    let [cout, win, kh, kw] = w_shape;
    assert_eq!(cin, win, "input channels");
    let (ph, pw) = (kh / 2, kw / 2);
    let mut y = vec![0.0f32; n * cout * h * w];
    for b in 0..n {
        for o in 0..cout {
            for i in 0..h {
                for j in 0..w {
                    let mut acc = bias.map_or(0.0, |bias| f64::from(bias[o]));
                    for c in 0..cin {
                        for di in 0..kh {
                            for dj in 0..kw {
                                let (ii, jj) = ((i + di).wrapping_sub(ph), (j + dj).wrapping_sub(pw));
                                if ii < h && jj < w {
                                    let xv = x[((b * cin + c) * h + ii) * w + jj];
                                    let wv = weight[((o * cin + c) * kh + di) * kw + dj];
                                    acc += f64::from(xv) * f64::from(wv);
                                }
                            }
                        }
                    }
                    y[((b * cout + o) * h + i) * w + j] = acc as f32;
                }
            }
        }
    }
    y
}

/// `x (n, in) -> x W^T + b` with `W (out, in)`, accumulated in f64.
fn linear<P: Copy + Into<f64>>(x: &[P], n: usize, weight: &[P], out: usize, bias: Option<&[P]>) -> Vec<f64> {
    let input = weight.len() / out;
    let mut y = vec![0.0; n * out];
    for b in 0..n {
        for o in 0..out {
            let dot: f64 = (0..input).map(|i| x[b * input + i].into() * weight[o * input + i].into()).sum();
            y[b * out + o] = bias.map_or(0.0, |bias| bias[o].into()) + dot;
        }
    }
    y
}

fn relu(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| x.max(0.0)).collect()
}

/// The tolerance of the issue for folded models.
const FOLDED: Tol = GRAD;

#[test]
fn conv_with_bias_folds_into_its_weights() {
    let model = Tensors::load("torch_state_dict.safetensors");
    let io = Tensors::load("torch_state_dict_io.safetensors");
    let bn = load(Bn1::new(), "1.");
    let x = io.get("conv1.input");
    let (x_shape, w_shape) = ([4, 3, 8, 8], [16, 3, 3, 3]);
    assert_eq!(io.shape("conv1.input"), x_shape);
    assert_eq!(model.shape("0.weight"), w_shape);

    // Unfolded, as PyTorch ran it: conv, then the batch norm.
    let conv = conv2d(x, x_shape, model.get("0.weight"), w_shape, Some(model.get("0.bias")));
    let mut unfolded = vec![0.0; conv.len()];
    bn.forward_eval(&conv, &[4, 16, 8, 8], &mut unfolded).unwrap();
    assert_close_shaped("conv + bn", Some(&[4, 16, 8, 8]), &unfolded, io.get("bn1.output"), FOLDED);

    // Folded: the convolution alone.
    let mut weight = model.get("0.weight").to_vec();
    let bias = fold::fold_into_preceding(&bn, &mut weight, &w_shape, Some(model.get("0.bias"))).unwrap();
    assert_eq!(bias.len(), 16);
    let folded = conv2d(x, x_shape, &weight, w_shape, Some(&bias));
    assert_close_shaped("folded conv", Some(&[4, 16, 8, 8]), &folded, io.get("bn1.output"), FOLDED);
}

#[test]
fn conv_without_bias_gets_one() {
    let model = Tensors::load("torch_state_dict.safetensors");
    let io = Tensors::load("torch_state_dict_io.safetensors");
    let bn = load(Bn2::new(), "4.");
    // Conv2d(16, 32, 3, bias=False) runs on relu(bn1.output).
    let x = relu(io.get("bn1.output"));
    let w_shape = [32, 16, 3, 3];
    assert_eq!(model.shape("3.weight"), w_shape);
    let conv = conv2d(&x, [4, 16, 8, 8], model.get("3.weight"), w_shape, None);
    assert_close_shaped("conv 3 reproduces bn2.input", None, &conv, io.get("bn2.input"), FWD);

    let mut weight = model.get("3.weight").to_vec();
    let bias = fold::fold_into_preceding(&bn, &mut weight, &w_shape, None).unwrap();
    let st = fold::scale_shift(&bn).unwrap();
    assert_close_shaped("the created bias is t", None, &bias, &st.shift, Tol { atol: 0.0, rtol: 1e-7 });
    let folded = conv2d(&x, [4, 16, 8, 8], &weight, w_shape, Some(&bias));
    assert_close_shaped("folded conv 3", Some(&[4, 32, 8, 8]), &folded, io.get("bn2.output"), FOLDED);
}

#[test]
fn linear_before_batch_norm_1d() {
    let model = Tensors::load("torch_state_dict.safetensors");
    let io = Tensors::load("torch_state_dict_io.safetensors");
    let bn = load(Bn3::new(), "8.");
    // Linear(2048, 24) runs on flatten(relu(bn2.output)): (4, 32 * 8 * 8), channel-major.
    let x = relu(io.get("bn2.output"));
    let mut weight = model.get("7.weight").to_vec();
    assert_eq!(model.shape("7.weight"), [24, 2048]);
    let bias = fold::fold_into_preceding(&bn, &mut weight, &[24, 2048], Some(model.get("7.bias"))).unwrap();
    let folded = linear(&x, 4, &weight, 24, Some(&bias));
    assert_close_shaped("folded linear", Some(&[4, 24]), &folded, io.get("bn3.output"), FOLDED);
}

/// A runtime layer with random parameters and statistics.
fn random_layer(rng: &mut Rng, features: usize, axes: &[usize]) -> BatchNorm {
    let mut bn = BatchNorm::with_config(features, axes, Config::preset(Preset::Pytorch).eps(1e-3)).unwrap();
    bn.update_params(&rng.params(features, 0.2, 3.0), &rng.params(features, -2.0, 2.0)).unwrap();
    bn.set_running_stats(&rng.params(features, -3.0, 3.0), &rng.params(features, 0.05, 4.0)).unwrap();
    bn
}

#[test]
fn batch_norm_folds_into_the_following_linear_layer() {
    let mut rng = Rng::new(42);
    let (n, c, out) = (8, 10, 7);
    let bn = random_layer(&mut rng, c, &[0]);
    let x: Vec<f32> = rng.vec(n * c, -4.0, 4.0);
    let weight: Vec<f32> = rng.vec(out * c, -1.0, 1.0);
    let bias: Vec<f32> = rng.vec(out, -1.0, 1.0);

    let mut normalized = vec![0.0; x.len()];
    bn.forward_eval(&x, &[n, c], &mut normalized).unwrap();
    let unfolded = linear(&normalized, n, &weight, out, Some(&bias));

    let mut folded_weight = weight.clone();
    let folded_bias = fold::fold_into_following(&bn, &mut folded_weight, &[out, c], Some(&bias)).unwrap();
    let folded = linear(&x, n, &folded_weight, out, Some(&folded_bias));
    assert_close_shaped("bn then linear", Some(&[n, out]), &folded, &unfolded, FOLDED);

    // Without a bias, one is created: W t.
    let mut no_bias_weight = weight.clone();
    let created = fold::fold_into_following(&bn, &mut no_bias_weight, &[out, c], None).unwrap();
    assert_eq!(no_bias_weight, folded_weight);
    let unfolded = linear(&normalized, n, &weight, out, None);
    let folded = linear(&x, n, &no_bias_weight, out, Some(&created));
    assert_close_shaped("bn then linear without bias", Some(&[n, out]), &folded, &unfolded, FOLDED);
}

#[test]
fn following_linear_after_a_flatten() {
    // NCHW batch norm, Flatten (channel-major: column c * H * W + h * W + w), Linear.
    let mut rng = Rng::new(7);
    let (n, c, hw, out) = (3, 4, 9, 5);
    let bn = random_layer(&mut rng, c, &[0, 2, 3]);
    let x: Vec<f32> = rng.vec(n * c * hw, -2.0, 2.0);
    let weight: Vec<f32> = rng.vec(out * c * hw, -0.5, 0.5);
    let bias: Vec<f32> = rng.vec(out, -1.0, 1.0);
    let mut normalized = vec![0.0; x.len()];
    bn.forward_eval(&x, &[n, c, 3, 3], &mut normalized).unwrap();
    let unfolded = linear(&normalized, n, &weight, out, Some(&bias));
    let mut folded_weight = weight.clone();
    let folded_bias =
        fold::fold_into_following(&bn, &mut folded_weight, &[out, c * hw], Some(&bias)).unwrap();
    let folded = linear(&x, n, &folded_weight, out, Some(&folded_bias));
    assert_close_shaped("bn, flatten, linear", Some(&[n, out]), &folded, &unfolded, FOLDED);
}

#[test]
fn f64_weights_fold_in_f64() {
    let mut rng = Rng::new(3);
    let (n, c) = (6, 5);
    let layout = Layout::from_axes(&[c], &[0]).unwrap();
    let mut bn = BatchNorm::<f64>::with_layout(layout, Config::new()).unwrap();
    bn.update_params(&rng.params(c, 0.2, 3.0), &rng.params(c, -2.0, 2.0)).unwrap();
    bn.set_running_stats(&rng.params(c, -3.0, 3.0), &rng.params(c, 0.05, 4.0)).unwrap();
    let x: Vec<f64> = rng.vec(n * 3, -2.0, 2.0);
    let weight: Vec<f64> = rng.vec(c * 3, -1.0, 1.0); // linear 3 -> c before the batch norm
    let h = linear(&x, n, &weight, c, None);
    let mut expected = vec![0.0; h.len()];
    bn.forward_eval(&h, &[n, c], &mut expected).unwrap();
    let mut folded_weight = weight.clone();
    let bias = fold::fold_into_preceding(&bn, &mut folded_weight, &[c, 3], None).unwrap();
    let folded = linear(&x, n, &folded_weight, c, Some(&bias));
    assert_close_shaped("f64 fold", None, &folded, &expected, Tol { atol: 1e-12, rtol: 1e-12 });
}

#[test]
fn scale_shift_is_the_inference_transform() {
    let bn = load(Bn3::new(), "8.");
    let ScaleShift { scale, shift } = fold::scale_shift(&bn).unwrap();
    let io = Tensors::load("torch_state_dict_io.safetensors");
    let x = io.get("bn3.input");
    let y: Vec<f64> =
        x.iter().enumerate().map(|(i, &v)| f64::from(v) * scale[i % 24] + shift[i % 24]).collect();
    assert_close_shaped("x * s + t", Some(&[4, 24]), &y, io.get("bn3.output"), FWD);
}

/// Runs a fold that must fail with `BnError::Fold` mentioning `says`, and checks the weights
/// are unchanged.
fn fails(what: &str, says: &str, run: impl FnOnce(&mut Vec<f32>) -> Result<Vec<f32>, BnError>, len: usize) {
    let mut weight: Vec<f32> = (0..len).map(|i| i as f32 * 0.25 - 1.0).collect();
    let before = weight.clone();
    match run(&mut weight) {
        Err(BnError::Fold(message)) => {
            assert!(message.contains(says), "{what}: {message:?} does not say {says:?}")
        }
        other => panic!("{what}: expected a fold error, got {other:?}"),
    }
    assert_eq!(weight, before, "{what}: the weights are unchanged");
}

#[test]
fn mismatched_shapes_are_errors() {
    let bn = BatchNorm::new(4, [0, 2, 3]).unwrap();
    fails("out is not C", "out = 4", |w| fold::fold_into_preceding(&bn, w, &[3, 4, 1, 1], None), 12);
    fails("one axis", "(out, in, k...)", |w| fold::fold_into_preceding(&bn, w, &[4], None), 4);
    fails(
        "length",
        "has 30 values but its shape [4, 2, 2, 2] describes 32",
        |w| fold::fold_into_preceding(&bn, w, &[4, 2, 2, 2], None),
        30,
    );
    fails(
        "overflowing shape",
        "describes more than usize::MAX",
        |w| fold::fold_into_preceding(&bn, w, &[4, usize::MAX, 2], None),
        8,
    );
    fails(
        "bias",
        "one value per output (4), got 3",
        |w| fold::fold_into_preceding(&bn, w, &[4, 2], Some(&[0.0; 3])),
        8,
    );
    fails("in is not C", "in = 4", |w| fold::fold_into_following(&bn, w, &[2, 6], None), 12);
    fails("in is zero", "in = 4", |w| fold::fold_into_following(&bn, w, &[2, 0], None), 0);
    fails("three axes", "(out, in)", |w| fold::fold_into_following(&bn, w, &[2, 4, 1], None), 8);
    fails(
        "following bias",
        "one value per output (2), got 4",
        |w| fold::fold_into_following(&bn, w, &[2, 4], Some(&[0.0; 4])),
        8,
    );
}

#[test]
fn a_layer_without_running_statistics_cannot_be_folded() {
    let bn = BatchNorm::with_config(4, [0], Config::new().track_running_stats(false)).unwrap();
    assert!(matches!(fold::scale_shift(&bn), Err(BnError::Fold(_))));
    fails(
        "preceding",
        "track_running_stats = false",
        |w| fold::fold_into_preceding(&bn, w, &[4, 2], None),
        8,
    );
    fails(
        "following",
        "track_running_stats = false",
        |w| fold::fold_into_following(&bn, w, &[2, 4], None),
        8,
    );
}

#[test]
fn an_overflowing_fold_is_an_error() {
    let mut bn = BatchNorm::with_config(2, [0], Config::new().eps(1e-12)).unwrap();
    bn.update_params(&[3.0e38, 1.0], &[0.0, 0.0]).unwrap();
    bn.set_running_stats(&[0.0, 0.0], &[0.0, 1.0]).unwrap();
    fails("f32 overflow", "overflows", |w| fold::fold_into_preceding(&bn, w, &[2, 3], None), 6);
}

#[test]
fn a_fused_relu_folds_into_the_preceding_layer_but_not_the_following_one() {
    use batchnorm::{Activation, BatchNorm, BnError, Config};
    let bn = BatchNorm::with_config(2, [0], Config::new().activation(Activation::Relu)).unwrap();
    let mut weight = vec![1.0f32; 6];
    let before = weight.clone();
    let err = batchnorm::fold::fold_into_following(&bn, &mut weight, &[3, 2], None).unwrap_err();
    assert!(matches!(&err, BnError::Fold(m) if m.contains("relu")), "{err}");
    assert_eq!(weight, before);
    assert!(batchnorm::fold::fold_into_preceding(&bn, &mut weight, &[2, 3], None).is_ok());
}
