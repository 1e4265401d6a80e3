//! Loading and saving a layer's state in [safetensors] files, in PyTorch's `state_dict` naming,
//! Keras's, or names of your own.
//!
//! A layer's state is five tensors, each named `PREFIX` + the name its [`Naming`] gives:
//!
//! | state | [`Naming::pytorch`] | [`Naming::keras`] | dtype, shape |
//! |---|---|---|---|
//! | gamma | `weight` | `gamma` | the layer's parameter type, the feature extents |
//! | beta | `bias` | `beta` | likewise |
//! | running mean | `running_mean` | `moving_mean` | likewise |
//! | running variance | `running_var` | `moving_variance` | likewise |
//! | training batches seen | `num_batches_tracked` | (none) | `I64`, shape `[]` |
//!
//! So a `torch.nn.BatchNorm2d` saved with `safetensors.torch.save_file(model.state_dict(), ..)`
//! loads with the prefix of its module (`"1."` for the second module of a `Sequential`), and the
//! files this module writes load back into PyTorch with `load_state_dict`.
//!
//! # Loading
//!
//! [`load_state`] reads one layer from a parsed file (call it once per layer to load a whole
//! model from one file); [`load_state_from_bytes`] and [`load_state_from_file`] parse first.
//! Loading checks every tensor before it sets anything, and an error names the tensor, what was
//! expected and what was found ([`BnError::Checkpoint`]); after an error the layer is bit for bit
//! unchanged. The rules:
//!
//! - **dtype**: `F32` into `f32` layers; `F64` or `F32` (widened exactly) into `f64` layers. Other
//!   dtypes are rejected (an `F64` tensor is not rounded into an `f32` layer).
//! - **shape**: the feature extents (`[55, 55]`) or the flat feature count (`[3025]`). The values
//!   are allocated (fallibly) only once the shape is the layer's, so a header that claims a huge
//!   tensor is an error, not an allocation of its size.
//! - **values**: finite, and variances `>= 0`; with `scale = false` a stored gamma must be all 1,
//!   with `center = false` a stored beta all 0 (so a checkpoint with a learned beta does not load
//!   silently into a layer that would ignore it).
//! - **which tensors**: gamma unless `scale = false`, beta unless `center = false`, and the running
//!   statistics and the counter unless `track_running_stats = false` (PyTorch's `affine=False` and
//!   `track_running_stats=False` modules store none of them); the optional ones are loaded when
//!   present. With a [`Naming`] that has no counter (Keras) the counter is neither read nor
//!   written, and the layer keeps its own.
//! - Other tensors of the file are ignored: a file holds a whole model.
//!
//! # Saving
//!
//! [`save_state`] and [`save_state_to_file`] write one layer; a [`StateDict`] collects several
//! layers (and other tensors, such as convolution weights) into one file. A tensor is written
//! exactly when loading would require it, with the layer's parameter dtype and feature extents,
//! so saving and loading round-trips bit for bit.
//!
//! ```
//! use batchnorm::checkpoint::{self, Naming, StateDict};
//! use batchnorm::{BatchNorm, Config, Preset};
//!
//! // Train a PyTorch-like layer on one batch ...
//! let config = Config::preset(Preset::Pytorch);
//! let mut trained = BatchNorm::with_config(3, [0], config)?;
//! let x: Vec<f32> = (0..12).map(|i| (i * i % 7) as f32).collect();
//! let mut y = vec![0.0; 12];
//! trained.forward_train(&x, &[4, 3], &mut y)?;
//!
//! // ... save it in PyTorch's naming, under the prefix "bn." ...
//! let bytes = checkpoint::save_state(&trained, "bn.", Naming::pytorch())?;
//! let file = checkpoint::safetensors::SafeTensors::deserialize(&bytes).unwrap();
//! assert_eq!(file.names().len(), 5);
//! assert_eq!(file.tensor("bn.num_batches_tracked").unwrap().shape(), &[] as &[usize]);
//!
//! // ... and load it into a fresh layer: the same state, bit for bit.
//! let mut loaded = BatchNorm::with_config(3, [0], config)?;
//! checkpoint::load_state(&mut loaded, &file, "bn.", Naming::pytorch())?;
//! assert_eq!(loaded.running_mean(), trained.running_mean());
//! assert_eq!(loaded.running_var(), trained.running_var());
//! assert_eq!(loaded.num_batches_tracked(), 1);
//!
//! // Several layers in one file, here in Keras's naming.
//! let mut dict = StateDict::new();
//! dict.insert_layer(&trained, "block1/bn/", Naming::keras())?;
//! dict.insert_layer(&loaded, "block2/bn/", Naming::keras())?;
//! assert!(dict.contains("block2/bn/moving_variance"));
//! let bytes = dict.to_bytes()?;
//! checkpoint::load_state_from_bytes(&mut loaded, &bytes, "block1/bn/", Naming::keras())?;
//!
//! // A wrong tensor is an error that names it; the layer is unchanged.
//! let bytes = checkpoint::save_state(&BatchNorm::new(4, [0])?, "", Naming::pytorch())?;
//! let err = checkpoint::load_state_from_bytes(&mut loaded, &bytes, "", Naming::pytorch()).unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "checkpoint tensor `weight`: expected shape [3] (one value per feature), found shape [4] (4 values)"
//! );
//! assert_eq!(loaded.running_var(), trained.running_var());
//! # Ok::<(), batchnorm::BnError>(())
//! ```

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

