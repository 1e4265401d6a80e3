//! Semantic checks of the parsed attribute.
//!
//! Each check reports to the [`Ctxt`] and goes on, skipping only the checks a previous error
//! makes meaningless (no "out of range" when the rank is unknown), so the user sees every real
//! mistake in one build and no follow-on ones.

use proc_macro2::Span;

use crate::attr::{Attr, Key, Momentum, Preset, Spanned};
use crate::ctxt::Ctxt;

/// The layout the attribute describes, once checked.
pub(crate) struct Layout {
    /// The feature extents.
    pub features: Vec<u64>,
    /// The reduced axes, ascending.
    pub axes: Vec<u64>,
    pub rank: usize,
    pub first_feature_axis: usize,
    /// The number of features: the product of the extents (fits in 64 bits).
    pub channels: u64,
    /// The static extents of `spatial`: (axis, extent) for every reduced axis after the first.
    pub spatial: Vec<(usize, u64)>,
}

impl Layout {
    /// The product of the extents after the feature axes when every one is static (1 when the
    /// feature axes are last), else `None`.
    pub(crate) fn static_inner(&self) -> Option<u64> {
        let after = self.first_feature_axis + self.features.len();
        (after..self.rank).try_fold(1u64, |acc, axis| {
            let extent = self.spatial.iter().find(|&&(a, _)| a == axis)?.1;
            acc.checked_mul(extent)
        })
    }

    /// The feature axes, as `[first, last]` or `[first]`, for docs.
    pub(crate) fn feature_axes(&self) -> Vec<usize> {
        (self.first_feature_axis..self.first_feature_axis + self.features.len()).collect()
    }
}

/// The largest number of features a layer may have: `bn_core::MAX_FEATURES` (2^31), which this
/// crate cannot name (the runtime depends on nothing of the macro's, and the macro on nothing of
/// the runtime's). `tests/ui-pass/expansion.rs` builds a layer at the limit and compares its
/// `FEATURES` with `batchnorm::MAX_FEATURES`; `tests/ui/features_over_limit.rs` holds the errors.
const MAX_FEATURES: u64 = 1 << 31;

/// How the messages state the limit.
const LIMIT: &str = "the limit is 2147483648 features (2^31, `batchnorm::MAX_FEATURES`)";

/// Checks the attribute; returns the layout when it is valid. Every problem goes to `cx`.
pub(crate) fn validate(cx: &Ctxt, attr: &Attr) -> Option<Layout> {
    check_options(cx, attr);
    check_layout(cx, attr)
}

fn check_options(cx: &Ctxt, attr: &Attr) {
    if let Some(eps) = &attr.eps {
        cx.set_position(attr.position(Key::Eps));
        if !(eps.value.is_finite() && eps.value > 0.0) {
            cx.error_spanned_by(
                &eps.tokens,
                format!("`eps` must be a positive finite number, e.g. `eps = 1e-5`; got {:?}", eps.value),
            );
        }
    }
    if let Some(Spanned { value: Momentum::Value(m), tokens }) = &attr.momentum {
        cx.set_position(attr.position(Key::Momentum));
        if !(0.0..1.0).contains(m) {
            cx.error_spanned_by(
                tokens,
                format!(
                    "`momentum` (the weight of the old running value) must be in [0, 1), got {m:?}; \
                     PyTorch's momentum p is `torch_momentum = p`, and `momentum = \"cumulative\"` is \
                     a cumulative moving average"
                ),
            );
        }
    }
    // PyTorch's momentum is the weight of the new value: `momentum = 0.1` ported from PyTorch
    // would silently be the opposite, so the pytorch preset takes `torch_momentum` only.
    if let (
        Some(Spanned { value: Momentum::Value(_), tokens }),
        Some(Spanned { value: Preset::Pytorch, .. }),
    ) = (&attr.momentum, &attr.preset)
    {
        cx.set_position(attr.position(Key::Momentum));
        cx.error_spanned_by(
            tokens,
            format!(
                "`momentum` is refused with `preset = \"pytorch\"`: here it is the weight of the old \
                 running value, in PyTorch the weight of the new one; for PyTorch's momentum={tokens} \
                 write `torch_momentum = {tokens}`"
            ),
        );
    }
    if let Some(p) = &attr.torch_momentum {
        cx.set_position(attr.position(Key::TorchMomentum));
        if !(p.value > 0.0 && p.value <= 1.0) {
            cx.error_spanned_by(
                &p.tokens,
                format!(
                    "`torch_momentum` (PyTorch's momentum, the weight of the new value) must be in (0, 1], \
                     got {:?}",
                    p.value
                ),
            );
        }
    }
    // Both momentum keys: the error goes on whichever came second.
    let mut momenta =
        attr.given.iter().filter(|(key, _, _)| matches!(key, Key::Momentum | Key::TorchMomentum));
    if let (Some(_), Some((_, position, second))) = (momenta.next(), momenta.next()) {
        cx.set_position(*position);
        cx.error_spanned_by(
            second,
            "`momentum` and `torch_momentum` both set the momentum; give only one of them \
             (`torch_momentum = p` is `momentum = 1 - p`; PyTorch's `momentum=None` is \
             `momentum = \"cumulative\"`)",
        );
    }
}

