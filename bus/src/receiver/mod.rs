//! The receiving end: binds a port, registers its handle, hands events to the
//! application and acknowledges them once the application has taken them.
//!
//! By concern:
//! - this module: the public API (`Receiver`, `ReceiverBuilder`), binding and
//!   registering, the accept loop and each connection's handshake;
//! - [`input`]: the pure pieces of a connection: the read buffer checked through the
//!   session (`Input`), the batches the application takes events from (`Batch`), and
//!   when an acknowledgement is due (`AckState`);
//! - [`conn`]: the connection's read loop after the handshake, over any byte
//!   stream; its acknowledgement writer (`ack_writer`) is still here.

mod conn;
mod input;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use futures::Stream;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::input::{AckState, Batch, ACK_DELAY};
use crate::discovery::Announcement;
use crate::discovery::{Discovery, DiscoveryError};
use crate::epm::{Epm, EpmError};
use crate::gate::{Acceptor, HandshakeGate, HandshakeSlot, Incoming};
use crate::handshake;
use crate::message::Message;
use crate::registry::{record_now, RegistryError};
use crate::security::{Resolved, Security};
use crate::stats::{ReceiverCounters, ReceiverStats, RejectKind};
use crate::transport::{
    bind_unix, ByteStream, Endpoint, Listener, Peer, SocketFile, Transport, UnixBindError,
    WriteHalf,
};
use ipcbus_proto::crypto::Sealer;
use ipcbus_proto::frame::{Flags, Kind, DEFAULT_MAX_FRAME};
use ipcbus_proto::handle::Handle;
use ipcbus_proto::ids::{ReceiverId, SenderId};
use ipcbus_proto::session::Outbound;

