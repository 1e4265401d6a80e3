//! Parsing: the attribute's arguments and the item it is on, into typed models that keep the
//! user's tokens, so every later error can point at exactly what the user wrote.
//!
//! This stage only checks what each key's value *is* (a number, a list of integers, a string,
//! ...). Whether the values make sense together (ranges, axes covering the rank, ...) is
//! `valid.rs`'s job. Every error goes to the [`Ctxt`] and parsing goes on, so that one build
//! reports every mistake.
//!
//! Adding a key: a variant of [`Key`] with its row in [`Key::ALL`], a field of [`Attr`], and an
//! arm in [`Attr::entry`].

use proc_macro2::TokenStream;
use quote::{quote, ToTokens};
use syn::parse::{ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::{Attribute, Expr, Fields, Ident, Item, Lit, LitStr, Meta, Path, Token, UnOp, Visibility};

use crate::ctxt::Ctxt;

/// The keys of the attribute.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Key {
    Features,
    Axes,
    Eps,
    Momentum,
    TorchMomentum,
    RunningVar,
    Preset,
    Center,
    Scale,
    TrackRunningStats,
    Activation,
    Spatial,
    Dtype,
    Crate,
}

impl Key {
    /// Every key with its name and the example its error messages show, in the order the
    /// "unknown key" message lists them.
    const ALL: &'static [(Key, &'static str, &'static str)] = &[
        (Key::Features, "features", "`features = 64` or `features = [55, 55]`"),
        (Key::Axes, "axes", "`axes = [0, 2, 3]`"),
        (Key::Eps, "eps", "`eps = 1e-5`"),
        (
            Key::Momentum,
            "momentum",
            "`momentum = 0.9` (the weight of the old running value, in [0, 1)) or `momentum = \"cumulative\"`",
        ),
        (Key::TorchMomentum, "torch_momentum", "`torch_momentum = 0.1` (PyTorch's momentum, in (0, 1])"),
        (Key::RunningVar, "running_var", "`running_var = \"biased\"` or `running_var = \"unbiased\"`"),
        (Key::Preset, "preset", "`preset = \"numpy\"`, `preset = \"pytorch\"` or `preset = \"keras\"`"),
        (Key::Center, "center", "`center = true` or `center = false`"),
        (Key::Scale, "scale", "`scale = true` or `scale = false`"),
        (
            Key::TrackRunningStats,
            "track_running_stats",
            "`track_running_stats = true` or `track_running_stats = false`",
        ),
        (Key::Activation, "activation", "`activation = \"relu\"` or `activation = \"none\"`"),
        (
            Key::Spatial,
            "spatial",
            "`spatial = [56, 56]` (the extents of the reduced axes after the first, in axis order)",
        ),
        (Key::Dtype, "dtype", "`dtype = \"f32\"`, `dtype = \"f64\"`, `dtype = \"bf16\"` or `dtype = \"f16\"`"),
        (Key::Crate, "crate", "`crate = \"::batchnorm\"`"),
    ];

    fn from_path(path: &Path) -> Option<Key> {
        Key::ALL.iter().find(|(_, name, _)| path.is_ident(name)).map(|&(key, _, _)| key)
    }

    pub(crate) fn name(self) -> &'static str {
        Key::ALL.iter().find(|(key, _, _)| *key == self).map_or("", |&(_, name, _)| name)
    }

    fn example(self) -> &'static str {
        Key::ALL.iter().find(|(key, _, _)| *key == self).map_or("", |&(_, _, example)| example)
    }
}

/// A value of the attribute with the tokens it was written as.
pub(crate) struct Spanned<T> {
    pub value: T,
    /// What the user wrote for the value: errors about it point here.
    pub tokens: TokenStream,
}

impl<T> Spanned<T> {
    fn new(value: T, tokens: &impl ToTokens) -> Spanned<T> {
        Spanned { value, tokens: tokens.to_token_stream() }
    }
}

/// A list of integers: `features = [55, 55]`, `axes = [0, 2, 3]`. `features = 64` is a list of one.
pub(crate) type Integers = Spanned<Vec<Spanned<u64>>>;

/// The `preset` key's values (mirrors `bn_core::Preset`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Preset {
    Numpy,
    Pytorch,
    Keras,
}

