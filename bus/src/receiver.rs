//! The receiving end: binds a port, registers its handle, hands events to the
//! application and acknowledges them once the application has taken them.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{FutureExt, Stream, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::discovery::Announcement;
use crate::discovery::Discovery;
use crate::epm::{Epm, EpmError};
use crate::handle::Handle;
use crate::handshake;
use crate::ids::ReceiverId;
use crate::message::Message;
use crate::proto::codec::{put_frame, CodecV1};
use crate::proto::compress::gunzip;
use crate::proto::crypto::Sealer;
use crate::proto::frame::{DecodeError, Flags, Kind, DEFAULT_MAX_FRAME};
use crate::registry::{Record, RegistryError};
use crate::security::{Resolved, Security};

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
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    /// The endpoint manager could not be used (unreachable, wrong password, refused).
    #[error("epm: {0}")]
    Epm(#[from] EpmError),
}

/// Configures and binds a [`Receiver`].
#[derive(Debug, Clone)]
pub struct ReceiverBuilder {
    handle: Handle,
    ip: Option<IpAddr>,
    ports: Vec<u16>,
    queue_capacity: usize,
    security: Security,
    max_frame: usize,
    max_connections: usize,
    handshake_timeout: Duration,
    discovery: Option<Discovery>,
}

impl ReceiverBuilder {
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

    /// About how many received events may wait for the application (default 1024):
    /// events wait in up to `n / 32` batches of at most 128 events or 256 KiB each.
    /// When full, the receiver stops reading its sockets and senders feel
    /// backpressure.
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = n.max(1);
        self
    }

    /// Authentication and encryption (default [`Security::LocalUser`]).
    pub fn security(mut self, security: Security) -> Self {
        self.security = security;
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

    /// Binds the port, registers the handle, and starts accepting senders.
    ///
    /// # Errors
    /// [`BindError`] when no allowed port is free, the address cannot be bound, or the
    /// registry cannot be used.
    pub async fn bind(self) -> Result<Receiver, BindError> {
        let discovery = match self.discovery {
            Some(d) => d,
            None => Discovery::from_env()?,
        };
        let sec = discovery.resolve_security(&self.security)?;
        let ip = discovery.bind_ip(self.ip).await?;
        let listener = bind_first(ip, &self.ports).await?;
        let bound = listener.local_addr().map_err(|source| BindError::Bind {
            addr: SocketAddr::new(ip, 0),
            source,
        })?;
        let mut advertised = bound;
        if ip.is_unspecified() {
            advertised.set_ip(discovery.advertise_ip().await?);
        }
        let id = ReceiverId::random();
        let (tx, rx) = mpsc::channel((self.queue_capacity / 32).max(1));
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
        });
        tasks.spawn(accept_loop(listener, shared, tx));
        let record = Record::new(self.handle.clone(), advertised, id);
        let registration = match discovery.register(&record).await {
            Ok(r) => r,
            Err(e) => {
                shutdown.cancel();
                return Err(e.into());
            }
        };
        tracing::debug!(handle = %self.handle, addr = %advertised, receiver = %id, "receiver registered");
        Ok(Receiver {
            handle: self.handle,
            id,
            local_addr: advertised,
            rx,
            current: None,
            registration: Some(registration),
            shutdown,
            tasks,
        })
    }
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
    local_addr: SocketAddr,
    rx: mpsc::Receiver<Batch>,
    current: Option<Batch>,
    registration: Option<Announcement>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// Most events one connection hands over at once.
const BATCH: usize = 128;
/// A batch is handed over once its payloads reach this many bytes.
const BATCH_BYTES: usize = 256 * 1024;

/// Events decoded from one connection in one go, handed to the application through
/// the queue as one item; taking events from it touches no shared state but the ack
/// counter.
#[derive(Debug)]
struct Batch {
    msgs: std::vec::IntoIter<Message>,
    ack: Arc<AckState>,
}

