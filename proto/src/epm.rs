//! Messages of the endpoint manager (EPM) protocol and their codec. No sockets, no
//! clocks.
//!
//! An EPM connection is an ordinary v1 connection: the same handshake (with the
//! reserved handle [`EPM_HANDLE`]), the same framing, compression and sealing. After
//! the handshake both sides exchange `Data` frames (kind `0x10`) whose bodies are
//! postcard-encoded messages: [`Request`] from the client, [`Response`] from the EPM.
//! Sequence numbers start at 1 and grow by one per frame in each direction.
//!
//! [`FrameEncoder`] turns a message into frame bytes (compressing and sealing as
//! configured) and [`FrameDecoder`] turns a received frame back into a typed message,
//! checking order, seal, inflated size and trailing bytes. See `docs/PROTOCOL.md`,
//! section "Endpoint manager (EPM) messages", for the bytes.

use std::net::SocketAddr;

use bytes::BytesMut;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::compress::{gzip, DEFAULT_THRESHOLD};
use super::crypto::Sealer;
use super::frame::{DecodeError, Flags, Kind, RawFrame};
use super::session::{Inbound, Opened, Outbound};
use crate::endpoint::Endpoint;
use crate::handle::Handle;
use crate::ids::ReceiverId;
use crate::record::Record;

/// The handle an EPM client puts in its `Hello`; the EPM rejects any other.
pub const EPM_HANDLE: &str = "ipcbus.epm.v1";
/// The default TCP port of the EPM.
pub const DEFAULT_PORT: u16 = 4455;
/// Default maximum frame length on EPM connections (1 MiB): EPM messages are small.
pub const DEFAULT_EPM_MAX_FRAME: usize = 1 << 20;

/// A request from a client to the EPM. The EPM answers each with a
/// [`Response::Reply`] carrying the same `id`, in request order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the client to match the reply; any value.
    pub id: u32,
    /// What is asked.
    pub op: Op,
}

/// What a [`Request`] asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Op {
    /// Register (or renew) a receiver for a handle. The registration belongs to this
    /// connection: it goes when the connection closes or its lease runs out.
    /// Answered with [`Answer::Registered`].
    Register {
        /// The handle served.
        #[serde(with = "handle_serde")]
        handle: Handle,
        /// Where and who the receiver is.
        entry: Entry,
        /// Requested lease in milliseconds (0: the EPM's default); the EPM may
        /// shorten it.
        lease_ms: u32,
    },
    /// Remove a registration this connection made. Answered with [`Answer::Done`].
    Unregister {
        /// The handle.
        #[serde(with = "handle_serde")]
        handle: Handle,
        /// The receiver.
        #[serde(with = "receiver_serde")]
        receiver: ReceiverId,
    },
    /// Renew the lease of every registration of this connection. Answered with
    /// [`Answer::Done`].
    KeepAlive,
    /// The receivers registered for a handle now. Answered with [`Answer::Records`].
    Lookup {
        /// The handle.
        #[serde(with = "handle_serde")]
        handle: Handle,
    },
    /// Like `Lookup`, then [`Response::Added`] / [`Response::Removed`] for every
    /// change of the handle until `Unwatch` or the connection closes.
    Watch {
        /// The handle.
        #[serde(with = "handle_serde")]
        handle: Handle,
    },
    /// Stop watching a handle. Answered with [`Answer::Done`].
    Unwatch {
        /// The handle.
        #[serde(with = "handle_serde")]
        handle: Handle,
    },
    /// Every handle with its number of receivers. Answered with [`Answer::Handles`].
    List,
    /// The EPM's figures. Answered with [`Answer::Status`].
    Status,
    /// Register (or renew) a server of calls for a handle: as `Register`, in a
    /// separate set (a lookup or watch of receivers never sees it). `Unregister` and
    /// `KeepAlive` apply to it as to a receiver. Answered with [`Answer::Registered`].
    /// An EPM older than this variant closes the connection on it.
    RegisterServer {
        /// The handle served.
        #[serde(with = "handle_serde")]
        handle: Handle,
        /// Where and who the server is (`receiver` is the server's id).
        entry: Entry,
        /// Requested lease in milliseconds (0: the EPM's default).
        lease_ms: u32,
    },
    /// The servers registered for a handle now. Answered with [`Answer::Records`].
    LookupServers {
        /// The handle.
        #[serde(with = "handle_serde")]
        handle: Handle,
    },
    /// Like `LookupServers`, then [`Response::ServerAdded`] /
    /// [`Response::ServerRemoved`] for every change of the handle's servers until
    /// `UnwatchServers` or the connection closes.
    WatchServers {
        /// The handle.
        #[serde(with = "handle_serde")]
        handle: Handle,
    },
    /// Stop watching a handle's servers. Answered with [`Answer::Done`].
    UnwatchServers {
        /// The handle.
        #[serde(with = "handle_serde")]
        handle: Handle,
    },
    /// Every handle with its number of servers (in `HandleCount::receivers`).
    /// Answered with [`Answer::Handles`].
    ListServers,
}