impl Preset {
    const ALL: &'static [(Preset, &'static str)] =
        &[(Preset::Numpy, "numpy"), (Preset::Pytorch, "pytorch"), (Preset::Keras, "keras")];
    /// The older name of `"numpy"`, still accepted (and not offered in messages).
    const ALIAS: (Preset, &'static str) = (Preset::Numpy, "seed");

    /// The variant's name in `bn_core::Preset`.
    pub(crate) fn variant(self) -> &'static str {
        match self {
            Preset::Numpy => "Numpy",
            Preset::Pytorch => "Pytorch",
            Preset::Keras => "Keras",
        }
    }
}

/// The `momentum` key's values: a number, or `"cumulative"` (`Config::cumulative_momentum`).
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Momentum {
    /// The weight of the old running value (its range is checked in `valid.rs`).
    Value(f64),
    /// A cumulative moving average (PyTorch's `momentum=None`).
    Cumulative,
}

/// The `running_var` key's values (mirrors `bn_core::RunningVar`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum RunningVar {
    Biased,
    Unbiased,
}

impl RunningVar {
    const ALL: &'static [(RunningVar, &'static str)] =
        &[(RunningVar::Biased, "biased"), (RunningVar::Unbiased, "unbiased")];

    /// The variant's name in `bn_core::RunningVar`.
    pub(crate) fn variant(self) -> &'static str {
        match self {
            RunningVar::Biased => "Biased",
            RunningVar::Unbiased => "Unbiased",
        }
    }
}

/// The `activation` key's values (mirrors `bn_core::Activation`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Activation {
    Identity,
    Relu,
}

impl Activation {
    const ALL: &'static [(Activation, &'static str)] =
        &[(Activation::Relu, "relu"), (Activation::Identity, "none"), (Activation::Identity, "identity")];

    /// The variant's name in `bn_core::Activation`.
    pub(crate) fn variant(self) -> &'static str {
        match self {
            Activation::Identity => "Identity",
            Activation::Relu => "Relu",
        }
    }
}

/// The `dtype` key's values: the element type of the data (`f32` by default). `bf16` and `f16`
/// layers keep `f32` parameters and statistics; `f64` layers keep `f64` ones.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Dtype {
    F32,
    F64,
    Bf16,
    F16,
}

impl Dtype {
    const ALL: &'static [(Dtype, &'static str)] =
        &[(Dtype::F32, "f32"), (Dtype::F64, "f64"), (Dtype::Bf16, "bf16"), (Dtype::F16, "f16")];
}

/// The arguments of `#[batch_norm(...)]`. A field is `None` when the key is absent or its value
/// could not be read (that error is already reported); [`Attr::given`] tells the two apart.
#[derive(Default)]
pub(crate) struct Attr {
    pub features: Option<Integers>,
    pub axes: Option<Integers>,
    pub eps: Option<Spanned<f64>>,
    pub momentum: Option<Spanned<Momentum>>,
    pub torch_momentum: Option<Spanned<f64>>,
    pub running_var: Option<Spanned<RunningVar>>,
    pub preset: Option<Spanned<Preset>>,
    pub center: Option<Spanned<bool>>,
    pub scale: Option<Spanned<bool>>,
    pub track_running_stats: Option<Spanned<bool>>,
    pub activation: Option<Spanned<Activation>>,
    pub spatial: Option<Integers>,
    pub dtype: Option<Spanned<Dtype>>,
    pub krate: Option<Spanned<Path>>,
    /// The keys given, each with its position among the entries (errors are sorted by it) and
    /// its whole `key = value` tokens.
    pub given: Vec<(Key, usize, TokenStream)>,
    /// Keys an unknown key is a typo of (`featurs`): not reported missing as well.
    pub misspelled: Vec<Key>,
    /// The arguments have a syntax error (reported): what is missing is unknown.
    pub malformed: bool,
}

