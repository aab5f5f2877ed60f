//! ipcbus: a publish/subscribe event bus for processes on one machine and on a LAN.
//!
//! A [`Receiver`] binds a TCP port (and a Unix socket on its host) and registers a
//! [`Handle`] (a topic name); a [`Sender`] created with the same handle discovers every
//! receiver registered for it and fans each event out to all of them, exactly once per
//! receiver and in order, and reports per event which receivers acknowledged and which
//! failed.
//!
//! Modules:
//! - the crate `ipcbus-proto` (a dependency, not re-exported whole): the I/O-free core
//!   of wire protocol v1 — frame types, the codec, key derivation and sealing,
//!   compression, the handshake state machines, the per-connection session checks,
//!   EPM messages, registry records, endpoints. No sockets, no clocks. The types
//!   applications use ([`Handle`], [`Key`], [`Endpoint`], [`Record`], ...) are
//!   re-exported here.
//! - [`call`]: calls (request/reply): [`Client`], [`Server`], [`Request`], the
//!   [`Caller`] and [`Service`] traits typed services are built on, [`Peer`] for calls
//!   back into a caller.
//! - `transport`: the byte streams the protocol runs over (TCP, Unix domain sockets).
//! - `framing`: the `tokio_util` decoder adapter over the core's v1 codec.
//! - `handshake`: the async driver of the core's handshake state machines.
//! - [`registry`]: records filled in for this process, and the local-user registry
//!   directory.
//! - [`epm`]: the client of the endpoint manager service (registrations with
//!   leases, watches, reconnects).
//! - [`etcd`]: discovery in etcd (records under leases kept alive, watches resumed
//!   from the last revision seen).
//! - `sender` / `receiver`: the async layer — connections, writer tasks, discovery.
//! - `stats`: [`SenderStats`] and [`ReceiverStats`], the counters of
//!   [`Sender::stats`] and [`Receiver::stats`], with the reason kinds they count by.
//! - `etcd::store` (with `internals`): what `epm-service --store etcd://...` uses to
//!   keep its registrations in etcd and follow everyone else's.
//! - `gate`: admission of half-open connections (oldest evicted when full), shared by
//!   receivers and the endpoint manager (which reaches it, and the EPM link, through
//!   the `internals` feature).
//!
//! A receiver acknowledges an event when the application takes it, so in one task:
//! publish, take, then await the report.
//!
//! ```
//! use ipcbus::{Handle, Receiver, Sender};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let handle: Handle = "docs.greetings".parse()?;
//! let mut rx = Receiver::builder(handle.clone()).bind().await?;
//! let mut tx = Sender::builder(handle).build().await?;
//! let pending = tx.publish_bytes("hello").await?;
//! let msg = rx.recv().await.expect("an event");
//! assert_eq!(&msg.payload()[..], b"hello");
//! let report = pending.await;
//! assert_eq!(report.acked.len(), 1);
//! # Ok(()) }
//! ```
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod call;
mod chain;
mod credentials;
mod discovery;
pub mod epm;
pub mod etcd;
mod framing;
#[cfg_attr(not(feature = "internals"), allow(unreachable_pub, dead_code))]
mod gate;
mod handshake;
mod message;
mod pool;
mod receiver;
pub mod registry;
mod report;
mod security;
mod sender;
mod service;
mod stats;
#[cfg_attr(not(feature = "internals"), allow(unreachable_pub))]
mod transport;

pub use call::{
    Call, CallAll, CallError, Caller, Client, ClientBuilder, Contract, Gathered, Incoming, Peer,
    RemoteCode, RemoteError, Reply, Request, Server, ServerBuilder, ServerInfo, Service,
    ServiceError,
};
pub use chain::error_chain;
pub use credentials::{Credentials, CredentialsBuilder, CredentialsError};
pub use discovery::{Discovery, DiscoveryError};
pub use epm::{Epm, EpmAddrError, EpmBuilder, EpmClient, EpmError};
pub use etcd::{Etcd, EtcdAddrError, EtcdBuilder, EtcdError, EtcdRegistration};
pub use handshake::HandshakeError;
pub use ipcbus_proto::{
    parse_salt, DecodeError, Handle, HandleError, Key, KeyError, ReceiverId, RejectReason, Role,
    SaltError, SenderId,
};
pub use message::{Message, PayloadError};
pub use receiver::{BindError, Receiver, ReceiverBuilder};
pub use registry::{LocalRegistry, Record, RegistryError};
pub use report::{FailReason, ReceiverInfo, SendReport, SenderEvent};
pub use security::Security;
pub use sender::{BuildError, PendingReport, SendError, Sender, SenderBuilder};
pub use sender::{Compression, CompressionStats, SenderEvents};
pub use stats::{ByKind, FailKind, ReasonKind, ReceiverStats, RejectKind, SenderStats};
pub use transport::{Endpoint, EndpointError, Transport, UnixBindError, MAX_UNIX_PATH};