/// Why a receiver could not be bound.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// Every allowed port is in use.
    #[error("all {tried} allowed ports on {ip} are in use")]
    PortsExhausted {
        /// The address tried.
        ip: IpAddr,
        /// How many ports were tried.
        tried: usize,
    },
    /// Binding failed for another reason (address not on this host, permission).
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The registry could not be used.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The endpoint manager could not be used (unreachable, wrong password, refused).
    #[error(transparent)]
    Epm(#[from] EpmError),
    /// etcd could not be used (unavailable, access denied, malformed `IPCBUS_ETCD`).
    #[error(transparent)]
    Etcd(#[from] crate::EtcdError),
    /// The Unix socket could not be bound (path too long, in use, no permission).
    #[error(transparent)]
    Unix(#[from] UnixBindError),
    /// `IPCBUS_TRANSPORTS` is set but is not a list of `tcp` and `unix`.
    #[error("IPCBUS_TRANSPORTS={value:?}: write tcp, unix or tcp,unix")]
    BadTransports {
        /// The variable's value.
        value: String,
    },
    /// [`ReceiverBuilder::transports`] was given none: the receiver would have no
    /// endpoint, and nobody could reach it.
    #[error("no transport to listen on: give tcp, unix or both")]
    NoTransports,
    /// A Unix socket was asked for where there is no registry directory to put it in
    /// (EPM discovery): name its path with [`ReceiverBuilder::bind_at`].
    #[error(
        "a unix socket needs the local registry, or a path given with bind_at (--at unix:///PATH)"
    )]
    UnixNeedsPath,
    /// No security was set in code and the password or salt in the environment is
    /// unusable (see [`Credentials`](crate::Credentials)).
    #[error(transparent)]
    Credentials(#[from] crate::CredentialsError),
}

impl From<DiscoveryError> for BindError {
    fn from(e: DiscoveryError) -> Self {
        match e {
            DiscoveryError::Registry(e) => e.into(),
            DiscoveryError::Epm(e) => e.into(),
            DiscoveryError::Etcd(e) => e.into(),
        }
    }
}

/// Configures and binds a [`Receiver`].
#[derive(Debug, Clone)]
pub struct ReceiverBuilder {
    handle: Handle,
    ip: Option<IpAddr>,
    ports: Vec<u16>,
    queue_capacity: usize,
    security: Option<Security>,
    max_frame: usize,
    max_connections: usize,
    handshake_timeout: Duration,
    discovery: Option<Discovery>,
    transports: Option<Vec<Transport>>,
    at: Vec<Endpoint>,
}

impl ReceiverBuilder {
    /// Which transports to listen on: TCP, Unix domain socket, or both. Default: what
    /// `IPCBUS_TRANSPORTS` says (`tcp`, `unix` or `tcp,unix`) when set, else both with
    /// the local registry (senders on this host then use the Unix socket), TCP with
    /// the EPM (which carries TCP endpoints only).
    ///
    /// The Unix socket goes in the registry directory (`$DIR/sockets/ID.sock`, mode
    /// 0600 in a 0700 directory) and is removed on close and drop; a peer of another
    /// uid is refused before the handshake (`SO_PEERCRED`), on top of the per-user
    /// secret. If that path would be longer than the platform's limit
    /// ([`MAX_UNIX_PATH`](crate::MAX_UNIX_PATH) bytes), the default falls back to TCP
    /// alone with a warning; asking for [`Transport::Unix`] explicitly (here or in
    /// `IPCBUS_TRANSPORTS`) makes it a [`BindError::Unix`]. An empty list is
    /// [`BindError::NoTransports`].
    ///
    /// ```
    /// use ipcbus::{Handle, Receiver, Transport};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let rx = Receiver::builder("docs.tcp-only".parse()?)
    ///     .transports([Transport::Tcp])
    ///     .bind()
    ///     .await?;
    /// assert_eq!(rx.endpoints().len(), 1);
    /// assert!(rx.local_addr().is_some());
    /// # Ok(()) }
    /// ```
    pub fn transports(mut self, transports: impl IntoIterator<Item = Transport>) -> Self {
        let mut t: Vec<Transport> = transports.into_iter().collect();
        t.sort();
        t.dedup();
        self.transports = Some(t);
        self
    }

    /// Listens exactly at `endpoint` (call again for more), instead of an ephemeral
    /// port and the registry's socket path: a TCP address (`tcp://127.0.0.1:4000`), or
    /// a Unix socket path (`unix:///run/myapp/events.sock`), which a sender can be
    /// given with [`SenderBuilder::endpoint`](crate::SenderBuilder::endpoint) without
    /// any registry. The receiver still registers these endpoints in its discovery
    /// (the EPM takes the TCP ones). A socket file left at the path by a listener that
    /// is gone is replaced; one in use is an error. Overrides
    /// [`ip`](Self::ip), [`allowed_ports`](Self::allowed_ports) and
    /// [`transports`](Self::transports).
    ///
    /// ```
    /// use ipcbus::{Endpoint, Receiver};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let path = std::env::temp_dir().join(format!("ipcbus-doc-{}.sock", std::process::id()));
    /// let rx = Receiver::builder("docs.at".parse()?)
    ///     .bind_at(Endpoint::unix(&path))
    ///     .bind()
    ///     .await?;
    /// assert_eq!(rx.endpoints(), [Endpoint::unix(&path)]);
    /// rx.close().await;
    /// assert!(!path.exists());
    /// # Ok(()) }
    /// ```
    pub fn bind_at(mut self, endpoint: Endpoint) -> Self {
        self.at.push(endpoint);
        self
    }

    /// The address to bind and register (default 127.0.0.1 with the local registry).
    pub fn ip(mut self, ip: IpAddr) -> Self {
        self.ip = Some(ip);
        self
    }

    /// Ports to try in order; the first free one is used. Default: an ephemeral port.
    /// Accepts a range (`9000..=9010`) or a list (`[9000, 9005]`).
    pub fn allowed_ports(mut self, ports: impl IntoIterator<Item = u16>) -> Self {
        self.ports = ports.into_iter().collect();
        self
    }

    /// Sizes the queue of received events waiting for the application (default 1024):
    /// events wait in up to `max(2, n / 256)` batches, each the frames of one read from
    /// a socket (at most 256 KiB, or one larger frame), so memory stays bounded.
    /// When full, the receiver stops reading its sockets and senders feel
    /// backpressure.
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = n.max(1);
        self
    }

    /// Authentication and encryption (default [`Security::from_env`]: encrypted under
    /// the password and salt of the environment when set, else [`Security::LocalUser`]).
    pub fn security(mut self, security: Security) -> Self {
        self.security = Some(security);
        self
    }

    /// Shorthand for `security(Security::Encrypt(key))`.
    pub fn key(self, key: crate::Key) -> Self {
        self.security(Security::Encrypt(key))
    }

    /// Largest frame accepted, and largest size a compressed body may inflate to
    /// (default 16 MiB).
    pub fn max_frame_len(mut self, n: usize) -> Self {
        self.max_frame = n;
        self
    }

    /// Most sender connections served at once (default 256).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Time a connecting sender has to finish the handshake (default 5 s).
    pub fn handshake_timeout(mut self, d: Duration) -> Self {
        self.handshake_timeout = d;
        self
    }

    /// Where to register (default: [`Discovery::from_env`], i.e. the EPM named by
    /// `IPCBUS_EPM`, else the local-user registry).
    pub fn discovery(mut self, d: Discovery) -> Self {
        self.discovery = Some(d);
        self
    }

    /// Registers at the endpoint manager: shorthand for
    /// `discovery(Discovery::Epm(epm))`. Without [`ip`](Self::ip), the receiver binds
    /// and registers the address of the interface that routes to the EPM.
    pub fn epm(self, epm: Epm) -> Self {
        self.discovery(Discovery::Epm(epm))
    }

    /// Registers in etcd: shorthand for `discovery(Discovery::Etcd(etcd))`. Without
    /// [`ip`](Self::ip), the receiver binds and registers the address of the
    /// interface that routes to the first etcd endpoint.
    pub fn etcd(self, etcd: crate::Etcd) -> Self {
        self.discovery(Discovery::Etcd(etcd))
    }

    /// Binds the port, registers the handle, and starts accepting senders.
    ///
    /// # Errors
    /// [`BindError`] when no allowed port is free, the address cannot be bound, or the
    /// registry cannot be used.
    pub async fn bind(self) -> Result<Receiver, BindError> {
        let Listening {
            discovery,
            sec,
            id,
            listeners,
            endpoints,
        } = self.listen().await?;
        let (tx, rx) = mpsc::channel((self.queue_capacity / 256).max(2));
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let shared = Arc::new(Shared {
            handle: self.handle.clone(),
            id,
            sec,
            max_frame: self.max_frame,
            handshake_timeout: self.handshake_timeout,
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
            conn_limit: Arc::new(Semaphore::new(self.max_connections)),
            half_open: HandshakeGate::new((self.max_connections / 4).clamp(1, 64)),
            counters: ReceiverCounters::default(),
        });
        let counters = shared.clone();
        let mut sockets = Vec::new();
        for mut l in listeners {
            // The socket file goes with the receiver (close or drop), not with the
            // accept task, which may still be winding down.
            sockets.extend(l.take_socket_file());
            tasks.spawn(accept_loop(l, shared.clone(), tx.clone()));
        }
        drop(tx);
        drop(shared);
        let record = record_now(self.handle.clone(), endpoints.clone(), id);
        let registration = match discovery.register(&record).await {
            Ok(r) => r,
            Err(e) => {
                shutdown.cancel();
                return Err(e.into());
            }
        };
        tracing::debug!(handle = %self.handle, endpoints = ?endpoints, receiver = %id, "receiver registered");
        Ok(Receiver {
            handle: self.handle,
            id,
            endpoints,
            sockets,
            rx,
            current: None,
            taken: HashMap::new(),
            registration: Some(registration),
            shutdown,
            tasks,
            shared: counters,
            taken_events: 0,
            taken_bytes: 0,
        })
    }
}

