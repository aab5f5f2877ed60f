//! Discovery in etcd: receivers put their record under a lease they keep alive,
//! senders read a handle's prefix and watch it from that revision.
//!
//! - [`Etcd`]: where the cluster is (one or more `http://host:port` endpoints), the
//!   key prefix (default `/ipcbus/`), the user and password, the lease; cheap to
//!   clone, handed to [`Discovery::Etcd`](crate::Discovery::Etcd) or the builders'
//!   `etcd` methods. Clones share one gRPC connection to the cluster.
//! - `keys`: the key layout and the watcher's view, without I/O.
//! - `session`: the background tasks that keep a receiver's lease alive (putting the
//!   record again under a new lease if it expired) and a sender's watch going
//!   (resuming from the last revision seen, re-reading the prefix if that revision
//!   was compacted), with jittered exponential backoff while etcd is away.
//! - `store` (`internals` feature): etcd as the endpoint manager's store: one
//!   EPM's registrations under one lease it keeps, and a watch of every handle's.
//!
//! The layout and the value format are in `docs/PROTOCOL.md` (*Registrations in
//! etcd*). Not run as a test: it needs an etcd at `etcd.lan:2379`
//! (`tests/tests/etcd.rs` runs the same steps against a real one).
//!
//! ```no_run
//! use ipcbus::{Etcd, Handle, Receiver, Sender};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let etcd = Etcd::parse("http://etcd.lan:2379")?.connect().await?;
//! let h: Handle = "orders".parse()?;
//! let mut rx = Receiver::builder(h.clone()).etcd(etcd.clone()).bind().await?;
//! let mut tx = Sender::builder(h).etcd(etcd).build().await?;
//! tx.send_bytes("hello").await?;
//! # Ok(()) }
//! ```

mod keys;
pub(crate) mod session;
#[cfg(feature = "internals")]
pub(crate) mod store;

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};
use tokio::sync::OnceCell;

use crate::credentials::{Credentials, CredentialsError};
use crate::registry::Record;
use ipcbus_proto::crypto::Key;
use ipcbus_proto::handle::Handle;

pub(crate) use keys::Layout;

/// The port an endpoint without one gets (etcd's client port).
pub const DEFAULT_ETCD_PORT: u16 = 2379;
/// The lease a receiver's record is attached to, unless set with
/// [`EtcdBuilder::lease`]: a receiver that dies without closing is gone from every
/// sender's view at most this long after. It is renewed every third of it, so two
/// renewals may be lost before it runs out.
pub const DEFAULT_ETCD_LEASE: Duration = Duration::from_secs(10);

