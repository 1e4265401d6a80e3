//! The 16-bit data formats (`bf16`, `f16`): tensors stored in 16 bits, computed in `f32` by the
//! same kernels as `f32` layers (PyTorch's mixed precision).
//!
//! Every pass cuts the canonical `(outer, C, inner)` view into *blocks*: contiguous ranges of
//! the tensor that are whole rows (`C * inner` small), a range of channels of one row, or a
//! piece of one run (`inner` large). A block is widened into a small `f32` buffer (fast SIMD
//! conversions, chosen by the [`Backend`]), handed to the `f32` kernel of the pass as a tensor of
//! its own (with the parameters of its channels), and the result narrowed back (round to
//! nearest even). So the data moves in 16 bits, half the bytes of `f32`, and the arithmetic is
//! the `f32` kernels'.
//!
//! The reductions and the training `dx` pass have *direct* kernels besides, generic over the
//! instruction set like the `f32` kernels: vectors of 16-bit values are widened in registers
//! ([`Isa::load_half`]) and `dx` rounded in registers ([`Isa::store_half`]), with no buffer and
//! no `f32` kernel call per block. They run where a block has whole vectors to work on (runs of
//! at least 32 values, or rows of at least 16 channels); planes shapes whose channels fit in L2
//! go further, channel by channel: the statistics (or backward sums) of a channel, then its
//! normalize (or `dx`) while it is still in cache, so the input is read from memory once.
//!
//! - inference ([`normalize`]): one pass over the blocks, in parallel; buffers on the stack, no
//!   allocation.
//! - training ([`forward_train`]): the statistics of each block ([`kernels::forward_train`](super::forward_train) on
//!   the block), merged per channel with Chan's formula in `f64` in a fixed order; then the
//!   inference pass with the training transform.
//! - backward ([`backward`]): the sums of each block ([`kernels::backward_eval`](super::backward_eval) with the saved
//!   mean and a unit scale), added in a fixed order; then `dx = k1 * dy + k2 * (x - m) + k3`
//!   per block. [`backward_eval`] is one pass (the block's `dx` and sums together).
//!
//! Blocks, and the chunks of blocks whose partial results are combined, are fixed by the shape:
//! results are bit-identical for any number of threads. Reductions keep per-task buffers
//! (reused by each thread) and per-chunk, per-channel partials, never anything the size of the
//! tensor.

use core::cell::RefCell;

use super::convert::{
    affine, affine_inplace, affine_run, affine_stream, has_affine, narrow, put_half, put_half2, widen, Params,
};
use super::parallel::{
    for_each_task, part, store_fence, streaming_bytes, task_count, use_pool, without_alloc, SharedMut,
    TASK_ELEMS,
};
use super::simd::bits::{half_to_f32, HalfFormat};
use super::simd::{with_isa, Isa, Kernel};
use super::stats::{sum_dy_xhat, Affine32, DxCoefficients, Moments};
use super::Backend;
use crate::spec::Dynamic;
use crate::Canonical;

/// Values per block of the elementwise passes: three 16 KiB `f32` buffers on the stack stay in
/// L1 with the block's 16-bit input and output.
const BLOCK: usize = 4096;
/// Values per block of the reductions (larger: fewer per-block merges; the buffers stay in L2).
const REDUCE_BLOCK: usize = 16384;
/// Least values per chunk of a reduction, and most chunks per channel block.
const CHUNK_ELEMS: usize = 1 << 16;
const MAX_CHUNKS: usize = 64;
/// Most partial results a reduction keeps (chunks times channels), beyond one per channel.
const MAX_PARTIALS: usize = 1 << 16;

/// How a tensor is cut into blocks of at most `cap` values; a function of the shape alone.
///
/// Block `(j, ob, p)`: channels `j * cb..`, rows `ob * rows..`, values `p * piece..` of each
/// run; exactly one of the three is partial, so every block is contiguous.
#[derive(Debug, Clone, Copy)]
struct Blocks {
    dims: Canonical,
    /// Channels per block and channel blocks.
    cb: usize,
    nj: usize,
    /// Rows (`o`) per block and row blocks.
    rows: usize,
    no: usize,
    /// Values per piece of a run and pieces per run.
    piece: usize,
    pieces: usize,
}

/// One block: `len` values from `start`, channels `c0..c0 + dims.channels`, seen as a tensor of
/// its own.
#[derive(Debug, Clone, Copy)]
struct Block {
    start: usize,
    c0: usize,
    dims: Canonical,
}

impl Block {
    #[inline(always)]
    fn len(&self) -> usize {
        self.dims.len()
    }

    #[inline(always)]
    fn range(&self) -> core::ops::Range<usize> {
        self.start..self.start + self.len()
    }

    #[inline(always)]
    fn channels(&self) -> core::ops::Range<usize> {
        self.c0..self.c0 + self.dims.channels
    }
}

impl Blocks {
    fn new(dims: Canonical, cap: usize) -> Blocks {
        let Canonical { outer, channels: c, inner } = dims;
        if inner > cap {
            Blocks { dims, cb: 1, nj: c, rows: 1, no: outer, piece: cap, pieces: inner.div_ceil(cap) }
        } else if c * inner <= cap {
            let rows = cap / (c * inner).max(1);
            Blocks { dims, cb: c, nj: 1, rows, no: outer.div_ceil(rows), piece: inner, pieces: 1 }
        } else {
            let cb = cap / inner.max(1);
            Blocks { dims, cb, nj: c.div_ceil(cb), rows: 1, no: outer, piece: inner, pieces: 1 }
        }
    }

    /// Number of blocks.
    fn count(&self) -> usize {
        self.nj * self.no * self.pieces
    }

    /// Block `b` in memory order.
    #[inline(always)]
    fn nth(&self, b: usize) -> Block {
        let p = b % self.pieces;
        let j = (b / self.pieces) % self.nj;
        let ob = b / (self.pieces * self.nj);
        self.at(j, ob, p)
    }

    #[inline(always)]
    fn at(&self, j: usize, ob: usize, p: usize) -> Block {
        let Canonical { outer, channels, inner } = self.dims;
        let c0 = j * self.cb;
        let c1 = (c0 + self.cb).min(channels);
        let o0 = ob * self.rows;
        let o1 = (o0 + self.rows).min(outer);
        let i0 = p * self.piece;
        let i1 = (i0 + self.piece).min(inner);
        Block {
            start: (o0 * channels + c0) * inner + i0,
            c0,
            dims: Canonical { outer: o1 - o0, channels: c1 - c0, inner: i1 - i0 },
        }
    }

    /// Chunks of row blocks per channel block for reductions: enough to share out, few enough
    /// that the partials stay small; fixed by the shape.
    fn chunks(&self) -> usize {
        let per_channel_block = self.dims.len() / self.nj;
        (per_channel_block / CHUNK_ELEMS)
            .clamp(1, MAX_CHUNKS)
            .min(self.no)
            .min((MAX_PARTIALS / (self.nj * self.cb)).max(1))
    }
}

/// Runs `f` on every block, in parallel over fixed ranges of blocks when the tensor is large.
/// `streams`: how many tensors the pass reads and writes (for the work threshold). `fence`:
/// `f` writes with non-temporal stores, and each task ends with a store fence (one per task,
/// not per block: a fence waits for the streamed lines to drain, and per block of 4096 values
/// that was about a tenth of `bf16` inference on S5).
fn for_blocks(g: &Blocks, streams: usize, fence: bool, f: impl Fn(Block) + Sync + Send) {
    let n = g.count();
    let parallel = use_pool(streams * g.dims.len());
    let tasks = task_count(parallel, g.dims.len(), TASK_ELEMS).min(n);
    for_each_task(parallel, tasks, |t| {
        for b in part(n, tasks, t) {
            f(g.nth(b));
        }
        if fence {
            store_fence();
        }
    });
}

/// A reduction over blocks: `f(scratch, block, partials of the block's channels)` for every
/// block; tasks are (channel block, chunk of row blocks), each with its own partials, then
/// `finish(channel, partials of the chunks in order)` per channel. Fixed by the shape.
fn reduce<T: Copy + Send + Sync>(
    g: &Blocks,
    streams: usize,
    init: T,
    f: impl Fn(&mut TaskScratch, Block, &mut [T]) + Sync + Send,
    mut finish: impl FnMut(usize, &mut dyn Iterator<Item = T>),
) {
    let chunks = g.chunks();
    let tasks = g.nj * chunks;
    let mut partials = vec![init; tasks * g.cb];
    let parallel = use_pool(streams * g.dims.len());
    {
        let shared = SharedMut::new(&mut partials);
        for_each_task(parallel, tasks, |t| {
            let (j, k) = (t / chunks, t % chunks);
            // SAFETY: task `t` alone uses the values `t * cb..(t + 1) * cb`.
            let mine = unsafe { shared.slice(t * g.cb, g.cb) };
            with_scratch(|scratch| {
                for ob in part(g.no, chunks, k) {
                    for p in 0..g.pieces {
                        let blk = g.at(j, ob, p);
                        f(scratch, blk, &mut mine[..blk.dims.channels]);
                    }
                }
            });
        });
    }
    for c in 0..g.dims.channels {
        let (j, i) = (c / g.cb, c % g.cb);
        let mut it = (0..chunks).map(|k| partials[(j * chunks + k) * g.cb + i]);
        finish(c, &mut it);
    }
}

/// The `f32` buffers of a reduction task, kept per thread between calls.
#[derive(Default)]
struct TaskScratch {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    p: Vec<f64>,
    q: Vec<f64>,
    /// The direct kernels' per-channel results.
    moments: Vec<Moments>,
    sums: Vec<(f64, f64)>,
}

impl TaskScratch {
    /// The direct kernels' buffers for blocks of `channels`.
    fn sized_direct(&mut self, channels: usize) {
        if self.moments.len() < channels {
            self.moments.resize(channels, Moments::EMPTY);
            self.sums.resize(channels, (0.0, 0.0));
        }
    }

