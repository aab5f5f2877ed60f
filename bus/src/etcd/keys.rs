//! The key layout in etcd and the view a watcher keeps, without I/O: keys and values
//! in, records and decisions out.
//!
//! A receiver's registration is the key `PREFIX/handles/HANDLE/RECEIVER_ID` (the
//! receiver id as 32 lowercase hex digits) whose value is the record's JSON
//! ([`Record::to_json`]). A key or value that does not parse, or whose value names
//! another handle or receiver than its key, is skipped (and the caller logs why): a
//! record in etcd is never trusted more than one from the network.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::registry::Record;
use ipcbus_proto::handle::Handle;
use ipcbus_proto::ids::ReceiverId;

/// The default key prefix.
pub(crate) const DEFAULT_PREFIX: &str = "/ipcbus/";

/// Where records live under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    prefix: String,
}

/// Why a key-value pair under the prefix is not a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BadRecord {
    /// The key is not UTF-8.
    KeyNotUtf8,
    /// The key is not `PREFIX/handles/HANDLE/RECEIVER_ID`.
    KeyLayout,
    /// The handle part of the key is not a valid handle.
    KeyHandle,
    /// The last part of the key is not 32 hex digits.
    KeyReceiver,
    /// The value is not a record's JSON.
    Value,
    /// The value names another handle or receiver than the key.
    Mismatch,
}

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BadRecord::KeyNotUtf8 => "the key is not UTF-8",
            BadRecord::KeyLayout => "the key is not PREFIX/handles/HANDLE/RECEIVER_ID",
            BadRecord::KeyHandle => "the key's handle is not a valid handle",
            BadRecord::KeyReceiver => "the key's receiver id is not 32 hex digits",
            BadRecord::Value => "the value is not a registry record (JSON)",
            BadRecord::Mismatch => "the value names another handle or receiver than its key",
        })
    }
}

impl Layout {
    /// The layout under `prefix`, which gets a leading and a trailing `/` if it lacks
    /// them (`ipcbus` and `/ipcbus` both mean `/ipcbus/`).
    pub(crate) fn new(prefix: &str) -> Layout {
        let mut p = String::with_capacity(prefix.len() + 2);
        if !prefix.starts_with('/') {
            p.push('/');
        }
        p.push_str(prefix);
        if !p.ends_with('/') {
            p.push('/');
        }
        Layout { prefix: p }
    }

    /// The prefix, with its slashes.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The prefix of every registration: `PREFIX/handles/`.
    pub(crate) fn all(&self) -> String {
        format!("{}handles/", self.prefix)
    }

    /// The prefix of one handle's registrations: `PREFIX/handles/HANDLE/`.
    pub(crate) fn handle(&self, handle: &Handle) -> String {
        format!("{}handles/{handle}/", self.prefix)
    }

    /// The key of one registration.
    pub(crate) fn key(&self, record: &Record) -> String {
        format!(
            "{}handles/{}/{}",
            self.prefix, record.handle, record.receiver
        )
    }

    /// The key's handle and receiver id.
    pub(crate) fn parse_key(&self, key: &[u8]) -> Result<(Handle, ReceiverId), BadRecord> {
        let key = std::str::from_utf8(key).map_err(|_| BadRecord::KeyNotUtf8)?;
        let rest = key
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix("handles/"))
            .ok_or(BadRecord::KeyLayout)?;
        let (handle, receiver) = rest.split_once('/').ok_or(BadRecord::KeyLayout)?;
        let handle = Handle::new(handle).map_err(|_| BadRecord::KeyHandle)?;
        let receiver = ReceiverId::from_hex(receiver).ok_or(BadRecord::KeyReceiver)?;
        Ok((handle, receiver))
    }

    /// The registration stored as `key` = `value`, if it is one.
    pub(crate) fn parse(&self, key: &[u8], value: &[u8]) -> Result<Record, BadRecord> {
        let (handle, receiver) = self.parse_key(key)?;
        let record = Record::from_json(value).ok_or(BadRecord::Value)?;
        if record.handle != handle || record.receiver != receiver {
            return Err(BadRecord::Mismatch);
        }
        Ok(record)
    }
}

/// What a watcher knows: the valid records under one handle's prefix, by key.
#[derive(Debug, Default)]
pub(crate) struct View {
    records: HashMap<Vec<u8>, Record>,
}

/// How a change altered a [`View`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// Nothing a sender sees changed.
    None,
    /// The set of records changed.
    Changed,
    /// The value did not parse: skipped (and a record it replaced is dropped).
    Bad(BadRecord),
}

impl View {
    /// The records, for the sender's tracker.
    pub(crate) fn records(&self) -> Arc<Vec<Record>> {
        Arc::new(self.records.values().cloned().collect())
    }

    /// How many records it holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }

    /// A key was put. A value that does not parse drops what the key held before:
    /// what etcd holds now is not a registration.
    pub(crate) fn put(&mut self, layout: &Layout, key: &[u8], value: &[u8]) -> Change {
        match layout.parse(key, value) {
            Ok(r) => match self.records.insert(key.to_vec(), r.clone()) {
                Some(old) if old == r => Change::None,
                _ => Change::Changed,
            },
            Err(bad) => {
                self.records.remove(key);
                Change::Bad(bad)
            }
        }
    }

    /// A key was deleted (or its lease ran out).
    pub(crate) fn delete(&mut self, key: &[u8]) -> Change {
        match self.records.remove(key) {
            Some(_) => Change::Changed,
            None => Change::None,
        }
    }

