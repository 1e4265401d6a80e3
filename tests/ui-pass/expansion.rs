//! Expansions that must compile without a single warning, even under `missing_docs`.
#![deny(missing_docs, warnings)]

use batchnorm::{batch_norm, BatchNormLayer};

/// NCHW, as the user's own docs say.
#[batch_norm(features = 64, axes = [0, 2, 3])]
#[derive(Clone, Debug, Default)] // skipped: the expansion implements them
#[repr(Rust)]
pub struct StemBn;

/// The seed's layout, with every option.
#[batch_norm(
    features = [55, 55],
    axes = [0],
    preset = "pytorch",
    eps = 1e-3,
    torch_momentum = 0.01,
    running_var = "biased",
    center = false,
    scale = true,
    track_running_stats = true,
    crate = "::batchnorm",
)]
pub struct SeedBn;

/// Public in the crate only; the derive of `Debug` is written by path.
pub mod private {
    use batchnorm::batch_norm;

    /// NHWC.
    #[batch_norm(features = 16, axes = [0, 1, 2], momentum = 0, eps = 1)]
    #[derive(core::fmt::Debug)]
    pub(crate) struct NhwcBn;
}

/// Not public: no docs needed, no dead-code warning for the methods it does not call.
#[batch_norm(features = 3, axes = [0, 2])]
struct LocalBn;

macro_rules! layer {
    ($name:ident, $features:expr, $eps:expr) => {
        /// A layer declared through `macro_rules!`.
        #[batch_norm(features = $features, axes = [0], eps = $eps)]
        pub struct $name;
    };
}
layer!(MacroBn, 8, 1e-4);

/// The most features a layer may have (`new()` is not called: its state is 176 GiB).
#[batch_norm(features = [65536, 32768], axes = [0])]
pub struct AtTheLimit;

fn features<L: BatchNormLayer>(layer: &L) -> usize {
    layer.features()
}

fn main() {
    let stem = StemBn::default();
    let _ = format!("{:?}", stem.clone());
    assert_eq!(features(&SeedBn::new()), 55 * 55);
    assert_eq!(private::NhwcBn::RANK, 4);
    let mut local = LocalBn::new();
    let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
    let mut y = [0.0f32; 12];
    local.forward_train(&x, &[2, 3, 2], &mut y).unwrap();
    assert_eq!(MacroBn::FEATURES, 8);
    assert_eq!(AtTheLimit::FEATURES, batchnorm::MAX_FEATURES);
    in_a_function();
}

/// Configured out: the impls go with the struct.
#[batch_norm(features = 2, axes = [0])]
#[cfg(any())]
pub struct ConfiguredOut;

/// Configured in.
#[batch_norm(features = 2, axes = [0])]
#[cfg(all())]
pub struct ConfiguredIn;

/// A raw identifier.
#[batch_norm(features = 2, axes = [0])]
pub struct r#Type;

fn in_a_function() {
    /// A layer local to a function.
    #[batch_norm(features = 2, axes = [0])]
    struct Local;
    assert_eq!(format!("{:?}", Local::new()).get(..6), Some("Local("));
    assert_eq!(format!("{:?}", r#Type::new()).get(..5), Some("Type("));
    assert_eq!(ConfiguredIn::FEATURES, 2);
}
