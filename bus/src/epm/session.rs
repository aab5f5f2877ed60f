//! Background tasks that keep a receiver registered and a sender's watch alive,
//! reconnecting with jittered exponential backoff (100 ms up to 5 s) and registering
//! or watching again after an EPM restart, with nothing for the application to do.
//!
//! The same tasks serve calls: [`register`] registers a record of either role (a
//! server of calls is a record with [`Role::Server`]), and [`watch_servers`] is the
//! client's counterpart of the sender's [`watch()`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Epm, EpmClient, EpmError, WatchEvent};
use crate::registry::Record;
use ipcbus_proto::handle::Handle;
use ipcbus_proto::ids::ReceiverId;
use ipcbus_proto::record::Role;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often a watching connection pings the EPM, so a dead EPM is noticed and an
/// idle connection is not closed.
const WATCH_PING: Duration = Duration::from_millis(2500);
/// After watching again (an EPM restart), receivers missing from the new snapshot are
/// kept this long: they are probably still re-registering.
const REWATCH_GRACE: Duration = Duration::from_secs(6);

/// Exponential backoff with jitter: each delay is drawn from [d/2, d], d doubling
/// from 100 ms up to 5 s.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff { next: BACKOFF_MIN }
    }

    pub(crate) fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(BACKOFF_MAX);
        let half = d / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// Keeps a receiver (or server) registered at the EPM until removed or dropped; the
/// EPM drops the registration the moment the connection closes.
#[derive(Debug)]
pub(crate) struct EpmRegistration {
    cancel: CancellationToken,
}

impl EpmRegistration {
    pub(crate) fn remove(&mut self) {
        self.cancel.cancel();
    }
}

impl Drop for EpmRegistration {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Registers `record` now (so a wrong password or an unreachable EPM is an error of
/// `bind`), then keeps it registered in the background.
///
/// `record.role` says what registers: a receiver of events ([`Role::Receiver`],
/// `Register`) or a server of calls ([`Role::Server`], `RegisterServer`; only
/// clients' watches of servers see it). A server at an EPM that predates servers
/// fails here with [`EpmError::ServersUnsupported`]. The registration goes when the
/// returned value is removed or dropped.
pub(crate) async fn register(epm: Epm, record: Record) -> Result<EpmRegistration, EpmError> {
    let (client, lease) = register_once(&epm, &record).await?;
    tracing::debug!(epm = epm.addr(), handle = %record.handle, role = record.role.as_str(), endpoints = ?record.endpoints, "registered at the epm");
    let cancel = CancellationToken::new();
    tokio::spawn(keep_registered(epm, record, client, lease, cancel.clone()));
    Ok(EpmRegistration { cancel })
}

async fn register_once(epm: &Epm, record: &Record) -> Result<(EpmClient, Duration), EpmError> {
    let mut c = epm.client().await?;
    let lease = c.register(record, epm.lease()).await?;
    Ok((c, lease))
}

async fn keep_registered(
    epm: Epm,
    record: Record,
    mut client: EpmClient,
    mut lease: Duration,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new();
    loop {
        let err = tokio::select! {
            _ = cancel.cancelled() => {
                client.close().await;
                return;
            }
            e = renew(&mut client, lease) => e,
        };
        tracing::warn!(epm = epm.addr(), handle = %record.handle, error = %err, "lost the epm connection; registering again");
        loop {
            let delay = backoff.next_delay();
            let again = tokio::select! {
                _ = cancel.cancelled() => return,
                r = async {
                    tokio::time::sleep(delay).await;
                    register_once(&epm, &record).await
                } => r,
            };
            match again {
                Ok((c, l)) => {
                    client = c;
                    lease = l;
                    backoff.reset();
                    tracing::info!(epm = epm.addr(), handle = %record.handle, endpoints = ?record.endpoints, "registered at the epm again");
                    break;
                }
                // An EPM replaced by one that predates servers: said loudly, and
                // tried again (it may be upgraded again).
                Err(e @ EpmError::ServersUnsupported) => {
                    tracing::warn!(epm = epm.addr(), handle = %record.handle, error = %e, "cannot register the server again")
                }
                Err(e) => {
                    tracing::debug!(epm = epm.addr(), error = %e, "epm registration attempt failed")
                }
            }
        }
    }
}

/// Renews four times per lease until the connection fails; returns why.
async fn renew(client: &mut EpmClient, lease: Duration) -> EpmError {
    let every = (lease / 4).max(Duration::from_millis(10));
    let mut next = Instant::now() + every;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                if let Err(e) = client.keep_alive().await {
                    return e;
                }
                next = Instant::now() + every;
            }
            ev = client.next_event() => {
                if let Err(e) = ev {
                    return e;
                }
            }
        }
    }
}

/// The current set of records of a watched handle.
pub(crate) type RecordSet = Arc<Vec<Record>>;

/// Watches the receivers of `handle` now (so a wrong password or an unreachable EPM
/// is an error of `build`), then keeps the watch in the background, publishing the
/// full set of records after every change. While the EPM is unreachable the last set
/// stays.
pub(crate) async fn watch(
    epm: Epm,
    handle: Handle,
    cancel: CancellationToken,
) -> Result<watch::Receiver<RecordSet>, EpmError> {
    watch_role(epm, handle, Role::Receiver, cancel).await
}

