//! Checkpoints: the real PyTorch `state_dict` in `tests/data/conformance` (see its README) loaded
//! into `#[batch_norm]` layers, save/load round trips, every kind of bad tensor, and the
//! cumulative moving average (PyTorch's `momentum=None`) continued across a checkpoint.

use crate::common;

use std::path::PathBuf;

use batchnorm::checkpoint::safetensors::{self, Dtype, SafeTensors, View};
use batchnorm::checkpoint::{self, Naming, StateDict};
use batchnorm::{batch_norm, BatchNorm, BatchNormLayer, BnError, Config, Preset, RunningVar};
use common::{assert_close_shaped, bits, conformance_dir, state, Rng, State, Tensors, FWD};

/// `1.`: BatchNorm2d(16) after Conv2d(3, 16, 3).
#[batch_norm(features = 16, axes = [0, 2, 3], preset = "pytorch")]
struct Bn1;

/// `4.`: BatchNorm2d(32).
#[batch_norm(features = 32, axes = [0, 2, 3], preset = "pytorch")]
struct Bn2;

/// `8.`: BatchNorm1d(24) after Linear(2048, 24).
#[batch_norm(features = 24, axes = [0], preset = "pytorch")]
struct Bn3;

/// A layer with two feature axes (the seed's layout).
#[batch_norm(features = [5, 3], axes = [0])]
struct GridBn;

/// PyTorch's `momentum=None`.
#[batch_norm(features = 6, axes = [0, 2], preset = "pytorch", momentum = "cumulative")]
struct CumulativeBn;

#[batch_norm(features = 16, axes = [0, 2, 3], preset = "pytorch", center = false)]
struct UncenteredBn;

const STATE_DICT: &str = "torch_state_dict.safetensors";

fn state_dict_bytes() -> Vec<u8> {
    std::fs::read(conformance_dir().join(STATE_DICT)).expect("the PyTorch checkpoint is readable")
}

/// Everything observable about a layer, bit for bit, with its counter.
fn full<L: BatchNormLayer>(layer: &L) -> (State, u64) {
    (state(layer), layer.num_batches_tracked())
}

/// A path in Cargo's scratch directory for integration tests.
fn scratch(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("checkpoint-{}-{name}", std::process::id()))
}