    /// Buffers of `len` values and `channels` per-channel values.
    fn sized(&mut self, len: usize, channels: usize) {
        for v in [&mut self.a, &mut self.b, &mut self.c] {
            if v.len() < len {
                v.resize(len, 0.0);
            }
        }
        for v in [&mut self.p, &mut self.q] {
            if v.len() < channels {
                v.resize(channels, 0.0);
            }
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<TaskScratch> = RefCell::new(TaskScratch::default());
}

/// Runs `f` with this thread's scratch (taken out, so that a nested use finds a fresh one).
fn with_scratch<R>(f: impl FnOnce(&mut TaskScratch) -> R) -> R {
    let mut scratch = SCRATCH.with(|s| s.take());
    let r = f(&mut scratch);
    SCRATCH.with(|s| s.replace(scratch));
    r
}

/// Inference on 16-bit data: `y = (x - mean[c]) * scale[c] + shift[c]`, computed in `f32` by
/// [`kernels::normalize`](super::normalize) on blocks widened from `x`, rounded to nearest even
/// into `y`. No allocation.
///
/// `x` and `y` are the bits of `dims.len()` values of `format`; the per-channel slices hold
/// `dims.channels` values.
///
/// ```
/// use batchnorm::kernels::{half16, Backend, HalfFormat};
/// use batchnorm::half::bf16;
/// use batchnorm::Canonical;
///
/// let dims = Canonical { outer: 2, channels: 1, inner: 2 };
/// let x: Vec<u16> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
/// let mut y = vec![0u16; 4];
/// half16::normalize(Backend::detect(), HalfFormat::Bf16, &x, &mut y, dims, &[2.0], &[0.5], &[1.0]);
/// let y: Vec<f32> = y.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
/// assert_eq!(y, [0.5, 1.0, 1.5, 2.0]);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn normalize(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    y: &mut [u16],
    dims: Canonical,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
) {
    without_alloc(2 * dims.len(), || normalize_helped(backend, format, x, y, dims, mean, scale, shift));
}

/// [`normalize`] for a training step: helped from outside the pool like the training kernels,
/// never handed to a worker.
#[allow(clippy::too_many_arguments)]
fn normalize_helped(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    y: &mut [u16],
    dims: Canonical,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
) {
    assert!(x.len() == dims.len() && y.len() == dims.len(), "x and y must hold dims.len() values");
    let c = dims.channels;
    assert!(mean.len() == c && scale.len() == c && shift.len() == c);
    if dims.is_empty() {
        return;
    }
    let g = Blocks::new(dims, BLOCK);
    let stream = streaming_half(dims);
    let y = SharedMut::new(y);
    for_blocks(&g, 2, stream, |blk| {
        // SAFETY: blocks are disjoint and each is written by one task.
        let out = unsafe { y.slice(blk.start, blk.len()) };
        normalize_block(backend, format, Some(&x[blk.range()]), out, blk, mean, scale, shift, stream);
    });
}

/// One block of inference: `out = normalize(x)`, or in place when `x` is `None` (the same
/// arithmetic either way). Runs of one channel of at least 16 values, and rows of at least 16
/// channels, take the fused one-pass kernel where the backend has one; other blocks are widened
/// into a buffer and run by the `f32` kernel. `stream`: runs written by the fused kernel use
/// non-temporal stores (out of place only).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn normalize_block(
    backend: Backend,
    format: HalfFormat,
    x: Option<&[u16]>,
    out: &mut [u16],
    blk: Block,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
    stream: bool,
) {
    let Canonical { channels: bc, inner, .. } = blk.dims;
    let ch = blk.channels();
    let run = |x: Option<&[u16]>, out: &mut [u16], p: Params<'_>| match x {
        Some(x) if stream => affine_stream(backend, format, x, out, p),
        Some(x) => affine(backend, format, x, out, p),
        None => affine_inplace(backend, format, out, p),
    };
    if inner >= 16 && has_affine(backend, format) {
        // The block's runs in one kernel call, run `r` of channel `c0 + r % bc`.
        let p = Params::Runs { inner, m: &mean[ch.clone()], s: &scale[ch.clone()], t: &shift[ch.clone()] };
        run(x, out, p);
    } else if inner == 1 && bc >= 16 && has_affine(backend, format) {
        let p = Params::Lanes(&mean[ch.clone()], &scale[ch.clone()], &shift[ch]);
        if bc % 16 == 0 {
            // Rows of whole vectors: the block in one call, the parameters repeating per row.
            run(x, out, p);
        } else {
            for start in (0..out.len()).step_by(bc) {
                run(x.map(|x| &x[start..start + bc]), &mut out[start..start + bc], p);
            }
        }
    } else {
        let mut buf = [0.0f32; BLOCK];
        let buf = &mut buf[..blk.len()];
        widen(backend, format, x.unwrap_or(out), buf);
        let (m, s, t) = (&mean[ch.clone()], &scale[ch.clone()], &shift[ch]);
        super::forward::normalize_inplace::<Dynamic>(backend, buf, blk.dims, m, s, t);
        narrow(backend, format, buf, out);
    }
}

/// [`normalize`] in place: bit-identical to it.
///
/// ```
/// use batchnorm::kernels::{half16, Backend, HalfFormat};
/// use batchnorm::half::f16;
/// use batchnorm::Canonical;
///
/// let dims = Canonical { outer: 1, channels: 2, inner: 1 };
/// let mut xy = [f16::from_f32(1.0).to_bits(), f16::from_f32(-1.0).to_bits()];
/// half16::normalize_inplace(Backend::detect(), HalfFormat::F16, &mut xy, dims, &[0.0, 0.0], &[2.0, 3.0], &[0.0, 1.0]);
/// assert_eq!(xy.map(|b| f16::from_bits(b).to_f32()), [2.0, -2.0]);
/// ```
pub fn normalize_inplace(
    backend: Backend,
    format: HalfFormat,
    xy: &mut [u16],
    dims: Canonical,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
) {
    assert!(xy.len() == dims.len(), "xy must hold dims.len() values");
    let c = dims.channels;
    assert!(mean.len() == c && scale.len() == c && shift.len() == c);
    if dims.is_empty() {
        return;
    }
    let g = Blocks::new(dims, BLOCK);
    let xy = SharedMut::new(xy);
    without_alloc(2 * dims.len(), || {
        for_blocks(&g, 2, false, |blk| {
            // SAFETY: blocks are disjoint and each is read and written by one task.
            let io = unsafe { xy.slice(blk.start, blk.len()) };
            normalize_block(backend, format, None, io, blk, mean, scale, shift, false);
        })
    });
}

/// Per-channel batch mean and biased variance of 16-bit data (`f64`), from the `f32` kernel's
/// statistics of each block merged with Chan's formula in a fixed order.
///
/// `dims.per_channel()` must be at least 1.
///
/// ```
/// use batchnorm::kernels::{half16, Backend, HalfFormat};
/// use batchnorm::half::bf16;
/// use batchnorm::Canonical;
///
/// let dims = Canonical { outer: 4, channels: 1, inner: 1 };
/// let x: Vec<u16> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
/// let (mut mean, mut var) = ([0.0], [0.0]);
/// half16::batch_stats(Backend::detect(), HalfFormat::Bf16, &x, dims, &mut mean, &mut var);
/// assert_eq!((mean[0], var[0]), (2.5, 1.25));
/// ```
pub fn batch_stats(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    dims: Canonical,
    mean_out: &mut [f64],
    var_out: &mut [f64],
) {
    let c = dims.channels;
    assert!(x.len() == dims.len(), "x must hold dims.len() values");
    assert!(mean_out.len() == c && var_out.len() == c);
    if dims.per_channel() == 0 {
        mean_out.fill(f64::NAN);
        var_out.fill(f64::NAN);
        return;
    }
    if c == 0 {
        return;
    }
    let g = Blocks::new(dims, REDUCE_BLOCK);
    let is_direct = direct(dims);
    reduce(
        &g,
        1,
        Moments::EMPTY,
        |s, blk, partial| {
            let (len, bc) = (blk.len(), blk.dims.channels);
            if is_direct {
                s.sized_direct(bc);
                let (x, dims, ahead) = (&x[blk.range()], blk.dims, 0);
                let out = &mut s.moments[..bc];
                match format {
                    HalfFormat::Bf16 => {
                        run_kernel(backend, format, BlockMoments::<true> { x, dims, ahead, out })
                    }
                    HalfFormat::F16 => {
                        run_kernel(backend, format, BlockMoments::<false> { x, dims, ahead, out })
                    }
                }
                for (m, &b) in partial.iter_mut().zip(&s.moments[..bc]) {
                    *m = m.merge(b);
                }
                return;
            }
            s.sized(len, bc);
            widen(backend, format, &x[blk.range()], &mut s.a[..len]);
            super::forward::batch_stats::<Dynamic>(
                backend,
                &s.a[..len],
                blk.dims,
                &mut s.p[..bc],
                &mut s.q[..bc],
            );
            let n = blk.dims.per_channel() as f64;
            for (k, m) in partial.iter_mut().enumerate() {
                *m = m.merge(Moments { n, mean: s.p[k], m2: s.q[k] * n });
            }
        },
        |c, parts| {
            let m = parts.fold(Moments::EMPTY, Moments::merge);
            mean_out[c] = m.mean;
            var_out[c] = m.m2 / m.n;
        },
    );
}