/// Typed services: a trait of `async fn`s becomes a client with the same methods
/// (`CalcClient`) and a server adapter for any implementation (`CalcServer`), calls
/// under a contract (name, version, aliases). A method's `Err(e)` arrives on the
/// client as `ServiceError::App(e)`.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::time::Duration;
///
/// use ipcbus::{Handle, Server, ServiceError};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, thiserror::Error, Serialize, Deserialize)]
/// pub enum CalcError {
///     #[error("overflow")]
///     Overflow,
/// }
///
/// /// Arithmetic in another process.
/// #[ipcbus::service(version = 2, aliases = ["calc.v1"])]
/// pub trait Calc {
///     /// `a + b`.
///     async fn add(&self, a: i64, b: i64) -> Result<i64, CalcError>;
///     /// How many additions this server made.
///     async fn count(&self) -> u64;
/// }
///
/// #[derive(Default)]
/// struct MyCalc {
///     count: AtomicU64,
/// }
///
/// impl Calc for MyCalc {
///     async fn add(&self, a: i64, b: i64) -> Result<i64, CalcError> {
///         self.count.fetch_add(1, Ordering::Relaxed);
///         a.checked_add(b).ok_or(CalcError::Overflow)
///     }
///
///     async fn count(&self) -> u64 {
///         self.count.load(Ordering::Relaxed)
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let handle: Handle = "docs.calc".parse()?;
/// let _server = Server::builder(handle.clone())
///     .service(CalcServer::new(MyCalc::default()))
///     .bind()
///     .await?;
///
/// let calc = CalcClient::connect(handle).await?;
/// calc.caller().wait_for_servers(1, Duration::from_secs(5)).await;
/// assert_eq!(calc.add(2, 3).await?, 5);
/// match calc.add(i64::MAX, 1).await {
///     Err(ServiceError::App(CalcError::Overflow)) => {}
///     other => panic!("{other:?}"),
/// }
/// assert_eq!(calc.count().await?, 2);
/// # Ok(()) }
/// ```
///
/// One implementation per connection (`service_factory`), and a callback trait the
/// server calls back into the client with:
///
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::time::Duration;
///
/// use ipcbus::{Handle, Peer, Server};
///
/// /// What a job reports to the client that started it.
/// #[ipcbus::service]
/// pub trait Progress {
///     async fn step(&self, done: u32, of: u32);
/// }
///
/// #[ipcbus::service(callback = Progress)]
/// pub trait Jobs {
///     /// Runs a job of `steps` steps; returns how many jobs this connection ran.
///     async fn run(&self, steps: u32) -> u32;
/// }
///
/// /// One per connection: the calls of one client.
/// struct Session {
///     peer: Peer,
///     runs: AtomicU32,
/// }
///
/// impl Jobs for Session {
///     async fn run(&self, steps: u32) -> u32 {
///         let progress = jobs_callback(&self.peer); // a ProgressClient<Peer>
///         for done in 1..=steps {
///             if progress.step(done, steps).await.is_err() {
///                 break; // the client is gone
///             }
///         }
///         self.runs.fetch_add(1, Ordering::Relaxed) + 1
///     }
/// }
///
/// struct Printer;
///
/// impl Progress for Printer {
///     async fn step(&self, done: u32, of: u32) {
///         println!("{done}/{of}");
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let handle: Handle = "docs.jobs".parse()?;
/// let _server = Server::builder(handle.clone())
///     .service_factory(|peer| {
///         JobsServer::new(Session {
///             peer: peer.clone(),
///             runs: AtomicU32::new(0),
///         })
///     })
///     .bind()
///     .await?;
///
/// let jobs = JobsClient::connect_with_callback(handle, Printer).await?;
/// jobs.caller().wait_for_servers(1, Duration::from_secs(5)).await;
/// assert_eq!(jobs.run(3).await?, 1);
/// assert_eq!(jobs.run(2).await?, 2);
/// # Ok(()) }
/// ```
pub use ipcbus_macros::service;

/// What the code `#[service]` generates refers to. Not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::service::{
        call, decode_args, fallible, infallible, ready, reply, reply_fallible,
    };
    pub use bytes::Bytes;
    pub use futures::future::{BoxFuture, FutureExt};
    pub use postcard;
    pub use serde;
}

/// What `epm-service` shares with this crate's receivers and EPM client: the admission
/// of half-open connections and the framed, sealed EPM link. Not part of the API
/// applications use (no stability promise); present only with the `internals`
/// feature, which `epm-service` turns on.
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod internals {
    pub use crate::epm::link;
    /// etcd as the EPM's store (`epm-service --store etcd://...`).
    pub mod etcd_store {
        pub use crate::etcd::store::{watch_store, StoreEvent, StoreWriter};
    }
    pub use crate::gate::{Acceptor, HandshakeGate, HandshakeSlot, Incoming};
    pub use crate::transport::{ByteStream, Listener, Peer};
}

/// The Rust blocks of `README.md`, compiled and run as doc tests so that the README
/// and the code cannot drift apart.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
