//! Compile-time knowledge a `#[batch_norm]` layer passes to the shared kernels.

/// What the macro knows about a layer at compile time. The runtime-generic
/// [`BatchNorm`](crate::BatchNorm) uses [`Dynamic`], which knows nothing; a generated layer
/// implements it on a hidden type and calls the same entry points with it, so the kernels see
/// its values as constants.
#[doc(hidden)]
pub trait Spec {
    /// Number of channels (product of the feature extents); 0 when unknown.
    const CHANNELS: usize;
    /// Product of the extents after the feature axes, when every one of them is static
    /// (1 when the feature axes are last); 0 when unknown.
    const INNER: usize;

    /// The checks of a shape this spec adds to the layout's (a generated layer's `spatial`
    /// extents), so that [`specialize`] may replace the shape's values by the constants.
    #[inline(always)]
    fn check_shape(shape: &[usize]) -> Result<(), crate::BnError> {
        let _ = shape;
        Ok(())
    }
}

/// The spec of the runtime-generic layer: nothing is known at compile time.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct Dynamic;

impl Spec for Dynamic {
    const CHANNELS: usize = 0;
    const INNER: usize = 0;
}

/// Replaces the run-time values of a canonical view by the spec's constants where it has them,
/// so that after inlining the kernels' trip counts are compile-time constants.
#[inline(always)]
pub(crate) fn specialize<S: Spec>(mut dims: crate::Canonical) -> crate::Canonical {
    if S::CHANNELS != 0 {
        debug_assert_eq!(dims.channels, S::CHANNELS);
        dims.channels = S::CHANNELS;
    }
    if S::INNER != 0 {
        debug_assert_eq!(dims.inner, S::INNER);
        dims.inner = S::INNER;
    }
    dims
}
