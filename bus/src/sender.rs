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

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::discovery::Discovery;
use crate::epm::{Epm, EpmError};
use crate::framing::{FrameReader, ReadError};
use crate::handshake::{self, HandshakeError};
use crate::pool::Pool;
use crate::registry::{LocalRegistry, Record, RegistryError};
use crate::report::{FailReason, ReceiverInfo, SendReport, SenderEvent};
use crate::security::{Resolved, Security};
use crate::stats::{ByKind, FailKind, SenderStats};
use ipcbus_proto::codec::{put_frame, CodecV1};
use ipcbus_proto::compress::{CompressPolicy, Gzipper, DEFAULT_THRESHOLD};
pub use ipcbus_proto::compress::{Compression, CompressionStats};
use ipcbus_proto::crypto::{Sealer, TAG_LEN};
use ipcbus_proto::frame::{
    parse_ack, DecodeError, Flags, Kind, RejectReason, DEFAULT_MAX_FRAME, HEADER_LEN, LEN_PREFIX,
};
use ipcbus_proto::handle::Handle;
use ipcbus_proto::ids::SenderId;

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
}

impl SenderBuilder {
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
    segments: VecDeque<Segment>,
    /// Events acknowledged by all their targets in the segments already folded.
    acked_events_done: u64,
}

/// Events published to one set of targets: from `first` to the next segment's first
/// (or the latest event).
#[derive(Debug)]
struct Segment {
    first: u64,
    targets: Arc<[Arc<Conn>]>,
}

impl Segment {
    /// How many of its events up to `last` every target acknowledged (acks are
    /// cumulative, so the lowest acknowledgement bounds them).
    fn acked_events(&self, last: u64) -> u64 {
        let Some(low) = self
            .targets
            .iter()
            .map(|c| c.acked.load(Ordering::Acquire))
            .min()
        else {
            return 0;
        };
        (low.min(last) + 1).saturating_sub(self.first)
    }

