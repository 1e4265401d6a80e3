//! The collector every stage of the macro reports its errors to, so that one build shows every
//! mistake in the attribute (as serde_derive's `internals/ctxt.rs`).

use core::cell::{Cell, RefCell};
use core::fmt::Display;

use proc_macro2::Span;
use quote::ToTokens;

/// Collects errors and combines them into one `syn::Error` (as serde's `internals/ctxt.rs`),
/// in the order of the source: each error is tagged with the current *position* (the index of
/// the attribute entry being checked, then [`Ctxt::MISSING`], then [`Ctxt::ITEM`]), and the
/// errors are sorted by it, whichever stage reported them.
pub(crate) struct Ctxt {
    errors: RefCell<Vec<(usize, syn::Error)>>,
    position: Cell<usize>,
}

impl Ctxt {
    /// The position of errors about keys that are missing (spanned on the whole attribute).
    pub(crate) const MISSING: usize = usize::MAX - 1;
    /// The position of errors about the item the attribute is on.
    pub(crate) const ITEM: usize = usize::MAX;

    pub(crate) fn new() -> Ctxt {
        Ctxt { errors: RefCell::new(Vec::new()), position: Cell::new(0) }
    }

    /// Tags the errors reported from now on with `position`.
    pub(crate) fn set_position(&self, position: usize) {
        self.position.set(position);
    }

    /// An error spanned on the tokens of `obj` (from its first to its last token).
    pub(crate) fn error_spanned_by<A: ToTokens, T: Display>(&self, obj: A, msg: T) {
        self.syn_error(syn::Error::new_spanned(obj.into_token_stream(), msg));
    }

    /// An error at `span`.
    pub(crate) fn error_at<T: Display>(&self, span: Span, msg: T) {
        self.syn_error(syn::Error::new(span, msg));
    }

    /// One of syn's parse errors.
    pub(crate) fn syn_error(&self, error: syn::Error) {
        self.errors.borrow_mut().push((self.position.get(), error));
    }

    /// `Ok` if nothing was reported, else every error combined, in source order.
    pub(crate) fn check(self) -> syn::Result<()> {
        let mut errors = self.errors.into_inner();
        errors.sort_by_key(|&(position, _)| position); // stable: report order within a position
        let mut errors = errors.into_iter().map(|(_, error)| error);
        let Some(mut combined) = errors.next() else {
            return Ok(());
        };
        for rest in errors {
            combined.combine(rest);
        }
        Err(combined)
    }
}