impl ReceiverBuilder {
    /// The listeners of [`transports`](Self::transports): an ephemeral (or allowed)
    /// TCP port and the registry's socket path.
    async fn bind_default(
        &self,
        discovery: &Discovery,
        id: ReceiverId,
    ) -> Result<Vec<Listener>, BindError> {
        let default = match discovery.local_registry() {
            Some(_) => vec![Transport::Tcp, Transport::Unix],
            None => vec![Transport::Tcp],
        };
        let chosen = match &self.transports {
            Some(t) => Some(t.clone()),
            None => transports_from_env()?,
        };
        let explicit = chosen.is_some();
        let transports = chosen.unwrap_or(default);
        if transports.is_empty() {
            return Err(BindError::NoTransports);
        }
        let mut out = Vec::with_capacity(2);
        if transports.contains(&Transport::Tcp) {
            let ip = discovery.bind_ip(self.ip).await?;
            out.push(Listener::Tcp(bind_first(ip, &self.ports).await?));
        }
        if transports.contains(&Transport::Unix) {
            let Some(reg) = discovery.local_registry() else {
                return Err(BindError::UnixNeedsPath);
            };
            match bind_unix(&reg.socket_path(&id)) {
                Ok(l) => out.push(l),
                Err(e @ UnixBindError::PathTooLong { .. }) if !explicit && !out.is_empty() => {
                    tracing::warn!(handle = %self.handle, error = %e, "no unix socket for this receiver; tcp only");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }
}

/// What [`ReceiverBuilder::listen`] binds: the listeners and what goes with them.
pub(crate) struct Listening {
    pub(crate) discovery: Discovery,
    pub(crate) sec: Resolved,
    pub(crate) id: ReceiverId,
    pub(crate) listeners: Vec<Listener>,
    pub(crate) endpoints: Vec<Endpoint>,
}

impl ReceiverBuilder {
    /// Resolves discovery and security and binds the listeners of
    /// [`transports`](Self::transports) or [`bind_at`](Self::bind_at), with their
    /// endpoints as they are registered (a receiver's and a call server's binding).
    pub(crate) async fn listen(&self) -> Result<Listening, BindError> {
        let discovery = match self.discovery.clone() {
            Some(d) => d,
            None => Discovery::from_env()?,
        };
        let security = match self.security.clone() {
            Some(s) => s,
            None => Security::from_env()?,
        };
        let sec = discovery.resolve_security(&security)?;
        let id = ReceiverId::random();
        let listeners = if self.at.is_empty() {
            self.bind_default(&discovery, id).await?
        } else {
            bind_given(&self.at).await?
        };
        let mut endpoints = Vec::with_capacity(listeners.len());
        for l in &listeners {
            let mut ep = l.endpoint().map_err(|source| BindError::Bind {
                addr: SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0),
                source,
            })?;
            if let Endpoint::Tcp(a) = &mut ep {
                if a.ip().is_unspecified() {
                    a.set_ip(discovery.advertise_ip().await?);
                }
            }
            endpoints.push(ep);
        }
        Ok(Listening {
            discovery,
            sec,
            id,
            listeners,
            endpoints,
        })
    }

    /// The largest frame, the handshake timeout and the connection limit.
    pub(crate) fn limits(&self) -> (usize, Duration, usize) {
        (self.max_frame, self.handshake_timeout, self.max_connections)
    }
}

/// `IPCBUS_TRANSPORTS` (`tcp`, `unix`, `tcp,unix`; unset or empty: the default).
fn transports_from_env() -> Result<Option<Vec<Transport>>, BindError> {
    let Some(value) = std::env::var_os("IPCBUS_TRANSPORTS").filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let value = value.to_string_lossy().into_owned();
    let mut out: Vec<Transport> = Vec::new();
    for part in value.split(',').map(str::trim) {
        match part.parse() {
            Ok(t) => out.push(t),
            Err(_) => return Err(BindError::BadTransports { value }),
        }
    }
    out.sort();
    out.dedup();
    Ok(Some(out))
}

/// The listeners of [`ReceiverBuilder::bind_at`].
async fn bind_given(at: &[Endpoint]) -> Result<Vec<Listener>, BindError> {
    let mut out = Vec::with_capacity(at.len());
    for ep in at {
        out.push(match ep {
            Endpoint::Tcp(addr) => Listener::Tcp(TcpListener::bind(addr).await.map_err(
                |source| BindError::Bind {
                    addr: *addr,
                    source,
                },
            )?),
            Endpoint::Unix(path) => bind_unix(path)?,
        });
    }
    Ok(out)
}

async fn bind_first(ip: IpAddr, ports: &[u16]) -> Result<TcpListener, BindError> {
    if ports.is_empty() {
        let addr = SocketAddr::new(ip, 0);
        return TcpListener::bind(addr)
            .await
            .map_err(|source| BindError::Bind { addr, source });
    }
    for &port in ports {
        let addr = SocketAddr::new(ip, port);
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(source) => return Err(BindError::Bind { addr, source }),
        }
    }
    Err(BindError::PortsExhausted {
        ip,
        tried: ports.len(),
    })
}

/// The receiving end of a handle: a stream of [`Message`]s.
///
/// Events are acknowledged to their sender when the application takes them with
/// [`recv`](Receiver::recv) or the stream's `next`. Dropping the receiver unregisters it.
#[derive(Debug)]
pub struct Receiver {
    handle: Handle,
    id: ReceiverId,
    endpoints: Vec<Endpoint>,
    /// The Unix sockets' files, removed on close or drop.
    sockets: Vec<SocketFile>,
    rx: mpsc::Receiver<Batch>,
    current: Option<Batch>,
    /// Per sender, the highest sequence the application has taken, and that batch's
    /// connection (to forget senders whose connections are gone).
    taken: HashMap<SenderId, (u64, Weak<AckState>)>,
    registration: Option<Announcement>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// The connection tasks' counters (see [`Receiver::stats`]).
    shared: Arc<Shared>,
    /// Events and payload bytes the application took: plain integers, counted where
    /// the events are taken.
    taken_events: u64,
    taken_bytes: u64,
}

impl Receiver {
    /// Starts configuring a receiver for `handle`.
    pub fn builder(handle: Handle) -> ReceiverBuilder {
        ReceiverBuilder {
            handle,
            ip: None,
            ports: Vec::new(),
            queue_capacity: 1024,
            security: None,
            max_frame: DEFAULT_MAX_FRAME,
            max_connections: 256,
            handshake_timeout: Duration::from_secs(5),
            discovery: None,
            transports: None,
            at: Vec::new(),
        }
    }