/// Training forward on 16-bit data: [`batch_stats`] into `mean_out` and `var_out`, then
/// `y = (x - mean) * gamma / sqrt(var + eps) + beta` by the [`normalize`] pass; on shapes with
/// channels that fit in L2, channel by channel instead ([`forward_train_channels`]: `x` read
/// once). If a statistic is not finite, `y` is unspecified (as for `f32` data): the channels
/// with finite statistics may have been written.
///
/// ```
/// use batchnorm::kernels::{half16, Backend, HalfFormat};
/// use batchnorm::half::bf16;
/// use batchnorm::Canonical;
///
/// let dims = Canonical { outer: 2, channels: 1, inner: 2 };
/// let x: Vec<u16> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
/// let mut y = vec![0u16; 4];
/// let (mut mean, mut var) = ([0.0], [0.0]);
/// half16::forward_train(Backend::detect(), HalfFormat::Bf16, &x, &mut y, dims, &[1.0], &[0.0], 0.0, &mut mean, &mut var);
/// assert_eq!((mean[0], var[0]), (2.5, 1.25));
/// let y0 = bf16::from_bits(y[0]).to_f32();
/// assert!((y0 + 1.3416).abs() < 0.01);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn forward_train(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    y: &mut [u16],
    dims: Canonical,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    mean_out: &mut [f64],
    var_out: &mut [f64],
) {
    let c = dims.channels;
    assert!(y.len() == dims.len(), "y must hold dims.len() values");
    assert!(gamma.len() == c && beta.len() == c);
    if fuse_train(backend, format, dims) {
        return forward_train_channels(backend, format, x, y, dims, gamma, beta, eps, mean_out, var_out);
    }
    batch_stats(backend, format, x, dims, mean_out, var_out);
    if mean_out.iter().chain(var_out.iter()).any(|v| !v.is_finite()) {
        return;
    }
    let (mut m, mut s, mut t) = (vec![0.0f32; c], vec![0.0f32; c], vec![0.0f32; c]);
    for k in 0..c {
        let a = Affine32::train(mean_out[k], var_out[k], eps, gamma[k], beta[k]);
        (m[k], s[k], t[k]) = (a.m, a.s, a.t);
    }
    normalize_helped(backend, format, x, y, dims, &m, &s, &t);
}

/// Whether a 16-bit output of `dims` is written with non-temporal stores: the rule of the
/// `f32` kernels on its bytes ([`streaming_bytes`], runs of `dims.inner`; `BN_STREAM` forces it
/// either way). Only the planes kernels (runs) stream; rows store the regular way.
#[inline]
fn streaming_half(dims: Canonical) -> bool {
    streaming_bytes(2 * dims.len(), dims.inner)
}

/// Largest channel (bytes of `x`) that [`forward_train_channels`] normalizes right after its
/// statistics, while it is still in L2.
const FUSE_BYTES: usize = 1 << 20;

/// Least distance (values of the channel) the channel-by-channel passes prefetch ahead: a
/// run ahead when runs are long, several when they are short.
const PREFETCH_VALUES: usize = 4096;

/// Whether the training forward runs channel by channel ([`forward_train_channels`]): runs long
/// enough for the direct kernels and no longer than a reduction block, channels that fit
/// [`FUSE_BYTES`], enough of them to share out, and a fused affine kernel. Fixed by the shape
/// (and backend).
#[inline]
fn fuse_train(backend: Backend, format: HalfFormat, dims: Canonical) -> bool {
    let Canonical { outer, channels, inner } = dims;
    (DIRECT_MIN_RUN..=REDUCE_BLOCK).contains(&inner)
        && outer * inner * 2 <= FUSE_BYTES
        && channels >= 4
        && has_affine(backend, format)
        && outer * inner > 0
}

/// The training forward one channel at a time (channels shared out among tasks): the moments
/// of blocks of whole runs of the channel ([`BlockMoments`]) merged in order, then the
/// channel's runs normalized by the fused affine kernel while they are in cache. `x` is read
/// from memory once. Each channel's results depend on the shape alone.
#[allow(clippy::too_many_arguments)]
fn forward_train_channels(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    y: &mut [u16],
    dims: Canonical,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    mean_out: &mut [f64],
    var_out: &mut [f64],
) {
    let Canonical { outer, channels: c, inner } = dims;
    let runs = (REDUCE_BLOCK / inner).max(1);
    // The first pass over a run prefetches the channel's run [`PREFETCH_VALUES`] or more
    // values further (the hardware prefetchers do not follow the stride between runs).
    let ahead = c * inner * PREFETCH_VALUES.div_ceil(inner);
    let parallel = use_pool(2 * dims.len());
    let tasks = task_count(parallel, dims.len(), TASK_ELEMS).min(c);
    let stream = streaming_half(dims);
    let (y, mean_out, var_out) = (SharedMut::new(y), SharedMut::new(mean_out), SharedMut::new(var_out));
    for_each_task(parallel, tasks, |t| {
        for ch in part(c, tasks, t) {
            let mut moments = Moments::EMPTY;
            for o0 in (0..outer).step_by(runs) {
                let n = runs.min(outer - o0);
                let start = (o0 * c + ch) * inner;
                let x = &x[start..start + ((n - 1) * c + 1) * inner];
                let dims = Canonical { outer: n, channels: c, inner };
                let mut out = [Moments::EMPTY];
                let out = &mut out[..];
                match format {
                    HalfFormat::Bf16 => {
                        run_kernel(backend, format, BlockMoments::<true> { x, dims, ahead, out })
                    }
                    HalfFormat::F16 => {
                        run_kernel(backend, format, BlockMoments::<false> { x, dims, ahead, out })
                    }
                }
                moments = moments.merge(out[0]);
            }
            let (mean, var) = (moments.mean, moments.m2 / moments.n);
            // SAFETY: channel `ch` belongs to this task alone.
            unsafe {
                mean_out.slice(ch, 1)[0] = mean;
                var_out.slice(ch, 1)[0] = var;
            }
            if !(mean.is_finite() && var.is_finite()) {
                continue;
            }
            let a = Affine32::train(mean, var, eps, gamma[ch], beta[ch]);
            let (k, y) = ([a.m, a.s, a.t], &y);
            match format {
                HalfFormat::Bf16 => {
                    run_kernel(backend, format, ChannelAffine::<true> { x, y, dims, ch, k, stream })
                }
                HalfFormat::F16 => {
                    run_kernel(backend, format, ChannelAffine::<false> { x, y, dims, ch, k, stream })
                }
            }
        }
    });
}

/// Training backward on 16-bit data: per-channel `sum_dy = sum(dy)` and
/// `sum_dy_xhat = sum(dy * xhat)` with `xhat = (x - mean) * inv_std`, then
/// `dx = gamma * inv_std * (dy - sum_dy / n - xhat * sum_dy_xhat / n)`, `n = outer * inner`.
///
/// ```
/// use batchnorm::kernels::{half16, Backend, HalfFormat};
/// use batchnorm::half::f16;
/// use batchnorm::Canonical;
///
/// let dims = Canonical { outer: 2, channels: 1, inner: 1 };
/// let bits = |v: &[f32]| v.iter().map(|&v| f16::from_f32(v).to_bits()).collect::<Vec<u16>>();
/// let (x, dy) = (bits(&[-1.0, 1.0]), bits(&[1.0, 1.0]));
/// let mut dx = vec![0u16; 2];
/// let (mut sum_dy, mut sum_dy_xhat) = ([0.0], [0.0]);
/// half16::backward(Backend::detect(), HalfFormat::F16, &x, &dy, &mut dx, dims, &[0.0], &[1.0], &[1.0], &mut sum_dy, &mut sum_dy_xhat);
/// assert_eq!((sum_dy[0], sum_dy_xhat[0]), (2.0, 0.0));
/// assert_eq!(dx, bits(&[0.0, 0.0]));
/// ```
#[allow(clippy::too_many_arguments)]
pub fn backward(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    dy: &[u16],
    dx: &mut [u16],
    dims: Canonical,
    mean: &[f64],
    inv_std: &[f64],
    gamma: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    let c = dims.channels;
    assert!(x.len() == dims.len() && dy.len() == dims.len() && dx.len() == dims.len());
    assert!(mean.len() == c && inv_std.len() == c && gamma.len() == c);
    assert!(sum_dy_out.len() == c && sum_dy_xhat_out.len() == c);
    if dims.is_empty() {
        sum_dy_out.fill(0.0);
        sum_dy_xhat_out.fill(0.0);
        return;
    }
    // The two reductions per block (the f32 kernels' `backward_sums`, nothing written), added
    // per channel in block order.
    let g = Blocks::new(dims, REDUCE_BLOCK);
    if fuse_backward(dims) {
        return backward_channels(
            backend,
            format,
            x,
            dy,
            dx,
            dims,
            mean,
            inv_std,
            gamma,
            sum_dy_out,
            sum_dy_xhat_out,
        );
    }
    if direct(dims) {
        return backward_direct(
            backend,
            format,
            x,
            dy,
            dx,
            dims,
            &g,
            mean,
            inv_std,
            gamma,
            sum_dy_out,
            sum_dy_xhat_out,
        );
    }
    reduce(
        &g,
        2,
        (0.0f64, 0.0f64),
        |s, blk, partial| {
            let (len, bc) = (blk.len(), blk.dims.channels);
            s.sized(len, bc);
            let r = blk.range();
            widen(backend, format, &x[r.clone()], &mut s.a[..len]);
            widen(backend, format, &dy[r], &mut s.b[..len]);
            let ch = blk.channels();
            super::backward::backward_sums::<Dynamic>(
                backend,
                &s.a[..len],
                &s.b[..len],
                blk.dims,
                &mean[ch.clone()],
                &inv_std[ch],
                &mut s.p[..bc],
                &mut s.q[..bc],
            );
            for (k, (sdy, sdxh)) in partial.iter_mut().enumerate() {
                *sdy += s.p[k];
                *sdxh += s.q[k];
            }
        },
        |c, parts| {
            let (sdy, sdxh) = parts.fold((0.0, 0.0), |(a, b), (p, q)| (a + p, b + q));
            sum_dy_out[c] = sdy;
            sum_dy_xhat_out[c] = sdxh;
        },
    );
    // dx per block: widened, `dx = k1 * dy + k2 * (x - m) + k3` with the whole tensor's sums and
    // count, rounded back. Runs of one channel: a loop the compiler vectorizes; rows of
    // per-column coefficients: the f32 kernels' dx pass.
    let n = dims.per_channel() as f64;
    let (sum_dy, sum_dy_xhat) = (&*sum_dy_out, &*sum_dy_xhat_out);
    let coefficients: Vec<DxCoefficients> = (0..c)
        .map(|k| DxCoefficients::train(mean[k], inv_std[k], gamma[k], n, sum_dy[k], sum_dy_xhat[k]))
        .collect();
    let g = Blocks::new(dims, BLOCK);
    let dx = SharedMut::new(dx);
    for_blocks(&g, 3, false, |blk| {
        let (mut xb, mut dyb, mut dxb) = ([0.0f32; BLOCK], [0.0f32; BLOCK], [0.0f32; BLOCK]);
        let len = blk.len();
        let (xb, dyb, dxb) = (&mut xb[..len], &mut dyb[..len], &mut dxb[..len]);
        widen(backend, format, &x[blk.range()], xb);
        widen(backend, format, &dy[blk.range()], dyb);
        let ch = blk.channels();
        if blk.dims.inner > 1 {
            dx_block(xb, dyb, blk.dims, &coefficients[ch]);
            // SAFETY: blocks are disjoint and each is written by one task.
            narrow(backend, format, xb, unsafe { dx.slice(blk.start, len) });
            return;
        }
        super::backward::backward_dx::<Dynamic>(
            backend,
            xb,
            dyb,
            dxb,
            blk.dims,
            n,
            &mean[ch.clone()],
            &inv_std[ch.clone()],
            &gamma[ch.clone()],
            &sum_dy[ch.clone()],
            &sum_dy_xhat[ch],
        );
        // SAFETY: blocks are disjoint and each is written by one task.
        narrow(backend, format, dxb, unsafe { dx.slice(blk.start, len) });
    });
}

