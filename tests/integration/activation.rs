//! Fused activations: `activation = "relu"` and the residual form `relu(bn(x) + residual)`.
//!
//! On every backend the machine has, the fused paths must give exactly (bit for bit) what the
//! unfused composition gives on the same backend: the plain layer's output with the ReLU (and the
//! add) applied afterwards, and the plain backward of `dy` masked with `y > 0`. The `f64` layer's
//! residual backward is also checked against finite differences.

use crate::common;

use batchnorm::{batch_norm, Activation, Backend, BatchNorm, BatchNormLayer, BnError, Config};
use common::Rng;

/// The scalar ReLU the kernels implement (NaN and -0.0 pass through).
fn relu(v: f32) -> f32 {
    if v < 0.0 {
        0.0
    } else {
        v
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[track_caller]
fn assert_bits_eq(got: &[f32], expected: &[f32], what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != expected[i].to_bits()) {
        panic!("{what}: element {i} is {} but the unfused composition gives {}", got[i], expected[i]);
    }
}

/// (features, axes, shape): planes and rows, odd tails, tiny and above the parallel threshold.
fn cases() -> Vec<(Vec<usize>, Vec<usize>, Vec<usize>)> {
    vec![
        (vec![7], vec![0, 2, 3], vec![3, 7, 5, 7]),
        (vec![3], vec![0, 2], vec![5, 3, 49]),
        (vec![70], vec![0], vec![6, 70]),
        (vec![1], vec![0], vec![9, 1]),
        (vec![16], vec![0, 2], vec![4, 16, 2100]),
        (vec![70], vec![0], vec![3000, 70]),
        (vec![64], vec![0, 2, 3], vec![2, 64, 31, 33]),
        // Rows with whole virtual rows and a tail; rows whose period is C itself.
        (vec![70], vec![0], vec![100, 70]),
        (vec![1030], vec![0], vec![37, 1030]),
    ]
}

fn layer(features: &[usize], axes: &[usize], activation: Activation, backend: Backend) -> BatchNorm {
    let config = Config::new().activation(activation);
    let mut bn = BatchNorm::with_config(features, axes, config).expect("valid layer");
    bn.set_backend(Some(backend)).expect("available backend");
    let c = bn.features();
    let gamma: Vec<f32> = (0..c).map(|j| 0.5 + (j % 5) as f32 * 0.3).collect();
    let beta: Vec<f32> = (0..c).map(|j| (j % 3) as f32 * 0.4 - 0.4).collect();
    bn.update_params(&gamma, &beta).expect("finite parameters");
    bn
}

/// Data whose normalized values straddle zero, with a few exact repeats of the mean.
fn data(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32 * 2.0 + 3.0).collect()
}

