//! Fuzz harness for the checkpoint loader, `bn_core::checkpoint::load_state_from_bytes`.
//!
//! The bytes are either a whole (arbitrary) file, or they describe a safetensors file (which
//! tensors, under which names, with which dtype, shape and values), optionally mutated at the
//! byte level afterwards (flipped bytes, truncation, appended garbage), or a mutation of a
//! file the crate itself saved. The properties:
//!
//! - no panic;
//! - `Err` exactly when the file is invalid for the layer, decided here independently from the
//!   module's documented rules (parsed with `safetensors`, then dtype, shape, finiteness, sign of
//!   the variance, fixed parameters, required and optional tensors, the counter); the error
//!   names one of the offending tensors;
//! - after an `Err` the layer is bit-for-bit unchanged; after `Ok` it holds the file's values.
//!
//! The same file is compiled into the fuzz target and into `tests/integration/fuzz_regressions.rs`.
#![allow(dead_code)]

use std::borrow::Cow;

use bn_core::checkpoint::safetensors::tensor::View;
use bn_core::checkpoint::safetensors::{self, Dtype, SafeTensors};
use bn_core::checkpoint::{self, Naming};
use bn_core::{BatchNorm, BnError, Config, Element, Layout, Param};

/// The fuzzer's bytes, read front to back; zeros once they run out.
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data, pos: 0 }
    }
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        (self.u32() as u64) | ((self.u32() as u64) << 32)
    }
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
    /// The bytes not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let rest = self.data.get(self.pos..).unwrap_or(&[]);
        self.pos = self.data.len();
        rest
    }
}

const VALUES: [f64; 16] = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    2.0,
    1e-3,
    3e38,
    1e300,
    f64::NAN,
    f64::INFINITY,
    -2.5,
    1e-40,
    7.0,
    -1e-30,
    100.0,
];

const PREFIXES: [&str; 4] = ["", "bn.", "1.", "model/block_0/"];

/// One tensor of a generated file.
struct Tensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Tensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn dtype_size(d: Dtype) -> usize {
    match d {
        Dtype::BOOL | Dtype::U8 | Dtype::I8 => 1,
        Dtype::F16 | Dtype::BF16 | Dtype::I16 | Dtype::U16 => 2,
        Dtype::F32 | Dtype::I32 | Dtype::U32 => 4,
        _ => 8,
    }
}

/// A tensor for one of the layer's names: mostly right, sometimes of another dtype or shape,
/// with special values or raw bytes.
fn tensor(inp: &mut Input, features: &[usize], counter: bool) -> Tensor {
    let c: usize = features.iter().product();
    let dtype = match inp.u8() % 16 {
        0 => Dtype::F16,
        1 => Dtype::BF16,
        2 => Dtype::I32,
        3 => Dtype::U8,
        4 => Dtype::BOOL,
        5 | 6 => Dtype::F64,
        7 => Dtype::I64,
        _ if counter => Dtype::I64,
        _ => Dtype::F32,
    };
    let shape = match inp.u8() % 16 {
        0 => vec![],
        1 => vec![1],
        2 => vec![c + 1],
        3 => vec![c, 1],
        4 => features.iter().rev().copied().collect(),
        5 => vec![0],
        6 => vec![c.saturating_sub(1)],
        _ if counter => vec![],
        7 | 8 => vec![c],
        _ => features.to_vec(),
    };
    let count: usize = shape.iter().product::<usize>().min(64);
    let size = dtype_size(dtype);
    let mut data = Vec::with_capacity(count * size);
    let raw = inp.u8() < 24;
    for _ in 0..count {
        if raw {
            data.extend((0..size).map(|_| inp.u8()));
            continue;
        }
        let v = if inp.u8() < 200 { (inp.u8() as f64) / 64.0 } else { inp.pick(&VALUES) };
        match dtype {
            Dtype::F32 => data.extend((v as f32).to_le_bytes()),
            Dtype::F64 => data.extend(v.to_le_bytes()),
            Dtype::I64 => {
                let i = inp.pick(&[0i64, 1, 5, -1, i64::MAX, i64::MIN, 1 << 40]);
                data.extend(i.to_le_bytes())
            }
            _ => data.extend((0..size).map(|_| inp.u8())),
        }
    }
    // Sometimes a length that does not match the shape (the file is then invalid).
    match inp.u8() {
        0..=3 => {
            data.pop();
        }
        4..=7 => data.push(0),
        _ => {}
    }
    Tensor { dtype, shape, data }
}

