//! The naive baseline against the conformance fixtures (PyTorch, Keras and the seed's NumPy),
//! with the tolerances of the project: |a - b| <= 1e-5 + 1e-4 |b| for outputs and statistics,
//! 1e-4 + 1e-3 |b| for gradients.

use std::path::PathBuf;

use bn_bench::naive::NaiveBatchNorm;
use ndarray::{ArrayD, IxDyn};
use safetensors::SafeTensors;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/conformance")
}

fn tensor(file: &SafeTensors<'_>, name: &str) -> ArrayD<f32> {
    let view = file.tensor(name).unwrap_or_else(|e| panic!("tensor {name}: {e}"));
    assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name} is f32");
    let values: Vec<f32> =
        view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    ArrayD::from_shape_vec(IxDyn(view.shape()), values).expect("shape matches the data")
}

fn assert_close(case: &str, what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>, atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{case} {what}: length");
    let mut worst = (0.0f32, 0usize);
    for (i, (&a, &b)) in got.iter().zip(want.iter()).enumerate() {
        let excess = (a - b).abs() - (atol + rtol * b.abs());
        assert!(!a.is_nan(), "{case} {what}[{i}] is NaN");
        if excess > worst.0 {
            worst = (excess, i);
        }
    }
    let (excess, i) = worst;
    assert!(
        excess <= 0.0,
        "{case} {what}[{i}]: got {} want {} (beyond tolerance by {excess})",
        got.iter().nth(i).unwrap(),
        want.iter().nth(i).unwrap()
    );
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("integer") as usize).collect()
}

#[test]
fn naive_baseline_matches_the_conformance_fixtures() {
    let dir = fixtures();
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("manifest.json"))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join("manifest.json").display())),
    )
    .expect("manifest is JSON");
    let cases = manifest.as_array().expect("manifest is a list");
    assert!(cases.len() >= 9, "the manifest lists the cases");
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let bytes = std::fs::read(dir.join(case["file"].as_str().expect("file"))).expect("fixture file");
        let file = SafeTensors::deserialize(&bytes).expect("safetensors");
        let shape = usizes(&case["shape"]);
        let axes = usizes(&case["axes"]);
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let unbiased = case["running_var"].as_str() == Some("unbiased");
        let mut bn = NaiveBatchNorm::new(
            &shape,
            &axes,
            case["momentum"].as_f64().expect("momentum"),
            case["eps"].as_f64().expect("eps"),
            unbiased,
        )
        .expect("the manifest's axes are a layout");
        let gamma = tensor(&file, "gamma");
        let beta = tensor(&file, "beta");
        assert_eq!(gamma.shape(), bn.feature_shape(), "{name}: gamma has the feature extents");
        assert!(bn.update_params(gamma.as_slice().unwrap(), beta.as_slice().unwrap()));
        for k in 0..steps {
            let x = tensor(&file, &format!("x.{k}"));
            let y = bn.forward_train(x.view());
            assert_close(name, &format!("y.{k}"), &y, &tensor(&file, &format!("y.{k}")), 1e-5, 1e-4);
            let rm = tensor(&file, &format!("running_mean.{k}"));
            let rv = tensor(&file, &format!("running_var.{k}"));
            assert_close(name, &format!("running_mean.{k}"), bn.running_mean(), &rm, 1e-5, 1e-4);
            assert_close(name, &format!("running_var.{k}"), bn.running_var(), &rv, 1e-5, 1e-4);
        }
        let y_eval = bn.forward_eval(tensor(&file, "x_eval").view());
        assert_close(name, "y_eval", &y_eval, &tensor(&file, "y_eval"), 1e-5, 1e-4);
        // The gradient is that of the last training step (inference does not touch the cache).
        let dx = bn.backward(tensor(&file, "dy").view()).expect("a training step came before");
        assert_close(name, "dx", &dx, &tensor(&file, "dx"), 1e-4, 1e-3);
        assert_close(name, "dgamma", bn.gamma_grad(), &tensor(&file, "dgamma"), 1e-4, 1e-3);
        assert_close(name, "dbeta", bn.beta_grad(), &tensor(&file, "dbeta"), 1e-4, 1e-3);
    }
}
