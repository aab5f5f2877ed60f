//! One connection after the handshake, as two halves with no I/O. [`Outbound`]
//! numbers the frames this side sends and seals them on a sealed connection;
//! [`Inbound`] checks every frame received — its kind, its order, that it is sealed
//! exactly when the connection is — then opens it and inflates it within the
//! maximum. The receiver, the sender's acknowledgement reader and both ends of the
//! EPM make their checks through it.

use bytes::BytesMut;

use crate::codec::put_frame;
use crate::compress::Gunzipper;
use crate::crypto::Sealer;
use crate::frame::{parse_ack_request, DecodeError, Flags, Header, Kind, RawFrame};

/// The sending half of a connection.
#[derive(Debug)]
pub struct Outbound {
    sealer: Option<Sealer>,
    seq: u64,
}

impl Outbound {
    /// The sending half; `sealer` is `Some` on a sealed connection.
    pub fn new(sealer: Option<Sealer>) -> Outbound {
        Outbound { sealer, seq: 0 }
    }

    /// Appends one frame numbered one above the previous one, sealed on a sealed
    /// connection; returns its sequence number.
    pub fn put(&mut self, dst: &mut BytesMut, kind: Kind, flags: Flags, body: &[u8]) -> u64 {
        self.seq += 1;
        match &self.sealer {
            Some(s) => s.put_sealed(dst, kind, flags, self.seq, body),
            None => put_frame(dst, kind, flags, self.seq, body),
        }
        self.seq
    }
}

/// What an accepted frame carries, after [`Inbound::open_in_place`].
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// The plain body is the first `n` bytes of the buffer that was opened.
    Plain(usize),
    /// The body was compressed; this is it inflated.
    Inflated(Vec<u8>),
    /// An `AckRequest` (numbered by its own counter): acknowledge up to this event
    /// as soon as it is taken.
    AckRequest(u64),
}

/// The receiving half of a connection.
#[derive(Debug)]
pub struct Inbound {
    opener: Option<Sealer>,
    kinds: &'static [Kind],
    expected: &'static str,
    last_seq: u64,
    last_request: u64,
    max_inflate: usize,
    gunzipper: Option<Gunzipper>,
}

impl Inbound {
    /// The receiving half; `opener` is `Some` on a sealed connection. Frames of the
    /// `kinds` listed are accepted (`expected` names them in errors), and a compressed
    /// body may inflate to at most `max_inflate` bytes.
    pub fn new(
        opener: Option<Sealer>,
        kinds: &'static [Kind],
        expected: &'static str,
        max_inflate: usize,
    ) -> Inbound {
        Inbound {
            opener,
            kinds,
            expected,
            last_seq: 0,
            last_request: 0,
            max_inflate,
            gunzipper: None,
        }
    }

    /// What a receiver accepts from a sender: `Data`, and `AckRequest` on its own
    /// counter.
    pub fn events(opener: Option<Sealer>, max_inflate: usize) -> Inbound {
        Inbound::new(opener, &[Kind::Data, Kind::AckRequest], "Data", max_inflate)
    }

    /// What a sender accepts from a receiver: `Ack` and `Bye` (their bodies are 8
    /// bytes at most, so that is all one may inflate to).
    pub fn acks(opener: Option<Sealer>) -> Inbound {
        Inbound::new(opener, &[Kind::Ack, Kind::Bye], "Ack or Bye", 8)
    }

    /// What either end of a call connection accepts from the other: `Request`,
    /// `Reply`, `Cancel` (a server may call back into its client), and `Bye`.
    pub fn calls(opener: Option<Sealer>, max_inflate: usize) -> Inbound {
        Inbound::new(
            opener,
            &[Kind::Request, Kind::Reply, Kind::Cancel, Kind::Bye],
            "Request, Reply, Cancel or Bye",
            max_inflate,
        )
    }

    /// What the two ends of an EPM connection accept from each other: `Data`.
    pub fn messages(opener: Option<Sealer>, max_inflate: usize) -> Inbound {
        Inbound::new(opener, &[Kind::Data], "Data", max_inflate)
    }

