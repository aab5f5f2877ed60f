//! Calls (request/reply) on the wire: the bodies of the `Request`, `Reply` and
//! `Cancel` frames, and the codes of remote errors. Both ends of a call connection
//! send and accept all three kinds (a server may call back into its client), on the
//! same session (numbering, sealing, compression) as events.
//!
//! `docs/PROTOCOL.md` §8 describes these bodies byte by byte.

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::DecodeError;

/// Longest contract or method name on the wire, in bytes.
pub const MAX_NAME: usize = 255;
/// Longest remote error message on the wire, in bytes; longer messages are cut (at a
/// character boundary) when encoded.
pub const MAX_MESSAGE: usize = 4096;
/// `Request` flag: the caller expects no reply (a one-way notification).
pub const ONE_WAY: u8 = 0x01;

/// The body of a `Request` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Correlation id, chosen by the caller, unique among its calls in flight on this
    /// connection; the reply echoes it. Never 0.
    pub id: u64,
    /// Milliseconds the caller will still wait, as of sending; 0 = no deadline.
    pub deadline_ms: u32,
    /// Flag bits ([`ONE_WAY`]).
    pub flags: u8,
    /// Contract name (empty for untyped calls).
    pub contract: String,
    /// Contract version.
    pub version: u16,
    /// Method name (empty for untyped calls).
    pub method: String,
    /// The arguments, as the application encoded them.
    pub body: Bytes,
}

/// The body of a `Reply` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The id of the request answered.
    pub id: u64,
    /// The return value or the remote error.
    pub outcome: Result<Bytes, Fault>,
}

/// A remote error as it travels: a code, a human message, and a detail the code
/// defines (a typed service's error value for [`Code::Application`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// What kind of failure.
    pub code: Code,
    /// A message for people.
    pub message: String,
    /// Bytes whose meaning the code defines; may be empty.
    pub detail: Bytes,
}

/// The code of a remote error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Code {
    /// The handler returned an error of its own; the detail is that error, encoded
    /// by the service (postcard for typed services).
    Application,
    /// The handler panicked; the server goes on serving.
    Panicked,
    /// The server serves another contract or version; the detail is the server's
    /// contract (see [`ContractDetail`]).
    ContractMismatch,
    /// The server's contract has no method of that name.
    UnknownMethod,
    /// The server is at its concurrency limit; the call did not run.
    Busy,
    /// The request's arguments did not decode; the call did not run.
    BadRequest,
    /// The deadline passed on the server before the handler finished.
    DeadlineExceeded,
    /// The handler finished without replying.
    NoReply,
    /// A code this version does not know.
    Other(u16),
}

impl Code {
    /// The code's number on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            Code::Application => 1,
            Code::Panicked => 2,
            Code::ContractMismatch => 3,
            Code::UnknownMethod => 4,
            Code::Busy => 5,
            Code::BadRequest => 6,
            Code::DeadlineExceeded => 7,
            Code::NoReply => 8,
            Code::Other(n) => n,
        }
    }

    /// The code of a number on the wire.
    pub fn from_u16(n: u16) -> Code {
        match n {
            1 => Code::Application,
            2 => Code::Panicked,
            3 => Code::ContractMismatch,
            4 => Code::UnknownMethod,
            5 => Code::Busy,
            6 => Code::BadRequest,
            7 => Code::DeadlineExceeded,
            8 => Code::NoReply,
            n => Code::Other(n),
        }
    }

    /// A short lowercase name (`application`, `panicked`, ...), as the CLI prints it.
    pub fn name(self) -> &'static str {
        match self {
            Code::Application => "application",
            Code::Panicked => "panicked",
            Code::ContractMismatch => "contract_mismatch",
            Code::UnknownMethod => "unknown_method",
            Code::Busy => "busy",
            Code::BadRequest => "bad_request",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NoReply => "no_reply",
            Code::Other(_) => "other",
        }
    }
}

/// The detail of a [`Code::ContractMismatch`] fault: the contract the server serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContractDetail {
    /// The server's contract name.
    pub contract: String,
    /// The server's contract version.
    pub version: u16,
}

