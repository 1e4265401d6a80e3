//! The clarifications of the public contract (docs/ARCHITECTURE.md), one test each (or one generic check run on
//! both the runtime-generic layer and a `#[batch_norm]` layer).

use crate::common;

use batchnorm::{
    batch_norm, BatchNorm, BatchNormArrayExt, BatchNormLayer, BnError, Config, Layout, Preset, RunningVar,
};
use common::{assert_bits_eq, assert_close, full_state, state, Rng, Tol};

/// The f32 layers the generic checks run on.
trait Layer: BatchNormLayer<Elem = f32, Param = f32> + Clone + std::fmt::Debug {}
impl<T: BatchNormLayer<Elem = f32, Param = f32> + Clone + std::fmt::Debug> Layer for T {}

/// NCHW with 3 channels, 8 values per channel.
const SHAPE: [usize; 4] = [2, 3, 2, 2];
const N: usize = 24;
const C: usize = 3;

/// The channel of flat index `i` in [`SHAPE`].
fn channel(i: usize) -> usize {
    (i / 4) % C
}

const TIGHT: Tol = Tol { atol: 1e-6, rtol: 1e-6 };

fn runtime_nchw() -> BatchNorm {
    BatchNorm::new(C, [0, 2, 3]).unwrap()
}

fn runtime_with(config: Config) -> BatchNorm {
    BatchNorm::with_config(C, [0, 2, 3], config).unwrap()
}

fn data(seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    (rng.vec(N, -2.0, 3.0), rng.vec(N, -1.0, 1.0))
}

fn train<L: Layer>(layer: &mut L, x: &[f32]) -> Vec<f32> {
    let mut y = vec![f32::NAN; x.len()];
    layer.forward_train(x, &SHAPE, &mut y).unwrap();
    y
}

fn eval<L: Layer>(layer: &L, x: &[f32]) -> Vec<f32> {
    let mut y = vec![f32::NAN; x.len()];
    layer.forward_eval(x, &SHAPE, &mut y).unwrap();
    y
}

fn backward<L: Layer>(layer: &mut L, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let mut dx = vec![f32::NAN; x.len()];
    layer.backward(x, dy, &SHAPE, &mut dx).unwrap();
    dx
}

fn backward_eval<L: Layer>(layer: &mut L, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let mut dx = vec![f32::NAN; x.len()];
    layer.backward_eval(x, dy, &SHAPE, &mut dx).unwrap();
    dx
}

/// A layer with non-trivial parameters and statistics that has trained on one batch.
fn trained<L: Layer>(mut layer: L) -> (L, Vec<f32>, Vec<f32>) {
    let cfg = *layer.config();
    let gamma = if cfg.get_scale() { [0.5, 1.5, -2.0] } else { [1.0; 3] };
    let beta = if cfg.get_center() { [0.1, -0.2, 0.3] } else { [0.0; 3] };
    layer.update_params(&gamma, &beta).unwrap();
    let (x, dy) = data(1);
    train(&mut layer, &x);
    (layer, x, dy)
}

/// What an observer can see of a layer: its getters, how it answers `forward_eval` and
/// `backward` on a probe (the latter shows the saved forward), all as bits.
type Observation = (common::State, Result<Vec<u64>, BnError>, Result<Vec<u64>, BnError>);

fn observe<L: Layer>(layer: &L, probe: &(Vec<f32>, Vec<f32>)) -> Observation {
    let mut y = vec![0.0; N];
    let eval = layer.forward_eval(&probe.0, &SHAPE, &mut y).map(|()| common::ebits(&y));
    let mut l = layer.clone();
    let mut dx = vec![0.0; N];
    let back = l.backward(&probe.0, &probe.1, &SHAPE, &mut dx).map(|()| {
        let mut v = common::ebits(&dx);
        v.extend(common::bits(l.gamma_grad()));
        v.extend(common::bits(l.beta_grad()));
        v
    });
    (state(layer), eval, back)
}

/// Runs `f`, which must fail, and checks the layer is bit-for-bit what it was.
fn expect_err<L: Layer>(layer: &mut L, what: &str, f: impl FnOnce(&mut L) -> Result<(), BnError>) -> BnError {
    let probe = data(1);
    let before = observe(layer, &probe);
    let err = match f(layer) {
        Ok(()) => panic!("{what}: expected an Err, got Ok"),
        Err(e) => e,
    };
    assert_eq!(observe(layer, &probe), before, "{what}: the layer changed after {err:?}");
    err
}

/// [`expect_err`] for the runtime layer, which also exposes `num_batches_tracked`.
fn expect_err_rt(
    layer: &mut BatchNorm,
    what: &str,
    f: impl FnOnce(&mut BatchNorm) -> Result<(), BnError>,
) -> BnError {
    let tracked = layer.num_batches_tracked();
    let full = full_state(layer);
    let err = expect_err(layer, what, f);
    assert_eq!(layer.num_batches_tracked(), tracked, "{what}: num_batches_tracked changed");
    assert_eq!(full_state(layer), full, "{what}");
    err
}

// ------------------------------------------------------------------------------------------------
// Macro layers used by the generic checks.
// ------------------------------------------------------------------------------------------------

#[batch_norm(features = 3, axes = [0, 2, 3])]
#[derive(Debug)]
struct Nchw3;

#[batch_norm(features = 3, axes = [0, 2, 3], center = false)]
struct Nchw3NoCenter;

#[batch_norm(features = 3, axes = [0, 2, 3], scale = false)]
struct Nchw3NoScale;

#[batch_norm(features = 3, axes = [0, 2, 3], track_running_stats = false)]
struct Nchw3Untracked;

/// The seed's example layer.
#[batch_norm(features = [55, 55], axes = [0])]
pub struct SeedExampleBn;

#[batch_norm(features = 65536, axes = [0])]
struct Wide;

/// A user derive of one of the generated traits is skipped, not doubled.
#[batch_norm(features = 4, axes = [0], preset = "keras")]
#[derive(Clone, Default, Debug)]
pub(crate) struct UserDerives;

// ------------------------------------------------------------------------------------------------
// Initial state
// ------------------------------------------------------------------------------------------------

fn check_initial_state<L: Layer>(layer: &L) {
    let c = layer.features();
    assert_eq!(layer.gamma(), vec![1.0; c]);
    assert_eq!(layer.beta(), vec![0.0; c]);
    assert_eq!(layer.running_mean(), vec![0.0; c]);
    assert_eq!(layer.running_var(), vec![1.0; c]);
    assert_eq!(layer.gamma_grad(), vec![0.0; c], "gradients are zero before any backward");
    assert_eq!(layer.beta_grad(), vec![0.0; c]);
    // Positive zeros, not negative ones.
    assert!(layer.beta().iter().chain(layer.gamma_grad()).all(|v| v.to_bits() == 0));
}

#[test]
fn initial_state() {
    check_initial_state(&runtime_nchw());
    assert_eq!(runtime_nchw().num_batches_tracked(), 0);
    check_initial_state(&Nchw3::new());
    check_initial_state(&Nchw3::default());
    check_initial_state(&SeedExampleBn::new());
    check_initial_state(&BatchNorm::new([55, 55], [0]).unwrap());
    let f64_layer =
        BatchNorm::<f64>::with_layout(Layout::from_axes(&[4], &[0]).unwrap(), Config::new()).unwrap();
    // f64 layers keep their parameters and statistics in f64.
    let g: &[f64] = f64_layer.gamma();
    assert_eq!(g, &[1.0; 4]);
    assert_eq!(f64_layer.running_var(), &[1.0; 4]);
    assert_eq!(f64_layer.beta_grad(), &[0.0; 4]);
    assert_eq!(SeedExampleBn::FEATURES, 3025);
    assert_eq!(SeedExampleBn::RANK, 3);
    assert_eq!(Nchw3::FEATURES, 3);
    assert_eq!(Nchw3::RANK, 4);
    assert_eq!(BatchNormLayer::features(&SeedExampleBn::new()), 3025);
    assert_eq!(BatchNormLayer::rank(&SeedExampleBn::new()), 3);
    // The default configuration is the seed preset.
    assert_eq!(*runtime_nchw().config(), Config::preset(Preset::Numpy));
    assert_eq!(*Nchw3::new().config(), Config::preset(Preset::Numpy));
}

