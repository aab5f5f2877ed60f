//! The sending end: discovers the receivers of a handle, keeps one connection and one
//! writer task per receiver, and fans each event out to all of them.
//!
//! Hot path: `publish` assigns the sequence number, compresses once, and appends the
//! encoded frame to the sender's stage under a short, uncontended lock; nothing is
//! allocated per event and nothing is done per receiver. Whole chunks of the stage
//! (up to 128 KiB) are handed to every receiver connection as one shared `Bytes`
//! (see [`Stage`] for when). Each connection's writer task takes every chunk queued
//! for it at once (write batching), seals them if the connection is encrypted (the
//! one per-connection transform), and writes them with one vectored call. Receivers
//! acknowledge cumulatively, so a connection's state is two counters: the highest
//! sequence queued and the highest acknowledged. A [`PendingReport`] is resolved from
//! those counters: acknowledged when the receiver's ack reaches the event, failed when
//! the connection died first. Nothing is kept per in-flight event, so memory is
//! bounded by the per-receiver window and buffer limits.
//!
//! By concern:
//! - this module: the public API (`Sender`, `SenderBuilder`, `PendingReport`,
//!   `SenderEvents`), the state the sender and its tasks share, connecting to a
//!   receiver, and tracking the discovered receivers;
//! - [`fanout`]: the I/O-free core: the stage and its chunks, each connection's
//!   window, queue, outcomes, waiters and counters;
//! - [`conn`]: the connection driver, a write loop and a read loop over any byte
//!   stream.

mod conn;
mod fanout;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::conn::{Link, Session};
use self::fanout::{
    acked_events, fold_settled, lock_out, lock_stage, ConnTotals, Destination, Limits, Segment,
    SpinMutex, Stage, Window,
};
use crate::discovery::{Discovery, DiscoveryError};
use crate::epm::{Epm, EpmError};
use crate::handshake::{self, Established, HandshakeError};
use crate::registry::{LocalRegistry, Record, RegistryError};
use crate::report::{FailReason, ReceiverInfo, SendReport, SenderEvent};
use crate::security::{Resolved, Security};
use crate::stats::SenderStats;
use crate::transport::{ByteStream, Endpoint, Transport};
use ipcbus_proto::compress::{CompressPolicy, Gzipper, DEFAULT_THRESHOLD};
pub use ipcbus_proto::compress::{Compression, CompressionStats};
use ipcbus_proto::crypto::TAG_LEN;
use ipcbus_proto::frame::{
    Flags, Header, Kind, RejectReason, DEFAULT_MAX_FRAME, HEADER_LEN, LEN_PREFIX,
};
use ipcbus_proto::handle::Handle;
use ipcbus_proto::ids::{ReceiverId, SenderId};
use sha2::{Digest, Sha256};

/// Why an event could not be sent at all (per-receiver failures go in the
/// [`SendReport`] instead).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The payload is larger than the maximum frame allows.
    #[error("payload of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// Largest payload allowed.
        max: usize,
    },
    /// The value could not be serialized with postcard.
    #[error("cannot serialize the event: {0}")]
    Encode(#[from] postcard::Error),
}

