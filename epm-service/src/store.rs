//! The etcd store (`--store etcd://...`): several EPMs on one etcd serve one view.
//!
//! Each EPM keeps the whole view in its [`Registry`] as before, and etcd is where the
//! EPMs meet:
//! - every registration made at this EPM is also put in etcd, under the same key and
//!   with the same record as a receiver registering directly
//!   (`PREFIX/handles/HANDLE/RECEIVER_ID`), attached to one lease this EPM keeps
//!   alive, and deleted when the registration ends ([`StoreWriter`], in the
//!   background: a client request never waits for etcd);
//! - this EPM watches `PREFIX/handles/` and feeds what others registered into the
//!   registry as store entries ([`apply`]), so lookups, watches and lists here show
//!   them, and watchers are told as they come and go.
//!
//! [`apply`] is the I/O-free step between the two: a [`StoreEvent`] and the registry
//! in, notices and records to put again out.
//!
//! Servers of calls share the key space (ids are unique) and are told apart by the
//! record's role: the server applies each event twice, to the receivers' registry
//! with [`Role::Receiver`] and to the servers' with [`Role::Server`]; each takes the
//! records of its role and silently leaves the others'.

use ipcbus::internals::etcd_store::{watch_store, StoreEvent, StoreWriter};
use ipcbus::{Etcd, EtcdError, Record, Role};
use ipcbus_proto::epm::Entry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::registry::{Notice, Registry, StoreDeleted};

/// A connected etcd store: the writer of this EPM's registrations and the watch of
/// everyone's.
#[derive(Debug)]
pub struct EtcdStore {
    /// The cluster.
    pub etcd: Etcd,
    /// Puts and deletes this EPM's registrations.
    pub writer: StoreWriter,
    /// What the watch reports, starting with the snapshot.
    pub events: mpsc::Receiver<StoreEvent>,
    /// Stops the watch.
    pub cancel: CancellationToken,
}

impl EtcdStore {
    /// Grants this EPM's lease and reads and watches every registration.
    ///
    /// # Errors
    /// [`EtcdError`] when etcd does not answer within its timeout (5 s) or refuses
    /// access: the service then exits (see `docs/EPM.md`, "etcd down at start").
    pub async fn connect(etcd: Etcd) -> Result<EtcdStore, EtcdError> {
        let writer = StoreWriter::start(etcd.clone()).await?;
        let cancel = CancellationToken::new();
        let events = match watch_store(etcd.clone(), cancel.clone()).await {
            Ok(ev) => ev,
            Err(e) => {
                writer.close().await;
                return Err(e);
            }
        };
        Ok(EtcdStore {
            etcd,
            writer,
            events,
            cancel,
        })
    }
}

/// What applying one store event did.
#[derive(Debug, Default)]
pub struct Applied {
    /// What to tell watchers.
    pub notices: Vec<Notice>,
    /// This EPM's records the store lacks: put them again.
    pub reput: Vec<Record>,
    /// Registrations not taken, and why, for the log.
    pub skipped: Vec<(Record, String)>,
}

