//! The API `#[batch_norm]` generates: its constants, constructor, configuration, trait impl and
//! derives, and bit-identical results to the runtime-generic `BatchNorm` with the same options
//! (both run the same kernels; the macro only passes more of their inputs as constants).
#![deny(missing_docs)]

extern crate batchnorm as bn;

use batchnorm::{batch_norm, BatchNorm, BatchNormLayer, BnError, Config, Preset, RunningVar};

/// NCHW with 6 channels.
#[batch_norm(features = 6, axes = [0, 2, 3])]
pub struct NchwBn;

/// NHWC with 6 channels, PyTorch's defaults.
#[batch_norm(features = 6, axes = [0, 1, 2], preset = "pytorch")]
pub struct NhwcBn;

/// The seed's layout on a smaller grid: (N, 5, 4), one feature per grid cell.
#[batch_norm(features = [5, 4], axes = [0], momentum = 0.8, eps = 1e-3)]
pub struct GridBn;

/// Keras's preset with one override.
#[batch_norm(features = 3, axes = [0], preset = "keras", eps = 0.01)]
pub struct KerasBn;

/// PyTorch's momentum convention.
#[batch_norm(features = 3, axes = [0], torch_momentum = 0.2)]
pub struct TorchMomentumBn;

/// Every flag off, and the unbiased running variance.
#[batch_norm(
    features = 3,
    axes = [0],
    running_var = "unbiased",
    center = false,
    scale = false,
    track_running_stats = false
)]
pub struct FlagsBn;

/// An override of the preset's running variance; the feature axes in the middle of rank 5.
#[batch_norm(features = [2, 3], axes = [0, 1, 4], preset = "pytorch", running_var = "biased")]
pub struct MiddleBn;

/// Through a renamed dependency.
#[bn::batch_norm(features = 4, axes = [0], crate = "bn")]
#[derive(Clone, Debug)]
pub struct RenamedBn;

/// An `f64` layer.
#[batch_norm(features = 3, axes = [0, 2], dtype = "f64")]
pub struct DoubleBn;

/// A small deterministic generator (xorshift64*), so the test needs no extra dependency.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        bits as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
    }

    fn vec(&mut self, n: usize, offset: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32() + offset).collect()
    }
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Everything observable about a layer.
fn state<L: BatchNormLayer<Elem = f32, Param = f32>>(layer: &L) -> Vec<Vec<u32>> {
    vec![
        bits(layer.gamma()),
        bits(layer.beta()),
        bits(layer.running_mean()),
        bits(layer.running_var()),
        bits(layer.gamma_grad()),
        bits(layer.beta_grad()),
    ]
}

/// Runs every mode through the trait and records the bits of every output and of the state.
fn trace<L: BatchNormLayer<Elem = f32, Param = f32>>(
    layer: &mut L,
    shape: &[usize],
    seed: u64,
) -> Vec<Vec<u32>> {
    let mut rng = Rng(seed);
    let n: usize = shape.iter().product();
    let c = layer.features();
    let mut out = Vec::new();
    if layer.config().get_scale() && layer.config().get_center() {
        let (gamma, beta) = (rng.vec(c, 1.0), rng.vec(c, 0.0));
        layer.update_params(&gamma, &beta).unwrap();
    }
    let mut y = vec![0.0; n];
    let mut dx = vec![0.0; n];
    for step in 0..2 {
        let x = rng.vec(n, step as f32 * 3.0);
        layer.forward_train(&x, shape, &mut y).unwrap();
        out.push(bits(&y));
        out.extend(state(layer));
        let dy = rng.vec(n, 0.5);
        layer.backward(&x, &dy, shape, &mut dx).unwrap();
        out.push(bits(&dx));
        out.extend(state(layer));
    }
    let x = rng.vec(n, -1.0);
    layer.forward_eval(&x, shape, &mut y).unwrap();
    out.push(bits(&y));
    let mut xy = x.clone();
    layer.forward_eval_inplace(&mut xy, shape).unwrap();
    assert_eq!(bits(&xy), bits(&y), "forward_eval_inplace is bit-identical to forward_eval");
    let dy = rng.vec(n, 0.0);
    layer.backward_eval(&x, &dy, shape, &mut dx).unwrap();
    out.push(bits(&dx));
    out.extend(state(layer));
    out
}