#[test]
fn relu_layer_matches_the_unfused_composition_on_every_backend() {
    for backend in Backend::available() {
        for (features, axes, shape) in cases() {
            let n: usize = shape.iter().product();
            let mut rng = Rng::new(n as u64 + 17);
            let x = data(&mut rng, n);
            let dy: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let what = |m: &str| format!("{m}, {backend}, shape {shape:?}");
            let mut fused = layer(&features, &axes, Activation::Relu, backend);
            let mut plain = layer(&features, &axes, Activation::Identity, backend);

            // Training forward.
            let (mut y, mut y_plain) = (vec![0.0; n], vec![0.0; n]);
            fused.forward_train(&x, &shape, &mut y).unwrap();
            plain.forward_train(&x, &shape, &mut y_plain).unwrap();
            let expected: Vec<f32> = y_plain.iter().map(|&v| relu(v)).collect();
            assert_bits_eq(&y, &expected, &what("forward_train"));
            assert_eq!(bits(fused.running_mean()), bits(plain.running_mean()), "{}", what("running mean"));
            assert_eq!(bits(fused.running_var()), bits(plain.running_var()), "{}", what("running var"));
            assert!(y.contains(&0.0) && y.iter().any(|&v| v > 0.0), "{}", what("mask"));

            // Training backward: the plain backward of dy masked by y > 0.
            let masked: Vec<f32> = dy.iter().zip(&y).map(|(&g, &v)| if v > 0.0 { g } else { 0.0 }).collect();
            let (mut dx, mut dx_plain) = (vec![0.0; n], vec![0.0; n]);
            fused.backward(&x, &dy, &shape, &mut dx).unwrap();
            plain.backward(&x, &masked, &shape, &mut dx_plain).unwrap();
            assert_bits_eq(&dx, &dx_plain, &what("backward dx"));
            assert_bits_eq(fused.gamma_grad(), plain.gamma_grad(), &what("backward dgamma"));
            assert_bits_eq(fused.beta_grad(), plain.beta_grad(), &what("backward dbeta"));

            // Inference, out of place and in place.
            fused.forward_eval(&x, &shape, &mut y).unwrap();
            plain.forward_eval(&x, &shape, &mut y_plain).unwrap();
            let expected: Vec<f32> = y_plain.iter().map(|&v| relu(v)).collect();
            assert_bits_eq(&y, &expected, &what("forward_eval"));
            let mut xy = x.clone();
            fused.forward_eval_inplace(&mut xy, &shape).unwrap();
            assert_bits_eq(&xy, &y, &what("forward_eval_inplace"));

            // Frozen-statistics backward.
            let masked: Vec<f32> = dy.iter().zip(&y).map(|(&g, &v)| if v > 0.0 { g } else { 0.0 }).collect();
            fused.backward_eval(&x, &dy, &shape, &mut dx).unwrap();
            plain.backward_eval(&x, &masked, &shape, &mut dx_plain).unwrap();
            assert_bits_eq(&dx, &dx_plain, &what("backward_eval dx"));
            assert_bits_eq(fused.gamma_grad(), plain.gamma_grad(), &what("backward_eval dgamma"));
        }
    }
}

#[test]
fn residual_form_matches_the_unfused_composition_on_every_backend() {
    for backend in Backend::available() {
        for (features, axes, shape) in cases() {
            let n: usize = shape.iter().product();
            let mut rng = Rng::new(n as u64 + 29);
            let x = data(&mut rng, n);
            let residual: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let dy: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let what = |m: &str| format!("{m}, {backend}, shape {shape:?}");
            // The residual form ignores the layer's own activation: test it on a ReLU layer.
            let mut fused = layer(&features, &axes, Activation::Relu, backend);
            let mut plain = layer(&features, &axes, Activation::Identity, backend);

            let (mut y, mut y_plain) = (vec![0.0; n], vec![0.0; n]);
            fused.forward_train_add_relu(&x, &residual, &shape, &mut y).unwrap();
            plain.forward_train(&x, &shape, &mut y_plain).unwrap();
            let expected: Vec<f32> = y_plain.iter().zip(&residual).map(|(&v, &r)| relu(v + r)).collect();
            assert_bits_eq(&y, &expected, &what("forward_train_add_relu"));
            assert_eq!(fused.num_batches_tracked(), 1);
            assert_eq!(bits(fused.running_var()), bits(plain.running_var()), "{}", what("running var"));

            let masked: Vec<f32> = dy.iter().zip(&y).map(|(&g, &v)| if v > 0.0 { g } else { 0.0 }).collect();
            let (mut dx, mut dres, mut dx_plain) = (vec![0.0; n], vec![f32::NAN; n], vec![0.0; n]);
            fused.backward_add_relu(&x, &residual, &dy, &shape, &mut dx, &mut dres).unwrap();
            plain.backward(&x, &masked, &shape, &mut dx_plain).unwrap();
            assert_bits_eq(&dres, &masked, &what("backward_add_relu dresidual"));
            assert_bits_eq(&dx, &dx_plain, &what("backward_add_relu dx"));
            assert_bits_eq(fused.gamma_grad(), plain.gamma_grad(), &what("backward_add_relu dgamma"));
            assert_bits_eq(fused.beta_grad(), plain.beta_grad(), &what("backward_add_relu dbeta"));

            fused.forward_eval_add_relu(&x, &residual, &shape, &mut y).unwrap();
            plain.forward_eval(&x, &shape, &mut y_plain).unwrap();
            let expected: Vec<f32> = y_plain.iter().zip(&residual).map(|(&v, &r)| relu(v + r)).collect();
            assert_bits_eq(&y, &expected, &what("forward_eval_add_relu"));

            let masked: Vec<f32> = dy.iter().zip(&y).map(|(&g, &v)| if v > 0.0 { g } else { 0.0 }).collect();
            fused.backward_eval_add_relu(&x, &residual, &dy, &shape, &mut dx, &mut dres).unwrap();
            plain.backward_eval(&x, &masked, &shape, &mut dx_plain).unwrap();
            assert_bits_eq(&dres, &masked, &what("backward_eval_add_relu dresidual"));
            assert_bits_eq(&dx, &dx_plain, &what("backward_eval_add_relu dx"));
        }
    }
}

