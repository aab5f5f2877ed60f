//! etcd as the store of an endpoint manager (`epm-service --store etcd://...`), so
//! that several EPMs serve one view:
//!
//! - [`StoreWriter`] keeps the registrations made at one EPM in etcd, each under the
//!   same key and with the same value as a receiver registering directly
//!   ([`Layout::key`], [`Record::to_json`]), all attached to one lease the EPM keeps
//!   alive. `put` and `delete` never wait for etcd: they note what etcd should hold
//!   and a background task makes it so, coalescing changes to one key, retrying with
//!   backoff while etcd is away, and putting every record again under a new lease if
//!   the old one ran out meanwhile. A delete is conditional on the key still being
//!   under this EPM's lease, so an EPM that lost a receiver to another EPM does not
//!   delete the other's registration.
//! - [`watch_store`] reads every registration under `PREFIX/handles/` and follows the
//!   prefix from that revision as [`StoreEvent`]s, resuming from the last revision
//!   seen after a lost stream, and reading the prefix again (a new
//!   [`StoreEvent::Snapshot`]) when that revision was compacted away. Records that do
//!   not parse are skipped and logged.
//!
//! Only for `epm-service` (the `internals` feature).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchStream,
};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::{session, Etcd, EtcdError};
use crate::epm::session::Backoff;
use crate::registry::Record;
use ipcbus_proto::handle::Handle;
use ipcbus_proto::ids::ReceiverId;

/// Most puts sent in one transaction (etcd's default limit is 128 operations).
const PUTS_PER_TXN: usize = 64;
/// Leases of this writer remembered as "ours" after they were replaced: an echo of
/// a put under an older lease may still be on its way.
const OLD_LEASES: usize = 4;
/// Events queued from the watch to the EPM before the watch waits for it.
const EVENTS: usize = 1024;

/// Keeps one EPM's registrations in etcd under one lease; cheap to clone. Closing
/// (or dropping the last clone) stops the background task and revokes the lease,
/// which deletes every record at once.
#[derive(Debug, Clone)]
pub struct StoreWriter {
    shared: Arc<Shared>,
    etcd: Etcd,
    _guard: Arc<DropGuard>,
}

#[derive(Debug)]
struct DropGuard(CancellationToken);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Notify,
    cancel: CancellationToken,
    done: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// What etcd should hold for this EPM: key -> value.
    want: HashMap<String, Vec<u8>>,
    /// Keys whose state in etcd may differ from `want`.
    dirty: HashSet<String>,
    /// The lease now, then older ones (newest first).
    leases: Vec<i64>,
    /// The background task has ended.
    stopped: bool,
}

