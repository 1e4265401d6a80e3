//! Synchronized batch norm on MPI ranks, checked against one process on the whole batch.
//!
//! ```sh
//! cargo build --release -p bn-mpi --features mpi --example sync_bn
//! mpirun -np 3 target/release/examples/sync_bn
//! ```
//!
//! Each rank generates the whole batch, trains on its own (uneven; empty on rank 1) shard with
//! statistics synchronized over `MPI_COMM_WORLD`, and compares its outputs, gradients and running
//! statistics with a layer trained on the whole batch alone, and its state with every other
//! rank's (bit for bit). Exits non-zero on any mismatch.

#[path = "common/compare.rs"]
mod compare;

use bn_mpi::mpi::traits::Communicator;
use bn_mpi::{MpiGroup, StatsGroup};

fn main() {
    let Some(universe) = bn_mpi::mpi::initialize() else {
        eprintln!("sync_bn: MPI was already initialized");
        std::process::exit(2);
    };
    let group = MpiGroup::new(universe.world().duplicate());
    let (rank, size) = (group.rank(), group.size());
    match compare::run_all(&group) {
        Ok(passed) => {
            for name in passed {
                println!("rank {rank}/{size} (shard of {}): ok: {name}", compare::shard_size(rank));
            }
        }
        Err(e) => {
            eprintln!("rank {rank}/{size}: MISMATCH: {e}");
            // Exit without finalizing: mpirun then reports the failure and ends the other ranks.
            std::process::exit(1);
        }
    }
}
