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
//! STATUS: API skeleton; the bodies marked `todo!` are being built (issue 12).
#![allow(dead_code, unused_variables, clippy::todo)]

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::Stream;
use serde::de::DeserializeOwned;
use serde::Serialize;

use ipcbus_proto::call::Code;
use ipcbus_proto::handle::Handle;
use ipcbus_proto::ids::{ReceiverId, SenderId};

use crate::discovery::Discovery;
use crate::receiver::BindError;
use crate::security::Security;
use crate::sender::BuildError;
use crate::transport::{Endpoint, Transport};
use crate::PayloadError;

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
            detail: ipcbus_proto::call::ContractDetail {
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
    /// The server refused the connection (authentication failed, wrong handle) or
    /// the call (busy). The call did not run.
    #[error("refused: {0}")]
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
    /// [`CallError::Encode`].
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

/// The other end of one call connection: for a server, the client that called; for a
/// client, the server. Cheap to clone; valid while the connection lives.
#[derive(Clone)]
pub struct Peer {
    inner: Arc<()>,
}

impl Peer {
    /// The caller's id (from its handshake).
    pub fn id(&self) -> SenderId {
        todo!()
    }

    /// Whether the connection is still open.
    pub fn is_connected(&self) -> bool {
        todo!()
    }

    /// Resolves when the connection has closed.
    pub async fn closed(&self) {
        todo!()
    }

    /// Calls back into the other end (untyped): see [`Client::call`].
    pub fn call<T: Serialize + ?Sized>(&self, req: &T) -> Call {
        todo!()
    }

    /// Calls back with raw bytes.
    pub fn call_bytes(&self, body: impl Into<Bytes>) -> Call {
        todo!()
    }

    /// Sends the other end a one-way event (a notification on `method`, postcard
    /// `event`); it arrives on [`Client::incoming`] or the client's callback service.
    ///
    /// # Errors
    /// [`CallError::Disconnected`] once the connection is gone, [`CallError::Encode`].
    pub fn notify<T: Serialize + ?Sized>(&self, method: &str, event: &T) -> Result<(), CallError> {
        todo!()
    }

    /// The peer of the request being served by this task, inside a [`Service::call`]
    /// or a [`Server::serve`] handler; `None` elsewhere.
    pub fn current() -> Option<Peer> {
        todo!()
    }
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer").finish_non_exhaustive()
    }
}

impl Caller for Peer {
    fn call_raw(
        &self,
        contract: &Contract,
        method: &str,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> BoxFuture<'static, Result<Bytes, CallError>> {
        todo!()
    }

    fn notify_raw(&self, contract: &Contract, method: &str, body: Bytes) -> Result<(), CallError> {
        todo!()
    }
}

/// One call in preparation: set a timeout, a method or a contract, then `.await` it.
/// Dropping it after it was first polled cancels the call.
#[must_use = "a call does nothing until awaited"]
pub struct Call {
    inner: (),
}

impl Call {
    /// This call's timeout (default: the client's, 30 s unless set).
    pub fn timeout(self, d: Duration) -> Call {
        todo!()
    }

    /// The method to call (default: empty, for servers that take any request).
    pub fn method(self, name: &str) -> Call {
        todo!()
    }

    /// The contract to call under (default: the client's, untyped unless set).
    pub fn contract(self, contract: Contract) -> Call {
        todo!()
    }
}

impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call").finish_non_exhaustive()
    }
}

impl IntoFuture for Call {
    type Output = Result<Reply, CallError>;
    type IntoFuture = BoxFuture<'static, Result<Reply, CallError>>;

    fn into_future(self) -> Self::IntoFuture {
        todo!()
    }
}

/// A call to every server at once, gathered within the deadline: `.await` gives one
/// [`Gathered`] per server that was registered when the call started.
#[must_use = "a call does nothing until awaited"]
pub struct CallAll {
    inner: (),
}

impl CallAll {
    /// The deadline for all the replies (default: the client's timeout).
    pub fn timeout(self, d: Duration) -> CallAll {
        todo!()
    }

    /// The method to call.
    pub fn method(self, name: &str) -> CallAll {
        todo!()
    }
}

impl fmt::Debug for CallAll {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallAll").finish_non_exhaustive()
    }
}

impl IntoFuture for CallAll {
    /// Every server's outcome, in the order the servers registered; `NoServers` when
    /// there is none.
    type Output = Result<Vec<Gathered>, CallError>;
    type IntoFuture = BoxFuture<'static, Result<Vec<Gathered>, CallError>>;

    fn into_future(self) -> Self::IntoFuture {
        todo!()
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
    inner: (),
}

impl Request {
    /// The argument bytes.
    pub fn body(&self) -> &Bytes {
        todo!()
    }

