//! Conformance against reference data produced by PyTorch, Keras and the seed's NumPy class
//! (`tests/data/conformance`, see its README). Nothing in that directory was computed by this
//! project's code.
//!
//! Every manifest case runs through the runtime-generic layer (`BatchNorm::with_config`, built
//! from the manifest) and through a `#[batch_norm(...)]` layer declared for it below; both are
//! driven by one generic checker over `BatchNormLayer`.

use crate::common;

use batchnorm::{batch_norm, BatchNorm, BatchNormLayer, Config, Preset, RunningVar};
use common::{assert_bits_eq, assert_close_shaped, Case, Tensors, FWD, GRAD};

/// Runs one manifest case through `layer`: every training step (output and running statistics),
/// inference on the final running statistics (and its in-place form, bit for bit), then the
/// backward of the last training step.
fn check_case<L>(layer: &mut L, case: &Case, t: &Tensors, path: &str)
where
    L: BatchNormLayer<Elem = f32, Param = f32>,
{
    let name = format!("{} ({path})", case.name);
    let shape = &case.shape[..];
    let n = case.len();
    let features = case.features();
    let c = case.channels();

    assert_eq!(layer.features(), c, "{name}: features()");
    assert_eq!(layer.rank(), shape.len(), "{name}: rank()");
    assert_eq!(*layer.config(), case.config(), "{name}: config()");
    assert_eq!(t.shape("gamma"), &features[..], "{name}: the file's gamma has the feature extents");

    // Initial state, then the parameters used for every step.
    assert!(layer.running_mean().iter().all(|&v| v == 0.0), "{name}: running mean starts at 0");
    assert!(layer.running_var().iter().all(|&v| v == 1.0), "{name}: running var starts at 1");
    layer.update_params(t.get("gamma"), t.get("beta")).expect("update_params");
    assert_eq!(layer.gamma(), t.get("gamma"));
    assert_eq!(layer.beta(), t.get("beta"));

    let mut y = vec![f32::NAN; n];
    for k in 0..case.steps {
        let x = t.get(&format!("x.{k}"));
        assert_eq!(t.shape(&format!("x.{k}")), shape, "{name}: x.{k} has the manifest's shape");
        y.fill(f32::NAN);
        layer
            .forward_train(x, shape, &mut y)
            .unwrap_or_else(|e| panic!("{name}: forward_train step {k}: {e}"));
        assert_close_shaped(&format!("{name}: y.{k}"), Some(shape), &y, t.get(&format!("y.{k}")), FWD);
        assert_close_shaped(
            &format!("{name}: running_mean.{k}"),
            Some(&features),
            layer.running_mean(),
            t.get(&format!("running_mean.{k}")),
            FWD,
        );
        assert_close_shaped(
            &format!("{name}: running_var.{k}"),
            Some(&features),
            layer.running_var(),
            t.get(&format!("running_var.{k}")),
            FWD,
        );
    }

    // Inference on the running statistics after the last step.
    let x_eval = t.get("x_eval");
    let mut y_eval = vec![f32::NAN; n];
    layer.forward_eval(x_eval, shape, &mut y_eval).unwrap_or_else(|e| panic!("{name}: forward_eval: {e}"));
    assert_close_shaped(&format!("{name}: y_eval"), Some(shape), &y_eval, t.get("y_eval"), FWD);
    let mut inplace = x_eval.to_vec();
    layer.forward_eval_inplace(&mut inplace, shape).unwrap_or_else(|e| panic!("{name}: in place: {e}"));
    assert_bits_eq(&format!("{name}: forward_eval_inplace vs forward_eval"), &inplace, &y_eval);

    // Backward of the last training step.
    let x_last = t.get(&format!("x.{}", case.steps - 1));
    let dy = t.get("dy");
    let mut dx = vec![f32::NAN; n];
    layer.backward(x_last, dy, shape, &mut dx).unwrap_or_else(|e| panic!("{name}: backward: {e}"));
    assert_close_shaped(&format!("{name}: dx"), Some(shape), &dx, t.get("dx"), GRAD);
    assert_close_shaped(
        &format!("{name}: dgamma"),
        Some(&features),
        layer.gamma_grad(),
        t.get("dgamma"),
        GRAD,
    );
    assert_close_shaped(&format!("{name}: dbeta"), Some(&features), layer.beta_grad(), t.get("dbeta"), GRAD);

    // Backward may be called again: same result, bit for bit.
    let (dgamma, dbeta) = (layer.gamma_grad().to_vec(), layer.beta_grad().to_vec());
    let mut dx2 = vec![f32::NAN; n];
    layer.backward(x_last, dy, shape, &mut dx2).unwrap_or_else(|e| panic!("{name}: second backward: {e}"));
    assert_bits_eq(&format!("{name}: second backward dx"), &dx2, &dx);
    assert_bits_eq(&format!("{name}: second backward dgamma"), layer.gamma_grad(), &dgamma);
    assert_bits_eq(&format!("{name}: second backward dbeta"), layer.beta_grad(), &dbeta);
}

