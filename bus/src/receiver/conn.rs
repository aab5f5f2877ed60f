//! The read loop of one sender connection after its handshake, over any byte
//! stream: it reads into an [`Input`] and hands the checked frames of each read to
//! the application's queue as one [`Batch`] (a full queue stops the reads, so the
//! sender feels backpressure). The acknowledgement writer, the connection's other
//! half, is the receiver's (`ack_writer`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::input::{AckState, Batch, Input};
use ipcbus_proto::codec::CodecV1;
use ipcbus_proto::crypto::Sealer;
use ipcbus_proto::frame::DecodeError;
use ipcbus_proto::ids::SenderId;

/// What a connection shares with its receiver.
#[derive(Debug)]
pub(super) struct Context<'a> {
    /// Cancelled when the receiver closes.
    pub(super) shutdown: &'a CancellationToken,
    /// The receiver's count of bytes read.
    pub(super) bytes_read: &'a AtomicU64,
    /// Largest frame accepted, and largest a compressed body may inflate to.
    pub(super) max_frame: usize,
}

/// Reads one sender connection until it closes, the receiver closes or the
/// application's queue is gone: every read's checked frames go to the queue as one
/// [`Batch`] (a full queue stops the reads), and the sender's `AckRequest`s go to
/// `ack`. An error means the sender sent bad input (the frames before it still
/// reached the application).
pub(super) async fn read_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    opener: Option<Sealer>,
    already: BytesMut,
    sender: SenderId,
    ack: &Arc<AckState>,
    tx: mpsc::Sender<Batch>,
    cx: Context<'_>,
) -> Result<(), DecodeError> {
    let mut input = Input::new(CodecV1::new(cx.max_frame), opener, already);
    loop {
        // Validate (and open, and inflate) every complete frame read so far, then hand
        // them over as one batch: one queue item per read, not per event.
        // Frames before a bad one still reach the application.
        let scanned = input.scan(ack);
        if let Some(b) = input.take_batch(sender, ack) {
            tokio::select! {
                _ = cx.shutdown.cancelled() => return Ok(()),
                r = tx.send(b) => if r.is_err() { return Ok(()) },
            }
        }
        match scanned {
            Err(e) => return Err(e),
            // Complete frames are still waiting behind the inflate budget.
            Ok(true) => continue,
            Ok(false) => {}
        }
        input.make_room()?;
        tokio::select! {
            _ = cx.shutdown.cancelled() => return Ok(()),
            r = rd.read_buf(&mut input.buf) => match r {
                Ok(0) | Err(_) => return Ok(()),
                Ok(n) => {
                    // One add per read (up to 256 KiB), not per event.
                    cx.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                    input.grow_if_full(n)
                }
            },
        }
    }
}
