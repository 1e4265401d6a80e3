//! The `dtype` key and the 16-bit layers: `#[batch_norm(dtype = "f64" | "bf16" | "f16")]` layers
//! against the `f64` reference within the format's precision, and the contract's semantics
//! (validation before writing, `NonFinite`, empty batches, `NoForward`, NaN propagation) for
//! `bf16` and `f16` layers as for `f32` ones, on every backend this machine runs.

use crate::common;

use batchnorm::half::{bf16, f16};
use batchnorm::{batch_norm, Backend, BatchNorm, BatchNormLayer, BnError, Config, Element, Layout};
use common::{full_state, Rng};

#[batch_norm(features = 7, axes = [0, 2, 3], dtype = "f64", preset = "pytorch")]
struct NchwF64;

#[batch_norm(features = 7, axes = [0, 2, 3], dtype = "bf16", preset = "pytorch")]
struct NchwBf16;

#[batch_norm(features = 7, axes = [0, 2, 3], dtype = "f16", preset = "pytorch")]
struct NchwF16;

#[batch_norm(features = 7, axes = [0, 2, 3], dtype = "f32", preset = "pytorch")]
struct NchwF32;

#[batch_norm(features = 70, axes = [0, 1, 2], dtype = "bf16")]
struct NhwcBf16;

#[batch_norm(features = 70, axes = [0, 1, 2], dtype = "f16")]
struct NhwcF16;

/// The element and parameter types the key chose.
#[test]
fn the_key_sets_the_element_and_parameter_types() {
    fn types<L: BatchNormLayer>() -> (&'static str, &'static str) {
        (std::any::type_name::<L::Elem>(), std::any::type_name::<L::Param>())
    }
    assert_eq!(types::<NchwF64>(), ("f64", "f64"));
    assert_eq!(types::<NchwF32>(), ("f32", "f32"));
    assert_eq!(types::<NchwBf16>().1, "f32");
    assert_eq!(types::<NchwF16>().1, "f32");
    assert_eq!(<NchwBf16 as BatchNormLayer>::Elem::NAME, "bf16");
    assert_eq!(<NchwF16 as BatchNormLayer>::Elem::NAME, "f16");
    let bf: Vec<bf16> = vec![bf16::ONE; 2];
    let _: &[<NchwBf16 as BatchNormLayer>::Elem] = &bf;
}

/// Everything a layer computes on one batch, widened to f64.
struct Outputs {
    y: Vec<f64>,
    dx: Vec<f64>,
    y_eval: Vec<f64>,
    running_mean: Vec<f64>,
    running_var: Vec<f64>,
    gamma_grad: Vec<f64>,
    beta_grad: Vec<f64>,
}

fn run<L: BatchNormLayer>(layer: &mut L, x: &[L::Elem], dy: &[L::Elem], shape: &[usize]) -> Outputs
where
    L::Elem: Element,
    L::Param: batchnorm::Param,
{
    let w = |v: &[L::Elem]| v.iter().map(|e| e.to_f64()).collect::<Vec<f64>>();
    let p = |v: &[L::Param]| v.iter().map(|e| batchnorm::Param::to_f64(*e)).collect::<Vec<f64>>();
    let zero = L::Elem::default();
    let mut y = vec![zero; x.len()];
    layer.forward_train(x, shape, &mut y).unwrap();
    let mut dx = vec![zero; x.len()];
    layer.backward(x, dy, shape, &mut dx).unwrap();
    let mut y_eval = vec![zero; x.len()];
    layer.forward_eval(x, shape, &mut y_eval).unwrap();
    Outputs {
        y: w(&y),
        dx: w(&dx),
        y_eval: w(&y_eval),
        running_mean: p(layer.running_mean()),
        running_var: p(layer.running_var()),
        gamma_grad: p(layer.gamma_grad()),
        beta_grad: p(layer.beta_grad()),
    }
}

fn assert_close(what: &str, got: &[f64], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= rtol * w.abs() + atol, "{what}[{i}]: got {g}, want {w}");
    }
}

