//! The v1 handshake (Hello, Welcome, Proof, Ready / Reject) as two state machines,
//! [`Client`] and [`Server`], with no I/O: feed them received bytes or frames, they
//! append the frames to send to an output buffer and answer "need more",
//! [`Established`] (with the session's sealers and both ids) or a typed
//! [`HandshakeFailure`]. Random nonces come in with the configuration, so a test can
//! pin them.
//!
//! ```
//! use bytes::BytesMut;
//! use ipcbus_proto::frame::Mode;
//! use ipcbus_proto::handshake::{Client, ClientConfig, Server, ServerConfig, Status};
//! use ipcbus_proto::{Handle, ReceiverId, SenderId};
//!
//! let handle = Handle::new("docs")?;
//! let (mut to_server, mut to_client) = (BytesMut::new(), BytesMut::new());
//! let mut client = Client::new(
//!     ClientConfig::new(handle.clone(), SenderId([1; 16]), Mode::Open, None, [2; 32]),
//!     &mut to_server,
//! );
//! let mut server = Server::new(ServerConfig::new(
//!     handle,
//!     ReceiverId([3; 16]),
//!     Mode::Open,
//!     None,
//!     [4; 32],
//! ));
//! assert!(matches!(server.feed(&mut to_server, &mut to_client)?, Status::NeedMore));
//! assert!(matches!(client.feed(&mut to_client, &mut to_server)?, Status::NeedMore));
//! let Status::Established(s) = server.feed(&mut to_server, &mut to_client)? else {
//!     panic!("server not done")
//! };
//! let Status::Established(c) = client.feed(&mut to_client, &mut to_server)? else {
//!     panic!("client not done")
//! };
//! assert_eq!((s.sender, c.receiver), (SenderId([1; 16]), ReceiverId([3; 16])));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use bytes::BytesMut;

use crate::codec::{put_frame, CodecV1};
use crate::crypto::{proofs_equal, Key, Sealer, SessionKeys};
use crate::frame::{
    parse_proof, DecodeError, Flags, Hello, HelloParse, Kind, Mode, RawFrame, Reject, RejectReason,
    Welcome, DEFAULT_MAX_FRAME, NONCE_LEN, VERSION,
};
use crate::handle::Handle;
use crate::ids::{ReceiverId, SenderId};

/// The largest handshake frame a server accepts before the client proved anything: a
/// hello is small, so an unauthenticated peer cannot make it buffer the full maximum.
pub const SERVER_HANDSHAKE_MAX_FRAME: usize = 4096;

/// Why a handshake failed, as far as the protocol can tell (the driver adds the
/// socket's errors, the peer closing and timeouts).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeFailure {
    /// The peer sent bytes that are not a valid handshake message.
    #[error("protocol error: {0}")]
    Decode(#[from] DecodeError),
    /// The peer refused the connection for a reason other than the keys.
    #[error("rejected by peer: {reason}")]
    Rejected {
        /// The peer's reason.
        reason: RejectReason,
        /// The peer's text.
        text: String,
    },
    /// The key proof did not verify (here or at the peer): the two sides use
    /// different keys.
    #[error("authentication failed: the peer has another key")]
    AuthenticationFailed,
    /// One side uses a key or encryption and the other does not.
    #[error("authentication failed: security settings differ")]
    SecurityMismatch,
    /// The connecting side asked for another handle.
    #[error("wrong handle: the peer asked for {0:?}")]
    WrongHandle(String),
    /// The connecting side speaks another protocol version.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u16),
    /// The server is not the receiver the client expected.
    #[error("a different receiver answers (expected {expected}, got {got})")]
    WrongReceiver {
        /// The expected id.
        expected: ReceiverId,
        /// The id that answered.
        got: ReceiverId,
    },
}

/// The outcome of a successful handshake.
#[derive(Debug)]
pub struct Established {
    /// Seals the frames this side sends (mode `Sealed` only).
    pub tx: Option<Sealer>,
    /// Opens the frames this side receives (mode `Sealed` only).
    pub rx: Option<Sealer>,
    /// The connecting side's id.
    pub sender: SenderId,
    /// The accepting side's id.
    pub receiver: ReceiverId,
}

