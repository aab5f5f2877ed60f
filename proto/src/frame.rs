//! Frame types of wire protocol v1 and the bodies of the handshake messages.
//!
//! See `docs/PROTOCOL.md` for the byte-by-byte description.

use bytes::{Buf, BufMut, BytesMut};

use crate::handle::{Handle, HandleError};
use crate::ids::{ReceiverId, SenderId};

/// The four bytes every `Hello` starts with.
pub const MAGIC: [u8; 4] = *b"IPCB";
/// The protocol version this crate speaks.
pub const VERSION: u16 = 1;
/// Bytes of the frame header after the length: kind (1), flags (1), sequence (8).
pub const HEADER_LEN: usize = 10;
/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Default maximum of the length field (header + body), 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;
/// Bytes of a handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a key proof.
pub const PROOF_LEN: usize = 32;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum Kind {
    /// Connecting side opens the handshake.
    Hello = 0x01,
    /// Accepting side answers a `Hello`.
    Welcome = 0x02,
    /// Connecting side proves the key.
    Proof = 0x03,
    /// Accepting side accepts the connection.
    Ready = 0x04,
    /// Either side refuses the connection; the connection closes after it.
    Reject = 0x05,
    /// One event from a sender.
    Data = 0x10,
    /// Cumulative acknowledgement from a receiver.
    Ack = 0x11,
    /// The receiver is closing: no further acknowledgements will come.
    Bye = 0x12,
    /// From a sender: someone waits for the outcome of the events up to the one named
    /// in the body (u64), so acknowledge them as soon as they are taken rather than
    /// at the receiver's usual, batched pace. Numbered by its own counter.
    AckRequest = 0x13,
    /// A call: correlation id, deadline, contract, method, arguments
    /// ([`call::Request`](crate::call::Request)).
    Request = 0x20,
    /// The answer to a call: its id, then the value or a remote error
    /// ([`call::Reply`](crate::call::Reply)).
    Reply = 0x21,
    /// The caller gave up on the call whose id is the body (u64).
    Cancel = 0x22,
}

impl Kind {
    /// Parses the kind byte.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            0x01 => Kind::Hello,
            0x02 => Kind::Welcome,
            0x03 => Kind::Proof,
            0x04 => Kind::Ready,
            0x05 => Kind::Reject,
            0x10 => Kind::Data,
            0x11 => Kind::Ack,
            0x12 => Kind::Bye,
            0x13 => Kind::AckRequest,
            0x20 => Kind::Request,
            0x21 => Kind::Reply,
            0x22 => Kind::Cancel,
            _ => return None,
        })
    }
}

/// Frame flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags(pub u8);

impl Flags {
    /// The body (before sealing) is a gzip stream.
    pub const COMPRESSED: u8 = 0x01;
    /// The body is AES-256-GCM ciphertext followed by a 16-byte tag.
    pub const SEALED: u8 = 0x02;
    /// Every defined bit.
    pub const ALL: u8 = Self::COMPRESSED | Self::SEALED;

    /// Whether the compressed bit is set.
    pub fn compressed(self) -> bool {
        self.0 & Self::COMPRESSED != 0
    }
    /// Whether the sealed bit is set.
    pub fn sealed(self) -> bool {
        self.0 & Self::SEALED != 0
    }
}

/// The fixed part of every frame after the length prefix: kind (1 byte), flags (1),
/// sequence number (8, big-endian). Parsed and written here and nowhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the frame carries.
    pub kind: Kind,
    /// Compressed / sealed bits.
    pub flags: Flags,
    /// Sequence number (0 for handshake frames).
    pub seq: u64,
}

impl Header {
    /// Parses the header bytes.
    ///
    /// # Errors
    /// [`DecodeError::UnknownKind`], [`DecodeError::UnknownFlags`].
    #[inline]
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header, DecodeError> {
        let kind = Kind::from_u8(b[0]).ok_or(DecodeError::UnknownKind(b[0]))?;
        if b[1] & !Flags::ALL != 0 {
            return Err(DecodeError::UnknownFlags(b[1]));
        }
        let [_, _, seq @ ..] = *b;
        Ok(Header {
            kind,
            flags: Flags(b[1]),
            seq: u64::from_be_bytes(seq),
        })
    }