/// Why talking to etcd failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdError {
    /// No endpoint answered in time, or the connection failed: etcd is down, not
    /// listening there, or unreachable.
    #[error("etcd at {endpoints} is unavailable ({op}): {source}")]
    Unavailable {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// What was being done.
        op: &'static str,
        /// The cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// etcd refused the user and password, or the user may not use the prefix.
    #[error("etcd at {endpoints} refused access ({op}): {source}")]
    Denied {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// What was being done.
        op: &'static str,
        /// etcd's answer.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// etcd answered with an error for another reason (too many requests, a value
    /// too large, an internal error).
    #[error("etcd at {endpoints} failed a request ({op}): {source}")]
    Request {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// What was being done.
        op: &'static str,
        /// etcd's answer.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The endpoints (`IPCBUS_ETCD`, `--etcd`) are malformed.
    #[error(transparent)]
    Address(#[from] EtcdAddrError),
    /// Both `IPCBUS_EPM` and `IPCBUS_ETCD` are set: the discovery back end is
    /// ambiguous.
    #[error("IPCBUS_EPM and IPCBUS_ETCD are both set: unset one of them (discovery uses either the epm or etcd)")]
    BothConfigured,
    /// The password or salt in the environment is unusable.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// The CA certificate file of `IPCBUS_ETCD_CA` cannot be read.
    #[error("cannot read the etcd CA certificate {path:?} (IPCBUS_ETCD_CA): {source}")]
    Ca {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Why an etcd endpoint list is not `http[s]://HOST[:PORT][,http[s]://HOST[:PORT]...]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdAddrError {
    /// Nothing was given (or an empty item between commas).
    #[error("the etcd endpoint list is empty or has an empty item: write http://HOST:PORT[,http://HOST:PORT]")]
    Empty,
    /// An endpoint without `http://` or `https://` (the latter needs the `etcd-tls`
    /// feature, on by default), or with another scheme.
    #[error("etcd endpoint {0:?} must start with http:// or https://")]
    Scheme(String),
    /// The port is not a number from 1 to 65535.
    #[error("etcd endpoint {url:?}: {port:?} is not a port (1-65535)")]
    BadPort {
        /// The endpoint as given.
        url: String,
        /// The port part.
        port: String,
    },
    /// Another part is malformed (a path, user info, a space, an unclosed `[`).
    #[error("etcd endpoint {0:?} is not http://HOST[:PORT]")]
    Malformed(String),
}

/// Where the etcd cluster is and how to use it. Cheap to clone; clones share one
/// connection, opened on first use.
#[derive(Clone)]
pub struct Etcd {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<String>,
    layout: Layout,
    user: Option<(String, String)>,
    key: Option<Key>,
    lease: Duration,
    timeout: Duration,
    tls: Option<Tls>,
    client: OnceCell<Client>,
}

/// TLS settings: the CA that signed the members' certificates, and an optional
/// client certificate and key (for etcd's `--client-cert-auth`), all PEM.
#[derive(Clone)]
#[cfg_attr(not(feature = "etcd-tls"), allow(dead_code))]
struct Tls {
    ca: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for Etcd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.inner.endpoints)
            .field("prefix", &self.inner.layout.prefix())
            .field("user", &self.inner.user.as_ref().map(|(u, _)| u))
            .field("lease", &self.inner.lease)
            .finish_non_exhaustive()
    }
}

/// Configures an [`Etcd`].
#[derive(Clone)]
pub struct EtcdBuilder {
    endpoints: Vec<String>,
    prefix: String,
    user: Option<(String, String)>,
    key: Option<Key>,
    lease: Duration,
    timeout: Duration,
    tls: Option<Tls>,
}

impl fmt::Debug for EtcdBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdBuilder")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

impl EtcdBuilder {
    /// The key prefix every record is under (default `/ipcbus/`; a missing leading
    /// or trailing `/` is added). Receivers and senders must use the same one.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The etcd user and password (etcd's authentication; default none).
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((name.into(), password.into()));
        self
    }

    /// The key of the data connections (`Key::derive(password, salt)`): with it,
    /// receivers and senders that use this etcd and set no security encrypt every
    /// event under it (the default without it is `Open`).
    pub fn key(mut self, key: Key) -> Self {
        self.key = Some(key);
        self
    }

    /// The lease of a receiver's record (default 10 s, whole seconds, at least 1 s;
    /// etcd may grant more, its minimum being about 1.5 election timeouts).
    pub fn lease(mut self, d: Duration) -> Self {
        self.lease = d.max(Duration::from_secs(1));
        self
    }

    /// Talks to etcd over TLS (`https://` endpoints), trusting the CA certificate
    /// `ca_pem` (PEM) to have signed the members' certificates. Without it, `https://`
    /// endpoints fail to connect (there is no default trust store).
    ///
    /// ```
    /// # let ca_pem = b"-----BEGIN CERTIFICATE-----...".to_vec();
    /// let etcd = ipcbus::Etcd::parse("https://etcd.lan:2379")?.tls(ca_pem).build();
    /// assert_eq!(etcd.endpoints(), ["https://etcd.lan:2379"]);
    /// # Ok::<(), ipcbus::EtcdAddrError>(())
    /// ```
    pub fn tls(mut self, ca_pem: impl Into<Vec<u8>>) -> Self {
        let identity = self.tls.take().and_then(|t| t.identity);
        self.tls = Some(Tls {
            ca: ca_pem.into(),
            identity,
        });
        self
    }

    /// [`tls`](Self::tls) with the CA certificate in the PEM file named by
    /// `IPCBUS_ETCD_CA`, when that variable is set and not empty (what
    /// [`Etcd::from_env`] and the command line use).
    ///
    /// # Errors
    /// [`EtcdError::Ca`] when the file cannot be read.
    pub fn ca_from_env(self) -> Result<Self, EtcdError> {
        let Some(path) = std::env::var_os("IPCBUS_ETCD_CA").filter(|v| !v.is_empty()) else {
            return Ok(self);
        };
        let path = std::path::PathBuf::from(path);
        match std::fs::read(&path) {
            Ok(pem) => Ok(self.tls(pem)),
            Err(source) => Err(EtcdError::Ca { path, source }),
        }
    }

    /// A client certificate and its key (PEM), for an etcd started with
    /// `--client-cert-auth`; takes effect with [`tls`](Self::tls).
    pub fn tls_identity(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        let id = Some((cert_pem.into(), key_pem.into()));
        match &mut self.tls {
            Some(t) => t.identity = id,
            None => {
                self.tls = Some(Tls {
                    ca: Vec::new(),
                    identity: id,
                })
            }
        }
        self
    }

    /// Time allowed to connect and for each request (default 5 s).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d.max(Duration::from_millis(10));
        self
    }

    /// The `Etcd` without contacting it (the first receiver or sender will).
    pub fn build(self) -> Etcd {
        Etcd {
            inner: Arc::new(Inner {
                endpoints: self.endpoints,
                layout: Layout::new(&self.prefix),
                user: self.user,
                key: self.key,
                lease: self.lease,
                timeout: self.timeout,
                tls: self.tls,
                client: OnceCell::new(),
            }),
        }
    }

    /// Builds the `Etcd` and checks that the cluster answers (one status request).
    ///
    /// # Errors
    /// [`EtcdError::Unavailable`] when no endpoint answers in time,
    /// [`EtcdError::Denied`] for a wrong user or password.
    pub async fn connect(self) -> Result<Etcd, EtcdError> {
        let etcd = self.build();
        let c = etcd.client().await?;
        etcd.retry("status", &c, |mut c| async move { c.status().await })
            .await?;
        Ok(etcd)
    }
}

