//! The non-finite rule (docs/RELIABILITY.md) on every backend this machine runs and both kernel families
//! (planes: NCHW; rows: NC and NHWC), at serial and parallel sizes:
//!
//! - a non-finite batch mean or variance (a single NaN in an otherwise normal channel, an Inf,
//!   finite values whose variance overflows `f32`) is `Err(NonFinite)` naming the channel, and
//!   the layer is bit-for-bit unchanged (running statistics, counter, gradients, and the
//!   statistics saved for `backward`);
//! - NaN/Inf in inference input or in `dy` propagate as IEEE arithmetic says, to the elements
//!   (or, through a channel's sums, the channel) they reach, and nowhere else;
//! - nothing hangs: every check runs under a watchdog.

use crate::common;

use std::sync::mpsc;
use std::time::Duration;

use batchnorm::{Backend, BatchNorm, BnError, Config, Layout, Preset};
use common::{assert_bits_eq, full_state, Rng};

/// Runs `f` on another thread and fails if it takes longer than a minute (a hang).
fn watchdog(name: &str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => handle.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic)
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{name}: still running after 60 s (a hang?)"),
    }
}

/// A layout under test and its canonical view.
#[derive(Clone)]
struct Geo {
    name: &'static str,
    features: Vec<usize>,
    axes: Vec<usize>,
    shape: Vec<usize>,
    outer: usize,
    channels: usize,
    inner: usize,
}

impl Geo {
    fn new(name: &'static str, features: &[usize], axes: &[usize], shape: &[usize]) -> Geo {
        let dims = Layout::from_axes(features, axes).unwrap().canonical(shape).unwrap();
        Geo {
            name,
            features: features.to_vec(),
            axes: axes.to_vec(),
            shape: shape.to_vec(),
            outer: dims.outer,
            channels: dims.channels,
            inner: dims.inner,
        }
    }
    fn len(&self) -> usize {
        self.outer * self.channels * self.inner
    }
    fn channel(&self, i: usize) -> usize {
        (i / self.inner) % self.channels
    }
    /// Flat index of value `(o, j)` of channel `c`.
    fn at(&self, o: usize, c: usize, j: usize) -> usize {
        (o * self.channels + c) * self.inner + j
    }
    /// The first, a middle and the last value of channel `c` (vector heads, bodies and tails).
    fn positions(&self, c: usize) -> [usize; 3] {
        [
            self.at(0, c, 0),
            self.at(self.outer / 2, c, self.inner / 2),
            self.at(self.outer - 1, c, self.inner - 1),
        ]
    }
    fn layer(&self, config: Config, backend: Backend) -> BatchNorm {
        let mut l = BatchNorm::with_config(self.features.clone(), &self.axes, config).unwrap();
        l.set_backend(Some(backend)).unwrap();
        l
    }
}

fn geometries() -> Vec<Geo> {
    if cfg!(miri) {
        // Under Miri: one small tensor per family, with vector tails.
        return vec![
            Geo::new("planes NCL", &[3], &[0, 2], &[2, 3, 11]),
            Geo::new("rows NC", &[7], &[0], &[5, 7]),
        ];
    }
    vec![
        Geo::new("planes NCHW", &[5], &[0, 2, 3], &[3, 5, 7, 9]),
        Geo::new("planes NCL, inner 16", &[3], &[0, 2], &[4, 3, 16]),
        Geo::new("rows NC", &[7], &[0], &[37, 7]),
        Geo::new("rows NHWC", &[19], &[0, 1, 2], &[2, 3, 3, 19]),
        // 2 * 32768 elements: the kernels enter the Rayon pool.
        Geo::new("planes NCHW, parallel size", &[4], &[0, 2, 3], &[2, 4, 64, 64]),
        Geo::new("rows NC, parallel size", &[16], &[0], &[2048, 16]),
    ]
}

/// Every geometry on every backend, each under the watchdog.
fn for_all(test: &str, check: fn(&Geo, Backend)) {
    for g in geometries() {
        for b in Backend::available() {
            let g = g.clone();
            watchdog(&format!("{test}: {b} {}", g.name), move || check(&g, b));
        }
    }
}

fn data(g: &Geo, seed: u64) -> Vec<f32> {
    Rng::new(seed).vec(g.len(), -2.0, 3.0)
}