// ------------------------------------------------------------------------------------------------
// backward
// ------------------------------------------------------------------------------------------------

fn check_backward_without_forward<L: Layer>(mut layer: L) {
    let (x, dy) = data(2);
    let mut dx = vec![0.0; N];
    let err = expect_err(&mut layer, "backward before forward", |l| l.backward(&x, &dy, &SHAPE, &mut dx));
    assert_eq!(err, BnError::NoForward);
    // A failed forward_train does not make backward possible.
    let mut bad = x.clone();
    bad[5] = f32::NAN;
    let mut y = vec![0.0; N];
    assert!(layer.forward_train(&bad, &SHAPE, &mut y).is_err());
    assert!(layer.forward_train(&x, &[1, 3, 1, 1], &mut y[..3]).is_err());
    assert_eq!(layer.backward(&x, &dy, &SHAPE, &mut dx), Err(BnError::NoForward));
    // Inference does not either.
    layer.forward_eval(&x, &SHAPE, &mut y).unwrap();
    layer.backward_eval(&x, &dy, &SHAPE, &mut dx).unwrap();
    assert_eq!(layer.backward(&x, &dy, &SHAPE, &mut dx), Err(BnError::NoForward));
}

#[test]
fn backward_without_forward_is_no_forward() {
    check_backward_without_forward(runtime_nchw());
    check_backward_without_forward(Nchw3::new());
}

fn check_backward_shape<L: Layer>(make: impl Fn() -> L) {
    let mut layer = make();
    let mut rng = Rng::new(3);
    let x: Vec<f32> = rng.vec(N, -1.0, 1.0);
    let mut y = vec![0.0; N];
    layer.forward_train(&x, &SHAPE, &mut y).unwrap();
    // Another batch size.
    let x2: Vec<f32> = rng.vec(48, -1.0, 1.0);
    let mut dx2 = vec![0.0; 48];
    let err = expect_err(&mut layer, "backward with another batch size", |l| {
        l.backward(&x2, &x2, &[4, 3, 2, 2], &mut dx2)
    });
    assert_eq!(err, BnError::BackwardShape { expected: SHAPE.to_vec(), got: vec![4, 3, 2, 2] });
    // The same number of elements in another shape is still another shape.
    let mut dx = vec![0.0; N];
    let err = expect_err(&mut layer, "backward with a permuted spatial shape", |l| {
        l.backward(&x, &x, &[2, 3, 4, 1], &mut dx)
    });
    assert!(matches!(err, BnError::BackwardShape { .. }), "{err:?}");
    // The right shape still works afterwards.
    layer.backward(&x, &x, &SHAPE, &mut dx).unwrap();
}

#[test]
fn backward_shape_must_equal_the_forwards() {
    check_backward_shape(runtime_nchw);
    check_backward_shape(Nchw3::new);
}

/// `backward` differentiates the last `forward_train` with the gamma and statistics saved by it,
/// whatever happened to the layer since.
fn check_backward_uses_saved_forward<L: Layer>(make: impl Fn() -> L) {
    let (mut reference, x, dy) = trained(make());
    let (mut changed, _, _) = trained(make());
    let dx_ref = backward(&mut reference, &x, &dy);

    changed.update_params(&[3.0, -1.0, 0.25], &[1.0, 2.0, 3.0]).unwrap();
    changed.set_running_stats(&[5.0, 6.0, 7.0], &[0.5, 0.25, 8.0]).unwrap();
    let (x_other, dy_other) = data(99);
    let _ = eval(&changed, &x_other);
    let _ = backward_eval(&mut changed, &x_other, &dy_other);
    let dx = backward(&mut changed, &x, &dy);
    assert_bits_eq("dx after update_params/set_running_stats/eval", &dx, &dx_ref);
    assert_eq!(common::bits(changed.gamma_grad()), common::bits(reference.gamma_grad()));
    assert_eq!(common::bits(changed.beta_grad()), common::bits(reference.beta_grad()));
    // And the current gamma is the new one.
    assert_eq!(changed.gamma(), &[3.0, -1.0, 0.25]);
}

#[test]
fn backward_uses_the_gamma_and_statistics_of_its_forward() {
    check_backward_uses_saved_forward(runtime_nchw);
    check_backward_uses_saved_forward(Nchw3::new);
}

/// Each backward overwrites the gradients (no accumulation); calling it again gives the same.
fn check_backward_overwrites<L: Layer>(make: impl Fn() -> L) {
    let (mut layer, x, dy) = trained(make());
    let dx1 = backward(&mut layer, &x, &dy);
    let g1 = layer.gamma_grad().to_vec();
    let b1 = layer.beta_grad().to_vec();
    assert!(g1.iter().chain(&b1).any(|&v| v != 0.0));
    let dx1b = backward(&mut layer, &x, &dy);
    assert_bits_eq("second backward, dx", &dx1b, &dx1);
    assert_bits_eq("second backward, gamma_grad", layer.gamma_grad(), &g1);
    assert_bits_eq("second backward, beta_grad", layer.beta_grad(), &b1);

    // Another dy: the gradients are those of that dy alone.
    let dy2: Vec<f32> = dy.iter().map(|v| 2.0 * v + 0.5).collect();
    let _ = backward(&mut layer, &x, &dy2);
    let (mut fresh, _, _) = trained(make());
    let _ = backward(&mut fresh, &x, &dy2);
    assert_bits_eq("gamma_grad overwritten", layer.gamma_grad(), fresh.gamma_grad());
    assert_bits_eq("beta_grad overwritten", layer.beta_grad(), fresh.beta_grad());

    // backward_eval overwrites them too, and backward afterwards still differentiates the forward.
    let be = backward_eval(&mut layer, &x, &dy);
    let (mut fresh_eval, _, _) = trained(make());
    assert_bits_eq("backward_eval dx", &be, &backward_eval(&mut fresh_eval, &x, &dy));
    assert_bits_eq("backward_eval gamma_grad", layer.gamma_grad(), fresh_eval.gamma_grad());
    assert_bits_eq("backward_eval beta_grad", layer.beta_grad(), fresh_eval.beta_grad());
    let dx3 = backward(&mut layer, &x, &dy);
    assert_bits_eq("backward after backward_eval", &dx3, &dx1);
    assert_bits_eq("gamma_grad after backward_eval", layer.gamma_grad(), &g1);
}

#[test]
fn backward_overwrites_gradients_and_can_be_repeated() {
    check_backward_overwrites(runtime_nchw);
    check_backward_overwrites(Nchw3::new);
}

// ------------------------------------------------------------------------------------------------
// Batches that cannot be trained on
// ------------------------------------------------------------------------------------------------

