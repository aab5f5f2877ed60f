//! The async driver of the v1 handshake (Hello, Welcome, Proof, Ready / Reject) over
//! any byte stream. The message formats and key schedule live in [`crate::proto`].

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::security::Resolved;
use ipcbus_proto::codec::{put_frame, CodecV1};
use ipcbus_proto::crypto::{proofs_equal, Sealer, SessionKeys};
use ipcbus_proto::frame::{
    parse_proof, DecodeError, Flags, Hello, HelloParse, Kind, Mode, RawFrame, Reject, RejectReason,
    Welcome, VERSION,
};
use ipcbus_proto::handle::Handle;
use ipcbus_proto::ids::{ReceiverId, SenderId};

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
         on both sides (without them, both must run as the same user)"
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

struct Conv<S> {
    io: S,
    buf: BytesMut,
    codec: CodecV1,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conv<S> {
    async fn read_frame(&mut self) -> Result<RawFrame, HandshakeError> {
        loop {
            if let Some(f) = self.codec.decode(&mut self.buf)? {
                if f.flags != Flags(0) || f.seq != 0 {
                    return Err(DecodeError::Malformed("handshake frame header").into());
                }
                return Ok(f);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(HandshakeError::Closed);
            }
        }
    }

    async fn send(&mut self, kind: Kind, body: &[u8]) -> Result<(), HandshakeError> {
        let mut out = BytesMut::new();
        put_frame(&mut out, kind, Flags(0), 0, body);
        self.io.write_all(&out).await?;
        Ok(())
    }

    async fn reject(&mut self, reason: RejectReason, text: &str) {
        let mut body = BytesMut::new();
        Reject {
            reason,
            text: text.to_owned(),
        }
        .encode(&mut body);
        let _ = self.send(Kind::Reject, &body).await;
        let _ = self.io.flush().await;
    }

    fn done(self, keys: Option<SessionKeys>, we_connected: bool) -> Established<S> {
        let (tx, rx) = match keys {
            Some(k) if we_connected => (Some(Sealer::new(&k.c2s)), Some(Sealer::new(&k.s2c))),
            Some(k) => (Some(Sealer::new(&k.s2c)), Some(Sealer::new(&k.c2s))),
            None => (None, None),
        };
        Established {
            io: self.io,
            read_buf: self.buf,
            tx,
            rx,
        }
    }
}

fn rejected(body: &[u8]) -> HandshakeError {
    match Reject::parse(body) {
        Ok(r) if r.reason == RejectReason::AuthenticationFailed => {
            HandshakeError::AuthenticationFailed
        }
        Ok(r) if r.reason == RejectReason::SecurityMismatch => HandshakeError::SecurityMismatch,
        Ok(r) => HandshakeError::Rejected {
            reason: r.reason,
            text: r.text,
        },
        Err(e) => e.into(),
    }
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
    let mut c = Conv {
        io,
        buf: BytesMut::with_capacity(4096),
        codec: CodecV1::new(max_frame),
    };
    let hello = Hello {
        version: VERSION,
        mode: sec.mode,
        handle: handle.clone(),
        sender,
        nonce: rand::random(),
    };
    let mut hello_body = BytesMut::new();
    hello.encode(&mut hello_body);
    c.send(Kind::Hello, &hello_body).await?;

    let f = c.read_frame().await?;
    let welcome = match f.kind {
        Kind::Welcome => Welcome::parse(&f.body)?,
        Kind::Reject => return Err(rejected(&f.body)),
        got => {
            return Err(DecodeError::Unexpected {
                got,
                expected: "Welcome or Reject",
            }
            .into())
        }
    };
    if let Some(expected) = expect {
        if welcome.receiver != expected {
            c.reject(RejectReason::Other(0), "not the registered receiver")
                .await;
            return Err(HandshakeError::WrongReceiver {
                expected,
                got: welcome.receiver,
            });
        }
    }
    let keys = match (&sec.key, sec.mode) {
        (Some(key), Mode::Authenticated | Mode::Sealed) => {
            let keys = SessionKeys::derive(
                key,
                &hello_body,
                &hello.nonce,
                &welcome.receiver,
                &welcome.nonce,
            );
            let Some(proof) = welcome.proof else {
                c.reject(RejectReason::SecurityMismatch, "no proof in welcome")
                    .await;
                return Err(HandshakeError::SecurityMismatch);
            };
            if !proofs_equal(&proof, &keys.proof_s) {
                c.reject(
                    RejectReason::AuthenticationFailed,
                    "receiver's key proof did not verify",
                )
                .await;
                return Err(HandshakeError::AuthenticationFailed);
            }
            c.send(Kind::Proof, &keys.proof_c).await?;
            Some(keys)
        }
        _ => {
            if welcome.proof.is_some() {
                c.reject(RejectReason::SecurityMismatch, "unexpected proof")
                    .await;
                return Err(HandshakeError::SecurityMismatch);
            }
            c.send(Kind::Proof, &[]).await?;
            None
        }
    };
    let f = c.read_frame().await?;
    match f.kind {
        Kind::Ready if f.body.is_empty() => {}
        Kind::Ready => return Err(DecodeError::Malformed("ready").into()),
        Kind::Reject => return Err(rejected(&f.body)),
        got => {
            return Err(DecodeError::Unexpected {
                got,
                expected: "Ready or Reject",
            }
            .into())
        }
    }
    let sealed = sec.mode == Mode::Sealed;
    Ok(c.done(keys.filter(|_| sealed), true))
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
    let mut c = Conv {
        io,
        buf: BytesMut::with_capacity(4096),
        // A hello is small; do not let an unauthenticated peer make us buffer 16 MiB.
        codec: CodecV1::new(max_frame.min(4096)),
    };
    let f = c.read_frame().await?;
    if f.kind != Kind::Hello {
        return Err(DecodeError::Unexpected {
            got: f.kind,
            expected: "Hello",
        }
        .into());
    }
    let hello_body = f.body;
    let hello = match Hello::parse(&hello_body) {
        Ok(HelloParse::Hello(h)) => h,
        Ok(HelloParse::UnsupportedVersion(v)) => {
            c.reject(
                RejectReason::UnsupportedVersion,
                &format!("this receiver speaks version {VERSION}, not {v}"),
            )
            .await;
            return Err(HandshakeError::UnsupportedVersion(v));
        }
        Err(e) => {
            c.reject(RejectReason::Malformed, &e.to_string()).await;
            return Err(e.into());
        }
    };
    if hello.handle != *handle {
        c.reject(
            RejectReason::WrongHandle,
            &format!("this receiver serves {:?}", handle.as_str()),
        )
        .await;
        return Err(HandshakeError::WrongHandle(hello.handle.to_string()));
    }
    if hello.mode != sec.mode {
        c.reject(
            RejectReason::SecurityMismatch,
            &format!("receiver uses {:?}, sender {:?}", sec.mode, hello.mode),
        )
        .await;
        return Err(HandshakeError::SecurityMismatch);
    }
    let nonce_s: [u8; 32] = rand::random();
    let keys = match (&sec.key, sec.mode) {
        (Some(key), Mode::Authenticated | Mode::Sealed) => Some(SessionKeys::derive(
            key,
            &hello_body,
            &hello.nonce,
            &receiver,
            &nonce_s,
        )),
        _ => None,
    };
    let mut body = BytesMut::new();
    Welcome {
        receiver,
        nonce: nonce_s,
        proof: keys.as_ref().map(|k| k.proof_s),
    }
    .encode(&mut body);
    c.send(Kind::Welcome, &body).await?;

    let f = c.read_frame().await?;
    let proof = match f.kind {
        Kind::Proof => parse_proof(&f.body)?,
        Kind::Reject => return Err(rejected(&f.body)),
        got => {
            return Err(DecodeError::Unexpected {
                got,
                expected: "Proof or Reject",
            }
            .into())
        }
    };
    match (&keys, proof) {
        (Some(k), Some(p)) if proofs_equal(&p, &k.proof_c) => {}
        (None, None) => {}
        _ => {
            c.reject(
                RejectReason::AuthenticationFailed,
                "sender's key proof did not verify",
            )
            .await;
            return Err(HandshakeError::AuthenticationFailed);
        }
    }
    c.send(Kind::Ready, &[]).await?;
    // Handshake frames are small; from here on the full maximum applies.
    c.codec = CodecV1::new(max_frame);
    let sealed = sec.mode == Mode::Sealed;
    Ok((c.done(keys.filter(|_| sealed), false), hello.sender))
}

/// Both sides of the handshake over any byte stream, for the fuzz targets in `fuzz/`
/// (feature `fuzzing`). Not a stable API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use tokio::io::{AsyncRead, AsyncWrite};