/// The `safetensors` crate this module reads and writes with (for [`SafeTensors`] and
/// [`Dtype`]).
pub use safetensors;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors, View};

use crate::alloc::{try_to_vec, try_vec_with_capacity};
use crate::{BatchNormLayer, BnError, Param};

/// The names of a layer's tensors in a checkpoint, after the prefix: a convention such as
/// PyTorch's `state_dict` ([`Naming::pytorch`]) or Keras's ([`Naming::keras`]), or your own.
///
/// ```
/// use batchnorm::checkpoint::Naming;
///
/// assert_eq!(Naming::pytorch().running_var(), "running_var");
/// assert_eq!(Naming::keras().num_batches_tracked(), None);
/// // Flax's `BatchNorm`: params `scale`, `bias`; batch_stats `mean`, `var`.
/// let flax = Naming::new("scale", "bias", "mean", "var");
/// // PyTorch's names, but without the counter (checkpoints from before PyTorch 0.4.1).
/// let old_torch = Naming::pytorch().with_num_batches_tracked(None);
/// # let _ = (flax, old_torch);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Naming<'a> {
    weight: &'a str,
    bias: &'a str,
    running_mean: &'a str,
    running_var: &'a str,
    num_batches_tracked: Option<&'a str>,
}

impl Naming<'static> {
    /// PyTorch's `state_dict` of `BatchNorm*d`: `weight`, `bias`, `running_mean`, `running_var`
    /// and `num_batches_tracked` (int64, shape `[]`).
    pub const fn pytorch() -> Naming<'static> {
        Naming {
            weight: "weight",
            bias: "bias",
            running_mean: "running_mean",
            running_var: "running_var",
            num_batches_tracked: Some("num_batches_tracked"),
        }
    }

    /// Keras's `BatchNormalization`: `gamma`, `beta`, `moving_mean`, `moving_variance`, and no
    /// counter (none is read or written).
    pub const fn keras() -> Naming<'static> {
        Naming {
            weight: "gamma",
            bias: "beta",
            running_mean: "moving_mean",
            running_var: "moving_variance",
            num_batches_tracked: None,
        }
    }
}

impl<'a> Naming<'a> {
    /// A naming of your own for gamma, beta, the running mean and the running variance, without a
    /// counter (add one with [`with_num_batches_tracked`](Self::with_num_batches_tracked)).
    pub const fn new(weight: &'a str, bias: &'a str, running_mean: &'a str, running_var: &'a str) -> Self {
        Naming { weight, bias, running_mean, running_var, num_batches_tracked: None }
    }

    /// The same naming with another name for the counter of training batches (an int64 scalar),
    /// or none (`None`: the counter is neither read nor written).
    pub const fn with_num_batches_tracked(mut self, name: Option<&'a str>) -> Self {
        self.num_batches_tracked = name;
        self
    }

    /// The name of gamma.
    pub const fn weight(&self) -> &'a str {
        self.weight
    }

    /// The name of beta.
    pub const fn bias(&self) -> &'a str {
        self.bias
    }

    /// The name of the running mean.
    pub const fn running_mean(&self) -> &'a str {
        self.running_mean
    }

    /// The name of the running variance.
    pub const fn running_var(&self) -> &'a str {
        self.running_var
    }

    /// The name of the counter of training batches, if the convention has one.
    pub const fn num_batches_tracked(&self) -> Option<&'a str> {
        self.num_batches_tracked
    }
}

// ------------------------------------------------------------------------------------------------
// Loading
// ------------------------------------------------------------------------------------------------

/// Loads a layer's state from a parsed safetensors file: the tensors named `prefix` + the names
/// of `naming` (see the [module docs](self) for the rules).
///
/// # Errors
///
/// [`BnError::Checkpoint`], naming the tensor, when a tensor the layer needs is missing or one has
/// a dtype, shape or value the layer cannot take. Nothing is set unless everything loads.
pub fn load_state<L: BatchNormLayer + ?Sized>(
    layer: &mut L,
    tensors: &SafeTensors<'_>,
    prefix: &str,
    naming: Naming<'_>,
) -> Result<(), BnError> {
    let state = read_state(layer, tensors, prefix, naming)?;
    apply(layer, state)
}

