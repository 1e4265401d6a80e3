//! What is measured: cases (a shape and its reduced axes), modes and implementations.

use std::fmt;

/// One of the standard shapes (f32; docs/PERFORMANCE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandardShape {
    /// `S1` .. `S6`.
    pub name: &'static str,
    /// The layout's name (`NC`, `NCHW`, ...).
    pub layout: &'static str,
    /// The tensor shape.
    pub shape: &'static [usize],
    /// The reduced axes.
    pub axes: &'static [usize],
}

/// The standard shapes S1..S6 (docs/PERFORMANCE.md).
pub const STANDARD_SHAPES: [StandardShape; 6] = [
    StandardShape { name: "S1", layout: "NC", shape: &[256, 1024], axes: &[0] },
    StandardShape { name: "S2", layout: "NCHW", shape: &[32, 64, 56, 56], axes: &[0, 2, 3] },
    StandardShape { name: "S3", layout: "NHWC", shape: &[32, 56, 56, 64], axes: &[0, 1, 2] },
    StandardShape { name: "S4", layout: "NCHW", shape: &[32, 2048, 7, 7], axes: &[0, 2, 3] },
    StandardShape { name: "S5", layout: "NCL", shape: &[64, 128, 1000], axes: &[0, 2] },
    StandardShape { name: "S6", layout: "NCHW", shape: &[1, 64, 8, 8], axes: &[0, 2, 3] },
];

/// The named layouts `--layout` accepts: name, rank, reduced axes.
pub const NAMED_LAYOUTS: [(&str, usize, &[usize]); 4] =
    [("nc", 2, &[0]), ("ncl", 3, &[0, 2]), ("nchw", 4, &[0, 2, 3]), ("nhwc", 4, &[0, 1, 2])];

/// The element type of the data (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dtype {
    /// `f32` (the default).
    #[default]
    F32,
    /// `bf16` data, `f32` parameters.
    Bf16,
    /// `f16` data, `f32` parameters.
    F16,
    /// `f64` data and parameters.
    F64,
}

impl Dtype {
    /// Every dtype, in the order `--help` lists them.
    pub const ALL: [Dtype; 4] = [Dtype::F32, Dtype::Bf16, Dtype::F16, Dtype::F64];

    /// `f32`, `bf16`, `f16` or `f64`.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::F64 => "f64",
        }
    }

    /// The dtype of a name (case-insensitive).
    pub fn from_name(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name().eq_ignore_ascii_case(name.trim()))
    }

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
            Dtype::F64 => 8,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A tensor shape and the axes its statistics are taken over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    /// `S1`..`S6` for a standard shape (also when given with `--shape`), a suite layer's name
    /// (`R1`..), `custom` otherwise.
    pub name: String,
    /// The tensor shape.
    pub shape: Vec<usize>,
    /// The reduced axes, ascending.
    pub axes: Vec<usize>,
    /// The element type of the data.
    pub dtype: Dtype,
}

impl Case {
    /// A case from a shape and its reduced axes, named after the standard shape it equals.
    pub fn new(shape: Vec<usize>, axes: Vec<usize>) -> Case {
        let name = STANDARD_SHAPES
            .iter()
            .find(|s| s.shape == shape.as_slice() && s.axes == axes.as_slice())
            .map_or_else(|| "custom".to_string(), |s| s.name.to_string());
        Case { name, shape, axes, dtype: Dtype::F32 }
    }

    /// The case of a standard shape.
    pub fn standard(s: &StandardShape) -> Case {
        Case { name: s.name.to_string(), shape: s.shape.to_vec(), axes: s.axes.to_vec(), dtype: Dtype::F32 }
    }

    /// The same case with data of `dtype`.
    pub fn with_dtype(mut self, dtype: Dtype) -> Case {
        self.dtype = dtype;
        self
    }

    /// All standard cases, S1..S6.
    pub fn all_standard() -> Vec<Case> {
        STANDARD_SHAPES.iter().map(Case::standard).collect()
    }

    /// The standard shape this case is, if any.
    pub fn standard_shape(&self) -> Option<&'static StandardShape> {
        STANDARD_SHAPES.iter().find(|s| s.shape == self.shape.as_slice() && s.axes == self.axes.as_slice())
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The extents of the kept (feature) axes, in axis order.
    pub fn features(&self) -> Vec<usize> {
        (0..self.shape.len()).filter(|a| !self.axes.contains(a)).map(|a| self.shape[a]).collect()
    }

    /// Number of values each feature's statistics are taken over.
    pub fn per_feature(&self) -> usize {
        self.axes.iter().map(|&a| self.shape[a]).product()
    }

    /// The shape written as `32x64x56x56`.
    pub fn shape_string(&self) -> String {
        self.shape.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("x")
    }

    /// A one-line description: `S2: 32x64x56x56 (NCHW), axes [0, 2, 3], 25.7 MB` (f32).
    pub fn describe(&self) -> String {
        let layout = match (self.standard_shape(), crate::suite::layer_of(&self.name, &self.shape)) {
            (Some(s), _) => format!(" ({})", s.layout),
            (None, Some((suite, layer))) => format!(" (NCHW, {} of {}'s layers)", layer.count, suite.title()),
            (None, None) => String::new(),
        };
        let bytes = (self.len() * self.dtype.bytes()) as f64;
        let size =
            if bytes >= 1e6 { format!("{:.1} MB", bytes / 1e6) } else { format!("{:.1} kB", bytes / 1e3) };
        format!("{}: {}{layout}, axes {:?}, {size}", self.name, self.shape_string(), self.axes)
    }
}

/// What a row measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Training forward (`forward_train`).
    Train,
    /// Inference forward (`forward_eval`).
    Eval,
    /// Backward of the training forward (`backward`).
    Backward,
}

impl Mode {
    /// All modes, in table order.
    pub const ALL: [Mode; 3] = [Mode::Train, Mode::Eval, Mode::Backward];

    /// The name used on the command line and in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Train => "train",
            Mode::Eval => "eval",
            Mode::Backward => "backward",
        }
    }

    /// Parses a name as [`Mode::name`] writes it.
    pub fn from_name(name: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == name)
    }

    /// How many times the tensor's bytes the mode must move at least: read x and write y
    /// (forward), read x and dy and write dx (backward).
    pub fn traffic_factor(self) -> usize {
        match self {
            Mode::Train | Mode::Eval => 2,
            Mode::Backward => 3,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Who computes a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Implementation {
    /// The layer `#[batch_norm]` generates for the standard shape.
    Macro,
    /// The runtime-generic `batchnorm::BatchNorm`.
    Runtime,
    /// The runtime-generic layer with `activation = relu`: `relu(bn(x))`, fused
    /// (`--epilogues`).
    Relu,
    /// The runtime-generic layer's residual form `relu(bn(x) + residual)`, fused (`--epilogues`).
    AddRelu,
    /// The naive ndarray baseline ([`crate::naive`]).
    Naive,
    /// A copy of the same number of bytes: the memory-bandwidth reference.
    Copy,
}

impl Implementation {
    /// All implementations, in table order.
    pub const ALL: [Implementation; 6] = [
        Implementation::Macro,
        Implementation::Runtime,
        Implementation::Relu,
        Implementation::AddRelu,
        Implementation::Naive,
        Implementation::Copy,
    ];

    /// The name used in the table and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Implementation::Macro => "macro",
            Implementation::Runtime => "runtime",
            Implementation::Relu => "relu",
            Implementation::AddRelu => "add-relu",
            Implementation::Naive => "naive",
            Implementation::Copy => "copy",
        }
    }
}

impl fmt::Display for Implementation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
