//! Scheduling on the caller's Rayon pool: a work threshold below which nothing enters the pool,
//! and disjoint writes into outputs that channel tasks share.
//!
//! Partitions that carry reductions (blocks and chunks) are fixed by the shape alone; the thread
//! count only decides how many of those fixed tasks run at once, so results are bit-identical
//! for any number of threads.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicU8, Ordering};

use rayon::prelude::*;

/// Below this many elements (counting every tensor a kernel streams: 2 per element in
/// inference and training, 3 in backward) a kernel runs serially on the calling thread, never
/// entering the pool. Measured with 2 threads: waking a worker costs 5-15 us, which pays for
/// itself from about 64 Ki elements in training (two parallel phases; (16384, 8): 47 -> 38 us)
/// and from about 16 Ki in inference; below, the pool only adds (rows, (2048, 8): 7 -> 20 us).
pub(crate) const PARALLEL_MIN_ELEMS: usize = 1 << 17;

/// Whether a kernel over `elems` elements (counting every tensor it streams) uses the pool.
#[inline]
pub(crate) fn use_pool(elems: usize) -> bool {
    elems >= PARALLEL_MIN_ELEMS && rayon::current_num_threads() > 1
}

/// Runs `f` on a worker of the current pool when a kernel over `elems` elements uses the pool,
/// so that its several parallel phases enter the pool once (not once per phase).
#[inline]
pub(crate) fn in_pool<R: Send>(elems: usize, f: impl FnOnce() -> R + Send) -> R {
    if use_pool(elems) {
        rayon::scope(|_| f())
    } else {
        f()
    }
}

/// Least values per task (a few microseconds of work): smaller tasks cost more to hand out than
/// they save.
pub(crate) const TASK_ELEMS: usize = 1 << 13;

/// Outputs of at least this many bytes are written with non-temporal stores: they would not
/// stay in a 32 MiB last-level cache next to their input anyway, and skipping the read for
/// ownership saves a third of the traffic (measured: S2 inference 1.10x -> 0.82x of a copy).
pub(crate) const STREAM_MIN_BYTES: usize = 16 << 20;

/// Least contiguous run (values) worth streaming: shorter runs leave partial lines, which
/// streaming stores turn into slow partial writes (measured: S4, runs of 49, 1.1x -> 1.7x).
pub(crate) const STREAM_MIN_RUN: usize = 256;

/// Whether an output of `len` values, written in contiguous runs of `run`, is streamed.
#[inline]
pub(crate) fn streaming(len: usize, run: usize) -> bool {
    match STREAMING.load(Ordering::Relaxed) {
        AUTO => len * 4 >= STREAM_MIN_BYTES && run >= STREAM_MIN_RUN,
        ON => true,
        OFF => false,
        _ => {
            let v = match std::env::var("BN_STREAM").as_deref() {
                Ok("0") => OFF,
                Ok("1") => ON,
                _ => AUTO,
            };
            STREAMING.store(v, Ordering::Relaxed);
            streaming(len, run)
        }
    }
}

const AUTO: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;
const UNSET: u8 = 3;

/// The streaming policy: `BN_STREAM=0|1` (read on first use) or [`force_streaming`] override
/// the size rule. Only the kind of store changes, never a value.
static STREAMING: AtomicU8 = AtomicU8::new(UNSET);

/// Forces streaming stores on or off (`None`: the size rule). For tests and measurements.
pub(crate) fn force_streaming(on: Option<bool>) {
    STREAMING.store(
        match on {
            None => AUTO,
            Some(false) => OFF,
            Some(true) => ON,
        },
        Ordering::Relaxed,
    );
}

/// How many tasks to cut `work` units into: enough for load balance (a few per thread), none
/// smaller than `min_task` units.
#[inline]
pub(crate) fn task_count(parallel: bool, work: usize, min_task: usize) -> usize {
    if !parallel {
        return 1;
    }
    let by_size = work / min_task.max(1);
    by_size.clamp(1, 8 * rayon::current_num_threads())
}

/// Runs `f(i)` for every `i` in `0..n`: on the current pool when `parallel`, else in order on the
/// calling thread.
#[inline]
pub(crate) fn for_each_task(parallel: bool, n: usize, f: impl Fn(usize) + Sync + Send) {
    if parallel && n > 1 {
        (0..n).into_par_iter().for_each(f);
    } else {
        (0..n).for_each(f);
    }
}

/// The `k`-th of `parts` near-equal ranges of `0..len`.
#[inline]
pub(crate) fn part(len: usize, parts: usize, k: usize) -> core::ops::Range<usize> {
    (len * k / parts)..(len * (k + 1) / parts)
}

/// A mutable slice that several tasks write through, each into its own disjoint ranges.
pub(crate) struct SharedMut<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: a `SharedMut` is a `&mut [T]` split among tasks; handing it to other threads is sound
// for `T: Send` because every access goes through `slice`, whose contract makes the ranges used
// at the same time disjoint.
unsafe impl<T: Send> Send for SharedMut<'_, T> {}
// SAFETY: as for `Send`: shared references to it only give out disjoint ranges.
unsafe impl<T: Send> Sync for SharedMut<'_, T> {}

impl<'a, T> SharedMut<'a, T> {
    /// Borrows `slice` mutably for the lifetime of the `SharedMut`.
    #[inline]
    pub(crate) fn new(slice: &'a mut [T]) -> Self {
        SharedMut { ptr: slice.as_mut_ptr(), len: slice.len(), _borrow: PhantomData }
    }

    /// The values `start..start + len`. Panics when out of bounds.
    ///
    /// # Safety
    ///
    /// No two slices obtained from the same `SharedMut` that are alive at the same time may
    /// overlap (each task writes only the ranges it owns).
    #[inline]
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, start: usize, len: usize) -> &'a mut [T] {
        assert!(start <= self.len && len <= self.len - start, "range out of bounds");
        // SAFETY: the range is inside the borrowed slice (checked above), which outlives 'a;
        // the caller guarantees no other live reference overlaps it.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}
