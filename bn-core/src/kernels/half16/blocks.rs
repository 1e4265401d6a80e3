//! How the 16-bit passes cut a tensor into blocks and run them: [`Blocks`], fixed by the shape
//! alone; the elementwise passes' parallel loop over blocks ([`for_blocks`]) and the
//! reductions' ([`reduce`], with per-thread scratch); and when an output is streamed.

use core::cell::RefCell;

use crate::kernels::parallel::{
    for_each_task, part, store_fence, streaming_bytes, task_count, use_pool, SharedMut, TASK_ELEMS,
};
use crate::kernels::stats::Moments;
use crate::Canonical;

/// Values per block of the elementwise passes: three 16 KiB `f32` buffers on the stack stay in
/// L1 with the block's 16-bit input and output.
pub(super) const BLOCK: usize = 4096;
/// Values per block of the reductions (larger: fewer per-block merges; the buffers stay in L2).
pub(super) const REDUCE_BLOCK: usize = 16384;
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
pub(super) struct Blocks {
    pub(super) dims: Canonical,
    /// Channels per block and channel blocks.
    pub(super) cb: usize,
    pub(super) nj: usize,
    /// Rows (`o`) per block and row blocks.
    pub(super) rows: usize,
    pub(super) no: usize,
    /// Values per piece of a run and pieces per run.
    pub(super) piece: usize,
    pub(super) pieces: usize,
}

/// One block: `len` values from `start`, channels `c0..c0 + dims.channels`, seen as a tensor of
/// its own.
#[derive(Debug, Clone, Copy)]
pub(super) struct Block {
    pub(super) start: usize,
    pub(super) c0: usize,
    pub(super) dims: Canonical,
}

impl Block {
    #[inline(always)]
    pub(super) fn len(&self) -> usize {
        self.dims.len()
    }

    #[inline(always)]
    pub(super) fn range(&self) -> core::ops::Range<usize> {
        self.start..self.start + self.len()
    }

    #[inline(always)]
    pub(super) fn channels(&self) -> core::ops::Range<usize> {
        self.c0..self.c0 + self.dims.channels
    }
}

impl Blocks {
    pub(super) fn new(dims: Canonical, cap: usize) -> Blocks {
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
    pub(super) fn count(&self) -> usize {
        self.nj * self.no * self.pieces
    }

    /// Block `b` in memory order.
    #[inline(always)]
    pub(super) fn nth(&self, b: usize) -> Block {
        let p = b % self.pieces;
        let j = (b / self.pieces) % self.nj;
        let ob = b / (self.pieces * self.nj);
        self.at(j, ob, p)
    }

    #[inline(always)]
    pub(super) fn at(&self, j: usize, ob: usize, p: usize) -> Block {
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
    pub(super) fn chunks(&self) -> usize {
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
pub(super) fn for_blocks(g: &Blocks, streams: usize, fence: bool, f: impl Fn(Block) + Sync + Send) {
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
pub(super) fn reduce<T: Copy + Send + Sync>(
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
pub(super) struct TaskScratch {
    pub(super) a: Vec<f32>,
    pub(super) b: Vec<f32>,
    pub(super) c: Vec<f32>,
    pub(super) p: Vec<f64>,
    pub(super) q: Vec<f64>,
    /// The direct kernels' per-channel results.
    pub(super) moments: Vec<Moments>,
    pub(super) sums: Vec<(f64, f64)>,
}

impl TaskScratch {
    /// The direct kernels' buffers for blocks of `channels`.
    pub(super) fn sized_direct(&mut self, channels: usize) {
        if self.moments.len() < channels {
            self.moments.resize(channels, Moments::EMPTY);
            self.sums.resize(channels, (0.0, 0.0));
        }
    }

    /// Buffers of `len` values and `channels` per-channel values.
    pub(super) fn sized(&mut self, len: usize, channels: usize) {
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

/// Whether a 16-bit output of `dims` is written with non-temporal stores: the rule of the
/// `f32` kernels on its bytes ([`streaming_bytes`], runs of `dims.inner`; `BN_STREAM` forces it
/// either way). Only the planes kernels (runs) stream; rows store the regular way.
#[inline]
pub(super) fn streaming_half(dims: Canonical) -> bool {
    streaming_bytes(2 * dims.len(), dims.inner)
}

/// Largest channel (bytes of `x`) that [`forward_train_channels`] normalizes right after its
/// statistics, while it is still in L2.
pub(super) const FUSE_BYTES: usize = 1 << 20;

/// Least distance (values of the channel) the channel-by-channel passes prefetch ahead: a
/// run ahead when runs are long, several when they are short.
pub(super) const PREFETCH_VALUES: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

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
