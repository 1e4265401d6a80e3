//! Adversarial numerics on every backend this machine runs, through the layer
//! (`set_backend`), against an `f64` reference computed here from the same `f32` inputs and
//! parameters: large offsets (`|mean| / std` up to 1e4), variances next to (and far below) eps,
//! denormal inputs and parameters, and values whose squares overflow `f32`.
//!
//! The bounds asserted here are the accuracy docs/RELIABILITY.md documents ("Accuracy").

use crate::common;

use batchnorm::{Backend, BatchNorm, Config, Preset};
use common::Rng;

/// A layout under test: feature extents, reduced axes and a shape.
struct Geo {
    name: &'static str,
    features: Vec<usize>,
    axes: Vec<usize>,
    shape: Vec<usize>,
    channels: usize,
    /// Product of the extents after the feature axes.
    inner: usize,
}

impl Geo {
    fn new(name: &'static str, features: &[usize], axes: &[usize], shape: &[usize]) -> Geo {
        let first = (0..shape.len()).find(|a| !axes.contains(a)).unwrap();
        Geo {
            name,
            features: features.to_vec(),
            axes: axes.to_vec(),
            shape: shape.to_vec(),
            channels: features.iter().product(),
            inner: shape[first + features.len()..].iter().product(),
        }
    }
    fn len(&self) -> usize {
        self.shape.iter().product()
    }
    fn channels(&self) -> usize {
        self.channels
    }
    /// The channel of flat index `i`.
    fn channel(&self, i: usize) -> usize {
        (i / self.inner) % self.channels
    }
    fn layer(&self, config: Config, backend: Backend) -> BatchNorm {
        let mut l = BatchNorm::with_config(self.features.clone(), &self.axes, config).unwrap();
        l.set_backend(Some(backend)).unwrap();
        assert_eq!(l.backend(), backend);
        l
    }
}

/// Both families, with tails for 8- and 16-lane vectors, serial and (above the kernels' work
/// threshold) parallel sizes.
fn geometries() -> Vec<Geo> {
    if cfg!(miri) {
        // Under Miri: one small tensor per family, with vector tails.
        return vec![
            Geo::new("planes NCHW", &[3], &[0, 2, 3], &[2, 3, 3, 5]),
            Geo::new("rows NC (C = 7)", &[7], &[0], &[9, 7]),
        ];
    }
    vec![
        Geo::new("planes NCHW", &[5], &[0, 2, 3], &[3, 5, 7, 9]),
        Geo::new("rows NC (C = 7)", &[7], &[0], &[203, 7]),
        Geo::new("rows NHWC", &[19], &[0, 1, 2], &[2, 9, 9, 19]),
        // 2 * 32768 elements: at the kernels' threshold for entering the Rayon pool.
        Geo::new("planes NCHW, parallel size", &[4], &[0, 2, 3], &[2, 4, 64, 64]),
        Geo::new("rows NC, parallel size", &[16], &[0], &[2048, 16]),
    ]
}

/// The backends under test: all of this machine's.
fn backends() -> Vec<Backend> {
    Backend::available()
}

/// Per-channel mean and biased variance in `f64` (two-pass).
fn stats(g: &Geo, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let c = g.channels();
    let n = (x.len() / c) as f64;
    let mut mean = vec![0.0; c];
    for (i, &v) in x.iter().enumerate() {
        mean[g.channel(i)] += v as f64;
    }
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = vec![0.0; c];
    for (i, &v) in x.iter().enumerate() {
        let d = v as f64 - mean[g.channel(i)];
        var[g.channel(i)] += d * d;
    }
    var.iter_mut().for_each(|v| *v /= n);
    (mean, var)
}

/// `gamma * (x - mean) / sqrt(var + eps) + beta` in `f64`.
fn affine(g: &Geo, x: &[f32], mean: &[f64], var: &[f64], gamma: &[f32], beta: &[f32], eps: f64) -> Vec<f64> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = g.channel(i);
            gamma[c] as f64 * (v as f64 - mean[c]) / (var[c] + eps).sqrt() + beta[c] as f64
        })
        .collect()
}

