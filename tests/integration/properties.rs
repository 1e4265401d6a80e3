//! Property tests: random ranks 2..=5, feature-axis positions and counts (1 or 2 adjacent axes),
//! extents 1..=5 (including 1), presets and the center/scale/track flags, random data.
//!
//! The runtime-generic layer is compared with an independent f64 implementation written here
//! (naive per-channel loops over multi-indices; it does not call bn-core's reference kernels).
//! Invalid calls must return `Err` and leave the layer bit-for-bit unchanged, the in-place
//! inference must be bit-identical to the out-of-place one, and results must be bit-identical in
//! Rayon pools of 1, 2 and 3 threads.

use crate::common;

use batchnorm::{BatchNorm, BnError, Config, Preset, RunningVar};
use common::{assert_bits_eq, assert_close_shaped, full_state, Rng, Tol, FWD, GRAD};
use proptest::prelude::*;

// ------------------------------------------------------------------------------------------------
// Random setups
// ------------------------------------------------------------------------------------------------

/// A shape and where its feature axes are.
#[derive(Debug, Clone)]
struct Geometry {
    shape: Vec<usize>,
    first: usize,
    nf: usize,
}

impl Geometry {
    fn features(&self) -> Vec<usize> {
        self.shape[self.first..self.first + self.nf].to_vec()
    }
    fn axes(&self) -> Vec<usize> {
        (0..self.shape.len()).filter(|a| !(self.first..self.first + self.nf).contains(a)).collect()
    }
    fn n(&self) -> usize {
        self.shape.iter().product()
    }
    fn c(&self) -> usize {
        self.features().iter().product()
    }
    /// The channel of flat index `i`: the row-major index of its feature coordinates.
    fn channel_of(&self, i: usize) -> usize {
        let idx = common::unravel(i, &self.shape);
        (self.first..self.first + self.nf).fold(0, |c, a| c * self.shape[a] + idx[a])
    }
}

fn geometry() -> impl Strategy<Value = Geometry> {
    (2usize..=5).prop_flat_map(|rank| {
        (1usize..=2.min(rank - 1)).prop_flat_map(move |nf| {
            (0..=rank - nf, prop::collection::vec(1usize..=5, rank))
                .prop_map(move |(first, shape)| Geometry { shape, first, nf })
        })
    })
}

#[derive(Debug, Clone)]
struct Opts {
    preset: Preset,
    eps: Option<f64>,
    momentum: Option<f64>,
    center: bool,
    scale: bool,
    track: bool,
}

impl Opts {
    fn config(&self) -> Config {
        let mut c = Config::preset(self.preset).center(self.center).scale(self.scale);
        c = c.track_running_stats(self.track);
        if let Some(e) = self.eps {
            c = c.eps(e);
        }
        if let Some(m) = self.momentum {
            // PyTorch's preset takes the momentum in PyTorch's spelling (exact for m = 0, 0.5).
            c = if self.preset == Preset::Pytorch { c.torch_momentum(1.0 - m) } else { c.momentum(m) };
        }
        c
    }
}

fn opts() -> impl Strategy<Value = Opts> {
    (
        prop_oneof![Just(Preset::Numpy), Just(Preset::Pytorch), Just(Preset::Keras)],
        prop_oneof![2 => Just(None), 1 => Just(Some(1e-3)), 1 => Just(Some(0.1))],
        prop_oneof![2 => Just(None), 1 => Just(Some(0.0)), 1 => Just(Some(0.5))],
        any::<bool>(),
        any::<bool>(),
        prop_oneof![3 => Just(true), 1 => Just(false)],
    )
        .prop_map(|(preset, eps, momentum, center, scale, track)| Opts {
            preset,
            eps,
            momentum,
            center,
            scale,
            track,
        })
}

/// Multiples of `1 / div` in `[lo / div, hi / div]` (mostly), or a continuous value in the same
/// range: grid values keep degenerate channels (all values equal) exact.
fn value(lo: i32, hi: i32, div: f32) -> impl Strategy<Value = f32> {
    prop_oneof![
        3 => (lo..=hi).prop_map(move |k| k as f32 / div),
        1 => lo as f32 / div..=hi as f32 / div,
    ]
}

fn values(lo: i32, hi: i32, div: f32, len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(value(lo, hi, div), len)
}