/// The macro layer and `BatchNorm::with_config` with the same options give the same bits.
fn assert_same_as_runtime<L: BatchNormLayer<Elem = f32, Param = f32>>(
    mut layer: L,
    features: &[usize],
    axes: &[usize],
    shape: &[usize],
) {
    let mut runtime = BatchNorm::with_config(features, axes, *layer.config()).unwrap();
    assert_eq!(runtime.rank(), layer.rank());
    assert_eq!(runtime.features(), layer.features());
    for seed in [1, 2, 3] {
        assert_eq!(trace(&mut layer, shape, seed), trace(&mut runtime, shape, seed), "seed {seed}");
    }
}

#[test]
fn constants() {
    assert_eq!((NchwBn::FEATURES, NchwBn::RANK), (6, 4));
    assert_eq!((NhwcBn::FEATURES, NhwcBn::RANK), (6, 4));
    assert_eq!((GridBn::FEATURES, GridBn::RANK), (20, 3));
    assert_eq!((MiddleBn::FEATURES, MiddleBn::RANK), (6, 5));
    // Usable in constant expressions.
    const GRID: [f32; GridBn::FEATURES] = [0.0; GridBn::FEATURES];
    assert_eq!(GRID.len(), 20);
    let bn = MiddleBn::new();
    assert_eq!(bn.features(), 6);
    assert_eq!(bn.rank(), 5);
    assert_eq!(bn.as_batch_norm().layout().feature_axes(), 2..4);
    assert_eq!(bn.as_batch_norm().layout().features(), &[2, 3]);
    assert_eq!(bn.as_batch_norm().layout().reduced_axes(), vec![0, 1, 4]);
}

#[test]
fn new_is_default_and_fresh() {
    let (new, default) = (GridBn::new(), GridBn::default());
    assert_eq!(state(&new), state(&default));
    assert_eq!(new.config(), default.config());
    assert_eq!(new.gamma(), &[1.0; 20]);
    assert_eq!(new.beta(), &[0.0; 20]);
    assert_eq!(new.running_mean(), &[0.0; 20]);
    assert_eq!(new.running_var(), &[1.0; 20]);
    assert_eq!(new.gamma_grad(), &[0.0; 20]);
    assert_eq!(new.beta_grad(), &[0.0; 20]);
    assert_eq!(new.num_batches_tracked(), 0);
}

#[test]
fn try_new_is_new() {
    let (new, tried) = (GridBn::new(), GridBn::try_new().expect("20 features can be allocated"));
    assert_eq!(state(&new), state(&tried));
    assert_eq!(new.config(), tried.config());
    assert_eq!(new.layout(), tried.layout());
    assert_eq!(new.num_batches_tracked(), tried.num_batches_tracked());
    let f64_layer = DoubleBn::try_new().unwrap();
    assert_eq!(f64_layer.running_var(), DoubleBn::new().running_var());
    assert_eq!(f64_layer.gamma(), &[1.0f64; 3]);
}

#[test]
fn presets_and_overrides_reach_the_config() {
    assert_eq!(*NchwBn::new().config(), Config::new());
    assert_eq!(*NhwcBn::new().config(), Config::preset(Preset::Pytorch));
    assert_eq!(*GridBn::new().config(), Config::new().momentum(0.8).eps(1e-3));

    let keras = KerasBn::new();
    assert_eq!(keras.config().get_momentum(), 0.99);
    assert_eq!(keras.config().get_eps(), 0.01);
    assert_eq!(keras.config().get_running_var(), RunningVar::Biased);

    let torch = TorchMomentumBn::new();
    assert!((torch.config().get_momentum() - 0.8).abs() < 1e-15);
    assert_eq!(*torch.config(), Config::new().torch_momentum(0.2));

    let flags = *FlagsBn::new().config();
    assert_eq!(flags.get_running_var(), RunningVar::Unbiased);
    assert!(!flags.get_center() && !flags.get_scale() && !flags.get_track_running_stats());

    let middle = *MiddleBn::new().config();
    assert_eq!(middle, Config::preset(Preset::Pytorch).running_var(RunningVar::Biased));

    assert_eq!(*RenamedBn::new().config(), Config::new());
}

#[test]
fn bit_identical_to_the_runtime_layer() {
    assert_same_as_runtime(NchwBn::new(), &[6], &[0, 2, 3], &[3, 6, 5, 7]);
    assert_same_as_runtime(NhwcBn::new(), &[6], &[0, 1, 2], &[3, 5, 7, 6]);
    assert_same_as_runtime(GridBn::new(), &[5, 4], &[0], &[9, 5, 4]);
    assert_same_as_runtime(KerasBn::new(), &[3], &[0], &[16, 3]);
    assert_same_as_runtime(TorchMomentumBn::new(), &[3], &[0], &[16, 3]);
    assert_same_as_runtime(FlagsBn::new(), &[3], &[0], &[16, 3]);
    assert_same_as_runtime(MiddleBn::new(), &[2, 3], &[0, 1, 4], &[2, 3, 2, 3, 4]);
}

