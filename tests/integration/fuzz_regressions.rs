//! The fuzz targets' harnesses (`fuzz/harness/*.rs`, compiled here as modules) replayed on
//!
//! - every input a fuzz run ever failed on, kept in `tests/data/fuzz/<target>/` (add a new
//!   crash input there, under the name libFuzzer gave it, when you fix what it found);
//! - a few hundred deterministic pseudo-random inputs per target, so that the harnesses, and
//!   the properties they check, stay in step with the crate in every `cargo test`.
//!
//! Run the fuzz targets themselves with `cargo +nightly fuzz run layer` (see docs/RELIABILITY.md).

#[path = "../../fuzz/harness/checkpoint.rs"]
mod checkpoint_harness;
#[path = "../../fuzz/harness/layer.rs"]
mod layer_harness;
#[path = "../../fuzz/harness/sync.rs"]
mod sync_harness;

use std::path::PathBuf;

/// The saved inputs of one target, sorted by name.
fn saved_inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz").join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .filter(|(name, _)| !name.starts_with('.') && !name.ends_with(".md"))
        .collect();
    out.sort();
    out
}

/// Runs `harness` on each input, naming the input of a failure.
fn replay(target: &str, inputs: &[(String, Vec<u8>)], harness: fn(&[u8])) {
    for (name, bytes) in inputs {
        let r = std::panic::catch_unwind(|| harness(bytes));
        if let Err(panic) = r {
            eprintln!("fuzz target `{target}`: input {name} ({} bytes) fails", bytes.len());
            std::panic::resume_unwind(panic);
        }
    }
}

/// `count` pseudo-random inputs (SplitMix64) of up to `max_len` bytes.
fn random_inputs(seed: u64, count: usize, max_len: usize) -> Vec<(String, Vec<u8>)> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (0..count)
        .map(|k| {
            let len = (next() as usize) % (max_len + 1);
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            (format!("random #{k} of seed {seed}"), bytes)
        })
        .collect()
}

#[test]
fn layer_saved_inputs() {
    replay("layer", &saved_inputs("layer"), layer_harness::run);
}

#[test]
fn checkpoint_saved_inputs() {
    replay("checkpoint", &saved_inputs("checkpoint"), checkpoint_harness::run);
}

#[test]
fn layer_harness_on_random_inputs() {
    let count = if cfg!(miri) { 4 } else { 3000 };
    replay("layer", &random_inputs(1, count, 400), layer_harness::run);
}

#[test]
fn checkpoint_harness_on_random_inputs() {
    let count = if cfg!(miri) { 8 } else { 3000 };
    replay("checkpoint", &random_inputs(2, count, 300), checkpoint_harness::run);
}

#[test]
fn sync_saved_inputs() {
    replay("sync", &saved_inputs("sync"), sync_harness::run);
}

#[test]
fn sync_harness_on_random_inputs() {
    let count = if cfg!(miri) { 4 } else { 3000 };
    replay("sync", &random_inputs(3, count, 300), sync_harness::run);
}
