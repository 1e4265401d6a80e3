//! Fallible allocation of buffers whose length comes from outside the process's control: a
//! feature count given at run time, a checkpoint's tensors, a peer's message.
//!
//! `vec![value; len]` aborts the process when the allocator refuses (and panics with "capacity
//! overflow" when the byte count does not fit in `isize`). Buffers sized by such input go
//! through [`try_vec_with_capacity`] or [`try_filled_vec`] instead, which turn both failures into
//! [`BnError::Allocation`].

use crate::BnError;

/// An empty vector with room for exactly `len` values, or [`BnError::Allocation`] naming
/// `what` when the allocator refuses or the byte count overflows.
pub(crate) fn try_vec_with_capacity<T>(len: usize, what: &str) -> Result<Vec<T>, BnError> {
    let mut v = Vec::new();
    match v.try_reserve_exact(len) {
        Ok(()) => Ok(v),
        Err(_) => {
            Err(BnError::Allocation { what: what.to_owned(), len, elem_size: core::mem::size_of::<T>() })
        }
    }
}

/// `vec![value; len]`, or [`BnError::Allocation`] naming `what` when it cannot be allocated.
pub(crate) fn try_filled_vec<T: Clone>(value: T, len: usize, what: &str) -> Result<Vec<T>, BnError> {
    let mut v = try_vec_with_capacity(len, what)?;
    v.resize(len, value);
    Ok(v)
}

/// A copy of `values`, or [`BnError::Allocation`] naming `what` when it cannot be allocated.
pub(crate) fn try_to_vec<T: Clone>(values: &[T], what: &str) -> Result<Vec<T>, BnError> {
    let mut v = try_vec_with_capacity(values.len(), what)?;
    v.extend_from_slice(values);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_and_copies() {
        assert_eq!(try_filled_vec(1.5f32, 3, "x").unwrap(), vec![1.5; 3]);
        assert_eq!(try_filled_vec(0u8, 0, "x").unwrap(), Vec::<u8>::new());
        assert_eq!(try_to_vec(&[1.0f64, 2.0], "x").unwrap(), vec![1.0, 2.0]);
        assert_eq!(try_vec_with_capacity::<f64>(7, "x").unwrap().capacity(), 7);
    }

    #[test]
    fn impossible_sizes_are_errors() {
        // More bytes than `isize::MAX` (capacity overflow), and 2^50 bytes: more than the address
        // space of any 64-bit machine we run on (x86-64 and aarch64 user space is at most 2^48 bytes).
        for len in [usize::MAX, usize::MAX / 8 + 1, 1 << 60, 1 << 47] {
            let err = try_filled_vec(0.0f64, len, "the test buffer").unwrap_err();
            assert_eq!(err, BnError::Allocation { what: "the test buffer".into(), len, elem_size: 8 });
            assert!(err.to_string().contains("the test buffer"), "{err}");
        }
        assert!(matches!(try_vec_with_capacity::<u32>(usize::MAX, "y"), Err(BnError::Allocation { .. })));
    }
}
