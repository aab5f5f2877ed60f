//! The connection driver: one receiver connection after its handshake, as a write
//! loop and a read loop over the two halves of any byte stream.
//!
//! The writer takes every chunk the fan-out core queued for the connection, seals
//! them on a sealed connection (the one per-connection transform), adds an
//! `AckRequest` when someone waits for an outcome, and writes it all with as few
//! calls as the stream allows. The reader checks every frame through the session's
//! `Inbound` (kind, order, seal) and moves the connection's [`Window`] with each
//! `Ack`; it also fails the connection when a written batch stays unacknowledged
//! past the send timeout. The state both move is the core's; this module owns the
//! waiting and the bytes.
//!
//! [`Window`]: super::fanout::Window

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

use super::fanout::{lock, lock_stage, Acked, Destination, SpinMutex, Stage, Unacked};
use crate::framing::{FrameReader, ReadError};
use crate::report::FailReason;
use ipcbus_proto::codec::CodecV1;
use ipcbus_proto::crypto::Sealer;
use ipcbus_proto::frame::{parse_ack, DecodeError, Flags, Header, Kind, HEADER_LEN, LEN_PREFIX};
use ipcbus_proto::handle::Handle;
use ipcbus_proto::session::{Inbound, Opened, Outbound};

/// What the driver needs of the connection it drives (the sender's `Conn`).
pub(super) trait Link: Destination + Sized {
    /// The publisher's stage: a writer with nothing queued takes from it.
    fn stage(&self) -> &SpinMutex<Stage<Self>>;
    /// Notified when the writer is to wake ([`Destination::wake_writer`]).
    fn writer_wake(&self) -> &Notify;
    /// Tells a publisher waiting for window or buffer space that some was freed.
    fn space_freed(&self);
    /// The receiver (for logs).
    fn receiver(&self) -> &dyn std::fmt::Display;
    /// The handle (for logs).
    fn handle(&self) -> &Handle;
    /// How long a written event may stay unacknowledged.
    fn send_timeout(&self) -> Duration;
    /// Largest frame the connection carries.
    fn max_frame(&self) -> usize;
}

/// The session of an established connection: the sealers of both directions (on a
/// sealed connection) and the bytes read past the handshake.
#[derive(Debug)]
pub(super) struct Session {
    pub(super) tx: Option<Sealer>,
    pub(super) rx: Option<Sealer>,
    pub(super) read_buf: BytesMut,
}

/// Drives an established connection until it ends; returns why it ended.
pub(super) async fn run<L, R, W>(conn: &L, rd: R, wr: W, session: Session) -> FailReason
where
    L: Link,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    // The written batches not acknowledged yet: for the ack timeout.
    let batches = Mutex::new(Unacked::default());
    let writer = write_loop(conn, wr, session.tx, &batches);
    let reader = read_loop(conn, rd, session.rx, session.read_buf, &batches);
    tokio::pin!(writer, reader);
    tokio::select! {
        r = &mut writer => match r {
            // A receiver that closed may have said goodbye before the write failed (a
            // Unix socket fails the write at once): read what it sent first.
            FailReason::Disconnected => tokio::time::timeout(Duration::from_millis(200), reader)
                .await
                .unwrap_or(r),
            r => r,
        },
        r = &mut reader => r,
    }
}