/// Parses `bytes` (a whole safetensors file) and loads a layer's state from it, as
/// [`load_state`].
///
/// # Errors
///
/// [`BnError::CheckpointFile`] when `bytes` is not a safetensors file, else as [`load_state`].
pub fn load_state_from_bytes<L: BatchNormLayer + ?Sized>(
    layer: &mut L,
    bytes: &[u8],
    prefix: &str,
    naming: Naming<'_>,
) -> Result<(), BnError> {
    let tensors = parse(bytes, "the bytes")?;
    load_state(layer, &tensors, prefix, naming)
}

/// Reads and parses the safetensors file at `path` and loads a layer's state from it, as
/// [`load_state`]. To load several layers from one file, read it once and call [`load_state`]
/// for each.
///
/// # Errors
///
/// [`BnError::CheckpointFile`] when the file cannot be read or is not a safetensors file, else
/// as [`load_state`].
pub fn load_state_from_file<L: BatchNormLayer + ?Sized>(
    layer: &mut L,
    path: impl AsRef<Path>,
    prefix: &str,
    naming: Naming<'_>,
) -> Result<(), BnError> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    let tensors = parse(&bytes, &path.display().to_string())?;
    load_state(layer, &tensors, prefix, naming)
}

/// The whole file at `path`, its buffer allocated fallibly (a file is as large as it likes).
fn read_file(path: &Path) -> Result<Vec<u8>, BnError> {
    use std::io::Read;
    let cannot = |e: std::io::Error| BnError::CheckpointFile(format!("cannot read {}: {e}", path.display()));
    let mut file = std::fs::File::open(path).map_err(cannot)?;
    let len = file.metadata().map_err(cannot)?.len();
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    let mut bytes = try_vec_with_capacity(len, "the file's bytes")
        .map_err(|e| BnError::CheckpointFile(format!("cannot read {}: {e}", path.display())))?;
    file.read_to_end(&mut bytes).map_err(cannot)?;
    Ok(bytes)
}

fn parse<'a>(bytes: &'a [u8], what: &str) -> Result<SafeTensors<'a>, BnError> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| BnError::CheckpointFile(format!("{what} are not a valid safetensors file: {e}")))
}

/// What [`read_state`] found and checked, ready to be set.
struct Loaded<P> {
    gamma: Option<Vec<P>>,
    beta: Option<Vec<P>>,
    /// Mean and variance, with the variance's name (for an error of `set_running_stats`).
    stats: Option<(Vec<P>, Vec<P>, String)>,
    num_batches_tracked: Option<u64>,
    /// The names of gamma and beta, for an error of `update_params`.
    param_names: (String, String),
}

/// Named tensors a layer's state is read from: a parsed file or a [`StateDict`].
trait Tensors {
    /// The tensor of that name.
    fn view(&self, name: &str) -> Option<TensorView<'_>>;
    /// Every tensor's name.
    fn tensor_names(&self) -> Vec<&str>;
}

impl Tensors for SafeTensors<'_> {
    fn view(&self, name: &str) -> Option<TensorView<'_>> {
        self.tensor(name).ok()
    }
    fn tensor_names(&self) -> Vec<&str> {
        self.names()
    }
}

impl Tensors for StateDict {
    fn view(&self, name: &str) -> Option<TensorView<'_>> {
        // A dictionary's tensors were checked when they were inserted or parsed.
        let t = self.tensors.get(name)?;
        TensorView::new(t.dtype, t.shape.clone(), &t.data).ok()
    }
    fn tensor_names(&self) -> Vec<&str> {
        self.names().collect()
    }
}

