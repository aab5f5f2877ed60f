//! Background tasks over etcd: one keeps a receiver's lease alive (and puts the
//! record again under a new lease if the old one expired while etcd was out of
//! reach), one keeps a sender's watch on a handle's prefix going (resuming from the
//! last revision seen, so no join or leave is missed or repeated). Both retry with
//! jittered exponential backoff (100 ms up to 5 s) while etcd is away; the watcher
//! keeps its last view meanwhile.

use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchResponse, WatchStream};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::keys::{Change, View};
use super::{Etcd, EtcdError};
use crate::epm::session::{Backoff, RecordSet};
use crate::registry::Record;
use ipcbus_proto::handle::Handle;

/// Keeps a receiver's record in etcd until closed or dropped. Closing revokes the
/// lease, which deletes the record at once; a process that dies without closing
/// leaves it until the lease runs out.
#[derive(Debug)]
pub struct EtcdRegistration {
    cancel: CancellationToken,
    done: Option<oneshot::Receiver<()>>,
}

impl EtcdRegistration {
    /// Stops keeping the record; it is deleted in the background.
    pub fn remove(&mut self) {
        self.cancel.cancel();
    }

    /// Deletes the record now (revokes its lease), waiting at most the request
    /// timeout for etcd to confirm.
    pub async fn close(mut self) {
        self.cancel.cancel();
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

impl Drop for EtcdRegistration {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Puts `record` now under a new lease (so an unreachable etcd or a refused user is
/// an error of `bind`), then keeps the lease alive in the background.
pub(crate) async fn register(etcd: Etcd, record: Record) -> Result<EtcdRegistration, EtcdError> {
    let client = etcd.client().await?;
    let key = etcd.layout().key(&record);
    let value = record.to_json();
    let (lease, ttl) = put_leased(&etcd, &client, &key, &value).await?;
    tracing::debug!(%key, lease, ttl_s = ttl.as_secs(), "registered in etcd");
    let cancel = CancellationToken::new();
    let (done_tx, done_rx) = oneshot::channel();
    let keeper = Keeper {
        etcd,
        client,
        key,
        value,
        lease,
        ttl,
    };
    tokio::spawn(keeper.run(cancel.clone(), done_tx));
    Ok(EtcdRegistration {
        cancel,
        done: Some(done_rx),
    })
}

/// Grants a lease and puts the record under it; returns the lease id and its TTL.
async fn put_leased(
    etcd: &Etcd,
    client: &Client,
    key: &str,
    value: &[u8],
) -> Result<(i64, Duration), EtcdError> {
    let want = i64::try_from(etcd.lease().as_secs()).unwrap_or(i64::MAX);
    let grant = etcd
        .retry("lease grant", client, |mut c| async move {
            c.lease_grant(want.max(1), None).await
        })
        .await?;
    let (lease, ttl) = (grant.id(), grant.ttl().max(1));
    let put = etcd
        .retry("put", client, |mut c| {
            let (key, value) = (key.to_owned(), value.to_vec());
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })
        .await;
    if let Err(e) = put {
        let _ = etcd
            .retry("lease revoke", client, |mut c| async move {
                c.lease_revoke(lease).await
            })
            .await;
        return Err(e);
    }
    Ok((lease, Duration::from_secs(ttl.unsigned_abs())))
}

struct Keeper {
    etcd: Etcd,
    client: Client,
    key: String,
    value: Vec<u8>,
    lease: i64,
    ttl: Duration,
}

/// How a keep-alive stream ended.
enum Ended {
    /// The lease is gone (it expired while etcd was out of reach).
    Lost,
    /// The stream failed: etcd is away or the member went down.
    Failed(EtcdError),
}

impl Keeper {
    async fn run(mut self, cancel: CancellationToken, done: oneshot::Sender<()>) {
        let mut backoff = Backoff::new();
        'outer: loop {
            let ended = tokio::select! {
                _ = cancel.cancelled() => break,
                e = self.keep_alive(&mut backoff) => e,
            };
            let mut lost = match ended {
                Ended::Lost => {
                    tracing::warn!(key = %self.key, "the etcd lease expired; registering again");
                    true
                }
                Ended::Failed(e) => {
                    tracing::warn!(key = %self.key, error = %e, "lost etcd; renewing the lease again");
                    false
                }
            };
            loop {
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = cancel.cancelled() => break 'outer,
                    _ = tokio::time::sleep(delay) => {}
                }
                if !lost {
                    // Try the same lease again: keep_alive says Lost if it expired.
                    continue 'outer;
                }
                match put_leased(&self.etcd, &self.client, &self.key, &self.value).await {
                    Ok((lease, ttl)) => {
                        (self.lease, self.ttl) = (lease, ttl);
                        tracing::info!(key = %self.key, lease, "registered in etcd again");
                        continue 'outer;
                    }
                    Err(e) => {
                        tracing::debug!(key = %self.key, error = %e, "etcd registration attempt failed");
                        lost = true;
                    }
                }
            }
        }
        // Revoking the lease deletes the record at once (senders see it leave now,
        // not at lease expiry).
        let lease = self.lease;
        let revoked = self
            .etcd
            .retry("lease revoke", &self.client, |mut c| async move {
                c.lease_revoke(lease).await
            })
            .await;
        if let Err(e) = revoked {
            tracing::debug!(key = %self.key, error = %e, "cannot revoke the etcd lease; the record goes at lease expiry");
        }
        let _ = done.send(());
    }

    /// Renews the lease every third of its TTL until the stream fails or the lease
    /// is gone.
    async fn keep_alive(&mut self, backoff: &mut Backoff) -> Ended {
        let lease = self.lease;
        let opened = self
            .etcd
            .retry("lease keep-alive", &self.client, |mut c| async move {
                c.lease_keep_alive(lease).await
            })
            .await;
        let (mut keeper, mut stream) = match opened {
            Ok(s) => s,
            Err(e) if lease_not_found(&e) => return Ended::Lost,
            Err(e) => return Ended::Failed(e),
        };
        backoff.reset();
        let every = (self.ttl / 3).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self
                .etcd
                .call("lease keep-alive", keeper.keep_alive())
                .await
            {
                return Ended::Failed(e);
            }
            match self.etcd.call("lease keep-alive", stream.message()).await {
                Ok(Some(r)) if r.ttl() > 0 => {}
                Ok(Some(_)) => return Ended::Lost,
                Ok(None) => {
                    return Ended::Failed(self.etcd.error(
                        "lease keep-alive",
                        etcd_client::Error::LeaseKeepAliveError("stream closed".into()),
                    ))
                }
                Err(e) => return Ended::Failed(e),
            }
        }
    }
}

/// Whether opening a keep-alive failed because the lease no longer exists.
fn lease_not_found(e: &EtcdError) -> bool {
    let text = match e {
        EtcdError::Unavailable { source, .. } | EtcdError::Request { source, .. } => {
            source.to_string()
        }
        _ => return false,
    };
    text.contains("lease not found")
}

/// Reads `handle`'s records now and starts watching from that revision (so an
/// unreachable etcd is an error of `build`), then follows the watch in the
/// background, publishing the full set after every change. While etcd is away the
/// last set stays.
pub(crate) async fn watch(
    etcd: Etcd,
    handle: Handle,
    cancel: CancellationToken,
) -> Result<watch::Receiver<RecordSet>, EtcdError> {
    let mut w = Watcher {
        prefix: etcd.layout().handle(&handle),
        client: etcd.client().await?,
        etcd,
        handle,
        view: View::default(),
        rev: 0,
    };
    w.reread().await?;
    let stream = w.open().await?;
    let (tx, rx) = watch::channel(w.view.records());
    tokio::spawn(w.run(stream, tx, cancel));
    Ok(rx)
}

struct Watcher {
    etcd: Etcd,
    client: Client,
    handle: Handle,
    prefix: String,
    view: View,
    /// Every change up to this revision is in `view`.
    rev: i64,
}

/// Why following a watch stopped.
pub(super) enum Stop {
    /// The next revision was compacted away: read the prefix again.
    Compacted(i64),
    /// The stream failed or etcd cancelled the watch: watch again from `rev + 1`.
    Failed(String),
}

/// The next response of a prefix watch that carries events, for the receivers' watcher
/// and the EPM store alike. A response without events (the watch created, or a
/// progress notice: every change up to the header's revision has been sent) only
/// advances `rev`; a response resets `backoff`.
pub(super) async fn next_events(
    stream: &mut WatchStream,
    rev: &mut i64,
    backoff: &mut Backoff,
) -> Result<WatchResponse, Stop> {
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(Stop::Failed("the watch stream ended".into())),
            Err(e) => return Err(Stop::Failed(e.to_string())),
        };
        if resp.compact_revision() > 0 {
            return Err(Stop::Compacted(resp.compact_revision()));
        }
        if resp.canceled() {
            return Err(Stop::Failed(format!(
                "etcd cancelled the watch: {}",
                resp.cancel_reason()
            )));
        }
        backoff.reset();
        if !resp.events().is_empty() {
            return Ok(resp);
        }
        if !resp.created() {
            if let Some(h) = resp.header() {
                *rev = (*rev).max(h.revision());
            }
        }
    }
}

