//! The code generation of a valid attribute.
//!
//! The generated layer is a struct wrapping the runtime-generic `BatchNorm` and calling its
//! `*_spec` entry points with a hidden type whose `Spec` constants are what the attribute fixes
//! (the channel count, and `INNER == 1` for the rows family), so the specialized kernels see them
//! as constants: the same kernels, with more of their inputs known at compile time.

use proc_macro2::{Literal, Span, TokenStream};
use quote::quote;
use syn::ext::IdentExt;
use syn::Path;

use crate::attr::{self, Attr, Momentum, Shell};
use crate::valid::Layout;

/// The path of the facade crate in generated code: `::batchnorm` or `crate = "..."`.
pub(crate) fn krate(attr: &Attr) -> Path {
    match &attr.krate {
        Some(krate) => krate.value.clone(),
        None => syn::parse_quote!(::batchnorm),
    }
}

/// The element type of the layer's data, and the type of its parameters and statistics, from
/// the `dtype` key (`f32` when absent or invalid). The 16-bit formats are reached through the
/// facade (`__private::half`), so users need no dependency on `half`.
pub(crate) struct Dtype {
    elem: TokenStream,
    param: TokenStream,
}

impl Dtype {
    pub(crate) fn of(attr: &Attr, krate: &Path) -> Dtype {
        let half = quote!(#krate::__private::half);
        match attr.dtype.as_ref().map_or(attr::Dtype::F32, |d| d.value) {
            attr::Dtype::F32 => Dtype { elem: quote!(f32), param: quote!(f32) },
            attr::Dtype::F64 => Dtype { elem: quote!(f64), param: quote!(f64) },
            attr::Dtype::Bf16 => Dtype { elem: quote!(#half::bf16), param: quote!(f32) },
            attr::Dtype::F16 => Dtype { elem: quote!(#half::f16), param: quote!(f32) },
        }
    }
}

/// What a valid attribute fixes at compile time. Without it ([`fallback`]) the layer is a stub
/// with the same API whose constructor is unreachable: the user sees the attribute's errors and
/// no follow-on ones where the layer is used.
pub(crate) struct Statics {
    features: Literal,
    rank: Literal,
    /// `Spec::INNER`: the product of the extents after the feature axes when they are static (1
    /// when the feature axes are the last ones; `spatial` gives the others), else 0.
    inner: Literal,
    /// The checks of the `spatial` extents (empty without the key).
    spatial_check: TokenStream,
    /// The bodies of `new()` and `try_new()`.
    construct: TokenStream,
    try_construct: TokenStream,
    doc_features: String,
    doc_rank: String,
}

impl Statics {
    pub(crate) fn new(krate: &Path, attr: &Attr, layout: &Layout) -> Statics {
        let private = quote!(#krate::__private);
        let preset =
            syn::Ident::new(attr.preset.as_ref().map_or("Numpy", |p| p.value.variant()), Span::call_site());
        let mut config = quote!(#private::Config::preset(#private::Preset::#preset));
        let momentum = attr.momentum.as_ref().and_then(|m| match m.value {
            Momentum::Value(value) => Some(value),
            Momentum::Cumulative => None,
        });
        let torch_momentum = attr.torch_momentum.as_ref().map(|p| p.value);
        let eps = attr.eps.as_ref().map(|eps| eps.value);
        for (setter, value) in [("eps", eps), ("momentum", momentum), ("torch_momentum", torch_momentum)] {
            if let Some(value) = value {
                let setter = syn::Ident::new(setter, Span::call_site());
                let value = float(value);
                config.extend(quote!(.#setter(#value)));
            }
        }
        if attr.momentum.as_ref().is_some_and(|m| m.value == Momentum::Cumulative) {
            config.extend(quote!(.cumulative_momentum()));
        }
        if let Some(running_var) = &attr.running_var {
            let variant = syn::Ident::new(running_var.value.variant(), Span::call_site());
            config.extend(quote!(.running_var(#private::RunningVar::#variant)));
        }
        if let Some(activation) = &attr.activation {
            let variant = syn::Ident::new(activation.value.variant(), Span::call_site());
            config.extend(quote!(.activation(#private::Activation::#variant)));
        }
        for (setter, value) in [
            ("center", &attr.center),
            ("scale", &attr.scale),
            ("track_running_stats", &attr.track_running_stats),
        ] {
            if let Some(value) = value {
                let setter = syn::Ident::new(setter, Span::call_site());
                let value = value.value;
                config.extend(quote!(.#setter(#value)));
            }
        }
        let rank = Literal::usize_unsuffixed(layout.rank);
        let first = Literal::usize_unsuffixed(layout.first_feature_axis);
        let extents: Vec<Literal> = layout.features.iter().map(|&f| Literal::u64_unsuffixed(f)).collect();
        let construct = quote! {
            const CONFIG: #private::Config = #config;
            Self { __bn: #private::BatchNorm::__from_static(#rank, #first, &[#(#extents),*], CONFIG) }
        };
        let try_construct = quote! {
            const CONFIG: #private::Config = #config;
            ::core::result::Result::Ok(Self {
                __bn: #private::BatchNorm::__try_from_static(#rank, #first, &[#(#extents),*], CONFIG)?,
            })
        };
        let feature_axes = layout.feature_axes();
        let inner = layout.static_inner().and_then(|i| usize::try_from(i).ok()).unwrap_or(0);
        let spatial_check = layout.spatial.iter().map(|&(axis, extent)| {
            let (axis, extent) = (Literal::usize_unsuffixed(axis), Literal::u64_unsuffixed(extent));
            quote! {
                if shape[#axis] != #extent {
                    return ::core::result::Result::Err(#private::BnError::SpatialMismatch {
                        axis: #axis,
                        expected: #extent,
                        got: shape[#axis],
                        shape: shape.to_vec(),
                    });
                }
            }
        });
        let spatial_check = quote! {
            if shape.len() == #rank {
                #(#spatial_check)*
            }
        };
        Statics {
            features: Literal::u64_unsuffixed(layout.channels),
            rank,
            inner: Literal::usize_unsuffixed(inner),
            spatial_check,
            construct,
            try_construct,
            doc_features: format!(
                "The number of features, {}: the product of the feature extents {:?} (the length of \
                 `gamma()` and of the other parameters and statistics).",
                layout.channels, layout.features
            ),
            doc_rank: format!(
                "The rank of the tensors the layer takes, {}: the statistics are taken over axes {:?}, \
                 the feature axes are {:?}.",
                layout.rank, layout.axes, feature_axes
            ),
        }
    }
}

/// A float literal for generated code (never `-0.0`: the validated values are not negative).
fn float(value: f64) -> Literal {
    Literal::f64_unsuffixed(if value == 0.0 { 0.0 } else { value })
}

/// The layer: the struct, its inherent API and its trait impls. With `statics == None`, the stub.
pub(crate) fn layer(shell: &Shell, krate: &Path, dtype: &Dtype, statics: Option<&Statics>) -> TokenStream {
    let Shell { attrs, vis, struct_token, ident } = shell;
    let Dtype { elem, param } = dtype;
    let private = quote!(#krate::__private);
    let result = quote!(::core::result::Result<(), #private::BnError>);
    let name = ident.unraw().to_string();
    // The impls exist exactly when the struct does.
    let cfgs = attrs.iter().filter(|attr| attr.path().is_ident("cfg"));

    let zero = Literal::usize_unsuffixed(0);
    let (features, rank, inner) = match statics {
        Some(s) => (&s.features, &s.rank, &s.inner),
        None => (&zero, &zero, &zero),
    };
    let spatial_check = statics.map(|s| s.spatial_check.clone()).unwrap_or_default();
    let unreachable = quote!(::core::unreachable!("the #[batch_norm] attribute of this layer has errors"));
    let (construct, try_construct) = match statics {
        Some(s) => (s.construct.clone(), s.try_construct.clone()),
        None => (unreachable.clone(), unreachable),
    };
    let doc_features = statics.map_or("The number of features.", |s| &s.doc_features);
    let doc_rank = statics.map_or("The rank of the tensors the layer takes.", |s| &s.doc_rank);
    let (inherent_passes, trait_passes) = crate::passes::methods(ident, &private, elem, &result);

    quote! {
        #(#attrs)*
        #vis #struct_token #ident {
            __bn: #private::BatchNorm<#elem>,
        }

        #(#cfgs)*
        const _: () = {
            /// What the attribute fixes at compile time, passed to the shared kernels.
            enum __Spec {}

            impl #private::Spec for __Spec {
                const CHANNELS: usize = #features;
                const INNER: usize = #inner;

                /// The shape checks the attribute's `spatial` key adds (none without it).
                #[inline(always)]
                #[allow(unused_variables)]
                fn check_shape(shape: &[usize]) -> #result {
                    #spatial_check
                    ::core::result::Result::Ok(())
                }
            }

            impl #ident {
                #[doc = #doc_features]
                pub const FEATURES: usize = #features;

                #[doc = #doc_rank]
                pub const RANK: usize = #rank;

                /// A new layer: gamma 1, beta 0, running mean 0, running variance 1, with the
                /// options of the attribute (see [`config`](Self::config)). Also [`Default`].
                ///
                /// The state (16 buffers of [`FEATURES`](Self::FEATURES) values) is allocated as
                /// `Vec` allocates: when the allocator refuses, the process aborts.
                /// [`try_new`](Self::try_new) returns an error instead.
                #[must_use]
                pub fn new() -> Self {
                    #construct
                }

                /// A new layer, as [`new`](Self::new), allocated fallibly.
                ///
                /// # Errors
                ///
                /// `BnError::Allocation` when the layer's state cannot be allocated (nothing
                /// else can fail: the attribute was checked at compile time).
                pub fn try_new() -> ::core::result::Result<Self, #private::BnError> {
                    #try_construct
                }

                #inherent_passes

                /// The scale parameter, one value per feature.
                #[inline]
                pub fn gamma(&self) -> &[#param] {
                    self.__bn.gamma()
                }

                /// The shift parameter, one value per feature.
                #[inline]
                pub fn beta(&self) -> &[#param] {
                    self.__bn.beta()
                }

                /// The running mean used by inference.
                #[inline]
                pub fn running_mean(&self) -> &[#param] {
                    self.__bn.running_mean()
                }

                /// The running variance used by inference.
                #[inline]
                pub fn running_var(&self) -> &[#param] {
                    self.__bn.running_var()
                }

                /// The gradient of gamma from the last backward (zeros before any).
                #[inline]
                pub fn gamma_grad(&self) -> &[#param] {
                    self.__bn.gamma_grad()
                }

                /// The gradient of beta from the last backward (zeros before any).
                #[inline]
                pub fn beta_grad(&self) -> &[#param] {
                    self.__bn.beta_grad()
                }

                /// Sets gamma and beta.
                ///
                /// # Errors
                ///
                /// Wrong lengths, non-finite values, or values other than the fixed ones when
                /// `scale` (gamma = 1) or `center` (beta = 0) is off. After an error the layer is
                /// unchanged.
                #[inline]
                pub fn update_params(&mut self, gamma: &[#param], beta: &[#param]) -> #result {
                    self.__bn.update_params(gamma, beta)
                }

                /// Sets the running mean and variance.
                ///
                /// # Errors
                ///
                /// Wrong lengths, non-finite values or negative variances. After an error the
                /// layer is unchanged.
                #[inline]
                pub fn set_running_stats(&mut self, mean: &[#param], var: &[#param]) -> #result {
                    self.__bn.set_running_stats(mean, var)
                }

                /// How many training batches have updated the running statistics.
                #[inline]
                pub fn num_batches_tracked(&self) -> u64 {
                    self.__bn.num_batches_tracked()
                }

                /// Sets the number of training batches seen (as loaded from a checkpoint); it
                /// weighs the next batch when `momentum = "cumulative"`.
                #[inline]
                pub fn set_num_batches_tracked(&mut self, batches: u64) {
                    self.__bn.set_num_batches_tracked(batches)
                }

                /// The layer's layout: rank, feature axes and extents.
                #[inline]
                pub fn layout(&self) -> &#private::Layout {
                    self.__bn.layout()
                }

                /// The layer's options: the preset and the keys of the attribute.
                #[inline]
                pub fn config(&self) -> &#private::Config {
                    self.__bn.config()
                }

                /// The runtime-generic layer this one wraps (same state, same kernels).
                #[inline]
                pub fn as_batch_norm(&self) -> &#private::BatchNorm<#elem> {
                    &self.__bn
                }

                /// The runtime-generic layer this one wraps, mutably (its layout cannot change).
                #[inline]
                pub fn as_batch_norm_mut(&mut self) -> &mut #private::BatchNorm<#elem> {
                    &mut self.__bn
                }
            }

            #[automatically_derived]
            impl ::core::default::Default for #ident {
                #[inline]
                fn default() -> Self {
                    Self::new()
                }
            }

            #[automatically_derived]
            impl ::core::clone::Clone for #ident {
                #[inline]
                fn clone(&self) -> Self {
                    Self { __bn: ::core::clone::Clone::clone(&self.__bn) }
                }
            }

            #[automatically_derived]
            impl ::core::fmt::Debug for #ident {
                fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                    f.debug_tuple(#name).field(&self.__bn).finish()
                }
            }

            #[automatically_derived]
            impl #private::BatchNormLayer for #ident {
                type Elem = #elem;
                type Param = #param;

                #[inline]
                fn features(&self) -> usize {
                    Self::FEATURES
                }
                #[inline]
                fn rank(&self) -> usize {
                    Self::RANK
                }
                #[inline]
                fn config(&self) -> &#private::Config {
                    #ident::config(self)
                }
                #[inline]
                fn layout(&self) -> &#private::Layout {
                    #ident::layout(self)
                }
                #[inline]
                fn as_batch_norm(&self) -> &#private::BatchNorm<#elem> {
                    &self.__bn
                }
                #[inline]
                fn as_batch_norm_mut(&mut self) -> &mut #private::BatchNorm<#elem> {
                    &mut self.__bn
                }
                #[inline]
                fn num_batches_tracked(&self) -> u64 {
                    #ident::num_batches_tracked(self)
                }
                #[inline]
                fn set_num_batches_tracked(&mut self, batches: u64) {
                    #ident::set_num_batches_tracked(self, batches)
                }
                #trait_passes
                #[inline]
                fn __forward_train_sync(
                    &mut self,
                    x: &[#elem],
                    shape: &[usize],
                    y: &mut [#elem],
                    group: &dyn #private::StatsGroup,
                ) -> #result {
                    self.__bn.forward_train_sync_spec::<__Spec, dyn #private::StatsGroup>(x, shape, y, group)
                }
                #[inline]
                fn __backward_sync(
                    &mut self,
                    x: &[#elem],
                    dy: &[#elem],
                    shape: &[usize],
                    dx: &mut [#elem],
                    group: &dyn #private::StatsGroup,
                ) -> #result {
                    self.__bn.backward_sync_spec::<__Spec, dyn #private::StatsGroup>(x, dy, shape, dx, group)
                }
                #[inline]
                fn gamma(&self) -> &[#param] {
                    #ident::gamma(self)
                }
                #[inline]
                fn beta(&self) -> &[#param] {
                    #ident::beta(self)
                }
                #[inline]
                fn running_mean(&self) -> &[#param] {
                    #ident::running_mean(self)
                }
                #[inline]
                fn running_var(&self) -> &[#param] {
                    #ident::running_var(self)
                }
                #[inline]
                fn gamma_grad(&self) -> &[#param] {
                    #ident::gamma_grad(self)
                }
                #[inline]
                fn beta_grad(&self) -> &[#param] {
                    #ident::beta_grad(self)
                }
                #[inline]
                fn update_params(&mut self, gamma: &[#param], beta: &[#param]) -> #result {
                    #ident::update_params(self, gamma, beta)
                }
                #[inline]
                fn set_running_stats(&mut self, mean: &[#param], var: &[#param]) -> #result {
                    #ident::set_running_stats(self, mean, var)
                }
            }
        };
    }
}
