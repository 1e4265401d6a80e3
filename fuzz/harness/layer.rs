//! Fuzz harness for the runtime-generic layer `bn_core::BatchNorm` (f32 and f64).
//!
//! The bytes choose a layout (feature extents and reduced axes, valid or not), a configuration
//! (eps, momentum, flags, valid or not), a backend, and a sequence of calls with arbitrary
//! shapes, buffer lengths, parameters and data (NaN, Inf, subnormals, values near the type's
//! maximum). The properties checked:
//!
//! - no panic (the harness itself never panics unless a property fails);
//! - `Err` exactly when the input is invalid: validity is computed here, independently of the
//!   crate (shapes, buffer lengths, batch sizes, and the batch statistics in `f64`), and the
//!   error must be one of the violated conditions; where the statistics are within rounding of
//!   the parameter type's overflow limit either answer is accepted;
//! - after an `Err` the layer is bit-for-bit unchanged: every getter, the counter, the backend,
//!   and the statistics saved for `backward` (compared through a `backward` on clones);
//! - invariants after every call: gamma, beta and the running statistics are finite, the running
//!   variance is not negative, `center = false` / `scale = false` fix beta / gamma;
//! - `forward_eval_inplace` is bit-identical to `forward_eval`;
//! - finite, moderate inputs give finite outputs, and `f32` outputs are close to an `f64`
//!   reference computed here.
//!
//! Allocations are bounded: tensors hold at most `MAX_ELEMS` values and layers at most 4096
//! features; shapes with more elements are only called with small (mismatched) buffers.
//!
//! The same file is compiled into the fuzz target (`fuzz/fuzz_targets/layer.rs`) and into the
//! regression test `tests/integration/fuzz_regressions.rs`, so it uses nothing but `bn_core` and `std`.
#![allow(dead_code)]

use bn_core::{Backend, BatchNorm, BnError, Config, Element, Layout, Param, RunningVar, MAX_FEATURES};

/// The largest tensor the harness allocates (smaller under Miri, which is slow).
pub const MAX_ELEMS: usize = if cfg!(miri) { 1 << 9 } else { 1 << 15 };
/// The longest sequence of calls on one layer.
const MAX_OPS: usize = 24;

// ------------------------------------------------------------------------------------------------
// Reading the fuzzer's bytes
// ------------------------------------------------------------------------------------------------

/// The fuzzer's bytes, read front to back; zeros once they run out.
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data, pos: 0 }
    }
    pub fn exhausted(&self) -> bool {
        self.pos >= self.data.len()
    }
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        (self.u32() as u64) | ((self.u32() as u64) << 32)
    }
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    /// A value in `0..n` (`n <= 256`), from one byte.
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            self.u8() as usize % n
        }
    }
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.u8() as usize % items.len()]
    }
}

/// SplitMix64, for bulk data from one seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn signed_unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

/// Values that find edges: zeros, ones, large offsets, squares that overflow f32, the limits
/// of f32 and f64, subnormals, NaN and the infinities.
const SPECIALS: [f64; 32] = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    -3.0,
    1e-3,
    1e3,
    1e4,
    -1e5,
    1e15,
    1e19,
    -1.5e19,
    2.5e19,
    1e22,
    3e38,
    -3e38,
    f32::MAX as f64,
    f32::MIN_POSITIVE as f64,
    1e-40,
    1.401298464324817e-45,
    1e154,
    -1e300,
    f64::MAX,
    f64::MIN_POSITIVE,
    5e-324,
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    65504.0,
    7.0,
    1e-7,
];

fn special(inp: &mut Input) -> f64 {
    inp.pick(&SPECIALS)
}

/// Mostly small parameter values, sometimes special ones (which the setters may reject).
fn param_value(inp: &mut Input) -> f64 {
    let b = inp.u8();
    if b < 200 {
        (b as f64 - 100.0) / 32.0
    } else {
        special(inp)
    }
}

/// `n` data values: a pattern from a seed, then a few special values at chosen places.
fn data<E: Element>(inp: &mut Input, n: usize) -> Vec<E> {
    let kind = inp.u8();
    let mut rng = Rng(inp.u64());
    let offset = inp.pick(&[0.0, 1.0, -3.0, 1e3, 1e4, -1e5, 1e15, 1e19, 3e19, 1e22, 3e38, 1e300]);
    let scale = inp.pick(&[0.0, 1e-7, 1e-3, 1.0, 10.0, 1e4, 1e18, 1e19, 3e38]);
    let mut v: Vec<E> = (0..n)
        .map(|_| {
            let x = match kind % 8 {
                0 | 1 => ((rng.next() % 17) as f64 - 8.0) / 4.0,
                2 | 3 => offset + scale * rng.signed_unit(),
                4 => offset,
                5 => {
                    if E::from_f64(0.1).to_f64() == 0.1 {
                        f64::from_bits(rng.next())
                    } else {
                        f32::from_bits(rng.next() as u32) as f64
                    }
                }
                6 => rng.signed_unit() * 1e-39,
                _ => rng.signed_unit() * 3.0,
            };
            E::from_f64(x)
        })
        .collect();
    if n > 0 {
        for _ in 0..inp.below(5) {
            let at = inp.u32() as usize % n;
            v[at] = E::from_f64(special(inp));
        }
    }
    v
}

