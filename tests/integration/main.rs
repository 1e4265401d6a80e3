//! The facade's integration tests, as one test crate with a module per subject, so that the
//! suite compiles and links once. `common` holds the shared helpers; the UI tests
//! (`tests/compiletest.rs`, trybuild) stay a crate of their own.

mod common;

mod activation;
mod checkpoint;
mod concurrency;
mod conformance;
mod dtypes;
mod extreme_shapes;
mod finite_differences;
mod fold;
mod fuzz_regressions;
/// Public, so that `#![deny(missing_docs)]` in it checks the docs of what `#[batch_norm]`
/// generates.
pub mod macro_api;
mod nonfinite;
mod numerics;
mod ops;
mod properties;
mod semantics;
mod spatial;
mod sync;
mod train_mlp;
