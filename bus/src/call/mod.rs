//! Calls: request/reply between processes, untyped ([`Client`], [`Server`],
//! [`Request`]) and typed (the [`Service`] and [`Caller`] traits that
//! `#[ipcbus::service]` implements).
//!
//! A [`Server`] binds like a [`Receiver`](crate::Receiver) (TCP, and a Unix socket on
//! its host) and registers its handle with the role "server"; a [`Client`] discovers
//! the servers of its handle and sends each call to one of them (least outstanding
//! calls, then round robin), many in flight on one connection, matched by id, or to
//! all of them ([`Client::call_all`]). The connection is the same as events use:
//! handshake, keys, sealing, compression, transports and discovery. Either end may
//! call the other: the server reaches its caller through the [`Peer`] of a request.
//!
//! By concern:
//! - this module: the public types shared by both ends ([`Contract`], [`Request`],
//!   [`Reply`], [`Call`], the errors) and the traits;
//! - `pending`: the I/O-free table of calls in flight on one connection;
//! - `conn`: one connection after its handshake, the same at both ends (reader and
//!   writer tasks, routing of `Request`, `Reply` and `Cancel`);
//! - `client`: [`Client`] (discovery of servers, choice, reconnects);
//! - `server`: [`Server`] (binding, registering, accepting);
//! - `peer`: [`Peer`], the other end of one connection.

mod client;
mod conn;
mod peer;
mod pending;
mod server;

use std::fmt;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;

use ipcbus_proto::call::{self as wire, Code, ContractDetail, Fault};
use ipcbus_proto::handle::Handle;
use ipcbus_proto::ids::ReceiverId;

use crate::transport::Endpoint;
use crate::PayloadError;

pub use client::{Client, ClientBuilder, Incoming};
pub use peer::Peer;
pub use server::{Server, ServerBuilder};

use conn::{CallFail, Permits};

/// A call's timeout when none is set.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

tokio::task_local! {
    /// The peer of the request a task is serving (see [`Peer::current`]).
    static CURRENT_PEER: Peer;
}

pub use ipcbus_proto::call::Code as RemoteCode;

/// The name and version of a service's interface, and the older names it still
/// answers to.
///
/// A request carries its caller's contract name and version; a server accepts it when
/// the name is its name and the version its version, or when the name is one of its
/// aliases (any version: the alias stands for the clients built before a rename). An
/// empty name (an untyped call) is accepted by every server. Anything else is answered
/// with a contract mismatch naming both sides.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Contract {
    name: Arc<str>,
    version: u16,
    aliases: Arc<[Arc<str>]>,
}

impl Contract {
    /// A contract named `name` (at most 255 bytes), at `version`.
    ///
    /// # Panics
    /// If `name` is longer than 255 bytes: names are fixed in code, so this is a
    /// programming error.
    pub fn new(name: impl Into<Arc<str>>, version: u16) -> Contract {
        let name = name.into();
        assert!(
            name.len() <= ipcbus_proto::call::MAX_NAME,
            "contract name longer than 255 bytes"
        );
        Contract {
            name,
            version,
            aliases: Arc::new([]),
        }
    }

    /// The contract of untyped calls: empty name, version 0; every server accepts it.
    pub fn untyped() -> Contract {
        Contract::new("", 0)
    }