// ------------------------------------------------------------------------------------------------
// The independent model of validity
// ------------------------------------------------------------------------------------------------

/// What a call must return.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    Ok,
    /// An error, one of these kinds (the conditions the input violates).
    Err(Vec<&'static str>),
    /// Within rounding of an overflow limit: either answer is right.
    Unsure,
}

fn kind(e: &BnError) -> &'static str {
    match e {
        BnError::RankMismatch { .. } => "RankMismatch",
        BnError::FeatureMismatch { .. } => "FeatureMismatch",
        BnError::BufferLength { .. } => "BufferLength",
        BnError::TooFewValues { .. } => "TooFewValues",
        BnError::EmptyBatch { .. } => "EmptyBatch",
        BnError::NoForward => "NoForward",
        BnError::BackwardShape { .. } => "BackwardShape",
        BnError::ParamLength { .. } => "ParamLength",
        BnError::NonFinite { .. } => "NonFinite",
        BnError::NegativeVariance { .. } => "NegativeVariance",
        BnError::FixedParameter { .. } => "FixedParameter",
        BnError::ShapeOverflow { .. } => "ShapeOverflow",
        BnError::InvalidConfig(_) => "InvalidConfig",
        BnError::InvalidLayout(_) => "InvalidLayout",
        _ => "other",
    }
}

fn check<T: std::fmt::Debug>(what: &str, expect: &Expect, got: &Result<T, BnError>) {
    match (expect, got) {
        (Expect::Unsure, _) | (Expect::Ok, Ok(_)) => {}
        (Expect::Err(kinds), Err(e)) if kinds.contains(&kind(e)) => {}
        _ => panic!("{what}: expected {expect:?}, got {got:?}"),
    }
}

/// The layout as the model sees it.
#[derive(Debug, Clone)]
struct Model {
    rank: usize,
    first: usize,
    features: Vec<usize>,
    channels: usize,
    config: Config,
    is_f64: bool,
    /// The shape, input and gamma of the last successful `forward_train`.
    saved: Option<(Vec<usize>, Vec<f64>, Vec<f64>)>,
}

/// The canonical view of a shape the model accepts.
#[derive(Debug, Clone, Copy)]
struct Dims {
    outer: usize,
    channels: usize,
    inner: usize,
}

impl Dims {
    fn len(&self) -> usize {
        self.outer * self.channels * self.inner
    }
    fn per_channel(&self) -> usize {
        self.outer * self.inner
    }
    fn channel(&self, i: usize) -> usize {
        (i / self.inner) % self.channels
    }
}