impl Attr {
    /// Parses the arguments, reporting every problem to `cx`.
    pub(crate) fn from_args(cx: &Ctxt, args: TokenStream) -> Attr {
        let mut attr = Attr::default();
        let (entries, syntax_error) = parse_entries(args);
        let count = entries.len();
        for (position, meta) in entries.into_iter().enumerate() {
            cx.set_position(position);
            attr.entry(cx, position, meta);
        }
        if let Some(error) = syntax_error {
            cx.set_position(count);
            cx.syn_error(error);
            attr.malformed = true;
        }
        attr
    }

    /// Whether `key` was given (even with a value that could not be read).
    pub(crate) fn is_given(&self, key: Key) -> bool {
        self.given.iter().any(|(k, _, _)| *k == key)
    }

    /// The position of `key` among the entries (`0` if it was not given).
    pub(crate) fn position(&self, key: Key) -> usize {
        self.given.iter().find(|(k, _, _)| *k == key).map_or(0, |&(_, position, _)| position)
    }

    fn entry(&mut self, cx: &Ctxt, position: usize, meta: Meta) {
        let path = meta.path();
        let Some(key) = Key::from_path(path) else {
            let (message, suggestion) = unknown_key(path);
            self.misspelled.extend(suggestion);
            cx.error_spanned_by(path, message);
            return;
        };
        if self.is_given(key) {
            cx.error_spanned_by(path, format!("`{}` is given twice; give each key once", key.name()));
            return;
        }
        self.given.push((key, position, meta.to_token_stream()));
        let value = match &meta {
            Meta::NameValue(entry) => unwrap_group(&entry.value),
            Meta::Path(_) | Meta::List(_) => {
                cx.error_spanned_by(&meta, format!("`{}` takes a value: {}", key.name(), key.example()));
                return;
            }
        };
        match key {
            Key::Features => self.features = integers(cx, key, value, true, "positive integers"),
            Key::Axes => self.axes = integers(cx, key, value, false, "axis indices (non-negative integers)"),
            Key::Eps => self.eps = number(cx, key, value),
            Key::Momentum => self.momentum = momentum(cx, key, value),
            Key::TorchMomentum => self.torch_momentum = number(cx, key, value),
            Key::RunningVar => self.running_var = choice(cx, key, value, RunningVar::ALL),
            Key::Preset => {
                self.preset = match string(value) {
                    Some(lit) if lit.value() == Preset::ALIAS.1 => Some(Spanned::new(Preset::ALIAS.0, value)),
                    _ => choice(cx, key, value, Preset::ALL),
                }
            }
            Key::Center => self.center = boolean(cx, key, value),
            Key::Scale => self.scale = boolean(cx, key, value),
            Key::TrackRunningStats => self.track_running_stats = boolean(cx, key, value),
            Key::Activation => self.activation = choice(cx, key, value, Activation::ALL),
            Key::Spatial => self.spatial = integers(cx, key, value, true, "positive integers"),
            Key::Dtype => self.dtype = choice(cx, key, value, Dtype::ALL),
            Key::Crate => self.krate = crate_path(cx, key, value),
        }
    }
}

/// Parses `key = value, ...`. On a syntax error, returns the entries before it and the error.
fn parse_entries(args: TokenStream) -> (Vec<Meta>, Option<syn::Error>) {
    let mut entries = Vec::new();
    let mut syntax_error = None;
    let parser = |input: ParseStream| -> syn::Result<()> {
        while !input.is_empty() {
            match parse_entry(input) {
                Ok(meta) => entries.push(meta),
                Err(error) => {
                    syntax_error = Some(error);
                    // Skip the rest: after a syntax error, what follows cannot be trusted.
                    input.parse::<TokenStream>()?;
                }
            }
        }
        Ok(())
    };
    if let Err(error) = parser.parse2(args) {
        syntax_error.get_or_insert(error);
    }
    (entries, syntax_error)
}

fn parse_entry(input: ParseStream) -> syn::Result<Meta> {
    let meta: Meta = input.parse()?;
    if input.is_empty() {
        return Ok(meta);
    }
    if !input.peek(Token![,]) {
        let message = match (&meta, Key::from_path(meta.path())) {
            (Meta::Path(_), Some(key)) => format!("expected `=` after `{}`: {}", key.name(), key.example()),
            (Meta::Path(_), None) => "expected `key = value`".to_owned(),
            _ => "expected `,` between two `key = value` entries".to_owned(),
        };
        return Err(input.error(message));
    }
    input.parse::<Token![,]>()?;
    Ok(meta)
}