/// Finds and checks every tensor of the layer's state without touching the layer.
fn read_state<L: BatchNormLayer + ?Sized, T: Tensors + ?Sized>(
    layer: &L,
    tensors: &T,
    prefix: &str,
    naming: Naming<'_>,
) -> Result<Loaded<L::Param>, BnError> {
    let config = *layer.config();
    let expected = Expected::of(layer);
    let name = |n: &str| format!("{prefix}{n}");
    let find = |full: &str, required: bool, why: &str| -> Result<Option<TensorView<'_>>, BnError> {
        match tensors.view(full) {
            Some(view) => Ok(Some(view)),
            None if !required => Ok(None),
            None => Err(checkpoint_error(
                full,
                format!(
                    "missing: the file has no tensor of that name ({why}){}",
                    similar_names(tensors, prefix)
                ),
            )),
        }
    };

    let (weight, bias) = (name(naming.weight), name(naming.bias));
    let gamma = find(&weight, config.get_scale(), "the layer learns gamma")?
        .map(|view| {
            let values = expected.values::<L::Param>(&weight, &view)?;
            if !config.get_scale() {
                check_fixed(&weight, &values, 1.0, "scale")?;
            }
            Ok::<_, BnError>(values)
        })
        .transpose()?;
    let beta = find(&bias, config.get_center(), "the layer learns beta")?
        .map(|view| {
            let values = expected.values::<L::Param>(&bias, &view)?;
            if !config.get_center() {
                check_fixed(&bias, &values, 0.0, "center")?;
            }
            Ok::<_, BnError>(values)
        })
        .transpose()?;

    let track = config.get_track_running_stats();
    let (mean_name, var_name) = (name(naming.running_mean), name(naming.running_var));
    let mean_view = find(&mean_name, track, "the layer tracks running statistics")?;
    // Without tracking, both statistics are optional, but one without the other is a mistake.
    let var_view = find(&var_name, track || mean_view.is_some(), "the file has the running mean")?;
    let mean_view = match (&mean_view, &var_view) {
        (None, Some(_)) => find(&mean_name, true, "the file has the running variance")?,
        _ => mean_view,
    };
    let stats = match (mean_view, var_view) {
        (Some(mean_view), Some(var_view)) => {
            let mean = expected.values::<L::Param>(&mean_name, &mean_view)?;
            let var = expected.values::<L::Param>(&var_name, &var_view)?;
            if let Some((index, v)) = var.iter().enumerate().find(|(_, v)| v.to_f64() < 0.0) {
                return Err(checkpoint_error(
                    &var_name,
                    format!("value [{index}] = {} is negative (variances must be >= 0)", v.to_f64()),
                ));
            }
            Some((mean, var, var_name))
        }
        _ => None,
    };

    let num_batches_tracked = match naming.num_batches_tracked {
        Some(counter) => {
            let full = name(counter);
            find(&full, track, "the layer tracks running statistics")?
                .map(|view| read_counter(&full, &view))
                .transpose()?
        }
        None => None,
    };
    Ok(Loaded { gamma, beta, stats, num_batches_tracked, param_names: (weight, bias) })
}

/// Sets what [`read_state`] checked. The setters cannot fail on checked values; if one does
/// anyway, what was set is restored, so the layer is unchanged after an error.
fn apply<L: BatchNormLayer + ?Sized>(layer: &mut L, state: Loaded<L::Param>) -> Result<(), BnError> {
    let copy = |values: &[L::Param], name: &str| {
        try_to_vec(values, "a copy of the layer's value").map_err(|e| checkpoint_error(name, e.to_string()))
    };
    let old_params = (copy(layer.gamma(), &state.param_names.0)?, copy(layer.beta(), &state.param_names.1)?);
    if state.gamma.is_some() || state.beta.is_some() {
        let gamma = state.gamma.as_deref().unwrap_or(&old_params.0);
        let beta = state.beta.as_deref().unwrap_or(&old_params.1);
        if let Err(e) = layer.update_params(gamma, beta) {
            let name = if matches!(&e, BnError::FixedParameter { name: "beta", .. }) {
                &state.param_names.1
            } else {
                &state.param_names.0
            };
            return Err(checkpoint_error(name, e.to_string()));
        }
    }
    if let Some((mean, var, var_name)) = &state.stats {
        if let Err(e) = layer.set_running_stats(mean, var) {
            // Restore the parameters set above (they were valid, so this succeeds).
            let _ = layer.update_params(&old_params.0, &old_params.1);
            return Err(checkpoint_error(var_name, e.to_string()));
        }
    }
    if let Some(batches) = state.num_batches_tracked {
        layer.set_num_batches_tracked(batches);
    }
    Ok(())
}

/// The dtype and shapes a layer's per-feature tensors may have.
struct Expected {
    features: Vec<usize>,
    channels: usize,
}

impl Expected {
    fn of<L: BatchNormLayer + ?Sized>(layer: &L) -> Expected {
        Expected { features: layer.layout().features().to_vec(), channels: layer.features() }
    }

    /// The shapes a per-feature tensor may have, for messages: `[16]` or `[5, 3] or [15]`.
    fn describe(&self) -> String {
        if self.features.len() == 1 {
            format!("{:?} (one value per feature)", self.features)
        } else {
            format!("{:?} (the feature extents) or [{}] (flat)", self.features, self.channels)
        }
    }