impl Model {
    /// The shape's problems, or its canonical view.
    fn shape(&self, shape: &[usize]) -> Result<Dims, Vec<&'static str>> {
        if shape.len() != self.rank {
            return Err(vec!["RankMismatch"]);
        }
        if shape[self.first..self.first + self.features.len()] != self.features[..] {
            return Err(vec!["FeatureMismatch"]);
        }
        let mut nonzero = 1usize;
        for &e in shape.iter().filter(|&&e| e != 0) {
            nonzero = match nonzero.checked_mul(e) {
                Some(p) => p,
                None => return Err(vec!["ShapeOverflow"]),
            };
        }
        let outer = shape[..self.first].iter().product();
        let inner = shape[self.first + self.features.len()..].iter().product();
        Ok(Dims { outer, channels: self.channels, inner })
    }

    /// Shape and buffer lengths.
    fn io(&self, shape: &[usize], buffers: &[usize]) -> Result<Dims, Vec<&'static str>> {
        let dims = self.shape(shape)?;
        if buffers.iter().any(|&b| b != dims.len()) {
            return Err(vec!["BufferLength"]);
        }
        Ok(dims)
    }

    /// The overflow limit of the parameter type.
    fn param_max(&self) -> f64 {
        if self.is_f64 {
            f64::MAX
        } else {
            f32::MAX as f64
        }
    }

    /// Whether the batch statistics of `x` are finite in the parameter type (with the unbiased
    /// variance too when `unbiased`), computed here in f64.
    fn statistics(&self, x: &[f64], dims: Dims, unbiased: bool) -> Expect {
        let c = dims.channels;
        let n = dims.per_channel() as f64;
        let mut mean = vec![0.0f64; c];
        let mut bad = vec![false; c];
        let mut huge = vec![false; c];
        for (i, &v) in x.iter().enumerate() {
            let ch = dims.channel(i);
            if !v.is_finite() {
                bad[ch] = true;
            } else if v.abs() > 1e150 {
                // Only f64 data gets here: the model's own f64 sums of such values (and of
                // their squares) may overflow where the statistics themselves fit.
                huge[ch] = true;
            }
            mean[ch] += v;
        }
        mean.iter_mut().for_each(|m| *m /= n);
        let mut var = vec![0.0f64; c];
        for (i, &v) in x.iter().enumerate() {
            let d = v - mean[dims.channel(i)];
            var[dims.channel(i)] += d * d;
        }
        let max = self.param_max();
        let mut unsure = false;
        for ch in 0..c {
            if bad[ch] {
                return Expect::Err(vec!["NonFinite"]);
            }
            if huge[ch] {
                unsure = true;
                continue;
            }
            let vb = var[ch] / n;
            let vu = if unbiased { vb * n / (n - 1.0) } else { vb };
            let t = mean[ch].abs().max(vb).max(vu);
            if t >= max * (1.0 + 1e-6) {
                return Expect::Err(vec!["NonFinite"]);
            }
            if t > max * (1.0 - 1e-6) {
                unsure = true;
            }
        }
        if unsure {
            Expect::Unsure
        } else {
            Expect::Ok
        }
    }

    /// What needs batch statistics (training; untracked inference) adds to a valid call.
    fn batch(&self, x: &[f64], dims: Dims, updates_running: bool) -> Expect {
        if dims.len() == 0 {
            return Expect::Err(vec!["EmptyBatch"]);
        }
        if dims.per_channel() < 2 {
            return Expect::Err(vec!["TooFewValues"]);
        }
        let unbiased = updates_running && self.config.get_running_var() == RunningVar::Unbiased;
        self.statistics(x, dims, unbiased)
    }

    fn forward_train(&self, x: &[f64], shape: &[usize], y: usize) -> Expect {
        match self.io(shape, &[x.len(), y]) {
            Err(k) => Expect::Err(k),
            Ok(dims) => self.batch(x, dims, self.config.get_track_running_stats()),
        }
    }

    fn forward_eval(&self, x: &[f64], shape: &[usize], buffers: &[usize]) -> Expect {
        match self.io(shape, buffers) {
            Err(k) => Expect::Err(k),
            Ok(dims) if dims.len() == 0 || self.config.get_track_running_stats() => Expect::Ok,
            Ok(dims) => self.batch(x, dims, false),
        }
    }

    fn backward(&self, x: usize, dy: usize, shape: &[usize], dx: usize) -> Expect {
        if let Err(k) = self.io(shape, &[x, dy, dx]) {
            return Expect::Err(k);
        }
        match &self.saved {
            None => Expect::Err(vec!["NoForward"]),
            Some((s, _, _)) if s != shape => Expect::Err(vec!["BackwardShape"]),
            Some(_) => Expect::Ok,
        }
    }

    fn backward_eval(&self, x: &[f64], dy: usize, shape: &[usize], dx: usize) -> Expect {
        self.forward_eval(x, shape, &[x.len(), dy, dx])
    }

    fn params(&self, gamma: &[f64], beta: &[f64]) -> Expect {
        if gamma.len() != self.channels || beta.len() != self.channels {
            return Expect::Err(vec!["ParamLength"]);
        }
        if gamma.iter().chain(beta).any(|v| !v.is_finite()) {
            return Expect::Err(vec!["NonFinite"]);
        }
        let fixed_gamma = !self.config.get_scale() && gamma.iter().any(|&g| g != 1.0);
        let fixed_beta = !self.config.get_center() && beta.iter().any(|&b| b != 0.0);
        if fixed_gamma || fixed_beta {
            return Expect::Err(vec!["FixedParameter"]);
        }
        Expect::Ok
    }

    fn stats(&self, mean: &[f64], var: &[f64]) -> Expect {
        if mean.len() != self.channels || var.len() != self.channels {
            return Expect::Err(vec!["ParamLength"]);
        }
        if mean.iter().chain(var).any(|v| !v.is_finite()) {
            return Expect::Err(vec!["NonFinite"]);
        }
        if var.iter().any(|&v| v < 0.0) {
            return Expect::Err(vec!["NegativeVariance"]);
        }
        Expect::Ok
    }
}

// ------------------------------------------------------------------------------------------------
// Building a layer
// ------------------------------------------------------------------------------------------------

/// Feature extents: usually 1 to 3 small ones; sometimes none, a zero, or extents whose product
/// overflows or exceeds [`MAX_FEATURES`] (rejected without allocating).
fn features(inp: &mut Input) -> Vec<usize> {
    let count = match inp.u8() % 16 {
        0 => 0,
        1..=10 => 1,
        11..=13 => 2,
        _ => 3,
    };
    (0..count)
        .map(|_| match inp.u8() {
            0 => 0,
            1..=249 => 1 + inp.below(16),
            b => [usize::MAX, 1 << 61, 1 << 62, usize::MAX / 3, 1 << 60, 1 << 63][(b - 250) as usize],
        })
        .collect()
}

/// Reduced axes: usually a valid set for the features (rank up to 6), sometimes arbitrary.
fn axes(inp: &mut Input, nf: usize) -> Vec<usize> {
    if inp.u8() < 16 {
        let n = inp.below(5);
        return (0..n).map(|_| inp.below(9)).collect();
    }
    let reduced = 1 + inp.below(4);
    let rank = reduced + nf;
    let first = inp.below(reduced + 1);
    (0..rank).filter(|a| !(first..first + nf).contains(a)).collect()
}

