//! What synchronized statistics add to a training step (forward + backward), per shard, on MPI.
//!
//! ```sh
//! cargo build --release -p bn-mpi --features mpi --example sync_overhead
//! RAYON_NUM_THREADS=1 mpirun -np 2 target/release/examples/sync_overhead [--reps 15]
//! ```
//!
//! For C = 64 .. 2048, on an NCHW shard (32, C, 14, 14) and an NC shard (256, C) per rank: the
//! median time of the unsynchronized step (`forward_train` + `backward`), of the synchronized
//! step (`forward_train_sync` + `backward_sync`), and of the two all-gathers alone (messages of
//! the same size). Ranks start every timed run together (a barrier), and each figure is the
//! slowest rank's median, since a synchronized step waits for the slowest rank.

use std::time::Instant;

use batchnorm::BatchNorm;
use bn_mpi::mpi::traits::{Communicator, CommunicatorCollectives};
use bn_mpi::{MpiGroup, StatsGroup};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let reps = std::env::args()
        .skip_while(|a| a != "--reps")
        .nth(1)
        .map(|r| r.parse::<usize>().expect("--reps takes a number"))
        .unwrap_or(15);
    let universe = bn_mpi::mpi::initialize().expect("MPI initialized once");
    let group = MpiGroup::new(universe.world().duplicate());
    let comm = group.communicator();
    let (rank, size) = (group.rank(), group.size());
    if rank == 0 {
        println!(
            "{size} ranks, {} Rayon threads per rank, {reps} runs, the slowest rank's medians (ms)",
            rayon::current_num_threads()
        );
        println!(
            "{:<22} {:>6} {:>10} {:>10} {:>10} {:>8} {:>12}",
            "shard", "C", "unsync", "sync", "added", "added%", "exchange(us)"
        );
    }
    for (family, axes) in [("NCHW (32, C, 14, 14)", &[0usize, 2, 3][..]), ("NC (256, C)", &[0][..])] {
        for c in [64, 128, 256, 512, 1024, 2048] {
            let shape: Vec<usize> = if axes.len() == 3 { vec![32, c, 14, 14] } else { vec![256, c] };
            let len: usize = shape.iter().product();
            let x: Vec<f32> = (0..len).map(|i| ((i * 7919 + rank * 13) % 1000) as f32 * 1e-3).collect();
            let dy: Vec<f32> = (0..len).map(|i| ((i * 104_729) % 997) as f32 * 1e-3 - 0.5).collect();
            let (mut y, mut dx) = (vec![0.0f32; len], vec![0.0f32; len]);
            let mut bn = BatchNorm::new(c, axes).expect("valid layout");
            // One all-gather message of a forward: about 2 C values plus a small header.
            let message = vec![0.5f64; 2 * c + 20];
            let mut times = [Vec::new(), Vec::new(), Vec::new()];
            for run in 0..reps + 2 {
                comm.barrier();
                let t = Instant::now();
                bn.forward_train(&x, &shape, &mut y).expect("forward_train");
                bn.backward(&x, &dy, &shape, &mut dx).expect("backward");
                let unsync = t.elapsed().as_secs_f64();
                comm.barrier();
                let t = Instant::now();
                bn.forward_train_sync(&x, &shape, &mut y, &group).expect("forward_train_sync");
                bn.backward_sync(&x, &dy, &shape, &mut dx, &group).expect("backward_sync");
                let sync = t.elapsed().as_secs_f64();
                comm.barrier();
                let t = Instant::now();
                group.all_gather(&message).expect("all_gather");
                group.all_gather(&message).expect("all_gather");
                let exchange = t.elapsed().as_secs_f64();
                if run >= 2 {
                    for (v, s) in times.iter_mut().zip([unsync, sync, exchange]) {
                        v.push(s);
                    }
                }
            }
            let mine: Vec<f64> = times.into_iter().map(median).collect();
            let all = group.all_gather(&mine).expect("all_gather");
            let slowest = |k: usize| all.iter().map(|m| m[k]).fold(0.0, f64::max);
            if rank == 0 {
                let (u, s, e) = (slowest(0) * 1e3, slowest(1) * 1e3, slowest(2) * 1e6);
                println!(
                    "{family:<22} {c:>6} {u:>10.3} {s:>10.3} {:>10.3} {:>7.1}% {e:>12.1}",
                    s - u,
                    100.0 * (s - u) / u
                );
            }
        }
    }
}