/// The largest `|got - want|`, with its index; both non-finite the same way counts as 0.
fn max_abs_err(got: &[f32], want: &[f64]) -> (f64, usize) {
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = if (g as f64) == w || (g.is_nan() && w.is_nan()) { 0.0 } else { (g as f64 - w).abs() };
        let e = if e.is_nan() { f64::INFINITY } else { e };
        if e > worst.0 {
            worst = (e, i);
        }
    }
    worst
}

fn assert_within(what: &str, got: &[f32], want: &[f64], bound: f64) {
    let (e, i) = max_abs_err(got, want);
    assert!(e <= bound, "{what}: |error| {e:e} > {bound:e} at [{i}]: got {:e}, want {:e}", got[i], want[i]);
}

/// `x = mean_c + std * N(0, 1)` with a per-channel mean `offset * (+-1)`.
fn offset_data(g: &Geo, rng: &mut Rng, offset: f64, std: f64) -> Vec<f32> {
    (0..g.len())
        .map(|i| {
            let sign = if g.channel(i).is_multiple_of(2) { 1.0 } else { -1.0 };
            (sign * offset + std * normal(rng)) as f32
        })
        .collect()
}

fn normal(rng: &mut Rng) -> f64 {
    let u1 = rng.unit().max(1e-300);
    let u2 = rng.unit();
    (-2.0 * u1.ln()).sqrt() * (2.0 * core::f64::consts::PI * u2).cos()
}

/// Trains one step with momentum 0 (the running statistics become the batch's) and checks the
/// output, the running statistics, and an inference and a backward pass against the reference.
/// Returns the worst normalized-output error.
fn check_train(what: &str, g: &Geo, b: Backend, x: &[f32], y_bound: f64) -> f64 {
    let eps = 1e-5;
    let c = g.channels();
    let config = Config::new().momentum(0.0).eps(eps);
    let mut l = g.layer(config, b);
    let mut y = vec![0.0f32; x.len()];
    l.forward_train(x, &g.shape, &mut y).unwrap_or_else(|e| panic!("{what}: {e}"));
    let (mean, var) = stats(g, x);
    let ones = vec![1.0f32; c];
    let zeros = vec![0.0f32; c];
    let want = affine(g, x, &mean, &var, &ones, &zeros, eps);
    let (err, _) = max_abs_err(&y, &want);
    assert_within(&format!("{what}: forward_train y"), &y, &want, y_bound);
    // The batch statistics, rounded once to f32 (momentum 0).
    for ch in 0..c {
        let scale = var[ch].sqrt();
        // f32 rounding of the mean (and its square, for a variance below the mean's ulp).
        let ulp = mean[ch].abs() * 1e-6 + 2e-45;
        let dm = (l.running_mean()[ch] as f64 - mean[ch]).abs();
        assert!(dm <= 1e-4 * scale + ulp, "{what}: running mean [{ch}] off by {dm:e}");
        let dv = (l.running_var()[ch] as f64 - var[ch]).abs();
        assert!(
            dv <= 1e-3 * var[ch] + ulp * ulp + 1e-38,
            "{what}: running var [{ch}] off by {dv:e} (var {:e})",
            var[ch]
        );
    }
    // Inference with those running statistics, from the same f32 parameters.
    let mut ye = vec![0.0f32; x.len()];
    l.forward_eval(x, &g.shape, &mut ye).unwrap();
    let rm: Vec<f64> = l.running_mean().iter().map(|&v| v as f64).collect();
    let rv: Vec<f64> = l.running_var().iter().map(|&v| v as f64).collect();
    let want_eval = affine(g, x, &rm, &rv, &ones, &zeros, eps);
    assert_within(&format!("{what}: forward_eval y"), &ye, &want_eval, y_bound);
    // Backward: dx relative to the largest |dx| of the tensor.
    let mut rng = Rng::new(77);
    let dy: Vec<f32> = (0..x.len()).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
    let mut dx = vec![0.0f32; x.len()];
    l.backward(x, &dy, &g.shape, &mut dx).unwrap();
    let n = (x.len() / c) as f64;
    let xhat = affine(g, x, &mean, &var, &ones, &zeros, eps);
    let (mut sdy, mut sdyx) = (vec![0.0; c], vec![0.0; c]);
    for i in 0..x.len() {
        sdy[g.channel(i)] += dy[i] as f64;
        sdyx[g.channel(i)] += dy[i] as f64 * xhat[i];
    }
    let want_dx: Vec<f64> = (0..x.len())
        .map(|i| {
            let ch = g.channel(i);
            (dy[i] as f64 - sdy[ch] / n - xhat[i] * sdyx[ch] / n) / (var[ch] + eps).sqrt()
        })
        .collect();
    let dx_scale = want_dx.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert_within(&format!("{what}: backward dx"), &dx, &want_dx, 5e-3 * dx_scale);
    if std::env::var_os("BN_PRINT_ERRORS").is_some() {
        let e_eval = max_abs_err(&ye, &want_eval).0;
        let e_dx = max_abs_err(&dx, &want_dx).0 / dx_scale;
        println!("ERR {what}: train {err:e} eval {e_eval:e} dx/max|dx| {e_dx:e}");
    }
    for (ch, &want) in sdyx.iter().enumerate() {
        let tol = 1e-3 * n.sqrt() + 1e-4 * want.abs();
        let d = (l.gamma_grad()[ch] as f64 - want).abs();
        assert!(d <= tol, "{what}: gamma_grad[{ch}] = {} want {want}", l.gamma_grad()[ch]);
    }
    err
}

