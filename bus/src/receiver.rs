//! The receiving end: binds a port, registers its handle, hands events to the
//! application and acknowledges them once the application has taken them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::discovery::Announcement;
use crate::discovery::Discovery;
use crate::epm::{Epm, EpmError};
use crate::gate::{HandshakeGate, HandshakeSlot};
use crate::handshake;
use crate::message::Message;
use crate::pool::Pool;
use crate::registry::{record_now, RegistryError};
use crate::security::{Resolved, Security};
use crate::stats::{ReceiverCounters, ReceiverStats, RejectKind};
use ipcbus_proto::codec::CodecV1;
use ipcbus_proto::crypto::{Sealer, TAG_LEN};
use ipcbus_proto::frame::{
    DecodeError, Flags, Header, Kind, DEFAULT_MAX_FRAME, HEADER_LEN, LEN_PREFIX,
};
use ipcbus_proto::handle::Handle;
use ipcbus_proto::ids::{ReceiverId, SenderId};
use ipcbus_proto::session::{Inbound, Opened, Outbound};

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
    /// No security was set in code and the password or salt in the environment is
    /// unusable (see [`Credentials`](crate::Credentials)).
    #[error(transparent)]
    Credentials(#[from] crate::CredentialsError),
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
        let discovery = match self.discovery {
            Some(d) => d,
            None => Discovery::from_env()?,
        };
        let security = match self.security {
            Some(s) => s,
            None => Security::from_env()?,
        };
        let sec = discovery.resolve_security(&security)?;
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
        tasks.spawn(accept_loop(listener, shared, tx));
        let record = record_now(self.handle.clone(), advertised, id);
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

/// Smallest free space a read is given.
const MIN_READ: usize = 16 * 1024;
/// Reads start at this size and double, up to [`MAX_READ`], while they fill the buffer.
const FIRST_READ: usize = 64 * 1024;
/// Largest read, and so (but for a single larger frame) the largest batch.
const MAX_READ: usize = 256 * 1024;
/// A batch stops taking compressed frames once they inflate to this many bytes in all
/// (one frame may overshoot it by up to the maximum frame length).
const INFLATE_BUDGET: usize = 4 << 20;

/// The frames of one read from one connection, handed to the application through the
/// queue as one item. The frames were checked (kind, flags, order), opened and
/// inflated by the connection task; taking an event parses its header again and
/// slices its payload out of `data`, so it touches no shared state but the ack
/// counter, and costs no reference-count traffic between threads.
#[derive(Debug)]
struct Batch {
    /// Whole, checked Data frames; sealed ones opened in place (the tag left behind).
    data: Bytes,
    /// The inflated payloads of the compressed frames in `data`, in order.
    inflated: std::vec::IntoIter<Bytes>,
    sender: SenderId,
    ack: Arc<AckState>,
    /// The highest sequence of this sender taken so far: events at or below it come
    /// from a connection the sender has given up (it reported them failed) and are
    /// dropped, so a sender's events stay in order across its reconnects.
    floor: u64,
}

impl Batch {
    /// The next event of the batch. `data` holds only frames the connection task
    /// checked, so the checks here never fail; if they did, the batch just ends.
    fn next_message(&mut self) -> Option<Message> {
        let (end, header) = loop {
            let d = &self.data[..];
            let prefix = d.first_chunk::<LEN_PREFIX>()?;
            let end = LEN_PREFIX + u32::from_be_bytes(*prefix) as usize;
            let header = *d
                .get(LEN_PREFIX..LEN_PREFIX + HEADER_LEN)?
                .first_chunk::<HEADER_LEN>()?;
            if end > d.len() {
                return None;
            }
            // Checked by `Input::scan` already.
            let header = Header::parse(&header).ok()?;
            if header.kind == Kind::Data {
                break (end, header);
            }
            // An AckRequest, already acted on by the connection task.
            self.data.advance(end);
        };
        let Header { flags, seq, .. } = header;
        let body_end = if flags.sealed() { end - TAG_LEN } else { end };
        let payload = if flags.compressed() {
            self.inflated.next()?
        } else {
            self.data.slice(LEN_PREFIX + HEADER_LEN..body_end)
        };
        self.data.advance(end);
        Some(Message {
            payload,
            sender: self.sender,
            seq,
        })
    }
}

/// Spare read buffers a connection keeps for its next reads.
const POOLED: usize = 4;

/// The read side of one sender connection: the read buffer, and how far into it the
/// frames are checked.
struct Input {
    codec: CodecV1,
    /// Kind, order and seal checks, opening and inflation of each frame.
    session: Inbound,
    buf: Vec<u8>,
    /// `buf[..checked]` holds whole, checked frames.
    checked: usize,
    inflated: Vec<Bytes>,
    read_size: usize,
    pool: Arc<Pool>,
}

impl Input {
    fn new(codec: CodecV1, opener: Option<Sealer>, already: BytesMut) -> Input {
        let mut buf = Vec::with_capacity(FIRST_READ.max(already.len()));
        buf.extend_from_slice(&already);
        Input {
            session: Inbound::events(opener, codec.max_frame()),
            codec,
            buf,
            checked: 0,
            inflated: Vec::new(),
            read_size: FIRST_READ,
            pool: Pool::new(POOLED, usize::MAX),
        }
    }

    /// Checks every complete frame after `checked` through the session: a Data frame
    /// (or an AckRequest, acted on at once), in order, sealed exactly when the
    /// connection is, opened in place, inflated if compressed. Then
    /// checks what has arrived of the next, incomplete frame.
    ///
    /// Returns `true` when it stopped early because the batch already holds
    /// [`INFLATE_BUDGET`] inflated bytes: complete frames are left to scan after this
    /// batch is handed over, so a burst of small frames that each inflate to the
    /// maximum cannot pile up in one batch.
    fn scan(&mut self, ack: &AckState) -> Result<bool, DecodeError> {
        let mut inflated_bytes: usize = self.inflated.iter().map(Bytes::len).sum();
        loop {
            let rest = &self.buf[self.checked..];
            let Some(len) = self.codec.check_front(rest)? else {
                return Ok(false);
            };
            if rest.len() < LEN_PREFIX + len {
                return Ok(false);
            }
            if inflated_bytes >= INFLATE_BUDGET {
                return Ok(true);
            }
            let start = self.checked + LEN_PREFIX;
            let frame = &mut self.buf[start..start + len];
            let (header, body) = frame.split_at_mut(HEADER_LEN);
            let header = header
                .first_chunk::<HEADER_LEN>()
                .ok_or(DecodeError::TooShort { len })?;
            match self.session.open_in_place(Header::parse(header)?, body)? {
                Opened::Plain(_) => {}
                Opened::Inflated(inflated) => {
                    inflated_bytes += inflated.len();
                    self.inflated.push(inflated.into());
                }
                // Acted on now and left in the buffer; the batch skips it.
                Opened::AckRequest(up_to) => ack.request(up_to),
            }
            self.checked = start + len;
        }
    }

    /// The checked frames as a batch, if there are any. The bytes of an incomplete
    /// frame after them move to the next buffer.
    fn take_batch(&mut self, sender: SenderId, ack: &Arc<AckState>) -> Option<Batch> {
        if self.checked == 0 {
            return None;
        }
        let tail = self.buf.len() - self.checked;
        let mut next = self.pool.get(self.read_size.max(tail + MIN_READ));
        next.extend_from_slice(&self.buf[self.checked..]);
        self.buf.truncate(self.checked);
        self.checked = 0;
        let full = std::mem::replace(&mut self.buf, next);
        Some(Batch {
            data: self.pool.share(full),
            inflated: std::mem::take(&mut self.inflated).into_iter(),
            sender,
            ack: ack.clone(),
            floor: 0,
        })
    }

    /// Makes room for the next read: the whole of an incomplete frame whose length is
    /// known (that length was checked against the maximum), else at least `MIN_READ`.
    fn make_room(&mut self) -> Result<(), DecodeError> {
        let want = match self.codec.check_front(&self.buf)? {
            Some(len) => (LEN_PREFIX + len).saturating_sub(self.buf.len()),
            None => 0,
        };
        if self.buf.capacity() - self.buf.len() < want.max(MIN_READ) {
            self.buf.reserve(want.max(self.read_size));
        }
        Ok(())
    }

    /// Reads grow while they fill the space they are given, up to `MAX_READ`.
    fn grow_if_full(&mut self, n: usize) {
        if n >= self.read_size && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
    }
}

/// Acknowledge at once after this many events taken since the last ack.
const ACK_EVERY: u64 = 1024;
/// Acknowledge what was taken at the latest this long after the first event not
/// acknowledged, when neither [`ACK_EVERY`] nor a sender's request came first.
///
/// Nobody waits for these acks (a waiting sender asks), so the delay only sets how
/// stale a sender's view may get. Not shorter: a timer a millisecond away is the
/// earliest one on the CPU, so every sleep of the process reprograms the hardware
/// timer (a VM exit here); with 1 ms a ping-pong on busy CPUs took 1.8-2.1x plain
/// TCP's round trip, with 10 ms 1.27-1.32x, with 20 ms 1.23-1.28x.
const ACK_DELAY: Duration = Duration::from_millis(20);

/// Shared between the application side (which takes events), the connection task
/// (which sees the sender's AckRequests) and the connection's ack writer.
///
/// Acknowledgements are batched: one per [`ACK_EVERY`] events, or [`ACK_DELAY`] after
/// the first event taken and not acknowledged, or at once when the application takes
/// an event the sender asked about (someone there waits for its report, or its window
/// is full). So a stream of events, or a ping-pong whose reports nobody waits for,
/// costs the receiver one ack per 1,024 events or per 20 ms rather than one per
/// event, and a
/// `send` still gets its report one round trip after the event is taken.
#[derive(Debug)]
struct AckState {
    /// Highest sequence number the application has taken from this connection.
    taken: AtomicU64,
    /// Highest sequence number acknowledged (written by the ack writer).
    sent: AtomicU64,
    /// Highest sequence number the sender asked to have acknowledged promptly.
    wanted: AtomicU64,
    /// Whether the ack writer sleeps and needs a wake-up.
    idle: AtomicBool,
    /// Whether the sleeping ack writer's delay timer runs (else the first event taken
    /// after an ack wakes it, to start the timer).
    timer: AtomicBool,
    notify: Notify,
}

impl Default for AckState {
    fn default() -> Self {
        AckState {
            taken: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            wanted: AtomicU64::new(0),
            idle: AtomicBool::new(false),
            timer: AtomicBool::new(false),
            notify: Notify::new(),
        }
    }
}

impl AckState {
    fn take(&self, seq: u64) {
        self.taken.store(seq, Ordering::SeqCst);
        if self.idle.load(Ordering::SeqCst)
            && (!self.timer.load(Ordering::SeqCst) || self.due(seq))
            && self.idle.swap(false, Ordering::AcqRel)
        {
            self.notify.notify_one();
        }
    }

    /// Whether having taken up to `taken` calls for an ack now.
    fn due(&self, taken: u64) -> bool {
        let sent = self.sent.load(Ordering::Acquire);
        if taken <= sent {
            return false;
        }
        // SeqCst with the stores in `take` and `request`: each of the two sides
        // sees the other's store (a store-then-load pattern on both sides).
        let wanted = self.wanted.load(Ordering::SeqCst);
        taken - sent >= ACK_EVERY || (wanted > sent && taken >= wanted)
    }

    /// The sender asks for a prompt ack of the events up to `up_to`.
    fn request(&self, up_to: u64) {
        self.wanted.fetch_max(up_to, Ordering::SeqCst);
        let taken = self.taken.load(Ordering::SeqCst);
        if self.idle.load(Ordering::SeqCst)
            && self.due(taken)
            && self.idle.swap(false, Ordering::AcqRel)
        {
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
            security: None,
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
                shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
                // Admit it among the half-open connections first: a flood of
                // handshakes that never finish evicts itself, not the senders.
                let Some((slot, permit, evicted)) =
                    shared.half_open.admit_under(&shared.conn_limit).await
                else {
                    tracing::warn!(%peer, handle = %shared.handle, "connection limit reached; closing new connection");
                    shared.counters.reject(RejectKind::Busy);
                    continue;
                };
                if evicted {
                    tracing::warn!(%peer, handle = %shared.handle, "too many unfinished handshakes; evicted the oldest");
                }
                let _ = sock.set_nodelay(true);
                let shared2 = shared.clone();
                let tx = tx.clone();
                shared.tasks.spawn(async move {
                    serve(sock, peer, shared2, tx, slot).await;
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

async fn serve(
    sock: TcpStream,
    peer: SocketAddr,
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
    let mut rd = rd;
    let mut input = Input::new(CodecV1::new(shared.max_frame), est.rx, est.read_buf);
    let result: Result<(), DecodeError> = loop {
        // Validate (and open, and inflate) every complete frame read so far, then hand
        // them over as one batch: one queue item per read, not per event.
        // Frames before a bad one still reach the application.
        let scanned = input.scan(&ack);
        if let Some(b) = input.take_batch(sender, &ack) {
            tokio::select! {
                _ = shared.shutdown.cancelled() => break Ok(()),
                r = tx.send(b) => if r.is_err() { break Ok(()) },
            }
        }
        match scanned {
            Err(e) => break Err(e),
            // Complete frames are still waiting behind the inflate budget.
            Ok(true) => continue,
            Ok(false) => {}
        }
        if let Err(e) = input.make_room() {
            break Err(e);
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => break Ok(()),
            r = rd.read_buf(&mut input.buf) => match r {
                Ok(0) | Err(_) => break Ok(()),
                Ok(n) => {
                    // One add per read (up to 256 KiB), not per event.
                    counters.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                    input.grow_if_full(n)
                }
            },
        }
    };
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
    mut wr: OwnedWriteHalf,
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

#[cfg(test)]
mod tests {
    use super::*;
    use ipcbus_proto::codec::put_frame;
    use ipcbus_proto::compress::gzip;

    #[test]
    fn acks_are_batched_unless_requested() {
        let ack = AckState::default();
        assert!(!ack.due(0));
        // A few events taken: not due (the delay timer covers them).
        assert!(!ack.due(10));
        // Enough events since the last ack: due.
        assert!(ack.due(ACK_EVERY));
        ack.sent.store(ACK_EVERY, Ordering::SeqCst);
        assert!(!ack.due(ACK_EVERY));
        // A request for an event not taken yet: due once it is taken, not before.
        ack.request(ACK_EVERY + 5);
        assert!(!ack.due(ACK_EVERY + 4));
        assert!(ack.due(ACK_EVERY + 5));
        ack.sent.store(ACK_EVERY + 5, Ordering::SeqCst);
        // Satisfied: later takes are batched again.
        assert!(!ack.due(ACK_EVERY + 6));
    }

    #[test]
    fn a_request_wakes_a_sleeping_ack_writer_only_when_due() {
        let ack = AckState::default();
        ack.timer.store(true, Ordering::SeqCst);
        ack.idle.store(true, Ordering::SeqCst);
        ack.take(3);
        assert!(ack.idle.load(Ordering::SeqCst), "not due: left asleep");
        ack.request(2);
        assert!(!ack.idle.load(Ordering::SeqCst), "due: woken");
        // Without the timer running, the first take wakes it (to start the timer).
        let ack = AckState::default();
        ack.idle.store(true, Ordering::SeqCst);
        ack.take(1);
        assert!(!ack.idle.load(Ordering::SeqCst));
    }

    #[test]
    fn an_ack_request_is_acted_on_and_skipped_in_the_batch() {
        let mut wire = BytesMut::new();
        put_frame(&mut wire, Kind::Data, Flags(0), 1, b"one");
        put_frame(
            &mut wire,
            Kind::AckRequest,
            Flags(0),
            1,
            &1u64.to_be_bytes(),
        );
        put_frame(&mut wire, Kind::Data, Flags(0), 2, b"two");
        let ack = Arc::new(AckState::default());
        let mut input = Input::new(CodecV1::default(), None, wire);
        assert!(!input.scan(&ack).unwrap());
        assert_eq!(ack.wanted.load(Ordering::SeqCst), 1);
        let mut b = input.take_batch(SenderId([1; 16]), &ack).unwrap();
        let got: Vec<_> = std::iter::from_fn(|| b.next_message())
            .map(|m| (m.seq, m.into_payload()))
            .collect();
        assert_eq!(got, vec![(1, Bytes::from("one")), (2, Bytes::from("two"))]);
        // A replayed request is refused.
        let mut wire = BytesMut::new();
        put_frame(
            &mut wire,
            Kind::AckRequest,
            Flags(0),
            4,
            &9u64.to_be_bytes(),
        );
        put_frame(
            &mut wire,
            Kind::AckRequest,
            Flags(0),
            4,
            &9u64.to_be_bytes(),
        );
        let mut input = Input::new(CodecV1::default(), None, wire);
        assert!(matches!(
            input.scan(&ack),
            Err(DecodeError::OutOfOrder { seq: 4, last: 4 })
        ));
    }

    #[test]
    fn a_batch_stops_at_the_inflate_budget() {
        // Ten small frames that each inflate to 1 MiB: one read's worth of bytes.
        let one_mib = gzip(&vec![0u8; 1 << 20], 9).expect("compressible");
        let mut wire = BytesMut::new();
        for seq in 1..=10u64 {
            put_frame(
                &mut wire,
                Kind::Data,
                Flags(Flags::COMPRESSED),
                seq,
                &one_mib,
            );
        }
        let mut input = Input::new(CodecV1::new(DEFAULT_MAX_FRAME), None, wire);
        let ack = Arc::new(AckState::default());
        let sender = SenderId([1; 16]);
        let mut sizes = Vec::new();
        for _ in 0..10 {
            let more = input.scan(&ack).expect("valid frames");
            let inflated: usize = input.inflated.iter().map(Bytes::len).sum();
            assert!(
                inflated <= INFLATE_BUDGET,
                "batch holds {inflated} inflated bytes"
            );
            let Some(b) = input.take_batch(sender, &ack) else {
                break;
            };
            sizes.push(b.inflated.len());
            if !more {
                break;
            }
        }
        assert_eq!(sizes, vec![4, 4, 2], "batches of at most 4 MiB inflated");
    }
}
