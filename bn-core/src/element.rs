//! The numeric types a layer works with.

use core::fmt::Debug;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::kernels::HalfFormat;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
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
    /// Rounds from `f64` to nearest, with a finite value beyond the type's range becoming the
    /// largest finite value of its sign; infinities and NaN stay as they are. Scale
    /// coefficients such as `gamma / sqrt(var + eps)` go through it: with a tiny `eps` on a
    /// constant channel they exceed `f32`, and an infinite scale times a zero deviation would
    /// be NaN where the layer's answer is `beta`.
    #[doc(hidden)]
    fn saturating_from_f64(value: f64) -> Self;
    /// Whether the value is neither infinite nor NaN.
    fn is_finite(self) -> bool;
    /// The slice as `f32` when this type is `f32` (the fast kernels' parameter type).
    #[doc(hidden)]
    fn slice_as_f32(values: &[Self]) -> Option<&[f32]>;
}

/// The element type of the data tensors (`x`, `y`, `dy`, `dx`): `f32`, `f64`, or the 16-bit
/// formats [`half::bf16`] and [`half::f16`].
///
/// `f32` and `f64` layers keep their parameters and statistics in their own type. The 16-bit
/// formats store only the data in 16 bits; their parameters and statistics are `f32` and the
/// kernels compute in `f32` (PyTorch's mixed precision).
///
/// ```
/// use batchnorm::Element;
/// assert_eq!(<half::bf16 as Element>::NAME, "bf16");
/// let param: <half::f16 as Element>::Param = 1.5f32;
/// assert_eq!(half::f16::from_f64(0.1).to_f64(), 0.0999755859375);
/// # let _ = param;
/// ```
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
    /// The 16-bit storage format, for `bf16` and `f16` (their kernels widen to `f32`).
    #[doc(hidden)]
    const HALF: Option<HalfFormat> = None;
    /// The slice's bits when this type is a 16-bit format ([`Element::HALF`]).
    #[doc(hidden)]
    #[inline(always)]
    fn slice_as_bits(_values: &[Self]) -> Option<&[u16]> {
        None
    }
    /// The slice's bits when this type is a 16-bit format ([`Element::HALF`]).
    #[doc(hidden)]
    #[inline(always)]
    fn slice_as_bits_mut(_values: &mut [Self]) -> Option<&mut [u16]> {
        None
    }
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
            fn saturating_from_f64(value: f64) -> Self {
                // A finite value that `clamp` moves would have rounded to an infinity or to the
                // bound itself, so finite results keep their bits. Infinities and NaN (from
                // non-finite data) pass through.
                if value.is_finite() {
                    value.clamp(-(<$t>::MAX as f64), <$t>::MAX as f64) as $t
                } else {
                    value as $t
                }
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

macro_rules! impl_half {
    ($t:ty, $name:literal, $format:expr) => {
        impl Element for $t {
            type Param = f32;
            const NAME: &'static str = $name;
            const HALF: Option<HalfFormat> = Some($format);
            #[inline(always)]
            fn to_f64(self) -> f64 {
                <$t>::to_f64(self)
            }
            #[inline(always)]
            fn from_f64(value: f64) -> Self {
                <$t>::from_f64(value)
            }
            #[inline(always)]
            fn slice_as_f32(_values: &[Self]) -> Option<&[f32]> {
                None
            }
            #[inline(always)]
            fn slice_as_f32_mut(_values: &mut [Self]) -> Option<&mut [f32]> {
                None
            }
            #[inline(always)]
            fn slice_as_bits(values: &[Self]) -> Option<&[u16]> {
                Some(values.reinterpret_cast())
            }
            #[inline(always)]
            fn slice_as_bits_mut(values: &mut [Self]) -> Option<&mut [u16]> {
                Some(values.reinterpret_cast_mut())
            }
        }
    };
}

impl_half!(bf16, "bf16", HalfFormat::Bf16);
impl_half!(f16, "f16", HalfFormat::F16);
