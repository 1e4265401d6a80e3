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
//! - backward with frozen statistics: one pass (reductions and `dx = k * dy` together);
//! - short runs (fewer than 128 values, at least 16 images): the training forward and backward
//!   go image by image over spans of channel tiles with per-lane parameters ([`span`]): in the
//!   fused schedule every pass, in the split schedule the statistics and the backward's sums
//!   (its normalize and `dx` are the streaming passes, run by run); inference stays run by run
//!   (each run's parameters in registers).
//!
//! Files: [`geometry`] (blocks, chunks, groups), [`reduce`] (moments and sums of blocks and
//! chunks), [`elementwise`] (inference, the streaming passes), [`forward`], [`backward`],
//! [`span`] (short runs).

mod backward;
mod elementwise;
mod forward;
mod geometry;
mod reduce;
mod span;

pub(crate) use backward::{
    backward_eval, backward_fused, fuses_backward, train_backward_dx, train_backward_sums,
};
pub(crate) use elementwise::normalize;
pub(crate) use forward::{forward_train, statistics};