/// Loads layer `prefix` of the PyTorch checkpoint and checks inference against PyTorch's.
fn check_loaded<L>(layer: &mut L, tensors: &SafeTensors<'_>, prefix: &str, io: &str, shape: &[usize])
where
    L: BatchNormLayer<Elem = f32, Param = f32>,
{
    checkpoint::load_state(layer, tensors, prefix, Naming::pytorch())
        .unwrap_or_else(|e| panic!("loading {prefix}: {e}"));
    let file = Tensors::load(STATE_DICT);
    assert_eq!(layer.gamma(), file.get(&format!("{prefix}weight")), "{prefix}weight");
    assert_eq!(layer.beta(), file.get(&format!("{prefix}bias")), "{prefix}bias");
    assert_eq!(layer.running_mean(), file.get(&format!("{prefix}running_mean")));
    assert_eq!(layer.running_var(), file.get(&format!("{prefix}running_var")));
    assert_eq!(layer.num_batches_tracked(), 5, "{prefix}num_batches_tracked");

    let t = Tensors::load("torch_state_dict_io.safetensors");
    let x = t.get(&format!("{io}.input"));
    assert_eq!(t.shape(&format!("{io}.input")), shape);
    let mut y = vec![f32::NAN; x.len()];
    layer.forward_eval(x, shape, &mut y).unwrap_or_else(|e| panic!("{io}: forward_eval: {e}"));
    assert_close_shaped(
        &format!("{io}.output ({prefix})"),
        Some(shape),
        &y,
        t.get(&format!("{io}.output")),
        FWD,
    );
}

#[test]
fn pytorch_checkpoint_reproduces_pytorch_inference() {
    let bytes = state_dict_bytes();
    let tensors = SafeTensors::deserialize(&bytes).expect("a safetensors file");
    check_loaded(&mut Bn1::new(), &tensors, "1.", "bn1", &[4, 16, 8, 8]);
    check_loaded(&mut Bn2::new(), &tensors, "4.", "bn2", &[4, 32, 8, 8]);
    check_loaded(&mut Bn3::new(), &tensors, "8.", "bn3", &[4, 24]);
    // The runtime-generic layer loads the same way.
    let mut runtime = BatchNorm::with_config(24, [0], Config::preset(Preset::Pytorch)).unwrap();
    check_loaded(&mut runtime, &tensors, "8.", "bn3", &[4, 24]);
}

#[test]
fn loads_from_a_path_and_from_bytes() {
    let mut from_path = Bn2::new();
    checkpoint::load_state_from_file(
        &mut from_path,
        conformance_dir().join(STATE_DICT),
        "4.",
        Naming::pytorch(),
    )
    .unwrap();
    let mut from_bytes = Bn2::new();
    checkpoint::load_state_from_bytes(&mut from_bytes, &state_dict_bytes(), "4.", Naming::pytorch()).unwrap();
    assert_eq!(full(&from_path), full(&from_bytes));
    assert_eq!(from_path.num_batches_tracked(), 5);

    let missing = conformance_dir().join("no_such_file.safetensors");
    let err =
        checkpoint::load_state_from_file(&mut Bn2::new(), &missing, "4.", Naming::pytorch()).unwrap_err();
    assert!(matches!(&err, BnError::CheckpointFile(m) if m.contains("no_such_file")), "{err}");
}

/// The tensors of a safetensors file: name -> (dtype, shape, bytes).
fn contents(bytes: &[u8]) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let file = SafeTensors::deserialize(bytes).expect("a safetensors file");
    let mut v: Vec<_> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.dtype(), view.shape().to_vec(), view.data().to_vec()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn save_and_reload_round_trip_bit_exactly() {
    let original = state_dict_bytes();
    let tensors = SafeTensors::deserialize(&original).unwrap();
    let mut bn1 = Bn1::new();
    checkpoint::load_state(&mut bn1, &tensors, "1.", Naming::pytorch()).unwrap();

    // The saved file has PyTorch's names, dtypes, shapes and the very bytes it was loaded from.
    let saved = checkpoint::save_state(&bn1, "1.", Naming::pytorch()).unwrap();
    let expected: Vec<_> = contents(&original).into_iter().filter(|t| t.0.starts_with("1.")).collect();
    assert_eq!(contents(&saved), expected);
    let names: Vec<String> = expected.iter().map(|t| t.0.clone()).collect();
    assert_eq!(
        names,
        ["1.bias", "1.num_batches_tracked", "1.running_mean", "1.running_var", "1.weight"].map(String::from)
    );

    // Reloading gives the same state, bit for bit.
    let mut reloaded = Bn1::new();
    checkpoint::load_state_from_bytes(&mut reloaded, &saved, "1.", Naming::pytorch()).unwrap();
    assert_eq!(full(&reloaded), full(&bn1));

    // Through a file, with another prefix.
    let path = scratch("bn1.safetensors");
    checkpoint::save_state_to_file(&bn1, &path, "features.1.", Naming::pytorch()).unwrap();
    let mut from_file = Bn1::new();
    checkpoint::load_state_from_file(&mut from_file, &path, "features.1.", Naming::pytorch()).unwrap();
    assert_eq!(full(&from_file), full(&bn1));
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_whole_model_in_one_file() {
    let original = state_dict_bytes();
    let tensors = SafeTensors::deserialize(&original).unwrap();
    let (mut bn1, mut bn2, mut bn3) = (Bn1::new(), Bn2::new(), Bn3::new());
    checkpoint::load_state(&mut bn1, &tensors, "1.", Naming::pytorch()).unwrap();
    checkpoint::load_state(&mut bn2, &tensors, "4.", Naming::pytorch()).unwrap();
    checkpoint::load_state(&mut bn3, &tensors, "8.", Naming::pytorch()).unwrap();

    // Rebuild the whole state_dict: the convolutions and the linear layer as plain tensors.
    let file = Tensors::load(STATE_DICT);
    let mut dict = StateDict::new();
    for name in ["0.weight", "0.bias", "3.weight", "7.weight", "7.bias"] {
        dict.insert_f32(name, file.shape(name), file.get(name)).unwrap();
    }
    dict.insert_layer(&bn1, "1.", Naming::pytorch()).unwrap();
    dict.insert_layer(&bn2, "4.", Naming::pytorch()).unwrap();
    dict.insert_layer(&bn3, "8.", Naming::pytorch()).unwrap();
    assert_eq!(dict.len(), 20);
    assert_eq!(contents(&dict.to_bytes().unwrap()), contents(&original), "the same file as PyTorch's");

    // A name given twice is an error, and adds nothing.
    let err = dict.insert_layer(&bn3, "8.", Naming::pytorch()).unwrap_err();
    assert!(matches!(&err, BnError::Checkpoint { tensor, .. } if tensor == "8.weight"), "{err}");
    assert_eq!(dict.len(), 20);
    let err = dict.insert_f32("extra", &[2, 2], &[1.0; 3]).unwrap_err();
    assert!(err.to_string().contains("shape [2, 2]"), "{err}");

    let path = scratch("model.safetensors");
    dict.save(&path).unwrap();
    assert_eq!(contents(&std::fs::read(&path).unwrap()), contents(&original));
    let _ = std::fs::remove_file(&path);
}

/// Loading mirrors saving: `StateDict::load` / `from_bytes` read the whole file, and
/// `load_layer` fills each layer by its prefix with the rules of `load_state`.
#[test]
fn a_state_dict_loads_back_what_it_saved() {
    // PyTorch's file, read whole: every tensor, and each layer as load_state loads it.
    let dict = StateDict::load(conformance_dir().join(STATE_DICT)).unwrap();
    assert_eq!(dict.len(), 20);
    assert_eq!(contents(&dict.to_bytes().unwrap()), contents(&state_dict_bytes()));
    assert_eq!(StateDict::from_bytes(&state_dict_bytes()).unwrap(), dict);
    let tensors = SafeTensors::deserialize(&state_dict_bytes()).unwrap().tensors().len();
    assert_eq!(tensors, dict.len());
    let (mut a, mut b) = (Bn1::new(), Bn1::new());
    dict.load_layer(&mut a, "1.", Naming::pytorch()).unwrap();
    checkpoint::load_state_from_bytes(&mut b, &state_dict_bytes(), "1.", Naming::pytorch()).unwrap();
    assert_eq!(full(&a), full(&b));
    assert_eq!(a.num_batches_tracked(), 5);
    let mut bn3 = Bn3::new();
    dict.load_layer(&mut bn3, "8.", Naming::pytorch()).unwrap();
    assert_eq!(bn3.running_var(), Tensors::load(STATE_DICT).get("8.running_var"));

    // Saved and loaded through a file, in Keras's names: the same state, bit for bit.
    let mut out = StateDict::new();
    out.insert_layer(&bn3, "head/bn/", Naming::keras()).unwrap();
    let path = scratch("roundtrip.safetensors");
    out.save(&path).unwrap();
    let back = StateDict::load(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(back, out);
    let mut fresh = Bn3::new();
    back.load_layer(&mut fresh, "head/bn/", Naming::keras()).unwrap();
    assert_eq!(state(&fresh), state(&bn3));

    // Errors are BnError, and leave the layer unchanged.
    let before = full(&fresh);
    let err = back.load_layer(&mut fresh, "head/bn/", Naming::pytorch()).unwrap_err();
    assert!(matches!(&err, BnError::Checkpoint { tensor, .. } if tensor == "head/bn/weight"), "{err}");
    let err = back.load_layer(&mut Bn1::new(), "head/bn/", Naming::keras()).unwrap_err();
    assert!(err.to_string().contains("expected shape [16]"), "{err}");
    assert_eq!(full(&fresh), before);
    let err = StateDict::from_bytes(b"not a safetensors file").unwrap_err();
    assert!(matches!(err, BnError::CheckpointFile(_)), "{err}");
    let err = StateDict::load(conformance_dir().join("no_such_file.safetensors")).unwrap_err();
    assert!(matches!(&err, BnError::CheckpointFile(m) if m.contains("no_such_file")), "{err}");
}

#[test]
fn keras_naming_has_no_counter() {
    let mut layer = Bn3::new();
    checkpoint::load_state_from_bytes(&mut layer, &state_dict_bytes(), "8.", Naming::pytorch()).unwrap();
    let bytes = checkpoint::save_state(&layer, "batch_normalization/", Naming::keras()).unwrap();
    let names: Vec<String> = contents(&bytes).into_iter().map(|t| t.0).collect();
    assert_eq!(
        names,
        ["beta", "gamma", "moving_mean", "moving_variance"].map(|n| format!("batch_normalization/{n}"))
    );
    // Loading keeps the layer's own counter (Keras has none).
    let mut keras = Bn3::new();
    keras.set_num_batches_tracked(7);
    checkpoint::load_state_from_bytes(&mut keras, &bytes, "batch_normalization/", Naming::keras()).unwrap();
    assert_eq!(state(&keras), state(&layer));
    assert_eq!(keras.num_batches_tracked(), 7);
}

#[test]
fn several_feature_axes_save_the_feature_shape_and_load_either() {
    let mut rng = Rng::new(5);
    let mut layer = GridBn::new();
    layer.update_params(&rng.params(15, 0.5, 2.0), &rng.params(15, -1.0, 1.0)).unwrap();
    layer.set_running_stats(&rng.params(15, -1.0, 1.0), &rng.params(15, 0.1, 3.0)).unwrap();
    layer.set_num_batches_tracked(3);
    let bytes = checkpoint::save_state(&layer, "", Naming::pytorch()).unwrap();
    for (name, _, shape, _) in contents(&bytes) {
        let expected: &[usize] = if name == "num_batches_tracked" { &[] } else { &[5, 3] };
        assert_eq!(shape, expected, "{name}");
    }
    let mut back = GridBn::new();
    checkpoint::load_state_from_bytes(&mut back, &bytes, "", Naming::pytorch()).unwrap();
    assert_eq!(full(&back), full(&layer));

    // The flat shape loads too; a transposed one does not.
    let flat = rewrite(&bytes, |name, t| {
        if name != "num_batches_tracked" {
            t.shape = vec![15];
        }
    });
    let mut from_flat = GridBn::new();
    checkpoint::load_state_from_bytes(&mut from_flat, &flat, "", Naming::pytorch()).unwrap();
    assert_eq!(full(&from_flat), full(&layer));
    let transposed = rewrite(&bytes, |name, t| {
        if name == "running_mean" {
            t.shape = vec![3, 5];
        }
    });
    let before = full(&from_flat);
    let err =
        checkpoint::load_state_from_bytes(&mut from_flat, &transposed, "", Naming::pytorch()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "checkpoint tensor `running_mean`: expected shape [5, 3] (the feature extents) or [15] (flat), \
         found shape [3, 5] (15 values)"
    );
    assert_eq!(full(&from_flat), before);
}

#[test]
fn f64_layers_save_f64_and_load_f32_or_f64() {
    let mut rng = Rng::new(9);
    let config = Config::preset(Preset::Pytorch);
    let layout = batchnorm::Layout::from_axes(&[16], &[0, 2, 3]).unwrap();
    let mut wide = BatchNorm::<f64>::with_layout(layout.clone(), config).unwrap();
    wide.update_params(&rng.params(16, 0.5, 2.0), &rng.params(16, -1.0, 1.0)).unwrap();
    wide.set_running_stats(&rng.params(16, -1.0, 1.0), &rng.params(16, 0.1, 3.0)).unwrap();
    let bytes = checkpoint::save_state(&wide, "", Naming::pytorch()).unwrap();
    assert!(contents(&bytes)
        .iter()
        .all(|t| t.1 == if t.0 == "num_batches_tracked" { Dtype::I64 } else { Dtype::F64 }));
    let mut back = BatchNorm::<f64>::with_layout(layout.clone(), config).unwrap();
    checkpoint::load_state_from_bytes(&mut back, &bytes, "", Naming::pytorch()).unwrap();
    assert_eq!(bits(back.running_var()), bits(wide.running_var()));
    assert_eq!(bits(back.gamma()), bits(wide.gamma()));

    // F32 (PyTorch's) into an f64 layer: widened exactly.
    let mut from_torch = BatchNorm::<f64>::with_layout(layout, config).unwrap();
    checkpoint::load_state_from_bytes(&mut from_torch, &state_dict_bytes(), "1.", Naming::pytorch()).unwrap();
    let file = Tensors::load(STATE_DICT);
    let widened: Vec<f64> = file.get("1.running_var").iter().map(|&v| f64::from(v)).collect();
    assert_eq!(from_torch.running_var(), &widened[..]);

    // F64 into an f32 layer would round: rejected.
    let mut narrow = Bn1::new();
    let err = checkpoint::load_state_from_bytes(&mut narrow, &bytes, "", Naming::pytorch()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "checkpoint tensor `weight`: expected dtype F32 (the layer's parameters are f32), found F64"
    );
}

/// An owned tensor, to build altered checkpoints.
#[derive(Clone)]
struct Owned {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Owned {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// `bytes` with every tensor passed through `edit` (which may also clear `data` to drop it).
fn rewrite(bytes: &[u8], mut edit: impl FnMut(&str, &mut Owned)) -> Vec<u8> {
    let mut tensors = Vec::new();
    for (name, dtype, shape, data) in contents(bytes) {
        let mut t = Owned { dtype, shape, data };
        edit(&name, &mut t);
        if t.dtype != Dtype::BOOL {
            tensors.push((name, t));
        }
    }
    safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None).expect("serialize")
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// Loads an altered copy of layer `1.` into a trained layer and checks the error names `tensor`,
/// says `says`, and leaves the layer bit for bit unchanged.
fn rejects(what: &str, tensor: &str, says: &str, edit: impl FnMut(&str, &mut Owned)) {
    let bytes = rewrite(&state_dict_bytes(), edit);
    let mut layer = Bn1::new();
    let mut rng = Rng::new(1);
    let x: Vec<f32> = rng.vec(2 * 16 * 9, -2.0, 2.0);
    let mut y = vec![0.0; x.len()];
    layer.forward_train(&x, &[2, 16, 3, 3], &mut y).unwrap();
    let before = full(&layer);
    let err = checkpoint::load_state_from_bytes(&mut layer, &bytes, "1.", Naming::pytorch())
        .expect_err(&format!("{what}: loading must fail"));
    match &err {
        BnError::Checkpoint { tensor: t, message } => {
            assert_eq!(t, tensor, "{what}: the error names the tensor ({err})");
            assert!(message.contains(says), "{what}: {err:?} does not say {says:?}");
        }
        other => panic!("{what}: expected a checkpoint error, got {other:?}"),
    }
    assert_eq!(full(&layer), before, "{what}: the layer is unchanged");
}

#[test]
fn bad_tensors_are_rejected_by_name_and_leave_the_layer_unchanged() {
    // Every check comes after some valid tensors were read: nothing may be set early.
    rejects("missing", "1.running_var", "missing", |name, t| {
        if name == "1.running_var" {
            t.dtype = Dtype::BOOL; // dropped by `rewrite`
        }
    });
    rejects("missing counter", "1.num_batches_tracked", "missing", |name, t| {
        if name == "1.num_batches_tracked" {
            t.dtype = Dtype::BOOL;
        }
    });
    rejects("wrong dtype", "1.running_mean", "expected dtype F32", |name, t| {
        if name == "1.running_mean" {
            t.dtype = Dtype::I32;
        }
    });
    rejects("half precision", "1.bias", "found F16", |name, t| {
        if name == "1.bias" {
            t.dtype = Dtype::F16;
            t.shape = vec![32];
        }
    });
    rejects("wrong length", "1.running_var", "found shape [15] (15 values)", |name, t| {
        if name == "1.running_var" {
            t.shape = vec![15];
            t.data.truncate(15 * 4);
        }
    });
    rejects("wrong shape", "1.weight", "expected shape [16]", |name, t| {
        if name == "1.weight" {
            t.shape = vec![4, 4];
        }
    });
    rejects("NaN", "1.running_mean", "value [3] = NaN is not finite", |name, t| {
        if name == "1.running_mean" {
            let mut v = f32_values(&t.data);
            v[3] = f32::NAN;
            t.data = f32_bytes(&v);
        }
    });
    rejects("infinity", "1.weight", "value [0] = inf is not finite", |name, t| {
        if name == "1.weight" {
            let mut v = f32_values(&t.data);
            v[0] = f32::INFINITY;
            t.data = f32_bytes(&v);
        }
    });
    rejects("negative variance", "1.running_var", "value [7] = -0.5 is negative", |name, t| {
        if name == "1.running_var" {
            let mut v = f32_values(&t.data);
            v[7] = -0.5;
            t.data = f32_bytes(&v);
        }
    });
    rejects("negative counter", "1.num_batches_tracked", "must be >= 0, found -1", |name, t| {
        if name == "1.num_batches_tracked" {
            t.data = (-1i64).to_le_bytes().to_vec();
        }
    });
    rejects("float counter", "1.num_batches_tracked", "expected an I64 scalar", |name, t| {
        if name == "1.num_batches_tracked" {
            t.dtype = Dtype::F64;
        }
    });
}

#[test]
fn a_learned_bias_does_not_load_into_a_layer_without_one() {
    let mut layer = UncenteredBn::new();
    let before = full(&layer);
    let err = checkpoint::load_state_from_bytes(&mut layer, &state_dict_bytes(), "1.", Naming::pytorch())
        .unwrap_err();
    assert!(
        matches!(&err, BnError::Checkpoint { tensor, message } if tensor == "1.bias" && message.contains("`center = false`")),
        "{err}"
    );
    assert_eq!(full(&layer), before);

    // Saved without a bias (as PyTorch's `affine=False` has none), and loaded back.
    let saved = checkpoint::save_state(&layer, "1.", Naming::pytorch()).unwrap();
    assert!(contents(&saved).iter().all(|t| t.0 != "1.bias"));
    checkpoint::load_state_from_bytes(&mut UncenteredBn::new(), &saved, "1.", Naming::pytorch()).unwrap();
}

#[test]
fn the_error_for_a_wrong_prefix_lists_what_the_file_has() {
    let err = checkpoint::load_state_from_bytes(&mut Bn3::new(), &state_dict_bytes(), "8", Naming::keras())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "checkpoint tensor `8gamma`: missing: the file has no tensor of that name (the layer learns gamma); \
         the file has `8.bias`, `8.num_batches_tracked`, `8.running_mean`, `8.running_var`, `8.weight`"
    );
}

/// A safetensors file written by hand: the header (a JSON object) as given, then `data`.
fn forged(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// Files whose headers claim a huge number of features (over `MAX_FEATURES`, over what any
/// machine holds, or overflowing `usize`), with little or no data: loading them is an error,
/// with nothing of the claimed size allocated, and the layer is unchanged. Into a runtime layer
/// and a generated one, and as a file on disk.
#[test]
fn forged_headers_claiming_huge_feature_counts_are_errors() {
    let over = batchnorm::MAX_FEATURES + 1;
    let shapes = [
        (format!("[{over}]"), 64),
        ("[1099511627776]".to_owned(), 64),
        (format!("[1, {over}]"), 0),
        ("[4294967296, 4294967296, 4294967296]".to_owned(), 64),
        // No values at all, so safetensors accepts the data's length.
        (format!("[{over}, 0]"), 0),
        ("[0, 4611686018427387904, 4611686018427387904]".to_owned(), 0),
    ];
    let dir = scratch("forged");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, (shape, bytes)) in shapes.iter().enumerate() {
        let tensors: Vec<String> = ["weight", "bias", "running_mean", "running_var"]
            .iter()
            .map(|name| format!(r#""{name}":{{"dtype":"F32","shape":{shape},"data_offsets":[0,{bytes}]}}"#))
            .collect();
        let file = forged(&format!("{{{}}}", tensors.join(",")), &vec![0; *bytes]);
        let mut runtime = BatchNorm::with_config(16, [0, 2, 3], Config::preset(Preset::Pytorch)).unwrap();
        let mut generated = Bn1::new();
        let before = (full(&runtime), full(&generated));
        let r = checkpoint::load_state_from_bytes(&mut runtime, &file, "", Naming::pytorch());
        assert!(
            matches!(r, Err(BnError::Checkpoint { .. } | BnError::CheckpointFile(_))),
            "shape {shape}: {r:?}"
        );
        let r = checkpoint::load_state_from_bytes(&mut generated, &file, "", Naming::pytorch());
        assert!(
            matches!(r, Err(BnError::Checkpoint { .. } | BnError::CheckpointFile(_))),
            "shape {shape}: {r:?}"
        );
        let path = dir.join(format!("{i}.safetensors"));
        std::fs::write(&path, &file).unwrap();
        let r = checkpoint::load_state_from_file(&mut runtime, &path, "", Naming::pytorch());
        assert!(r.is_err(), "shape {shape}: {r:?}");
        assert_eq!((full(&runtime), full(&generated)), before, "shape {shape}: the layers are unchanged");
    }
    // A shape the checks of safetensors accept (no values) reaches the layer's own: the error
    // names the tensor and the shape it claims.
    let file =
        forged(&format!(r#"{{"weight":{{"dtype":"F32","shape":[{over},0],"data_offsets":[0,0]}}}}"#), &[]);
    let err = checkpoint::load_state_from_bytes(&mut Bn1::new(), &file, "", Naming::pytorch()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "checkpoint tensor `weight`: expected shape [16] (one value per feature), found shape [{over}, 0] \
             (0 values)"
        )
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ------------------------------------------------------------------------------------------------
// Cumulative moving average
// ------------------------------------------------------------------------------------------------

/// Per-feature mean and biased variance of an (N, C, L) batch, in f64.
fn batch_stats(x: &[f32], shape: [usize; 3]) -> (Vec<f64>, Vec<f64>) {
    let [n, c, l] = shape;
    let mut mean = vec![0.0; c];
    let mut var = vec![0.0; c];
    for ch in 0..c {
        let values: Vec<f64> = (0..n)
            .flat_map(|i| (0..l).map(move |j| (i, j)))
            .map(|(i, j)| f64::from(x[(i * c + ch) * l + j]))
            .collect();
        let m = values.iter().sum::<f64>() / values.len() as f64;
        mean[ch] = m;
        var[ch] = values.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / values.len() as f64;
    }
    (mean, var)
}

/// Trains `layer` on `batches`.
fn train<L: BatchNormLayer<Elem = f32>>(layer: &mut L, batches: &[Vec<f32>], shape: [usize; 3]) {
    for x in batches {
        let mut y = vec![0.0; x.len()];
        layer.forward_train(x, &shape, &mut y).unwrap();
    }
}

/// Per batch, its mean and unbiased variance (PyTorch's running variance takes the unbiased one).
fn statistics(batches: &[Vec<f32>], shape: [usize; 3]) -> Vec<(Vec<f64>, Vec<f64>)> {
    let count = (shape[0] * shape[2]) as f64;
    batches
        .iter()
        .map(|x| {
            let (mean, var) = batch_stats(x, shape);
            (mean, var.iter().map(|v| v * count / (count - 1.0)).collect())
        })
        .collect()
}

/// The plain average of the first `k` batch statistics.
fn average(stats: &[(Vec<f64>, Vec<f64>)], k: usize) -> (Vec<f64>, Vec<f64>) {
    let c = stats[0].0.len();
    let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
    for (batch_mean, batch_var) in &stats[..k] {
        for ch in 0..c {
            mean[ch] += batch_mean[ch] / k as f64;
            var[ch] += batch_var[ch] / k as f64;
        }
    }
    (mean, var)
}

fn assert_running<L: BatchNormLayer<Param = f32>>(what: &str, layer: &L, expected: &(Vec<f64>, Vec<f64>)) {
    assert_close_shaped(&format!("{what}: running_mean"), None, layer.running_mean(), &expected.0, FWD);
    assert_close_shaped(&format!("{what}: running_var"), None, layer.running_var(), &expected.1, FWD);
}

fn batches(seed: u64, count: usize, shape: [usize; 3]) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    let n = shape.iter().product();
    // Batches with different means, so that an exponential average would differ clearly.
    (0..count).map(|k| rng.vec(n, -1.0 + k as f64, 2.0 + 2.0 * k as f64)).collect()
}

#[test]
fn cumulative_momentum_averages_the_batch_statistics() {
    let shape = [4, 6, 5];
    let data = batches(21, 6, shape);
    let mut macro_layer = CumulativeBn::new();
    assert!(macro_layer.config().get_cumulative_momentum());
    assert_eq!(*macro_layer.config(), Config::preset(Preset::Pytorch).cumulative_momentum());
    let config = Config::preset(Preset::Pytorch).cumulative_momentum();
    let mut runtime = BatchNorm::with_config(6, [0, 2], config).unwrap();
    assert_eq!(runtime.config().get_running_var(), RunningVar::Unbiased);

    let stats = statistics(&data, shape);
    for k in 1..=data.len() {
        train(&mut macro_layer, &data[k - 1..k], shape);
        train(&mut runtime, &data[k - 1..k], shape);
        let expected = average(&stats, k);
        assert_running(&format!("macro layer after {k} batches"), &macro_layer, &expected);
        assert_running(&format!("runtime layer after {k} batches"), &runtime, &expected);
        assert_eq!(macro_layer.num_batches_tracked(), k as u64);
        assert_eq!(state(&macro_layer), state(&runtime), "the same kernels give the same bits");
    }

    // An exponential average (the preset's momentum 0.9) is far from it: the test can tell.
    let mut exponential = BatchNorm::with_config(6, [0, 2], Config::preset(Preset::Pytorch)).unwrap();
    train(&mut exponential, &data, shape);
    let mean = average(&stats, data.len()).0;
    assert!(exponential.running_mean().iter().zip(&mean).any(|(&r, &m)| (f64::from(r) - m).abs() > 0.5));
}

#[test]
fn cumulative_average_continues_across_a_checkpoint() {
    let shape = [4, 6, 5];
    let data = batches(33, 7, shape);
    let stats = statistics(&data, shape);

    // Train on 3 batches, save, load into a fresh layer, train on the other 4.
    let mut first = CumulativeBn::new();
    train(&mut first, &data[..3], shape);
    let bytes = checkpoint::save_state(&first, "bn.", Naming::pytorch()).unwrap();
    let mut resumed = CumulativeBn::new();
    checkpoint::load_state_from_bytes(&mut resumed, &bytes, "bn.", Naming::pytorch()).unwrap();
    assert_eq!(resumed.num_batches_tracked(), 3);
    train(&mut resumed, &data[3..], shape);
    assert_eq!(resumed.num_batches_tracked(), 7);
    assert_running("resumed after 3 + 4 batches", &resumed, &average(&stats, 7));

    // Without the counter (Keras's naming) batch 4 would count as the first: not the average.
    let mut forgetful = CumulativeBn::new();
    checkpoint::load_state_from_bytes(
        &mut forgetful,
        &checkpoint::save_state(&first, "", Naming::keras()).unwrap(),
        "",
        Naming::keras(),
    )
    .unwrap();
    train(&mut forgetful, &data[3..], shape);
    assert_running("without the counter: the average of the last 4", &forgetful, &average(&stats[3..], 4));
}