/// A macro layer of element `E` against the f64 runtime layer on the same (widened) data.
fn conformance<L>(layer: &mut L, features: usize, axes: &[usize], shape: &[usize], rtol: f64)
where
    L: BatchNormLayer,
    L::Elem: Element,
    L::Param: batchnorm::Param,
{
    let n: usize = shape.iter().product();
    let mut rng = Rng::new(7);
    let x: Vec<L::Elem> = rng.vec(n, -1.0, 4.0);
    let dy: Vec<L::Elem> = rng.vec(n, -1.0, 1.0);
    let got = run(layer, &x, &dy, shape);
    let config = *layer.as_batch_norm().config();
    let mut reference =
        BatchNorm::<f64>::with_layout(Layout::from_axes(&[features], axes).unwrap(), config).unwrap();
    let x64: Vec<f64> = x.iter().map(|e| e.to_f64()).collect();
    let dy64: Vec<f64> = dy.iter().map(|e| e.to_f64()).collect();
    let want = run(&mut reference, &x64, &dy64, shape);
    let name = L::Elem::NAME;
    assert_close(&format!("{name} y"), &got.y, &want.y, rtol, 1e-2 * rtol);
    assert_close(&format!("{name} y_eval"), &got.y_eval, &want.y_eval, rtol, 1e-2 * rtol);
    assert_close(&format!("{name} dx"), &got.dx, &want.dx, rtol, 1e-2 * rtol);
    let tight = rtol.max(1e-5);
    assert_close(&format!("{name} running_mean"), &got.running_mean, &want.running_mean, tight, 1e-6);
    assert_close(&format!("{name} running_var"), &got.running_var, &want.running_var, tight, 1e-6);
    let per = (n / features) as f64;
    assert_close(&format!("{name} gamma_grad"), &got.gamma_grad, &want.gamma_grad, 1e-4, per * 1e-5);
    assert_close(&format!("{name} beta_grad"), &got.beta_grad, &want.beta_grad, 1e-4, per * 1e-5);
}

#[test]
fn macro_layers_of_every_dtype_match_the_f64_reference() {
    let nchw = [3, 7, 5, 5];
    conformance(&mut NchwF64::new(), 7, &[0, 2, 3], &nchw, 1e-12);
    conformance(&mut NchwF32::new(), 7, &[0, 2, 3], &nchw, 1e-5);
    conformance(&mut NchwBf16::new(), 7, &[0, 2, 3], &nchw, 1.0 / 128.0);
    conformance(&mut NchwF16::new(), 7, &[0, 2, 3], &nchw, 1.0 / 1024.0);
    let nhwc = [2, 3, 5, 70];
    conformance(&mut NhwcBf16::new(), 70, &[0, 1, 2], &nhwc, 1.0 / 128.0);
    conformance(&mut NhwcF16::new(), 70, &[0, 1, 2], &nhwc, 1.0 / 1024.0);
}

/// The macro layer runs the same kernels as the runtime layer: the same bits.
#[test]
fn macro_and_runtime_bf16_layers_give_the_same_bits() {
    let shape = [4, 7, 6, 6];
    let n: usize = shape.iter().product();
    let mut rng = Rng::new(3);
    let x: Vec<bf16> = rng.vec(n, -2.0, 2.0);
    let mut macro_layer = NchwBf16::new();
    let mut runtime = BatchNorm::<bf16>::with_layout(
        Layout::from_axes(&[7], &[0, 2, 3]).unwrap(),
        *macro_layer.as_batch_norm().config(),
    )
    .unwrap();
    let (mut a, mut b) = (vec![bf16::ZERO; n], vec![bf16::ZERO; n]);
    macro_layer.forward_train(&x, &shape, &mut a).unwrap();
    runtime.forward_train(&x, &shape, &mut b).unwrap();
    assert_eq!(a, b);
    assert_eq!(macro_layer.running_var(), runtime.running_var());
}

// ------------------------------------------------------------------------------------------------
// Semantics, for both 16-bit formats on every backend
// ------------------------------------------------------------------------------------------------

const SHAPE: [usize; 4] = [2, 3, 4, 4];
const N: usize = 96;

fn layer<E: Element<Param = f32>>(backend: Backend, config: Config) -> BatchNorm<E> {
    let mut bn = BatchNorm::<E>::with_layout(Layout::from_axes(&[3], &[0, 2, 3]).unwrap(), config).unwrap();
    bn.set_backend(Some(backend)).unwrap();
    bn
}

fn data<E: Element>(seed: u64) -> Vec<E> {
    Rng::new(seed).vec(N, -2.0, 3.0)
}

