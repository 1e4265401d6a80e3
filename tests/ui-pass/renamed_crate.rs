//! A user who renamed the dependency points the generated code at it with `crate = "..."`.
#![deny(missing_docs, warnings)]

extern crate batchnorm as bn;

/// Layer of a renamed crate.
#[bn::batch_norm(features = 4, axes = [0], crate = "bn")]
pub struct RenamedBn;

/// Also from a module.
pub mod nested {
    /// Nested.
    #[bn::batch_norm(features = [2, 3], axes = [0, 3], crate = "bn", preset = "keras")]
    pub struct NestedBn;
}

fn main() {
    let bn: &dyn Fn() -> RenamedBn = &RenamedBn::new;
    assert_eq!(bn().gamma(), &[1.0; 4]);
    assert_eq!(nested::NestedBn::new().config().get_momentum(), 0.99);
}