/// One receiver's registration as the EPM stores and reports it (the handle is given
/// alongside).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Where the receiver accepts connections.
    pub endpoint: SocketAddr,
    /// Its identity, checked again in the data handshake.
    #[serde(with = "receiver_serde")]
    pub receiver: ReceiverId,
    /// Process id on the receiver's host, when known.
    pub pid: Option<u32>,
    /// Protocol version the receiver speaks.
    pub version: u16,
    /// When it registered, in milliseconds since the Unix epoch (receiver's clock).
    pub since_ms: u64,
}

impl Entry {
    /// The entry part of a registry record: its TCP endpoint (`None` when it has
    /// none). EPM entries carry one TCP endpoint: the EPM serves discovery across
    /// hosts, where a Unix socket cannot be reached, and the v1 entry stays as it was
    /// so existing peers keep working.
    pub fn from_record(r: &Record) -> Option<Entry> {
        Some(Entry {
            endpoint: r.tcp_addr()?,
            receiver: r.receiver,
            pid: r.pid,
            version: r.version,
            since_ms: r.since_ms,
        })
    }

    /// The registry record of this entry under `handle`, with the role
    /// [`Receiver`](crate::record::Role::Receiver) (use [`Record::with_role`] for a
    /// server's entry).
    pub fn to_record(&self, handle: &Handle) -> Record {
        Record {
            handle: handle.clone(),
            endpoints: vec![Endpoint::Tcp(self.endpoint)],
            receiver: self.receiver,
            pid: self.pid,
            version: self.version,
            since_ms: self.since_ms,
            role: crate::record::Role::Receiver,
        }
    }
}

/// A message from the EPM to a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Response {
    /// The answer to the request with this `id`.
    Reply {
        /// The request's id.
        id: u32,
        /// The answer.
        answer: Answer,
    },
    /// A receiver registered for a watched handle.
    Added {
        /// The handle.
        #[serde(with = "handle_serde")]
        handle: Handle,
        /// The new registration.
        entry: Entry,
    },
    /// A receiver of a watched handle is gone (unregistered, connection closed, or
    /// lease expired).
    Removed {
        /// The handle.
        #[serde(with = "handle_serde")]
        handle: Handle,
        /// The receiver.
        #[serde(with = "receiver_serde")]
        receiver: ReceiverId,
    },
    /// A server of calls registered for a handle whose servers are watched
    /// ([`Op::WatchServers`]).
    ServerAdded {
        /// The handle.
        #[serde(with = "handle_serde")]
        handle: Handle,
        /// The new registration.
        entry: Entry,
    },
    /// A server of a handle whose servers are watched is gone.
    ServerRemoved {
        /// The handle.
        #[serde(with = "handle_serde")]
        handle: Handle,
        /// The server's id.
        #[serde(with = "receiver_serde")]
        receiver: ReceiverId,
    },
}

/// The answer part of a [`Response::Reply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Answer {
    /// Done, nothing to report.
    Done,
    /// Registered; renew within this many milliseconds.
    Registered {
        /// The lease granted, in milliseconds.
        lease_ms: u32,
    },
    /// The receivers of the handle (lookup, or a watch's initial snapshot).
    Records(Vec<Entry>),
    /// Handles and their receiver counts, sorted by handle.
    Handles {
        /// At most the EPM's list limit of handles.
        handles: Vec<HandleCount>,
        /// How many handles exist in all (more than `handles.len()` when cut).
        total: u32,
    },
    /// The EPM's figures.
    Status(Status),
    /// The request failed.
    Error {
        /// Machine-readable reason.
        code: ErrorCode,
        /// Human-readable detail.
        text: String,
    },
}

