//! The `#[batch_norm]` attribute's compile errors (`tests/ui`, each with the `.stderr` it must
//! produce) and expansions that must compile without a warning (`tests/ui-pass`).
//!
//! Regenerate the expected output with `TRYBUILD=overwrite cargo test --test compiletest`, then
//! read the diff: every message must say what is allowed, at the offending token.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    t.pass("tests/ui-pass/*.rs");
}
