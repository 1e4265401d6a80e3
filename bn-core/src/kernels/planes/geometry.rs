//! The shape of the planes family's work: blocks, chunks and channel groups of every
//! channel ([`Geometry`]), fixed by the shape alone.

use core::ops::Range;

use crate::Canonical;

/// Values per statistics block: 32 KiB, so the block is still in L1 for its second pass.
const BLOCK_ELEMS: usize = 8192;
/// Least values per chunk (a unit of parallel statistics work).
const CHUNK_ELEMS: usize = 1 << 16;
/// Most chunks per channel (bounds the scratch of the split schedule).
const MAX_CHUNKS: usize = 64;
/// Largest per-channel slab (bytes of every tensor the pass re-reads) the fused schedules keep
/// in cache between the reductions and the elementwise pass: a good part of a 1 MiB L2.
pub(super) const FUSE_BYTES: usize = 1 << 20;

/// How every channel's values are cut into blocks and chunks; a function of the shape alone.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub(super) dims: Canonical,
    /// Pieces per run (runs longer than a block are cut into pieces of `piece` values).
    pub(super) pieces: usize,
    pub(super) piece: usize,
    /// Runs per block when `pieces == 1`.
    pub(super) runs_per_block: usize,
    /// Blocks per channel.
    pub(super) blocks: usize,
    /// Blocks per chunk.
    pub(super) chunk_blocks: usize,
    /// Chunks per channel.
    pub(super) chunks: usize,
}

/// Block: runs `o0..o1`, values `i0..i1` of each.
#[derive(Debug, Clone, Copy)]
pub(super) struct Block {
    pub(super) o0: usize,
    pub(super) o1: usize,
    pub(super) i0: usize,
    pub(super) i1: usize,
}

impl Block {
    #[inline(always)]
    pub(super) fn len(&self) -> usize {
        (self.o1 - self.o0) * (self.i1 - self.i0)
    }
}

impl Geometry {
    #[inline(always)]
    pub(super) fn new(dims: Canonical) -> Geometry {
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
    pub(super) fn run_start(&self, o: usize, c: usize) -> usize {
        (o * self.dims.channels + c) * self.dims.inner
    }

    #[inline(always)]
    pub(super) fn block(&self, b: usize) -> Block {
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
    pub(super) fn stride(&self) -> usize {
        self.dims.channels * self.dims.inner
    }

    /// How far ahead the statistics prefetch: the channel's next run, or nothing (0) when
    /// there is no next run.
    #[inline(always)]
    pub(super) fn prefetch_ahead(&self) -> usize {
        if self.dims.outer > 1 {
            self.stride()
        } else {
            0
        }
    }

    /// The values of block `blk` in run `(o, c)` of `x`.
    #[inline(always)]
    pub(super) fn piece_of<'x>(&self, x: &'x [f32], o: usize, c: usize, blk: Block) -> &'x [f32] {
        let s = self.run_start(o, c);
        &x[s + blk.i0..s + blk.i1]
    }

    #[inline(always)]
    pub(super) fn chunk(&self, k: usize) -> Range<usize> {
        k * self.chunk_blocks..((k + 1) * self.chunk_blocks).min(self.blocks)
    }

    /// Bytes of one channel of one tensor.
    #[inline(always)]
    pub(super) fn slab_bytes(&self) -> usize {
        self.dims.outer * self.dims.inner * 4
    }
}

/// Most channels per group of the fused schedules.
pub(super) const MAX_GROUP: usize = 16;
/// Bytes of one tensor's channels per group: small channels are processed a few at a time
/// (statistics of all, then their normalize) so that their short dependency chains overlap,
/// while the group stays in L1.
const GROUP_BYTES: usize = 64 << 10;

/// `channels` cut into consecutive groups of [`GROUP_BYTES`] (at most [`MAX_GROUP`] channels).
#[inline(always)]
pub(super) fn channel_groups(g: &Geometry, channels: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let size = (GROUP_BYTES / g.slab_bytes().max(1)).clamp(1, MAX_GROUP);
    let end = channels.end;
    channels.step_by(size).map(move |c| c..(c + size).min(end))
}
