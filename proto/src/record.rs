//! One receiver's registration, as the registries store it and the EPM hands it out,
//! and its JSON form (the local registry's file contents).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::endpoint::{Endpoint, Transport};
use crate::handle::Handle;
use crate::ids::ReceiverId;

/// One receiver's registration: where to reach it and who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The handle the receiver serves.
    pub handle: Handle,
    /// Where it accepts connections, one endpoint per transport (never empty): a TCP
    /// address, a Unix socket, or both.
    pub endpoints: Vec<Endpoint>,
    /// Its identity, checked again in the handshake.
    pub receiver: ReceiverId,
    /// Process id of the receiving process, when known.
    pub pid: Option<u32>,
    /// Protocol version it speaks.
    pub version: u16,
    /// When it registered, in milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// What answers at the endpoints: a receiver of events or a server of calls.
    pub role: Role,
}

/// What a registration stands for. Receivers and servers share the handle names but
/// not the registrations: a sender reaches only receivers, a client only servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Role {
    /// A receiver of events (`Data` frames), as every registration was before calls.
    #[default]
    Receiver,
    /// A server of calls (`Request` frames).
    Server,
}

impl Role {
    /// `receiver` or `server`, as the JSON form writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Receiver => "receiver",
            Role::Server => "server",
        }
    }
}

#[derive(Serialize, Deserialize)]
struct RecordFile {
    version: u16,
    handle: String,
    /// The TCP endpoint as bare `ip:port`, for readers older than `endpoints`; absent
    /// when the receiver has no TCP endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
    /// Every endpoint in its text form (`tcp://...`, `unix://...`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    endpoints: Vec<String>,
    receiver: String,
    pid: Option<u32>,
    since_ms: u64,
    /// `server` for a server of calls; absent (a receiver) otherwise, so readers older
    /// than calls read receivers' records unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<String>,
}

impl Record {
    /// A record of this protocol version for a receiver in process `pid` (if known)
    /// that registered at `since_ms` (milliseconds since the Unix epoch).
    pub fn new(
        handle: Handle,
        endpoints: Vec<Endpoint>,
        receiver: ReceiverId,
        pid: Option<u32>,
        since_ms: u64,
    ) -> Record {
        Record {
            handle,
            endpoints,
            receiver,
            pid,
            version: crate::frame::VERSION,
            since_ms,
            role: Role::Receiver,
        }
    }

    /// The same record for a server of calls (or a receiver).
    pub fn with_role(self, role: Role) -> Record {
        Record { role, ..self }
    }