/// The message for an unknown key, and the key it is probably a typo of.
fn unknown_key(path: &Path) -> (String, Option<Key>) {
    let given = path.to_token_stream().to_string().replace(' ', "");
    let names: Vec<String> = Key::ALL.iter().map(|(_, name, _)| format!("`{name}`")).collect();
    let suggestion = Key::ALL
        .iter()
        .map(|&(key, name, _)| (edit_distance(&given, name), name, key))
        .filter(|&(distance, _, _)| distance <= 2)
        .min_by_key(|&(distance, _, _)| distance);
    let did_you_mean =
        suggestion.map(|(_, name, _)| format!(" (did you mean `{name}`?)")).unwrap_or_default();
    let message = format!("unknown key `{given}`{did_you_mean}; the keys are {}", names.join(", "));
    (message, suggestion.map(|(_, _, key)| key))
}

/// Levenshtein distance, for "did you mean" (keys are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1).min(row[j] + 1).min(diagonal + usize::from(ca != cb));
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// Sees through the invisible groups `macro_rules!` puts around `$value:expr`, and parentheses.
fn unwrap_group(expr: &Expr) -> &Expr {
    match expr {
        Expr::Group(group) => unwrap_group(&group.expr),
        Expr::Paren(paren) => unwrap_group(&paren.expr),
        _ => expr,
    }
}

