//! What follows the normalize: the [`Epilogue`] of the forward kernels (nothing, a ReLU, a
//! residual added and a ReLU), its forms in the kernel bodies ([`Apply`]), and, for the
//! backward behind a fused ReLU, the forward's transform ([`FusedRelu`]) and the gradient's kind
//! ([`NONE`], [`RELU`], [`ADD_RELU`]).

use core::ops::Range;

use super::simd::{pass_positive, relu, Isa};
use super::vector::{affine, load_at, Pos};
use crate::Canonical;

/// What the forward kernels do to each output value before storing it: fused into the same
/// pass, so an activation costs no extra traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum Epilogue<'a> {
    /// Store the normalized value.
    #[default]
    None,
    /// `relu(y)`: `0` where `y < 0`, else `y` (NaN passes through, as in PyTorch).
    Relu,
    /// `relu(y + residual[i])` (a ResNet block's tail); the slice holds one value per element.
    AddRelu(&'a [f32]),
}

impl Epilogue<'_> {
    /// The residual slice, if any.
    pub(crate) fn residual(&self) -> Option<&[f32]> {
        match *self {
            Epilogue::AddRelu(r) => Some(r),
            _ => None,
        }
    }
    /// Applies the epilogue to `y` in place (after an unfused normalize).
    pub(crate) fn apply_to(&self, y: &mut [f32]) {
        match *self {
            Epilogue::None => {}
            Epilogue::Relu => y.iter_mut().for_each(|v| *v = relu(*v)),
            Epilogue::AddRelu(r) => {
                let act = Act::<true> { residual: r };
                for (i, v) in y.iter_mut().enumerate() {
                    *v = act.apply1(i, *v);
                }
            }
        }
    }
}

/// Runs `$body` with `$act` bound to the internal epilogue of `$epilogue` (a type per kind, so
/// the plain path stays free of branches).
macro_rules! with_act {
    ($epilogue:expr, |$act:ident| $body:expr) => {
        match $epilogue {
            $crate::kernels::Epilogue::None => {
                let $act = $crate::kernels::epilogue::Identity;
                $body
            }
            $crate::kernels::Epilogue::Relu => {
                let $act = $crate::kernels::epilogue::Act::<false> { residual: &[] };
                $body
            }
            $crate::kernels::Epilogue::AddRelu(r) => {
                let $act = $crate::kernels::epilogue::Act::<true> { residual: r };
                $body
            }
        }
    };
}
pub(crate) use with_act;

/// The ReLU a layer fused into its forward, as the backward behind it needs it: the forward's
/// per-channel transform `(x - mean) * scale + shift` (for a training forward of the fast
/// kernels, the coefficients [`train_coefficients`](super::train_coefficients) gives; in inference, those the forward
/// used) and the residual the forward added before the ReLU, if any. Its gradient is `dy`
/// where that pre-activation was positive, else `0` ([`relu_grad`](super::relu_grad)).
///
/// The backward kernels take the same type, with the transform per virtual column in the rows
/// family, and its default (empty slices, no residual) for a gradient of kind `NONE`, which
/// never reads it.
#[derive(Debug, Clone, Copy, Default)]
pub struct FusedRelu<'a> {
    /// Per-channel `mean` of the forward's transform.
    pub mean: &'a [f32],
    /// Per-channel `scale`.
    pub scale: &'a [f32],
    /// Per-channel `shift`.
    pub shift: &'a [f32],
    /// The residual of `relu(bn(x) + residual)` (`dims.len()` values), if the forward had one.
    pub residual: Option<&'a [f32]>,
}

impl FusedRelu<'_> {
    pub(crate) fn check(&self, dims: Canonical) {
        let c = dims.channels;
        assert!(
            self.mean.len() == c && self.scale.len() == c && self.shift.len() == c,
            "the ReLU's transform must hold dims.channels values"
        );
        if let Some(r) = self.residual {
            assert_eq!(r.len(), dims.len(), "the residual must hold dims.len() values");
        }
    }
}

/// An [`Epilogue`] as the kernel bodies apply it to a computed output vector before storing
/// it, one type per kind so that the plain path has no branches: nothing ([`Identity`]), a ReLU
/// with an optional residual added first ([`Act`]), or the ReLU's gradient mask applied to `dy`
/// ([`MaskGrad`]). Holds slices aligned with the output; `part` cuts them as the
/// output is cut, so that position `pos` of a segment is position `pos` of its slices.
pub(crate) trait Apply: Copy + Send + Sync {
    /// The vector to store for the computed `v` at `pos` of the current segment.
    fn apply<I: Isa>(self, isa: I, pos: Pos, v: I::V) -> I::V;
    /// The same for one value at index `i`.
    fn apply1(self, i: usize, v: f32) -> f32;
    /// The epilogue of the values `start..end`.
    fn part(self, start: usize, end: usize) -> Self;
}

