//! The EPM's state: registrations by handle, who made them, their leases, and who
//! watches which handle. No sockets and no clock: every call that depends on time
//! takes `now`, and every change returns the [`Notice`]s to deliver to watchers.
//!
//! A registration is owned either by the client connection that made it (leased,
//! removed when the connection closes) or, with `--store etcd://...`, by the store:
//! registrations made at other EPMs or by receivers directly in etcd, learned from
//! the store's watch ([`Registry::store_put`], [`Registry::store_delete`],
//! [`Registry::store_reset`]). Store entries have no lease here (etcd's lease removes
//! them, and the watch tells), never replace a connection's own entry, and count
//! against the same limits.
//!
//! The server keeps one `Registry` behind one mutex rather than in a concurrent map:
//! every operation is a few map operations (microseconds), and one lock makes "send
//! the snapshot, then every later change" atomic for a watcher, so a watcher never
//! misses or duplicates a change. The benchmark in `docs/EPM.md` shows the lock is
//! not the bottleneck at 100 concurrent clients.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use ipcbus::{Handle, ReceiverId};
use ipcbus_proto::epm::{Entry, ErrorCode, HandleCount, Response};
use tokio::time::Instant;

use crate::config::Limits;

/// Identifies one client connection inside the server.
pub type ConnId = u64;

/// Most handles one `List` answer carries (keeps the reply under the frame limit).
pub const LIST_MAX: usize = 2048;

/// A message for one watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The watching connection.
    pub to: ConnId,
    /// What to send it.
    pub msg: Response,
}

/// A refused request: the code and text of the `Error` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub text: String,
}

fn refuse(code: ErrorCode, text: impl Into<String>) -> Refusal {
    Refusal {
        code,
        text: text.into(),
    }
}

/// The outcome of [`Registry::register`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// The lease granted.
    pub lease: Duration,
    /// Whether the registration is new or its entry changed (not a plain renewal).
    pub changed: bool,
    /// Whether the store must be told (new, changed, or taken over from a store
    /// entry: the receiver moved here from another EPM).
    pub store: bool,
    /// What to tell the handle's watchers.
    pub notices: Vec<Notice>,
}

/// A registration that ran out, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// Its handle.
    pub handle: Handle,
    /// Its entry.
    pub entry: Entry,
}

/// The outcome of [`Registry::store_reset`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreReset {
    /// What to tell watchers.
    pub notices: Vec<Notice>,
    /// Store entries not taken, and why (a limit, an unreachable endpoint).
    pub refused: Vec<(Handle, Entry, Refusal)>,
    /// Entries connections here own that the store lacks: put them again.
    pub reassert: Vec<(Handle, Entry)>,
}

/// The EPM's registrations and watches.
#[derive(Debug)]
pub struct Registry {
    limits: Limits,
    default_lease: Duration,
    handles: HashMap<Handle, HandleEntry>,
    conns: HashMap<ConnId, ConnEntry>,
    /// Lease index: (expiry, registration serial) -> key.
    expiries: BTreeMap<(Instant, u64), (Handle, ReceiverId)>,
    registrations: usize,
    /// How many of `registrations` the store owns.
    store_registrations: usize,
    watches: usize,
    serial: u64,
}

#[derive(Debug, Default)]
struct HandleEntry {
    regs: HashMap<ReceiverId, Reg>,
    watchers: HashSet<ConnId>,
}

/// Who a registration belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The client connection that made it.
    Conn(ConnId),
    /// The store (etcd): made elsewhere, learned from the watch.
    Store,
}

/// What [`Registry::store_delete`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreDeleted {
    /// A store entry: removed; tell these watchers.
    Removed(Vec<Notice>),
    /// A connection here owns it: the store lost this EPM's record (another EPM
    /// deleted it, or it expired), so the driver puts it again.
    Reassert(Entry),
    /// Not known here.
    Unknown,
}

#[derive(Debug)]
struct Reg {
    entry: Entry,
    owner: Owner,
    lease: Duration,
    expires: Instant,
    serial: u64,
    /// For a connection's entry: what the store holds for the same receiver under
    /// another EPM's lease, if it says so (the receiver moved between EPMs, and the
    /// old connection is not closed yet). When the entry here ends, this one stays
    /// as a store entry: the store still holds it.
    shadow: Option<Entry>,
}

#[derive(Debug, Default)]
struct ConnEntry {
    regs: HashSet<(Handle, ReceiverId)>,
    watches: HashSet<Handle>,
}

