//! `#[ipcbus::service]`: typed clients and servers for ipcbus calls.
//!
//! Use it through the `ipcbus` crate, which re-exports it (`#[ipcbus::service]`); the
//! generated code refers to `::ipcbus`, so a crate using it depends on `ipcbus` under
//! that name. The attribute is documented at [`macro@service`]; the `ipcbus` crate's
//! `service` has a complete client and server.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Serialize, Deserialize)]
//! pub enum CalcError {
//!     Overflow,
//! }
//!
//! /// Arithmetic in another process.
//! #[ipcbus::service(version = 2, aliases = ["calc.v1"])]
//! pub trait Calc {
//!     /// `a + b`.
//!     async fn add(&self, a: i64, b: i64) -> Result<i64, CalcError>;
//! }
//!
//! struct Adder;
//!
//! impl Calc for Adder {
//!     async fn add(&self, a: i64, b: i64) -> Result<i64, CalcError> {
//!         a.checked_add(b).ok_or(CalcError::Overflow)
//!     }
//! }
//!
//! let contract = CalcClient::<ipcbus::Client>::contract();
//! // The default name is the trait's path where it is defined (`crate::module::Calc`).
//! assert!(contract.name().ends_with("::Calc"), "{}", contract.name());
//! assert_eq!(contract.version(), 2);
//! assert!(contract.accepts("calc.v1", 1));
//! let _server = CalcServer::new(Adder); // give it to ServerBuilder::service
//! ```
#![warn(missing_docs, unreachable_pub)]

use proc_macro::TokenStream;

mod args;
mod expand;
mod model;

