//! Which instruction set the fast kernels use: detected once, cached, overridable.
//!
//! As in gemm and pulp, the best available backend is detected at run time (best first: AVX-512,
//! AVX2+FMA+F16C, the portable `wide` path) and cached; `BN_BACKEND=scalar|wide|avx2|avx512` forces
//! one for the process, as matrixmultiply's `MMTEST_FEATURE` does. Code can also pass a
//! [`Backend`] explicitly to every kernel, which is how the tests run all of them in one process.

use core::fmt;
use core::str::FromStr;
use std::sync::OnceLock;

/// An implementation of the `f32` kernels.
///
/// Results are bit-identical across thread counts within one backend, not across backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// The `f64` scalar reference kernels (the oracle the others are tested against).
    Scalar,
    /// Portable SIMD through the `wide` crate (its instructions are fixed when it is compiled:
    /// SSE2 on a default x86-64 build, NEON on aarch64).
    Wide,
    /// x86-64 AVX2, FMA and F16C through `core::arch`, chosen at run time.
    Avx2,
    /// x86-64 AVX-512F through `core::arch` (masked tails), chosen at run time.
    Avx512,
}

/// The environment variable that forces a backend for the whole process.
pub const BACKEND_ENV: &str = "BN_BACKEND";

impl Backend {
    /// Every backend, slowest first.
    pub const ALL: [Backend; 4] = [Backend::Scalar, Backend::Wide, Backend::Avx2, Backend::Avx512];

    /// The backend the layers use: the best one this machine runs, unless `BN_BACKEND` names
    /// another. Computed once per process and cached.
    ///
    /// A forced backend the machine lacks, or an unknown name, falls back to the best available
    /// one with one line on stderr; it never panics.
    pub fn detect() -> Backend {
        static DETECTED: OnceLock<Backend> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let best = Backend::best();
            match std::env::var(BACKEND_ENV) {
                Err(std::env::VarError::NotPresent) => best,
                Err(std::env::VarError::NotUnicode(v)) => {
                    eprintln!("batchnorm: {BACKEND_ENV}={v:?} is not a backend name; using {best}");
                    best
                }
                Ok(v) if v.trim().is_empty() => best,
                Ok(v) => match v.parse::<Backend>() {
                    Ok(b) if b.is_available() => b,
                    Ok(b) => {
                        eprintln!("batchnorm: {BACKEND_ENV}={b} is not supported by this CPU; using {best}");
                        best
                    }
                    Err(e) => {
                        eprintln!("batchnorm: {e}; using {best}");
                        best
                    }
                },
            }
        })
    }

    /// The best backend this machine runs (ignores `BN_BACKEND`).
    pub fn best() -> Backend {
        *Backend::ALL.iter().rev().find(|b| b.is_available()).unwrap_or(&Backend::Scalar)
    }

    /// Whether this machine can run the backend. `Scalar` and `Wide` always can.
    pub fn is_available(self) -> bool {
        match self {
            Backend::Scalar | Backend::Wide => true,
            Backend::Avx2 => has_avx2(),
            Backend::Avx512 => has_avx512(),
        }
    }

    /// Every backend this machine runs, `Scalar` first.
    pub fn available() -> Vec<Backend> {
        Backend::ALL.iter().copied().filter(|b| b.is_available()).collect()
    }

    /// The backend's name, as `BN_BACKEND` takes it: `scalar`, `wide`, `avx2` or `avx512`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Scalar => "scalar",
            Backend::Wide => "wide",
            Backend::Avx2 => "avx2",
            Backend::Avx512 => "avx512",
        }
    }

    /// The backend the kernels actually run for `self`: itself when available, else the best
    /// available one below it (so an explicit backend the machine lacks is never undefined
    /// behavior).
    #[inline]
    pub(crate) fn usable(self) -> Backend {
        if self.is_available() {
            self
        } else {
            *Backend::ALL[..self as usize].iter().rev().find(|b| b.is_available()).unwrap_or(&Backend::Scalar)
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error of parsing a [`Backend`] name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseBackendError(String);

impl fmt::Display for ParseBackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown backend {:?} (expected scalar, wide, avx2 or avx512)", self.0)
    }
}

impl std::error::Error for ParseBackendError {}

impl FromStr for Backend {
    type Err = ParseBackendError;

    /// Parses a name as `BN_BACKEND` takes it (case-insensitive, surrounding spaces ignored).
    fn from_str(s: &str) -> Result<Backend, ParseBackendError> {
        let name = s.trim();
        Backend::ALL
            .iter()
            .copied()
            .find(|b| b.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| ParseBackendError(name.to_string()))
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2() -> bool {
    // F16C (the `f16` conversions) shipped before AVX2 on every x86-64 line; requiring it lets
    // the AVX2 kernels convert `f16` inline instead of testing for it per vector.
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f") && has_avx2()
}

#[cfg(not(target_arch = "x86_64"))]
#[inline]
pub(crate) fn has_avx2() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
#[inline]
pub(crate) fn has_avx512() -> bool {
    false
}