    /// Whether every event up to `last` is acknowledged or failed by every target.
    fn settled(&self, last: u64) -> bool {
        self.targets
            .iter()
            .all(|c| c.failure.get().is_some() || c.acked.load(Ordering::Acquire) >= last)
    }
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
            lock_stage(&self.shared.stage).hand_over(&self.shared);
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
        let header = data_header(flags, seq, body.len());
        let frame_len = header.len() + body.len();
        self.unyielded += frame_len;
        let mut stage = lock_stage(&self.shared.stage);
        if !stage.has_room(seq) {
            drop(stage);
            self.wait_for_room(seq).await;
            stage = lock_stage(&self.shared.stage);
        }
        stage.push(&self.shared, seq, &header, body);
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
        self.targets.iter().map(|c| c.info).collect()
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
                    // Its window starts at the next event (under the queue's lock, so
                    // a concurrent `fail` sees both counters before or both after).
                    {
                        let _out = lock_out(&c.out);
                        c.acked.store(self.next_seq - 1, Ordering::Release);
                        c.queued.store(self.next_seq - 1, Ordering::Release);
                        c.base.store(self.next_seq - 1, Ordering::Relaxed);
                    }
                    self.conns.push(c);
                }
                Update::Remove(c) => {
                    if let Some(i) = self.conns.iter().position(|x| Arc::ptr_eq(x, &c)) {
                        self.retired.push(self.conns.remove(i));
                    }
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
            while self.segments.len() >= 2 {
                let last = self.segments[1].first - 1;
                if !self.segments[0].settled(last) {
                    break;
                }
                self.acked_events_done += self.segments[0].acked_events(last);
                self.segments.pop_front();
            }
            self.compress.set_remote(
                self.targets
                    .iter()
                    .any(|c| !CompressPolicy::is_loopback(c.info.addr.ip())),
            );
            // What is staged goes to the receivers it was published for.
            let mut stage = lock_stage(&self.shared.stage);
            stage.hand_over(&self.shared);
            stage.targets = self.targets.clone();
            stage.room_until = 0;
            // A new target's writer may have gone to sleep before it was a target (the
            // hand-over then did not wake it): the next event is handed over at once.
            stage.idle_writers = stage.idle_writers.max(1);
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
        let mut sum = 0;
        for (i, seg) in self.segments.iter().enumerate() {
            let last = self
                .segments
                .get(i + 1)
                .map_or(self.next_seq - 1, |next| next.first - 1);
            sum += seg.acked_events(last);
        }
        sum
    }

    /// Waits until every target has room for event `seq` in its window and buffer, at
    /// most the send timeout in all; a target still full then is failed as timed out.
    async fn wait_for_room(&mut self, seq: u64) {
        let shared = &self.shared;
        let mut deadline = None;
        loop {
            let blocker = {
                let mut stage = lock_stage(&shared.stage);
                // Whatever is staged goes to the writers first, so they have work.
                stage.hand_over(shared);
                stage.over = false;
                let mut room_until = u64::MAX;
                let mut blocker = None;
                for c in stage.targets.iter() {
                    if c.failure.get().is_some() {
                        continue;
                    }
                    let until = c
                        .acked
                        .load(Ordering::Acquire)
                        .saturating_add(shared.window);
                    room_until = room_until.min(until);
                    if seq > until {
                        // Its window is full: ask for the acknowledgements now (all
                        // such receivers at once, not one per round trip).
                        c.request_ack(c.queued.load(Ordering::Acquire));
                    }
                    if blocker.is_none() && !c.has_room(seq) {
                        blocker = Some(c.clone());
                    }
                }
                stage.room_until = room_until;
                blocker
            };
            let Some(c) = blocker else { return };
            let notified = c.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if c.failure.get().is_some() || c.has_room(seq) {
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
        let mut stage = lock_stage(&self.shared.stage);
        stage.hand_over(&self.shared);
        // The stage's targets hold the connections, which hold `Shared`.
        stage.targets = Arc::from(Vec::new());
        drop(stage);
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
                Some(Ok(())) => r.acked.push(c.info),
                Some(Err(why)) => r.failed.push((c.info, why)),
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
    stage: SpinMutex<Stage>,
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
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("handle", &self.handle)
            .field("id", &self.id)
            .finish()
    }
}

/// Most bytes staged before they are handed to the connections: about one good
/// write's worth (a single larger frame makes a larger chunk).
const STAGE_CHUNK: usize = 128 * 1024;

/// Events encoded once for every receiver: the publisher appends each frame here, and
/// whole chunks are handed to every target connection's queue as one shared `Bytes`
/// (a reference each, not a copy). A hand-over happens when a writer has run dry
/// (the publisher sees `idle_writers`, or the writer finds events staged before it
/// sleeps), when the stage reaches [`STAGE_CHUNK`], when the publisher yields, and
/// before the targets change. So staged events never wait for a next publish: a writer
/// only sleeps with the stage empty.
struct Stage {
    buf: Vec<u8>,
    first_seq: u64,
    last_seq: u64,
    targets: Arc<[Arc<Conn>]>,
    /// Writers asleep with nothing to write since the last hand-over.
    idle_writers: usize,
    /// Every live target had window for events up to this sequence number when last
    /// checked (acknowledgements only move it up): the publisher's fast check.
    room_until: u64,
    /// A target's queue went over the buffer limit at a hand-over.
    over: bool,
    pool: Arc<Pool>,
}

/// Spare stage buffers kept, and the largest kept.
const STAGE_POOL: usize = 8;
const STAGE_POOL_MAX: usize = 1 << 20;

impl Stage {
    fn new() -> Stage {
        Stage {
            buf: Vec::new(),
            first_seq: 0,
            last_seq: 0,
            targets: Arc::from(Vec::new()),
            idle_writers: 0,
            room_until: 0,
            over: false,
            pool: Pool::new(STAGE_POOL, STAGE_POOL_MAX),
        }
    }

    /// Whether event `seq` fits without a closer look.
    fn has_room(&self, seq: u64) -> bool {
        seq <= self.room_until && !self.over
    }

    fn push(&mut self, shared: &Shared, seq: u64, header: &[u8], body: &[u8]) {
        let len = header.len() + body.len();
        if !self.buf.is_empty() && self.buf.len() + len > STAGE_CHUNK {
            self.hand_over(shared);
        }
        if self.buf.is_empty() {
            self.first_seq = seq;
            self.buf.reserve(len.max(STAGE_CHUNK.min(4 * 1024)));
        }
        self.buf.extend_from_slice(header);
        self.buf.extend_from_slice(body);
        self.last_seq = seq;
        if self.idle_writers > 0 {
            self.hand_over(shared);
        }
    }

    /// Hands what is staged to every target as one shared chunk, and wakes the
    /// writers that sleep. A target already failed takes nothing: the events are
    /// reported failed for it.
    fn hand_over(&mut self, shared: &Shared) {
        if self.buf.is_empty() {
            return;
        }
        let next = self.pool.get(0);
        let chunk = self.pool.share(std::mem::replace(&mut self.buf, next));
        let (first, last) = (self.first_seq, self.last_seq);
        for c in self.targets.iter() {
            let wake = {
                let mut out = lock_out(&c.out);
                if let Some(reason) = c.failure.get() {
                    drop(out);
                    c.note_skipped(first, last, reason);
                    continue;
                }
                out.bytes += chunk.len();
                out.chunks.push_back((chunk.clone(), last));
                c.queued.store(last, Ordering::Release);
                if out.bytes >= shared.buffer_limit {
                    self.over = true;
                }
                std::mem::take(&mut out.writer_waiting)
            };
            if wake {
                c.writer_wake.notify_one();
            }
        }
        self.idle_writers = 0;
    }
}

fn lock_stage(m: &SpinMutex<Stage>) -> spin::mutex::SpinMutexGuard<'_, Stage> {
    spin_lock(m)
}

