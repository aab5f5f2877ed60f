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
