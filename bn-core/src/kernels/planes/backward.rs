//! The backward of the planes family: the fused schedule of the training backward, the
//! two reductions and the `dx` pass of the split schedule on their own, and the one-pass
//! backward with frozen statistics.

use core::marker::PhantomData;
use core::ops::Range;

use super::elementwise::DxRuns;
use super::geometry::{channel_groups, Geometry, FUSE_BYTES, MAX_GROUP};
use super::reduce::{accumulate_backward, chunk_backward_sums, dx_masked, mask_of, reduce32};
use super::span;
use crate::kernels::epilogue::{masked, residual_of, FusedRelu, NONE};
use crate::kernels::loops::{for_each_chunk3, map2};
use crate::kernels::parallel::{
    for_each_task, part, streaming, task_count, use_pool, Grad, SharedMut, TASK_ELEMS,
};
use crate::kernels::simd::{Isa, Kernel};
use crate::kernels::stats::{sum_dy_xhat, DxCoefficients};
use crate::kernels::vector::load_at;
use crate::spec::{specialize, Spec};
use crate::Canonical;

/// The per-channel inputs of the training backward.
#[derive(Clone, Copy)]
struct BackwardStats<'a> {
    pub(super) mean: &'a [f64],
    pub(super) inv_std: &'a [f64],
    pub(super) gamma: &'a [f32],
}

/// Fused backward of the channels `channels`: both sums, then `dx` while the slab is hot (and,
/// when `dr` is given, the masked gradient beside it, recomputed from the slab rather than
/// written by the sums and read back: with streaming stores that saves the output's reads).
/// With the gradient in `dx` ([`Grad::InDx`]) each run's `dx` is written over its gradient
/// after the channel's sums have read it.
struct BackwardFused<'a, 'o, S, const MASK: u8> {
    pub(super) x: &'a [f32],
    pub(super) dy: Grad<'a, 'o>,
    pub(super) dx: &'a SharedMut<'o, f32>,
    pub(super) mask: FusedRelu<'a>,
    pub(super) dr: Option<&'a SharedMut<'o, f32>>,
    pub(super) dims: Canonical,
    pub(super) channels: Range<usize>,
    pub(super) stats: BackwardStats<'a>,
    pub(super) sum_dy: &'a mut [f64],
    pub(super) sum_dy_xhat: &'a mut [f64],
    pub(super) stream: bool,
    pub(super) _spec: PhantomData<S>,
}