impl StoreWriter {
    /// Grants the lease now (so an etcd that is down is an error here), then keeps it
    /// alive in the background.
    ///
    /// # Errors
    /// [`EtcdError`]: etcd unavailable, access denied.
    pub async fn start(etcd: Etcd) -> Result<StoreWriter, EtcdError> {
        let client = etcd.client().await?;
        let (lease, ttl) = grant(&etcd, &client).await?;
        tracing::info!(lease, ttl_s = ttl.as_secs(), "etcd store lease granted");
        let cancel = CancellationToken::new();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                leases: vec![lease],
                ..State::default()
            }),
            wake: Notify::new(),
            cancel: cancel.clone(),
            done: Notify::new(),
        });
        let task = Task {
            etcd: etcd.clone(),
            client,
            shared: shared.clone(),
            lease,
            ttl,
        };
        tokio::spawn(task.run());
        Ok(StoreWriter {
            shared,
            etcd,
            _guard: Arc::new(DropGuard(cancel)),
        })
    }

    /// Puts `record` (again) under this EPM's lease, in the background.
    pub fn put(&self, record: &Record) {
        let key = self.etcd.layout().key(record);
        let mut s = self.shared.state();
        s.want.insert(key.clone(), record.to_json());
        s.dirty.insert(key);
        drop(s);
        self.shared.wake.notify_one();
    }

    /// Deletes the registration of `receiver` for `handle`, in the background, if it
    /// is still under this EPM's lease.
    pub fn delete(&self, handle: &Handle, receiver: ReceiverId) {
        let key = format!("{}{receiver}", self.etcd.layout().handle(handle));
        let mut s = self.shared.state();
        if s.want.remove(&key).is_some() {
            s.dirty.insert(key);
        }
        drop(s);
        self.shared.wake.notify_one();
    }

    /// Whether `lease` is (or was recently) this EPM's: a put under it is an echo of
    /// this EPM's own registration.
    pub fn is_ours(&self, lease: i64) -> bool {
        lease != 0 && self.shared.state().leases.contains(&lease)
    }

    /// Records this EPM wants in etcd now, and how many of them are not confirmed
    /// there yet.
    pub fn counts(&self) -> (usize, usize) {
        let s = self.shared.state();
        (s.want.len(), s.dirty.len())
    }

    /// Stops the background task and revokes the lease (deleting every record at
    /// once), waiting at most the request timeout for etcd.
    pub async fn close(&self) {
        let done = self.shared.done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        self.shared.cancel.cancel();
        if !self.shared.state().stopped {
            done.await;
        }
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Grants a lease of the configured length; returns its id and TTL.
async fn grant(etcd: &Etcd, client: &Client) -> Result<(i64, Duration), EtcdError> {
    let want = i64::try_from(etcd.lease().as_secs()).unwrap_or(i64::MAX);
    let g = etcd
        .retry("lease grant", client, |mut c| async move {
            c.lease_grant(want.max(1), None).await
        })
        .await?;
    Ok((g.id(), Duration::from_secs(g.ttl().max(1).unsigned_abs())))
}

/// Whether an error says the lease no longer exists.
fn lease_gone(e: &EtcdError) -> bool {
    match e {
        EtcdError::Unavailable { source, .. } | EtcdError::Request { source, .. } => {
            source.to_string().contains("lease not found")
        }
        _ => false,
    }
}

struct Task {
    etcd: Etcd,
    client: Client,
    shared: Arc<Shared>,
    lease: i64,
    ttl: Duration,
}

/// Why a step of the background task failed.
enum Failed {
    /// The lease ran out (etcd was out of reach too long): grant a new one.
    LeaseGone,
    /// etcd is away or refused a request: try again after a pause.
    Etcd(EtcdError),
}

impl From<EtcdError> for Failed {
    fn from(e: EtcdError) -> Failed {
        if lease_gone(&e) {
            Failed::LeaseGone
        } else {
            Failed::Etcd(e)
        }
    }
}

impl Task {
    async fn run(mut self) {
        let mut backoff = Backoff::new();
        let mut renew_at = tokio::time::Instant::now() + self.every();
        let mut failing = false;
        loop {
            let step = async {
                if tokio::time::Instant::now() >= renew_at {
                    self.renew().await?;
                    renew_at = tokio::time::Instant::now() + self.every();
                }
                self.flush().await
            };
            let r = tokio::select! {
                _ = self.shared.cancel.cancelled() => break,
                r = step => r,
            };
            let pause = match r {
                Ok(()) => {
                    if failing {
                        tracing::info!(lease = self.lease, "etcd store reachable again");
                        failing = false;
                    }
                    backoff.reset();
                    None
                }
                Err(Failed::LeaseGone) => {
                    tracing::warn!(
                        lease = self.lease,
                        "the etcd store lease expired; putting every registration again under a new one"
                    );
                    match grant(&self.etcd, &self.client).await {
                        Ok((lease, ttl)) => {
                            (self.lease, self.ttl) = (lease, ttl);
                            renew_at = tokio::time::Instant::now() + self.every();
                            let mut s = self.shared.state();
                            s.leases.insert(0, lease);
                            s.leases.truncate(OLD_LEASES + 1);
                            let keys: Vec<String> = s.want.keys().cloned().collect();
                            s.dirty.extend(keys);
                            continue;
                        }
                        Err(e) => Some(e),
                    }
                }
                Err(Failed::Etcd(e)) => Some(e),
            };
            if let Some(e) = pause {
                if !failing {
                    tracing::warn!(error = %e, "etcd store unreachable; keeping the registrations here and trying again");
                    failing = true;
                } else {
                    tracing::debug!(error = %e, "etcd store attempt failed");
                }
                tokio::select! {
                    _ = self.shared.cancel.cancelled() => break,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
                continue;
            }
            let dirty = !self.shared.state().dirty.is_empty();
            if dirty {
                continue;
            }
            tokio::select! {
                _ = self.shared.cancel.cancelled() => break,
                _ = self.shared.wake.notified() => {}
                _ = tokio::time::sleep_until(renew_at) => {}
            }
        }
        let lease = self.lease;
        let revoked = self
            .etcd
            .retry("lease revoke", &self.client, |mut c| async move {
                c.lease_revoke(lease).await
            })
            .await;
        match revoked {
            Ok(_) => tracing::info!(lease, "etcd store lease revoked"),
            Err(e) => {
                tracing::warn!(lease, error = %e, "cannot revoke the etcd store lease; its records go at lease expiry")
            }
        }
        self.shared.state().stopped = true;
        self.shared.done.notify_waiters();
    }

    /// Renewals every third of the TTL: two may be lost before it runs out.
    fn every(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(100))
    }

    /// Renews the lease once.
    async fn renew(&self) -> Result<(), Failed> {
        let lease = self.lease;
        let (mut keeper, mut stream) = self
            .etcd
            .retry("lease keep-alive", &self.client, |mut c| async move {
                c.lease_keep_alive(lease).await
            })
            .await?;
        self.etcd
            .call("lease keep-alive", keeper.keep_alive())
            .await?;
        match self.etcd.call("lease keep-alive", stream.message()).await? {
            Some(r) if r.ttl() > 0 => Ok(()),
            Some(_) => Err(Failed::LeaseGone),
            None => Err(Failed::Etcd(self.etcd.error(
                "lease keep-alive",
                etcd_client::Error::LeaseKeepAliveError("stream closed".into()),
            ))),
        }
    }

    /// Makes etcd hold what `want` says for every dirty key. Keys not done stay
    /// dirty.
    async fn flush(&self) -> Result<(), Failed> {
        let (puts, deletes) = {
            let mut s = self.shared.state();
            let dirty = std::mem::take(&mut s.dirty);
            let mut puts = Vec::new();
            let mut deletes = Vec::new();
            for k in dirty {
                match s.want.get(&k) {
                    Some(v) => puts.push((k, v.clone())),
                    None => deletes.push(k),
                }
            }
            (puts, deletes)
        };
        let mut left_puts: &[(String, Vec<u8>)] = &puts;
        let mut left_deletes: &[String] = &deletes;
        let r = async {
            while !left_puts.is_empty() {
                let n = left_puts.len().min(PUTS_PER_TXN);
                let ops: Vec<TxnOp> = left_puts[..n]
                    .iter()
                    .map(|(k, v)| {
                        TxnOp::put(
                            k.clone(),
                            v.clone(),
                            Some(PutOptions::new().with_lease(self.lease)),
                        )
                    })
                    .collect();
                self.etcd
                    .retry("put", &self.client, |mut c| {
                        let ops = ops.clone();
                        async move { c.txn(Txn::new().and_then(ops)).await }
                    })
                    .await?;
                left_puts = &left_puts[n..];
            }
            while let Some(k) = left_deletes.first() {
                // Only while it is under this EPM's lease: another EPM may have put
                // it since (the receiver moved there).
                let txn = Txn::new()
                    .when([Compare::lease(k.clone(), CompareOp::Equal, self.lease)])
                    .and_then([TxnOp::delete(k.clone(), None)]);
                self.etcd
                    .retry("delete", &self.client, |mut c| {
                        let txn = txn.clone();
                        async move { c.txn(txn).await }
                    })
                    .await?;
                left_deletes = &left_deletes[1..];
            }
            Ok::<(), Failed>(())
        }
        .await;
        if r.is_err() {
            let mut s = self.shared.state();
            s.dirty.extend(left_puts.iter().map(|(k, _)| k.clone()));
            s.dirty.extend(left_deletes.iter().cloned());
        }
        r
    }
}

/// A change of the registrations under `PREFIX/handles/`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreEvent {
    /// Every registration now (at start, and after a compaction made the watch read
    /// the prefix again), each with the lease it is under.
    Snapshot(Vec<(Record, i64)>),
    /// A registration was put, under this lease.
    Put(Record, i64),
    /// A registration was deleted (or its lease ran out), or its key now holds
    /// something that is not a registration.
    Delete(Handle, ReceiverId),
}

