//! The `tokio_util::codec` adapter over the I/O-free v1 codec of [`ipcbus_proto`]:
//! the core decodes bytes, this adds the socket's error so `FramedRead` can use it.

use bytes::BytesMut;
use ipcbus_proto::codec::CodecV1;
use ipcbus_proto::frame::{DecodeError, RawFrame};
use tokio_util::codec::Decoder;

/// [`CodecV1`] as a `tokio_util` [`Decoder`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameReader(pub(crate) CodecV1);

/// Why reading the next frame failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The connection failed while reading.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a valid frame.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

impl Decoder for FrameReader {
    type Item = RawFrame;
    type Error = ReadError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<RawFrame>, ReadError> {
        Ok(self.0.decode(src)?)
    }
}
