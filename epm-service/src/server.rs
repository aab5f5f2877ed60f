//! The async driver: accept loops, one task per connection (reader) plus its writer
//! task, the lease sweeper, and graceful shutdown.
//!
//! Every message to a client goes through that connection's bounded outbox and is
//! queued while the registry lock is held, so a watcher sees its snapshot before any
//! later change and in order. A client that does not read its outbox fast enough is
//! disconnected (it reconnects and gets a fresh snapshot): memory stays bounded.
//!
//! With an etcd store, every registration change here is also handed to the store's
//! writer (without waiting for etcd), and one more task applies the store's watch to
//! the registry under the same lock (see [`crate::store`]).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ipcbus::internals::etcd_store::{StoreEvent, StoreWriter};
use ipcbus::internals::link::{self, LinkWriter};
use ipcbus::internals::{
    Acceptor, ByteStream, HandshakeGate, HandshakeSlot, Incoming, Listener, Peer,
};
use ipcbus::{Handle, ReceiverId, RejectReason, Role};
use ipcbus_proto::epm::{Answer, Entry, ErrorCode, Op, Request, Response, Status};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::monitor::{HandleReport, RejectKind, Report, RequestKind, Stats, REPORT_MAX_RECEIVERS};
use crate::registry::{ConnId, Expired, Notice, Registered, Registry};
use crate::store::EtcdStore;

/// Messages queued per connection before it counts as too slow and is closed.
const OUTBOX: usize = 1024;
/// Refusals (`Busy`) being written at once; past it, excess connections are just
/// closed.
const MAX_REFUSING: usize = 64;
/// Connections that may be in their handshake at once; past it the oldest is evicted.
const HALF_OPEN: usize = 64;

/// Binds every address. One that fails while another binds is logged as a warning
/// and skipped (so `[::]` failing on a host without IPv6 does not stop `0.0.0.0`);
/// IPv6 sockets are IPv6-only so both families can share a port. Logs `listening on
/// ADDR` for each.
///
/// # Errors
/// When no address could be bound: one error naming each address and why it failed
/// (`cannot listen on 127.0.0.1:4455: Address already in use (os error 98)`), with
/// the kind of the last failure; nothing is logged then, the caller reports it.
pub fn bind_all(addrs: &[SocketAddr]) -> std::io::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    let mut failed = Vec::new();
    for &addr in addrs {
        match bind_one(addr) {
            Ok(l) => {
                let local = l.local_addr().unwrap_or(addr);
                tracing::info!("listening on {local}");
                out.push(l);
            }
            Err(e) => failed.push((addr, e)),
        }
    }
    if out.is_empty() {
        let Some(kind) = failed.last().map(|(_, e)| e.kind()) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no address to listen on",
            ));
        };
        let each: Vec<String> = failed.iter().map(|(a, e)| format!("{a}: {e}")).collect();
        return Err(std::io::Error::new(
            kind,
            format!("cannot listen on {}", each.join("; ")),
        ));
    }
    for (addr, e) in failed {
        tracing::warn!(%addr, error = %e, "cannot listen");
    }
    Ok(out)
}

fn bind_one(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

/// Serves on `listeners` until `shutdown` resolves, then closes every connection and
/// waits (at most 5 s) for the tasks to end.
pub async fn run(listeners: Vec<TcpListener>, config: Config, shutdown: impl Future) {
    run_with_http(listeners, None, config, shutdown).await;
}

/// As [`run`], and serves the HTTP monitoring endpoint on `http` (bound to
/// `config.http`'s address) under the same shutdown.
pub async fn run_with_http(
    listeners: Vec<TcpListener>,
    http: Option<TcpListener>,
    config: Config,
    shutdown: impl Future,
) {
    serve_with_store(listeners, http, None, config, shutdown).await;
}

/// As [`run_with_http`], keeping the registrations in `store` too (connected by
/// the caller, so that an etcd that is down is the caller's error): its snapshot is
/// applied before the first client is accepted.
pub async fn serve_with_store(
    listeners: Vec<TcpListener>,
    http: Option<TcpListener>,
    store: Option<EtcdStore>,
    config: Config,
    shutdown: impl Future,
) {
    let token = CancellationToken::new();
    let tasks = TaskTracker::new();
    let auth = config
        .http
        .as_ref()
        .map(|h| h.auth.clone())
        .unwrap_or_default();
    let shared = Arc::new(Shared::new(config, tasks.clone()));
    let mut store_cancel = None;
    if let Some(mut st) = store {
        shared.hub().store = Some(st.writer.clone());
        // The snapshot first, so the first client already sees every EPM's view.
        if let Ok(first) = st.events.try_recv() {
            apply_store(&shared, &st.writer, first);
        }
        tracing::info!(
            registrations = shared.hub().reg.store_registrations(),
            "etcd store read; following it"
        );
        store_cancel = Some((st.cancel.clone(), st.writer.clone()));
        tasks.spawn(follow_store(
            shared.clone(),
            st.writer,
            st.events,
            token.clone(),
        ));
    }
    if let Some(l) = http {
        tasks.spawn(crate::http::serve(
            l,
            auth,
            shared.clone(),
            token.clone(),
            tasks.clone(),
        ));
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        lease_ms = shared.config.lease.as_millis() as u64,
        authenticated = shared.config.key.is_some(),
        max_connections = shared.config.limits.max_connections,
        store = %shared.config.store,
        "epm-service started"
    );
    for l in listeners {
        tasks.spawn(accept_loop(l, shared.clone(), token.clone()));
    }
    tasks.spawn(sweep_leases(shared.clone(), token.clone()));
    shutdown.await;
    tracing::info!("shutting down");
    token.cancel();
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(5), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not close within 5 s");
    }
    if let Some((cancel, writer)) = store_cancel {
        // Revoking the lease deletes this EPM's records at once: the other EPMs
        // see its receivers go now, not at lease expiry.
        cancel.cancel();
        writer.close().await;
    }
    tracing::info!("stopped");
}