    /// The same contract, also answering to `aliases` (old names of a renamed
    /// contract).
    pub fn with_aliases<A: Into<Arc<str>>>(self, aliases: impl IntoIterator<Item = A>) -> Contract {
        Contract {
            aliases: aliases.into_iter().map(Into::into).collect(),
            ..self
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its version.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Its aliases.
    pub fn aliases(&self) -> impl Iterator<Item = &str> {
        self.aliases.iter().map(|a| &**a)
    }

    /// Whether a server of this contract accepts a request for `name` at `version`.
    pub fn accepts(&self, name: &str, version: u16) -> bool {
        name.is_empty()
            || (name == &*self.name && version == self.version)
            || self.aliases.iter().any(|a| &**a == name)
    }
}

impl fmt::Debug for Contract {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Contract {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.is_empty() {
            f.write_str("(untyped)")
        } else {
            write!(f, "{} v{}", self.name, self.version)
        }
    }
}

/// An error the remote side answered with: a code, a message for people, and a
/// detail the code defines (for [`RemoteCode::Application`], the service's own error
/// value, postcard-encoded by typed services).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.name())]
pub struct RemoteError {
    /// What kind of failure.
    pub code: RemoteCode,
    /// A message for people.
    pub message: String,
    /// Bytes the code gives a meaning to; may be empty.
    pub detail: Bytes,
}

impl RemoteError {
    /// An application error with a message and no detail (what `ipcbus serve` answers
    /// for a failing command, with its stderr).
    pub fn new(message: impl Into<String>) -> RemoteError {
        RemoteError {
            code: Code::Application,
            message: message.into(),
            detail: Bytes::new(),
        }
    }

    /// An application error carrying `value` (postcard) as its detail, and `message`.
    ///
    /// # Errors
    /// [`PayloadError`] when `value` does not serialize.
    pub fn with_detail<E: Serialize + ?Sized>(
        message: impl Into<String>,
        value: &E,
    ) -> Result<RemoteError, PayloadError> {
        let detail = postcard::to_allocvec(value).map_err(PayloadError::from)?;
        Ok(RemoteError {
            code: Code::Application,
            message: message.into(),
            detail: Bytes::from(detail),
        })
    }

    /// Decodes the detail of an application error as an `E` (postcard).
    ///
    /// # Errors
    /// [`PayloadError`] when the detail is not an `E`.
    pub fn decode_detail<E: DeserializeOwned>(&self) -> Result<E, PayloadError> {
        Ok(postcard::from_bytes(&self.detail)?)
    }

    /// The answer to a call of a method the contract does not have: a contract
    /// mismatch naming `contract` as the server's.
    pub fn unknown_method(contract: &Contract, method: &str) -> RemoteError {
        RemoteError {
            code: Code::ContractMismatch,
            message: format!("{contract} has no method {method:?}"),
            detail: ContractDetail {
                contract: contract.name().to_owned(),
                version: contract.version(),
            }
            .to_bytes(),
        }
    }

    /// The answer to a request whose arguments do not decode.
    pub fn bad_request(err: impl fmt::Display) -> RemoteError {
        RemoteError {
            code: Code::BadRequest,
            message: format!("the arguments do not decode: {err}"),
            detail: Bytes::new(),
        }
    }
}

/// What a caller makes of a remote fault: `Busy` and a contract mismatch are errors
/// of their own, the rest a [`RemoteError`].
pub(crate) fn fault_to_error(ours: &Contract, f: Fault) -> CallError {
    match f.code {
        Code::Busy => CallError::Busy,
        Code::ContractMismatch | Code::UnknownMethod => {
            let theirs = match ContractDetail::parse(&f.detail) {
                Ok(d) => Contract::new(d.contract, d.version).to_string(),
                Err(_) => "(unknown)".to_owned(),
            };
            CallError::ContractMismatch {
                ours: ours.to_string(),
                theirs,
                message: f.message,
            }
        }
        code => CallError::Remote(RemoteError {
            code,
            message: f.message,
            detail: f.detail,
        }),
    }
}

/// Why a call failed. Each variant says whether the call ran.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// No reply within the call's timeout. The call may or may not have run; a reply
    /// that arrives later is dropped.
    #[error("call timed out after {0:?} (it may or may not have run)")]
    Timeout(Duration),
    /// No server is registered for the handle (answered at once, without waiting).
    #[error("no servers registered for handle {0:?}")]
    NoServers(Handle),
    /// The server answered with an error (the handler's own, a panic, bad arguments).
    #[error("remote error: {0}")]
    Remote(RemoteError),
    /// The server serves another contract or version, or has no such method. The call
    /// did not run.
    #[error("contract mismatch: called {ours}, the server serves {theirs}{}", if message.is_empty() { String::new() } else { format!(" ({message})") })]
    ContractMismatch {
        /// The caller's contract name and version, as `name vN`.
        ours: String,
        /// The server's, as `name vN`.
        theirs: String,
        /// The server's explanation (e.g. the unknown method).
        message: String,
    },
    /// The connection broke with the call in flight: it may or may not have run.
    #[error("disconnected: {0} (the call may or may not have run)")]
    Disconnected(String),
    /// The call was not sent, so it did not run: the server could not be reached
    /// (the connect or the handshake failed or timed out, or its connection is down
    /// and not yet reopened), or it refused the connection (authentication failed,
    /// wrong handle).
    #[error("refused: {0} (the call did not run)")]
    Refused(String),
    /// The server is at its concurrency limit; the call did not run.
    #[error("server busy: at its limit of concurrent calls (the call did not run)")]
    Busy,
    /// The request did not serialize, or is larger than the maximum frame.
    #[error("request not sent: {0}")]
    Encode(String),
    /// The reply did not decode as the type asked for.
    #[error("reply does not decode: {0}")]
    Decode(String),
    /// The client (or the peer's connection) is closed.
    #[error("closed")]
    Closed,
}

/// A typed error of a service method, or the failure of the call that carried it.
#[derive(Debug)]
pub enum ServiceError<E> {
    /// The method ran and returned this error.
    App(E),
    /// The call failed (see [`CallError`]).
    Call(CallError),
}

impl<E: fmt::Display> fmt::Display for ServiceError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceError::App(e) => write!(f, "{e}"),
            ServiceError::Call(e) => write!(f, "{e}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for ServiceError<E> {}

impl<E> From<CallError> for ServiceError<E> {
    fn from(e: CallError) -> Self {
        ServiceError::Call(e)
    }
}

/// What can make calls: a [`Client`] (to a chosen server) or a [`Peer`] (back to one
/// caller). Typed clients generated by `#[ipcbus::service]` are generic over it.
pub trait Caller: Clone + Send + Sync + 'static {
    /// Sends one call of `method` under `contract` with `body` as its arguments and
    /// waits for the reply, at most `timeout` (`None`: the caller's default).
    /// Dropping the future cancels the call (a `Cancel` frame tells the server).
    fn call_raw(
        &self,
        contract: &Contract,
        method: &str,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> BoxFuture<'static, Result<Bytes, CallError>>;

    /// Sends a one-way call (a notification): no reply, no wait beyond queueing it.
    ///
    /// # Errors
    /// [`CallError::Closed`], [`CallError::NoServers`], [`CallError::Disconnected`],
    /// [`CallError::Encode`], [`CallError::Busy`] (the connection's queue is full).
    fn notify_raw(&self, contract: &Contract, method: &str, body: Bytes) -> Result<(), CallError>;
}

/// The server side of a contract: what `#[ipcbus::service]` generates for an
/// implementation of a service trait, and what a hand-written dispatcher implements.
pub trait Service: Send + Sync + 'static {
    /// The contract it serves (checked against each request before [`Service::call`]).
    fn contract(&self) -> Contract;

    /// Runs `method` with the encoded arguments `body`, for the caller `peer`.
    /// Unknown methods answer [`RemoteError::unknown_method`]; arguments that do not
    /// decode, [`RemoteError::bad_request`].
    fn call(
        &self,
        method: &str,
        body: Bytes,
        peer: Peer,
    ) -> BoxFuture<'static, Result<Bytes, RemoteError>>;
}

impl<S: Service + ?Sized> Service for Arc<S> {
    fn contract(&self) -> Contract {
        (**self).contract()
    }

