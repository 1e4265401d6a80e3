//! bn-burn's `BatchNorm` against burn-nn's own `BatchNorm` (burn 0.22, NdArray + Autodiff): the
//! training forward, the running statistics after several steps, inference, and the gradients
//! of the input, gamma and beta through `backward()`; NC, NCHW, rank-3 and odd shapes.
#![allow(deprecated)] // burn 0.22 deprecates NdArray; it is the backend we accelerate.

use burn::module::{Module, Param};
use burn::nn as burn_nn;
use burn::tensor::{DType, Device, Tensor, TensorData};

mod common;

use common::values;

fn tensor<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(values(n, seed), shape), device)
}

fn vec_of<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data")
}

/// |a - b| <= atol + rtol |b| elementwise.
fn assert_close(what: &str, ours: &[f32], theirs: &[f32], atol: f32, rtol: f32) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    for (i, (&a, &b)) in ours.iter().zip(theirs).enumerate() {
        assert!((a - b).abs() <= atol + rtol * b.abs(), "{what}[{i}]: ours {a}, burn-nn {b}");
    }
}

/// Both modules with the same non-trivial gamma and beta.
fn pair(channels: usize, momentum: f64, device: &Device) -> (bn_burn::BatchNorm, burn_nn::BatchNorm) {
    let gamma = tensor([channels], 101, device).mul_scalar(0.5).add_scalar(1.0);
    let beta = tensor([channels], 202, device);
    let mut ours = bn_burn::BatchNormConfig::new(channels).with_momentum(momentum).init(device);
    let mut theirs = burn_nn::BatchNormConfig::new(channels).with_momentum(momentum).init(device);
    ours.gamma = Param::from_tensor(gamma.clone());
    ours.beta = Param::from_tensor(beta.clone());
    theirs.gamma = Param::from_tensor(gamma);
    theirs.beta = Param::from_tensor(beta);
    (ours, theirs)
}

/// Three training steps on different batches (output and the gradients of x, gamma and beta of
/// `sum(y * r)` compared at each), the running statistics after them, then inference.
fn check_shape<const D: usize>(shape: [usize; D]) {
    let device = Device::ndarray().autodiff();
    assert!(bn_burn::is_accelerated(&device, DType::F32), "the comparison runs our kernels");
    let channels = shape[1];
    let (ours, theirs) = pair(channels, 0.3, &device);
    let (tol_a, tol_r) = (2e-5, 2e-4);
    for step in 0..3u64 {
        let x = tensor(shape, 7 + step, &device).mul_scalar(1.0 + step as f32);
        let r = tensor(shape, 99 + step, &device);
        let x_ours = x.clone().require_grad();
        let x_theirs = x.require_grad();
        let y_ours = ours.forward(x_ours.clone());
        let y_theirs = theirs.forward(x_theirs.clone());
        assert_close(
            &format!("{shape:?} step {step}: y"),
            &vec_of(y_ours.clone()),
            &vec_of(y_theirs.clone()),
            tol_a,
            tol_r,
        );

        let g_ours = y_ours.mul(r.clone()).sum().backward();
        let g_theirs = y_theirs.mul(r).sum().backward();
        let grad = |t: &Tensor<D>, g| vec_of(t.grad(g).expect("x has a gradient"));
        assert_close(
            &format!("{shape:?} step {step}: dx"),
            &grad(&x_ours, &g_ours),
            &grad(&x_theirs, &g_theirs),
            1e-4,
            1e-3,
        );
        let pgrad = |p: &Param<Tensor<1>>, g| vec_of(p.grad(g).expect("parameter has a gradient"));
        assert_close(
            &format!("{shape:?} step {step}: dgamma"),
            &pgrad(&ours.gamma, &g_ours),
            &pgrad(&theirs.gamma, &g_theirs),
            1e-3,
            1e-4,
        );
        assert_close(
            &format!("{shape:?} step {step}: dbeta"),
            &pgrad(&ours.beta, &g_ours),
            &pgrad(&theirs.beta, &g_theirs),
            1e-3,
            1e-4,
        );
    }
    let stat = |t: Tensor<1>| vec_of(t);
    assert_close(
        &format!("{shape:?}: running_mean"),
        &stat(ours.running_mean.value_sync()),
        &stat(theirs.running_mean.value_sync()),
        tol_a,
        tol_r,
    );
    assert_close(
        &format!("{shape:?}: running_var"),
        &stat(ours.running_var.value_sync()),
        &stat(theirs.running_var.value_sync()),
        tol_a,
        tol_r,
    );
    // The statistics did move (the comparison is not of two untouched initial states).
    assert!(stat(ours.running_var.value_sync()).iter().all(|&v| (v - 1.0).abs() > 1e-3));

    // Inference: `valid()` (plain device, training flag off), as burn-nn.
    let (ours_eval, theirs_eval) = (ours.valid(), theirs.valid());
    let x = tensor(shape, 1234, &Device::ndarray());
    assert_close(
        &format!("{shape:?}: eval y"),
        &vec_of(ours_eval.forward(x.clone())),
        &vec_of(theirs_eval.forward(x)),
        tol_a,
        tol_r,
    );
}