/// A layer trained on one batch (so that running statistics, gradients and the saved
/// statistics are not the initial ones), with gamma of both signs.
fn trained(g: &Geo, config: Config, b: Backend) -> (BatchNorm, Vec<f32>, Vec<f32>) {
    let mut l = g.layer(config, b);
    let c = g.channels;
    let gamma: Vec<f32> = (0..c).map(|k| if k % 4 == 3 { -0.75 } else { 0.5 + k as f32 * 0.25 }).collect();
    let beta: Vec<f32> = (0..c).map(|k| k as f32 * 0.1 - 0.2).collect();
    l.update_params(&gamma, &beta).unwrap();
    let x = data(g, 1);
    let dy = data(g, 2);
    let mut y = vec![0.0; g.len()];
    l.forward_train(&x, &g.shape, &mut y).unwrap();
    let mut dx = vec![0.0; g.len()];
    l.backward(&x, &dy, &g.shape, &mut dx).unwrap();
    (l, x, dy)
}

/// Runs a failing `forward_train` and checks it is `NonFinite` for `channel` and changed
/// nothing, including what `backward` differentiates.
fn expect_non_finite(what: &str, l: &mut BatchNorm, g: &Geo, x_bad: &[f32], channel: Option<usize>) {
    let (x, dy) = (data(g, 1), data(g, 2));
    let before = full_state(l);
    let mut dx_before = vec![0.0; g.len()];
    l.clone().backward(&x, &dy, &g.shape, &mut dx_before).unwrap();
    let mut y = vec![0.0; g.len()];
    match l.forward_train(x_bad, &g.shape, &mut y) {
        Err(BnError::NonFinite { index, .. }) => {
            if let Some(c) = channel {
                assert_eq!(index, c, "{what}: the error names the channel");
            }
        }
        other => panic!("{what}: expected Err(NonFinite), got {other:?}"),
    }
    assert_eq!(full_state(l), before, "{what}: the layer changed");
    let mut dx = vec![0.0; g.len()];
    l.backward(&x, &dy, &g.shape, &mut dx).unwrap();
    assert_bits_eq(&format!("{what}: backward after the error"), &dx, &dx_before);
    assert_eq!(full_state(l), before, "{what}: backward with the old statistics gives the old gradients");
}

#[test]
fn a_single_nan_in_a_normal_channel_is_non_finite_and_changes_nothing() {
    for_all("single NaN", |g, b| {
        for config in
            [Config::new(), Config::preset(Preset::Pytorch), Config::new().track_running_stats(false)]
        {
            let (mut l, x, _) = trained(g, config, b);
            for c in [0, g.channels / 2, g.channels - 1] {
                for (k, pos) in g.positions(c).into_iter().enumerate() {
                    let mut xb = x.clone();
                    xb[pos] = f32::NAN;
                    let what = format!("{b} {}: NaN at {pos} (channel {c}, position {k})", g.name);
                    expect_non_finite(&what, &mut l, g, &xb, Some(c));
                }
            }
        }
    });
}

#[test]
fn infinities_and_overflowing_variances_are_non_finite() {
    for_all("Inf / overflow", |g, b| {
        let (mut l, x, _) = trained(g, Config::new(), b);
        let c = g.channels - 1;
        let [first, mid, last] = g.positions(c);
        let name = |s: &str| format!("{b} {}: {s}", g.name);
        // One infinity: an infinite mean.
        for (pos, v) in [(first, f32::INFINITY), (mid, f32::NEG_INFINITY), (last, f32::INFINITY)] {
            let mut xb = x.clone();
            xb[pos] = v;
            expect_non_finite(&name(&format!("{v} at {pos}")), &mut l, g, &xb, Some(c));
        }
        // +Inf and -Inf in one channel: a NaN mean.
        let mut xb = x.clone();
        xb[first] = f32::INFINITY;
        xb[last] = f32::NEG_INFINITY;
        expect_non_finite(&name("+Inf and -Inf"), &mut l, g, &xb, Some(c));
        // Finite values whose variance overflows f32: one channel of 0 and 3e38.
        let mut xb = x.clone();
        for o in 0..g.outer {
            for j in 0..g.inner {
                xb[g.at(o, c, j)] = if (o + j) % 2 == 0 { 3.0e38 } else { 0.0 };
            }
        }
        expect_non_finite(&name("0 and 3e38"), &mut l, g, &xb, Some(c));
        // One huge value in an ordinary channel: the mean fits, the variance does not.
        let mut xb = x.clone();
        xb[mid] = f32::MAX;
        expect_non_finite(&name("f32::MAX in an ordinary channel"), &mut l, g, &xb, Some(c));
        // Every value +-3e38 (mean ~0, variance 9e76).
        let sign = |i: usize| (i / (g.channels * g.inner) + i % g.inner).is_multiple_of(2);
        let xb: Vec<f32> = (0..g.len()).map(|i| if sign(i) { 3.0e38 } else { -3.0e38 }).collect();
        expect_non_finite(&name("+-3e38 everywhere"), &mut l, g, &xb, None);
    });
}

