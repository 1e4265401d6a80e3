//! The attribute's `spatial` key: static extents of the reduced axes after the first.
//!
//! A layer with `spatial` runs the same kernels with the inner extent as a compile-time
//! constant: its results must equal the runtime-generic layer's bit for bit, and a shape with
//! other extents is an error that leaves the layer unchanged.

use crate::common;

use batchnorm::{batch_norm, BatchNorm, BatchNormLayer, BnError};
use common::Rng;

/// NCHW with static H and W: inner = 5 * 7 is a constant.
#[batch_norm(features = 7, axes = [0, 2, 3], spatial = [5, 7])]
struct Nchw57;

/// NHWC: the feature axis is last (inner = 1 anyway); H and W are checked.
#[batch_norm(features = 16, axes = [0, 1, 2], spatial = [3, 9])]
struct Nhwc39;

/// NCL with a static length, written as one integer.
#[batch_norm(features = 4, axes = [0, 2], spatial = 1000)]
struct Ncl1000;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn same_as_runtime<L: BatchNormLayer<Elem = f32, Param = f32>>(
    mut layer: L,
    features: usize,
    axes: &[usize],
    shape: &[usize],
) {
    let n: usize = shape.iter().product();
    let mut rng = Rng::new(n as u64);
    let x: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * 3.0 + 1.0).collect();
    let dy: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let mut runtime = BatchNorm::new(features, axes).unwrap();
    let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
    layer.forward_train(&x, shape, &mut a).unwrap();
    runtime.forward_train(&x, shape, &mut b).unwrap();
    assert_eq!(bits(&a), bits(&b), "forward_train {shape:?}");
    layer.backward(&x, &dy, shape, &mut a).unwrap();
    runtime.backward(&x, &dy, shape, &mut b).unwrap();
    assert_eq!(bits(&a), bits(&b), "backward {shape:?}");
    assert_eq!(bits(layer.gamma_grad()), bits(runtime.gamma_grad()));
    layer.forward_eval(&x, shape, &mut a).unwrap();
    runtime.forward_eval(&x, shape, &mut b).unwrap();
    assert_eq!(bits(&a), bits(&b), "forward_eval {shape:?}");
    assert_eq!(bits(layer.running_var()), bits(runtime.running_var()));
}

#[test]
fn spatial_layers_match_the_runtime_layer_bit_for_bit() {
    same_as_runtime(Nchw57::new(), 7, &[0, 2, 3], &[3, 7, 5, 7]);
    same_as_runtime(Nchw57::new(), 7, &[0, 2, 3], &[64, 7, 5, 7]); // above the parallel threshold
    same_as_runtime(Nhwc39::new(), 16, &[0, 1, 2], &[5, 3, 9, 16]);
    same_as_runtime(Ncl1000::new(), 4, &[0, 2], &[6, 4, 1000]);
}

#[test]
fn another_spatial_extent_is_an_error_that_changes_nothing() {
    let mut bn = Nchw57::new();
    let x = vec![1.0f32; 2 * 7 * 5 * 8];
    let mut y = vec![0.0f32; x.len()];
    let err = bn.forward_train(&x, &[2, 7, 5, 8], &mut y).unwrap_err();
    assert_eq!(err, BnError::SpatialMismatch { axis: 3, expected: 7, got: 8, shape: vec![2, 7, 5, 8] });
    assert!(err.to_string().contains("axis 3") && err.to_string().contains("spatial"), "{err}");
    assert_eq!(bn.num_batches_tracked(), 0);
    for result in [
        bn.forward_eval(&x, &[2, 7, 5, 8], &mut y),
        bn.forward_eval_inplace(&mut y, &[2, 7, 5, 8]),
        bn.backward_eval(&x, &x, &[2, 7, 5, 8], &mut y),
        BatchNormLayer::forward_eval(&bn, &x, &[2, 7, 8, 5], &mut y),
    ] {
        assert!(matches!(result, Err(BnError::SpatialMismatch { .. })), "{result:?}");
    }
    // The batch axis is free; a wrong rank is still the layer's rank error.
    let x = vec![1.0f32; 9 * 7 * 5 * 7];
    let mut y = vec![0.0f32; x.len()];
    assert!(bn.forward_eval(&x, &[9, 7, 5, 7], &mut y).is_ok());
    let err = bn.forward_eval(&x, &[9, 7, 35], &mut y).unwrap_err();
    assert!(matches!(err, BnError::RankMismatch { expected: 4, got: 3, .. }), "{err}");
    let mut nhwc = Nhwc39::new();
    let x = vec![1.0f32; 2 * 3 * 10 * 16];
    let mut y = vec![0.0f32; x.len()];
    let err = nhwc.forward_train(&x, &[2, 3, 10, 16], &mut y).unwrap_err();
    assert!(matches!(err, BnError::SpatialMismatch { axis: 2, expected: 9, got: 10, .. }), "{err}");
}