    /// Parses what [`Header::to_bytes`] writes: the length prefix and the header;
    /// returns the header and the length of the body that follows.
    ///
    /// # Errors
    /// [`DecodeError::TooShort`], [`DecodeError::UnknownKind`],
    /// [`DecodeError::UnknownFlags`]. The maximum is the codec's to check.
    #[inline]
    pub fn parse_prefixed(
        b: &[u8; LEN_PREFIX + HEADER_LEN],
    ) -> Result<(Header, usize), DecodeError> {
        let (prefix, header) = b.split_at(LEN_PREFIX);
        let mut len = [0u8; LEN_PREFIX];
        len.copy_from_slice(prefix);
        let len = u32::from_be_bytes(len) as usize;
        let body_len = len
            .checked_sub(HEADER_LEN)
            .ok_or(DecodeError::TooShort { len })?;
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(header);
        Ok((Header::parse(&h)?, body_len))
    }

    /// The length prefix and header of a frame whose body is `body_len` bytes.
    #[inline]
    pub fn to_bytes(&self, body_len: usize) -> [u8; LEN_PREFIX + HEADER_LEN] {
        let mut h = [0u8; LEN_PREFIX + HEADER_LEN];
        h[..LEN_PREFIX].copy_from_slice(&((HEADER_LEN + body_len) as u32).to_be_bytes());
        h[LEN_PREFIX] = self.kind as u8;
        h[LEN_PREFIX + 1] = self.flags.0;
        h[LEN_PREFIX + 2..].copy_from_slice(&self.seq.to_be_bytes());
        h
    }
}

/// One frame as it came off the wire: typed header, body still as bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// What the frame carries.
    pub kind: Kind,
    /// Compressed / sealed bits.
    pub flags: Flags,
    /// Sequence number (0 for handshake frames).
    pub seq: u64,
    /// The body.
    pub body: BytesMut,
}

/// Why bytes from the network are not a valid frame or message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The length field is larger than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLong {
        /// Announced length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The length field is smaller than the header.
    #[error("frame length {len} is shorter than the {HEADER_LEN}-byte header")]
    TooShort {
        /// Announced length.
        len: usize,
    },
    /// Unknown kind byte.
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    /// Flag bits that are not defined.
    #[error("undefined frame flags 0x{0:02x}")]
    UnknownFlags(u8),
    /// A frame arrived that is not allowed at this point of the conversation.
    #[error("unexpected {got:?} frame, expected {expected}")]
    Unexpected {
        /// What arrived.
        got: Kind,
        /// What was allowed.
        expected: &'static str,
    },
    /// A `Hello` without the `IPCB` magic: the peer does not speak ipcbus.
    #[error("bad magic: the peer does not speak the ipcbus protocol")]
    BadMagic,
    /// A message body is shorter or longer than its fields say.
    #[error("malformed {0} body")]
    Malformed(&'static str),
    /// A handle on the wire is not a valid handle.
    #[error("bad handle on the wire: {0}")]
    Handle(#[from] HandleError),
    /// A sealed frame failed to open: wrong key, tampered or replayed.
    #[error("authentication failed: sealed frame did not open (wrong key, tampering or replay)")]
    OpenFailed,
    /// A frame's sequence number is not above the previous one on this connection.
    #[error("sequence {seq} is not above the previous {last}: replayed or reordered frame")]
    OutOfOrder {
        /// This frame's sequence.
        seq: u64,
        /// The previous frame's sequence.
        last: u64,
    },
    /// A sealed frame arrived on a plain connection or the other way round.
    #[error("frame sealing does not match the connection's security mode")]
    SealMismatch,
    /// The gzip body is corrupt.
    #[error("corrupt gzip body")]
    Inflate,
    /// The gzip body inflates past the maximum.
    #[error("gzip body inflates past the maximum of {max} bytes")]
    InflateTooLarge {
        /// Configured maximum.
        max: usize,
    },
}

/// Security mode announced in `Hello`; both sides must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// No key: no proof, frames in the clear.
    Open = 0,
    /// Key proven in the handshake, frames in the clear (local-user default).
    Authenticated = 1,
    /// Key proven in the handshake and every frame sealed with AES-256-GCM.
    Sealed = 2,
}