impl Registry {
    /// An empty registry with these limits; registrations that ask for no particular
    /// lease get `default_lease`, and none gets more.
    pub fn new(limits: Limits, default_lease: Duration) -> Registry {
        Registry {
            limits,
            default_lease,
            handles: HashMap::new(),
            conns: HashMap::new(),
            expiries: BTreeMap::new(),
            registrations: 0,
            store_registrations: 0,
            watches: 0,
            serial: 0,
        }
    }

    /// Records a new connection.
    pub fn connect(&mut self, conn: ConnId) {
        self.conns.entry(conn).or_default();
    }

    /// Registers (or renews) a receiver for `handle` on behalf of `conn`; returns the
    /// lease granted and the notices for the handle's watchers. A receiver id already
    /// registered by another connection moves to this one (the receiver reconnected
    /// before the EPM noticed its old connection was gone).
    ///
    /// # Errors
    /// [`Refusal`] when a limit is reached or the endpoint is not an address others
    /// can connect to.
    pub fn register(
        &mut self,
        conn: ConnId,
        handle: Handle,
        entry: Entry,
        lease_ms: u32,
        now: Instant,
    ) -> Result<Registered, Refusal> {
        if entry.endpoint.ip().is_unspecified() || entry.endpoint.port() == 0 {
            return Err(refuse(
                ErrorCode::Invalid,
                format!(
                    "endpoint {} is not an address senders can reach",
                    entry.endpoint
                ),
            ));
        }
        if !self.conns.contains_key(&conn) {
            return Err(refuse(ErrorCode::Invalid, "unknown connection"));
        }
        let lease = match lease_ms {
            0 => self.default_lease,
            ms => Duration::from_millis(ms.into()).min(self.default_lease),
        }
        .max(Duration::from_millis(100));
        let key = (handle.clone(), entry.receiver);
        let existing = self
            .handles
            .get(&handle)
            .and_then(|h| h.regs.get(&entry.receiver))
            .map(|r| r.owner);
        if existing != Some(Owner::Conn(conn)) {
            let c = &self.conns[&conn];
            if c.regs.len() >= self.limits.max_registrations_per_connection {
                return Err(refuse(
                    ErrorCode::LimitReached,
                    format!(
                        "at most {} registrations per connection",
                        self.limits.max_registrations_per_connection
                    ),
                ));
            }
        }
        if existing.is_none() {
            self.room_for(&handle)?;
        }
        match existing {
            Some(Owner::Conn(old)) if old != conn => {
                if let Some(c) = self.conns.get_mut(&old) {
                    c.regs.remove(&key);
                }
            }
            // Registered elsewhere before, now here: this connection owns it.
            Some(Owner::Store) => self.store_registrations -= 1,
            _ => {}
        }
        self.serial += 1;
        let serial = self.serial;
        let expires = now + lease;
        let h = self.handles.entry(handle.clone()).or_default();
        let changed = match h.regs.get(&entry.receiver) {
            Some(r) => r.entry != entry,
            None => true,
        };
        let store = changed || existing == Some(Owner::Store);
        let shadow = h.regs.get(&entry.receiver).and_then(|r| match r.owner {
            Owner::Store => Some(r.entry.clone()),
            Owner::Conn(_) => r.shadow.clone(),
        });
        if let Some(old) = h.regs.insert(
            entry.receiver,
            Reg {
                entry: entry.clone(),
                owner: Owner::Conn(conn),
                lease,
                expires,
                serial,
                shadow,
            },
        ) {
            self.expiries.remove(&(old.expires, old.serial));
        } else {
            self.registrations += 1;
        }
        self.expiries
            .insert((expires, serial), (handle.clone(), entry.receiver));
        if let Some(c) = self.conns.get_mut(&conn) {
            c.regs.insert(key);
        }
        let notices = if changed {
            h.watchers
                .iter()
                .map(|&to| Notice {
                    to,
                    msg: Response::Added {
                        handle: handle.clone(),
                        entry: entry.clone(),
                    },
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(Registered {
            lease,
            changed,
            store,
            notices,
        })
    }

    /// Removes a registration `conn` made.
    ///
    /// # Errors
    /// [`Refusal`] with `NotFound` when `conn` has no such registration.
    pub fn unregister(
        &mut self,
        conn: ConnId,
        handle: &Handle,
        receiver: ReceiverId,
    ) -> Result<Vec<Notice>, Refusal> {
        let owned = self
            .conns
            .get(&conn)
            .is_some_and(|c| c.regs.contains(&(handle.clone(), receiver)));
        if !owned {
            return Err(refuse(
                ErrorCode::NotFound,
                "no such registration on this connection",
            ));
        }
        Ok(self
            .remove(handle, receiver)
            .map(|(_, n)| n)
            .unwrap_or_default())
    }

    /// Renews every registration of `conn`.
    pub fn keep_alive(&mut self, conn: ConnId, now: Instant) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        for (handle, receiver) in &c.regs {
            let Some(r) = self
                .handles
                .get_mut(handle)
                .and_then(|h| h.regs.get_mut(receiver))
            else {
                continue;
            };
            self.expiries.remove(&(r.expires, r.serial));
            r.expires = now + r.lease;
            self.expiries
                .insert((r.expires, r.serial), (handle.clone(), *receiver));
        }
    }

    /// The receivers of `handle`, oldest registration first.
    pub fn lookup(&self, handle: &Handle) -> Vec<Entry> {
        let mut v: Vec<Entry> = self
            .handles
            .get(handle)
            .map(|h| h.regs.values().map(|r| r.entry.clone()).collect())
            .unwrap_or_default();
        v.sort_by_key(|e| (e.since_ms, e.receiver));
        v
    }

    /// Adds `conn` to the watchers of `handle` and returns the snapshot; the caller
    /// sends the snapshot before any later notice (it holds the lock).
    ///
    /// # Errors
    /// [`Refusal`] when the connection holds too many watches.
    pub fn watch(&mut self, conn: ConnId, handle: &Handle) -> Result<Vec<Entry>, Refusal> {
        let Some(c) = self.conns.get_mut(&conn) else {
            return Err(refuse(ErrorCode::Invalid, "unknown connection"));
        };
        if !c.watches.contains(handle) {
            if c.watches.len() >= self.limits.max_watches_per_connection {
                return Err(refuse(
                    ErrorCode::LimitReached,
                    format!(
                        "at most {} watches per connection",
                        self.limits.max_watches_per_connection
                    ),
                ));
            }
            if !self.handles.contains_key(handle) && self.handles.len() >= self.limits.max_handles {
                return Err(refuse(
                    ErrorCode::LimitReached,
                    format!("at most {} handles", self.limits.max_handles),
                ));
            }
            c.watches.insert(handle.clone());
            self.handles
                .entry(handle.clone())
                .or_default()
                .watchers
                .insert(conn);
            self.watches += 1;
        }
        Ok(self.lookup(handle))
    }

    /// Removes `conn` from the watchers of `handle`.
    pub fn unwatch(&mut self, conn: ConnId, handle: &Handle) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.watches.remove(handle) {
            self.watches -= 1;
            if let Some(h) = self.handles.get_mut(handle) {
                h.watchers.remove(&conn);
                if h.regs.is_empty() && h.watchers.is_empty() {
                    self.handles.remove(handle);
                }
            }
        }
    }

    /// Handles with at least one receiver and their counts, sorted, at most
    /// [`LIST_MAX`]; and how many there are in all.
    pub fn list(&self) -> (Vec<HandleCount>, u32) {
        let mut all: Vec<HandleCount> = self
            .handles
            .iter()
            .filter(|(_, h)| !h.regs.is_empty())
            .map(|(handle, h)| HandleCount {
                handle: handle.clone(),
                receivers: h.regs.len() as u32,
            })
            .collect();
        let total = all.len() as u32;
        all.sort_by(|a, b| a.handle.cmp(&b.handle));
        all.truncate(LIST_MAX);
        (all, total)
    }

    /// Handles with at least one receiver, sorted, each with its receivers oldest
    /// first, stopping once `max` receivers are listed; and whether it stopped early.
    pub fn receivers(&self, max: usize) -> (Vec<(Handle, Vec<Entry>)>, bool) {
        let mut handles: Vec<&Handle> = self
            .handles
            .iter()
            .filter(|(_, h)| !h.regs.is_empty())
            .map(|(handle, _)| handle)
            .collect();
        handles.sort();
        let mut out = Vec::new();
        let mut left = max;
        for handle in handles {
            if left == 0 {
                return (out, true);
            }
            let mut entries = self.lookup(handle);
            let cut = entries.len() > left;
            entries.truncate(left);
            left -= entries.len();
            out.push((handle.clone(), entries));
            if cut {
                return (out, true);
            }
        }
        (out, false)
    }

    /// Forgets `conn`: removes its registrations (telling their watchers) and its
    /// watches. Returns the notices and the registrations removed.
    pub fn disconnect(&mut self, conn: ConnId) -> (Vec<Notice>, Vec<Expired>) {
        let Some(c) = self.conns.remove(&conn) else {
            return (Vec::new(), Vec::new());
        };
        for handle in &c.watches {
            self.watches -= 1;
            if let Some(h) = self.handles.get_mut(handle) {
                h.watchers.remove(&conn);
                if h.regs.is_empty() && h.watchers.is_empty() {
                    self.handles.remove(handle);
                }
            }
        }
        let mut notices = Vec::new();
        let mut removed = Vec::new();
        for (handle, receiver) in c.regs {
            if let Some((entry, n)) = self.remove(&handle, receiver) {
                notices.extend(n);
                removed.push(Expired { handle, entry });
            }
        }
        (notices, removed)
    }

    /// Removes every registration whose lease ran out by `now`.
    pub fn expire(&mut self, now: Instant) -> (Vec<Notice>, Vec<Expired>) {
        let mut notices = Vec::new();
        let mut expired = Vec::new();
        while let Some((&(t, _), _)) = self.expiries.first_key_value() {
            if t > now {
                break;
            }
            let Some((_, (handle, receiver))) = self.expiries.pop_first() else {
                break;
            };
            let owner = self
                .handles
                .get(&handle)
                .and_then(|h| h.regs.get(&receiver))
                .map(|r| r.owner);
            if let Some(Owner::Conn(o)) = owner {
                if let Some(c) = self.conns.get_mut(&o) {
                    c.regs.remove(&(handle.clone(), receiver));
                }
            }
            if let Some((entry, n)) = self.remove(&handle, receiver) {
                notices.extend(n);
                expired.push(Expired { handle, entry });
            }
        }
        (notices, expired)
    }

    /// A registration learned from the store (made at another EPM, or by a receiver
    /// directly in etcd). Ignored when a connection here owns that receiver (an
    /// echo of this EPM's own record, or a receiver that moved here); otherwise added
    /// or updated as a store entry, and the handle's watchers are told.
    ///
    /// # Errors
    /// [`Refusal`] when a limit is reached or the endpoint is not one others can
    /// connect to: the entry is not added (the driver logs it).
    pub fn store_put(&mut self, handle: Handle, entry: Entry) -> Result<Vec<Notice>, Refusal> {
        if entry.endpoint.ip().is_unspecified() || entry.endpoint.port() == 0 {
            return Err(refuse(
                ErrorCode::Invalid,
                format!(
                    "endpoint {} is not an address senders can reach",
                    entry.endpoint
                ),
            ));
        }
        let existing = self
            .handles
            .get(&handle)
            .and_then(|h| h.regs.get(&entry.receiver))
            .map(|r| (r.owner, r.entry == entry));
        match existing {
            Some((Owner::Conn(_), _)) => {
                if let Some(r) = self
                    .handles
                    .get_mut(&handle)
                    .and_then(|h| h.regs.get_mut(&entry.receiver))
                {
                    r.shadow = Some(entry);
                }
                return Ok(Vec::new());
            }
            Some((Owner::Store, true)) => return Ok(Vec::new()),
            Some((Owner::Store, false)) => {}
            None => {
                self.room_for(&handle)?;
                self.registrations += 1;
                self.store_registrations += 1;
            }
        }
        self.serial += 1;
        let serial = self.serial;
        let h = self.handles.entry(handle.clone()).or_default();
        h.regs.insert(
            entry.receiver,
            Reg {
                entry: entry.clone(),
                owner: Owner::Store,
                lease: Duration::ZERO,
                // Not in the lease index: etcd's lease removes it.
                expires: Instant::now(),
                serial,
                shadow: None,
            },
        );
        Ok(h.watchers
            .iter()
            .map(|&to| Notice {
                to,
                msg: Response::Added {
                    handle: handle.clone(),
                    entry: entry.clone(),
                },
            })
            .collect())
    }

    /// The store says a registration is gone.
    pub fn store_delete(&mut self, handle: &Handle, receiver: ReceiverId) -> StoreDeleted {
        let owner = self
            .handles
            .get_mut(handle)
            .and_then(|h| h.regs.get_mut(&receiver))
            .map(|r| {
                r.shadow = None;
                (r.owner, r.entry.clone())
            });
        match owner {
            None => StoreDeleted::Unknown,
            Some((Owner::Conn(_), entry)) => StoreDeleted::Reassert(entry),
            Some((Owner::Store, _)) => StoreDeleted::Removed(
                self.remove(handle, receiver)
                    .map(|(_, n)| n)
                    .unwrap_or_default(),
            ),
        }
    }

    /// The store's whole content (after the first read, or a read after the watch
    /// fell behind a compaction): store entries not in `all` are removed, the others
    /// added or updated. Returns the notices, the entries refused (with why), and the
    /// connections' entries the store lacks (to put again).
    pub fn store_reset(&mut self, all: Vec<(Handle, Entry)>) -> StoreReset {
        let mut out = StoreReset::default();
        let keep: HashSet<(Handle, ReceiverId)> =
            all.iter().map(|(h, e)| (h.clone(), e.receiver)).collect();
        let mut gone = Vec::new();
        let mut missing = Vec::new();
        for (handle, h) in &mut self.handles {
            for (id, r) in &mut h.regs {
                let k = (handle.clone(), *id);
                match r.owner {
                    Owner::Store if !keep.contains(&k) => gone.push(k),
                    Owner::Conn(_) if !keep.contains(&k) => {
                        r.shadow = None;
                        missing.push((handle.clone(), r.entry.clone()))
                    }
                    _ => {}
                }
            }
        }
        for (handle, receiver) in gone {
            if let Some((_, n)) = self.remove(&handle, receiver) {
                out.notices.extend(n);
            }
        }
        for (handle, entry) in all {
            match self.store_put(handle.clone(), entry.clone()) {
                Ok(n) => out.notices.extend(n),
                Err(r) => out.refused.push((handle, entry, r)),
            }
        }
        out.reassert = missing;
        out
    }

    /// Registrations the store owns now.
    pub fn store_registrations(&self) -> usize {
        self.store_registrations
    }

    /// Whether one more registration of `handle` fits the limits.
    fn room_for(&self, handle: &Handle) -> Result<(), Refusal> {
        if self.registrations >= self.limits.max_registrations {
            return Err(refuse(
                ErrorCode::LimitReached,
                format!("at most {} registrations", self.limits.max_registrations),
            ));
        }
        match self.handles.get(handle) {
            None if self.handles.len() >= self.limits.max_handles => Err(refuse(
                ErrorCode::LimitReached,
                format!("at most {} handles", self.limits.max_handles),
            )),
            Some(h) if h.regs.len() >= self.limits.max_receivers_per_handle => Err(refuse(
                ErrorCode::LimitReached,
                format!(
                    "at most {} receivers per handle",
                    self.limits.max_receivers_per_handle
                ),
            )),
            _ => Ok(()),
        }
    }

    /// When the next lease runs out.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.expiries.first_key_value().map(|(&(t, _), _)| t)
    }