impl Etcd {
    /// Starts configuring the cluster at `endpoints`, each `http://host:port`, taken
    /// as given (they are checked when first used); use [`Etcd::parse`] to check
    /// them at once.
    pub fn builder<I, S>(endpoints: I) -> EtcdBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        EtcdBuilder {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: keys::DEFAULT_PREFIX.to_owned(),
            user: None,
            key: None,
            lease: DEFAULT_ETCD_LEASE,
            timeout: Duration::from_secs(5),
            tls: None,
        }
    }

    /// Starts configuring the cluster at a comma-separated list of endpoints, each
    /// `http://HOST[:PORT]` (port 2379 when left out), after checking their form.
    ///
    /// ```
    /// use ipcbus::Etcd;
    /// let etcd = Etcd::parse("http://10.0.0.1:2379,http://etcd2.lan")?.build();
    /// assert_eq!(etcd.endpoints(), ["http://10.0.0.1:2379", "http://etcd2.lan:2379"]);
    /// assert_eq!(etcd.prefix(), "/ipcbus/");
    /// assert!(Etcd::parse("10.0.0.1:2379").is_err()); // no scheme
    /// assert!(Etcd::parse("http://h:99999").is_err());
    /// # Ok::<(), ipcbus::EtcdAddrError>(())
    /// ```
    ///
    /// # Errors
    /// [`EtcdAddrError`] naming the endpoint and the part that is wrong.
    pub fn parse(endpoints: &str) -> Result<EtcdBuilder, EtcdAddrError> {
        let list = endpoints
            .split(',')
            .map(normalize_endpoint)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Etcd::builder(list))
    }

    /// The cluster named by the environment: `IPCBUS_ETCD=http://host:2379[,...]`,
    /// with the data connections' key from the environment's password and salt (as
    /// [`Credentials::from_env`]) when set, and for `https://` endpoints the CA
    /// certificate in the PEM file `IPCBUS_ETCD_CA`. `Ok(None)` when `IPCBUS_ETCD` is
    /// unset or empty.
    ///
    /// # Errors
    /// [`EtcdError::Address`] for malformed endpoints, [`EtcdError::Ca`] for an
    /// unreadable CA file, [`EtcdError::Credentials`] as [`Credentials::key`].
    pub fn from_env() -> Result<Option<Etcd>, EtcdError> {
        let Some(urls) = std::env::var("IPCBUS_ETCD")
            .ok()
            .filter(|v| !v.trim().is_empty())
        else {
            return Ok(None);
        };
        let mut b = Etcd::parse(&urls)?.ca_from_env()?;
        if let Some(key) = Credentials::from_env()?.key()? {
            b = b.key(key);
        }
        Ok(Some(b.build()))
    }

    /// The endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// The key prefix, with its leading and trailing `/`.
    pub fn prefix(&self) -> &str {
        self.inner.layout.prefix()
    }

    /// The data connections' key, if any.
    pub fn key(&self) -> Option<&Key> {
        self.inner.key.as_ref()
    }

    /// The lease receivers ask for.
    pub fn lease(&self) -> Duration {
        self.inner.lease
    }

    pub(crate) fn layout(&self) -> &Layout {
        &self.inner.layout
    }

    fn endpoint_list(&self) -> String {
        self.inner.endpoints.join(",")
    }

    /// The shared client, connected on first use. The connection itself is lazy
    /// (gRPC): failures show on the first request.
    pub(crate) async fn client(&self) -> Result<Client, EtcdError> {
        let c = self
            .inner
            .client
            .get_or_try_init(|| async {
                let mut o = ConnectOptions::new()
                    .with_connect_timeout(self.inner.timeout)
                    // A member that stops answering is noticed within 2 keep-alive
                    // periods even while a watch is idle.
                    .with_keep_alive(Duration::from_secs(2), self.inner.timeout)
                    .with_keep_alive_while_idle(true)
                    // A member cut off from the leader ends its watches rather than
                    // serving a view that may be stale; they resume on another one.
                    .with_require_leader(true);
                if let Some((u, p)) = &self.inner.user {
                    // etcd's tokens expire (5 min idle by default): fetch a new one
                    // rather than fail every request after it.
                    o = o
                        .with_user(u.clone(), p.clone())
                        .with_auto_token_refresh(true);
                }
                o = self.with_tls(o)?;
                self.call(
                    "connect",
                    Client::connect(self.inner.endpoints.clone(), Some(o)),
                )
                .await
            })
            .await?;
        Ok(c.clone())
    }

    /// The TLS settings on the connect options (https endpoints only).
    #[cfg(feature = "etcd-tls")]
    fn with_tls(&self, o: ConnectOptions) -> Result<ConnectOptions, EtcdError> {
        use etcd_client::{Certificate, Identity, TlsOptions};
        let Some(tls) = &self.inner.tls else {
            return Ok(o);
        };
        let mut t = TlsOptions::new();
        if !tls.ca.is_empty() {
            t = t.ca_certificate(Certificate::from_pem(&tls.ca));
        }
        if let Some((cert, key)) = &tls.identity {
            t = t.identity(Identity::from_pem(cert, key));
        }
        Ok(o.with_tls(t))
    }

    #[cfg(not(feature = "etcd-tls"))]
    fn with_tls(&self, o: ConnectOptions) -> Result<ConnectOptions, EtcdError> {
        match self.inner.tls {
            None => Ok(o),
            Some(_) => Err(EtcdError::Address(EtcdAddrError::Scheme(
                self.endpoint_list(),
            ))),
        }
    }

    /// Runs one request with the timeout, naming `op` in the error.
    pub(crate) async fn call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        match tokio::time::timeout(self.inner.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error(op, e)),
            Err(_) => Err(self.no_answer(op)),
        }
    }

    /// Runs one request with the timeout, trying it again (after 50 ms, doubling up to
    /// 400 ms) while it fails for a reason another member or a moment may cure: a
    /// member that just went down, an election in progress. The first attempt gets
    /// 500 ms and each next one twice as long, so a request stuck on a member that
    /// waits for a new leader is soon tried again elsewhere while a slow etcd still
    /// gets the whole timeout. Gives up with the last error once the timeout has
    /// passed.
    /// Opens a watch of every key under `prefix` from the revision after `rev` (the
    /// last one seen), with progress notifications, retried as [`Etcd::retry`] does.
    pub(crate) async fn watch_prefix(
        &self,
        client: &Client,
        prefix: &str,
        rev: i64,
    ) -> Result<etcd_client::WatchStream, EtcdError> {
        let opts = etcd_client::WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev + 1)
            .with_progress_notify();
        self.retry("watch", client, |mut c| {
            let (prefix, opts) = (prefix.to_owned(), opts.clone());
            async move { c.watch(prefix, Some(opts)).await }
        })
        .await
    }

    pub(crate) async fn retry<T, F, Fut>(
        &self,
        op: &'static str,
        client: &Client,
        mut f: F,
    ) -> Result<T, EtcdError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        let mut pause = Duration::from_millis(50);
        let mut attempt = Duration::from_millis(500);
        loop {
            let until = deadline.min(tokio::time::Instant::now() + attempt);
            attempt *= 2;
            let err = match tokio::time::timeout_at(until, f(client.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => self.error(op, e),
                Err(_) => self.no_answer(op),
            };
            let transient = matches!(err, EtcdError::Unavailable { .. });
            if !transient || tokio::time::Instant::now() + pause >= deadline {
                return Err(err);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(400));
        }
    }

    fn no_answer(&self, op: &'static str) -> EtcdError {
        EtcdError::Unavailable {
            endpoints: self.endpoint_list(),
            op,
            source: format!("no answer within {:?}", self.inner.timeout).into(),
        }
    }

    /// Sorts an etcd client error into the variant that says what to do.
    pub(crate) fn error(&self, op: &'static str, e: etcd_client::Error) -> EtcdError {
        let endpoints = self.endpoint_list();
        let (code, source): (_, Box<dyn std::error::Error + Send + Sync>) = match &e {
            etcd_client::Error::GRpcStatus(s) => (
                Code::of(i32::from(s.code())),
                status_text(s.message(), std::error::Error::source(s)).into(),
            ),
            // Settings that cannot work (TLS options with http://, a URI that does
            // not parse): trying again does not help.
            etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => {
                (Code::Other, Box::new(e))
            }
            _ => (Code::Unavailable, Box::new(e)),
        };
        match code {
            Code::Denied => EtcdError::Denied {
                endpoints,
                op,
                source,
            },
            Code::Unavailable => EtcdError::Unavailable {
                endpoints,
                op,
                source,
            },
            Code::Other => EtcdError::Request {
                endpoints,
                op,
                source,
            },
        }
    }

    /// The receivers registered for `handle` now. Records that do not parse are
    /// skipped and logged.
    ///
    /// # Errors
    /// [`EtcdError`].
    pub async fn lookup(&self, handle: &Handle) -> Result<Vec<Record>, EtcdError> {
        self.read(self.layout().handle(handle)).await
    }

    /// Every receiver registered under the prefix, sorted by handle and then by
    /// registration time. Records that do not parse are skipped and logged.
    ///
    /// # Errors
    /// [`EtcdError`].
    pub async fn list(&self) -> Result<Vec<Record>, EtcdError> {
        let mut all = self.read(self.layout().all()).await?;
        all.sort_by(|a, b| a.handle.cmp(&b.handle).then(a.since_ms.cmp(&b.since_ms)));
        Ok(all)
    }

    async fn read(&self, prefix: String) -> Result<Vec<Record>, EtcdError> {
        let c = self.client().await?;
        let resp = self
            .retry("get", &c, |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let layout = self.layout();
        let mut out = Vec::with_capacity(resp.kvs().len());
        for kv in resp.kvs() {
            match layout.parse(kv.key(), kv.value()) {
                Ok(r) => out.push(r),
                Err(bad) => {
                    tracing::warn!(key = %String::from_utf8_lossy(kv.key()), reason = %bad, "skipping a record in etcd that does not parse")
                }
            }
        }
        Ok(out)
    }

    /// Registers `record` under a lease kept alive in the background until the
    /// returned registration is closed or dropped (what a
    /// [`Receiver`](crate::Receiver) does; for tools that announce receivers of
    /// their own).
    ///
    /// # Errors
    /// [`EtcdError`]: etcd unavailable, access denied.
    pub async fn register(&self, record: &Record) -> Result<EtcdRegistration, EtcdError> {
        session::register(self.clone(), record.clone()).await
    }

    /// The address of this host's interface that routes to the first endpoint: what
    /// a receiver registers when it was given no address. Loopback only if etcd is on
    /// loopback. No packet is sent.
    ///
    /// # Errors
    /// [`EtcdError::Unavailable`] when the host does not resolve or has no route.
    pub async fn route_ip(&self) -> Result<IpAddr, EtcdError> {
        let unavailable = |source: std::io::Error| EtcdError::Unavailable {
            endpoints: self.endpoint_list(),
            op: "route",
            source: Box::new(source),
        };
        let first = self
            .inner
            .endpoints
            .first()
            .map(|e| e.split_once("://").map_or(e.as_str(), |(_, r)| r))
            .unwrap_or_default();
        let addr = tokio::net::lookup_host(first)
            .await
            .map_err(unavailable)?
            .next()
            .ok_or_else(|| {
                unavailable(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no address",
                ))
            })?;
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
            .map_err(unavailable)?;
        sock.connect(addr).await.map_err(unavailable)?;
        Ok(sock.local_addr().map_err(unavailable)?.ip())
    }
}

