//! [`Client`]: discovers the servers of a handle (local registry, known endpoints,
//! etcd), keeps one connection to each (opened as soon as the server is known,
//! reopened with jittered backoff when it breaks, `on_connect` run before any call
//! uses it), and sends each call to the ready server with the fewest calls
//! outstanding, round robin among equals.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::Stream;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::conn::{self, lock, CallFail, Conn, Handler, Target};
use super::{
    encode, Call, CallAll, CallError, CallTarget, Caller, Contract, Gathered, Peer, Reply, Request,
    ServerInfo, Service, DEFAULT_TIMEOUT,
};
use crate::discovery::Discovery;
use crate::handshake::{self, HandshakeError};
use crate::registry::{LocalRegistry, Record};
use crate::security::{Resolved, Security};
use crate::sender::BuildError;
use crate::transport::{ByteStream, Endpoint, Transport};
use ipcbus_proto::frame::DEFAULT_MAX_FRAME;
use ipcbus_proto::handle::Handle;
use ipcbus_proto::ids::{ReceiverId, SenderId};
use ipcbus_proto::record::Role;

type InitFn = Arc<dyn Fn(Peer) -> BoxFuture<'static, Result<(), CallError>> + Send + Sync>;

/// Calls and notifications from servers waiting for [`Client::incoming`].
const INCOMING_CAPACITY: usize = 256;
/// Longest wait between two attempts to reconnect to a server.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// How long after a server becomes known a call waits for it while it is still
/// connecting, rather than going to a server that connected sooner: a burst of calls
/// right after a client starts spreads over every server, not only the first one
/// connected. Bounded also by the call's deadline.
const SETTLE: Duration = Duration::from_secs(1);

/// Configures and builds a [`Client`].
#[derive(Clone)]
pub struct ClientBuilder {
    handle: Handle,
    discovery: Option<Discovery>,
    endpoints: Vec<Endpoint>,
    security: Option<Security>,
    timeout: Duration,
    connect_timeout: Duration,
    contract: Contract,
    max_in_flight: usize,
    max_frame: usize,
    rescan_interval: Duration,
    on_connect: Option<InitFn>,
    callback: Option<Arc<dyn Service>>,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("handle", &self.handle)
            .field("discovery", &self.discovery)
            .field("endpoints", &self.endpoints)
            .field("timeout", &self.timeout)
            .field("contract", &self.contract)
            .field("on_connect", &self.on_connect.is_some())
            .field("callback", &self.callback.is_some())
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    pub(super) fn new(handle: Handle) -> ClientBuilder {
        ClientBuilder {
            handle,
            discovery: None,
            endpoints: Vec::new(),
            security: None,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: Duration::from_secs(5),
            contract: Contract::untyped(),
            max_in_flight: 65536,
            max_frame: DEFAULT_MAX_FRAME,
            rescan_interval: Duration::from_secs(2),
            on_connect: None,
            callback: None,
        }
    }

    /// The discovery back end (default: [`Discovery::from_env`]).
    pub fn discovery(self, d: Discovery) -> Self {
        ClientBuilder {
            discovery: Some(d),
            ..self
        }
    }

    /// Calls go to the server at `endpoint` only; no registry is read. Call again
    /// for more servers.
    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    /// Security (default: from the environment, else the local-user secret).
    pub fn security(self, security: Security) -> Self {
        ClientBuilder {
            security: Some(security),
            ..self
        }
    }

    /// Shorthand for `security(Security::Encrypt(key))`.
    pub fn key(self, key: crate::Key) -> Self {
        self.security(Security::Encrypt(key))
    }

    /// The default timeout of each call (default 30 s).
    pub fn timeout(self, d: Duration) -> Self {
        ClientBuilder { timeout: d, ..self }
    }

    /// How long connecting to a server may take (default 5 s).
    pub fn connect_timeout(self, d: Duration) -> Self {
        ClientBuilder {
            connect_timeout: d,
            ..self
        }
    }

    /// The contract of untyped calls made through this client (default untyped).
    pub fn contract(self, contract: Contract) -> Self {
        ClientBuilder { contract, ..self }
    }

    /// The most calls in flight in all (default 65536); past it a call waits for a
    /// slot within its timeout.
    pub fn max_in_flight(self, n: usize) -> Self {
        ClientBuilder {
            max_in_flight: n.max(1),
            ..self
        }
    }

    /// Largest frame sent and accepted (default 16 MiB).
    pub fn max_frame_len(self, n: usize) -> Self {
        ClientBuilder {
            max_frame: n,
            ..self
        }
    }