#[derive(Debug, Clone)]
struct Setup {
    geo: Geometry,
    opts: Opts,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    rm: Vec<f32>,
    rv: Vec<f32>,
    xs: Vec<Vec<f32>>,
    x_eval: Vec<f32>,
    dy: Vec<f32>,
}

impl Setup {
    fn layer(&self) -> BatchNorm {
        let mut l = BatchNorm::with_config(self.geo.features(), self.geo.axes(), self.opts.config())
            .expect("a valid layout and configuration");
        l.update_params(&self.gamma, &self.beta).expect("valid parameters");
        l.set_running_stats(&self.rm, &self.rv).expect("valid statistics");
        l
    }
}

fn setup() -> impl Strategy<Value = Setup> {
    (geometry(), opts(), 1usize..=3).prop_flat_map(|(geo, opts, steps)| {
        let (n, c) = (geo.n(), geo.c());
        (
            values(-8, 8, 4.0, c),
            values(-4, 4, 4.0, c),
            values(-8, 8, 8.0, c),
            values(1, 32, 8.0, c), // running variances in [1/8, 4]: inference stays well conditioned
            prop::collection::vec(values(-32, 32, 8.0, n), steps),
            values(-40, 40, 8.0, n),
            values(-16, 16, 8.0, n),
        )
            .prop_map(move |(gamma, beta, rm, rv, xs, x_eval, dy)| {
                let gamma = if opts.scale { gamma } else { vec![1.0; c] };
                let beta = if opts.center { beta } else { vec![0.0; c] };
                Setup { geo: geo.clone(), opts: opts.clone(), gamma, beta, rm, rv, xs, x_eval, dy }
            })
    })
}

// ------------------------------------------------------------------------------------------------
// The independent f64 implementation
// ------------------------------------------------------------------------------------------------

/// `(dx, dgamma, dbeta)`.
type Grads = (Vec<f64>, Vec<f64>, Vec<f64>);

/// Batch normalization written from the formulas of docs/ARCHITECTURE.md, one element at a time.
struct Oracle {
    geo: Geometry,
    eps: f64,
    m: f64,
    unbiased: bool,
    center: bool,
    scale: bool,
    track: bool,
    gamma: Vec<f64>,
    beta: Vec<f64>,
    rm: Vec<f64>,
    rv: Vec<f64>,
    /// (x, mean, var) of the last successful training forward.
    saved: Option<(Vec<f32>, Vec<f64>, Vec<f64>)>,
}

#[derive(Debug, PartialEq)]
enum Expect {
    TooFewValues,
}

impl Oracle {
    fn new(s: &Setup) -> Oracle {
        let cfg = s.opts.config();
        let f = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        Oracle {
            geo: s.geo.clone(),
            eps: cfg.get_eps(),
            m: cfg.get_momentum(),
            unbiased: cfg.get_running_var() == RunningVar::Unbiased,
            center: s.opts.center,
            scale: s.opts.scale,
            track: s.opts.track,
            gamma: f(&s.gamma),
            beta: f(&s.beta),
            rm: f(&s.rm),
            rv: f(&s.rv),
            saved: None,
        }
    }

    /// Per-channel mean and biased variance, two passes, or an error for fewer than 2 values.
    fn stats(&self, x: &[f32]) -> Result<(Vec<f64>, Vec<f64>), Expect> {
        let c = self.geo.c();
        let (mut sum, mut count) = (vec![0.0f64; c], vec![0usize; c]);
        for (i, &v) in x.iter().enumerate() {
            let ch = self.geo.channel_of(i);
            sum[ch] += v as f64;
            count[ch] += 1;
        }
        if count.iter().any(|&k| k < 2) {
            return Err(Expect::TooFewValues);
        }
        let mean: Vec<f64> = sum.iter().zip(&count).map(|(s, &k)| s / k as f64).collect();
        let mut sq = vec![0.0f64; c];
        for (i, &v) in x.iter().enumerate() {
            let ch = self.geo.channel_of(i);
            sq[ch] += (v as f64 - mean[ch]).powi(2);
        }
        let var = sq.iter().zip(&count).map(|(s, &k)| s / k as f64).collect();
        Ok((mean, var))
    }

    fn per_channel(&self) -> f64 {
        (self.geo.n() / self.geo.c()) as f64
    }

    fn normalize(&self, x: &[f32], mean: &[f64], var: &[f64]) -> Vec<f64> {
        (0..x.len())
            .map(|i| {
                let c = self.geo.channel_of(i);
                (x[i] as f64 - mean[c]) / (var[c] + self.eps).sqrt() * self.gamma[c] + self.beta[c]
            })
            .collect()
    }

