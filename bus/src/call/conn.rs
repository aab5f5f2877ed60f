//! One call connection after its handshake, the same at both ends: a reader task
//! that checks every frame through the session ([`Inbound::calls`]) and routes it —
//! a `Reply` to the call waiting for it, a `Request` to this end's handler, a
//! `Cancel` to the handler task it stops — and a writer task that numbers, seals
//! and (when it pays) compresses the frames queued by calls and replies.
//!
//! Bad input (a frame that does not open or parse, a reply to an id this side never
//! used) closes this connection only, with a warning.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use super::pending::{Matched, Pending};
use super::{fault_to_error, CallError, Contract, Peer, RemoteError, Request, Service};
use crate::handshake::Established;
use crate::transport::ByteStream;
use ipcbus_proto::call::{self as wire, Code, ContractDetail, Fault};
use ipcbus_proto::codec::CodecV1;
use ipcbus_proto::compress::{CompressPolicy, Compression, Gzipper};
use ipcbus_proto::frame::{DecodeError, Flags, Kind, HEADER_LEN, LEN_PREFIX};
use ipcbus_proto::ids::SenderId;
use ipcbus_proto::session::{Inbound, Opened, Outbound};

/// Bytes a frame adds around a body: length prefix, header, and a seal's tag.
const OVERHEAD: usize = LEN_PREFIX + HEADER_LEN + ipcbus_proto::crypto::TAG_LEN;
/// Bodies at least this long may be compressed (off on loopback and Unix sockets).
const COMPRESS_THRESHOLD: usize = 512;
/// Most calls one side has waiting on one connection.
pub(crate) const MAX_PENDING: usize = 1 << 16;
/// Past this many frames waiting for the writer, a notification is refused (`Busy`).
const MAX_QUEUED_NOTIFY: usize = 8192;

/// What this end does with the requests the other end sends.
#[derive(Clone)]
pub(crate) enum Target {
    /// Runs each on this service, in its own task.
    Service(Arc<dyn Service>),
    /// Hands each to the application's stream (a full queue answers `Busy`).
    Queue(mpsc::Sender<Request>),
}

/// How this end serves requests on a connection: where they go and how many may
/// run at once on it and in all.
#[derive(Clone)]
pub(crate) struct Handler {
    pub(crate) target: Target,
    pub(crate) per_conn: Arc<Semaphore>,
    pub(crate) global: Arc<Semaphore>,
}

/// The permits a running request holds.
pub(crate) type Permits = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// One call connection, shared by its tasks, its [`Peer`]s and the calls on it.
pub(crate) struct Conn {
    /// The other end's id (a client's sender id; for a server, its receiver id's
    /// bytes).
    pub(crate) peer_id: SenderId,
    /// For logs.
    pub(crate) label: String,
    out: mpsc::UnboundedSender<(Kind, Bytes)>,
    pending: Mutex<Pending<oneshot::Sender<Result<Bytes, Fault>>>>,
    /// Requests from the other end running here, by id, to abort on `Cancel`.
    running: Mutex<HashMap<u64, AbortHandle>>,
    closed: CancellationToken,
    reason: Mutex<Option<String>>,
    /// Taken when the connection closes, so a per-connection service (which may hold
    /// this connection's `Peer`) is dropped with it.
    handler: Mutex<Option<Handler>>,
    /// Frames queued for the writer and not written yet.
    queued: Arc<AtomicUsize>,
    max_frame: usize,
    /// Calls of ours waiting for a reply (for least-outstanding choice).
    outstanding: AtomicUsize,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("peer", &self.label).finish()
    }
}

/// Whether a failed call left this side.
#[derive(Debug)]
pub(crate) enum CallFail {
    /// It was never written: it may go to another server.
    NotSent(CallError),
    /// It was queued for writing or written: it must not be sent again.
    Sent(CallError),
}

impl CallFail {
    pub(crate) fn into_error(self) -> CallError {
        match self {
            CallFail::NotSent(e) | CallFail::Sent(e) => e,
        }
    }
}

