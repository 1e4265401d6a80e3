//! [`MpiGroup`]: the statistics group on an MPI communicator.

use bn_core::sync::StatsGroup;
use bn_core::BnError;
use mpi::datatype::PartitionMut;
use mpi::traits::{Communicator, CommunicatorCollectives};
use mpi::Count;

/// A [`StatsGroup`] on an MPI communicator: rank and size are the communicator's, and the
/// all-gather is `MPI_Allgather` of the buffer lengths followed by `MPI_Allgatherv` of the
/// buffers.
///
/// Give it a communicator of its own (`world.duplicate()`), so that its collectives never
/// interleave with the application's. Every rank must make the same sequence of synchronized
/// calls; a rank whose input is invalid still takes part (and the others get an error), so
/// nothing waits forever on bad input. MPI's own failures abort the job (rsmpi's default
/// error handler).
///
/// ```no_run
/// use bn_mpi::{MpiGroup, StatsGroup};
/// use mpi::traits::Communicator;
///
/// let universe = mpi::initialize().unwrap();
/// let group = MpiGroup::new(universe.world().duplicate());
/// let all = group.all_gather(&[group.rank() as f64]).unwrap();
/// assert_eq!(all.len(), group.size());
/// ```
#[derive(Debug)]
pub struct MpiGroup<C> {
    comm: C,
}

impl<C: Communicator> MpiGroup<C> {
    /// The group of the ranks of `comm`.
    pub fn new(comm: C) -> Self {
        MpiGroup { comm }
    }

    /// The communicator.
    pub fn communicator(&self) -> &C {
        &self.comm
    }
}

impl<C: Communicator> StatsGroup for MpiGroup<C> {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn all_gather(&self, local: &[f64]) -> Result<Vec<Vec<f64>>, BnError> {
        let size = self.size();
        // A length MPI cannot count is announced as -1 (rather than returning early, which
        // would leave the other ranks waiting), and every rank fails.
        let len: Count = Count::try_from(local.len()).unwrap_or(-1);
        let mut counts: Vec<Count> = vec![0; size];
        self.comm.all_gather_into(&len, &mut counts[..]);
        let mut displs: Vec<Count> = Vec::with_capacity(size);
        let mut total: Count = 0;
        for (r, &c) in counts.iter().enumerate() {
            match (c >= 0).then(|| total.checked_add(c)).flatten() {
                Some(t) => {
                    displs.push(total);
                    total = t;
                }
                None => {
                    return Err(BnError::SyncGroup(format!(
                        "rank {r}'s buffer ({c} values) does not fit in one MPI message with the others"
                    )))
                }
            }
        }
        let mut buffer = vec![0.0f64; total as usize];
        {
            let mut partition = PartitionMut::new(&mut buffer[..], &counts[..], &displs[..]);
            self.comm.all_gather_varcount_into(local, &mut partition);
        }
        Ok(counts.iter().zip(&displs).map(|(&c, &d)| buffer[d as usize..(d + c) as usize].to_vec()).collect())
    }
}