/// Chunks handed to a connection and not yet taken by its writer.
struct Out {
    /// Each chunk with the sequence number of its last event.
    chunks: VecDeque<(Bytes, u64)>,
    /// Bytes in `chunks`.
    bytes: usize,
    writer_waiting: bool,
}

/// One receiver connection as the sender and its tasks share it.
struct Conn {
    info: ReceiverInfo,
    shared: Arc<Shared>,
    out: SpinMutex<Out>,
    /// Wakes the writer when frames were queued while it slept.
    writer_wake: Notify,
    /// Wakes a publisher waiting for window or buffer space.
    space: Notify,
    /// Highest sequence number queued for this receiver.
    queued: AtomicU64,
    /// Highest sequence number the receiver acknowledged.
    acked: AtomicU64,
    /// Set once, when the connection is dead; `acked` no longer moves after that.
    failure: OnceLock<FailReason>,
    /// Highest sequence number whose acknowledgement someone waits for.
    ack_wanted: AtomicU64,
    waiters: Mutex<Vec<(u64, Waker)>>,
    cancel: CancellationToken,
    ready: AtomicBool,
    finished: AtomicBool,
    /// The sequence number before its first event: `acked - base` events were
    /// acknowledged on this connection.
    base: AtomicU64,
    /// Events reported failed on this connection (all for the reason in `failure`);
    /// counted per failed range, not per event.
    failed: AtomicU64,
    /// Bytes its writer wrote; counted per write, by the writer alone.
    bytes_written: AtomicU64,
}

/// What a connection's counters add up to, for [`Sender::stats`].
#[derive(Debug, Clone, Default)]
struct ConnTotals {
    acked: u64,
    failed: ByKind<FailKind>,
    bytes_written: u64,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conn({})", self.info)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The stage's and the output queues' lock. The stage's is taken for every event, and
/// both are almost never contended (the publisher appends, a writer takes, both in a
/// few instructions, mostly on the same thread), so it is a spin lock: its release is
/// a plain store, where `std::sync::Mutex` needs a second atomic read-modify-write (a
/// full barrier on x86) per event. Contended, it spins briefly, then yields the
/// thread, so a holder that was preempted gets the CPU.
type SpinMutex<T> = spin::mutex::SpinMutex<T>;

fn lock_out(m: &SpinMutex<Out>) -> spin::mutex::SpinMutexGuard<'_, Out> {
    spin_lock(m)
}

