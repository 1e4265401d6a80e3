//! `cargo +nightly fuzz run layer`: the runtime-generic layer under arbitrary layouts,
//! configurations, backends and call sequences (see `../harness/layer.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness/layer.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::run(data));
