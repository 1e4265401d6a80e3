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
/// Longest run (values) of the short-run schedule: runs of a few vectors, a whole image apart
/// in a channel, are visited image by image across a tile of channels rather than channel by
/// channel (see [`channel_groups`]).
pub(super) const SHORT_RUN: usize = 256;
/// Bytes of the tensors a short-run tile re-reads (`x`, and `dy` in the backward), all
/// images: the tile stays in a 1 MiB L2 between its statistics and its elementwise pass.
const TILE_BYTES: usize = 512 << 10;

/// `channels` cut into consecutive groups (at most [`MAX_GROUP`] channels) for a pass that
/// re-reads `tensors` tensors. A group's passes go image by image over all its channels (the
/// runs `(o, c..c + len)` are one contiguous span), so the rule sets how much that span holds:
/// with short runs ([`SHORT_RUN`]) a tile of [`TILE_BYTES`] over all images, so that each image's
/// span is long enough for the hardware prefetchers; with longer runs a group of
/// [`GROUP_BYTES`] of one tensor, so that it stays in L1. A function of the shape alone.
#[inline(always)]
pub(super) fn channel_groups(
    g: &Geometry,
    channels: Range<usize>,
    tensors: usize,
) -> impl Iterator<Item = Range<usize>> {
    let size = group_size(g, tensors);
    let end = channels.end;
    channels.step_by(size).map(move |c| c..(c + size).min(end))
}

/// Channels per group of [`channel_groups`].
#[inline(always)]
pub(super) fn group_size(g: &Geometry, tensors: usize) -> usize {
    let slab = g.slab_bytes().max(1);
    let budget = if g.dims.inner <= SHORT_RUN { TILE_BYTES / tensors } else { GROUP_BYTES };
    (budget / slab).clamp(1, MAX_GROUP)
}
