//! The f32 training backward writes `dx` over the output gradient when it holds the only
//! reference to it: the same bits as the backward into a fresh buffer (taken when the gradient
//! is shared), on shapes of every schedule of the kernels: long runs, short runs (spans), a
//! split backward, rows, rank 3, tiny and odd extents.
#![allow(deprecated)] // burn 0.22 deprecates NdArray; it is the backend we accelerate.

use bn_burn::{BatchNormBackend, FusedGradients};
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::NdArray;
use ndarray::{ArcArray, IxDyn};

mod common;

use common::values;

fn tensor(values: Vec<f32>, shape: &[usize]) -> NdArrayTensor {
    NdArrayTensor::from(ArcArray::from_shape_vec(IxDyn(shape), values).expect("shape"))
}

fn address(t: &NdArrayTensor) -> *const f32 {
    match t {
        NdArrayTensor::F32(storage) => storage.view().as_ptr(),
        _ => panic!("not f32"),
    }
}

fn bits(t: &NdArrayTensor) -> Vec<u32> {
    match t {
        NdArrayTensor::F32(storage) => storage.view().iter().map(|v| v.to_bits()).collect(),
        _ => panic!("not f32"),
    }
}

#[test]
fn dx_over_the_output_gradient_has_the_fresh_buffers_bits() {
    let shapes: [&[usize]; 7] = [
        &[40, 8, 30, 30],  // long runs, the fused schedule
        &[2, 4, 200, 200], // runs of 40,000 values, too large to fuse: the split schedule
        &[32, 64, 7, 7],   // short runs (spans)
        &[300, 1000],      // rows
        &[3, 5, 17],       // rank 3
        &[50, 3],          // tiny
        &[17, 6, 33, 35],  // odd extents
    ];
    for (k, shape) in shapes.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let c = shape[1];
        let seed = 10 * k as u64;
        let x = values(n, seed + 1);
        let gamma = values(c, seed + 2).iter().map(|v| 0.5 * v + 1.0).collect::<Vec<_>>();
        let forward = NdArray::fused_batch_norm_train(
            tensor(x.clone(), shape),
            tensor(gamma, &[c]),
            tensor(values(c, seed + 3), &[c]),
            1e-5,
        );
        let dy = values(n, seed + 4);

        // Shared (another reference is held): dx goes to a fresh buffer.
        let shared = tensor(dy.clone(), shape);
        let held = shared.clone();
        let fresh: FusedGradients<NdArray> =
            NdArray::fused_batch_norm_train_backward(tensor(x.clone(), shape), shared, forward.saved.clone());
        assert_ne!(address(&fresh.x_grad), address(&held), "{shape:?}: the shared gradient was overwritten");
        assert_eq!(
            bits(&held),
            dy.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{shape:?}: shared gradient changed"
        );

        // Sole owner: dx is written over it.
        let owned = tensor(dy, shape);
        let at = address(&owned);
        let in_place = NdArray::fused_batch_norm_train_backward(tensor(x, shape), owned, forward.saved);
        assert_eq!(address(&in_place.x_grad), at, "{shape:?}: dx over the gradient");

        assert_eq!(bits(&in_place.x_grad), bits(&fresh.x_grad), "{shape:?}: dx");
        assert_eq!(bits(&in_place.gamma_grad), bits(&fresh.gamma_grad), "{shape:?}: dgamma");
        assert_eq!(bits(&in_place.beta_grad), bits(&fresh.beta_grad), "{shape:?}: dbeta");
    }
}
