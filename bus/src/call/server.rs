//! [`Server`]: binds like a receiver, registers with the role "server", accepts
//! connections through the same gate and handshake, and serves their requests with
//! a [`Service`] or hands them to the application.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::conn::{self, Handler, Target};
use super::{Peer, RemoteError, Request, Service, CURRENT_PEER};
use crate::discovery::{Announcement, Discovery};
use crate::gate::{Acceptor, HandshakeGate, HandshakeSlot, Incoming};
use crate::handshake;
use crate::receiver::{BindError, Receiver, ReceiverBuilder};
use crate::registry::record_now;
use crate::security::{Resolved, Security};
use crate::transport::{ByteStream, Endpoint, Listener, SocketFile, Transport};
use ipcbus_proto::call::Code;
use ipcbus_proto::handle::Handle;
use ipcbus_proto::ids::{ReceiverId, SenderId};
use ipcbus_proto::record::Role;

type Factory = Arc<dyn Fn(&Peer) -> Arc<dyn Service> + Send + Sync>;

/// Configures and binds a [`Server`].
#[derive(Clone)]
pub struct ServerBuilder {
    handle: Handle,
    /// Binding, security and discovery are a receiver's.
    listen: ReceiverBuilder,
    factory: Option<Factory>,
    concurrency: usize,
    max_in_flight: usize,
}

impl fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("handle", &self.handle)
            .field("listen", &self.listen)
            .field("service", &self.factory.is_some())
            .field("concurrency", &self.concurrency)
            .field("max_in_flight", &self.max_in_flight)
            .finish()
    }
}

impl ServerBuilder {
    /// The discovery back end it registers in (default: [`Discovery::from_env`]).
    pub fn discovery(self, d: Discovery) -> Self {
        ServerBuilder {
            listen: self.listen.discovery(d),
            ..self
        }
    }

    /// The transports to listen on (as [`ReceiverBuilder::transports`](crate::ReceiverBuilder::transports)).
    pub fn transports(self, transports: impl IntoIterator<Item = Transport>) -> Self {
        ServerBuilder {
            listen: self.listen.transports(transports),
            ..self
        }
    }

    /// Listens at `endpoint` (as [`ReceiverBuilder::bind_at`](crate::ReceiverBuilder::bind_at)).
    pub fn bind_at(self, endpoint: Endpoint) -> Self {
        ServerBuilder {
            listen: self.listen.bind_at(endpoint),
            ..self
        }
    }

    /// Security (default: from the environment, else the local-user secret).
    pub fn security(self, security: Security) -> Self {
        ServerBuilder {
            listen: self.listen.security(security),
            ..self
        }
    }

    /// Shorthand for `security(Security::Encrypt(key))`.
    pub fn key(self, key: crate::Key) -> Self {
        self.security(Security::Encrypt(key))
    }

    /// The address to bind and register (as [`ReceiverBuilder::ip`](crate::ReceiverBuilder::ip)).
    pub fn ip(self, ip: std::net::IpAddr) -> Self {
        ServerBuilder {
            listen: self.listen.ip(ip),
            ..self
        }
    }

    /// Ports to try in order (as [`ReceiverBuilder::allowed_ports`](crate::ReceiverBuilder::allowed_ports)).
    pub fn allowed_ports(self, ports: impl IntoIterator<Item = u16>) -> Self {
        ServerBuilder {
            listen: self.listen.allowed_ports(ports),
            ..self
        }
    }

    /// Most client connections served at once (default 256).
    pub fn max_connections(self, n: usize) -> Self {
        ServerBuilder {
            listen: self.listen.max_connections(n),
            ..self
        }
    }

    /// Time a connecting client has to finish the handshake (default 5 s).
    pub fn handshake_timeout(self, d: Duration) -> Self {
        ServerBuilder {
            listen: self.listen.handshake_timeout(d),
            ..self
        }
    }

    /// Largest frame accepted and sent (default 16 MiB).
    pub fn max_frame_len(self, n: usize) -> Self {
        ServerBuilder {
            listen: self.listen.max_frame_len(n),
            ..self
        }
    }

    /// Serves every request with `service`: the requests do not appear on the
    /// server's stream.
    pub fn service<S: Service>(self, service: S) -> Self {
        let service: Arc<dyn Service> = Arc::new(service);
        ServerBuilder {
            factory: Some(Arc::new(move |_: &Peer| service.clone())),
            ..self
        }
    }