    /// Period of the fallback rescan of the local registry (default 2 s; changes are
    /// normally seen at once through inotify).
    pub fn rescan_interval(self, d: Duration) -> Self {
        ClientBuilder {
            rescan_interval: d.max(Duration::from_millis(10)),
            ..self
        }
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
        ClientBuilder {
            on_connect: Some(Arc::new(move |p| Box::pin(init(p)))),
            ..self
        }
    }

    /// Serves the server's calls back into this client with `service` (a callback
    /// contract); without one they arrive on [`Client::incoming`].
    pub fn callback<S: Service>(self, service: S) -> Self {
        ClientBuilder {
            callback: Some(Arc::new(service)),
            ..self
        }
    }

    /// Builds the client and starts watching the handle's servers. It does not wait
    /// for a server: a call with none registered fails with [`CallError::NoServers`].
    ///
    /// # Errors
    /// [`BuildError`] when discovery or security cannot be set up (with the EPM as
    /// discovery, [`EpmError::ServersUnsupported`](crate::EpmError::ServersUnsupported) from an
    /// endpoint manager older than call servers).
    pub async fn build(self) -> Result<Client, BuildError> {
        let discovery = match self.discovery.clone() {
            Some(d) => d,
            None => Discovery::from_env()?,
        };
        let security = match self.security.clone() {
            Some(s) => s,
            None => Security::from_env()?,
        };
        let sec = discovery.resolve_security(&security)?;
        let (incoming_tx, incoming_rx) = mpsc::channel(INCOMING_CAPACITY);
        let shutdown = CancellationToken::new();
        let (changed, _) = watch::channel(0u64);
        let local = match (&discovery, self.endpoints.is_empty()) {
            (Discovery::Local(reg), true) => Some(reg.clone()),
            _ => None,
        };
        let shared = Arc::new(Shared {
            handle: self.handle.clone(),
            id: SenderId::random(),
            sec,
            timeout: self.timeout,
            connect_timeout: self.connect_timeout,
            contract: self.contract.clone(),
            max_frame: self.max_frame,
            in_flight: Arc::new(Semaphore::new(self.max_in_flight)),
            on_connect: self.on_connect.clone(),
            callback: self.callback.clone(),
            incoming: incoming_tx,
            callback_limit: Arc::new(Semaphore::new(4096)),
            servers: Mutex::new(Vec::new()),
            changed,
            rr: AtomicUsize::new(0),
            shutdown: shutdown.clone(),
            local: local.clone(),
            expect_ids: self.endpoints.is_empty(),
        });
        if !self.endpoints.is_empty() {
            let records = self
                .endpoints
                .iter()
                .map(|e| known_record(&self.handle, e))
                .collect();
            shared.apply(records);
        } else {
            match discovery {
                Discovery::Local(reg) => {
                    shared.rescan();
                    let (watcher, dirty) = reg.watch();
                    tokio::spawn(local_discovery(
                        Arc::downgrade(&shared),
                        shutdown.clone(),
                        dirty,
                        watcher,
                        self.rescan_interval,
                    ));
                }
                Discovery::Etcd(etcd) => {
                    let records = crate::etcd::session::watch(
                        etcd,
                        self.handle.clone(),
                        shutdown.child_token(),
                    )
                    .await?;
                    shared.apply(records.borrow().to_vec());
                    tokio::spawn(follow(Arc::downgrade(&shared), shutdown.clone(), records));
                }
                Discovery::Epm(epm) => {
                    let records = crate::epm::session::watch_servers(
                        epm,
                        self.handle.clone(),
                        shutdown.child_token(),
                    )
                    .await?;
                    shared.apply(records.borrow().to_vec());
                    tokio::spawn(follow(Arc::downgrade(&shared), shutdown.clone(), records));
                }
            }
        }
        Ok(Client {
            inner: Arc::new(Inner {
                shared,
                incoming: Mutex::new(Some(incoming_rx)),
            }),
        })
    }
}