struct Shared {
    hub: Mutex<Hub>,
    conn_limit: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    /// Connections still in their handshake; the oldest is evicted when full.
    half_open: HandshakeGate,
    next_conn: AtomicU64,
    server_id: ReceiverId,
    started: Instant,
    expiry_changed: tokio::sync::Notify,
    config: Config,
    tasks: TaskTracker,
    stats: Arc<Stats>,
}

struct Hub {
    /// Receivers of events (`Register`, `Watch`, ...).
    reg: Registry,
    /// Servers of calls (`RegisterServer`, `WatchServers`, ...): a registry of their
    /// own, with the same limits, so a sender never sees a server nor a client a
    /// receiver. Its notices are turned into `ServerAdded` / `ServerRemoved`.
    servers: Registry,
    outboxes: HashMap<ConnId, Outbox>,
    stats: Arc<Stats>,
    /// The etcd store's writer, with `--store etcd://...`.
    store: Option<StoreWriter>,
}

struct Outbox {
    tx: mpsc::Sender<Response>,
    kill: CancellationToken,
    peer: SocketAddr,
}

impl Shared {
    fn new(config: Config, tasks: TaskTracker) -> Shared {
        let stats = Arc::new(Stats::default());
        Shared {
            hub: Mutex::new(Hub {
                reg: Registry::new(config.limits.clone(), config.lease),
                servers: Registry::new(config.limits.clone(), config.lease),
                outboxes: HashMap::new(),
                stats: stats.clone(),
                store: None,
            }),
            conn_limit: Arc::new(Semaphore::new(config.limits.max_connections)),
            refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
            half_open: HandshakeGate::new(HALF_OPEN),
            next_conn: AtomicU64::new(1),
            server_id: ReceiverId::random(),
            started: Instant::now(),
            expiry_changed: tokio::sync::Notify::new(),
            config,
            tasks,
            stats,
        }
    }

    /// Client connections open now, handshaking ones included.
    fn connections(&self) -> usize {
        self.config.limits.max_connections - self.conn_limit.available_permits()
    }

