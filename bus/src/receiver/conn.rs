//! The driver of one sender connection after its handshake, over the two halves of
//! any byte stream: the read loop reads into an [`Input`], hands its checked frames
//! to the application's queue one [`Batch`] per read (a full queue stops the reads),
//! and the acknowledgement writer, a task of its own, writes `Ack` (and `Bye` when the
//! receiver closes) when the [`AckState`] says one is due.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::input::{AckState, Batch, Input, ACK_DELAY};
use ipcbus_proto::codec::CodecV1;
use ipcbus_proto::crypto::Sealer;
use ipcbus_proto::frame::{DecodeError, Flags, Kind};
use ipcbus_proto::ids::SenderId;
use ipcbus_proto::session::Outbound;

/// The session of an established connection: the sealers of both directions (on a
/// sealed connection) and the bytes read past the handshake.
#[derive(Debug)]
pub(super) struct Session {
    pub(super) tx: Option<Sealer>,
    pub(super) rx: Option<Sealer>,
    pub(super) read_buf: BytesMut,
}

/// What a connection shares with its receiver.
#[derive(Debug)]
pub(super) struct Context<'a> {
    /// Cancelled when the receiver closes.
    pub(super) shutdown: &'a CancellationToken,
    /// Where the acknowledgement writer runs.
    pub(super) tasks: &'a TaskTracker,
    /// The receiver's count of bytes read.
    pub(super) bytes_read: &'a AtomicU64,
    /// Largest frame accepted, and largest a compressed body may inflate to.
    pub(super) max_frame: usize,
}

/// Serves one sender connection until it closes, the receiver closes or the
/// application's queue is gone; an error means the sender sent bad input (the frames
/// before it still reached the application).
pub(super) async fn run<R, W>(
    mut rd: R,
    wr: W,
    session: Session,
    sender: SenderId,
    tx: mpsc::Sender<Batch>,
    cx: Context<'_>,
) -> Result<(), DecodeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let ack = Arc::new(AckState::default());
    let conn_done = cx.shutdown.child_token();
    let acker = cx.tasks.spawn(ack_writer(
        wr,
        session.tx,
        ack.clone(),
        cx.shutdown.clone(),
        conn_done.clone(),
    ));
    let mut input = Input::new(CodecV1::new(cx.max_frame), session.rx, session.read_buf);
    let result: Result<(), DecodeError> = loop {
        // Validate (and open, and inflate) every complete frame read so far, then hand
        // them over as one batch: one queue item per read, not per event.
        // Frames before a bad one still reach the application.
        let scanned = input.scan(&ack);
        if let Some(b) = input.take_batch(sender, &ack) {
            tokio::select! {
                _ = cx.shutdown.cancelled() => break Ok(()),
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
            _ = cx.shutdown.cancelled() => break Ok(()),
            r = rd.read_buf(&mut input.buf) => match r {
                Ok(0) | Err(_) => break Ok(()),
                Ok(n) => {
                    // One add per read (up to 256 KiB), not per event.
                    cx.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                    input.grow_if_full(n)
                }
            },
        }
    };
    conn_done.cancel();
    let _ = acker.await;
    result
}

/// Writes cumulative acknowledgements as the application takes events; on receiver
/// shutdown, writes a last ack and `Bye`.
async fn ack_writer<W: AsyncWrite + Unpin>(
    mut wr: W,
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
