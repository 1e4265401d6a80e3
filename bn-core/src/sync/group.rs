//! The transport: the all-gather primitive of [`StatsGroup`] and its in-process groups (one
//! process, threads standing in for ranks).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::BnError;

/// A group of ranks that combine their partial statistics: the transport of synchronized batch
/// norm. Implemented by [`LocalGroup`], [`ThreadRank`] and, in the `bn-mpi` crate, by an MPI
/// communicator.
///
/// The one primitive is a collective all-gather: every rank of the group calls
/// [`all_gather`](Self::all_gather) (the same number of times, in the same order) and every rank
/// gets every rank's buffer, in rank order. Buffers may differ in length between ranks.
/// Synchronized layers call it once per forward and once per backward, whatever their input, so
/// a group never waits for a rank that gave up.
///
/// ```
/// use batchnorm::sync::{LocalGroup, StatsGroup};
/// let group = LocalGroup;
/// assert_eq!((group.rank(), group.size()), (0, 1));
/// assert_eq!(group.all_gather(&[1.0, 2.0])?, vec![vec![1.0, 2.0]]);
/// # Ok::<(), batchnorm::BnError>(())
/// ```
pub trait StatsGroup {
    /// This rank's index, in `0..size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Every rank's `local` buffer, in rank order (`size()` buffers). A failure of the transport
    /// is [`BnError::SyncGroup`].
    fn all_gather(&self, local: &[f64]) -> Result<Vec<Vec<f64>>, BnError>;
}

impl<G: StatsGroup + ?Sized> StatsGroup for &G {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn size(&self) -> usize {
        (**self).size()
    }
    fn all_gather(&self, local: &[f64]) -> Result<Vec<Vec<f64>>, BnError> {
        (**self).all_gather(local)
    }
}

/// The group of one process: synchronized calls give the unsynchronized results (to rounding).
///
/// ```
/// use batchnorm::sync::LocalGroup;
/// use batchnorm::BatchNorm;
/// let mut bn = BatchNorm::new(1, [0])?;
/// let mut y = [0.0; 2];
/// bn.forward_train_sync(&[1.0, 3.0], &[2, 1], &mut y, &LocalGroup)?;
/// assert!((y[0] + 1.0).abs() < 1e-4 && (y[1] - 1.0).abs() < 1e-4);
/// # Ok::<(), batchnorm::BnError>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalGroup;

impl StatsGroup for LocalGroup {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather(&self, local: &[f64]) -> Result<Vec<Vec<f64>>, BnError> {
        Ok(vec![local.to_vec()])
    }
}

/// An in-process group whose ranks are threads: `ThreadGroup::new(n)` gives the `n`
/// [`ThreadRank`]s, one to move into each thread. For tests and for data-parallel training on
/// one machine.
///
/// A rank that is dropped (its thread returned or panicked) leaves the group: the others get
/// [`BnError::SyncGroup`] from their next collective instead of waiting forever.
///
/// ```
/// use batchnorm::sync::{StatsGroup, ThreadGroup};
/// let gathered: Vec<_> = std::thread::scope(|s| {
///     let handles: Vec<_> = ThreadGroup::new(3)
///         .into_iter()
///         .map(|rank| s.spawn(move || rank.all_gather(&[rank.rank() as f64]).unwrap()))
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// assert!(gathered.iter().all(|g| *g == vec![vec![0.0], vec![1.0], vec![2.0]]));
/// ```
#[derive(Debug)]
pub struct ThreadGroup;

impl ThreadGroup {
    /// The ranks of a new group of `size` threads (none for a size of 0).
    #[allow(clippy::new_ret_no_self)]
    pub fn new(size: usize) -> Vec<ThreadRank> {
        let shared = Arc::new(Shared {
            state: Mutex::new(Round {
                slots: vec![None; size],
                arrived: 0,
                generation: 0,
                result: Arc::new(Vec::new()),
                left: None,
            }),
            done: Condvar::new(),
        });
        (0..size).map(|rank| ThreadRank { rank, size, shared: Arc::clone(&shared) }).collect()
    }
}

/// One rank of a [`ThreadGroup`].
#[derive(Debug)]
pub struct ThreadRank {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<Round>,
    done: Condvar,
}

/// The state of the current all-gather.
#[derive(Debug)]
struct Round {
    /// The buffers of the ranks that arrived.
    slots: Vec<Option<Vec<f64>>>,
    arrived: usize,
    /// Completed rounds; a waiter is released when it changes.
    generation: u64,
    /// The buffers of the last completed round (read by its waiters before the next round can
    /// complete, since that needs them to arrive).
    result: Arc<Vec<Vec<f64>>>,
    /// The first rank that left the group.
    left: Option<usize>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Round> {
        // The lock is never held across user code or a panic site; recover from poisoning anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl StatsGroup for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather(&self, local: &[f64]) -> Result<Vec<Vec<f64>>, BnError> {
        let left = |r: usize| BnError::SyncGroup(format!("rank {r} left the group"));
        let mut round = self.shared.lock();
        if let Some(r) = round.left {
            return Err(left(r));
        }
        if round.slots[self.rank].is_some() {
            return Err(BnError::SyncGroup(format!("rank {} entered all_gather twice at once", self.rank)));
        }
        round.slots[self.rank] = Some(local.to_vec());
        round.arrived += 1;
        if round.arrived == self.size {
            let all: Vec<Vec<f64>> = round.slots.iter_mut().map(|s| s.take().unwrap_or_default()).collect();
            round.result = Arc::new(all);
            round.arrived = 0;
            round.generation = round.generation.wrapping_add(1);
            self.shared.done.notify_all();
            return Ok(round.result.as_ref().clone());
        }
        let generation = round.generation;
        while round.generation == generation && round.left.is_none() {
            round = self.shared.done.wait(round).unwrap_or_else(|e| e.into_inner());
        }
        if round.generation != generation {
            return Ok(round.result.as_ref().clone());
        }
        // A rank left before this round completed: withdraw (the round can never complete).
        round.slots[self.rank] = None;
        round.arrived -= 1;
        Err(left(round.left.unwrap_or(self.rank)))
    }
}

impl Drop for ThreadRank {
    fn drop(&mut self) {
        let mut round = self.shared.lock();
        round.left.get_or_insert(self.rank);
        self.shared.done.notify_all();
    }
}
