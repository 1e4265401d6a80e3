//! The element types both candle and the kernels know, and the dtype rules between data and
//! parameters.

use batchnorm::half::{bf16, f16};
use batchnorm::{BnError, Element};
use candle_core::{DType, WithDType};

/// A data type of candle tensors that the kernels run: `f32`, `f64`, `bf16`, `f16`. Its
/// parameters and statistics (`Element::Param`) are `f32` for the 16-bit types.
pub(crate) trait CandleElement: Element<Param: WithDType> + WithDType {}

impl CandleElement for f32 {}
impl CandleElement for f64 {}
impl CandleElement for bf16 {}
impl CandleElement for f16 {}

/// The dtype of the parameters and statistics the kernels take for data of type `E`.
pub(crate) fn param_dtype<E: CandleElement>() -> DType {
    <E::Param as WithDType>::DTYPE
}

/// Checks that a parameter or running statistic (`name`) can go with data of type `E`: the
/// same dtype, or `f32` for 16-bit data (mixed precision, as the kernels compute).
pub(crate) fn check_param_dtype<E: CandleElement>(name: &str, dtype: DType) -> candle_core::Result<()> {
    if dtype == E::DTYPE || dtype == param_dtype::<E>() {
        return Ok(());
    }
    let allowed = if E::DTYPE == param_dtype::<E>() {
        format!("{:?}", E::DTYPE)
    } else {
        format!("{:?} or {:?}", E::DTYPE, param_dtype::<E>())
    };
    candle_core::bail!(
        "batch-norm: {name} has dtype {dtype:?} but the input is {:?} (expected {allowed})",
        E::DTYPE
    )
}

/// A kernel error as a candle error with the kernel's message.
pub(crate) fn candle_error(error: BnError) -> candle_core::Error {
    candle_core::Error::msg(format!("batch-norm: {error}"))
}
