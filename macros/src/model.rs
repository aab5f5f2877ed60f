//! The service trait read and checked: its methods, their arguments and what they
//! return, and the trait rewritten with `Send` futures.

use proc_macro2::{TokenStream, TokenTree};
use quote::ToTokens;
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{
    parse_quote, Attribute, FnArg, GenericArgument, Ident, ItemTrait, Pat, PathArguments,
    ReturnType, Signature, TraitItem, Type,
};

/// The names the generated client has methods of its own under.
pub(crate) const RESERVED: &[&str] = &[
    "new",
    "caller",
    "into_caller",
    "contract",
    "with_timeout",
    "timeout",
    "builder",
    "connect",
    "connect_with_callback",
];

/// A checked service trait.
pub(crate) struct Service {
    /// The trait as it will be emitted (supertraits `Send + Sync + 'static`, methods
    /// returning `impl Future + Send`).
    pub(crate) item: ItemTrait,
    /// Its methods, in order.
    pub(crate) methods: Vec<Method>,
}

/// One method.
pub(crate) struct Method {
    /// Its Rust name.
    pub(crate) ident: Ident,
    /// Its name on the wire (the Rust name without `r#`).
    pub(crate) wire: String,
    /// The attributes the client's method copies (docs, `cfg`, `allow`, `deprecated`).
    pub(crate) attrs: Vec<Attribute>,
    /// Its arguments after `&self`.
    pub(crate) args: Vec<(Ident, Type)>,
    /// What it returns.
    pub(crate) output: Output,
}

/// What a method returns: a value (`()` when nothing is written), or for
/// `Result<T, E>`, `T` and the error type `E`.
pub(crate) struct Output {
    /// The value, or `T`.
    pub(crate) ok: Type,
    /// `E` of a `Result<T, E>`.
    pub(crate) err: Option<Type>,
}