fn semantics<E: Element<Param = f32>>() {
    for backend in Backend::available() {
        let what = format!("{} {backend}", E::NAME);
        let mut bn = layer::<E>(backend, Config::new());
        let (x, dy) = (data::<E>(1), data::<E>(2));
        let mut out = vec![E::default(); N];

        // backward before any forward.
        assert!(matches!(bn.backward(&x, &dy, &SHAPE, &mut out), Err(BnError::NoForward)), "{what}");

        // A good batch, then bad ones that must change nothing.
        bn.forward_train(&x, &SHAPE, &mut out).unwrap();
        let mut dx_before = vec![E::default(); N];
        bn.backward(&x, &dy, &SHAPE, &mut dx_before).unwrap();
        let before = full_state(&bn);

        for (i, bad) in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY].into_iter().enumerate() {
            let mut x_bad = x.clone();
            x_bad[1 + i] = E::from_f64(bad);
            let r = bn.forward_train(&x_bad, &SHAPE, &mut out);
            assert!(matches!(r, Err(BnError::NonFinite { index: 0, .. })), "{what}: {bad} gave {r:?}");
            assert_eq!(full_state(&bn), before, "{what}: state changed by a non-finite batch");
        }
        // Wrong shapes and lengths.
        assert!(bn.forward_train(&x, &[2, 4, 4, 4], &mut out).is_err(), "{what}");
        assert!(bn.forward_train(&x[..N - 1], &SHAPE, &mut out).is_err(), "{what}");
        assert!(bn.forward_eval(&x, &SHAPE, &mut out[..N - 1]).is_err(), "{what}");
        assert!(bn.backward(&x, &dy, &[2, 3, 2, 8], &mut out).is_err(), "{what}");
        // Empty batches: inference is a no-op, training an error.
        assert!(bn.forward_eval(&[], &[0, 3, 4, 4], &mut []).is_ok(), "{what}");
        assert!(bn.forward_train(&[], &[0, 3, 4, 4], &mut []).is_err(), "{what}");
        assert_eq!(full_state(&bn), before, "{what}: state changed by a rejected call");

        // backward still differentiates the last good forward.
        let mut dx_after = vec![E::default(); N];
        bn.backward(&x, &dy, &SHAPE, &mut dx_after).unwrap();
        assert_eq!(dx_after, dx_before, "{what}: backward after rejected calls");

        // NaN in inference input reaches its own element only.
        let mut x_nan = x.clone();
        x_nan[5] = E::from_f64(f64::NAN);
        let (mut y, mut y_clean) = (vec![E::default(); N], vec![E::default(); N]);
        bn.forward_eval(&x_nan, &SHAPE, &mut y).unwrap();
        bn.forward_eval(&x, &SHAPE, &mut y_clean).unwrap();
        for i in 0..N {
            if i == 5 {
                assert!(y[i].to_f64().is_nan(), "{what}: NaN did not propagate");
            } else {
                assert_eq!(y[i], y_clean[i], "{what}: NaN reached element {i}");
            }
        }

        // track_running_stats = false: inference with batch statistics equals training's y.
        let mut batch = layer::<E>(backend, Config::new().track_running_stats(false));
        let (mut a, mut b) = (vec![E::default(); N], vec![E::default(); N]);
        batch.forward_train(&x, &SHAPE, &mut a).unwrap();
        batch.forward_eval(&x, &SHAPE, &mut b).unwrap();
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            let (p, q) = (p.to_f64(), q.to_f64());
            assert!(
                (p - q).abs() <= 1e-2 * (q.abs() + 1e-2),
                "{what}: batch-statistics inference [{i}]: {p} vs {q}"
            );
        }
    }
}

#[test]
fn bf16_layers_keep_the_contract() {
    semantics::<bf16>();
}

#[test]
fn f16_layers_keep_the_contract() {
    semantics::<f16>();
}

/// f16 overflows at 65504: large inputs are infinities in the data, which is non-finite.
#[test]
fn f16_values_beyond_its_range_are_non_finite_batches() {
    let mut bn = layer::<f16>(Backend::detect(), Config::new());
    let mut x = data::<f16>(4);
    x[0] = f16::from_f32(1e5);
    assert!(x[0].is_infinite());
    let mut y = vec![f16::ZERO; N];
    assert!(matches!(bn.forward_train(&x, &SHAPE, &mut y), Err(BnError::NonFinite { .. })));
}
