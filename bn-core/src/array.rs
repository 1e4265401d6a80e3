//! ndarray arrays as a convenience entry, on top of the slice API.

use ndarray::{Array, ArrayBase, Data, Dimension};

use crate::{BatchNormLayer, BnError};

/// Calls a layer with ndarray arrays of any dimension, returning new arrays.
///
/// Implemented for every [`BatchNormLayer`]. Arrays in any memory order are accepted (one that is
/// not in standard row-major order is copied first); the output is in standard order. The slice
/// methods avoid those allocations.
///
/// ```
/// use batchnorm::{BatchNorm, BatchNormArrayExt};
/// use ndarray::Array2;
///
/// let mut bn = BatchNorm::new(3, [0])?;
/// let x = Array2::from_shape_fn((4, 3), |(i, j)| (i * 3 + j) as f32);
/// let y = bn.forward_train_array(&x)?;
/// assert_eq!(y.shape(), &[4, 3]);
/// assert!(y.column(0).sum().abs() < 1e-5);
/// # Ok::<(), batchnorm::BnError>(())
/// ```
pub trait BatchNormArrayExt: BatchNormLayer {
    /// [`forward_train`](BatchNormLayer::forward_train) on an array.
    fn forward_train_array<S, D>(&mut self, x: &ArrayBase<S, D>) -> Result<Array<Self::Elem, D>, BnError>
    where
        S: Data<Elem = Self::Elem>,
        D: Dimension,
    {
        let xs = x.as_standard_layout();
        let mut y = Array::from_elem(x.raw_dim(), Self::Elem::default());
        self.forward_train(contiguous(&xs), x.shape(), contiguous_mut(&mut y))?;
        Ok(y)
    }

    /// [`forward_eval`](BatchNormLayer::forward_eval) on an array.
    fn forward_eval_array<S, D>(&self, x: &ArrayBase<S, D>) -> Result<Array<Self::Elem, D>, BnError>
    where
        S: Data<Elem = Self::Elem>,
        D: Dimension,
    {
        let mut y = x.as_standard_layout().into_owned();
        let shape = x.shape().to_vec();
        self.forward_eval_inplace(contiguous_mut(&mut y), &shape)?;
        Ok(y)
    }

    /// [`backward`](BatchNormLayer::backward) on arrays; returns `dx`.
    fn backward_array<S, T, D>(
        &mut self,
        x: &ArrayBase<S, D>,
        dy: &ArrayBase<T, D>,
    ) -> Result<Array<Self::Elem, D>, BnError>
    where
        S: Data<Elem = Self::Elem>,
        T: Data<Elem = Self::Elem>,
        D: Dimension,
    {
        same_shape(x.shape(), dy.shape())?;
        let (xs, dys) = (x.as_standard_layout(), dy.as_standard_layout());
        let mut dx = Array::from_elem(x.raw_dim(), Self::Elem::default());
        self.backward(contiguous(&xs), contiguous(&dys), x.shape(), contiguous_mut(&mut dx))?;
        Ok(dx)
    }

    /// [`backward_eval`](BatchNormLayer::backward_eval) on arrays; returns `dx`.
    fn backward_eval_array<S, T, D>(
        &mut self,
        x: &ArrayBase<S, D>,
        dy: &ArrayBase<T, D>,
    ) -> Result<Array<Self::Elem, D>, BnError>
    where
        S: Data<Elem = Self::Elem>,
        T: Data<Elem = Self::Elem>,
        D: Dimension,
    {
        same_shape(x.shape(), dy.shape())?;
        let (xs, dys) = (x.as_standard_layout(), dy.as_standard_layout());
        let mut dx = Array::from_elem(x.raw_dim(), Self::Elem::default());
        self.backward_eval(contiguous(&xs), contiguous(&dys), x.shape(), contiguous_mut(&mut dx))?;
        Ok(dx)
    }
}

impl<L: BatchNormLayer + ?Sized> BatchNormArrayExt for L {}

fn same_shape(x: &[usize], dy: &[usize]) -> Result<(), BnError> {
    if x != dy {
        let len = |s: &[usize]| s.iter().try_fold(1usize, |a, &e| a.checked_mul(e)).unwrap_or(usize::MAX);
        return Err(BnError::BufferLength {
            buffer: "dy",
            expected: len(x),
            got: len(dy),
            shape: x.to_vec(),
        });
    }
    Ok(())
}

/// The elements of an array in standard layout, as a slice.
fn contiguous<S: Data, D: Dimension>(a: &ArrayBase<S, D>) -> &[S::Elem] {
    // `as_standard_layout` and `Array::from_elem` always give standard-layout arrays.
    a.as_slice().unwrap_or(&[])
}

fn contiguous_mut<E, D: Dimension>(a: &mut Array<E, D>) -> &mut [E] {
    a.as_slice_mut().unwrap_or(&mut [])
}
