//! Where receivers announce themselves: the registry record (defined in
//! [`ipcbus_proto::record`]), filled in for this process, and the local-user registry
//! directory.

mod local;

pub use local::{LocalRegistry, Registration, RegistryError};

use std::time::{SystemTime, UNIX_EPOCH};

use ipcbus_proto::endpoint::Endpoint;
use ipcbus_proto::handle::Handle;
use ipcbus_proto::ids::ReceiverId;
pub use ipcbus_proto::record::Record;

/// A [`Record`] for a receiver registering now, from this process: the I/O-free
/// [`Record::new`] with this process's id and the current time filled in.
pub fn record_now(handle: Handle, endpoints: Vec<Endpoint>, receiver: ReceiverId) -> Record {
    Record::new(
        handle,
        endpoints,
        receiver,
        Some(std::process::id()),
        now_ms(),
    )
}

fn now_ms() -> u64 {
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
