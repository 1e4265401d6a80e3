//! The training forward of the planes family: fused (a task owns whole channels, their
//! statistics then their normalize while the slab is in cache) or split (chunk moments of every
//! channel in parallel, an ordered merge, a streaming normalize); and the statistics alone.

use core::marker::PhantomData;
use core::ops::Range;

use super::elementwise::normalize_runs;
use super::geometry::{channel_groups, Geometry, FUSE_BYTES, MAX_GROUP};
use super::reduce::{chunk_moments, group_moments};
use super::span;
use crate::kernels::epilogue::Apply;
use crate::kernels::loops::{map, Split};
use crate::kernels::parallel::{for_each_task, part, streaming, task_count, use_pool, SharedMut, TASK_ELEMS};
use crate::kernels::simd::{Isa, Kernel};
use crate::kernels::stats::{Affine32, AffineGroup, Moments};
use crate::kernels::vector::affine;
use crate::spec::{specialize, Spec};
use crate::Canonical;

/// Fused training of the channels `channels`: statistics, then normalize while the slab is hot.
struct TrainFused<'a, 'y, S, A> {
    pub(super) x: &'a [f32],
    pub(super) act: A,
    pub(super) y: &'a SharedMut<'y, f32>,
    pub(super) dims: Canonical,
    pub(super) channels: Range<usize>,
    pub(super) gamma: &'a [f32],
    pub(super) beta: &'a [f32],
    pub(super) eps: f64,
    pub(super) mean: &'a mut [f64],
    pub(super) var: &'a mut [f64],
    pub(super) stream: bool,
    pub(super) _spec: PhantomData<S>,
}

impl<S: Spec, A: Apply> Kernel for TrainFused<'_, '_, S, A> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let g = Geometry::new(specialize::<S>(self.dims));
        if span::is_short(g.dims) {
            // Runs this short are never streamed.
            let (x, y, act, channels) = (self.x, self.y, self.act, self.channels);
            let (gamma, beta, mean, var) = (self.gamma, self.beta, self.mean, self.var);
            span::train(isa, g.dims, x, y, act, channels, gamma, beta, self.eps, mean, var);
            return;
        }
        let inner = g.dims.inner;
        let first = self.channels.start;
        // Scratch of `group_moments` (2 KiB with AVX-512), zeroed once per call, not per group.
        let mut vectors = [[isa.zero(); MAX_GROUP]; 2];
        for group in channel_groups(&g, self.channels.clone()) {
            // The statistics of the whole group first (their dependency chains overlap), then
            // its transforms as vector arithmetic, then its normalize.
            let (mut mean, mut var) = ([0.0; MAX_GROUP], [1.0; MAX_GROUP]);
            let (mut gamma, mut beta) = ([0.0; MAX_GROUP], [0.0; MAX_GROUP]);
            let mut moments = [Moments::EMPTY; MAX_GROUP];
            if g.blocks == 1 {
                group_moments(isa, &g, self.x, group.clone(), &mut vectors, &mut moments);
            }
            for (j, c) in group.clone().enumerate() {
                let mut mom = moments[j];
                if g.blocks > 1 {
                    for k in 0..g.chunks {
                        mom = mom.merge(chunk_moments(isa, &g, self.x, c, k));
                    }
                }
                (mean[j], var[j]) = (mom.mean, mom.m2 / mom.n);
                self.mean[c - first] = mean[j];
                self.var[c - first] = var[j];
                (gamma[j], beta[j]) = (self.gamma[c], self.beta[c]);
            }
            let params = AffineGroup::train(&mean, &var, self.eps, &gamma, &beta);
            for (j, c) in group.enumerate() {
                let (m, s, t) = (isa.splat(params.m[j]), isa.splat(params.s[j]), isa.splat(params.t[j]));
                for o in 0..g.dims.outer {
                    let start = g.run_start(o, c);
                    // SAFETY: run `(o, c)` belongs to channel `c`, which only this task
                    // processes; runs of distinct `(o, c)` are disjoint, and this one is released
                    // before the next is taken.
                    let y = unsafe { self.y.slice(start, inner) };
                    let act = self.act.part(start, start + inner);
                    let mut io = Split { x: &self.x[start..start + inner], y, act };
                    map(
                        isa,
                        &mut io,
                        self.stream,
                        true,
                        #[inline(always)]
                        |_, v| affine(isa, v, m, s, t),
                    );
                }
            }
        }
        if self.stream {
            isa.fence();
        }
    }
}

/// Moments of the chunks `q` of `tasks` (flat index `q = c * chunks + k`).
struct ChunkMoments<'a, S> {
    pub(super) x: &'a [f32],
    pub(super) dims: Canonical,
    pub(super) first: usize,
    pub(super) out: &'a mut [Moments],
    pub(super) _spec: PhantomData<S>,
}