    /// Decodes the arguments (postcard, as [`Client::call`] encodes them).
    ///
    /// # Errors
    /// [`PayloadError`] when they are not a `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, PayloadError> {
        todo!()
    }

    /// The method called (empty for untyped calls).
    pub fn method(&self) -> &str {
        todo!()
    }

    /// The caller's contract (untyped: empty name).
    pub fn contract(&self) -> (&str, u16) {
        todo!()
    }

    /// Whether the caller expects no reply (a notification).
    pub fn is_one_way(&self) -> bool {
        todo!()
    }

    /// The time left before the caller gives up, as of now (`None`: no deadline).
    pub fn time_left(&self) -> Option<Duration> {
        todo!()
    }

    /// The caller, which can be called back while its connection lives.
    pub fn peer(&self) -> &Peer {
        todo!()
    }

    /// Answers with `value` (postcard).
    ///
    /// # Errors
    /// [`CallError::Encode`]; [`CallError::Disconnected`] when the caller is gone (it
    /// sees the call as disconnected or timed out).
    pub fn reply<T: Serialize + ?Sized>(self, value: &T) -> Result<(), CallError> {
        todo!()
    }

    /// Answers with raw bytes.
    ///
    /// # Errors
    /// As [`Request::reply`].
    pub fn reply_bytes(self, body: impl Into<Bytes>) -> Result<(), CallError> {
        todo!()
    }

    /// Answers with an error.
    ///
    /// # Errors
    /// As [`Request::reply`].
    pub fn reply_err(self, err: RemoteError) -> Result<(), CallError> {
        todo!()
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request").finish_non_exhaustive()
    }
}

/// Configures and builds a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    handle: Handle,
}

impl ClientBuilder {
    /// The discovery back end (default: [`Discovery::from_env`]).
    pub fn discovery(self, d: Discovery) -> Self {
        todo!()
    }

    /// Calls go to the server at `endpoint` only; no registry is read.
    pub fn endpoint(self, endpoint: Endpoint) -> Self {
        todo!()
    }

    /// Security (default: from the environment, else the local-user secret).
    pub fn security(self, security: Security) -> Self {
        todo!()
    }

    /// The default timeout of each call (default 30 s).
    pub fn timeout(self, d: Duration) -> Self {
        todo!()
    }

    /// How long connecting to a server may take (default 5 s).
    pub fn connect_timeout(self, d: Duration) -> Self {
        todo!()
    }

    /// The contract of untyped calls made through this client (default untyped).
    pub fn contract(self, contract: Contract) -> Self {
        todo!()
    }

    /// The most calls in flight in all (default 65536); past it a call waits for a
    /// slot within its timeout.
    pub fn max_in_flight(self, n: usize) -> Self {
        todo!()
    }

    /// Runs `init` on each new connection before any other call uses it (to log in,
    /// subscribe, restore state after a server restart). The [`Peer`] it gets is the
    /// server. A failing `init` closes that connection and fails the calls waiting
    /// for it with its error.
    pub fn on_connect<F, Fut>(self, init: F) -> Self
    where
        F: Fn(Peer) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), CallError>> + Send + 'static,
    {
        todo!()
    }

    /// Serves the server's calls back into this client with `service` (a callback
    /// contract); without one they arrive on [`Client::incoming`].
    pub fn callback<S: Service>(self, service: S) -> Self {
        todo!()
    }

    /// Builds the client and starts watching the handle's servers. It does not wait
    /// for a server: a call with none registered fails with [`CallError::NoServers`].
    ///
    /// # Errors
    /// [`BuildError`] when discovery or security cannot be set up.
    pub async fn build(self) -> Result<Client, BuildError> {
        todo!()
    }
}

/// Makes calls to the servers of one handle. Cheap to clone (clones share the
/// connections); the connections close when the last clone is dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<()>,
}

impl Client {
    /// A builder for a client of `handle`.
    pub fn builder(handle: Handle) -> ClientBuilder {
        ClientBuilder { handle }
    }

    /// Calls one server with `req` (postcard); `.await` the [`Call`] for the
    /// [`Reply`].
    pub fn call<T: Serialize + ?Sized>(&self, req: &T) -> Call {
        todo!()
    }

    /// Calls one server with raw bytes.
    pub fn call_bytes(&self, body: impl Into<Bytes>) -> Call {
        todo!()
    }

    /// Calls every server registered now with `req` (postcard).
    pub fn call_all<T: Serialize + ?Sized>(&self, req: &T) -> CallAll {
        todo!()
    }

    /// Calls every server registered now with raw bytes.
    pub fn call_all_bytes(&self, body: impl Into<Bytes>) -> CallAll {
        todo!()
    }