/// Why a sender could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The registry could not be used.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The EPM could not be reached or refused the watch.
    #[error(transparent)]
    Epm(#[from] EpmError),
    /// etcd could not be read or watched (unavailable, access denied, malformed
    /// `IPCBUS_ETCD`).
    #[error(transparent)]
    Etcd(#[from] crate::EtcdError),
    /// No security was set in code and the password or salt in the environment is
    /// unusable (see [`Credentials`](crate::Credentials)).
    #[error(transparent)]
    Credentials(#[from] crate::CredentialsError),
}

impl From<DiscoveryError> for BuildError {
    fn from(e: DiscoveryError) -> Self {
        match e {
            DiscoveryError::Registry(e) => e.into(),
            DiscoveryError::Epm(e) => e.into(),
            DiscoveryError::Etcd(e) => e.into(),
        }
    }
}

/// Configures and builds a [`Sender`].
#[derive(Debug, Clone)]
pub struct SenderBuilder {
    handle: Handle,
    security: Option<Security>,
    compression: Compression,
    compress_threshold: usize,
    compress_level: u32,
    send_timeout: Duration,
    connect_timeout: Duration,
    window: u64,
    buffer_limit: usize,
    max_frame: usize,
    rescan_interval: Duration,
    discovery: Option<Discovery>,
    endpoints: Vec<Endpoint>,
}

impl SenderBuilder {
    /// Sends to the receiver at `endpoint` (call again for more), with no discovery:
    /// no registry is read and no EPM asked, the way a client connects to a named
    /// pipe or a known port. Reconnects with backoff when the connection drops, as
    /// for discovered receivers. The security still defaults as for discovery (the
    /// per-user secret, or the password and salt of the environment), so the
    /// receiver must use the same.
    ///
    /// ```
    /// use ipcbus::{Endpoint, Receiver, Sender, Transport};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let path = std::env::temp_dir().join(format!("ipcbus-doc-to-{}.sock", std::process::id()));
    /// let at = Endpoint::unix(&path);
    /// let mut rx = Receiver::builder("docs.known".parse()?).bind_at(at.clone()).bind().await?;
    /// let mut tx = Sender::builder("docs.known".parse()?).endpoint(at).build().await?;
    /// tx.wait_for_receivers(1, std::time::Duration::from_secs(5)).await;
    /// let pending = tx.publish_bytes("over a unix socket").await?;
    /// assert_eq!(&rx.recv().await.unwrap().payload()[..], b"over a unix socket");
    /// let report = pending.await;
    /// assert_eq!(report.acked[0].endpoint.transport(), Transport::Unix);
    /// # Ok(()) }
    /// ```
    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoints.push(endpoint);
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

    /// Forces gzip of the payloads at or above the threshold on (`true`:
    /// [`Compression::Always`]) or off (`false`: [`Compression::Never`]). The default
    /// is [`Compression::Auto`]: off while every receiver is on loopback, on otherwise,
    /// skipped while recent events do not compress.
    pub fn compress(self, on: bool) -> Self {
        self.compression(if on {
            Compression::Always
        } else {
            Compression::Never
        })
    }

    /// When to gzip the payloads at or above the threshold (default
    /// [`Compression::Auto`]). [`Sender::compression_stats`] tells what was done.
    pub fn compression(mut self, c: Compression) -> Self {
        self.compression = c;
        self
    }

    /// Payloads of at least this many bytes are compressed, as [`SenderBuilder::compression`]
    /// decides (default 512).
    pub fn compress_threshold(mut self, bytes: usize) -> Self {
        self.compress_threshold = bytes;
        self
    }

    /// gzip level, 0 (none) to 9 (smallest) (default 1, fastest).
    pub fn compress_level(mut self, level: u32) -> Self {
        self.compress_level = level.min(9);
        self
    }

    /// How long a receiver may leave an event unacknowledged, or keep its queue full,
    /// before it is reported failed and disconnected (default 10 s).
    pub fn send_timeout(mut self, d: Duration) -> Self {
        self.send_timeout = d;
        self
    }

    /// Time allowed to connect and finish the handshake (default 5 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Per-receiver queue capacity: how many events may be sent to one receiver and
    /// not yet acknowledged before `publish` waits (default 65,536).
    pub fn queue_capacity(mut self, events: usize) -> Self {
        self.window = events.max(1) as u64;
        self
    }

    /// Per-receiver limit of encoded bytes waiting to be written before `publish`
    /// waits (default 8 MiB; at least one maximal frame always fits).
    pub fn buffer_limit(mut self, bytes: usize) -> Self {
        self.buffer_limit = bytes.max(64 * 1024);
        self
    }

    /// Largest frame to send; must not exceed the receivers' maximum (default 16 MiB).
    pub fn max_frame_len(mut self, n: usize) -> Self {
        self.max_frame = n.max(HEADER_LEN + TAG_LEN + 1);
        self
    }

    /// Period of the fallback rescan of the registry (default 2 s; changes are normally
    /// seen at once through inotify).
    pub fn rescan_interval(mut self, d: Duration) -> Self {
        self.rescan_interval = d.max(Duration::from_millis(10));
        self
    }

    /// Where to discover receivers (default: the local-user registry).
    pub fn discovery(mut self, d: Discovery) -> Self {
        self.discovery = Some(d);
        self
    }

    /// Discovers receivers through the endpoint manager: shorthand for
    /// `discovery(Discovery::Epm(epm))`.
    pub fn epm(self, epm: Epm) -> Self {
        self.discovery(Discovery::Epm(epm))
    }

    /// Discovers receivers in etcd: shorthand for `discovery(Discovery::Etcd(etcd))`.
    pub fn etcd(self, etcd: crate::Etcd) -> Self {
        self.discovery(Discovery::Etcd(etcd))
    }

    /// Starts discovery, connects to the receivers registered now, and returns.
    ///
    /// # Errors
    /// [`BuildError`] if the registry cannot be used.
    pub async fn build(self) -> Result<Sender, BuildError> {
        let discovery = match self.discovery {
            Some(d) => d,
            None => Discovery::from_env()?,
        };
        let security = match self.security {
            Some(s) => s,
            None => Security::from_env()?,
        };
        let sec = discovery.resolve_security(&security)?;
        let (events, _) = broadcast::channel(1024);
        let (ready_tx, ready_rx) = watch::channel(0usize);
        let (upd_tx, upd_rx) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let id = SenderId::random();
        let shared = Arc::new(Shared {
            handle: self.handle.clone(),
            id,
            sec,
            send_timeout: self.send_timeout,
            connect_timeout: self.connect_timeout,
            window: self.window,
            buffer_limit: self.buffer_limit.max(self.max_frame + LEN_PREFIX),
            max_frame: self.max_frame,
            events: events.clone(),
            ready: ready_tx,
            updates: upd_tx,
            updates_pending: AtomicBool::new(false),
            ended: Notify::new(),
            shutdown: shutdown.clone(),
            tasks: TaskTracker::new(),
            stage: SpinMutex::new(Stage::new()),
            connects: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            handshakes: AtomicU64::new(0),
        });
        match discovery {
            _ if !self.endpoints.is_empty() => {
                let disc = KnownEndpoints::new(shared.clone(), &self.endpoints);
                shared.tasks.spawn(disc.run());
            }
            Discovery::Local(reg) => {
                let mut disc = LocalDiscovery::new(shared.clone(), reg, self.rescan_interval);
                disc.rescan();
                shared.tasks.spawn(disc.run());
            }
            Discovery::Epm(epm) => {
                let disc = EpmDiscovery::start(shared.clone(), epm).await?;
                shared.tasks.spawn(disc.run());
            }
            Discovery::Etcd(etcd) => {
                let cancel = shared.shutdown.child_token();
                let records =
                    crate::etcd::session::watch(etcd, shared.handle.clone(), cancel).await?;
                shared
                    .tasks
                    .spawn(EpmDiscovery::follow(shared.clone(), records).run());
            }
        }
        let mut sender = Sender {
            shared,
            next_seq: 1,
            max_payload: self.max_frame - HEADER_LEN - TAG_LEN,
            compress: CompressPolicy::new(self.compression, self.compress_threshold),
            compress_level: self.compress_level,
            conns: Vec::new(),
            targets: Arc::from(Vec::new()),
            updates: upd_rx,
            ready: ready_rx,
            last_seq: 0,
            last_targets: None,
            gzipper: None,
            unyielded: 0,
            payload_bytes: 0,
            retired: Vec::new(),
            retired_totals: ConnTotals::default(),
            segments: VecDeque::new(),
            acked_events_done: 0,
        };
        sender.apply_updates();
        Ok(sender)
    }
}

/// The sending end of a handle.
///
/// A `Sender` is one ordered stream of events: sequence numbers start at 1 and every
/// receiver sees its events in that order. Use several senders for independent streams.
#[derive(Debug)]
pub struct Sender {
    shared: Arc<Shared>,
    next_seq: u64,
    max_payload: usize,
    compress: CompressPolicy,
    compress_level: u32,
    conns: Vec<Arc<Conn>>,
    targets: Arc<[Arc<Conn>]>,
    updates: mpsc::UnboundedReceiver<Update>,
    ready: watch::Receiver<usize>,
    /// The last event sent to at least one receiver, and its targets (kept without a
    /// reference-count update per event: replaced only when the targets change).
    last_seq: u64,
    last_targets: Option<Arc<[Arc<Conn>]>>,
    /// Compressor state kept across events (set up on first use).
    gzipper: Option<Gzipper>,
    /// Encoded bytes queued per receiver since `queue_bytes` last yielded.
    unyielded: usize,
    /// Payload bytes published (for [`Sender::stats`]).
    payload_bytes: u64,
    /// Connections no longer targeted whose counters may still move (their task has
    /// not finished); folded into `retired_totals` once it has.
    retired: Vec<Arc<Conn>>,
    /// The final counts of connections that are gone.
    retired_totals: ConnTotals,
    /// The runs of events published to one set of targets whose outcome may still
    /// change, oldest first (for [`SenderStats::acked_events`]).
    segments: VecDeque<Segment<Conn>>,
    /// Events acknowledged by all their targets in the segments already folded.
    acked_events_done: u64,
}

/// A publisher in full flow yields to the runtime after queuing this many bytes for
/// each receiver, so the writer tasks run and write them: on a single-threaded
/// runtime the yield sets the size of each write. Measured at 1 -> 5 and 1 -> 20 with
/// 64 B events: yielding every 128 events (tokio's cooperative budget, ~10 KiB per
/// write) gave 0.53 and 0.50 of plain TCP, every 64 KiB 0.74 and 0.59, every 128 KiB
/// 0.89 and 0.60, every 256 KiB 0.75 and 0.62.
const YIELD_BYTES: usize = 128 * 1024;

impl Sender {
    /// Starts configuring a sender for `handle`.
    pub fn builder(handle: Handle) -> SenderBuilder {
        SenderBuilder {
            handle,
            security: None,
            compression: Compression::Auto,
            compress_threshold: DEFAULT_THRESHOLD,
            compress_level: 1,
            send_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            window: 65_536,
            buffer_limit: 8 << 20,
            max_frame: DEFAULT_MAX_FRAME,
            rescan_interval: Duration::from_secs(2),
            discovery: None,
            endpoints: Vec::new(),
        }
    }

    /// Serializes `value` with postcard, sends it, and waits for its report.
    ///
    /// # Errors
    /// [`SendError`] if the value cannot be serialized or is too large. Receivers that
    /// fail are not errors: they are listed in the report.
    ///
    /// # Cancel safety
    /// Not cancel safe: if dropped, the event may have reached some receivers.
    pub async fn send<T: Serialize + ?Sized>(
        &mut self,
        value: &T,
    ) -> Result<SendReport, SendError> {
        Ok(self.publish(value).await?.await)
    }

    /// Sends raw bytes and waits for the report.
    ///
    /// # Errors
    /// [`SendError::TooLarge`].
    ///
    /// # Cancel safety
    /// Not cancel safe: if dropped, the event may have reached some receivers.
    pub async fn send_bytes(&mut self, payload: impl Into<Bytes>) -> Result<SendReport, SendError> {
        Ok(self.publish_bytes(payload).await?.await)
    }

    /// Serializes `value` and queues it for every known receiver; the returned future
    /// resolves to the report. Keep many in flight for throughput.
    ///
    /// # Errors
    /// As [`Sender::send`].
    pub async fn publish<T: Serialize + ?Sized>(
        &mut self,
        value: &T,
    ) -> Result<PendingReport, SendError> {
        let bytes = postcard::to_stdvec(value)?;
        self.publish_bytes(bytes).await
    }

    /// Queues raw bytes for every known receiver and returns a future of the report.
    ///
    /// Waits only while a receiver's window or buffer is full (backpressure), and at
    /// most the send timeout in all; a receiver still full then is reported failed and
    /// disconnected, so one slow receiver cannot hold the others up for longer.
    ///
    /// # Errors
    /// [`SendError::TooLarge`].
    ///
    /// # Cancel safety
    /// Not cancel safe: if dropped while waiting, the event may have been queued for
    /// some receivers only; its outcome for them is still acknowledged or failed.
    pub async fn publish_bytes(
        &mut self,
        payload: impl Into<Bytes>,
    ) -> Result<PendingReport, SendError> {
        let payload: Bytes = payload.into();
        let seq = self.queue_bytes(&payload).await?;
        Ok(PendingReport {
            seq,
            targets: (!self.targets.is_empty()).then(|| self.targets.clone()),
        })
    }

    /// Queues raw bytes for every known receiver, like [`Sender::publish_bytes`], but
    /// returns the event's sequence number instead of a report: the cheapest way to
    /// send many events (no report handle per event). Nothing is lost by it: every
    /// event a receiver did not acknowledge is reported by [`Sender::events`]
    /// (`SendFailed`, with the reason), [`Sender::flush`] waits until every event is
    /// acknowledged or failed, and [`Sender::last_report`] gives the outcome of the
    /// latest event.
    ///
    /// # Errors
    /// [`SendError::TooLarge`].
    ///
    /// # Cancel safety
    /// As [`Sender::publish_bytes`].
    ///
    /// The payload is only read (it is copied into each receiver's buffer), so a
    /// borrowed slice will do: no reference count traffic for a shared payload.
    pub async fn queue_bytes(&mut self, payload: impl AsRef<[u8]>) -> Result<u64, SendError> {
        let payload: &[u8] = payload.as_ref();
        if payload.len() > self.max_payload {
            return Err(SendError::TooLarge {
                len: payload.len(),
                max: self.max_payload,
            });
        }
        // Give the writer tasks a turn once a good write's worth is queued for each
        // receiver (and the rest of the runtime, as tokio's cooperative budget would).
        if self.unyielded >= YIELD_BYTES {
            self.unyielded = 0;
            lock_stage(&self.shared.stage).hand_over();
            tokio::task::yield_now().await;
        }
        if self.shared.updates_pending.load(Ordering::Relaxed) {
            self.apply_updates();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.payload_bytes += payload.len() as u64;
        if self.targets.is_empty() {
            // Nothing to write, but discovery must get its turn.
            tokio::task::consume_budget().await;
            return Ok(seq);
        }
        let zipped;
        let (flags, body) = if self.compress.should_compress(payload.len()) {
            let level = self.compress_level;
            let z = self
                .gzipper
                .get_or_insert_with(|| Gzipper::new(level))
                .gzip(payload);
            self.compress
                .record(payload.len(), z.as_ref().map(Vec::len));
            match z {
                Some(z) => {
                    zipped = z;
                    (Flags(Flags::COMPRESSED), &zipped[..])
                }
                None => (Flags(0), payload),
            }
        } else {
            (Flags(0), payload)
        };
        // Encoded once, into the stage every receiver's writer takes from: the work per
        // event does not grow with the number of receivers.
        let header = Header {
            kind: Kind::Data,
            flags,
            seq,
        }
        .to_bytes(body.len());
        let frame_len = header.len() + body.len();
        self.unyielded += frame_len;
        let mut stage = lock_stage(&self.shared.stage);
        if !stage.has_room(seq) {
            drop(stage);
            self.wait_for_room(seq).await;
            stage = lock_stage(&self.shared.stage);
        }
        stage.push(seq, &header, body);
        drop(stage);
        self.last_seq = seq;
        if !self
            .last_targets
            .as_ref()
            .is_some_and(|t| Arc::ptr_eq(t, &self.targets))
        {
            self.last_targets = Some(self.targets.clone());
        }
        Ok(seq)
    }

    /// A future of the report of the latest event that was sent to at least one
    /// receiver (an empty report with sequence number 0 if there was none).
    /// Receivers acknowledge in order, so a receiver it lists as acknowledged has
    /// taken every earlier event queued for it since it connected; any earlier event
    /// that one did not take was reported by [`Sender::events`] (`SendFailed`).
    pub fn last_report(&self) -> PendingReport {
        PendingReport {
            seq: self.last_seq,
            targets: self.last_targets.clone(),
        }
    }

    /// Waits until every event sent so far is acknowledged or reported failed.
    pub async fn flush(&mut self) {
        if self.last_targets.is_some() {
            self.last_report().await;
        }
    }

    /// Flushes (for at most the send timeout), then closes every connection.
    pub async fn close(mut self) {
        let t = self.shared.send_timeout;
        let _ = tokio::time::timeout(t, self.flush()).await;
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.shared.tasks.wait()).await;
    }

    /// Waits until at least `n` receivers are connected, or `timeout` passes; returns
    /// how many are connected.
    pub async fn wait_for_receivers(&mut self, n: usize, timeout: Duration) -> usize {
        let _ = tokio::time::timeout(timeout, self.ready.wait_for(|&c| c >= n)).await;
        self.apply_updates();
        let c = *self.ready.borrow();
        c
    }

    /// The receivers events are currently sent to (connected or connecting).
    pub fn receivers(&mut self) -> Vec<ReceiverInfo> {
        self.apply_updates();
        self.targets.iter().map(|c| c.info.clone()).collect()
    }

    /// A stream of [`SenderEvent`]s from now on. A subscriber that falls more than 1024
    /// events behind skips the oldest. See [`SenderEvents`].
    pub fn events(&self) -> SenderEvents {
        let rx = self.shared.events.subscribe();
        SenderEvents {
            inner: futures::stream::unfold(rx, |mut rx| async move {
                loop {
                    match rx.recv().await {
                        Ok(ev) => return Some((ev, rx)),
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            })
            .boxed(),
        }
    }

    /// The compression mode this sender was built with.
    pub fn compression(&self) -> Compression {
        self.compress.mode()
    }

    /// What compression did so far: how many events at or above the threshold were
    /// compressed, and why the others were not. Its `Display` gives a summary such as
    /// `off: loopback`.
    pub fn compression_stats(&self) -> CompressionStats {
        self.compress.stats()
    }

    /// A snapshot of this sender's counters: events published and their payload
    /// bytes, deliveries acknowledged and failed (by reason), bytes written to
    /// sockets, compression, connections, reconnects and the receivers now.
    ///
    /// Cheap (a sum over the connections), and nothing is counted per event beyond
    /// a plain integer on the `Sender`: call it as often as an exporter likes.
    /// Deliveries are counted when their outcome is known, so take it after
    /// [`Sender::flush`] (or after awaiting the reports) for final figures.
    ///
    /// ```
    /// use ipcbus::{Discovery, Handle, Receiver, Sender};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = std::env::temp_dir().join(format!("ipcbus-doc-stats-{}", std::process::id()));
    /// let handle: Handle = "docs.stats".parse()?;
    /// let disc = Discovery::local_at(&dir)?;
    /// let mut rx = Receiver::builder(handle.clone()).discovery(disc.clone()).bind().await?;
    /// let mut tx = Sender::builder(handle).discovery(disc).build().await?;
    /// let pending = tx.publish_bytes("hello").await?;
    /// rx.recv().await.expect("an event");
    /// assert!(pending.await.all_acked());
    /// let stats = tx.stats();
    /// assert_eq!((stats.published, stats.payload_bytes, stats.acked), (1, 5, 1));
    /// assert_eq!(stats.failed_total(), 0);
    /// assert_eq!(stats.connected_receivers, 1);
    /// assert_eq!((rx.stats().taken, rx.stats().connected_senders), (1, 1));
    /// # Ok(()) }
    /// ```
    pub fn stats(&self) -> SenderStats {
        let mut t = self.retired_totals.clone();
        for c in self.conns.iter().chain(&self.retired) {
            c.add_to(&mut t);
        }
        let shared = &self.shared;
        SenderStats {
            published: self.next_seq - 1,
            payload_bytes: self.payload_bytes,
            acked: t.acked,
            acked_events: self.acked_events_done + self.segment_acked_events(),
            failed: t.failed,
            bytes_written: t.bytes_written,
            compression: self.compress.stats(),
            connects: shared.connects.load(Ordering::Relaxed),
            reconnects: shared.reconnects.load(Ordering::Relaxed),
            handshakes: shared.handshakes.load(Ordering::Relaxed),
            connected_receivers: *shared.ready.borrow() as u64,
            known_receivers: self.conns.len() as u64,
        }
    }

    /// This sender's identity.
    pub fn id(&self) -> SenderId {
        self.shared.id
    }

    /// The handle this sender sends to.
    pub fn handle(&self) -> &Handle {
        &self.shared.handle
    }

    fn apply_updates(&mut self) {
        // A swap, not a store: it reads the latest set, so every update sent before
        // that set is visible to the drain below.
        if !self.shared.updates_pending.swap(false, Ordering::AcqRel) {
            return;
        }
        let mut changed = false;
        while let Ok(u) = self.updates.try_recv() {
            changed = true;
            match u {
                Update::Add(c) => {
                    // Its window starts at the next event.
                    c.window.start_after(self.next_seq - 1);
                    self.conns.push(c);
                }
                Update::Remove(c) => {
                    if let Some(i) = self.conns.iter().position(|x| Arc::ptr_eq(x, &c)) {
                        self.retired.push(self.conns.remove(i));
                    }
                }
                Update::Replace { old, new } => {
                    if let Some(i) = self.conns.iter().position(|x| Arc::ptr_eq(x, &old)) {
                        self.retired.push(self.conns.remove(i));
                    }
                    new.window.start_after(self.next_seq - 1);
                    self.conns.push(new);
                }
            }
        }
        if changed {
            self.targets = Arc::from(self.conns.clone());
            self.segments.push_back(Segment {
                first: self.next_seq,
                targets: self.targets.clone(),
            });
            // Segments whose every outcome is known keep only their count.
            fold_settled(&mut self.segments, &mut self.acked_events_done);
            self.compress
                .set_remote(self.targets.iter().any(|c| !c.info.endpoint.is_local()));
            // What is staged goes to the receivers it was published for.
            lock_stage(&self.shared.stage).retarget(self.targets.clone(), self.shared.limits());
        }
        // Connections that are gone for good keep only their totals: after the stage
        // has stopped naming them as targets, so that a hand-over of staged events
        // (which reports them failed for a failed connection) cannot count into a
        // connection already folded.
        let totals = &mut self.retired_totals;
        self.retired.retain(|c| {
            let done = c.finished.load(Ordering::Acquire);
            if done {
                c.add_to(totals);
            }
            !done
        });
    }

    /// Events acknowledged by every target in the segments not folded yet.
    fn segment_acked_events(&self) -> u64 {
        acked_events(&self.segments, self.next_seq - 1)
    }

    /// Waits until every target has room for event `seq` in its window and buffer, at
    /// most the send timeout in all; a target still full then is failed as timed out.
    async fn wait_for_room(&mut self, seq: u64) {
        let shared = &self.shared;
        let mut deadline = None;
        loop {
            // Whatever is staged goes to the writers first, so they have work.
            let blocker = lock_stage(&shared.stage).blocker(seq);
            let Some(c) = blocker else { return };
            let notified = c.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if c.failure.get().is_some() || c.window.has_room(seq, shared.limits()) {
                continue;
            }
            let dl = *deadline.get_or_insert_with(|| Instant::now() + shared.send_timeout);
            if tokio::time::timeout_at(dl, notified).await.is_err() {
                tracing::warn!(handle = %shared.handle, receiver = %c.info, "receiver's queue stayed full past the send timeout; dropping it");
                c.fail(FailReason::TimedOut);
            }
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        // What is staged goes to the connections first, so the failures their
        // shutdown reports cover it.
        // The stage's targets hold the connections, which hold `Shared`.
        lock_stage(&self.shared.stage).retarget(Arc::from(Vec::new()), self.shared.limits());
        self.shared.shutdown.cancel();
    }
}

/// The stream of a sender's [`SenderEvent`]s, from [`Sender::events`]: receivers
/// joining and leaving, and events they did not acknowledge. It ends when the sender
/// is closed or dropped (and its connections have ended).
///
/// It is `Unpin` (and `Send`, `'static`), so it can be polled in place, e.g. as a
/// branch of `tokio::select!` in a loop, without `Box::pin`:
///
/// ```
/// use futures::StreamExt;
/// use ipcbus::{Discovery, Handle, Sender, SenderEvent};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = std::env::temp_dir().join(format!("ipcbus-doc-events-{}", std::process::id()));
/// let handle: Handle = "orders".parse()?;
/// let mut tx = Sender::builder(handle)
///     .discovery(Discovery::local_at(&dir)?)
///     .build()
///     .await?;
/// let mut events = tx.events();
/// let mut tick = tokio::time::interval(std::time::Duration::from_millis(10));
/// for _ in 0..3 {
///     tokio::select! {
///         ev = events.next() => match ev {
///             Some(SenderEvent::SendFailed { first_seq, last_seq, .. }) => {
///                 eprintln!("events {first_seq}..={last_seq} not acknowledged");
///             }
///             Some(_) => {}
///             None => break,
///         },
///         _ = tick.tick() => {
///             tx.queue_bytes(b"tick").await?;
///         }
///     }
/// }
/// tx.close().await;
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok(()) }
/// ```
pub struct SenderEvents {
    inner: futures::stream::BoxStream<'static, SenderEvent>,
}

impl std::fmt::Debug for SenderEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SenderEvents(..)")
    }
}

impl Stream for SenderEvents {
    type Item = SenderEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<SenderEvent>> {
        self.inner.as_mut().poll_next(cx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

/// The report of one event, once every receiver it targeted has acknowledged it or
/// failed. Dropping it does not cancel the event.
#[derive(Debug)]
pub struct PendingReport {
    seq: u64,
    targets: Option<Arc<[Arc<Conn>]>>,
}

impl PendingReport {
    /// The event's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    fn report(&self, targets: &[Arc<Conn>]) -> SendReport {
        let mut r = SendReport {
            seq: self.seq,
            ..SendReport::default()
        };
        for c in targets {
            match c.outcome(self.seq) {
                Some(Ok(())) => r.acked.push(c.info.clone()),
                Some(Err(why)) => r.failed.push((c.info.clone(), why)),
                None => unreachable!("report built before every target resolved"),
            }
        }
        r
    }
}

impl Future for PendingReport {
    type Output = SendReport;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SendReport> {
        let Some(targets) = &self.targets else {
            return Poll::Ready(SendReport {
                seq: self.seq,
                ..SendReport::default()
            });
        };
        // Register with every unresolved target, not just the first: each
        // registration asks that receiver for a prompt ack, so all of them answer in
        // one round trip rather than one after another.
        let mut pending = false;
        for c in targets.iter() {
            if c.outcome(self.seq).is_none() {
                c.register_waiter(self.seq, cx.waker());
                // Re-check: the ack may have landed between the check and the
                // registration.
                pending |= c.outcome(self.seq).is_none();
            }
        }
        if pending {
            return Poll::Pending;
        }
        Poll::Ready(self.report(targets))
    }
}

enum Update {
    Add(Arc<Conn>),
    Remove(Arc<Conn>),
    /// A reconnect: the new connection takes the old one's place in one step, so no
    /// event is published in between to a set without that receiver.
    Replace {
        old: Arc<Conn>,
        new: Arc<Conn>,
    },
}

struct Shared {
    handle: Handle,
    id: SenderId,
    sec: Resolved,
    send_timeout: Duration,
    connect_timeout: Duration,
    window: u64,
    buffer_limit: usize,
    max_frame: usize,
    events: broadcast::Sender<SenderEvent>,
    ready: watch::Sender<usize>,
    updates: mpsc::UnboundedSender<Update>,
    /// Set after every update is sent, so `publish` checks one flag (a plain load)
    /// instead of polling the channel for each event.
    updates_pending: AtomicBool,
    ended: Notify,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Events encoded once for every receiver, not yet handed to the connections.
    stage: SpinMutex<Stage<Conn>>,
    /// Connections started, reconnects among them, and handshakes done (for
    /// [`Sender::stats`]; once per connection each).
    connects: AtomicU64,
    reconnects: AtomicU64,
    handshakes: AtomicU64,
}

impl Shared {
    /// Hands a change of the receiver set to the `Sender`.
    fn update(&self, u: Update) {
        let _ = self.updates.send(u);
        self.updates_pending.store(true, Ordering::Release);
    }

    /// The bounds of every receiver's window.
    fn limits(&self) -> Limits {
        Limits {
            window: self.window,
            buffer: self.buffer_limit,
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("handle", &self.handle)
            .field("id", &self.id)
            .finish()
    }
}

/// One receiver connection as the sender and its tasks share it: its window in the
/// fan-out core, and what the async side adds (wake-ups, cancellation, state).
///
/// It dereferences to its [`Window`], so the window's counters and failure read as
/// the connection's own (`conn.failure`, `conn.acked`).
struct Conn {
    info: ReceiverInfo,
    shared: Arc<Shared>,
    window: Window,
    /// Wakes the writer when frames were queued while it slept.
    writer_wake: Notify,
    /// Wakes a publisher waiting for window or buffer space.
    space: Notify,
    cancel: CancellationToken,
    ready: AtomicBool,
    finished: AtomicBool,
}

impl std::ops::Deref for Conn {
    type Target = Window;
    fn deref(&self) -> &Window {
        &self.window
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conn({})", self.info)
    }
}

impl Conn {
    /// `waker` waits for the outcome of event `seq`; the receiver is asked for a
    /// prompt acknowledgement of it.
    fn register_waiter(&self, seq: u64, waker: &Waker) {
        if self.window.register_waiter(seq, waker) {
            self.writer_wake.notify_one();
        }
    }

    /// Marks the connection failed (first reason wins), reports the events it had
    /// not acknowledged, stops its task, and wakes everyone waiting on it.
    fn fail(&self, reason: FailReason) {
        if let Some((first, last)) = self.window.fail(reason.clone()) {
            let _ = self.shared.events.send(SenderEvent::SendFailed {
                first_seq: first,
                last_seq: last,
                receiver: self.info.clone(),
                reason,
            });
        }
        self.cancel.cancel();
        self.window.wake_all();
        self.space.notify_one();
    }

    /// Counts the connection as connected and tells the application.
    fn established(&self) {
        let shared = &self.shared;
        self.ready.store(true, Ordering::Release);
        shared.handshakes.fetch_add(1, Ordering::Relaxed);
        shared.ready.send_modify(|n| *n += 1);
        let _ = shared
            .events
            .send(SenderEvent::ReceiverJoined(self.info.clone()));
        tracing::debug!(handle = %shared.handle, receiver = %self.info, "receiver connected");
    }
}

impl Destination for Conn {
    fn window(&self) -> &Window {
        &self.window
    }

    fn wake_writer(&self) {
        self.writer_wake.notify_one();
    }

    fn skipped(&self, first: u64, last: u64, reason: &FailReason) {
        let _ = self.shared.events.send(SenderEvent::SendFailed {
            first_seq: first,
            last_seq: last,
            receiver: self.info.clone(),
            reason: reason.clone(),
        });
    }
}

impl Link for Conn {
    fn stage(&self) -> &SpinMutex<Stage<Conn>> {
        &self.shared.stage
    }

    fn writer_wake(&self) -> &Notify {
        &self.writer_wake
    }

    fn space_freed(&self) {
        self.space.notify_one();
    }

    fn receiver(&self) -> &dyn std::fmt::Display {
        &self.info
    }

    fn handle(&self) -> &Handle {
        &self.shared.handle
    }

    fn send_timeout(&self) -> Duration {
        self.shared.send_timeout
    }

    fn max_frame(&self) -> usize {
        self.shared.max_frame
    }
}

fn fail_reason(e: &HandshakeError) -> FailReason {
    match e {
        e if e.is_auth_failure() => FailReason::AuthenticationFailed,
        HandshakeError::Rejected { reason, .. } => FailReason::Rejected(*reason),
        HandshakeError::WrongHandle(_) => FailReason::Rejected(RejectReason::WrongHandle),
        HandshakeError::WrongReceiver { .. } => FailReason::WrongReceiver,
        HandshakeError::Timeout => FailReason::TimedOut,
        // Nothing listens there: a TCP port refused, a Unix socket refused or gone.
        HandshakeError::Io(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ) =>
        {
            FailReason::Refused
        }
        HandshakeError::Io(_) | HandshakeError::Closed => FailReason::Disconnected,
        other => FailReason::Protocol(other.to_string()),
    }
}

/// Starts a connection to `record`: the `Conn` is returned at once so events queue
/// while the handshake runs.
fn start_conn(
    shared: &Arc<Shared>,
    record: &Record,
    (endpoint, replaces): (Endpoint, Option<Arc<Conn>>),
    expect: Option<ReceiverId>,
    on_stale: impl FnOnce() + Send + 'static,
) -> Arc<Conn> {
    let conn = Arc::new(Conn {
        info: ReceiverInfo {
            id: record.receiver,
            endpoint,
        },
        shared: shared.clone(),
        window: Window::default(),
        writer_wake: Notify::new(),
        space: Notify::new(),
        cancel: shared.shutdown.child_token(),
        ready: AtomicBool::new(false),
        finished: AtomicBool::new(false),
    });
    shared.connects.fetch_add(1, Ordering::Relaxed);
    shared.update(match replaces {
        Some(old) => Update::Replace {
            old,
            new: conn.clone(),
        },
        None => Update::Add(conn.clone()),
    });
    let c = conn.clone();
    shared.tasks.spawn(async move {
        let reason = tokio::select! {
            biased;
            _ = c.cancel.cancelled() => c.failure.get().cloned().unwrap_or(FailReason::SenderClosed),
            r = drive(&c, expect) => r,
        };
        c.fail(reason.clone());
        // Events still staged for it are reported failed by a hand-over; do it now
        // rather than at some later publish (there may be none).
        lock_stage(&c.shared.stage).hand_over();
        // Free the queued chunks now; the counters keep every outcome.
        let dropped = std::mem::take(&mut lock_out(&c.out).chunks);
        drop(dropped);
        if matches!(
            reason,
            FailReason::Refused
                | FailReason::WrongReceiver
                | FailReason::Rejected(RejectReason::WrongHandle)
        ) {
            on_stale();
        }
        let shared = &c.shared;
        if c.ready.load(Ordering::Acquire) {
            shared.ready.send_modify(|n| *n = n.saturating_sub(1));
        }
        tracing::debug!(handle = %shared.handle, receiver = %c.info, %reason, "receiver connection ended");
        let _ = shared.events.send(SenderEvent::ReceiverLeft {
            receiver: c.info.clone(),
            reason: reason.clone(),
        });
        // A receiver that said goodbye has unregistered: stop targeting it now. One
        // that dropped stays a target (its events fail at once with the reason) until
        // discovery reconnects it or sees its registration go.
        if reason == FailReason::ReceiverLeft || reason == FailReason::SenderClosed {
            shared.update(Update::Remove(c.clone()));
        }
        c.finished.store(true, Ordering::Release);
        shared.ended.notify_one();
    });
    conn
}

/// Connects to the receiver, then drives the connection until it ends.
async fn drive(conn: &Arc<Conn>, expect: Option<ReceiverId>) -> FailReason {
    match connect(conn, expect).await {
        Ok(est) => run_established(conn, est).await,
        Err(reason) => reason,
    }
}

/// Connects to the receiver and runs the handshake, within the connect timeout.
async fn connect(
    conn: &Arc<Conn>,
    expect: Option<ReceiverId>,
) -> Result<Established<ByteStream>, FailReason> {
    let shared = &conn.shared;
    let connected = tokio::time::timeout(shared.connect_timeout, async {
        let sock = ByteStream::connect(&conn.info.endpoint).await?;
        handshake::connect(
            sock,
            &shared.handle,
            shared.id,
            &shared.sec,
            expect,
            shared.max_frame,
        )
        .await
    })
    .await;
    match connected {
        Ok(Ok(est)) => Ok(est),
        Ok(Err(e)) => {
            tracing::warn!(handle = %shared.handle, receiver = %conn.info, error = %e, "cannot connect to receiver");
            Err(fail_reason(&e))
        }
        Err(_) => Err(FailReason::TimedOut),
    }
}

/// Drives a connection whose handshake is done until it ends.
async fn run_established(conn: &Arc<Conn>, est: Established<ByteStream>) -> FailReason {
    conn.established();
    let (rd, wr) = est.io.into_split();
    let session = Session {
        tx: est.tx,
        rx: est.rx,
        read_buf: est.read_buf,
    };
    conn::run(&**conn, rd, wr, session).await
}

/// Keeps one connection per discovered receiver: given the current set of records
/// for the handle (from any discovery back end), it connects to new ones, reconnects
/// dropped ones with exponential backoff while they stay registered, and stops
/// sending to those that left.
pub(crate) struct Tracker {
    shared: Arc<Shared>,
    on_stale: Arc<dyn Fn(&Record) + Send + Sync>,
    known: HashMap<ReceiverId, Known>,
    /// Whether records carry the receivers' real ids, checked in the handshake (not
    /// for endpoints given by hand, whose ids are derived from the endpoint).
    expect_ids: bool,
}

struct Known {
    conn: Arc<Conn>,
    backoff: Duration,
    retry_at: Instant,
}

impl Tracker {
    fn new(shared: Arc<Shared>, on_stale: Arc<dyn Fn(&Record) + Send + Sync>) -> Tracker {
        Tracker {
            shared,
            on_stale,
            known: HashMap::new(),
            expect_ids: true,
        }
    }

    /// Connects to `record`'s receiver, in place of `replaces` (a reconnect) if given.
    fn connect(&self, record: &Record, replaces: Option<Arc<Conn>>) -> Option<Arc<Conn>> {
        // Over the Unix socket when the receiver has one (records of the local
        // registry are of this host), else TCP. A socket file removed from under a
        // live receiver (a cleaner of /tmp) would be refused and make its record look
        // stale: use its TCP endpoint then.
        let endpoint = record
            .endpoint(Transport::Unix)
            .filter(|e| {
                record.tcp_addr().is_none() || e.unix_path().is_some_and(std::path::Path::exists)
            })
            .or_else(|| record.endpoint(Transport::Tcp))
            .or(record.endpoints.first());
        let Some(endpoint) = endpoint.cloned() else {
            if let Some(old) = replaces {
                self.shared.update(Update::Remove(old));
            }
            return None;
        };
        let on_stale = self.on_stale.clone();
        let rec = record.clone();
        Some(start_conn(
            &self.shared,
            record,
            (endpoint, replaces),
            self.expect_ids.then_some(record.receiver),
            move || on_stale(&rec),
        ))
    }

    /// Brings the connections in line with `records`, the full current set. Records
    /// of call servers (which share handle names with receivers) are not receivers.
    pub(crate) fn apply(&mut self, records: Vec<Record>) {
        let now = Instant::now();
        let mut seen = std::collections::HashSet::new();
        for rec in records {
            if rec.handle != self.shared.handle || rec.role != ipcbus_proto::record::Role::Receiver
            {
                continue;
            }
            seen.insert(rec.receiver);
            let conn = match self.known.get(&rec.receiver) {
                None => self.connect(&rec, None),
                Some(k) if k.conn.finished.load(Ordering::Acquire) && now >= k.retry_at => {
                    self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                    self.connect(&rec, Some(k.conn.clone()))
                }
                Some(_) => continue,
            };
            let Some(conn) = conn else { continue };
            let k = self.known.entry(rec.receiver).or_insert(Known {
                conn: conn.clone(),
                backoff: Duration::from_millis(100),
                retry_at: now,
            });
            if k.conn.ready.load(Ordering::Acquire)
                && k.conn.failure.get() != Some(&FailReason::TimedOut)
            {
                // The previous connection worked: start the backoff afresh. (A receiver
                // that timed out is alive but slow: keep backing off from it.)
                k.backoff = Duration::from_millis(100);
            }
            k.conn = conn;
            k.retry_at = now + k.backoff;
            k.backoff = (k.backoff * 2).min(Duration::from_secs(5));
        }
        // Receivers that unregistered: stop sending to them.
        self.known.retain(|id, k| {
            if seen.contains(id) {
                return true;
            }
            k.conn.shared.update(Update::Remove(k.conn.clone()));
            false
        });
    }

    /// The soonest time a dropped receiver is due for a reconnect.
    pub(crate) fn next_retry(&self) -> Option<Instant> {
        self.known
            .values()
            .filter(|k| k.conn.finished.load(Ordering::Acquire))
            .map(|k| k.retry_at)
            .min()
    }

    /// Resolves when a connection ends (so the caller can re-apply and reconnect).
    pub(crate) async fn connection_ended(&self) {
        self.shared.ended.notified().await
    }

    /// Resolves when the sender shuts down.
    pub(crate) async fn shutdown(&self) {
        self.shared.shutdown.cancelled().await
    }
}

/// Pushed discovery over the local registry: inotify on the receivers directory plus
/// a periodic rescan.
struct LocalDiscovery {
    tracker: Tracker,
    reg: LocalRegistry,
    rescan_interval: Duration,
}

impl LocalDiscovery {
    fn new(shared: Arc<Shared>, reg: LocalRegistry, rescan_interval: Duration) -> Self {
        let r2 = reg.clone();
        LocalDiscovery {
            tracker: Tracker::new(shared, Arc::new(move |rec: &Record| r2.remove_stale(rec))),
            reg,
            rescan_interval,
        }
    }

    fn rescan(&mut self) {
        match self.reg.scan(Some(&self.tracker.shared.handle)) {
            Ok(records) => self.tracker.apply(records),
            Err(e) => tracing::warn!(error = %e, "registry scan failed"),
        }
    }

    async fn run(mut self) {
        let (watcher, dirty) = self.reg.watch();
        let interval = match &watcher {
            Some(_) => self.rescan_interval,
            None => self.rescan_interval.min(Duration::from_millis(250)),
        };
        loop {
            let wake = Instant::now() + interval;
            let wake = self.tracker.next_retry().map_or(wake, |r| r.min(wake));
            tokio::select! {
                _ = self.tracker.shutdown() => break,
                _ = dirty.notified() => {}
                _ = self.tracker.connection_ended() => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
            self.rescan();
        }
        drop(watcher);
    }
}

/// Receivers given by endpoint ([`SenderBuilder::endpoint`]): a fixed set, kept
/// connected by the tracker.
struct KnownEndpoints {
    tracker: Tracker,
    records: Vec<Record>,
}

impl KnownEndpoints {
    fn new(shared: Arc<Shared>, endpoints: &[Endpoint]) -> Self {
        let records = endpoints
            .iter()
            .map(|e| {
                let digest = Sha256::digest(e.to_string().as_bytes());
                let mut id = [0u8; 16];
                id.copy_from_slice(&digest[..16]);
                Record::new(
                    shared.handle.clone(),
                    vec![e.clone()],
                    ReceiverId(id),
                    None,
                    0,
                )
            })
            .collect();
        let mut tracker = Tracker::new(shared, Arc::new(|_: &Record| {}));
        tracker.expect_ids = false;
        let mut known = KnownEndpoints { tracker, records };
        known.tracker.apply(known.records.clone());
        known
    }

    async fn run(mut self) {
        loop {
            let retry = self.tracker.next_retry();
            tokio::select! {
                _ = self.tracker.shutdown() => break,
                _ = self.tracker.connection_ended() => {}
                _ = async {
                    match retry {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            self.tracker.apply(self.records.clone());
        }
    }
}

/// Pushed discovery over the endpoint manager: a watch on the handle, kept across EPM
/// restarts by the session task; every change hands the full set to the tracker.
struct EpmDiscovery {
    tracker: Tracker,
    records: tokio::sync::watch::Receiver<crate::epm::session::RecordSet>,
}

impl EpmDiscovery {
    /// Watches the handle now, so `build` knows the receivers registered at this
    /// moment (or fails with a named error).
    async fn start(shared: Arc<Shared>, epm: Epm) -> Result<Self, EpmError> {
        let cancel = shared.shutdown.child_token();
        let records = crate::epm::session::watch(epm, shared.handle.clone(), cancel).await?;
        Ok(EpmDiscovery::follow(shared, records))
    }

    /// Follows a set of records kept by a watch task (the EPM's, or etcd's).
    fn follow(
        shared: Arc<Shared>,
        records: tokio::sync::watch::Receiver<crate::epm::session::RecordSet>,
    ) -> Self {
        // Stale records are the back end's to remove (the registering connection or
        // its lease); the tracker only backs off from them.
        let mut tracker = Tracker::new(shared, Arc::new(|_: &Record| {}));
        tracker.apply(records.borrow().to_vec());
        EpmDiscovery { tracker, records }
    }

    async fn run(mut self) {
        let mut watching = true;
        loop {
            let retry = self.tracker.next_retry();
            tokio::select! {
                _ = self.tracker.shutdown() => break,
                r = self.records.changed(), if watching => watching = r.is_ok(),
                _ = self.tracker.connection_ended() => {}
                _ = async {
                    match retry {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            let current = self.records.borrow_and_update().to_vec();
            self.tracker.apply(current);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sender_events_is_a_named_unpin_send_stream() {
        fn check<T: Stream<Item = SenderEvent> + Unpin + Send + 'static>() {}
        check::<SenderEvents>();
    }

    /// The default compresses nothing on loopback; `compress(true)` everything that
    /// shrinks; both deliver the same payloads.
    #[tokio::test]
    async fn auto_compression_is_off_on_loopback_and_forced_is_on() {
        let dir = std::env::temp_dir().join(format!(
            "ipcbus-auto-gzip-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let h: Handle = "auto-gzip".parse().unwrap();
        let big = "compressible text ".repeat(64);
        for (mode, compressed) in [
            (Compression::Auto, 0),
            (Compression::Always, 3),
            (Compression::Never, 0),
        ] {
            let disc = Discovery::local_at(&dir).unwrap();
            let mut rx = crate::Receiver::builder(h.clone())
                .discovery(disc.clone())
                .bind()
                .await
                .unwrap();
            let mut tx = Sender::builder(h.clone())
                .discovery(disc)
                .compression(mode)
                .build()
                .await
                .unwrap();
            assert_eq!(tx.wait_for_receivers(1, Duration::from_secs(5)).await, 1);
            assert_eq!(tx.compression(), mode);
            for _ in 0..3 {
                tx.queue_bytes(big.as_bytes()).await.unwrap();
            }
            tx.queue_bytes(b"small").await.unwrap();
            for _ in 0..3 {
                assert_eq!(&rx.recv().await.unwrap().payload()[..], big.as_bytes());
            }
            assert_eq!(&rx.recv().await.unwrap().payload()[..], b"small");
            assert!(tx.last_report().await.all_acked());
            let st = tx.compression_stats();
            assert_eq!(
                (st.eligible, st.compressed),
                (3, compressed),
                "{mode}: {st:?}"
            );
            if mode == Compression::Auto {
                assert_eq!(st.to_string(), "off: loopback");
            }
            tx.close().await;
            rx.close().await;
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
