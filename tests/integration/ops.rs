//! The stateless passes (`batchnorm::ops`): against the reference results of PyTorch, Keras and
//! the NumPy class for every manifest case (the running statistics kept by the caller), against
//! the layer on every backend and element type, and their errors.

use crate::common;

use batchnorm::half::{bf16, f16};
use batchnorm::ops::{BatchNormOps, BatchStats};
use batchnorm::{
    Activation, Backend, BatchNorm, BnError, Config, Element, Layout, Param, Preset, RunningVar,
};
use common::{assert_bits_eq, assert_close_shaped, bits, FWD, GRAD};

/// Every manifest case through the stateless passes, the caller holding gamma, beta and the
/// running statistics: the same tolerances as the layer's conformance test.
#[test]
fn every_conformance_case_through_the_stateless_passes() {
    for case in common::manifest() {
        let t = case.tensors();
        let name = &case.name;
        let (shape, n, c) = (&case.shape[..], case.len(), case.channels());
        let layout = Layout::from_axes(&case.features(), &case.axes).unwrap();
        let ops = BatchNormOps::<f32>::new(layout, case.config()).unwrap();
        let (gamma, beta) = (t.get("gamma"), t.get("beta"));
        let (mut running_mean, mut running_var) = (vec![0.0f32; c], vec![1.0f32; c]);
        let mut y = vec![f32::NAN; n];
        let mut last = None;
        for k in 0..case.steps {
            let x = t.get(&format!("x.{k}"));
            let stats = ops.forward_train(x, shape, gamma, beta, &mut y).unwrap();
            ops.update_running_stats(&stats, &mut running_mean, &mut running_var, k as u64).unwrap();
            assert_close_shaped(&format!("{name}: y.{k}"), Some(shape), &y, t.get(&format!("y.{k}")), FWD);
            let (m, v) = (t.get(&format!("running_mean.{k}")), t.get(&format!("running_var.{k}")));
            assert_close_shaped(&format!("{name}: running_mean.{k}"), None, &running_mean, m, FWD);
            assert_close_shaped(&format!("{name}: running_var.{k}"), None, &running_var, v, FWD);
            last = Some((x, stats));
        }
        let mut y_eval = vec![f32::NAN; n];
        ops.forward_eval(t.get("x_eval"), shape, &running_mean, &running_var, gamma, beta, &mut y_eval)
            .unwrap();
        assert_close_shaped(&format!("{name}: y_eval"), Some(shape), &y_eval, t.get("y_eval"), FWD);

        let (x, stats) = last.unwrap();
        let (mut dx, mut dgamma, mut dbeta) = (vec![f32::NAN; n], vec![f32::NAN; c], vec![f32::NAN; c]);
        ops.backward(x, t.get("dy"), shape, &stats, gamma, beta, &mut dx, &mut dgamma, &mut dbeta).unwrap();
        assert_close_shaped(&format!("{name}: dx"), Some(shape), &dx, t.get("dx"), GRAD);
        assert_close_shaped(&format!("{name}: dgamma"), None, &dgamma, t.get("dgamma"), GRAD);
        assert_close_shaped(&format!("{name}: dbeta"), None, &dbeta, t.get("dbeta"), GRAD);
    }
}

fn data<E: Element>(n: usize, seed: u64, scale: f64, offset: f64) -> Vec<E> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            E::from_f64(offset + scale * ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5))
        })
        .collect()
}

fn params<P: Param>(c: usize, seed: u64, offset: f64) -> Vec<P> {
    data::<f64>(c, seed, 1.0, offset).into_iter().map(P::from_f64).collect()
}