/// Whether the training backward runs channel by channel ([`backward_channels`]): as
/// [`fuse_train`], with the channel's `x` and `dy` together within [`FUSE_BYTES`].
#[inline]
fn fuse_backward(dims: Canonical) -> bool {
    let Canonical { outer, channels, inner } = dims;
    (DIRECT_MIN_RUN..=REDUCE_BLOCK).contains(&inner) && 2 * outer * inner * 2 <= FUSE_BYTES && channels >= 4
}

/// The training backward one channel at a time (channels shared out among tasks): the sums of
/// blocks of whole runs of the channel ([`BlockSums`]) added in order, then the channel's `dx`
/// ([`BlockDx`] run by run) while its `x` and `dy` are in cache, so that both are read from
/// memory once. Each channel's results depend on the shape alone.
#[allow(clippy::too_many_arguments)]
fn backward_channels(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    dy: &[u16],
    dx: &mut [u16],
    dims: Canonical,
    mean: &[f64],
    inv_std: &[f64],
    gamma: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    let Canonical { outer, channels: c, inner } = dims;
    let runs = (REDUCE_BLOCK / inner).max(1);
    // The sums prefetch ahead as [`forward_train_channels`] does.
    let ahead = c * inner * PREFETCH_VALUES.div_ceil(inner);
    let count = dims.per_channel() as f64;
    let parallel = use_pool(3 * dims.len());
    let tasks = task_count(parallel, dims.len(), TASK_ELEMS).min(c);
    let stream = streaming_half(dims);
    let (dx, sum_dy_out, sum_dy_xhat_out) =
        (SharedMut::new(dx), SharedMut::new(sum_dy_out), SharedMut::new(sum_dy_xhat_out));
    for_each_task(parallel, tasks, |t| {
        for ch in part(c, tasks, t) {
            let (mut sdy, mut sxm) = (0.0f64, 0.0f64);
            for o0 in (0..outer).step_by(runs) {
                let n = runs.min(outer - o0);
                let r = (o0 * c + ch) * inner..(o0 * c + ch) * inner + ((n - 1) * c + 1) * inner;
                let (x, dy) = (&x[r.clone()], &dy[r]);
                let dims = Canonical { outer: n, channels: c, inner };
                let mean = &mean[ch..ch + 1];
                let mut out = [(0.0, 0.0)];
                let out = &mut out[..];
                match format {
                    HalfFormat::Bf16 => {
                        run_kernel(backend, format, BlockSums::<true> { x, dy, dims, ahead, mean, out })
                    }
                    HalfFormat::F16 => {
                        run_kernel(backend, format, BlockSums::<false> { x, dy, dims, ahead, mean, out })
                    }
                }
                sdy += out[0].0;
                sxm += out[0].1;
            }
            let sdxh = sum_dy_xhat(mean[ch], mean[ch] as f32, inv_std[ch], sdy, sxm);
            // SAFETY: channel `ch` belongs to this task alone.
            unsafe {
                sum_dy_out.slice(ch, 1)[0] = sdy;
                sum_dy_xhat_out.slice(ch, 1)[0] = sdxh;
            }
            let d = DxCoefficients::train(mean[ch], inv_std[ch], gamma[ch], count, sdy, sdxh);
            let (k, dx) = ([d.m, d.k1, d.k2, d.k3], &dx);
            match format {
                HalfFormat::Bf16 => {
                    run_kernel(backend, format, ChannelDx::<true> { x, dy, dx, dims, ch, k, stream })
                }
                HalfFormat::F16 => {
                    run_kernel(backend, format, ChannelDx::<false> { x, dy, dx, dims, ch, k, stream })
                }
            }
        }
    });
}

/// [`backward`] by the direct kernels: the sums of each block ([`BlockSums`], accumulated with
/// the shift `f32(mean)`), added per channel in block order and finished in `f64`; then `dx` per
/// block ([`BlockDx`]), one pass that reads `x` and `dy` and writes `dx` in 16 bits.
#[allow(clippy::too_many_arguments)]
fn backward_direct(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    dy: &[u16],
    dx: &mut [u16],
    dims: Canonical,
    g: &Blocks,
    mean: &[f64],
    inv_std: &[f64],
    gamma: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    reduce(
        g,
        2,
        (0.0f64, 0.0f64),
        |s, blk, partial| {
            let bc = blk.dims.channels;
            s.sized_direct(bc);
            let r = blk.range();
            let (x, dy, dims, mean) = (&x[r.clone()], &dy[r], blk.dims, &mean[blk.channels()]);
            let ahead = 0;
            let out = &mut s.sums[..bc];
            match format {
                HalfFormat::Bf16 => {
                    run_kernel(backend, format, BlockSums::<true> { x, dy, dims, ahead, mean, out })
                }
                HalfFormat::F16 => {
                    run_kernel(backend, format, BlockSums::<false> { x, dy, dims, ahead, mean, out })
                }
            }
            for ((sdy, sxm), &(p, q)) in partial.iter_mut().zip(&s.sums[..bc]) {
                *sdy += p;
                *sxm += q;
            }
        },
        |c, parts| {
            let (sdy, sxm) = parts.fold((0.0, 0.0), |(a, b), (p, q)| (a + p, b + q));
            sum_dy_out[c] = sdy;
            sum_dy_xhat_out[c] = sum_dy_xhat(mean[c], mean[c] as f32, inv_std[c], sdy, sxm);
        },
    );
    let c = dims.channels;
    let n = dims.per_channel() as f64;
    let mut k = vec![0.0f32; 4 * c];
    {
        let (km, rest) = k.split_at_mut(c);
        let (k1, rest) = rest.split_at_mut(c);
        let (k2, k3) = rest.split_at_mut(c);
        for ch in 0..c {
            let d = DxCoefficients::train(
                mean[ch],
                inv_std[ch],
                gamma[ch],
                n,
                sum_dy_out[ch],
                sum_dy_xhat_out[ch],
            );
            (km[ch], k1[ch], k2[ch], k3[ch]) = (d.m, d.k1, d.k2, d.k3);
        }
    }
    let g = Blocks::new(dims, BLOCK);
    let stream = streaming_half(dims);
    let dx = SharedMut::new(dx);
    let k = &k;
    for_blocks(&g, 3, stream, |blk| {
        let r = blk.range();
        let (x, dy, dims) = (&x[r.clone()], &dy[r], blk.dims);
        // SAFETY: blocks are disjoint and each is written by one task.
        let dx = unsafe { dx.slice(blk.start, blk.len()) };
        let ch = blk.channels();
        let part = |i: usize| &k[i * c + ch.start..i * c + ch.end];
        let k = [part(0), part(1), part(2), part(3)];
        match format {
            HalfFormat::Bf16 => run_kernel(backend, format, BlockDx::<true> { x, dy, dx, dims, k, stream }),
            HalfFormat::F16 => run_kernel(backend, format, BlockDx::<false> { x, dy, dx, dims, k, stream }),
        }
    });
}

/// Backward with frozen statistics on 16-bit data: the sums of [`backward`] with the given
/// `mean` and `inv_std`, and `dx = dy * gamma * inv_std`, in one pass.
///
/// ```
/// use batchnorm::kernels::{half16, Backend, HalfFormat};
/// use batchnorm::half::bf16;
/// use batchnorm::Canonical;
///
/// let dims = Canonical { outer: 2, channels: 1, inner: 1 };
/// let bits = |v: &[f32]| v.iter().map(|&v| bf16::from_f32(v).to_bits()).collect::<Vec<u16>>();
/// let (x, dy) = (bits(&[0.0, 2.0]), bits(&[1.0, 3.0]));
/// let mut dx = vec![0u16; 2];
/// let (mut sum_dy, mut sum_dy_xhat) = ([0.0], [0.0]);
/// half16::backward_eval(Backend::detect(), HalfFormat::Bf16, &x, &dy, &mut dx, dims, &[1.0], &[0.5], &[2.0], &mut sum_dy, &mut sum_dy_xhat);
/// assert_eq!((sum_dy[0], sum_dy_xhat[0]), (4.0, 1.0));
/// assert_eq!(dx, bits(&[1.0, 3.0]));
/// ```
#[allow(clippy::too_many_arguments)]
pub fn backward_eval(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    dy: &[u16],
    dx: &mut [u16],
    dims: Canonical,
    mean: &[f32],
    inv_std: &[f32],
    gamma: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    let c = dims.channels;
    assert!(x.len() == dims.len() && dy.len() == dims.len() && dx.len() == dims.len());
    assert!(mean.len() == c && inv_std.len() == c && gamma.len() == c);
    assert!(sum_dy_out.len() == c && sum_dy_xhat_out.len() == c);
    if dims.is_empty() {
        sum_dy_out.fill(0.0);
        sum_dy_xhat_out.fill(0.0);
        return;
    }
    let g = Blocks::new(dims, REDUCE_BLOCK);
    let dx = SharedMut::new(dx);
    reduce(
        &g,
        3,
        (0.0f64, 0.0f64),
        |s, blk, partial| {
            let (len, bc) = (blk.len(), blk.dims.channels);
            s.sized(len, bc);
            let r = blk.range();
            widen(backend, format, &x[r.clone()], &mut s.a[..len]);
            widen(backend, format, &dy[r], &mut s.b[..len]);
            let ch = blk.channels();
            super::backward::backward_eval::<Dynamic>(
                backend,
                &s.a[..len],
                &s.b[..len],
                &mut s.c[..len],
                blk.dims,
                &mean[ch.clone()],
                &inv_std[ch.clone()],
                &gamma[ch],
                &mut s.p[..bc],
                &mut s.q[..bc],
            );
            // SAFETY: blocks are disjoint and each is written by one task.
            narrow(backend, format, &s.c[..len], unsafe { dx.slice(blk.start, len) });
            for (k, (sdy, sdyxh)) in partial.iter_mut().enumerate() {
                *sdy += s.p[k];
                *sdyxh += s.q[k];
            }
        },
        |c, parts| {
            let (sdy, sdyxh) = parts.fold((0.0, 0.0), |(a, b), (p, q)| (a + p, b + q));
            sum_dy_out[c] = sdy;
            sum_dy_xhat_out[c] = sdyxh;
        },
    );
}

