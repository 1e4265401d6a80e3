//! Folding a layer's inference transform into a neighbouring convolution or linear layer, so
//! that a deployed model skips the batch norm altogether.
//!
//! In inference a layer computes, per feature `c`, `y = x * s[c] + t[c]` with
//! `s = gamma / sqrt(running_var + eps)` and `t = beta - running_mean * s` ([`scale_shift`]).
//! That is affine, so it composes with the affine layer next to it:
//!
//! - **into the preceding** convolution or linear layer ([`fold_into_preceding`]), whose weight
//!   has the layout `(out, in, k...)` (PyTorch's `Conv1d/2d/3d` and `Linear`) with `out = C`:
//!   `W'[c, ..] = W[c, ..] * s[c]` and `b' = b * s + t` (a bias is created when the layer has
//!   none: `b' = t`).
//! - **into the following** linear layer ([`fold_into_following`]), whose weight is `(out, in)`
//!   with `in = C` (or `in = C * k`, the flattening of an `(N, C, ...)` tensor, channel-major as
//!   PyTorch's `Flatten`): `W'[:, c] = W[:, c] * s[c]` and `b' = b + W t`. (A following
//!   convolution is not offered: with zero padding, the shift `t` would not be applied at the
//!   border, so the fold would not be exact.)
//!
//! The arithmetic is in `f64`, rounded once to the weights' type (`f32` or `f64`). The weights are
//! changed in place and the new bias is returned. Every shape is checked before anything is
//! written: after an `Err` the weights are unchanged.
//!
//! ```
//! use batchnorm::{fold, BatchNorm, BnError};
//!
//! // A linear layer 3 -> 2 followed by a batch norm of its 2 outputs.
//! let mut bn = BatchNorm::new(2, [0])?;
//! bn.update_params(&[2.0, 0.5], &[1.0, -1.0])?;
//! bn.set_running_stats(&[0.5, -2.0], &[4.0, 0.25])?;
//! let mut weight = vec![1.0f32, 2.0, 3.0, -1.0, 0.0, 1.0]; // (out = 2, in = 3)
//! let bias = [0.1f32, 0.2];
//! let x = [1.0f32, -1.0, 0.5];
//!
//! // Unfolded: linear, then the batch norm in inference.
//! let linear = |w: &[f32], b: &[f32]| -> Vec<f32> {
//!     (0..2).map(|o| b[o] + (0..3).map(|i| w[o * 3 + i] * x[i]).sum::<f32>()).collect()
//! };
//! let h = linear(&weight, &bias);
//! let mut expected = vec![0.0; 2];
//! bn.forward_eval(&h, &[1, 2], &mut expected)?;
//!
//! // Folded: the linear layer alone.
//! let folded_bias = fold::fold_into_preceding(&bn, &mut weight, &[2, 3], Some(&bias))?;
//! let got = linear(&weight, &folded_bias);
//! for (g, e) in got.iter().zip(&expected) {
//!     assert!((g - e).abs() < 1e-5, "{g} vs {e}");
//! }
//!
//! // Shapes are checked: a weight whose out axis is not the layer's features is an error.
//! let mut wrong = vec![0.0f32; 6];
//! assert!(matches!(fold::fold_into_preceding(&bn, &mut wrong, &[3, 2], None), Err(BnError::Fold(_))));
//! # Ok::<(), BnError>(())
//! ```

use crate::{BatchNormLayer, BnError, Param};

/// A layer's inference transform, `y = x * scale[c] + shift[c]`, in `f64`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleShift {
    /// `s = gamma / sqrt(running_var + eps)`, one value per feature.
    pub scale: Vec<f64>,
    /// `t = beta - running_mean * s`, one value per feature.
    pub shift: Vec<f64>,
}

/// The layer's inference transform from its parameters, running statistics and eps.
///
/// # Errors
///
/// [`BnError::Fold`] when the layer has `track_running_stats = false`: its inference uses the
/// batch statistics, which no fixed transform can reproduce.
pub fn scale_shift<L: BatchNormLayer + ?Sized>(layer: &L) -> Result<ScaleShift, BnError> {
    if !layer.config().get_track_running_stats() {
        return Err(BnError::Fold(
            "the layer has `track_running_stats = false`: its inference normalizes with the batch \
             statistics, so there are no running statistics to fold"
                .to_owned(),
        ));
    }
    let eps = layer.config().get_eps();
    let (gamma, beta) = (layer.gamma(), layer.beta());
    let (mean, var) = (layer.running_mean(), layer.running_var());
    let scale: Vec<f64> =
        gamma.iter().zip(var).map(|(g, v)| g.to_f64() / (v.to_f64() + eps).sqrt()).collect();
    let shift = beta.iter().zip(mean).zip(&scale).map(|((b, m), s)| b.to_f64() - m.to_f64() * s).collect();
    Ok(ScaleShift { scale, shift })
}