fn check_layout(cx: &Ctxt, attr: &Attr) -> Option<Layout> {
    if !attr.malformed {
        cx.set_position(Ctxt::MISSING);
        for (key, example) in [
            (Key::Features, "`features = 64` (one feature axis) or `features = [55, 55]` (adjacent ones)"),
            (Key::Axes, "`axes = [0, 2, 3]` (the reduced axes: N, H and W of NCHW)"),
        ] {
            if !attr.is_given(key) && !attr.misspelled.contains(&key) {
                cx.error_at(Span::call_site(), format!("missing `{}`: add {example}", key.name()));
            }
        }
    }
    cx.set_position(attr.position(Key::Features));
    let features = attr.features.as_ref().and_then(|features| check_features(cx, features));
    // The rank is known when the features' count is, even if an extent is wrong.
    let n_features = attr.features.as_ref().map(|f| f.value.len()).filter(|&n| n > 0);
    cx.set_position(attr.position(Key::Axes));
    let axes_ok = attr.axes.as_ref().is_some_and(|axes| check_axes(cx, axes, n_features));
    let (features, channels) = features?;
    if !axes_ok {
        return None;
    }
    let axes: Vec<u64> = attr.axes.as_ref()?.value.iter().map(|a| a.value).collect();
    let rank = axes.len() + features.len();
    let first_feature_axis = (0..rank).find(|&a| !axes.contains(&(a as u64)))?;
    let spatial = match &attr.spatial {
        Some(spatial) => {
            cx.set_position(attr.position(Key::Spatial));
            check_spatial(cx, spatial, &axes, channels)?
        }
        None => Vec::new(),
    };
    Some(Layout { features, axes, rank, first_feature_axis, channels, spatial })
}