    /// Receives the next event, acknowledging it to its sender. `None` once the
    /// receiver is closed.
    ///
    /// # Cancel safety
    /// Cancel safe: an event is only taken (and acknowledged) when this resolves.
    pub async fn recv(&mut self) -> Option<Message> {
        futures::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Takes an event if one is ready, without waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        loop {
            if let Some(m) = self.take_current() {
                return Some(m);
            }
            let b = self.rx.try_recv().ok()?;
            self.start_batch(b);
        }
    }

    fn start_batch(&mut self, mut b: Batch) {
        b.floor = self.taken.get(&b.sender).map_or(0, |t| t.0);
        self.current = Some(b);
    }

    fn take_current(&mut self) -> Option<Message> {
        loop {
            let b = self.current.as_mut()?;
            match b.next_message() {
                // A late event from an older connection of this sender, which timed
                // out and was reported failed: delivering it would break the order.
                Some(m) if m.seq <= b.floor => continue,
                Some(m) => {
                    b.floor = m.seq;
                    b.ack.take(m.seq);
                    self.taken_events += 1;
                    self.taken_bytes += m.payload().len() as u64;
                    return Some(m);
                }
                None => {
                    if let Some(b) = self.current.take() {
                        self.taken
                            .insert(b.sender, (b.floor, Arc::downgrade(&b.ack)));
                        if self.taken.len() > 1024 {
                            self.taken.retain(|_, (_, conn)| conn.strong_count() > 0);
                        }
                    }
                    return None;
                }
            }
        }
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        loop {
            if let Some(m) = self.take_current() {
                return Poll::Ready(Some(m));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(b)) => self.start_batch(b),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Its TCP address as registered (`None` for a receiver without TCP, see
    /// [`ReceiverBuilder::transports`]).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoints.iter().find_map(Endpoint::tcp_addr)
    }

    /// Its endpoints in text form, separated by spaces (for messages and logs):
    /// `tcp://127.0.0.1:4000 unix:///run/user/1000/ipcbus/sockets/ID.sock`.
    pub fn endpoints_text(&self) -> String {
        let v: Vec<String> = self.endpoints.iter().map(Endpoint::to_string).collect();
        v.join(" ")
    }

    /// Every endpoint it listens at and registered, in their text form's order: TCP
    /// first, then the Unix socket (see [`ReceiverBuilder::transports`]).
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The handle this receiver serves.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// This receiver's identity.
    pub fn id(&self) -> ReceiverId {
        self.id
    }

    /// A snapshot of this receiver's counters: events and payload bytes the
    /// application took, bytes read, connections accepted, handshakes done and
    /// rejected (by reason), connections closed, and the senders connected now.
    /// Cheap; see [`Sender::stats`](crate::Sender::stats) for an example.
    pub fn stats(&self) -> ReceiverStats {
        self.shared
            .counters
            .snapshot(self.taken_events, self.taken_bytes)
    }

    /// Unregisters, tells connected senders it is leaving, and closes every
    /// connection. Events not yet taken are not acknowledged, so their senders report
    /// them failed.
    pub async fn close(mut self) {
        if let Some(r) = self.registration.take() {
            r.close().await;
        }
        self.sockets.clear();
        self.shutdown.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
    }
}

impl Stream for Receiver {
    type Item = Message;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.get_mut().poll_recv(cx)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.registration.take();
        self.shutdown.cancel();
    }
}

struct Shared {
    handle: Handle,
    id: ReceiverId,
    sec: Resolved,
    max_frame: usize,
    handshake_timeout: Duration,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    conn_limit: Arc<Semaphore>,
    /// Connections still in their handshake; the oldest is evicted when full.
    half_open: HandshakeGate,
    /// Counted once per connection, handshake and socket read.
    counters: ReceiverCounters,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("handle", &self.handle)
            .field("id", &self.id)
            .finish()
    }
}

async fn accept_loop(listener: Listener, shared: Arc<Shared>, tx: mpsc::Sender<Batch>) {
    let acceptor = Acceptor::new(
        listener,
        shared.half_open.clone(),
        shared.conn_limit.clone(),
    );
    while let Some(incoming) = acceptor.next(&shared.shutdown).await {
        shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
        match incoming {
            Incoming::WrongUser(peer) => {
                tracing::warn!(%peer, handle = %shared.handle, "unix socket peer runs as another user; refused before the handshake");
                shared.counters.reject(RejectKind::WrongUser);
            }
            Incoming::Busy { peer, .. } => {
                tracing::warn!(%peer, handle = %shared.handle, "connection limit reached; closing new connection");
                shared.counters.reject(RejectKind::Busy);
            }
            Incoming::Admitted {
                stream,
                peer,
                slot,
                permit,
                evicted,
            } => {
                if evicted {
                    tracing::warn!(%peer, handle = %shared.handle, "too many unfinished handshakes; evicted the oldest");
                }
                let shared2 = shared.clone();
                let tx = tx.clone();
                shared.tasks.spawn(async move {
                    serve(stream, peer, shared2, tx, slot).await;
                    drop(permit);
                });
            }
        }
    }
}

async fn serve(
    sock: ByteStream,
    peer: Peer,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Batch>,
    slot: HandshakeSlot,
) {
    let hs = tokio::select! {
        _ = slot.evicted() => {
            tracing::warn!(%peer, handle = %shared.handle, "handshake evicted by newer connections; closed");
            shared.counters.reject(RejectKind::Busy);
            return;
        }
        r = tokio::time::timeout(
            shared.handshake_timeout,
            handshake::accept(
                sock,
                &shared.handle,
                shared.id,
                &shared.sec,
                shared.max_frame,
            ),
        ) => r,
    };
    drop(slot);
    let (est, sender) = match hs {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::warn!(%peer, handle = %shared.handle, error = %e, "handshake failed");
            shared.counters.reject(RejectKind::of(&e));
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, handle = %shared.handle, "handshake timed out");
            shared.counters.reject(RejectKind::TimedOut);
            return;
        }
    };
    let counters = &shared.counters;
    counters.handshakes.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%peer, handle = %shared.handle, %sender, "sender connected");
    let (rd, wr) = est.io.into_split();
    let ack = Arc::new(AckState::default());
    let conn_done = shared.shutdown.child_token();
    let acker = shared.tasks.spawn(ack_writer(
        wr,
        est.tx,
        ack.clone(),
        shared.shutdown.clone(),
        conn_done.clone(),
    ));
    let cx = conn::Context {
        shutdown: &shared.shutdown,
        bytes_read: &counters.bytes_read,
        max_frame: shared.max_frame,
    };
    let result = conn::read_loop(rd, est.rx, est.read_buf, sender, &ack, tx, cx).await;
    if let Err(e) = result {
        tracing::warn!(%peer, handle = %shared.handle, %sender, error = %e, "closing connection on bad input");
    }
    conn_done.cancel();
    let _ = acker.await;
    counters.closed.fetch_add(1, Ordering::Relaxed);
}