/// One line of [`Answer::Handles`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandleCount {
    /// The handle.
    #[serde(with = "handle_serde")]
    pub handle: Handle,
    /// How many receivers are registered for it.
    pub receivers: u32,
}

/// What [`Op::Status`] reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The EPM's version (its crate version).
    pub version: String,
    /// Seconds since the EPM started.
    pub uptime_s: u64,
    /// Connections open now.
    pub connections: u32,
    /// Registrations now.
    pub registrations: u32,
    /// Handles with at least one registration.
    pub handles: u32,
    /// Watches held now.
    pub watches: u32,
    /// The default lease, in milliseconds.
    pub lease_ms: u32,
}

/// Why the EPM refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// A limit of the EPM was reached (registrations per connection, handles,
    /// receivers per handle, watches).
    LimitReached,
    /// No such registration on this connection.
    NotFound,
    /// The request is not valid (for example an unspecified endpoint address).
    Invalid,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ErrorCode::LimitReached => "limit reached",
            ErrorCode::NotFound => "not found",
            ErrorCode::Invalid => "invalid request",
        })
    }
}

/// Why an EPM frame could not be turned into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EpmDecodeError {
    /// The frame itself is bad: wrong kind, order, seal or gzip.
    #[error(transparent)]
    Frame(#[from] DecodeError),
    /// The body is not a valid message.
    #[error("malformed epm message: {0}")]
    Message(String),
    /// The body has bytes after the message.
    #[error("malformed epm message: {0} trailing bytes")]
    Trailing(usize),
}

/// Encodes a message as a postcard body (no frame around it).
pub fn encode_body<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing these types into a Vec cannot fail: no maps with non-string keys,
    // no sequences of unknown length.
    postcard::to_stdvec(msg).unwrap_or_default()
}

/// Decodes a postcard body, refusing trailing bytes.
///
/// # Errors
/// [`EpmDecodeError::Message`] or [`EpmDecodeError::Trailing`].
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, EpmDecodeError> {
    let (msg, rest) =
        postcard::take_from_bytes(body).map_err(|e| EpmDecodeError::Message(e.to_string()))?;
    if !rest.is_empty() {
        return Err(EpmDecodeError::Trailing(rest.len()));
    }
    Ok(msg)
}

/// One direction's outgoing state: the session's [`Outbound`] half (numbering,
/// sealing) and the gzip threshold.
#[derive(Debug)]
pub struct FrameEncoder {
    out: Outbound,
    threshold: usize,
}

impl FrameEncoder {
    /// An encoder for a connection; `sealer` is `Some` on a sealed connection.
    pub fn new(sealer: Option<Sealer>) -> FrameEncoder {
        FrameEncoder {
            out: Outbound::new(sealer),
            threshold: DEFAULT_THRESHOLD,
        }
    }

    /// Bodies of at least this many bytes are gzipped (default 512).
    pub fn with_threshold(mut self, bytes: usize) -> FrameEncoder {
        self.threshold = bytes;
        self
    }

    /// Appends one `Data` frame carrying `msg` to `dst`.
    pub fn encode<T: Serialize>(&mut self, msg: &T, dst: &mut BytesMut) {
        let body = encode_body(msg);
        let (flags, body) = if body.len() >= self.threshold {
            match gzip(&body, 1) {
                Some(z) => (Flags(Flags::COMPRESSED), z),
                None => (Flags(0), body),
            }
        } else {
            (Flags(0), body)
        };
        self.out.put(dst, Kind::Data, flags, &body);
    }
}

/// One direction's incoming state: the session's [`Inbound`] half (kind, order, seal,
/// inflated size), then the message.
#[derive(Debug)]
pub struct FrameDecoder {
    inbound: Inbound,
}

