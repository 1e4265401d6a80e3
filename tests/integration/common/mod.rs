//! Helpers shared by the integration tests: the conformance manifest and its safetensors files,
//! tolerance checks that name the worst element, bit-exact state snapshots and a small
//! deterministic random generator.
//!
//! Each test crate uses a different subset of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt::Debug;
use std::path::PathBuf;

use batchnorm::{BatchNorm, BatchNormLayer, Config, Element, Param, Preset, RunningVar};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

// ------------------------------------------------------------------------------------------------
// Conformance data
// ------------------------------------------------------------------------------------------------

/// The directory holding the reference data produced by PyTorch, Keras and NumPy.
pub fn conformance_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("data").join("conformance")
}

/// One case of `manifest.json`.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub file: String,
    pub source: String,
    pub preset: Preset,
    pub shape: Vec<usize>,
    pub feature_axes: Vec<usize>,
    pub axes: Vec<usize>,
    pub momentum: f64,
    pub eps: f64,
    pub running_var: RunningVar,
    pub steps: usize,
}

impl Case {
    /// The feature extents: the extents of the feature axes.
    pub fn features(&self) -> Vec<usize> {
        self.feature_axes.iter().map(|&a| self.shape[a]).collect()
    }

    /// Number of features (product of the feature extents).
    pub fn channels(&self) -> usize {
        self.features().iter().product()
    }

    /// Number of elements of one tensor of the case's shape.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// The configuration: the preset with the manifest's explicit values on top.
    pub fn config(&self) -> Config {
        // The manifest's momentum is the weight of the old value; PyTorch's preset takes it in
        // PyTorch's own spelling (`1 - (1 - m)` is exactly `m` for `m` in [0.5, 1]).
        let config = match self.preset {
            Preset::Pytorch => Config::preset(self.preset).torch_momentum(1.0 - self.momentum),
            _ => Config::preset(self.preset).momentum(self.momentum),
        };
        config.eps(self.eps).running_var(self.running_var)
    }

    /// The runtime-generic layer described by the case.
    pub fn runtime_layer(&self) -> BatchNorm {
        BatchNorm::with_config(self.features(), &self.axes, self.config())
            .unwrap_or_else(|e| panic!("{}: building the runtime layer failed: {e}", self.name))
    }

    /// Loads the case's tensors.
    pub fn tensors(&self) -> Tensors {
        Tensors::load(&self.file)
    }
}

fn json_usizes(v: &Value, key: &str, case: &str) -> Vec<usize> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("manifest case {case}: `{key}` is not an array"))
        .iter()
        .map(|e| e.as_u64().unwrap_or_else(|| panic!("manifest case {case}: bad entry in `{key}`")) as usize)
        .collect()
}

fn json_str<'a>(v: &'a Value, key: &str, case: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("manifest case {case}: `{key}` is not a string"))
}

fn json_f64(v: &Value, key: &str, case: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("manifest case {case}: `{key}` is not a number"))
}

/// Parses `manifest.json`.
pub fn manifest() -> Vec<Case> {
    let path = conformance_dir().join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let json: Value = serde_json::from_str(&text).expect("manifest.json is valid JSON");
    json.as_array()
        .expect("manifest.json is an array of cases")
        .iter()
        .map(|v| {
            let name = v["name"].as_str().expect("every case has a name").to_string();
            let preset = json_str(v, "preset", &name);
            let running_var = match json_str(v, "running_var", &name) {
                "biased" => RunningVar::Biased,
                "unbiased" => RunningVar::Unbiased,
                other => panic!("manifest case {name}: unknown running_var {other:?}"),
            };
            Case {
                file: json_str(v, "file", &name).to_string(),
                source: json_str(v, "source", &name).to_string(),
                preset: Preset::from_name(preset)
                    .unwrap_or_else(|| panic!("manifest case {name}: unknown preset {preset:?}")),
                shape: json_usizes(v, "shape", &name),
                feature_axes: json_usizes(v, "feature_axes", &name),
                axes: json_usizes(v, "axes", &name),
                momentum: json_f64(v, "momentum", &name),
                eps: json_f64(v, "eps", &name),
                running_var,
                steps: v["steps"].as_u64().expect("steps is an integer") as usize,
                name,
            }
        })
        .collect()
}

