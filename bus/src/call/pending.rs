//! The calls one side of a connection has in flight, with no I/O: ids handed out in
//! order from 1, a bound on how many wait at once, and what to make of a reply's id —
//! a call still waiting, a late reply to a call that gave up (dropped), or an id this
//! side never used (the peer is broken: close the connection).

use std::collections::HashMap;

/// The calls in flight on one connection, each with the value the reply goes to.
#[derive(Debug)]
pub(crate) struct Pending<T> {
    waiting: HashMap<u64, T>,
    /// The last id handed out (ids start at 1 and only grow).
    last_id: u64,
    cap: usize,
}

/// What a reply's id means.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Matched<T> {
    /// The call waiting for it: give it the reply.
    Waiting(T),
    /// A call that timed out or was cancelled: drop the reply.
    Late,
    /// An id never handed out: the peer is broken.
    Unknown,
}

/// The table is at its bound.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Full;

impl<T> Pending<T> {
    /// An empty table for at most `cap` calls at once.
    pub(crate) fn new(cap: usize) -> Pending<T> {
        Pending {
            waiting: HashMap::new(),
            last_id: 0,
            cap: cap.max(1),
        }
    }

    /// Adds a call; returns its id.
    pub(crate) fn insert(&mut self, value: T) -> Result<u64, Full> {
        if self.waiting.len() >= self.cap {
            return Err(Full);
        }
        self.last_id += 1;
        self.waiting.insert(self.last_id, value);
        Ok(self.last_id)
    }

    /// An id for a one-way request, which waits for nothing.
    pub(crate) fn next_id(&mut self) -> u64 {
        self.last_id += 1;
        self.last_id
    }

    /// Takes the call a reply with `id` answers.
    pub(crate) fn complete(&mut self, id: u64) -> Matched<T> {
        match self.waiting.remove(&id) {
            Some(v) => Matched::Waiting(v),
            None if id != 0 && id <= self.last_id => Matched::Late,
            None => Matched::Unknown,
        }
    }

    /// Forgets a call that gave up (timed out, cancelled); whether it was waiting.
    pub(crate) fn forget(&mut self, id: u64) -> bool {
        let was = self.waiting.remove(&id).is_some();
        if self.waiting.is_empty() && self.waiting.capacity() > 1024 {
            self.waiting.shrink_to(64);
        }
        was
    }

    /// Takes every waiting call (the connection ended).
    pub(crate) fn drain(&mut self) -> Vec<T> {
        self.waiting.drain().map(|(_, v)| v).collect()
    }

    /// How many calls wait.
    pub(crate) fn len(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_start_at_one_and_grow() {
        let mut p = Pending::new(4);
        assert_eq!(p.insert('a'), Ok(1));
        assert_eq!(p.insert('b'), Ok(2));
        assert_eq!(p.len(), 2);
        assert_eq!(p.complete(2), Matched::Waiting('b'));
        assert_eq!(p.insert('c'), Ok(3));
    }

    #[test]
    fn late_replies_are_told_from_unknown_ids() {
        let mut p = Pending::new(4);
        let id = p.insert(()).unwrap();
        assert!(p.forget(id));
        assert!(!p.forget(id));
        assert_eq!(p.complete(id), Matched::Late);
        assert_eq!(p.complete(id + 1), Matched::Unknown);
        assert_eq!(p.complete(u64::MAX), Matched::Unknown);
        assert_eq!(p.complete(0), Matched::Unknown);
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn bounded_and_freed_by_completion_and_forgetting() {
        let mut p = Pending::new(2);
        let a = p.insert(1).unwrap();
        let b = p.insert(2).unwrap();
        assert_eq!(p.insert(3), Err(Full));
        assert_eq!(p.complete(a), Matched::Waiting(1));
        let c = p.insert(3).unwrap();
        assert!(p.forget(b));
        assert_eq!(p.complete(b), Matched::Late);
        let mut rest = p.drain();
        rest.sort();
        assert_eq!(rest, vec![3]);
        assert_eq!(p.complete(c), Matched::Late);
        assert_eq!(p.len(), 0);
    }
}