/// The model's verdict on a layout: `Ok(first feature axis)` or the error kinds.
/// Every violated condition is listed: the crate may report any of them.
fn layout_verdict(features: &[usize], axes: &[usize]) -> Result<usize, Vec<&'static str>> {
    let mut kinds = Vec::new();
    let rank = axes.len() + features.len();
    let feature_axes: Vec<usize> = (0..rank).filter(|a| !axes.contains(a)).collect();
    let structural = features.is_empty()
        || features.contains(&0)
        || axes.is_empty()
        || axes.windows(2).any(|w| w[0] >= w[1])
        || axes.iter().any(|&a| a >= rank)
        || feature_axes.iter().enumerate().any(|(k, &a)| a != feature_axes[0] + k);
    if structural {
        kinds.push("InvalidLayout");
    }
    match features.iter().try_fold(1usize, |p, &f| p.checked_mul(f)) {
        None => kinds.push("ShapeOverflow"),
        // More features than the limit: a layout error, before anything is allocated.
        Some(p) if p > MAX_FEATURES => kinds.push("InvalidLayout"),
        Some(p) if kinds.is_empty() => assert!(p <= 4096, "the harness only builds small layers"),
        Some(_) => {}
    }
    if kinds.is_empty() {
        Ok(feature_axes[0])
    } else {
        Err(kinds)
    }
}

fn config(inp: &mut Input) -> (Config, Expect) {
    let eps_choice = inp.u8();
    let eps = match eps_choice % 16 {
        0 => 0.0,
        1 => -1e-5,
        2 => f64::NAN,
        3 => f64::INFINITY,
        4 => 1e-300,
        5 => 5e-324,
        6 => 1e-20,
        7 => f64::MAX,
        8 => 1.0,
        9 => 1e-3,
        10 => f64::from_bits(inp.u64()),
        _ => 1e-5,
    };
    let momentum_choice = inp.u8();
    let mut config = Config::new().eps(eps);
    let momentum = match momentum_choice % 16 {
        0 => {
            let p = inp.pick(&[0.0, 1e-20, 0.1, 1.0, 1.5, -0.5, f64::NAN]);
            config = config.torch_momentum(p);
            1.0 - p
        }
        1 => {
            config = config.cumulative_momentum();
            0.9
        }
        2 => 0.0,
        3 => 1.0,
        4 => -0.0,
        5 => f64::NAN,
        6 => 1.0 - 1e-17,
        7 => 0.99,
        8 => f64::from_bits(inp.u64()),
        _ => 0.9,
    };
    if momentum_choice % 16 > 1 {
        config = config.momentum(momentum);
    }
    let flags = inp.u8();
    config = config
        .running_var(if flags & 1 == 1 { RunningVar::Unbiased } else { RunningVar::Biased })
        .center(flags & 2 == 0)
        .scale(flags & 4 == 0)
        .track_running_stats(flags & 8 == 0);
    let valid = eps.is_finite() && eps > 0.0 && (0.0..1.0).contains(&momentum);
    (config, if valid { Expect::Ok } else { Expect::Err(vec!["InvalidConfig"]) })
}