/// Stores the computed values.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Identity;

impl Apply for Identity {
    #[inline(always)]
    fn apply<I: Isa>(self, _isa: I, _pos: Pos, v: I::V) -> I::V {
        v
    }
    #[inline(always)]
    fn apply1(self, _i: usize, v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn part(self, _start: usize, _end: usize) -> Self {
        self
    }
}

/// `relu(v + residual)` when `RES`, else `relu(v)` (`residual` is then empty and unread): a
/// type per form, so that neither loop tests for the residual per vector.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Act<'a, const RES: bool> {
    pub residual: &'a [f32],
}

impl<const RES: bool> Apply for Act<'_, RES> {
    #[inline(always)]
    fn apply<I: Isa>(self, isa: I, pos: Pos, v: I::V) -> I::V {
        if RES {
            isa.relu(isa.add(v, load_at(isa, self.residual, pos)))
        } else {
            isa.relu(v)
        }
    }
    #[inline(always)]
    fn apply1(self, i: usize, v: f32) -> f32 {
        if RES {
            relu(v + self.residual[i])
        } else {
            relu(v)
        }
    }
    #[inline(always)]
    fn part(self, start: usize, end: usize) -> Self {
        if RES {
            Act { residual: &self.residual[start..end] }
        } else {
            self
        }
    }
}

/// `dy` where `v (+ residual) > 0`, else 0: with `v` the forward's pre-activation (recomputed
/// by the same arithmetic), the gradient that reaches the normalization.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MaskGrad<'a> {
    pub dy: &'a [f32],
    pub residual: Option<&'a [f32]>,
}

impl Apply for MaskGrad<'_> {
    #[inline(always)]
    fn apply<I: Isa>(self, isa: I, pos: Pos, v: I::V) -> I::V {
        let v = match self.residual {
            Some(r) => isa.add(v, load_at(isa, r, pos)),
            None => v,
        };
        isa.pass_positive(v, load_at(isa, self.dy, pos))
    }
    #[inline(always)]
    fn apply1(self, i: usize, v: f32) -> f32 {
        let v = match self.residual {
            Some(r) => v + r[i],
            None => v,
        };
        pass_positive(v, self.dy[i])
    }
    #[inline(always)]
    fn part(self, start: usize, end: usize) -> Self {
        MaskGrad { dy: &self.dy[start..end], residual: self.residual.map(|r| &r[start..end]) }
    }
}

/// Which gradient a backward kernel differentiates (a const parameter of its body), named after
/// the forward's [`Epilogue`]: `dy` itself ([`NONE`]), or, behind a fused ReLU, `dy` where the
/// forward's pre-activation was positive ([`RELU`]: `(x - m) * s + t`; [`ADD_RELU`]: plus the
/// residual). The masked kernels
/// recompute the pre-activation from `x` with the forward's arithmetic as they read `dy`, so no
/// mask is stored and no pass is added.
pub(crate) const NONE: u8 = 0;
/// See [`NONE`].
pub(crate) const RELU: u8 = 1;
/// See [`NONE`].
pub(crate) const ADD_RELU: u8 = 2;

/// The gradient of kind `MASK` (see [`NONE`]) for the vectors `x` and `dy`: `a` holds the
/// forward's `m, s, t` there, `r` loads the residual's vector (called for [`ADD_RELU`] only).
/// The same arithmetic as the forward's `relu((x - m) * s + t (+ r))` and [`MaskGrad`].
#[inline(always)]
pub(crate) fn masked<I: Isa, const MASK: u8>(
    isa: I,
    x: I::V,
    dy: I::V,
    a: [I::V; 3],
    r: impl FnOnce() -> I::V,
) -> I::V {
    if MASK == NONE {
        return dy;
    }
    let v = affine(isa, x, a[0], a[1], a[2]);
    let v = if MASK == ADD_RELU { isa.add(v, r()) } else { v };
    isa.pass_positive(v, dy)
}

/// The residual's values `r` (empty unless `MASK` is [`ADD_RELU`]).
#[inline(always)]
pub(crate) fn residual_of<'a, const MASK: u8>(mask: &FusedRelu<'a>, r: Range<usize>) -> &'a [f32] {
    if MASK == ADD_RELU {
        &mask.residual.unwrap_or(&[])[r]
    } else {
        &[]
    }
}