/// The layer and the stateless passes, given the same inputs, write the same bits: training
/// (output, running statistics), inference, and both backwards, with each activation, for
/// several configurations, on every backend this machine has.
fn matches_the_layer<E: Element>() {
    let cases: [(&[usize], &[usize], &[usize]); 3] =
        [(&[4, 6, 5, 3], &[6], &[0, 2, 3]), (&[7, 2, 3, 10], &[10], &[0, 1, 2]), (&[33, 5], &[5], &[0])];
    let configs = [
        Config::new(),
        Config::preset(Preset::Pytorch),
        Config::preset(Preset::Keras).running_var(RunningVar::Biased),
        Config::new().track_running_stats(false),
        Config::new().cumulative_momentum(),
    ];
    for backend in Backend::available() {
        for (shape, features, axes) in cases {
            for config in configs {
                for activation in [Activation::Identity, Activation::Relu] {
                    let config = config.activation(activation);
                    let what = format!("{} {backend:?} {shape:?} {config:?}", E::NAME);
                    let n: usize = shape.iter().product();
                    let c: usize = features.iter().product();
                    let layout = Layout::from_axes(features, axes).unwrap();
                    let mut layer = BatchNorm::<E>::with_layout(layout.clone(), config).unwrap();
                    layer.set_backend(Some(backend)).unwrap();
                    let mut ops = BatchNormOps::<E>::new(layout, config).unwrap();
                    ops.set_backend(Some(backend)).unwrap();
                    let (gamma, beta) = (params::<E::Param>(c, 1, 1.0), params::<E::Param>(c, 2, 0.0));
                    layer.update_params(&gamma, &beta).unwrap();
                    let (mut running_mean, mut running_var) =
                        (layer.running_mean().to_vec(), layer.running_var().to_vec());
                    let (x, dy) = (data::<E>(n, 3, 8.0, 1.5), data::<E>(n, 4, 2.0, 0.25));
                    let (mut y1, mut y2) = (vec![E::default(); n], vec![E::default(); n]);
                    let mut stats: Option<BatchStats> = None;
                    for step in 0..2u64 {
                        layer.forward_train(&x, shape, &mut y1).unwrap();
                        let s = ops.forward_train(&x, shape, &gamma, &beta, &mut y2).unwrap();
                        ops.update_running_stats(&s, &mut running_mean, &mut running_var, step).unwrap();
                        assert_bits_eq(&format!("{what}: training y"), &y2, &y1);
                        assert_eq!(bits(&running_mean), bits(layer.running_mean()), "{what}: running mean");
                        assert_eq!(bits(&running_var), bits(layer.running_var()), "{what}: running var");
                        assert_eq!(s.shape(), shape);
                        assert_eq!(s.count() as usize, n / c);
                        stats = Some(s);
                    }
                    let stats = stats.unwrap();
                    let (mut dx1, mut dx2) = (vec![E::default(); n], vec![E::default(); n]);
                    let (mut dg, mut db) = (vec![E::Param::default(); c], vec![E::Param::default(); c]);
                    layer.backward(&x, &dy, shape, &mut dx1).unwrap();
                    ops.backward(&x, &dy, shape, &stats, &gamma, &beta, &mut dx2, &mut dg, &mut db).unwrap();
                    assert_bits_eq(&format!("{what}: dx"), &dx2, &dx1);
                    assert_eq!(bits(&dg), bits(layer.gamma_grad()), "{what}: dgamma");
                    assert_eq!(bits(&db), bits(layer.beta_grad()), "{what}: dbeta");

                    layer.forward_eval(&x, shape, &mut y1).unwrap();
                    ops.forward_eval(&x, shape, &running_mean, &running_var, &gamma, &beta, &mut y2).unwrap();
                    assert_bits_eq(&format!("{what}: inference y"), &y2, &y1);
                    layer.backward_eval(&x, &dy, shape, &mut dx1).unwrap();
                    ops.backward_eval(
                        &x,
                        &dy,
                        shape,
                        &running_mean,
                        &running_var,
                        &gamma,
                        &beta,
                        &mut dx2,
                        &mut dg,
                        &mut db,
                    )
                    .unwrap();
                    assert_bits_eq(&format!("{what}: inference dx"), &dx2, &dx1);
                    assert_eq!(bits(&dg), bits(layer.gamma_grad()), "{what}: inference dgamma");
                    assert_eq!(bits(&db), bits(layer.beta_grad()), "{what}: inference dbeta");
                }
            }
        }
    }
}

#[test]
fn f32_passes_match_the_layer() {
    matches_the_layer::<f32>();
}

#[test]
fn f64_passes_match_the_layer() {
    matches_the_layer::<f64>();
}

#[test]
fn bf16_passes_match_the_layer() {
    matches_the_layer::<bf16>();
}

#[test]
fn f16_passes_match_the_layer() {
    matches_the_layer::<f16>();
}