    fn hub(&self) -> MutexGuard<'_, Hub> {
        self.hub.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Hub {
    /// Queues `msg` for `to`; a full or closed outbox ends that connection.
    fn push(&self, to: ConnId, msg: Response) {
        if let Some(o) = self.outboxes.get(&to) {
            if o.tx.try_send(msg).is_err() && !o.kill.is_cancelled() {
                tracing::warn!(peer = %o.peer, "client does not read fast enough; closing its connection");
                o.kill.cancel();
            }
        }
    }

    fn deliver(&self, notices: Vec<Notice>) {
        self.stats.notified(notices.len());
        for n in notices {
            self.push(n.to, n.msg);
        }
    }

    /// Delivers notices of the servers' registry as server events.
    fn deliver_servers(&self, notices: Vec<Notice>) {
        self.deliver(notices.into_iter().map(server_notice).collect());
    }

    /// The registry of `role`.
    fn registry(&mut self, role: Role) -> &mut Registry {
        match role {
            Role::Receiver => &mut self.reg,
            Role::Server => &mut self.servers,
        }
    }

    /// Delivers notices of the registry of `role`.
    fn deliver_role(&self, role: Role, notices: Vec<Notice>) {
        match role {
            Role::Receiver => self.deliver(notices),
            Role::Server => self.deliver_servers(notices),
        }
    }

    /// The next lease to run out, of receivers or servers.
    fn next_expiry(&self) -> Option<Instant> {
        match (self.reg.next_expiry(), self.servers.next_expiry()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Hands a registration made here to the store.
    fn stored(&self, handle: &Handle, entry: &Entry, role: Role) {
        if let Some(w) = &self.store {
            w.put(&entry.to_record(handle).with_role(role));
        }
    }

    /// Tells the store these registrations made here ended.
    fn unstored<'a>(&self, gone: impl IntoIterator<Item = (&'a Handle, ReceiverId)>) {
        if let Some(w) = &self.store {
            for (h, r) in gone {
                w.delete(h, r);
            }
        }
    }
}

/// A notice of the servers' registry (`Added` / `Removed`, as the registry makes
/// them) as the server event its watcher subscribed to.
fn server_notice(n: Notice) -> Notice {
    let msg = match n.msg {
        Response::Added { handle, entry } => Response::ServerAdded { handle, entry },
        Response::Removed { handle, receiver } => Response::ServerRemoved { handle, receiver },
        other => other,
    };
    Notice { to: n.to, msg }
}

/// Applies one event of the store's watch and delivers what follows from it.
fn apply_store(shared: &Shared, writer: &StoreWriter, event: StoreEvent) {
    shared.stats.store_event();
    let hub = &mut *shared.hub();
    let ours = |l| writer.is_ours(l);
    // Each registry takes the records of its role (see `store`).
    let applied = crate::store::apply(&mut hub.reg, Role::Receiver, event.clone(), ours);
    let servers = crate::store::apply(&mut hub.servers, Role::Server, event, ours);
    hub.stats
        .store_skipped(applied.skipped.len() + servers.skipped.len());
    for (r, why) in applied.skipped.iter().chain(&servers.skipped) {
        tracing::warn!(handle = %r.handle, receiver = %r.receiver, role = r.role.as_str(), reason = %why, "registration in etcd not taken");
    }
    for r in applied.reput.iter().chain(&servers.reput) {
        tracing::info!(handle = %r.handle, receiver = %r.receiver, role = r.role.as_str(), "registration missing from etcd; putting it again");
        writer.put(r);
    }
    hub.deliver(applied.notices);
    hub.deliver_servers(servers.notices);
}

/// Applies the store's watch until shutdown.
async fn follow_store(
    shared: Arc<Shared>,
    writer: StoreWriter,
    mut events: tokio::sync::mpsc::Receiver<StoreEvent>,
    token: CancellationToken,
) {
    loop {
        let ev = tokio::select! {
            _ = token.cancelled() => return,
            ev = events.recv() => ev,
        };
        let Some(ev) = ev else { return };
        apply_store(&shared, &writer, ev);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, token: CancellationToken) {
    let acceptor = Acceptor::new(
        Listener::Tcp(listener),
        shared.half_open.clone(),
        shared.conn_limit.clone(),
    );
    while let Some(incoming) = acceptor.next(&token).await {
        match incoming {
            Incoming::Admitted {
                stream: ByteStream::Tcp(sock),
                peer: Peer::Tcp(peer),
                slot,
                permit,
                evicted,
            } => {
                if evicted {
                    tracing::warn!(%peer, "too many unfinished handshakes; evicted the oldest");
                }
                let s = shared.clone();
                let t = token.child_token();
                shared.tasks.spawn(async move {
                    serve(sock, peer, s, t, slot).await;
                    drop(permit);
                });
            }
            Incoming::Busy {
                stream: ByteStream::Tcp(sock),
                peer,
            } => {
                tracing::warn!(%peer, "connection limit reached; refusing");
                shared.stats.rejected(RejectKind::Busy);
                if let Ok(p) = shared.refusing.clone().try_acquire_owned() {
                    shared.tasks.spawn(async move {
                        link::refuse(
                            sock,
                            RejectReason::Busy,
                            "too many connections",
                            Duration::from_secs(1),
                        )
                        .await;
                        drop(p);
                    });
                }
            }
            // A TCP listener yields TCP streams only.
            other => tracing::warn!(incoming = ?other, "not a tcp connection; closed"),
        }
    }
}

/// Removes expired registrations when their leases run out, and tells watchers.
async fn sweep_leases(shared: Arc<Shared>, token: CancellationToken) {
    loop {
        let next = shared.hub().next_expiry();
        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = token.cancelled() => return,
            _ = shared.expiry_changed.notified() => continue,
            _ = sleep => {}
        }
        let hub = &mut *shared.hub();
        let now = Instant::now();
        let (notices, expired) = hub.reg.expire(now);
        let (server_notices, servers_expired) = hub.servers.expire(now);
        hub.stats.expired(expired.len() + servers_expired.len());
        hub.unstored(gone(&expired));
        hub.unstored(gone(&servers_expired));
        for e in &expired {
            tracing::info!(handle = %e.handle, endpoint = %e.entry.endpoint, receiver = %e.entry.receiver, "registration expired: lease not renewed");
        }
        for e in &servers_expired {
            tracing::info!(handle = %e.handle, endpoint = %e.entry.endpoint, server = %e.entry.receiver, "server registration expired: lease not renewed");
        }
        hub.deliver(notices);
        hub.deliver_servers(server_notices);
    }
}

async fn serve(
    sock: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    token: CancellationToken,
    slot: HandshakeSlot,
) {
    let cfg = &shared.config;
    let hs = tokio::select! {
        _ = token.cancelled() => return,
        _ = slot.evicted() => {
            tracing::warn!(%peer, "handshake evicted by newer connections; closed");
            shared.stats.rejected(RejectKind::Evicted);
            return;
        }
        r = tokio::time::timeout(
            cfg.handshake_timeout,
            link::accept(sock, shared.server_id, cfg.key.as_ref(), cfg.limits.max_frame),
        ) => r,
    };
    let (mut reader, writer, client) = match hs {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "handshake failed; connection rejected");
            shared.stats.rejected(RejectKind::of(&e));
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "handshake timed out; connection closed");
            shared.stats.rejected(RejectKind::Timeout);
            return;
        }
    };
    drop(slot);
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(OUTBOX);
    {
        let mut hub = shared.hub();
        hub.reg.connect(conn);
        hub.servers.connect(conn);
        hub.outboxes.insert(
            conn,
            Outbox {
                tx,
                kill: token.clone(),
                peer,
            },
        );
    }
    tracing::debug!(%peer, %client, "client connected");
    let writer_task = shared
        .tasks
        .spawn(write_loop(writer, rx, token.clone(), peer));

    let idle = cfg.idle_timeout();
    let end: Result<&'static str, String> = loop {
        let next = tokio::select! {
            _ = token.cancelled() => break Ok("closed by the service"),
            r = tokio::time::timeout(idle, reader.recv::<Request>()) => r,
        };
        match next {
            Err(_) => break Err(format!("idle for {} s", idle.as_secs())),
            Ok(Ok(None)) => break Ok("client closed the connection"),
            Ok(Err(e)) => break Err(e.to_string()),
            Ok(Ok(Some(req))) => handle(&shared, conn, peer, req),
        }
    };
    let (removed, servers_removed) = {
        let mut hub = shared.hub();
        hub.outboxes.remove(&conn);
        let (notices, removed) = hub.reg.disconnect(conn);
        hub.unstored(gone(&removed));
        hub.deliver(notices);
        let (notices, servers_removed) = hub.servers.disconnect(conn);
        hub.unstored(gone(&servers_removed));
        hub.deliver_servers(notices);
        (removed, servers_removed)
    };
    shared.expiry_changed.notify_one();
    for r in &removed {
        tracing::info!(%peer, handle = %r.handle, endpoint = %r.entry.endpoint, receiver = %r.entry.receiver, "unregistered: connection closed");
    }
    for r in &servers_removed {
        tracing::info!(%peer, handle = %r.handle, endpoint = %r.entry.endpoint, server = %r.entry.receiver, "server unregistered: connection closed");
    }
    match end {
        Ok(why) => tracing::debug!(%peer, why, "client disconnected"),
        Err(e) => tracing::warn!(%peer, error = %e, "closing connection on bad input"),
    }
    // The writer drains what is queued, then ends (its sender is gone); bounded wait.
    let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
    token.cancel();
}