#[test]
fn nc() {
    check_shape([16, 5]);
}

#[test]
fn nchw() {
    check_shape([4, 3, 5, 6]);
}

#[test]
fn rank_3() {
    check_shape([3, 4, 7]);
}

#[test]
fn odd_shapes() {
    check_shape([3, 17, 1, 3]);
    check_shape([1, 2, 3]);
    check_shape([2, 1, 3, 1, 2]);
}

/// Inference on an autodiff device with the layer frozen: burn-nn normalizes with the running
/// statistics and still differentiates through x; so do we.
#[test]
fn frozen_layer_on_autodiff_device() {
    let device = Device::ndarray().autodiff();
    let (ours, theirs) = pair(3, 0.1, &device);
    let (ours, theirs) = (ours.freeze(), theirs.freeze());
    let x = tensor([4, 3, 2, 2], 5, &device).require_grad();
    let r = tensor([4, 3, 2, 2], 6, &device);
    let y_ours = ours.forward(x.clone());
    let y_theirs = theirs.forward(x.clone());
    assert_close("frozen y", &vec_of(y_ours.clone()), &vec_of(y_theirs.clone()), 1e-5, 1e-5);
    let dx_ours = vec_of(x.grad(&y_ours.mul(r.clone()).sum().backward()).expect("dx"));
    let dx_theirs = vec_of(x.grad(&y_theirs.mul(r).sum().backward()).expect("dx"));
    assert_close("frozen dx", &dx_ours, &dx_theirs, 1e-5, 1e-4);
    // Frozen: the running statistics did not move.
    assert_eq!(vec_of(ours.running_mean.value_sync()), vec![0.0; 3]);
}

/// A plain (non-autodiff) device infers, as burn-nn, and leaves the running statistics alone.
#[test]
fn plain_device_infers() {
    let device = Device::ndarray();
    let (ours, theirs) = pair(4, 0.1, &device);
    let x = tensor([5, 4, 3], 8, &device);
    assert_close("plain y", &vec_of(ours.forward(x.clone())), &vec_of(theirs.forward(x)), 1e-6, 1e-6);
    assert_eq!(vec_of(ours.running_var.value_sync()), vec![1.0; 4]);
}

/// One value per channel: our kernels refuse it, so burn-nn's path runs, with its results.
#[test]
fn one_value_per_channel_runs_burns_path() {
    let device = Device::ndarray().autodiff();
    let (ours, theirs) = pair(3, 0.1, &device);
    let x = tensor([1, 3], 3, &device);
    assert_close("n=1 y", &vec_of(ours.forward(x.clone())), &vec_of(theirs.forward(x)), 1e-6, 1e-6);
    assert_close(
        "n=1 running_mean",
        &vec_of(ours.running_mean.value_sync()),
        &vec_of(theirs.running_mean.value_sync()),
        1e-6,
        1e-6,
    );
}