/// Starts the reader and writer tasks of an established connection. `closed` is
/// cancelled when the connection ends (or to end it); set the handler with
/// [`Conn::set_handler`] before requests can be served (until then they wait in the
/// socket).
pub(crate) fn start(
    est: Established<ByteStream>,
    peer_id: SenderId,
    label: String,
    closed: CancellationToken,
    max_frame: usize,
    remote: bool,
) -> (Arc<Conn>, tokio::sync::oneshot::Sender<Handler>) {
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let conn = Arc::new(Conn {
        peer_id,
        label,
        out: out_tx,
        pending: Mutex::new(Pending::new(MAX_PENDING)),
        running: Mutex::new(HashMap::new()),
        closed,
        reason: Mutex::new(None),
        handler: Mutex::new(None),
        queued: Arc::new(AtomicUsize::new(0)),
        max_frame,
        outstanding: AtomicUsize::new(0),
    });
    let (rd, wr) = est.io.into_split();
    let (h_tx, h_rx) = oneshot::channel::<Handler>();
    tokio::spawn(writer(
        wr,
        est.tx,
        out_rx,
        conn.closed.clone(),
        conn.queued.clone(),
        remote,
    ));
    let c2 = conn.clone();
    tokio::spawn(async move {
        // Requests wait until this end knows how to serve them.
        let handler = tokio::select! {
            h = h_rx => h.ok(),
            _ = c2.closed.cancelled() => None,
        };
        if let Some(h) = handler {
            *lock(&c2.handler) = Some(h);
        }
        let r = reader(rd, est.rx, est.read_buf, &c2).await;
        let reason = match r {
            Ok(()) => "connection closed".to_owned(),
            Err(e) => {
                tracing::warn!(peer = %c2.label, error = %e, "closing call connection on bad input");
                format!("closed on bad input from the peer: {e}")
            }
        };
        c2.close(&reason);
    });
    (conn, h_tx)
}

impl Conn {
    /// Ends the connection: calls waiting fail `Disconnected(reason)`, handler tasks
    /// are aborted, the writer sends `Bye` and shuts the socket.
    pub(crate) fn close(&self, reason: &str) {
        {
            let mut r = lock(&self.reason);
            if r.is_none() {
                *r = Some(reason.to_owned());
            }
        }
        self.closed.cancel();
        let waiting = lock(&self.pending).drain();
        drop(waiting);
        for (_, h) in lock(&self.running).drain() {
            h.abort();
        }
        let handler = lock(&self.handler).take();
        drop(handler);
    }

