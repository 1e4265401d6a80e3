//! Synchronized batch statistics across processes: data-parallel training where each process
//! (a *rank*) holds a shard of the batch and batch norm uses the statistics of the whole batch
//! (PyTorch's `SyncBatchNorm`, Keras's `synchronized=True`).
//!
//! # How it works
//!
//! - **Partials.** Each rank computes, per feature, the count, mean and sum of squared
//!   deviations of its shard ([`ChannelMoments`], in `f64`) with the layer's own kernels.
//! - **One collective per pass.** The ranks exchange their partials with a [`StatsGroup`], whose
//!   one primitive is an all-gather of a flat `f64` buffer per rank. The buffer starts with a
//!   handshake (the operation, the number of features, the shape, the configuration), so a rank
//!   that disagrees, or that failed its own checks, is reported as an error on **every** rank
//!   instead of leaving the others waiting: a rank whose input is invalid still takes part in the
//!   collective, announcing its failure.
//! - **Merged in rank order, on every rank.** Every rank merges all the partials itself, in rank
//!   order, with Chan's formula: all ranks get bit-identical global statistics, running
//!   statistics and gradients, whatever the transport.
//! - **The layer's contract holds.** Everything is validated before anything is written; after an
//!   `Err` the layer is unchanged. The batch needs at least two values per feature *globally*: a
//!   rank whose shard is empty takes part with a count of zero (PyTorch issues #22192, #74944).
//!   The running statistics use the global count (for the unbiased correction), and
//!   `num_batches_tracked`, the momentum modes, `center`, `scale` and `track_running_stats` work
//!   as in [`BatchNorm::forward_train`](crate::BatchNorm::forward_train).
//!
//! The backward combines `sum(dy)` and `sum(dy * xhat)` the same way and uses the global count
//! in `dx`. Inference ([`BatchNorm::forward_eval`](crate::BatchNorm::forward_eval)) is not synchronized (with
//! `track_running_stats = false` it uses the local shard's statistics).
//!
//! Groups: [`LocalGroup`] (one process: the same results as the unsynchronized layer, to
//! rounding), [`ThreadGroup`] (threads standing in for ranks, for tests), and `bn_mpi::MpiGroup`
//! (an MPI communicator) in the `bn-mpi` crate.
//!
//! ```
//! use batchnorm::sync::{SyncBatchNormExt, ThreadGroup};
//! use batchnorm::BatchNorm;
//!
//! // Two ranks, each with a shard of a (4, 2) batch: rows 0..3 and 3..4.
//! let x = [1.0f32, 10.0, 2.0, 20.0, 3.0, 30.0, 4.0, 40.0];
//! let shards = [(&x[..6], 3), (&x[6..], 1)];
//! let ranks = ThreadGroup::new(2);
//! let outputs: Vec<Vec<f32>> = std::thread::scope(|s| {
//!     let handles: Vec<_> = ranks
//!         .into_iter()
//!         .zip(shards)
//!         .map(|(rank, (shard, n))| {
//!             s.spawn(move || {
//!                 let mut bn = BatchNorm::new(2, [0]).unwrap();
//!                 let mut y = vec![0.0; shard.len()];
//!                 bn.forward_train_sync(shard, &[n, 2], &mut y, &rank).unwrap();
//!                 y
//!             })
//!         })
//!         .collect();
//!     handles.into_iter().map(|h| h.join().unwrap()).collect()
//! });
//! // Normalized with the statistics of all four rows: the last row is above the mean.
//! assert!(outputs[1][0] > 1.0 && outputs[1][1] > 1.0);
//! ```

mod group;
mod moments;
mod passes;
mod wire;

pub use group::{LocalGroup, StatsGroup, ThreadGroup, ThreadRank};
pub use moments::ChannelMoments;
pub use passes::SyncBatchNormExt;