fn check_too_few_values<L: Layer>(make: impl Fn() -> L) {
    let (mut layer, _, _) = trained(make());
    let x = [1.0f32, 2.0, 3.0];
    let mut y = [0.0f32; 3];
    let err = expect_err(&mut layer, "one value per channel", |l| l.forward_train(&x, &[1, 3, 1, 1], &mut y));
    assert!(matches!(err, BnError::TooFewValues { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("expected more than 1 value per channel when training"), "{msg}");
    assert!(msg.contains("[1, 3, 1, 1]"), "the message names the given shape: {msg}");
    // Two values per channel are enough, whichever reduced axis holds them.
    let x6 = [1.0f32, 2.0, 3.0, 4.0, 5.0, 7.0];
    let mut y6 = [0.0f32; 6];
    for shape in [[2, 3, 1, 1], [1, 3, 2, 1], [1, 3, 1, 2]] {
        layer.clone().forward_train(&x6, &shape, &mut y6).unwrap();
    }
    // Inference on a single sample is fine (it uses the running statistics).
    layer.forward_eval(&x, &[1, 3, 1, 1], &mut y).unwrap();
}

#[test]
fn training_needs_two_values_per_channel() {
    check_too_few_values(runtime_nchw);
    check_too_few_values(Nchw3::new);
    let mut nc = BatchNorm::new(4, [0]).unwrap();
    let err = nc.forward_train(&[1.0; 4], &[1, 4], &mut [0.0; 4]).unwrap_err();
    assert!(err.to_string().contains("expected more than 1 value per channel when training"));
}

fn check_empty_batch<L: Layer>(make: impl Fn() -> L) {
    let (mut layer, _, _) = trained(make());
    for shape in [[0, 3, 2, 2], [2, 3, 0, 2], [2, 3, 2, 0]] {
        let err = expect_err(&mut layer, "empty training batch", |l| l.forward_train(&[], &shape, &mut []));
        assert!(matches!(err, BnError::EmptyBatch { .. }), "{err:?}");
        // Inference on an empty batch is a no-op Ok, in place or not.
        let before = state(&layer);
        layer.forward_eval(&[], &shape, &mut []).unwrap();
        layer.forward_eval_inplace(&mut [], &shape).unwrap();
        assert_eq!(state(&layer), before);
        // backward_eval of an empty batch: either the sums over nothing (zero gradients) or an
        // error that leaves the layer as it was. Never a panic.
        let mut l = layer.clone();
        match l.backward_eval(&[], &[], &shape, &mut []) {
            Ok(()) => {
                assert!(l.gamma_grad().iter().chain(l.beta_grad()).all(|&g| g == 0.0));
            }
            Err(_) => assert_eq!(state(&l), before),
        }
        // The empty batch's element count must still match the buffers.
        let err = expect_err(&mut layer, "empty batch, non-empty buffer", |l| {
            l.forward_eval(&[1.0], &shape, &mut [0.0])
        });
        assert!(matches!(err, BnError::BufferLength { .. }), "{err:?}");
    }
}

#[test]
fn empty_batches() {
    check_empty_batch(runtime_nchw);
    check_empty_batch(Nchw3::new);
    check_empty_batch(Nchw3Untracked::new);
    check_empty_batch(|| runtime_with(Config::new().track_running_stats(false)));
}

// ------------------------------------------------------------------------------------------------
// Non-finite values
// ------------------------------------------------------------------------------------------------

fn check_non_finite_training<L: Layer>(make: impl Fn() -> L) {
    let (mut layer, x, _) = trained(make());
    for (pos, bad) in [(0, f32::NAN), (7, f32::INFINITY), (13, f32::NEG_INFINITY)] {
        let mut xb = x.clone();
        xb[pos] = bad;
        let mut y = vec![0.0; N];
        let err = expect_err(&mut layer, &format!("{bad} in x"), |l| l.forward_train(&xb, &SHAPE, &mut y));
        match err {
            BnError::NonFinite { index, .. } => {
                assert_eq!(index, channel(pos), "the error names the channel")
            }
            other => panic!("{bad} in x: expected NonFinite, got {other:?}"),
        }
    }
    // +Inf and -Inf in one channel (mean NaN).
    let mut xb = x.clone();
    xb[0] = f32::INFINITY;
    xb[1] = f32::NEG_INFINITY;
    let mut y = vec![0.0; N];
    let err = expect_err(&mut layer, "+-Inf in x", |l| l.forward_train(&xb, &SHAPE, &mut y));
    assert!(matches!(err, BnError::NonFinite { .. }), "{err:?}");
}

#[test]
fn non_finite_training_input_is_an_error_and_touches_nothing() {
    check_non_finite_training(runtime_nchw);
    check_non_finite_training(Nchw3::new);
    check_non_finite_training(|| runtime_with(Config::preset(Preset::Pytorch)));
    let (mut rt, x, _) = trained(runtime_nchw());
    let mut xb = x.clone();
    xb[3] = f32::NAN;
    let mut y = vec![0.0; N];
    expect_err_rt(&mut rt, "NaN in x, runtime", |l| l.forward_train(&xb, &SHAPE, &mut y));
}

#[test]
fn variance_overflow_is_non_finite() {
    // Values of +-3e38 are finite f32, their mean is 0, but the variance (9e76) overflows f32.
    let x: Vec<f32> = (0..N).map(|i| if i % 2 == 0 { 3.0e38 } else { -3.0e38 }).collect();
    let mut y = vec![0.0; N];
    let (mut rt, _, _) = trained(runtime_nchw());
    let err = expect_err_rt(&mut rt, "variance overflow", |l| l.forward_train(&x, &SHAPE, &mut y));
    assert!(matches!(err, BnError::NonFinite { .. }), "{err:?}");
    let (mut m, _, _) = trained(Nchw3::new());
    let err = expect_err(&mut m, "variance overflow (macro)", |l| l.forward_train(&x, &SHAPE, &mut y));
    assert!(matches!(err, BnError::NonFinite { .. }), "{err:?}");
    // Only one channel overflowing is enough.
    let mut x1: Vec<f32> = data(5).0;
    for (i, v) in x1.iter_mut().enumerate() {
        if channel(i) == 2 {
            *v = if i % 2 == 0 { 2.5e38 } else { -2.5e38 };
        }
    }
    let err =
        expect_err_rt(&mut rt, "variance overflow in channel 2", |l| l.forward_train(&x1, &SHAPE, &mut y));
    assert!(matches!(err, BnError::NonFinite { index: 2, .. }), "{err:?}");
    // Without running statistics, batch-statistics inference fails the same way.
    let untracked = runtime_with(Config::new().track_running_stats(false));
    assert!(matches!(untracked.forward_eval(&x, &SHAPE, &mut y), Err(BnError::NonFinite { .. })));
    // In an f64 layer, f64 overflow.
    let mut l64 =
        BatchNorm::<f64>::with_layout(Layout::from_axes(&[2], &[0]).unwrap(), Config::new()).unwrap();
    let x64 = [1e300, -1e300, -1e300, 1e300];
    let mut y64 = [0.0f64; 4];
    assert!(matches!(l64.forward_train(&x64, &[2, 2], &mut y64), Err(BnError::NonFinite { .. })));
    assert_eq!(l64.running_var(), &[1.0, 1.0]);
    assert_eq!(l64.num_batches_tracked(), 0);
}

fn check_eval_propagates<L: Layer>(make: impl Fn() -> L) {
    let (layer, x, _) = trained(make());
    let mut xb = x.clone();
    let nan_at = [1usize, 14];
    let inf_at = 6usize; // channel 1, gamma 1.5 > 0
    for &i in &nan_at {
        xb[i] = f32::NAN;
    }
    xb[inf_at] = f32::INFINITY;
    let mut y = vec![0.0; N];
    layer.forward_eval(&xb, &SHAPE, &mut y).unwrap();
    for (i, v) in y.iter().enumerate() {
        if nan_at.contains(&i) {
            assert!(v.is_nan(), "NaN in -> NaN out at {i}, got {v}");
        } else if i == inf_at {
            assert_eq!(*v, f32::INFINITY, "Inf in -> Inf out at {i}");
        } else {
            assert!(v.is_finite(), "finite in -> finite out at {i}, got {v}");
        }
    }
    let mut inplace = xb.clone();
    layer.forward_eval_inplace(&mut inplace, &SHAPE).unwrap();
    assert_bits_eq("in place with NaN", &inplace, &y);
    // The finite positions are what they are without the NaNs.
    let clean = eval(&layer, &x);
    for i in (0..N).filter(|i| !nan_at.contains(i) && *i != inf_at) {
        assert_eq!(y[i].to_bits(), clean[i].to_bits(), "position {i}");
    }
}

#[test]
fn non_finite_inference_input_propagates() {
    check_eval_propagates(runtime_nchw);
    check_eval_propagates(Nchw3::new);
}

fn check_dy_propagates<L: Layer>(make: impl Fn() -> L) {
    let (mut layer, x, dy) = trained(make());
    let mut dyb = dy.clone();
    dyb[5] = f32::NAN; // channel 1
    let dx = backward(&mut layer, &x, &dyb);
    assert!(dx[5].is_nan());
    for i in (0..N).filter(|&i| channel(i) != 1) {
        assert!(dx[i].is_finite(), "other channels stay finite: dx[{i}] = {}", dx[i]);
    }
    assert!(layer.beta_grad()[1].is_nan() && layer.gamma_grad()[1].is_nan());
    assert!(layer.beta_grad()[0].is_finite() && layer.gamma_grad()[2].is_finite());
    let dx = backward_eval(&mut layer, &x, &dyb);
    assert!(dx[5].is_nan());
    assert!((0..N).filter(|&i| i != 5).all(|i| dx[i].is_finite()), "frozen statistics: only that element");
}

#[test]
fn non_finite_dy_propagates() {
    check_dy_propagates(runtime_nchw);
    check_dy_propagates(Nchw3::new);
}

// ------------------------------------------------------------------------------------------------
// Setters
// ------------------------------------------------------------------------------------------------

fn check_setters<L: Layer>(make: impl Fn() -> L) {
    let (mut l, _, _) = trained(make());
    let ok3 = [1.0f32, 2.0, 3.0];
    let cases: Vec<(&str, [Vec<f32>; 2])> = vec![
        ("short gamma", [vec![1.0, 2.0], ok3.to_vec()]),
        ("long beta", [ok3.to_vec(), vec![0.0; 4]]),
        ("empty", [vec![], vec![]]),
        ("NaN gamma", [vec![1.0, f32::NAN, 1.0], ok3.to_vec()]),
        ("Inf beta", [ok3.to_vec(), vec![0.0, 0.0, f32::INFINITY]]),
        ("-Inf gamma", [vec![f32::NEG_INFINITY, 1.0, 1.0], ok3.to_vec()]),
    ];
    for (what, [g, b]) in &cases {
        let err = expect_err(&mut l, &format!("update_params: {what}"), |l| l.update_params(g, b));
        match what {
            w if w.contains("NaN") || w.contains("Inf") => {
                assert!(matches!(err, BnError::NonFinite { .. }), "{what}: {err:?}")
            }
            _ => assert!(matches!(err, BnError::ParamLength { .. }), "{what}: {err:?}"),
        }
        let err = expect_err(&mut l, &format!("set_running_stats: {what}"), |l| l.set_running_stats(g, b));
        match what {
            w if w.contains("NaN") || w.contains("Inf") => {
                assert!(matches!(err, BnError::NonFinite { .. }), "{what}: {err:?}")
            }
            _ => assert!(matches!(err, BnError::ParamLength { .. }), "{what}: {err:?}"),
        }
    }
    let err = expect_err(&mut l, "negative variance", |l| l.set_running_stats(&ok3, &[1.0, -1e-3, 1.0]));
    assert!(matches!(err, BnError::NegativeVariance { index: 1, .. }), "{err:?}");
    // Zero variance and negative gamma are fine.
    l.set_running_stats(&[-1.0, 0.0, 1.0], &[0.0, 0.0, 2.0]).unwrap();
    assert_eq!(l.running_var(), &[0.0, 0.0, 2.0]);
    assert_eq!(l.running_mean(), &[-1.0, 0.0, 1.0]);
    l.update_params(&[-1.0, 0.0, 2.0], &[5.0, -5.0, 0.0]).unwrap();
    assert!(eval(&l, &data(8).0).iter().all(|v| v.is_finite()), "zero running variance: eps keeps y finite");
    assert_eq!(l.gamma(), &[-1.0, 0.0, 2.0]);
    assert_eq!(l.beta(), &[5.0, -5.0, 0.0]);
    // Inference uses what was set: y = x * s + t, s = gamma / sqrt(var + eps), t = beta - mean * s.
    // (A zero variance would make s ~ 300: compare on moderate values.)
    l.set_running_stats(&[-1.0, 0.0, 1.0], &[0.5, 0.25, 2.0]).unwrap();
    let x: Vec<f32> = data(8).0;
    let y = eval(&l, &x);
    let expected: Vec<f64> = (0..N)
        .map(|i| {
            let c = channel(i);
            let s = l.gamma()[c] as f64 / (l.running_var()[c] as f64 + 1e-5).sqrt();
            x[i] as f64 * s + (l.beta()[c] as f64 - l.running_mean()[c] as f64 * s)
        })
        .collect();
    assert_close("inference on set statistics", &y, &expected, common::FWD);
}

#[test]
fn setters_validate_their_input() {
    check_setters(runtime_nchw);
    check_setters(Nchw3::new);
}

fn check_center_false<L: Layer>(make: impl Fn() -> L) {
    let mut l = make();
    assert!(!l.config().get_center());
    assert_eq!(l.beta(), &[0.0; 3]);
    let err = expect_err(&mut l, "center = false, beta != 0", |l| {
        l.update_params(&[1.0, 2.0, 3.0], &[0.0, 0.5, 0.0])
    });
    assert!(matches!(err, BnError::FixedParameter { index: 1, .. }), "{err:?}");
    assert!(err.to_string().contains("center"), "{err}");
    l.update_params(&[1.0, 2.0, 3.0], &[0.0; 3]).unwrap();
    let (x, dy) = data(11);
    let y = train(&mut l, &x);
    // beta = 0: every channel of y has mean 0.
    for c in 0..C {
        let m: f64 = (0..N).filter(|&i| channel(i) == c).map(|i| y[i] as f64).sum::<f64>() / 8.0;
        assert!(m.abs() < 1e-5, "channel {c} mean {m}");
    }
    backward(&mut l, &x, &dy);
    assert_eq!(l.beta_grad(), &[0.0; 3]);
    assert!(l.gamma_grad().iter().any(|&g| g != 0.0));
    backward_eval(&mut l, &x, &dy);
    assert_eq!(l.beta_grad(), &[0.0; 3]);
    assert_eq!(l.beta(), &[0.0; 3]);
}

fn check_scale_false<L: Layer>(make: impl Fn() -> L) {
    let mut l = make();
    assert!(!l.config().get_scale());
    assert_eq!(l.gamma(), &[1.0; 3]);
    let err =
        expect_err(&mut l, "scale = false, gamma != 1", |l| l.update_params(&[1.0, 1.0, 2.0], &[0.0; 3]));
    assert!(matches!(err, BnError::FixedParameter { index: 2, .. }), "{err:?}");
    assert!(err.to_string().contains("scale"), "{err}");
    l.update_params(&[1.0; 3], &[0.5, -0.5, 1.0]).unwrap();
    let (x, dy) = data(12);
    train(&mut l, &x);
    backward(&mut l, &x, &dy);
    assert_eq!(l.gamma_grad(), &[0.0; 3]);
    assert!(l.beta_grad().iter().any(|&g| g != 0.0));
    backward_eval(&mut l, &x, &dy);
    assert_eq!(l.gamma_grad(), &[0.0; 3]);
    assert_eq!(l.gamma(), &[1.0; 3]);
}

#[test]
fn center_and_scale_fix_their_parameters() {
    check_center_false(|| runtime_with(Config::new().center(false)));
    check_center_false(Nchw3NoCenter::new);
    check_scale_false(|| runtime_with(Config::new().scale(false)));
    check_scale_false(Nchw3NoScale::new);
}

fn check_untracked<L: Layer>(make: impl Fn() -> L) {
    let mut l = make();
    assert!(!l.config().get_track_running_stats());
    l.update_params(&[0.5, 1.5, -2.0], &[0.1, -0.2, 0.3]).unwrap();
    let before = state(&l);
    let (x, dy) = data(21);
    let y_train = train(&mut l, &x);
    let after = state(&l);
    assert_eq!(after.running_mean, before.running_mean, "running mean untouched");
    assert_eq!(after.running_var, before.running_var, "running var untouched");
    // Inference uses the batch statistics: the same output as training on that batch.
    let y_eval = eval(&l, &x);
    assert_close("untracked eval vs train", &y_eval, &y_train, TIGHT);
    // ... so the running buffers, even when set, are not read.
    l.set_running_stats(&[10.0, 20.0, 30.0], &[0.1, 0.2, 0.3]).unwrap();
    assert_bits_eq("eval ignores the running buffers", &eval(&l, &x), &y_eval);
    let y2 = train(&mut l, &x);
    assert_eq!(l.running_mean(), &[10.0, 20.0, 30.0]);
    assert_eq!(l.running_var(), &[0.1, 0.2, 0.3]);
    assert_bits_eq("train ignores the running buffers", &y2, &y_train);
    // ... and inference needs two values per channel, and fails on non-finite statistics.
    let mut y3 = [0.0f32; 3];
    let err = expect_err(&mut l, "untracked eval of one sample", |l| {
        l.forward_eval(&[1.0, 2.0, 3.0], &[1, 3, 1, 1], &mut y3)
    });
    assert!(matches!(err, BnError::TooFewValues { .. }), "{err:?}");
    let err = expect_err(&mut l, "untracked eval_inplace of one sample", |l| {
        l.forward_eval_inplace(&mut y3, &[1, 3, 1, 1])
    });
    assert!(matches!(err, BnError::TooFewValues { .. }), "{err:?}");
    // backward_eval is backward of that batch.
    let dx_eval = backward_eval(&mut l, &x, &dy);
    let g_eval = l.gamma_grad().to_vec();
    let dx = backward(&mut l, &x, &dy);
    assert_close("untracked backward_eval vs backward dx", &dx_eval, &dx, TIGHT);
    assert_close("untracked backward_eval vs backward dgamma", &g_eval, l.gamma_grad(), TIGHT);
}

#[test]
fn untracked_layers_use_batch_statistics_and_never_touch_running_buffers() {
    check_untracked(|| runtime_with(Config::new().track_running_stats(false)));
    check_untracked(Nchw3Untracked::new);
    let mut rt = runtime_with(Config::preset(Preset::Pytorch).track_running_stats(false));
    train(&mut rt, &data(3).0);
    train(&mut rt, &data(4).0);
    assert_eq!(rt.running_mean(), &[0.0; 3]);
    assert_eq!(rt.running_var(), &[1.0; 3]);
}

// ------------------------------------------------------------------------------------------------
// Momentum convention and unbiased correction, by hand
// ------------------------------------------------------------------------------------------------

/// Per-channel (mean, biased variance) of an NC batch, in f64, independently of the crate.
fn nc_stats(x: &[f32], n: usize, c: usize) -> Vec<(f64, f64)> {
    (0..c)
        .map(|j| {
            let col: Vec<f64> = (0..n).map(|i| x[i * c + j] as f64).collect();
            let mean = col.iter().sum::<f64>() / n as f64;
            let var = col.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
            (mean, var)
        })
        .collect()
}

#[test]
fn momentum_weights_the_old_value_and_unbiased_corrects_by_n_over_n_minus_1() {
    let batches: [Vec<f32>; 2] = [
        vec![1.0, 10.0, 2.0, 20.0, 3.0, 40.0, 4.0, 80.0], // (4, 2)
        vec![-1.0, 0.5, 1.0, 0.25, 2.0, 0.0, 6.0, 1.0],
    ];
    let (n, c) = (4usize, 2usize);
    let variants = [
        (Config::preset(Preset::Numpy), 0.9, false),
        (Config::preset(Preset::Pytorch), 0.9, true),
        (Config::preset(Preset::Keras), 0.99, false),
        (Config::new().momentum(0.0), 0.0, false),
        (Config::new().torch_momentum(0.3), 0.7, false),
        (Config::new().momentum(0.5).running_var(RunningVar::Unbiased), 0.5, true),
    ];
    for (cfg, m, unbiased) in variants {
        assert_eq!(cfg.get_momentum(), m);
        let mut l = BatchNorm::with_config(c, [0], cfg).unwrap();
        let (mut rm, mut rv) = (vec![0.0f64; c], vec![1.0f64; c]);
        for (step, x) in batches.iter().enumerate() {
            let mut y = vec![0.0f32; n * c];
            l.forward_train(x, &[n, c], &mut y).unwrap();
            let stats = nc_stats(x, n, c);
            for (j, &(mean, var)) in stats.iter().enumerate() {
                let v = if unbiased { var * n as f64 / (n as f64 - 1.0) } else { var };
                rm[j] = m * rm[j] + (1.0 - m) * mean;
                rv[j] = m * rv[j] + (1.0 - m) * v;
                // y uses the biased variance whatever the running variance takes.
                for i in 0..n {
                    let expected =
                        (x[i * c + j] as f64 - mean) / (var + cfg.get_eps()).sqrt() * l.gamma()[j] as f64;
                    let got = y[i * c + j] as f64;
                    assert!(
                        (got - expected).abs() <= 1e-6 * (1.0 + expected.abs()),
                        "{cfg:?} step {step}: y"
                    );
                }
            }
            assert_close(&format!("{cfg:?} step {step}: running_mean"), l.running_mean(), &rm, TIGHT);
            assert_close(&format!("{cfg:?} step {step}: running_var"), l.running_var(), &rv, TIGHT);
            assert_eq!(l.num_batches_tracked(), step as u64 + 1);
        }
    }
    // The numbers themselves, for the seed preset after the first batch: channel 0 is [1, 2, 3, 4]
    // (mean 2.5, biased variance 1.25, unbiased 5/3).
    let mut seed = BatchNorm::new(2, [0]).unwrap();
    let mut torch = BatchNorm::with_config(2, [0], Config::preset(Preset::Pytorch)).unwrap();
    let mut y = [0.0f32; 8];
    seed.forward_train(&batches[0], &[4, 2], &mut y).unwrap();
    torch.forward_train(&batches[0], &[4, 2], &mut y).unwrap();
    assert_close("seed rm", &seed.running_mean()[..1], &[0.25f64], TIGHT);
    assert_close("seed rv", &seed.running_var()[..1], &[0.9 + 0.1 * 1.25f64], TIGHT);
    assert_close("torch rv", &torch.running_var()[..1], &[0.9 + 0.1 * 5.0 / 3.0f64], TIGHT);
}

#[test]
fn config_momentum_conversions() {
    assert_eq!(Config::new().torch_momentum(0.1).get_momentum(), 0.9);
    assert!((Config::new().torch_momentum(0.01).get_momentum() - 0.99).abs() < 1e-15);
    assert_eq!(Config::preset(Preset::Pytorch).get_momentum(), 0.9);
    assert_eq!(Config::preset(Preset::Pytorch).get_eps(), 1e-5);
    assert_eq!(Config::preset(Preset::Pytorch).get_running_var(), RunningVar::Unbiased);
    assert_eq!(Config::preset(Preset::Keras).get_momentum(), 0.99);
    assert_eq!(Config::preset(Preset::Keras).get_eps(), 1e-3);
    assert_eq!(Config::preset(Preset::Keras).get_running_var(), RunningVar::Biased);
    assert_eq!(Config::new(), Config::preset(Preset::Numpy));
    assert_eq!(Config::default(), Config::preset(Preset::Numpy));
    assert_eq!(Config::new().get_momentum(), 0.9);
    assert_eq!(Config::new().get_eps(), 1e-5);
    assert_eq!(Config::new().get_running_var(), RunningVar::Biased);
    let c = Config::new();
    assert!(c.get_center() && c.get_scale() && c.get_track_running_stats());
    // Explicit keys override the preset.
    let k = Config::preset(Preset::Keras).eps(0.5).momentum(0.25);
    assert_eq!((k.get_eps(), k.get_momentum(), k.get_running_var()), (0.5, 0.25, RunningVar::Biased));
}

#[test]
fn the_numpy_preset_keeps_its_older_name() {
    #[allow(deprecated)]
    let seed = Preset::Seed;
    assert_eq!(seed, Preset::Numpy);
    assert_eq!(Preset::from_name("seed"), Some(Preset::Numpy));
    assert_eq!(Preset::from_name("numpy"), Some(Preset::Numpy));
    assert_eq!(Preset::Numpy.name(), "numpy");
    assert_eq!(Preset::default(), Preset::Numpy);
}

/// PyTorch's `momentum=0.1` written as `momentum` under the pytorch preset would be the weight
/// of the old value (running_mean 9 after one step of 10s where torch gives 1): refused, with a
/// message that names `torch_momentum`; `torch_momentum(0.1)` gives torch's update.
#[test]
fn momentum_is_refused_with_the_pytorch_preset() {
    let refused = Config::preset(Preset::Pytorch).momentum(0.1);
    let err = refused.validate().unwrap_err();
    assert!(
        matches!(err, BnError::InvalidConfig(_)) && err.to_string().contains("torch_momentum(0.1)"),
        "{err}"
    );
    let err = BatchNorm::with_config(4, [0], refused).unwrap_err();
    assert!(err.to_string().contains("torch_momentum"), "{err}");
    // Refused whatever follows it, and only with that preset.
    assert!(Config::preset(Preset::Pytorch).momentum(0.9).torch_momentum(0.1).validate().is_err());
    assert!(Config::new().momentum(0.1).validate().is_ok());
    assert!(Config::preset(Preset::Pytorch).cumulative_momentum().validate().is_ok());

    let mut bn = BatchNorm::with_config(4, [0], Config::preset(Preset::Pytorch).torch_momentum(0.1)).unwrap();
    let x: Vec<f32> = (0..8).map(|i| if i < 4 { 9.0 } else { 11.0 }).collect();
    let mut y = vec![0.0; 8];
    bn.forward_train(&x, &[2, 4], &mut y).unwrap();
    assert!((bn.running_mean()[0] - 1.0).abs() < 1e-6, "{:?}", bn.running_mean());
}

// ------------------------------------------------------------------------------------------------
// Every Err leaves the layer unchanged; bad shapes are errors, not panics
// ------------------------------------------------------------------------------------------------

fn check_bad_calls<L: Layer>(make: impl Fn() -> L) {
    let (mut l, x, dy) = trained(make());
    let v = |n: usize| vec![0.0f32; n];
    let (mut y, mut dx) = (v(N), v(N));
    let xs = &x[..];
    let shapes_bad: Vec<(&str, Vec<usize>)> = vec![
        ("rank 3", vec![2, 3, 4]),
        ("rank 5", vec![2, 3, 2, 2, 1]),
        ("rank 0", vec![]),
        ("wrong feature extent", vec![2, 4, 2, 2]),
        ("feature extent moved", vec![3, 2, 2, 2]),
        ("overflow", vec![usize::MAX, 3, 2, 2]),
        ("overflow 2", vec![1 << 32, 3, 1 << 32, 1]),
        ("overflow 3", vec![2, 3, usize::MAX / 2, 2]),
    ];
    for (what, s) in &shapes_bad {
        let s = &s[..];
        let e1 = expect_err(&mut l, &format!("forward_train {what}"), |l| l.forward_train(xs, s, &mut y));
        expect_err(&mut l, &format!("forward_eval {what}"), |l| l.forward_eval(xs, s, &mut y));
        let mut xy = x.clone();
        expect_err(&mut l, &format!("forward_eval_inplace {what}"), |l| l.forward_eval_inplace(&mut xy, s));
        expect_err(&mut l, &format!("backward {what}"), |l| l.backward(xs, &dy, s, &mut dx));
        expect_err(&mut l, &format!("backward_eval {what}"), |l| l.backward_eval(xs, &dy, s, &mut dx));
        let kind_ok = match *what {
            w if w.starts_with("rank") => matches!(e1, BnError::RankMismatch { .. }),
            w if w.starts_with("overflow") => matches!(e1, BnError::ShapeOverflow { .. }),
            _ => matches!(e1, BnError::FeatureMismatch { .. }),
        };
        assert!(kind_ok, "{what}: {e1:?}");
    }
    // A zero extent next to overflowing ones: never a panic, and never a change.
    for s in [[usize::MAX, 3, 0, 2], [0, 3, usize::MAX, usize::MAX]] {
        let before = state(&l);
        let _ = l.forward_eval(&[], &s, &mut []);
        let _ = l.forward_eval_inplace(&mut [], &s);
        assert!(l.forward_train(&[], &s, &mut []).is_err());
        assert_eq!(state(&l), before);
    }
    // Buffer lengths.
    let (short, long) = (v(N - 1), v(N + 1));
    let (mut short_m, mut long_m) = (v(N - 1), v(N + 1));
    let err = expect_err(&mut l, "short x", |l| l.forward_train(&short, &SHAPE, &mut y));
    assert_eq!(err, BnError::BufferLength { buffer: "x", expected: N, got: N - 1, shape: SHAPE.to_vec() });
    let err = expect_err(&mut l, "long y", |l| l.forward_train(xs, &SHAPE, &mut long_m));
    assert!(matches!(err, BnError::BufferLength { buffer: "y", .. }), "{err:?}");
    expect_err(&mut l, "eval short y", |l| l.forward_eval(xs, &SHAPE, &mut short_m));
    expect_err(&mut l, "eval long x", |l| l.forward_eval(&long, &SHAPE, &mut y));
    expect_err(&mut l, "inplace long", |l| l.forward_eval_inplace(&mut long_m, &SHAPE));
    let err = expect_err(&mut l, "backward short dy", |l| l.backward(xs, &short, &SHAPE, &mut dx));
    assert!(matches!(err, BnError::BufferLength { buffer: "dy", .. }), "{err:?}");
    let err = expect_err(&mut l, "backward long dx", |l| l.backward(xs, &dy, &SHAPE, &mut long_m));
    assert!(matches!(err, BnError::BufferLength { buffer: "dx", .. }), "{err:?}");
    expect_err(&mut l, "backward short x", |l| l.backward(&short, &dy, &SHAPE, &mut dx));
    expect_err(&mut l, "backward_eval short dy", |l| l.backward_eval(xs, &short, &SHAPE, &mut dx));
    expect_err(&mut l, "backward_eval long dx", |l| l.backward_eval(xs, &dy, &SHAPE, &mut long_m));
    expect_err(&mut l, "backward_eval long x", |l| l.backward_eval(&long, &dy, &SHAPE, &mut dx));
    // After all that, the layer works and still knows its last forward.
    let (mut fresh, _, _) = trained(make());
    assert_bits_eq("backward after the errors", &backward(&mut l, &x, &dy), &backward(&mut fresh, &x, &dy));
}

#[test]
fn every_error_leaves_the_layer_unchanged() {
    check_bad_calls(runtime_nchw);
    check_bad_calls(Nchw3::new);
    check_bad_calls(Nchw3Untracked::new);
    check_bad_calls(|| runtime_with(Config::preset(Preset::Keras).center(false).scale(false)));
    // The runtime layer's num_batches_tracked too.
    let (mut rt, x, _) = trained(runtime_nchw());
    let mut y = vec![0.0; N];
    expect_err_rt(&mut rt, "rank", |l| l.forward_train(&x, &[2, 3, 4], &mut y));
    expect_err_rt(&mut rt, "too few", |l| l.forward_train(&x[..3], &[1, 3, 1, 1], &mut y[..3]));
    expect_err_rt(&mut rt, "setter", |l| l.update_params(&[1.0], &[0.0]));
    assert_eq!(rt.num_batches_tracked(), 1);
}

#[test]
fn wrong_feature_extents_of_the_seed_example() {
    // [96, 11, 275] has as many elements as [96, 55, 55] but other feature extents.
    let x = vec![0.5f32; 96 * 55 * 55];
    let mut y = vec![0.0f32; x.len()];
    let mut rt = BatchNorm::new([55, 55], [0]).unwrap();
    let mut m = SeedExampleBn::new();
    let err = expect_err(&mut rt, "[96, 11, 275] runtime", |l| l.forward_train(&x, &[96, 11, 275], &mut y));
    assert_eq!(
        err,
        BnError::FeatureMismatch { expected: vec![55, 55], first_axis: 1, shape: vec![96, 11, 275] }
    );
    let msg = err.to_string();
    assert!(msg.contains("[55, 55]") && msg.contains("[96, 11, 275]"), "{msg}");
    let err = expect_err(&mut m, "[96, 11, 275] macro", |l| l.forward_train(&x, &[96, 11, 275], &mut y));
    assert!(matches!(err, BnError::FeatureMismatch { .. }), "{err:?}");
    expect_err(&mut m, "[96, 11, 275] eval", |l| l.forward_eval(&x, &[96, 11, 275], &mut y));
    expect_err(&mut m, "[96, 3025] eval", |l| l.forward_eval(&x, &[96, 3025], &mut y));
    expect_err(&mut m, "[96, 55, 55, 1] eval", |l| l.forward_eval(&x, &[96, 55, 55, 1], &mut y));
    // The right shape works.
    m.forward_train(&x[..2 * 3025], &[2, 55, 55], &mut y[..2 * 3025]).unwrap();
}

#[test]
fn error_messages_say_expected_and_given() {
    let mut l = runtime_nchw();
    let mut y = vec![0.0; N];
    let x = data(1).0;
    let msg = l.forward_train(&x, &[2, 3, 4], &mut y).unwrap_err().to_string();
    assert!(msg.contains("rank 4") && msg.contains("rank 3") && msg.contains("[2, 3, 4]"), "{msg}");
    let msg = l.forward_train(&x[..20], &SHAPE, &mut y).unwrap_err().to_string();
    assert!(msg.contains("24") && msg.contains("20") && msg.contains("`x`"), "{msg}");
    let msg = l.update_params(&[1.0, 1.0], &[0.0; 3]).unwrap_err().to_string();
    assert!(msg.contains("gamma") && msg.contains('3') && msg.contains('2'), "{msg}");
    let msg = l.update_params(&[1.0, f32::NAN, 1.0], &[0.0; 3]).unwrap_err().to_string();
    assert!(msg.contains("gamma[1]") && msg.contains("NaN"), "{msg}");
    let msg = l.set_running_stats(&[0.0; 3], &[1.0, 1.0, -2.0]).unwrap_err().to_string();
    assert!(msg.contains("running_var[2]") && msg.contains("-2"), "{msg}");
    train(&mut l, &x);
    let mut dx = vec![0.0; 48];
    let msg = l.backward(&[0.0; 48], &[0.0; 48], &[4, 3, 2, 2], &mut dx).unwrap_err().to_string();
    assert!(msg.contains("[2, 3, 2, 2]") && msg.contains("[4, 3, 2, 2]"), "{msg}");
    let msg = Config::new().eps(-1.0).validate().unwrap_err().to_string();
    assert!(msg.contains("eps") && msg.contains("-1"), "{msg}");
    let msg = Config::new().momentum(1.0).validate().unwrap_err().to_string();
    assert!(msg.contains("momentum") && msg.contains("[0, 1)") && msg.contains('1'), "{msg}");
    let msg = BnError::NoForward.to_string();
    assert!(msg.contains("forward_train"), "{msg}");
}

// ------------------------------------------------------------------------------------------------
// Config and Layout validation
// ------------------------------------------------------------------------------------------------

#[test]
fn config_validate() {
    let bad = [
        ("eps 0", Config::new().eps(0.0)),
        ("eps -0", Config::new().eps(-0.0)),
        ("eps < 0", Config::new().eps(-1e-5)),
        ("eps NaN", Config::new().eps(f64::NAN)),
        ("eps Inf", Config::new().eps(f64::INFINITY)),
        ("momentum 1", Config::new().momentum(1.0)),
        ("momentum -0.1", Config::new().momentum(-0.1)),
        ("momentum 1.5", Config::new().momentum(1.5)),
        ("momentum NaN", Config::new().momentum(f64::NAN)),
        ("torch_momentum 0", Config::new().torch_momentum(0.0)),
        ("torch_momentum 1.1", Config::new().torch_momentum(1.1)),
    ];
    for (what, cfg) in bad {
        assert!(matches!(cfg.validate(), Err(BnError::InvalidConfig(_))), "{what}");
        assert!(BatchNorm::with_config(3, [0], cfg).is_err(), "{what}: with_config");
        let layout = Layout::from_axes(&[3], &[0]).unwrap();
        assert!(BatchNorm::<f64>::with_layout(layout, cfg).is_err(), "{what}: with_layout");
    }
    let good = [
        Config::new(),
        Config::new().momentum(0.0),
        Config::new().momentum(0.999),
        Config::new().torch_momentum(1.0),
        Config::new().eps(1e-12),
        Config::new().eps(10.0),
        Config::preset(Preset::Keras),
        Config::preset(Preset::Pytorch),
    ];
    for cfg in good {
        cfg.validate().unwrap();
        BatchNorm::with_config(3, [0], cfg).unwrap();
    }
}

#[test]
fn layout_from_axes_validation() {
    let bad: &[(&str, &[usize], &[usize])] = &[
        ("non-adjacent feature axes (0, 2)", &[2, 3], &[1]),
        ("non-adjacent feature axes (1, 3)", &[2, 3], &[0, 2]),
        ("repeated axis", &[3], &[0, 0]),
        ("repeated axis in rank 4", &[3], &[0, 2, 2]),
        ("out of range", &[3], &[0, 5]),
        ("out of range, rank 2", &[3], &[2]),
        ("empty axes", &[3], &[]),
        ("descending axes", &[3], &[2, 0]),
        ("empty features", &[], &[0]),
        ("zero feature", &[0], &[0]),
        ("zero among features", &[55, 0], &[0]),
    ];
    for (what, features, axes) in bad {
        let err = Layout::from_axes(features, axes).unwrap_err();
        assert!(matches!(err, BnError::InvalidLayout(_)), "{what}: {err:?}");
        assert!(BatchNorm::new(features.to_vec(), axes).is_err(), "{what}: BatchNorm::new");
    }
    let nchw = Layout::from_axes(&[64], &[0, 2, 3]).unwrap();
    assert_eq!((nchw.rank(), nchw.channels(), nchw.feature_axes()), (4, 64, 1..2));
    let nhwc = Layout::from_axes(&[16], &[0, 1, 2]).unwrap();
    assert_eq!(nhwc.feature_axes(), 3..4);
    let seed = Layout::from_axes(&[55, 55], &[0]).unwrap();
    assert_eq!((seed.rank(), seed.channels(), seed.feature_axes()), (3, 3025, 1..3));
    assert_eq!(seed.reduced_axes(), vec![0]);
    let first = Layout::from_axes(&[2, 3], &[2, 3]).unwrap();
    assert_eq!(first.feature_axes(), 0..2);
    let c = seed.canonical(&[96, 55, 55]).unwrap();
    assert_eq!((c.outer, c.channels, c.inner), (96, 3025, 1));
    let c = nchw.canonical(&[32, 64, 56, 56]).unwrap();
    assert_eq!((c.outer, c.channels, c.inner), (32, 64, 56 * 56));
    assert!(matches!(nchw.canonical(&[usize::MAX, 64, 2, 1]), Err(BnError::ShapeOverflow { .. })));
}

/// A feature count is user input too: one whose state cannot exist is an error, not a panic.
#[test]
fn huge_feature_counts_are_errors_not_panics() {
    let attempts: [Vec<usize>; 4] =
        [vec![usize::MAX], vec![1 << 61], vec![1 << 32, 1 << 31], vec![usize::MAX, 2]];
    for features in attempts {
        let r = std::panic::catch_unwind(|| BatchNorm::new(features.clone(), [0]).map(|_| ()));
        match r {
            Ok(Err(_)) => {}
            Ok(Ok(())) => panic!("{features:?}: a layer with that many features was built"),
            Err(_) => panic!("{features:?}: BatchNorm::new panicked"),
        }
    }
    assert!(matches!(Layout::from_axes(&[usize::MAX, 2], &[0]), Err(BnError::ShapeOverflow { .. })));
}

// ------------------------------------------------------------------------------------------------
// The ndarray entry
// ------------------------------------------------------------------------------------------------

#[test]
fn ndarray_non_standard_layout_gives_the_same() {
    use ndarray::{Array, IxDyn};
    let mut rng = Rng::new(31);
    // A (3, 2, 4) array viewed reversed is a (4, 2, 3) view in Fortran order: NHWC-like with
    // 3 features on the last axis.
    let base = Array::from_shape_vec((3, 2, 4), rng.vec::<f32>(24, -2.0, 2.0)).unwrap();
    let dy_base = Array::from_shape_vec((3, 2, 4), rng.vec::<f32>(24, -1.0, 1.0)).unwrap();
    let view = base.view().reversed_axes();
    let dy_view = dy_base.view().reversed_axes();
    assert!(!view.is_standard_layout());
    let standard = view.as_standard_layout().into_owned();
    let dy_standard = dy_view.as_standard_layout().into_owned();
    assert!(standard.is_standard_layout());

    let mut a = BatchNorm::new(3, [0, 1]).unwrap();
    a.update_params(&[0.5, 1.0, 2.0], &[0.0, 1.0, -1.0]).unwrap();
    let mut b = a.clone();
    let ya = a.forward_train_array(&view).unwrap();
    let yb = b.forward_train_array(&standard).unwrap();
    assert_eq!(ya.shape(), &[4, 2, 3]);
    assert_bits_eq("forward_train_array", ya.as_slice().unwrap(), yb.as_slice().unwrap());
    assert_eq!(state(&a), state(&b));
    // The same as the slice API on the standard copy.
    let mut c = BatchNorm::new(3, [0, 1]).unwrap();
    c.update_params(&[0.5, 1.0, 2.0], &[0.0, 1.0, -1.0]).unwrap();
    let mut yc = vec![0.0; 24];
    c.forward_train(standard.as_slice().unwrap(), &[4, 2, 3], &mut yc).unwrap();
    assert_bits_eq("array vs slice", yb.as_slice().unwrap(), &yc);

    let ea = a.forward_eval_array(&view).unwrap();
    let eb = b.forward_eval_array(&standard).unwrap();
    assert_bits_eq("forward_eval_array", ea.as_slice().unwrap(), eb.as_slice().unwrap());
    let da = a.backward_array(&view, &dy_view).unwrap();
    let db = b.backward_array(&standard, &dy_standard).unwrap();
    assert_bits_eq("backward_array", da.as_slice().unwrap(), db.as_slice().unwrap());
    assert_eq!(state(&a), state(&b));
    let da = a.backward_eval_array(&view, &dy_view).unwrap();
    let db = b.backward_eval_array(&standard, &dy_standard).unwrap();
    assert_bits_eq("backward_eval_array", da.as_slice().unwrap(), db.as_slice().unwrap());
    assert_eq!(state(&a), state(&b));
    // Mixed: a standard x with a transposed dy.
    let dm = b.backward_array(&standard, &dy_view).unwrap();
    let _ = a.backward_array(&view, &dy_view).unwrap();
    assert_bits_eq(
        "backward_array, mixed layouts",
        dm.as_slice().unwrap(),
        a.backward_array(&view, &dy_standard).unwrap().as_slice().unwrap(),
    );

    // Dynamic dimension, and a shape the layer rejects.
    let dynamic = standard.clone().into_dyn();
    let yd = a.clone().forward_train_array(&dynamic).unwrap();
    assert_eq!(yd.shape(), &[4, 2, 3]);
    let wrong = Array::<f32, _>::zeros(IxDyn(&[4, 3, 2]));
    assert!(a.forward_eval_array(&wrong).is_err());
    let before = state(&a);
    assert!(a.forward_train_array(&wrong).is_err());
    assert!(a.backward_array(&dynamic, &wrong).is_err(), "x and dy of different shapes");
    assert_eq!(state(&a), before);
    // A macro layer through the same extension trait.
    let mut m = Nchw3::new();
    let x4 = Array::from_shape_vec((2, 3, 2, 2), data(1).0).unwrap();
    let y4 = m.forward_train_array(&x4).unwrap();
    let mut r = runtime_nchw();
    assert_close("macro via ndarray", y4.as_slice().unwrap(), &train(&mut r, x4.as_slice().unwrap()), TIGHT);
}

// ------------------------------------------------------------------------------------------------
// Type-level properties
// ------------------------------------------------------------------------------------------------

#[test]
fn forward_eval_inplace_is_bit_identical() {
    for (name, mut l) in [
        ("seed", runtime_nchw()),
        ("keras", runtime_with(Config::preset(Preset::Keras))),
        ("untracked", runtime_with(Config::new().track_running_stats(false))),
    ] {
        let (x, _) = data(40);
        l.update_params(&[0.3, -1.2, 2.5], &[1.0, 0.0, -3.0]).unwrap();
        l.set_running_stats(&[0.1, -0.2, 3.0], &[0.5, 2.0, 1e-3]).unwrap();
        let y = eval(&l, &x);
        let mut xy = x.clone();
        l.forward_eval_inplace(&mut xy, &SHAPE).unwrap();
        assert_bits_eq(name, &xy, &y);
    }
}

#[test]
fn layers_are_send_sync_clone_debug_and_usable_as_trait_objects() {
    fn assert_traits<T: Send + Sync + Clone + std::fmt::Debug + Default>() {}
    fn assert_send_sync<T: Send + Sync + Clone + std::fmt::Debug>() {}
    assert_traits::<Nchw3>();
    assert_traits::<SeedExampleBn>();
    assert_traits::<UserDerives>();
    check_initial_state(&UserDerives::default());
    assert_send_sync::<BatchNorm>();
    assert_send_sync::<BatchNorm<f64>>();
    assert_send_sync::<BnError>();
    let e: Box<dyn std::error::Error + Send + Sync> = Box::new(BnError::NoForward);
    assert!(!e.to_string().is_empty());

    let mut layers: Vec<Box<dyn BatchNormLayer<Elem = f32, Param = f32>>> =
        vec![Box::new(runtime_nchw()), Box::new(Nchw3::new())];
    let (x, _) = data(50);
    let mut outs = Vec::new();
    for l in &mut layers {
        let mut y = vec![0.0; N];
        l.forward_train(&x, &SHAPE, &mut y).unwrap();
        outs.push(y);
    }
    assert_close("runtime vs macro through dyn", &outs[0], &outs[1], TIGHT);
    assert!(!format!("{:?}", runtime_nchw()).is_empty());
    assert!(!format!("{:?}", Nchw3::new()).is_empty());
}

#[test]
fn clones_are_independent() {
    let (mut a, _, _) = trained(Nchw3::new());
    let b = a.clone();
    let before = state(&b);
    a.update_params(&[9.0; 3], &[9.0; 3]).unwrap();
    train(&mut a, &data(60).0);
    assert_eq!(state(&b), before);
    assert_ne!(state(&a), before);
}

/// `C` may be 65536: the state lives on the heap, so building and using such a layer works on a
/// small stack.
#[test]
fn large_feature_count_lives_on_the_heap() {
    std::thread::Builder::new()
        .stack_size(512 * 1024)
        .spawn(|| {
            let mut l = Wide::new();
            let l2 = l.clone();
            assert_eq!(Wide::FEATURES, 65536);
            assert_eq!(l2.gamma().len(), 65536);
            let x: Vec<f32> = (0..2 * 65536).map(|i| (i % 7) as f32).collect();
            let mut y = vec![0.0; x.len()];
            l.forward_train(&x, &[2, 65536], &mut y).unwrap();
            let mut dx = vec![0.0; x.len()];
            l.backward(&x, &y, &[2, 65536], &mut dx).unwrap();
            l.forward_eval_inplace(&mut y, &[2, 65536]).unwrap();
            let rt = BatchNorm::new(65536, [0]).unwrap();
            assert_eq!(rt.features(), 65536);
        })
        .unwrap()
        .join()
        .unwrap();
}

// ------------------------------------------------------------------------------------------------
// No allocation per inference call
// ------------------------------------------------------------------------------------------------

/// Counts the allocations made by each thread.
struct CountingAlloc;

thread_local! {
    static ALLOCATIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn count() {
    // `try_with`: allocations during thread teardown must not touch a destroyed slot.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every method forwards to `System` with the caller's arguments; counting has no effect
// on the memory handed out.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as above; `ptr` was allocated by `System` through this allocator.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(|c| c.get());
    f();
    ALLOCATIONS.with(|c| c.get()) - before
}

fn check_inference_does_not_allocate<L: Layer>(layer: L) {
    let (layer, x, _) = trained(layer);
    let mut y = vec![0.0; N];
    let mut xy = x.clone();
    // Warm up (a backend chosen once per process may read the environment on first use).
    layer.forward_eval(&x, &SHAPE, &mut y).unwrap();
    layer.forward_eval_inplace(&mut xy, &SHAPE).unwrap();
    let n = allocations_during(|| {
        for _ in 0..3 {
            layer.forward_eval(&x, &SHAPE, &mut y).unwrap();
            layer.forward_eval_inplace(&mut xy, &SHAPE).unwrap();
        }
    });
    assert_eq!(n, 0, "{layer:?}: inference allocated {n} times in 6 calls");
}

/// The contract: "no allocation per call on the inference path" (running statistics; a small
/// tensor, which runs serially on the calling thread).
#[test]
fn inference_does_not_allocate() {
    // The counter works.
    assert!(allocations_during(|| drop(std::hint::black_box(vec![1u8; 10]))) >= 1);
    check_inference_does_not_allocate(runtime_nchw());
    check_inference_does_not_allocate(Nchw3::new());
    check_inference_does_not_allocate(runtime_with(Config::preset(Preset::Keras)));
}