/// `x = k1 * dy + k2 * (x - m) + k3` over a block, with its channels' coefficients.
#[inline]
fn dx_block(x: &mut [f32], dy: &[f32], dims: Canonical, k: &[DxCoefficients]) {
    let (bc, inner) = (dims.channels, dims.inner);
    if inner == 1 {
        for (xr, dyr) in x.chunks_exact_mut(bc).zip(dy.chunks_exact(bc)) {
            for ((v, &d), k) in xr.iter_mut().zip(dyr).zip(k) {
                *v = k.k1 * d + (k.k2 * (*v - k.m) + k.k3);
            }
        }
    } else {
        for (r, (xr, dyr)) in x.chunks_exact_mut(inner).zip(dy.chunks_exact(inner)).enumerate() {
            let k = k[r % bc];
            for (v, &d) in xr.iter_mut().zip(dyr) {
                *v = k.k1 * d + (k.k2 * (*v - k.m) + k.k3);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Direct kernels: the 16-bit values widened in registers ([`Isa::load_half`]), never through a
// buffer. Used where a block has whole vectors to work on (see [`direct`]); other shapes take
// the buffered path above.

/// Whether the reductions and the training `dx` pass run the direct kernels on `dims`: runs of
/// at least [`DIRECT_MIN_RUN`] values (planes), or rows of at least 16 channels (rows). Shorter
/// runs or rows would be mostly masked tails.
#[inline]
fn direct(dims: Canonical) -> bool {
    dims.inner >= DIRECT_MIN_RUN || (dims.inner == 1 && dims.channels >= 16)
}

/// Least run for the direct kernels.
const DIRECT_MIN_RUN: usize = 32;

/// Runs `kernel` on the instruction set of `backend` (for `bf16` on AVX-512, with AVX512-BF16's
/// conversions where the CPU has them: the same bits), `Wide` where the backend's is missing.
#[inline]
fn run_kernel<K: Kernel>(backend: Backend, format: HalfFormat, kernel: K) -> K::Output {
    match format {
        HalfFormat::Bf16 => with_isa!(backend.usable(), bf16, |isa| isa.vectorize(kernel), else {
            super::simd::portable::Wide.vectorize(kernel)
        }),
        HalfFormat::F16 => with_isa!(backend.usable(), |isa| isa.vectorize(kernel)),
    }
}

/// Calls `f(state, k, i)` for the whole vectors of a run of `n` values (`i` the offset, `k` one
/// of four accumulators), then `tail(state, i)` for the rest (fewer than `LANES`).
#[inline(always)]
fn for_vectors<I: Isa, T>(
    n: usize,
    state: &mut T,
    mut f: impl FnMut(&mut T, usize, usize),
    tail: impl FnOnce(&mut T, usize),
) {
    let l = I::LANES;
    let mut i = 0;
    while i + 4 * l <= n {
        f(state, 0, i);
        f(state, 1, i + l);
        f(state, 2, i + 2 * l);
        f(state, 3, i + 3 * l);
        i += 4 * l;
    }
    // At most three whole vectors remain: a constant-bound loop keeps `k` a constant after
    // unrolling (so the accumulators stay in registers).
    for k in 0..3 {
        if i + l <= n {
            f(state, k, i);
            i += l;
        }
    }
    if i < n {
        tail(state, i);
    }
}

/// The four accumulators summed into one `f32`: pairwise, then across lanes.
#[inline(always)]
fn sum4<I: Isa>(isa: I, a: [I::V; 4]) -> f32 {
    isa.sum(isa.add(isa.add(a[0], a[1]), isa.add(a[2], a[3])))
}

/// Vectors of columns per tile of the rows kernels (accumulators kept in registers).
const TILE: usize = 4;

/// The lanes of `TILE` vectors, in order.
#[inline(always)]
fn lanes<I: Isa>(isa: I, v: &[I::V; TILE]) -> [f32; TILE * 16] {
    let mut out = [0.0f32; TILE * 16];
    for (t, &v) in v.iter().enumerate() {
        isa.store(&mut out[t * I::LANES..], v);
    }
    out
}

/// Vector `t` of one row of a tile (`r` holds at most `TILE * LANES` values), widened; the last
/// vector may be partial (zeros above); `None` past the row.
#[inline(always)]
fn tile_vector<I: Isa, const BF16: bool>(isa: I, r: &[u16], t: usize) -> Option<I::V> {
    let l = I::LANES;
    if (t + 1) * l <= r.len() {
        Some(isa.load_half::<BF16>(&r[t * l..]))
    } else if t * l < r.len() {
        Some(isa.load_half_tail::<BF16>(&r[t * l..]))
    } else {
        None
    }
}

/// `acc += x * w` over one row of a tile.
#[inline(always)]
fn tile_mean<I: Isa, const BF16: bool>(isa: I, r: &[u16], w: I::V, acc: &mut [I::V; TILE]) {
    for (t, a) in acc.iter_mut().enumerate() {
        if let Some(v) = tile_vector::<I, BF16>(isa, r, t) {
            *a = isa.mul_add(v, w, *a);
        }
    }
}

/// `(sum(x - shift), sum((x - shift)^2))` per column of `columns` (at most `TILE` vectors) over
/// the rows of `bc` channels of `x`, as lanes.
#[inline(always)]
fn tile_pass<I: Isa, const BF16: bool>(
    isa: I,
    x: &[u16],
    bc: usize,
    columns: core::ops::Range<usize>,
    shift: &[I::V; TILE],
) -> ([f32; TILE * 16], [f32; TILE * 16]) {
    let (mut ds, mut qs) = ([isa.zero(); TILE], [isa.zero(); TILE]);
    for row in x.chunks_exact(bc) {
        // Lanes past the columns load zero and have a zero shift: they add nothing.
        tile_deviations::<I, BF16>(isa, &row[columns.clone()], shift, &mut ds, &mut qs);
    }
    (lanes(isa, &ds), lanes(isa, &qs))
}

/// `ds += x - m`, `qs += (x - m)^2` over one row of a tile. Lanes past the row load zero and
/// have a zero `m`: they add nothing.
#[inline(always)]
fn tile_deviations<I: Isa, const BF16: bool>(
    isa: I,
    r: &[u16],
    m: &[I::V; TILE],
    ds: &mut [I::V; TILE],
    qs: &mut [I::V; TILE],
) {
    for t in 0..TILE {
        if let Some(v) = tile_vector::<I, BF16>(isa, r, t) {
            let d = isa.sub(v, m[t]);
            ds[t] = isa.add(ds[t], d);
            qs[t] = isa.mul_add(d, d, qs[t]);
        }
    }
}

/// `sdy += dy`, `sxm += dy * (x - m)` over one row of a tile (lanes past the row: `dy` is zero).
#[inline(always)]
fn tile_sums<I: Isa, const BF16: bool>(
    isa: I,
    xr: &[u16],
    dyr: &[u16],
    m: &[I::V; TILE],
    sdy: &mut [I::V; TILE],
    sxm: &mut [I::V; TILE],
) {
    for t in 0..TILE {
        if let (Some(x), Some(g)) = (tile_vector::<I, BF16>(isa, xr, t), tile_vector::<I, BF16>(isa, dyr, t))
        {
            sdy[t] = isa.add(sdy[t], g);
            sxm[t] = isa.mul_add(g, isa.sub(x, m[t]), sxm[t]);
        }
    }
}

/// `(sum(x - shift), sum((x - shift)^2))` over the runs of channel `k` of a planes block
/// (`f32` lanes, added up in `f64`), prefetching `ahead` values ahead when not 0.
#[inline(always)]
fn block_deviations<I: Isa, const BF16: bool>(
    isa: I,
    x: &[u16],
    dims: Canonical,
    k: usize,
    shift: f32,
    ahead: usize,
) -> (f64, f64) {
    let Canonical { outer, channels: bc, inner } = dims;
    let l = I::LANES;
    let mv = isa.splat(shift);
    let (mut ds, mut qs) = ([isa.zero(); 4], [isa.zero(); 4]);
    for o in 0..outer {
        let r = &x[(o * bc + k) * inner..(o * bc + k + 1) * inner];
        // Pairs of vectors (in the instruction set's order), two pairs at a time, then the
        // rest vector by vector.
        let mut i = 0;
        while i + 4 * l <= inner {
            if ahead != 0 {
                isa.prefetch(r.as_ptr().wrapping_add(i + ahead) as *const f32);
                isa.prefetch(r.as_ptr().wrapping_add(i + 2 * l + ahead) as *const f32);
            }
            for (p, j) in [(0, 0), (2 * l, 2)] {
                let (v0, v1) = isa.load_half2::<BF16>(&r[i + p..]);
                let (d0, d1) = (isa.sub(v0, mv), isa.sub(v1, mv));
                ds[j] = isa.add(ds[j], d0);
                qs[j] = isa.mul_add(d0, d0, qs[j]);
                ds[j + 1] = isa.add(ds[j + 1], d1);
                qs[j + 1] = isa.mul_add(d1, d1, qs[j + 1]);
            }
            i += 4 * l;
        }
        let r = &r[i..];
        for_vectors::<I, _>(
            inner - i,
            &mut (&mut ds, &mut qs),
            #[inline(always)]
            |(ds, qs), j, i| {
                if ahead != 0 && j % 2 == 0 {
                    isa.prefetch(r.as_ptr().wrapping_add(i + ahead) as *const f32);
                }
                let d = isa.sub(isa.load_half::<BF16>(&r[i..]), mv);
                ds[j] = isa.add(ds[j], d);
                qs[j] = isa.mul_add(d, d, qs[j]);
            },
            #[inline(always)]
            |(ds, qs), i| {
                let t = &r[i..];
                let d = isa.zero_from(isa.sub(isa.load_half_tail::<BF16>(t), mv), t.len());
                ds[3] = isa.add(ds[3], d);
                qs[3] = isa.mul_add(d, d, qs[3]);
            },
        );
    }
    (sum4(isa, ds) as f64, sum4(isa, qs) as f64)
}

/// Two-pass moments of every channel of one block (the block's own mean, then the deviations
/// from it) into `out` (one per channel of the block).
struct BlockMoments<'a, const BF16: bool> {
    x: &'a [u16],
    dims: Canonical,
    /// Planes blocks: how far ahead (values) the first pass prefetches; 0 for nothing.
    ahead: usize,
    out: &'a mut [Moments],
}

impl<const BF16: bool> Kernel for BlockMoments<'_, BF16> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let Canonical { outer, channels: bc, inner } = self.dims;
        let (x, ahead) = (self.x, self.ahead);
        let n = (outer * inner) as f64;
        let inv_n = 1.0 / n;
        if inner > 1 {
            for (k, out) in self.out.iter_mut().enumerate() {
                // One pass of deviations from a pilot shift (the mean of the channel's first
                // values): with data near its mean the correction of `from_deviations` is
                // exact to rounding. Where the pilot is far from the mean (the correction
                // removes over half of `qs`, so rounding would be amplified), a second pass
                // around the mean found (the data is in cache).
                let first = &x[k * inner..k * inner + inner.min(16)];
                let pilot = first.iter().map(|&b| half_to_f32::<BF16>(b)).sum::<f32>() / first.len() as f32;
                let (ds, qs) = block_deviations::<I, BF16>(isa, x, self.dims, k, pilot, ahead);
                *out = if Moments::pilot_is_far(n, ds, qs) {
                    let mean = (pilot as f64 + ds * inv_n) as f32;
                    let (ds, qs) = block_deviations::<I, BF16>(isa, x, self.dims, k, mean, 0);
                    Moments::from_deviations(n, inv_n, mean, ds, qs)
                } else {
                    Moments::from_deviations(n, inv_n, pilot, ds, qs)
                };
            }
        } else {
            // Rows of `bc` channels, a tile of up to `TILE` vectors of columns at a time: lane
            // `j` of vector `t` accumulates channel `c0 + t * LANES + j`, in registers.
            let mut c0 = 0;
            while c0 < bc {
                let width = (bc - c0).min(TILE * I::LANES);
                // One pass of deviations from a pilot shift per column (the mean of the first
                // up to 16 rows), then, only if the correction would remove over half of a
                // column's sum of squares, a second pass around the means found (as for runs).
                let pilot_rows = outer.min(16);
                let wp = isa.splat(1.0 / pilot_rows as f32);
                let mut pilot = [isa.zero(); TILE];
                for row in x.chunks_exact(bc).take(pilot_rows) {
                    tile_mean::<I, BF16>(isa, &row[c0..c0 + width], wp, &mut pilot);
                }
                let columns = c0..c0 + width;
                let (mut shift, (mut ds, mut qs)) =
                    (lanes(isa, &pilot), tile_pass::<I, BF16>(isa, x, bc, columns.clone(), &pilot));
                if (0..width).any(|k| Moments::pilot_is_far(n, ds[k] as f64, qs[k] as f64)) {
                    for k in 0..width {
                        shift[k] = (shift[k] as f64 + ds[k] as f64 * inv_n) as f32;
                    }
                    let mut mean = [isa.zero(); TILE];
                    for (t, m) in mean.iter_mut().enumerate() {
                        *m = isa.load(&shift[t * I::LANES..]);
                    }
                    (ds, qs) = tile_pass::<I, BF16>(isa, x, bc, columns, &mean);
                }
                for (k, out) in self.out[c0..c0 + width].iter_mut().enumerate() {
                    *out = Moments::from_deviations(n, inv_n, shift[k], ds[k] as f64, qs[k] as f64);
                }
                c0 += width;
            }
        }
    }
}

/// `(sum(dy), sum(dy * (x - m)))` of every channel of one block, `m` the channel's mean in
/// `f32`, into `out`.
struct BlockSums<'a, const BF16: bool> {
    x: &'a [u16],
    dy: &'a [u16],
    dims: Canonical,
    /// Planes blocks: how far ahead (values) the pass prefetches; 0 for nothing.
    ahead: usize,
    mean: &'a [f64],
    out: &'a mut [(f64, f64)],
}