/// Writes cumulative acknowledgements as the application takes events; on receiver
/// shutdown, writes a last ack and `Bye`.
async fn ack_writer(
    mut wr: WriteHalf,
    sealer: Option<Sealer>,
    ack: Arc<AckState>,
    shutdown: CancellationToken,
    conn_done: CancellationToken,
) {
    let mut sent = 0u64;
    let mut out = Outbound::new(sealer);
    let mut buf = BytesMut::with_capacity(64);
    loop {
        let (closing, conn_ended) = loop {
            // Declare ourselves idle (and whether the delay timer runs), then look
            // again, so a take that lands in between is not missed: it either sees
            // `idle` and wakes us if needed, or we see it here.
            let before = ack.taken.load(Ordering::SeqCst);
            let pending = before > sent;
            ack.timer.store(pending, Ordering::SeqCst);
            ack.idle.store(true, Ordering::SeqCst);
            let taken = ack.taken.load(Ordering::SeqCst);
            let ended = (shutdown.is_cancelled(), conn_done.is_cancelled());
            if ack.due(taken) || ended.0 || ended.1 {
                ack.idle.store(false, Ordering::SeqCst);
                break ended;
            }
            if taken != before {
                ack.idle.store(false, Ordering::SeqCst);
                continue;
            }
            // Order matters: a take that raced with shutdown is still acknowledged.
            let woke = tokio::select! {
                biased;
                _ = ack.notify.notified() => None,
                _ = shutdown.cancelled() => Some((true, false)),
                _ = conn_done.cancelled() => Some((false, true)),
                _ = tokio::time::sleep(ACK_DELAY), if pending => Some((false, false)),
            };
            ack.idle.store(false, Ordering::SeqCst);
            if let Some(r) = woke {
                break r;
            }
            // Woken by a take or a request: look again.
        };
        let up = ack.taken.load(Ordering::Acquire);
        buf.clear();
        if up > sent {
            out.put(&mut buf, Kind::Ack, Flags(0), &up.to_be_bytes());
            sent = up;
            ack.sent.store(up, Ordering::Release);
        }
        if closing {
            out.put(&mut buf, Kind::Bye, Flags(0), &[]);
        }
        if !buf.is_empty() && wr.write_all(&buf).await.is_err() {
            return;
        }
        if closing || conn_ended {
            let _ = wr.shutdown().await;
            return;
        }
    }
}
