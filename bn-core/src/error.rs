//! The one error type of the crate.

use thiserror::Error;

/// Everything that can go wrong when a layer is built or called.
///
/// Every entry point validates its whole input before it writes anything, so after an `Err` the
/// layer is bit-for-bit unchanged (output buffers are unspecified). Each message says what was
/// expected and what was given.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum BnError {
    /// `shape` has a different number of axes than the layer.
    #[error("rank mismatch: the layer expects a shape of rank {expected}, got rank {got} ({shape:?})")]
    RankMismatch {
        /// The layer's rank.
        expected: usize,
        /// The rank of the given shape.
        got: usize,
        /// The given shape.
        shape: Vec<usize>,
    },

    /// A reduced axis's extent in `shape` is not the one the layer was compiled for (the
    /// attribute's `spatial` key).
    #[error(
        "spatial extent mismatch: axis {axis} of shape {shape:?} has extent {got}, but the layer was \
         compiled for {expected} (its `spatial` key)"
    )]
    SpatialMismatch {
        /// The axis.
        axis: usize,
        /// The extent the layer was compiled for.
        expected: usize,
        /// The given extent.
        got: usize,
        /// The given shape.
        shape: Vec<usize>,
    },

    /// The extents of the feature axes in `shape` are not the layer's.
    #[error(
        "feature extent mismatch: the layer expects extents {expected:?} at axes {first_axis}..{end_axis}, \
         got shape {shape:?}",
        end_axis = first_axis + expected.len()
    )]
    FeatureMismatch {
        /// The layer's feature extents.
        expected: Vec<usize>,
        /// The first feature axis.
        first_axis: usize,
        /// The given shape.
        shape: Vec<usize>,
    },

    /// A data buffer does not hold exactly the number of elements the shape describes.
    #[error(
        "buffer length mismatch: `{buffer}` must hold {expected} elements for shape {shape:?}, got {got}"
    )]
    BufferLength {
        /// Which buffer (`x`, `y`, `dy`, `dx`, `xy`).
        buffer: &'static str,
        /// Product of the shape.
        expected: usize,
        /// The buffer's length.
        got: usize,
        /// The given shape.
        shape: Vec<usize>,
    },

    /// Training (or batch statistics) needs at least two values per feature, as in PyTorch.
    #[error("expected more than 1 value per channel when training, got input size {shape:?}")]
    TooFewValues {
        /// The given shape.
        shape: Vec<usize>,
    },

    /// Training on a batch with no elements.
    #[error("empty batch: training needs a non-empty batch, got shape {shape:?}")]
    EmptyBatch {
        /// The given shape.
        shape: Vec<usize>,
    },

    /// `backward` was called before any successful `forward_train`.
    #[error("backward called without a preceding successful forward_train")]
    NoForward,

    /// `backward` was called with a shape other than the last `forward_train`'s.
    #[error("backward shape mismatch: the last forward_train had shape {expected:?}, got {got:?}")]
    BackwardShape {
        /// Shape of the last training forward.
        expected: Vec<usize>,
        /// The given shape.
        got: Vec<usize>,
    },

    /// A parameter or statistics slice has the wrong length.
    #[error("parameter length mismatch: `{name}` must hold {expected} values (one per feature), got {got}")]
    ParamLength {
        /// Which parameter.
        name: &'static str,
        /// Number of features.
        expected: usize,
        /// The slice's length.
        got: usize,
    },

    /// A non-finite value where only finite ones are allowed: a parameter given to a setter, or a
    /// batch statistic (mean or variance, including a variance that overflows the parameter type).
    #[error("non-finite value: {what}[{index}] = {value} (only finite values are allowed)")]
    NonFinite {
        /// What held the value (`gamma`, `running_var`, `batch mean`, `batch variance`, ...).
        what: &'static str,
        /// Feature index.
        index: usize,
        /// The offending value.
        value: f64,
    },

    /// A negative running variance given to `set_running_stats`.
    #[error("negative variance: running_var[{index}] = {value} (variances must be >= 0)")]
    NegativeVariance {
        /// Feature index.
        index: usize,
        /// The offending value.
        value: f64,
    },

    /// A parameter the configuration fixes (`center = false` fixes beta at 0, `scale = false` fixes
    /// gamma at 1) was given another value.
    #[error("`{name}` is fixed at {fixed} by `{option} = false`, got {name}[{index}] = {value}")]
    FixedParameter {
        /// `gamma` or `beta`.
        name: &'static str,
        /// The option that fixes it (`scale` or `center`).
        option: &'static str,
        /// The fixed value.
        fixed: f64,
        /// Feature index.
        index: usize,
        /// The offending value.
        value: f64,
    },

    /// The number of elements of a shape does not fit in `usize`.
    #[error("shape overflow: the number of elements of {shape:?} does not fit in usize")]
    ShapeOverflow {
        /// The given shape.
        shape: Vec<usize>,
    },

    /// A buffer sized by input (a feature count, a checkpoint's tensor, a peer's message) that
    /// cannot be allocated: the allocator refused, or its size in bytes does not fit in `isize`.
    /// Such buffers are allocated fallibly, so this is an error and not the abort an ordinary
    /// `Vec` allocation would cause. Nothing was changed.
    #[error("cannot allocate {what}: {len} values of {elem_size} bytes each")]
    Allocation {
        /// What the buffer was for.
        what: String,
        /// The number of values asked for.
        len: usize,
        /// The size of one value in bytes.
        elem_size: usize,
    },

    /// A configuration value out of its range (eps, momentum).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// Features and reduced axes given at run time that do not describe a layout.
    #[error("invalid layout: {0}")]
    InvalidLayout(String),

    /// A tensor of a checkpoint cannot be loaded into the layer (missing, wrong dtype, shape or
    /// length, a non-finite value, a negative variance, ...) or cannot be saved (a name given
    /// twice). Loading checks every tensor before it sets anything: the layer is unchanged.
    #[error("checkpoint tensor `{tensor}`: {message}")]
    Checkpoint {
        /// The tensor's full name in the checkpoint (prefix included), e.g. `1.running_var`.
        tensor: String,
        /// What was expected and what was found.
        message: String,
    },

    /// A checkpoint file that cannot be read, parsed or written (I/O, not safetensors).
    #[error("checkpoint file: {0}")]
    CheckpointFile(String),

    /// A layer's inference transform cannot be folded into a neighbouring layer: mismatched
    /// weight or bias shapes, or a layer without running statistics.
    #[error("cannot fold: {0}")]
    Fold(String),

    /// A synchronized call ([`crate::sync`]) whose ranks disagree: a rank that failed its own
    /// checks, or that passes another number of features, a shape that differs in more than the
    /// batch axis, another configuration, or that calls another operation. Every rank of the
    /// group gets this error (the rank at fault gets its own, more specific one), and every
    /// layer is unchanged.
    #[error("synchronized batch norm: rank {rank} {message}")]
    SyncMismatch {
        /// The first rank (in rank order) that disagrees with rank 0 or failed.
        rank: usize,
        /// What it does differently.
        message: String,
    },

    /// The group of a synchronized call failed to communicate (a rank left the group, a
    /// malformed message, a buffer too large for the transport).
    #[error("synchronized batch norm: group failure: {0}")]
    SyncGroup(String),
}