/// The model's verdict: the names of the tensors that make the file invalid (empty: valid).
fn verdict<P: Param>(
    file: &SafeTensors<'_>,
    features: &[usize],
    config: &Config,
    prefix: &str,
    naming: Naming<'_>,
) -> Vec<String> {
    let c: usize = features.iter().product();
    let is_f64 = core::mem::size_of::<P>() == 8;
    let mut bad = Vec::new();
    // The values of a per-feature tensor, or None if it is invalid.
    let values = |name: &str| -> Option<Vec<f64>> {
        let v = file.tensor(name).ok()?;
        let width = match v.dtype() {
            Dtype::F32 => 4,
            Dtype::F64 if is_f64 => 8,
            _ => return None,
        };
        if v.shape() != features && v.shape() != [c] {
            return None;
        }
        let data = v.data();
        if data.len() != c * width {
            return None;
        }
        let vals: Vec<f64> = data
            .chunks_exact(width)
            .map(|b| {
                if width == 4 {
                    f32::from_le_bytes(b.try_into().unwrap()) as f64
                } else {
                    f64::from_le_bytes(b.try_into().unwrap())
                }
            })
            .map(|v| P::from_f64(v).to_f64())
            .collect();
        vals.iter().all(|v| v.is_finite()).then_some(vals)
    };
    let present = |name: &str| file.tensor(name).is_ok();
    let full = |n: &str| format!("{prefix}{n}");

    let (w, b) = (full(naming.weight()), full(naming.bias()));
    for (name, learned, fixed) in [(&w, config.get_scale(), 1.0), (&b, config.get_center(), 0.0)] {
        if present(name) {
            match values(name) {
                None => bad.push(name.clone()),
                Some(v) if !learned && v.iter().any(|&x| x != fixed) => bad.push(name.clone()),
                Some(_) => {}
            }
        } else if learned {
            bad.push(name.clone());
        }
    }
    let track = config.get_track_running_stats();
    let (m, v) = (full(naming.running_mean()), full(naming.running_var()));
    match (present(&m), present(&v)) {
        (false, false) if track => bad.extend([m.clone(), v.clone()]),
        (false, false) => {}
        (true, false) => bad.push(v.clone()),
        (false, true) => bad.push(m.clone()),
        (true, true) => {
            if values(&m).is_none() {
                bad.push(m.clone());
            }
            match values(&v) {
                None => bad.push(v.clone()),
                Some(vals) if vals.iter().any(|&x| x < 0.0) => bad.push(v.clone()),
                Some(_) => {}
            }
        }
    }
    if let Some(counter) = naming.num_batches_tracked() {
        let name = full(counter);
        match file.tensor(&name) {
            Err(_) if track => bad.push(name),
            Err(_) => {}
            Ok(t) => {
                let ok = t.dtype() == Dtype::I64
                    && (t.shape().is_empty() || t.shape() == [1])
                    && t.data().len() == 8
                    && i64::from_le_bytes(t.data()[..8].try_into().unwrap()) >= 0;
                if !ok {
                    bad.push(name);
                }
            }
        }
    }
    bad
}

#[derive(Debug, PartialEq)]
struct Snapshot(Vec<u64>, Vec<u64>, Vec<u64>, Vec<u64>, u64);

fn snapshot<E: Element>(l: &BatchNorm<E>) -> Snapshot {
    let bits = |v: &[E::Param]| v.iter().map(|p| p.to_f64().to_bits()).collect::<Vec<_>>();
    Snapshot(
        bits(l.gamma()),
        bits(l.beta()),
        bits(l.running_mean()),
        bits(l.running_var()),
        l.num_batches_tracked(),
    )
}

