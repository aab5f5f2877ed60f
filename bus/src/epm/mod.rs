//! The client of the endpoint manager (EPM) service `epm-service`, for discovery
//! across a host's users or a LAN.
//!
//! - [`Epm`]: where the EPM is and how to authenticate; cheap to clone, handed to
//!   [`Discovery::Epm`](crate::Discovery::Epm) or the builders' `epm` methods.
//! - [`EpmClient`]: one open connection, with typed requests (register, lookup,
//!   watch, list, status).
//! - `link`: the framed, optionally sealed connection both the client and the daemon
//!   use.
//! - `session`: the background tasks that keep a receiver (or a server of calls)
//!   registered and a sender's (or a client's) watch alive across EPM restarts, with
//!   jittered exponential backoff.
//!
//! Not run as a test: it needs an `epm-service` listening at `epm.lan:4455`
//! (`tests/tests/epm.rs` runs the same steps against a real one).
//!
//! ```no_run
//! use ipcbus::{Epm, Handle, Receiver, Sender};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let epm = Epm::connect("epm.lan:4455").await?;
//! let h: Handle = "orders".parse()?;
//! let mut rx = Receiver::builder(h.clone()).epm(epm.clone()).bind().await?;
//! let mut tx = Sender::builder(h).epm(epm).build().await?;
//! tx.send_bytes("hello").await?;
//! # Ok(()) }
//! ```

mod client;
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod link;
#[cfg(not(feature = "internals"))]
#[allow(unreachable_pub, dead_code)]
pub(crate) mod link;
pub(crate) mod session;

pub use client::{EpmClient, WatchEvent};

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::credentials::{Credentials, CredentialsError};
use crate::handshake::HandshakeError;
use crate::registry::Record;
use ipcbus_proto::crypto::Key;
use ipcbus_proto::epm::{EpmDecodeError, ErrorCode, HandleCount, Status, DEFAULT_EPM_MAX_FRAME};
use ipcbus_proto::handle::Handle;

