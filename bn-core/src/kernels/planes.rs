//! The planes family (`inner > 1`): channel `c` is `outer` contiguous runs of `inner` values,
//! run `(o, c)` starting at `(o * C + c) * inner`. Parameters are broadcast along a run.
//!
//! Schedules (all partitions fixed by the shape; see [`Geometry`]):
//! - inference: one streaming pass over contiguous ranges of runs;
//! - training: *fused* — a task owns whole channels and, per channel, computes the statistics
//!   (two passes per 32 KiB block, Chan merge across blocks) then normalizes the channel while
//!   its slab is still in cache — when the slab fits [`FUSE_BYTES`] and there are channels enough
//!   to share out; else *split* — statistics of fixed chunks of every channel in parallel, an
//!   ordered merge, then a streaming normalize. Both compute the same chunks and merge them in
//!   the same order, so they give the same bits. Small channels go in groups (statistics of the
//!   group, its transforms as vector arithmetic, then its normalize) so that their short
//!   dependency chains overlap; a group of one-block channels shares one transposing horizontal
//!   reduction ([`group_moments`]). The first pass over a run prefetches the channel's next run
//!   (the hardware prefetchers do not follow the stride between runs);
//! - backward: the same two schedules around the fused pair of reductions and the `dx` pass;
//! - backward with frozen statistics: one pass (reductions and `dx = k * dy` together).

use core::marker::PhantomData;
use core::ops::Range;

use super::epilogue::{masked, residual_of, Apply, FusedRelu, ADD_RELU, NONE};
use super::loops::{for_each_chunk3, map, map2, Io, Split};
use super::parallel::{for_each_task, part, streaming, task_count, use_pool, SharedMut, TASK_ELEMS};
use super::simd::{Isa, Kernel};
use super::stats::{sum_dy_xhat, Affine32, AffineGroup, DxCoefficients, Moments};
use super::vector::{affine, dx_train, load_at, Pos};
use crate::spec::{specialize, Spec};
use crate::Canonical;

/// Values per statistics block: 32 KiB, so the block is still in L1 for its second pass.
const BLOCK_ELEMS: usize = 8192;
/// Least values per chunk (a unit of parallel statistics work).
const CHUNK_ELEMS: usize = 1 << 16;
/// Most chunks per channel (bounds the scratch of the split schedule).
const MAX_CHUNKS: usize = 64;
/// Largest per-channel slab (bytes of every tensor the pass re-reads) the fused schedules keep
/// in cache between the reductions and the elementwise pass: a good part of a 1 MiB L2.
const FUSE_BYTES: usize = 1 << 20;

/// How every channel's values are cut into blocks and chunks; a function of the shape alone.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    dims: Canonical,
    /// Pieces per run (runs longer than a block are cut into pieces of `piece` values).
    pieces: usize,
    piece: usize,
    /// Runs per block when `pieces == 1`.
    runs_per_block: usize,
    /// Blocks per channel.
    blocks: usize,
    /// Blocks per chunk.
    chunk_blocks: usize,
    /// Chunks per channel.
    chunks: usize,
}

/// Block: runs `o0..o1`, values `i0..i1` of each.
#[derive(Debug, Clone, Copy)]
struct Block {
    o0: usize,
    o1: usize,
    i0: usize,
    i1: usize,
}

impl Block {
    #[inline(always)]
    fn len(&self) -> usize {
        (self.o1 - self.o0) * (self.i1 - self.i0)
    }
}

impl Geometry {
    #[inline(always)]
    fn new(dims: Canonical) -> Geometry {
        let inner = dims.inner.max(1);
        let (pieces, piece, runs_per_block) = if inner <= BLOCK_ELEMS {
            (1, inner, BLOCK_ELEMS / inner)
        } else {
            (inner.div_ceil(BLOCK_ELEMS), BLOCK_ELEMS, 1)
        };
        let blocks = if pieces == 1 { dims.outer.div_ceil(runs_per_block) } else { dims.outer * pieces };
        let block_elems = runs_per_block * piece;
        let chunk_blocks = (CHUNK_ELEMS / block_elems).max(blocks.div_ceil(MAX_CHUNKS)).max(1);
        let chunks = blocks.div_ceil(chunk_blocks);
        Geometry { dims, pieces, piece, runs_per_block, blocks, chunk_blocks, chunks }
    }

