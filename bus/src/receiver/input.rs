//! The pure pieces of one sender connection on the receiving side: [`Input`], the
//! read buffer whose frames are checked through the session's `Inbound` and handed
//! over as one [`Batch`] per read; [`Batch`], from which the application takes one
//! `Message` per event; [`AckState`], what the application has taken and what the
//! sender asked for, which says when an acknowledgement is due. No sockets and no
//! tasks: the read loop (`conn.rs`) reads into the buffer, the receiver's
//! `ack_writer` writes the acks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::sync::Notify;

use crate::message::Message;
use crate::pool::Pool;
use ipcbus_proto::codec::CodecV1;
use ipcbus_proto::crypto::{Sealer, TAG_LEN};
use ipcbus_proto::frame::{DecodeError, Header, Kind, HEADER_LEN, LEN_PREFIX};
use ipcbus_proto::ids::SenderId;
use ipcbus_proto::session::{Inbound, Opened};

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
pub(super) struct Batch {
    /// Whole, checked Data frames; sealed ones opened in place (the tag left behind).
    pub(super) data: Bytes,
    /// The inflated payloads of the compressed frames in `data`, in order.
    pub(super) inflated: std::vec::IntoIter<Bytes>,
    pub(super) sender: SenderId,
    pub(super) ack: Arc<AckState>,
    /// The highest sequence of this sender taken so far: events at or below it come
    /// from a connection the sender has given up (it reported them failed) and are
    /// dropped, so a sender's events stay in order across its reconnects.
    pub(super) floor: u64,
}

impl Batch {
    /// The next event of the batch. `data` holds only frames the connection task
    /// checked, so the checks here never fail; if they did, the batch just ends.
    #[inline]
    pub(super) fn next_message(&mut self) -> Option<Message> {
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
pub(super) struct Input {
    codec: CodecV1,
    /// Kind, order and seal checks, opening and inflation of each frame.
    session: Inbound,
    pub(super) buf: Vec<u8>,
    /// `buf[..checked]` holds whole, checked frames.
    checked: usize,
    inflated: Vec<Bytes>,
    read_size: usize,
    pool: Arc<Pool>,
}

impl Input {
    pub(super) fn new(codec: CodecV1, opener: Option<Sealer>, already: BytesMut) -> Input {
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
    pub(super) fn scan(&mut self, ack: &AckState) -> Result<bool, DecodeError> {
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
    pub(super) fn take_batch(&mut self, sender: SenderId, ack: &Arc<AckState>) -> Option<Batch> {
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
    pub(super) fn make_room(&mut self) -> Result<(), DecodeError> {
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
    pub(super) fn grow_if_full(&mut self, n: usize) {
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
pub(super) const ACK_DELAY: Duration = Duration::from_millis(20);

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
pub(super) struct AckState {
    /// Highest sequence number the application has taken from this connection.
    pub(super) taken: AtomicU64,
    /// Highest sequence number acknowledged (written by the ack writer).
    pub(super) sent: AtomicU64,
    /// Highest sequence number the sender asked to have acknowledged promptly.
    wanted: AtomicU64,
    /// Whether the ack writer sleeps and needs a wake-up.
    pub(super) idle: AtomicBool,
    /// Whether the sleeping ack writer's delay timer runs (else the first event taken
    /// after an ack wakes it, to start the timer).
    pub(super) timer: AtomicBool,
    pub(super) notify: Notify,
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
    #[inline]
    pub(super) fn take(&self, seq: u64) {
        self.taken.store(seq, Ordering::SeqCst);
        if self.idle.load(Ordering::SeqCst)
            && (!self.timer.load(Ordering::SeqCst) || self.due(seq))
            && self.idle.swap(false, Ordering::AcqRel)
        {
            self.notify.notify_one();
        }
    }

    /// Whether having taken up to `taken` calls for an ack now.
    pub(super) fn due(&self, taken: u64) -> bool {
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
    pub(super) fn request(&self, up_to: u64) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use ipcbus_proto::codec::put_frame;
    use ipcbus_proto::compress::gzip;
    use ipcbus_proto::frame::{Flags, DEFAULT_MAX_FRAME};

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