/// With PyTorch's unbiased running variance, a batch whose biased variance fits `f32` but
/// whose unbiased one (times n / (n - 1)) does not is non-finite too; without running
/// statistics to update, the same batch is fine.
#[test]
fn an_unbiased_running_variance_that_overflows_is_non_finite() {
    for b in Backend::available() {
        watchdog(&format!("unbiased overflow {b}"), move || {
            // Two values per channel: +-a with a^2 = 2.25e38 < f32::MAX < 2 a^2.
            let g = Geo::new("NC, two rows", &[9], &[0], &[2, 9]);
            let x: Vec<f32> = (0..18).map(|i| if i < 9 { 1.5e19 } else { -1.5e19 }).collect();
            let (mut l, _, _) = trained(&g, Config::preset(Preset::Pytorch), b);
            expect_non_finite(&format!("{b}: unbiased variance overflows"), &mut l, &g, &x, Some(0));
            for config in [Config::new(), Config::preset(Preset::Pytorch).track_running_stats(false)] {
                let mut l = g.layer(config, b);
                let mut y = vec![0.0; 18];
                l.forward_train(&x, &g.shape, &mut y).unwrap_or_else(|e| panic!("{b}: {config:?}: {e}"));
                assert!(y.iter().all(|v| v.is_finite() && (v.abs() - 1.0).abs() < 1e-3), "{b}: {y:?}");
            }
        });
    }
}

#[test]
fn nan_and_inf_in_inference_input_propagate() {
    for_all("inference", |g, b| {
        let (mut l, x, _) = trained(g, Config::new(), b);
        // Channel 1 gets gamma 0: Inf * 0 is NaN there, by IEEE.
        let c = g.channels;
        let mut gamma = l.gamma().to_vec();
        let zero_gamma = 1.min(c - 1);
        gamma[zero_gamma] = 0.0;
        let beta = l.beta().to_vec();
        l.update_params(&gamma, &beta).unwrap();
        let mut clean = vec![0.0; g.len()];
        l.forward_eval(&x, &g.shape, &mut clean).unwrap();
        let mut xb = x.clone();
        let mut want_nan = Vec::new();
        let mut want_inf = Vec::new();
        for (ch, &gc) in gamma.iter().enumerate() {
            let [first, mid, last] = g.positions(ch);
            xb[first] = f32::NAN;
            want_nan.push(first);
            // +Inf and -Inf scaled by gamma (NaN where gamma is 0).
            for (pos, inf) in [(mid, f32::INFINITY), (last, f32::NEG_INFINITY)] {
                if pos == first || (pos == mid && mid == last) {
                    continue;
                }
                xb[pos] = inf;
                if gc == 0.0 {
                    want_nan.push(pos);
                } else {
                    want_inf.push((pos, inf * gc.signum()));
                }
            }
        }
        let mut y = vec![0.0; g.len()];
        l.forward_eval(&xb, &g.shape, &mut y).unwrap();
        let what = format!("{b} {}", g.name);
        for i in 0..g.len() {
            if want_nan.contains(&i) {
                assert!(y[i].is_nan(), "{what}: y[{i}] = {} should be NaN", y[i]);
            } else if let Some(&(_, inf)) = want_inf.iter().find(|(p, _)| *p == i) {
                assert_eq!(y[i], inf, "{what}: y[{i}]");
            } else {
                assert_eq!(y[i].to_bits(), clean[i].to_bits(), "{what}: y[{i}] is not the clean value");
            }
        }
        let mut xy = xb.clone();
        l.forward_eval_inplace(&mut xy, &g.shape).unwrap();
        // NaN payloads are not specified (Miri randomizes them): any NaN matches any NaN.
        for (i, (a, b)) in xy.iter().zip(&y).enumerate() {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{what}: in place, [{i}]: {a} vs {b}"
            );
        }

        // Without running statistics inference needs the batch's: a NaN is an error there.
        let (u, _, _) = trained(g, Config::new().track_running_stats(false), b);
        let before = full_state(&u);
        let err = u.forward_eval(&xb, &g.shape, &mut y).unwrap_err();
        assert!(matches!(err, BnError::NonFinite { .. }), "{what}: untracked: {err:?}");
        let err = u.forward_eval_inplace(&mut xy, &g.shape).unwrap_err();
        assert!(matches!(err, BnError::NonFinite { .. }), "{what}: untracked in place: {err:?}");
        assert_eq!(full_state(&u), before);
    });
}