/// The manifest case called `name`.
pub fn case(name: &str) -> Case {
    manifest().into_iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no manifest case {name:?}"))
}

/// The float32 (and int64) tensors of one safetensors file.
pub struct Tensors {
    file: String,
    f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
    i64s: HashMap<String, (Vec<usize>, Vec<i64>)>,
}

impl Tensors {
    /// Loads `file` from the conformance directory.
    pub fn load(file: &str) -> Tensors {
        let path = conformance_dir().join(file);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("parsing {file}: {e}"));
        let mut f32s = HashMap::new();
        let mut i64s = HashMap::new();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let data = view.data();
            match view.dtype() {
                Dtype::F32 => {
                    let v =
                        data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                    f32s.insert(name, (shape, v));
                }
                Dtype::I64 => {
                    let v = data
                        .chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                        .collect();
                    i64s.insert(name, (shape, v));
                }
                other => panic!("{file}: tensor {name} has unexpected dtype {other:?}"),
            }
        }
        Tensors { file: file.to_string(), f32s, i64s }
    }

    fn entry(&self, name: &str) -> &(Vec<usize>, Vec<f32>) {
        self.f32s.get(name).unwrap_or_else(|| panic!("{}: no float32 tensor {name:?}", self.file))
    }

    /// The values of float32 tensor `name`.
    pub fn get(&self, name: &str) -> &[f32] {
        &self.entry(name).1
    }

    /// The shape of float32 tensor `name`.
    pub fn shape(&self, name: &str) -> &[usize] {
        &self.entry(name).0
    }

    /// The values of int64 tensor `name`.
    pub fn get_i64(&self, name: &str) -> &[i64] {
        &self.i64s.get(name).unwrap_or_else(|| panic!("{}: no int64 tensor {name:?}", self.file)).1
    }

    /// Whether the file holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.f32s.contains_key(name) || self.i64s.contains_key(name)
    }
}

// ------------------------------------------------------------------------------------------------
// Tolerances
// ------------------------------------------------------------------------------------------------

/// `|got - expected| <= atol + rtol * |expected|`.
#[derive(Debug, Clone, Copy)]
pub struct Tol {
    pub atol: f64,
    pub rtol: f64,
}

/// The tolerance the peers meet against each other (outputs and statistics).
pub const FWD: Tol = Tol { atol: 1e-5, rtol: 1e-4 };
/// The tolerance for gradients.
pub const GRAD: Tol = Tol { atol: 1e-4, rtol: 1e-3 };

/// A value that widens to f64 exactly (f32, f64).
pub trait Real: Copy + Debug {
    fn f64(self) -> f64;
}
impl Real for f32 {
    fn f64(self) -> f64 {
        self as f64
    }
}
impl Real for f64 {
    fn f64(self) -> f64 {
        self
    }
}

/// Row-major multi-index of flat index `i` in `shape`.
pub fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (a, &e) in shape.iter().enumerate().rev() {
        if e > 0 {
            idx[a] = i % e;
            i /= e;
        }
    }
    idx
}