/// Runs the harness on the fuzzer's bytes.
pub fn run(bytes: &[u8]) {
    let mut inp = Input::new(bytes);
    if inp.u8() & 1 == 1 {
        run_typed::<f64>(&mut inp);
    } else {
        run_typed::<f32>(&mut inp);
    }
}

fn run_typed<E: Element>(inp: &mut Input) {
    let features: Vec<usize> = (0..1 + inp.below(2)).map(|_| 1 + inp.below(6)).collect();
    let c: usize = features.iter().product();
    let flags = inp.u8();
    let config =
        Config::new().scale(flags & 1 == 0).center(flags & 2 == 0).track_running_stats(flags & 4 == 0);
    let mut layer = BatchNorm::<E>::with_layout(Layout::from_axes(&features, &[0]).unwrap(), config).unwrap();
    // A non-trivial valid state, so that "unchanged" means something.
    let gamma: Vec<E::Param> =
        (0..c).map(|k| E::Param::from_f64(if config.get_scale() { 0.5 + k as f64 } else { 1.0 })).collect();
    let beta: Vec<E::Param> =
        (0..c).map(|k| E::Param::from_f64(if config.get_center() { k as f64 - 1.0 } else { 0.0 })).collect();
    layer.update_params(&gamma, &beta).unwrap();
    let rm: Vec<E::Param> = (0..c).map(|k| E::Param::from_f64(k as f64 * 0.25)).collect();
    let rv: Vec<E::Param> = (0..c).map(|k| E::Param::from_f64(1.0 + k as f64)).collect();
    layer.set_running_stats(&rm, &rv).unwrap();
    layer.set_num_batches_tracked(3);

    let prefix = inp.pick(&PREFIXES);
    let custom = Naming::new("scale", "offset", "mean", "variance");
    let naming = match inp.u8() % 4 {
        0 => Naming::keras(),
        1 => custom.with_num_batches_tracked(Some("count")),
        _ => Naming::pytorch(),
    };

    let file: Vec<u8> = match inp.u8() % 8 {
        // Arbitrary bytes.
        0 => inp.rest().to_vec(),
        // A file the crate saved, from a layer of possibly other extents and dtype, mutated.
        1 | 2 => {
            let other: Vec<usize> = if inp.u8() < 200 { features.clone() } else { vec![1 + inp.below(8)] };
            let mut saver =
                BatchNorm::<E>::with_layout(Layout::from_axes(&other, &[0]).unwrap(), config).unwrap();
            let oc: usize = other.iter().product();
            let g: Vec<E::Param> = (0..oc)
                .map(|k| E::Param::from_f64(if config.get_scale() { 2.0 + k as f64 } else { 1.0 }))
                .collect();
            let b: Vec<E::Param> = (0..oc).map(|_| E::Param::ZERO).collect();
            saver.update_params(&g, &b).unwrap();
            saver.set_num_batches_tracked(inp.u64() >> 1);
            let saved_naming = if inp.u8() < 224 { naming } else { Naming::keras() };
            let mut bytes = checkpoint::save_state(&saver, prefix, saved_naming).unwrap();
            mutate(inp, &mut bytes);
            bytes
        }
        // A generated file.
        _ => {
            let mut names: Vec<(String, bool)> = vec![
                (naming.weight().into(), false),
                (naming.bias().into(), false),
                (naming.running_mean().into(), false),
                (naming.running_var().into(), false),
            ];
            if let Some(counter) = naming.num_batches_tracked() {
                names.push((counter.into(), true));
            }
            names.push(("conv.weight".into(), false));
            let mut tensors: Vec<(String, Tensor)> = Vec::new();
            for (name, counter) in names {
                if inp.u8() < 40 {
                    continue; // missing
                }
                let full = if inp.u8() < 8 { format!("x{prefix}{name}") } else { format!("{prefix}{name}") };
                if tensors.iter().any(|(n, _)| *n == full) {
                    continue;
                }
                tensors.push((full, tensor(inp, &features, counter)));
            }
            let mut bytes = match safetensors::serialize(tensors.iter().map(|(n, t)| (n.clone(), t)), None) {
                Ok(b) => b,
                Err(_) => return,
            };
            if inp.u8() < 32 {
                mutate(inp, &mut bytes);
            }
            bytes
        }
    };

    let before = snapshot(&layer);
    let parsed = SafeTensors::deserialize(&file);
    let result = checkpoint::load_state_from_bytes(&mut layer, &file, prefix, naming);
    match (&parsed, &result) {
        (Err(_), Err(BnError::CheckpointFile(_))) => {}
        (Err(e), r) => panic!("unparsable file ({e:?}), but load_state_from_bytes returned {r:?}"),
        (Ok(st), r) => {
            let bad = verdict::<E::Param>(st, &features, &config, prefix, naming);
            match r {
                Ok(()) => assert!(bad.is_empty(), "loaded a file with invalid tensors {bad:?}"),
                Err(BnError::Checkpoint { tensor, .. }) => {
                    assert!(
                        bad.contains(tensor),
                        "error names `{tensor}`, but the invalid tensors are {bad:?}: {r:?}"
                    )
                }
                Err(e) => panic!("a parsable file gave {e:?} (invalid tensors: {bad:?})"),
            }
        }
    }
    if result.is_err() {
        assert_eq!(snapshot(&layer), before, "an Err changed the layer");
        return;
    }
    // Ok: the layer holds the file's values where it has them, its old ones elsewhere.
    let st = parsed.unwrap();
    let read = |name: &str| -> Option<Vec<u64>> {
        let t = st.tensor(&format!("{prefix}{name}")).ok()?;
        let w = dtype_size(t.dtype());
        Some(
            t.data()
                .chunks_exact(w)
                .map(|b| {
                    let v = if w == 4 {
                        f32::from_le_bytes(b.try_into().unwrap()) as f64
                    } else {
                        f64::from_le_bytes(b.try_into().unwrap())
                    };
                    E::Param::from_f64(v).to_f64().to_bits()
                })
                .collect(),
        )
    };
    let after = snapshot(&layer);
    assert_eq!(after.0, read(naming.weight()).unwrap_or(before.0), "gamma");
    assert_eq!(after.1, read(naming.bias()).unwrap_or(before.1), "beta");
    assert_eq!(after.2, read(naming.running_mean()).unwrap_or(before.2), "running mean");
    assert_eq!(after.3, read(naming.running_var()).unwrap_or(before.3), "running var");
    let counter = naming.num_batches_tracked().and_then(|n| st.tensor(&format!("{prefix}{n}")).ok());
    let want = counter.map_or(before.4, |t| i64::from_le_bytes(t.data()[..8].try_into().unwrap()) as u64);
    assert_eq!(after.4, want, "num_batches_tracked");
    // What loaded saves and loads back to the same state.
    let again = checkpoint::save_state(&layer, prefix, naming).unwrap();
    let mut copy = layer.clone();
    checkpoint::load_state_from_bytes(&mut copy, &again, prefix, naming).unwrap();
    assert_eq!(snapshot(&copy), after);
}

/// Byte-level damage: flipped or overwritten bytes (in the header's length, the JSON or the
/// data), truncation, appended garbage.
fn mutate(inp: &mut Input, bytes: &mut Vec<u8>) {
    for _ in 0..inp.below(4) {
        if bytes.is_empty() {
            break;
        }
        let at = inp.u32() as usize % bytes.len();
        match inp.u8() % 4 {
            0 => bytes[at] ^= 1 << inp.below(8),
            1 => bytes[at] = inp.u8(),
            2 => bytes.truncate(at),
            _ => bytes.extend((0..inp.below(9)).map(|_| inp.u8())),
        }
    }
}
