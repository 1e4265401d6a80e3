//! Runtime of the `batchnorm` crate: layer state, configuration, layouts, errors and kernels.
//!
//! Most users depend on the facade crate `batchnorm`, which re-exports everything here together
//! with the `#[batch_norm]` attribute. See its documentation for a guided tour.
#![deny(missing_docs)]

/// The 16-bit floating-point formats of `bf16` and `f16` layers ([`half::bf16`], [`half::f16`]),
/// re-exported so that users need no direct dependency.
pub use half;

/// The ndarray whose arrays [`BatchNormArrayExt`] takes (0.17), re-exported so that a user can
/// name the same `ArrayBase` types (`batchnorm::ndarray::Array4`) whatever else they depend on.
#[cfg(feature = "ndarray")]
pub use ndarray;

mod alloc;
#[cfg(feature = "safetensors")]
pub mod checkpoint;
mod config;
mod element;
mod error;
pub mod fold;
pub mod kernels;
mod layer;
mod layout;
pub mod ops;
mod route;
#[doc(hidden)]
pub mod spec;
pub mod sync;
mod traits;

#[cfg(feature = "ndarray")]
mod array;

#[cfg(feature = "ndarray")]
pub use array::BatchNormArrayExt;
pub use config::{Activation, Config, Preset, RunningVar};
pub use element::{Element, Param};
pub use error::BnError;
pub use kernels::Backend;
pub use layer::{BatchNorm, Features};
pub use layout::{Canonical, Family, Layout, MAX_FEATURES};
pub use sync::{StatsGroup, SyncBatchNormExt};
pub use traits::BatchNormLayer;
