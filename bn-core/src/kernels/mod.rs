//! Kernels over the canonical `(outer, C, inner)` view.
//!
//! [`reference`] is the scalar oracle (f64 accumulation, two-pass statistics) every other path
//! is tested against.

pub mod reference;