    #[inline(always)]
    fn run_start(&self, o: usize, c: usize) -> usize {
        (o * self.dims.channels + c) * self.dims.inner
    }

    #[inline(always)]
    fn block(&self, b: usize) -> Block {
        if self.pieces == 1 {
            let o0 = b * self.runs_per_block;
            Block { o0, o1: (o0 + self.runs_per_block).min(self.dims.outer), i0: 0, i1: self.dims.inner }
        } else {
            let (o, k) = (b / self.pieces, b % self.pieces);
            let i0 = k * self.piece;
            Block { o0: o, o1: o + 1, i0, i1: (i0 + self.piece).min(self.dims.inner) }
        }
    }

    /// Distance (values) from a run to the channel's next run.
    #[inline(always)]
    fn stride(&self) -> usize {
        self.dims.channels * self.dims.inner
    }

    /// How far ahead the statistics prefetch: the channel's next run, or nothing (0) when
    /// there is no next run.
    #[inline(always)]
    fn prefetch_ahead(&self) -> usize {
        if self.dims.outer > 1 {
            self.stride()
        } else {
            0
        }
    }

    /// The values of block `blk` in run `(o, c)` of `x`.
    #[inline(always)]
    fn piece_of<'x>(&self, x: &'x [f32], o: usize, c: usize, blk: Block) -> &'x [f32] {
        let s = self.run_start(o, c);
        &x[s + blk.i0..s + blk.i1]
    }

    #[inline(always)]
    fn chunk(&self, k: usize) -> Range<usize> {
        k * self.chunk_blocks..((k + 1) * self.chunk_blocks).min(self.blocks)
    }

    /// Bytes of one channel of one tensor.
    #[inline(always)]
    fn slab_bytes(&self) -> usize {
        self.dims.outer * self.dims.inner * 4
    }
}

/// Most channels per group of the fused schedules.
const MAX_GROUP: usize = 16;
/// Bytes of one tensor's channels per group: small channels are processed a few at a time
/// (statistics of all, then their normalize) so that their short dependency chains overlap,
/// while the group stays in L1.
const GROUP_BYTES: usize = 64 << 10;

/// `channels` cut into consecutive groups of [`GROUP_BYTES`] (at most [`MAX_GROUP`] channels).
#[inline(always)]
fn channel_groups(g: &Geometry, channels: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let size = (GROUP_BYTES / g.slab_bytes().max(1)).clamp(1, MAX_GROUP);
    let end = channels.end;
    channels.step_by(size).map(move |c| c..(c + size).min(end))
}

/// Sum of four accumulators in `f32` (for partial sums that each add at most a block).
#[inline(always)]
fn reduce32<I: Isa>(isa: I, a: [I::V; 4]) -> f64 {
    isa.sum(combine(isa, a)) as f64
}

/// Calls `f(state, k, values)` for each full vector of `s` (four at a time, `k` = accumulator)
/// and `tail(state, values)` for the rest.
#[inline(always)]
fn for_vectors<I: Isa, T>(
    s: &[f32],
    state: &mut T,
    mut f: impl FnMut(&mut T, usize, &[f32]),
    tail: impl FnOnce(&mut T, &[f32]),
) {
    let l = I::LANES;
    let n = s.len();
    let mut i = 0;
    while i + 4 * l <= n {
        f(state, 0, &s[i..i + l]);
        f(state, 1, &s[i + l..i + 2 * l]);
        f(state, 2, &s[i + 2 * l..i + 3 * l]);
        f(state, 3, &s[i + 3 * l..i + 4 * l]);
        i += 4 * l;
    }
    // At most three whole vectors remain: a constant-bound loop keeps `k` a constant after
    // unrolling (so the accumulators stay in registers).
    for k in 0..3 {
        if i + l <= n {
            f(state, k, &s[i..i + l]);
            i += l;
        }
    }
    if i < n {
        tail(state, &s[i..]);
    }
}

