//! The kernel contract: what a SIMD instruction set offers the generic kernel bodies.
//!
//! As in matrixmultiply (`KernelAvx`, `KernelFmaAvx2`, `KernelFallback`) and pulp (`Simd`), every
//! instruction set is a zero-sized *token* type implementing [`Isa`]; a token of a `core::arch`
//! instruction set can only be made when the CPU has it, which is what makes its methods safe.
//! Kernel bodies are written once, generic over `I: Isa`, as a [`Kernel`]; [`Isa::vectorize`]
//! runs one inside a thin `#[target_feature]` wrapper so that, after inlining, the whole body is
//! compiled for that instruction set ([`isa`]).
//!
//! The layer at the bottom of the kernels: the contract, its backends ([`portable`]'s `wide`,
//! [`x86`]'s AVX2 and AVX-512), their detection ([`backend`]), and the 16-bit formats' bit
//! conversions ([`bits`]).

pub(crate) mod backend;
pub(crate) mod bits;
mod isa;
pub(crate) mod portable;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

pub(crate) use isa::{pass_positive, relu, Isa, Kernel, Serial};

/// Runs `$body` with `$isa` bound to the instruction-set token of `$backend`: the one place that
/// turns a [`Backend`](backend::Backend) into a token. `Avx512` and `Avx2` get their
/// `core::arch` token (`$fallback` where the CPU lacks it, which `Backend::usable` rules out);
/// the other backends get `$fallback`: the portable `Wide` token unless an `else` is given.
/// With `bf16`, the AVX-512 token is the one with AVX512-BF16's conversions where the CPU has
/// them (the same bits; for `bf16` data). `$body` is instantiated once per token.
macro_rules! with_isa {
    ($backend:expr, bf16, |$isa:ident| $body:expr, else $fallback:expr) => {
        match $backend {
            #[cfg(target_arch = "x86_64")]
            $crate::kernels::simd::backend::Backend::Avx512 => {
                match $crate::kernels::simd::x86::Avx512Bf16::with_bf16() {
                    Some($isa) => $body,
                    None => $crate::kernels::simd::with_isa!(
                        $crate::kernels::simd::backend::Backend::Avx512,
                        |$isa| $body,
                        else $fallback
                    ),
                }
            }
            backend => $crate::kernels::simd::with_isa!(backend, |$isa| $body, else $fallback),
        }
    };
    ($backend:expr, |$isa:ident| $body:expr, else $fallback:expr) => {
        match $backend {
            #[cfg(target_arch = "x86_64")]
            $crate::kernels::simd::backend::Backend::Avx512 => match $crate::kernels::simd::x86::Avx512::new() {
                Some($isa) => $body,
                None => $fallback,
            },
            #[cfg(target_arch = "x86_64")]
            $crate::kernels::simd::backend::Backend::Avx2 => match $crate::kernels::simd::x86::Avx2::new() {
                Some($isa) => $body,
                None => $fallback,
            },
            _ => $fallback,
        }
    };
    ($backend:expr, |$isa:ident| $body:expr) => {
        $crate::kernels::simd::with_isa!($backend, |$isa| $body, else {
            let $isa = $crate::kernels::simd::portable::Wide;
            $body
        })
    };
}
pub(crate) use with_isa;

/// Runs `f` compiled for `backend`'s instruction set, so that its loops are vectorized for it
/// (the layers' per-feature bookkeeping: square roots and divisions of `C` statistics).
/// `Scalar` and `Wide` run it as it is. Mark the closure `#[inline(always)]`. The results are
/// those of the plain code: vectorizing changes no rounding (Rust contracts nothing into fused
/// multiply-adds).
#[inline]
pub(crate) fn vectorized<R>(backend: backend::Backend, f: impl FnOnce() -> R) -> R {
    with_isa!(backend.usable(), |isa| isa.vectorize(Serial(f)))
}