    /// Queues a frame for the writer.
    fn send(&self, kind: Kind, body: Bytes) -> bool {
        self.queued.fetch_add(1, Ordering::Relaxed);
        if self.out.send((kind, body)).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Whether it is still open.
    pub(crate) fn is_open(&self) -> bool {
        !self.closed.is_cancelled()
    }

    /// Resolves when it has closed.
    pub(crate) async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// Why it closed.
    pub(crate) fn reason(&self) -> String {
        lock(&self.reason)
            .clone()
            .unwrap_or_else(|| "connection closed".to_owned())
    }

    /// Entries of the table of calls in flight.
    pub(crate) fn pending_len(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Calls of ours waiting for a reply here.
    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Largest argument or reply body that fits a frame with `head` bytes before it.
    fn fits(&self, head: usize, body: usize) -> bool {
        head + body + OVERHEAD <= self.max_frame
    }

    /// Makes one call on this connection and waits for its reply, at most `timeout`.
    /// Dropping the future forgets the call and sends `Cancel`.
    pub(crate) async fn call(
        self: &Arc<Self>,
        contract: &Contract,
        method: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, CallFail> {
        if !self.is_open() {
            return Err(CallFail::NotSent(CallError::Disconnected(self.reason())));
        }
        let (tx, rx) = oneshot::channel();
        let id = match lock(&self.pending).insert(tx) {
            Ok(id) => id,
            Err(_) => return Err(CallFail::NotSent(CallError::Busy)),
        };
        let mut guard = Guard {
            conn: self,
            id,
            done: false,
        };
        let deadline_ms = timeout.as_millis().clamp(1, u32::MAX as u128) as u32;
        let mut b = BytesMut::new();
        wire::encode_request_head(
            &mut b,
            id,
            deadline_ms,
            0,
            contract.name(),
            contract.version(),
            method,
        );
        if !self.fits(b.len(), body.len()) {
            guard.done = true;
            lock(&self.pending).forget(id);
            return Err(CallFail::NotSent(CallError::Encode(format!(
                "request of {} bytes exceeds the maximum frame of {} bytes",
                body.len(),
                self.max_frame
            ))));
        }
        b.extend_from_slice(&body);
        if !self.send(Kind::Request, b.freeze()) {
            guard.done = true;
            lock(&self.pending).forget(id);
            return Err(CallFail::NotSent(CallError::Disconnected(self.reason())));
        }
        if !self.is_open() {
            // Closed while queueing: the writer may or may not have written it, so it
            // must not go anywhere else.
            guard.done = true;
            lock(&self.pending).forget(id);
            return Err(CallFail::Sent(CallError::Disconnected(self.reason())));
        }
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        let r = tokio::time::timeout(timeout, rx).await;
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
        match r {
            Ok(Ok(outcome)) => {
                guard.done = true;
                outcome.map_err(|f| {
                    CallFail::Sent(match f.code {
                        // The callee stopped at the deadline it was given: for the
                        // caller, that is its own timeout.
                        Code::DeadlineExceeded => CallError::Timeout(timeout),
                        _ => fault_to_error(contract, f),
                    })
                })
            }
            Ok(Err(_)) => {
                guard.done = true;
                Err(CallFail::Sent(CallError::Disconnected(self.reason())))
            }
            Err(_) => Err(CallFail::Sent(CallError::Timeout(timeout))),
        }
    }

    /// Sends a one-way request.
    pub(crate) fn notify(
        &self,
        contract: &Contract,
        method: &str,
        body: &[u8],
    ) -> Result<(), CallError> {
        if !self.is_open() {
            return Err(CallError::Disconnected(self.reason()));
        }
        let id = lock(&self.pending).next_id();
        let mut b = BytesMut::new();
        wire::encode_request_head(
            &mut b,
            id,
            0,
            wire::ONE_WAY,
            contract.name(),
            contract.version(),
            method,
        );
        if !self.fits(b.len(), body.len()) {
            return Err(CallError::Encode(format!(
                "notification of {} bytes exceeds the maximum frame of {} bytes",
                body.len(),
                self.max_frame
            )));
        }
        if self.queued.load(Ordering::Relaxed) >= MAX_QUEUED_NOTIFY {
            // The other end does not read: do not let notifications pile up.
            return Err(CallError::Busy);
        }
        b.extend_from_slice(body);
        if self.send(Kind::Request, b.freeze()) {
            Ok(())
        } else {
            Err(CallError::Disconnected(self.reason()))
        }
    }

    /// Sends the reply to request `id`. A value too large for a frame is answered
    /// with an error instead, and reported as [`CallError::Encode`].
    pub(crate) fn reply(
        &self,
        id: u64,
        outcome: Result<Bytes, RemoteError>,
    ) -> Result<(), CallError> {
        lock(&self.running).remove(&id);
        let outcome = outcome.map_err(|e| Fault {
            code: e.code,
            message: e.message,
            detail: e.detail,
        });
        let mut r = wire::Reply { id, outcome };
        let mut too_large = None;
        let len = match &r.outcome {
            Ok(b) => b.len(),
            Err(f) => f.detail.len() + wire::MAX_MESSAGE,
        };
        if !self.fits(16, len) {
            too_large = Some(len);
            r.outcome = Err(Fault {
                code: Code::Application,
                message: format!(
                    "the reply of {len} bytes exceeds the maximum frame of {} bytes",
                    self.max_frame
                ),
                detail: Bytes::new(),
            });
        }
        let mut b = BytesMut::new();
        r.encode(&mut b);
        if !self.is_open() || !self.send(Kind::Reply, b.freeze()) {
            return Err(CallError::Disconnected(self.reason()));
        }
        match too_large {
            Some(len) => Err(CallError::Encode(format!(
                "reply of {len} bytes exceeds the maximum frame of {} bytes",
                self.max_frame
            ))),
            None => Ok(()),
        }
    }

    fn cancel_sent(&self, id: u64) {
        let mut b = BytesMut::with_capacity(8);
        wire::encode_cancel(&mut b, id);
        let _ = self.send(Kind::Cancel, b.freeze());
    }

    /// Routes one request from the other end.
    fn request(self: &Arc<Self>, req: wire::Request) {
        let Some(h) = lock(&self.handler).clone() else {
            return;
        };
        let one_way = req.one_way();
        let permits = match (
            h.per_conn.clone().try_acquire_owned(),
            h.global.clone().try_acquire_owned(),
        ) {
            (Ok(a), Ok(b)) => (a, b),
            _ => {
                if one_way {
                    tracing::warn!(peer = %self.label, method = %req.method, "at the concurrency limit: notification dropped");
                } else {
                    let _ = self.reply(req.id, Err(busy()));
                }
                return;
            }
        };
        let peer = Peer { conn: self.clone() };
        match &h.target {
            Target::Queue(tx) => {
                let r = Request::new(req, peer, permits);
                if let Err(e) = tx.try_send(r) {
                    let mut r = match e {
                        mpsc::error::TrySendError::Full(r) => r,
                        mpsc::error::TrySendError::Closed(r) => r,
                    };
                    if r.is_one_way() {
                        tracing::warn!(peer = %self.label, method = %r.method(), "incoming queue full: notification dropped");
                        r.mark_answered();
                    } else {
                        let _ = r.answer(Err(busy()));
                    }
                }
            }
            Target::Service(svc) => {
                let contract = svc.contract();
                if !contract.accepts(&req.contract, req.version) {
                    if !one_way {
                        let theirs = Contract::new(req.contract.clone(), req.version);
                        let _ = self.reply(
                            req.id,
                            Err(RemoteError {
                                code: Code::ContractMismatch,
                                message: format!("this server serves {contract}, not {theirs}"),
                                detail: ContractDetail {
                                    contract: contract.name().to_owned(),
                                    version: contract.version(),
                                }
                                .to_bytes(),
                            }),
                        );
                    }
                    return;
                }
                let svc = svc.clone();
                let conn = self.clone();
                let id = req.id;
                let deadline = match req.deadline_ms {
                    0 => None,
                    ms => Some(Duration::from_millis(ms.into())),
                };
                // Hold the map's lock across the spawn, so a fast task cannot finish
                // and remove itself before it is inserted.
                let mut running = lock(&self.running);
                let task = tokio::spawn(async move {
                    let _permits = permits;
                    let run = AssertUnwindSafe(super::CURRENT_PEER.scope(peer.clone(), async {
                        svc.call(&req.method, req.body, peer).await
                    }))
                    .catch_unwind();
                    let outcome = match deadline {
                        Some(d) => match tokio::time::timeout(d, run).await {
                            Ok(r) => r,
                            Err(_) => Ok(Err(RemoteError {
                                code: Code::DeadlineExceeded,
                                message: "the deadline passed before the handler finished".into(),
                                detail: Bytes::new(),
                            })),
                        },
                        None => run.await,
                    };
                    let outcome = outcome.unwrap_or_else(|_| Err(panicked()));
                    if one_way {
                        lock(&conn.running).remove(&id);
                    } else {
                        let _ = conn.reply(id, outcome);
                    }
                });
                if !one_way {
                    running.insert(id, task.abort_handle());
                }
            }
        }
    }
}

/// Forgets a call whose future ends without its reply, and tells the other end.
struct Guard<'a> {
    conn: &'a Arc<Conn>,
    id: u64,
    done: bool,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if !self.done && lock(&self.conn.pending).forget(self.id) {
            self.conn.cancel_sent(self.id);
        }
    }
}

pub(crate) fn busy() -> RemoteError {
    RemoteError {
        code: Code::Busy,
        message: "at the limit of concurrent calls".into(),
        detail: Bytes::new(),
    }
}

pub(crate) fn panicked() -> RemoteError {
    RemoteError {
        code: Code::Panicked,
        message: "handler panicked".into(),
        detail: Bytes::new(),
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads frames until the connection ends; an error is bad input.
async fn reader(
    mut rd: crate::transport::ReadHalf,
    opener: Option<ipcbus_proto::crypto::Sealer>,
    mut buf: BytesMut,
    conn: &Arc<Conn>,
) -> Result<(), DecodeError> {
    let mut codec = CodecV1::new(conn.max_frame);
    let mut inbound = Inbound::calls(opener, conn.max_frame);
    loop {
        while let Some(mut f) = codec.decode(&mut buf)? {
            let kind = f.kind;
            let body = match inbound.open_frame(&mut f)? {
                Opened::Plain(_) => f.body.freeze(),
                Opened::Inflated(v) => Bytes::from(v),
                Opened::AckRequest(_) => return Err(DecodeError::Malformed("call frame")),
            };
            match kind {
                Kind::Request => conn.request(wire::Request::parse(body)?),
                Kind::Reply => {
                    let r = wire::Reply::parse(body)?;
                    let m = lock(&conn.pending).complete(r.id);
                    match m {
                        Matched::Waiting(tx) => {
                            let _ = tx.send(r.outcome);
                        }
                        Matched::Late => {
                            tracing::debug!(peer = %conn.label, id = r.id, "late reply dropped");
                        }
                        Matched::Unknown => {
                            return Err(DecodeError::Malformed("reply to an unknown call"))
                        }
                    }
                }
                Kind::Cancel => {
                    let id = wire::parse_cancel(&body)?;
                    if let Some(h) = lock(&conn.running).remove(&id) {
                        h.abort();
                    }
                }
                _ => return Ok(()),
            }
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 * 1024);
        }
        tokio::select! {
            _ = conn.closed.cancelled() => return Ok(()),
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            },
        }
    }
}

/// Writes the queued frames, many per write; sends `Bye` when the connection ends.
async fn writer(
    mut wr: crate::transport::WriteHalf,
    sealer: Option<ipcbus_proto::crypto::Sealer>,
    mut rx: mpsc::UnboundedReceiver<(Kind, Bytes)>,
    closed: CancellationToken,
    queued: Arc<AtomicUsize>,
    remote: bool,
) {
    let mut out = Outbound::new(sealer);
    let mut policy = CompressPolicy::new(Compression::Auto, COMPRESS_THRESHOLD);
    policy.set_remote(remote);
    let mut gz: Option<Gzipper> = None;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        let first = tokio::select! {
            biased;
            _ = closed.cancelled() => None,
            m = rx.recv() => m,
        };
        let Some(first) = first else { break };
        buf.clear();
        let mut next = Some(first);
        let mut n = 0;
        while let Some((kind, body)) = next.take() {
            put(&mut out, &mut buf, &mut policy, &mut gz, kind, &body);
            n += 1;
            if buf.len() < 256 * 1024 {
                next = rx.try_recv().ok();
            }
        }
        queued.fetch_sub(n, Ordering::Relaxed);
        if wr.write_all(&buf).await.is_err() {
            closed.cancel();
            return;
        }
    }
    buf.clear();
    out.put(&mut buf, Kind::Bye, Flags(0), &[]);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = wr.write_all(&buf).await;
        let _ = wr.shutdown().await;
    })
    .await;
}

fn put(
    out: &mut Outbound,
    buf: &mut BytesMut,
    policy: &mut CompressPolicy,
    gz: &mut Option<Gzipper>,
    kind: Kind,
    body: &[u8],
) {
    if policy.should_compress(body.len()) {
        let z = gz.get_or_insert_with(|| Gzipper::new(1)).gzip(body);
        policy.record(body.len(), z.as_ref().map(Vec::len));
        if let Some(z) = z {
            out.put(buf, kind, Flags(Flags::COMPRESSED), &z);
            return;
        }
    }
    out.put(buf, kind, Flags(0), body);
}

/// When a request's caller gives up, as of its arrival.
pub(crate) fn deadline_of(req: &wire::Request, received: Instant) -> Option<Instant> {
    match req.deadline_ms {
        0 => None,
        ms => Some(received + Duration::from_millis(ms.into())),
    }
}