impl Mode {
    fn from_u8(b: u8) -> Option<Mode> {
        match b {
            0 => Some(Mode::Open),
            1 => Some(Mode::Authenticated),
            2 => Some(Mode::Sealed),
            _ => None,
        }
    }
}

/// Body of a `Hello` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version of the connecting side.
    pub version: u16,
    /// Security mode the connecting side uses.
    pub mode: Mode,
    /// The handle the connecting side wants to reach.
    pub handle: Handle,
    /// Identity of the connecting sender.
    pub sender: SenderId,
    /// Fresh random nonce.
    pub nonce: [u8; NONCE_LEN],
}

/// Result of reading a `Hello` body: either a `Hello`, or a version we do not speak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloParse {
    /// A version-1 hello.
    Hello(Hello),
    /// The magic matched but the version is not ours; answer `Reject(UnsupportedVersion)`.
    UnsupportedVersion(u16),
}

impl Hello {
    /// Appends the body bytes.
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_slice(&MAGIC);
        dst.put_u16(self.version);
        dst.put_u8(self.mode as u8);
        dst.put_u8(self.handle.as_bytes().len() as u8);
        dst.put_slice(self.handle.as_bytes());
        dst.put_slice(&self.sender.0);
        dst.put_slice(&self.nonce);
    }

    /// Parses a `Hello` body.
    ///
    /// # Errors
    /// [`DecodeError::BadMagic`], [`DecodeError::Malformed`] or a bad handle.
    pub fn parse(mut b: &[u8]) -> Result<HelloParse, DecodeError> {
        if b.len() < 6 || b[..4] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        b.advance(4);
        let version = b.get_u16();
        if version != VERSION {
            return Ok(HelloParse::UnsupportedVersion(version));
        }
        let need = |b: &[u8], n: usize| {
            if b.len() < n {
                Err(DecodeError::Malformed("hello"))
            } else {
                Ok(())
            }
        };
        need(b, 2)?;
        let mode = Mode::from_u8(b.get_u8()).ok_or(DecodeError::Malformed("hello"))?;
        let hlen = b.get_u8() as usize;
        need(b, hlen + 16 + NONCE_LEN)?;
        let handle = Handle::from_bytes(&b[..hlen])?;
        b.advance(hlen);
        let mut sender = [0u8; 16];
        b.copy_to_slice(&mut sender);
        let mut nonce = [0u8; NONCE_LEN];
        b.copy_to_slice(&mut nonce);
        if !b.is_empty() {
            return Err(DecodeError::Malformed("hello"));
        }
        Ok(HelloParse::Hello(Hello {
            version,
            mode,
            handle,
            sender: SenderId(sender),
            nonce,
        }))
    }
}

/// Body of a `Welcome` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Identity of the accepting receiver.
    pub receiver: ReceiverId,
    /// Fresh random nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Proof of the key (modes `Authenticated` and `Sealed`), else `None`.
    pub proof: Option<[u8; PROOF_LEN]>,
}