    /// Replaces the view with a fresh read of the prefix (after the watch's revision
    /// was compacted away); returns how many records joined and left, and the
    /// pairs that did not parse.
    pub(crate) fn replace<'a>(
        &mut self,
        layout: &Layout,
        kvs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> (usize, usize, Vec<(String, BadRecord)>) {
        let mut fresh = HashMap::new();
        let mut bad = Vec::new();
        for (k, v) in kvs {
            match layout.parse(k, v) {
                Ok(r) => {
                    fresh.insert(k.to_vec(), r);
                }
                Err(b) => bad.push((String::from_utf8_lossy(k).into_owned(), b)),
            }
        }
        let joined = fresh
            .iter()
            .filter(|(k, r)| self.records.get(*k) != Some(r))
            .count();
        let left = self
            .records
            .keys()
            .filter(|k| !fresh.contains_key(*k))
            .count();
        self.records = fresh;
        (joined, left, bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(h: &str, n: u8) -> Record {
        Record::new(
            Handle::new(h).unwrap(),
            vec![std::net::SocketAddr::from(([127, 0, 0, 1], 1000 + u16::from(n))).into()],
            ReceiverId([n; 16]),
            Some(7),
            1_700_000_000_000,
        )
    }

    #[test]
    fn prefixes_get_their_slashes() {
        assert_eq!(Layout::new("/ipcbus/").prefix(), "/ipcbus/");
        assert_eq!(Layout::new("ipcbus").prefix(), "/ipcbus/");
        assert_eq!(Layout::new("/a/b").prefix(), "/a/b/");
        assert_eq!(Layout::new("").prefix(), "/");
    }

    #[test]
    fn key_layout_is_pinned() {
        let l = Layout::new(DEFAULT_PREFIX);
        let r = rec("orders", 0xab);
        assert_eq!(
            l.key(&r),
            "/ipcbus/handles/orders/abababababababababababababababab"
        );
        assert_eq!(l.handle(&r.handle), "/ipcbus/handles/orders/");
        assert_eq!(l.all(), "/ipcbus/handles/");
        assert_eq!(l.parse(l.key(&r).as_bytes(), &r.to_json()), Ok(r));
    }

    #[test]
    fn bad_pairs_are_named() {
        let l = Layout::new(DEFAULT_PREFIX);
        let r = rec("orders", 1);
        let v = r.to_json();
        let id = "01010101010101010101010101010101";
        let (k_orders, k_other) = (
            format!("/ipcbus/handles/orders/{id}"),
            format!("/ipcbus/handles/other/{id}"),
        );
        let cases: [(&[u8], &[u8], BadRecord); 7] = [
            (b"/ipcbus/handles/orders/\xff", &v, BadRecord::KeyNotUtf8),
            (b"/other/handles/orders/x", &v, BadRecord::KeyLayout),
            (b"/ipcbus/handles/orders", &v, BadRecord::KeyLayout),
            (b"/ipcbus/handles//0101", &v, BadRecord::KeyHandle),
            (b"/ipcbus/handles/orders/zz", &v, BadRecord::KeyReceiver),
            (k_orders.as_bytes(), b"{not json", BadRecord::Value),
            (k_other.as_bytes(), &v, BadRecord::Mismatch),
        ];
        for (k, v, want) in cases {
            assert_eq!(
                l.parse(k, v),
                Err(want.clone()),
                "{}",
                String::from_utf8_lossy(k)
            );
            assert!(!want.to_string().is_empty());
        }
    }

    #[test]
    fn the_view_follows_puts_and_deletes_and_drops_bad_values() {
        let l = Layout::new(DEFAULT_PREFIX);
        let mut v = View::default();
        let (a, b) = (rec("h", 1), rec("h", 2));
        let (ka, kb) = (l.key(&a), l.key(&b));
        assert_eq!(v.put(&l, ka.as_bytes(), &a.to_json()), Change::Changed);
        assert_eq!(v.put(&l, ka.as_bytes(), &a.to_json()), Change::None);
        assert_eq!(v.put(&l, kb.as_bytes(), &b.to_json()), Change::Changed);
        assert_eq!(v.len(), 2);
        // A registration overwritten with garbage is no longer trusted.
        assert_eq!(
            v.put(&l, kb.as_bytes(), b"garbage"),
            Change::Bad(BadRecord::Value)
        );
        assert_eq!(v.len(), 1);
        assert_eq!(v.delete(kb.as_bytes()), Change::None);
        assert_eq!(v.delete(ka.as_bytes()), Change::Changed);
        assert!(v.records().is_empty());
    }

    #[test]
    fn a_fresh_read_reports_only_the_differences() {
        let l = Layout::new(DEFAULT_PREFIX);
        let mut v = View::default();
        let (a, b, c) = (rec("h", 1), rec("h", 2), rec("h", 3));
        let (ka, kb, kc) = (l.key(&a), l.key(&b), l.key(&c));
        v.put(&l, ka.as_bytes(), &a.to_json());
        v.put(&l, kb.as_bytes(), &b.to_json());
        let (va, vc) = (a.to_json(), c.to_json());
        let kvs: Vec<(&[u8], &[u8])> = vec![
            (ka.as_bytes(), &va),
            (kc.as_bytes(), &vc),
            (b"/ipcbus/handles/h/nothex", b"{}"),
        ];
        let (joined, left, bad) = v.replace(&l, kvs);
        assert_eq!((joined, left), (1, 1));
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].1, BadRecord::KeyReceiver);
        let mut ids: Vec<_> = v.records().iter().map(|r| r.receiver).collect();
        ids.sort();
        assert_eq!(ids, vec![a.receiver, c.receiver]);
    }
}