impl ContractDetail {
    /// The detail bytes: name (u8 length, UTF-8), version (u16).
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        put_name(&mut b, &self.contract);
        b.put_u16(self.version);
        b.freeze()
    }

    /// Parses detail bytes.
    ///
    /// # Errors
    /// [`DecodeError::Malformed`].
    pub fn parse(mut b: &[u8]) -> Result<ContractDetail, DecodeError> {
        let what = "contract mismatch detail";
        let contract = take_name(&mut b, what)?;
        let version = take_u16(&mut b, what)?;
        if !b.is_empty() {
            return Err(DecodeError::Malformed(what));
        }
        Ok(ContractDetail { contract, version })
    }
}

impl Request {
    /// Appends the body bytes. Names longer than [`MAX_NAME`] are cut (callers check
    /// names when they are made).
    pub fn encode(&self, dst: &mut BytesMut) {
        encode_request_head(
            dst,
            self.id,
            self.deadline_ms,
            self.flags,
            &self.contract,
            self.version,
            &self.method,
        );
        dst.put_slice(&self.body);
    }

    /// Parses a `Request` body; `body` is a slice of the frame, not a copy.
    ///
    /// # Errors
    /// [`DecodeError::Malformed`] when a field is cut short, a name is not UTF-8, the
    /// id is 0, or an undefined flag is set.
    pub fn parse(frame: Bytes) -> Result<Request, DecodeError> {
        let what = "request";
        let mut b = &frame[..];
        let id = take_u64(&mut b, what)?;
        let deadline_ms = take_u32(&mut b, what)?;
        let flags = take_u8(&mut b, what)?;
        let contract = take_name(&mut b, what)?;
        let version = take_u16(&mut b, what)?;
        let method = take_name(&mut b, what)?;
        if id == 0 || flags & !ONE_WAY != 0 {
            return Err(DecodeError::Malformed(what));
        }
        let body = frame.slice(frame.len() - b.len()..);
        Ok(Request {
            id,
            deadline_ms,
            flags,
            contract,
            version,
            method,
            body,
        })
    }

    /// Whether the caller expects no reply.
    pub fn one_way(&self) -> bool {
        self.flags & ONE_WAY != 0
    }
}

/// Appends the head of a `Request` body (everything but the arguments), so a caller
/// can write the arguments right after it without building a [`Request`].
pub fn encode_request_head(
    dst: &mut BytesMut,
    id: u64,
    deadline_ms: u32,
    flags: u8,
    contract: &str,
    version: u16,
    method: &str,
) {
    dst.put_u64(id);
    dst.put_u32(deadline_ms);
    dst.put_u8(flags);
    put_name(dst, contract);
    dst.put_u16(version);
    put_name(dst, method);
}

impl Reply {
    /// Appends the body bytes.
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64(self.id);
        match &self.outcome {
            Ok(body) => {
                dst.put_u8(0);
                dst.put_slice(body);
            }
            Err(f) => {
                dst.put_u8(1);
                dst.put_u16(f.code.to_u16());
                let msg = cut(&f.message, MAX_MESSAGE);
                dst.put_u16(msg.len() as u16);
                dst.put_slice(msg.as_bytes());
                dst.put_slice(&f.detail);
            }
        }
    }

    /// Parses a `Reply` body; the value or detail is a slice of the frame.
    ///
    /// # Errors
    /// [`DecodeError::Malformed`] when a field is cut short, the status byte is not
    /// 0 or 1, the message is not UTF-8 or longer than [`MAX_MESSAGE`], or the id is 0.
    pub fn parse(frame: Bytes) -> Result<Reply, DecodeError> {
        let what = "reply";
        let mut b = &frame[..];
        let id = take_u64(&mut b, what)?;
        if id == 0 {
            return Err(DecodeError::Malformed(what));
        }
        let outcome = match take_u8(&mut b, what)? {
            0 => Ok(frame.slice(frame.len() - b.len()..)),
            1 => {
                let code = Code::from_u16(take_u16(&mut b, what)?);
                let len = take_u16(&mut b, what)? as usize;
                if len > MAX_MESSAGE || b.len() < len {
                    return Err(DecodeError::Malformed(what));
                }
                let message = std::str::from_utf8(&b[..len])
                    .map_err(|_| DecodeError::Malformed(what))?
                    .to_owned();
                b = &b[len..];
                let detail = frame.slice(frame.len() - b.len()..);
                Err(Fault {
                    code,
                    message,
                    detail,
                })
            }
            _ => return Err(DecodeError::Malformed(what)),
        };
        Ok(Reply { id, outcome })
    }
}

