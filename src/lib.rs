//! placeholder
pub use bn_core::*;
pub use bn_macros::batch_norm;
#[doc(hidden)]
pub mod __private {
    pub use bn_core::spec::{Dynamic, Spec};
    pub use bn_core::{BatchNorm, BatchNormLayer, BnError, Config, Element, Preset, RunningVar};
}