fn handle(shared: &Shared, conn: ConnId, peer: SocketAddr, req: Request) {
    let now = Instant::now();
    shared.stats.request(match &req.op {
        Op::Register { .. } => RequestKind::Register,
        Op::Unregister { .. } => RequestKind::Unregister,
        Op::KeepAlive => RequestKind::KeepAlive,
        Op::Lookup { .. } => RequestKind::Lookup,
        Op::Watch { .. } => RequestKind::Watch,
        Op::Unwatch { .. } => RequestKind::Unwatch,
        Op::List => RequestKind::List,
        Op::Status => RequestKind::Status,
        // Server requests count with their receiver counterparts.
        Op::RegisterServer { .. } => RequestKind::Register,
        Op::LookupServers { .. } => RequestKind::Lookup,
        Op::WatchServers { .. } => RequestKind::Watch,
        Op::UnwatchServers { .. } => RequestKind::Unwatch,
        Op::ListServers => RequestKind::List,
        _ => RequestKind::Unknown,
    });
    let mut hub = shared.hub();
    let hub = &mut *hub;
    let answer = match req.op {
        Op::Register {
            handle,
            entry,
            lease_ms,
        } => register(
            shared,
            hub,
            Role::Receiver,
            conn,
            peer,
            handle,
            entry,
            lease_ms,
            now,
        ),
        Op::RegisterServer {
            handle,
            entry,
            lease_ms,
        } => register(
            shared,
            hub,
            Role::Server,
            conn,
            peer,
            handle,
            entry,
            lease_ms,
            now,
        ),
        // Ids are unique across roles: a receiver's registration is looked for
        // first, then a server's.
        Op::Unregister { handle, receiver } => match hub.reg.unregister(conn, &handle, receiver) {
            Ok(notices) => {
                tracing::info!(%peer, %handle, %receiver, "unregistered");
                hub.unstored([(&handle, receiver)]);
                hub.deliver(notices);
                Answer::Done
            }
            Err(r) => match hub.servers.unregister(conn, &handle, receiver) {
                Ok(notices) => {
                    tracing::info!(%peer, %handle, server = %receiver, "server unregistered");
                    hub.unstored([(&handle, receiver)]);
                    hub.deliver_servers(notices);
                    Answer::Done
                }
                Err(_) => Answer::Error {
                    code: r.code,
                    text: r.text,
                },
            },
        },
        Op::KeepAlive => {
            hub.reg.keep_alive(conn, now);
            hub.servers.keep_alive(conn, now);
            shared.expiry_changed.notify_one();
            Answer::Done
        }
        Op::Lookup { handle } => Answer::Records(hub.reg.lookup(&handle)),
        Op::LookupServers { handle } => Answer::Records(hub.servers.lookup(&handle)),
        Op::Watch { handle } => watch(hub, Role::Receiver, conn, &handle),
        Op::WatchServers { handle } => watch(hub, Role::Server, conn, &handle),
        Op::Unwatch { handle } => {
            hub.reg.unwatch(conn, &handle);
            Answer::Done
        }
        Op::UnwatchServers { handle } => {
            hub.servers.unwatch(conn, &handle);
            Answer::Done
        }
        Op::List => list(hub, Role::Receiver),
        Op::ListServers => list(hub, Role::Server),
        Op::Status => Answer::Status(Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_s: shared.started.elapsed().as_secs(),
            connections: shared.connections() as u32,
            registrations: hub.reg.registrations() as u32,
            handles: hub.reg.handles() as u32,
            watches: (hub.reg.watches() + hub.servers.watches()) as u32,
            lease_ms: u32::try_from(shared.config.lease.as_millis()).unwrap_or(u32::MAX),
        }),
        _ => Answer::Error {
            code: ErrorCode::Invalid,
            text: "unknown request".to_owned(),
        },
    };
    hub.push(conn, Response::Reply { id: req.id, answer });
}