#[test]
fn fused_paths_are_bit_identical_across_thread_counts() {
    let (features, axes, shape) = (vec![16], vec![0, 2], vec![8, 16, 2100]);
    let n: usize = shape.iter().product();
    let mut rng = Rng::new(5);
    let x = data(&mut rng, n);
    let residual: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let dy: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut bn = layer(&features, &axes, Activation::Relu, Backend::detect());
            let (mut y, mut dx, mut dres) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            bn.forward_train_add_relu(&x, &residual, &shape, &mut y).unwrap();
            bn.backward_add_relu(&x, &residual, &dy, &shape, &mut dx, &mut dres).unwrap();
            let mut y2 = vec![0.0; n];
            bn.forward_train(&x, &shape, &mut y2).unwrap();
            (bits(&y), bits(&dx), bits(&dres), bits(&y2), bits(bn.gamma_grad()))
        })
    };
    let one = run(1);
    for threads in [2, 3, 4, 7] {
        assert!(run(threads) == one, "{threads} threads differ from 1");
    }
}

#[test]
fn relu_passes_nan_through_and_masks_its_gradient() {
    for backend in Backend::available() {
        let mut bn = layer(&[3], &[0], Activation::Relu, backend);
        let shape = [4, 3];
        let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
        let mut y = [0.0f32; 12];
        bn.forward_train(&x, &shape, &mut y).unwrap();
        let mut xn = x;
        xn[4] = f32::NAN;
        bn.forward_eval(&xn, &shape, &mut y).unwrap();
        assert!(y[4].is_nan(), "{backend}: relu(NaN) must stay NaN, got {}", y[4]);
        assert!(y.iter().enumerate().all(|(i, v)| i == 4 || v.is_finite()));
    }
}