impl FrameDecoder {
    /// A decoder for a connection; `opener` is `Some` on a sealed connection; a
    /// compressed body may inflate to at most `max` bytes.
    pub fn new(opener: Option<Sealer>, max: usize) -> FrameDecoder {
        FrameDecoder {
            inbound: Inbound::messages(opener, max),
        }
    }

    /// Checks, opens, inflates and decodes one received frame.
    ///
    /// # Errors
    /// [`EpmDecodeError`]: a frame that is not `Data`, out of order, wrongly sealed,
    /// corrupt, or whose body is not one `T`.
    pub fn decode<T: DeserializeOwned>(&mut self, mut f: RawFrame) -> Result<T, EpmDecodeError> {
        match self.inbound.open_frame(&mut f)? {
            Opened::Plain(_) => decode_body(&f.body),
            Opened::Inflated(body) => decode_body(&body),
            // `Inbound::messages` accepts nothing but `Data`.
            Opened::AckRequest(_) => Err(DecodeError::Unexpected {
                got: f.kind,
                expected: "Data",
            }
            .into()),
        }
    }
}

mod handle_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::handle::Handle;

    pub(super) fn serialize<S: Serializer>(h: &Handle, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(h.as_str())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Handle, D::Error> {
        let s = String::deserialize(d)?;
        Handle::new(s).map_err(serde::de::Error::custom)
    }
}

mod receiver_serde {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::ids::ReceiverId;