/// Reads every registration under the prefix now and starts watching from that
/// revision (so an unreachable etcd is an error here), then follows the watch in the
/// background until `cancel` or the receiver is dropped. The first event is the
/// [`StoreEvent::Snapshot`].
///
/// # Errors
/// [`EtcdError`]: etcd unavailable, access denied.
pub async fn watch_store(
    etcd: Etcd,
    cancel: CancellationToken,
) -> Result<mpsc::Receiver<StoreEvent>, EtcdError> {
    let mut w = Watcher {
        prefix: etcd.layout().all(),
        client: etcd.client().await?,
        etcd,
        rev: 0,
    };
    let snapshot = w.read().await?;
    let stream = w.open().await?;
    let (tx, rx) = mpsc::channel(EVENTS);
    let _ = tx.try_send(StoreEvent::Snapshot(snapshot));
    tokio::spawn(w.run(stream, tx, cancel));
    Ok(rx)
}

struct Watcher {
    etcd: Etcd,
    client: Client,
    prefix: String,
    /// Every change up to this revision has been sent.
    rev: i64,
}

/// Why following the watch stopped.
enum Stop {
    Compacted(i64),
    Failed(String),
    /// The receiver of the events is gone.
    Closed,
}

impl Watcher {
    /// Reads the prefix and notes its revision.
    async fn read(&mut self) -> Result<Vec<(Record, i64)>, EtcdError> {
        let prefix = self.prefix.clone();
        let resp = self
            .etcd
            .retry("get", &self.client, |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        self.rev = resp.header().map_or(0, |h| h.revision());
        let layout = self.etcd.layout();
        let mut out = Vec::with_capacity(resp.kvs().len());
        for kv in resp.kvs() {
            match layout.parse(kv.key(), kv.value()) {
                Ok(r) => out.push((r, kv.lease())),
                Err(bad) => {
                    tracing::warn!(key = %String::from_utf8_lossy(kv.key()), reason = %bad, "skipping a record in etcd that does not parse")
                }
            }
        }
        Ok(out)
    }

    async fn open(&mut self) -> Result<WatchStream, EtcdError> {
        self.etcd
            .watch_prefix(&self.client, &self.prefix, self.rev)
            .await
    }

    async fn run(
        mut self,
        mut stream: WatchStream,
        tx: mpsc::Sender<StoreEvent>,
        cancel: CancellationToken,
    ) {
        let mut backoff = Backoff::new();
        loop {
            let stop = tokio::select! {
                _ = cancel.cancelled() => return,
                s = self.follow(&mut stream, &tx, &mut backoff) => s,
            };
            let mut compacted = match stop {
                Stop::Closed => return,
                Stop::Compacted(r) => {
                    tracing::warn!(rev = self.rev, compacted = r, "the etcd store watch fell behind a compaction; reading every registration again");
                    true
                }
                Stop::Failed(why) => {
                    tracing::warn!(rev = self.rev, error = %why, "lost the etcd store watch; keeping the current view and watching again from the last revision seen");
                    false
                }
            };
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
                if compacted {
                    match self.read().await {
                        Ok(all) => {
                            if tx.send(StoreEvent::Snapshot(all)).await.is_err() {
                                return;
                            }
                            compacted = false;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "etcd store read attempt failed");
                            continue;
                        }
                    }
                }
                match self.open().await {
                    Ok(s) => {
                        stream = s;
                        tracing::info!(rev = self.rev, "watching the etcd store again");
                        break;
                    }
                    Err(e) => tracing::debug!(error = %e, "etcd store watch attempt failed"),
                }
            }
        }
    }

    async fn follow(
        &mut self,
        stream: &mut WatchStream,
        tx: &mpsc::Sender<StoreEvent>,
        backoff: &mut Backoff,
    ) -> Stop {
        let layout = self.etcd.layout().clone();
        loop {
            let resp = match session::next_events(stream, &mut self.rev, backoff).await {
                Ok(r) => r,
                Err(session::Stop::Compacted(r)) => return Stop::Compacted(r),
                Err(session::Stop::Failed(why)) => return Stop::Failed(why),
            };
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let event = match ev.event_type() {
                    EventType::Put => match layout.parse(kv.key(), kv.value()) {
                        Ok(r) => Some(StoreEvent::Put(r, kv.lease())),
                        Err(bad) => {
                            tracing::warn!(key = %String::from_utf8_lossy(kv.key()), reason = %bad, "skipping a record in etcd that does not parse");
                            // What the key held before is no registration any more.
                            layout
                                .parse_key(kv.key())
                                .ok()
                                .map(|(h, r)| StoreEvent::Delete(h, r))
                        }
                    },
                    EventType::Delete => layout
                        .parse_key(kv.key())
                        .ok()
                        .map(|(h, r)| StoreEvent::Delete(h, r)),
                };
                if let Some(e) = event {
                    if tx.send(e).await.is_err() {
                        return Stop::Closed;
                    }
                }
                self.rev = self.rev.max(kv.mod_revision());
            }
        }
    }
}