    /// Registrations now.
    pub fn registrations(&self) -> usize {
        self.registrations
    }

    /// Handles with at least one registration.
    pub fn handles(&self) -> usize {
        self.handles.values().filter(|h| !h.regs.is_empty()).count()
    }

    /// Watches now.
    pub fn watches(&self) -> usize {
        self.watches
    }

    /// Removes one registration (not from its connection's set) and returns it with
    /// the notices for its watchers. A connection's entry that the store also holds
    /// under another EPM's lease stays, as that store entry.
    fn remove(&mut self, handle: &Handle, receiver: ReceiverId) -> Option<(Entry, Vec<Notice>)> {
        let h = self.handles.get_mut(handle)?;
        let mut reg = h.regs.remove(&receiver)?;
        self.registrations -= 1;
        self.expiries.remove(&(reg.expires, reg.serial));
        match reg.owner {
            Owner::Conn(conn) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.regs.remove(&(handle.clone(), receiver));
                }
            }
            Owner::Store => self.store_registrations -= 1,
        }
        if let Some(other) = reg.shadow.take() {
            let added = other != reg.entry;
            h.regs.insert(
                receiver,
                Reg {
                    entry: other.clone(),
                    owner: Owner::Store,
                    lease: Duration::ZERO,
                    expires: reg.expires,
                    serial: reg.serial,
                    shadow: None,
                },
            );
            self.registrations += 1;
            self.store_registrations += 1;
            let notices = if added {
                h.watchers
                    .iter()
                    .map(|&to| Notice {
                        to,
                        msg: Response::Added {
                            handle: handle.clone(),
                            entry: other.clone(),
                        },
                    })
                    .collect()
            } else {
                Vec::new()
            };
            return Some((reg.entry, notices));
        }
        let notices = h
            .watchers
            .iter()
            .map(|&to| Notice {
                to,
                msg: Response::Removed {
                    handle: handle.clone(),
                    receiver,
                },
            })
            .collect();
        if h.regs.is_empty() && h.watchers.is_empty() {
            self.handles.remove(handle);
        }
        Some((reg.entry, notices))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn h(s: &str) -> Handle {
        Handle::new(s).unwrap()
    }

    fn entry(n: u8) -> Entry {
        Entry {
            endpoint: SocketAddr::from(([10, 0, 0, n], 5000 + u16::from(n))),
            receiver: ReceiverId([n; 16]),
            pid: None,
            version: 1,
            since_ms: u64::from(n),
        }
    }

    fn reg(limits: Limits) -> Registry {
        Registry::new(limits, Duration::from_secs(10))
    }

    #[test]
    fn receivers_are_listed_sorted_and_bounded() {
        let now = Instant::now();
        let mut r = reg(Limits::default());
        r.connect(1);
        r.watch(1, &h("only-watched")).unwrap();
        for (handle, n) in [("b", 3), ("a", 2), ("b", 1), ("c", 4)] {
            r.register(1, h(handle), entry(n), 0, now).unwrap();
        }
        let (all, cut) = r.receivers(10);
        assert!(!cut);
        let names: Vec<(&str, Vec<u8>)> = all
            .iter()
            .map(|(h, e)| (h.as_str(), e.iter().map(|e| e.receiver.0[0]).collect()))
            .collect();
        assert_eq!(
            names,
            vec![("a", vec![2]), ("b", vec![1, 3]), ("c", vec![4])]
        );
        assert!(!r.receivers(4).1);
        let (some, cut) = r.receivers(2);
        assert!(cut);
        assert_eq!(some.len(), 2);
        assert_eq!(some[1].1.len(), 1);
        let (some, cut) = r.receivers(3);
        assert!(cut);
        assert_eq!(some.len(), 2);
    }

    #[test]
    fn register_lookup_watch_and_disconnect() {
        let now = Instant::now();
        let mut r = reg(Limits::default());
        r.connect(1);
        r.connect(2);
        assert_eq!(r.watch(2, &h("a")).unwrap(), vec![]);
        let Registered {
            lease,
            changed,
            notices: n,
            ..
        } = r.register(1, h("a"), entry(1), 0, now).unwrap();
        assert_eq!(lease, Duration::from_secs(10));
        assert!(changed);
        assert_eq!(
            n,
            vec![Notice {
                to: 2,
                msg: Response::Added {
                    handle: h("a"),
                    entry: entry(1)
                }
            }]
        );
        // renewing the same registration tells nobody
        let again = r.register(1, h("a"), entry(1), 0, now).unwrap();
        assert!(again.notices.is_empty() && !again.changed);
        assert_eq!(r.registrations(), 1);
        assert_eq!(r.lookup(&h("a")), vec![entry(1)]);
        assert_eq!(r.list().0[0].receivers, 1);
        let (n, removed) = r.disconnect(1);
        assert_eq!(removed.len(), 1);
        assert_eq!(
            n,
            vec![Notice {
                to: 2,
                msg: Response::Removed {
                    handle: h("a"),
                    receiver: entry(1).receiver
                }
            }]
        );
        assert_eq!(r.registrations(), 0);
        assert!(r.lookup(&h("a")).is_empty());
        r.disconnect(2);
        assert_eq!(r.watches(), 0);
        assert!(r.handles.is_empty(), "no state left behind");
        assert!(r.expiries.is_empty());
    }

    #[test]
    fn unregister_only_own() {
        let now = Instant::now();
        let mut r = reg(Limits::default());
        r.connect(1);
        r.connect(2);
        r.register(1, h("a"), entry(1), 0, now).unwrap();
        assert_eq!(
            r.unregister(2, &h("a"), entry(1).receiver)
                .unwrap_err()
                .code,
            ErrorCode::NotFound
        );
        r.unregister(1, &h("a"), entry(1).receiver).unwrap();
        assert_eq!(r.registrations(), 0);
    }

    #[test]
    fn rejects_unreachable_endpoints() {
        let mut r = reg(Limits::default());
        r.connect(1);
        let mut e = entry(1);
        e.endpoint = "0.0.0.0:5".parse().unwrap();
        assert_eq!(
            r.register(1, h("a"), e, 0, Instant::now())
                .unwrap_err()
                .code,
            ErrorCode::Invalid
        );
    }

    #[test]
    fn leases_expire_and_renew() {
        let t0 = Instant::now();
        let mut r = reg(Limits::default());
        r.connect(1);
        r.connect(9);
        r.watch(9, &h("a")).unwrap();
        // asks for 2 s: granted; asks for an hour: cut to the default
        assert_eq!(
            r.register(1, h("a"), entry(1), 2000, t0).unwrap().lease,
            Duration::from_secs(2)
        );
        assert_eq!(
            r.register(1, h("a"), entry(2), 3_600_000, t0)
                .unwrap()
                .lease,
            Duration::from_secs(10)
        );
        assert_eq!(r.next_expiry(), Some(t0 + Duration::from_secs(2)));
        r.keep_alive(1, t0 + Duration::from_millis(1500));
        assert!(r.expire(t0 + Duration::from_secs(3)).1.is_empty());
        let (n, gone) = r.expire(t0 + Duration::from_millis(3500));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].entry, entry(1));
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].to, 9);
        assert_eq!(r.lookup(&h("a")), vec![entry(2)]);
        let (_, gone) = r.expire(t0 + Duration::from_secs(12));
        assert_eq!(gone.len(), 1);
        assert_eq!(r.registrations(), 0);
        // the expired registration's connection no longer owns it
        assert!(r.conns[&1].regs.is_empty());
    }

    #[test]
    fn limits_are_enforced() {
        let limits = Limits {
            max_registrations_per_connection: 2,
            max_handles: 3,
            max_receivers_per_handle: 2,
            max_watches_per_connection: 1,
            max_registrations: 5,
            ..Limits::default()
        };
        let now = Instant::now();
        let mut r = reg(limits);
        for c in 1..=5 {
            r.connect(c);
        }
        r.register(1, h("a"), entry(1), 0, now).unwrap();
        r.register(1, h("a"), entry(2), 0, now).unwrap();
        // per connection
        let e = r.register(1, h("b"), entry(3), 0, now).unwrap_err();
        assert_eq!(e.code, ErrorCode::LimitReached);
        assert!(e.text.contains("per connection"), "{}", e.text);
        // renewing an existing one is still fine at the limit
        r.register(1, h("a"), entry(2), 0, now).unwrap();
        // per handle
        let e = r.register(2, h("a"), entry(3), 0, now).unwrap_err();
        assert!(e.text.contains("per handle"), "{}", e.text);
        // handles
        r.register(2, h("b"), entry(3), 0, now).unwrap();
        r.register(2, h("c"), entry(4), 0, now).unwrap();
        let e = r.register(3, h("d"), entry(5), 0, now).unwrap_err();
        assert!(e.text.contains("handles"), "{}", e.text);
        // total
        r.register(3, h("b"), entry(6), 0, now).unwrap();
        let e = r.register(3, h("c"), entry(7), 0, now).unwrap_err();
        assert!(e.text.contains("at most 5 registrations"), "{}", e.text);
        // watches per connection, and a watch cannot create a 4th handle
        r.watch(4, &h("a")).unwrap();
        assert!(r.watch(4, &h("b")).is_err());
        assert!(r.watch(5, &h("zzz")).is_err());
        // nothing was half-done by the refusals
        assert_eq!(r.registrations(), 5);
        assert_eq!(r.expiries.len(), 5);
    }

    #[test]
    fn a_receiver_moving_to_a_new_connection_is_owned_by_it() {
        let now = Instant::now();
        let mut r = reg(Limits::default());
        r.connect(1);
        r.connect(2);
        r.register(1, h("a"), entry(1), 0, now).unwrap();
        r.register(2, h("a"), entry(1), 0, now).unwrap();
        assert_eq!(r.registrations(), 1);
        // the old connection closing does not remove it
        let (n, gone) = r.disconnect(1);
        assert!(n.is_empty() && gone.is_empty());
        assert_eq!(r.lookup(&h("a")).len(), 1);
        r.disconnect(2);
        assert_eq!(r.registrations(), 0);
    }

    #[test]
    fn store_entries_are_shown_and_never_replace_a_connections_own() {
        let now = Instant::now();
        let mut r = reg(Limits::default());
        r.connect(1);
        r.connect(9);
        r.watch(9, &h("a")).unwrap();
        // Learned from the store: watchers told, counted, no lease here.
        let n = r.store_put(h("a"), entry(1)).unwrap();
        assert_eq!(n.len(), 1);
        assert_eq!(r.store_registrations(), 1);
        assert_eq!(r.next_expiry(), None);
        assert!(r.store_put(h("a"), entry(1)).unwrap().is_empty());
        // This EPM's own registration echoed back is not duplicated or taken over.
        let reg1 = r.register(1, h("a"), entry(2), 0, now).unwrap();
        assert!(reg1.store);
        assert!(r.store_put(h("a"), entry(2)).unwrap().is_empty());
        assert_eq!((r.registrations(), r.store_registrations()), (2, 1));
        // A receiver that moves here is owned by the connection, and stored again.
        let moved = r.register(1, h("a"), entry(1), 0, now).unwrap();
        assert!(moved.store && !moved.changed);
        assert_eq!((r.registrations(), r.store_registrations()), (2, 0));
        // The store losing a connection's entry: put it again.
        assert_eq!(
            r.store_delete(&h("a"), entry(1).receiver),
            StoreDeleted::Reassert(entry(1))
        );
        r.store_put(h("a"), entry(3)).unwrap();
        match r.store_delete(&h("a"), entry(3).receiver) {
            StoreDeleted::Removed(n) => assert_eq!(n[0].to, 9),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            r.store_delete(&h("a"), entry(3).receiver),
            StoreDeleted::Unknown
        );
        // Closing the connection ends its own two; entry 2, which the store also
        // said it holds (for the registry, a put under another EPM's lease), stays
        // as the store's.
        r.store_put(h("b"), entry(4)).unwrap();
        let (_, gone) = r.disconnect(1);
        assert_eq!(gone.len(), 2);
        assert_eq!(r.lookup(&h("a")), vec![entry(2)]);
        assert_eq!(r.lookup(&h("b")), vec![entry(4)]);
        assert_eq!((r.registrations(), r.store_registrations()), (2, 2));
        let mut bad = entry(5);
        bad.endpoint = "0.0.0.0:1".parse().unwrap();
        assert!(r.store_put(h("b"), bad).is_err());
    }

    #[test]
    fn a_receiver_that_moved_to_another_epm_stays_when_its_old_connection_ends() {
        let now = Instant::now();
        let mut r = reg(Limits::default());
        r.connect(1);
        r.connect(9);
        r.watch(9, &h("a")).unwrap();
        r.register(1, h("a"), entry(1), 0, now).unwrap();
        // The receiver registered at another EPM too, which put it in the store.
        assert!(r.store_put(h("a"), entry(1)).unwrap().is_empty());
        // The old connection here closes: the entry stays, as the store's; the
        // watcher hears nothing.
        let (n, gone) = r.disconnect(1);
        assert_eq!(gone.len(), 1);
        assert!(n.is_empty(), "{n:?}");
        assert_eq!(r.lookup(&h("a")), vec![entry(1)]);
        assert_eq!((r.registrations(), r.store_registrations()), (1, 1));
        // ... until the store says it is gone.
        assert!(matches!(
            r.store_delete(&h("a"), entry(1).receiver),
            StoreDeleted::Removed(n) if n.len() == 1
        ));
        assert_eq!(r.registrations(), 0);
        // A delete from the store forgets what it said before.
        r.connect(2);
        r.register(2, h("a"), entry(2), 0, now).unwrap();
        r.store_put(h("a"), entry(2)).unwrap();
        r.store_delete(&h("a"), entry(2).receiver);
        let (n, _) = r.disconnect(2);
        assert_eq!(n.len(), 1);
        assert_eq!(r.registrations(), 0);
    }

    #[test]
    fn a_store_reset_keeps_only_what_the_store_holds() {
        let now = Instant::now();
        let mut r = reg(Limits {
            max_receivers_per_handle: 2,
            ..Limits::default()
        });
        r.connect(1);
        r.register(1, h("a"), entry(1), 0, now).unwrap();
        r.store_put(h("a"), entry(2)).unwrap();
        r.store_put(h("b"), entry(3)).unwrap();
        let out = r.store_reset(vec![
            (h("b"), entry(3)),
            (h("b"), entry(4)),
            (h("b"), entry(5)),
        ]);
        // entry 2 left, entry 4 joined, entry 5 is over the per-handle limit, and the
        // store lacks the connection's entry 1.
        assert_eq!(out.refused.len(), 1);
        assert_eq!(out.refused[0].1, entry(5));
        assert_eq!(out.reassert, vec![(h("a"), entry(1))]);
        assert_eq!(r.lookup(&h("a")), vec![entry(1)]);
        assert_eq!(r.lookup(&h("b")), vec![entry(3), entry(4)]);
        assert_eq!((r.registrations(), r.store_registrations()), (3, 2));
    }

    #[test]
    fn list_is_sorted_and_cut() {
        let now = Instant::now();
        let mut r = reg(Limits {
            max_registrations_per_connection: 10_000,
            ..Limits::default()
        });
        r.connect(1);
        for i in 0..(LIST_MAX + 5) {
            let mut e = entry(1);
            e.receiver = ReceiverId([(i % 251) as u8; 16]);
            e.receiver.0[0..8].copy_from_slice(&(i as u64).to_be_bytes());
            r.register(1, h(&format!("h{i:05}")), e, 0, now).unwrap();
        }
        let (l, total) = r.list();
        assert_eq!(total as usize, LIST_MAX + 5);
        assert_eq!(l.len(), LIST_MAX);
        assert_eq!(l[0].handle.as_str(), "h00000");
    }
}