/// A record for a server given by endpoint, with an id derived from the endpoint.
fn known_record(handle: &Handle, e: &Endpoint) -> Record {
    let digest = Sha256::digest(e.to_string().as_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    Record::new(handle.clone(), vec![e.clone()], ReceiverId(id), None, 0).with_role(Role::Server)
}

async fn local_discovery(
    shared: std::sync::Weak<Shared>,
    shutdown: CancellationToken,
    dirty: Arc<Notify>,
    watcher: Option<notify::RecommendedWatcher>,
    interval: Duration,
) {
    let interval = match watcher {
        Some(_) => interval,
        None => interval.min(Duration::from_millis(250)),
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = dirty.notified() => {}
            _ = tokio::time::sleep(interval) => {}
        }
        match shared.upgrade() {
            Some(s) => s.rescan(),
            None => break,
        }
    }
    drop(watcher);
}

async fn follow(
    shared: std::sync::Weak<Shared>,
    shutdown: CancellationToken,
    mut records: watch::Receiver<crate::epm::session::RecordSet>,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = records.changed() => if r.is_err() { break },
        }
        let current = records.borrow_and_update().to_vec();
        match shared.upgrade() {
            Some(s) => s.apply(current),
            None => break,
        }
    }
}

/// What the client's tasks share.
struct Shared {
    handle: Handle,
    id: SenderId,
    sec: Resolved,
    timeout: Duration,
    connect_timeout: Duration,
    contract: Contract,
    max_frame: usize,
    in_flight: Arc<Semaphore>,
    on_connect: Option<InitFn>,
    callback: Option<Arc<dyn Service>>,
    incoming: mpsc::Sender<Request>,
    callback_limit: Arc<Semaphore>,
    /// The servers known now, in the order they registered.
    servers: Mutex<Vec<Arc<Slot>>>,
    /// Bumped when the set of servers changes.
    changed: watch::Sender<u64>,
    rr: AtomicUsize,
    shutdown: CancellationToken,
    /// The local registry, for a fresh scan when no server is known.
    local: Option<LocalRegistry>,
    /// Whether records carry real ids (not for servers given by endpoint).
    expect_ids: bool,
}

/// One server and the state of the connection to it.
struct Slot {
    info: ServerInfo,
    record: Record,
    state: watch::Sender<State>,
    /// Ends the connection (the client closes, or the server is gone).
    cancel: CancellationToken,
    /// The server is gone from discovery (or the client closes): no reconnects.
    retired: CancellationToken,
    /// When the server became known: for [`SETTLE`] after it, calls wait for its
    /// connection instead of all going to a server that connected sooner.
    born: Instant,
}

#[derive(Clone)]
enum State {
    Connecting,
    Ready(Arc<Conn>),
    /// The last attempt failed (a retry is scheduled).
    Failed(CallError),
}

impl Shared {
    fn rescan(self: &Arc<Self>) {
        let Some(reg) = &self.local else { return };
        match reg.scan(Some(&self.handle)) {
            Ok(records) => self.apply(records),
            Err(e) => tracing::warn!(error = %e, "registry scan failed"),
        }
    }