impl Welcome {
    /// Appends the body bytes.
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_slice(&self.receiver.0);
        dst.put_slice(&self.nonce);
        match &self.proof {
            Some(p) => {
                dst.put_u8(PROOF_LEN as u8);
                dst.put_slice(p);
            }
            None => dst.put_u8(0),
        }
    }

    /// Parses a `Welcome` body.
    ///
    /// # Errors
    /// [`DecodeError::Malformed`].
    pub fn parse(mut b: &[u8]) -> Result<Welcome, DecodeError> {
        if b.len() != 16 + NONCE_LEN + 1 && b.len() != 16 + NONCE_LEN + 1 + PROOF_LEN {
            return Err(DecodeError::Malformed("welcome"));
        }
        let mut receiver = [0u8; 16];
        b.copy_to_slice(&mut receiver);
        let mut nonce = [0u8; NONCE_LEN];
        b.copy_to_slice(&mut nonce);
        let plen = b.get_u8() as usize;
        let proof = match (plen, b.len()) {
            (0, 0) => None,
            (PROOF_LEN, PROOF_LEN) => {
                let mut p = [0u8; PROOF_LEN];
                b.copy_to_slice(&mut p);
                Some(p)
            }
            _ => return Err(DecodeError::Malformed("welcome")),
        };
        Ok(Welcome {
            receiver: ReceiverId(receiver),
            nonce,
            proof,
        })
    }
}

/// Parses a `Proof` body: empty (mode `Open`) or 32 bytes.
///
/// # Errors
/// [`DecodeError::Malformed`].
pub fn parse_proof(b: &[u8]) -> Result<Option<[u8; PROOF_LEN]>, DecodeError> {
    match b.len() {
        0 => Ok(None),
        PROOF_LEN => {
            let mut p = [0u8; PROOF_LEN];
            p.copy_from_slice(b);
            Ok(Some(p))
        }
        _ => Err(DecodeError::Malformed("proof")),
    }
}

/// Why a peer refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectReason {
    /// The peer does not speak this protocol version.
    UnsupportedVersion,
    /// The receiver serves another handle (its port was reused).
    WrongHandle,
    /// The key proof did not verify: wrong password, salt or secret.
    AuthenticationFailed,
    /// One side uses a key and the other does not, or sealing differs.
    SecurityMismatch,
    /// Too many connections.
    Busy,
    /// The peer sent something it could not parse.
    Malformed,
    /// The receiver is shutting down.
    ShuttingDown,
    /// A reason code this version does not know.
    Other(u8),
}

impl RejectReason {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            RejectReason::UnsupportedVersion => 1,
            RejectReason::WrongHandle => 2,
            RejectReason::AuthenticationFailed => 3,
            RejectReason::SecurityMismatch => 4,
            RejectReason::Busy => 5,
            RejectReason::Malformed => 6,
            RejectReason::ShuttingDown => 7,
            RejectReason::Other(c) => c,
        }
    }

    /// From the wire code.
    pub fn from_code(c: u8) -> RejectReason {
        match c {
            1 => RejectReason::UnsupportedVersion,
            2 => RejectReason::WrongHandle,
            3 => RejectReason::AuthenticationFailed,
            4 => RejectReason::SecurityMismatch,
            5 => RejectReason::Busy,
            6 => RejectReason::Malformed,
            7 => RejectReason::ShuttingDown,
            c => RejectReason::Other(c),
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RejectReason::UnsupportedVersion => f.write_str("unsupported protocol version"),
            RejectReason::WrongHandle => f.write_str("wrong handle"),
            RejectReason::AuthenticationFailed => f.write_str("authentication failed"),
            RejectReason::SecurityMismatch => {
                f.write_str("authentication failed: security settings differ (a password and salt on one side only)")
            }
            RejectReason::Busy => f.write_str("too many connections"),
            RejectReason::Malformed => f.write_str("malformed handshake"),
            RejectReason::ShuttingDown => f.write_str("shutting down"),
            RejectReason::Other(c) => write!(f, "rejected (code {c})"),
        }
    }
}

/// Body of a `Reject` frame: reason code and a short UTF-8 text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// Machine-readable reason.
    pub reason: RejectReason,
    /// Human-readable detail (at most 1024 bytes on the wire).
    pub text: String,
}

impl Reject {
    /// Appends the body bytes; the text is cut to 1024 bytes on a character boundary.
    pub fn encode(&self, dst: &mut BytesMut) {
        let mut end = self.text.len().min(1024);
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        dst.put_u8(self.reason.code());
        dst.put_u16(end as u16);
        dst.put_slice(&self.text.as_bytes()[..end]);
    }