/// One module applied twice in a graph: each backward takes its own forward's statistics, and
/// gives what a lone forward and backward of that batch gives.
#[test]
fn two_applications_keep_their_own_statistics() {
    let (shape, c, n) = ([8usize, 3, 4], 3, 96);
    let ops = BatchNormOps::<f32>::new(Layout::from_axes(&[3], &[0, 2]).unwrap(), Config::new()).unwrap();
    let (gamma, beta) = (params::<f32>(c, 5, 1.0), params::<f32>(c, 6, 0.0));
    let (a, b, dy) = (data::<f32>(n, 7, 4.0, 1.0), data::<f32>(n, 8, 9.0, -3.0), data::<f32>(n, 9, 1.0, 0.0));
    let mut y = vec![0.0; n];
    let stats_a = ops.forward_train(&a, &shape, &gamma, &beta, &mut y).unwrap();
    let stats_b = ops.forward_train(&b, &shape, &gamma, &beta, &mut y).unwrap();
    assert_ne!(stats_a.mean(), stats_b.mean());

    let mut lone = BatchNorm::new(3, [0, 2]).unwrap();
    lone.update_params(&gamma, &beta).unwrap();
    lone.forward_train(&a, &shape, &mut y).unwrap();
    let mut dx_lone = vec![0.0; n];
    lone.backward(&a, &dy, &shape, &mut dx_lone).unwrap();

    let (mut dx, mut dg, mut db) = (vec![0.0; n], vec![0.0; c], vec![0.0; c]);
    ops.backward(&a, &dy, &shape, &stats_a, &gamma, &beta, &mut dx, &mut dg, &mut db).unwrap();
    assert_bits_eq("dx of the first application", &dx, &dx_lone);
    assert_bits_eq("dgamma of the first application", &dg, lone.gamma_grad());
    assert_bits_eq("dbeta of the first application", &db, lone.beta_grad());
}

#[test]
fn the_passes_check_their_arguments_and_write_nothing_on_error() {
    let ops = BatchNormOps::<f32>::new(Layout::from_axes(&[2], &[0]).unwrap(), Config::new()).unwrap();
    let shape = [3, 2];
    let x = [1.0, 2.0, 3.0, 5.0, 6.0, 9.0];
    let (gamma, beta) = ([1.0, 1.0], [0.0, 0.0]);
    let mut y = [0.0; 6];
    assert!(matches!(
        ops.forward_train(&x, &shape, &gamma[..1], &beta, &mut y),
        Err(BnError::ParamLength { name: "gamma", expected: 2, got: 1 })
    ));
    assert!(matches!(
        ops.forward_train(&x, &shape, &[1.0, f32::NAN], &beta, &mut y),
        Err(BnError::NonFinite { what: "gamma", index: 1, .. })
    ));
    assert!(matches!(
        ops.forward_train(&x, &[2, 2], &gamma, &beta, &mut y),
        Err(BnError::BufferLength { .. })
    ));
    assert!(matches!(
        ops.forward_train(&x[..2], &[1, 2], &gamma, &beta, &mut y[..2]),
        Err(BnError::TooFewValues { .. })
    ));
    let stats = ops.forward_train(&x, &shape, &gamma, &beta, &mut y).unwrap();

    let (mut dx, mut dg, mut db) = ([7.0; 4], [7.0; 2], [7.0; 2]);
    assert!(matches!(
        ops.backward(&x[..4], &x[..4], &[2, 2], &stats, &gamma, &beta, &mut dx, &mut dg, &mut db),
        Err(BnError::BackwardShape { .. })
    ));
    let mut dx6 = [7.0; 6];
    assert!(matches!(
        ops.backward(&x, &x, &shape, &stats, &gamma, &beta, &mut dx6, &mut dg[..1], &mut db),
        Err(BnError::ParamLength { name: "dgamma", .. })
    ));
    assert_eq!((dx, dx6, dg, db), ([7.0; 4], [7.0; 6], [7.0; 2], [7.0; 2]), "nothing written on error");

    let (mut rm, mut rv) = ([0.0; 2], [1.0, -1.0]);
    assert!(matches!(
        ops.forward_eval(&x, &shape, &rm, &rv, &gamma, &beta, &mut y),
        Err(BnError::NegativeVariance { index: 1, .. })
    ));
    assert!(matches!(
        ops.update_running_stats(&stats, &mut rm[..1], &mut rv, 0),
        Err(BnError::ParamLength { name: "running_mean", .. })
    ));
    assert_eq!((rm, rv), ([0.0; 2], [1.0, -1.0]));

    let fixed =
        BatchNormOps::<f32>::new(Layout::from_axes(&[2], &[0]).unwrap(), Config::new().scale(false)).unwrap();
    assert!(matches!(
        fixed.forward_train(&x, &shape, &[2.0, 1.0], &beta, &mut y),
        Err(BnError::FixedParameter { name: "gamma", .. })
    ));
    assert!(matches!(
        BatchNormOps::<f32>::new(Layout::from_axes(&[2], &[0]).unwrap(), Config::new().eps(-1.0)),
        Err(BnError::InvalidConfig(_))
    ));
}