    /// Makes the known servers those of `records` (receivers' records are ignored).
    fn apply(self: &Arc<Self>, records: Vec<Record>) {
        let records: Vec<Record> = records
            .into_iter()
            .filter(|r| r.role == Role::Server && r.handle == self.handle)
            .collect();
        let mut servers = lock(&self.servers);
        let before = servers.len();
        let mut changed = false;
        servers.retain(|s| {
            let keep = records.iter().any(|r| r.receiver == s.info.id);
            if !keep {
                s.retired.cancel();
                changed = true;
            }
            keep
        });
        for r in records {
            if servers.iter().any(|s| s.info.id == r.receiver) {
                continue;
            }
            let Some(endpoint) = pick_endpoint(&r) else {
                continue;
            };
            let cancel = self.shutdown.child_token();
            let slot = Arc::new(Slot {
                info: ServerInfo {
                    id: r.receiver,
                    endpoint,
                },
                record: r,
                state: watch::channel(State::Connecting).0,
                cancel: cancel.clone(),
                retired: cancel.child_token(),
                born: Instant::now(),
            });
            tokio::spawn(maintain(self.clone(), slot.clone()));
            servers.push(slot);
            changed = true;
        }
        drop(servers);
        if changed || before == 0 {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    fn slots(self: &Arc<Self>) -> Vec<Arc<Slot>> {
        let s = lock(&self.servers).clone();
        if s.is_empty() && self.local.is_some() {
            // Discovery must be current when it answers "no servers".
            self.rescan();
            return lock(&self.servers).clone();
        }
        s
    }

    async fn connect(self: &Arc<Self>, slot: &Slot) -> Result<Arc<Conn>, CallError> {
        let ep = &slot.info.endpoint;
        let sock = match tokio::time::timeout(self.connect_timeout, ByteStream::connect(ep)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(CallError::Refused(format!("cannot connect to {ep}: {e}"))),
            Err(_) => return Err(CallError::Refused(format!("connecting to {ep} timed out"))),
        };
        let expect = self.expect_ids.then_some(slot.record.receiver);
        let est = match tokio::time::timeout(
            self.connect_timeout,
            handshake::connect(
                sock,
                &self.handle,
                self.id,
                &self.sec,
                expect,
                self.max_frame,
            ),
        )
        .await
        {
            Ok(Ok(est)) => est,
            Ok(Err(e)) => return Err(handshake_error(ep, e)),
            Err(_) => {
                return Err(CallError::Refused(format!(
                    "the handshake with {ep} timed out"
                )))
            }
        };
        let remote = ep
            .tcp_addr()
            .is_some_and(|a| !a.ip().to_canonical().is_loopback());
        let (conn, handler) = conn::start(
            est,
            SenderId(slot.info.id.0),
            format!("server {} at {ep}", slot.info.id),
            slot.cancel.child_token(),
            self.max_frame,
            remote,
        );
        let target = match &self.callback {
            Some(s) => Target::Service(s.clone()),
            None => Target::Queue(self.incoming.clone()),
        };
        let _ = handler.send(Handler {
            target,
            per_conn: Arc::new(Semaphore::new(256)),
            global: self.callback_limit.clone(),
        });
        Ok(conn)
    }
}

fn handshake_error(ep: &Endpoint, e: HandshakeError) -> CallError {
    match e {
        HandshakeError::Io(_) | HandshakeError::Closed | HandshakeError::Timeout => {
            CallError::Refused(format!("handshake with {ep}: {e}"))
        }
        e => CallError::Refused(format!("{ep}: {e}")),
    }
}

/// Over the Unix socket when the server has one on this host, else TCP.
fn pick_endpoint(r: &Record) -> Option<Endpoint> {
    r.endpoint(Transport::Unix)
        .filter(|e| r.tcp_addr().is_none() || e.unix_path().is_some_and(std::path::Path::exists))
        .or_else(|| r.endpoint(Transport::Tcp))
        .or(r.endpoints.first())
        .cloned()
}

/// Keeps the connection to one server: connects, runs `on_connect`, marks it ready,
/// and when it breaks (or the attempt fails) waits a jittered backoff and starts
/// again, until the server is gone or the client closes. When the server's record
/// goes (it unregistered), the calls in flight on the connection may still finish
/// (within the client's timeout) before it is closed.
async fn maintain(shared: Arc<Shared>, slot: Arc<Slot>) {
    let mut backoff = MIN_BACKOFF;
    // Cancelled when the server is gone from discovery or the client closes.
    let gone = slot.retired.clone();
    loop {
        if gone.is_cancelled() {
            break;
        }
        let attempt = tokio::select! {
            _ = gone.cancelled() => break,
            r = shared.connect(&slot) => r,
        };
        match attempt {
            Ok(conn) => {
                let init = match &shared.on_connect {
                    Some(init) => {
                        let f = init(Peer { conn: conn.clone() });
                        tokio::select! {
                            _ = gone.cancelled() => { conn.close("server gone or client closed"); break }
                            r = tokio::time::timeout(shared.timeout, f) => match r {
                                Ok(r) => r,
                                Err(_) => Err(CallError::Timeout(shared.timeout)),
                            },
                        }
                    }
                    None => Ok(()),
                };
                match init {
                    Ok(()) => {
                        tracing::debug!(server = %slot.info.id, endpoint = %slot.info.endpoint, "connected to server");
                        slot.state.send_replace(State::Ready(conn.clone()));
                        backoff = MIN_BACKOFF;
                        tokio::select! {
                            _ = gone.cancelled() => {
                                drain(&shared, &slot, &conn).await;
                                conn.close("the server unregistered");
                                break;
                            }
                            _ = conn.closed() => {}
                        }
                        slot.state
                            .send_replace(State::Failed(CallError::Disconnected(conn.reason())));
                    }
                    Err(e) => {
                        tracing::warn!(server = %slot.info.id, error = %e, "on_connect failed; closing the connection");
                        conn.close(&format!("on_connect failed: {e}"));
                        slot.state.send_replace(State::Failed(e));
                    }
                }
            }
            Err(e) => {
                tracing::debug!(server = %slot.info.id, error = %e, "cannot connect to server");
                slot.state.send_replace(State::Failed(e));
            }
        }
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        tokio::select! {
            _ = gone.cancelled() => break,
            _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        slot.state.send_replace(State::Connecting);
    }
    slot.cancel.cancel();
}

/// Waits until the calls of ours in flight on `conn` are answered, it closes, the
/// client closes, or the client's timeout passes.
async fn drain(shared: &Shared, slot: &Slot, conn: &Conn) {
    let end = Instant::now() + shared.timeout;
    while conn.outstanding() > 0 && conn.is_open() && Instant::now() < end {
        tokio::select! {
            _ = slot.cancel.cancelled() => return,
            _ = conn.closed() => return,
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
}

struct Inner {
    shared: Arc<Shared>,
    incoming: Mutex<Option<mpsc::Receiver<Request>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

/// Makes calls to the servers of one handle. Cheap to clone (clones share the
/// connections); the connections close when the last clone is dropped.
///
/// A connection to each server is opened as soon as the server is known (so calls
/// and notifications from the server can reach the client, and `on_connect` state is
/// restored before it is needed), and reopened with jittered backoff when it
/// breaks. A call is never sent twice: one that was written to a connection that
/// then broke fails [`CallError::Disconnected`]; one that never left the client
/// goes to another server.
///
/// ```
/// use std::time::Duration;
/// use ipcbus::{CallError, Client, Discovery, RemoteError, Server};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = std::env::temp_dir().join(format!("ipcbus-doc-client-{}", std::process::id()));
/// let client = Client::builder("docs.echo".parse()?)
///     .discovery(Discovery::local_at(&dir)?)
///     .timeout(Duration::from_secs(5))
///     .build()
///     .await?;
/// // No server yet: answered at once.
/// assert!(matches!(client.call_bytes("hi").await, Err(CallError::NoServers(_))));
///
/// let mut server = Server::builder("docs.echo".parse()?)
///     .discovery(Discovery::local_at(&dir)?)
///     .bind()
///     .await?;
/// tokio::spawn(async move {
///     while let Some(req) = server.next_request().await {
///         let answer = match req.body().is_empty() {
///             true => req.reply_err(RemoteError::new("empty")),
///             false => { let b = req.body().clone(); req.reply_bytes(b) }
///         };
///         let _ = answer;
///     }
/// });
/// let reply = client.call_bytes("hi").await?;
/// assert_eq!(&reply.body()[..], b"hi");
/// let err = client.call_bytes("").await.unwrap_err();
/// assert!(matches!(err, CallError::Remote(e) if e.message == "empty"));
/// # let _ = std::fs::remove_dir_all(&dir);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// A builder for a client of `handle`.
    pub fn builder(handle: Handle) -> ClientBuilder {
        ClientBuilder::new(handle)
    }

    pub(super) fn default_contract(&self) -> Contract {
        self.inner.shared.contract.clone()
    }

    /// Calls one server with `req` (postcard); `.await` the [`Call`] for the
    /// [`Reply`].
    ///
    /// # Errors
    /// The call resolves to a [`CallError`]: [`CallError::NoServers`] at once when no
    /// server is registered, [`CallError::Timeout`], [`CallError::Remote`] for the
    /// server's error, and the others each say whether the call ran.
    ///
    /// # Cancel safety
    /// Dropping the call's future forgets the call and sends the server a `Cancel`
    /// (the handler is stopped if it is still running); a reply arriving later is
    /// dropped.
    pub fn call<T: Serialize + ?Sized>(&self, req: &T) -> Call {
        Call::new(CallTarget::Client(self.clone()), encode(req))
    }

    /// Calls one server with raw bytes.
    ///
    /// # Errors
    /// As [`Client::call`].
    ///
    /// # Cancel safety
    /// As [`Client::call`].
    pub fn call_bytes(&self, body: impl Into<Bytes>) -> Call {
        Call::new(CallTarget::Client(self.clone()), Ok(body.into()))
    }

    /// Calls every server registered now with `req` (postcard).
    ///
    /// # Errors
    /// See [`CallAll`]: `NoServers` at once, the rest per server.
    ///
    /// # Cancel safety
    /// Dropping the future cancels the calls still waiting.
    pub fn call_all<T: Serialize + ?Sized>(&self, req: &T) -> CallAll {
        CallAll {
            client: self.clone(),
            body: encode(req),
            method: String::new(),
            timeout: None,
        }
    }

    /// Calls every server registered now with raw bytes.
    ///
    /// # Errors
    /// As [`Client::call_all`].
    ///
    /// # Cancel safety
    /// As [`Client::call_all`].
    pub fn call_all_bytes(&self, body: impl Into<Bytes>) -> CallAll {
        CallAll {
            client: self.clone(),
            body: Ok(body.into()),
            method: String::new(),
            timeout: None,
        }
    }

    /// The servers known now.
    pub fn servers(&self) -> Vec<ServerInfo> {
        self.inner
            .shared
            .slots()
            .iter()
            .map(|s| s.info.clone())
            .collect()
    }

    /// Waits until at least `n` servers are known or `timeout` passes; returns how
    /// many are known.
    pub async fn wait_for_servers(&self, n: usize, timeout: Duration) -> usize {
        let shared = &self.inner.shared;
        let deadline = Instant::now() + timeout;
        let mut changed = shared.changed.subscribe();
        loop {
            shared.rescan();
            let have = lock(&shared.servers).len();
            if have >= n {
                return have;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return lock(&shared.servers).len(),
                _ = changed.changed() => {}
                // The registry watcher may be slow or absent: look again now and then.
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// Waits until at least `n` servers are connected (and their `on_connect` has
    /// run) or `timeout` passes; returns how many are.
    pub async fn wait_for_connected(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let ready = self.connected();
            if ready >= n || Instant::now() >= deadline {
                return ready;
            }
            tokio::time::sleep(Duration::from_millis(10).min(deadline - Instant::now())).await;
        }
    }

    fn connected(&self) -> usize {
        self.inner
            .shared
            .slots()
            .iter()
            .filter(|s| matches!(&*s.state.borrow(), State::Ready(c) if c.is_open()))
            .count()
    }

    /// Calls and notifications from the servers, when the client has no callback
    /// service ([`ClientBuilder::callback`]); each is a [`Request`] to answer like a
    /// server's.
    ///
    /// **The stream can be taken once.** The first call (on this client or any clone
    /// of it) gets it; every later call gets a stream that ends at once (and logs a
    /// warning), so take it once, right after building, and keep it. Until it is
    /// taken, up to 256 requests wait for it; past that, the servers' further calls
    /// are answered `busy`.
    pub fn incoming(&self) -> Incoming {
        let rx = lock(&self.inner.incoming).take();
        if rx.is_none() {
            tracing::warn!(handle = %self.inner.shared.handle, "Client::incoming was taken before: this stream ends at once");
        }
        Incoming { rx }
    }

    /// The handle.
    pub fn handle(&self) -> &Handle {
        &self.inner.shared.handle
    }

    /// Calls waiting for a reply, over every connection (for tests and metrics).
    #[doc(hidden)]
    pub fn in_flight(&self) -> usize {
        lock(&self.inner.shared.servers)
            .iter()
            .map(|s| match &*s.state.borrow() {
                State::Ready(c) => c.pending_len(),
                _ => 0,
            })
            .sum()
    }

    /// Closes the connections; calls in flight fail with [`CallError::Closed`].
    pub async fn close(self) {
        self.inner.shared.shutdown.cancel();
        tokio::task::yield_now().await;
    }

    /// One call to one server.
    pub(super) async fn call_one(
        &self,
        contract: &Contract,
        method: &str,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> Result<Reply, CallError> {
        let shared = &self.inner.shared;
        let timeout = timeout.unwrap_or(shared.timeout);
        let deadline = Instant::now() + timeout;
        if shared.shutdown.is_cancelled() {
            return Err(CallError::Closed);
        }
        // A free slot is taken without arming a timer.
        let _permit = match shared.in_flight.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                match tokio::time::timeout_at(deadline, shared.in_flight.clone().acquire_owned())
                    .await
                {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => return Err(CallError::Closed),
                    Err(_) => return Err(CallError::Timeout(timeout)),
                }
            }
        };
        let mut tried: Vec<ReceiverId> = Vec::new();
        let mut last: Option<CallError> = None;
        loop {
            let (slot, conn) = self.pick(&tried, deadline, timeout, last.take()).await?;
            let left = deadline.saturating_duration_since(Instant::now());
            match conn.call(contract, method, body.clone(), left).await {
                Ok(body) => {
                    return Ok(Reply {
                        body,
                        server: Some(slot.info.clone()),
                    })
                }
                Err(CallFail::NotSent(e @ (CallError::Disconnected(_) | CallError::Busy))) => {
                    tried.push(slot.info.id);
                    last = Some(e);
                }
                Err(CallFail::NotSent(e)) => return Err(e),
                Err(CallFail::Sent(CallError::Timeout(_))) => {
                    return Err(CallError::Timeout(timeout))
                }
                Err(CallFail::Sent(CallError::Disconnected(_)))
                    if shared.shutdown.is_cancelled() =>
                {
                    return Err(CallError::Closed)
                }
                Err(CallFail::Sent(e)) => return Err(e),
            }
        }
    }

    /// The server for the next call: among those not `tried`, a ready one with the
    /// fewest calls outstanding (round robin among equals); waits (until `deadline`)
    /// while none is ready and some are still connecting, and also, with one ready,
    /// for servers still making their first connection (at most [`SETTLE`] after they
    /// became known), so that a burst of calls at start spreads over all of them;
    /// fails at once when none is registered or every one failed (then the call did
    /// not run).
    async fn pick(
        &self,
        tried: &[ReceiverId],
        deadline: Instant,
        timeout: Duration,
        mut last: Option<CallError>,
    ) -> Result<(Arc<Slot>, Arc<Conn>), CallError> {
        let shared = &self.inner.shared;
        if let Some(ready) = self.pick_ready(tried) {
            return Ok(ready);
        }
        let mut set_changed = shared.changed.subscribe();
        loop {
            if shared.shutdown.is_cancelled() {
                return Err(CallError::Closed);
            }
            let slots = shared.slots();
            if slots.is_empty() {
                return Err(CallError::NoServers(shared.handle.clone()));
            }
            let cands: Vec<Arc<Slot>> = slots
                .into_iter()
                .filter(|s| !tried.contains(&s.info.id))
                .collect();
            if cands.is_empty() {
                return Err(did_not_run(last.unwrap_or_else(|| {
                    CallError::Refused("every server failed".to_owned())
                })));
            }
            let mut watches: Vec<watch::Receiver<State>> =
                cands.iter().map(|s| s.state.subscribe()).collect();
            let n = cands.len();
            let start = shared.rr.fetch_add(1, Ordering::Relaxed) % n;
            let mut best: Option<(usize, Arc<Conn>)> = None;
            let mut failed = Vec::new();
            // Until a new server's first connection settles, calls wait for it.
            let mut settle: Option<Instant> = None;
            for i in 0..n {
                let k = (start + i) % n;
                match &*watches[k].borrow_and_update() {
                    State::Ready(c) if c.is_open() => {
                        let fewer = match &best {
                            Some((_, b)) => c.outstanding() < b.outstanding(),
                            None => true,
                        };
                        if fewer {
                            best = Some((k, c.clone()));
                        }
                    }
                    State::Ready(c) => failed.push(CallError::Disconnected(c.reason())),
                    State::Failed(e) => failed.push(e.clone()),
                    State::Connecting => {
                        let until = cands[k].born + SETTLE;
                        if Instant::now() < until {
                            settle = Some(settle.map_or(until, |s| s.min(until)));
                        }
                    }
                }
            }
            if let Some((k, c)) = best.as_ref().filter(|_| settle.is_none()) {
                return Ok((cands[*k].clone(), c.clone()));
            }
            if failed.len() == n {
                // Prefer a refusal (it names the cause: a key, a handle) to a broken
                // connection.
                let refused = failed
                    .iter()
                    .position(|e| matches!(e, CallError::Refused(_)));
                return Err(did_not_run(failed.swap_remove(refused.unwrap_or(0))));
            }
            let any_change =
                futures::future::select_all(watches.iter_mut().map(|w| Box::pin(w.changed())));
            // With a server ready, wait for the new ones only until they settle.
            let settled = async {
                match (settle, &best) {
                    (Some(t), Some(_)) => tokio::time::sleep_until(t.min(deadline)).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Err(CallError::Timeout(timeout)),
                _ = settled => {}
                _ = set_changed.changed() => {}
                _ = any_change => {}
                _ = shared.shutdown.cancelled() => return Err(CallError::Closed),
            }
            last = None;
        }
    }

    /// [`Client::pick`] for a first try when a server is ready: the same choice,
    /// without copying the list of servers or watching their states.
    fn pick_ready(&self, tried: &[ReceiverId]) -> Option<(Arc<Slot>, Arc<Conn>)> {
        let shared = &self.inner.shared;
        if !tried.is_empty() || shared.shutdown.is_cancelled() {
            return None;
        }
        let servers = lock(&shared.servers);
        let n = servers.len();
        if n == 0 {
            return None;
        }
        let start = shared.rr.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, Arc<Conn>)> = None;
        for i in 0..n {
            let k = (start + i) % n;
            match &*servers[k].state.borrow() {
                State::Ready(c) => {
                    let fewer = match &best {
                        Some((_, b)) => c.outstanding() < b.outstanding(),
                        None => true,
                    };
                    if c.is_open() && fewer {
                        best = Some((k, c.clone()));
                    }
                }
                // A new server still on its first connection: the general path waits
                // for it to settle, so that a burst spreads over every server.
                State::Connecting if Instant::now() < servers[k].born + SETTLE => return None,
                _ => {}
            }
        }
        best.map(|(k, c)| (servers[k].clone(), c))
    }

    /// One call to every server known now.
    pub(super) async fn call_every(
        &self,
        method: &str,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> Result<Vec<Gathered>, CallError> {
        let shared = &self.inner.shared;
        let timeout = timeout.unwrap_or(shared.timeout);
        let deadline = Instant::now() + timeout;
        let contract = shared.contract.clone();
        let slots = shared.slots();
        if slots.is_empty() {
            return Err(CallError::NoServers(shared.handle.clone()));
        }
        let calls = slots.into_iter().map(|slot| {
            let body = body.clone();
            let contract = contract.clone();
            async move {
                let result = one_server(&slot, &contract, method, body, deadline, timeout).await;
                Gathered {
                    server: slot.info.clone(),
                    result,
                }
            }
        });
        Ok(futures::future::join_all(calls).await)
    }
}

/// The error of a call that was never sent: a broken or missing connection is
/// [`CallError::Refused`] (the call did not run), not [`CallError::Disconnected`]
/// (which says it may have).
fn did_not_run(e: CallError) -> CallError {
    match e {
        CallError::Disconnected(m) => CallError::Refused(format!("not connected: {m}")),
        e => e,
    }
}

/// A call to one given server, waiting (until `deadline`) for its connection.
async fn one_server(
    slot: &Arc<Slot>,
    contract: &Contract,
    method: &str,
    body: Bytes,
    deadline: Instant,
    timeout: Duration,
) -> Result<Reply, CallError> {
    let mut w = slot.state.subscribe();
    let conn = loop {
        let state = w.borrow_and_update().clone();
        match state {
            State::Ready(c) if c.is_open() => break c,
            State::Ready(c) => return Err(did_not_run(CallError::Disconnected(c.reason()))),
            State::Failed(e) => return Err(did_not_run(e)),
            State::Connecting => {}
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Err(CallError::Timeout(timeout)),
            r = w.changed() => if r.is_err() { return Err(CallError::Closed) },
        }
    };
    let left = deadline.saturating_duration_since(Instant::now());
    match conn.call(contract, method, body, left).await {
        Ok(body) => Ok(Reply {
            body,
            server: Some(slot.info.clone()),
        }),
        Err(CallFail::Sent(CallError::Timeout(_))) => Err(CallError::Timeout(timeout)),
        Err(e) => Err(e.into_error()),
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("handle", &self.inner.shared.handle)
            .field("servers", &lock(&self.inner.shared.servers).len())
            .finish_non_exhaustive()
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
        let c = self.clone();
        let contract = contract.clone();
        let method = method.to_owned();
        Box::pin(async move {
            c.call_one(&contract, &method, body, timeout)
                .await
                .map(Reply::into_body)
        })
    }

    fn notify_raw(&self, contract: &Contract, method: &str, body: Bytes) -> Result<(), CallError> {
        let shared = &self.inner.shared;
        if shared.shutdown.is_cancelled() {
            return Err(CallError::Closed);
        }
        let slots = shared.slots();
        if slots.is_empty() {
            return Err(CallError::NoServers(shared.handle.clone()));
        }
        let n = slots.len();
        let start = shared.rr.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            if let State::Ready(c) = &*slots[(start + i) % n].state.borrow() {
                if c.is_open() {
                    return c.notify(contract, method, &body);
                }
            }
        }
        Err(CallError::Disconnected(
            "no server is connected now".to_owned(),
        ))
    }
}

/// The calls and notifications a client's servers send it (see [`Client::incoming`]).
pub struct Incoming {
    rx: Option<mpsc::Receiver<Request>>,
}

impl Stream for Incoming {
    type Item = Request;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Request>> {
        match &mut self.rx {
            Some(rx) => rx.poll_recv(cx),
            None => Poll::Ready(None),
        }
    }
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming").finish_non_exhaustive()
    }
}