    /// Serves each connection with its own instance, made by `factory` for the
    /// connection's [`Peer`] when it opens and dropped when it closes.
    pub fn service_factory<S, F>(self, factory: F) -> Self
    where
        S: Service,
        F: Fn(&Peer) -> S + Send + Sync + 'static,
    {
        ServerBuilder {
            factory: Some(Arc::new(move |p: &Peer| {
                Arc::new(factory(p)) as Arc<dyn Service>
            })),
            ..self
        }
    }

    /// Calls of one connection running at once (default 256); past it, and past
    /// [`ServerBuilder::max_in_flight`], a call is answered [`RemoteCode::Busy`](super::RemoteCode::Busy).
    pub fn concurrency(self, per_connection: usize) -> Self {
        ServerBuilder {
            concurrency: per_connection.max(1),
            ..self
        }
    }

    /// Calls running at once in all (default 4096).
    pub fn max_in_flight(self, n: usize) -> Self {
        ServerBuilder {
            max_in_flight: n.max(1),
            ..self
        }
    }

    /// Binds, registers, and starts accepting calls.
    ///
    /// # Errors
    /// [`BindError`], as for a receiver (with the EPM as discovery,
    /// [`EpmError::ServersUnsupported`](crate::EpmError::ServersUnsupported) from an endpoint manager
    /// older than call servers).
    pub async fn bind(self) -> Result<Server, BindError> {
        let l = self.listen.listen().await?;
        let (max_frame, handshake_timeout, max_connections) = self.listen.limits();
        let (tx, rx) = mpsc::channel(self.max_in_flight);
        let shutdown = CancellationToken::new();
        let accepting = shutdown.child_token();
        let tasks = TaskTracker::new();
        let global = Arc::new(Semaphore::new(self.max_in_flight));
        let target = match self.factory {
            Some(f) => Kind::Service(f),
            None => Kind::Queue(tx),
        };
        let shared = Arc::new(Shared {
            handle: self.handle.clone(),
            id: l.id,
            sec: l.sec,
            max_frame,
            handshake_timeout,
            shutdown: shutdown.clone(),
            accepting: accepting.clone(),
            tasks: tasks.clone(),
            conn_limit: Arc::new(Semaphore::new(max_connections)),
            half_open: HandshakeGate::new((max_connections / 4).clamp(1, 64)),
            target,
            concurrency: self.concurrency,
            global: global.clone(),
        });
        let mut sockets = Vec::new();
        for mut listener in l.listeners {
            sockets.extend(listener.take_socket_file());
            tasks.spawn(accept_loop(listener, shared.clone()));
        }
        drop(shared);
        let record =
            record_now(self.handle.clone(), l.endpoints.clone(), l.id).with_role(Role::Server);
        let registration = match l.discovery.register(&record).await {
            Ok(r) => r,
            Err(e) => {
                shutdown.cancel();
                return Err(e.into());
            }
        };
        tracing::debug!(handle = %self.handle, endpoints = ?l.endpoints, server = %l.id, "server registered");
        Ok(Server {
            handle: self.handle,
            id: l.id,
            endpoints: l.endpoints,
            sockets,
            rx,
            registration: Some(registration),
            shutdown,
            accepting,
            tasks,
            global,
            max_in_flight: self.max_in_flight,
        })
    }
}

/// How long [`Server::close`] lets the calls running finish.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The answer to a request a closing server will not run.
pub(crate) fn closing() -> RemoteError {
    RemoteError {
        code: Code::Busy,
        message: "the server is closing".into(),
        detail: bytes::Bytes::new(),
    }
}

/// Where a server's requests go.
enum Kind {
    Service(Factory),
    Queue(mpsc::Sender<Request>),
}

struct Shared {
    handle: Handle,
    id: ReceiverId,
    sec: Resolved,
    max_frame: usize,
    handshake_timeout: Duration,
    shutdown: CancellationToken,
    /// Cancelled to stop accepting (on close, before the connections end).
    accepting: CancellationToken,
    tasks: TaskTracker,
    conn_limit: Arc<Semaphore>,
    half_open: HandshakeGate,
    target: Kind,
    concurrency: usize,
    global: Arc<Semaphore>,
}

async fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    let acceptor = Acceptor::new(
        listener,
        shared.half_open.clone(),
        shared.conn_limit.clone(),
    );
    while let Some(incoming) = acceptor.next(&shared.accepting).await {
        match incoming {
            Incoming::WrongUser(peer) => {
                tracing::warn!(%peer, handle = %shared.handle, "unix socket peer runs as another user; refused before the handshake");
            }
            Incoming::Busy { peer, .. } => {
                tracing::warn!(%peer, handle = %shared.handle, "connection limit reached; closing new connection");
            }
            Incoming::Admitted {
                stream,
                peer,
                slot,
                permit,
                evicted,
            } => {
                if evicted {
                    tracing::warn!(%peer, handle = %shared.handle, "too many unfinished handshakes; evicted the oldest");
                }
                let s = shared.clone();
                shared.tasks.spawn(async move {
                    serve(stream, peer, s, slot).await;
                    drop(permit);
                });
            }
        }
    }
}

async fn serve(
    sock: ByteStream,
    peer: crate::transport::Peer,
    shared: Arc<Shared>,
    slot: HandshakeSlot,
) {
    let remote = match &peer {
        crate::transport::Peer::Tcp(a) => !a.ip().to_canonical().is_loopback(),
        crate::transport::Peer::Unix { .. } => false,
    };
    let hs = tokio::select! {
        _ = slot.evicted() => {
            tracing::warn!(%peer, handle = %shared.handle, "handshake evicted by newer connections; closed");
            return;
        }
        r = tokio::time::timeout(
            shared.handshake_timeout,
            handshake::accept(sock, &shared.handle, shared.id, &shared.sec, shared.max_frame),
        ) => r,
    };
    drop(slot);
    let (est, client): (_, SenderId) = match hs {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::warn!(%peer, handle = %shared.handle, error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, handle = %shared.handle, "handshake timed out");
            return;
        }
    };
    tracing::debug!(%peer, handle = %shared.handle, %client, "client connected");
    let (c, handler_tx) = conn::start(
        est,
        client,
        format!("{peer} (client {client})"),
        shared.shutdown.child_token(),
        shared.max_frame,
        remote,
    );
    let p = Peer { conn: c.clone() };
    let target = match &shared.target {
        Kind::Service(f) => match std::panic::catch_unwind(AssertUnwindSafe(|| f(&p))) {
            Ok(s) => Target::Service(s),
            Err(_) => {
                tracing::warn!(%peer, handle = %shared.handle, "the service factory panicked; connection closed");
                c.close("the service factory panicked");
                return;
            }
        },
        Kind::Queue(tx) => Target::Queue(tx.clone()),
    };
    let _ = handler_tx.send(Handler {
        target,
        per_conn: Arc::new(Semaphore::new(shared.concurrency)),
        global: shared.global.clone(),
    });
    drop(p);
    c.closed().await;
}

/// A bound, registered server: a [`Stream`] of [`Request`]s (unless a
/// [`Service`] takes them), or [`Server::serve`] with a handler. Dropping it
/// unregisters and closes its connections.
///
/// A server and a client in one program, over a registry in a temporary directory:
///
/// ```
/// use ipcbus::{Client, Discovery, Server};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = std::env::temp_dir().join(format!("ipcbus-doc-calls-{}", std::process::id()));
/// let server = Server::builder("docs.calc".parse()?)
///     .discovery(Discovery::local_at(&dir)?)
///     .bind()
///     .await?;
/// tokio::spawn(server.serve(
///     |req| async move {
///         let (a, b): (i32, i32) = match req.decode() {
///             Ok(v) => v,
///             Err(e) => {
///                 let _ = req.reply_err(ipcbus::RemoteError::bad_request(e));
///                 return;
///             }
///         };
///         let _ = req.reply(&(a + b));
///     },
///     16,
/// ));
/// let client = Client::builder("docs.calc".parse()?)
///     .discovery(Discovery::local_at(&dir)?)
///     .build()
///     .await?;
/// let sum: i32 = client.call(&(2, 3)).await?.decode()?;
/// assert_eq!(sum, 5);
/// # let _ = std::fs::remove_dir_all(&dir);
/// # Ok(()) }
/// ```
pub struct Server {
    handle: Handle,
    id: ReceiverId,
    endpoints: Vec<Endpoint>,
    sockets: Vec<SocketFile>,
    rx: mpsc::Receiver<Request>,
    registration: Option<Announcement>,
    shutdown: CancellationToken,
    accepting: CancellationToken,
    tasks: TaskTracker,
    /// Permits of the requests running; all back when none runs.
    global: Arc<Semaphore>,
    max_in_flight: usize,
}