/// `|mean| / std` from 1 to 1e4, at several magnitudes: the normalized outputs stay within 5e-3
/// of the reference on every backend and both families.
#[test]
fn large_offsets_stay_within_5e_3() {
    let cases: &[(f64, f64)] = if cfg!(miri) {
        &[(1e4, 1.0)]
    } else {
        &[(0.0, 1.0), (10.0, 1.0), (1e3, 1.0), (1e4, 1.0), (10.0, 1e-3), (1e7, 1e3), (-5e5, 50.0)]
    };
    for g in geometries() {
        for (k, &(offset, std)) in cases.iter().enumerate() {
            let x = offset_data(&g, &mut Rng::new(10 + k as u64), offset, std);
            for b in backends() {
                let what = format!("{b} {}: offset {offset:e}, std {std:e}", g.name);
                let err = check_train(&what, &g, b, &x, 5e-3);
                if std::env::var_os("BN_PRINT_ERRORS").is_some() {
                    println!("{what}: max |y - ref| = {err:e}");
                }
            }
        }
    }
}

/// Variances far below, next to and above eps, and exactly zero (a constant channel).
#[test]
fn variance_next_to_eps() {
    let stds = if cfg!(miri) { vec![0.0, 3.2e-3] } else { vec![0.0, 1e-7, 1e-5, 1e-4, 3.2e-3, 1e-2] };
    for g in geometries() {
        for (k, &std) in stds.iter().enumerate() {
            for offset in if cfg!(miri) { vec![300.0] } else { vec![0.0, 1.0, 300.0] } {
                let x = offset_data(&g, &mut Rng::new(40 + k as u64), offset, std);
                for b in backends() {
                    let what = format!("{b} {}: offset {offset}, std {std:e}", g.name);
                    // y is (x - mean) / sqrt(var + eps): at most a few units; the same bound.
                    check_train(&what, &g, b, &x, 5e-3);
                    // A constant channel normalizes to beta exactly enough.
                    if std == 0.0 {
                        let mut l = g.layer(Config::new(), b);
                        let beta: Vec<f32> = (0..g.channels()).map(|c| c as f32 * 0.25 - 1.0).collect();
                        l.update_params(&vec![2.0; g.channels()], &beta).unwrap();
                        let mut y = vec![0.0; x.len()];
                        l.forward_train(&x, &g.shape, &mut y).unwrap();
                        for (i, &v) in y.iter().enumerate() {
                            let want = beta[g.channel(i)];
                            assert!(
                                (v - want).abs() <= 1e-5,
                                "{what}: constant channel y[{i}] = {v}, want {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Subnormal inputs, statistics and parameters: finite results that match the reference, no
/// spurious NonFinite, inference and backward included.
#[test]
fn denormals() {
    let tiny = f32::from_bits(1); // 1.4e-45, the smallest subnormal
    for g in geometries() {
        let mut rng = Rng::new(90);
        let n = g.len();
        let inputs: Vec<(&str, Vec<f32>)> = vec![
            ("all subnormal", (0..n).map(|_| rng.uniform(-1e-39, 1e-39) as f32).collect()),
            ("smallest subnormals", (0..n).map(|i| tiny * (i % 5) as f32).collect()),
            (
                "subnormal next to normal",
                (0..n)
                    .map(
                        |i| if i % 3 == 0 { 1.0 + rng.unit() as f32 } else { rng.uniform(0.0, 1e-39) as f32 },
                    )
                    .collect(),
            ),
        ];
        for (name, x) in &inputs {
            assert!(x.iter().any(|v| v.is_subnormal()), "{name}: has subnormals");
            for b in backends() {
                let what = format!("{b} {}: {name}", g.name);
                check_train(&what, &g, b, x, 5e-3);
                // Subnormal parameters and running statistics are finite, hence accepted.
                let c = g.channels();
                let mut l = g.layer(Config::new(), b);
                let sub = |k: usize| f32::from_bits(1 + 1000 * k as u32);
                let (gamma, beta): (Vec<f32>, Vec<f32>) =
                    ((0..c).map(|k| 1.0 + sub(k)).collect(), (0..c).map(sub).collect());
                let (rm, rv): (Vec<f32>, Vec<f32>) = ((0..c).map(sub).collect(), (0..c).map(sub).collect());
                l.update_params(&gamma, &beta).unwrap();
                l.set_running_stats(&rm, &rv).unwrap();
                let mut y = vec![0.0; n];
                l.forward_eval(x, &g.shape, &mut y).unwrap();
                let rm64: Vec<f64> = rm.iter().map(|&v| v as f64).collect();
                let rv64: Vec<f64> = rv.iter().map(|&v| v as f64).collect();
                let want = affine(&g, x, &rm64, &rv64, &gamma, &beta, 1e-5);
                // Outputs are ~x / sqrt(eps): an absolute bound relative to the largest.
                let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                assert_within(
                    &format!("{what}: eval, subnormal parameters"),
                    &y,
                    &want,
                    1e-6 * scale + 1e-37,
                );
                let mut dx = vec![0.0; n];
                l.backward_eval(x, x, &g.shape, &mut dx).unwrap();
                assert!(dx.iter().all(|v| v.is_finite()), "{what}: backward_eval finite");
                assert!(l.gamma_grad().iter().chain(l.beta_grad()).all(|v| v.is_finite()));
            }
        }
    }
}

/// Values whose squares overflow `f32` (|x| >= 1.9e19) but whose variance fits: valid batches,
/// accurate on every backend. A channel that is constant at +-f32::MAX is valid too (variance
/// 0), and must not overflow in a sum.
#[test]
fn squares_overflow_f32_but_the_variance_fits() {
    for g in geometries() {
        let cases = [
            ("mean 1e22, std 1e18", 1e22, 1e18),
            ("mean 0, std 5e18, one 2e19 per channel", 0.0, 5e18),
            ("mean 3e19, std 1e18", 3e19, 1e18),
        ];
        for (k, (name, offset, std)) in cases.into_iter().enumerate() {
            let mut x = offset_data(&g, &mut Rng::new(120 + k as u64), offset, std);
            if offset == 0.0 {
                // The first value of each channel's first run: its square overflows f32.
                (0..g.channels()).for_each(|c| x[c * g.inner] = 2e19);
            }
            assert!(x.iter().any(|&v| (v * v).is_infinite()), "{name}: some squares overflow f32");
            for b in backends() {
                check_train(&format!("{b} {}: {name}", g.name), &g, b, &x, 5e-3);
            }
        }
        // Constant channels at +-MAX and a max-magnitude constant next to ordinary channels.
        let x: Vec<f32> = (0..g.len())
            .map(|i| match g.channel(i) % 3 {
                0 => f32::MAX,
                1 => -f32::MAX,
                _ => (i % 7) as f32,
            })
            .collect();
        for b in backends() {
            let what = format!("{b} {}: constant +-f32::MAX channels", g.name);
            let mut l = g.layer(Config::new().momentum(0.5), b);
            let mut y = vec![0.0; x.len()];
            l.forward_train(&x, &g.shape, &mut y).unwrap_or_else(|e| panic!("{what}: {e}"));
            for (i, &v) in y.iter().enumerate() {
                if g.channel(i) % 3 != 2 {
                    assert!(v.abs() <= 1e-5, "{what}: y[{i}] = {v}, want 0");
                } else {
                    assert!(v.is_finite(), "{what}: y[{i}] = {v}");
                }
            }
            for ch in 0..g.channels() {
                let want = match ch % 3 {
                    0 => 0.5 * f32::MAX,
                    1 => -0.5 * f32::MAX,
                    _ => continue,
                };
                assert_eq!(l.running_mean()[ch], want, "{what}: running mean [{ch}]");
                assert_eq!(l.running_var()[ch], 0.5, "{what}: running var [{ch}]");
            }
        }
    }
}

/// Inference on values near f32::MAX: finite where the exact result fits f32, +-Inf where it
/// overflows (the exact value rounds to infinity), never NaN.
#[test]
fn inference_near_f32_max() {
    for g in geometries() {
        let c = g.channels();
        let x: Vec<f32> =
            (0..g.len()).map(|i| if i % 2 == 0 { f32::MAX } else { -f32::MAX * 0.75 }).collect();
        // Channel 0 doubles (overflows), channel 1 halves, the rest keep the scale.
        let gamma: Vec<f32> = (0..c).map(|k| [2.0, 0.5, 1.0][k.min(2)]).collect();
        let beta = vec![0.0f32; c];
        let (rm, rv) = (vec![0.0f32; c], vec![1.0f32; c]);
        let want = affine(&g, &x, &vec![0.0; c], &vec![1.0; c], &gamma, &beta, 1e-5);
        let want_f32: Vec<f64> = want.iter().map(|&v| v as f32 as f64).collect();
        for b in backends() {
            let what = format!("{b} {}: inference near f32::MAX", g.name);
            let mut l = g.layer(Config::new(), b);
            l.update_params(&gamma, &beta).unwrap();
            l.set_running_stats(&rm, &rv).unwrap();
            let mut y = vec![0.0; x.len()];
            l.forward_eval(&x, &g.shape, &mut y).unwrap();
            for (i, (&v, &w)) in y.iter().zip(&want_f32).enumerate() {
                assert!(!v.is_nan(), "{what}: y[{i}] is NaN");
                if w.is_infinite() {
                    assert_eq!(v as f64, w, "{what}: y[{i}] overflows to {w}");
                } else {
                    assert!((v as f64 - w).abs() <= 1e-6 * w.abs(), "{what}: y[{i}] = {v:e}, want {w:e}");
                }
            }
        }
    }
}

/// PyTorch's preset (unbiased running variance) on an ordinary batch: the running variance is
/// the batch's times n / (n - 1), on every backend.
#[test]
fn unbiased_running_variance_is_accurate() {
    for g in geometries() {
        let x = offset_data(&g, &mut Rng::new(200), 100.0, 2.0);
        let (_, var) = stats(&g, &x);
        let n = (g.len() / g.channels()) as f64;
        for b in backends() {
            let mut l = g.layer(Config::preset(Preset::Pytorch).torch_momentum(1.0), b);
            let mut y = vec![0.0; x.len()];
            l.forward_train(&x, &g.shape, &mut y).unwrap();
            for (ch, &v) in var.iter().enumerate() {
                let want = v * n / (n - 1.0);
                let got = l.running_var()[ch] as f64;
                assert!(
                    (got - want).abs() <= 1e-4 * want,
                    "{b} {}: running var [{ch}] {got} want {want}",
                    g.name
                );
            }
        }
    }
}