    /// Checks a per-feature tensor's dtype, shape and values, and converts it.
    fn values<P: Param>(&self, name: &str, view: &TensorView<'_>) -> Result<Vec<P>, BnError> {
        let dtype = view.dtype();
        let width = match dtype {
            Dtype::F32 => 4,
            Dtype::F64 if param_is_f64::<P>() => 8,
            _ => {
                let allowed = if param_is_f64::<P>() {
                    "F64 or F32 (the layer's parameters are f64)"
                } else {
                    "F32 (the layer's parameters are f32)"
                };
                return Err(checkpoint_error(name, format!("expected dtype {allowed}, found {dtype:?}")));
            }
        };
        let shape = view.shape();
        if shape != self.features.as_slice() && shape != [self.channels] {
            let count = shape.iter().try_fold(1usize, |acc, &e| acc.checked_mul(e));
            let count = count.map_or_else(|| "too many".to_owned(), |n| n.to_string());
            return Err(checkpoint_error(
                name,
                format!("expected shape {}, found shape {shape:?} ({count} values)", self.describe()),
            ));
        }
        if view.data().len() != self.channels.saturating_mul(width) {
            // safetensors checks that the data fits the shape; this is defence in depth, and the
            // values are allocated only once their count is known to be the layer's.
            return Err(checkpoint_error(
                name,
                format!("expected {} values, found {} bytes of {dtype:?}", self.channels, view.data().len()),
            ));
        }
        let mut values: Vec<P> = try_vec_with_capacity(self.channels, "the values")
            .map_err(|e| checkpoint_error(name, e.to_string()))?;
        values.extend(view.data().chunks_exact(width).map(|b| match b {
            &[b0, b1, b2, b3] => P::from_f64(f64::from(f32::from_le_bytes([b0, b1, b2, b3]))),
            _ => P::from_f64(f64::from_le_bytes(b.try_into().unwrap_or([0; 8]))),
        }));
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(checkpoint_error(
                name,
                format!(
                    "value [{index}] = {} is not finite (only finite values are allowed)",
                    values[index].to_f64()
                ),
            ));
        }
        Ok(values)
    }
}

/// Whether the parameter type is `f64` (`Param` is sealed: `f32` or `f64`).
fn param_is_f64<P: Param>() -> bool {
    core::mem::size_of::<P>() == 8
}

fn check_fixed<P: Param>(name: &str, values: &[P], fixed: f64, option: &str) -> Result<(), BnError> {
    match values.iter().position(|v| v.to_f64() != fixed) {
        Some(index) => Err(checkpoint_error(
            name,
            format!(
                "value [{index}] = {} but the layer has `{option} = false`, which fixes it at {fixed}",
                values[index].to_f64()
            ),
        )),
        None => Ok(()),
    }
}

/// The counter: an int64 scalar (shape `[]`, or `[1]`), not negative.
fn read_counter(name: &str, view: &TensorView<'_>) -> Result<u64, BnError> {
    let shape = view.shape();
    let data = view.data();
    let value = match (view.dtype(), data) {
        (Dtype::I64, &[b0, b1, b2, b3, b4, b5, b6, b7]) if shape.is_empty() || shape == [1] => {
            i64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7])
        }
        (dtype, _) => {
            return Err(checkpoint_error(
                name,
                format!("expected an I64 scalar (shape []), found {dtype:?} of shape {shape:?}"),
            ));
        }
    };
    u64::try_from(value)
        .map_err(|_| checkpoint_error(name, format!("the number of batches must be >= 0, found {value}")))
}

fn checkpoint_error(tensor: &str, message: impl Into<String>) -> BnError {
    BnError::Checkpoint { tensor: tensor.to_owned(), message: message.into() }
}

/// For a missing tensor: the names under the prefix, which show a wrong prefix or naming.
fn similar_names<T: Tensors + ?Sized>(tensors: &T, prefix: &str) -> String {
    let mut names: Vec<&str> = tensors.tensor_names().into_iter().filter(|n| n.starts_with(prefix)).collect();
    if names.is_empty() {
        return format!("; no tensor name starts with `{prefix}`");
    }
    names.sort_unstable();
    let shown: Vec<String> = names.iter().take(8).map(|n| format!("`{n}`")).collect();
    let more = if names.len() > shown.len() { ", ..." } else { "" };
    format!("; the file has {}{more}", shown.join(", "))
}

// ------------------------------------------------------------------------------------------------
// Saving
// ------------------------------------------------------------------------------------------------

/// One tensor to write.
#[derive(Debug, Clone, PartialEq)]
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