fn spin_lock<T>(m: &SpinMutex<T>) -> spin::mutex::SpinMutexGuard<'_, T> {
    let mut spins = 0u32;
    loop {
        if let Some(g) = m.try_lock() {
            return g;
        }
        if spins < 64 {
            spins += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

impl Conn {
    /// Adds this connection's counts to `t`.
    fn add_to(&self, t: &mut ConnTotals) {
        let acked = self.acked.load(Ordering::Acquire);
        t.acked += acked.saturating_sub(self.base.load(Ordering::Relaxed));
        t.bytes_written += self.bytes_written.load(Ordering::Relaxed);
        let failed = self.failed.load(Ordering::Acquire);
        if let Some(why) = self.failure.get().filter(|_| failed > 0) {
            t.failed.add(why.kind(), failed);
        }
    }

    /// The outcome of event `seq` for this receiver, if it is known yet.
    fn outcome(&self, seq: u64) -> Option<Result<(), FailReason>> {
        if self.acked.load(Ordering::Acquire) >= seq {
            return Some(Ok(()));
        }
        // `acked` is final once `failure` is set, and it is set after the last ack.
        self.failure.get().map(|f| {
            if self.acked.load(Ordering::Acquire) >= seq {
                Ok(())
            } else {
                Err(f.clone())
            }
        })
    }

    fn register_waiter(&self, seq: u64, waker: &Waker) {
        {
            let mut w = lock(&self.waiters);
            if let Some(e) = w.iter_mut().find(|e| e.0 == seq && e.1.will_wake(waker)) {
                e.1.clone_from(waker);
            } else {
                w.push((seq, waker.clone()));
            }
        }
        self.request_ack(seq);
    }

    /// Someone waits for the outcome of event `seq`: have the writer ask the receiver
    /// to acknowledge it as soon as it is taken (receivers otherwise batch acks).
    fn request_ack(&self, seq: u64) {
        if self.ack_wanted.fetch_max(seq, Ordering::AcqRel) < seq {
            let wake = std::mem::take(&mut lock_out(&self.out).writer_waiting);
            if wake {
                self.writer_wake.notify_one();
            }
        }
    }

    fn wake_up_to(&self, acked: u64) {
        let mut w = lock(&self.waiters);
        if w.is_empty() {
            return;
        }
        let mut i = 0;
        while i < w.len() {
            if w[i].0 <= acked {
                w.swap_remove(i).1.wake();
            } else {
                i += 1;
            }
        }
    }

    fn wake_all(&self) {
        let drained: Vec<_> = lock(&self.waiters).drain(..).collect();
        for (_, w) in drained {
            w.wake();
        }
    }

    /// Marks the connection failed (first reason wins), stops its task, and wakes
    /// everyone waiting on it.
    fn fail(&self, reason: FailReason) {
        if self.failure.set(reason.clone()).is_ok() {
            // Under the queue's lock: a hand-over either queued its chunk before this
            // (counted here) or sees the failure (and reports the chunk itself).
            let (first, last) = {
                let _out = lock_out(&self.out);
                (
                    self.acked.load(Ordering::Acquire) + 1,
                    self.queued.load(Ordering::Acquire),
                )
            };
            if last >= first {
                self.failed.fetch_add(last - first + 1, Ordering::Release);
                let _ = self.shared.events.send(SenderEvent::SendFailed {
                    first_seq: first,
                    last_seq: last,
                    receiver: self.info,
                    reason,
                });
            }
        }
        self.cancel.cancel();
        self.wake_all();
        self.space.notify_one();
    }

    /// Whether event `seq` fits this connection's window and buffer.
    fn has_room(&self, seq: u64) -> bool {
        seq - self.acked.load(Ordering::Acquire) <= self.shared.window
            && lock_out(&self.out).bytes < self.shared.buffer_limit
    }

    fn note_skipped(&self, first: u64, last: u64, reason: &FailReason) {
        self.failed
            .fetch_add(last.saturating_sub(first) + 1, Ordering::Release);
        let _ = self.shared.events.send(SenderEvent::SendFailed {
            first_seq: first,
            last_seq: last,
            receiver: self.info,
            reason: reason.clone(),
        });
    }
}

fn fail_reason(e: &HandshakeError) -> FailReason {
    match e {
        e if e.is_auth_failure() => FailReason::AuthenticationFailed,
        HandshakeError::Rejected { reason, .. } => FailReason::Rejected(*reason),
        HandshakeError::WrongHandle(_) => FailReason::Rejected(RejectReason::WrongHandle),
        HandshakeError::WrongReceiver { .. } => FailReason::WrongReceiver,
        HandshakeError::Timeout => FailReason::TimedOut,
        HandshakeError::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
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
    on_stale: impl FnOnce() + Send + 'static,
) -> Arc<Conn> {
    let conn = Arc::new(Conn {
        info: ReceiverInfo {
            id: record.receiver,
            addr: record.endpoint,
        },
        shared: shared.clone(),
        out: SpinMutex::new(Out {
            chunks: VecDeque::new(),
            bytes: 0,
            writer_waiting: false,
        }),
        writer_wake: Notify::new(),
        space: Notify::new(),
        queued: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        failure: OnceLock::new(),
        ack_wanted: AtomicU64::new(0),
        waiters: Mutex::new(Vec::new()),
        cancel: shared.shutdown.child_token(),
        ready: AtomicBool::new(false),
        finished: AtomicBool::new(false),
        base: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        bytes_written: AtomicU64::new(0),
    });
    shared.connects.fetch_add(1, Ordering::Relaxed);
    shared.update(Update::Add(conn.clone()));
    let c = conn.clone();
    let receiver_id = record.receiver;
    shared.tasks.spawn(async move {
        let reason = tokio::select! {
            biased;
            _ = c.cancel.cancelled() => c.failure.get().cloned().unwrap_or(FailReason::SenderClosed),
            r = drive(&c, receiver_id) => r,
        };
        c.fail(reason.clone());
        // Events still staged for it are reported failed by a hand-over; do it now
        // rather than at some later publish (there may be none).
        lock_stage(&c.shared.stage).hand_over(&c.shared);
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
            receiver: c.info,
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

/// The length prefix and header of a Data frame.
fn data_header(flags: Flags, seq: u64, body_len: usize) -> [u8; LEN_PREFIX + HEADER_LEN] {
    let mut h = [0u8; LEN_PREFIX + HEADER_LEN];
    h[..4].copy_from_slice(&((HEADER_LEN + body_len) as u32).to_be_bytes());
    h[4] = Kind::Data as u8;
    h[5] = flags.0;
    h[6..].copy_from_slice(&seq.to_be_bytes());
    h
}

/// A connection on this host gets a congestion control that does not pace (`cubic`;
/// best effort, the system's default stays if it cannot be set). With `bbr`, a common
/// default, the kernel paces the sender's bursts of 128 KiB with a timer even on
/// loopback, where there is no queue to protect: measured at 1 KiB events, 1 -> 1, 2.3-2.7
/// M/s paced against 4.1 M/s not. LAN connections keep the system's choice.
fn unpaced(sock: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(sock).set_tcp_congestion(b"cubic") {
        tracing::debug!(error = %e, "cannot set cubic congestion control; keeping the default");
    }
}

/// Writes every chunk, with as few calls as the socket allows.
async fn write_all_vectored<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    chunks: &[Bytes],
) -> std::io::Result<()> {
    if let [one] = chunks {
        return wr.write_all(one).await;
    }
    // (chunk, bytes of it written so far)
    let (mut i, mut off) = (0, 0);
    loop {
        while i < chunks.len() && chunks[i].len() == off {
            i += 1;
            off = 0;
        }
        if i == chunks.len() {
            return Ok(());
        }
        let slices: Vec<std::io::IoSlice<'_>> = std::iter::once(&chunks[i][off..])
            .chain(chunks[i + 1..].iter().map(|c| &c[..]))
            .map(std::io::IoSlice::new)
            .collect();
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && n >= chunks[i].len() - off {
            n -= chunks[i].len() - off;
            i += 1;
            off = 0;
        }
        off += n;
    }
}

/// Re-encodes a buffer of plain frames as sealed frames.
fn seal_all(sealer: &Sealer, mut plain: &[u8], out: &mut BytesMut) {
    while plain.len() >= LEN_PREFIX + HEADER_LEN {
        let len = u32::from_be_bytes([plain[0], plain[1], plain[2], plain[3]]) as usize;
        let kind = Kind::from_u8(plain[4]).unwrap_or(Kind::Data);
        let flags = Flags(plain[5]);
        let mut seq_bytes = [0u8; 8];
        seq_bytes.copy_from_slice(&plain[6..14]);
        let seq = u64::from_be_bytes(seq_bytes);
        let body = &plain[LEN_PREFIX + HEADER_LEN..LEN_PREFIX + len];
        sealer.put_sealed(out, kind, flags, seq, body);
        plain.advance(LEN_PREFIX + len);
    }
}

async fn drive(conn: &Arc<Conn>, receiver_id: ipcbus_proto::ids::ReceiverId) -> FailReason {
    let shared = &conn.shared;
    let addr = conn.info.addr;
    let connected = tokio::time::timeout(shared.connect_timeout, async {
        let sock = TcpStream::connect(addr).await?;
        let _ = sock.set_nodelay(true);
        if addr.ip().is_loopback() {
            unpaced(&sock);
        }
        handshake::connect(
            sock,
            &shared.handle,
            shared.id,
            &shared.sec,
            Some(receiver_id),
            shared.max_frame,
        )
        .await
    })
    .await;
    let est = match connected {
        Ok(Ok(est)) => est,
        Ok(Err(e)) => {
            tracing::warn!(handle = %shared.handle, receiver = %conn.info, error = %e, "cannot connect to receiver");
            return fail_reason(&e);
        }
        Err(_) => return FailReason::TimedOut,
    };
    conn.ready.store(true, Ordering::Release);
    shared.handshakes.fetch_add(1, Ordering::Relaxed);
    shared.ready.send_modify(|n| *n += 1);
    let _ = shared.events.send(SenderEvent::ReceiverJoined(conn.info));
    tracing::debug!(handle = %shared.handle, receiver = %conn.info, "receiver connected");

    let (rd, mut wr) = est.io.into_split();
    let tx_sealer = est.tx;
    let rx_sealer = est.rx;
    // (last sequence of a written batch, when it was written): for the ack timeout.
    let batches: Mutex<VecDeque<(u64, Instant)>> = Mutex::new(VecDeque::new());

    let writer = async {
        let mut sealed = BytesMut::new();
        let mut batch: Vec<Bytes> = Vec::new();
        // The highest sequence asked to be acknowledged promptly, and the AckRequest
        // frames' own counter.
        let mut requested = 0u64;
        let mut request_seq = 0u64;
        // The last event written: a request never names one not written yet.
        let mut written = 0u64;
        loop {
            let notified = conn.writer_wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let took = {
                let mut out = lock_out(&conn.out);
                let last = out.chunks.back().map(|c| c.1);
                out.bytes = 0;
                batch.extend(out.chunks.drain(..).map(|c| c.0));
                last
            };
            let top = took.unwrap_or(written);
            let want = conn.ack_wanted.load(Ordering::Acquire).min(top);
            let request = (want > requested).then_some(want);
            if took.is_none() && request.is_none() {
                // Nothing queued: take what the publisher staged, or sleep until a
                // hand-over or a request. Both under the stage's lock, so no hand-over
                // is missed; a request after this look finds `writer_waiting` set.
                let sleep = {
                    let mut stage = lock_stage(&shared.stage);
                    if stage.buf.is_empty() {
                        let mut out = lock_out(&conn.out);
                        if out.chunks.is_empty() {
                            out.writer_waiting = true;
                            stage.idle_writers += 1;
                        }
                        out.writer_waiting
                    } else {
                        stage.hand_over(shared);
                        false
                    }
                };
                let asked = conn.ack_wanted.load(Ordering::Acquire).min(written) > requested;
                if sleep && !asked {
                    notified.await;
                }
                continue;
            }
            if let Some(last) = took {
                conn.space.notify_one();
                lock(&batches).push_back((last, Instant::now()));
            }
            if let Some(up_to) = request {
                requested = up_to;
                request_seq += 1;
                if tx_sealer.is_none() {
                    let mut ask = BytesMut::new();
                    let body = up_to.to_be_bytes();
                    put_frame(&mut ask, Kind::AckRequest, Flags(0), request_seq, &body);
                    batch.push(ask.freeze());
                }
            }
            let (wrote, result) = match &tx_sealer {
                Some(s) => {
                    sealed.clear();
                    for chunk in &batch {
                        seal_all(s, chunk, &mut sealed);
                    }
                    if let Some(up_to) = request {
                        s.put_sealed(
                            &mut sealed,
                            Kind::AckRequest,
                            Flags(0),
                            request_seq,
                            &up_to.to_be_bytes(),
                        );
                    }
                    (sealed.len(), wr.write_all(&sealed).await)
                }
                None => (
                    batch.iter().map(Bytes::len).sum::<usize>(),
                    write_all_vectored(&mut wr, &batch).await,
                ),
            };
            batch.clear();
            if let Err(e) = result {
                tracing::debug!(receiver = %conn.info, error = %e, "write failed");
                return FailReason::Disconnected;
            }
            // The writer's own counter: one uncontended add per write.
            conn.bytes_written
                .fetch_add(wrote as u64, Ordering::Relaxed);
            written = top;
        }
    };

    let reader = async {
        let mut frames = FramedRead::new(
            rd,
            FrameReader(CodecV1::new(shared.max_frame.min(64 * 1024))),
        );
        frames.read_buffer_mut().extend_from_slice(&est.read_buf);
        let mut last_frame_seq = 0u64;
        let tick = (shared.send_timeout / 4).max(Duration::from_millis(5));
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = tokio::select! {
                f = frames.next() => f,
                _ = ticker.tick() => {
                    let acked = conn.acked.load(Ordering::Acquire);
                    let overdue = {
                        let mut b = lock(&batches);
                        while b.front().is_some_and(|e| e.0 <= acked) {
                            b.pop_front();
                        }
                        b.front().is_some_and(|e| e.1.elapsed() > shared.send_timeout)
                    };
                    if overdue {
                        tracing::warn!(handle = %shared.handle, receiver = %conn.info, "receiver did not acknowledge within the send timeout; dropping it");
                        return FailReason::TimedOut;
                    }
                    continue;
                }
            };
            let mut f = match next {
                None => return FailReason::Disconnected,
                // A reset or other socket error is a lost connection, not bad input.
                Some(Err(ReadError::Io(_))) => return FailReason::Disconnected,
                Some(Err(ReadError::Decode(e))) => return protocol(conn, e),
                Some(Ok(f)) => f,
            };
            if f.seq <= last_frame_seq {
                return protocol(
                    conn,
                    DecodeError::OutOfOrder {
                        seq: f.seq,
                        last: last_frame_seq,
                    },
                );
            }
            last_frame_seq = f.seq;
            match &rx_sealer {
                Some(s) => {
                    if let Err(e) = s.open(&mut f) {
                        return protocol(conn, e);
                    }
                }
                None if f.flags.sealed() => return protocol(conn, DecodeError::SealMismatch),
                None => {}
            }
            match f.kind {
                Kind::Ack => {
                    let up_to = match parse_ack(&f.body) {
                        Ok(v) => v,
                        Err(e) => return protocol(conn, e),
                    };
                    if up_to > conn.queued.load(Ordering::Acquire) {
                        return protocol(
                            conn,
                            DecodeError::Malformed("ack beyond the last event sent"),
                        );
                    }
                    if up_to > conn.acked.load(Ordering::Acquire) {
                        // Under the queue's lock, and not once the connection failed:
                        // `fail` counted everything past the old `acked` as failed, so
                        // a later ack must not count some of it as acknowledged too.
                        {
                            let _out = lock_out(&conn.out);
                            if let Some(reason) = conn.failure.get() {
                                return reason.clone();
                            }
                            conn.acked.store(up_to, Ordering::Release);
                        }
                        conn.wake_up_to(up_to);
                        conn.space.notify_one();
                    }
                }
                Kind::Bye => return FailReason::ReceiverLeft,
                got => {
                    return protocol(
                        conn,
                        DecodeError::Unexpected {
                            got,
                            expected: "Ack or Bye",
                        },
                    )
                }
            }
        }
    };

    tokio::select! {
        r = writer => r,
        r = reader => r,
    }
}

fn protocol(conn: &Conn, e: DecodeError) -> FailReason {
    tracing::warn!(receiver = %conn.info, error = %e, "receiver broke the protocol; dropping it");
    FailReason::Protocol(e.to_string())
}

/// Keeps one connection per discovered receiver: given the current set of records
/// for the handle (from any discovery back end), it connects to new ones, reconnects
/// dropped ones with exponential backoff while they stay registered, and stops
/// sending to those that left.
pub(crate) struct Tracker {
    shared: Arc<Shared>,
    on_stale: Arc<dyn Fn(&Record) + Send + Sync>,
    known: HashMap<ipcbus_proto::ids::ReceiverId, Known>,
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
        }
    }

    fn connect(&self, record: &Record) -> Arc<Conn> {
        let on_stale = self.on_stale.clone();
        let rec = record.clone();
        start_conn(&self.shared, record, move || on_stale(&rec))
    }

    /// Brings the connections in line with `records`, the full current set.
    pub(crate) fn apply(&mut self, records: Vec<Record>) {
        let now = Instant::now();
        let mut seen = std::collections::HashSet::new();
        for rec in records {
            if rec.handle != self.shared.handle {
                continue;
            }
            seen.insert(rec.receiver);
            let conn = match self.known.get(&rec.receiver) {
                None => self.connect(&rec),
                Some(k) if k.conn.finished.load(Ordering::Acquire) && now >= k.retry_at => {
                    self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                    self.shared.update(Update::Remove(k.conn.clone()));
                    self.connect(&rec)
                }
                Some(_) => continue,
            };
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
            tracker: Tracker::new(
                shared,
                Arc::new(move |rec: &Record| r2.remove(&rec.handle, &rec.receiver)),
            ),
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
        let dirty = Arc::new(Notify::new());
        let d2 = dirty.clone();
        let watcher = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
            d2.notify_one();
        })
        .and_then(|mut w| {
            use notify::Watcher;
            w.watch(
                &self.reg.receivers_dir(),
                notify::RecursiveMode::NonRecursive,
            )?;
            Ok(w)
        });
        let interval = match &watcher {
            Ok(_) => self.rescan_interval,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the registry; falling back to polling");
                self.rescan_interval.min(Duration::from_millis(250))
            }
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
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn loopback_connections_are_not_paced() {
        let available =
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
                .unwrap_or_default();
        if !available.split_whitespace().any(|c| c == "cubic") {
            eprintln!("cubic is not available here ({available:?}); nothing to check");
            return;
        }
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        unpaced(&s);
        let cc = socket2::SockRef::from(&s).tcp_congestion().unwrap();
        assert_eq!(cc.split(|&b| b == 0).next().unwrap(), b"cubic");
    }

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

    #[tokio::test]
    async fn write_all_vectored_survives_short_writes() {
        // A 7-byte pipe: every write is cut short, often inside a chunk.
        let (mut a, mut b) = tokio::io::duplex(7);
        let chunks: Vec<Bytes> = [&b"abc"[..], b"", b"defghijklmnop", b"q", b"rstuvwxyz"]
            .iter()
            .map(|c| Bytes::copy_from_slice(c))
            .collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            got
        });
        write_all_vectored(&mut a, &chunks).await.unwrap();
        write_all_vectored(&mut a, &chunks[1..2]).await.unwrap();
        write_all_vectored(&mut a, &[Bytes::new(), Bytes::new()])
            .await
            .unwrap();
        drop(a);
        assert_eq!(reader.await.unwrap(), b"abcdefghijklmnopqrstuvwxyz");
    }
}
