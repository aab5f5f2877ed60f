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
use crate::handle::Handle;
use crate::ids::ReceiverId;
use crate::registry::Record;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often a watching connection pings the EPM, so a dead EPM is noticed and an
/// idle connection is not closed.
const WATCH_PING: Duration = Duration::from_millis(2500);

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
    tracing::debug!(epm = epm.addr(), handle = %record.handle, endpoint = %record.endpoint, "registered at the epm");
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
                    tracing::info!(epm = epm.addr(), handle = %record.handle, endpoint = %record.endpoint, "registered at the epm again");
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
    let set: HashMap<ReceiverId, Record> = snapshot.into_iter().map(|r| (r.receiver, r)).collect();
    let (tx, rx) = watch::channel(Arc::new(set.values().cloned().collect()));
    tokio::spawn(keep_watching(epm, handle, client, set, tx, cancel));
    Ok(rx)
}

async fn keep_watching(
    epm: Epm,
    handle: Handle,
    mut client: EpmClient,
    mut set: HashMap<ReceiverId, Record>,
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
                    set = snap.into_iter().map(|r| (r.receiver, r)).collect();
                    tx.send_replace(Arc::new(set.values().cloned().collect()));
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
    set: &mut HashMap<ReceiverId, Record>,
    tx: &watch::Sender<RecordSet>,
) -> EpmError {
    let mut next = Instant::now() + WATCH_PING;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                if let Err(e) = client.keep_alive().await {
                    return e;
                }
                next = Instant::now() + WATCH_PING;
            }
            ev = client.next_event() => {
                match ev {
                    Err(e) => return e,
                    Ok(WatchEvent::Added(r)) => {
                        set.insert(r.receiver, r);
                    }
                    Ok(WatchEvent::Removed { receiver, .. }) => {
                        set.remove(&receiver);
                    }
                }
                tx.send_replace(Arc::new(set.values().cloned().collect()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