    /// The servers known now.
    pub fn servers(&self) -> Vec<ServerInfo> {
        todo!()
    }

    /// Waits until at least `n` servers are known or `timeout` passes; returns how
    /// many are known.
    pub async fn wait_for_servers(&self, n: usize, timeout: Duration) -> usize {
        todo!()
    }

    /// Calls and notifications from the servers that no callback service takes.
    pub fn incoming(&self) -> Incoming {
        todo!()
    }

    /// The handle.
    pub fn handle(&self) -> &Handle {
        todo!()
    }

    /// Closes the connections; calls in flight fail with [`CallError::Closed`].
    pub async fn close(self) {
        todo!()
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl Caller for Client {
    fn call_raw(
        &self,
        contract: &Contract,
        method: &str,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> BoxFuture<'static, Result<Bytes, CallError>> {
        todo!()
    }

    fn notify_raw(&self, contract: &Contract, method: &str, body: Bytes) -> Result<(), CallError> {
        todo!()
    }
}

/// The calls and notifications a client's servers send it (see [`Client::incoming`]).
pub struct Incoming {
    inner: (),
}

impl Stream for Incoming {
    type Item = Request;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Request>> {
        todo!()
    }
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming").finish_non_exhaustive()
    }
}

/// Configures and binds a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    handle: Handle,
}

impl ServerBuilder {
    /// The discovery back end it registers in (default: [`Discovery::from_env`]).
    pub fn discovery(self, d: Discovery) -> Self {
        todo!()
    }

    /// The transports to listen on (as [`ReceiverBuilder::transports`](crate::ReceiverBuilder::transports)).
    pub fn transports(self, transports: impl IntoIterator<Item = Transport>) -> Self {
        todo!()
    }

    /// Listens at `endpoint` (as [`ReceiverBuilder::bind_at`](crate::ReceiverBuilder::bind_at)).
    pub fn bind_at(self, endpoint: Endpoint) -> Self {
        todo!()
    }

    /// Security (default: from the environment, else the local-user secret).
    pub fn security(self, security: Security) -> Self {
        todo!()
    }

    /// Serves every request with `service`: the requests do not appear on the
    /// server's stream.
    pub fn service<S: Service>(self, service: S) -> Self {
        todo!()
    }

    /// Serves each connection with its own instance, made by `factory` for the
    /// connection's [`Peer`] when it opens and dropped when it closes.
    pub fn service_factory<S, F>(self, factory: F) -> Self
    where
        S: Service,
        F: Fn(&Peer) -> S + Send + Sync + 'static,
    {
        todo!()
    }

    /// Calls of one connection running at once (default 256); past it, and past
    /// [`ServerBuilder::max_in_flight`], a call is answered [`RemoteCode::Busy`].
    pub fn concurrency(self, per_connection: usize) -> Self {
        todo!()
    }

    /// Calls running at once in all (default 4096).
    pub fn max_in_flight(self, n: usize) -> Self {
        todo!()
    }

    /// Binds, registers, and starts accepting calls.
    ///
    /// # Errors
    /// [`BindError`], as for a receiver.
    pub async fn bind(self) -> Result<Server, BindError> {
        todo!()
    }
}

/// A bound, registered server: a [`Stream`] of [`Request`]s (unless a
/// [`Service`] takes them), or [`Server::serve`] with a handler. Dropping it
/// unregisters and closes its connections.
pub struct Server {
    inner: (),
}

impl Server {
    /// A builder for a server of `handle`.
    pub fn builder(handle: Handle) -> ServerBuilder {
        ServerBuilder { handle }
    }

    /// Runs `handler` on every request, at most `concurrency` at once, until the
    /// server is closed. A handler that panics answers [`RemoteCode::Panicked`] and
    /// the server goes on.
    pub async fn serve<F, Fut>(self, handler: F, concurrency: usize)
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        todo!()
    }

    /// The next request (`None` once closed).
    pub async fn next_request(&mut self) -> Option<Request> {
        todo!()
    }

    /// Its endpoints, as registered.
    pub fn endpoints(&self) -> &[Endpoint] {
        todo!()
    }

    /// Its TCP address, if it listens on TCP.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        todo!()
    }

    /// Its id (as registered).
    pub fn id(&self) -> ReceiverId {
        todo!()
    }

    /// The handle.
    pub fn handle(&self) -> &Handle {
        todo!()
    }

    /// Unregisters, stops accepting, lets calls running finish (bounded), closes.
    pub async fn close(self) {
        todo!()
    }
}

impl Stream for Server {
    type Item = Request;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Request>> {
        todo!()
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}
