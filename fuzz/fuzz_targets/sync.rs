//! `cargo +nightly fuzz run sync`: synchronized training under arbitrary, truncated and forged
//! messages from the other ranks (see `../harness/sync.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness/sync.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::run(data));