fn run_runtime(name: &str) {
    let case = common::case(name);
    let t = case.tensors();
    let mut layer = case.runtime_layer();
    check_case(&mut layer, &case, &t, "runtime BatchNorm");
    assert_eq!(layer.num_batches_tracked(), case.steps as u64, "{name}: num_batches_tracked");
}

fn run_macro<L>(name: &str, mut layer: L)
where
    L: BatchNormLayer<Elem = f32, Param = f32>,
{
    let case = common::case(name);
    let t = case.tensors();
    check_case(&mut layer, &case, &t, std::any::type_name::<L>());
}

/// The cases this file has a test for; `manifest_is_covered` checks it is the whole manifest.
const CASES: &[&str] = &[
    "torch_nc",
    "torch_nchw",
    "torch_nhwc",
    "torch_ncl",
    "keras_nc",
    "keras_nhwc",
    "seed_nc",
    "seed_nchw",
    "seed_example",
];

#[test]
fn manifest_is_covered() {
    let mut names: Vec<String> = common::manifest().into_iter().map(|c| c.name).collect();
    names.sort();
    let mut ours: Vec<String> = CASES.iter().map(|s| s.to_string()).collect();
    ours.sort();
    assert_eq!(names, ours, "every manifest case has a runtime and a macro test here");
}

#[test]
fn manifest_matches_presets() {
    // The manifest's explicit values are exactly the presets' (docs/ARCHITECTURE.md, "The math").
    for case in common::manifest() {
        assert_eq!(case.config(), Config::preset(case.preset), "{}: preset values", case.name);
        let expected = match case.source.as_str() {
            "torch" => Preset::Pytorch,
            "keras" => Preset::Keras,
            "seed" => Preset::Numpy,
            other => panic!("{}: unknown source {other}", case.name),
        };
        assert_eq!(case.preset, expected, "{}: preset of source {}", case.name, case.source);
        // The feature axes and the reduced axes cover 0..rank exactly once.
        let mut all: Vec<usize> = case.axes.iter().chain(&case.feature_axes).copied().collect();
        all.sort();
        assert_eq!(all, (0..case.shape.len()).collect::<Vec<_>>(), "{}: axes", case.name);
    }
}

#[test]
fn every_case_runtime_layer_from_manifest() {
    // The same as the named tests below, driven by the manifest alone (new cases included).
    for case in common::manifest() {
        let t = case.tensors();
        let mut layer = case.runtime_layer();
        check_case(&mut layer, &case, &t, "runtime BatchNorm (manifest loop)");
    }
}

macro_rules! runtime_tests {
    ($($name:ident),* $(,)?) => {
        mod runtime {
            $(
                #[test]
                fn $name() {
                    super::run_runtime(stringify!($name));
                }
            )*
        }
    };
}
runtime_tests!(
    torch_nc,
    torch_nchw,
    torch_nhwc,
    torch_ncl,
    keras_nc,
    keras_nhwc,
    seed_nc,
    seed_nchw,
    seed_example
);

