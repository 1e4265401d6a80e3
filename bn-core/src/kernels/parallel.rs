//! Scheduling on the caller's Rayon pool: a work threshold below which nothing enters the pool,
//! tasks the calling thread starts on at once while helpers from the pool join it
//! ([`for_each_task`]), and disjoint writes into outputs that channel tasks share.
//!
//! Partitions that carry reductions (blocks and chunks) are fixed by the shape alone; the thread
//! count only decides how many of those fixed tasks run at once, so results are bit-identical
//! for any number of threads.

use core::any::Any;
use core::cell::Cell;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Below this many elements (counting every tensor a kernel streams: 2 per element in
/// inference and training, 3 in backward) a kernel runs serially on the calling thread, never
/// entering the pool. Measured with 2 threads when the pool's workers were handed whole kernels:
/// waking a worker costs 5-15 us, which pays for itself from about 64 Ki elements in training
/// (two parallel phases; (16384, 8): 47 -> 38 us) and from about 16 Ki in inference; below, the
/// pool only adds (rows, (2048, 8): 7 -> 20 us).
pub(crate) const PARALLEL_MIN_ELEMS: usize = 1 << 17;

/// Whether a kernel over `elems` elements (counting every tensor it streams) uses the pool.
#[inline]
pub(crate) fn use_pool(elems: usize) -> bool {
    elems >= PARALLEL_MIN_ELEMS && rayon::current_num_threads() > 1 && !SERIAL.with(Cell::get)
}

/// Below this many elements (counted as for [`PARALLEL_MIN_ELEMS`]) a kernel that would have to
/// hand itself to the pool from outside ([`without_alloc`]) runs serially instead: the hand-off
/// wakes a worker and then the caller, which costs more than the second thread saves on small
/// kernels. Measured (2 threads, bn-bench, inference of rows (n, 1024), median of 2 runs):
/// n = 256 (512 Ki elements streamed) 62 us serially, 73 us handed off; n = 448, 122 us
/// serially, 106 us handed off. The threshold sits between them.
pub(crate) const HANDOFF_MIN_ELEMS: usize = 5 << 17;

std::thread_local! {
    /// Set while [`without_alloc`] runs a kernel serially: [`use_pool`] then says no.
    static SERIAL: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, whose parallel phases must not allocate (inference), where they can run without:
/// on a worker of the current pool. Called from outside the pool with a kernel large enough
/// to use it, this hands `f` to a worker and sleeps until it is done (as any Rayon call from
/// outside does; there [`for_each_task`] helps with `join`, which allocates nothing, where
/// from outside it must `spawn` a boxed job and a shared counter per phase); with a kernel
/// below [`HANDOFF_MIN_ELEMS`] it runs `f` serially on the calling thread instead.
#[inline]
pub(crate) fn without_alloc<R: Send>(elems: usize, f: impl FnOnce() -> R + Send) -> R {
    if !use_pool(elems) || rayon::current_thread_index().is_some() {
        return f();
    }
    if elems >= HANDOFF_MIN_ELEMS {
        return rayon::scope(|_| f());
    }
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            SERIAL.with(|s| s.set(self.0));
        }
    }
    let _reset = Reset(SERIAL.with(|s| s.replace(true)));
    f()
}

/// Least values per task (a few microseconds of work): smaller tasks cost more to hand out than
/// they save.
pub(crate) const TASK_ELEMS: usize = 1 << 13;

/// Outputs of at least this many bytes are written with non-temporal stores: with their input
/// they would not stay in a 32 MiB last-level cache anyway, and skipping the read for
/// ownership saves a third of the traffic. 14 MiB, not half the cache: `bf16` S5 (15.6 MiB out,
/// 31.3 MiB with its input) is faster streamed and `bf16` S2 (12.25 MiB out) slower, on an
/// AMD Zen 3 with 32 MiB of L3 (docs/PERFORMANCE.md).
pub(crate) const STREAM_MIN_BYTES: usize = 14 << 20;