/// f64 tensors run the f64 kernels: the functional pass against burn's on the same f64 data.
#[test]
fn f64_functional_matches_burn() {
    let device = Device::ndarray().autodiff();
    let x = tensor([3, 2, 4], 11, &device).cast(DType::F64).require_grad();
    let gamma = tensor([2], 12, &device).cast(DType::F64).require_grad();
    let beta = tensor([2], 13, &device).cast(DType::F64).require_grad();
    assert_eq!(x.dtype(), DType::F64);
    let ours = bn_burn::functional::batch_norm_train(x.clone(), gamma.clone(), beta.clone(), 1e-5);
    let theirs = burn::tensor::module::batch_norm_train(x.clone(), gamma.clone(), beta.clone(), 1e-5);
    let as64 = |t: Tensor<3>| t.into_data().try_into_vec::<f64>().expect("f64");
    let (a, b) = (as64(ours.output.clone()), as64(theirs.output.clone()));
    assert!(a.iter().zip(&b).all(|(a, b)| (a - b).abs() < 1e-12), "{a:?} vs {b:?}");
    let g_ours = ours.output.sum().backward();
    let g_theirs = theirs.output.mul_scalar(1.0).sum().backward();
    let g = |t: &Tensor<1>, gr| t.grad(gr).expect("grad").into_data().try_into_vec::<f64>().expect("f64");
    let (a, b) = (g(&gamma, &g_ours), g(&gamma, &g_theirs));
    assert!(a.iter().zip(&b).all(|(a, b)| (a - b).abs() < 1e-10), "{a:?} vs {b:?}");
}

/// Errors: a wrong channel count panics as burn-nn does; a non-finite batch panics and the
/// running statistics stay as they were.
#[test]
fn errors_leave_state_unchanged() {
    let device = Device::ndarray().autodiff();
    let (ours, _) = pair(3, 0.1, &device);
    let wrong =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ours.forward(tensor([2, 4], 1, &device))));
    assert!(wrong.is_err());
    let mut data = values(12, 2);
    data[5] = f32::NAN;
    let x = Tensor::<2>::from_data(TensorData::new(data, [4, 3]), &device);
    let nan = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ours.forward(x)));
    assert!(nan.is_err());
    assert_eq!(vec_of(ours.running_mean.value_sync()), vec![0.0; 3]);
    assert_eq!(vec_of(ours.running_var.value_sync()), vec![1.0; 3]);
}

/// A strided input (a transposed view) is normalized as its values, as burn-nn does: the
/// kernels read a row-major copy made once.
#[test]
fn strided_input() {
    let device = Device::ndarray().autodiff();
    let (ours, theirs) = pair(3, 0.1, &device);
    let x = tensor([5, 3, 4], 21, &device).swap_dims(0, 2).require_grad(); // [4, 3, 5], strided
    let r = tensor([4, 3, 5], 22, &device);
    let y_ours = ours.forward(x.clone());
    let y_theirs = theirs.forward(x.clone());
    assert_close("strided y", &vec_of(y_ours.clone()), &vec_of(y_theirs.clone()), 2e-5, 2e-4);
    let dx_ours = vec_of(x.grad(&y_ours.mul(r.clone()).sum().backward()).expect("dx"));
    let dx_theirs = vec_of(x.grad(&y_theirs.mul(r).sum().backward()).expect("dx"));
    assert_close("strided dx", &dx_ours, &dx_theirs, 1e-4, 1e-3);
}

/// The running-statistics update in one operation gives the bits of burn-nn's tensor
/// arithmetic (`running * (1 - m) + batch * m`, the variance first scaled), f32 and f64, on the
/// plain and the autodiff device, for burn's biased and PyTorch's unbiased factor.
#[test]
fn running_stats_update_has_burns_bits() {
    let plain = Device::ndarray();
    for device in [plain.clone(), plain.autodiff()] {
        for dtype in [DType::F32, DType::F64] {
            for (momentum, factor) in [(0.1, 1.0), (0.37, 64.0 / 63.0), (1.0, 3.0 / 2.0), (0.0, 1.0)] {
                let t = |seed| tensor([37], seed, &device).cast(dtype);
                let (rm, rv, bm, bv) = (t(1), t(2).abs(), t(3), t(4).abs());
                let keep = 1.0 - momentum;
                let mean = rm.clone().mul_scalar(keep).add(bm.clone().mul_scalar(momentum));
                let var = rv.clone().mul_scalar(keep).add(bv.clone().mul_scalar(factor).mul_scalar(momentum));
                let (ours_mean, ours_var) =
                    bn_burn::functional::update_running_stats(rm, rv, bm, bv, momentum, factor);
                assert!(bn_burn::functional::is_accelerated(&device, dtype));
                assert_eq!(ours_mean.dtype(), dtype);
                let bits =
                    |t: Tensor<1>| t.into_data().convert::<f64>().try_into_vec::<f64>().expect("f64 data");
                let what = format!("{dtype:?} momentum {momentum} factor {factor}");
                assert_eq!(bits(ours_mean), bits(mean), "{what}: mean");
                assert_eq!(bits(ours_var), bits(var), "{what}: variance");
            }
        }
    }
}