/// `acc += x * w` (the block mean without overflow: `w = 1 / n`), prefetching the values
/// `ahead` positions further (the same place in the channel's next run; nothing when 0).
#[inline(always)]
fn accumulate_mean<I: Isa>(isa: I, x: &[f32], w: I::V, acc: &mut [I::V; 4], ahead: usize) {
    for_vectors::<I, _>(
        x,
        acc,
        #[inline(always)]
        |acc, k, v| {
            if ahead != 0 {
                isa.prefetch(v.as_ptr().wrapping_add(ahead));
            }
            acc[k] = isa.mul_add(isa.load(v), w, acc[k])
        },
        #[inline(always)]
        |acc, t| acc[3] = isa.mul_add(isa.load_tail(t), w, acc[3]),
    );
}

/// `ds += x - m`, `qs += (x - m)^2`.
#[inline(always)]
fn accumulate_deviations<I: Isa>(isa: I, x: &[f32], m: I::V, ds: &mut [I::V; 4], qs: &mut [I::V; 4]) {
    for_vectors::<I, _>(
        x,
        &mut (ds, qs),
        #[inline(always)]
        |(ds, qs), k, v| {
            let d = isa.sub(isa.load(v), m);
            ds[k] = isa.add(ds[k], d);
            qs[k] = isa.mul_add(d, d, qs[k]);
        },
        #[inline(always)]
        |(ds, qs), t| {
            let d = isa.zero_from(isa.sub(isa.load_tail(t), m), t.len());
            ds[3] = isa.add(ds[3], d);
            qs[3] = isa.mul_add(d, d, qs[3]);
        },
    );
}

/// `sdy += g`, `sxm += g * (x - m)` for the gradient `g` of kind `MASK` (`dy`, or `dy` masked
/// by the forward's ReLU: `a` its transform, `res` the residual's values when `ADD_RELU`;
/// stored to `out` when given), prefetching the inputs `ahead` positions further (nothing when
/// `ahead` is 0).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn accumulate_backward<I: Isa, const MASK: u8>(
    isa: I,
    x: &[f32],
    dy: &[f32],
    res: &[f32],
    m: I::V,
    a: [I::V; 3],
    sdy: &mut [I::V; 4],
    sxm: &mut [I::V; 4],
    ahead: usize,
    mut out: Option<&mut [f32]>,
) {
    assert_eq!(x.len(), dy.len());
    if MASK == ADD_RELU {
        assert_eq!(x.len(), res.len());
    }
    if let Some(o) = &out {
        assert!(MASK != NONE && o.len() == x.len());
    }
    let l = I::LANES;
    let n = x.len();
    let mut i = 0;
    while i + 4 * l <= n {
        for k in 0..4 {
            let r = i + k * l..i + (k + 1) * l;
            prefetch_inputs::<I, MASK>(isa, [x, dy, res], r.start + ahead, ahead);
            let xv = isa.load(&x[r.clone()]);
            let g = masked::<I, MASK>(
                isa,
                xv,
                isa.load(&dy[r.clone()]),
                a,
                #[inline(always)]
                || isa.load(&res[r.clone()]),
            );
            if let (false, Some(o)) = (MASK == NONE, out.as_deref_mut()) {
                isa.store(&mut o[r], g);
            }
            sdy[k] = isa.add(sdy[k], g);
            sxm[k] = isa.mul_add(g, isa.sub(xv, m), sxm[k]);
        }
        i += 4 * l;
    }
    for k in 0..3 {
        if i + l <= n {
            prefetch_inputs::<I, MASK>(isa, [x, dy, res], i + ahead, ahead);
            let xv = isa.load(&x[i..i + l]);
            let g = masked::<I, MASK>(
                isa,
                xv,
                isa.load(&dy[i..i + l]),
                a,
                #[inline(always)]
                || isa.load(&res[i..i + l]),
            );
            if let (false, Some(o)) = (MASK == NONE, out.as_deref_mut()) {
                isa.store(&mut o[i..i + l], g);
            }
            sdy[k] = isa.add(sdy[k], g);
            sxm[k] = isa.mul_add(g, isa.sub(xv, m), sxm[k]);
            i += l;
        }
    }
    if i < n {
        // Masked lanes of `dy` are zero (and so are those of a masked gradient), so their
        // products vanish.
        let xv = isa.load_tail(&x[i..]);
        let g = masked::<I, MASK>(
            isa,
            xv,
            isa.load_tail(&dy[i..]),
            a,
            #[inline(always)]
            || isa.load_tail(&res[i..]),
        );
        if let (false, Some(o)) = (MASK == NONE, out) {
            isa.store_tail(&mut o[i..], g);
        }
        sdy[3] = isa.add(sdy[3], g);
        sxm[3] = isa.mul_add(g, isa.sub(xv, m), sxm[3]);
    }
}

