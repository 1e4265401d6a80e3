//! Output buffers for a framework's op: one fresh allocation per call, handed over to the
//! framework's tensor.
//!
//! A fresh activation-sized buffer comes from the operating system, and its first write
//! faults in one page at a time: with 4 KiB pages that costs more than the kernel that fills it
//! (a (50, 64, 112, 112) f32 output is 40,000 pages). On Linux, buffers of [`HUGE_PAGE_MIN`]
//! bytes and more are advised for transparent huge pages (`madvise(MADV_HUGEPAGE)`, which the
//! default `madvise` mode of `/sys/kernel/mm/transparent_hugepage/enabled` honours), so the
//! same write faults once per 2 MiB. The advice only changes how the pages are backed, never
//! their contents; where the kernel declines it, the buffer is an ordinary one.
//!
//! The zeros are written by all of Rayon's threads: a buffer the allocator recycles must be
//! cleared, and one thread clearing tens of megabytes costs as much as a kernel pass.

use core::mem::MaybeUninit;

use rayon::prelude::*;

/// The smallest buffer, in bytes, advised for huge pages: smaller ones are mostly served from
/// memory the allocator already holds, and gain nothing measurable.
pub const HUGE_PAGE_MIN: usize = 8 << 20;

/// Buffers of fewer bytes are zeroed by the calling thread: below this a fork-join costs more
/// than it saves.
const PARALLEL_ZERO_MIN: usize = 256 << 10;

/// The bytes each Rayon task zeroes.
const ZERO_CHUNK: usize = 64 << 10;

/// A buffer of `len` default values (zeros for the element types) for a kernel to overwrite,
/// such as the `y` of [`BatchNormOps::forward_train`](super::BatchNormOps::forward_train) or the
/// `dx` of [`BatchNormOps::backward`](super::BatchNormOps::backward) when a framework takes
/// ownership of each output: advised for huge pages from [`HUGE_PAGE_MIN`] bytes (Linux) and
/// zeroed in parallel on the current Rayon pool.
///
/// ```
/// let y: Vec<f32> = batchnorm::ops::output_buffer(1 << 20);
/// assert!(y.len() == 1 << 20 && y.iter().all(|&v| v == 0.0));
/// ```
///
/// # Panics
///
/// As [`Vec::with_capacity`], when `len` values do not fit in memory.
pub fn output_buffer<T: Copy + Default + Send + Sync>(len: usize) -> Vec<T> {
    let mut buffer = Vec::with_capacity(len);
    let values = &mut buffer.spare_capacity_mut()[..len];
    advise_huge_pages(values);
    let zero = MaybeUninit::new(T::default());
    let chunk = (ZERO_CHUNK / core::mem::size_of::<T>().max(1)).max(1);
    if core::mem::size_of_val(values) < PARALLEL_ZERO_MIN {
        values.fill(zero);
    } else {
        values.par_chunks_mut(chunk).for_each(|part| part.fill(zero));
    }
    // SAFETY: the capacity is at least `len` and the first `len` values were all written above.
    unsafe { buffer.set_len(len) };
    buffer
}

#[cfg(target_os = "linux")]
fn advise_huge_pages<T>(buffer: &[T]) {
    const HUGE_PAGE: usize = 2 << 20;
    let bytes = core::mem::size_of_val(buffer);
    if bytes < HUGE_PAGE_MIN {
        return;
    }
    let start = buffer.as_ptr() as usize;
    let first = start.next_multiple_of(HUGE_PAGE);
    let end = (start + bytes) / HUGE_PAGE * HUGE_PAGE;
    if end > first {
        // SAFETY: [first, end) lies inside the allocation `buffer` views and is page-aligned;
        // MADV_HUGEPAGE only sets how the kernel backs those pages (it neither frees nor
        // changes their contents), and its failure (for instance a kernel without transparent
        // huge pages) leaves the mapping as it was, so the result can be ignored.
        unsafe {
            libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages<T>(_buffer: &[T]) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_at_every_size() {
        // Below and above the parallel threshold, and above the huge-page one; a dirty block of
        // the same size freed just before, so a recycled allocation must really be cleared.
        for len in [0, 1, 1000, PARALLEL_ZERO_MIN / 4 + 3, HUGE_PAGE_MIN / 4 + 12_345] {
            drop(vec![7.0f32; len]);
            let buffer: Vec<f32> = output_buffer(len);
            assert_eq!(buffer.len(), len);
            assert!(buffer.iter().all(|&v| v == 0.0), "len {len}");
            drop(vec![-3.0f64; len]);
            let buffer: Vec<f64> = output_buffer(len);
            assert!(buffer.len() == len && buffer.iter().all(|&v| v == 0.0), "len {len}");
        }
        let halves: Vec<u16> = output_buffer(PARALLEL_ZERO_MIN);
        assert!(halves.iter().all(|&v| v == 0));
    }
}