/// Least contiguous run (values) worth streaming: shorter runs leave partial lines, which
/// streaming stores turn into slow partial writes. Runs of 196 values (14 x 14: 12 whole lines
/// and at most two partial ones) pay: ResNet-50's (50, 1024, 14, 14) inference takes 0.67-0.76x
/// the time streamed on a Zen 4 VM. Runs of 49 do not: (32, 2048, 7, 7) takes 1.2x as long
/// with 1 thread (and 1.5x on a Zen 3), (50, 2048, 7, 7) 1.2x.
pub(crate) const STREAM_MIN_RUN: usize = 128;

/// Inference outputs (`f32`, planes family) of at least this many bytes, in runs of at least
/// [`STREAM_MIN_RUN`] values, are written with non-temporal stores. Lower than the line of the
/// training passes ([`STREAM_MIN_BYTES`]): inference reads one tensor where training reads its
/// input twice and keeps statistics. Measured on a Zen 4 VM (32 MiB L3 shared with other
/// tenants; bn-bench --quick, medians of 3 interleaved rounds): ResNet-50's (50, 256, 14, 14)
/// (9.6 MiB out, runs of 196) takes 0.67x the time streamed with 1 thread and 0.90x with 2.
/// Runs of 49 do not pay even above the line: (50, 2048, 7, 7) (19 MiB) takes 1.26x (1 thread)
/// and 1.33x (2 threads) as long streamed, (32, 2048, 7, 7) (12.3 MiB) 0.90x and 2.2x.
pub(crate) const STREAM_MIN_BYTES_INFERENCE: usize = 8 << 20;

/// Orders this thread's non-temporal stores before its later stores (`sfence` on x86-64; nothing
/// elsewhere, where the kernels store the regular way): what a task that streamed runs before
/// the pool's synchronization lets other threads read its output.
#[inline]
pub(crate) fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86-64.
    unsafe {
        core::arch::x86_64::_mm_sfence()
    }
}

/// Whether an `f32` output of `len` values, written in contiguous runs of `run`, is streamed.
#[inline]
pub(crate) fn streaming(len: usize, run: usize) -> bool {
    streaming_bytes(len * 4, run)
}

/// Whether an output of `bytes`, written in contiguous runs of `run` values, is streamed.
#[inline]
pub(crate) fn streaming_bytes(bytes: usize, run: usize) -> bool {
    policy(bytes >= STREAM_MIN_BYTES && run >= STREAM_MIN_RUN)
}

/// Whether the `f32` output of an inference of the planes family, `len` values in contiguous
/// runs of `run`, is streamed ([`STREAM_MIN_BYTES_INFERENCE`]).
#[inline]
pub(crate) fn streaming_inference(len: usize, run: usize) -> bool {
    policy(len * 4 >= STREAM_MIN_BYTES_INFERENCE && run >= STREAM_MIN_RUN)
}

