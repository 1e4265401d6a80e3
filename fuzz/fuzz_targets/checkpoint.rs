//! `cargo +nightly fuzz run checkpoint`: the safetensors checkpoint loader under arbitrary and
//! mutated files (see `../harness/checkpoint.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness/checkpoint.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::run(data));