    fn forward_train(&mut self, x: &[f32]) -> Result<Vec<f64>, Expect> {
        let (mean, var) = self.stats(x)?;
        let y = self.normalize(x, &mean, &var);
        if self.track {
            let n = self.per_channel();
            for c in 0..self.geo.c() {
                let v = if self.unbiased { var[c] * n / (n - 1.0) } else { var[c] };
                self.rm[c] = self.m * self.rm[c] + (1.0 - self.m) * mean[c];
                self.rv[c] = self.m * self.rv[c] + (1.0 - self.m) * v;
            }
        }
        self.saved = Some((x.to_vec(), mean, var));
        Ok(y)
    }

    fn forward_eval(&self, x: &[f32]) -> Result<Vec<f64>, Expect> {
        if !self.track {
            let (mean, var) = self.stats(x)?;
            return Ok(self.normalize(x, &mean, &var));
        }
        Ok((0..x.len())
            .map(|i| {
                let c = self.geo.channel_of(i);
                let s = self.gamma[c] / (self.rv[c] + self.eps).sqrt();
                x[i] as f64 * s + (self.beta[c] - self.rm[c] * s)
            })
            .collect())
    }

    /// (dx, dgamma, dbeta) of the training forward with statistics (mean, var).
    fn train_grads(&self, x: &[f32], dy: &[f32], mean: &[f64], var: &[f64]) -> Grads {
        let c = self.geo.c();
        let n = self.per_channel();
        let xhat = |i: usize| {
            let ch = self.geo.channel_of(i);
            (x[i] as f64 - mean[ch]) / (var[ch] + self.eps).sqrt()
        };
        let (mut dgamma, mut dbeta) = (vec![0.0; c], vec![0.0; c]);
        for (i, &g) in dy.iter().enumerate() {
            let ch = self.geo.channel_of(i);
            dbeta[ch] += g as f64;
            dgamma[ch] += g as f64 * xhat(i);
        }
        let dx = (0..x.len())
            .map(|i| {
                let ch = self.geo.channel_of(i);
                self.gamma[ch] / (var[ch] + self.eps).sqrt()
                    * (dy[i] as f64 - dbeta[ch] / n - xhat(i) * dgamma[ch] / n)
            })
            .collect();
        (dx, self.fixed(dgamma, self.scale), self.fixed(dbeta, self.center))
    }

    fn fixed(&self, g: Vec<f64>, learned: bool) -> Vec<f64> {
        if learned {
            g
        } else {
            vec![0.0; g.len()]
        }
    }

    /// Backward of the last training forward; `None` when there was none.
    fn backward(&self, dy: &[f32]) -> Option<Grads> {
        let (x, mean, var) = self.saved.as_ref()?;
        Some(self.train_grads(x, dy, mean, var))
    }

    fn backward_eval(&self, x: &[f32], dy: &[f32]) -> Result<Grads, Expect> {
        if !self.track {
            let (mean, var) = self.stats(x)?;
            return Ok(self.train_grads(x, dy, &mean, &var));
        }
        let c = self.geo.c();
        let inv = |ch: usize| 1.0 / (self.rv[ch] + self.eps).sqrt();
        let (mut dgamma, mut dbeta) = (vec![0.0; c], vec![0.0; c]);
        let mut dx = vec![0.0; x.len()];
        for i in 0..x.len() {
            let ch = self.geo.channel_of(i);
            dbeta[ch] += dy[i] as f64;
            dgamma[ch] += dy[i] as f64 * (x[i] as f64 - self.rm[ch]) * inv(ch);
            dx[i] = dy[i] as f64 * self.gamma[ch] * inv(ch);
        }
        Ok((dx, self.fixed(dgamma, self.scale), self.fixed(dbeta, self.center)))
    }
}

// ------------------------------------------------------------------------------------------------
// Runtime layer vs the oracle
// ------------------------------------------------------------------------------------------------

