//! The example of the NumPy `BatchNormalization` class this crate reproduces, end to end: a
//! batch X of shape (96, 55, 55) normalized over axis 0, so every one of the 55 x 55 positions is
//! a feature with its own gamma, beta and statistics.
//!
//! Run it with `cargo run --release --example numpy_example`.

use batchnorm::{batch_norm, BnError};

/// Batch normalization over the batch axis of (N, 55, 55) images, with the NumPy class's
/// defaults (the `numpy` preset: momentum 0.9, eps 1e-5, biased running variance).
#[batch_norm(features = [55, 55], axes = [0])]
pub struct GridBn;

/// A small deterministic generator, so the example needs no extra dependency.
struct Lcg(u64);

impl Lcg {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32) / (1u64 << 24) as f32
    }

    /// Roughly normal values (sum of four uniforms), with the given mean and spread.
    fn normal(&mut self, mean: f32, std: f32) -> f32 {
        let s: f32 = (0..4).map(|_| self.next_f32()).sum::<f32>() - 2.0;
        mean + std * s * 1.732
    }
}

/// Mean and (biased) variance of every feature of a (n, features) batch.
fn feature_moments(y: &[f32], n: usize, features: usize) -> Vec<(f64, f64)> {
    (0..features)
        .map(|f| {
            let column = (0..n).map(|i| y[i * features + f] as f64);
            let mean = column.clone().sum::<f64>() / n as f64;
            let var = column.map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
            (mean, var)
        })
        .collect()
}

fn summarize(label: &str, moments: &[(f64, f64)]) {
    let (mut lo_m, mut hi_m, mut lo_v, mut hi_v) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(m, v) in moments {
        lo_m = lo_m.min(m);
        hi_m = hi_m.max(m);
        lo_v = lo_v.min(v);
        hi_v = hi_v.max(v);
    }
    println!("{label}: per-feature mean in [{lo_m:+.2e}, {hi_m:+.2e}], variance in [{lo_v:.5}, {hi_v:.5}]");
}

fn main() -> Result<(), BnError> {
    let shape = [96, 55, 55];
    let n = shape[0];
    let features = GridBn::FEATURES;
    let mut rng = Lcg(42);
    let x: Vec<f32> = (0..n * features).map(|_| rng.normal(3.0, 2.0)).collect();
    let mut y = vec![0.0f32; x.len()];

    let mut bn = GridBn::new();
    println!("GridBn: rank {}, {} features (55 x 55), input shape {:?}", GridBn::RANK, features, shape);

    // Training: normalize with the batch statistics, update the running statistics.
    bn.forward_train(&x, &shape, &mut y)?;
    println!("training forward: x {:?} -> y {:?}", shape, shape);
    summarize("  y (train)", &feature_moments(&y, n, features));
    println!(
        "  running mean[0] = {:.4}, running var[0] = {:.4} (momentum 0.9: 10% of the batch's)",
        bn.running_mean()[0],
        bn.running_var()[0]
    );

    // Backward of that forward, with dy = y (the gradient of 0.5 * sum(y^2)).
    let mut dx = vec![0.0f32; x.len()];
    bn.backward(&x, &y, &shape, &mut dx)?;
    println!("backward: dgamma[0] = {:.4}, dbeta[0] = {:.2e}", bn.gamma_grad()[0], bn.beta_grad()[0]);

    // Inference: a new batch from the same distribution, normalized with the running statistics.
    for _ in 0..30 {
        bn.forward_train(&x, &shape, &mut y)?;
    }
    let x_test: Vec<f32> = (0..n * features).map(|_| rng.normal(3.0, 2.0)).collect();
    bn.forward_eval(&x_test, &shape, &mut y)?;
    summarize("  y (eval, after 31 training steps)", &feature_moments(&y, n, features));

    // Bad input is an error, never a panic: (96, 11, 275) has the right size, not the right shape.
    let err = bn.forward_eval(&x_test, &[96, 11, 275], &mut y).unwrap_err();
    println!("wrong shape -> Err: {err}");
    Ok(())
}
