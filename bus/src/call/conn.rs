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
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};
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
/// Past this many bytes not written yet, a notification is refused (`Busy`).
const MAX_UNWRITTEN_NOTIFY: usize = 8 << 20;
/// Past this many bytes not written yet (and one frame), sending a reply closes the
/// connection: the peer sends requests and does not read the replies.
const MAX_UNWRITTEN: usize = 64 << 20;

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
    /// The sending half: frames are written by whoever sends them when the socket
    /// takes them at once, else by the writer task (woken by `flush`).
    wire: Mutex<Wire>,
    flush: Notify,
    pending: Mutex<Pending<oneshot::Sender<Result<Bytes, Fault>>>>,
    /// Requests from the other end running here, by id, to abort on `Cancel`.
    running: Mutex<HashMap<u64, AbortHandle>>,
    closed: CancellationToken,
    reason: Mutex<Option<String>>,
    /// Taken when the connection closes, so a per-connection service (which may hold
    /// this connection's `Peer`) is dropped with it.
    handler: Mutex<Option<Handler>>,
    max_frame: usize,
    /// Calls of ours waiting for a reply (for least-outstanding choice).
    outstanding: AtomicUsize,
    /// The handler's per-connection limit and how many permits it has: requests of
    /// the other end being served here hold the difference.
    serving: OnceLock<(Arc<Semaphore>, usize)>,
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
    let (rd, wr) = est.io.into_split();
    let mut policy = CompressPolicy::new(Compression::Auto, COMPRESS_THRESHOLD);
    policy.set_remote(remote);
    let conn = Arc::new(Conn {
        peer_id,
        label,
        wire: Mutex::new(Wire {
            out: Outbound::new(est.tx),
            policy,
            gz: None,
            buf: BytesMut::new(),
            half: Some(wr),
            closed: false,
        }),
        flush: Notify::new(),
        pending: Mutex::new(Pending::new(MAX_PENDING)),
        running: Mutex::new(HashMap::new()),
        closed,
        reason: Mutex::new(None),
        handler: Mutex::new(None),
        max_frame,
        outstanding: AtomicUsize::new(0),
        serving: OnceLock::new(),
    });
    let (h_tx, h_rx) = oneshot::channel::<Handler>();
    tokio::spawn(writer(conn.clone()));
    let c2 = conn.clone();
    tokio::spawn(async move {
        // Requests wait until this end knows how to serve them.
        let handler = tokio::select! {
            h = h_rx => h.ok(),
            _ = c2.closed.cancelled() => None,
        };
        if let Some(h) = handler {
            // No request has been read yet: every permit is there.
            let _ = c2
                .serving
                .set((h.per_conn.clone(), h.per_conn.available_permits()));
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

    /// Bytes sent but not written yet.
    fn unwritten(&self) -> usize {
        lock(&self.wire).buf.len()
    }

    /// Sends a frame: numbered, sealed and compressed as the connection wants. When
    /// `later` is false it is written at once with whatever is queued before it, if
    /// the socket takes it; else (or for what the socket does not take) the writer
    /// task writes it, with the frames queued meanwhile, in one system call. False
    /// when the connection is closed. A peer that leaves more than
    /// [`MAX_UNWRITTEN`] bytes of replies unread is cut off.
    fn send(&self, kind: Kind, body: &[u8], later: bool) -> bool {
        let mut w = lock(&self.wire);
        if w.closed {
            return false;
        }
        if kind == Kind::Reply && w.buf.len() > MAX_UNWRITTEN + self.max_frame {
            drop(w);
            tracing::warn!(peer = %self.label, "the peer does not read what it is sent; closing the connection");
            self.close("the peer does not read what it is sent");
            return false;
        }
        let was_empty = w.buf.is_empty();
        w.put(kind, body);
        if !later {
            let Wire { buf, half, .. } = &mut *w;
            // Without the socket, the writer task waits for it to take more.
            if let Some(h) = half {
                match h.try_write(buf) {
                    Ok(n) => buf.advance(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        drop(w);
                        // The frame may or may not have left.
                        self.closed.cancel();
                        return true;
                    }
                }
            }
        }
        // The writer task is woken when the first frame is left for it (it writes
        // until nothing is left).
        let wake = !w.buf.is_empty() && (was_empty || !later);
        drop(w);
        if wake {
            self.flush.notify_one();
        }
        true
    }

    /// Whether other requests of the other end than the one answering are being
    /// served here: their replies come soon, and one write can take them all.
    fn replies_follow(&self) -> bool {
        self.serving
            .get()
            .is_some_and(|(s, max)| max.saturating_sub(s.available_permits()) > 1)
    }

    /// Runs the handler task of request `id` from the other end, so a `Cancel` for
    /// it aborts it (`track`: it answers, so its entry goes with its reply).
    pub(crate) fn spawn_handler<F>(&self, id: u64, track: bool, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        // Hold the map's lock across the spawn, so a fast task cannot answer (and
        // remove its entry) before it is inserted.
        let mut running = lock(&self.running);
        let task = tokio::spawn(fut);
        if track && self.is_open() {
            running.insert(id, task.abort_handle());
        }
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
            counted: false,
        };
        let deadline_ms = timeout.as_millis().clamp(1, u32::MAX as u128) as u32;
        let head = 32 + contract.name().len() + method.len();
        let mut b = BytesMut::with_capacity(head + body.len());
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
        // Under load (other calls waiting here), the writer task sends the requests
        // queued meanwhile in one write; alone, it leaves at once.
        let later = self.outstanding() > 0;
        if !self.send(Kind::Request, &b, later) {
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
        // Taken back when the call ends, also by dropping its future.
        guard.counted = true;
        let r = tokio::time::timeout(timeout, rx).await;
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
        if self.unwritten() >= MAX_UNWRITTEN_NOTIFY {
            // The other end does not read: do not let notifications pile up.
            return Err(CallError::Busy);
        }
        b.extend_from_slice(body);
        if self.send(Kind::Request, &b, false) {
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
        let cap = match &r.outcome {
            Ok(b) => b.len(),
            Err(f) => f.detail.len() + f.message.len(),
        };
        let mut b = BytesMut::with_capacity(32 + cap);
        r.encode(&mut b);
        let later = self.replies_follow();
        if !self.is_open() || !self.send(Kind::Reply, &b, later) {
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
        let _ = self.send(Kind::Cancel, &b, false);
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
                    let (mut r, why) = match e {
                        mpsc::error::TrySendError::Full(r) => (r, busy()),
                        mpsc::error::TrySendError::Closed(r) => (r, super::server::closing()),
                    };
                    if r.is_one_way() {
                        tracing::warn!(peer = %self.label, method = %r.method(), "{}: notification dropped", why.message);
                        r.mark_answered();
                    } else {
                        let _ = r.answer(Err(why));
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
    /// It counts in `outstanding`.
    counted: bool,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.conn.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
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

/// The sending half of a connection: numbering and sealing, the compression policy,
/// the bytes not written yet, and the socket (taken out by the writer task while it
/// waits for the socket to take more).
struct Wire {
    out: Outbound,
    policy: CompressPolicy,
    gz: Option<Gzipper>,
    buf: BytesMut,
    half: Option<crate::transport::WriteHalf>,
    /// No more frames (the writer has sent `Bye`).
    closed: bool,
}

impl Wire {
    fn put(&mut self, kind: Kind, body: &[u8]) {
        put(
            &mut self.out,
            &mut self.buf,
            &mut self.policy,
            &mut self.gz,
            kind,
            body,
        );
    }
}

/// Writes what the senders left unwritten (the socket did not take it at once),
/// waiting for the socket; sends `Bye` and shuts the socket when the connection
/// ends.
async fn writer(conn: Arc<Conn>) {
    'run: loop {
        tokio::select! {
            biased;
            _ = conn.closed.cancelled() => break 'run,
            _ = conn.flush.notified() => {}
        }
        loop {
            let half = {
                let mut w = lock(&conn.wire);
                if w.buf.is_empty() {
                    if w.buf.capacity() > 1 << 20 {
                        w.buf = BytesMut::new();
                    }
                    break;
                }
                w.half.take()
            };
            let Some(half) = half else { break };
            let ready = tokio::select! {
                biased;
                _ = conn.closed.cancelled() => None,
                r = half.writable() => Some(r),
            };
            let mut w = lock(&conn.wire);
            let r = match ready {
                Some(Ok(())) => match half.try_write(&w.buf) {
                    Ok(n) => {
                        w.buf.advance(n);
                        Ok(())
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
                    Err(e) => Err(e),
                },
                Some(Err(e)) => Err(e),
                None => {
                    w.half = Some(half);
                    break 'run;
                }
            };
            w.half = Some(half);
            if r.is_err() {
                drop(w);
                conn.closed.cancel();
                break 'run;
            }
        }
    }
    let (half, rest) = {
        let mut w = lock(&conn.wire);
        w.closed = true;
        w.put(Kind::Bye, &[]);
        (w.half.take(), std::mem::take(&mut w.buf))
    };
    if let Some(mut half) = half {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = half.write_all(&rest).await;
            let _ = half.shutdown().await;
        })
        .await;
    }
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