pub use session::EtcdRegistration;

/// A gRPC status in one short line: etcd's message, then the innermost cause (the
/// transport's, e.g. `Connection refused`) when it adds something.
fn status_text(message: &str, mut source: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut root = None;
    while let Some(e) = source {
        root = Some(e.to_string());
        source = e.source();
    }
    match root {
        Some(r) if !message.contains(&r) => format!("{message}: {r}"),
        _ => message.to_owned(),
    }
}

/// gRPC status codes (numbers fixed by the gRPC spec), sorted the way
/// [`Etcd::error`] needs them without naming tonic's type.
#[derive(Debug, PartialEq, Eq)]
enum Code {
    Denied,
    Unavailable,
    Other,
}

impl Code {
    fn of(code: i32) -> Code {
        match code {
            7 | 16 => Code::Denied,          // PERMISSION_DENIED, UNAUTHENTICATED
            1 | 4 | 14 => Code::Unavailable, // CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE
            _ => Code::Other,
        }
    }
}

/// `http://HOST[:PORT]` with the default port added, after checking its form.
fn normalize_endpoint(url: &str) -> Result<String, EtcdAddrError> {
    let u = url.trim();
    if u.is_empty() {
        return Err(EtcdAddrError::Empty);
    }
    let (scheme, rest) = match u.split_once("://") {
        Some(("http", rest)) => ("http", rest),
        Some(("https", rest)) if cfg!(feature = "etcd-tls") => ("https", rest),
        _ => return Err(EtcdAddrError::Scheme(u.to_owned())),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains(|c: char| c.is_whitespace() || c == '/' || c == '@') {
        return Err(EtcdAddrError::Malformed(u.to_owned()));
    }
    let with_port = |host: &str, port: &str| -> Result<String, EtcdAddrError> {
        match port.parse::<u16>() {
            Ok(p) if p != 0 => Ok(format!("{scheme}://{host}:{p}")),
            _ => Err(EtcdAddrError::BadPort {
                url: u.to_owned(),
                port: port.to_owned(),
            }),
        }
    };
    match crate::epm::split_host_port(rest) {
        None => Err(EtcdAddrError::Malformed(u.to_owned())),
        Some((host, Some(port))) => with_port(&host, port),
        Some((host, None)) => Ok(format!("{scheme}://{host}:{DEFAULT_ETCD_PORT}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_and_get_the_default_port() {
        let e = Etcd::parse(" http://a:1 ,http://b,http://[::1]:7,http://[::1]")
            .unwrap()
            .build();
        assert_eq!(
            e.endpoints(),
            [
                "http://a:1",
                "http://b:2379",
                "http://[::1]:7",
                "http://[::1]:2379"
            ]
        );
        for bad in [
            "",
            "http://a,",
            "a:2379",
            "unix:///x",
            "http://",
            "http://a:0",
            "http://a:x",
            "http://a:99999",
            "http://u@a:1",
            "http://a:1/path",
            "http://[zz]:1",
            "http://[::1",
            "http://::1",
        ] {
            assert!(Etcd::parse(bad).is_err(), "{bad:?}");
        }
        let e = Etcd::parse("http://a:99999").unwrap_err();
        assert!(e.to_string().contains("\"99999\" is not a port"), "{e}");
        let e = Etcd::parse("a:2379").unwrap_err();
        assert!(e.to_string().contains("http://"), "{e}");
    }

    #[test]
    fn grpc_codes_are_sorted() {
        assert_eq!(Code::of(16), Code::Denied);
        assert_eq!(Code::of(7), Code::Denied);
        assert_eq!(Code::of(14), Code::Unavailable);
        assert_eq!(Code::of(3), Code::Other);
    }
}