impl<S: Spec> Kernel for ChunkMoments<'_, S> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let g = Geometry::new(specialize::<S>(self.dims));
        for (j, out) in self.out.iter_mut().enumerate() {
            let q = self.first + j;
            *out = chunk_moments(isa, &g, self.x, q / g.chunks, q % g.chunks);
        }
    }
}

/// Statistics of the channels `channels` of a short-run shape ([`span`]).
struct SpanStatistics<'a, S> {
    x: &'a [f32],
    dims: Canonical,
    channels: Range<usize>,
    mean: &'a mut [f64],
    var: &'a mut [f64],
    _spec: PhantomData<S>,
}

impl<S: Spec> Kernel for SpanStatistics<'_, S> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let dims = specialize::<S>(self.dims);
        span::statistics(isa, dims, self.x, self.channels, self.mean, self.var);
    }
}

/// Training forward of the planes family.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_train<S: Spec, I: Isa, A: Apply>(
    isa: I,
    x: &[f32],
    y: &mut [f32],
    act: A,
    dims: Canonical,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    mean_out: &mut [f64],
    var_out: &mut [f64],
) {
    let g = Geometry::new(dims);
    let parallel = use_pool(2 * dims.len());
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    let stream = streaming(dims.len(), dims.inner);
    if g.slab_bytes() <= FUSE_BYTES && dims.channels >= 2 * threads {
        let tasks = task_count(parallel, dims.len(), TASK_ELEMS).min(dims.channels);
        let (y, mean, var) = (SharedMut::new(y), SharedMut::new(mean_out), SharedMut::new(var_out));
        for_each_task(parallel, tasks, |k| {
            let channels = part(dims.channels, tasks, k);
            let len = channels.len();
            // SAFETY: the channel ranges of distinct tasks are disjoint.
            let (mean, var) = unsafe { (mean.slice(channels.start, len), var.slice(channels.start, len)) };
            let (x, y) = (x, &y);
            isa.vectorize(TrainFused::<S, A> {
                x,
                act,
                y,
                dims,
                channels,
                gamma,
                beta,
                eps,
                mean,
                var,
                stream,
                _spec: PhantomData,
            });
        });
        return;
    }
    // Split: chunk moments in parallel, an ordered merge, a streaming normalize.
    statistics::<S, I>(isa, x, dims, parallel, mean_out, var_out);
    let params: Vec<Affine32> = (0..dims.channels)
        .map(|c| Affine32::train(mean_out[c], var_out[c], eps, gamma[c], beta[c]))
        .collect();
    normalize_runs::<S, I, _>(isa, Split { x, y, act }, dims, &|c: usize| params[c], stream);
}

/// Per-channel batch mean and biased variance only: chunk moments (in parallel when
/// `parallel`), an ordered merge.
pub(crate) fn statistics<S: Spec, I: Isa>(
    isa: I,
    x: &[f32],
    dims: Canonical,
    parallel: bool,
    mean_out: &mut [f64],
    var_out: &mut [f64],
) {
    if span::is_short(dims) {
        let tasks = task_count(parallel, dims.len(), TASK_ELEMS).min(dims.channels);
        let (mean, var) = (SharedMut::new(mean_out), SharedMut::new(var_out));
        for_each_task(parallel, tasks, |k| {
            let channels = part(dims.channels, tasks, k);
            let len = channels.len();
            // SAFETY: the channel ranges of distinct tasks are disjoint.
            let (mean, var) = unsafe { (mean.slice(channels.start, len), var.slice(channels.start, len)) };
            isa.vectorize(SpanStatistics::<S> { x, dims, channels, mean, var, _spec: PhantomData });
        });
        return;
    }
    let g = Geometry::new(dims);
    let total = dims.channels * g.chunks;
    let mut moments = vec![Moments::EMPTY; total];
    let tasks = task_count(parallel, dims.len(), TASK_ELEMS).min(total);
    let shared = SharedMut::new(&mut moments);
    for_each_task(parallel, tasks, |k| {
        let r = part(total, tasks, k);
        // SAFETY: the ranges of distinct tasks are disjoint.
        let out = unsafe { shared.slice(r.start, r.len()) };
        isa.vectorize(ChunkMoments::<S> { x, dims, first: r.start, out, _spec: PhantomData });
    });
    for c in 0..dims.channels {
        let mom = moments[c * g.chunks..(c + 1) * g.chunks].iter().fold(Moments::EMPTY, |a, &b| a.merge(b));
        mean_out[c] = mom.mean;
        var_out[c] = mom.m2 / mom.n;
    }
}