    /// Checks one frame whose body is `body` (in the caller's buffer): its kind, its
    /// sequence number against the previous one of its counter, its seal; then opens
    /// it in place and inflates it if compressed.
    ///
    /// # Errors
    /// [`DecodeError::Unexpected`], [`DecodeError::OutOfOrder`],
    /// [`DecodeError::SealMismatch`], [`DecodeError::OpenFailed`],
    /// [`DecodeError::Malformed`], [`DecodeError::Inflate`],
    /// [`DecodeError::InflateTooLarge`]. The connection should end.
    pub fn open_in_place(&mut self, h: Header, body: &mut [u8]) -> Result<Opened, DecodeError> {
        if !self.kinds.contains(&h.kind) {
            return Err(DecodeError::Unexpected {
                got: h.kind,
                expected: self.expected,
            });
        }
        if h.kind == Kind::AckRequest {
            if h.seq <= self.last_request {
                return Err(DecodeError::OutOfOrder {
                    seq: h.seq,
                    last: self.last_request,
                });
            }
            if h.flags.compressed() {
                return Err(DecodeError::Malformed("ack request"));
            }
            let n = self.open(h, body)?;
            let up_to = parse_ack_request(&body[..n])?;
            self.last_request = h.seq;
            return Ok(Opened::AckRequest(up_to));
        }
        if h.seq <= self.last_seq {
            return Err(DecodeError::OutOfOrder {
                seq: h.seq,
                last: self.last_seq,
            });
        }
        let n = self.open(h, body)?;
        let opened = if h.flags.compressed() {
            let inflated = self
                .gunzipper
                .get_or_insert_with(Gunzipper::default)
                .gunzip(&body[..n], self.max_inflate)?;
            Opened::Inflated(inflated)
        } else {
            Opened::Plain(n)
        };
        self.last_seq = h.seq;
        Ok(opened)
    }

    /// [`Inbound::open_in_place`] on a decoded frame: its body is left plain (cut to
    /// the plaintext when it was sealed), or the inflated body is returned.
    ///
    /// # Errors
    /// As [`Inbound::open_in_place`].
    pub fn open_frame(&mut self, f: &mut RawFrame) -> Result<Opened, DecodeError> {
        let h = Header {
            kind: f.kind,
            flags: f.flags,
            seq: f.seq,
        };
        let opened = self.open_in_place(h, &mut f.body[..])?;
        if let Opened::Plain(n) = opened {
            f.body.truncate(n);
        }
        Ok(opened)
    }