    fn call(
        &self,
        method: &str,
        body: Bytes,
        peer: Peer,
    ) -> BoxFuture<'static, Result<Bytes, RemoteError>> {
        (**self).call(method, body, peer)
    }
}

/// One server as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerInfo {
    /// The id it registered with (for a server given by endpoint, one derived from
    /// the endpoint).
    pub id: ReceiverId,
    /// Where it is reached (the Unix socket on its host, else TCP).
    pub endpoint: Endpoint,
}

/// One call in preparation: set a timeout, a method or a contract, then `.await` it.
///
/// # Errors
/// `.await` gives a [`CallError`]: [`CallError::NoServers`] at once when the handle
/// has no server, [`CallError::Timeout`] past the timeout, [`CallError::Remote`] for
/// the server's error, [`CallError::Refused`] when the call could not be sent
/// (server unreachable, authentication failed), [`CallError::Disconnected`] when the
/// connection broke with it in flight, [`CallError::ContractMismatch`],
/// [`CallError::Busy`], [`CallError::Encode`] and [`CallError::Closed`]; each says
/// whether the call ran.
///
/// # Cancel safety
/// Dropping the future (for instance in a `tokio::select!` branch that loses) cancels
/// the call: it is forgotten, the server is sent a `Cancel` (its handler is stopped
/// if still running), and a reply arriving later is dropped. The call is never sent
/// again.
#[must_use = "a call does nothing until awaited"]
pub struct Call {
    target: CallTarget,
    body: Result<Bytes, CallError>,
    method: String,
    contract: Option<Contract>,
    timeout: Option<Duration>,
}

