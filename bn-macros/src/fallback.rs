//! What an invalid input expands to: the errors, and the item in a shape that keeps the rest of
//! the user's code compiling (as thiserror's `fallback.rs`), so the user sees the real errors and
//! not follow-on ones where the layer is used.

use proc_macro2::TokenStream;
use quote::quote;
use syn::Path;

use crate::attr::Target;
use crate::expand::{self, Dtype};

pub(crate) fn expand(target: &Target, krate: &Path, dtype: &Dtype, errors: syn::Error) -> TokenStream {
    let errors = errors.into_compile_error();
    let item = match target {
        // A layer with the full API whose constructor is unreachable (it never runs: the build
        // fails on the errors above).
        Target::Struct(shell) => expand::layer(shell, krate, dtype, None),
        // Not a struct: the item as written.
        Target::Other(item) => item.clone(),
    };
    quote! {
        #errors
        #item
    }
}