#[test]
fn f64_residual_backward_matches_finite_differences() {
    let shape = [6usize, 2, 3];
    let n = 36;
    let mut rng = Rng::new(11);
    let x: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    let residual: Vec<f64> = (0..n).map(|_| rng.normal() * 0.5).collect();
    let w: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    let config = Config::new().eps(1e-3);
    let layout = batchnorm::Layout::from_axes(&[2], &[0, 2]).unwrap();
    let mut bn = BatchNorm::<f64>::with_layout(layout, config).unwrap();
    bn.update_params(&[1.3, 0.7], &[0.2, -0.1]).unwrap();
    let loss = |bn: &mut BatchNorm<f64>, x: &[f64], r: &[f64]| {
        let mut y = vec![0.0; n];
        bn.forward_train_add_relu(x, r, &shape, &mut y).unwrap();
        y.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>()
    };
    // The data keep every pre-activation away from the kink, so finite differences are smooth.
    let mut y = vec![0.0; n];
    let mut probe = bn.clone();
    probe.forward_train(&x, &shape, &mut y).unwrap();
    let nearest = y.iter().zip(&residual).map(|(a, b)| (a + b).abs()).fold(f64::INFINITY, f64::min);
    assert!(nearest > 1e-3, "test data too close to the kink: {nearest}");

    loss(&mut bn, &x, &residual);
    let (mut dx, mut dres) = (vec![0.0; n], vec![0.0; n]);
    bn.backward_add_relu(&x, &residual, &w, &shape, &mut dx, &mut dres).unwrap();
    let h = 1e-6;
    for i in 0..n {
        let mut probe = bn.clone();
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[i] += h;
        xm[i] -= h;
        let numeric = (loss(&mut probe, &xp, &residual) - loss(&mut probe, &xm, &residual)) / (2.0 * h);
        assert!((numeric - dx[i]).abs() < 1e-6 + 1e-5 * numeric.abs(), "dx[{i}]: {} vs {numeric}", dx[i]);
        let (mut rp, mut rm) = (residual.clone(), residual.clone());
        rp[i] += h;
        rm[i] -= h;
        let numeric = (loss(&mut probe, &x, &rp) - loss(&mut probe, &x, &rm)) / (2.0 * h);
        assert!((numeric - dres[i]).abs() < 1e-6, "dresidual[{i}]: {} vs {numeric}", dres[i]);
    }
}

#[batch_norm(features = 16, axes = [0, 2], activation = "relu")]
struct ReluBn;

#[batch_norm(features = 16, axes = [0, 2])]
struct PlainBn;

#[test]
fn macro_layers_fuse_the_activation_like_the_runtime_layer() {
    assert_eq!(ReluBn::new().config().get_activation(), Activation::Relu);
    assert_eq!(PlainBn::new().config().get_activation(), Activation::Identity);
    let shape = [4usize, 16, 37];
    let n: usize = shape.iter().product();
    let mut rng = Rng::new(3);
    let x = data(&mut rng, n);
    let residual: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let dy: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let mut runtime = BatchNorm::with_config(16, [0, 2], Config::new().activation(Activation::Relu)).unwrap();
    let mut relu_bn = ReluBn::new();
    let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
    relu_bn.forward_train(&x, &shape, &mut a).unwrap();
    runtime.forward_train(&x, &shape, &mut b).unwrap();
    assert_bits_eq(&a, &b, "macro relu forward_train");
    let (mut da, mut db) = (vec![0.0; n], vec![0.0; n]);
    relu_bn.backward(&x, &dy, &shape, &mut da).unwrap();
    runtime.backward(&x, &dy, &shape, &mut db).unwrap();
    assert_bits_eq(&da, &db, "macro relu backward");

    // The residual form through the inherent methods and through the trait.
    let mut plain = PlainBn::new();
    let mut via_trait = PlainBn::new();
    plain.forward_train_add_relu(&x, &residual, &shape, &mut a).unwrap();
    BatchNormLayer::forward_train_add_relu(&mut via_trait, &x, &residual, &shape, &mut b).unwrap();
    assert_bits_eq(&a, &b, "macro residual forward_train");
    let (mut ra, mut rb) = (vec![0.0; n], vec![0.0; n]);
    plain.backward_add_relu(&x, &residual, &dy, &shape, &mut da, &mut ra).unwrap();
    BatchNormLayer::backward_add_relu(&mut via_trait, &x, &residual, &dy, &shape, &mut db, &mut rb).unwrap();
    assert_bits_eq(&da, &db, "macro residual dx");
    assert_bits_eq(&ra, &rb, "macro residual dresidual");
}