/// Folds the layer into the convolution or linear layer before it: `weight` (row-major, of
/// `weight_shape` = `(out, in, k...)`, with `out` the layer's feature count) is scaled in place
/// and the new bias returned (`bias * s + t`, or `t` when `bias` is `None`).
///
/// For a layer with several feature axes, `out` is their flattened count
/// ([`features()`](BatchNormLayer::features)). A fused activation is not folded: with
/// `activation = "relu"`, apply the ReLU to the folded layer's output.
///
/// # Errors
///
/// [`BnError::Fold`] when `weight_shape` has fewer than 2 axes, its first extent is not the
/// layer's feature count, it does not describe `weight.len()` values, `bias` is not one value per
/// output, a folded value overflows the weights' type, or the layer has no running statistics
/// ([`scale_shift`]). The weights are unchanged after an error.
pub fn fold_into_preceding<L: BatchNormLayer + ?Sized, W: Param>(
    layer: &L,
    weight: &mut [W],
    weight_shape: &[usize],
    bias: Option<&[W]>,
) -> Result<Vec<W>, BnError> {
    let st = scale_shift(layer)?;
    let c = st.scale.len();
    if weight_shape.len() < 2 {
        return Err(BnError::Fold(format!(
            "the preceding layer's weight must have the layout (out, in, k...), got shape {weight_shape:?}"
        )));
    }
    check_weight_len(weight, weight_shape)?;
    if weight_shape[0] != c {
        return Err(BnError::Fold(format!(
            "the preceding layer's weight (out, in, k...) must have out = {c} (the layer's features), \
             got shape {weight_shape:?}"
        )));
    }
    check_bias(bias, c)?;
    // `weight_shape` has at least 2 extents and describes `weight.len()`, so each output owns
    // `row` consecutive values (`row` may be 0: an empty weight).
    let row = weight.len() / c;
    let scaled = |i: usize, w: W| W::from_f64(w.to_f64() * st.scale[i / row]);
    for (i, &w) in weight.iter().enumerate() {
        check_overflow("weight", i, w.is_finite(), scaled(i, w))?;
    }
    let mut new_bias = Vec::with_capacity(c);
    for o in 0..c {
        let b = bias.map_or(W::ZERO, |b| b[o]);
        let folded = W::from_f64(b.to_f64() * st.scale[o] + st.shift[o]);
        check_overflow("bias", o, b.is_finite(), folded)?;
        new_bias.push(folded);
    }
    // Validated: from here on nothing fails.
    for (i, w) in weight.iter_mut().enumerate() {
        *w = scaled(i, *w);
    }
    Ok(new_bias)
}

/// Folds the layer into the linear layer after it: `weight` (row-major, of `weight_shape` =
/// `(out, in)`, with `in` the layer's feature count `C`, or `C * k` for the channel-major
/// flattening of an `(N, C, ...)` tensor with `k` values per channel) is scaled in place, column
/// `j` by `s[j / k]`, and the new bias returned (`bias + W t`, or `W t` when `bias` is `None`).
///
/// # Errors
///
/// [`BnError::Fold`] when `weight_shape` is not `(out, in)` with `in` a positive multiple of the
/// layer's feature count, it does not describe `weight.len()` values, `bias` is not one value per
/// output, a folded value overflows the weights' type, or the layer has no running statistics
/// ([`scale_shift`]), or the layer fuses an activation (`relu(bn(x))` is not affine). The weights
/// are unchanged after an error.
pub fn fold_into_following<L: BatchNormLayer + ?Sized, W: Param>(
    layer: &L,
    weight: &mut [W],
    weight_shape: &[usize],
    bias: Option<&[W]>,
) -> Result<Vec<W>, BnError> {
    if layer.config().get_activation() != crate::Activation::Identity {
        return Err(BnError::Fold(format!(
            "the layer applies `activation = \"{}\"` after the normalization: the linear layer after it \
             sees relu(bn(x)), which is not affine, so the batch norm cannot be folded into it",
            layer.config().get_activation().name()
        )));
    }
    let st = scale_shift(layer)?;
    let c = st.scale.len();
    let &[out, input] = weight_shape else {
        return Err(BnError::Fold(format!(
            "the following linear layer's weight must have the layout (out, in), got shape {weight_shape:?}"
        )));
    };
    check_weight_len(weight, weight_shape)?;
    if input == 0 || input % c != 0 {
        return Err(BnError::Fold(format!(
            "the following linear layer's weight (out, in) must have in = {c} (the layer's features) or a \
             multiple of it (a flattened (N, {c}, ...) tensor), got shape {weight_shape:?}"
        )));
    }
    check_bias(bias, out)?;
    // Column `j` of a row belongs to feature `j / k`.
    let k = input / c;
    let scaled = |i: usize, w: W| W::from_f64(w.to_f64() * st.scale[(i % input) / k]);
    for (i, &w) in weight.iter().enumerate() {
        check_overflow("weight", i, w.is_finite(), scaled(i, w))?;
    }
    let mut new_bias = Vec::with_capacity(out);
    for (o, row) in weight.chunks_exact(input).enumerate() {
        let b = bias.map_or(W::ZERO, |b| b[o]);
        let wt: f64 = row.iter().enumerate().map(|(j, w)| w.to_f64() * st.shift[j / k]).sum();
        let folded = W::from_f64(b.to_f64() + wt);
        check_overflow("bias", o, b.is_finite() && row.iter().all(|w| w.is_finite()), folded)?;
        new_bias.push(folded);
    }
    // Validated: from here on nothing fails.
    for (i, w) in weight.iter_mut().enumerate() {
        *w = scaled(i, *w);
    }
    Ok(new_bias)
}