// ------------------------------------------------------------------------------------------------
// The same cases through `#[batch_norm]` layers.
// ------------------------------------------------------------------------------------------------

#[batch_norm(features = 32, axes = [0], preset = "pytorch")]
struct TorchNc;

#[batch_norm(features = 8, axes = [0, 2, 3], preset = "pytorch")]
struct TorchNchw;

#[batch_norm(features = 16, axes = [0, 1, 2], preset = "pytorch")]
struct TorchNhwc;

#[batch_norm(features = 12, axes = [0, 2], preset = "pytorch")]
struct TorchNcl;

#[batch_norm(features = 32, axes = [0], preset = "keras")]
struct KerasNc;

#[batch_norm(features = 24, axes = [0, 1, 2], preset = "keras")]
struct KerasNhwc;

#[batch_norm(features = 55, axes = [0])]
struct SeedNc;

#[batch_norm(features = 3, axes = [0, 2, 3], preset = "seed")]
struct SeedNchw;

/// The seed's own example: X of shape (96, 55, 55) normalized over axis 0.
#[batch_norm(features = [55, 55], axes = [0])]
struct SeedExample;

// The same configurations spelled with explicit keys instead of presets.
#[batch_norm(features = 32, axes = [0], torch_momentum = 0.1, eps = 1e-5, running_var = "unbiased")]
struct TorchNcExplicit;

#[batch_norm(features = 24, axes = [0, 1, 2], momentum = 0.99, eps = 0.001, running_var = "biased")]
struct KerasNhwcExplicit;

#[batch_norm(features = 12, axes = [0, 2], preset = "keras", momentum = 0.9, eps = 1e-5, running_var = "unbiased")]
struct TorchNclOverridden;

mod macro_layers {
    use super::*;

    #[test]
    fn torch_nc() {
        run_macro("torch_nc", TorchNc::new());
    }
    #[test]
    fn torch_nchw() {
        run_macro("torch_nchw", TorchNchw::new());
    }
    #[test]
    fn torch_nhwc() {
        run_macro("torch_nhwc", TorchNhwc::new());
    }
    #[test]
    fn torch_ncl() {
        run_macro("torch_ncl", TorchNcl::new());
    }
    #[test]
    fn keras_nc() {
        run_macro("keras_nc", KerasNc::new());
    }
    #[test]
    fn keras_nhwc() {
        run_macro("keras_nhwc", KerasNhwc::new());
    }
    #[test]
    fn seed_nc() {
        run_macro("seed_nc", SeedNc::new());
    }
    #[test]
    fn seed_nchw() {
        run_macro("seed_nchw", SeedNchw::new());
    }
    #[test]
    fn seed_example() {
        run_macro("seed_example", SeedExample::new());
    }
    #[test]
    fn seed_example_default() {
        run_macro("seed_example", SeedExample::default());
    }
    #[test]
    fn torch_nc_explicit_keys() {
        run_macro("torch_nc", TorchNcExplicit::new());
    }
    #[test]
    fn keras_nhwc_explicit_keys() {
        run_macro("keras_nhwc", KerasNhwcExplicit::new());
    }
    #[test]
    fn torch_ncl_keys_override_preset() {
        run_macro("torch_ncl", TorchNclOverridden::new());
    }

    #[test]
    fn consts() {
        assert_eq!((TorchNc::FEATURES, TorchNc::RANK), (32, 2));
        assert_eq!((TorchNchw::FEATURES, TorchNchw::RANK), (8, 4));
        assert_eq!((TorchNhwc::FEATURES, TorchNhwc::RANK), (16, 4));
        assert_eq!((TorchNcl::FEATURES, TorchNcl::RANK), (12, 3));
        assert_eq!((KerasNc::FEATURES, KerasNc::RANK), (32, 2));
        assert_eq!((KerasNhwc::FEATURES, KerasNhwc::RANK), (24, 4));
        assert_eq!((SeedNc::FEATURES, SeedNc::RANK), (55, 2));
        assert_eq!((SeedNchw::FEATURES, SeedNchw::RANK), (3, 4));
        assert_eq!((SeedExample::FEATURES, SeedExample::RANK), (3025, 3));
        assert_eq!(TorchNc::new().config().get_running_var(), RunningVar::Unbiased);
        assert_eq!(KerasNc::new().config().get_eps(), 1e-3);
    }