async fn write_loop<L: Link, W: AsyncWrite + Unpin>(
    conn: &L,
    mut wr: W,
    sealer: Option<Sealer>,
    batches: &Mutex<Unacked>,
) -> FailReason {
    let window = conn.window();
    let mut sealed = BytesMut::new();
    let mut batch: Vec<Bytes> = Vec::new();
    // AckRequests are numbered (and sealed) by their own counter.
    let mut requests = Outbound::new(sealer.clone());
    // The highest sequence asked to be acknowledged promptly.
    let mut requested = 0u64;
    // The last event written: a request never names one not written yet.
    let mut written = 0u64;
    loop {
        let notified = conn.writer_wake().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let took = window.take_queued(&mut batch);
        let top = took.unwrap_or(written);
        let want = window.ack_wanted.load(Ordering::Acquire).min(top);
        let request = (want > requested).then_some(want);
        if took.is_none() && request.is_none() {
            // Nothing queued: take what the publisher staged, or sleep until a
            // hand-over or a request. Both under the stage's lock, so no hand-over
            // is missed; a request after this look finds the writer waiting.
            let sleep = lock_stage(conn.stage()).park(conn);
            let asked = window.ack_wanted.load(Ordering::Acquire).min(written) > requested;
            if sleep && !asked {
                notified.await;
            }
            continue;
        }
        if let Some(last) = took {
            conn.space_freed();
            lock(batches).written(last, Instant::now().into_std());
        }
        if let Some(up_to) = request {
            requested = up_to;
        }
        let (wrote, result) = match &sealer {
            Some(s) => {
                sealed.clear();
                for chunk in &batch {
                    seal_all(s, chunk, &mut sealed);
                }
                if let Some(up_to) = request {
                    let body = up_to.to_be_bytes();
                    requests.put(&mut sealed, Kind::AckRequest, Flags(0), &body);
                }
                (sealed.len(), wr.write_all(&sealed).await)
            }
            None => {
                if let Some(up_to) = request {
                    let mut ask = BytesMut::new();
                    let body = up_to.to_be_bytes();
                    requests.put(&mut ask, Kind::AckRequest, Flags(0), &body);
                    batch.push(ask.freeze());
                }
                (
                    batch.iter().map(Bytes::len).sum::<usize>(),
                    write_all_vectored(&mut wr, &batch).await,
                )
            }
        };
        batch.clear();
        if let Err(e) = result {
            tracing::debug!(receiver = %conn.receiver(), error = %e, "write failed");
            return FailReason::Disconnected;
        }
        // The writer's own counter: one uncontended add per write.
        window
            .bytes_written
            .fetch_add(wrote as u64, Ordering::Relaxed);
        written = top;
    }
}