/// Checks `spatial` against the reduced axes: one positive extent per reduced axis after the
/// first, whose product with the `channels` features fits in `usize` (else no tensor of the
/// layer has an element count). Returns the (axis, extent) pairs.
fn check_spatial(
    cx: &Ctxt,
    spatial: &Spanned<Vec<Spanned<u64>>>,
    axes: &[u64],
    channels: u64,
) -> Option<Vec<(usize, u64)>> {
    let later: Vec<u64> = axes[1..].to_vec();
    if later.is_empty() {
        cx.error_spanned_by(
            &spatial.tokens,
            format!(
                "`spatial` gives the extents of the reduced axes after the first, and `axes = {axes:?}` has \
                 none: remove `spatial`"
            ),
        );
        return None;
    }
    if spatial.value.len() != later.len() {
        cx.error_spanned_by(
            &spatial.tokens,
            format!(
                "`spatial` gives the extents of the reduced axes after the first (axes {later:?} for \
                 `axes = {axes:?}`, in that order): expected {} {}, got {}",
                later.len(),
                plural(later.len(), "extent", "extents"),
                spatial.value.len()
            ),
        );
        return None;
    }
    let mut ok = true;
    for extent in &spatial.value {
        if extent.value == 0 || usize::try_from(extent.value).is_err() {
            cx.error_spanned_by(
                &extent.tokens,
                format!("spatial extents must be positive, got {}", extent.value),
            );
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    let extents: Vec<u64> = spatial.value.iter().map(|e| e.value).collect();
    let elements = extents
        .iter()
        .try_fold(channels, |acc, &e| acc.checked_mul(e))
        .filter(|&n| usize::try_from(n).is_ok());
    if elements.is_none() {
        cx.error_spanned_by(
            &spatial.tokens,
            format!(
                "`spatial` is too large: the elements of a tensor of this layer per index of axis {} \
                 ({channels} {} x the `spatial` extents {}) overflow usize",
                axes[0],
                plural(channels as usize, "feature", "features"),
                extents.iter().map(u64::to_string).collect::<Vec<_>>().join(" x "),
            ),
        );
        return None;
    }
    Some(later.iter().zip(&spatial.value).map(|(&a, e)| (a as usize, e.value)).collect())
}

/// The extents and their product when they are valid.
fn check_features(cx: &Ctxt, features: &Spanned<Vec<Spanned<u64>>>) -> Option<(Vec<u64>, u64)> {
    if features.value.is_empty() {
        cx.error_spanned_by(
            &features.tokens,
            "`features` must name at least one extent, e.g. `features = 64` or `features = [55, 55]`",
        );
        return None;
    }
    let mut ok = true;
    for extent in &features.value {
        if extent.value == 0 {
            cx.error_spanned_by(&extent.tokens, "feature extents must be positive, got 0");
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    // An extent over the limit is the offending token; otherwise their product is.
    let single = features.value.len() == 1;
    for extent in &features.value {
        if extent.value > MAX_FEATURES {
            let message = if single {
                format!("{} features are too many: {LIMIT}", extent.value)
            } else {
                format!("the feature extent {} is too large: {LIMIT}", extent.value)
            };
            cx.error_spanned_by(&extent.tokens, message);
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    let extents: Vec<u64> = features.value.iter().map(|f| f.value).collect();
    let channels =
        extents.iter().try_fold(1u64, |acc, &f| acc.checked_mul(f)).filter(|&c| usize::try_from(c).is_ok());
    let Some(channels) = channels else {
        cx.error_spanned_by(
            &features.tokens,
            format!(
                "the number of features (the product of the extents {extents:?}) overflows usize; {LIMIT}"
            ),
        );
        return None;
    };
    if channels > MAX_FEATURES {
        cx.error_spanned_by(
            &features.tokens,
            format!("{channels} features (the product of the extents {extents:?}) are too many: {LIMIT}"),
        );
        return None;
    }
    Some((extents, channels))
}

/// Checks the reduced axes; with the number of feature extents (when known) also against the
/// rank `axes.len() + n_features`. `true` when they are valid. Reports each offending axis once,
/// with the first reason that applies.
fn check_axes(cx: &Ctxt, axes: &Spanned<Vec<Spanned<u64>>>, n_features: Option<usize>) -> bool {
    if axes.value.is_empty() {
        cx.error_spanned_by(
            &axes.tokens,
            "`axes` must name at least one reduced axis (the axes the statistics are taken over), \
             e.g. `axes = [0]`",
        );
        return false;
    }
    let n_axes = axes.value.len();
    let mut ok = true;
    let mut seen: Vec<u64> = Vec::with_capacity(n_axes);
    for axis in &axes.value {
        let a = axis.value;
        let message = if seen.contains(&a) {
            Some(format!(
                "axis {a} is repeated in `axes`; the reduced axes and the feature axes cover each axis \
                 exactly once"
            ))
        } else if let Some((n_features, rank)) =
            n_features.map(|n| (n, n + n_axes)).filter(|&(_, r)| a >= r as u64)
        {
            Some(format!(
                "axis {a} is out of range: {n_axes} reduced {} and {n_features} feature {} make rank {rank}, \
                 so axes are in 0..{rank}",
                plural(n_axes, "axis", "axes"),
                plural(n_features, "axis", "axes"),
            ))
        } else if let Some(&previous) = seen.last().filter(|&&p| p > a) {
            Some(format!("`axes` must be ascending: axis {a} comes after axis {previous}"))
        } else {
            None
        };
        if let Some(message) = message {
            cx.error_spanned_by(&axis.tokens, message);
            ok = false;
        }
        seen.push(a);
    }
    let Some(n_features) = n_features else {
        return false;
    };
    if !ok {
        return false;
    }
    let rank = n_axes + n_features;
    // In range and distinct: the feature axes are the rest; they must form one run.
    let feature_axes: Vec<usize> = (0..rank).filter(|&a| !seen.contains(&(a as u64))).collect();
    let adjacent = feature_axes.windows(2).all(|w| w[1] == w[0] + 1);
    if !adjacent {
        let example: Vec<usize> = (0..n_axes).collect();
        cx.error_spanned_by(
            &axes.tokens,
            format!(
                "the feature axes (the axes not in `axes`) must be adjacent, got {feature_axes:?}; \
                 the {n_axes} reduced {} must leave one run of {n_features} feature {}, e.g. `axes = {example:?}`",
                plural(n_axes, "axis", "axes"),
                plural(n_features, "axis", "axes"),
            ),
        );
        return false;
    }
    true
}

fn plural(n: usize, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 {
        one
    } else {
        many
    }
}