    pub(super) fn serialize<S: Serializer>(id: &ReceiverId, s: S) -> Result<S::Ok, S::Error> {
        id.0.serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ReceiverId, D::Error> {
        Ok(ReceiverId(<[u8; 16]>::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{put_frame, CodecV1};
    use crate::crypto::{Key, SessionKeys};
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

    fn h(s: &str) -> Handle {
        Handle::new(s).unwrap()
    }

    fn entry() -> Entry {
        Entry {
            endpoint: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 4455)),
            receiver: ReceiverId([0xab; 16]),
            pid: Some(300),
            version: 1,
            since_ms: 1,
        }
    }

    #[test]
    fn pinned_request_bytes() {
        let r = Request {
            id: 1,
            op: Op::Lookup { handle: h("ab") },
        };
        // id varint 01 | op 03 (Lookup) | handle len 02 "ab"
        assert_eq!(hex::encode(encode_body(&r)), "0103026162");
        let r = Request {
            id: 300,
            op: Op::KeepAlive,
        };
        // id varint 300 = ac 02 | op 02 (KeepAlive)
        assert_eq!(hex::encode(encode_body(&r)), "ac0202");
        let r = Request {
            id: 7,
            op: Op::Register {
                handle: h("h"),
                entry: entry(),
                lease_ms: 10_000,
            },
        };
        assert_eq!(
            hex::encode(encode_body(&r)),
            concat!(
                "07",                               // id
                "00",                               // Register
                "0168",                             // handle "h"
                "00",                               // endpoint V4
                "0a000002",                         // 10.0.0.2
                "e722",                             // port 4455 varint
                "abababababababababababababababab", // receiver id
                "01ac02",                           // pid Some(300)
                "01",                               // version 1
                "01",                               // since_ms 1
                "904e",                             // lease 10000 varint
            )
        );
    }

    #[test]
    fn pinned_response_bytes() {
        let r = Response::Reply {
            id: 2,
            answer: Answer::Registered { lease_ms: 10_000 },
        };
        assert_eq!(hex::encode(encode_body(&r)), "000201904e");
        let r = Response::Removed {
            handle: h("h"),
            receiver: ReceiverId([1; 16]),
        };
        assert_eq!(
            hex::encode(encode_body(&r)),
            "02016801010101010101010101010101010101"
        );
        let r = Response::Reply {
            id: 0,
            answer: Answer::Error {
                code: ErrorCode::LimitReached,
                text: "x".into(),
            },
        };
        // Reply 00 | id 00 | Error 05 | LimitReached 00 | text "x"
        assert_eq!(hex::encode(encode_body(&r)), "000005000178");
    }

    /// The server ops and events are appended: the old variants keep their indices
    /// (pinned above) and the new ones take the next.
    #[test]
    fn pinned_server_bytes() {
        let r = Request {
            id: 7,
            op: Op::RegisterServer {
                handle: h("h"),
                entry: entry(),
                lease_ms: 10_000,
            },
        };
        assert_eq!(
            hex::encode(encode_body(&r)),
            concat!(
                "07",                               // id
                "08",                               // RegisterServer
                "0168",                             // handle "h"
                "00",                               // endpoint V4
                "0a000002",                         // 10.0.0.2
                "e722",                             // port 4455 varint
                "abababababababababababababababab", // server id
                "01ac02",                           // pid Some(300)
                "01",                               // version 1
                "01",                               // since_ms 1
                "904e",                             // lease 10000 varint
            )
        );
        for (op, hex) in [
            (Op::LookupServers { handle: h("ab") }, "0109026162"),
            (Op::WatchServers { handle: h("ab") }, "010a026162"),
            (Op::UnwatchServers { handle: h("ab") }, "010b026162"),
            (Op::ListServers, "010c"),
        ] {
            assert_eq!(hex::encode(encode_body(&Request { id: 1, op })), hex);
        }
        let r = Response::ServerAdded {
            handle: h("h"),
            entry: entry(),
        };
        assert_eq!(
            hex::encode(encode_body(&r)),
            concat!(
                "03",                                         // ServerAdded
                "0168",                                       // handle "h"
                "000a000002e722",                             // 10.0.0.2:4455
                "abababababababababababababababab01ac020101", // id, pid, version, since
            )
        );
        let r = Response::ServerRemoved {
            handle: h("h"),
            receiver: ReceiverId([1; 16]),
        };
        assert_eq!(
            hex::encode(encode_body(&r)),
            "04016801010101010101010101010101010101"
        );
        // An old decoder (variants 0-7 / 0-2) refuses them: `unknown variant`.
        assert!(decode_body::<Request>(&[0x01, 0x0d]).is_err());
        assert!(decode_body::<Response>(&[0x05]).is_err());
    }

    #[test]
    fn round_trip_every_message() {
        let v6 = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 9, 0, 0));
        let reqs = vec![
            Op::Register {
                handle: h("a"),
                entry: Entry {
                    endpoint: v6,
                    ..entry()
                },
                lease_ms: 0,
            },
            Op::Unregister {
                handle: h("a"),
                receiver: ReceiverId([3; 16]),
            },
            Op::KeepAlive,
            Op::Lookup { handle: h("é") },
            Op::Watch { handle: h("w") },
            Op::Unwatch { handle: h("w") },
            Op::List,
            Op::Status,
            Op::RegisterServer {
                handle: h("s"),
                entry: Entry {
                    endpoint: v6,
                    ..entry()
                },
                lease_ms: 5,
            },
            Op::LookupServers { handle: h("s") },
            Op::WatchServers { handle: h("s") },
            Op::UnwatchServers { handle: h("s") },
            Op::ListServers,
        ];
        for (i, op) in reqs.into_iter().enumerate() {
            let r = Request { id: i as u32, op };
            assert_eq!(decode_body::<Request>(&encode_body(&r)).unwrap(), r);
        }
        let resps = vec![
            Response::Reply {
                id: 1,
                answer: Answer::Done,
            },
            Response::Reply {
                id: 2,
                answer: Answer::Records(vec![entry(), entry()]),
            },
            Response::Reply {
                id: 3,
                answer: Answer::Handles {
                    handles: vec![HandleCount {
                        handle: h("x"),
                        receivers: 2,
                    }],
                    total: 5,
                },
            },
            Response::Reply {
                id: 4,
                answer: Answer::Status(Status {
                    version: "0.1.0".into(),
                    uptime_s: 5,
                    connections: 1,
                    registrations: 2,
                    handles: 3,
                    watches: 4,
                    lease_ms: 10_000,
                }),
            },
            Response::Added {
                handle: h("x"),
                entry: entry(),
            },
            Response::ServerAdded {
                handle: h("x"),
                entry: entry(),
            },
            Response::ServerRemoved {
                handle: h("x"),
                receiver: ReceiverId([9; 16]),
            },
        ];
        for r in resps {
            assert_eq!(decode_body::<Response>(&encode_body(&r)).unwrap(), r);
        }
    }

