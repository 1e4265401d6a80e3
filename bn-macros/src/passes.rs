//! The passes a generated layer has, listed once: each becomes an inherent method (the shape
//! checks the attribute adds, then the run-time layer's `*_spec` entry point with the layer's
//! compile-time `Spec`) and the `BatchNormLayer` method that calls it.

use proc_macro2::{Ident, Span, TokenStream};
use quote::{format_ident, quote};

/// How a pass borrows the layer.
#[derive(Clone, Copy)]
enum Receiver {
    Shared,
    Exclusive,
}

/// One pass: its name, receiver, the data buffers before `shape` (`true`: written) and after it
/// (all written), and its documentation.
struct Pass {
    name: &'static str,
    receiver: Receiver,
    before_shape: &'static [(&'static str, bool)],
    after_shape: &'static [&'static str],
    doc: &'static str,
}

const PASSES: &[Pass] = &[
    Pass {
        name: "forward_train",
        receiver: Receiver::Exclusive,
        before_shape: &[("x", false)],
        after_shape: &["y"],
        doc: "Training forward: normalizes `x` with its batch statistics into `y`, updates the running \
              statistics and saves what [`backward`](Self::backward) needs.\n\n\
              `x` and `y` are row-major in the order of `shape`, which has rank [`RANK`](Self::RANK) and \
              the layer's feature extents.\n\n\
              # Errors\n\n\
              A wrong shape or buffer length, an empty batch, fewer than 2 values per feature, or a \
              non-finite batch mean or variance. After an error the layer is unchanged.",
    },
    Pass {
        name: "forward_eval",
        receiver: Receiver::Shared,
        before_shape: &[("x", false)],
        after_shape: &["y"],
        doc: "Inference forward: normalizes `x` into `y` with the running statistics (with the batch \
              statistics when `track_running_stats` is off). An empty batch is a no-op.\n\n\
              # Errors\n\n\
              A wrong shape or buffer length (or, with `track_running_stats` off, what \
              [`forward_train`](Self::forward_train) rejects).",
    },
    Pass {
        name: "forward_eval_inplace",
        receiver: Receiver::Shared,
        before_shape: &[("xy", true)],
        after_shape: &[],
        doc: "[`forward_eval`](Self::forward_eval) in place, bit-identical to it.\n\n\
              # Errors\n\n\
              As [`forward_eval`](Self::forward_eval).",
    },
    Pass {
        name: "backward",
        receiver: Receiver::Exclusive,
        before_shape: &[("x", false), ("dy", false)],
        after_shape: &["dx"],
        doc: "Backward of the last [`forward_train`](Self::forward_train), with the gamma and statistics \
              saved by it: writes `dx` and overwrites [`gamma_grad`](Self::gamma_grad) and \
              [`beta_grad`](Self::beta_grad).\n\n\
              # Errors\n\n\
              No training forward yet, a `shape` other than that forward's, or a wrong buffer length.",
    },
    Pass {
        name: "backward_eval",
        receiver: Receiver::Exclusive,
        before_shape: &[("x", false), ("dy", false)],
        after_shape: &["dx"],
        doc: "Backward of [`forward_eval`](Self::forward_eval) (frozen statistics, as in fine-tuning): \
              `dx = dy * gamma / sqrt(running_var + eps)`; overwrites [`gamma_grad`](Self::gamma_grad) \
              and [`beta_grad`](Self::beta_grad).\n\n\
              # Errors\n\n\
              A wrong shape or buffer length.",
    },
    Pass {
        name: "forward_train_add_relu",
        receiver: Receiver::Exclusive,
        before_shape: &[("x", false), ("residual", false)],
        after_shape: &["y"],
        doc: "Training forward of a ResNet block's tail, fused: `y = relu(bn(x) + residual)` in one pass \
              (the layer's own activation is not applied). See `BatchNorm::forward_train_add_relu`.\n\n\
              # Errors\n\n\
              As [`forward_train`](Self::forward_train), and a wrong residual length.",
    },
    Pass {
        name: "forward_eval_add_relu",
        receiver: Receiver::Shared,
        before_shape: &[("x", false), ("residual", false)],
        after_shape: &["y"],
        doc: "Inference forward of a ResNet block's tail, fused: `y = relu(bn(x) + residual)`, one pass.\n\n\
              # Errors\n\n\
              As [`forward_eval`](Self::forward_eval), and a wrong residual length.",
    },
    Pass {
        name: "backward_add_relu",
        receiver: Receiver::Exclusive,
        before_shape: &[("x", false), ("residual", false), ("dy", false)],
        after_shape: &["dx", "dresidual"],
        doc: "Backward of [`forward_train_add_relu`](Self::forward_train_add_relu): writes \
              `dresidual = dy * (y > 0)` and `dx`; overwrites the parameter gradients.\n\n\
              # Errors\n\n\
              As [`backward`](Self::backward), and wrong residual lengths.",
    },
    Pass {
        name: "backward_eval_add_relu",
        receiver: Receiver::Exclusive,
        before_shape: &[("x", false), ("residual", false), ("dy", false)],
        after_shape: &["dx", "dresidual"],
        doc: "Backward of [`forward_eval_add_relu`](Self::forward_eval_add_relu) (frozen statistics): \
              writes `dresidual = dy * (y > 0)` and `dx`.\n\n\
              # Errors\n\n\
              As [`backward_eval`](Self::backward_eval), and wrong residual lengths.",
    },
];

/// The generated methods of every pass: `(inherent, trait)`, the inherent ones for `impl Layer`,
/// the others for `impl BatchNormLayer for Layer`. `ident` is the layer, `private` the facade's
/// hidden module, `elem` the element type, `result` the return type.
pub(crate) fn methods(
    ident: &Ident,
    private: &TokenStream,
    elem: &TokenStream,
    result: &TokenStream,
) -> (TokenStream, TokenStream) {
    let mut inherent = TokenStream::new();
    let mut trait_methods = TokenStream::new();
    for pass in PASSES {
        let name = Ident::new(pass.name, Span::call_site());
        let spec = format_ident!("{}_spec", pass.name);
        let receiver = match pass.receiver {
            Receiver::Shared => quote!(&self),
            Receiver::Exclusive => quote!(&mut self),
        };
        let before = pass.before_shape.iter().map(|&(arg, written)| {
            let arg = Ident::new(arg, Span::call_site());
            if written {
                quote!(#arg: &mut [#elem])
            } else {
                quote!(#arg: &[#elem])
            }
        });
        let after = pass.after_shape.iter().map(|arg| {
            let arg = Ident::new(arg, Span::call_site());
            quote!(#arg: &mut [#elem])
        });
        let params = quote!(#receiver, #(#before,)* shape: &[usize], #(#after),*);
        let args = pass
            .before_shape
            .iter()
            .map(|&(a, _)| a)
            .chain(Some("shape"))
            .chain(pass.after_shape.iter().copied());
        let args: Vec<Ident> = args.map(|a| Ident::new(a, Span::call_site())).collect();
        let doc = pass.doc;
        inherent.extend(quote! {
            #[doc = #doc]
            #[inline]
            pub fn #name(#params) -> #result {
                <__Spec as #private::Spec>::check_shape(shape)?;

                self.__bn.#spec::<__Spec>(#(#args),*)
            }
        });
        trait_methods.extend(quote! {
            #[inline]
            fn #name(#params) -> #result {
                #ident::#name(self, #(#args),*)
            }
        });
    }
    (inherent, trait_methods)
}