impl Server {
    /// A builder for a server of `handle`.
    pub fn builder(handle: Handle) -> ServerBuilder {
        ServerBuilder {
            listen: Receiver::builder(handle.clone()),
            handle,
            factory: None,
            concurrency: 256,
            max_in_flight: 4096,
        }
    }

    /// Runs `handler` on every request, at most `concurrency` at once, until the
    /// server is closed. A handler that panics answers [`RemoteCode::Panicked`](super::RemoteCode::Panicked) and
    /// the server goes on. A call its caller gives up on (timeout, dropped future)
    /// stops its handler task.
    ///
    /// # Cancel safety
    /// Dropping the future drops the server: it stops taking requests and
    /// unregisters; handler tasks already running are not waited for.
    pub async fn serve<F, Fut>(mut self, handler: F, concurrency: usize)
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let limit = Arc::new(Semaphore::new(concurrency.max(1)));
        let handler = Arc::new(handler);
        while let Some(mut req) = self.next_request().await {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                break;
            };
            let flag = Arc::new(AtomicBool::new(false));
            req.panicked = Some(flag.clone());
            let peer = req.peer().clone();
            let (id, answers) = (req.wire.id, !req.is_one_way());
            let h = handler.clone();
            let conn = peer.conn.clone();
            // A Cancel from the caller aborts the task (dropping the request).
            conn.spawn_handler(
                id,
                answers,
                self.tasks.track_future(async move {
                    let _permit = permit;
                    let run = CatchPanic {
                        inner: Some(Box::pin(async move { h(req).await })),
                        flag,
                    };
                    CURRENT_PEER.scope(peer, run).await;
                }),
            );
        }
    }

    /// The next request (`None` once closed). Requests taken this way are not
    /// stopped when their caller gives up: use [`Request::time_left`], or
    /// [`Server::serve`] (whose handler tasks are stopped).
    ///
    /// # Cancel safety
    /// Cancel safe: a request is only taken when this resolves.
    pub async fn next_request(&mut self) -> Option<Request> {
        futures::future::poll_fn(|cx| self.poll_request(cx)).await
    }

    fn poll_request(&mut self, cx: &mut Context<'_>) -> Poll<Option<Request>> {
        loop {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(mut r)) => {
                    if r.expired() {
                        let _ = r.answer(Err(RemoteError {
                            code: Code::DeadlineExceeded,
                            message: "the caller's deadline passed before the request was taken"
                                .into(),
                            detail: bytes::Bytes::new(),
                        }));
                        continue;
                    }
                    return Poll::Ready(Some(r));
                }
                other => return other,
            }
        }
    }

    /// Its endpoints, as registered.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Its TCP address, if it listens on TCP.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.endpoints.iter().find_map(Endpoint::tcp_addr)
    }

    /// Its id (as registered).
    pub fn id(&self) -> ReceiverId {
        self.id
    }

    /// The handle.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Unregisters, stops accepting, lets calls running finish (bounded), closes.
    pub async fn close(mut self) {
        if let Some(r) = self.registration.take() {
            r.close().await;
        }
        self.accepting.cancel();
        self.sockets.clear();
        // Requests not taken yet did not run: say so (busy), rather than no reply.
        self.rx.close();
        while let Ok(mut r) = self.rx.try_recv() {
            let _ = r.answer(Err(closing()));
        }
        // Let the calls running finish, for a while.
        let end = tokio::time::Instant::now() + CLOSE_GRACE;
        while self.global.available_permits() < self.max_in_flight
            && tokio::time::Instant::now() < end
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.shutdown.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
    }
}

impl Stream for Server {
    type Item = Request;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Request>> {
        self.get_mut().poll_request(cx)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.registration.take();
        self.shutdown.cancel();
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("handle", &self.handle)
            .field("id", &self.id)
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

/// Runs a handler's future; when it panics, raises `flag` and drops the future at
/// once, so the [`Request`] it holds answers `Panicked`.
struct CatchPanic<F> {
    inner: Option<Pin<Box<F>>>,
    flag: Arc<AtomicBool>,
}

impl<F: Future<Output = ()>> Future for CatchPanic<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(f) = self.inner.as_mut() else {
            return Poll::Ready(());
        };
        match std::panic::catch_unwind(AssertUnwindSafe(|| f.as_mut().poll(cx))) {
            Ok(p) => {
                if p.is_ready() {
                    self.inner = None;
                }
                p
            }
            Err(_) => {
                self.flag.store(true, Ordering::Release);
                self.inner = None;
                Poll::Ready(())
            }
        }
    }
}