enum CallTarget {
    Client(Client),
    Peer(Peer),
}

impl Call {
    fn new(target: CallTarget, body: Result<Bytes, CallError>) -> Call {
        Call {
            target,
            body,
            method: String::new(),
            contract: None,
            timeout: None,
        }
    }

    /// This call's timeout (default: the client's, 30 s unless set).
    pub fn timeout(self, d: Duration) -> Call {
        Call {
            timeout: Some(d),
            ..self
        }
    }

    /// The method to call (default: empty, for servers that take any request).
    pub fn method(self, name: &str) -> Call {
        Call {
            method: name.to_owned(),
            ..self
        }
    }

    /// The contract to call under (default: the client's, untyped unless set).
    pub fn contract(self, contract: Contract) -> Call {
        Call {
            contract: Some(contract),
            ..self
        }
    }
}

impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("method", &self.method)
            .field("contract", &self.contract)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl IntoFuture for Call {
    type Output = Result<Reply, CallError>;
    type IntoFuture = BoxFuture<'static, Result<Reply, CallError>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let body = self.body?;
            match self.target {
                CallTarget::Client(c) => {
                    let contract = self.contract.unwrap_or_else(|| c.default_contract());
                    c.call_one(&contract, &self.method, body, self.timeout)
                        .await
                }
                CallTarget::Peer(p) => {
                    let contract = self.contract.unwrap_or_else(Contract::untyped);
                    let timeout = self.timeout.unwrap_or(DEFAULT_TIMEOUT);
                    p.conn
                        .call(&contract, &self.method, body, timeout)
                        .await
                        .map(|body| Reply { body, server: None })
                        .map_err(CallFail::into_error)
                }
            }
        })
    }
}

/// A call to every server at once, gathered within the deadline: `.await` gives one
/// [`Gathered`] per server that was registered when the call started.
///
/// # Errors
/// [`CallError::NoServers`] at once when the handle has no server, and
/// [`CallError::Encode`] for a request that does not serialize; every other failure
/// is one server's, in its [`Gathered::result`].
///
/// # Cancel safety
/// Dropping the future cancels the calls still waiting, as for [`Call`].
#[must_use = "a call does nothing until awaited"]
pub struct CallAll {
    client: Client,
    body: Result<Bytes, CallError>,
    method: String,
    timeout: Option<Duration>,
}

impl CallAll {
    /// The deadline for all the replies (default: the client's timeout).
    pub fn timeout(self, d: Duration) -> CallAll {
        CallAll {
            timeout: Some(d),
            ..self
        }
    }

    /// The method to call.
    pub fn method(self, name: &str) -> CallAll {
        CallAll {
            method: name.to_owned(),
            ..self
        }
    }
}

impl fmt::Debug for CallAll {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallAll")
            .field("method", &self.method)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl IntoFuture for CallAll {
    /// Every server's outcome, in the order the servers registered; `NoServers` when
    /// there is none.
    type Output = Result<Vec<Gathered>, CallError>;
    type IntoFuture = BoxFuture<'static, Result<Vec<Gathered>, CallError>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let body = self.body?;
            self.client
                .call_every(&self.method, body, self.timeout)
                .await
        })
    }
}

/// One server's outcome of a [`Client::call_all`].
#[derive(Debug)]
pub struct Gathered {
    /// The server.
    pub server: ServerInfo,
    /// Its reply, or why there is none.
    pub result: Result<Reply, CallError>,
}

/// The reply to a call.
#[derive(Debug, Clone)]
pub struct Reply {
    body: Bytes,
    server: Option<ServerInfo>,
}

impl Reply {
    /// The reply bytes.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Takes the reply bytes.
    pub fn into_body(self) -> Bytes {
        self.body
    }

    /// Decodes a reply sent with [`Request::reply`] (postcard).
    ///
    /// # Errors
    /// [`CallError::Decode`] when the bytes are not a `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CallError> {
        postcard::from_bytes(&self.body).map_err(|e| CallError::Decode(e.to_string()))
    }

    /// The server that answered (`None` for a reply from a client to a callback).
    pub fn server(&self) -> Option<&ServerInfo> {
        self.server.as_ref()
    }
}

