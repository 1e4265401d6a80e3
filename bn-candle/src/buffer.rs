//! The output buffers the ops hand to candle (y, dx): one fresh allocation per call, since candle
//! takes ownership of each op's output.
//!
//! A fresh buffer of tens of megabytes comes from the operating system, and its first write
//! faults in one page at a time: with 4 KiB pages that costs more than the kernel that fills it
//! (a (50, 64, 112, 112) f32 output is 40,000 pages). On Linux, buffers of [`HUGE_PAGE_MIN`] bytes
//! and more are advised for transparent huge pages (`madvise(MADV_HUGEPAGE)`, which the default
//! `madvise` mode of `/sys/kernel/mm/transparent_hugepage/enabled` honours), so the same write
//! faults once per 2 MiB. The advice only changes how the pages are backed, never their contents;
//! where the kernel declines it, the buffer is an ordinary one.

/// The smallest buffer advised for huge pages: smaller ones are mostly served from memory the
/// allocator already holds, and gain nothing measurable.
pub(crate) const HUGE_PAGE_MIN: usize = 8 << 20;

/// A zeroed buffer of `len` elements for a kernel to write.
pub(crate) fn output<T: Clone + Default>(len: usize) -> Vec<T> {
    let buffer = vec![T::default(); len];
    advise_huge_pages(&buffer);
    buffer
}

#[cfg(target_os = "linux")]
fn advise_huge_pages<T>(buffer: &[T]) {
    const HUGE_PAGE: usize = 2 << 20;
    let bytes = std::mem::size_of_val(buffer);
    if bytes < HUGE_PAGE_MIN {
        return;
    }
    let start = buffer.as_ptr() as usize;
    let first = start.next_multiple_of(HUGE_PAGE);
    let end = (start + bytes) / HUGE_PAGE * HUGE_PAGE;
    if end > first {
        // SAFETY: [first, end) lies inside the allocation `buffer` owns and is page-aligned;
        // MADV_HUGEPAGE only sets how the kernel backs those pages (it neither frees nor changes
        // their contents), and its failure (for instance a kernel without transparent huge
        // pages) leaves the mapping as it was, so the result can be ignored.
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
    fn output_buffers_are_zeroed_at_every_size() {
        for len in [0, 1, 1000, HUGE_PAGE_MIN / 4 + 12_345] {
            let buffer: Vec<f32> = output(len);
            assert_eq!(buffer.len(), len);
            assert!(buffer.iter().all(|&v| v == 0.0));
        }
    }
}