fn check_against_oracle(s: &Setup) {
    let mut layer = s.layer();
    let mut oracle = Oracle::new(s);
    let shape = &s.geo.shape[..];
    let features = s.geo.features();
    let n = s.geo.n();
    let tag = format!("{:?} {:?}", s.geo, s.opts);

    for (k, x) in s.xs.iter().enumerate() {
        let mut y = vec![f32::NAN; n];
        let before = full_state(&layer);
        match (layer.forward_train(x, shape, &mut y), oracle.forward_train(x)) {
            (Ok(()), Ok(expected)) => {
                assert_close_shaped(&format!("{tag}: y step {k}"), Some(shape), &y, &expected, FWD);
            }
            (Err(e), Err(Expect::TooFewValues)) => {
                assert!(matches!(e, BnError::TooFewValues { .. }), "{tag}: {e:?}");
                assert_eq!(full_state(&layer), before, "{tag}: state after {e:?}");
            }
            (got, expected) => panic!("{tag}: step {k}: layer {got:?}, oracle {expected:?}"),
        }
        assert_close_shaped(
            &format!("{tag}: running_mean {k}"),
            Some(&features),
            layer.running_mean(),
            &oracle.rm,
            FWD,
        );
        assert_close_shaped(
            &format!("{tag}: running_var {k}"),
            Some(&features),
            layer.running_var(),
            &oracle.rv,
            FWD,
        );
    }
    let tracked_batches = if s.opts.track { oracle.saved.as_ref().map_or(0, |_| s.xs.len()) } else { 0 };
    assert_eq!(layer.num_batches_tracked(), tracked_batches as u64, "{tag}");

    // Inference, out of place and in place.
    let mut y = vec![f32::NAN; n];
    let mut inplace = s.x_eval.clone();
    match (layer.forward_eval(&s.x_eval, shape, &mut y), oracle.forward_eval(&s.x_eval)) {
        (Ok(()), Ok(expected)) => {
            assert_close_shaped(&format!("{tag}: forward_eval"), Some(shape), &y, &expected, FWD);
            layer.forward_eval_inplace(&mut inplace, shape).unwrap();
            assert_bits_eq(&format!("{tag}: forward_eval_inplace"), &inplace, &y);
        }
        (Err(e), Err(Expect::TooFewValues)) => {
            assert!(matches!(e, BnError::TooFewValues { .. }), "{tag}: {e:?}");
            assert!(layer.forward_eval_inplace(&mut inplace, shape).is_err());
        }
        (got, expected) => panic!("{tag}: forward_eval: layer {got:?}, oracle {:?}", expected.map(|_| ())),
    }

    // Backward of the last successful training forward.
    let x_last = oracle.saved.as_ref().map(|(x, _, _)| x.clone()).unwrap_or_else(|| s.xs[0].clone());
    let mut dx = vec![f32::NAN; n];
    match (layer.backward(&x_last, &s.dy, shape, &mut dx), oracle.backward(&s.dy)) {
        (Ok(()), Some((edx, eg, eb))) => {
            assert_close_shaped(&format!("{tag}: dx"), Some(shape), &dx, &edx, GRAD);
            assert_close_shaped(&format!("{tag}: dgamma"), Some(&features), layer.gamma_grad(), &eg, GRAD);
            assert_close_shaped(&format!("{tag}: dbeta"), Some(&features), layer.beta_grad(), &eb, GRAD);
        }
        (Err(BnError::NoForward), None) => {}
        (got, expected) => panic!("{tag}: backward: layer {got:?}, oracle {:?}", expected.map(|_| ())),
    }

    // Backward of inference.
    let mut dx = vec![f32::NAN; n];
    let before = full_state(&layer);
    match (layer.backward_eval(&s.x_eval, &s.dy, shape, &mut dx), oracle.backward_eval(&s.x_eval, &s.dy)) {
        (Ok(()), Ok((edx, eg, eb))) => {
            assert_close_shaped(&format!("{tag}: backward_eval dx"), Some(shape), &dx, &edx, GRAD);
            assert_close_shaped(
                &format!("{tag}: backward_eval dgamma"),
                Some(&features),
                layer.gamma_grad(),
                &eg,
                GRAD,
            );
            assert_close_shaped(
                &format!("{tag}: backward_eval dbeta"),
                Some(&features),
                layer.beta_grad(),
                &eb,
                GRAD,
            );
        }
        (Err(e), Err(Expect::TooFewValues)) => {
            assert!(matches!(e, BnError::TooFewValues { .. }), "{tag}: {e:?}");
            assert_eq!(full_state(&layer), before, "{tag}: state after {e:?}");
        }
        (got, expected) => panic!("{tag}: backward_eval: layer {got:?}, oracle {:?}", expected.map(|_| ())),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn runtime_layer_matches_independent_f64(s in setup()) {
        check_against_oracle(&s);
    }
}

// ------------------------------------------------------------------------------------------------
// Invalid calls
// ------------------------------------------------------------------------------------------------

/// Ways to break a call.
#[derive(Debug, Clone)]
enum Breakage {
    DropAxis(usize),
    AddAxis(usize),
    FeatureExtent(usize, usize),
    Overflow(usize),
    XLen(isize),
    OutLen(isize),
    DyLen(isize),
    BadParam(usize, u8),
}

fn breakage() -> impl Strategy<Value = Breakage> {
    prop_oneof![
        (0usize..8).prop_map(Breakage::DropAxis),
        (0usize..8).prop_map(Breakage::AddAxis),
        (0usize..2, 1usize..4).prop_map(|(a, d)| Breakage::FeatureExtent(a, d)),
        (0usize..8).prop_map(Breakage::Overflow),
        prop_oneof![Just(-1isize), Just(1), Just(-3), Just(7)].prop_map(Breakage::XLen),
        prop_oneof![Just(-1isize), Just(1), Just(5)].prop_map(Breakage::OutLen),
        prop_oneof![Just(-1isize), Just(2)].prop_map(Breakage::DyLen),
        (0usize..64, 0u8..6).prop_map(|(i, k)| Breakage::BadParam(i, k)),
    ]
}

fn resize(v: &[f32], delta: isize) -> Vec<f32> {
    let len = (v.len() as isize + delta).max(0) as usize;
    let mut w = v.to_vec();
    w.resize(len, 0.5);
    w
}

/// Everything observable: state, and the answers of forward_eval and backward on the setup's data.
fn observe(
    layer: &BatchNorm,
    s: &Setup,
    x_last: &[f32],
) -> (common::State, u64, Vec<u64>, Result<Vec<u64>, BnError>) {
    let shape = &s.geo.shape[..];
    let mut y = vec![0.0; s.geo.n()];
    let eval = match layer.forward_eval(&s.x_eval, shape, &mut y) {
        Ok(()) => common::ebits(&y),
        Err(_) => vec![],
    };
    let mut l = layer.clone();
    let mut dx = vec![0.0; s.geo.n()];
    let back = l.backward(x_last, &s.dy, shape, &mut dx).map(|()| {
        let mut v = common::ebits(&dx);
        v.extend(common::bits(l.gamma_grad()));
        v.extend(common::bits(l.beta_grad()));
        v
    });
    let (st, tracked) = full_state(layer);
    (st, tracked, eval, back)
}

fn check_invalid(s: &Setup, b: &Breakage) {
    let mut layer = s.layer();
    let shape = s.geo.shape.clone();
    let n = s.geo.n();
    let c = s.geo.c();
    // Train on the first batch when it can be trained on, so backward has something to lose.
    let mut y = vec![0.0; n];
    let _ = layer.forward_train(&s.xs[0], &shape, &mut y);
    let x_last = s.xs[0].clone();
    let before = observe(&layer, s, &x_last);
    let tag = format!("{:?} {:?} {b:?}", s.geo, s.opts);

    let mut bad_shape = shape.clone();
    let (mut x, mut out, mut dy) = (s.x_eval.clone(), vec![0.0f32; n], s.dy.clone());
    let rank = shape.len();
    match *b {
        Breakage::DropAxis(a) => {
            bad_shape.remove(a % rank);
        }
        Breakage::AddAxis(a) => bad_shape.insert(a % (rank + 1), 1 + a % 2),
        Breakage::FeatureExtent(a, d) => bad_shape[s.geo.first + a % s.geo.nf] += d,
        Breakage::Overflow(a) => {
            // A reduced extent of usize::MAX: the element count overflows when another extent is
            // >= 2, and otherwise cannot match the buffers.
            let axes = s.geo.axes();
            bad_shape[axes[a % axes.len()]] = usize::MAX;
        }
        Breakage::XLen(d) => x = resize(&x, d),
        Breakage::OutLen(d) => out = resize(&out, d),
        Breakage::DyLen(d) => dy = resize(&dy, d),
        Breakage::BadParam(..) => {}
    }

    if let Breakage::BadParam(i, k) = *b {
        let i = i % c;
        let mut g = s.gamma.clone();
        let mut bt = s.beta.clone();
        let mut rm = s.rm.clone();
        let mut rv = s.rv.clone();
        let r = match k {
            0 => {
                g[i] = f32::NAN;
                layer.update_params(&g, &bt)
            }
            1 => {
                bt[i] = f32::INFINITY;
                layer.update_params(&g, &bt)
            }
            2 => layer.update_params(&g[..c - 1], &bt),
            3 => {
                rv[i] = -0.5;
                layer.set_running_stats(&rm, &rv)
            }
            4 => {
                rm[i] = f32::NEG_INFINITY;
                layer.set_running_stats(&rm, &rv)
            }
            _ => {
                rv.push(1.0);
                layer.set_running_stats(&rm, &rv)
            }
        };
        assert!(r.is_err(), "{tag}: bad parameter accepted");
        assert_eq!(observe(&layer, s, &x_last), before, "{tag}: state after {r:?}");
        return;
    }

    // Every call that the breakage concerns must fail and leave the layer as it was.
    let reads_dy_only = matches!(b, Breakage::DyLen(_));
    let in_place = if matches!(b, Breakage::OutLen(_)) { out.clone() } else { x.clone() };
    type Call<'a> = Box<dyn FnOnce(&mut BatchNorm) -> Result<(), BnError> + 'a>;
    let (xs, dys, bs) = (&x, &dy, &bad_shape);
    let mut calls: Vec<(&str, Call<'_>)> = vec![
        ("backward", Box::new(|l| l.backward(xs, dys, bs, &mut out.clone()))),
        ("backward_eval", Box::new(|l| l.backward_eval(xs, dys, bs, &mut out.clone()))),
    ];
    if !reads_dy_only {
        calls.push(("forward_train", Box::new(|l| l.forward_train(xs, bs, &mut out.clone()))));
        calls.push(("forward_eval", Box::new(|l| l.forward_eval(xs, bs, &mut out.clone()))));
        calls.push(("forward_eval_inplace", Box::new(|l| l.forward_eval_inplace(&mut in_place.clone(), bs))));
    }
    for (name, call) in calls {
        let r = call(&mut layer);
        assert!(r.is_err(), "{tag}: {name} accepted a broken call");
        assert_eq!(observe(&layer, s, &x_last), before, "{tag}: {name} changed the layer ({r:?})");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn invalid_calls_fail_and_change_nothing(s in setup(), b in breakage()) {
        check_invalid(&s, &b);
    }
}

// ------------------------------------------------------------------------------------------------
// Thread counts
// ------------------------------------------------------------------------------------------------

/// Runs the whole sequence (training steps, inference, in-place inference, both backwards) and
/// returns every output and every state, as bits.
fn run_sequence(s: &Setup) -> Vec<Vec<u64>> {
    let mut layer = s.layer();
    let shape = &s.geo.shape[..];
    let n = s.geo.n();
    let mut out = Vec::new();
    let record = |l: &BatchNorm, v: Vec<u64>, out: &mut Vec<Vec<u64>>| {
        out.push(v);
        let (st, t) = full_state(l);
        out.push(
            [st.gamma, st.beta, st.running_mean, st.running_var, st.gamma_grad, st.beta_grad, vec![t]]
                .concat(),
        );
    };
    for x in &s.xs {
        let mut y = vec![0.0; n];
        let r = layer.forward_train(x, shape, &mut y);
        record(&layer, if r.is_ok() { common::ebits(&y) } else { vec![] }, &mut out);
    }
    let mut y = vec![0.0; n];
    let r = layer.forward_eval(&s.x_eval, shape, &mut y);
    record(&layer, if r.is_ok() { common::ebits(&y) } else { vec![] }, &mut out);
    let mut xy = s.x_eval.clone();
    let _ = layer.forward_eval_inplace(&mut xy, shape);
    record(&layer, common::ebits(&xy), &mut out);
    let mut dx = vec![0.0; n];
    let r = layer.backward(s.xs.last().unwrap(), &s.dy, shape, &mut dx);
    record(&layer, if r.is_ok() { common::ebits(&dx) } else { vec![] }, &mut out);
    let r = layer.backward_eval(&s.x_eval, &s.dy, shape, &mut dx);
    record(&layer, if r.is_ok() { common::ebits(&dx) } else { vec![] }, &mut out);
    out
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a thread pool")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn bit_identical_across_thread_counts(s in setup()) {
        let one = pool(1).install(|| run_sequence(&s));
        for threads in [2, 3] {
            let many = pool(threads).install(|| run_sequence(&s));
            prop_assert!(one == many, "{} threads differ from 1", threads);
        }
        prop_assert!(run_sequence(&s) == one, "the global pool differs from 1 thread");
    }
}

/// Tensors large enough to cross any serial-work threshold, in both kernel families.
#[test]
fn large_tensors_bit_identical_across_thread_counts() {
    let cases: [(&str, Vec<usize>, usize, usize); 4] = [
        ("NCHW planes", vec![4, 32, 24, 24], 1, 1),
        ("NC rows", vec![2048, 40], 1, 1),
        ("NHWC rows", vec![4, 16, 16, 48], 3, 1),
        ("two feature axes", vec![16, 55, 55], 1, 2),
    ];
    for (k, (name, shape, first, nf)) in cases.into_iter().enumerate() {
        let geo = Geometry { shape, first, nf };
        let (n, c) = (geo.n(), geo.c());
        let mut rng = Rng::new(500 + k as u64);
        let s = Setup {
            opts: Opts {
                preset: Preset::Pytorch,
                eps: None,
                momentum: None,
                center: true,
                scale: true,
                track: true,
            },
            gamma: rng.vec(c, 0.5, 1.5),
            beta: rng.vec(c, -0.5, 0.5),
            rm: rng.vec(c, -0.1, 0.1),
            rv: rng.vec(c, 0.5, 2.0),
            xs: vec![rng.vec(n, -3.0, 5.0), rng.vec(n, 100.0, 101.0)],
            x_eval: rng.vec(n, -3.0, 5.0),
            dy: rng.vec(n, -1.0, 1.0),
            geo,
        };
        let one = pool(1).install(|| run_sequence(&s));
        for threads in [2, 3] {
            let many = pool(threads).install(|| run_sequence(&s));
            assert!(one == many, "{name}: {threads} threads differ from 1");
        }
        // Sanity: the first training step is right.
        let mut l = s.layer();
        let mut y = vec![0.0; n];
        l.forward_train(&s.xs[0], &s.geo.shape, &mut y).unwrap();
        let mut o = Oracle::new(&s);
        if n <= 100_000 {
            let expected = o.forward_train(&s.xs[0]).unwrap();
            assert_close_shaped(name, Some(&s.geo.shape), &y, &expected, Tol { atol: 1e-5, rtol: 1e-4 });
        }
    }
}

/// Layers are `Sync`: inference from many threads at once on one shared layer (nested inside a
/// parallel iterator, so the kernels' own parallelism runs nested) gives the serial result.
#[test]
fn concurrent_inference_on_a_shared_layer() {
    use rayon::prelude::*;
    let mut rng = Rng::new(900);
    for (shape, axes, features) in [
        (vec![8usize, 32, 16, 16], vec![0usize, 2, 3], vec![32usize]),
        (vec![1024, 48], vec![0], vec![48]),
        (vec![3, 5, 4, 6], vec![0, 3], vec![5, 4]),
    ] {
        let n: usize = shape.iter().product();
        let c: usize = features.iter().product();
        let mut layer = BatchNorm::with_config(features, axes, Config::preset(Preset::Keras)).unwrap();
        layer.update_params(&rng.vec(c, 0.5, 1.5), &rng.vec(c, -0.5, 0.5)).unwrap();
        layer.set_running_stats(&rng.vec(c, -0.5, 0.5), &rng.vec(c, 0.5, 2.0)).unwrap();
        let inputs: Vec<Vec<f32>> = (0..6).map(|_| rng.vec(n, -3.0, 3.0)).collect();
        let serial: Vec<Vec<f32>> = pool(1).install(|| {
            inputs
                .iter()
                .map(|x| {
                    let mut y = vec![0.0; n];
                    layer.forward_eval(x, &shape, &mut y).unwrap();
                    y
                })
                .collect()
        });
        let shared = &layer;
        let parallel: Vec<Vec<f32>> = pool(3).install(|| {
            inputs
                .par_iter()
                .map(|x| {
                    let mut y = x.clone();
                    shared.forward_eval_inplace(&mut y, &shape).unwrap();
                    y
                })
                .collect()
        });
        for (a, b) in serial.iter().zip(&parallel) {
            assert_bits_eq(&format!("{shape:?}: concurrent inference"), b, a);
        }
    }
}