/// Prefetches position `at` of the inputs a backward of kind `MASK` reads (the residual for
/// [`ADD_RELU`] only); nothing when `ahead` is 0.
#[inline(always)]
fn prefetch_inputs<I: Isa, const MASK: u8>(isa: I, inputs: [&[f32]; 3], at: usize, ahead: usize) {
    if ahead != 0 {
        isa.prefetch(inputs[0].as_ptr().wrapping_add(at));
        isa.prefetch(inputs[1].as_ptr().wrapping_add(at));
        if MASK == ADD_RELU {
            isa.prefetch(inputs[2].as_ptr().wrapping_add(at));
        }
    }
}

/// The forward's transform of channel `c` as vectors (zeros for a [`NONE`] kernel).
#[inline(always)]
fn mask_of<I: Isa, const MASK: u8>(isa: I, mask: &FusedRelu<'_>, c: usize) -> [I::V; 3] {
    if MASK == NONE {
        [isa.zero(); 3]
    } else {
        [isa.splat(mask.mean[c]), isa.splat(mask.scale[c]), isa.splat(mask.shift[c])]
    }
}

/// Two-pass moments of one block of channel `c`.
#[inline(always)]
fn block_moments<I: Isa>(isa: I, g: &Geometry, x: &[f32], c: usize, blk: Block) -> Moments {
    let n = blk.len() as f64;
    let inv_n = 1.0 / n;
    let w = isa.splat(inv_n as f32);
    let mut acc = [isa.zero(); 4];
    for o in blk.o0..blk.o1 {
        accumulate_mean(isa, g.piece_of(x, o, c, blk), w, &mut acc, g.prefetch_ahead());
    }
    let m = reduce32(isa, acc) as f32;
    let mv = isa.splat(m);
    let (mut ds, mut qs) = ([isa.zero(); 4], [isa.zero(); 4]);
    for o in blk.o0..blk.o1 {
        accumulate_deviations(isa, g.piece_of(x, o, c, blk), mv, &mut ds, &mut qs);
    }
    Moments::from_deviations(n, inv_n, m, reduce32(isa, ds), reduce32(isa, qs))
}

