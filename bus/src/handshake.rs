//! The async driver of the v1 handshake (Hello, Welcome, Proof, Ready / Reject) over
//! any byte stream: it moves bytes between the socket and the I/O-free state machines
//! of [`ipcbus_proto::handshake`], which hold the whole protocol.

use bytes::BytesMut;
use ipcbus_proto::crypto::Sealer;
use ipcbus_proto::frame::{DecodeError, RejectReason};
use ipcbus_proto::handle::Handle;
use ipcbus_proto::handshake::{
    Client, ClientConfig, HandshakeFailure, Server, ServerConfig, Status,
};
use ipcbus_proto::ids::{ReceiverId, SenderId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::security::Resolved;

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection before the handshake finished.
    #[error("connection closed during the handshake")]
    Closed,
    /// The handshake did not finish in time.
    #[error("handshake timed out")]
    Timeout,
    /// The peer sent bytes that are not a valid handshake message.
    #[error("protocol error: {0}")]
    Decode(#[from] DecodeError),
    /// The peer refused the connection.
    #[error("rejected by peer: {reason}{}", if text.is_empty() { String::new() } else { format!(" ({text})") })]
    Rejected {
        /// The peer's reason.
        reason: RejectReason,
        /// The peer's text.
        text: String,
    },
    /// The key proof did not verify: the two sides use different keys.
    #[error(
        "authentication failed: the peer has another key: the password and salt \
         (IPCBUS_PASSWORD or --password-file, IPCBUS_SALT or --salt) must be the same \
         on both sides (without a password, local peers must run as the same user)"
    )]
    AuthenticationFailed,
    /// One side uses a key or encryption and the other does not.
    #[error(
        "authentication failed: security settings differ: one side has a password and \
         salt (IPCBUS_PASSWORD or --password-file, IPCBUS_SALT or --salt), the other \
         does not; set the same on both sides, or on neither"
    )]
    SecurityMismatch,
    /// The connecting side asked for another handle.
    #[error("wrong handle: the peer asked for {0:?}")]
    WrongHandle(String),
    /// The connecting side speaks another protocol version.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u16),
    /// The receiver at this address is not the one registered (its port was reused).
    #[error("a different receiver answers at this address (expected {expected}, got {got})")]
    WrongReceiver {
        /// The registered id.
        expected: ReceiverId,
        /// The id that answered.
        got: ReceiverId,
    },
    /// Another failure found by the protocol core.
    #[error("{0}")]
    Other(HandshakeFailure),
}

impl HandshakeError {
    /// Whether this failure means the keys differ.
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            HandshakeError::AuthenticationFailed
                | HandshakeError::SecurityMismatch
                | HandshakeError::Rejected {
                    reason: RejectReason::AuthenticationFailed | RejectReason::SecurityMismatch,
                    ..
                }
        )
    }
}

impl From<HandshakeFailure> for HandshakeError {
    fn from(f: HandshakeFailure) -> Self {
        match f {
            HandshakeFailure::Decode(e) => HandshakeError::Decode(e),
            HandshakeFailure::Rejected { reason, text } => {
                HandshakeError::Rejected { reason, text }
            }
            HandshakeFailure::AuthenticationFailed => HandshakeError::AuthenticationFailed,
            HandshakeFailure::SecurityMismatch => HandshakeError::SecurityMismatch,
            HandshakeFailure::WrongHandle(h) => HandshakeError::WrongHandle(h),
            HandshakeFailure::UnsupportedVersion(v) => HandshakeError::UnsupportedVersion(v),
            HandshakeFailure::WrongReceiver { expected, got } => {
                HandshakeError::WrongReceiver { expected, got }
            }
            other => HandshakeError::Other(other),
        }
    }
}

/// A connection after a successful handshake.
pub(crate) struct Established<S> {
    pub(crate) io: S,
    /// Bytes already read past the handshake.
    pub(crate) read_buf: BytesMut,
    /// Seals frames we send (mode `Sealed` only).
    pub(crate) tx: Option<Sealer>,
    /// Opens frames we receive (mode `Sealed` only).
    pub(crate) rx: Option<Sealer>,
}