    /// Its endpoint over `transport`, if it has one.
    pub fn endpoint(&self, transport: Transport) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.transport() == transport)
    }

    /// Its TCP address, if it has one.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.endpoints.iter().find_map(Endpoint::tcp_addr)
    }

    /// The record as pretty-printed JSON, as the local registry stores it.
    pub fn to_json(&self) -> Vec<u8> {
        let f = RecordFile {
            version: self.version,
            handle: self.handle.to_string(),
            endpoint: self.tcp_addr().map(|a| a.to_string()),
            endpoints: self.endpoints.iter().map(Endpoint::to_string).collect(),
            receiver: self.receiver.to_string(),
            pid: self.pid,
            since_ms: self.since_ms,
            role: match self.role {
                Role::Receiver => None,
                Role::Server => Some("server".into()),
            },
        };
        // Serializing plain strings and integers cannot fail.
        serde_json::to_vec_pretty(&f).unwrap_or_default()
    }

    /// Parses the JSON form; `None` when it is not a valid record. Records written
    /// before `endpoints` existed (only `endpoint`, bare `ip:port`) are read as one TCP
    /// endpoint; an entry of `endpoints` that does not parse (a transport this version
    /// does not know) is skipped, and a record left with no endpoint is not valid.
    pub fn from_json(bytes: &[u8]) -> Option<Record> {
        let f: RecordFile = serde_json::from_slice(bytes).ok()?;
        let endpoints: Vec<Endpoint> = if f.endpoints.is_empty() {
            vec![Endpoint::Tcp(f.endpoint?.parse().ok()?)]
        } else {
            f.endpoints.iter().filter_map(|e| e.parse().ok()).collect()
        };
        if endpoints.is_empty() {
            return None;
        }
        // A role this version does not know is not a registration it may use.
        let role = match f.role.as_deref() {
            None | Some("receiver") => Role::Receiver,
            Some("server") => Role::Server,
            Some(_) => return None,
        };
        Some(Record {
            handle: Handle::new(f.handle).ok()?,
            endpoints,
            receiver: ReceiverId::from_hex(&f.receiver)?,
            pid: f.pid,
            version: f.version,
            since_ms: f.since_ms,
            role,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let r = Record::new(
            Handle::new("a.b").unwrap(),
            vec![
                "127.0.0.1:4000".parse().unwrap(),
                "unix:///run/x/s/1.sock".parse().unwrap(),
            ],
            ReceiverId([3; 16]),
            Some(42),
            1_700_000_000_000,
        );
        assert_eq!(Record::from_json(&r.to_json()), Some(r.clone()));
        assert_eq!(r.tcp_addr(), Some("127.0.0.1:4000".parse().unwrap()));
        let json: serde_json::Value = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(json["endpoint"], "127.0.0.1:4000");
        assert_eq!(json["endpoints"][1], "unix:///run/x/s/1.sock");
        let unix_only = Record {
            endpoints: vec![r.endpoints[1].clone()],
            ..r
        };
        let json: serde_json::Value = serde_json::from_slice(&unix_only.to_json()).unwrap();
        assert!(json.get("endpoint").is_none(), "{json}");
        assert_eq!(Record::from_json(&unix_only.to_json()), Some(unix_only));
        assert_eq!(Record::from_json(b"{}"), None);
        assert_eq!(Record::from_json(b"not json"), None);
    }

    #[test]
    fn old_records_and_unknown_transports() {
        let old = br#"{"version":1,"handle":"a.b","endpoint":"127.0.0.1:4000",
            "receiver":"03030303030303030303030303030303","pid":7,"since_ms":5}"#;
        let r = Record::from_json(old).unwrap();
        assert_eq!(r.endpoints, vec!["tcp://127.0.0.1:4000".parse().unwrap()]);
        let future = br#"{"version":1,"handle":"a.b","endpoints":["quic://x","unix:///s"],
            "receiver":"03030303030303030303030303030303","pid":7,"since_ms":5}"#;
        let r = Record::from_json(future).unwrap();
        assert_eq!(r.endpoints, vec![Endpoint::unix("/s")]);
        let none = br#"{"version":1,"handle":"a.b","endpoints":["quic://x"],
            "receiver":"03030303030303030303030303030303","pid":7,"since_ms":5}"#;
        assert_eq!(Record::from_json(none), None);
    }

    #[test]
    fn servers_say_their_role_and_unknown_roles_are_not_trusted() {
        let r = Record::new(
            Handle::new("calc").unwrap(),
            vec!["127.0.0.1:4000".parse().unwrap()],
            ReceiverId([3; 16]),
            None,
            5,
        );
        let json: serde_json::Value = serde_json::from_slice(&r.to_json()).unwrap();
        assert!(
            json.get("role").is_none(),
            "receivers write no role: {json}"
        );
        let s = r.with_role(Role::Server);
        let json: serde_json::Value = serde_json::from_slice(&s.to_json()).unwrap();
        assert_eq!(json["role"], "server");
        assert_eq!(Record::from_json(&s.to_json()), Some(s));
        let odd = br#"{"version":1,"handle":"a.b","endpoints":["unix:///s"],"role":"agent",
            "receiver":"03030303030303030303030303030303","pid":7,"since_ms":5}"#;
        assert_eq!(Record::from_json(odd), None);
    }
}
