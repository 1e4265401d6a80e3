//! The numeric types a layer works with.

use core::fmt::Debug;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A floating-point type holding a layer's parameters and statistics (`f32` or `f64`).
pub trait Param:
    sealed::Sealed + Copy + Default + Debug + PartialEq + PartialOrd + Send + Sync + 'static
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// Widens to `f64` (exact).
    fn to_f64(self) -> f64;
    /// Rounds from `f64` to nearest.
    fn from_f64(value: f64) -> Self;
    /// Whether the value is neither infinite nor NaN.
    fn is_finite(self) -> bool;
    /// The slice as `f32` when this type is `f32` (the fast kernels' parameter type).
    #[doc(hidden)]
    fn slice_as_f32(values: &[Self]) -> Option<&[f32]>;
}

/// The element type of the data tensors (`x`, `y`, `dy`, `dx`).
pub trait Element: sealed::Sealed + Copy + Default + Debug + PartialEq + Send + Sync + 'static {
    /// The type of the layer's parameters and statistics for this element type.
    type Param: Param;
    /// The name used by the `dtype` key of the attribute.
    const NAME: &'static str;
    /// Widens to `f64` (exact).
    fn to_f64(self) -> f64;
    /// Rounds from `f64` to nearest.
    fn from_f64(value: f64) -> Self;
    /// The slice as `f32` when this type is `f32` (the element type of the fast kernels).
    #[doc(hidden)]
    fn slice_as_f32(values: &[Self]) -> Option<&[f32]>;
    /// The slice as `f32` when this type is `f32`.
    #[doc(hidden)]
    fn slice_as_f32_mut(values: &mut [Self]) -> Option<&mut [f32]>;
}

macro_rules! impl_float {
    ($t:ty, $name:literal, |$v:ident| $as_f32:expr, |$m:ident| $as_f32_mut:expr) => {
        impl Param for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn from_f64(value: f64) -> Self {
                value as $t
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            #[inline(always)]
            fn slice_as_f32($v: &[Self]) -> Option<&[f32]> {
                $as_f32
            }
        }

        impl Element for $t {
            type Param = $t;
            const NAME: &'static str = $name;
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn from_f64(value: f64) -> Self {
                value as $t
            }
            #[inline(always)]
            fn slice_as_f32($v: &[Self]) -> Option<&[f32]> {
                $as_f32
            }
            #[inline(always)]
            fn slice_as_f32_mut($m: &mut [Self]) -> Option<&mut [f32]> {
                $as_f32_mut
            }
        }
    };
}

impl_float!(f32, "f32", |v| Some(v), |v| Some(v));
impl_float!(f64, "f64", |_v| None, |_v| None);