/// Named tensors of one safetensors file: the state of one or several layers, and other tensors
/// of the model if you like. Saving and loading mirror each other: layers go in with
/// [`insert_layer`](Self::insert_layer) and come out with [`load_layer`](Self::load_layer), each
/// under its prefix; the file is written with [`to_bytes`](Self::to_bytes) /
/// [`save`](Self::save) and read with [`from_bytes`](Self::from_bytes) / [`load`](Self::load).
///
/// ```
/// use batchnorm::checkpoint::{Naming, StateDict};
/// use batchnorm::BatchNorm;
///
/// let (bn1, bn2) = (BatchNorm::new(16, [0, 2, 3])?, BatchNorm::new(24, [0])?);
/// let mut dict = StateDict::new();
/// dict.insert_f32("0.weight", &[16, 3, 3, 3], &vec![0.1; 16 * 27])?;
/// dict.insert_layer(&bn1, "1.", Naming::pytorch())?;
/// dict.insert_layer(&bn2, "8.", Naming::pytorch())?;
/// assert_eq!(dict.len(), 11);
/// let bytes = dict.to_bytes()?;
///
/// // Back: the same tensors, and each layer by its prefix.
/// let loaded = StateDict::from_bytes(&bytes)?;
/// assert_eq!(loaded, dict);
/// let mut bn = BatchNorm::new(24, [0])?;
/// loaded.load_layer(&mut bn, "8.", Naming::pytorch())?;
/// // A wrong prefix is an error that shows the names there are; the layer is unchanged.
/// let err = loaded.load_layer(&mut bn, "9.", Naming::pytorch()).unwrap_err();
/// assert!(err.to_string().contains("no tensor name starts with `9.`"), "{err}");
/// # Ok::<(), batchnorm::BnError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateDict {
    tensors: BTreeMap<String, Tensor>,
}

impl StateDict {
    /// An empty dictionary.
    pub fn new() -> StateDict {
        StateDict::default()
    }

    /// Adds a layer's state under `prefix`: every tensor loading would require (see the
    /// [module docs](self)), with the layer's parameter dtype and its feature extents.
    ///
    /// # Errors
    ///
    /// [`BnError::Checkpoint`] when a name is already in the dictionary or a tensor's bytes
    /// cannot be allocated (nothing is added then).
    pub fn insert_layer<L: BatchNormLayer + ?Sized>(
        &mut self,
        layer: &L,
        prefix: &str,
        naming: Naming<'_>,
    ) -> Result<(), BnError> {
        let config = layer.config();
        let shape = layer.layout().features().to_vec();
        let mut new: Vec<(String, Tensor)> = Vec::with_capacity(5);
        let mut add = |name: &str, values: &[L::Param]| -> Result<(), BnError> {
            let name = format!("{prefix}{name}");
            let tensor = param_tensor(&name, shape.clone(), values)?;
            new.push((name, tensor));
            Ok(())
        };
        if config.get_scale() {
            add(naming.weight, layer.gamma())?;
        }
        if config.get_center() {
            add(naming.bias, layer.beta())?;
        }
        if config.get_track_running_stats() {
            add(naming.running_mean, layer.running_mean())?;
            add(naming.running_var, layer.running_var())?;
            if let Some(counter) = naming.num_batches_tracked {
                let name = format!("{prefix}{counter}");
                let batches = layer.num_batches_tracked();
                let value = i64::try_from(batches).map_err(|_| {
                    checkpoint_error(&name, format!("{batches} batches do not fit in an I64 tensor"))
                })?;
                new.push((
                    name,
                    Tensor { dtype: Dtype::I64, shape: Vec::new(), data: value.to_le_bytes().to_vec() },
                ));
            }
        }
        for (i, (name, _)) in new.iter().enumerate() {
            if self.tensors.contains_key(name) {
                return Err(checkpoint_error(name, "the dictionary already has a tensor of that name"));
            }
            if new[..i].iter().any(|(n, _)| n == name) {
                return Err(checkpoint_error(name, "the naming gives two of the layer's tensors this name"));
            }
        }
        self.tensors.extend(new);
        Ok(())
    }

    /// Adds an `F32` tensor of `shape` (row-major `values`), e.g. a convolution's weights.
    ///
    /// # Errors
    ///
    /// [`BnError::Checkpoint`] when the name is already in the dictionary, `values` does not
    /// hold the product of `shape` values, or the tensor's bytes cannot be allocated.
    pub fn insert_f32(&mut self, name: &str, shape: &[usize], values: &[f32]) -> Result<(), BnError> {
        self.insert_values(name, shape, values)
    }

    /// Adds an `F64` tensor of `shape` (row-major `values`).
    ///
    /// # Errors
    ///
    /// As [`insert_f32`](Self::insert_f32).
    pub fn insert_f64(&mut self, name: &str, shape: &[usize], values: &[f64]) -> Result<(), BnError> {
        self.insert_values(name, shape, values)
    }