/// Watches the servers of calls of `handle`, as [`watch()`] does its receivers: the
/// set published holds records with the role [`Role::Server`] only, and never a
/// receiver. The watch ends when `cancel` fires or every receiver of the set is
/// dropped.
///
/// # Errors
/// [`EpmError`] of the first watch: unreachable EPM, wrong password, and
/// [`EpmError::ServersUnsupported`] when the EPM predates servers.
pub(crate) async fn watch_servers(
    epm: Epm,
    handle: Handle,
    cancel: CancellationToken,
) -> Result<watch::Receiver<RecordSet>, EpmError> {
    watch_role(epm, handle, Role::Server, cancel).await
}

async fn watch_role(
    epm: Epm,
    handle: Handle,
    role: Role,
    cancel: CancellationToken,
) -> Result<watch::Receiver<RecordSet>, EpmError> {
    let mut client = epm.client().await?;
    let snapshot = client.watch_role(role, &handle).await?;
    let set = Watched {
        live: snapshot.into_iter().map(|r| (r.receiver, r)).collect(),
        missing: HashMap::new(),
    };
    let (tx, rx) = watch::channel(set.records());
    tokio::spawn(keep_watching(epm, handle, role, client, set, tx, cancel));
    Ok(rx)
}

/// What a watch knows: the receivers the EPM reports, and those that were known
/// before the EPM restarted and have not registered again yet (until a deadline).
struct Watched {
    live: HashMap<ReceiverId, Record>,
    missing: HashMap<ReceiverId, (Record, Instant)>,
}

impl Watched {
    fn records(&self) -> RecordSet {
        Arc::new(
            self.live
                .values()
                .chain(self.missing.values().map(|(r, _)| r))
                .cloned()
                .collect(),
        )
    }

    /// A fresh snapshot after watching again.
    fn resnapshot(&mut self, snap: Vec<Record>, now: Instant) {
        let fresh: HashMap<ReceiverId, Record> =
            snap.into_iter().map(|r| (r.receiver, r)).collect();
        for (id, r) in self.live.drain() {
            if !fresh.contains_key(&id) {
                self.missing.insert(id, (r, now + REWATCH_GRACE));
            }
        }
        self.missing.retain(|id, _| !fresh.contains_key(id));
        self.live = fresh;
    }