#[test]
fn inherent_methods_match_the_trait() {
    let shape = [4, 5, 4];
    let x = Rng(7).vec(80, 0.0);
    let (mut y1, mut y2) = (vec![0.0; 80], vec![0.0; 80]);
    let mut inherent = GridBn::new();
    let mut through_trait = GridBn::new();
    inherent.forward_train(&x, &shape, &mut y1).unwrap();
    BatchNormLayer::forward_train(&mut through_trait, &x, &shape, &mut y2).unwrap();
    assert_eq!(bits(&y1), bits(&y2));
    assert_eq!(inherent.num_batches_tracked(), 1);
    assert_eq!(BatchNormLayer::features(&inherent), GridBn::FEATURES);
    assert_eq!(BatchNormLayer::rank(&inherent), GridBn::RANK);
    let dynamic: &dyn BatchNormLayer<Elem = f32, Param = f32> = &inherent;
    assert_eq!(dynamic.features(), 20);
}

#[test]
fn clone_is_independent() {
    let mut original = NchwBn::new();
    let shape = [2, 6, 2, 2];
    let x = Rng(11).vec(48, 1.0);
    let mut y = vec![0.0; 48];
    original.forward_train(&x, &shape, &mut y).unwrap();
    let copy = original.clone();
    assert_eq!(state(&copy), state(&original));
    assert_eq!(copy.num_batches_tracked(), 1);
    original.forward_train(&x, &shape, &mut y).unwrap();
    original.update_params(&[2.0; 6], &[1.0; 6]).unwrap();
    assert_eq!(copy.num_batches_tracked(), 1);
    assert_eq!(copy.gamma(), &[1.0; 6]);
    assert_ne!(state(&copy), state(&original));
    // The copy can backward the forward it was cloned after.
    let mut copy = copy;
    let mut dx = vec![0.0; 48];
    copy.backward(&x, &[1.0; 48], &shape, &mut dx).unwrap();
}

#[test]
fn errors_come_back_as_err_and_leave_the_layer_unchanged() {
    let mut bn = GridBn::new();
    let x = Rng(5).vec(60, 0.0);
    let mut y = vec![0.0; 60];
    bn.forward_train(&x, &[3, 5, 4], &mut y).unwrap();
    let before = (state(&bn), bn.num_batches_tracked());

    let err = bn.forward_train(&x, &[3, 20], &mut y).unwrap_err();
    assert!(matches!(err, BnError::RankMismatch { expected: 3, got: 2, .. }), "{err}");
    let err = bn.forward_train(&x, &[3, 4, 5], &mut y).unwrap_err();
    assert!(matches!(err, BnError::FeatureMismatch { .. }), "{err}");
    let err = bn.forward_eval(&x[..59], &[3, 5, 4], &mut y).unwrap_err();
    assert!(matches!(err, BnError::BufferLength { .. }), "{err}");
    let err = bn.forward_train(&x[..20], &[1, 5, 4], &mut y[..20]).unwrap_err();
    assert!(matches!(err, BnError::TooFewValues { .. }), "{err}");
    let err = bn.backward(&x, &x, &[3, 4, 5], &mut y).unwrap_err();
    assert!(matches!(err, BnError::FeatureMismatch { .. }), "{err}");
    let err = bn.update_params(&[1.0; 19], &[0.0; 20]).unwrap_err();
    assert!(matches!(err, BnError::ParamLength { .. }), "{err}");
    let err = bn.set_running_stats(&[0.0; 20], &[-1.0; 20]).unwrap_err();
    assert!(matches!(err, BnError::NegativeVariance { .. }), "{err}");
    assert_eq!((state(&bn), bn.num_batches_tracked()), before);

    let mut fresh = NchwBn::new();
    let mut dx = vec![0.0; 48];
    let err = fresh.backward(&x[..48], &x[..48], &[2, 6, 2, 2], &mut dx).unwrap_err();
    assert_eq!(err, BnError::NoForward);
}

#[test]
fn layers_are_send_sync_and_debug() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<NchwBn>();
    assert_send_sync::<GridBn>();
    let debug = format!("{:?}", GridBn::new());
    assert!(debug.starts_with("GridBn(BatchNorm {"), "{debug}");
    assert!(debug.contains("features: [5, 4]"), "{debug}");
    let renamed = format!("{:?}", RenamedBn::new().clone());
    assert!(renamed.starts_with("RenamedBn("), "{renamed}");
}