/// Whether this machine runs the backend, decided here (not by `Backend::is_available`).
fn machine_has(b: Backend) -> bool {
    match b {
        Backend::Scalar | Backend::Wide => true,
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 => {
            !cfg!(miri)
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512 => {
            !cfg!(miri)
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => false,
    }
}

// ------------------------------------------------------------------------------------------------
// The observable state
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    gamma: Vec<u64>,
    beta: Vec<u64>,
    running_mean: Vec<u64>,
    running_var: Vec<u64>,
    gamma_grad: Vec<u64>,
    beta_grad: Vec<u64>,
    batches: u64,
    backend: Backend,
}

/// Bit patterns, every NaN as one (the payload of a computed NaN is not specified; Miri
/// randomizes it).
fn bits<P: Param>(v: &[P]) -> Vec<u64> {
    v.iter().map(|p| canonical(p.to_f64())).collect()
}

fn canonical(v: f64) -> u64 {
    if v.is_nan() {
        f64::NAN.to_bits()
    } else {
        v.to_bits()
    }
}

fn snapshot<E: Element>(l: &BatchNorm<E>) -> Snapshot {
    Snapshot {
        gamma: bits(l.gamma()),
        beta: bits(l.beta()),
        running_mean: bits(l.running_mean()),
        running_var: bits(l.running_var()),
        gamma_grad: bits(l.gamma_grad()),
        beta_grad: bits(l.beta_grad()),
        batches: l.num_batches_tracked(),
        backend: l.backend(),
    }
}

fn to_f64<E: Element>(v: &[E]) -> Vec<f64> {
    v.iter().map(|e| e.to_f64()).collect()
}

fn from_f64<E: Element>(v: &[f64]) -> Vec<E> {
    v.iter().map(|&e| E::from_f64(e)).collect()
}

fn params_from_f64<P: Param>(v: &[f64]) -> Vec<P> {
    v.iter().map(|&e| P::from_f64(e)).collect()
}

/// Invariants that hold after every call.
fn invariants<E: Element>(l: &BatchNorm<E>, m: &Model) {
    let all_finite = |v: &[E::Param]| v.iter().all(|p| p.is_finite());
    assert!(all_finite(l.gamma()) && all_finite(l.beta()), "non-finite parameters");
    assert!(all_finite(l.running_mean()) && all_finite(l.running_var()), "non-finite running statistics");
    assert!(l.running_var().iter().all(|v| v.to_f64() >= 0.0), "negative running variance");
    if !m.config.get_scale() {
        assert!(l.gamma().iter().all(|g| g.to_f64() == 1.0), "scale = false, gamma not 1");
        assert!(l.gamma_grad().iter().all(|g| g.to_f64() == 0.0), "scale = false, gamma_grad not 0");
    }
    if !m.config.get_center() {
        assert!(l.beta().iter().all(|b| b.to_f64() == 0.0), "center = false, beta not 0");
        assert!(l.beta_grad().iter().all(|b| b.to_f64() == 0.0), "center = false, beta_grad not 0");
    }
    for v in [l.gamma(), l.beta(), l.running_mean(), l.running_var(), l.gamma_grad(), l.beta_grad()] {
        assert_eq!(v.len(), m.channels);
    }
}

/// Whether values are moderate enough that every result must be finite.
fn tame(v: &[f64], limit: f64) -> bool {
    v.iter().all(|x| x.is_finite() && x.abs() <= limit)
}

// ------------------------------------------------------------------------------------------------
// Calls
// ------------------------------------------------------------------------------------------------

/// A shape for the layer: usually valid with small reduced extents; sometimes of the wrong rank,
/// with wrong feature extents, or with extents at the edge of `usize`.
fn shape(inp: &mut Input, m: &Model) -> Vec<usize> {
    let mode = inp.u8() % 16;
    let mut s: Vec<usize> = (0..m.rank)
        .map(|a| {
            if (m.first..m.first + m.features.len()).contains(&a) {
                m.features[a - m.first]
            } else {
                match inp.u8() {
                    0..=19 => 0,
                    20..=59 => 1,
                    60..=239 => 2 + inp.below(6),
                    _ => 8 + inp.below(120),
                }
            }
        })
        .collect();
    match mode {
        0 => {
            // Wrong rank.
            if inp.bool() || s.is_empty() {
                s.push(1 + inp.below(3));
            } else {
                s.pop();
            }
        }
        1 if m.rank > 0 => {
            // A wrong feature extent.
            let k = inp.below(m.features.len());
            s[m.first + k] =
                [0, m.features[k] + 1, m.features[k].saturating_sub(1), usize::MAX][inp.below(4)];
        }
        2 => {
            // Huge reduced extents.
            let reduced: Vec<usize> =
                (0..m.rank).filter(|a| !(m.first..m.first + m.features.len()).contains(a)).collect();
            if !reduced.is_empty() {
                let a = reduced[inp.below(reduced.len())];
                s[a] = inp.pick(&[usize::MAX, usize::MAX / 2 + 1, 1 << 32, 1 << 40, usize::MAX / 4096]);
                if inp.bool() {
                    let b = reduced[inp.below(reduced.len())];
                    s[b] = inp.pick(&[0, 1, 2, usize::MAX]);
                }
            }
        }
        _ => {
            // Keep it within MAX_ELEMS: halve the largest reduced extent.
            let reduced: Vec<usize> =
                (0..m.rank).filter(|a| !(m.first..m.first + m.features.len()).contains(a)).collect();
            while s.iter().product::<usize>() > MAX_ELEMS {
                let &a = reduced.iter().max_by_key(|&&a| s[a]).unwrap();
                s[a] /= 2;
            }
        }
    }
    s
}

/// A buffer length for `shape`: usually its element count, sometimes off by a little; for
/// shapes too large to allocate, a small (mismatched) length.
fn buffer_len(inp: &mut Input, shape: &[usize]) -> usize {
    let count = shape.iter().try_fold(1usize, |p, &e| p.checked_mul(e)).filter(|&n| n <= MAX_ELEMS);
    let delta = inp.u8();
    match count {
        None => inp.below(17),
        Some(n) if delta < 224 => n,
        Some(n) if delta < 240 => n + 1 + (delta as usize & 3),
        Some(n) => n.saturating_sub(1 + (delta as usize & 3)),
    }
}

/// Runs the harness on the fuzzer's bytes.
pub fn run(bytes: &[u8]) {
    let mut inp = Input::new(bytes);
    if inp.bool() {
        run_typed::<f64>(&mut inp);
    } else {
        run_typed::<f32>(&mut inp);
    }
}

fn run_typed<E: Element>(inp: &mut Input) {
    let is_f64 = E::from_f64(0.1).to_f64() == 0.1;
    let features = features(inp);
    let axes = axes(inp, features.len());
    let (config, config_ok) = config(inp);
    let layout_ok = layout_verdict(&features, &axes);
    let layout = Layout::from_axes(&features, &axes);
    match &layout_ok {
        Ok(_) => assert!(layout.is_ok(), "layout {features:?} / {axes:?}: {layout:?}"),
        Err(k) => match &layout {
            Err(e) => {
                assert!(k.contains(&kind(e)), "layout {features:?} / {axes:?}: expected {k:?}, got {e:?}")
            }
            Ok(_) => panic!("layout {features:?} / {axes:?}: expected {k:?}, got {layout:?}"),
        },
    }
    let built = layout.and_then(|l| BatchNorm::<E>::with_layout(l, config));
    let first = match (layout_ok, config_ok) {
        (Ok(first), Expect::Ok) => first,
        (layout, config) => {
            let mut kinds = layout.err().unwrap_or_default();
            if let Expect::Err(k) = config {
                kinds.extend(k);
            }
            check("building", &Expect::Err(kinds), &built);
            return;
        }
    };
    let mut layer = built.unwrap_or_else(|e| panic!("building {features:?} / {axes:?} / {config:?}: {e}"));
    let channels = features.iter().product();
    let mut m =
        Model { rank: axes.len() + features.len(), first, features, channels, config, is_f64, saved: None };
    assert_eq!(layer.features(), channels);
    assert_eq!(layer.rank(), m.rank);

    for _ in 0..MAX_OPS {
        if inp.exhausted() {
            break;
        }
        let op = inp.u8() % 10;
        let before = snapshot(&layer);
        // Training is the one call that writes the statistics saved for backward.
        let pre = (op == 0).then(|| layer.clone());
        let what = format!("op {op} on {m:?}");
        let ok = match op {
            0 => op_forward_train(inp, &mut layer, &mut m, &what),
            1 | 2 => op_forward_eval(inp, &layer, &m, &what, op == 2),
            3 => op_backward(inp, &mut layer, &m, &what),
            4 => op_backward_eval(inp, &mut layer, &m, &what),
            5 => {
                let (gl, bl) = param_lens(inp, channels);
                let mut gamma: Vec<f64> = (0..gl).map(|_| param_value(inp)).collect();
                let mut beta: Vec<f64> = (0..bl).map(|_| param_value(inp)).collect();
                // Often the values a fixed parameter must have.
                if !m.config.get_scale() && inp.u8() < 160 {
                    gamma.iter_mut().for_each(|g| *g = 1.0);
                }
                if !m.config.get_center() && inp.u8() < 160 {
                    beta.iter_mut().for_each(|b| *b = 0.0);
                }
                let (gamma, beta) = (params_from_f64::<E::Param>(&gamma), params_from_f64::<E::Param>(&beta));
                let expect = m.params(&to_f64p(&gamma), &to_f64p(&beta));
                let r = layer.update_params(&gamma, &beta);
                check(&what, &expect, &r);
                if r.is_ok() {
                    assert_eq!(bits(layer.gamma()), bits(&gamma), "{what}: gamma set");
                    assert_eq!(bits(layer.beta()), bits(&beta), "{what}: beta set");
                }
                r.is_ok()
            }
            6 => {
                let (ml, vl) = param_lens(inp, channels);
                let mean: Vec<f64> = (0..ml).map(|_| param_value(inp)).collect();
                let var: Vec<f64> =
                    (0..vl).map(|_| param_value(inp).abs() * if inp.u8() < 8 { -1.0 } else { 1.0 }).collect();
                let (mean, var) = (params_from_f64::<E::Param>(&mean), params_from_f64::<E::Param>(&var));
                let expect = m.stats(&to_f64p(&mean), &to_f64p(&var));
                let r = layer.set_running_stats(&mean, &var);
                check(&what, &expect, &r);
                if r.is_ok() {
                    assert_eq!(bits(layer.running_mean()), bits(&mean), "{what}: mean set");
                    assert_eq!(bits(layer.running_var()), bits(&var), "{what}: var set");
                }
                r.is_ok()
            }
            7 => {
                let b = match inp.below(5) {
                    0 => None,
                    k => Some(Backend::ALL[k - 1]),
                };
                let expect = match b {
                    Some(b) if !machine_has(b) => Expect::Err(vec!["InvalidConfig"]),
                    _ => Expect::Ok,
                };
                let r = layer.set_backend(b);
                check(&what, &expect, &r);
                if let Ok(()) = r {
                    assert_eq!(layer.backend(), b.unwrap_or_else(Backend::detect));
                }
                r.is_ok()
            }
            8 => {
                let n = inp.pick(&[0, 1, 7, u64::MAX - 1, u64::MAX, i64::MAX as u64 + 1]);
                layer.set_num_batches_tracked(n);
                assert_eq!(layer.num_batches_tracked(), n);
                true
            }
            _ => {
                // A clone is independent: training it leaves the original as it was.
                let mut c = layer.clone();
                assert_eq!(snapshot(&c), before);
                let mut mc = m.clone();
                op_forward_train(inp, &mut c, &mut mc, &what);
                assert_eq!(snapshot(&layer), before, "{what}: training a clone changed the original");
                true
            }
        };
        if !ok {
            assert_eq!(snapshot(&layer), before, "{what}: an Err changed the layer");
            if let Some(pre) = &pre {
                same_saved(pre, &layer, &m, &what);
            }
        }
        invariants(&layer, &m);
    }
}

fn to_f64p<P: Param>(v: &[P]) -> Vec<f64> {
    v.iter().map(|p| p.to_f64()).collect()
}

fn param_lens(inp: &mut Input, c: usize) -> (usize, usize) {
    let len = |inp: &mut Input| match inp.u8() {
        0..=239 => c,
        240..=247 => c + 1,
        248..=251 => c.saturating_sub(1),
        _ => 0,
    };
    (len(inp), len(inp))
}

/// The statistics saved for `backward` did not change: a backward on clones of the layer
/// before and after gives the same bits.
fn same_saved<E: Element>(pre: &BatchNorm<E>, post: &BatchNorm<E>, m: &Model, what: &str) {
    let Some((shape, x, _)) = &m.saved else {
        return;
    };
    let x: Vec<E> = from_f64(x);
    let dy: Vec<E> = (0..x.len()).map(|i| E::from_f64((i % 7) as f64 - 3.0)).collect();
    let (mut a, mut b) = (pre.clone(), post.clone());
    let (mut dxa, mut dxb) = (vec![E::default(); x.len()], vec![E::default(); x.len()]);
    let ra = a.backward(&x, &dy, shape, &mut dxa);
    let rb = b.backward(&x, &dy, shape, &mut dxb);
    assert!(ra.is_ok() && rb.is_ok(), "{what}: backward of the saved forward: {ra:?} {rb:?}");
    assert_eq!(
        to_f64(&dxa).into_iter().map(canonical).collect::<Vec<_>>(),
        to_f64(&dxb).into_iter().map(canonical).collect::<Vec<_>>(),
        "{what}: an Err changed the saved statistics"
    );
    assert_eq!(snapshot(&a), snapshot(&b), "{what}: backward after the Err");
}

fn op_forward_train<E: Element>(inp: &mut Input, l: &mut BatchNorm<E>, m: &mut Model, what: &str) -> bool {
    let s = shape(inp, m);
    let (xl, yl) = (buffer_len(inp, &s), buffer_len(inp, &s));
    let x: Vec<E> = data(inp, xl);
    let mut y = vec![E::default(); yl];
    let xf = to_f64(&x);
    let expect = m.forward_train(&xf, &s, yl);
    let batches = l.num_batches_tracked();
    let r = l.forward_train(&x, &s, &mut y);
    check(what, &expect, &r);
    if r.is_err() {
        return false;
    }
    let track = m.config.get_track_running_stats();
    assert_eq!(
        l.num_batches_tracked(),
        if track { batches.saturating_add(1) } else { batches },
        "{what}: counter"
    );
    let dims = m.shape(&s).unwrap();
    let g = to_f64p(l.gamma());
    let b = to_f64p(l.beta());
    if !m.is_f64 && tame(&xf, 1e15) && tame(&g, 1e6) && tame(&b, 1e6) && m.config.get_eps() >= 1e-20 {
        let y = to_f64(&y);
        assert!(y.iter().all(|v| v.is_finite()), "{what}: finite input, non-finite y");
        compare_train(&xf, &y, dims, &g, &b, m.config.get_eps(), what);
    }
    m.saved = Some((s, xf, g));
    true
}

/// `y` against the f64 reference, with a bound that grows with |mean| / std (the f32 inputs'
/// own rounding at that offset).
fn compare_train(x: &[f64], y: &[f64], dims: Dims, gamma: &[f64], beta: &[f64], eps: f64, what: &str) {
    let c = dims.channels;
    let n = dims.per_channel() as f64;
    let mut mean = vec![0.0; c];
    x.iter().enumerate().for_each(|(i, v)| mean[dims.channel(i)] += v);
    mean.iter_mut().for_each(|v| *v /= n);
    let mut var = vec![0.0; c];
    x.iter().enumerate().for_each(|(i, v)| var[dims.channel(i)] += (v - mean[dims.channel(i)]).powi(2));
    var.iter_mut().for_each(|v| *v /= n);
    for (i, (&xv, &yv)) in x.iter().zip(y).enumerate() {
        let ch = dims.channel(i);
        let sd = (var[ch] + eps).sqrt();
        let want = gamma[ch] * (xv - mean[ch]) / sd + beta[ch];
        let ratio = mean[ch].abs() / sd;
        let xhat = (xv - mean[ch]).abs() / sd;
        // (plus the rounding of a subnormal f32 output)
        let tol = gamma[ch].abs() * (1e-4 + 1e-6 * ratio + 1e-5 * xhat)
            + 1e-6 * (beta[ch].abs() + want.abs())
            + 3e-45;
        assert!((yv - want).abs() <= tol, "{what}: y[{i}] = {yv:e}, reference {want:e} (tolerance {tol:e})");
    }
}

fn op_forward_eval<E: Element>(
    inp: &mut Input,
    l: &BatchNorm<E>,
    m: &Model,
    what: &str,
    inplace: bool,
) -> bool {
    let s = shape(inp, m);
    let (xl, yl) = (buffer_len(inp, &s), buffer_len(inp, &s));
    let yl = if inplace { xl } else { yl };
    let x: Vec<E> = data(inp, xl);
    let xf = to_f64(&x);
    let expect = m.forward_eval(&xf, &s, &[xl, yl]);
    let mut y = vec![E::default(); yl];
    let r = if inplace {
        y.copy_from_slice(&x);
        l.forward_eval_inplace(&mut y, &s)
    } else {
        l.forward_eval(&x, &s, &mut y)
    };
    check(what, &expect, &r);
    if r.is_err() {
        return false;
    }
    // In place and out of place give the same bits.
    let mut other = x.clone();
    let r2 = if inplace {
        let mut out = vec![E::default(); xl];
        let r2 = l.forward_eval(&x, &s, &mut out);
        other = out;
        r2
    } else {
        l.forward_eval_inplace(&mut other, &s)
    };
    assert!(r2.is_ok(), "{what}: the other form of inference failed: {r2:?}");
    let b1: Vec<u64> = to_f64(&y).into_iter().map(canonical).collect();
    let b2: Vec<u64> = to_f64(&other).into_iter().map(canonical).collect();
    assert_eq!(b1, b2, "{what}: forward_eval_inplace differs from forward_eval");
    let g = to_f64p(l.gamma());
    let b = to_f64p(l.beta());
    let (rm, rv) = (to_f64p(l.running_mean()), to_f64p(l.running_var()));
    let moderate = tame(&xf, 1e15) && tame(&g, 1e6) && tame(&b, 1e6) && m.config.get_eps() >= 1e-20;
    if !m.is_f64 && moderate && m.config.get_track_running_stats() && tame(&rm, 1e15) && tame(&rv, 1e30) {
        let dims = m.shape(&s).unwrap();
        let eps = m.config.get_eps();
        for (i, (&xv, yv)) in xf.iter().zip(to_f64(&y)).enumerate() {
            let ch = dims.channel(i);
            let scale = g[ch] / (rv[ch] + eps).sqrt();
            let want = (xv - rm[ch]) * scale + b[ch];
            let tol = 1e-6 * ((xv - rm[ch]).abs() * scale.abs() + b[ch].abs()) + 1e-30;
            assert!((yv - want).abs() <= tol, "{what}: eval y[{i}] = {yv:e}, reference {want:e}");
        }
    }
    true
}

fn op_backward<E: Element>(inp: &mut Input, l: &mut BatchNorm<E>, m: &Model, what: &str) -> bool {
    // Usually the saved forward's shape and input.
    let reuse = inp.u8() < 192;
    let (s, x) = match (&m.saved, reuse) {
        (Some((s, x, _)), true) => (s.clone(), from_f64::<E>(x)),
        _ => {
            let s = shape(inp, m);
            let xl = buffer_len(inp, &s);
            (s, data(inp, xl))
        }
    };
    let (dyl, dxl) = (buffer_len(inp, &s), buffer_len(inp, &s));
    let dy: Vec<E> = data(inp, dyl);
    let mut dx = vec![E::default(); dxl];
    let expect = m.backward(x.len(), dyl, &s, dxl);
    let r = l.backward(&x, &dy, &s, &mut dx);
    check(what, &expect, &r);
    if r.is_err() {
        return false;
    }
    // The saved forward's own input, moderate values: finite gradients.
    let xf = to_f64(&x);
    // (backward uses the gamma saved by the forward, not the current one)
    let Some((_, sx, g)) = &m.saved else { unreachable!("backward succeeded without a forward") };
    let same_x = sx.iter().zip(&xf).all(|(a, b)| a.to_bits() == b.to_bits());
    if !m.is_f64
        && same_x
        && tame(&xf, 1e15)
        && tame(&to_f64(&dy), 1e6)
        && tame(g, 1e6)
        && m.config.get_eps() >= 1e-20
    {
        assert!(to_f64(&dx).iter().all(|v| v.is_finite()), "{what}: finite input, non-finite dx");
        assert!(
            l.gamma_grad().iter().chain(l.beta_grad()).all(|v| v.is_finite()),
            "{what}: non-finite grads"
        );
    }
    true
}

fn op_backward_eval<E: Element>(inp: &mut Input, l: &mut BatchNorm<E>, m: &Model, what: &str) -> bool {
    let s = shape(inp, m);
    let (xl, dyl, dxl) = (buffer_len(inp, &s), buffer_len(inp, &s), buffer_len(inp, &s));
    let x: Vec<E> = data(inp, xl);
    let dy: Vec<E> = data(inp, dyl);
    let mut dx = vec![E::default(); dxl];
    let xf = to_f64(&x);
    let expect = m.backward_eval(&xf, dyl, &s, dxl);
    let r = l.backward_eval(&x, &dy, &s, &mut dx);
    check(what, &expect, &r);
    if r.is_err() {
        return false;
    }
    let (g, b) = (to_f64p(l.gamma()), to_f64p(l.beta()));
    let (rm, rv) = (to_f64p(l.running_mean()), to_f64p(l.running_var()));
    let moderate = tame(&xf, 1e15) && tame(&to_f64(&dy), 1e6) && tame(&g, 1e6) && tame(&b, 1e6);
    if !m.is_f64 && moderate && m.config.get_eps() >= 1e-20 && tame(&rm, 1e15) && tame(&rv, 1e30) {
        assert!(to_f64(&dx).iter().all(|v| v.is_finite()), "{what}: finite input, non-finite dx");
        assert!(
            l.gamma_grad().iter().chain(l.beta_grad()).all(|v| v.is_finite()),
            "{what}: non-finite grads"
        );
    }
    true
}