/// What feeding a state machine led to.
#[derive(Debug)]
#[must_use]
pub enum Status {
    /// Send what was appended to the output, then feed more bytes.
    NeedMore,
    /// The handshake is complete: send what was appended to the output; bytes left in
    /// the input belong to the connection. (Boxed: the sealers' key schedules are
    /// large, and every other status is empty.)
    Established(Box<Established>),
}

/// The connecting side's parameters.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The handle asked for.
    pub handle: Handle,
    /// This side's id.
    pub sender: SenderId,
    /// The security mode; the server must use the same.
    pub mode: Mode,
    /// The master key (modes `Authenticated` and `Sealed`).
    pub key: Option<Key>,
    /// A fresh random nonce.
    pub nonce: [u8; NONCE_LEN],
    /// When set, the server must answer with this receiver id.
    pub expect: Option<ReceiverId>,
    /// The maximum frame length accepted from the server (during the handshake at
    /// most [`SERVER_HANDSHAKE_MAX_FRAME`]: its frames are small).
    pub max_frame: usize,
}

impl ClientConfig {
    /// Parameters with no expected receiver and the default frame maximum.
    pub fn new(
        handle: Handle,
        sender: SenderId,
        mode: Mode,
        key: Option<Key>,
        nonce: [u8; NONCE_LEN],
    ) -> ClientConfig {
        ClientConfig {
            handle,
            sender,
            mode,
            key,
            nonce,
            expect: None,
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

/// The accepting side's parameters.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The handle served.
    pub handle: Handle,
    /// This side's id.
    pub receiver: ReceiverId,
    /// The security mode; the client must use the same.
    pub mode: Mode,
    /// The master key (modes `Authenticated` and `Sealed`).
    pub key: Option<Key>,
    /// A fresh random nonce.
    pub nonce: [u8; NONCE_LEN],
    /// The maximum frame length of the connection; during the handshake at most
    /// [`SERVER_HANDSHAKE_MAX_FRAME`] applies.
    pub max_frame: usize,
}

impl ServerConfig {
    /// Parameters with the default frame maximum.
    pub fn new(
        handle: Handle,
        receiver: ReceiverId,
        mode: Mode,
        key: Option<Key>,
        nonce: [u8; NONCE_LEN],
    ) -> ServerConfig {
        ServerConfig {
            handle,
            receiver,
            mode,
            key,
            nonce,
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

/// The connecting side of the handshake.
#[derive(Debug)]
pub struct Client {
    cfg: ClientConfig,
    codec: CodecV1,
    state: ClientState,
}

#[derive(Debug)]
enum ClientState {
    AwaitWelcome {
        hello_body: BytesMut,
    },
    AwaitReady {
        keys: Option<SessionKeys>,
        receiver: ReceiverId,
    },
    Done,
}

impl Client {
    /// Starts the handshake: appends the `Hello` to `out`.
    pub fn new(cfg: ClientConfig, out: &mut BytesMut) -> Client {
        let hello = Hello {
            version: VERSION,
            mode: cfg.mode,
            handle: cfg.handle.clone(),
            sender: cfg.sender,
            nonce: cfg.nonce,
        };
        let mut hello_body = BytesMut::new();
        hello.encode(&mut hello_body);
        put_frame(out, Kind::Hello, Flags(0), 0, &hello_body);
        Client {
            // Welcome, Ready and Reject are small too: a peer that has proved nothing
            // cannot make the connecting side buffer a full maximum frame either.
            codec: CodecV1::new(cfg.max_frame.min(SERVER_HANDSHAKE_MAX_FRAME)),
            cfg,
            state: ClientState::AwaitWelcome { hello_body },
        }
    }

    /// Takes whole frames off the front of `src` until the handshake completes or
    /// more bytes are needed; appends what to send to `out`.
    ///
    /// # Errors
    /// [`HandshakeFailure`]; a `Reject` for the peer may have been appended to `out`:
    /// send it before closing.
    pub fn feed(
        &mut self,
        src: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<Status, HandshakeFailure> {
        while let Some(f) = self.codec.decode(src)? {
            if let Status::Established(e) = self.handle_frame(f, out)? {
                return Ok(Status::Established(e));
            }
        }
        Ok(Status::NeedMore)
    }

    /// Handles one received frame; appends what to send to `out`.
    ///
    /// # Errors
    /// As [`Client::feed`].
    pub fn handle_frame(
        &mut self,
        f: RawFrame,
        out: &mut BytesMut,
    ) -> Result<Status, HandshakeFailure> {
        let state = std::mem::replace(&mut self.state, ClientState::Done);
        check_header(&f)?;
        match state {
            ClientState::AwaitWelcome { hello_body } => {
                let welcome = match f.kind {
                    Kind::Welcome => Welcome::parse(&f.body)?,
                    Kind::Reject => return Err(rejected(&f.body)),
                    got => return Err(unexpected(got, "Welcome or Reject")),
                };
                if let Some(expected) = self.cfg.expect {
                    if welcome.receiver != expected {
                        reject(out, RejectReason::Other(0), "not the registered receiver");
                        return Err(HandshakeFailure::WrongReceiver {
                            expected,
                            got: welcome.receiver,
                        });
                    }
                }
                let keys = match (&self.cfg.key, self.cfg.mode) {
                    (Some(key), Mode::Authenticated | Mode::Sealed) => {
                        let keys = SessionKeys::derive(
                            key,
                            &hello_body,
                            &self.cfg.nonce,
                            &welcome.receiver,
                            &welcome.nonce,
                        );
                        let Some(proof) = welcome.proof else {
                            reject(out, RejectReason::SecurityMismatch, "no proof in welcome");
                            return Err(HandshakeFailure::SecurityMismatch);
                        };
                        if !proofs_equal(&proof, &keys.proof_s) {
                            reject(
                                out,
                                RejectReason::AuthenticationFailed,
                                "receiver's key proof did not verify",
                            );
                            return Err(HandshakeFailure::AuthenticationFailed);
                        }
                        put_frame(out, Kind::Proof, Flags(0), 0, &keys.proof_c);
                        Some(keys)
                    }
                    _ => {
                        if welcome.proof.is_some() {
                            reject(out, RejectReason::SecurityMismatch, "unexpected proof");
                            return Err(HandshakeFailure::SecurityMismatch);
                        }
                        put_frame(out, Kind::Proof, Flags(0), 0, &[]);
                        None
                    }
                };
                self.state = ClientState::AwaitReady {
                    keys,
                    receiver: welcome.receiver,
                };
                Ok(Status::NeedMore)
            }
            ClientState::AwaitReady { keys, receiver } => match f.kind {
                Kind::Ready if f.body.is_empty() => {
                    let (tx, rx) = match keys.filter(|_| self.cfg.mode == Mode::Sealed) {
                        Some(k) => (Some(Sealer::new(&k.c2s)), Some(Sealer::new(&k.s2c))),
                        None => (None, None),
                    };
                    Ok(Status::Established(Box::new(Established {
                        tx,
                        rx,
                        sender: self.cfg.sender,
                        receiver,
                    })))
                }
                Kind::Ready => Err(DecodeError::Malformed("ready").into()),
                Kind::Reject => Err(rejected(&f.body)),
                got => Err(unexpected(got, "Ready or Reject")),
            },
            ClientState::Done => Err(unexpected(f.kind, "nothing: the handshake is over")),
        }
    }
}

/// The accepting side of the handshake.
#[derive(Debug)]
pub struct Server {
    cfg: ServerConfig,
    codec: CodecV1,
    state: ServerState,
}

#[derive(Debug)]
enum ServerState {
    AwaitHello,
    AwaitProof {
        keys: Option<SessionKeys>,
        sender: SenderId,
    },
    Done,
}

impl Server {
    /// Waits for the client's `Hello`.
    pub fn new(cfg: ServerConfig) -> Server {
        Server {
            codec: CodecV1::new(cfg.max_frame.min(SERVER_HANDSHAKE_MAX_FRAME)),
            cfg,
            state: ServerState::AwaitHello,
        }
    }

    /// Takes whole frames off the front of `src` until the handshake completes or
    /// more bytes are needed; appends what to send to `out`.
    ///
    /// # Errors
    /// [`HandshakeFailure`]; a `Reject` for the peer may have been appended to `out`:
    /// send it before closing.
    pub fn feed(
        &mut self,
        src: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<Status, HandshakeFailure> {
        while let Some(f) = self.codec.decode(src)? {
            if let Status::Established(e) = self.handle_frame(f, out)? {
                return Ok(Status::Established(e));
            }
        }
        Ok(Status::NeedMore)
    }

    /// Handles one received frame; appends what to send to `out`.
    ///
    /// # Errors
    /// As [`Server::feed`].
    pub fn handle_frame(
        &mut self,
        f: RawFrame,
        out: &mut BytesMut,
    ) -> Result<Status, HandshakeFailure> {
        let state = std::mem::replace(&mut self.state, ServerState::Done);
        check_header(&f)?;
        match state {
            ServerState::AwaitHello => {
                if f.kind != Kind::Hello {
                    return Err(unexpected(f.kind, "Hello"));
                }
                let hello_body = f.body;
                let hello = match Hello::parse(&hello_body) {
                    Ok(HelloParse::Hello(h)) => h,
                    Ok(HelloParse::UnsupportedVersion(v)) => {
                        reject(
                            out,
                            RejectReason::UnsupportedVersion,
                            &format!("this receiver speaks version {VERSION}, not {v}"),
                        );
                        return Err(HandshakeFailure::UnsupportedVersion(v));
                    }
                    Err(e) => {
                        reject(out, RejectReason::Malformed, &e.to_string());
                        return Err(e.into());
                    }
                };
                if hello.handle != self.cfg.handle {
                    reject(
                        out,
                        RejectReason::WrongHandle,
                        &format!("this receiver serves {:?}", self.cfg.handle.as_str()),
                    );
                    return Err(HandshakeFailure::WrongHandle(hello.handle.to_string()));
                }
                if hello.mode != self.cfg.mode {
                    reject(
                        out,
                        RejectReason::SecurityMismatch,
                        &format!("receiver uses {:?}, sender {:?}", self.cfg.mode, hello.mode),
                    );
                    return Err(HandshakeFailure::SecurityMismatch);
                }
                let keys = match (&self.cfg.key, self.cfg.mode) {
                    (Some(key), Mode::Authenticated | Mode::Sealed) => Some(SessionKeys::derive(
                        key,
                        &hello_body,
                        &hello.nonce,
                        &self.cfg.receiver,
                        &self.cfg.nonce,
                    )),
                    _ => None,
                };
                let mut body = BytesMut::new();
                Welcome {
                    receiver: self.cfg.receiver,
                    nonce: self.cfg.nonce,
                    proof: keys.as_ref().map(|k| k.proof_s),
                }
                .encode(&mut body);
                put_frame(out, Kind::Welcome, Flags(0), 0, &body);
                self.state = ServerState::AwaitProof {
                    keys,
                    sender: hello.sender,
                };
                Ok(Status::NeedMore)
            }
            ServerState::AwaitProof { keys, sender } => {
                let proof = match f.kind {
                    Kind::Proof => parse_proof(&f.body)?,
                    Kind::Reject => return Err(rejected(&f.body)),
                    got => return Err(unexpected(got, "Proof or Reject")),
                };
                match (&keys, proof) {
                    (Some(k), Some(p)) if proofs_equal(&p, &k.proof_c) => {}
                    (None, None) => {}
                    _ => {
                        reject(
                            out,
                            RejectReason::AuthenticationFailed,
                            "sender's key proof did not verify",
                        );
                        return Err(HandshakeFailure::AuthenticationFailed);
                    }
                }
                put_frame(out, Kind::Ready, Flags(0), 0, &[]);
                // Handshake frames are small; from here on the full maximum applies.
                self.codec = CodecV1::new(self.cfg.max_frame);
                let (tx, rx) = match keys.filter(|_| self.cfg.mode == Mode::Sealed) {
                    Some(k) => (Some(Sealer::new(&k.s2c)), Some(Sealer::new(&k.c2s))),
                    None => (None, None),
                };
                Ok(Status::Established(Box::new(Established {
                    tx,
                    rx,
                    sender,
                    receiver: self.cfg.receiver,
                })))
            }
            ServerState::Done => Err(unexpected(f.kind, "nothing: the handshake is over")),
        }
    }
}

/// Handshake frames carry no flags and sequence number 0.
fn check_header(f: &RawFrame) -> Result<(), HandshakeFailure> {
    if f.flags != Flags(0) || f.seq != 0 {
        return Err(DecodeError::Malformed("handshake frame header").into());
    }
    Ok(())
}

fn unexpected(got: Kind, expected: &'static str) -> HandshakeFailure {
    DecodeError::Unexpected { got, expected }.into()
}

/// Appends a `Reject` frame.
fn reject(out: &mut BytesMut, reason: RejectReason, text: &str) {
    let mut body = BytesMut::new();
    Reject {
        reason,
        text: text.to_owned(),
    }
    .encode(&mut body);
    put_frame(out, Kind::Reject, Flags(0), 0, &body);
}

/// The failure a received `Reject` body stands for.
fn rejected(body: &[u8]) -> HandshakeFailure {
    match Reject::parse(body) {
        Ok(r) if r.reason == RejectReason::AuthenticationFailed => {
            HandshakeFailure::AuthenticationFailed
        }
        Ok(r) if r.reason == RejectReason::SecurityMismatch => HandshakeFailure::SecurityMismatch,
        Ok(r) => HandshakeFailure::Rejected {
            reason: r.reason,
            text: r.text,
        },
        Err(e) => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::put_header;
    use crate::frame::{HEADER_LEN, LEN_PREFIX};

    type Outcome = Result<Box<Established>, HandshakeFailure>;

    fn handle(s: &str) -> Handle {
        Handle::new(s).unwrap()
    }

    fn client(h: &str, mode: Mode, key: Option<Key>) -> ClientConfig {
        ClientConfig::new(handle(h), SenderId([8; 16]), mode, key, [1; 32])
    }

    fn server(mode: Mode, key: Option<Key>) -> ServerConfig {
        ServerConfig::new(handle("h"), ReceiverId([7; 16]), mode, key, [2; 32])
    }

    /// Runs both sides against each other in memory, handing bytes over `chunk` at a
    /// time, until both have an outcome (or nothing moves).
    fn run(c: ClientConfig, s: ServerConfig, chunk: usize) -> (Option<Outcome>, Option<Outcome>) {
        let (mut to_s, mut to_c) = (BytesMut::new(), BytesMut::new());
        let mut cl = Client::new(c, &mut to_s);
        let mut sv = Server::new(s);
        let (mut c_in, mut s_in) = (BytesMut::new(), BytesMut::new());
        let (mut c_end, mut s_end) = (None, None);
        while (c_end.is_none() || s_end.is_none()) && (!to_s.is_empty() || !to_c.is_empty()) {
            if !to_s.is_empty() {
                let n = chunk.min(to_s.len());
                s_in.extend_from_slice(&to_s.split_to(n));
                if s_end.is_none() {
                    match sv.feed(&mut s_in, &mut to_c) {
                        Ok(Status::NeedMore) => {}
                        Ok(Status::Established(e)) => s_end = Some(Ok(e)),
                        Err(e) => s_end = Some(Err(e)),
                    }
                }
            }
            if !to_c.is_empty() {
                let n = chunk.min(to_c.len());
                c_in.extend_from_slice(&to_c.split_to(n));
                if c_end.is_none() {
                    match cl.feed(&mut c_in, &mut to_s) {
                        Ok(Status::NeedMore) => {}
                        Ok(Status::Established(e)) => c_end = Some(Ok(e)),
                        Err(e) => c_end = Some(Err(e)),
                    }
                }
            }
        }
        (c_end, s_end)
    }

    fn err(o: Option<Outcome>) -> HandshakeFailure {
        match o {
            Some(Err(e)) => e,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn every_mode_establishes_whole_and_byte_by_byte() {
        let k = Key::from_bytes([1; 32]);
        for (mode, key) in [
            (Mode::Open, None),
            (Mode::Authenticated, Some(k.clone())),
            (Mode::Sealed, Some(k.clone())),
        ] {
            for chunk in [1, 3, 4096] {
                let mut c = client("h", mode, key.clone());
                c.expect = Some(ReceiverId([7; 16]));
                let (ce, se) = run(c, server(mode, key.clone()), chunk);
                let (ce, se) = (ce.unwrap().unwrap(), se.unwrap().unwrap());
                assert_eq!(
                    (ce.sender, ce.receiver),
                    (SenderId([8; 16]), ReceiverId([7; 16]))
                );
                assert_eq!((se.sender, se.receiver), (ce.sender, ce.receiver));
                let sealed = mode == Mode::Sealed;
                assert_eq!(ce.tx.is_some(), sealed, "{mode:?}");
                assert_eq!(se.rx.is_some(), sealed, "{mode:?}");
                if let (Some(tx), Some(rx)) = (ce.tx, se.rx) {
                    // What the client seals, the server opens.
                    let mut wire = BytesMut::new();
                    tx.put_sealed(&mut wire, Kind::Data, Flags(0), 1, b"hi");
                    let mut f = CodecV1::default().decode(&mut wire).unwrap().unwrap();
                    rx.open(&mut f).unwrap();
                    assert_eq!(&f.body[..], b"hi");
                }
            }
        }
    }

    #[test]
    fn wrong_key_fails_on_both_sides() {
        for mode in [Mode::Authenticated, Mode::Sealed] {
            let a = Some(Key::from_bytes([1; 32]));
            let b = Some(Key::from_bytes([2; 32]));
            let (c, s) = run(client("h", mode, a), server(mode, b), 4096);
            assert_eq!(err(c), HandshakeFailure::AuthenticationFailed);
            assert_eq!(err(s), HandshakeFailure::AuthenticationFailed);
        }
    }

    #[test]
    fn security_mismatch_fails_on_both_sides() {
        let k = Some(Key::from_bytes([1; 32]));
        let (c, s) = run(client("h", Mode::Open, None), server(Mode::Sealed, k), 4096);
        assert_eq!(err(c), HandshakeFailure::SecurityMismatch);
        assert_eq!(err(s), HandshakeFailure::SecurityMismatch);
    }

    #[test]
    fn wrong_handle_and_wrong_receiver() {
        let (c, s) = run(
            client("other", Mode::Open, None),
            server(Mode::Open, None),
            4096,
        );
        assert!(matches!(
            err(c),
            HandshakeFailure::Rejected {
                reason: RejectReason::WrongHandle,
                ref text,
            } if text == "this receiver serves \"h\""
        ),);
        assert_eq!(err(s), HandshakeFailure::WrongHandle("other".into()));

        let mut c = client("h", Mode::Open, None);
        c.expect = Some(ReceiverId([9; 16]));
        let (c, s) = run(c, server(Mode::Open, None), 4096);
        assert_eq!(
            err(c),
            HandshakeFailure::WrongReceiver {
                expected: ReceiverId([9; 16]),
                got: ReceiverId([7; 16])
            }
        );
        assert!(matches!(
            err(s),
            HandshakeFailure::Rejected {
                reason: RejectReason::Other(0),
                ..
            }
        ));
    }

    #[test]
    fn unsupported_version_is_rejected_with_reason_1() {
        let mut sv = Server::new(server(Mode::Open, None));
        let mut src = BytesMut::new();
        put_frame(&mut src, Kind::Hello, Flags(0), 0, b"IPCB\x00\x02");
        let mut out = BytesMut::new();
        let e = sv.feed(&mut src, &mut out).unwrap_err();
        assert_eq!(e, HandshakeFailure::UnsupportedVersion(2));
        let f = CodecV1::default().decode(&mut out).unwrap().unwrap();
        assert_eq!(f.kind, Kind::Reject);
        assert_eq!(f.body[0], 1, "reason: unsupported version");
        let r = Reject::parse(&f.body).unwrap();
        assert_eq!(r.text, "this receiver speaks version 1, not 2");
    }

    #[test]
    fn garbage_fed_byte_by_byte_fails_without_a_reply() {
        let mut sv = Server::new(server(Mode::Open, None));
        let (mut src, mut out) = (BytesMut::new(), BytesMut::new());
        let mut end = None;
        for b in b"SSH-2.0-OpenSSH_9.2\r\n" {
            src.extend_from_slice(&[*b]);
            match sv.feed(&mut src, &mut out) {
                Ok(Status::NeedMore) => {}
                Ok(Status::Established(_)) => panic!("established on garbage"),
                Err(e) => {
                    end = Some(e);
                    break;
                }
            }
        }
        assert!(matches!(end, Some(HandshakeFailure::Decode(_))), "{end:?}");
        assert!(out.is_empty());
    }

    #[test]
    fn header_must_be_plain_and_frames_in_order() {
        // A Hello with a sequence number.
        let mut sv = Server::new(server(Mode::Open, None));
        let mut src = BytesMut::new();
        put_header(&mut src, Kind::Hello, Flags(0), 1, 0);
        let e = sv.feed(&mut src, &mut BytesMut::new()).unwrap_err();
        assert_eq!(
            e,
            HandshakeFailure::Decode(DecodeError::Malformed("handshake frame header"))
        );
        // A Proof before the Hello.
        let mut sv = Server::new(server(Mode::Open, None));
        let mut src = BytesMut::new();
        put_frame(&mut src, Kind::Proof, Flags(0), 0, &[]);
        let e = sv.feed(&mut src, &mut BytesMut::new()).unwrap_err();
        assert!(matches!(
            e,
            HandshakeFailure::Decode(DecodeError::Unexpected {
                got: Kind::Proof,
                ..
            })
        ));
        // Anything after a failure is refused.
        let mut f = BytesMut::new();
        put_frame(&mut f, Kind::Hello, Flags(0), 0, &[]);
        let f = CodecV1::default().decode(&mut f).unwrap().unwrap();
        assert!(sv.handle_frame(f, &mut BytesMut::new()).is_err());
    }

    #[test]
    fn a_hello_larger_than_the_handshake_maximum_is_refused_at_its_prefix() {
        let mut sv = Server::new(server(Mode::Open, None));
        let mut src = BytesMut::from(&((SERVER_HANDSHAKE_MAX_FRAME + 1) as u32).to_be_bytes()[..]);
        assert!(matches!(
            sv.feed(&mut src, &mut BytesMut::new()),
            Err(HandshakeFailure::Decode(DecodeError::TooLong { .. }))
        ));
    }

    #[test]
    fn a_welcome_larger_than_the_handshake_maximum_is_refused_at_its_prefix() {
        let mut cl = Client::new(client("h", Mode::Open, None), &mut BytesMut::new());
        let mut src = BytesMut::from(&((SERVER_HANDSHAKE_MAX_FRAME + 1) as u32).to_be_bytes()[..]);
        assert!(matches!(
            cl.feed(&mut src, &mut BytesMut::new()),
            Err(HandshakeFailure::Decode(DecodeError::TooLong { .. }))
        ));
    }

    #[test]
    fn bytes_after_ready_stay_in_the_input() {
        let mut to_s = BytesMut::new();
        let mut cl = Client::new(client("h", Mode::Open, None), &mut to_s);
        let mut sv = Server::new(server(Mode::Open, None));
        let mut to_c = BytesMut::new();
        assert!(matches!(
            sv.feed(&mut to_s, &mut to_c),
            Ok(Status::NeedMore)
        ));
        assert!(matches!(
            cl.feed(&mut to_c, &mut to_s),
            Ok(Status::NeedMore)
        ));
        assert!(matches!(
            sv.feed(&mut to_s, &mut to_c),
            Ok(Status::Established(_))
        ));
        // The server's first frame arrives together with its Ready.
        put_frame(&mut to_c, Kind::Ack, Flags(0), 1, &5u64.to_be_bytes());
        let ready_len = LEN_PREFIX + HEADER_LEN;
        let ack = to_c[ready_len..].to_vec();
        assert!(matches!(
            cl.feed(&mut to_c, &mut to_s),
            Ok(Status::Established(_))
        ));
        assert_eq!(&to_c[..], &ack[..]);
    }
}