/// Whether every `dx` of channel `c` is non-finite and every other is bit-identical to `clean`.
fn check_channel_poisoned(what: &str, g: &Geo, c: usize, dx: &[f32], clean: &[f32], all_nan: bool) {
    for i in 0..g.len() {
        if g.channel(i) == c {
            let ok = if all_nan { dx[i].is_nan() } else { !dx[i].is_finite() };
            assert!(ok, "{what}: dx[{i}] = {} in the poisoned channel {c}", dx[i]);
        } else {
            assert_eq!(
                dx[i].to_bits(),
                clean[i].to_bits(),
                "{what}: dx[{i}] of channel {} changed",
                g.channel(i)
            );
        }
    }
}

#[test]
fn nan_and_inf_in_dy_propagate() {
    for_all("dy", |g, b| {
        let (mut l, x, dy) = trained(g, Config::new(), b);
        let n = g.len();
        let c = g.channels / 2;
        let [_, mid, _] = g.positions(c);
        let mut clean = vec![0.0; n];
        l.backward(&x, &dy, &g.shape, &mut clean).unwrap();
        let (gg, bg) = (l.gamma_grad().to_vec(), l.beta_grad().to_vec());
        let mut clean_eval = vec![0.0; n];
        l.backward_eval(&x, &dy, &g.shape, &mut clean_eval).unwrap();
        let (gge, bge) = (l.gamma_grad().to_vec(), l.beta_grad().to_vec());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let what = format!("{b} {}: dy[{mid}] = {bad}", g.name);
            let mut dyb = dy.clone();
            dyb[mid] = bad;
            // Training backward: the channel's sums are non-finite, so is its whole dx.
            let mut dx = vec![0.0; n];
            l.backward(&x, &dyb, &g.shape, &mut dx).unwrap();
            check_channel_poisoned(&what, g, c, &dx, &clean, bad.is_nan());
            for k in 0..g.channels {
                if k == c {
                    assert!(!l.beta_grad()[k].is_finite(), "{what}: beta_grad[{k}]");
                    if bad.is_nan() {
                        assert!(l.gamma_grad()[k].is_nan(), "{what}: gamma_grad[{k}]");
                    }
                } else {
                    assert_eq!(l.gamma_grad()[k].to_bits(), gg[k].to_bits(), "{what}: gamma_grad[{k}]");
                    assert_eq!(l.beta_grad()[k].to_bits(), bg[k].to_bits(), "{what}: beta_grad[{k}]");
                }
            }
            // Frozen statistics: dx = dy * gamma * inv_std, only that element.
            l.backward_eval(&x, &dyb, &g.shape, &mut dx).unwrap();
            for i in 0..n {
                if i == mid {
                    let gamma = l.gamma()[c];
                    if bad.is_nan() {
                        assert!(dx[i].is_nan(), "{what}: backward_eval dx[{i}] = {}", dx[i]);
                    } else {
                        assert_eq!(dx[i], bad * gamma.signum(), "{what}: backward_eval dx[{i}]");
                    }
                } else {
                    assert_eq!(dx[i].to_bits(), clean_eval[i].to_bits(), "{what}: backward_eval dx[{i}]");
                }
            }
            for k in 0..g.channels {
                if k == c {
                    assert!(
                        !l.beta_grad()[k].is_finite() && !l.gamma_grad()[k].is_finite(),
                        "{what}: eval grads"
                    );
                } else {
                    assert_eq!(l.gamma_grad()[k].to_bits(), gge[k].to_bits(), "{what}: eval gamma_grad[{k}]");
                    assert_eq!(l.beta_grad()[k].to_bits(), bge[k].to_bits(), "{what}: eval beta_grad[{k}]");
                }
            }
        }
        // A NaN in backward's x (not the forward's): its channel, nothing else.
        let mut xb = x.clone();
        xb[mid] = f32::NAN;
        let mut dx = vec![0.0; n];
        l.backward(&xb, &dy, &g.shape, &mut dx).unwrap();
        check_channel_poisoned(&format!("{b} {}: NaN in backward's x", g.name), g, c, &dx, &clean, true);
    });
}

