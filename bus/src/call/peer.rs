//! [`Peer`]: the other end of one call connection, which either end may call.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::Serialize;

use super::conn::{CallFail, Conn};
use super::{encode, Call, CallError, CallTarget, Caller, Contract, DEFAULT_TIMEOUT};
use ipcbus_proto::ids::SenderId;

/// The other end of one call connection: for a server, the client that called; for a
/// client, the server. Cheap to clone; valid while the connection lives.
#[derive(Clone)]
pub struct Peer {
    pub(crate) conn: Arc<Conn>,
}

impl Peer {
    /// The caller's id (from its handshake). On a client, the peer is the server,
    /// and this is the server's id (its [`ServerInfo::id`](super::ServerInfo::id)'s
    /// bytes).
    pub fn id(&self) -> SenderId {
        self.conn.peer_id
    }

    /// Whether the connection is still open.
    pub fn is_connected(&self) -> bool {
        self.conn.is_open()
    }

    /// Resolves when the connection has closed.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn closed(&self) {
        self.conn.closed().await
    }

    /// Calls back into the other end (untyped): see [`Client::call`](super::Client::call).
    pub fn call<T: Serialize + ?Sized>(&self, req: &T) -> Call {
        Call::new(CallTarget::Peer(self.clone()), encode(req))
    }

    /// Calls back with raw bytes.
    pub fn call_bytes(&self, body: impl Into<Bytes>) -> Call {
        Call::new(CallTarget::Peer(self.clone()), Ok(body.into()))
    }

    /// Sends the other end a one-way event (a notification on `method`, postcard
    /// `event`); it arrives on [`Client::incoming`](super::Client::incoming) or the
    /// client's callback service.
    ///
    /// # Errors
    /// [`CallError::Disconnected`] once the connection is gone, [`CallError::Encode`],
    /// [`CallError::Busy`] while thousands of frames wait to be written (the other end
    /// does not read).
    pub fn notify<T: Serialize + ?Sized>(&self, method: &str, event: &T) -> Result<(), CallError> {
        let body = encode(event)?;
        self.conn.notify(&Contract::untyped(), method, &body)
    }

    /// The peer of the request being served by this task, inside a [`Service::call`](super::Service::call)
    /// or a [`Server::serve`](super::Server::serve) handler; `None` elsewhere.
    pub fn current() -> Option<Peer> {
        super::CURRENT_PEER.try_with(Clone::clone).ok()
    }
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("peer", &self.conn.label)
            .field("connected", &self.conn.is_open())
            .finish()
    }
}

impl Caller for Peer {
    fn call_raw(
        &self,
        contract: &Contract,
        method: &str,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> BoxFuture<'static, Result<Bytes, CallError>> {
        let conn = self.conn.clone();
        let contract = contract.clone();
        let method = method.to_owned();
        Box::pin(async move {
            conn.call(&contract, &method, body, timeout.unwrap_or(DEFAULT_TIMEOUT))
                .await
                .map_err(CallFail::into_error)
        })
    }

    fn notify_raw(&self, contract: &Contract, method: &str, body: Bytes) -> Result<(), CallError> {
        self.conn.notify(contract, method, &body)
    }
}