impl<S: Spec, const MASK: u8> Kernel for BackwardFused<'_, '_, S, MASK> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let g = Geometry::new(specialize::<S>(self.dims));
        let inner = g.dims.inner;
        let n = g.dims.per_channel() as f64;
        let first = self.channels.start;
        if span::is_short(g.dims) {
            let zero = DxCoefficients { m: 0.0, k1: 0.0, k2: 0.0, k3: 0.0 };
            let (mut sums, mut coefficients) = ([(0.0, 0.0); span::MAX_TILE], [zero; span::MAX_TILE]);
            let (x, dy, mask) = (self.x, self.dy, &self.mask);
            let mut scratch = span::Scratch::new();
            for tile in span::backward_tiles(g.dims, self.channels.clone()) {
                let (len, mean, s) = (tile.len(), self.stats.mean, &mut scratch);
                span::backward_sums::<I, MASK>(
                    isa,
                    g.dims,
                    x,
                    dy,
                    mask,
                    None,
                    tile.clone(),
                    mean,
                    s,
                    &mut sums[..len],
                );
                for (j, c) in tile.clone().enumerate() {
                    let (mean, inv_std) = (self.stats.mean[c], self.stats.inv_std[c]);
                    let (sdy, sxm) = sums[j];
                    let sdxh = sum_dy_xhat(mean, mean as f32, inv_std, sdy, sxm);
                    self.sum_dy[c - first] = sdy;
                    self.sum_dy_xhat[c - first] = sdxh;
                    coefficients[j] = DxCoefficients::train(mean, inv_std, self.stats.gamma[c], n, sdy, sdxh);
                }
                let (dx, dr, s) = (self.dx, self.dr, &mut scratch);
                span::dx::<I, MASK>(isa, g.dims, x, dy, mask, dx, dr, tile, &coefficients[..len], s);
            }
            return;
        }
        let zero = DxCoefficients { m: 0.0, k1: 0.0, k2: 0.0, k3: 0.0 };
        let mut coefficients = [zero; MAX_GROUP];
        for group in channel_groups(&g, self.channels.clone()) {
            for (j, c) in group.clone().enumerate() {
                let (mean, inv_std) = (self.stats.mean[c], self.stats.inv_std[c]);
                let m = mean as f32;
                let (mut sdy, mut sxm) = (0.0, 0.0);
                for k in 0..g.chunks {
                    let (x, dy, mask) = (self.x, self.dy, &self.mask);
                    let (a, b) = chunk_backward_sums::<I, MASK>(isa, &g, x, dy, mask, None, c, k, m);
                    sdy += a;
                    sxm += b;
                }
                let sdxh = sum_dy_xhat(mean, m, inv_std, sdy, sxm);
                self.sum_dy[c - first] = sdy;
                self.sum_dy_xhat[c - first] = sdxh;
                coefficients[j] = DxCoefficients::train(mean, inv_std, self.stats.gamma[c], n, sdy, sdxh);
            }
            for (j, c) in group.enumerate() {
                let q = coefficients[j];
                let (m, k1, k2, k3) = (isa.splat(q.m), isa.splat(q.k1), isa.splat(q.k2), isa.splat(q.k3));
                let a = mask_of::<I, MASK>(isa, &self.mask, c);
                for o in 0..g.dims.outer {
                    let r = g.run_start(o, c)..g.run_start(o, c) + inner;
                    // SAFETY: run `(o, c)` belongs to channel `c`, which only this task
                    // processes; runs of distinct `(o, c)` are disjoint, and this one is released
                    // before the next is taken.
                    let dx = unsafe { self.dx.slice(r.start, inner) };
                    let (x, dy) = (&self.x[r.clone()], self.dy.apart(r.start, inner));
                    let res = residual_of::<MASK>(&self.mask, r.clone());
                    map2(
                        isa,
                        x,
                        dy,
                        dx,
                        self.stream,
                        true,
                        #[inline(always)]
                        |p, x, g| dx_masked::<I, MASK>(isa, p, x, g, a, res, [m, k1, k2, k3]),
                    );
                    // (`backward_fused` takes no `dr` with the gradient in `dx`.)
                    if let (false, Some(dr), Some(dy)) = (MASK == NONE, self.dr, dy) {
                        // SAFETY: as for `dx` (the same run of another output).
                        let dr = unsafe { dr.slice(r.start, inner) };
                        map2(
                            isa,
                            x,
                            Some(dy),
                            dr,
                            self.stream,
                            true,
                            #[inline(always)]
                            |p, x, g| {
                                masked::<I, MASK>(
                                    isa,
                                    x,
                                    g,
                                    a,
                                    #[inline(always)]
                                    || load_at(isa, res, p),
                                )
                            },
                        );
                    }
                }
            }
        }
        if self.stream {
            isa.fence();
        }
    }
}

/// Backward sums of the chunks `first..` (flat index `q = c * chunks + k`) for the gradient of
/// kind `MASK`.
struct ChunkBackwardSums<'a, 'o, S, const MASK: u8> {
    pub(super) x: &'a [f32],
    pub(super) dy: &'a [f32],
    pub(super) mask: FusedRelu<'a>,
    pub(super) dr: Option<&'a SharedMut<'o, f32>>,
    pub(super) dims: Canonical,
    pub(super) mean: &'a [f64],
    pub(super) first: usize,
    pub(super) out: &'a mut [(f64, f64)],
    pub(super) _spec: PhantomData<S>,
}

impl<S: Spec, const MASK: u8> Kernel for ChunkBackwardSums<'_, '_, S, MASK> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let g = Geometry::new(specialize::<S>(self.dims));
        for (j, out) in self.out.iter_mut().enumerate() {
            let q = self.first + j;
            let c = q / g.chunks;
            let (k, m) = (q % g.chunks, self.mean[c] as f32);
            let (x, dy, mask, dr) = (self.x, Grad::Apart(self.dy), &self.mask, self.dr);
            *out = chunk_backward_sums::<I, MASK>(isa, &g, x, dy, mask, dr, c, k, m);
        }
    }
}

/// Backward sums of the channels `channels` of a short-run shape ([`span`]) for the gradient of
/// kind `MASK` (written to `dr` when given).
struct SpanBackwardSums<'a, 'o, S, const MASK: u8> {
    x: &'a [f32],
    dy: &'a [f32],
    mask: FusedRelu<'a>,
    dr: Option<&'a SharedMut<'o, f32>>,
    dims: Canonical,
    mean: &'a [f64],
    channels: Range<usize>,
    out: &'a mut [(f64, f64)],
    _spec: PhantomData<S>,
}