    fn insert_values<P: Param>(&mut self, name: &str, shape: &[usize], values: &[P]) -> Result<(), BnError> {
        if self.tensors.contains_key(name) {
            return Err(checkpoint_error(name, "the dictionary already has a tensor of that name"));
        }
        let count = shape.iter().try_fold(1usize, |acc, &e| acc.checked_mul(e));
        if count != Some(values.len()) {
            return Err(checkpoint_error(
                name,
                format!("shape {shape:?} does not describe the {} values given", values.len()),
            ));
        }
        self.tensors.insert(name.to_owned(), param_tensor(name, shape.to_vec(), values)?);
        Ok(())
    }

    /// Parses a safetensors file (`bytes`) into a dictionary of all its tensors.
    ///
    /// # Errors
    ///
    /// [`BnError::CheckpointFile`] when `bytes` is not a safetensors file or its tensors cannot
    /// be allocated.
    pub fn from_bytes(bytes: &[u8]) -> Result<StateDict, BnError> {
        Self::parsed(bytes, "the bytes")
    }

    /// Reads the safetensors file at `path` into a dictionary of all its tensors.
    ///
    /// # Errors
    ///
    /// [`BnError::CheckpointFile`] when the file cannot be read, is not a safetensors file, or
    /// its contents cannot be allocated.
    pub fn load(path: impl AsRef<Path>) -> Result<StateDict, BnError> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        Self::parsed(&bytes, &path.display().to_string())
    }

    fn parsed(bytes: &[u8], what: &str) -> Result<StateDict, BnError> {
        let file = parse(bytes, what)?;
        let mut tensors = BTreeMap::new();
        for (name, view) in file.tensors() {
            let data = try_to_vec(view.data(), "a tensor's bytes")
                .map_err(|e| BnError::CheckpointFile(format!("{what}: tensor `{name}`: {e}")))?;
            tensors.insert(name, Tensor { dtype: view.dtype(), shape: view.shape().to_vec(), data });
        }
        Ok(StateDict { tensors })
    }

    /// Loads a layer's state from the tensors under `prefix`, as [`load_state`] does from a
    /// parsed file (the same rules; see the [module docs](self)).
    ///
    /// # Errors
    ///
    /// [`BnError::Checkpoint`], naming the tensor, when a tensor the layer needs is missing or
    /// has a dtype, shape or value the layer cannot take. Nothing is set unless everything
    /// loads.
    pub fn load_layer<L: BatchNormLayer + ?Sized>(
        &self,
        layer: &mut L,
        prefix: &str,
        naming: Naming<'_>,
    ) -> Result<(), BnError> {
        let state = read_state(layer, self, prefix, naming)?;
        apply(layer, state)
    }

    /// The names of the tensors, in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Whether a tensor of that name is in the dictionary.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the dictionary has no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The safetensors file, as bytes.
    ///
    /// # Errors
    ///
    /// [`BnError::CheckpointFile`] if safetensors cannot serialize the tensors.
    pub fn to_bytes(&self) -> Result<Vec<u8>, BnError> {
        safetensors::serialize(self.tensors.iter(), None)
            .map_err(|e| BnError::CheckpointFile(format!("cannot serialize the tensors: {e}")))
    }

    /// Writes the safetensors file at `path` (created or truncated).
    ///
    /// # Errors
    ///
    /// [`BnError::CheckpointFile`] when the file cannot be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), BnError> {
        let path = path.as_ref();
        safetensors::serialize_to_file(self.tensors.iter(), None, path)
            .map_err(|e| BnError::CheckpointFile(format!("cannot write {}: {e}", path.display())))
    }
}

/// A tensor of parameters in their own dtype (`F32` for `f32`, `F64` for `f64`), named `name`
/// in the error when its bytes cannot be allocated.
fn param_tensor<P: Param>(name: &str, shape: Vec<usize>, values: &[P]) -> Result<Tensor, BnError> {
    let width = core::mem::size_of::<P>();
    let mut data: Vec<u8> = try_vec_with_capacity(values.len().saturating_mul(width), "the tensor's bytes")
        .map_err(|e| checkpoint_error(name, e.to_string()))?;
    if param_is_f64::<P>() {
        data.extend(values.iter().flat_map(|v| v.to_f64().to_le_bytes()));
        Ok(Tensor { dtype: Dtype::F64, shape, data })
    } else {
        // Exact: an f32 widened to f64 and back.
        data.extend(values.iter().flat_map(|v| (v.to_f64() as f32).to_le_bytes()));
        Ok(Tensor { dtype: Dtype::F32, shape, data })
    }
}