/// `Register` and `RegisterServer`: into the registry of `role`, handed to the
/// store, watchers told.
#[allow(clippy::too_many_arguments)]
fn register(
    shared: &Shared,
    hub: &mut Hub,
    role: Role,
    conn: ConnId,
    peer: SocketAddr,
    handle: Handle,
    entry: Entry,
    lease_ms: u32,
    now: Instant,
) -> Answer {
    let endpoint = entry.endpoint;
    let id = entry.receiver;
    let what = match role {
        Role::Receiver => "receiver",
        Role::Server => "server",
    };
    let for_store = hub.store.is_some().then(|| entry.clone());
    match hub
        .registry(role)
        .register(conn, handle.clone(), entry, lease_ms, now)
    {
        Ok(Registered {
            lease,
            changed,
            store,
            notices,
        }) => {
            if changed {
                match role {
                    Role::Receiver => {
                        tracing::info!(%peer, %handle, %endpoint, receiver = %id, "registered")
                    }
                    Role::Server => {
                        tracing::info!(%peer, %handle, %endpoint, server = %id, "server registered")
                    }
                }
            }
            if let Some(e) = for_store.filter(|_| store) {
                hub.stored(&handle, &e, role);
            }
            hub.deliver_role(role, notices);
            shared.expiry_changed.notify_one();
            Answer::Registered {
                lease_ms: u32::try_from(lease.as_millis()).unwrap_or(u32::MAX),
            }
        }
        Err(r) => {
            tracing::warn!(%peer, %handle, %endpoint, role = what, error = %r.text, "registration refused");
            Answer::Error {
                code: r.code,
                text: r.text,
            }
        }
    }
}

/// `Watch` and `WatchServers`: the snapshot, then the changes.
fn watch(hub: &mut Hub, role: Role, conn: ConnId, handle: &Handle) -> Answer {
    match hub.registry(role).watch(conn, handle) {
        Ok(snapshot) => Answer::Records(snapshot),
        Err(r) => Answer::Error {
            code: r.code,
            text: r.text,
        },
    }
}

/// `List` and `ListServers`.
fn list(hub: &mut Hub, role: Role) -> Answer {
    let (handles, total) = hub.registry(role).list();
    Answer::Handles { handles, total }
}

