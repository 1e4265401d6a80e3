//! Which SIMD backend the layers run, as the table and the JSON report it.
//!
//! bn-core selects its kernels once per process; `BN_BACKEND=scalar|wide|avx2|avx512` forces one
//! (docs/ARCHITECTURE.md, "Backends and dispatch"). `--backend` sets that variable before the first layer runs.
//!
//! This crate does not decide anything about backends: it asks bn-core which one runs.

/// The backend names `--backend` accepts (those of `BN_BACKEND`).
pub const BACKEND_NAMES: [&str; 4] = ["scalar", "wide", "avx2", "avx512"];

/// Requests a backend for this process: sets `BN_BACKEND`, which bn-core reads once, when it
/// first picks its kernels ([`batchnorm::Backend::detect`]). Call it before any layer runs.
/// `name` should be one of [`BACKEND_NAMES`] (bn-core falls back, with a line on stderr, on
/// anything else).
pub fn request_backend(name: &str) {
    // Edition 2021: `set_var` is safe to call; bn-bench sets it before it starts any thread
    // that could read the environment (the Rayon pool is built afterwards).
    std::env::set_var(batchnorm::kernels::BACKEND_ENV, name);
}

/// The name of the backend the layers run (`scalar` is the `f64` reference).
pub fn backend_name() -> String {
    batchnorm::Backend::detect().name().to_string()
}

/// A note for the report when the backend that runs is not the one requested, if any.
pub fn backend_note() -> Option<String> {
    let requested = std::env::var(batchnorm::kernels::BACKEND_ENV).ok().filter(|b| !b.is_empty())?;
    let running = backend_name();
    (requested != running)
        .then(|| format!("BN_BACKEND={requested} was requested; this machine runs `{running}`"))
}