/// The `f64` layer (reference kernels) follows the same rule.
#[test]
fn f64_layers_follow_the_same_rule() {
    let layout = Layout::from_axes(&[3], &[0, 2]).unwrap();
    let mut l = BatchNorm::<f64>::with_layout(layout, Config::preset(Preset::Pytorch)).unwrap();
    let shape = [2, 3, 4];
    let x: Vec<f64> = (0..24).map(|i| (i * 7 % 11) as f64 - 4.0).collect();
    let mut y = vec![0.0; 24];
    l.forward_train(&x, &shape, &mut y).unwrap();
    let before = (l.running_mean().to_vec(), l.running_var().to_vec(), l.num_batches_tracked());
    for (pos, v) in [(5, f64::NAN), (13, f64::INFINITY), (0, 1e300)] {
        let mut xb = x.clone();
        xb[pos] = v;
        let err = l.forward_train(&xb, &shape, &mut y).unwrap_err();
        assert!(matches!(err, BnError::NonFinite { index, .. } if index == (pos / 4) % 3), "{v}: {err:?}");
        assert_eq!((l.running_mean().to_vec(), l.running_var().to_vec(), l.num_batches_tracked()), before);
    }
    let mut xb = x.clone();
    xb[6] = f64::NAN;
    l.forward_eval(&xb, &shape, &mut y).unwrap();
    assert!(y[6].is_nan() && y.iter().enumerate().all(|(i, v)| i == 6 || v.is_finite()));

    // Values near f64::MAX whose sums (of values, or of squared deviations) overflow f64 while
    // the statistics fit: valid batches, as every backend treats f32 data.
    let layout = Layout::from_axes(&[2], &[0]).unwrap();
    for b in Backend::available() {
        let mut l = BatchNorm::<f64>::with_layout(layout.clone(), Config::new().momentum(0.0)).unwrap();
        l.set_backend(Some(b)).unwrap();
        // Channel 0 constant at 1e308 (sum 4e308); channel 1: +-1.3e154 and zeros (squares
        // 1.69e308, their sum overflows, the variance 8.45e307 does not).
        let x = [1e308, 1.3e154, 1e308, -1.3e154, 1e308, 0.0, 1e308, 0.0];
        let mut y = [0.0; 8];
        l.forward_train(&x, &[4, 2], &mut y).unwrap_or_else(|e| panic!("{b}: {e}"));
        assert_eq!(l.running_mean(), &[1e308, 0.0], "{b}");
        let want_var = 1.3e154f64 * 1.3e154 / 2.0;
        assert!((l.running_var()[1] - want_var).abs() <= 1e-12 * want_var, "{b}: {:?}", l.running_var());
        assert_eq!(l.running_var()[0], 0.0, "{b}");
        assert_eq!([y[0], y[2]], [0.0, 0.0], "{b}: a constant channel normalizes to beta");
        assert!((y[1] - 2f64.sqrt()).abs() < 1e-12 && y[5] == 0.0, "{b}: {y:?}");
        // Beyond the limit: a variance that overflows f64 is still an error.
        let x = [1e308, 1.0, -1e308, 1.0, 1e308, 1.0, -1e308, 1.0];
        let before = (l.running_mean().to_vec(), l.running_var().to_vec());
        let err = l.forward_train(&x, &[4, 2], &mut y).unwrap_err();
        assert!(matches!(err, BnError::NonFinite { index: 0, .. }), "{b}: {err:?}");
        assert_eq!((l.running_mean().to_vec(), l.running_var().to_vec()), before);
    }
}

