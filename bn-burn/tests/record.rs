//! The record is burn-nn's: save ours and load it into burn-nn's module and back, with the
//! running statistics and parameters intact; and the runtime selection of our kernels.
#![allow(deprecated)] // burn 0.22 deprecates NdArray; it is the backend we accelerate.

use burn::module::Module;
use burn::nn as burn_nn;
use burn::tensor::{DType, Device, Tensor, TensorData};

fn data<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data")
}

#[test]
fn save_file_round_trip_through_burn_nn() {
    let device = Device::ndarray().autodiff();
    let bn = bn_burn::BatchNormConfig::new(3).with_momentum(0.5).init(&device);
    let x = Tensor::<4>::from_data(
        TensorData::new((0..36).map(|i| (i * i % 7) as f32).collect::<Vec<_>>(), [3, 3, 2, 2]),
        &device,
    );
    for _ in 0..2 {
        let _ = bn.forward(x.clone());
    }
    let (mean, var) = (data(bn.running_mean.value_sync()), data(bn.running_var.value_sync()));
    assert!(var.iter().all(|&v| (v - 1.0).abs() > 1e-3), "the statistics moved: {var:?}");

    let dir = std::env::temp_dir().join(format!("bn-burn-record-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ours_path = dir.join("ours.bpk");
    bn.clone().save_file(&ours_path).expect("save ours");

    // Into burn-nn's module.
    let theirs = burn_nn::BatchNormConfig::new(3).init(&device).load_file(&ours_path);
    assert_eq!(data(theirs.running_mean.value_sync()), mean);
    assert_eq!(data(theirs.running_var.value_sync()), var);

    // And back from burn-nn's file into ours.
    let theirs_path = dir.join("theirs.bpk");
    theirs.save_file(&theirs_path).expect("save burn-nn");
    let back = bn_burn::BatchNormConfig::new(3).init(&device).load_file(&theirs_path);
    assert_eq!(data(back.running_mean.value_sync()), mean);
    assert_eq!(data(back.running_var.value_sync()), var);
    assert_eq!(data(back.gamma.val()), data(bn.gamma.val()));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The selection of our kernels: NdArray (plain or autodiff) with f32/f64; every other dtype
/// goes to burn's implementation (the enabled features compile no other backend in).
#[test]
fn acceleration_is_selected_by_device_and_dtype() {
    let plain = Device::ndarray();
    let autodiff = plain.clone().autodiff();
    for device in [&plain, &autodiff] {
        assert!(bn_burn::is_accelerated(device, DType::F32));
        assert!(bn_burn::is_accelerated(device, DType::F64));
        assert!(!bn_burn::is_accelerated(device, DType::F16));
        assert!(!bn_burn::is_accelerated(device, DType::BF16));
    }
}

/// A call the kernels do not take (per-channel tensors of another dtype than the input) runs
/// burn's implementation: it panics exactly where burn's own function does.
#[test]
fn mixed_dtypes_take_burns_path() {
    let device = Device::ndarray().autodiff();
    let x = Tensor::<2>::from_data(
        TensorData::new((0..12).map(|i| i as f32).collect::<Vec<_>>(), [4, 3]),
        &device,
    );
    let (gamma, beta) = (Tensor::<1>::ones([3], &device).cast(DType::F64), Tensor::<1>::zeros([3], &device));
    let run = |f: fn(Tensor<2>, Tensor<1>, Tensor<1>) -> Tensor<2>| {
        let (x, gamma, beta) = (x.clone(), gamma.clone(), beta.clone());
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || f(x, gamma, beta)))
            .map_err(|e| e.downcast_ref::<String>().cloned().unwrap_or_default())
    };
    let ours = run(|x, g, b| bn_burn::functional::batch_norm_train(x, g, b, 1e-5).output);
    let theirs = run(|x, g, b| burn::tensor::module::batch_norm_train(x, g, b, 1e-5).output);
    match (ours, theirs) {
        (Err(a), Err(b)) => assert_eq!(a, b),
        (Ok(a), Ok(b)) => assert_eq!(data(a), data(b)),
        (a, b) => panic!("ours {:?}, burn's {:?}", a.is_ok(), b.is_ok()),
    }
}