    use super::HandshakeError;
    use crate::security::Resolved;
    use ipcbus_proto::crypto::Key;
    use ipcbus_proto::frame::Mode;
    use ipcbus_proto::handle::Handle;
    use ipcbus_proto::ids::{ReceiverId, SenderId};

    fn resolved(key: Option<Key>, sealed: bool) -> Resolved {
        let mode = match (&key, sealed) {
            (None, _) => Mode::Open,
            (Some(_), false) => Mode::Authenticated,
            (Some(_), true) => Mode::Sealed,
        };
        Resolved { mode, key }
    }

    /// Runs the accepting side against `io`; `Ok` when the peer completed it.
    ///
    /// # Errors
    /// [`HandshakeError`], as a receiver sees it.
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        io: S,
        handle: &Handle,
        key: Option<Key>,
        sealed: bool,
        max_frame: usize,
    ) -> Result<(), HandshakeError> {
        let sec = resolved(key, sealed);
        super::accept(io, handle, ReceiverId([7; 16]), &sec, max_frame)
            .await
            .map(|_| ())
    }

    /// Runs the connecting side against `io`; `Ok` when the peer completed it.
    ///
    /// # Errors
    /// [`HandshakeError`], as a sender sees it.
    pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
        io: S,
        handle: &Handle,
        key: Option<Key>,
        sealed: bool,
        expect: Option<ReceiverId>,
        max_frame: usize,
    ) -> Result<(), HandshakeError> {
        let sec = resolved(key, sealed);
        super::connect(io, handle, SenderId([9; 16]), &sec, expect, max_frame)
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipcbus_proto::crypto::Key;

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
