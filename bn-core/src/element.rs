//! The numeric types a layer works with.

use core::fmt::Debug;

use half::{bf16, f16};

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
    /// The kernels of each pass for this type (see `route.rs`).
    #[doc(hidden)]
    type Route: route::Route<Self>;
    /// Widens to `f64` (exact).
    fn to_f64(self) -> f64;
    /// Rounds from `f64` to nearest.
    fn from_f64(value: f64) -> Self;
}

macro_rules! impl_float {
    ($t:ty, $name:literal, $route:ty) => {
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
        }

        impl Element for $t {
            type Param = $t;
            type Route = $route;
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

impl_float!(f32, "f32", route::Fast32);
impl_float!(f64, "f64", route::Reference);

macro_rules! impl_half {
    ($t:ty, $name:literal) => {
        impl Element for $t {
            type Param = f32;
            type Route = route::Half16;
            const NAME: &'static str = $name;
            #[inline(always)]
            fn to_f64(self) -> f64 {
                <$t>::to_f64(self)
            }
            #[inline(always)]
            fn from_f64(value: f64) -> Self {
                <$t>::from_f64(value)
            }
        }
    };
}

impl_half!(bf16, "bf16");
impl_half!(f16, "f16");

/// The contract of a route: which kernels run each pass for an element type
/// ([`Element::Route`]). Its implementations are in `route.rs`.
pub mod route {
    use super::Element;
    use crate::kernels::Backend;
    use crate::spec::Spec;
    use crate::Canonical;

    /// What follows the normalization in one call: the layer's activation or the residual form.
    #[derive(Clone, Copy)]
    pub enum Tail<'r, E> {
        /// The normalized value.
        Plain,
        /// `relu(y)`.
        Relu,
        /// `relu(round(y + residual))`.
        AddRelu(&'r [E]),
    }

    impl<'r, E: Element> Tail<'r, E> {
        /// The residual of the residual form.
        pub fn residual(self) -> Option<&'r [E]> {
            match self {
                Tail::AddRelu(r) => Some(r),
                _ => None,
            }
        }

        /// Applies the tail to `y` after an unfused normalize, in the element type: `relu(y)` or
        /// `relu(round(y + r))`, as the fast kernels' epilogue computes it.
        pub fn apply(self, y: &mut [E]) {
            let relu = |v: f64| if v < 0.0 { 0.0 } else { v };
            match self {
                Tail::Plain => {}
                Tail::Relu => y.iter_mut().for_each(|v| *v = E::from_f64(relu(v.to_f64()))),
                Tail::AddRelu(r) => {
                    for (v, r) in y.iter_mut().zip(r) {
                        *v = E::from_f64(relu(E::from_f64(v.to_f64() + r.to_f64()).to_f64()));
                    }
                }
            }
        }
    }

    /// What a route's training forward wrote besides the statistics.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum TrainedY {
        /// Nothing: `y` is normalized by the reference once the statistics are checked.
        Pending,
        /// `y`, with the tail applied or (`tail_done: false`) still to apply. `reference_y`: `y`
        /// was computed with the reference formula (what a fused ReLU's backward recomputes).
        Written { tail_done: bool, reference_y: bool },
    }

    /// The per-feature transform of inference: the mean, `1 / sqrt(var + eps)` and the scale
    /// `gamma / sqrt(var + eps)` (rounded to the parameter type and saturated).
    #[derive(Clone, Copy)]
    pub struct Frozen<'a, P> {
        /// The mean subtracted.
        pub mean: &'a [P],
        /// `1 / sqrt(var + eps)`, exact in `f64` (the reference's).
        pub inv_std: &'a [f64],
        /// `gamma / sqrt(var + eps)` in the parameter type (the fast kernels').
        pub scale: &'a [P],
    }

    /// A training forward's statistics and parameters, as its backward takes them back.
    #[derive(Clone, Copy)]
    pub struct Trained<'a, P> {
        /// The batch mean.
        pub mean: &'a [f64],
        /// `1 / sqrt(var + eps)` of the biased batch variance.
        pub inv_std: &'a [f64],
        /// The gamma the forward used.
        pub gamma: &'a [P],
        /// The beta the forward used.
        pub beta: &'a [P],
        /// The backend the forward ran on.
        pub backend: Backend,
        /// Whether `y` was computed with the reference formula.
        pub reference_y: bool,
    }

    /// The kernels of each pass for the element type `E`. Its implementations, one per
    /// kind of kernel, are in `route.rs`: the `f64` reference, the fast `f32` kernels, the 16-bit
    /// kernels. Every method writes all
    /// of its outputs (`sum_dy`/`sum_dy_xhat`: the per-feature sums of `dy` and `dy * xhat`).
    #[allow(clippy::too_many_arguments)]
    pub trait Route<E: Element> {
        /// The batch mean and biased variance of `x`, and (when the route fuses the two) `y`.
        fn forward_train<S: Spec>(
            backend: Backend,
            x: &[E],
            y: &mut [E],
            tail: Tail<'_, E>,
            dims: Canonical,
            gamma: &[E::Param],
            beta: &[E::Param],
            eps: f64,
            mean: &mut [f64],
            var: &mut [f64],
        ) -> TrainedY;

        /// `tail(normalize(x))` with a frozen transform.
        fn normalize<S: Spec>(
            backend: Backend,
            x: &[E],
            y: &mut [E],
            tail: Tail<'_, E>,
            dims: Canonical,
            k: Frozen<'_, E::Param>,
            gamma: &[E::Param],
            beta: &[E::Param],
        );

        /// [`Route::normalize`] in place.
        fn normalize_inplace<S: Spec>(
            backend: Backend,
            xy: &mut [E],
            tail: Tail<'_, E>,
            dims: Canonical,
            k: Frozen<'_, E::Param>,
            gamma: &[E::Param],
            beta: &[E::Param],
        );

        /// `out = dy` where the pre-activation of [`Route::normalize`] (plus `residual`) is
        /// positive, else 0, recomputed with the same arithmetic.
        fn eval_mask<S: Spec>(
            backend: Backend,
            x: &[E],
            dy: &[E],
            residual: Option<&[E]>,
            out: &mut [E],
            dims: Canonical,
            k: Frozen<'_, E::Param>,
            gamma: &[E::Param],
            beta: &[E::Param],
        );

        /// `out = dy` where the pre-activation of the training forward `t` (plus `residual`) was
        /// positive, else 0, recomputed with that forward's arithmetic. `coefficients`: a
        /// reusable buffer.
        fn train_mask<S: Spec>(
            x: &[E],
            dy: &[E],
            residual: Option<&[E]>,
            out: &mut [E],
            dims: Canonical,
            t: Trained<'_, E::Param>,
            coefficients: &mut Vec<f32>,
        );

        /// The training backward: `dx` and the sums, with the forward's statistics.
        fn backward<S: Spec>(
            backend: Backend,
            x: &[E],
            dy: &[E],
            dx: &mut [E],
            dims: Canonical,
            mean: &[f64],
            inv_std: &[f64],
            gamma: &[E::Param],
            sum_dy: &mut [f64],
            sum_dy_xhat: &mut [f64],
        );

        /// The backward of inference with frozen statistics (`inv_std_p`: `1 / sqrt(var + eps)` in
        /// the parameter type).
        fn backward_eval<S: Spec>(
            backend: Backend,
            x: &[E],
            dy: &[E],
            dx: &mut [E],
            dims: Canonical,
            k: Frozen<'_, E::Param>,
            inv_std_p: &[E::Param],
            gamma: &[E::Param],
            sum_dy: &mut [f64],
            sum_dy_xhat: &mut [f64],
        );

        /// The training backward behind a fused ReLU in one pass (the mask recomputed inside the
        /// kernels), writing the masked gradient into `dresidual` when given; `false` (nothing
        /// written) where the route has no such kernel or `t` was not computed by it on `backend`.
        fn backward_relu<S: Spec>(
            backend: Backend,
            x: &[E],
            dy: &[E],
            residual: Option<&[E]>,
            dresidual: Option<&mut [E]>,
            dx: &mut [E],
            dims: Canonical,
            t: Trained<'_, E::Param>,
            coefficients: &mut Vec<f32>,
            sum_dy: &mut [f64],
            sum_dy_xhat: &mut [f64],
        ) -> bool;

        /// [`Route::backward_relu`] for [`Route::backward_eval`].
        fn backward_eval_relu<S: Spec>(
            backend: Backend,
            x: &[E],
            dy: &[E],
            residual: Option<&[E]>,
            dresidual: Option<&mut [E]>,
            dx: &mut [E],
            dims: Canonical,
            k: Frozen<'_, E::Param>,
            inv_std_p: &[E::Param],
            gamma: &[E::Param],
            beta: &[E::Param],
            sum_dy: &mut [f64],
            sum_dy_xhat: &mut [f64],
        ) -> bool;

        /// The batch mean and biased variance of a shard (synchronized statistics): finite when
        /// the reference's are.
        fn batch_stats<S: Spec>(
            backend: Backend,
            x: &[E],
            dims: Canonical,
            mean: &mut [f64],
            var: &mut [f64],
        );

        /// `tail(normalize(x))` with a training forward's statistics computed elsewhere (the
        /// group's); returns whether `y` was computed with the reference formula.
        fn normalize_trained<S: Spec>(
            backend: Backend,
            x: &[E],
            y: &mut [E],
            tail: Tail<'_, E>,
            dims: Canonical,
            mean: &[f64],
            inv_std: &[f64],
            gamma: &[E::Param],
            beta: &[E::Param],
        ) -> bool;

        /// The sums of a shard's training backward (synchronized statistics).
        fn backward_sums<S: Spec>(
            backend: Backend,
            x: &[E],
            dy: &[E],
            dims: Canonical,
            mean: &[f64],
            inv_std: &[f64],
            sum_dy: &mut [f64],
            sum_dy_xhat: &mut [f64],
        );

        /// The training backward's `dx` given the sums of a batch of `n` values per feature.
        fn backward_dx<S: Spec>(
            backend: Backend,
            x: &[E],
            dy: &[E],
            dx: &mut [E],
            dims: Canonical,
            n: f64,
            mean: &[f64],
            inv_std: &[f64],
            gamma: &[E::Param],
            sum_dy: &[f64],
            sum_dy_xhat: &[f64],
        );
    }

    /// The `f64` reference for every pass: the route of `f64` (implemented in `route.rs`).
    pub enum Reference {}

    /// The fast `f32` kernels: the route of `f32`.
    pub enum Fast32 {}

    /// The 16-bit kernels (blocks widened to `f32`): the route of `bf16` and `f16`.
    pub enum Half16 {}
}