impl<S: Spec, const MASK: u8> Kernel for SpanBackwardSums<'_, '_, S, MASK> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let dims = specialize::<S>(self.dims);
        let (x, dy, mask, dr) = (self.x, Grad::Apart(self.dy), &self.mask, self.dr);
        let mut scratch = span::Scratch::new();
        let (channels, mean) = (self.channels, self.mean);
        span::backward_sums::<I, MASK>(isa, dims, x, dy, mask, dr, channels, mean, &mut scratch, self.out);
    }
}

/// Whether the training backward of `dims` runs the fused schedule ([`backward_fused`]): the
/// slab of `x` and `dy` fits [`FUSE_BYTES`] and there are channels enough to share out. Else it
/// runs the split schedule: [`train_backward_sums`], then [`train_backward_dx`].
pub(crate) fn fuses_backward(dims: Canonical) -> bool {
    let g = Geometry::new(dims);
    let parallel = use_pool(3 * dims.len());
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    2 * g.slab_bytes() <= FUSE_BYTES && dims.channels >= 2 * threads
}

/// Training backward of the planes family by the fused schedule (where [`fuses_backward`]), of
/// the gradient of kind `MASK` (with its `mask`; `dr` receives that gradient when given): a
/// task owns whole channels, their sums then their `dx` while the slab is in cache. `dy: None`:
/// the gradient is in `dx`, which is written over it (then `dr` must be `None`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_fused<S: Spec, I: Isa, const MASK: u8>(
    isa: I,
    x: &[f32],
    dy: Option<&[f32]>,
    mask: FusedRelu<'_>,
    dr: Option<&mut [f32]>,
    dx: &mut [f32],
    dims: Canonical,
    mean: &[f64],
    inv_std: &[f64],
    gamma: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    let parallel = use_pool(3 * dims.len());
    let stats = BackwardStats { mean, inv_std, gamma };
    let stream = streaming(dims.len(), dims.inner);
    let tasks = task_count(parallel, dims.len(), TASK_ELEMS).min(dims.channels);
    assert!(dy.is_some() || dr.is_none(), "the masked gradient needs the gradient apart from dx");
    let dxs = SharedMut::new(dx);
    let dy = match dy {
        Some(dy) => Grad::Apart(dy),
        None => Grad::InDx(&dxs),
    };
    let drs = dr.map(SharedMut::new);
    let dr = drs.as_ref();
    let (sdy, sdxh) = (SharedMut::new(sum_dy_out), SharedMut::new(sum_dy_xhat_out));
    for_each_task(parallel, tasks, |k| {
        let channels = part(dims.channels, tasks, k);
        let len = channels.len();
        // SAFETY: the channel ranges of distinct tasks are disjoint.
        let (sum_dy, sum_dy_xhat) =
            unsafe { (sdy.slice(channels.start, len), sdxh.slice(channels.start, len)) };
        isa.vectorize(BackwardFused::<S, MASK> {
            x,
            dy,
            dx: &dxs,
            mask,
            dr,
            dims,
            channels,
            stats,
            sum_dy,
            sum_dy_xhat,
            stream,
            _spec: PhantomData,
        });
    });
}

/// Sums and `dx = k_c * g` of the chunks `first..` (flat index `q = c * chunks + k`), `g` the
/// gradient of kind `MASK` (written to `dr` when given).
struct BackwardEvalChunks<'a, 'o, S, const MASK: u8> {
    pub(super) x: &'a [f32],
    pub(super) dy: &'a [f32],
    pub(super) dx: &'a SharedMut<'o, f32>,
    pub(super) mask: FusedRelu<'a>,
    pub(super) dr: Option<&'a SharedMut<'o, f32>>,
    pub(super) dims: Canonical,
    pub(super) mean: &'a [f32],
    pub(super) scale: &'a [f32],
    pub(super) first: usize,
    pub(super) out: &'a mut [(f64, f64)],
    pub(super) stream: bool,
    pub(super) _spec: PhantomData<S>,
}

