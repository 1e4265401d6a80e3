//! From a shape and its feature axes to the canonical `(outer, C, inner)` view.
//!
//! A tensor of rank `r` has one or more adjacent *feature axes* (kept: gamma has their extents)
//! and the rest are *reduced axes*. Any such layout is the canonical view `(outer, C, inner)`:
//! `outer` is the product of the extents before the feature axes, `C` the product of the feature
//! extents, `inner` the product after. NCHW is `(N, C, H*W)`, NHWC `(N*H*W, C, 1)`, NC `(N, C, 1)`.

use crate::BnError;

/// The largest number of features a layer may have (the product of its feature extents):
/// 2^31 = 2 147 483 648, on every target (it fits in a 32-bit `usize` too).
///
/// A layer keeps 16 buffers of one value per feature (parameters, running statistics, the
/// statistics saved for `backward`, gradients and working buffers): 88 bytes per feature for
/// `f32` parameters, 128 for `f64`, so a layer at the limit holds 176 GiB (`f32`) or 256 GiB
/// (`f64`). The limit turns feature counts whose state no machine can hold into an error before
/// anything is allocated, at compile time (`#[batch_norm]`, a compile error on the extent) and
/// at run time ([`Layout::new`] and [`Layout::from_axes`], so `BatchNorm::new` and every other
/// constructor: [`BnError::InvalidLayout`]). Below the limit the state is allocated fallibly: a
/// state this machine cannot hold is [`BnError::Allocation`], not an abort.
pub const MAX_FEATURES: usize = 1 << 31;

/// The two kernel families of the canonical view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `inner > 1`: each channel is a set of contiguous runs (planes) of `inner` values.
    Planes,
    /// `inner == 1`: the tensor is `outer` contiguous rows of all `C` channels.
    Rows,
}

/// The canonical `(outer, C, inner)` view of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Canonical {
    /// Product of the extents before the feature axes.
    pub outer: usize,
    /// Product of the feature extents (the number of channels, `gamma.len()`).
    pub channels: usize,
    /// Product of the extents after the feature axes.
    pub inner: usize,
}

impl Canonical {
    /// Number of elements (`outer * channels * inner`); the constructor checked it fits.
    #[inline]
    pub const fn len(&self) -> usize {
        self.outer * self.channels * self.inner
    }

    /// Whether the tensor has no elements.
    #[inline]
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of values reduced into each channel's statistics (`outer * inner`).
    #[inline]
    pub const fn per_channel(&self) -> usize {
        self.outer * self.inner
    }

    /// The kernel family: rows when `inner == 1`, planes otherwise.
    #[inline]
    pub const fn family(&self) -> Family {
        if self.inner == 1 {
            Family::Rows
        } else {
            Family::Planes
        }
    }
}

/// A layer's layout: its rank, where its feature axes start and their extents.
///
/// ```
/// use batchnorm::{Layout, Canonical};
///
/// // NCHW normalized over axes [0, 2, 3]
/// let layout = Layout::from_axes(&[64], &[0, 2, 3]).unwrap();
/// assert_eq!(layout.rank(), 4);
/// let view = layout.canonical(&[32, 64, 56, 56]).unwrap();
/// assert_eq!(view, Canonical { outer: 32, channels: 64, inner: 56 * 56 });
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Layout {
    rank: usize,
    first_feature_axis: usize,
    features: Vec<usize>,
    channels: usize,
}

