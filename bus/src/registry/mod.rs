//! Where receivers announce themselves: the registry record, and the local-user
//! registry directory.

mod local;

pub use local::{LocalRegistry, Registration, RegistryError};

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

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
    /// A record for a receiver registering now, from this process.
    pub fn new(handle: Handle, endpoint: SocketAddr, receiver: ReceiverId) -> Record {
        Record {
            handle,
            endpoint,
            receiver,
            pid: Some(std::process::id()),
            version: crate::proto::frame::VERSION,
            since_ms: now_ms(),
        }
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
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

    pub(crate) fn from_json(bytes: &[u8]) -> Option<Record> {
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

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether a process with this pid exists (on this host, in this pid namespace).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}