async fn read_loop<L: Link, R: AsyncRead + Unpin>(
    conn: &L,
    rd: R,
    opener: Option<Sealer>,
    read_buf: BytesMut,
    batches: &Mutex<Unacked>,
) -> FailReason {
    let window = conn.window();
    let mut frames = FramedRead::new(
        rd,
        FrameReader(CodecV1::new(conn.max_frame().min(64 * 1024))),
    );
    frames.read_buffer_mut().extend_from_slice(&read_buf);
    let mut inbound = Inbound::acks(opener);
    let send_timeout = conn.send_timeout();
    let tick = (send_timeout / 4).max(Duration::from_millis(5));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = tokio::select! {
            f = frames.next() => f,
            _ = ticker.tick() => {
                let acked = window.acked.load(Ordering::Acquire);
                let now = Instant::now().into_std();
                let overdue = lock(batches).overdue(acked, now, send_timeout);
                if overdue {
                    tracing::warn!(handle = %conn.handle(), receiver = %conn.receiver(), "receiver did not acknowledge within the send timeout; dropping it");
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
        // Kind, order and seal, checked in the session.
        let inflated;
        let body: &[u8] = match inbound.open_frame(&mut f) {
            Ok(Opened::Plain(_)) => &f.body,
            Ok(Opened::Inflated(b)) => {
                inflated = b;
                &inflated
            }
            Ok(Opened::AckRequest(_)) => {
                let e = DecodeError::Unexpected {
                    got: Kind::AckRequest,
                    expected: "Ack or Bye",
                };
                return protocol(conn, e);
            }
            Err(e) => return protocol(conn, e),
        };
        if f.kind == Kind::Bye {
            return FailReason::ReceiverLeft;
        }
        let up_to = match parse_ack(body) {
            Ok(v) => v,
            Err(e) => return protocol(conn, e),
        };
        match window.ack(up_to) {
            Acked::Stale => {}
            Acked::Moved => conn.space_freed(),
            Acked::Beyond => {
                return protocol(
                    conn,
                    DecodeError::Malformed("ack beyond the last event sent"),
                )
            }
            Acked::Failed(reason) => return reason,
        }
    }
}

fn protocol<L: Link>(conn: &L, e: DecodeError) -> FailReason {
    tracing::warn!(receiver = %conn.receiver(), error = %e, "receiver broke the protocol; dropping it");
    FailReason::Protocol(e.to_string())
}

/// Writes every chunk, with as few calls as the stream allows.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
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

/// Re-encodes a buffer of plain frames (as the publisher staged them) as sealed
/// frames.
fn seal_all(sealer: &Sealer, mut plain: &[u8], out: &mut BytesMut) {
    while let Some(head) = plain.first_chunk::<{ LEN_PREFIX + HEADER_LEN }>() {
        // Only frames this sender encoded are staged, so neither check fails.
        let Ok((h, body_len)) = Header::parse_prefixed(head) else {
            return;
        };
        let end = LEN_PREFIX + HEADER_LEN + body_len;
        let Some(body) = plain.get(LEN_PREFIX + HEADER_LEN..end) else {
            return;
        };
        sealer.put_sealed(out, h.kind, h.flags, h.seq, body);
        plain = &plain[end..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sender::fanout::{lock_stage, Limits, Window};
    use ipcbus_proto::crypto::{Key, SessionKeys};
    use ipcbus_proto::frame::RawFrame;
    use ipcbus_proto::ids::ReceiverId;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, DuplexStream, ReadHalf, WriteHalf};

    /// A connection as the driver sees it, without a sender around it.
    struct Probe {
        window: Window,
        stage: SpinMutex<Stage<Probe>>,
        wake: Notify,
        handle: Handle,
    }

    impl Destination for Probe {
        fn window(&self) -> &Window {
            &self.window
        }
        fn wake_writer(&self) {
            self.wake.notify_one();
        }
        fn skipped(&self, _: u64, _: u64, _: &FailReason) {}
    }

    impl Link for Probe {
        fn stage(&self) -> &SpinMutex<Stage<Probe>> {
            &self.stage
        }
        fn writer_wake(&self) -> &Notify {
            &self.wake
        }
        fn space_freed(&self) {}
        fn receiver(&self) -> &dyn std::fmt::Display {
            &"probe"
        }
        fn handle(&self) -> &Handle {
            &self.handle
        }
        fn send_timeout(&self) -> Duration {
            Duration::from_secs(10)
        }
        fn max_frame(&self) -> usize {
            1 << 20
        }
    }

    /// The receiving end of the stream, as a test drives it.
    struct Peer {
        frames: FramedRead<ReadHalf<DuplexStream>, FrameReader>,
        inbound: Inbound,
        wr: WriteHalf<DuplexStream>,
        out: Outbound,
    }

    impl Peer {
        async fn next(&mut self) -> (RawFrame, Opened) {
            let mut f = self.frames.next().await.unwrap().unwrap();
            let opened = self.inbound.open_frame(&mut f).unwrap();
            (f, opened)
        }

        async fn send(&mut self, kind: Kind, body: &[u8]) {
            let mut buf = BytesMut::new();
            self.out.put(&mut buf, kind, Flags(0), body);
            self.wr.write_all(&buf).await.unwrap();
        }
    }

    /// A probe connection with events 1..=3 queued, driven over an in-memory
    /// stream (sealed or not), and the peer at the other end.
    fn start(sealed: bool) -> (Arc<Probe>, tokio::task::JoinHandle<FailReason>, Peer) {
        let probe = Arc::new(Probe {
            window: Window::default(),
            stage: SpinMutex::new(Stage::new()),
            wake: Notify::new(),
            handle: Handle::new("probe").unwrap(),
        });
        probe.window.start_after(0);
        {
            let mut stage = lock_stage(&probe.stage);
            let limits = Limits {
                window: 100,
                buffer: 1 << 20,
            };
            stage.retarget(Arc::from(vec![probe.clone()]), limits);
            for seq in 1..=3u64 {
                let h = Header {
                    kind: Kind::Data,
                    flags: Flags(0),
                    seq,
                };
                stage.push(seq, &h.to_bytes(1), &[b'a' + seq as u8]);
            }
            stage.hand_over();
        }
        let keys = SessionKeys::derive(
            &Key::from_bytes([1; 32]),
            b"hello",
            &[2; 32],
            &ReceiverId([3; 16]),
            &[4; 32],
        );
        let sealer = |k: &[u8; 32]| sealed.then(|| Sealer::new(k));
        let session = Session {
            tx: sealer(&keys.c2s),
            rx: sealer(&keys.s2c),
            read_buf: BytesMut::new(),
        };
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let (rd, wr) = tokio::io::split(ours);
        let p = probe.clone();
        let driver = tokio::spawn(async move { run(&*p, rd, wr, session).await });
        let (rd, wr) = tokio::io::split(theirs);
        let peer = Peer {
            frames: FramedRead::new(rd, FrameReader(CodecV1::default())),
            inbound: Inbound::events(sealer(&keys.c2s), 1 << 20),
            wr,
            out: Outbound::new(sealer(&keys.s2c)),
        };
        (probe, driver, peer)
    }

    #[tokio::test]
    async fn the_driver_writes_queued_events_asks_for_acks_and_moves_the_window() {
        for sealed in [false, true] {
            let (probe, driver, mut peer) = start(sealed);
            for seq in 1..=3u64 {
                let (f, opened) = peer.next().await;
                assert_eq!((f.kind, f.seq), (Kind::Data, seq), "sealed: {sealed}");
                assert_eq!(opened, Opened::Plain(1));
                assert_eq!(f.body[..], [b'a' + seq as u8]);
            }
            peer.send(Kind::Ack, &2u64.to_be_bytes()).await;
            // Someone waits for event 3: the writer asks for it.
            if probe.window.register_waiter(3, std::task::Waker::noop()) {
                probe.wake_writer();
            }
            let (f, opened) = peer.next().await;
            assert_eq!((f.kind, opened), (Kind::AckRequest, Opened::AckRequest(3)));
            assert_eq!(probe.window.outcome(2), Some(Ok(())));
            peer.send(Kind::Ack, &3u64.to_be_bytes()).await;
            peer.send(Kind::Bye, &[]).await;
            assert_eq!(driver.await.unwrap(), FailReason::ReceiverLeft);
            assert_eq!(probe.window.outcome(3), Some(Ok(())));
            let per_frame = if sealed { 15 + 16 } else { 15 };
            assert_eq!(
                probe.window.bytes_written.load(Ordering::SeqCst),
                3 * per_frame + per_frame + 7
            );
            // The stage holds the probe, which holds the stage.
            lock_stage(&probe.stage).retarget(
                Arc::from(Vec::new()),
                Limits {
                    window: 1,
                    buffer: 1,
                },
            );
        }
    }

    #[tokio::test]
    async fn an_ack_beyond_the_last_event_or_a_wrong_kind_ends_the_connection() {
        let (_probe, driver, mut peer) = start(true);
        peer.send(Kind::Ack, &9u64.to_be_bytes()).await;
        assert_eq!(
            driver.await.unwrap(),
            FailReason::Protocol(
                DecodeError::Malformed("ack beyond the last event sent").to_string()
            )
        );
        let (_probe, driver, mut peer) = start(false);
        peer.send(Kind::Data, b"x").await;
        assert!(matches!(
            driver.await.unwrap(),
            FailReason::Protocol(e) if e.contains("expected Ack or Bye")
        ));
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