impl Layout {
    /// A layout from the feature extents and the reduced axes, as the attribute takes them.
    ///
    /// The reduced axes must be non-empty and strictly ascending; together with the feature axes
    /// (as many as `features` has extents) they must cover `0..rank` exactly once, and the
    /// feature axes must be adjacent. Every feature extent must be positive, and their product
    /// at most [`MAX_FEATURES`].
    pub fn from_axes(features: &[usize], axes: &[usize]) -> Result<Layout, BnError> {
        let invalid = |msg: String| Err(BnError::InvalidLayout(msg));
        if features.is_empty() {
            return invalid("`features` must name at least one extent".into());
        }
        if let Some(i) = features.iter().position(|&f| f == 0) {
            return invalid(format!("feature extents must be positive, got features[{i}] = 0"));
        }
        if axes.is_empty() {
            return invalid("`axes` (the reduced axes) must not be empty".into());
        }
        let rank = axes.len() + features.len();
        for w in axes.windows(2) {
            if w[0] >= w[1] {
                return invalid(format!("`axes` must be strictly ascending, got {axes:?}"));
            }
        }
        if let Some(&a) = axes.iter().find(|&&a| a >= rank) {
            return invalid(format!(
                "axis {a} is out of range for rank {rank} ({} reduced + {} feature axes)",
                axes.len(),
                features.len()
            ));
        }
        let feature_axes: Vec<usize> = (0..rank).filter(|a| !axes.contains(a)).collect();
        let first = feature_axes[0];
        if feature_axes.last() != Some(&(first + features.len() - 1)) {
            return invalid(format!(
                "feature axes must be adjacent, got {feature_axes:?} (the axes not in {axes:?})"
            ));
        }
        Layout::new(rank, first, features)
    }

    /// A layout from its rank, its first feature axis and the feature extents.
    ///
    /// The product of the extents must fit in `usize` ([`BnError::ShapeOverflow`]) and be at
    /// most [`MAX_FEATURES`] ([`BnError::InvalidLayout`]).
    pub fn new(rank: usize, first_feature_axis: usize, features: &[usize]) -> Result<Layout, BnError> {
        if features.is_empty() || features.contains(&0) {
            return Err(BnError::InvalidLayout(format!(
                "feature extents must be non-empty and positive, got {features:?}"
            )));
        }
        if first_feature_axis + features.len() > rank || rank == features.len() {
            return Err(BnError::InvalidLayout(format!(
                "{} feature axes from axis {first_feature_axis} do not leave a reduced axis in rank {rank}",
                features.len()
            )));
        }
        let channels = features
            .iter()
            .try_fold(1usize, |acc, &f| acc.checked_mul(f))
            .ok_or_else(|| BnError::ShapeOverflow { shape: features.to_vec() })?;
        if channels > MAX_FEATURES {
            return Err(BnError::InvalidLayout(format!(
                "{channels} features (the product of the extents {features:?}) exceed the limit of \
                 {MAX_FEATURES} (2^31, `MAX_FEATURES`)"
            )));
        }
        Ok(Layout { rank, first_feature_axis, features: features.to_vec(), channels })
    }

    /// The rank of the tensors the layer takes.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of channels: the product of the feature extents.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The extents of the feature axes.
    pub fn features(&self) -> &[usize] {
        &self.features
    }

    /// The feature axes (adjacent).
    pub fn feature_axes(&self) -> core::ops::Range<usize> {
        self.first_feature_axis..self.first_feature_axis + self.features.len()
    }

    /// The reduced axes, ascending.
    pub fn reduced_axes(&self) -> Vec<usize> {
        let f = self.feature_axes();
        (0..self.rank).filter(|a| !f.contains(a)).collect()
    }

    /// Validates `shape` (rank, feature extents, element count) and returns its canonical view.
    pub fn canonical(&self, shape: &[usize]) -> Result<Canonical, BnError> {
        if shape.len() != self.rank {
            return Err(BnError::RankMismatch {
                expected: self.rank,
                got: shape.len(),
                shape: shape.to_vec(),
            });
        }
        let f = self.feature_axes();
        if shape[f.clone()] != self.features[..] {
            return Err(BnError::FeatureMismatch {
                expected: self.features.clone(),
                first_axis: f.start,
                shape: shape.to_vec(),
            });
        }
        // The product of the non-zero extents must fit in usize (so a shape with a zero extent
        // is still rejected when its other extents overflow); every partial product then fits.
        let fits = shape.iter().filter(|&&e| e != 0).try_fold(1usize, |acc, &e| acc.checked_mul(e)).is_some();
        if !fits {
            return Err(BnError::ShapeOverflow { shape: shape.to_vec() });
        }
        let outer: usize = shape[..f.start].iter().product();
        let inner: usize = shape[f.end..].iter().product();
        Ok(Canonical { outer, channels: self.channels, inner })
    }
}
