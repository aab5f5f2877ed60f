//! One receiver's registration, as the registries store it and the EPM hands it out,
//! and its JSON form (the local registry's file contents).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::handle::Handle;
use crate::ids::ReceiverId;

/// One receiver's registration: where to reach it and who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The handle the receiver serves.
    pub handle: Handle,
    /// Where it accepts connections.
    pub endpoint: SocketAddr,
    /// Its identity, checked again in the handshake.
    pub receiver: ReceiverId,
    /// Process id of the receiving process, when known.
    pub pid: Option<u32>,
    /// Protocol version it speaks.
    pub version: u16,
    /// When it registered, in milliseconds since the Unix epoch.
    pub since_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct RecordFile {
    version: u16,
    handle: String,
    endpoint: String,
    receiver: String,
    pid: Option<u32>,
    since_ms: u64,
}

impl Record {
    /// A record of this protocol version for a receiver in process `pid` (if known)
    /// that registered at `since_ms` (milliseconds since the Unix epoch).
    pub fn new(
        handle: Handle,
        endpoint: SocketAddr,
        receiver: ReceiverId,
        pid: Option<u32>,
        since_ms: u64,
    ) -> Record {
        Record {
            handle,
            endpoint,
            receiver,
            pid,
            version: crate::frame::VERSION,
            since_ms,
        }
    }

    /// The record as pretty-printed JSON, as the local registry stores it.
    pub fn to_json(&self) -> Vec<u8> {
        let f = RecordFile {
            version: self.version,
            handle: self.handle.to_string(),
            endpoint: self.endpoint.to_string(),
            receiver: self.receiver.to_string(),
            pid: self.pid,
            since_ms: self.since_ms,
        };
        // Serializing plain strings and integers cannot fail.
        serde_json::to_vec_pretty(&f).unwrap_or_default()
    }

    /// Parses the JSON form; `None` when it is not a valid record.
    pub fn from_json(bytes: &[u8]) -> Option<Record> {
        let f: RecordFile = serde_json::from_slice(bytes).ok()?;
        Some(Record {
            handle: Handle::new(f.handle).ok()?,
            endpoint: f.endpoint.parse().ok()?,
            receiver: ReceiverId::from_hex(&f.receiver)?,
            pid: f.pid,
            version: f.version,
            since_ms: f.since_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let r = Record::new(
            Handle::new("a.b").unwrap(),
            "127.0.0.1:4000".parse().unwrap(),
            ReceiverId([3; 16]),
            Some(42),
            1_700_000_000_000,
        );
        assert_eq!(Record::from_json(&r.to_json()), Some(r));
        assert_eq!(Record::from_json(b"{}"), None);
        assert_eq!(Record::from_json(b"not json"), None);
    }
}