/// Applies one event of the store's watch to the registry of `role` (the
/// receivers' or the servers'): records of the other role are left alone, and the
/// records to put again carry `role`. `ours` says whether a lease is this EPM's: its
/// own puts echoed back are skipped (the connection's entry is already there, or was
/// removed since and its delete is on its way). Registrations without a TCP endpoint
/// are skipped: the EPM's entries carry one.
pub fn apply(
    reg: &mut Registry,
    role: Role,
    event: StoreEvent,
    ours: impl Fn(i64) -> bool,
) -> Applied {
    let mut out = Applied::default();
    let entry_of = |r: &Record, out: &mut Applied| match Entry::from_record(r) {
        _ if r.role != role => None,
        Some(e) => Some(e),
        None => {
            out.skipped
                .push((r.clone(), "it has no TCP endpoint".to_owned()));
            None
        }
    };
    match event {
        StoreEvent::Snapshot(all) => {
            let mut entries = Vec::with_capacity(all.len());
            let mut mine = std::collections::HashSet::new();
            for (r, lease) in all {
                if ours(lease) {
                    mine.insert((r.handle, r.receiver));
                    continue;
                }
                if let Some(e) = entry_of(&r, &mut out) {
                    entries.push((r.handle, e));
                }
            }
            let reset = reg.store_reset(entries);
            out.notices = reset.notices;
            out.reput = reset
                .reassert
                .iter()
                .filter(|(h, e)| !mine.contains(&(h.clone(), e.receiver)))
                .map(|(h, e)| e.to_record(h).with_role(role))
                .collect();
            for (h, e, why) in reset.refused {
                out.skipped
                    .push((e.to_record(&h).with_role(role), why.text));
            }
        }
        StoreEvent::Put(r, lease) => {
            if ours(lease) {
                return out;
            }
            if let Some(e) = entry_of(&r, &mut out) {
                match reg.store_put(r.handle.clone(), e) {
                    Ok(n) => out.notices = n,
                    Err(why) => out.skipped.push((r, why.text)),
                }
            }
        }
        StoreEvent::Delete(handle, receiver) => match reg.store_delete(&handle, receiver) {
            StoreDeleted::Removed(n) => out.notices = n,
            StoreDeleted::Reassert(e) => out.reput.push(e.to_record(&handle).with_role(role)),
            StoreDeleted::Unknown => {}
        },
        // A later kind of event this EPM does not know: nothing to do.
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use ipcbus::{Handle, ReceiverId};
    use std::time::Duration;
    use tokio::time::Instant;

    fn rec(n: u8, tcp: bool) -> Record {
        let ep: ipcbus::Endpoint = if tcp {
            std::net::SocketAddr::from(([10, 0, 0, n], 5000)).into()
        } else {
            "unix:///run/x.sock".parse().unwrap()
        };
        Record::new(
            Handle::new("h").unwrap(),
            vec![ep],
            ReceiverId([n; 16]),
            None,
            1,
        )
    }

    #[test]
    fn echoes_are_skipped_and_lost_records_put_again() {
        let mut reg = Registry::new(Limits::default(), Duration::from_secs(10));
        reg.connect(1);
        reg.watch(1, &Handle::new("h").unwrap()).unwrap();
        let mine = rec(1, true);
        let e = Entry::from_record(&mine).unwrap();
        reg.register(1, mine.handle.clone(), e, 0, Instant::now())
            .unwrap();
        let ours = |l: i64| l == 7;
        // The echo of this EPM's own put: nothing.
        let a = apply(
            &mut reg,
            Role::Receiver,
            StoreEvent::Put(mine.clone(), 7),
            ours,
        );
        assert!(a.notices.is_empty() && a.reput.is_empty());
        // Another EPM's registration: added, the watcher told.
        let a = apply(
            &mut reg,
            Role::Receiver,
            StoreEvent::Put(rec(2, true), 8),
            ours,
        );
        assert_eq!(a.notices.len(), 1);
        // A unix-only record: skipped, said why.
        let a = apply(
            &mut reg,
            Role::Receiver,
            StoreEvent::Put(rec(3, false), 8),
            ours,
        );
        assert_eq!(a.skipped.len(), 1);
        assert_eq!(reg.registrations(), 2);
        // A server of calls: not a receiver, skipped and said why.
        let a = apply(
            &mut reg,
            Role::Receiver,
            StoreEvent::Put(rec(4, true).with_role(Role::Server), 8),
            ours,
        );
        assert!(a.notices.is_empty() && a.skipped.is_empty());
        assert_eq!(reg.registrations(), 2);
        // The store lost this EPM's record: put it again.
        let a = apply(
            &mut reg,
            Role::Receiver,
            StoreEvent::Delete(mine.handle.clone(), mine.receiver),
            ours,
        );
        assert_eq!(a.reput.len(), 1);
        assert_eq!(a.reput[0].tcp_addr(), mine.tcp_addr());
        // A snapshot without the other EPM's record and without ours.
        let a = apply(
            &mut reg,
            Role::Receiver,
            StoreEvent::Snapshot(vec![(mine.clone(), 7)]),
            ours,
        );
        assert_eq!(a.notices.len(), 1, "the other EPM's record left");
        assert!(a.reput.is_empty(), "ours is there, under this EPM's lease");
        let a = apply(&mut reg, Role::Receiver, StoreEvent::Snapshot(vec![]), ours);
        assert_eq!(a.reput.len(), 1, "ours is missing");
        assert_eq!((reg.registrations(), reg.store_registrations()), (1, 0));
    }

    /// The servers' registry takes the servers of the store and nothing else; the
    /// records it puts again are servers.
    #[test]
    fn servers_are_applied_to_the_servers_registry_only() {
        let h = Handle::new("h").unwrap();
        let mut reg = Registry::new(Limits::default(), Duration::from_secs(10));
        let mut servers = Registry::new(Limits::default(), Duration::from_secs(10));
        let ours = |l: i64| l == 7;
        let srv = rec(2, true).with_role(Role::Server);
        for ev in [
            StoreEvent::Put(rec(1, true), 8),
            StoreEvent::Put(srv.clone(), 8),
        ] {
            apply(&mut reg, Role::Receiver, ev.clone(), ours);
            apply(&mut servers, Role::Server, ev, ours);
        }
        assert_eq!(reg.lookup(&h).len(), 1);
        assert_eq!(reg.lookup(&h)[0].receiver, ReceiverId([1; 16]));
        assert_eq!(servers.lookup(&h).len(), 1);
        assert_eq!(servers.lookup(&h)[0].receiver, srv.receiver);
        // A delete reaches the one that has it.
        let ev = StoreEvent::Delete(h.clone(), srv.receiver);
        assert!(apply(&mut reg, Role::Receiver, ev.clone(), ours)
            .notices
            .is_empty());
        apply(&mut servers, Role::Server, ev, ours);
        assert!(servers.lookup(&h).is_empty());
        assert_eq!(reg.lookup(&h).len(), 1);
        // A server registered here that the store lost is put again as a server.
        servers.connect(1);
        let mine = rec(3, true).with_role(Role::Server);
        let e = Entry::from_record(&mine).unwrap();
        servers
            .register(1, h.clone(), e, 0, Instant::now())
            .unwrap();
        let a = apply(
            &mut servers,
            Role::Server,
            StoreEvent::Snapshot(vec![]),
            ours,
        );
        assert_eq!(a.reput.len(), 1);
        assert_eq!(a.reput[0].role, Role::Server);
    }
}
