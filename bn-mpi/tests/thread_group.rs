//! The comparison the `sync_bn` example runs under `mpirun`, on the in-process thread group
//! (2, 3 and 4 ranks): it needs no MPI library.

#[path = "../examples/common/compare.rs"]
mod compare;

use bn_mpi::{LocalGroup, ThreadGroup};

#[test]
fn synchronized_training_matches_the_whole_batch_on_thread_ranks() {
    for size in [2, 3, 4] {
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = ThreadGroup::new(size)
                .into_iter()
                .map(|rank| s.spawn(move || compare::run_all(&rank)))
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank panicked")).collect()
        });
        for (r, result) in results.into_iter().enumerate() {
            let passed = result.unwrap_or_else(|e| panic!("{size} ranks, rank {r}: {e}"));
            assert_eq!(passed.len(), 5, "{size} ranks, rank {r}: {passed:?}");
        }
    }
}

#[test]
fn one_process_is_a_group_of_one() {
    let passed = compare::run_all(&LocalGroup).unwrap();
    assert_eq!(passed.len(), 5);
}