impl<const BF16: bool> Kernel for BlockSums<'_, BF16> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let Canonical { outer, channels: bc, inner } = self.dims;
        let (x, dy, ahead) = (self.x, self.dy, self.ahead);
        if inner > 1 {
            for (k, out) in self.out.iter_mut().enumerate() {
                let mv = isa.splat(self.mean[k] as f32);
                let (mut sdy, mut sxm) = ([isa.zero(); 4], [isa.zero(); 4]);
                for o in 0..outer {
                    let r = (o * bc + k) * inner..(o * bc + k + 1) * inner;
                    let (xr, dyr) = (&x[r.clone()], &dy[r]);
                    // Pairs of vectors (in the instruction set's order), two pairs at a time,
                    // then the rest vector by vector.
                    let l = I::LANES;
                    let mut i = 0;
                    while i + 4 * l <= inner {
                        if ahead != 0 {
                            isa.prefetch(xr.as_ptr().wrapping_add(i + ahead) as *const f32);
                            isa.prefetch(dyr.as_ptr().wrapping_add(i + ahead) as *const f32);
                            isa.prefetch(xr.as_ptr().wrapping_add(i + 2 * l + ahead) as *const f32);
                            isa.prefetch(dyr.as_ptr().wrapping_add(i + 2 * l + ahead) as *const f32);
                        }
                        for (p, j) in [(0, 0), (2 * l, 2)] {
                            let (x0, x1) = isa.load_half2::<BF16>(&xr[i + p..]);
                            let (g0, g1) = isa.load_half2::<BF16>(&dyr[i + p..]);
                            sdy[j] = isa.add(sdy[j], g0);
                            sxm[j] = isa.mul_add(g0, isa.sub(x0, mv), sxm[j]);
                            sdy[j + 1] = isa.add(sdy[j + 1], g1);
                            sxm[j + 1] = isa.mul_add(g1, isa.sub(x1, mv), sxm[j + 1]);
                        }
                        i += 4 * l;
                    }
                    let (xr, dyr) = (&xr[i..], &dyr[i..]);
                    for_vectors::<I, _>(
                        inner - i,
                        &mut (&mut sdy, &mut sxm),
                        #[inline(always)]
                        |(sdy, sxm), j, i| {
                            if ahead != 0 && j % 2 == 0 {
                                isa.prefetch(xr.as_ptr().wrapping_add(i + ahead) as *const f32);
                                isa.prefetch(dyr.as_ptr().wrapping_add(i + ahead) as *const f32);
                            }
                            let g = isa.load_half::<BF16>(&dyr[i..]);
                            sdy[j] = isa.add(sdy[j], g);
                            sxm[j] = isa.mul_add(g, isa.sub(isa.load_half::<BF16>(&xr[i..]), mv), sxm[j]);
                        },
                        #[inline(always)]
                        |(sdy, sxm), i| {
                            // Lanes above the tail are zero in `dy`, so their products vanish.
                            let g = isa.load_half_tail::<BF16>(&dyr[i..]);
                            sdy[3] = isa.add(sdy[3], g);
                            let d = isa.sub(isa.load_half_tail::<BF16>(&xr[i..]), mv);
                            sxm[3] = isa.mul_add(g, d, sxm[3]);
                        },
                    );
                }
                *out = (sum4(isa, sdy) as f64, sum4(isa, sxm) as f64);
            }
        } else {
            let mut c0 = 0;
            while c0 < bc {
                let width = (bc - c0).min(TILE * I::LANES);
                let mut mf = [0.0f32; TILE * 16];
                for (m, &mean) in mf.iter_mut().zip(&self.mean[c0..c0 + width]) {
                    *m = mean as f32;
                }
                let m: [I::V; TILE] = core::array::from_fn(|t| isa.load(&mf[t * I::LANES..]));
                let (mut sdy, mut sxm) = ([isa.zero(); TILE], [isa.zero(); TILE]);
                for (xr, dyr) in x.chunks_exact(bc).zip(dy.chunks_exact(bc)) {
                    tile_sums::<I, BF16>(
                        isa,
                        &xr[c0..c0 + width],
                        &dyr[c0..c0 + width],
                        &m,
                        &mut sdy,
                        &mut sxm,
                    );
                }
                let (sdy, sxm) = (lanes(isa, &sdy), lanes(isa, &sxm));
                for (k, out) in self.out[c0..c0 + width].iter_mut().enumerate() {
                    *out = (sdy[k] as f64, sxm[k] as f64);
                }
                c0 += width;
            }
        }
    }
}

