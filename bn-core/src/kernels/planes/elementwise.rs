//! The elementwise passes of the planes family: inference and the streaming passes of the
//! split schedules (the training normalize, the `dx` pass), over contiguous ranges of runs.

use core::marker::PhantomData;

use super::reduce::{dx_masked, mask_of};
use crate::kernels::epilogue::{residual_of, FusedRelu};
use crate::kernels::loops::{map, map2, Io};
use crate::kernels::parallel::{streaming, streaming_inference, task_count, use_pool, TASK_ELEMS};
use crate::kernels::simd::{Isa, Kernel};
use crate::kernels::stats::{Affine32, DxCoefficients};
use crate::kernels::vector::affine;
use crate::spec::{specialize, Spec};
use crate::Canonical;

/// `y = (x - m_c) * s_c + t_c` over the runs `first_run..` that `io` covers (whole runs).
struct NormalizeRuns<'a, S, T, P> {
    pub(super) io: T,
    pub(super) first_run: usize,
    pub(super) dims: Canonical,
    pub(super) params: &'a P,
    pub(super) stream: bool,
    pub(super) _spec: PhantomData<S>,
}

impl<S: Spec, T: Io, P: Fn(usize) -> Affine32> Kernel for NormalizeRuns<'_, S, T, P> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(mut self, isa: I) {
        let dims = specialize::<S>(self.dims);
        let runs = self.io.len() / dims.inner;
        let mut c = self.first_run % dims.channels;
        for r in 0..runs {
            let a = (self.params)(c);
            c = if c + 1 == dims.channels { 0 } else { c + 1 };
            let (m, s, t) = (isa.splat(a.m), isa.splat(a.s), isa.splat(a.t));
            let mut run = self.io.part(r * dims.inner, (r + 1) * dims.inner);
            map(
                isa,
                &mut run,
                self.stream,
                true,
                #[inline(always)]
                |_, v| affine(isa, v, m, s, t),
            );
        }
        if self.stream {
            isa.fence();
        }
    }
}

/// The streaming normalize: contiguous ranges of whole runs, in parallel above the threshold,
/// with non-temporal stores when `stream`.
pub(super) fn normalize_runs<S: Spec, I: Isa, T: Io>(
    isa: I,
    io: T,
    dims: Canonical,
    params: &(impl Fn(usize) -> Affine32 + Sync),
    stream: bool,
) {
    let parallel = use_pool(2 * dims.len());
    let runs = dims.outer * dims.channels;
    let tasks = task_count(parallel, dims.len(), TASK_ELEMS);
    let runs_per_task = runs.div_ceil(tasks).max(1);
    io.for_each_chunk(parallel, runs_per_task * dims.inner, |k, io| {
        let first_run = k * runs_per_task;
        isa.vectorize(NormalizeRuns::<S, T, _> { io, first_run, dims, params, stream, _spec: PhantomData });
    });
}

/// `y = (x - mean) * scale + shift` per channel, one pass; with `inference`, the output is
/// streamed by the inference rule ([`streaming_inference`]), else by the rule of the training
/// passes ([`streaming`]).
pub(crate) fn normalize<S: Spec, I: Isa, T: Io>(
    isa: I,
    io: T,
    dims: Canonical,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
    inference: bool,
) {
    let params = |c: usize| Affine32 { m: mean[c], s: scale[c], t: shift[c] };
    let stream = if inference {
        streaming_inference(dims.len(), dims.inner)
    } else {
        streaming(dims.len(), dims.inner)
    };
    normalize_runs::<S, I, T>(isa, io, dims, &params, stream);
}

/// `dx` of the training backward over contiguous whole runs, from per-channel coefficients, for
/// the gradient of kind `MASK` (`mask.residual`: the values of these runs); `dy: None` when the
/// gradient is in `dx` (in place, [`map2`]).
pub(super) struct DxRuns<'a, S, const MASK: u8> {
    pub(super) x: &'a [f32],
    pub(super) dy: Option<&'a [f32]>,
    pub(super) dx: &'a mut [f32],
    pub(super) mask: FusedRelu<'a>,
    pub(super) first_run: usize,
    pub(super) dims: Canonical,
    pub(super) coefficients: &'a [DxCoefficients],
    pub(super) stream: bool,
    pub(super) _spec: PhantomData<S>,
}

impl<S: Spec, const MASK: u8> Kernel for DxRuns<'_, S, MASK> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let dims = specialize::<S>(self.dims);
        let inner = dims.inner;
        let runs = self.dx.len() / inner;
        let mut c = self.first_run % dims.channels;
        for r in 0..runs {
            let q = &self.coefficients[c];
            let a = mask_of::<I, MASK>(isa, &self.mask, c);
            c = if c + 1 == dims.channels { 0 } else { c + 1 };
            let (m, k1, k2, k3) = (isa.splat(q.m), isa.splat(q.k1), isa.splat(q.k2), isa.splat(q.k3));
            let span = r * inner..(r + 1) * inner;
            let (x, dy) = (&self.x[span.clone()], self.dy.map(|dy| &dy[span.clone()]));
            let res = residual_of::<MASK>(&self.mask, span.clone());
            map2(
                isa,
                x,
                dy,
                &mut self.dx[span.clone()],
                self.stream,
                true,
                #[inline(always)]
                |p, x, g| dx_masked::<I, MASK>(isa, p, x, g, a, res, [m, k1, k2, k3]),
            );
        }
        if self.stream {
            isa.fence();
        }
    }
}