/// Why talking to the EPM failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EpmError {
    /// The EPM address could not be resolved.
    #[error("cannot resolve epm address {addr:?}: {source}")]
    Resolve {
        /// The address as given.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The EPM could not be reached (nothing listens there, no route, refused).
    #[error("cannot connect to the epm at {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The handshake with the EPM failed: wrong password or salt, a password on one
    /// side only, or the peer is not an EPM.
    #[error("epm handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    /// The EPM did not answer in time.
    #[error("the epm did not answer in time")]
    Timeout,
    /// The EPM closed the connection.
    #[error("the epm closed the connection")]
    Closed,
    /// The connection failed after the handshake.
    #[error("epm connection: {0}")]
    Io(std::io::Error),
    /// The EPM sent bytes that are not a valid message.
    #[error("epm protocol error: {0}")]
    Protocol(#[from] EpmDecodeError),
    /// The EPM answered with something that does not fit the request.
    #[error("epm protocol error: unexpected answer")]
    UnexpectedAnswer,
    /// Too many watch events arrived while waiting for a reply.
    #[error("too many watch events buffered; dropping the connection")]
    TooManyEvents,
    /// The EPM refused the request.
    #[error("the epm refused the request: {code}: {text}")]
    Refused {
        /// Machine-readable reason.
        code: ErrorCode,
        /// The EPM's detail.
        text: String,
    },
    /// The password or salt in the environment is unusable: unreadable file,
    /// malformed salt, one without the other.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// The address (`IPCBUS_EPM`) is not `HOST[:PORT]`.
    #[error(transparent)]
    Address(#[from] EpmAddrError),
    /// The EPM closed the connection on a server-of-calls request after answering the
    /// request before it: it predates servers (it cannot decode the request).
    #[error("this endpoint manager does not support call servers; upgrade epm-service")]
    ServersUnsupported,
    /// A receiver with no TCP endpoint asked to register: the EPM serves discovery
    /// across hosts and carries TCP endpoints only.
    #[error("the epm registers tcp endpoints only, and this receiver has none: bind tcp too, or use the local registry for unix sockets")]
    NoTcpEndpoint,
}

impl From<link::RecvError> for EpmError {
    fn from(e: link::RecvError) -> Self {
        match e {
            link::RecvError::Io(e) => EpmError::Io(e),
            link::RecvError::Decode(e) => EpmError::Protocol(e),
        }
    }
}

impl EpmError {
    /// Whether the failure means the keys differ (wrong password or salt, or a
    /// password on one side only).
    pub fn is_auth_failure(&self) -> bool {
        matches!(self, EpmError::Handshake(h) if h.is_auth_failure())
    }
}

/// Where the EPM is and how to talk to it. Cheap to clone.
///
/// Each [`Receiver`](crate::Receiver) and [`Sender`](crate::Sender) using it holds its
/// own connection, so a receiver's registration lives exactly as long as the
/// receiver.
#[derive(Debug, Clone)]
pub struct Epm {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Every address, comma-separated (for messages).
    addr: String,
    /// The addresses, in the order given; several EPMs serving the same view.
    addrs: Vec<String>,
    /// The address that answered last: tried first.
    preferred: AtomicUsize,
    key: Option<Key>,
    timeout: Duration,
    lease: Duration,
    max_frame: usize,
}

/// Configures an [`Epm`].
#[derive(Debug, Clone)]
pub struct EpmBuilder {
    addrs: Vec<String>,
    key: Option<Key>,
    timeout: Duration,
    lease: Duration,
}

impl EpmBuilder {
    /// The key the EPM was started with (`Key::derive(password, salt)`). It also
    /// becomes the default key of receivers and senders that use this EPM.
    pub fn key(mut self, key: Key) -> Self {
        self.key = Some(key);
        self
    }

    /// Time allowed to connect, finish the handshake, and for each request
    /// (default 5 s).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d.max(Duration::from_millis(1));
        self
    }

    /// The lease receivers ask for (default: the EPM's, normally 10 s); they renew it
    /// four times per lease.
    pub fn lease(mut self, d: Duration) -> Self {
        self.lease = d;
        self
    }

    /// The `Epm` without contacting it (the first receiver or sender will).
    pub fn build(self) -> Epm {
        Epm {
            inner: Arc::new(Inner {
                addr: self.addrs.join(","),
                addrs: self.addrs,
                preferred: AtomicUsize::new(0),
                key: self.key,
                timeout: self.timeout,
                lease: self.lease,
                max_frame: DEFAULT_EPM_MAX_FRAME,
            }),
        }
    }

    /// Builds the `Epm` and checks that it answers with this key.
    ///
    /// # Errors
    /// [`EpmError`], e.g. `Connect` when nothing listens, `Handshake` for a wrong
    /// password.
    pub async fn connect(self) -> Result<Epm, EpmError> {
        let epm = self.build();
        epm.status().await?;
        Ok(epm)
    }
}

impl Epm {
    /// Starts configuring the EPM at `addr` (`host:port`; a bare host gets port 4455),
    /// or at several EPMs that serve the same view (`a:4455,b:4455`, see
    /// [`Epm::client`]). An address that does not parse is kept as given and fails
    /// when first used; use [`Epm::parse`] to catch it at once.
    pub fn builder(addr: impl Into<String>) -> EpmBuilder {
        let addr = addr.into();
        let addrs = addr
            .split(',')
            .map(|a| normalize_addr(a).unwrap_or_else(|_| a.trim().to_owned()))
            .collect();
        EpmBuilder {
            addrs,
            key: None,
            timeout: Duration::from_secs(5),
            lease: Duration::ZERO,
        }
    }

    /// Starts configuring the EPM at `addr` after checking its form: `HOST`,
    /// `HOST:PORT`, `IPv4:PORT`, `IPv6` or `[IPv6]:PORT` (a missing port is 4455), or
    /// a comma-separated list of them: several EPMs that serve the same view (sharing
    /// one store), tried in turn (see [`Epm::client`]).
    ///
    /// ```
    /// use ipcbus::Epm;
    /// assert_eq!(Epm::parse("epm.lan")?.build().addr(), "epm.lan:4455");
    /// let two = Epm::parse("epm1.lan,epm2.lan:9")?.build();
    /// assert_eq!(two.addrs(), ["epm1.lan:4455", "epm2.lan:9"]);
    /// assert!(Epm::parse("127.0.0.1:99999").is_err());
    /// assert!(Epm::parse("http://epm.lan:4455").is_err());
    /// assert!(Epm::parse("epm1.lan,").is_err());
    /// # Ok::<(), ipcbus::EpmAddrError>(())
    /// ```
    ///
    /// # Errors
    /// [`EpmAddrError`] naming the address and the part that is wrong.
    pub fn parse(addr: &str) -> Result<EpmBuilder, EpmAddrError> {
        let addrs = addr
            .split(',')
            .map(normalize_addr)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Epm::builder(addrs.join(",")))
    }

    /// The EPM at `addr` without a password, checked by one status request.
    ///
    /// # Errors
    /// As [`EpmBuilder::connect`].
    pub async fn connect(addr: impl Into<String>) -> Result<Epm, EpmError> {
        Epm::builder(addr).connect().await
    }

    /// The EPM named by the environment: `IPCBUS_EPM=host:port`, with the key from
    /// the password and salt of the environment ([`Credentials::from_env`]:
    /// `IPCBUS_PASSWORD_FILE` / `IPCBUS_PASSWORD` and `IPCBUS_SALT`, or the same
    /// names with `EPM_`) when set. `Ok(None)` when `IPCBUS_EPM` is unset or empty.
    ///
    /// # Errors
    /// [`EpmError::Credentials`] for an unreadable password file, a malformed salt,
    /// or a password without a salt (or the other way round).
    pub fn from_env() -> Result<Option<Epm>, EpmError> {
        let Some(addr) = std::env::var("IPCBUS_EPM")
            .ok()
            .filter(|v| !v.trim().is_empty())
        else {
            return Ok(None);
        };
        let mut b = Epm::parse(&addr)?;
        if let Some(key) = Credentials::from_env()?.key()? {
            b = b.key(key);
        }
        Ok(Some(b.build()))
    }

    /// The address as given (`host:port`; several are comma-separated).
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// The addresses, in the order given.
    pub fn addrs(&self) -> &[String] {
        &self.inner.addrs
    }

    /// The address tried first: the one that answered last.
    fn preferred(&self) -> (usize, &str) {
        let n = self.inner.addrs.len().max(1);
        let i = self.inner.preferred.load(Ordering::Relaxed) % n;
        (i, self.inner.addrs.get(i).map_or("", String::as_str))
    }

    /// The key, if any.
    pub fn key(&self) -> Option<&Key> {
        self.inner.key.as_ref()
    }

    pub(crate) fn lease(&self) -> Duration {
        self.inner.lease
    }

    /// Resolves the address tried first (the one that answered last; first result),
    /// or with several addresses the first after it that resolves.
    ///
    /// # Errors
    /// [`EpmError::Resolve`] of the last address tried.
    pub async fn resolve(&self) -> Result<SocketAddr, EpmError> {
        let (start, first) = self.preferred();
        let n = self.inner.addrs.len();
        let mut last = resolve(first).await;
        for k in 1..n {
            if last.is_ok() {
                break;
            }
            last = resolve(&self.inner.addrs[(start + k) % n]).await;
        }
        last
    }

    /// Opens a new connection to the EPM. With several addresses, the one that
    /// answered last is tried first, then the others in order; a wrong password is
    /// not tried elsewhere (the others have the same key).
    ///
    /// # Errors
    /// [`EpmError`] of the last address tried: resolve, connect, handshake or
    /// timeout.
    pub async fn client(&self) -> Result<EpmClient, EpmError> {
        let (start, _) = self.preferred();
        let n = self.inner.addrs.len();
        let mut last = EpmError::Address(EpmAddrError::Empty);
        for k in 0..n {
            let i = (start + k) % n;
            let addr = &self.inner.addrs[i];
            match self.client_at(addr).await {
                Ok(c) => {
                    if i != start {
                        self.inner.preferred.store(i, Ordering::Relaxed);
                        tracing::info!(epm = %addr, "using the epm at {addr}");
                    }
                    return Ok(c);
                }
                Err(e) if e.is_auth_failure() => return Err(e),
                Err(e) => {
                    if n > 1 {
                        tracing::debug!(epm = %addr, error = %e, "epm unavailable; trying the next");
                    }
                    last = e;
                }
            }
        }
        Err(last)
    }

    async fn client_at(&self, addr: &str) -> Result<EpmClient, EpmError> {
        let addr = resolve(addr).await?;
        let t = self.inner.timeout;
        let (r, w) = tokio::time::timeout(t, async {
            let sock = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|source| EpmError::Connect { addr, source })?;
            Ok::<_, EpmError>(
                link::connect(sock, self.inner.key.as_ref(), self.inner.max_frame).await?,
            )
        })
        .await
        .map_err(|_| EpmError::Timeout)??;
        Ok(EpmClient::new(r, w, t))
    }
    /// The EPM's figures (one short connection).
    ///
    /// # Errors
    /// [`EpmError`].
    pub async fn status(&self) -> Result<Status, EpmError> {
        let mut c = self.client().await?;
        let s = c.status().await;
        c.close().await;
        s
    }

    /// Every handle with its receiver count, and the total number of handles.
    ///
    /// # Errors
    /// [`EpmError`].
    pub async fn list(&self) -> Result<(Vec<HandleCount>, u32), EpmError> {
        let mut c = self.client().await?;
        let s = c.list().await;
        c.close().await;
        s
    }

    /// The receivers registered for `handle` now.
    ///
    /// # Errors
    /// [`EpmError`].
    pub async fn lookup(&self, handle: &Handle) -> Result<Vec<Record>, EpmError> {
        let mut c = self.client().await?;
        let s = c.lookup(handle).await;
        c.close().await;
        s
    }

    /// The servers of calls registered for `handle` now.
    ///
    /// # Errors
    /// [`EpmError`]; [`EpmError::ServersUnsupported`] when the EPM predates servers.
    pub async fn lookup_servers(&self, handle: &Handle) -> Result<Vec<Record>, EpmError> {
        let mut c = self.client().await?;
        let s = c.lookup_servers(handle).await;
        c.close().await;
        s
    }

    /// The address of this host's interface that routes to the EPM: what a receiver
    /// registers when it was given no address. Loopback only if the EPM is on
    /// loopback. No packet is sent: a UDP socket is connected, which only picks a
    /// route.
    ///
    /// # Errors
    /// [`EpmError::Resolve`], or [`EpmError::Connect`] when there is no route.
    pub async fn route_ip(&self) -> Result<IpAddr, EpmError> {
        let addr = self.resolve().await?;
        if addr.ip().is_loopback() {
            return Ok(addr.ip());
        }
        let any: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = tokio::net::UdpSocket::bind(any)
            .await
            .map_err(|source| EpmError::Connect { addr, source })?;
        sock.connect(addr)
            .await
            .map_err(|source| EpmError::Connect { addr, source })?;
        let ip = sock
            .local_addr()
            .map_err(|source| EpmError::Connect { addr, source })?
            .ip();
        Ok(ip)
    }
}

