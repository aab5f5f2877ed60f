//! Where a receiver (or any accepting side) can be reached: a typed endpoint with one
//! text form.
//!
//! | text form | endpoint |
//! |---|---|
//! | `tcp://127.0.0.1:4000`, `tcp://[::1]:4000` | TCP |
//! | `127.0.0.1:4000`, `[::1]:4000` (bare) | TCP, the form of older records and flags |
//! | `unix:///run/user/1000/ipcbus/s/ab12.sock` | a Unix domain socket at an absolute path |
//!
//! [`Endpoint`]'s `Display` always writes the scheme, so its text form parses back to
//! the same value.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

/// The byte stream an endpoint is reached over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// TCP, on this host or across the network.
    Tcp,
    /// A Unix domain socket (stream), on this host only.
    Unix,
}

impl Transport {
    /// The scheme of the text form, which is also the transport's name in reports and
    /// JSON: `tcp` or `unix`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Unix => "unix",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Transport {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Transport, EndpointError> {
        match s {
            "tcp" => Ok(Transport::Tcp),
            "unix" => Ok(Transport::Unix),
            other => Err(EndpointError::UnknownScheme(other.to_string())),
        }
    }
}

/// A typed endpoint: a TCP socket address or the path of a Unix domain socket.
///
/// ```
/// use ipcbus_proto::endpoint::{Endpoint, Transport};
///
/// let tcp: Endpoint = "127.0.0.1:4000".parse()?; // bare ip:port is TCP
/// assert_eq!(tcp.to_string(), "tcp://127.0.0.1:4000");
/// let v6: Endpoint = "tcp://[::1]:4000".parse()?;
/// assert_eq!(v6.transport(), Transport::Tcp);
/// let unix: Endpoint = "unix:///run/user/1000/ipcbus/s/x.sock".parse()?;
/// assert_eq!(unix.unix_path().unwrap().to_str(), Some("/run/user/1000/ipcbus/s/x.sock"));
/// assert!("unix://relative.sock".parse::<Endpoint>().is_err());
/// # Ok::<(), ipcbus_proto::endpoint::EndpointError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    /// A TCP listener.
    Tcp(SocketAddr),
    /// A Unix domain socket (stream) at this absolute path. Shared, so copies of an
    /// endpoint (reports, events) cost a reference count, not an allocation.
    Unix(Arc<Path>),
}

/// Why a text is not an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// The text is empty.
    #[error("empty endpoint: write tcp://HOST:PORT, unix:///PATH or IP:PORT")]
    Empty,
    /// A scheme other than `tcp` and `unix`.
    #[error("unknown transport {0:?}: write tcp://IP:PORT or unix:///PATH")]
    UnknownScheme(String),
    /// Not an IP address and port (`127.0.0.1:4000`, `[::1]:4000`).
    #[error("{0:?} is not IP:PORT (for example 127.0.0.1:4000 or [::1]:4000)")]
    BadSocketAddr(String),
    /// A Unix socket path that is not absolute.
    #[error("unix socket path {0:?} is not absolute: write unix:///full/path.sock")]
    RelativePath(String),
    /// A NUL byte, which no socket path may contain.
    #[error("unix socket path contains a NUL byte")]
    NulInPath,
}

impl Endpoint {
    /// A Unix-socket endpoint at `path` (not checked: see [`FromStr`] for the checked
    /// form).
    pub fn unix(path: impl AsRef<Path>) -> Endpoint {
        Endpoint::Unix(Arc::from(path.as_ref()))
    }

    /// The transport it is reached over.
    pub fn transport(&self) -> Transport {
        match self {
            Endpoint::Tcp(_) => Transport::Tcp,
            Endpoint::Unix(_) => Transport::Unix,
        }
    }

