//! The arguments of `#[service(...)]`: `name`, `version`, `aliases`, `callback`.

use proc_macro2::{Span, TokenStream};
use syn::punctuated::Punctuated;
use syn::{LitInt, LitStr, Path, Token};

/// The longest contract name or alias (a u8 length on the wire).
const MAX_NAME: usize = 255;

/// The parsed arguments; every one is optional.
#[derive(Default)]
pub(crate) struct Args {
    /// The contract name (default: the trait's name).
    pub(crate) name: Option<LitStr>,
    /// The contract version (default 1).
    pub(crate) version: Option<u16>,
    /// Old names the server still answers to.
    pub(crate) aliases: Vec<LitStr>,
    /// The service trait the server calls back into the client with.
    pub(crate) callback: Option<Path>,
}

impl Args {
    /// Parses the tokens between the attribute's parentheses.
    pub(crate) fn parse(tokens: TokenStream) -> syn::Result<Args> {
        let mut args = Args::default();
        let mut seen: Vec<String> = Vec::new();
        let parser = syn::meta::parser(|meta| {
            let key = meta
                .path
                .get_ident()
                .map(ToString::to_string)
                .unwrap_or_default();
            if seen.contains(&key) {
                return Err(meta.error(format!("`{key}` given twice")));
            }
            match key.as_str() {
                "name" => {
                    let name: LitStr = meta.value()?.parse()?;
                    check_name(&name, "the contract name")?;
                    args.name = Some(name);
                }
                "version" => {
                    let v: LitInt = meta.value()?.parse()?;
                    args.version = Some(v.base10_parse::<u16>().map_err(|_| {
                        syn::Error::new(v.span(), "the version is a number from 0 to 65535")
                    })?);
                }
                "aliases" => {
                    let value = meta.value()?;
                    let content;
                    syn::bracketed!(content in value);
                    let list = Punctuated::<LitStr, Token![,]>::parse_terminated(&content)?;
                    for alias in &list {
                        check_name(alias, "an alias")?;
                    }
                    args.aliases = list.into_iter().collect();
                }
                "callback" => {
                    let path: Path = meta.value()?.parse()?;
                    if path.segments.iter().any(|s| !s.arguments.is_none()) {
                        return Err(syn::Error::new_spanned(
                            path,
                            "the callback is the path of a `#[ipcbus::service]` trait, without generics",
                        ));
                    }
                    args.callback = Some(path);
                }
                _ => {
                    return Err(meta.error(
                        "unknown argument: expected `name = \"..\"`, `version = N`, \
                         `aliases = [\"..\", ..]` or `callback = Trait`",
                    ))
                }
            }
            seen.push(key);
            Ok(())
        });
        syn::parse::Parser::parse2(parser, tokens)?;
        Ok(args)
    }
}

/// A contract name or alias: not empty (the empty name is the untyped contract), at
/// most 255 bytes.
fn check_name(lit: &LitStr, what: &str) -> syn::Result<()> {
    let s = lit.value();
    if s.is_empty() {
        return Err(syn::Error::new(
            lit.span(),
            format!("{what} cannot be empty (the empty name is the untyped contract)"),
        ));
    }
    if s.len() > MAX_NAME {
        return Err(syn::Error::new(
            lit.span(),
            format!("{what} is longer than {MAX_NAME} bytes"),
        ));
    }
    Ok(())
}

/// A string literal with `value`, for names that come from identifiers.
pub(crate) fn lit(value: &str) -> LitStr {
    LitStr::new(value, Span::call_site())
}