/// Any positive eps, on every backend and element type, in both kernel families, at a serial and
/// a parallel size: a zero-variance channel normalizes to beta in training and (at its running
/// mean) in inference, and nothing is NaN: `1 / sqrt(var + eps)` with `eps = 1e-300` is 1e150,
/// beyond f32, and an infinite scale times a zero deviation would be NaN.
#[test]
fn a_tiny_eps_keeps_constant_channels_at_beta() {
    use batchnorm::half::{bf16, f16};
    use batchnorm::{Element, Param};

    fn check<E: Element>(backend: Backend, eps: f64, features: &[usize], axes: &[usize], shape: &[usize]) {
        let at = format!("{} {backend} eps {eps:e} shape {shape:?}", E::NAME);
        let layout = Layout::from_axes(features, axes).unwrap();
        let mut l = BatchNorm::<E>::with_layout(layout, Config::new().eps(eps)).unwrap();
        l.set_backend(Some(backend)).unwrap();
        let c = l.features();
        let p = |v: f64| <E::Param as Param>::from_f64(v);
        let (gamma, beta): (Vec<_>, Vec<_>) = (0..c).map(|i| (p(2.0), p(0.5 + i as f64))).unzip();
        l.update_params(&gamma, &beta).unwrap();
        let dims = l.layout().canonical(shape).unwrap();
        let channel = |i: usize| (i / dims.inner) % dims.channels;
        // Channel 0 constant at 3; the others vary.
        let x: Vec<E> = (0..dims.len())
            .map(|i| E::from_f64(if channel(i) == 0 { 3.0 } else { (i % 7) as f64 }))
            .collect();
        let mut y = vec![E::from_f64(f64::NAN); x.len()];
        l.forward_train(&x, shape, &mut y).unwrap_or_else(|e| panic!("{at}: {e}"));
        for (i, v) in y.iter().enumerate() {
            if channel(i) == 0 {
                assert_eq!(v.to_f64(), 0.5, "{at}: y[{i}] of the constant channel");
            } else {
                assert!(v.to_f64().is_finite(), "{at}: y[{i}] = {}", v.to_f64());
            }
        }
        let stats = l.running_mean().iter().chain(l.running_var());
        assert!(stats.map(|v| v.to_f64()).all(f64::is_finite), "{at}: running statistics");

        // Backward: a constant dy on the constant channel has no gradient; nothing is NaN.
        let dy: Vec<E> = (0..dims.len())
            .map(|i| E::from_f64(if channel(i) == 0 { 0.25 } else { (i % 5) as f64 - 2.0 }))
            .collect();
        let mut dx = vec![E::from_f64(f64::NAN); x.len()];
        l.backward(&x, &dy, shape, &mut dx).unwrap();
        assert!(dx.iter().all(|v| !v.to_f64().is_nan()), "{at}: dx has NaN");
        let grads = l.gamma_grad().iter().chain(l.beta_grad());
        assert!(grads.map(|v| v.to_f64()).all(f64::is_finite), "{at}: parameter gradients");
        assert_eq!(l.gamma_grad()[0].to_f64(), 0.0, "{at}: dgamma of the constant channel");

        // Inference with a zero running variance: x at the running mean gives beta.
        let (mean, var): (Vec<_>, Vec<_>) =
            (0..c).map(|i| (p(if i == 0 { 3.0 } else { 0.0 }), p(0.0))).unzip();
        l.set_running_stats(&mean, &var).unwrap();
        l.forward_eval(&x, shape, &mut y).unwrap();
        for (i, v) in y.iter().enumerate() {
            if channel(i) == 0 {
                assert_eq!(v.to_f64(), 0.5, "{at}: inference y[{i}] of the constant channel");
            }
            assert!(!v.to_f64().is_nan(), "{at}: inference y[{i}] is NaN");
        }
        l.backward_eval(&x, &dy, shape, &mut dx).unwrap();
        assert!(dx.iter().all(|v| !v.to_f64().is_nan()), "{at}: backward_eval dx has NaN");
        assert_eq!(l.gamma_grad()[0].to_f64(), 0.0, "{at}: eval dgamma of the constant channel");
    }

    let cases: [(&[usize], &[usize], &[usize]); 4] = [
        (&[3], &[0, 2], &[4, 3, 5]),           // planes, serial
        (&[3], &[0], &[6, 3]),                 // rows, serial
        (&[8], &[0, 2], &[16, 8, 1024]),       // planes, parallel
        (&[40], &[0, 1, 2], &[8, 16, 16, 40]), // rows (NHWC), parallel
    ];
    for backend in Backend::available() {
        for eps in [1e-300, 5e-324, 1e-45, 1e-30] {
            for (features, axes, shape) in cases {
                check::<f32>(backend, eps, features, axes, shape);
                check::<f64>(backend, eps, features, axes, shape);
                check::<bf16>(backend, eps, features, axes, shape);
                check::<f16>(backend, eps, features, axes, shape);
            }
        }
    }
}