/// Resolves `addr` (first result).
async fn resolve(addr: &str) -> Result<SocketAddr, EpmError> {
    let mut it = tokio::net::lookup_host(addr)
        .await
        .map_err(|source| EpmError::Resolve {
            addr: addr.to_owned(),
            source,
        })?;
    it.next().ok_or_else(|| EpmError::Resolve {
        addr: addr.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
    })
}

/// Why an EPM address is not `HOST[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EpmAddrError {
    /// Nothing was given.
    #[error("the epm address is empty: write HOST or HOST:PORT")]
    Empty,
    /// A URL such as `http://host:4455`.
    #[error("epm address {0:?} has a scheme: write HOST:PORT, without {1}://")]
    Scheme(String, String),
    /// The port part is not a number from 1 to 65535.
    #[error("epm address {addr:?}: {port:?} is not a port (1-65535)")]
    BadPort {
        /// The address as given.
        addr: String,
        /// The port part.
        port: String,
    },
    /// Some other part is malformed (a path, a space, an unclosed `[`).
    #[error("epm address {0:?} is not HOST, HOST:PORT or [IPv6]:PORT")]
    Malformed(String),
}

/// `addr` with the default port added when it has none, after checking its form.
fn normalize_addr(addr: &str) -> Result<String, EpmAddrError> {
    let a = addr.trim();
    if a.is_empty() {
        return Err(EpmAddrError::Empty);
    }
    if let Some((scheme, _)) = a.split_once("://") {
        return Err(EpmAddrError::Scheme(a.to_owned(), scheme.to_owned()));
    }
    if a.contains(|c: char| c.is_whitespace() || c == '/' || c == '@') {
        return Err(EpmAddrError::Malformed(a.to_owned()));
    }
    let port_ok = |host: &str, port: &str| -> Result<String, EpmAddrError> {
        match port.parse::<u16>() {
            Ok(p) if p != 0 => Ok(format!("{host}:{p}")),
            _ => Err(EpmAddrError::BadPort {
                addr: a.to_owned(),
                port: port.to_owned(),
            }),
        }
    };
    let default = ipcbus_proto::epm::DEFAULT_PORT;
    if let Ok(IpAddr::V6(v6)) = a.parse::<IpAddr>() {
        return Ok(format!("[{v6}]:{default}"));
    }
    match split_host_port(a) {
        None => Err(EpmAddrError::Malformed(a.to_owned())),
        Some((host, Some(port))) => port_ok(&host, port),
        Some((host, None)) => Ok(format!("{host}:{default}")),
    }
}