/// Shared between the application side (which takes events) and a connection's ack
/// writer.
#[derive(Debug, Default)]
struct AckState {
    /// Highest sequence number the application has taken from this connection.
    taken: AtomicU64,
    /// Whether the ack writer sleeps and needs a wake-up.
    idle: AtomicBool,
    notify: Notify,
}

impl AckState {
    fn take(&self, seq: u64) {
        self.taken.store(seq, Ordering::Release);
        if self.idle.load(Ordering::Acquire) && self.idle.swap(false, Ordering::AcqRel) {
            self.notify.notify_one();
        }
    }
}

impl Receiver {
    /// Starts configuring a receiver for `handle`.
    pub fn builder(handle: Handle) -> ReceiverBuilder {
        ReceiverBuilder {
            handle,
            ip: None,
            ports: Vec::new(),
            queue_capacity: 1024,
            security: Security::default(),
            max_frame: DEFAULT_MAX_FRAME,
            max_connections: 256,
            handshake_timeout: Duration::from_secs(5),
            discovery: None,
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
            self.current = Some(self.rx.try_recv().ok()?);
        }
    }

    fn take_current(&mut self) -> Option<Message> {
        let b = self.current.as_mut()?;
        match b.msgs.next() {
            Some(m) => {
                b.ack.take(m.seq);
                Some(m)
            }
            None => {
                self.current = None;
                None
            }
        }
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        loop {
            if let Some(m) = self.take_current() {
                return Poll::Ready(Some(m));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(b)) => self.current = Some(b),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// The address senders connect to (as registered).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The handle this receiver serves.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// This receiver's identity.
    pub fn id(&self) -> ReceiverId {
        self.id
    }

    /// Unregisters, tells connected senders it is leaving, and closes every
    /// connection. Events not yet taken are not acknowledged, so their senders report
    /// them failed.
    pub async fn close(mut self) {
        if let Some(mut r) = self.registration.take() {
            r.remove();
        }
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
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tx: mpsc::Sender<Batch>) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((sock, peer)) => {
                backoff = Duration::from_millis(10);
                let Ok(permit) = shared.conn_limit.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, handle = %shared.handle, "connection limit reached; closing new connection");
                    continue;
                };
                let _ = sock.set_nodelay(true);
                let shared2 = shared.clone();
                let tx = tx.clone();
                shared.tasks.spawn(async move {
                    serve(sock, peer, shared2, tx).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // Out of file descriptors and similar: wait instead of spinning.
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn serve(sock: TcpStream, peer: SocketAddr, shared: Arc<Shared>, tx: mpsc::Sender<Batch>) {
    let hs = tokio::time::timeout(
        shared.handshake_timeout,
        handshake::accept(
            sock,
            &shared.handle,
            shared.id,
            &shared.sec,
            shared.max_frame,
        ),
    )
    .await;
    let (est, sender) = match hs {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::warn!(%peer, handle = %shared.handle, error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, handle = %shared.handle, "handshake timed out");
            return;
        }
    };
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
    let mut frames = FramedRead::with_capacity(rd, CodecV1::new(shared.max_frame), 64 * 1024);
    frames.read_buffer_mut().extend_from_slice(&est.read_buf);
    let mut last = 0u64;
    let mut batch: Vec<Message> = Vec::with_capacity(BATCH);
    let mut batch_bytes = 0usize;
    let result: Result<(), DecodeError> = loop {
        // Hand over what is decoded once no further frame is ready at once.
        let next = if batch.is_empty() {
            tokio::select! {
                _ = shared.shutdown.cancelled() => break Ok(()),
                f = frames.next() => f,
            }
        } else {
            match frames.next().now_or_never() {
                Some(f) if batch.len() < BATCH && batch_bytes < BATCH_BYTES => f,
                not_ready => {
                    let b = Batch {
                        msgs: std::mem::replace(&mut batch, Vec::with_capacity(BATCH)).into_iter(),
                        ack: ack.clone(),
                    };
                    batch_bytes = 0;
                    tokio::select! {
                        _ = shared.shutdown.cancelled() => break Ok(()),
                        r = tx.send(b) => if r.is_err() { break Ok(()) },
                    }
                    match not_ready {
                        Some(f) => f,
                        None => continue,
                    }
                }
            }
        };
        let mut f = match next {
            None => break Ok(()),
            Some(Err(e)) => break Err(e),
            Some(Ok(f)) => f,
        };
        if f.kind != Kind::Data {
            break Err(DecodeError::Unexpected {
                got: f.kind,
                expected: "Data",
            });
        }
        if f.seq <= last {
            break Err(DecodeError::OutOfOrder { seq: f.seq, last });
        }
        match &est.rx {
            Some(s) => {
                if let Err(e) = s.open(&mut f) {
                    break Err(e);
                }
            }
            None if f.flags.sealed() => break Err(DecodeError::SealMismatch),
            None => {}
        }
        last = f.seq;
        let payload: Bytes = if f.flags.compressed() {
            match gunzip(&f.body, shared.max_frame) {
                Ok(v) => v.into(),
                Err(e) => break Err(e),
            }
        } else {
            f.body.freeze()
        };
        batch_bytes += payload.len();
        batch.push(Message {
            payload,
            sender,
            seq: f.seq,
        });
    };
    // Events decoded before the connection ended still reach the application.
    if !batch.is_empty() && !shared.shutdown.is_cancelled() {
        let b = Batch {
            msgs: batch.into_iter(),
            ack: ack.clone(),
        };
        tokio::select! {
            _ = shared.shutdown.cancelled() => {}
            _ = tx.send(b) => {}
        }
    }
    if let Err(e) = result {
        tracing::warn!(%peer, handle = %shared.handle, %sender, error = %e, "closing connection on bad input");
    }
    conn_done.cancel();
    let _ = acker.await;
}

/// Writes cumulative acknowledgements as the application takes events; on receiver
/// shutdown, writes a last ack and `Bye`.
async fn ack_writer(
    mut wr: OwnedWriteHalf,
    sealer: Option<Sealer>,
    ack: Arc<AckState>,
    shutdown: CancellationToken,
    conn_done: CancellationToken,
) {
    let mut sent = 0u64;
    let mut frame_seq = 0u64;
    let mut buf = BytesMut::with_capacity(64);
    let put = |buf: &mut BytesMut, kind: Kind, body: &[u8], frame_seq: &mut u64| {
        *frame_seq += 1;
        match &sealer {
            Some(s) => s.put_sealed(buf, kind, Flags(0), *frame_seq, body),
            None => put_frame(buf, kind, Flags(0), *frame_seq, body),
        }
    };
    loop {
        // Declare ourselves idle, then look again, so a take that lands in between
        // is not missed (it either sees `idle` and wakes us, or we see it here).
        ack.idle.store(true, Ordering::SeqCst);
        let (closing, conn_ended) = if ack.taken.load(Ordering::SeqCst) > sent {
            ack.idle.store(false, Ordering::SeqCst);
            (shutdown.is_cancelled(), conn_done.is_cancelled())
        } else {
            // Order matters: a take that raced with shutdown is still acknowledged.
            let r = tokio::select! {
                biased;
                _ = ack.notify.notified() => (false, false),
                _ = shutdown.cancelled() => (true, false),
                _ = conn_done.cancelled() => (false, true),
            };
            ack.idle.store(false, Ordering::SeqCst);
            r
        };
        if !closing && !conn_ended {
            // Let a burst of takes accumulate into one ack.
            tokio::task::yield_now().await;
        }
        let up = ack.taken.load(Ordering::Acquire);
        buf.clear();
        if up > sent {
            put(&mut buf, Kind::Ack, &up.to_be_bytes(), &mut frame_seq);
            sent = up;
        }
        if closing {
            put(&mut buf, Kind::Bye, &[], &mut frame_seq);
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