    /// The macro layer and the runtime layer agree on every case (within the peers' tolerance;
    /// they run the same kernels, the macro with more constants).
    #[test]
    fn macro_matches_runtime_seed_example() {
        let case = common::case("seed_example");
        let t = case.tensors();
        let mut m = SeedExample::new();
        let mut r = case.runtime_layer();
        let shape = &case.shape[..];
        let x = t.get("x.0");
        let (mut ym, mut yr) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        m.forward_train(x, shape, &mut ym).unwrap();
        r.forward_train(x, shape, &mut yr).unwrap();
        common::assert_close("y macro vs runtime", &ym, &yr, FWD);
        common::assert_close("running_var macro vs runtime", m.running_var(), r.running_var(), FWD);
    }
}

// ------------------------------------------------------------------------------------------------
// A real PyTorch checkpoint: inference of its three batch-norm layers.
// ------------------------------------------------------------------------------------------------

#[batch_norm(features = 16, axes = [0, 2, 3], preset = "pytorch")]
struct CkptBn1;
#[batch_norm(features = 32, axes = [0, 2, 3], preset = "pytorch")]
struct CkptBn2;
#[batch_norm(features = 24, axes = [0], preset = "pytorch")]
struct CkptBn3;

fn check_checkpoint_layer<L>(mut layer: L, prefix: &str, io: &str)
where
    L: BatchNormLayer<Elem = f32, Param = f32>,
{
    let sd = Tensors::load("torch_state_dict.safetensors");
    let data = Tensors::load("torch_state_dict_io.safetensors");
    let what = format!("checkpoint layer {prefix} ({})", std::any::type_name::<L>());
    layer.update_params(sd.get(&format!("{prefix}.weight")), sd.get(&format!("{prefix}.bias"))).unwrap();
    layer
        .set_running_stats(
            sd.get(&format!("{prefix}.running_mean")),
            sd.get(&format!("{prefix}.running_var")),
        )
        .unwrap();
    assert_eq!(sd.get_i64(&format!("{prefix}.num_batches_tracked")), &[5]);
    let shape = data.shape(&format!("{io}.input")).to_vec();
    let x = data.get(&format!("{io}.input"));
    let mut y = vec![f32::NAN; x.len()];
    layer.forward_eval(x, &shape, &mut y).unwrap();
    assert_close_shaped(&what, Some(&shape), &y, data.get(&format!("{io}.output")), FWD);
    let mut inplace = x.to_vec();
    layer.forward_eval_inplace(&mut inplace, &shape).unwrap();
    assert_bits_eq(&format!("{what}: in place"), &inplace, &y);
}

#[test]
fn torch_checkpoint_inference_runtime() {
    let cfg = Config::preset(Preset::Pytorch);
    check_checkpoint_layer(BatchNorm::with_config(16, [0, 2, 3], cfg).unwrap(), "1", "bn1");
    check_checkpoint_layer(BatchNorm::with_config(32, [0, 2, 3], cfg).unwrap(), "4", "bn2");
    check_checkpoint_layer(BatchNorm::with_config(24, [0], cfg).unwrap(), "8", "bn3");
}

#[test]
fn torch_checkpoint_inference_macro() {
    check_checkpoint_layer(CkptBn1::new(), "1", "bn1");
    check_checkpoint_layer(CkptBn2::new(), "4", "bn2");
    check_checkpoint_layer(CkptBn3::new(), "8", "bn3");
}
