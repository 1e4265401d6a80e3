//! Kernels over the canonical `(outer, C, inner)` view.
//!
//! [`reference`](mod@reference) is the scalar oracle (f64 accumulation, two-pass statistics) every other path
//! is tested against. The functions of this module are the fast `f32` paths the layers call:
//! each takes a [`Backend`] ([`Backend::detect`] for the process-wide choice) and a
//! [`Spec`](crate::spec::Spec) whose constants (channels, inner extent) become the loops' trip
//! counts.
//!
//! # How the fast kernels are built
//!
//! - **One body per kernel, every instruction set.** Kernel bodies are generic over an
//!   instruction-set token (`Wide`: `wide::f32x8`; `Avx2`; `Avx512`: masked tails), the way
//!   matrixmultiply and pulp do it, and entered through a `#[target_feature]` wrapper so that the
//!   same source compiles to AVX2 and AVX-512. Odd extents (`C` or `inner` of 1, 7, 49, 70, ...)
//!   run whole vectors plus one masked vector; in the rows family a small `C` is widened to
//!   virtual rows of `lcm(C, 16)` values.
//! - **Two families.** Planes (`inner > 1`): parameters broadcast along contiguous runs; a
//!   training task owns whole channels and normalizes each right after its statistics, while the
//!   channel is in cache. Rows (`inner == 1`): per-lane parameters; statistics over tiles of
//!   row blocks, then a streaming pass.
//! - **Statistics.** Deviations from a shift over each cache-resident block, corrected by their
//!   sum: the block's mean from a first pass (`f32` planes), or a pilot (the mean so far or of
//!   the first values; short planes runs, rows and 16-bit data) with a second pass only where
//!   it is far; blocks combined with Chan's merge in `f64`: accurate when `|mean| >> std`.
//! - **Parallelism.** On the caller's Rayon pool, serially below a work threshold. The calling
//!   thread starts on a kernel's tasks at once and helpers from the pool join it, the caller
//!   claiming tasks from the front and helpers from the back (waking a sleeping worker costs as
//!   much as a small kernel; the caller does not wait for it). Every block, chunk and merge order is fixed by the shape: results
//!   are bit-identical for any number of threads (not across backends).
//! - **Memory.** Inference is one pass and allocates nothing: called from outside the pool it
//!   hands itself to a worker (or runs serially when small), since helping from outside means
//!   spawning. Training and backward allocate at most a few per-channel arrays, never anything
//!   the size of the tensor, plus, from outside the pool, the helpers' job (two small objects per
//!   parallel phase).
//!
//! # Layers
//!
//! Each module imports only from the layers below it; this one, at the top, re-exports and
//! dispatches downward.
//!
//! - `simd/`: the `Isa` contract and `Kernel`, the backends
//!   (`portable.rs`: `wide`; `x86/`: AVX2, AVX-512), their detection ([`Backend`],
//!   `backend.rs`), the one selector from a backend to a token (`with_isa!`), and the 16-bit
//!   formats' bit conversions (`bits.rs`, [`HalfFormat`]).
//! - The shared pieces: `vector.rs` (positions, parameter loads, the normalize and `dx`
//!   formulas), `epilogue.rs` (what follows the normalize: [`Epilogue`], [`FusedRelu`] and their
//!   forms in the kernel bodies), `loops.rs` (inputs and outputs, the vector walks),
//!   `stats.rs` (moments, Chan's merge, coefficients in `f64`), `parallel.rs` (tasks on the
//!   caller's Rayon pool); [`reference`](mod@reference) stands alone.
//! - The layout families: `planes/` (`inner > 1`) and `rows/` (`inner == 1`), each cut into its
//!   geometry, statistics or reductions, elementwise passes and backward.
//! - The `f32` passes over the families: `forward.rs` and `backward.rs` (checks, the scalar
//!   route, the instruction set, the family; the split schedule of the training backward).
//! - [`half16`]: the 16-bit passes, as blocks over the `f32` passes and direct kernels.

pub mod half16;
pub mod reference;

mod backward;
mod epilogue;
mod forward;
mod loops;
mod parallel;
mod planes;
mod rows;
mod simd;
pub(crate) mod stats;
mod vector;

pub use simd::backend::{Backend, ParseBackendError, BACKEND_ENV};
pub use simd::bits::HalfFormat;

pub use backward::{
    backward, backward_dx, backward_eval, backward_eval_relu, backward_in_place, backward_relu, backward_sums,
};
pub use epilogue::{Epilogue, FusedRelu};
pub use forward::{
    batch_stats, forward_train, forward_train_fused, normalize, normalize_fused, normalize_inplace,
    normalize_inplace_fused, relu_grad, train_coefficients,
};

pub(crate) use forward::normalize_fused_helped;
pub(crate) use simd::vectorized;

/// Copies `src` into `dst` (same length) in chunks of `chunk` values, scheduled the way the
/// training and backward kernels schedule their tasks (the calling thread copies while helpers
/// from the current pool join it; see the `parallel` module). The bench's copy: its yardstick gets
/// the same scheduling as what it measures. Not part of the stable API.
#[doc(hidden)]
pub fn __copy_scheduled(src: &[f32], dst: &mut [f32], chunk: usize) {
    let n = src.len();
    assert!(dst.len() == n, "src and dst must have one length");
    parallel::for_each_chunk_mut(parallel::use_pool(2 * n), dst, chunk, |_, r, d| d.copy_from_slice(&src[r]));
}

/// Forces non-temporal (streaming) stores for every out-of-place output on (`Some(true)`) or off
/// (`Some(false)`), or restores the size rule (`None`: outputs of 14 MiB and more, in runs of
/// at least 128 values). Results are the same bits either way; for tests and measurements.
/// The environment variable `BN_STREAM=0|1`, read on first use, does the same.
#[doc(hidden)]
pub fn __force_streaming(on: Option<bool>) {
    parallel::force_streaming(on);
}