fn check_weight_len<W>(weight: &[W], weight_shape: &[usize]) -> Result<(), BnError> {
    let count = weight_shape.iter().try_fold(1usize, |acc, &e| acc.checked_mul(e));
    if count != Some(weight.len()) {
        let count = count.map_or_else(|| "more than usize::MAX".to_owned(), |n| n.to_string());
        return Err(BnError::Fold(format!(
            "the weight has {} values but its shape {weight_shape:?} describes {count}",
            weight.len()
        )));
    }
    Ok(())
}

fn check_bias<W>(bias: Option<&[W]>, out: usize) -> Result<(), BnError> {
    match bias {
        Some(b) if b.len() != out => Err(BnError::Fold(format!(
            "the bias must hold one value per output ({out}), got {} values",
            b.len()
        ))),
        _ => Ok(()),
    }
}

/// A folded value that is not finite although its inputs are: it overflowed the weights' type.
/// (Non-finite inputs propagate like IEEE arithmetic.)
fn check_overflow<W: Param>(what: &str, index: usize, inputs_finite: bool, folded: W) -> Result<(), BnError> {
    if inputs_finite && !folded.is_finite() {
        return Err(BnError::Fold(format!(
            "the folded {what}[{index}] overflows the weights' type (it is {})",
            folded.to_f64()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BatchNorm, Config};

    fn layer() -> BatchNorm {
        let mut bn = BatchNorm::with_config(2, [0], Config::new().eps(0.5)).unwrap();
        bn.update_params(&[2.0, 3.0], &[1.0, -1.0]).unwrap();
        bn.set_running_stats(&[4.0, -2.0], &[3.5, 3.5]).unwrap();
        bn
    }

    #[test]
    fn scale_shift_values() {
        // s = gamma / sqrt(var + eps) = [2 / 2, 3 / 2]; t = beta - mean * s = [1 - 4, -1 + 3].
        let st = scale_shift(&layer()).unwrap();
        assert_eq!(st, ScaleShift { scale: vec![1.0, 1.5], shift: vec![-3.0, 2.0] });
    }

    #[test]
    fn exact_small_folds() {
        let bn = layer();
        let mut w = [1.0f32, 2.0, -2.0, 4.0]; // (out 2, in 2)
        let b = fold_into_preceding(&bn, &mut w, &[2, 2], Some(&[1.0, 2.0])).unwrap();
        assert_eq!(w, [1.0, 2.0, -3.0, 6.0]);
        assert_eq!(b, [-2.0, 5.0]);
        let mut w = [1.0f64, 2.0, -2.0, 4.0]; // (out 2, in 2)
        let b = fold_into_following(&bn, &mut w, &[2, 2], None).unwrap();
        assert_eq!(w, [1.0, 3.0, -2.0, 6.0]);
        assert_eq!(b, [1.0, 14.0]); // W t = [-3 + 4, 6 + 8]
    }

    #[test]
    fn empty_weights_do_not_panic() {
        let bn = layer();
        assert_eq!(fold_into_preceding::<_, f32>(&bn, &mut [], &[2, 0, 3], None).unwrap(), [-3.0, 2.0]);
        assert!(fold_into_following::<_, f32>(&bn, &mut [], &[0, 2], None).unwrap().is_empty());
    }
}