    fn open(&self, h: Header, body: &mut [u8]) -> Result<usize, DecodeError> {
        match &self.opener {
            Some(s) => s.open_in_place(h.kind, h.flags, h.seq, body),
            None if h.flags.sealed() => Err(DecodeError::SealMismatch),
            None => Ok(body.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::CodecV1;
    use crate::compress::gzip;
    use crate::crypto::{Key, SessionKeys};
    use crate::ids::ReceiverId;

    fn sealers() -> (Sealer, Sealer) {
        let k = SessionKeys::derive(
            &Key::from_bytes([1; 32]),
            b"hello",
            &[2; 32],
            &ReceiverId([3; 16]),
            &[4; 32],
        );
        (Sealer::new(&k.c2s), Sealer::new(&k.c2s))
    }

    fn frames(wire: &mut BytesMut) -> Vec<RawFrame> {
        let mut codec = CodecV1::default();
        std::iter::from_fn(|| codec.decode(wire).unwrap()).collect()
    }

    #[test]
    fn outbound_to_inbound_plain_sealed_and_compressed() {
        for sealed in [false, true] {
            let (tx, rx) = sealers();
            let (tx, rx) = if sealed {
                (Some(tx), Some(rx))
            } else {
                (None, None)
            };
            let mut out = Outbound::new(tx);
            let mut inb = Inbound::messages(rx, 1 << 20);
            let mut wire = BytesMut::new();
            assert_eq!(out.put(&mut wire, Kind::Data, Flags(0), b"one"), 1);
            let z = gzip(&[7u8; 4000], 1).unwrap();
            assert_eq!(
                out.put(&mut wire, Kind::Data, Flags(Flags::COMPRESSED), &z),
                2
            );
            let mut fs = frames(&mut wire).into_iter();
            let mut f = fs.next().unwrap();
            assert_eq!(inb.open_frame(&mut f), Ok(Opened::Plain(3)));
            assert_eq!(&f.body[..], b"one");
            let mut f = fs.next().unwrap();
            assert_eq!(inb.open_frame(&mut f), Ok(Opened::Inflated(vec![7; 4000])));
        }
    }

    #[test]
    fn inbound_refuses_kind_order_seal_and_bombs() {
        let mut wire = BytesMut::new();
        put_frame(&mut wire, Kind::Ack, Flags(0), 1, &[0; 8]);
        put_frame(&mut wire, Kind::Data, Flags(0), 2, b"x");
        put_frame(&mut wire, Kind::Data, Flags(0), 2, b"x");
        put_frame(&mut wire, Kind::Data, Flags(Flags::SEALED), 3, &[0; 20]);
        let mut fs = frames(&mut wire).into_iter();
        let mut inb = Inbound::events(None, 100);
        let mut f = fs.next().unwrap();
        assert_eq!(
            inb.open_frame(&mut f),
            Err(DecodeError::Unexpected {
                got: Kind::Ack,
                expected: "Data"
            })
        );
        assert!(inb.open_frame(&mut fs.next().unwrap()).is_ok());
        assert_eq!(
            inb.open_frame(&mut fs.next().unwrap()),
            Err(DecodeError::OutOfOrder { seq: 2, last: 2 })
        );
        assert_eq!(
            inb.open_frame(&mut fs.next().unwrap()),
            Err(DecodeError::SealMismatch)
        );
        // A body that inflates past the maximum.
        let z = gzip(&[0u8; 1000], 1).unwrap();
        let mut wire = BytesMut::new();
        put_frame(&mut wire, Kind::Data, Flags(Flags::COMPRESSED), 1, &z);
        let mut f = frames(&mut wire).pop().unwrap();
        assert_eq!(
            Inbound::events(None, 100).open_frame(&mut f),
            Err(DecodeError::InflateTooLarge { max: 100 })
        );
        // A plain frame on a sealed connection.
        let (_, rx) = sealers();
        let mut wire = BytesMut::new();
        put_frame(&mut wire, Kind::Data, Flags(0), 1, b"x");
        let mut f = frames(&mut wire).pop().unwrap();
        assert_eq!(
            Inbound::messages(Some(rx), 100).open_frame(&mut f),
            Err(DecodeError::SealMismatch)
        );
    }

    #[test]
    fn ack_requests_have_their_own_counter() {
        let mut wire = BytesMut::new();
        put_frame(&mut wire, Kind::Data, Flags(0), 5, b"x");
        put_frame(
            &mut wire,
            Kind::AckRequest,
            Flags(0),
            1,
            &5u64.to_be_bytes(),
        );
        put_frame(
            &mut wire,
            Kind::AckRequest,
            Flags(0),
            1,
            &5u64.to_be_bytes(),
        );
        let mut fs = frames(&mut wire).into_iter();
        let mut inb = Inbound::events(None, 100);
        assert!(inb.open_frame(&mut fs.next().unwrap()).is_ok());
        assert_eq!(
            inb.open_frame(&mut fs.next().unwrap()),
            Ok(Opened::AckRequest(5))
        );
        assert_eq!(
            inb.open_frame(&mut fs.next().unwrap()),
            Err(DecodeError::OutOfOrder { seq: 1, last: 1 })
        );
        // Not accepted where only messages are.
        let mut wire = BytesMut::new();
        put_frame(
            &mut wire,
            Kind::AckRequest,
            Flags(0),
            1,
            &5u64.to_be_bytes(),
        );
        let mut f = frames(&mut wire).pop().unwrap();
        assert!(Inbound::messages(None, 100).open_frame(&mut f).is_err());
    }
}