#[test]
fn a_wrong_residual_is_an_error_that_changes_nothing() {
    let mut bn = layer(&[2], &[0], Activation::Identity, Backend::detect());
    let shape = [3, 2];
    let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 7.0];
    let before = format!("{:?}", (bn.running_mean(), bn.running_var(), bn.num_batches_tracked()));
    let mut y = [0.0f32; 6];
    let err = bn.forward_train_add_relu(&x, &[0.0; 5], &shape, &mut y).unwrap_err();
    assert!(matches!(err, BnError::BufferLength { buffer: "residual", expected: 6, got: 5, .. }), "{err}");
    assert_eq!(before, format!("{:?}", (bn.running_mean(), bn.running_var(), bn.num_batches_tracked())));
    let err = bn.forward_eval_add_relu(&x, &[0.0; 7], &shape, &mut y).unwrap_err();
    assert!(matches!(err, BnError::BufferLength { buffer: "residual", .. }), "{err}");

    bn.forward_train_add_relu(&x, &[0.0; 6], &shape, &mut y).unwrap();
    let grads = format!("{:?}", (bn.gamma_grad(), bn.beta_grad()));
    let (mut dx, mut dres) = ([0.0f32; 6], [0.0f32; 4]);
    let err = bn.backward_add_relu(&x, &[0.0; 6], &[1.0; 6], &shape, &mut dx, &mut dres).unwrap_err();
    assert!(matches!(err, BnError::BufferLength { buffer: "dresidual", expected: 6, got: 4, .. }), "{err}");
    assert_eq!(grads, format!("{:?}", (bn.gamma_grad(), bn.beta_grad())));
}

#[test]
fn sixteen_bit_layers_apply_and_differentiate_the_activation() {
    use batchnorm::half::bf16;
    let shape = [4usize, 8, 33];
    let n: usize = shape.iter().product();
    let mut rng = Rng::new(77);
    let x: Vec<bf16> = (0..n).map(|_| bf16::from_f64(rng.normal() * 2.0 + 1.0)).collect();
    let dy: Vec<bf16> = (0..n).map(|_| bf16::from_f64(rng.normal())).collect();
    let layout = || batchnorm::Layout::from_axes(&[8], &[0, 2]).unwrap();
    for backend in Backend::available() {
        let relu_config = Config::new().activation(Activation::Relu);
        let mut fused = BatchNorm::<bf16>::with_layout(layout(), relu_config).unwrap();
        let mut plain = BatchNorm::<bf16>::with_layout(layout(), Config::new()).unwrap();
        fused.set_backend(Some(backend)).unwrap();
        plain.set_backend(Some(backend)).unwrap();
        let zero = bf16::from_f32(0.0);
        let (mut y, mut y_plain) = (vec![zero; n], vec![zero; n]);
        fused.forward_train(&x, &shape, &mut y).unwrap();
        plain.forward_train(&x, &shape, &mut y_plain).unwrap();
        let expected: Vec<bf16> = y_plain.iter().map(|v| if v.to_f32() < 0.0 { zero } else { *v }).collect();
        assert_eq!(y, expected, "{backend}: bf16 forward_train with relu");
        let masked: Vec<bf16> =
            dy.iter().zip(&y).map(|(g, v)| if v.to_f32() > 0.0 { *g } else { zero }).collect();
        let (mut dx, mut dx_plain) = (vec![zero; n], vec![zero; n]);
        fused.backward(&x, &dy, &shape, &mut dx).unwrap();
        plain.backward(&x, &masked, &shape, &mut dx_plain).unwrap();
        assert_eq!(dx, dx_plain, "{backend}: bf16 backward with relu");
        fused.forward_eval(&x, &shape, &mut y).unwrap();
        plain.forward_eval(&x, &shape, &mut y_plain).unwrap();
        let expected: Vec<bf16> = y_plain.iter().map(|v| if v.to_f32() < 0.0 { zero } else { *v }).collect();
        assert_eq!(y, expected, "{backend}: bf16 forward_eval with relu");
    }
}