/// [`block_moments`] of the channels `channels` (at most [`MAX_GROUP`]) whose values form one
/// block each, computed together: the horizontal sums of all the channels are one transposing
/// reduction ([`Isa::sums`]), so the short per-channel dependency chains overlap. The same bits
/// as `block_moments` (and as [`chunk_moments`], one block being one chunk). `vectors` is
/// scratch (its contents on entry do not matter).
#[inline(always)]
fn group_moments<I: Isa>(
    isa: I,
    g: &Geometry,
    x: &[f32],
    channels: Range<usize>,
    vectors: &mut [[I::V; MAX_GROUP]; 2],
    out: &mut [Moments; MAX_GROUP],
) {
    debug_assert!(g.blocks == 1 && channels.len() <= MAX_GROUP);
    let blk = g.block(0);
    let n = blk.len() as f64;
    let inv_n = 1.0 / n;
    let w = isa.splat(inv_n as f32);
    let len = channels.len();
    for (j, c) in channels.clone().enumerate() {
        let mut acc = [isa.zero(); 4];
        for o in blk.o0..blk.o1 {
            accumulate_mean(isa, g.piece_of(x, o, c, blk), w, &mut acc, g.prefetch_ahead());
        }
        vectors[0][j] = combine(isa, acc);
    }
    let mut shift = [0.0f32; MAX_GROUP];
    sums_of(isa, &vectors[0][..len], &mut shift[..len]);
    for (j, c) in channels.enumerate() {
        let mv = isa.splat(shift[j]);
        let (mut ds, mut qs) = ([isa.zero(); 4], [isa.zero(); 4]);
        for o in blk.o0..blk.o1 {
            accumulate_deviations(isa, g.piece_of(x, o, c, blk), mv, &mut ds, &mut qs);
        }
        vectors[0][j] = combine(isa, ds);
        vectors[1][j] = combine(isa, qs);
    }
    let mut sums = [[0.0f32; MAX_GROUP]; 2];
    sums_of(isa, &vectors[0][..len], &mut sums[0][..len]);
    sums_of(isa, &vectors[1][..len], &mut sums[1][..len]);
    for j in 0..len {
        out[j] = Moments::from_deviations(n, inv_n, shift[j], sums[0][j] as f64, sums[1][j] as f64);
    }
}

/// [`Isa::sums`] of up to [`MAX_GROUP`] vectors, `LANES` at a time.
#[inline(always)]
fn sums_of<I: Isa>(isa: I, v: &[I::V], out: &mut [f32]) {
    let mut start = 0;
    while start < v.len() {
        let end = (start + I::LANES).min(v.len());
        isa.sums(&v[start..end], &mut out[start..end]);
        start = end;
    }
}

/// The four accumulators added pairwise into one vector (the first step of [`reduce32`]).
#[inline(always)]
fn combine<I: Isa>(isa: I, a: [I::V; 4]) -> I::V {
    isa.add(isa.add(a[0], a[1]), isa.add(a[2], a[3]))
}

/// Moments of chunk `k` of channel `c`: its blocks merged in order.
#[inline(always)]
fn chunk_moments<I: Isa>(isa: I, g: &Geometry, x: &[f32], c: usize, k: usize) -> Moments {
    let mut acc = Moments::EMPTY;
    for b in g.chunk(k) {
        acc = acc.merge(block_moments(isa, g, x, c, g.block(b)));
    }
    acc
}

/// `(sum(g), sum(g * (x - m)))` of chunk `k` of channel `c`, `g` the gradient of kind `MASK`
/// (stored to its place in `dr` when given; the caller owns the chunk): per block in `f32`, then
/// in `f64` in block order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn chunk_backward_sums<I: Isa, const MASK: u8>(
    isa: I,
    g: &Geometry,
    x: &[f32],
    dy: &[f32],
    mask: &FusedRelu<'_>,
    dr: Option<&SharedMut<'_, f32>>,
    c: usize,
    k: usize,
    m: f32,
) -> (f64, f64) {
    let mv = isa.splat(m);
    let a = mask_of::<I, MASK>(isa, mask, c);
    let (mut sum_dy, mut sum_xm) = (0.0, 0.0);
    for b in g.chunk(k) {
        let blk = g.block(b);
        let (mut sdy, mut sxm) = ([isa.zero(); 4], [isa.zero(); 4]);
        for o in blk.o0..blk.o1 {
            let s = g.run_start(o, c);
            let r = s + blk.i0..s + blk.i1;
            let (x, dy, res) = (&x[r.clone()], &dy[r.clone()], residual_of::<MASK>(mask, r.clone()));
            let out = match dr.filter(|_| MASK != NONE) {
                // SAFETY: this piece of run `(o, c)` belongs to chunk `(c, k)`, which only the
                // caller processes; it is released before the next piece is taken.
                Some(d) => Some(unsafe { d.slice(r.start, r.len()) }),
                None => None,
            };
            let ahead = g.prefetch_ahead();
            accumulate_backward::<I, MASK>(isa, x, dy, res, mv, a, &mut sdy, &mut sxm, ahead, out);
        }
        sum_dy += reduce32(isa, sdy);
        sum_xm += reduce32(isa, sxm);
    }
    (sum_dy, sum_xm)
}