/// A layer's state as a safetensors file (bytes) with the tensors under `prefix`, as
/// [`StateDict::insert_layer`] writes them.
///
/// # Errors
///
/// As [`StateDict::insert_layer`] and [`StateDict::to_bytes`].
pub fn save_state<L: BatchNormLayer + ?Sized>(
    layer: &L,
    prefix: &str,
    naming: Naming<'_>,
) -> Result<Vec<u8>, BnError> {
    let mut dict = StateDict::new();
    dict.insert_layer(layer, prefix, naming)?;
    dict.to_bytes()
}

/// Writes a layer's state as a safetensors file at `path`, as [`save_state`].
///
/// # Errors
///
/// As [`StateDict::insert_layer`] and [`StateDict::save`].
pub fn save_state_to_file<L: BatchNormLayer + ?Sized>(
    layer: &L,
    path: impl AsRef<Path>,
    prefix: &str,
    naming: Naming<'_>,
) -> Result<(), BnError> {
    let mut dict = StateDict::new();
    dict.insert_layer(layer, prefix, naming)?;
    dict.save(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BatchNorm, Config};

    fn trained(config: Config) -> BatchNorm {
        let mut bn = BatchNorm::with_config([2, 3], [0], config).unwrap();
        let x: Vec<f32> = (0..24).map(|i| ((i * 7) % 11) as f32 * 0.5 - 1.0).collect();
        let mut y = vec![0.0; 24];
        bn.forward_train(&x, &[4, 2, 3], &mut y).unwrap();
        bn.update_params(&[0.5, 1.0, 1.5, 2.0, 2.5, 3.0], &[0.1, -0.1, 0.2, -0.2, 0.3, -0.3]).unwrap();
        bn
    }

    #[test]
    fn round_trip_with_feature_shape() {
        let bn = trained(Config::new());
        let bytes = save_state(&bn, "m.", Naming::pytorch()).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(file.tensor("m.weight").unwrap().shape(), &[2, 3]);
        assert_eq!(file.tensor("m.num_batches_tracked").unwrap().dtype(), Dtype::I64);
        let mut back = BatchNorm::new([2, 3], [0]).unwrap();
        load_state(&mut back, &file, "m.", Naming::pytorch()).unwrap();
        assert_eq!(back.gamma(), bn.gamma());
        assert_eq!(back.beta(), bn.beta());
        assert_eq!(back.running_mean(), bn.running_mean());
        assert_eq!(back.running_var(), bn.running_var());
        assert_eq!(back.num_batches_tracked(), 1);
    }

    #[test]
    fn optional_tensors_follow_the_configuration() {
        let config = Config::new().scale(false).center(false).track_running_stats(false);
        let bn = BatchNorm::with_config(4, [0], config).unwrap();
        let dict = {
            let mut d = StateDict::new();
            d.insert_layer(&bn, "", Naming::pytorch()).unwrap();
            d
        };
        assert!(dict.is_empty(), "{:?}", dict.names().collect::<Vec<_>>());
        let mut back = BatchNorm::with_config(4, [0], config).unwrap();
        load_state_from_bytes(&mut back, &dict.to_bytes().unwrap(), "", Naming::pytorch()).unwrap();
    }

    #[test]
    fn errors_name_the_tensor() {
        let bn = trained(Config::new());
        let bytes = save_state(&bn, "", Naming::keras()).unwrap();
        let mut small = BatchNorm::new(5, [0]).unwrap();
        let err = load_state_from_bytes(&mut small, &bytes, "", Naming::keras()).unwrap_err();
        assert!(matches!(&err, BnError::Checkpoint { tensor, .. } if tensor == "gamma"), "{err}");
        let err = load_state_from_bytes(&mut small, &bytes, "x/", Naming::keras()).unwrap_err();
        assert!(err.to_string().contains("no tensor name starts with `x/`"), "{err}");
        let err = load_state_from_bytes(&mut small, b"not a file", "", Naming::keras()).unwrap_err();
        assert!(matches!(err, BnError::CheckpointFile(_)), "{err}");
    }

    #[test]
    fn duplicate_names_are_rejected_before_anything_is_added() {
        let bn = trained(Config::new());
        let mut dict = StateDict::new();
        dict.insert_f32("running_var", &[1], &[1.0]).unwrap();
        let err = dict.insert_layer(&bn, "", Naming::pytorch()).unwrap_err();
        assert!(matches!(&err, BnError::Checkpoint { tensor, .. } if tensor == "running_var"), "{err}");
        assert_eq!(dict.len(), 1);
        let same = Naming::new("w", "w", "m", "v");
        assert!(StateDict::new().insert_layer(&bn, "", same).is_err());
    }
}