    /// Applies one event. A watching connection watches one role only, so the
    /// events of either role are applied alike.
    fn apply(&mut self, ev: WatchEvent) {
        match ev {
            WatchEvent::Added(r) | WatchEvent::ServerAdded(r) => {
                self.missing.remove(&r.receiver);
                self.live.insert(r.receiver, r);
            }
            WatchEvent::Removed { receiver: id, .. }
            | WatchEvent::ServerRemoved { server: id, .. } => {
                self.live.remove(&id);
                self.missing.remove(&id);
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.missing.values().map(|(_, t)| *t).min()
    }

    fn drop_overdue(&mut self, now: Instant) {
        self.missing.retain(|_, (_, t)| *t > now);
    }
}

async fn keep_watching(
    epm: Epm,
    handle: Handle,
    role: Role,
    mut client: EpmClient,
    mut set: Watched,
    tx: watch::Sender<RecordSet>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new();
    loop {
        let err = tokio::select! {
            _ = cancel.cancelled() => {
                client.close().await;
                return;
            }
            _ = tx.closed() => return,
            e = follow(&mut client, &mut set, &tx) => e,
        };
        tracing::warn!(epm = epm.addr(), %handle, error = %err, "lost the epm connection; watching again");
        loop {
            let delay = backoff.next_delay();
            let again = tokio::select! {
                _ = cancel.cancelled() => return,
                r = async {
                    tokio::time::sleep(delay).await;
                    let mut c = epm.client().await?;
                    let snap = c.watch_role(role, &handle).await?;
                    Ok::<_, EpmError>((c, snap))
                } => r,
            };
            match again {
                Ok((c, snap)) => {
                    client = c;
                    set.resnapshot(snap, Instant::now());
                    tx.send_replace(set.records());
                    backoff.reset();
                    tracing::info!(epm = epm.addr(), %handle, "watching at the epm again");
                    break;
                }
                Err(e) => tracing::debug!(epm = epm.addr(), error = %e, "epm watch attempt failed"),
            }
        }
    }
}

async fn follow(
    client: &mut EpmClient,
    set: &mut Watched,
    tx: &watch::Sender<RecordSet>,
) -> EpmError {
    let mut next = Instant::now() + WATCH_PING;
    loop {
        let overdue = set.next_deadline();
        tokio::select! {
            _ = async {
                match overdue {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                set.drop_overdue(Instant::now());
                tx.send_replace(set.records());
            }
            _ = tokio::time::sleep_until(next) => {
                if let Err(e) = client.keep_alive().await {
                    return e;
                }
                next = Instant::now() + WATCH_PING;
            }
            ev = client.next_event() => {
                match ev {
                    Err(e) => return e,
                    Ok(ev) => set.apply(ev),
                }
                tx.send_replace(set.records());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::record_now;

    fn rec(n: u8) -> Record {
        record_now(
            Handle::new("h").unwrap(),
            vec![std::net::SocketAddr::from(([127, 0, 0, 1], 1000 + u16::from(n))).into()],
            ReceiverId([n; 16]),
        )
    }

    #[test]
    fn receivers_missing_after_a_rewatch_are_kept_for_a_grace_period() {
        let t0 = Instant::now();
        let mut w = Watched {
            live: [(ReceiverId([1; 16]), rec(1)), (ReceiverId([2; 16]), rec(2))].into(),
            missing: HashMap::new(),
        };
        // The restarted EPM knows only receiver 2 so far.
        w.resnapshot(vec![rec(2)], t0);
        assert_eq!(w.records().len(), 2);
        assert_eq!(w.next_deadline(), Some(t0 + REWATCH_GRACE));
        // Receiver 1 registers again: it is live, no longer missing.
        w.apply(WatchEvent::Added(rec(1)));
        assert_eq!(w.next_deadline(), None);
        // A receiver that never comes back is dropped after the grace period.
        w.resnapshot(vec![rec(1)], t0);
        w.drop_overdue(t0 + REWATCH_GRACE / 2);
        assert_eq!(w.records().len(), 2);
        w.drop_overdue(t0 + REWATCH_GRACE);
        assert_eq!(w.records().len(), 1);
        // A removal is immediate.
        w.apply(WatchEvent::Removed {
            handle: Handle::new("h").unwrap(),
            receiver: ReceiverId([1; 16]),
        });
        assert!(w.records().is_empty());
    }

    /// An EPM from before servers, as far as the wire goes: it decodes requests
    /// with the eight original ops only, answers `Status`, and closes the
    /// connection on a body it cannot decode (as `epm-service` does).
    mod old_epm {
        use ipcbus_proto::epm::{Answer, Entry, Response, Status};
        use serde::Deserialize;

        #[derive(Deserialize)]
        pub(super) struct Request {
            pub(super) id: u32,
            pub(super) op: Op,
        }

        #[allow(dead_code)]
        #[derive(Deserialize)]
        pub(super) enum Op {
            Register {
                handle: String,
                entry: Entry,
                lease_ms: u32,
            },
            Unregister {
                handle: String,
                receiver: [u8; 16],
            },
            KeepAlive,
            Lookup {
                handle: String,
            },
            Watch {
                handle: String,
            },
            Unwatch {
                handle: String,
            },
            List,
            Status,
        }

        pub(super) fn status(id: u32) -> Response {
            Response::Reply {
                id,
                answer: Answer::Status(Status {
                    version: "0.0.9".into(),
                    uptime_s: 0,
                    connections: 1,
                    registrations: 0,
                    handles: 0,
                    watches: 0,
                    lease_ms: 10_000,
                }),
            }
        }
    }

    /// Serves `conns` connections as an old EPM; returns its address.
    async fn old_epm(conns: usize) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            for _ in 0..conns {
                let Ok((sock, _)) = l.accept().await else {
                    return;
                };
                let Ok((mut r, mut w, _)) = crate::epm::link::accept(
                    sock,
                    ReceiverId::random(),
                    None,
                    ipcbus_proto::epm::DEFAULT_EPM_MAX_FRAME,
                )
                .await
                else {
                    continue;
                };
                // Bounded: the client sends a handful of requests at most.
                for _ in 0..16 {
                    match r.recv::<old_epm::Request>().await {
                        Ok(Some(req)) if matches!(req.op, old_epm::Op::Status) => {
                            if w.send(&old_epm::status(req.id)).await.is_err() {
                                break;
                            }
                        }
                        Ok(Some(_)) => {}
                        // A body it cannot decode (a server request) or the end.
                        Ok(None) | Err(_) => break,
                    }
                }
                w.shutdown().await;
            }
        });
        addr
    }

    /// A server registering or a client watching at an EPM that predates servers
    /// gets a named error at once, not a connection lost and tried again.
    #[tokio::test]
    async fn an_epm_without_servers_is_a_named_error() {
        let addr = old_epm(3).await;
        let epm = Epm::builder(addr.to_string())
            .timeout(Duration::from_secs(10))
            .build();
        let e = register(epm.clone(), rec(1).with_role(Role::Server))
            .await
            .unwrap_err();
        assert!(matches!(e, EpmError::ServersUnsupported), "{e:?}");
        assert_eq!(
            e.to_string(),
            "this endpoint manager does not support call servers; upgrade epm-service"
        );
        let e = watch_servers(
            epm.clone(),
            Handle::new("h").unwrap(),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, EpmError::ServersUnsupported), "{e:?}");
        // The old EPM still serves what it knows.
        assert_eq!(epm.status().await.unwrap().version, "0.0.9");
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new();
        let d: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[1] >= Duration::from_millis(100) && d[1] <= Duration::from_millis(200));
        for x in &d {
            assert!(*x <= BACKOFF_MAX);
        }
        assert!(d[9] >= BACKOFF_MAX / 2);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