    /// The TCP address, for a TCP endpoint.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Endpoint::Tcp(a) => Some(*a),
            Endpoint::Unix(_) => None,
        }
    }

    /// The socket path, for a Unix endpoint.
    pub fn unix_path(&self) -> Option<&Path> {
        match self {
            Endpoint::Tcp(_) => None,
            Endpoint::Unix(p) => Some(p),
        }
    }

    /// Whether it can only be on this host: a Unix socket, or TCP at a loopback
    /// address.
    pub fn is_local(&self) -> bool {
        match self {
            Endpoint::Tcp(a) => a.ip().is_loopback(),
            Endpoint::Unix(_) => true,
        }
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Endpoint {
        Endpoint::Tcp(a)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Endpoint, EndpointError> {
        if s.is_empty() {
            return Err(EndpointError::Empty);
        }
        let Some((scheme, rest)) = s.split_once("://") else {
            return s
                .parse::<SocketAddr>()
                .map(Endpoint::Tcp)
                .map_err(|_| EndpointError::BadSocketAddr(s.to_string()));
        };
        match scheme.parse::<Transport>()? {
            Transport::Tcp => rest
                .parse::<SocketAddr>()
                .map(Endpoint::Tcp)
                .map_err(|_| EndpointError::BadSocketAddr(rest.to_string())),
            Transport::Unix => {
                if rest.contains('\0') {
                    return Err(EndpointError::NulInPath);
                }
                if !rest.starts_with('/') {
                    return Err(EndpointError::RelativePath(rest.to_string()));
                }
                Ok(Endpoint::unix(rest))
            }
        }
    }
}

impl serde::Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Endpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Endpoint, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> Result<Endpoint, EndpointError> {
        s.parse()
    }

    #[test]
    fn text_forms_round_trip() {
        for s in [
            "tcp://127.0.0.1:4000",
            "tcp://[::1]:4000",
            "tcp://[fe80::1%2]:9",
            "unix:///run/user/1000/ipcbus/s/x.sock",
            "unix:///a b/é.sock",
        ] {
            let e = ep(s).unwrap();
            assert_eq!(e.to_string(), s);
            assert_eq!(ep(&e.to_string()).unwrap(), e);
        }
    }

    #[test]
    fn bare_addresses_are_tcp() {
        let e = ep("127.0.0.1:4000").unwrap();
        assert_eq!(e, Endpoint::Tcp("127.0.0.1:4000".parse().unwrap()));
        assert_eq!(e.transport(), Transport::Tcp);
        assert!(e.is_local());
        assert_eq!(ep("[::1]:7").unwrap().to_string(), "tcp://[::1]:7");
        assert!(!ep("10.0.0.2:7").unwrap().is_local());
    }

    #[test]
    fn bad_forms_are_named() {
        assert_eq!(ep(""), Err(EndpointError::Empty));
        assert_eq!(
            ep("http://1.2.3.4:5"),
            Err(EndpointError::UnknownScheme("http".into()))
        );
        assert_eq!(
            ep("tcp://localhost:5"),
            Err(EndpointError::BadSocketAddr("localhost:5".into()))
        );
        assert_eq!(
            ep("tcp://1.2.3.4"),
            Err(EndpointError::BadSocketAddr("1.2.3.4".into()))
        );
        assert_eq!(
            ep("1.2.3.4:99999"),
            Err(EndpointError::BadSocketAddr("1.2.3.4:99999".into()))
        );
        assert_eq!(
            ep("unix://x.sock"),
            Err(EndpointError::RelativePath("x.sock".into()))
        );
        assert_eq!(ep("unix://"), Err(EndpointError::RelativePath("".into())));
        assert_eq!(ep("unix:///a\0b"), Err(EndpointError::NulInPath));
        assert!(ep("unix:///x").unwrap().is_local());
    }

    #[test]
    fn serde_uses_the_text_form() {
        let e = ep("unix:///tmp/x.sock").unwrap();
        let j = serde_json::to_string(&e).unwrap();
        assert_eq!(j, "\"unix:///tmp/x.sock\"");
        assert_eq!(serde_json::from_str::<Endpoint>(&j).unwrap(), e);
        assert!(serde_json::from_str::<Endpoint>("\"ftp://x\"").is_err());
    }
}
