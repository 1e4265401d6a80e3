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
}

macro_rules! impl_float {
    ($t:ty, $name:literal) => {
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
        }
    };
}

impl_float!(f32, "f32");
impl_float!(f64, "f64");
