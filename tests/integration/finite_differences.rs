//! Gradients against central finite differences, in f64 layers.
//!
//! For `backward`, the loss is `L = sum(forward_train(x) * dy)` as a function of `x`, gamma and
//! beta; for `backward_eval`, `L = sum(forward_eval(x) * dy)`. Every evaluation of `L` runs on a
//! fresh clone of the layer, so running statistics and saved state never leak between
//! evaluations.

use crate::common;

use batchnorm::{BatchNorm, Config, Layout, Preset};
use common::{assert_close_shaped, Rng, Tol};

/// Central differences in f64 with `h = 1e-5` are accurate to ~1e-9 here; the bound leaves
/// room without hiding a wrong formula (those are off by O(1)).
const FD_TOL: Tol = Tol { atol: 1e-6, rtol: 1e-5 };
const H: f64 = 1e-5;

#[derive(Debug, Clone)]
struct Problem {
    name: &'static str,
    features: &'static [usize],
    axes: &'static [usize],
    shape: &'static [usize],
}

const PROBLEMS: &[Problem] = &[
    Problem { name: "NC", features: &[4], axes: &[0], shape: &[5, 4] },
    Problem { name: "NC n=2", features: &[3], axes: &[0], shape: &[2, 3] },
    Problem { name: "NCHW", features: &[3], axes: &[0, 2, 3], shape: &[2, 3, 2, 3] },
    Problem { name: "NHWC", features: &[3], axes: &[0, 1, 2], shape: &[2, 2, 3, 3] },
    Problem { name: "NCL n=2", features: &[3], axes: &[0, 2], shape: &[1, 3, 2] },
    Problem { name: "two feature axes last", features: &[2, 3], axes: &[0], shape: &[4, 2, 3] },
    Problem { name: "two feature axes inside", features: &[2, 2], axes: &[0, 3], shape: &[2, 2, 2, 3] },
    Problem { name: "feature axis first", features: &[3], axes: &[1, 2], shape: &[3, 2, 2] },
    Problem {
        name: "rank 5 with unit extents",
        features: &[2],
        axes: &[0, 1, 3, 4],
        shape: &[2, 1, 2, 2, 1],
    },
];

fn configs() -> Vec<(&'static str, Config)> {
    vec![
        ("seed", Config::preset(Preset::Numpy)),
        ("pytorch", Config::preset(Preset::Pytorch)),
        ("keras", Config::preset(Preset::Keras)),
        ("eps 0.5", Config::new().eps(0.5)),
    ]
}

/// A fresh f64 layer with random gamma, beta and running statistics (as the config allows).
fn layer(p: &Problem, config: Config, rng: &mut Rng) -> BatchNorm<f64> {
    let layout = Layout::from_axes(p.features, p.axes).expect("valid layout");
    let mut bn = BatchNorm::<f64>::with_layout(layout, config).expect("valid config");
    let c = bn.features();
    let gamma = if config.get_scale() { rng.params(c, 0.5, 2.0) } else { vec![1.0; c] };
    let beta = if config.get_center() { rng.params(c, -1.0, 1.0) } else { vec![0.0; c] };
    bn.update_params(&gamma, &beta).unwrap();
    bn.set_running_stats(&rng.params(c, -0.5, 0.5), &rng.params(c, 0.3, 2.0)).unwrap();
    bn
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Train,
    Eval,
}

/// `sum(y * dy)` of one forward in `mode` on a clone of `base` with the given parameters.
fn loss(
    base: &BatchNorm<f64>,
    mode: Mode,
    x: &[f64],
    gamma: &[f64],
    beta: &[f64],
    dy: &[f64],
    shape: &[usize],
) -> f64 {
    let mut bn = base.clone();
    bn.update_params(gamma, beta).unwrap();
    let mut y = vec![0.0; x.len()];
    match mode {
        Mode::Train => bn.forward_train(x, shape, &mut y).unwrap(),
        Mode::Eval => bn.forward_eval(x, shape, &mut y).unwrap(),
    }
    y.iter().zip(dy).map(|(a, b)| a * b).sum()
}

/// Central difference of `f` at `v[i]`.
fn central(v: &[f64], i: usize, mut f: impl FnMut(&[f64]) -> f64) -> f64 {
    let mut w = v.to_vec();
    w[i] = v[i] + H;
    let plus = f(&w);
    w[i] = v[i] - H;
    let minus = f(&w);
    (plus - minus) / (2.0 * H)
}

