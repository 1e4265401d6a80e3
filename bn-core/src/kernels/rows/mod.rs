//! The rows family (`inner == 1`): `outer` contiguous rows of all `C` channels. Parameters are
//! per lane, loaded from arrays indexed by column.
//!
//! A small or odd `C` is widened to a *virtual row* of `W = lcm(C, 16)` values (at most
//! [`MAX_PERIOD`]): `W / C` real rows side by side, so that a row is whole vectors and `C = 1`
//! or `C = 7` run at full vector width; parameters repeat with period `C` along it. The values
//! after the last whole virtual row (fewer than `W`) are the *tail*.
//!
//! Statistics (training forward and backward): the virtual rows are cut into blocks of
//! `block_rows` rows and tiles of at most [`TILE_COLS`] columns (a tile is at most
//! [`TILE_ELEMS`] values, so it stays in cache between its two passes); consecutive blocks form
//! chunks, all fixed by the shape. A task computes one chunk of one column tile: per block the
//! column means, then the deviations from them (both with register accumulators,
//! [`column_sums`]), merged into the chunk's moments (Chan). The chunks are then merged in
//! order, the virtual columns folded into channels, and the tail added. A second, streaming
//! pass applies the per-column transform (with non-temporal stores for large outputs). The
//! backward works the same way: fused sums per tile, an ordered merge, the `dx` pass; with
//! frozen statistics, `dx` is written by the first pass while the tile is in L1.
//!
//! Files: [`geometry`] (virtual rows, blocks, tiles; the column sums), [`statistics`],
//! [`elementwise`] (inference, the training normalize), [`backward`].

#[macro_use]
mod geometry;
mod backward;
mod elementwise;
mod statistics;

pub(crate) use backward::{backward_eval, train_backward_dx, train_backward_sums};
pub(crate) use elementwise::{forward_train, normalize};
pub(crate) use statistics::batch_stats;