/// Turns a trait of `async fn`s into a service: the trait (implemented by the
/// server), a typed client `<Trait>Client`, and a server adapter `<Trait>Server`.
///
/// ```text
/// #[ipcbus::service(name = "calc", version = 2, aliases = ["calc.v1"], callback = CalcEvents)]
/// pub trait Calc {
///     async fn add(&self, a: i64, b: i64) -> Result<i64, CalcError>;
///     async fn ping(&self);
/// }
/// ```
///
/// # Arguments (all optional)
/// - `name = "calc"`: the contract name (at most 255 bytes). Default: the trait's path
///   where it is defined, `module_path!()` then `::Calc` (for a trait `Calc` in module
///   `calc` of crate `my_app`, `"my_app::calc::Calc"`), so client and server agree when
///   both use the trait from one crate; a moved or renamed trait changes contract: keep
///   the old name with `name` or `aliases`. Set `name` for a contract other programs
///   (another language, `ipcbus call`) name.
/// - `version = 2`: the contract version (`u16`, default 1). A server answers only
///   calls of its name at its version, or of one of its aliases at any version.
/// - `aliases = ["calc.v1", ..]`: older names the server still answers to.
/// - `callback = CalcEvents`: a service trait (itself under `#[ipcbus::service]`) that
///   the server calls back into its clients with; see below.
///
/// # The trait
/// Each method is an `async fn` taking `&self` and arguments by name whose types are
/// owned serde types (`Serialize + DeserializeOwned + Send + 'static`; `String`, not
/// `&str`), and returns a serde type or `Result<T, E>` (written so: the last path
/// segment `Result` with two type arguments) with `E: Serialize + DeserializeOwned +
/// Debug + Send + 'static`. No generics, no `impl Trait`, no patterns. The trait is
/// emitted with the supertraits `Send + Sync + 'static` and each method as `fn m(&self,
/// ..) -> impl Future<Output = R> + Send`, so that one implementation serves calls
/// from many tasks; implementations still write `async fn` (their futures must be
/// `Send`). Docs and attributes stay. A default body is allowed.
///
/// # `CalcClient<C: Caller = Client>`
/// - `CalcClient::connect(handle).await?`: an `ipcbus::Client` of the handle with this
///   contract; `CalcClient::builder(handle)` gives its `ClientBuilder` to configure
///   (wrap the built client with `CalcClient::new`); `connect_with_callback(handle,
///   events)` (with `callback`) serves the server's calls back with `events`.
/// - `CalcClient::new(caller)` over any `Caller`: a `Client`, or a `Peer` to call back
///   into a client; `caller()`, `into_caller()`, `contract()`, and `with_timeout(d)`
///   for a timeout of each call (default: the caller's).
/// - each method of the trait, with the same arguments, returning a `Send + 'static`
///   future (it does not borrow the client) of `Result<T, ServiceError<E>>` for a
///   method returning `Result<T, E>` (`ServiceError::App(e)`: the method returned
///   `Err(e)`; `ServiceError::Call(..)`: the call failed), else `Result<T, CallError>`.
///   Dropping the future cancels the call.
///
/// The method names `new`, `caller`, `into_caller`, `contract`, `with_timeout`,
/// `timeout`, `builder`, `connect` and `connect_with_callback` are taken by the client
/// and refused in a service trait.
///
/// # `CalcServer<T: Calc>`
/// An `ipcbus::Service` holding the implementation in an `Arc` (`CalcServer::new(imp)`,
/// `CalcServer::from_arc(arc)`): give it to `ServerBuilder::service`, or make one per
/// connection with `ServerBuilder::service_factory(|peer| CalcServer::new(MyCalc::new(peer.clone())))`
/// (the instance lives as long as the connection). It dispatches on the method name;
/// arguments that do not decode are answered `RemoteError::bad_request` (the client
/// sees `CallError::Remote` with code `BadRequest`), an unknown method
/// `RemoteError::unknown_method` (the client sees `CallError::ContractMismatch`). A
/// panicking method is answered by the runtime as `RemoteCode::Panicked` and the
/// server goes on. `CalcServer::dispatch(method, body)` runs a call without a
/// connection (in-process, tests); `implementation()` is the `Arc` it holds.
///
/// # Callbacks
/// With `callback = CalcEvents`, `CalcEvents` is another `#[ipcbus::service]` trait
/// (so `CalcEventsClient` and `CalcEventsServer` exist). The client serves it
/// (`CalcClient::connect_with_callback(handle, my_events)`); inside a `Calc` method the
/// server reaches the client that called with `calc_callback(&peer)` (a function named
/// after the service trait, `<trait in snake case>_callback`), a
/// `CalcEventsClient<Peer>`, where `peer` is `Peer::current()` (the caller of the
/// call being served) or the peer a `service_factory` instance was made for. Every
/// callback method is a call with a reply, also those returning `()` (none is sent as
/// a one-way notification: the server learns that the client took it), valid while
/// the connection lives; once it is gone, callback calls fail with a `CallError`.
/// Without a callback service the client gets the server's calls on
/// `Client::incoming` (untyped).
///
/// # On the wire
/// The request's contract is the name and version above, its method the method's
/// name as written (`r#type` is `type`). The body is the postcard tuple of the
/// arguments in order (one argument: the value itself; none: empty), so an untyped
/// client can call a typed server: `client.call(&(1i64, 2i64)).method("add")` under
/// the contract. The reply is postcard `T`; a method's `Err(e)` is a remote error of
/// code `Application` with the message `format!("{e:?}")` and the detail postcard `e`
/// (a detail that does not decode as `E` fails the call with `CallError::Decode`).
/// Bytes left over after the arguments or the reply are an error.
///
/// # Errors at compile time
/// A method that is not `async`, has no `&self`, has generics or lifetimes, takes
/// `impl Trait` or a reference, or names an argument with a pattern; other items than
/// methods; generics on the trait; unknown or repeated arguments of the attribute.
#[proc_macro_attribute]
pub fn service(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item: syn::ItemTrait = match syn::parse(item) {
        Ok(item) => item,
        Err(e) => return e.to_compile_error().into(),
    };
    let args = args::Args::parse(attr.into());
    let service = model::Service::parse(item.clone());
    match (args, service) {
        (Ok(args), Ok(service)) => expand::expand(&args, &service).into(),
        // The trait as written, so that its uses do not add errors of their own.
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => with_errors(item, e),
        (Err(mut e), Err(e2)) => {
            e.combine(e2);
            with_errors(item, e)
        }
    }
}

/// `item` unchanged, followed by the compile errors `e`.
fn with_errors(item: syn::ItemTrait, e: syn::Error) -> TokenStream {
    let errors = e.to_compile_error();
    quote::quote!(#item #errors).into()
}
