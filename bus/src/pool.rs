//! Reusable byte buffers: a buffer shared as [`Bytes`] goes back to its pool when the
//! last reference is dropped, so its pages stay mapped and warm for the next use (a
//! fresh buffer per use costs a page fault per 4 KiB).

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Spare buffers, at most `keep` of them, none larger than `max_capacity`.
#[derive(Debug)]
pub(crate) struct Pool {
    spare: Mutex<Vec<Vec<u8>>>,
    keep: usize,
    max_capacity: usize,
}

impl Pool {
    /// A pool that keeps at most `keep` buffers of at most `max_capacity` bytes.
    pub(crate) fn new(keep: usize, max_capacity: usize) -> Arc<Pool> {
        Arc::new(Pool {
            spare: Mutex::new(Vec::new()),
            keep,
            max_capacity,
        })
    }

    /// An empty buffer of at least `cap` bytes.
    pub(crate) fn get(&self, cap: usize) -> Vec<u8> {
        let found = self.lock().pop();
        match found {
            Some(mut b) => {
                b.reserve(cap);
                b
            }
            None => Vec::with_capacity(cap),
        }
    }

    fn put(&self, mut b: Vec<u8>) {
        if b.capacity() > self.max_capacity {
            return;
        }
        b.clear();
        let mut spare = self.lock();
        if spare.len() < self.keep {
            spare.push(b);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.spare.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Shares `buf` as `Bytes`; it comes back to this pool when the last clone is
    /// dropped.
    pub(crate) fn share(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }
}

/// A buffer shared as `Bytes`, back to its pool on drop.
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<Pool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_buffer_returns_when_the_last_clone_drops() {
        let pool = Pool::new(2, 1 << 20);
        let mut b = pool.get(100);
        b.extend_from_slice(b"abc");
        let ptr = b.as_ptr();
        let shared = pool.share(b);
        let clone = shared.slice(1..);
        drop(shared);
        assert!(pool.lock().is_empty(), "a clone still holds it");
        assert_eq!(&clone[..], b"bc");
        drop(clone);
        let again = pool.get(10);
        assert_eq!(again.as_ptr(), ptr, "the same allocation comes back");
        assert!(again.is_empty());
    }

    #[test]
    fn keeps_at_most_keep_buffers_and_none_too_large() {
        let pool = Pool::new(1, 1024);
        drop(pool.share(Vec::with_capacity(4096)));
        assert!(pool.lock().is_empty(), "over max_capacity: freed");
        drop(pool.share(Vec::with_capacity(10)));
        drop(pool.share(Vec::with_capacity(10)));
        assert_eq!(pool.lock().len(), 1);
    }
}