/// Appends a `Cancel` body: the id of the call the caller gave up on.
pub fn encode_cancel(dst: &mut BytesMut, id: u64) {
    dst.put_u64(id);
}

/// Parses a `Cancel` body.
///
/// # Errors
/// [`DecodeError::Malformed`] unless the body is exactly 8 bytes and not 0.
pub fn parse_cancel(b: &[u8]) -> Result<u64, DecodeError> {
    let arr: [u8; 8] = b.try_into().map_err(|_| DecodeError::Malformed("cancel"))?;
    match u64::from_be_bytes(arr) {
        0 => Err(DecodeError::Malformed("cancel")),
        id => Ok(id),
    }
}

fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_name(dst: &mut BytesMut, name: &str) {
    let name = cut(name, MAX_NAME);
    dst.put_u8(name.len() as u8);
    dst.put_slice(name.as_bytes());
}

fn take_u8(b: &mut &[u8], what: &'static str) -> Result<u8, DecodeError> {
    let (&v, rest) = b.split_first().ok_or(DecodeError::Malformed(what))?;
    *b = rest;
    Ok(v)
}

fn take<const N: usize>(b: &mut &[u8], what: &'static str) -> Result<[u8; N], DecodeError> {
    if b.len() < N {
        return Err(DecodeError::Malformed(what));
    }
    let (head, rest) = b.split_at(N);
    *b = rest;
    Ok(head.try_into().expect("length checked"))
}

fn take_u16(b: &mut &[u8], what: &'static str) -> Result<u16, DecodeError> {
    take::<2>(b, what).map(u16::from_be_bytes)
}

fn take_u32(b: &mut &[u8], what: &'static str) -> Result<u32, DecodeError> {
    take::<4>(b, what).map(u32::from_be_bytes)
}

fn take_u64(b: &mut &[u8], what: &'static str) -> Result<u64, DecodeError> {
    take::<8>(b, what).map(u64::from_be_bytes)
}