impl<S: Spec, const MASK: u8> Kernel for BackwardEvalChunks<'_, '_, S, MASK> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let g = Geometry::new(specialize::<S>(self.dims));
        for (j, out) in self.out.iter_mut().enumerate() {
            let q = self.first + j;
            let (c, k) = (q / g.chunks, q % g.chunks);
            let (m, scale) = (isa.splat(self.mean[c]), isa.splat(self.scale[c]));
            let a = mask_of::<I, MASK>(isa, &self.mask, c);
            let (mut sum_dy, mut sum_xm) = (0.0, 0.0);
            for b in g.chunk(k) {
                let blk = g.block(b);
                let (mut sdy, mut sxm) = ([isa.zero(); 4], [isa.zero(); 4]);
                for o in blk.o0..blk.o1 {
                    let s = g.run_start(o, c);
                    let r = s + blk.i0..s + blk.i1;
                    let (x, dy) = (&self.x[r.clone()], &self.dy[r.clone()]);
                    let res = residual_of::<MASK>(&self.mask, r.clone());
                    let ahead = g.prefetch_ahead();
                    // SAFETY: this piece of run `(o, c)` belongs to chunk `(c, k)`, which only
                    // this task processes; pieces of distinct chunks are disjoint (for `dx` and
                    // for `dr`, each borrowed once at a time).
                    let dx = unsafe { self.dx.slice(r.start, r.len()) };
                    if let (false, Some(dr)) = (MASK == NONE, self.dr) {
                        // SAFETY: as above.
                        let g = unsafe { dr.slice(r.start, r.len()) };
                        let (sums, out) = ((&mut sdy, &mut sxm), Some(&mut *g));
                        accumulate_backward::<I, MASK>(isa, x, dy, res, m, a, sums.0, sums.1, ahead, out);
                        map2(
                            isa,
                            x,
                            Some(g),
                            dx,
                            self.stream,
                            true,
                            #[inline(always)]
                            |_, _, g| isa.mul(g, scale),
                        );
                        continue;
                    }
                    accumulate_backward::<I, MASK>(isa, x, dy, res, m, a, &mut sdy, &mut sxm, ahead, None);
                    map2(
                        isa,
                        x,
                        Some(dy),
                        dx,
                        self.stream,
                        true,
                        #[inline(always)]
                        |p, x, g| {
                            let g = masked::<I, MASK>(
                                isa,
                                x,
                                g,
                                a,
                                #[inline(always)]
                                || load_at(isa, res, p),
                            );
                            isa.mul(g, scale)
                        },
                    );
                }
                sum_dy += reduce32(isa, sdy);
                sum_xm += reduce32(isa, sxm);
            }
            *out = (sum_dy, sum_xm);
        }
        if self.stream {
            isa.fence();
        }
    }
}

/// Backward with frozen statistics of the planes family, of the gradient of kind `MASK` (see
/// [`backward`]). `scale[c] = f32(gamma * inv_std)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_eval<S: Spec, I: Isa, const MASK: u8>(
    isa: I,
    x: &[f32],
    dy: &[f32],
    mask: FusedRelu<'_>,
    dr: Option<&mut [f32]>,
    dx: &mut [f32],
    dims: Canonical,
    mean: &[f32],
    inv_std: &[f32],
    scale: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    let g = Geometry::new(dims);
    let parallel = use_pool(3 * dims.len());
    let total = dims.channels * g.chunks;
    let mut stack = [(0.0, 0.0); STACK_SUMS];
    let mut scratch = Vec::new();
    let sums: &mut [(f64, f64)] = if total <= STACK_SUMS {
        &mut stack[..total]
    } else {
        scratch.resize(total, (0.0, 0.0));
        &mut scratch
    };
    let tasks = task_count(parallel, dims.len(), TASK_ELEMS).min(total);
    let stream = streaming(dims.len(), g.piece);
    let (shared, dxs) = (SharedMut::new(&mut *sums), SharedMut::new(dx));
    let drs = dr.map(SharedMut::new);
    let dr = drs.as_ref();
    for_each_task(parallel, tasks, |k| {
        let r = part(total, tasks, k);
        // SAFETY: the ranges of distinct tasks are disjoint.
        let out = unsafe { shared.slice(r.start, r.len()) };
        let dx = &dxs;
        let first = r.start;
        isa.vectorize(BackwardEvalChunks::<S, MASK> {
            x,
            dy,
            dx,
            mask,
            dr,
            dims,
            mean,
            scale,
            first,
            out,
            stream,
            _spec: PhantomData,
        });
    });
    for c in 0..dims.channels {
        let (mut sdy, mut sxm) = (0.0, 0.0);
        for &(a, b) in &sums[c * g.chunks..(c + 1) * g.chunks] {
            sdy += a;
            sxm += b;
        }
        sum_dy_out[c] = sdy;
        sum_dy_xhat_out[c] = sxm * inv_std[c] as f64;
    }
}

/// Channels whose backward sums live on the stack (no allocation for small layers).
const STACK_SUMS: usize = 256;