    /// Parses a `Reject` body (invalid UTF-8 in the text is replaced).
    ///
    /// # Errors
    /// [`DecodeError::Malformed`].
    pub fn parse(mut b: &[u8]) -> Result<Reject, DecodeError> {
        if b.len() < 3 {
            return Err(DecodeError::Malformed("reject"));
        }
        let reason = RejectReason::from_code(b.get_u8());
        let n = b.get_u16() as usize;
        if b.len() != n || n > 1024 {
            return Err(DecodeError::Malformed("reject"));
        }
        Ok(Reject {
            reason,
            text: String::from_utf8_lossy(b).into_owned(),
        })
    }
}

/// Parses an `Ack` body: the highest sequence number the application has taken.
///
/// # Errors
/// [`DecodeError::Malformed`].
pub fn parse_ack(b: &[u8]) -> Result<u64, DecodeError> {
    let arr: [u8; 8] = b.try_into().map_err(|_| DecodeError::Malformed("ack"))?;
    Ok(u64::from_be_bytes(arr))
}

/// Parses the body of an AckRequest frame: the sequence number to acknowledge
/// promptly.
///
/// # Errors
/// [`DecodeError::Malformed`] unless the body is exactly 8 bytes.
pub fn parse_ack_request(b: &[u8]) -> Result<u64, DecodeError> {
    let arr: [u8; 8] = b
        .try_into()
        .map_err(|_| DecodeError::Malformed("ack request"))?;
    Ok(u64::from_be_bytes(arr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_pinned_bytes_and_parse_errors() {
        let h = Header {
            kind: Kind::Data,
            flags: Flags(Flags::COMPRESSED | Flags::SEALED),
            seq: 7,
        };
        let b = h.to_bytes(2);
        assert_eq!(
            hex::encode(b),
            "0000000c".to_string() + "10" + "03" + "0000000000000007"
        );
        let body = b[LEN_PREFIX..].first_chunk::<HEADER_LEN>().unwrap();
        assert_eq!(Header::parse(body), Ok(h));
        let mut bad = *body;
        bad[0] = 0x7f;
        assert_eq!(Header::parse(&bad), Err(DecodeError::UnknownKind(0x7f)));
        let mut bad = *body;
        bad[1] = 0x80;
        assert_eq!(Header::parse(&bad), Err(DecodeError::UnknownFlags(0x80)));
        // With the length prefix: the inverse of `to_bytes`.
        assert_eq!(Header::parse_prefixed(&b), Ok((h, 2)));
        let mut short = b;
        short[..LEN_PREFIX].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            Header::parse_prefixed(&short),
            Err(DecodeError::TooShort { len: 9 })
        );
    }

    fn hello() -> Hello {
        Hello {
            version: VERSION,
            mode: Mode::Sealed,
            handle: Handle::new("orders").unwrap(),
            sender: SenderId([0x11; 16]),
            nonce: [0x22; NONCE_LEN],
        }
    }

    #[test]
    fn pinned_hello_bytes_and_round_trip() {
        let mut b = BytesMut::new();
        hello().encode(&mut b);
        let expect = String::from("49504342") // magic
            + "0001" // version
            + "02" // mode sealed
            + "06" + &hex::encode("orders")
            + &"11".repeat(16)
            + &"22".repeat(32);
        assert_eq!(hex::encode(&b), expect);
        assert_eq!(Hello::parse(&b).unwrap(), HelloParse::Hello(hello()));
    }

    #[test]
    fn hello_reject_paths() {
        let mut good = BytesMut::new();
        hello().encode(&mut good);
        // wrong magic
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(Hello::parse(&b), Err(DecodeError::BadMagic));
        assert_eq!(Hello::parse(b"IPC"), Err(DecodeError::BadMagic));
        // another version is reported, not an error
        let mut b = good.clone();
        b[5] = 9;
        assert_eq!(Hello::parse(&b), Ok(HelloParse::UnsupportedVersion(9)));
        // unknown mode
        let mut b = good.clone();
        b[6] = 7;
        assert_eq!(Hello::parse(&b), Err(DecodeError::Malformed("hello")));
        // truncated at every length
        for n in 6..good.len() {
            assert!(Hello::parse(&good[..n]).is_err(), "prefix of {n} bytes");
        }
        // trailing bytes
        let mut b = good.clone();
        b.put_u8(0);
        assert_eq!(Hello::parse(&b), Err(DecodeError::Malformed("hello")));
        // bad handle on the wire
        let mut b = good.clone();
        b[8] = b'/';
        assert!(matches!(Hello::parse(&b), Err(DecodeError::Handle(_))));
        // empty handle
        let mut b = BytesMut::new();
        b.put_slice(&good[..7]);
        b.put_u8(0);
        b.put_slice(&good[14..]);
        assert!(matches!(
            Hello::parse(&b),
            Err(DecodeError::Handle(HandleError::Empty))
        ));
    }

    #[test]
    fn welcome_round_trip_and_reject_paths() {
        for proof in [None, Some([9u8; PROOF_LEN])] {
            let w = Welcome {
                receiver: ReceiverId([3; 16]),
                nonce: [4; NONCE_LEN],
                proof,
            };
            let mut b = BytesMut::new();
            w.encode(&mut b);
            assert_eq!(Welcome::parse(&b).unwrap(), w);
            for n in 0..b.len() {
                assert!(Welcome::parse(&b[..n]).is_err());
            }
        }
        // proof length byte that disagrees with the body
        let mut b = BytesMut::new();
        Welcome {
            receiver: ReceiverId([3; 16]),
            nonce: [4; NONCE_LEN],
            proof: None,
        }
        .encode(&mut b);
        let last = b.len() - 1;
        b[last] = 32;
        assert_eq!(Welcome::parse(&b), Err(DecodeError::Malformed("welcome")));
    }

    #[test]
    fn reject_proof_and_ack_bodies() {
        let r = Reject {
            reason: RejectReason::AuthenticationFailed,
            text: "nope".into(),
        };
        let mut b = BytesMut::new();
        r.encode(&mut b);
        assert_eq!(hex::encode(&b), "030004".to_string() + &hex::encode("nope"));
        assert_eq!(Reject::parse(&b).unwrap(), r);
        assert_eq!(
            Reject::parse(&b[..2]),
            Err(DecodeError::Malformed("reject"))
        );
        assert_eq!(
            Reject::parse(&b[..5]),
            Err(DecodeError::Malformed("reject"))
        );
        // long texts are cut on a character boundary
        let long = Reject {
            reason: RejectReason::Other(42),
            text: "é".repeat(600),
        };
        let mut b = BytesMut::new();
        long.encode(&mut b);
        let back = Reject::parse(&b).unwrap();
        assert_eq!(back.reason, RejectReason::Other(42));
        assert_eq!(back.text.len(), 1024);
        for code in 0..=255u8 {
            assert_eq!(RejectReason::from_code(code).code(), code);
        }
        assert_eq!(parse_proof(&[]), Ok(None));
        assert_eq!(parse_proof(&[1; 32]), Ok(Some([1; 32])));
        assert_eq!(parse_proof(&[1; 31]), Err(DecodeError::Malformed("proof")));
        assert_eq!(parse_ack(&42u64.to_be_bytes()), Ok(42));
        assert_eq!(parse_ack(&[0; 7]), Err(DecodeError::Malformed("ack")));
        assert_eq!(parse_ack(&[0; 9]), Err(DecodeError::Malformed("ack")));
    }

    #[test]
    fn kinds_and_flags() {
        for b in 0..=255u8 {
            if let Some(k) = Kind::from_u8(b) {
                assert_eq!(k as u8, b);
            }
        }
        assert!(Flags(3).compressed() && Flags(3).sealed());
        assert!(!Flags(0).compressed() && !Flags(0).sealed());
    }
}