    /// Round-trips pseudo-random messages through frames, plain and sealed.
    #[test]
    fn random_messages_round_trip() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let handle = |n: u64| {
            let len = 1 + (n % 40) as usize;
            let s: String = (0..len)
                .map(|i| char::from(b'a' + ((n >> (i % 8)) as u8 % 26)))
                .collect();
            h(&s)
        };
        for sealed in [false, true] {
            let (mut enc, mut dec) = frames(sealed);
            let mut codec = CodecV1::new(1 << 20);
            for _ in 0..500 {
                let r = next();
                let e = Entry {
                    endpoint: if r % 2 == 0 {
                        SocketAddr::from(((r as u32).to_be_bytes(), (r >> 32) as u16))
                    } else {
                        SocketAddr::from(((r as u128).to_be_bytes(), (r >> 40) as u16))
                    },
                    receiver: ReceiverId((r as u128 * 31).to_be_bytes()),
                    pid: (r % 3 != 0).then_some((r >> 8) as u32),
                    version: (r >> 16) as u16,
                    since_ms: r >> 3,
                };
                let op = match r % 13 {
                    0 => Op::Register {
                        handle: handle(r),
                        entry: e.clone(),
                        lease_ms: (r >> 24) as u32,
                    },
                    1 => Op::Unregister {
                        handle: handle(r),
                        receiver: e.receiver,
                    },
                    2 => Op::KeepAlive,
                    3 => Op::Lookup { handle: handle(r) },
                    4 => Op::Watch { handle: handle(r) },
                    5 => Op::Unwatch { handle: handle(r) },
                    6 => Op::List,
                    7 => Op::Status,
                    8 => Op::RegisterServer {
                        handle: handle(r),
                        entry: e.clone(),
                        lease_ms: (r >> 24) as u32,
                    },
                    9 => Op::LookupServers { handle: handle(r) },
                    10 => Op::WatchServers { handle: handle(r) },
                    11 => Op::UnwatchServers { handle: handle(r) },
                    _ => Op::ListServers,
                };
                let req = Request {
                    id: (r >> 5) as u32,
                    op,
                };
                let resp = Response::Reply {
                    id: r as u32,
                    answer: Answer::Records(vec![e; (r % 50) as usize]),
                };
                let mut wire = BytesMut::new();
                enc.encode(&req, &mut wire);
                enc.encode(&resp, &mut wire);
                let f = codec.decode(&mut wire).unwrap().unwrap();
                assert_eq!(dec.decode::<Request>(f).unwrap(), req);
                let f = codec.decode(&mut wire).unwrap().unwrap();
                assert_eq!(dec.decode::<Response>(f).unwrap(), resp);
                assert!(wire.is_empty());
            }
        }
    }

    #[test]
    fn rejects_bad_bodies() {
        // unknown op
        assert!(matches!(
            decode_body::<Request>(&[0x01, 0x7f]),
            Err(EpmDecodeError::Message(_))
        ));
        // truncated
        assert!(decode_body::<Request>(&[0x01, 0x03, 0x05, b'a']).is_err());
        // trailing byte
        assert_eq!(
            decode_body::<Request>(&[0x01, 0x02, 0x00]),
            Err(EpmDecodeError::Trailing(1))
        );
        // invalid handle: contains '/'
        assert!(decode_body::<Request>(&[0x01, 0x03, 0x03, b'a', b'/', b'b']).is_err());
        // empty handle
        assert!(decode_body::<Request>(&[0x01, 0x03, 0x00]).is_err());
        // not UTF-8
        assert!(decode_body::<Request>(&[0x01, 0x03, 0x01, 0xff]).is_err());
        // a huge announced vector length does not allocate: it fails on the short body
        assert!(
            decode_body::<Response>(&[0x00, 0x01, 0x02, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err()
        );
        // empty
        assert!(decode_body::<Request>(&[]).is_err());
    }

    fn frames(sealed: bool) -> (FrameEncoder, FrameDecoder) {
        if sealed {
            let k = Key::from_bytes([5; 32]);
            let s = SessionKeys::derive(&k, b"h", &[1; 32], &ReceiverId([2; 16]), &[3; 32]);
            (
                FrameEncoder::new(Some(Sealer::new(&s.c2s))),
                FrameDecoder::new(Some(Sealer::new(&s.c2s)), 1 << 20),
            )
        } else {
            (FrameEncoder::new(None), FrameDecoder::new(None, 1 << 20))
        }
    }

    #[test]
    fn frames_round_trip_plain_sealed_and_compressed_byte_at_a_time() {
        for sealed in [false, true] {
            let (mut enc, mut dec) = frames(sealed);
            let big = Response::Reply {
                id: 9,
                answer: Answer::Records(vec![entry(); 100]),
            };
            let small = Response::Removed {
                handle: h("h"),
                receiver: ReceiverId([1; 16]),
            };
            let mut wire = BytesMut::new();
            enc.encode(&big, &mut wire);
            enc.encode(&small, &mut wire);
            // the big one was compressed well below its plain size
            assert!(wire.len() < encode_body(&big).len() / 2, "{}", wire.len());
            let mut codec = CodecV1::new(1 << 20);
            let mut src = BytesMut::new();
            let mut got = Vec::new();
            for b in wire.iter() {
                src.extend_from_slice(&[*b]);
                while let Some(f) = codec.decode(&mut src).unwrap() {
                    got.push(dec.decode::<Response>(f).unwrap());
                }
            }
            assert_eq!(got, vec![big.clone(), small.clone()]);
        }
    }

    #[test]
    fn pinned_plain_frame() {
        let (mut enc, _) = frames(false);
        let mut wire = BytesMut::new();
        enc.encode(
            &Request {
                id: 1,
                op: Op::Status,
            },
            &mut wire,
        );
        // len 12 | Data | flags 0 | seq 1 | id 01 | Status 07
        assert_eq!(
            hex::encode(&wire),
            concat!("0000000c", "10", "00", "0000000000000001", "0107")
        );
    }

    #[test]
    fn frame_reject_paths() {
        let mut codec = CodecV1::new(1 << 20);
        // replayed frame
        let (mut enc, mut dec) = frames(true);
        let mut wire = BytesMut::new();
        enc.encode(
            &Request {
                id: 1,
                op: Op::List,
            },
            &mut wire,
        );
        let f = codec.decode(&mut wire.clone()).unwrap().unwrap();
        dec.decode::<Request>(f.clone()).unwrap();
        assert!(matches!(
            dec.decode::<Request>(f),
            Err(EpmDecodeError::Frame(DecodeError::OutOfOrder { .. }))
        ));
        // plain frame on a sealed connection
        let (_, mut dec) = frames(true);
        let (mut plain, _) = frames(false);
        let mut wire = BytesMut::new();
        plain.encode(
            &Request {
                id: 1,
                op: Op::List,
            },
            &mut wire,
        );
        let f = codec.decode(&mut wire).unwrap().unwrap();
        assert!(dec.decode::<Request>(f).is_err());
        // sealed frame on a plain connection
        let (mut sealed, _) = frames(true);
        let (_, mut dec) = frames(false);
        let mut wire = BytesMut::new();
        sealed.encode(
            &Request {
                id: 1,
                op: Op::List,
            },
            &mut wire,
        );
        let f = codec.decode(&mut wire).unwrap().unwrap();
        assert_eq!(
            dec.decode::<Request>(f),
            Err(EpmDecodeError::Frame(DecodeError::SealMismatch))
        );
        // wrong kind
        let mut wire = BytesMut::new();
        put_frame(&mut wire, Kind::Ack, Flags(0), 1, &[0; 8]);
        let f = codec.decode(&mut wire).unwrap().unwrap();
        assert!(FrameDecoder::new(None, 100).decode::<Request>(f).is_err());
        // gzip bomb past the cap
        let bomb = gzip(&vec![0u8; 1 << 20], 9).unwrap();
        let mut wire = BytesMut::new();
        put_frame(&mut wire, Kind::Data, Flags(Flags::COMPRESSED), 1, &bomb);
        let f = codec.decode(&mut wire).unwrap().unwrap();
        assert!(matches!(
            FrameDecoder::new(None, 4096).decode::<Request>(f),
            Err(EpmDecodeError::Frame(DecodeError::InflateTooLarge { .. }))
        ));
    }
}