/// [`dx_train`] of the gradient of kind `MASK` (see [`masked`]) for `dy` at position `p` of a
/// segment whose residual values are `res`; `k` holds `m, k1, k2, k3`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dx_masked<I: Isa, const MASK: u8>(
    isa: I,
    p: Pos,
    x: I::V,
    dy: I::V,
    a: [I::V; 3],
    res: &[f32],
    k: [I::V; 4],
) -> I::V {
    let g = masked::<I, MASK>(
        isa,
        x,
        dy,
        a,
        #[inline(always)]
        || load_at(isa, res, p),
    );
    dx_train(isa, x, g, k[0], k[1], k[2], k[3])
}

// ---------------------------------------------------------------------------------------------
// Inference and the streaming passes of the split schedules.

/// `y = (x - m_c) * s_c + t_c` over the runs `first_run..` that `io` covers (whole runs).
struct NormalizeRuns<'a, S, T, P> {
    io: T,
    first_run: usize,
    dims: Canonical,
    params: &'a P,
    stream: bool,
    _spec: PhantomData<S>,
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

/// The streaming normalize: contiguous ranges of whole runs, in parallel above the threshold.
fn normalize_runs<S: Spec, I: Isa, T: Io>(
    isa: I,
    io: T,
    dims: Canonical,
    params: &(impl Fn(usize) -> Affine32 + Sync),
) {
    let parallel = use_pool(2 * dims.len());
    let runs = dims.outer * dims.channels;
    let tasks = task_count(parallel, dims.len(), TASK_ELEMS);
    let runs_per_task = runs.div_ceil(tasks).max(1);
    let stream = streaming(dims.len(), dims.inner);
    io.for_each_chunk(parallel, runs_per_task * dims.inner, |k, io| {
        let first_run = k * runs_per_task;
        isa.vectorize(NormalizeRuns::<S, T, _> { io, first_run, dims, params, stream, _spec: PhantomData });
    });
}

/// Inference: `y = (x - mean) * scale + shift` per channel, one pass.
pub(crate) fn normalize<S: Spec, I: Isa, T: Io>(
    isa: I,
    io: T,
    dims: Canonical,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
) {
    let params = |c: usize| Affine32 { m: mean[c], s: scale[c], t: shift[c] };
    normalize_runs::<S, I, T>(isa, io, dims, &params);
}

/// `dx` of the training backward over contiguous whole runs, from per-channel coefficients, for
/// the gradient of kind `MASK` (`mask.residual`: the values of these runs).
struct DxRuns<'a, S, const MASK: u8> {
    x: &'a [f32],
    dy: &'a [f32],
    dx: &'a mut [f32],
    mask: FusedRelu<'a>,
    first_run: usize,
    dims: Canonical,
    coefficients: &'a [DxCoefficients],
    stream: bool,
    _spec: PhantomData<S>,
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
            let (x, dy) = (&self.x[span.clone()], &self.dy[span.clone()]);
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

// ---------------------------------------------------------------------------------------------
// Training forward.

/// Fused training of the channels `channels`: statistics, then normalize while the slab is hot.
struct TrainFused<'a, 'y, S, A> {
    x: &'a [f32],
    act: A,
    y: &'a SharedMut<'y, f32>,
    dims: Canonical,
    channels: Range<usize>,
    gamma: &'a [f32],
    beta: &'a [f32],
    eps: f64,
    mean: &'a mut [f64],
    var: &'a mut [f64],
    stream: bool,
    _spec: PhantomData<S>,
}

impl<S: Spec, A: Apply> Kernel for TrainFused<'_, '_, S, A> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let g = Geometry::new(specialize::<S>(self.dims));
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
    x: &'a [f32],
    dims: Canonical,
    first: usize,
    out: &'a mut [Moments],
    _spec: PhantomData<S>,
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
    normalize_runs::<S, I, _>(isa, Split { x, y, act }, dims, &|c: usize| params[c]);
}

