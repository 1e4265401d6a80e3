//! The unbiased running-variance option against PyTorch's own results
//! (/work/shared/conformance, `torch_*` cases with the features at axis 1: `nn.BatchNorm1d/2d`,
//! momentum 0.1, eps 1e-5): outputs and running statistics of each training step, inference
//! after the last, and the gradients of `sum(y * dy)` for the last step.

use std::path::PathBuf;

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::SafeTensors;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance")
}

struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    fn load(name: &str) -> Option<Fixture> {
        let path = fixture_dir().join(format!("{name}.safetensors"));
        match std::fs::read(&path) {
            Ok(bytes) => Some(Fixture { bytes }),
            Err(error) => {
                eprintln!("skipping {name}: {} ({error})", path.display());
                None
            }
        }
    }

    fn get(&self, key: &str) -> (Vec<f32>, Vec<usize>) {
        let st = SafeTensors::deserialize(&self.bytes).expect("a safetensors file");
        let view = st.tensor(key).unwrap_or_else(|e| panic!("tensor {key}: {e}"));
        let values =
            view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        (values, view.shape().to_vec())
    }

    fn tensor<const D: usize>(&self, key: &str, device: &Device) -> Tensor<D> {
        let (values, shape) = self.get(key);
        Tensor::from_data(TensorData::new(values, shape), device)
    }
}

fn assert_torch_close(what: &str, ours: Vec<f32>, torch: &[f32]) {
    assert_eq!(ours.len(), torch.len(), "{what}: lengths");
    for (i, (&a, &b)) in ours.iter().zip(torch).enumerate() {
        assert!((a - b).abs() <= 1e-5 + 1e-4 * b.abs(), "{what}[{i}]: ours {a}, PyTorch {b}");
    }
}

fn data<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data")
}

fn check<const D: usize>(name: &str, steps: usize) {
    let Some(fx) = Fixture::load(name) else { return };
    #[allow(deprecated)] // burn 0.22 deprecates NdArray; it is the backend we accelerate.
    let device = Device::ndarray().autodiff();
    let (gamma, shape) = fx.get("gamma");
    let mut bn = bn_burn::BatchNormConfig::new(shape[0]).with_unbiased_running_var(true).init(&device);
    assert!((bn.momentum - 0.1).abs() < 1e-12 && (bn.epsilon - 1e-5).abs() < 1e-12, "PyTorch's defaults");
    bn.gamma = Param::from_tensor(Tensor::from_data(TensorData::new(gamma, shape.clone()), &device));
    bn.beta = Param::from_tensor(fx.tensor("beta", &device));
    let mut last = None;
    for k in 0..steps {
        let x = fx.tensor::<D>(&format!("x.{k}"), &device).require_grad();
        let y = bn.forward(x.clone());
        assert_torch_close(&format!("{name} y.{k}"), data(y.clone()), &fx.get(&format!("y.{k}")).0);
        assert_torch_close(
            &format!("{name} running_mean.{k}"),
            data(bn.running_mean.value_sync()),
            &fx.get(&format!("running_mean.{k}")).0,
        );
        assert_torch_close(
            &format!("{name} running_var.{k}"),
            data(bn.running_var.value_sync()),
            &fx.get(&format!("running_var.{k}")).0,
        );
        last = Some((x, y));
    }
    let (x, y) = last.expect("at least one step");
    let grads = y.mul(fx.tensor::<D>("dy", &device)).sum().backward();
    assert_torch_close(&format!("{name} dx"), data(x.grad(&grads).expect("dx")), &fx.get("dx").0);
    assert_torch_close(
        &format!("{name} dgamma"),
        data(bn.gamma.grad(&grads).expect("dgamma")),
        &fx.get("dgamma").0,
    );
    assert_torch_close(
        &format!("{name} dbeta"),
        data(bn.beta.grad(&grads).expect("dbeta")),
        &fx.get("dbeta").0,
    );

    use burn::module::Module;
    let eval = bn.valid();
    #[allow(deprecated)]
    let plain = Device::ndarray();
    let y = eval.forward(fx.tensor::<D>("x_eval", &plain));
    assert_torch_close(&format!("{name} y_eval"), data(y), &fx.get("y_eval").0);
}

#[test]
fn torch_nc() {
    check::<2>("torch_nc", 3);
}

#[test]
fn torch_nchw() {
    check::<4>("torch_nchw", 3);
}

#[test]
fn torch_ncl() {
    check::<3>("torch_ncl", 2);
}

/// The default (burn's biased running variance) does not give PyTorch's running variance: the
/// option is what makes the fixture pass.
#[test]
fn biased_default_differs_from_torch() {
    let Some(fx) = Fixture::load("torch_nc") else { return };
    #[allow(deprecated)]
    let device = Device::ndarray().autodiff();
    let bn = bn_burn::BatchNormConfig::new(32).init(&device);
    bn.gamma.val(); // gamma and beta do not matter for the running statistics
    let _ = bn.forward(fx.tensor::<2>("x.0", &device));
    let ours = data(bn.running_var.value_sync());
    let torch = fx.get("running_var.0").0;
    assert!(ours.iter().zip(&torch).any(|(a, b)| (a - b).abs() > 1e-4));
}
