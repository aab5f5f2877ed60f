//! What a receiver hands to the application.

use bytes::Bytes;
use serde::de::DeserializeOwned;

use ipcbus_proto::ids::SenderId;

/// One event as the application receives it.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    pub(crate) payload: Bytes,
    pub(crate) sender: SenderId,
    pub(crate) seq: u64,
}

/// Why a payload could not be decoded into the requested type.
#[derive(Debug, thiserror::Error)]
#[error("payload does not decode as the requested type: {0}")]
pub struct PayloadError(#[from] postcard::Error);

impl Message {
    /// The payload bytes, after decryption and decompression.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Takes the payload bytes.
    pub fn into_payload(self) -> Bytes {
        self.payload
    }

    /// Decodes a payload sent with [`Sender::send`](crate::Sender::send) (postcard).
    ///
    /// # Errors
    /// [`PayloadError`] when the bytes are not a `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, PayloadError> {
        Ok(postcard::from_bytes(&self.payload)?)
    }

    /// The sender that sent it.
    pub fn sender(&self) -> SenderId {
        self.sender
    }

    /// The sender's sequence number of this event (from 1, increasing per sender).
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("sender", &self.sender)
            .field("seq", &self.seq)
            .field("len", &self.payload.len())
            .finish()
    }
}