impl Service {
    /// Reads and checks `item`; every problem found is reported, each at its span.
    pub(crate) fn parse(mut item: ItemTrait) -> syn::Result<Service> {
        let mut errors = Errors::default();
        if let Some(u) = &item.unsafety {
            errors.push(syn::Error::new(
                u.span(),
                "a service trait cannot be unsafe",
            ));
        }
        if let Some(a) = &item.auto_token {
            errors.push(syn::Error::new(a.span(), "a service trait cannot be auto"));
        }
        if !item.generics.params.is_empty() || item.generics.where_clause.is_some() {
            errors.push(syn::Error::new_spanned(
                &item.generics,
                "a service trait cannot have generics: both ends must agree on one set of types",
            ));
        }
        let mut methods = Vec::new();
        for trait_item in &mut item.items {
            match trait_item {
                TraitItem::Fn(f) => match Method::parse(&f.sig, &f.attrs) {
                    Ok(m) => {
                        rewrite(f);
                        methods.push(m);
                    }
                    Err(e) => errors.push(e),
                },
                other => errors.push(syn::Error::new_spanned(
                    other,
                    "a service trait holds only `async fn` methods",
                )),
            }
        }
        errors.finish()?;
        item.supertraits.push(parse_quote!(::core::marker::Send));
        item.supertraits.push(parse_quote!(::core::marker::Sync));
        item.supertraits.push(parse_quote!('static));
        if item.colon_token.is_none() {
            item.colon_token = Some(Default::default());
        }
        Ok(Service { item, methods })
    }
}

impl Method {
    /// Reads and checks one method's signature.
    fn parse(sig: &Signature, attrs: &[Attribute]) -> syn::Result<Method> {
        let mut errors = Errors::default();
        if sig.asyncness.is_none() {
            errors.push(syn::Error::new(
                sig.fn_token.span(),
                "the methods of a service trait are `async fn`",
            ));
        }
        if let Some(c) = &sig.constness {
            errors.push(syn::Error::new(
                c.span(),
                "a service method cannot be const",
            ));
        }
        if let Some(u) = &sig.unsafety {
            errors.push(syn::Error::new(
                u.span(),
                "a service method cannot be unsafe",
            ));
        }
        if let Some(abi) = &sig.abi {
            errors.push(syn::Error::new_spanned(
                abi,
                "a service method cannot have an ABI",
            ));
        }
        if let Some(v) = &sig.variadic {
            errors.push(syn::Error::new_spanned(
                v,
                "a service method cannot be variadic",
            ));
        }
        if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
            errors.push(syn::Error::new_spanned(
                &sig.generics,
                "a service method cannot have generics or lifetimes: its arguments and \
                 result are concrete, owned, serde types",
            ));
        }
        let wire = sig.ident.unraw().to_string();
        if RESERVED.contains(&wire.as_str()) {
            errors.push(syn::Error::new(
                sig.ident.span(),
                format!(
                    "`{wire}` is a method of the generated client already; name the method \
                     otherwise (reserved: {})",
                    RESERVED.join(", ")
                ),
            ));
        }
        if wire.starts_with("__") {
            errors.push(syn::Error::new(
                sig.ident.span(),
                "method names starting with `__` are reserved for the generated code",
            ));
        }

        let mut inputs = sig.inputs.iter();
        match inputs.next() {
            Some(FnArg::Receiver(r))
                if r.colon_token.is_none()
                    && r.mutability.is_none()
                    && matches!(&r.reference, Some((_, None))) => {}
            Some(other) => errors.push(syn::Error::new_spanned(
                other,
                "a service method takes `&self` first (the server shares one implementation \
                 among calls)",
            )),
            None => errors.push(syn::Error::new(
                sig.paren_token.span.join(),
                "a service method takes `&self` first (the server shares one implementation \
                 among calls)",
            )),
        }
        let mut args = Vec::new();
        for input in inputs {
            match input {
                FnArg::Receiver(r) => errors.push(syn::Error::new_spanned(r, "`self` comes first")),
                FnArg::Typed(pt) => {
                    let ident = match &*pt.pat {
                        Pat::Ident(pi) if pi.by_ref.is_none() && pi.subpat.is_none() => {
                            Some(pi.ident.clone())
                        }
                        other => {
                            errors.push(syn::Error::new_spanned(
                                other,
                                "the arguments of a service method are plain names \
                                 (`name: Type`): no patterns",
                            ));
                            None
                        }
                    };
                    if let Err(e) = check_type(&pt.ty, "an argument") {
                        errors.push(e);
                    } else if let Some(ident) = ident {
                        args.push((ident, (*pt.ty).clone()));
                    }
                }
            }
        }
        let output = match &sig.output {
            ReturnType::Default => Output {
                ok: parse_quote!(()),
                err: None,
            },
            ReturnType::Type(_, ty) => {
                if let Err(e) = check_type(ty, "the result") {
                    errors.push(e);
                }
                match result_types(ty) {
                    Some((ok, err)) => Output { ok, err: Some(err) },
                    None => Output {
                        ok: (**ty).clone(),
                        err: None,
                    },
                }
            }
        };
        errors.finish()?;
        let attrs = attrs
            .iter()
            .filter(|a| {
                ["doc", "cfg", "allow", "deprecated"]
                    .iter()
                    .any(|k| a.path().is_ident(k))
            })
            .cloned()
            .collect();
        Ok(Method {
            ident: sig.ident.clone(),
            wire,
            attrs,
            args,
            output,
        })
    }
}

/// `async fn m(&self, ..) -> R` becomes `fn m(&self, ..) -> impl Future<Output = R> +
/// Send`, a default body `async move { body }`.
fn rewrite(f: &mut syn::TraitItemFn) {
    f.sig.asyncness = None;
    let out: Type = match &f.sig.output {
        ReturnType::Default => parse_quote!(()),
        ReturnType::Type(_, ty) => (**ty).clone(),
    };
    f.sig.output = parse_quote! {
        -> impl ::core::future::Future<Output = #out> + ::core::marker::Send
    };
    if let Some(block) = &f.default {
        f.default = Some(parse_quote!({ async move #block }));
    }
}

/// `Result<T, E>` (any path whose last segment is `Result` with two type arguments):
/// `T` and `E`.
fn result_types(ty: &Type) -> Option<(Type, Type)> {
    let Type::Path(tp) = ty else { return None };
    if tp.qself.is_some() {
        return None;
    }
    let last = tp.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(ab) = &last.arguments else {
        return None;
    };
    let mut types = ab.args.iter().filter_map(|a| match a {
        GenericArgument::Type(t) => Some(t.clone()),
        _ => None,
    });
    match (types.next(), types.next(), types.next()) {
        (Some(ok), Some(err), None) if ab.args.len() == 2 => Some((ok, err)),
        _ => None,
    }
}

/// Arguments and results are owned, concrete types: no `impl Trait`, no references
/// or lifetimes (the other end decodes them from bytes).
fn check_type(ty: &Type, what: &str) -> syn::Result<()> {
    fn walk(tokens: TokenStream, ty: &Type, what: &str) -> syn::Result<()> {
        for tt in tokens {
            match tt {
                TokenTree::Ident(i) if i == "impl" => {
                    return Err(syn::Error::new_spanned(
                        ty,
                        format!(
                        "{what} of a service method cannot be `impl Trait`: name a concrete type"
                    ),
                    ))
                }
                TokenTree::Punct(p) if p.as_char() == '&' || p.as_char() == '\'' => {
                    return Err(syn::Error::new_spanned(
                        ty,
                        format!(
                            "{what} of a service method is an owned type (`String`, not \
                             `&str`): the other end decodes it from bytes"
                        ),
                    ))
                }
                TokenTree::Group(g) => walk(g.stream(), ty, what)?,
                _ => {}
            }
        }
        Ok(())
    }
    walk(ty.to_token_stream(), ty, what)
}

/// Errors gathered so that one compile shows them all.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, e: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }

    fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}