/// The gradients the layer computes: `(dx, dgamma, dbeta)`.
fn analytic(
    base: &BatchNorm<f64>,
    mode: Mode,
    x: &[f64],
    dy: &[f64],
    shape: &[usize],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut bn = base.clone();
    let mut dx = vec![f64::NAN; x.len()];
    match mode {
        Mode::Train => {
            let mut y = vec![0.0; x.len()];
            bn.forward_train(x, shape, &mut y).unwrap();
            bn.backward(x, dy, shape, &mut dx).unwrap();
        }
        Mode::Eval => bn.backward_eval(x, dy, shape, &mut dx).unwrap(),
    }
    (dx, bn.gamma_grad().to_vec(), bn.beta_grad().to_vec())
}

/// Checks dx, dgamma and dbeta of `mode` against central differences; parameters a config fixes
/// must have zero gradients.
fn check(p: &Problem, cfg_name: &str, config: Config, mode: Mode, seed: u64) {
    let mut rng = Rng::new(seed);
    let base = layer(p, config, &mut rng);
    let n: usize = p.shape.iter().product();
    let x: Vec<f64> = rng.vec(n, -2.0, 2.0);
    let dy: Vec<f64> = rng.vec(n, -1.0, 1.0);
    let shape = p.shape;
    let (gamma, beta) = (base.gamma().to_vec(), base.beta().to_vec());
    let what = |q: &str| format!("{} {:?} [{cfg_name}] {mode:?} seed {seed}: {q}", p.name, p.shape);

    let (dx, dgamma, dbeta) = analytic(&base, mode, &x, &dy, shape);

    let fd_x: Vec<f64> =
        (0..n).map(|i| central(&x, i, |x| loss(&base, mode, x, &gamma, &beta, &dy, shape))).collect();
    assert_close_shaped(&what("dx"), Some(shape), &dx, &fd_x, FD_TOL);

    if config.get_scale() {
        let fd_g: Vec<f64> = (0..gamma.len())
            .map(|i| central(&gamma, i, |g| loss(&base, mode, &x, g, &beta, &dy, shape)))
            .collect();
        assert_close_shaped(&what("dgamma"), Some(p.features), &dgamma, &fd_g, FD_TOL);
    } else {
        assert!(
            dgamma.iter().all(|&g| g == 0.0),
            "{}: {dgamma:?}",
            what("dgamma is zero with scale = false")
        );
    }
    if config.get_center() {
        let fd_b: Vec<f64> = (0..beta.len())
            .map(|i| central(&beta, i, |b| loss(&base, mode, &x, &gamma, b, &dy, shape)))
            .collect();
        assert_close_shaped(&what("dbeta"), Some(p.features), &dbeta, &fd_b, FD_TOL);
    } else {
        assert!(dbeta.iter().all(|&g| g == 0.0), "{}: {dbeta:?}", what("dbeta is zero with center = false"));
    }
}

#[test]
fn backward_matches_central_differences() {
    for (k, p) in PROBLEMS.iter().enumerate() {
        for (j, (name, cfg)) in configs().into_iter().enumerate() {
            check(p, name, cfg, Mode::Train, (k * 16 + j) as u64);
        }
    }
}

#[test]
fn backward_eval_matches_central_differences() {
    for (k, p) in PROBLEMS.iter().enumerate() {
        for (j, (name, cfg)) in configs().into_iter().enumerate() {
            check(p, name, cfg, Mode::Eval, 1000 + (k * 16 + j) as u64);
        }
    }
}

#[test]
fn fixed_parameters_have_zero_gradients() {
    let variants = [
        ("scale = false", Config::new().scale(false)),
        ("center = false", Config::new().center(false)),
        ("scale = center = false", Config::preset(Preset::Keras).scale(false).center(false)),
    ];
    for (k, p) in PROBLEMS.iter().enumerate() {
        for (j, (name, cfg)) in variants.iter().enumerate() {
            check(p, name, *cfg, Mode::Train, 2000 + (k * 16 + j) as u64);
            check(p, name, *cfg, Mode::Eval, 3000 + (k * 16 + j) as u64);
        }
    }
}