impl crate::http::Source for Shared {
    fn report(&self) -> Report {
        let hub = self.hub();
        let (listed, truncated) = hub.reg.receivers(REPORT_MAX_RECEIVERS);
        Report {
            version: env!("CARGO_PKG_VERSION"),
            uptime_s: self.started.elapsed().as_secs(),
            handles: hub.reg.handles(),
            registrations: hub.reg.registrations(),
            servers: hub.servers.registrations(),
            connections: self.connections(),
            watches: hub.reg.watches() + hub.servers.watches(),
            store: self.config.store.to_string(),
            store_registrations: hub.reg.store_registrations(),
            store_pending: hub.store.as_ref().map_or(0, |w| w.counts().1),
            lease_ms: self.config.lease.as_millis() as u64,
            limits: self.config.limits.clone(),
            counters: self.stats.counters(),
            by_handle: listed
                .iter()
                .map(|(h, entries)| HandleReport::new(h, entries))
                .collect(),
            truncated,
        }
    }
}

/// The handles and receivers of removed registrations.
fn gone(removed: &[Expired]) -> impl Iterator<Item = (&Handle, ReceiverId)> {
    removed.iter().map(|e| (&e.handle, e.entry.receiver))
}

async fn write_loop(
    mut writer: LinkWriter,
    mut rx: mpsc::Receiver<Response>,
    token: CancellationToken,
    peer: SocketAddr,
) {
    loop {
        let first = tokio::select! {
            _ = token.cancelled() => break,
            m = rx.recv() => m,
        };
        let Some(first) = first else { break };
        writer.queue(&first);
        while writer.queued() < 64 * 1024 {
            match rx.try_recv() {
                Ok(m) => writer.queue(&m),
                Err(_) => break,
            }
        }
        let r = tokio::select! {
            _ = token.cancelled() => break,
            r = writer.flush() => r,
        };
        if let Err(e) = r {
            tracing::debug!(%peer, error = %e, "write failed");
            token.cancel();
            break;
        }
    }
    writer.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipcbus::Handle;
    use ipcbus_proto::epm::Entry;

    /// Connections 1..=n from `peer`, known to both registries, each with its outbox;
    /// returns what each is sent.
    fn connect_clients(
        shared: &Shared,
        peer: SocketAddr,
        n: ConnId,
    ) -> Vec<mpsc::Receiver<Response>> {
        let mut hub = shared.hub();
        (1..=n)
            .map(|c| {
                let (tx, rx) = mpsc::channel(64);
                hub.reg.connect(c);
                hub.servers.connect(c);
                hub.outboxes.insert(
                    c,
                    Outbox {
                        tx,
                        kill: CancellationToken::new(),
                        peer,
                    },
                );
                rx
            })
            .collect()
    }

    fn entry() -> Entry {
        Entry {
            endpoint: "10.0.0.2:5000".parse().unwrap(),
            receiver: ReceiverId([7; 16]),
            pid: None,
            version: 1,
            since_ms: 0,
        }
    }

    fn req(id: u32, op: Op) -> Request {
        Request { id, op }
    }

    /// Lease logic under tokio's paused time: renewals four times per lease keep a
    /// registration; without them the sweeper removes it one lease after the last
    /// renewal and tells the watchers.
    #[tokio::test(start_paused = true)]
    async fn sweeper_expires_unrenewed_leases_and_tells_watchers() {
        let lease = Duration::from_secs(10);
        let mut cfg = Config::new(vec![]);
        cfg.lease = lease;
        let shared = Arc::new(Shared::new(cfg, TaskTracker::new()));
        let token = CancellationToken::new();
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let h = Handle::new("leased").unwrap();
        let (tx1, mut out1) = mpsc::channel(64);
        let (tx2, mut out2) = mpsc::channel(64);
        {
            let mut hub = shared.hub();
            for (c, tx) in [(1, tx1), (2, tx2)] {
                hub.reg.connect(c);
                hub.outboxes.insert(
                    c,
                    Outbox {
                        tx,
                        kill: CancellationToken::new(),
                        peer,
                    },
                );
            }
        }
        handle(&shared, 2, peer, req(1, Op::Watch { handle: h.clone() }));
        handle(
            &shared,
            1,
            peer,
            req(
                1,
                Op::Register {
                    handle: h.clone(),
                    entry: entry(),
                    lease_ms: 0,
                },
            ),
        );
        assert_eq!(
            out1.try_recv().unwrap(),
            Response::Reply {
                id: 1,
                answer: Answer::Registered { lease_ms: 10_000 }
            }
        );
        assert!(matches!(out2.try_recv().unwrap(), Response::Reply { .. }));
        assert!(matches!(out2.try_recv().unwrap(), Response::Added { .. }));
        let sweeper = tokio::spawn(sweep_leases(shared.clone(), token.clone()));

        // 40 s of renewals every lease/4: still registered.
        for i in 0..16 {
            tokio::time::sleep(lease / 4).await;
            handle(&shared, 1, peer, req(10 + i, Op::KeepAlive));
        }
        assert_eq!(shared.hub().reg.registrations(), 1);
        assert!(out2.try_recv().is_err(), "no change while renewed");

        // Stop renewing: still there just before the lease runs out ...
        tokio::time::sleep(lease - Duration::from_millis(100)).await;
        assert_eq!(shared.hub().reg.registrations(), 1);
        // ... and gone just after, with the watcher told.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(shared.hub().reg.registrations(), 0);
        assert_eq!(
            out2.try_recv().unwrap(),
            Response::Removed {
                handle: h.clone(),
                receiver: entry().receiver
            }
        );
        // Counted: the requests by kind, the expiry, the Added and Removed notices.
        let c = shared.stats.counters();
        assert_eq!(c.requests["register"], 1);
        assert_eq!(c.requests["watch"], 1);
        assert_eq!(c.requests["keep_alive"], 16);
        assert_eq!(c.lease_expiries, 1);
        assert_eq!(c.watch_notifications, 2);
        let r = crate::http::Source::report(&*shared);
        assert_eq!((r.registrations, r.handles, r.watches), (0, 0, 1));
        assert!(r.by_handle.is_empty());
        token.cancel();
        sweeper.await.unwrap();
    }

    /// Servers of calls are kept apart from receivers under the same handle: each
    /// kind of watch sees its own, as its own events; `Unregister` and `KeepAlive`
    /// reach both; a closed connection removes both.
    #[tokio::test]
    async fn servers_are_kept_apart_from_receivers() {
        let shared = Arc::new(Shared::new(Config::new(vec![]), TaskTracker::new()));
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let h = Handle::new("both").unwrap();
        let mut outs = connect_clients(&shared, peer, 3);
        let (o1, rest) = outs.split_at_mut(1);
        let (o2, o3) = rest.split_at_mut(1);
        let (o1, o2, o3) = (&mut o1[0], &mut o2[0], &mut o3[0]);
        let server = Entry {
            receiver: ReceiverId([8; 16]),
            endpoint: "10.0.0.3:6000".parse().unwrap(),
            ..entry()
        };
        // 2 watches receivers, 3 watches servers.
        handle(&shared, 2, peer, req(1, Op::Watch { handle: h.clone() }));
        handle(
            &shared,
            3,
            peer,
            req(1, Op::WatchServers { handle: h.clone() }),
        );
        for o in [&mut *o2, &mut *o3] {
            assert_eq!(
                o.try_recv().unwrap(),
                Response::Reply {
                    id: 1,
                    answer: Answer::Records(vec![])
                }
            );
        }
        // 1 registers a receiver and a server under the same handle.
        let register = |id, op| handle(&shared, 1, peer, req(id, op));
        register(
            1,
            Op::Register {
                handle: h.clone(),
                entry: entry(),
                lease_ms: 0,
            },
        );
        register(
            2,
            Op::RegisterServer {
                handle: h.clone(),
                entry: server.clone(),
                lease_ms: 0,
            },
        );
        for id in [1, 2] {
            assert!(matches!(
                o1.try_recv().unwrap(),
                Response::Reply { id: got, answer: Answer::Registered { .. } } if got == id
            ));
        }
        assert_eq!(
            o2.try_recv().unwrap(),
            Response::Added {
                handle: h.clone(),
                entry: entry()
            }
        );
        assert!(o2.try_recv().is_err(), "a receiver watch sees no server");
        assert_eq!(
            o3.try_recv().unwrap(),
            Response::ServerAdded {
                handle: h.clone(),
                entry: server.clone()
            }
        );
        assert!(o3.try_recv().is_err(), "a server watch sees no receiver");
        // Lookups and lists answer per role.
        handle(&shared, 2, peer, req(5, Op::Lookup { handle: h.clone() }));
        handle(
            &shared,
            2,
            peer,
            req(6, Op::LookupServers { handle: h.clone() }),
        );
        handle(&shared, 2, peer, req(7, Op::ListServers));
        let answers: Vec<Response> = (0..3).map(|_| o2.try_recv().unwrap()).collect();
        assert_eq!(
            answers,
            vec![
                Response::Reply {
                    id: 5,
                    answer: Answer::Records(vec![entry()])
                },
                Response::Reply {
                    id: 6,
                    answer: Answer::Records(vec![server.clone()])
                },
                Response::Reply {
                    id: 7,
                    answer: Answer::Handles {
                        handles: vec![ipcbus_proto::epm::HandleCount {
                            handle: h.clone(),
                            receivers: 1
                        }],
                        total: 1
                    }
                },
            ]
        );
        let r = crate::http::Source::report(&*shared);
        assert_eq!((r.registrations, r.servers, r.watches), (1, 1, 2));
        // Unregister finds the server by its id; the receiver stays.
        register(
            3,
            Op::Unregister {
                handle: h.clone(),
                receiver: server.receiver,
            },
        );
        assert_eq!(
            o1.try_recv().unwrap(),
            Response::Reply {
                id: 3,
                answer: Answer::Done
            }
        );
        assert_eq!(
            o3.try_recv().unwrap(),
            Response::ServerRemoved {
                handle: h.clone(),
                receiver: server.receiver
            }
        );
        assert!(o2.try_recv().is_err());
        // Unregistering it again: not found.
        register(
            4,
            Op::Unregister {
                handle: h.clone(),
                receiver: server.receiver,
            },
        );
        assert!(matches!(
            o1.try_recv().unwrap(),
            Response::Reply {
                answer: Answer::Error {
                    code: ErrorCode::NotFound,
                    ..
                },
                ..
            }
        ));
        // Registered again, then the connection closes: both go, each watcher told.
        register(
            5,
            Op::RegisterServer {
                handle: h.clone(),
                entry: server.clone(),
                lease_ms: 0,
            },
        );
        assert!(matches!(
            o3.try_recv().unwrap(),
            Response::ServerAdded { .. }
        ));
        {
            let mut hub = shared.hub();
            let (n, _) = hub.reg.disconnect(1);
            hub.deliver(n);
            let (n, _) = hub.servers.disconnect(1);
            hub.deliver_servers(n);
        }
        assert!(matches!(o2.try_recv().unwrap(), Response::Removed { .. }));
        assert_eq!(
            o3.try_recv().unwrap(),
            Response::ServerRemoved {
                handle: h.clone(),
                receiver: server.receiver
            }
        );
        let r = crate::http::Source::report(&*shared);
        assert_eq!((r.registrations, r.servers), (0, 0));
    }

    /// A server's lease runs out like a receiver's: the sweeper, woken by the
    /// earliest lease of either registry, removes it and tells its watchers with
    /// `ServerRemoved`; a receiver renewed meanwhile stays.
    #[tokio::test(start_paused = true)]
    async fn sweeper_expires_unrenewed_servers() {
        let lease = Duration::from_secs(10);
        let mut cfg = Config::new(vec![]);
        cfg.lease = lease;
        let shared = Arc::new(Shared::new(cfg, TaskTracker::new()));
        let token = CancellationToken::new();
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let h = Handle::new("leased").unwrap();
        let mut outs = connect_clients(&shared, peer, 3);
        let server = Entry {
            receiver: ReceiverId([8; 16]),
            ..entry()
        };
        handle(
            &shared,
            3,
            peer,
            req(1, Op::WatchServers { handle: h.clone() }),
        );
        let op = Op::RegisterServer {
            handle: h.clone(),
            entry: server.clone(),
            lease_ms: 0,
        };
        handle(&shared, 1, peer, req(1, op));
        let op = Op::Register {
            handle: h.clone(),
            entry: entry(),
            lease_ms: 0,
        };
        handle(&shared, 2, peer, req(1, op));
        assert!(matches!(
            outs[2].try_recv().unwrap(),
            Response::Reply { .. }
        ));
        assert!(matches!(
            outs[2].try_recv().unwrap(),
            Response::ServerAdded { .. }
        ));
        let sweeper = tokio::spawn(sweep_leases(shared.clone(), token.clone()));
        // Only the receiver's connection renews.
        for i in 0..5 {
            tokio::time::sleep(lease / 4).await;
            handle(&shared, 2, peer, req(10 + i, Op::KeepAlive));
        }
        assert_eq!(
            outs[2].try_recv().unwrap(),
            Response::ServerRemoved {
                handle: h.clone(),
                receiver: server.receiver
            }
        );
        let r = crate::http::Source::report(&*shared);
        assert_eq!((r.registrations, r.servers), (1, 0));
        assert_eq!(shared.stats.counters().lease_expiries, 1);
        token.cancel();
        sweeper.await.unwrap();
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_is_cut_off() {
        let shared = Arc::new(Shared::new(Config::new(vec![]), TaskTracker::new()));
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let (tx, _out) = mpsc::channel(2);
        let kill = CancellationToken::new();
        {
            let mut hub = shared.hub();
            hub.reg.connect(1);
            hub.outboxes.insert(
                1,
                Outbox {
                    tx,
                    kill: kill.clone(),
                    peer,
                },
            );
        }
        for i in 0..3 {
            handle(&shared, 1, peer, req(i, Op::Status));
        }
        assert!(kill.is_cancelled());
    }
}
