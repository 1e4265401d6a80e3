//! The `#[batch_norm]` attribute of the [`batchnorm`](https://docs.rs/batchnorm) crate.
//!
//! Use it through the facade crate (`batchnorm::batch_norm`); the generated code calls the
//! runtime through `::batchnorm::__private` (or the path given with `crate = "..."`).
//!
//! The macro runs in three stages, one module each: `attr` parses the arguments and the item
//! into typed models that keep the user's tokens, `valid` checks them, `expand` generates the
//! layer. Every stage reports to one error collector, so a user with three mistakes sees three
//! errors in one build; with errors, `fallback` still emits the layer's API so its uses do not
//! fail too.
#![deny(missing_docs)]

mod attr;
mod ctxt;
mod expand;
mod fallback;
mod passes;
mod valid;

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;

use attr::{Attr, Target};
use ctxt::Ctxt;

/// Compiles a batch-normalization layer for a fixed layout into a unit struct.
///
/// ```
/// use batchnorm::batch_norm;
///
/// /// The stem's normalization: NCHW with 64 channels.
/// #[batch_norm(features = 64, axes = [0, 2, 3])]
/// pub struct StemBn;
///
/// let mut bn = StemBn::new();
/// let shape = [2, 64, 3, 3];
/// let x: Vec<f32> = (0..2 * 64 * 9).map(|i| (i % 7) as f32).collect();
/// let mut y = vec![0.0; x.len()];
/// bn.forward_train(&x, &shape, &mut y)?;
/// assert_eq!(StemBn::FEATURES, 64);
/// assert_eq!(bn.running_mean().len(), 64);
/// # Ok::<(), batchnorm::BnError>(())
/// ```
///
/// # Keys
///
/// | key | value | default |
/// |---|---|---|
/// | `features` | the feature extents: `64`, or `[55, 55]` for several adjacent feature axes | required |
/// | `axes` | the reduced axes (statistics over them), non-empty and ascending: `[0, 2, 3]` | required |
/// | `preset` | `"numpy"`, `"pytorch"` or `"keras"`: the defaults of the other options (`"seed"` is an older name of `"numpy"`) | `"numpy"` |
/// | `eps` | a positive finite number added to the variance | the preset's |
/// | `momentum` | the weight of the *old* running value, in `[0, 1)` (the NumPy class's and Keras's convention), or `"cumulative"`: a cumulative moving average (PyTorch's `momentum=None`); a number is refused with `preset = "pytorch"` (write `torch_momentum`) | the preset's |
/// | `torch_momentum` | PyTorch's momentum `p` in `(0, 1]`: `momentum = 1 - p` (not with `momentum`) | |
/// | `running_var` | `"biased"` or `"unbiased"`: the batch variance that updates the running one | the preset's |
/// | `center` | `false`: beta fixed at 0 | `true` |
/// | `scale` | `false`: gamma fixed at 1 | `true` |
/// | `track_running_stats` | `false`: inference uses batch statistics too | `true` |
/// | `spatial` | the extents of the reduced axes after the first, in axis order (`[56, 56]` for NCHW's H and W): compile-time constants for the kernels, and other extents are `BnError::SpatialMismatch` | |
/// | `activation` | `"relu"`: `relu(bn(x))` fused into the forward passes, and its gradient into the backward ones; `"none"` | `"none"` |
/// | `dtype` | the element type of the data: `"f32"`, `"f64"` (parameters and statistics in `f64` too), `"bf16"` or `"f16"` (`batchnorm::half::bf16` / `f16` data, `f32` parameters and statistics, computed in `f32`) | `"f32"` |
/// | `crate` | the path of the `batchnorm` crate, for a renamed dependency: `crate = "bn"` | `"::batchnorm"` |
///
/// Explicit keys override the preset: `preset = "keras", eps = 0.01` has Keras's momentum 0.99
/// and eps 0.01. The rank is the number of reduced axes plus the number of feature extents, and
/// the feature axes (those not in `axes`) must be adjacent: `features = [55, 55], axes = [0]`
/// normalizes `(N, 55, 55)` tensors per feature of the `55 x 55` grid.
///
/// # What it generates
///
/// The attribute goes on a unit struct and keeps its visibility, doc comments and attributes.
/// The struct gets private state (build it with `new()`) and:
///
/// - the consts `FEATURES` (the product of the feature extents) and `RANK`;
/// - `new()` (which aborts when the state cannot be allocated, as `Vec` does), `try_new()` (which
///   returns `BnError::Allocation` instead), `forward_train`, `forward_eval`, `forward_eval_inplace`, `backward`,
///   `backward_eval`, `gamma`, `beta`, `running_mean`, `running_var`, `gamma_grad`, `beta_grad`,
///   `update_params`, `set_running_stats`, `num_batches_tracked`, `set_num_batches_tracked`,
///   `forward_train_add_relu`, `forward_eval_add_relu`, `backward_add_relu`,
///   `backward_eval_add_relu` (a ResNet block's `relu(bn(x) + residual)`, fused),
///   `config`, `layout`, `as_batch_norm` and `as_batch_norm_mut`
///   (the runtime-generic `BatchNorm` it wraps), all `pub`;
/// - impls of `Default`, `Clone`, `Debug` (a `#[derive]` of one of these on the struct is
///   skipped, not doubled) and `BatchNormLayer`.
///
/// Put `#[batch_norm]` above the struct's `#[derive]`s, so the attribute sees them.
///
/// # Errors
///
/// Bad input is a compile error spanned on what is wrong, with a message that says what is
/// allowed, every error in one build: a missing `features` or `axes`, a zero extent, an axis
/// repeated, out of range or out of order, feature axes that are not adjacent, an `eps` or
/// momentum out of range, both momentum keys, an unknown key or value, a key given twice, a value
/// of the wrong kind, more features than `batchnorm::MAX_FEATURES` (2^31), `spatial` extents
/// whose product with the number of features overflows `usize`, and an item other than a
/// non-generic unit struct.
#[proc_macro_attribute]
pub fn batch_norm(args: TokenStream, item: TokenStream) -> TokenStream {
    pipeline(args.into(), item.into()).into()
}

/// `#[batch_norm(args)] item`: parse (`attr.rs`), validate (`valid.rs`), then expand the layer
/// (`expand.rs`) or, when there are errors, the errors and a stand-in (`fallback.rs`).
fn pipeline(args: TokenStream2, item: TokenStream2) -> TokenStream2 {
    let cx = Ctxt::new();
    let attr = Attr::from_args(&cx, args);
    let target = Target::from_syn(&cx, item);
    let layout = valid::validate(&cx, &attr);
    let krate = expand::krate(&attr);
    let dtype = expand::Dtype::of(&attr, &krate);
    match (cx.check(), &target, layout) {
        (Ok(()), Target::Struct(shell), Some(layout)) => {
            let statics = expand::Statics::new(&krate, &attr, &layout);
            expand::layer(shell, &krate, &dtype, Some(&statics))
        }
        (Err(errors), target, _) => fallback::expand(target, &krate, &dtype, errors),
        // Every path that leaves no layout reports an error; this is a bug in the macro.
        (Ok(()), target, _) => {
            let error =
                syn::Error::new(proc_macro2::Span::call_site(), "internal error in #[batch_norm]: no layout");
            fallback::expand(target, &krate, &dtype, error)
        }
    }
}
