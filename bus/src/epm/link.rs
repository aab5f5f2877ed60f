//! An established EPM connection: the v1 handshake with the reserved handle, then
//! typed messages in `Data` frames. Used by the client in this crate and by the
//! `epm-service` daemon, so both speak exactly the same protocol.

use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

use crate::framing::{FrameReader, ReadError};
use crate::handshake::{self, HandshakeError};
use crate::security::Resolved;
use ipcbus_proto::codec::{put_frame, CodecV1};
use ipcbus_proto::crypto::Key;
use ipcbus_proto::epm::{EpmDecodeError, FrameDecoder, FrameEncoder, EPM_HANDLE};
use ipcbus_proto::frame::{Flags, Kind, Mode, Reject, RejectReason};
use ipcbus_proto::handle::Handle;
use ipcbus_proto::ids::{ReceiverId, SenderId};

/// The reading half of an EPM connection.
#[derive(Debug)]
pub struct LinkReader {
    frames: FramedRead<OwnedReadHalf, FrameReader>,
    dec: FrameDecoder,
}

/// Why [`LinkReader::recv`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// The connection failed while reading.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a valid next message.
    #[error(transparent)]
    Decode(#[from] EpmDecodeError),
}

/// The writing half of an EPM connection.
#[derive(Debug)]
pub struct LinkWriter {
    wr: OwnedWriteHalf,
    enc: FrameEncoder,
    buf: BytesMut,
}

fn resolved(key: Option<&Key>) -> Resolved {
    match key {
        Some(k) => Resolved {
            mode: Mode::Sealed,
            key: Some(k.clone()),
        },
        None => Resolved {
            mode: Mode::Open,
            key: None,
        },
    }
}

fn epm_handle() -> Handle {
    // The constant is a valid handle; the unit test below checks it.
    Handle::new(EPM_HANDLE).unwrap_or_else(|_| unreachable!("EPM_HANDLE is valid"))
}

fn split(est: handshake::Established<TcpStream>, max_frame: usize) -> (LinkReader, LinkWriter) {
    let (rd, wr) = est.io.into_split();
    let mut frames = FramedRead::new(rd, FrameReader(CodecV1::new(max_frame)));
    frames.read_buffer_mut().extend_from_slice(&est.read_buf);
    (
        LinkReader {
            frames,
            dec: FrameDecoder::new(est.rx, max_frame),
        },
        LinkWriter {
            wr,
            enc: FrameEncoder::new(est.tx),
            buf: BytesMut::with_capacity(1024),
        },
    )
}

/// Runs the EPM's side of the handshake on an accepted socket. With a key, the
/// client must prove it and every frame is sealed; without, the client must not use
/// one. Returns both halves and the client's id.
///
/// # Errors
/// [`HandshakeError`]: the named reason (wrong key, security mismatch, not an EPM
/// client, malformed).
pub async fn accept(
    sock: TcpStream,
    server: ReceiverId,
    key: Option<&Key>,
    max_frame: usize,
) -> Result<(LinkReader, LinkWriter, SenderId), HandshakeError> {
    let (est, client) =
        handshake::accept(sock, &epm_handle(), server, &resolved(key), max_frame).await?;
    let (r, w) = split(est, max_frame);
    Ok((r, w, client))
}

/// Runs the client's side of the handshake on a connected socket.
///
/// # Errors
/// [`HandshakeError`], e.g. [`HandshakeError::AuthenticationFailed`] for a wrong
/// password or salt.
pub async fn connect(
    sock: TcpStream,
    key: Option<&Key>,
    max_frame: usize,
) -> Result<(LinkReader, LinkWriter), HandshakeError> {
    let _ = sock.set_nodelay(true);
    let est = handshake::connect(
        sock,
        &epm_handle(),
        SenderId::random(),
        &resolved(key),
        None,
        max_frame,
    )
    .await?;
    Ok(split(est, max_frame))
}

/// Tells a connecting client it is refused (for example `Busy` when the connection
/// limit is reached) before reading anything, then closes. Waits at most `timeout`.
pub async fn refuse(mut sock: TcpStream, reason: RejectReason, text: &str, timeout: Duration) {
    let mut body = BytesMut::new();
    Reject {
        reason,
        text: text.to_owned(),
    }
    .encode(&mut body);
    let mut out = BytesMut::new();
    put_frame(&mut out, Kind::Reject, Flags(0), 0, &body);
    let _ = tokio::time::timeout(timeout, async {
        let _ = sock.write_all(&out).await;
        let _ = sock.shutdown().await;
    })
    .await;
}

impl LinkReader {
    /// The next message; `Ok(None)` when the peer closed the connection cleanly.
    ///
    /// # Errors
    /// [`RecvError::Io`] when the connection fails, [`RecvError::Decode`] for bytes
    /// that are not a valid next message.
    ///
    /// # Cancel safety
    /// Cancel safe: a partly read frame stays buffered for the next call.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, RecvError> {
        match self.frames.next().await {
            None => Ok(None),
            Some(Err(ReadError::Io(e))) => Err(RecvError::Io(e)),
            Some(Err(ReadError::Decode(e))) => Err(RecvError::Decode(e.into())),
            Some(Ok(f)) => Ok(Some(self.dec.decode(f)?)),
        }
    }
}

impl LinkWriter {
    /// Encodes `msg` into the write buffer without sending it.
    pub fn queue<T: Serialize>(&mut self, msg: &T) {
        self.enc.encode(msg, &mut self.buf);
    }

    /// Bytes queued and not yet flushed.
    pub fn queued(&self) -> usize {
        self.buf.len()
    }

    /// Writes everything queued.
    ///
    /// # Errors
    /// The socket's error.
    ///
    /// # Cancel safety
    /// Not cancel safe: part of the buffer may have been written.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.wr.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Queues `msg` and writes it.
    ///
    /// # Errors
    /// The socket's error.
    ///
    /// # Cancel safety
    /// Not cancel safe.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> std::io::Result<()> {
        self.queue(msg);
        self.flush().await
    }

    /// Closes the writing direction.
    pub async fn shutdown(&mut self) {
        let _ = self.wr.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn epm_handle_is_valid() {
        assert_eq!(super::epm_handle().as_str(), super::EPM_HANDLE);
    }
}