impl Watcher {
    /// Reads the prefix, replaces the view with it and notes its revision; returns
    /// whether the records changed.
    async fn reread(&mut self) -> Result<bool, EtcdError> {
        let prefix = self.prefix.clone();
        let resp = self
            .etcd
            .retry("get", &self.client, |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let kvs = resp.kvs().iter().map(|kv| (kv.key(), kv.value()));
        let (joined, left, bad) = self.view.replace(self.etcd.layout(), kvs);
        for (key, why) in bad {
            tracing::warn!(%key, reason = %why, "skipping a record in etcd that does not parse");
        }
        self.rev = rev;
        Ok(joined + left > 0)
    }

    /// Opens a watch of the prefix from the revision after the last one seen.
    async fn open(&mut self) -> Result<WatchStream, EtcdError> {
        self.etcd
            .watch_prefix(&self.client, &self.prefix, self.rev)
            .await
    }

    async fn run(
        mut self,
        mut stream: WatchStream,
        tx: watch::Sender<RecordSet>,
        cancel: CancellationToken,
    ) {
        let mut backoff = Backoff::new();
        loop {
            let stop = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tx.closed() => return,
                s = self.follow(&mut stream, &tx, &mut backoff) => s,
            };
            let mut compacted = match stop {
                Stop::Compacted(r) => {
                    tracing::warn!(handle = %self.handle, rev = self.rev, compacted = r, "the etcd watch fell behind a compaction; reading the handle again");
                    true
                }
                Stop::Failed(why) => {
                    tracing::warn!(handle = %self.handle, rev = self.rev, error = %why, "lost the etcd watch; watching again from the last revision seen");
                    false
                }
            };
            loop {
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                if compacted {
                    match self.reread().await {
                        Ok(changed) => {
                            if changed {
                                tx.send_replace(self.view.records());
                            }
                            compacted = false;
                        }
                        Err(e) => {
                            tracing::debug!(handle = %self.handle, error = %e, "etcd read attempt failed");
                            continue;
                        }
                    }
                }
                match self.open().await {
                    Ok(s) => {
                        stream = s;
                        tracing::info!(handle = %self.handle, rev = self.rev, "watching etcd again");
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(handle = %self.handle, error = %e, "etcd watch attempt failed")
                    }
                }
            }
        }
    }

    /// Applies watch responses until the stream ends.
    async fn follow(
        &mut self,
        stream: &mut WatchStream,
        tx: &watch::Sender<RecordSet>,
        backoff: &mut Backoff,
    ) -> Stop {
        loop {
            let resp = match next_events(stream, &mut self.rev, backoff).await {
                Ok(r) => r,
                Err(stop) => return stop,
            };
            let mut changed = false;
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let change = match ev.event_type() {
                    EventType::Put => self.view.put(self.etcd.layout(), kv.key(), kv.value()),
                    EventType::Delete => self.view.delete(kv.key()),
                };
                match change {
                    Change::None => {}
                    Change::Changed => changed = true,
                    Change::Bad(why) => {
                        tracing::warn!(key = %String::from_utf8_lossy(kv.key()), reason = %why, "skipping a record in etcd that does not parse");
                        changed = true;
                    }
                }
                self.rev = self.rev.max(kv.mod_revision());
            }
            if changed {
                tx.send_replace(self.view.records());
            }
        }
    }
}
