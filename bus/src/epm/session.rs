//! Background tasks that keep a receiver registered and a sender's watch alive,
//! reconnecting with jittered exponential backoff (100 ms up to 5 s) and registering
//! or watching again after an EPM restart, with nothing for the application to do.

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

/// Keeps a receiver registered at the EPM until removed or dropped; the EPM drops the
/// registration the moment the connection closes.
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
pub(crate) async fn register(epm: Epm, record: Record) -> Result<EpmRegistration, EpmError> {
    let (client, lease) = register_once(&epm, &record).await?;
    tracing::debug!(epm = epm.addr(), handle = %record.handle, endpoints = ?record.endpoints, "registered at the epm");
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

/// Watches `handle` now (so a wrong password or an unreachable EPM is an error of
/// `build`), then keeps the watch in the background, publishing the full set of
/// records after every change. While the EPM is unreachable the last set stays.
pub(crate) async fn watch(
    epm: Epm,
    handle: Handle,
    cancel: CancellationToken,
) -> Result<watch::Receiver<RecordSet>, EpmError> {
    let mut client = epm.client().await?;
    let snapshot = client.watch(&handle).await?;
    let set = Watched {
        live: snapshot.into_iter().map(|r| (r.receiver, r)).collect(),
        missing: HashMap::new(),
    };
    let (tx, rx) = watch::channel(set.records());
    tokio::spawn(keep_watching(epm, handle, client, set, tx, cancel));
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

    fn apply(&mut self, ev: WatchEvent) {
        match ev {
            WatchEvent::Added(r) => {
                self.missing.remove(&r.receiver);
                self.live.insert(r.receiver, r);
            }
            WatchEvent::Removed { receiver, .. } => {
                self.live.remove(&receiver);
                self.missing.remove(&receiver);
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
                    let snap = c.watch(&handle).await?;
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