/// Checks every element against `tol`; on failure names the number of violations, the worst
/// element (flat index and, with a shape, its multi-index) and the first few violations.
/// Non-finite expected values must be matched exactly (NaN by NaN).
pub fn assert_close_shaped<A: Real, B: Real>(
    what: &str,
    shape: Option<&[usize]>,
    got: &[A],
    expected: &[B],
    tol: Tol,
) {
    assert_eq!(got.len(), expected.len(), "{what}: length {} but expected {}", got.len(), expected.len());
    let mut bad = 0usize;
    let mut worst: Option<(usize, f64)> = None;
    let mut first = Vec::new();
    for (i, (&g, &e)) in got.iter().zip(expected).enumerate() {
        let (g, e) = (g.f64(), e.f64());
        let ok = if e.is_nan() {
            g.is_nan()
        } else if e.is_infinite() {
            g == e
        } else {
            (g - e).abs() <= tol.atol + tol.rtol * e.abs()
        };
        if !ok {
            bad += 1;
            let allowed = tol.atol + tol.rtol * e.abs();
            let ratio = if g.is_finite() && e.is_finite() { (g - e).abs() / allowed } else { f64::INFINITY };
            if worst.is_none_or(|(_, r)| ratio > r) {
                worst = Some((i, ratio));
            }
            if first.len() < 5 {
                first.push(format!("[{i}] got {g:e}, expected {e:e}"));
            }
        }
    }
    if let Some((i, ratio)) = worst {
        let (g, e) = (got[i].f64(), expected[i].f64());
        let at = match shape {
            Some(s) => format!(" at {:?}", unravel(i, s)),
            None => String::new(),
        };
        panic!(
            "{what}: {bad} of {} elements outside |a - b| <= {:e} + {:e} * |b|; worst: index {i}{at}: \
             got {g:e}, expected {e:e}, |diff| = {:e} ({ratio:.2}x the allowed); first: {}",
            got.len(),
            tol.atol,
            tol.rtol,
            (g - e).abs(),
            first.join(", ")
        );
    }
}

/// [`assert_close_shaped`] without a shape.
pub fn assert_close<A: Real, B: Real>(what: &str, got: &[A], expected: &[B], tol: Tol) {
    assert_close_shaped(what, None, got, expected, tol)
}

/// Bit patterns of a slice (f32 widened to f64 exactly, so the pattern is injective).
pub fn bits<P: Param>(v: &[P]) -> Vec<u64> {
    v.iter().map(|p| p.to_f64().to_bits()).collect()
}

/// Bit patterns of a data slice.
pub fn ebits<E: Element>(v: &[E]) -> Vec<u64> {
    v.iter().map(|p| p.to_f64().to_bits()).collect()
}

/// Asserts two data slices are bit-identical, naming the first difference.
pub fn assert_bits_eq<E: Element>(what: &str, got: &[E], expected: &[E]) {
    assert_eq!(got.len(), expected.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().zip(expected).position(|(a, b)| a.to_f64().to_bits() != b.to_f64().to_bits())
    {
        panic!("{what}: not bit-identical at index {i}: {:?} vs {:?}", got[i], expected[i]);
    }
}

// ------------------------------------------------------------------------------------------------
// Observable state
// ------------------------------------------------------------------------------------------------

/// Everything a layer's getters expose, as bit patterns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub gamma: Vec<u64>,
    pub beta: Vec<u64>,
    pub running_mean: Vec<u64>,
    pub running_var: Vec<u64>,
    pub gamma_grad: Vec<u64>,
    pub beta_grad: Vec<u64>,
}

/// The observable state of any layer, through the trait.
pub fn state<L>(layer: &L) -> State
where
    L: BatchNormLayer,
    L::Param: Param,
{
    State {
        gamma: bits(layer.gamma()),
        beta: bits(layer.beta()),
        running_mean: bits(layer.running_mean()),
        running_var: bits(layer.running_var()),
        gamma_grad: bits(layer.gamma_grad()),
        beta_grad: bits(layer.beta_grad()),
    }
}

/// The observable state of a runtime layer, including `num_batches_tracked`.
pub fn full_state<E: Element>(layer: &BatchNorm<E>) -> (State, u64) {
    (state(layer), layer.num_batches_tracked())
}

// ------------------------------------------------------------------------------------------------
// Deterministic random numbers
// ------------------------------------------------------------------------------------------------

/// SplitMix64: small, fast, deterministic.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform integer in [lo, hi].
    /// A standard normal draw (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.unit().max(1e-300);
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    /// `n` values uniform in [lo, hi), as any element type.
    pub fn vec<E: Element>(&mut self, n: usize, lo: f64, hi: f64) -> Vec<E> {
        (0..n).map(|_| E::from_f64(self.uniform(lo, hi))).collect()
    }

    /// `n` parameter values uniform in [lo, hi).
    pub fn params<P: Param>(&mut self, n: usize, lo: f64, hi: f64) -> Vec<P> {
        (0..n).map(|_| P::from_f64(self.uniform(lo, hi))).collect()
    }
}