/// Runs the connecting side of the handshake.
pub(crate) async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    handle: &Handle,
    sender: SenderId,
    sec: &Resolved,
    expect: Option<ReceiverId>,
    max_frame: usize,
) -> Result<Established<S>, HandshakeError> {
    let mut out = BytesMut::new();
    let config = ClientConfig {
        expect,
        max_frame,
        ..ClientConfig::new(
            handle.clone(),
            sender,
            sec.mode,
            sec.key.clone(),
            rand::random(),
        )
    };
    let mut client = Client::new(config, &mut out);
    let (est, _) = drive(io, out, |src, out| client.feed(src, out)).await?;
    Ok(est)
}

/// Runs the accepting side of the handshake; returns the connection and the peer's
/// sender id.
pub(crate) async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    handle: &Handle,
    receiver: ReceiverId,
    sec: &Resolved,
    max_frame: usize,
) -> Result<(Established<S>, SenderId), HandshakeError> {
    let mut server = Server::new(ServerConfig {
        max_frame,
        ..ServerConfig::new(
            handle.clone(),
            receiver,
            sec.mode,
            sec.key.clone(),
            rand::random(),
        )
    });
    drive(io, BytesMut::new(), |src, out| server.feed(src, out)).await
}

/// Writes what the state machine wants sent, reads, and feeds it until the handshake
/// is established or fails; a failure's `Reject` is sent (best effort) before the
/// error returns. Returns the connection and the connecting side's id.
async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    mut out: BytesMut,
    mut feed: impl FnMut(&mut BytesMut, &mut BytesMut) -> Result<Status, HandshakeFailure>,
) -> Result<(Established<S>, SenderId), HandshakeError> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if !out.is_empty() {
            io.write_all(&out).await?;
            out.clear();
        }
        if io.read_buf(&mut buf).await? == 0 {
            return Err(HandshakeError::Closed);
        }
        match feed(&mut buf, &mut out) {
            Ok(Status::NeedMore) => {}
            Ok(Status::Established(e)) => {
                if !out.is_empty() {
                    io.write_all(&out).await?;
                }
                let est = Established {
                    io,
                    read_buf: buf,
                    tx: e.tx,
                    rx: e.rx,
                };
                return Ok((est, e.sender));
            }
            Err(f) => {
                if !out.is_empty() {
                    let _ = io.write_all(&out).await;
                    let _ = io.flush().await;
                }
                return Err(f.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipcbus_proto::codec::put_frame;
    use ipcbus_proto::crypto::Key;
    use ipcbus_proto::frame::{Flags, Kind, Mode};

    fn sec(mode: Mode, key: Option<&Key>) -> Resolved {
        Resolved {
            mode,
            key: key.cloned(),
        }
    }

    async fn pair(
        client_handle: &str,
        client: Resolved,
        server: Resolved,
        expect: Option<ReceiverId>,
    ) -> (
        Result<bool, HandshakeError>,
        Result<SenderId, HandshakeError>,
    ) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let ch = Handle::new(client_handle).unwrap();
        let sh = Handle::new("h").unwrap();
        let rid = ReceiverId([7; 16]);
        let sid = SenderId([8; 16]);
        let (c, s) = tokio::join!(
            connect(a, &ch, sid, &client, expect, 1 << 20),
            accept(b, &sh, rid, &server, 1 << 20)
        );
        // The client side's result says whether its frames will be sealed.
        (c.map(|e| e.tx.is_some()), s.map(|(_, sender)| sender))
    }

    #[tokio::test]
    async fn succeeds_in_every_mode_with_matching_settings() {
        let k = Key::from_bytes([1; 32]);
        for (mode, key) in [
            (Mode::Open, None),
            (Mode::Authenticated, Some(&k)),
            (Mode::Sealed, Some(&k)),
        ] {
            let (c, s) = pair(
                "h",
                sec(mode, key),
                sec(mode, key),
                Some(ReceiverId([7; 16])),
            )
            .await;
            assert_eq!(c.unwrap(), mode == Mode::Sealed);
            assert_eq!(s.unwrap(), SenderId([8; 16]));
        }
    }

    #[tokio::test]
    async fn wrong_key_is_named_on_both_sides() {
        let a = Key::from_bytes([1; 32]);
        let b = Key::from_bytes([2; 32]);
        for mode in [Mode::Authenticated, Mode::Sealed] {
            let (c, s) = pair("h", sec(mode, Some(&a)), sec(mode, Some(&b)), None).await;
            assert!(
                matches!(c, Err(HandshakeError::AuthenticationFailed)),
                "{c:?}"
            );
            assert!(
                matches!(s, Err(HandshakeError::AuthenticationFailed)),
                "{s:?}"
            );
        }
    }

    #[tokio::test]
    async fn security_mismatch_wrong_handle_and_wrong_receiver() {
        let k = Key::from_bytes([1; 32]);
        let (c, s) = pair(
            "h",
            sec(Mode::Open, None),
            sec(Mode::Sealed, Some(&k)),
            None,
        )
        .await;
        assert!(matches!(c, Err(HandshakeError::SecurityMismatch)), "{c:?}");
        assert!(matches!(s, Err(HandshakeError::SecurityMismatch)), "{s:?}");
        assert!(c.unwrap_err().is_auth_failure());

        let (c, s) = pair("other", sec(Mode::Open, None), sec(Mode::Open, None), None).await;
        assert!(
            matches!(
                c,
                Err(HandshakeError::Rejected {
                    reason: RejectReason::WrongHandle,
                    ..
                })
            ),
            "{c:?}"
        );
        assert!(matches!(s, Err(HandshakeError::WrongHandle(h)) if h == "other"));

        let (c, _) = pair(
            "h",
            sec(Mode::Open, None),
            sec(Mode::Open, None),
            Some(ReceiverId([9; 16])),
        )
        .await;
        assert!(
            matches!(c, Err(HandshakeError::WrongReceiver { .. })),
            "{c:?}"
        );
    }

    #[tokio::test]
    async fn unsupported_version_and_garbage() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sh = Handle::new("h").unwrap();
        // A hello from a future version gets Reject(1).
        let (mut a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            accept(b, &sh, ReceiverId([7; 16]), &sec(Mode::Open, None), 1 << 20)
                .await
                .map(|_| ())
        });
        let mut body = BytesMut::new();
        body.extend_from_slice(b"IPCB\x00\x02");
        let mut out = BytesMut::new();
        put_frame(&mut out, Kind::Hello, Flags(0), 0, &body);
        a.write_all(&out).await.unwrap();
        let mut got = vec![0u8; 64];
        let n = a.read(&mut got).await.unwrap();
        assert_eq!(got[4], Kind::Reject as u8);
        assert_eq!(got[14], 1, "reason: unsupported version ({:?})", &got[..n]);
        assert!(matches!(
            server.await.unwrap(),
            Err(HandshakeError::UnsupportedVersion(2))
        ));

        // Bytes that are not a frame close the handshake with a decode error.
        let sh = Handle::new("h").unwrap();
        let (mut a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            accept(b, &sh, ReceiverId([7; 16]), &sec(Mode::Open, None), 1 << 20)
                .await
                .map(|_| ())
        });
        a.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap();
        assert!(matches!(
            server.await.unwrap(),
            Err(HandshakeError::Decode(_))
        ));

        // A peer that hangs up mid-handshake.
        let sh = Handle::new("h").unwrap();
        let (a, b) = tokio::io::duplex(4096);
        drop(a);
        let r = accept(b, &sh, ReceiverId([7; 16]), &sec(Mode::Open, None), 1 << 20).await;
        assert!(matches!(r, Err(HandshakeError::Closed)));
    }
}