/// `HOST[:PORT]` split into the host (an IPv6 address kept in its brackets) and the
/// port's text, if any; `None` when malformed: an unclosed `[`, not an IPv6 address
/// inside the brackets, something after them other than `:PORT`, an empty host, or
/// colons in a host without brackets. The EPM's and etcd's address checks share it.
pub(crate) fn split_host_port(s: &str) -> Option<(String, Option<&str>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, tail) = rest.split_once(']')?;
        ip.parse::<std::net::Ipv6Addr>().ok()?;
        return match tail.strip_prefix(':') {
            Some(port) => Some((format!("[{ip}]"), Some(port))),
            None if tail.is_empty() => Some((format!("[{ip}]"), None)),
            None => None,
        };
    }
    match s.rsplit_once(':') {
        Some((host, _)) if host.is_empty() || host.contains(':') => None,
        Some((host, port)) => Some((host.to_owned(), Some(port))),
        None => Some((s.to_owned(), None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_port_is_added() {
        assert_eq!(Epm::builder("epm.lan").build().addr(), "epm.lan:4455");
        assert_eq!(Epm::builder("epm.lan:9").build().addr(), "epm.lan:9");
        assert_eq!(Epm::builder("10.0.0.1").build().addr(), "10.0.0.1:4455");
        assert_eq!(Epm::builder("[::1]:7").build().addr(), "[::1]:7");
        assert_eq!(Epm::builder("::1").build().addr(), "[::1]:4455");
        assert_eq!(Epm::builder("[::1]").build().addr(), "[::1]:4455");
    }

    #[test]
    fn bad_addresses_name_the_bad_part() {
        let e = Epm::parse("127.0.0.1:99999").unwrap_err();
        assert_eq!(
            e,
            EpmAddrError::BadPort {
                addr: "127.0.0.1:99999".into(),
                port: "99999".into()
            }
        );
        assert!(e.to_string().contains("\"99999\" is not a port"), "{e}");
        let e = Epm::parse("http://h:4455").unwrap_err();
        assert!(e.to_string().contains("http://"), "{e}");
        for bad in [
            "", " ", "h:", ":4455", "h:0", "h:x", "[::1", "[zz]:1", "a b", "h/x", "[::1]x",
        ] {
            assert!(Epm::parse(bad).is_err(), "{bad:?}");
        }
        for (good, norm) in [
            ("h", "h:4455"),
            ("10.0.0.1:9", "10.0.0.1:9"),
            ("[::1]:7", "[::1]:7"),
        ] {
            assert_eq!(Epm::parse(good).unwrap().build().addr(), norm);
        }
    }
}