/// The streaming policy applied to what the size rule says (`auto`).
#[inline]
fn policy(auto: bool) -> bool {
    match STREAMING.load(Ordering::Relaxed) {
        AUTO => auto,
        ON => true,
        OFF => false,
        _ => {
            let v = match std::env::var("BN_STREAM").as_deref() {
                Ok("0") => OFF,
                Ok("1") => ON,
                _ => AUTO,
            };
            STREAMING.store(v, Ordering::Relaxed);
            policy(auto)
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

/// Runs `f(i)` for every `i` in `0..n`: with `parallel`, on the calling thread and helpers
/// from the current pool, else in order on the calling thread.
///
/// The calling thread does not hand the work over and sleep until it is done (what a Rayon
/// `join` or parallel iterator does when called from outside the pool): it asks for up to
/// `threads - 1` helpers and starts on the tasks at once. The caller claims tasks from the
/// front and helpers from the back until none is left (see [`Claims::work`]). A helper that
/// wakes late finds fewer tasks (or none): the caller has done them. Waking a sleeping worker costs 5-15 us and more on
/// these virtual machines, as much as a whole small kernel, and a caller that sleeps pays for
/// its own wake-up too. The call returns when every task has finished; a panic in a task is
/// raised again on the calling thread then.
///
/// On a worker thread of the pool the helpers are `join` halves (no allocation); from outside
/// they are spawned jobs (two small allocations per call; see [`without_alloc`]).
pub(crate) fn for_each_task(parallel: bool, n: usize, f: impl Fn(usize) + Sync + Send) {
    let threads = if parallel { rayon::current_num_threads().min(n) } else { 1 };
    if threads <= 1 || n > u32::MAX as usize {
        (0..n).for_each(f);
        return;
    }
    if rayon::current_thread_index().is_some() {
        let claims = Claims::new(n);
        spread(&claims, &f, threads, false);
        claims.raise();
        return;
    }
    let claims = Arc::new(Claims::new(n));
    let task: &(dyn Fn(usize) + Sync) = &f;
    // SAFETY: only the lifetime is erased (same fat pointer). A helper calls through the
    // pointer only after claiming a task `i < n`; the caller returns only after `done == n`, that
    // is after every claimed task has finished, so no call through it outlives `f`. A helper
    // that starts later claims nothing and touches only `claims`, which it co-owns.
    let task = TaskPtr(unsafe {
        core::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync + 'static)>(
            task,
        )
    });
    for _ in 1..threads {
        let claims = Arc::clone(&claims);
        rayon::spawn(move || {
            claims.work(true, |i| {
                // SAFETY: task `i` is claimed and not done, so the caller is still waiting and
                // `f` is alive (see above).
                unsafe { task.call(i) }
            })
        });
    }
    claims.work(false, &f);
    let mut spins = 0u32;
    while claims.done.load(Ordering::Acquire) < n {
        if spins < SPINS {
            core::hint::spin_loop();
            spins += 1;
        } else {
            std::thread::yield_now();
        }
    }
    claims.raise();
}

/// Runs `f(k, start..end, &mut out[start..end])` for the consecutive chunks of `chunk` values of
/// `out` (the last may be shorter), one task per chunk through [`for_each_task`].
pub(crate) fn for_each_chunk_mut<'a, T: Send>(
    parallel: bool,
    out: &'a mut [T],
    chunk: usize,
    f: impl Fn(usize, core::ops::Range<usize>, &'a mut [T]) + Sync + Send,
) {
    assert!(chunk > 0, "chunks of no values");
    let n = out.len();
    let out = SharedMut::new(out);
    for_each_task(parallel, n.div_ceil(chunk), |k| {
        let (start, end) = (k * chunk, ((k + 1) * chunk).min(n));
        // SAFETY: chunk `k` is handed to task `k` only; chunks are disjoint.
        f(k, start..end, unsafe { out.slice(start, end - start) });
    });
}

/// `threads` workers (the caller and `join` halves others may steal) claiming tasks.
fn spread(claims: &Claims, f: &(dyn Fn(usize) + Sync), threads: usize, back: bool) {
    if threads <= 1 {
        claims.work(back, f);
    } else {
        let half = threads / 2;
        rayon::join(|| spread(claims, f, half, back), || spread(claims, f, threads - half, true));
    }
}

/// Spins of the caller waiting for the tasks other threads run before it yields its core.
const SPINS: u32 = 1 << 10;

/// The tasks of one [`for_each_task`], handed out from both ends.
struct Claims {
    /// Tasks claimed from the front (low 32 bits) and from the back (high 32 bits).
    ends: AtomicU64,
    done: AtomicUsize,
    n: usize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// The caller's task function, shared with spawned helpers that may outlive the call (see
/// [`for_each_task`] for why they never call it after the call returns).
#[derive(Clone, Copy)]
struct TaskPtr(*const (dyn Fn(usize) + Sync));

// SAFETY: the pointee is `Sync`, so calling it from other threads is sound while it lives;
// `for_each_task` keeps it alive for every call made through the pointer.
unsafe impl Send for TaskPtr {}

impl TaskPtr {
    /// Calls the task function.
    ///
    /// # Safety
    ///
    /// The function must be alive (see [`for_each_task`]).
    #[inline]
    unsafe fn call(self, i: usize) {
        // SAFETY: alive by the caller's contract; `Sync`, so callable from any thread.
        unsafe { (*self.0)(i) }
    }
}

impl Claims {
    fn new(n: usize) -> Claims {
        Claims { ends: AtomicU64::new(0), done: AtomicUsize::new(0), n, panic: Mutex::new(None) }
    }

    /// Claims the first unclaimed task, or the last with `back`; `None` when none is left.
    #[inline]
    fn claim(&self, back: bool) -> Option<usize> {
        let mut ends = self.ends.load(Ordering::Relaxed);
        loop {
            let (front, from_back) = ((ends & u64::from(u32::MAX)) as usize, (ends >> 32) as usize);
            if front + from_back >= self.n {
                return None;
            }
            let next = if back { ends + (1 << 32) } else { ends + 1 };
            match self.ends.compare_exchange_weak(ends, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(if back { self.n - 1 - from_back } else { front }),
                Err(now) => ends = now,
            }
        }
    }

    /// Runs unclaimed tasks until none is left: the caller from the front, helpers from the
    /// back, so that each thread works through a contiguous range (as a split in halves would:
    /// hardware prefetchers follow it, and a kernel's next phase finds the same thread's data
    /// in its cache) and they meet where the faster one catches up.
    fn work(&self, back: bool, f: impl Fn(usize)) {
        while let Some(i) = self.claim(back) {
            if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i))) {
                self.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(payload);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }

    /// Raises the first panic of a task again, if any.
    fn raise(&self) {
        let panic = self.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(payload) = panic {
            std::panic::resume_unwind(payload);
        }
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

    /// The values `start..start + len`, to read. Panics when out of bounds.
    ///
    /// # Safety
    ///
    /// No slice from [`SharedMut::slice`] that overlaps it may be alive at the same time.
    #[inline]
    pub(crate) unsafe fn read(&self, start: usize, len: usize) -> &'a [T] {
        assert!(start <= self.len && len <= self.len - start, "range out of bounds");
        // SAFETY: the range is inside the borrowed slice (checked above), which outlives 'a;
        // the caller guarantees no mutable reference overlaps it while it lives.
        unsafe { core::slice::from_raw_parts(self.ptr.add(start), len) }
    }
}

/// The output gradient a fused backward reads: a slice apart from `dx`, or `dx`'s own buffer,
/// which the backward overwrites (in place) run by run once that run's gradient has been read.
#[derive(Clone, Copy)]
pub(crate) enum Grad<'a, 'o> {
    /// The gradient in its own slice.
    Apart(&'a [f32]),
    /// The gradient in the buffer `dx` is written to.
    InDx(&'a SharedMut<'o, f32>),
}

impl<'a> Grad<'a, '_> {
    /// The gradient's values `start..start + len`. Panics when out of bounds.
    ///
    /// # Safety
    ///
    /// For [`Grad::InDx`], as [`SharedMut::read`]: no slice of `dx` that overlaps the range may
    /// be alive at the same time.
    #[inline(always)]
    pub(crate) unsafe fn read(self, start: usize, len: usize) -> &'a [f32] {
        match self {
            Grad::Apart(dy) => &dy[start..start + len],
            // SAFETY: the caller's contract above.
            Grad::InDx(dx) => unsafe { dx.read(start, len) },
        }
    }

    /// The gradient's values `start..start + len` when they are apart from `dx`; `None` in place
    /// (the walks of [`crate::kernels::loops`] then read them from `dx`).
    #[inline(always)]
    pub(crate) fn apart(self, start: usize, len: usize) -> Option<&'a [f32]> {
        match self {
            Grad::Apart(dy) => Some(&dy[start..start + len]),
            Grad::InDx(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inference rule streams ResNet-50's (50, 256, 14, 14) and neither its (50, 512, 7, 7)
    /// (too small) nor its (50, 2048, 7, 7) (runs too short); the training passes' rule streams
    /// none of them.
    #[test]
    fn inference_streams_from_a_lower_size_than_training() {
        if !policy(true) || policy(false) {
            println!("skipped: streaming forced (BN_STREAM)");
            return;
        }
        let len = |n: usize, c: usize, hw: usize| n * c * hw;
        assert!(streaming_inference(len(50, 256, 196), 196));
        assert!(!streaming_inference(len(50, 512, 49), 49));
        assert!(!streaming_inference(len(50, 2048, 49), 49));
        assert!(!streaming(len(50, 256, 196), 196));
        assert!(streaming(len(50, 1024, 196), 196) && streaming_inference(len(50, 1024, 196), 196));
    }

    /// Runs `for_each_task(true, n, ..)` writing `2 i + 1` into slot `i` through a [`SharedMut`]
    /// (plain stores, so that the caller seeing them checks the hand-over of results) and
    /// counting the runs of each task; returns the slots and counts.
    fn run(n: usize, panic_at: Option<usize>) -> (Vec<u64>, Vec<usize>, Option<String>) {
        let mut out = vec![0u64; n];
        let runs: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        let shared = SharedMut::new(&mut out);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for_each_task(true, n, |i| {
                runs[i].fetch_add(1, Ordering::Relaxed);
                // SAFETY: slot `i` is written by task `i` only.
                let slot = unsafe { shared.slice(i, 1) };
                slot[0] = 2 * i as u64 + 1;
                if Some(i) == panic_at {
                    panic!("task {i} failed");
                }
            })
        }));
        let message = result.err().map(|p| p.downcast_ref::<String>().cloned().unwrap_or_default());
        (out, runs.into_iter().map(|r| r.into_inner()).collect(), message)
    }

    fn check(n: usize, panic_at: Option<usize>, context: &str) {
        let (out, runs, message) = run(n, panic_at);
        match panic_at {
            Some(i) => {
                // Serially the tasks after the failed one do not run; in parallel they may.
                assert!(runs.iter().all(|&r| r <= 1) && runs[i] == 1, "{context}: runs per task {runs:?}");
                assert_eq!(message.as_deref(), Some(format!("task {i} failed").as_str()), "{context}");
            }
            None => {
                assert!(runs.iter().all(|&r| r == 1), "{context}: runs per task {runs:?}");
                assert!(out.iter().enumerate().all(|(i, &v)| v == 2 * i as u64 + 1), "{context}: {out:?}");
                assert_eq!(message, None, "{context}");
            }
        }
    }

    /// Every task runs exactly once and its writes are seen by the caller, both where helpers
    /// are spawned (called from outside any pool) and where they are `join` halves (on a worker
    /// of pools of 1 to 7 threads); a task's panic reaches the caller, and no task runs twice.
    #[test]
    fn every_task_runs_once_and_panics_reach_the_caller() {
        let (sizes, pools): (&[usize], &[usize]) =
            if cfg!(miri) { (&[0, 3, 17], &[1, 2, 3]) } else { (&[0, 1, 2, 3, 17, 1000], &[1, 2, 3, 4, 7]) };
        for &n in sizes {
            for panic_at in [None, Some(n / 2)].into_iter().filter(|p| p.is_none_or(|i| i < n)) {
                check(n, panic_at, &format!("outside a pool, {n} tasks"));
                for &threads in pools {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    pool.install(|| check(n, panic_at, &format!("{threads} threads, {n} tasks")));
                }
            }
        }
    }
}