/// One incoming call, on a server (or on a client, for a call back from its server).
/// Answer it with [`Request::reply`], [`Request::reply_bytes`] or
/// [`Request::reply_err`]; one dropped without an answer is answered
/// [`RemoteCode::NoReply`] (or [`RemoteCode::Panicked`] when dropped by a panic).
pub struct Request {
    wire: wire::Request,
    peer: Peer,
    received: Instant,
    answered: bool,
    /// Set when the handler holding it panicked (see `server::CatchPanic`).
    panicked: Option<Arc<AtomicBool>>,
    _permits: Option<Permits>,
}

impl Request {
    pub(crate) fn new(wire: wire::Request, peer: Peer, permits: Permits) -> Request {
        Request {
            wire,
            peer,
            received: Instant::now(),
            answered: false,
            panicked: None,
            _permits: Some(permits),
        }
    }

    /// Marks it answered without answering (a dropped notification).
    pub(crate) fn mark_answered(&mut self) {
        self.answered = true;
    }

    /// Whether its caller has given up by now.
    pub(crate) fn expired(&self) -> bool {
        conn::deadline_of(&self.wire, self.received).is_some_and(|d| d <= Instant::now())
    }

    pub(crate) fn answer(&mut self, outcome: Result<Bytes, RemoteError>) -> Result<(), CallError> {
        self.answered = true;
        if self.wire.one_way() {
            return Ok(());
        }
        self.peer.conn.reply(self.wire.id, outcome)
    }

    /// The argument bytes.
    pub fn body(&self) -> &Bytes {
        &self.wire.body
    }

    /// Decodes the arguments (postcard, as [`Client::call`] encodes them).
    ///
    /// # Errors
    /// [`PayloadError`] when they are not a `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, PayloadError> {
        Ok(postcard::from_bytes(&self.wire.body)?)
    }

    /// The method called (empty for untyped calls).
    pub fn method(&self) -> &str {
        &self.wire.method
    }

    /// The caller's contract (untyped: empty name).
    pub fn contract(&self) -> (&str, u16) {
        (&self.wire.contract, self.wire.version)
    }

    /// Whether the caller expects no reply (a notification).
    pub fn is_one_way(&self) -> bool {
        self.wire.one_way()
    }

    /// The time left before the caller gives up, as of now (`None`: no deadline).
    pub fn time_left(&self) -> Option<Duration> {
        conn::deadline_of(&self.wire, self.received)
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// The caller, which can be called back while its connection lives.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Answers with `value` (postcard).
    ///
    /// # Errors
    /// [`CallError::Encode`]; [`CallError::Disconnected`] when the caller is gone (it
    /// sees the call as disconnected or timed out).
    pub fn reply<T: Serialize + ?Sized>(self, value: &T) -> Result<(), CallError> {
        let body = postcard::to_allocvec(value).map_err(|e| CallError::Encode(e.to_string()))?;
        self.reply_bytes(body)
    }

    /// Answers with raw bytes.
    ///
    /// # Errors
    /// As [`Request::reply`].
    pub fn reply_bytes(mut self, body: impl Into<Bytes>) -> Result<(), CallError> {
        self.answer(Ok(body.into()))
    }

    /// Answers with an error.
    ///
    /// # Errors
    /// As [`Request::reply`].
    pub fn reply_err(mut self, err: RemoteError) -> Result<(), CallError> {
        self.answer(Err(err))
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let panicked = std::thread::panicking()
            || self
                .panicked
                .as_ref()
                .is_some_and(|p| p.load(Ordering::Acquire));
        let err = if panicked {
            conn::panicked()
        } else {
            RemoteError {
                code: Code::NoReply,
                message: "the handler finished without replying".into(),
                detail: Bytes::new(),
            }
        };
        let _ = self.answer(Err(err));
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("id", &self.wire.id)
            .field("contract", &self.wire.contract)
            .field("version", &self.wire.version)
            .field("method", &self.wire.method)
            .field("len", &self.wire.body.len())
            .field("one_way", &self.wire.one_way())
            .finish_non_exhaustive()
    }
}

fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, CallError> {
    postcard::to_allocvec(value)
        .map(Bytes::from)
        .map_err(|e| CallError::Encode(e.to_string()))
}