/// `features = 64` (with `single`), `features = [55, 55]`, `axes = [0, 2, 3]`.
fn integers(cx: &Ctxt, key: Key, value: &Expr, single: bool, elem_desc: &str) -> Option<Integers> {
    let elems: Vec<&Expr> = match value {
        Expr::Array(array) => array.elems.iter().map(unwrap_group).collect(),
        Expr::Lit(_) | Expr::Unary(_) if single => vec![value],
        _ => {
            let what = if single { "an integer or a list of integers" } else { "a list of axis indices" };
            let hint = match value {
                Expr::Lit(lit) if !single => format!(" (write `{} = [{}]`)", key.name(), quote!(#lit)),
                _ => String::new(),
            };
            cx.error_spanned_by(
                value,
                format!("`{}` takes {what}, e.g. {}{hint}", key.name(), key.example()),
            );
            return None;
        }
    };
    let mut list = Vec::with_capacity(elems.len());
    let mut ok = true;
    for elem in elems {
        match integer(elem) {
            Ok(n) => list.push(Spanned::new(n, elem)),
            Err(what) => {
                cx.error_spanned_by(
                    elem,
                    format!("`{}` takes {elem_desc}, got {what}, e.g. {}", key.name(), key.example()),
                );
                ok = false;
            }
        }
    }
    ok.then(|| Spanned::new(list, value))
}

/// A non-negative integer literal, or a description of what the expression is instead.
fn integer(expr: &Expr) -> Result<u64, &'static str> {
    match expr {
        Expr::Lit(lit) => match &lit.lit {
            Lit::Int(int) => int.base10_parse::<u64>().map_err(|_| "an integer too large for 64 bits"),
            Lit::Float(_) => Err("a float"),
            Lit::Str(_) => Err("a string"),
            Lit::Bool(_) => Err("a bool"),
            _ => Err("another literal"),
        },
        Expr::Unary(unary) if matches!(unary.op, UnOp::Neg(_)) => Err("a negative number"),
        _ => Err("an expression (only literals are allowed)"),
    }
}

/// The value of a number literal, integer or float, possibly negative.
fn parse_number(expr: &Expr) -> Option<f64> {
    match expr {
        Expr::Lit(lit) => match &lit.lit {
            Lit::Float(float) => float.base10_parse::<f64>().ok(),
            Lit::Int(int) => int.base10_digits().parse::<f64>().ok(),
            _ => None,
        },
        Expr::Unary(unary) if matches!(unary.op, UnOp::Neg(_)) => {
            parse_number(unwrap_group(&unary.expr)).map(|v| -v)
        }
        _ => None,
    }
}

/// A number literal, integer or float, possibly negative (ranges are checked later).
fn number(cx: &Ctxt, key: Key, value: &Expr) -> Option<Spanned<f64>> {
    let parsed = parse_number(value);
    if parsed.is_none() {
        cx.error_spanned_by(
            value,
            format!("`{}` takes a number literal, e.g. {}", key.name(), key.example()),
        );
    }
    parsed.map(|v| Spanned::new(v, value))
}

/// `momentum = 0.9` (a number; its range is checked later) or `momentum = "cumulative"`.
fn momentum(cx: &Ctxt, key: Key, value: &Expr) -> Option<Spanned<Momentum>> {
    const ALLOWED: &str = "a number in [0, 1) (the weight of the old running value, e.g. `momentum = 0.9`) \
                           or \"cumulative\" (a cumulative moving average, PyTorch's `momentum=None`)";
    if let Some(lit) = string(value) {
        if lit.value() == "cumulative" {
            return Some(Spanned::new(Momentum::Cumulative, value));
        }
        cx.error_spanned_by(
            value,
            format!("unknown `{}` \"{}\": expected {ALLOWED}", key.name(), lit.value()),
        );
        return None;
    }
    let parsed = parse_number(value);
    if parsed.is_none() {
        let hint = match value {
            Expr::Path(path) if path.path.is_ident("cumulative") => {
                format!(" (write `{} = \"cumulative\"`, not `{0} = cumulative`)", key.name())
            }
            _ => String::new(),
        };
        cx.error_spanned_by(value, format!("`{}` takes {ALLOWED}{hint}", key.name()));
    }
    parsed.map(|v| Spanned::new(Momentum::Value(v), value))
}

/// A string literal naming one of `choices`.
fn choice<T: Copy>(cx: &Ctxt, key: Key, value: &Expr, choices: &[(T, &str)]) -> Option<Spanned<T>> {
    let names: Vec<String> = choices.iter().map(|(_, name)| format!("\"{name}\"")).collect();
    let allowed = match names.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    let Some(lit) = string(value) else {
        let hint = match value {
            Expr::Path(path) => {
                format!(" (write `{0} = \"{1}\"`, not `{0} = {1}`)", key.name(), quote!(#path))
            }
            _ => String::new(),
        };
        cx.error_spanned_by(value, format!("`{}` takes a string: {allowed}{hint}", key.name()));
        return None;
    };
    let found = choices.iter().find(|(_, name)| lit.value() == *name);
    if found.is_none() {
        cx.error_spanned_by(
            value,
            format!("unknown `{}` \"{}\": expected {allowed}", key.name(), lit.value()),
        );
    }
    found.map(|&(choice, _)| Spanned::new(choice, value))
}

fn string(expr: &Expr) -> Option<&LitStr> {
    match expr {
        Expr::Lit(lit) => match &lit.lit {
            Lit::Str(s) => Some(s),
            _ => None,
        },
        _ => None,
    }
}

/// `true` or `false`.
fn boolean(cx: &Ctxt, key: Key, value: &Expr) -> Option<Spanned<bool>> {
    if let Expr::Lit(lit) = value {
        if let Lit::Bool(b) = &lit.lit {
            return Some(Spanned::new(b.value, value));
        }
    }
    cx.error_spanned_by(value, format!("`{}` takes a bool: {}", key.name(), key.example()));
    None
}

/// `crate = "path"`, parsed into a path spanned on the string (as serde's `crate = "..."`).
fn crate_path(cx: &Ctxt, key: Key, value: &Expr) -> Option<Spanned<Path>> {
    let Some(lit) = string(value) else {
        cx.error_spanned_by(
            value,
            format!("`{}` takes a path in a string, e.g. {}", key.name(), key.example()),
        );
        return None;
    };
    match lit.parse_with(Path::parse_mod_style) {
        Ok(path) => Some(Spanned::new(path, value)),
        Err(_) => {
            cx.error_spanned_by(
                value,
                format!(
                    "`{}` takes the path of the `batchnorm` crate, e.g. {}; \"{}\" is not a path",
                    key.name(),
                    key.example(),
                    lit.value()
                ),
            );
            None
        }
    }
}

/// What the generated layer keeps of the user's struct.
pub(crate) struct Shell {
    /// Doc comments and attributes, with `Default`, `Clone` and `Debug` taken out of the derives
    /// (the expansion implements them).
    pub attrs: Vec<Attribute>,
    pub vis: Visibility,
    pub struct_token: Token![struct],
    pub ident: Ident,
}

/// The item the attribute is on.
pub(crate) enum Target {
    /// A struct. If it has fields or generics that is reported, and the fallback still emits a
    /// layer-shaped stub of it.
    Struct(Shell),
    /// Anything else, reported and emitted unchanged.
    Other(TokenStream),
}

impl Target {
    pub(crate) fn from_syn(cx: &Ctxt, item: TokenStream) -> Target {
        const EXPECTED: &str = "#[batch_norm] goes on a unit struct, as in `pub struct StemBn;`";
        cx.set_position(Ctxt::ITEM);
        let item = match syn::parse2::<Item>(item.clone()) {
            Ok(item) => item,
            Err(error) => {
                cx.syn_error(error);
                return Target::Other(item);
            }
        };
        let wrong = |what: &str, tokens: TokenStream| {
            cx.error_spanned_by(tokens, format!("{EXPECTED}, not on {what}"));
        };
        match &item {
            Item::Struct(s) => {
                match &s.fields {
                    Fields::Unit => {}
                    Fields::Named(fields) => cx.error_spanned_by(
                        fields,
                        format!(
                            "{EXPECTED}: the attribute generates the layer's fields, so the struct must not \
                             declare any (remove `{{ .. }}`)"
                        ),
                    ),
                    Fields::Unnamed(fields) => cx.error_spanned_by(
                        fields,
                        format!(
                            "{EXPECTED}: the attribute generates the layer's fields, so the struct must not \
                             be a tuple struct (remove `( .. )`)"
                        ),
                    ),
                }
                if !s.generics.params.is_empty() {
                    cx.error_spanned_by(
                        &s.generics,
                        "#[batch_norm] layers cannot be generic: remove the generic parameters \
                         (the extents and options are given in the attribute)",
                    );
                }
                if let Some(where_clause) = &s.generics.where_clause {
                    cx.error_spanned_by(where_clause, "#[batch_norm] layers cannot have a where clause");
                }
                Target::Struct(Shell {
                    attrs: without_generated_derives(&s.attrs),
                    vis: s.vis.clone(),
                    struct_token: s.struct_token,
                    ident: s.ident.clone(),
                })
            }
            Item::Enum(e) => {
                let (token, ident) = (e.enum_token, &e.ident);
                wrong("an enum", quote!(#token #ident));
                Target::Other(item.to_token_stream())
            }
            Item::Union(u) => {
                let (token, ident) = (u.union_token, &u.ident);
                wrong("a union", quote!(#token #ident));
                Target::Other(item.to_token_stream())
            }
            other => {
                wrong("this item", other.to_token_stream());
                Target::Other(item.to_token_stream())
            }
        }
    }
}

/// The derives the expansion implements itself: a user derive of one of them is skipped, not
/// doubled. Matched on the last path segment (`Debug`, `core::fmt::Debug`, ...).
const GENERATED_TRAITS: &[&str] = &["Default", "Clone", "Debug"];

fn without_generated_derives(attrs: &[Attribute]) -> Vec<Attribute> {
    let mut kept = Vec::with_capacity(attrs.len());
    for attr in attrs {
        let Meta::List(list) = &attr.meta else {
            kept.push(attr.clone());
            continue;
        };
        if !list.path.is_ident("derive") {
            kept.push(attr.clone());
            continue;
        }
        let Ok(paths) = list.parse_args_with(Punctuated::<Path, Token![,]>::parse_terminated) else {
            // Not a list of paths: leave it to the compiler to report.
            kept.push(attr.clone());
            continue;
        };
        let others: Vec<&Path> = paths
            .iter()
            .filter(|path| {
                path.segments.last().is_none_or(|last| !GENERATED_TRAITS.iter().any(|t| last.ident == t))
            })
            .collect();
        if others.is_empty() {
            continue;
        }
        let mut attr = attr.clone();
        if let Meta::List(list) = &mut attr.meta {
            list.tokens = quote!(#(#others),*);
        }
        kept.push(attr);
    }
    kept
}
