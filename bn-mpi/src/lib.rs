//! Synchronized batch-normalization statistics across MPI processes: PyTorch's `SyncBatchNorm`
//! for the `batchnorm` crate, on the `mpi` crate (rsmpi).
//!
//! In data-parallel training each process (MPI rank) holds a shard of the batch. A layer's
//! [`forward_train_sync`](bn_core::sync::SyncBatchNormExt::forward_train_sync) and
//! [`backward_sync`](bn_core::sync::SyncBatchNormExt::backward_sync) then use the statistics of
//! the whole batch, exchanged with one all-gather per pass and merged in rank order, so every
//! rank gets bit-identical running statistics and gradients. The algorithm lives in
//! [`bn_core::sync`]; this crate adds the transport:
//!
//! - with the cargo feature `mpi`: `MpiGroup`, a [`StatsGroup`] on an MPI communicator. It
//!   needs an MPI library and libclang when it is built (Debian: `apt-get install openmpi-bin
//!   libopenmpi-dev libclang-dev`);
//! - always: the re-exported in-process [`ThreadGroup`] (threads standing in for ranks) and
//!   [`LocalGroup`], so code and tests build on machines without MPI.
//!
//! ```
//! use bn_mpi::{SyncBatchNormExt, ThreadGroup};
//! use batchnorm::batch_norm;
//!
//! #[batch_norm(features = 4, axes = [0, 2, 3], preset = "pytorch")]
//! struct Bn;
//!
//! // Two ranks with shards of 3 and 1 samples of an NCHW batch.
//! let per_sample = 4 * 2 * 2;
//! let batch: Vec<f32> = (0..4 * per_sample).map(|i| (i % 7) as f32).collect();
//! let grads: Vec<Vec<f32>> = std::thread::scope(|s| {
//!     let handles: Vec<_> = ThreadGroup::new(2)
//!         .into_iter()
//!         .map(|rank| {
//!             let batch = &batch;
//!             s.spawn(move || {
//!                 use bn_mpi::StatsGroup;
//!                 let (start, n) = if rank.rank() == 0 { (0, 3) } else { (3, 1) };
//!                 let x = &batch[start * per_sample..(start + n) * per_sample];
//!                 let shape = [n, 4, 2, 2];
//!                 let mut bn = Bn::new();
//!                 let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
//!                 bn.forward_train_sync(x, &shape, &mut y, &rank).unwrap();
//!                 bn.backward_sync(x, &y, &shape, &mut dx, &rank).unwrap();
//!                 bn.gamma_grad().to_vec()
//!             })
//!         })
//!         .collect();
//!     handles.into_iter().map(|h| h.join().unwrap()).collect()
//! });
//! assert_eq!(grads[0], grads[1]); // bit-identical on every rank
//! ```
//!
//! With MPI (feature `mpi`), one process per rank:
//!
//! ```ignore
//! use bn_mpi::{MpiGroup, SyncBatchNormExt};
//! use mpi::traits::Communicator;
//!
//! let universe = mpi::initialize().expect("MPI initialized once");
//! // A communicator of its own, so that these collectives never mix with the application's.
//! let group = MpiGroup::new(universe.world().duplicate());
//! bn.forward_train_sync(&x_shard, &shard_shape, &mut y, &group)?;
//! // ... the rest of the forward and backward passes ...
//! bn.backward_sync(&x_shard, &dy, &shard_shape, &mut dx, &group)?;
//! ```
//!
//! Run it with `mpirun -np 4 target/release/examples/sync_bn` (see docs/RELIABILITY.md).
#![deny(missing_docs)]

pub use bn_core::sync::{ChannelMoments, LocalGroup, StatsGroup, SyncBatchNormExt, ThreadGroup, ThreadRank};

#[cfg(feature = "mpi")]
mod mpi_group;

#[cfg(feature = "mpi")]
pub use mpi_group::MpiGroup;

/// The `mpi` crate this crate is built on (for the communicator types).
#[cfg(feature = "mpi")]
pub use mpi;