/// The two reductions of the training backward only: `sum(g)` and `sum(g * xhat)` per channel,
/// `g` the gradient of kind `MASK`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_backward_sums<S: Spec, I: Isa, const MASK: u8>(
    isa: I,
    x: &[f32],
    dy: &[f32],
    mask: FusedRelu<'_>,
    dr: Option<&mut [f32]>,
    dims: Canonical,
    mean: &[f64],
    inv_std: &[f64],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    let g = Geometry::new(dims);
    let parallel = use_pool(2 * dims.len());
    if span::is_short(dims) {
        let mut sums = vec![(0.0, 0.0); dims.channels];
        let tasks = task_count(parallel, dims.len(), TASK_ELEMS).min(dims.channels);
        let shared = SharedMut::new(&mut sums);
        let drs = dr.map(SharedMut::new);
        let dr = drs.as_ref();
        for_each_task(parallel, tasks, |k| {
            let channels = part(dims.channels, tasks, k);
            // SAFETY: the channel ranges of distinct tasks are disjoint.
            let out = unsafe { shared.slice(channels.start, channels.len()) };
            isa.vectorize(SpanBackwardSums::<S, MASK> {
                x,
                dy,
                mask,
                dr,
                dims,
                mean,
                channels,
                out,
                _spec: PhantomData,
            });
        });
        for (c, &(sdy, sxm)) in sums.iter().enumerate() {
            sum_dy_out[c] = sdy;
            sum_dy_xhat_out[c] = sum_dy_xhat(mean[c], mean[c] as f32, inv_std[c], sdy, sxm);
        }
        return;
    }
    let total = dims.channels * g.chunks;
    let mut sums = vec![(0.0, 0.0); total];
    let tasks = task_count(parallel, dims.len(), TASK_ELEMS).min(total);
    let shared = SharedMut::new(&mut sums);
    let drs = dr.map(SharedMut::new);
    let dr = drs.as_ref();
    for_each_task(parallel, tasks, |k| {
        let r = part(total, tasks, k);
        // SAFETY: the ranges of distinct tasks are disjoint.
        let out = unsafe { shared.slice(r.start, r.len()) };
        let first = r.start;
        isa.vectorize(ChunkBackwardSums::<S, MASK> {
            x,
            dy,
            mask,
            dr,
            dims,
            mean,
            first,
            out,
            _spec: PhantomData,
        });
    });
    for c in 0..dims.channels {
        let (mut sdy, mut sxm) = (0.0, 0.0);
        for &(a, b) in &sums[c * g.chunks..(c + 1) * g.chunks] {
            sdy += a;
            sxm += b;
        }
        sum_dy_out[c] = sdy;
        sum_dy_xhat_out[c] = sum_dy_xhat(mean[c], mean[c] as f32, inv_std[c], sdy, sxm);
    }
}

/// The `dx` pass of the training backward only, from given (e.g. global) sums over `n` values,
/// for the gradient of kind `MASK`; `dy: None` when the gradient is in `dx` (in place).
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_backward_dx<S: Spec, I: Isa, const MASK: u8>(
    isa: I,
    x: &[f32],
    dy: Option<&[f32]>,
    mask: FusedRelu<'_>,
    dx: &mut [f32],
    dims: Canonical,
    n: f64,
    mean: &[f64],
    inv_std: &[f64],
    gamma: &[f32],
    sum_dy: &[f64],
    sum_dy_xhat: &[f64],
) {
    let parallel = use_pool(3 * dims.len());
    let coefficients: Vec<DxCoefficients> = (0..dims.channels)
        .map(|c| DxCoefficients::train(mean[c], inv_std[c], gamma[c], n, sum_dy[c], sum_dy_xhat[c]))
        .collect();
    let runs = dims.outer * dims.channels;
    let tasks = task_count(parallel, dims.len(), TASK_ELEMS);
    let runs_per_task = runs.div_ceil(tasks).max(1);
    let stream = streaming(dims.len(), dims.inner);
    let chunk = runs_per_task * dims.inner;
    let work = |k: usize, x: &[f32], dy: Option<&[f32]>, dx: &mut [f32]| {
        let first_run = k * runs_per_task;
        let coefficients = &coefficients;
        let r = k * chunk..k * chunk + dx.len();
        let mask = FusedRelu { residual: Some(residual_of::<MASK>(&mask, r)), ..mask };
        isa.vectorize(DxRuns::<S, MASK> {
            x,
            dy,
            dx,
            mask,
            first_run,
            dims,
            coefficients,
            stream,
            _spec: PhantomData,
        });
    };
    for_each_chunk3(parallel, x, dy, dx, chunk, work);
}