/// With `track_running_stats = false`, inference uses the batch statistics, so `backward_eval` is
/// the gradient of that (it matches central differences of `forward_eval`) and equals `backward`
/// after a `forward_train` of the same batch.
#[test]
fn untracked_backward_eval_is_backward_of_the_batch() {
    for (k, p) in PROBLEMS.iter().enumerate() {
        for (j, (name, cfg)) in configs().into_iter().enumerate() {
            let cfg = cfg.track_running_stats(false);
            let seed = 4000 + (k * 16 + j) as u64;
            check(p, name, cfg, Mode::Eval, seed);
            check(p, name, cfg, Mode::Train, seed);

            let mut rng = Rng::new(seed);
            let base = layer(p, cfg, &mut rng);
            let n: usize = p.shape.iter().product();
            let x: Vec<f64> = rng.vec(n, -2.0, 2.0);
            let dy: Vec<f64> = rng.vec(n, -1.0, 1.0);
            let (dx_e, dg_e, db_e) = analytic(&base, Mode::Eval, &x, &dy, p.shape);
            let (dx_t, dg_t, db_t) = analytic(&base, Mode::Train, &x, &dy, p.shape);
            let tight = Tol { atol: 1e-12, rtol: 1e-12 };
            let what = format!("{} [{name}] untracked", p.name);
            assert_close_shaped(&format!("{what}: dx"), Some(p.shape), &dx_e, &dx_t, tight);
            assert_close_shaped(&format!("{what}: dgamma"), None, &dg_e, &dg_t, tight);
            assert_close_shaped(&format!("{what}: dbeta"), None, &db_e, &db_t, tight);
        }
    }
}

/// The f64 layer's backward agrees with central differences even when |mean| >> std (the
/// statistics are computed accurately, not from a raw sum of squares).
#[test]
fn backward_with_large_offset() {
    let p = &PROBLEMS[2];
    let mut rng = Rng::new(77);
    let base = layer(p, Config::new(), &mut rng);
    let n: usize = p.shape.iter().product();
    let x: Vec<f64> = rng.vec::<f64>(n, -1.0, 1.0).into_iter().map(|v| v + 1.0e4).collect();
    let dy: Vec<f64> = rng.vec(n, -1.0, 1.0);
    let (gamma, beta) = (base.gamma().to_vec(), base.beta().to_vec());
    let (dx, _, _) = analytic(&base, Mode::Train, &x, &dy, p.shape);
    let fd_x: Vec<f64> = (0..n)
        .map(|i| central(&x, i, |x| loss(&base, Mode::Train, x, &gamma, &beta, &dy, p.shape)))
        .collect();
    // x + h is only known to ~1e-12 at 1e4, so the differences lose a few digits.
    assert_close_shaped("offset 1e4: dx", Some(p.shape), &dx, &fd_x, Tol { atol: 1e-5, rtol: 1e-4 });
}

/// Random small geometries: rank 2..=4, one or two adjacent feature axes anywhere, extents 1..=3,
/// at least two values per feature.
#[test]
fn random_shapes_match_central_differences() {
    let mut rng = Rng::new(2024);
    let mut done = 0;
    while done < 16 {
        let rank = rng.range(2, 4);
        let nf = rng.range(1, 2.min(rank - 1));
        let first = rng.range(0, rank - nf);
        let shape: Vec<usize> = (0..rank).map(|_| rng.range(1, 3)).collect();
        let per_feature: usize = shape
            .iter()
            .enumerate()
            .filter(|(a, _)| !(first..first + nf).contains(a))
            .map(|(_, e)| e)
            .product();
        if per_feature < 2 {
            continue;
        }
        let axes: Vec<usize> = (0..rank).filter(|a| !(first..first + nf).contains(a)).collect();
        let p = Problem {
            name: "random",
            features: Box::leak(shape[first..first + nf].to_vec().into_boxed_slice()),
            axes: Box::leak(axes.into_boxed_slice()),
            shape: Box::leak(shape.into_boxed_slice()),
        };
        let (cfg_name, cfg) = configs().swap_remove(done % 4);
        let cfg = match done % 3 {
            0 => cfg,
            1 => cfg.center(false),
            _ => cfg.scale(false).track_running_stats(false),
        };
        check(&p, cfg_name, cfg, Mode::Train, 5000 + done as u64);
        check(&p, cfg_name, cfg, Mode::Eval, 6000 + done as u64);
        done += 1;
    }
}