/// The normalization of the runs of channel `ch` (`y = (x - m) * s + t`, `k = [m, s, t]`), in
/// one kernel call: the training forward's second pass, channel by channel.
struct ChannelAffine<'a, const BF16: bool> {
    x: &'a [u16],
    y: &'a SharedMut<'a, u16>,
    dims: Canonical,
    ch: usize,
    k: [f32; 3],
    /// Non-temporal stores.
    stream: bool,
}

impl<const BF16: bool> Kernel for ChannelAffine<'_, BF16> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let Canonical { outer, channels, inner } = self.dims;
        for o in 0..outer {
            let start = (o * channels + self.ch) * inner;
            // SAFETY: the runs of channel `ch` belong to the calling task alone.
            let out = unsafe { self.y.slice(start, inner) };
            affine_run::<I, BF16>(isa, Some(&self.x[start..start + inner]), out, self.k, self.stream);
        }
        if self.stream {
            isa.fence();
        }
    }
}

/// `k1 * dy + (k2 * (x - m) + k3)`: the formula of the `f32` kernels' training `dx`.
#[inline(always)]
fn dx_value<I: Isa>(isa: I, x: I::V, dy: I::V, [m, k1, k2, k3]: [I::V; 4]) -> I::V {
    isa.mul_add(k1, dy, isa.mul_add(k2, isa.sub(x, m), k3))
}

/// `dx = k1 * dy + (k2 * (x - m) + k3)` over one block, rounded into `dx`: per run with the
/// run's channel coefficients, or per row with per-column coefficients (`m`, `k1`, `k2`, `k3`
/// of the block's channels, as slices). Runs use non-temporal stores when `stream` (the caller
/// fences).
struct BlockDx<'a, const BF16: bool> {
    x: &'a [u16],
    dy: &'a [u16],
    dx: &'a mut [u16],
    dims: Canonical,
    k: [&'a [f32]; 4],
    stream: bool,
}

impl<const BF16: bool> Kernel for BlockDx<'_, BF16> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let Canonical { channels: bc, inner, .. } = self.dims;
        let [km, k1, k2, k3] = self.k;
        let l = I::LANES;
        let (x, dy, dx) = (self.x, self.dy, self.dx);
        if inner > 1 {
            for (r, ((xr, dyr), dxr)) in
                x.chunks_exact(inner).zip(dy.chunks_exact(inner)).zip(dx.chunks_exact_mut(inner)).enumerate()
            {
                let c = r % bc;
                let k = [isa.splat(km[c]), isa.splat(k1[c]), isa.splat(k2[c]), isa.splat(k3[c])];
                dx_run::<I, BF16>(isa, xr, dyr, dxr, k, self.stream);
            }
        } else if bc == 2 * l {
            dx_pair_rows::<I, BF16, 1>(isa, x, dy, dx, [km, k1, k2, k3]);
        } else if bc == 4 * l {
            dx_pair_rows::<I, BF16, 2>(isa, x, dy, dx, [km, k1, k2, k3]);
        } else if bc == 8 * l {
            dx_pair_rows::<I, BF16, 4>(isa, x, dy, dx, [km, k1, k2, k3]);
        } else {
            let (km, k1, k2, k3) = (&km[..bc], &k1[..bc], &k2[..bc], &k3[..bc]);

            for ((xr, dyr), dxr) in x.chunks_exact(bc).zip(dy.chunks_exact(bc)).zip(dx.chunks_exact_mut(bc)) {
                let mut c = 0;
                while c + l <= bc {
                    let v =
                        dx_whole::<I, BF16>(isa, xr, dyr, c, column_coefficients(isa, [km, k1, k2, k3], c));
                    isa.store_half::<BF16>(&mut dxr[c..], v);
                    c += l;
                }
                if c < bc && bc >= l {
                    // The row's last whole vector, overlapping (see the planes case).
                    let c = bc - l;
                    let v =
                        dx_whole::<I, BF16>(isa, xr, dyr, c, column_coefficients(isa, [km, k1, k2, k3], c));
                    isa.store_half::<BF16>(&mut dxr[c..], v);
                } else if c < bc {
                    let k = [
                        isa.load_tail(&km[c..]),
                        isa.load_tail(&k1[c..]),
                        isa.load_tail(&k2[c..]),
                        isa.load_tail(&k3[c..]),
                    ];
                    isa.store_half_tail::<BF16>(&mut dxr[c..], dx_tail::<I, BF16>(isa, xr, dyr, c, k));
                }
            }
        }
    }
}

/// `dx` of one run with the coefficients `k`: a head that aligns the output to the pairs'
/// `4 * LANES` bytes (a store across two cache lines costs two, and a streaming store needs
/// it), pairs of vectors in the instruction set's order, one more vector, a masked tail. With
/// `stream`, every store is non-temporal (the caller fences), to the same bits.
#[inline(always)]
fn dx_run<I: Isa, const BF16: bool>(
    isa: I,
    x: &[u16],
    dy: &[u16],
    dx: &mut [u16],
    k: [I::V; 4],
    stream: bool,
) {
    let (n, l) = (dx.len(), I::LANES);
    let head = ((4 * l - (dx.as_ptr() as usize) % (4 * l)) % (4 * l) / 2).min(n);
    let mut i = 0;
    if head >= l {
        put_half::<I, BF16>(isa, &mut dx[..l], dx_whole::<I, BF16>(isa, x, dy, 0, k), stream);
        i = l;
    }
    if i < head {
        let v = dx_tail::<I, BF16>(isa, &x[..head], &dy[..head], i, k);
        put_half::<I, BF16>(isa, &mut dx[i..head], v, stream);
        i = head;
    }
    while i + 2 * l <= n {
        let (x0, x1) = isa.load_half2::<BF16>(&x[i..]);
        let (g0, g1) = isa.load_half2::<BF16>(&dy[i..]);
        let (v0, v1) = (dx_value(isa, x0, g0, k), dx_value(isa, x1, g1, k));
        put_half2::<I, BF16>(isa, &mut dx[i..], v0, v1, stream);
        i += 2 * l;
    }
    if i + l <= n {
        put_half::<I, BF16>(isa, &mut dx[i..i + l], dx_whole::<I, BF16>(isa, x, dy, i, k), stream);
        i += l;
    }
    if i < n {
        put_half::<I, BF16>(isa, &mut dx[i..], dx_tail::<I, BF16>(isa, x, dy, i, k), stream);
    }
}

/// The training `dx` of the runs of channel `ch` in one kernel call (the backward's second
/// pass, channel by channel), `k = [m, k1, k2, k3]` of the channel.
struct ChannelDx<'a, const BF16: bool> {
    x: &'a [u16],
    dy: &'a [u16],
    dx: &'a SharedMut<'a, u16>,
    dims: Canonical,
    ch: usize,
    k: [f32; 4],
    /// Non-temporal stores.
    stream: bool,
}

impl<const BF16: bool> Kernel for ChannelDx<'_, BF16> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let Canonical { outer, channels, inner } = self.dims;
        let k = [isa.splat(self.k[0]), isa.splat(self.k[1]), isa.splat(self.k[2]), isa.splat(self.k[3])];
        for o in 0..outer {
            let r = (o * channels + self.ch) * inner..(o * channels + self.ch + 1) * inner;
            // SAFETY: the runs of channel `ch` belong to the calling task alone.
            let dx = unsafe { self.dx.slice(r.start, inner) };
            dx_run::<I, BF16>(isa, &self.x[r.clone()], &self.dy[r], dx, k, self.stream);
        }
        if self.stream {
            isa.fence();
        }
    }
}

/// `dx` of rows of `P` pairs of vectors of columns: the coefficients `[m, k1, k2, k3]` loaded
/// once in the order of [`Isa::load_half2`] ([`Isa::load_pair_order`]) and kept in registers,
/// each row's values in pairs.
#[inline(always)]
fn dx_pair_rows<I: Isa, const BF16: bool, const P: usize>(
    isa: I,
    x: &[u16],
    dy: &[u16],
    dx: &mut [u16],
    k: [&[f32]; 4],
) {
    let l2 = 2 * I::LANES;
    let mut kv = [[[isa.zero(); 4]; 2]; P];
    for (p, kp) in kv.iter_mut().enumerate() {
        for (j, s) in k.iter().enumerate() {
            let (a, b) = isa.load_pair_order::<BF16>(&s[p * l2..]);
            kp[0][j] = a;
            kp[1][j] = b;
        }
    }
    let width = P * l2;
    for ((xr, dyr), dxr) in x.chunks_exact(width).zip(dy.chunks_exact(width)).zip(dx.chunks_exact_mut(width))
    {
        for (p, ((xv, gv), dv)) in
            xr.chunks_exact(l2).zip(dyr.chunks_exact(l2)).zip(dxr.chunks_exact_mut(l2)).enumerate()
        {
            let (x0, x1) = isa.load_half2::<BF16>(xv);
            let (g0, g1) = isa.load_half2::<BF16>(gv);
            isa.store_half2::<BF16>(dv, dx_value(isa, x0, g0, kv[p][0]), dx_value(isa, x1, g1, kv[p][1]));
        }
    }
}

/// The coefficients of the whole vector of columns at `c` (a function, not a closure: a closure
/// does not inherit the target features of the kernel it is written in, and left out of line
/// its loads become calls).
#[inline(always)]
fn column_coefficients<I: Isa>(isa: I, k: [&[f32]; 4], c: usize) -> [I::V; 4] {
    [isa.load(&k[0][c..]), isa.load(&k[1][c..]), isa.load(&k[2][c..]), isa.load(&k[3][c..])]
}

/// [`dx_value`] of the whole vector at `i` of a run or row of 16-bit values.
#[inline(always)]
fn dx_whole<I: Isa, const BF16: bool>(isa: I, x: &[u16], dy: &[u16], i: usize, k: [I::V; 4]) -> I::V {
    dx_value(isa, isa.load_half::<BF16>(&x[i..]), isa.load_half::<BF16>(&dy[i..]), k)
}