// ---------------------------------------------------------------------------------------------
// Training backward.

/// The per-channel inputs of the training backward.
#[derive(Clone, Copy)]
struct BackwardStats<'a> {
    mean: &'a [f64],
    inv_std: &'a [f64],
    gamma: &'a [f32],
}

/// Fused backward of the channels `channels`: both sums, then `dx` while the slab is hot (and,
/// when `dr` is given, the masked gradient beside it, recomputed from the slab rather than
/// written by the sums and read back: with streaming stores that saves the output's reads).
struct BackwardFused<'a, 'o, S, const MASK: u8> {
    x: &'a [f32],
    dy: &'a [f32],
    dx: &'a SharedMut<'o, f32>,
    mask: FusedRelu<'a>,
    dr: Option<&'a SharedMut<'o, f32>>,
    dims: Canonical,
    channels: Range<usize>,
    stats: BackwardStats<'a>,
    sum_dy: &'a mut [f64],
    sum_dy_xhat: &'a mut [f64],
    stream: bool,
    _spec: PhantomData<S>,
}

impl<S: Spec, const MASK: u8> Kernel for BackwardFused<'_, '_, S, MASK> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let g = Geometry::new(specialize::<S>(self.dims));
        let inner = g.dims.inner;
        let n = g.dims.per_channel() as f64;
        let first = self.channels.start;
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
                    let (x, dy) = (&self.x[r.clone()], &self.dy[r.clone()]);
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
                    if let (false, Some(dr)) = (MASK == NONE, self.dr) {
                        // SAFETY: as for `dx` (the same run of another output).
                        let dr = unsafe { dr.slice(r.start, inner) };
                        map2(
                            isa,
                            x,
                            dy,
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
    x: &'a [f32],
    dy: &'a [f32],
    mask: FusedRelu<'a>,
    dr: Option<&'a SharedMut<'o, f32>>,
    dims: Canonical,
    mean: &'a [f64],
    first: usize,
    out: &'a mut [(f64, f64)],
    _spec: PhantomData<S>,
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
            let (x, dy, mask, dr) = (self.x, self.dy, &self.mask, self.dr);
            *out = chunk_backward_sums::<I, MASK>(isa, &g, x, dy, mask, dr, c, k, m);
        }
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
/// task owns whole channels, their sums then their `dx` while the slab is in cache.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_fused<S: Spec, I: Isa, const MASK: u8>(
    isa: I,
    x: &[f32],
    dy: &[f32],
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
    let dxs = SharedMut::new(dx);
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

// ---------------------------------------------------------------------------------------------
// Backward with frozen statistics: one pass.

/// Sums and `dx = k_c * g` of the chunks `first..` (flat index `q = c * chunks + k`), `g` the
/// gradient of kind `MASK` (written to `dr` when given).
struct BackwardEvalChunks<'a, 'o, S, const MASK: u8> {
    x: &'a [f32],
    dy: &'a [f32],
    dx: &'a SharedMut<'o, f32>,
    mask: FusedRelu<'a>,
    dr: Option<&'a SharedMut<'o, f32>>,
    dims: Canonical,
    mean: &'a [f32],
    scale: &'a [f32],
    first: usize,
    out: &'a mut [(f64, f64)],
    stream: bool,
    _spec: PhantomData<S>,
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
                            g,
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
                        dy,
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

// ---------------------------------------------------------------------------------------------
// The pieces of the split schedules on their own, for statistics combined across processes
// (`crate::sync`): the same chunks, merged in the same order, as the split `forward_train` and
// `backward` (so the same bits as they give for the statistics and sums of a whole batch).

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
/// for the gradient of kind `MASK`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_backward_dx<S: Spec, I: Isa, const MASK: u8>(
    isa: I,
    x: &[f32],
    dy: &[f32],
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
    let work = |k: usize, x: &[f32], dy: &[f32], dx: &mut [f32]| {
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
