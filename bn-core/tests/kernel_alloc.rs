//! The kernels' allocations, counted by a global allocator: none on the inference path, and in
//! training and backward only a few small per-channel arrays, never anything the size of the
//! tensor. (One test per binary, so no other test allocates meanwhile.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bn_core::kernels::{self, Backend};
use bn_core::spec::Dynamic;
use bn_core::Canonical;

struct Counting;

static CALLS: AtomicUsize = AtomicUsize::new(0);
static BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        CALLS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on as is.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// `(calls, bytes)` allocated while `f` runs.
fn counted(f: impl FnOnce()) -> (usize, usize) {
    let (c, b) = (CALLS.load(Ordering::SeqCst), BYTES.load(Ordering::SeqCst));
    f();
    (CALLS.load(Ordering::SeqCst) - c, BYTES.load(Ordering::SeqCst) - b)
}

#[test]
fn allocations_are_none_in_inference_and_small_elsewhere() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    // Every worker runs a job first: a worker's first steal registers it with the deque's epoch
    // collector (an allocation on that thread), which must not land in a counted section.
    pool.broadcast(|_| ());
    let shapes = [
        Canonical { outer: 1, channels: 64, inner: 64 },
        Canonical { outer: 8, channels: 64, inner: 784 },
        Canonical { outer: 4096, channels: 7, inner: 1 },
        Canonical { outer: 2048, channels: 64, inner: 1 },
        Canonical { outer: 2, channels: 3, inner: 70_000 },
    ];
    for b in Backend::available() {
        for dims in shapes {
            let (n, c) = (dims.len(), dims.channels);
            let x: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 0.1).collect();
            let dy: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 0.01).collect();
            let (mut y, mut dx, mut xy) = (vec![0.0; n], vec![0.0; n], x.clone());
            let p = vec![0.5f32; c];
            let (mut m, mut v, mut s1, mut s2) = (vec![0.0; c], vec![0.0; c], vec![0.0; c], vec![0.0; c]);
            let inv = vec![0.5f64; c];
            pool.install(|| {
                let mut eval = || {
                    kernels::normalize::<Dynamic>(b, &x, &mut y, dims, &p, &p, &p);
                    kernels::normalize_inplace::<Dynamic>(b, &mut xy, dims, &p, &p, &p);
                };
                eval(); // warm-up (the pool's first jobs)
                let (calls, _) = counted(&mut eval);
                assert_eq!(calls, 0, "{b} {dims:?}: inference allocated");
                let mut train = || {
                    kernels::forward_train::<Dynamic>(b, &x, &mut y, dims, &p, &p, 1e-5, &mut m, &mut v);
                    kernels::backward::<Dynamic>(b, &x, &dy, &mut dx, dims, &m, &inv, &p, &mut s1, &mut s2);
                    kernels::backward_eval::<Dynamic>(
                        b, &x, &dy, &mut dx, dims, &p, &p, &p, &mut s1, &mut s2,
                    );
                };
                train();
                let (calls, bytes) = counted(&mut train);
                // Per-channel scratch (a few values per channel, per chunk of rows for the rows
                // family, at most 64 chunks) but nothing that grows with the tensor.
                let bound = 2048 + 64 * 2 * 8 * rows_width(c) + 64 * c;
                assert!(calls <= 12, "{b} {dims:?}: {calls} allocations");
                assert!(bytes <= bound, "{b} {dims:?}: {bytes} bytes allocated (bound {bound})");
            });
        }
    }
}

/// An upper bound of the rows family's virtual row width for `c` channels.
fn rows_width(c: usize) -> usize {
    c.max(1024)
}