fn take_name(b: &mut &[u8], what: &'static str) -> Result<String, DecodeError> {
    let len = take_u8(b, what)? as usize;
    if b.len() < len {
        return Err(DecodeError::Malformed(what));
    }
    let (name, rest) = b.split_at(len);
    *b = rest;
    std::str::from_utf8(name)
        .map(str::to_owned)
        .map_err(|_| DecodeError::Malformed(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request {
            id: 1,
            deadline_ms: 1000,
            flags: 0,
            contract: "Calc".into(),
            version: 2,
            method: "add".into(),
            body: Bytes::from_static(&[0x02, 0x04]),
        }
    }

    #[test]
    fn request_pinned_bytes_and_round_trip() {
        let mut b = BytesMut::new();
        request().encode(&mut b);
        assert_eq!(
            hex::encode(&b),
            "0000000000000001\
             000003e8\
             00\
             0443616c63\
             0002\
             03616464\
             0204"
        );
        assert_eq!(Request::parse(b.freeze()).unwrap(), request());
    }

    #[test]
    fn reply_pinned_bytes_and_round_trip() {
        let ok = Reply {
            id: 1,
            outcome: Ok(Bytes::from_static(&[0x0c])),
        };
        let mut b = BytesMut::new();
        ok.encode(&mut b);
        assert_eq!(hex::encode(&b), "0000000000000001000c");
        assert_eq!(Reply::parse(b.freeze()).unwrap(), ok);

        let err = Reply {
            id: 2,
            outcome: Err(Fault {
                code: Code::ContractMismatch,
                message: "no".into(),
                detail: ContractDetail {
                    contract: "C".into(),
                    version: 1,
                }
                .to_bytes(),
            }),
        };
        let mut b = BytesMut::new();
        err.encode(&mut b);
        assert_eq!(
            hex::encode(&b),
            "0000000000000002\
             01\
             0003\
             0002\
             6e6f\
             01430001"
        );
        let back = Reply::parse(b.freeze()).unwrap();
        assert_eq!(back, err);
        let Err(f) = back.outcome else { panic!() };
        assert_eq!(
            ContractDetail::parse(&f.detail).unwrap(),
            ContractDetail {
                contract: "C".into(),
                version: 1
            }
        );
    }

    #[test]
    fn cancel_pinned_bytes() {
        let mut b = BytesMut::new();
        encode_cancel(&mut b, 0x0102);
        assert_eq!(hex::encode(&b), "0000000000000102");
        assert_eq!(parse_cancel(&b).unwrap(), 0x0102);
        assert!(parse_cancel(&[0; 8]).is_err());
        assert!(parse_cancel(&[0; 7]).is_err());
    }

    #[test]
    fn every_cut_of_a_request_or_reply_is_an_error_not_a_panic() {
        let mut b = BytesMut::new();
        request().encode(&mut b);
        let head = b.len() - 2;
        for n in 0..head {
            assert!(
                Request::parse(Bytes::copy_from_slice(&b[..n])).is_err(),
                "{n}"
            );
        }
        let mut b = BytesMut::new();
        Reply {
            id: 3,
            outcome: Err(Fault {
                code: Code::Panicked,
                message: "handler panicked".into(),
                detail: Bytes::new(),
            }),
        }
        .encode(&mut b);
        for n in 0..b.len() {
            assert!(
                Reply::parse(Bytes::copy_from_slice(&b[..n])).is_err(),
                "{n}"
            );
        }
    }

    #[test]
    fn bad_fields_are_malformed() {
        let mut b = BytesMut::new();
        Request { id: 0, ..request() }.encode(&mut b);
        assert!(Request::parse(b.freeze()).is_err(), "id 0");
        let mut b = BytesMut::new();
        Request {
            flags: 0x80,
            ..request()
        }
        .encode(&mut b);
        assert!(Request::parse(b.freeze()).is_err(), "undefined flag");
        // A method name that is not UTF-8.
        let mut b = BytesMut::new();
        encode_request_head(&mut b, 1, 0, 0, "", 0, "");
        let mut raw = b.to_vec();
        raw.truncate(raw.len() - 1);
        raw.extend_from_slice(&[1, 0xff]);
        assert!(Request::parse(Bytes::from(raw)).is_err());
        // Status byte 2.
        assert!(Reply::parse(Bytes::from_static(&[0, 0, 0, 0, 0, 0, 0, 1, 2])).is_err());
    }

    #[test]
    fn long_messages_and_names_are_cut_at_a_character_boundary() {
        let msg = "é".repeat(MAX_MESSAGE);
        let mut b = BytesMut::new();
        Reply {
            id: 1,
            outcome: Err(Fault {
                code: Code::Application,
                message: msg,
                detail: Bytes::new(),
            }),
        }
        .encode(&mut b);
        let Err(f) = Reply::parse(b.freeze()).unwrap().outcome else {
            panic!()
        };
        assert_eq!(f.message.len(), MAX_MESSAGE);
        let mut b = BytesMut::new();
        encode_request_head(&mut b, 1, 0, 0, &"x".repeat(300), 0, "m");
        let r = Request::parse(b.freeze()).unwrap();
        assert_eq!(r.contract.len(), MAX_NAME);
    }

    #[test]
    fn codes_round_trip() {
        for n in 0..20u16 {
            assert_eq!(Code::from_u16(n).to_u16(), n);
        }
    }
}