/// [`dx_value`] of the partial vector from `i` to the end of a run or row of 16-bit values.
#[inline(always)]
fn dx_tail<I: Isa, const BF16: bool>(isa: I, x: &[u16], dy: &[u16], i: usize, k: [I::V; 4]) -> I::V {
    dx_value(isa, isa.load_half_tail::<BF16>(&x[i..]), isa.load_half_tail::<BF16>(&dy[i..]), k)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `f32 -> 16 bits -> f32` through [`Isa::store_half`] and [`Isa::load_half`] (whole
    /// vectors and tails), and pairs through [`Isa::store_half2`], on one instruction set.
    struct RoundTrip<'a, const BF16: bool> {
        values: &'a [f32],
        bits: &'a mut [u16],
        back: &'a mut [f32],
    }

    impl<const BF16: bool> Kernel for RoundTrip<'_, BF16> {
        type Output = ();
        fn run<I: Isa>(self, isa: I) {
            let l = I::LANES;
            let n = self.values.len();
            let mut i = 0;
            while i < n {
                if i + 2 * l <= n && (i / l) % 3 == 0 {
                    isa.store_half::<BF16>(&mut self.bits[i..], isa.load(&self.values[i..]));
                    isa.store_half::<BF16>(&mut self.bits[i + l..], isa.load(&self.values[i + l..]));
                    // A pair in the instruction set's order: stored as loaded, the same bits.
                    let (a, b) = isa.load_half2::<BF16>(&self.bits[i..]);
                    let mut again = [0u16; 32];
                    isa.store_half2::<BF16>(&mut again, a, b);
                    let back = [isa.load_half::<BF16>(&again), isa.load_half::<BF16>(&again[l..])];
                    isa.store(&mut self.back[i..], back[0]);
                    isa.store(&mut self.back[i + l..], back[1]);
                    assert_eq!(&again[..2 * l], &self.bits[i..i + 2 * l]);
                    // Values that need rounding, stored as a pair: loaded back as a pair, each
                    // vector equals the one `store_half` rounded.
                    let (a, b) = (isa.load(&self.values[i..]), isa.load(&self.values[i + l..]));
                    isa.store_half2::<BF16>(&mut again, a, b);
                    let (a, b) = isa.load_half2::<BF16>(&again);
                    let (mut a2, mut b2) = ([0.0f32; 16], [0.0f32; 16]);
                    isa.store(&mut a2, a);
                    isa.store(&mut b2, b);
                    for (k, (&a, &b)) in a2[..l].iter().zip(&b2[..l]).enumerate() {
                        let (want_a, want_b) = (self.back[i + k], self.back[i + l + k]);
                        assert!(a.to_bits() == want_a.to_bits() || (a.is_nan() && want_a.is_nan()));
                        assert!(b.to_bits() == want_b.to_bits() || (b.is_nan() && want_b.is_nan()));
                    }
                    i += 2 * l;
                    continue;
                }
                let end = (i + l).min(n);
                if end - i == l {
                    isa.store_half::<BF16>(&mut self.bits[i..], isa.load(&self.values[i..]));
                    isa.store(&mut self.back[i..], isa.load_half::<BF16>(&self.bits[i..]));
                } else {
                    isa.store_half_tail::<BF16>(&mut self.bits[i..end], isa.load_tail(&self.values[i..end]));
                    isa.store_tail(&mut self.back[i..end], isa.load_half_tail::<BF16>(&self.bits[i..end]));
                }
                i = end;
            }
        }
    }

    /// The in-register conversions give `half`'s bits: every 16-bit pattern round trips, and
    /// values next to the rounding boundaries (ties, subnormals, overflow, NaN) round to nearest
    /// even, on every backend.
    #[test]
    fn register_conversions_match_half_on_every_backend() {
        let mut values: Vec<f32> = Vec::new();
        for bits in 0..=u16::MAX {
            values.push(half::bf16::from_bits(bits).to_f32());
            values.push(half::f16::from_bits(bits).to_f32());
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..50_000 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let high = (state >> 32) as u32;
            for low in [0x7fffu32, 0x8000, 0x8001, 0x0fff, 0x1000, 0x1001] {
                values.push(f32::from_bits((high & !0xffff) | low));
                values.push(f32::from_bits((high & !0x1fff) | (low & 0x1fff)));
            }
        }
        values.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 65520.0, 1e-40, -0.0, 3.0]);
        // Every backend as the kernels pick it, then AVX-512 without AVX512-BF16's conversions
        // (the kernels pick those for bf16 where the CPU has them).
        let mut runs: Vec<(Backend, bool)> = Backend::available().into_iter().map(|b| (b, false)).collect();
        #[cfg(target_arch = "x86_64")]
        if super::super::simd::x86::Avx512::with_bf16().is_some() {
            runs.push((Backend::Avx512, true));
        } else {
            println!("no AVX512-BF16: the bf16 conversion instructions are not tested here");
        }
        for (backend, plain_avx512) in runs {
            let label = if plain_avx512 { "avx512 without BF16 instructions" } else { backend.name() };
            for format in [HalfFormat::Bf16, HalfFormat::F16] {
                let (mut bits, mut back) = (vec![0u16; values.len()], vec![0.0f32; values.len()]);
                let (b, k) = (&mut bits[..], &mut back[..]);
                match (format, plain_avx512) {
                    (HalfFormat::F16, true) => continue,
                    #[cfg(target_arch = "x86_64")]
                    (HalfFormat::Bf16, true) => super::super::simd::x86::Avx512::new()
                        .expect("AVX-512F")
                        .vectorize(RoundTrip::<true> { values: &values, bits: b, back: k }),
                    (HalfFormat::Bf16, _) => {
                        run_kernel(backend, format, RoundTrip::<true> { values: &values, bits: b, back: k })
                    }
                    (HalfFormat::F16, _) => {
                        run_kernel(backend, format, RoundTrip::<false> { values: &values, bits: b, back: k })
                    }
                }
                for (i, &v) in values.iter().enumerate() {
                    let (want, wide) = match format {
                        HalfFormat::Bf16 => {
                            let h = half::bf16::from_f32(v);
                            (h.to_bits(), half::bf16::from_bits(bits[i]).to_f32())
                        }
                        HalfFormat::F16 => {
                            let h = half::f16::from_f32(v);
                            (h.to_bits(), half::f16::from_bits(bits[i]).to_f32())
                        }
                    };
                    if v.is_nan() {
                        assert!(wide.is_nan() && back[i].is_nan(), "{label} {format:?} [{i}]: NaN");
                    } else {
                        assert_eq!(bits[i], want, "{label} {format:?} [{i}]: {v:e}");
                        assert_eq!(back[i].to_bits(), wide.to_bits(), "{label} {format:?} [{i}]: widen");
                    }
                }
            }
        }
    }

    /// The one-pass statistics around a pilot shift stay accurate when the pilot (the first
    /// values of a channel) is far from the mean: 16 values of 1000 then 16368 values in
    /// {-1, 0, 1}. Without the second pass around the mean the variance is off by about 1%.
    #[test]
    fn statistics_stay_accurate_with_a_far_pilot() {
        // Planes: two channels of one run; rows: 16 channels whose first 16 rows are the pilot.
        let inner = 16384;
        let planes: Vec<f32> = (0..2 * inner)
            .map(|i| if i % inner < 16 { 1000.0 } else { ((i * 7919) % 3) as f32 - 1.0 })
            .collect();
        let rows: Vec<f32> = (0..16 * 1024)
            .map(|i| if i < 16 * 16 { 8192.0 } else { ((i * 7919) % 3) as f32 - 1.0 })
            .collect();
        for (values, dims) in [
            (planes, Canonical { outer: 1, channels: 2, inner }),
            (rows, Canonical { outer: 1024, channels: 16, inner: 1 }),
        ] {
            check_statistics(&values, dims);
        }
    }

    /// [`batch_stats`] of `values` in both formats on every backend against the `f64` mean and
    /// variance (the values are exact in both formats).
    fn check_statistics(values: &[f32], dims: Canonical) {
        let c = dims.channels;
        let channel = |k: usize| -> Vec<f64> {
            (0..dims.outer)
                .flat_map(|o| (0..dims.inner).map(move |i| (o * c + k) * dims.inner + i))
                .map(|i| values[i] as f64)
                .collect()
        };
        for backend in Backend::available() {
            for format in [HalfFormat::Bf16, HalfFormat::F16] {
                let bits: Vec<u16> = values
                    .iter()
                    .map(|&v| match format {
                        HalfFormat::Bf16 => half::bf16::from_f32(v).to_bits(),
                        HalfFormat::F16 => half::f16::from_f32(v).to_bits(),
                    })
                    .collect();
                let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
                batch_stats(backend, format, &bits, dims, &mut mean, &mut var);
                for k in 0..c {
                    let v = channel(k);
                    let m = v.iter().sum::<f64>() / v.len() as f64;
                    let q = v.iter().map(|&x| (x - m).powi(2)).sum::<f64>() / v.len() as f64;
                    let at = format!("{backend} {format:?} {dims:?} channel {k}");
                    assert!((mean[k] - m).abs() <= 1e-6 * q.sqrt(), "{at}: mean {} vs {m}", mean[k]);
                    assert!((var[k] - q).abs() <= 1e-4 * q, "{at}: var {} vs {q}", var[k]);
                }
            }
        }
    }

    #[test]
    fn blocks_tile_the_tensor_in_order() {
        for (outer, channels, inner) in
            [(3, 5, 7), (2, 3, 5000), (9, 4096, 1), (1000, 7, 1), (5, 70, 49), (2, 1, 40000), (3, 9000, 1)]
        {
            let dims = Canonical { outer, channels, inner };
            for cap in [BLOCK, REDUCE_BLOCK, 64] {
                let g = Blocks::new(dims, cap);
                let mut next = 0;
                for b in 0..g.count() {
                    let blk = g.nth(b);
                    assert_eq!(blk.start, next, "{dims:?} cap {cap} block {b}");
                    assert!(blk.len() <= cap && blk.len() > 0);
                    // Every value of the block is in its channel range.
                    for i in blk.range() {
                        let ch = (i / inner) % channels;
                        assert!(blk.channels().contains(&ch));
                    }
                    next += blk.len();
                }
                assert_eq!(next, dims.len());
            }
        }
    }
}
