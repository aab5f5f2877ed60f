//! Admission of connections that have not finished their handshake.
//!
//! A server gives every new connection a slot here before its handshake and frees the
//! slot when the handshake ends. When every slot is taken, the *oldest* half-open
//! connection is evicted to admit the new one. A flood of connections that never
//! finish the handshake therefore cannot lock legitimate clients out for the length of
//! the handshake timeout: a legitimate handshake takes milliseconds, so an attacker
//! would need more new connections than there are slots within that time to evict it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::transport::{Accepted, ByteStream, Listener, Peer};

/// The accept loop of every server (receivers and the endpoint manager): accepts,
/// refuses Unix-socket peers of another uid, admits each connection among the
/// half-open ones under the connection limit, and retries failed accepts (out of file
/// descriptors and the like) with a backoff from 10 ms to 1 s instead of spinning.
#[derive(Debug)]
pub struct Acceptor {
    listener: Listener,
    gate: HandshakeGate,
    limit: Arc<Semaphore>,
}

/// A connection [`Acceptor::next`] hands out.
#[derive(Debug)]
pub enum Incoming {
    /// Admitted: run its handshake while the slot is not evicted, and hold the permit
    /// as long as the connection lives. `evicted` says whether an older half-open
    /// connection was evicted to make room.
    Admitted {
        /// The connection.
        stream: ByteStream,
        /// Who it is.
        peer: Peer,
        /// Its half-open slot, until the handshake ends.
        slot: HandshakeSlot,
        /// Its place under the connection limit.
        permit: OwnedSemaphorePermit,
        /// Whether the oldest half-open connection was evicted for it.
        evicted: bool,
    },
    /// The connection limit is reached: refuse it (or drop it).
    Busy {
        /// The connection.
        stream: ByteStream,
        /// Who it is.
        peer: Peer,
    },
    /// A Unix-socket peer running as another user; it was closed before any byte.
    WrongUser(Peer),
}

impl Acceptor {
    /// Accepts on `listener`, admitting through `gate` under `limit`.
    pub fn new(listener: Listener, gate: HandshakeGate, limit: Arc<Semaphore>) -> Acceptor {
        Acceptor {
            listener,
            gate,
            limit,
        }
    }

    /// The next connection; `None` once `cancel` fires.
    pub async fn next(&self, cancel: &CancellationToken) -> Option<Incoming> {
        let mut backoff = Duration::from_millis(10);
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => return None,
                r = self.listener.accept() => r,
            };
            match accepted {
                Ok(Accepted::WrongUser(peer)) => return Some(Incoming::WrongUser(peer)),
                Ok(Accepted::Ok(stream, peer)) => {
                    // Admit it among the half-open connections first: a flood of
                    // handshakes that never finish evicts itself, not the clients.
                    return Some(match self.gate.admit_under(&self.limit).await {
                        Some((slot, permit, evicted)) => Incoming::Admitted {
                            stream,
                            peer,
                            slot,
                            permit,
                            evicted,
                        },
                        None => Incoming::Busy { stream, peer },
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// Bounded set of half-open connections; cheap to clone.
#[derive(Debug, Clone)]
pub struct HandshakeGate {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cap: usize,
    next: AtomicU64,
    open: Mutex<VecDeque<(u64, CancellationToken)>>,
}

/// One connection's slot; evicted when [`HandshakeSlot::evicted`] resolves, freed on
/// drop.
#[derive(Debug)]
pub struct HandshakeSlot {
    gate: Arc<Inner>,
    id: u64,
    token: CancellationToken,
}

impl HandshakeGate {
    /// A gate with room for `cap` (at least 1) connections in their handshake.
    pub fn new(cap: usize) -> HandshakeGate {
        HandshakeGate {
            inner: Arc::new(Inner {
                cap: cap.max(1),
                next: AtomicU64::new(0),
                open: Mutex::new(VecDeque::new()),
            }),
        }
    }

    /// Admits a new connection, evicting the oldest half-open one if the gate is full.
    /// Returns the slot and whether someone was evicted.
    pub fn admit(&self) -> (HandshakeSlot, bool) {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        let mut open = self.inner.open.lock().unwrap_or_else(|e| e.into_inner());
        let mut evicted = false;
        while open.len() >= self.inner.cap {
            if let Some((_, t)) = open.pop_front() {
                t.cancel();
                evicted = true;
            }
        }
        open.push_back((id, token.clone()));
        (
            HandshakeSlot {
                gate: self.inner.clone(),
                id,
                token,
            },
            evicted,
        )
    }

    /// Admits a new connection under a connection limit: a half-open slot (evicting
    /// the oldest half-open connection if the gate is full) and a permit of `limit`.
    /// After an eviction it waits up to 100 ms for the evicted connection to hand its
    /// permit back. `None` when the connection limit is reached. The flag says
    /// whether someone was evicted.
    pub async fn admit_under(
        &self,
        limit: &Arc<Semaphore>,
    ) -> Option<(HandshakeSlot, OwnedSemaphorePermit, bool)> {
        let (slot, evicted) = self.admit();
        let permit = match limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) if evicted => tokio::time::timeout(
                std::time::Duration::from_millis(100),
                limit.clone().acquire_owned(),
            )
            .await
            .ok()?
            .ok()?,
            Err(_) => return None,
        };
        Some((slot, permit, evicted))
    }

    /// How many connections are in their handshake now.
    pub fn len(&self) -> usize {
        self.inner
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Whether no connection is in its handshake.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl HandshakeSlot {
    /// Resolves when a newer connection evicted this one.
    pub async fn evicted(&self) {
        self.token.cancelled().await
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = open.iter().position(|(id, _)| *id == self.id) {
            open.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn evicts_the_oldest_when_full_and_frees_on_drop() {
        let gate = HandshakeGate::new(2);
        let (a, ea) = gate.admit();
        let (b, eb) = gate.admit();
        assert!(!ea && !eb);
        assert_eq!(gate.len(), 2);
        let (c, ec) = gate.admit();
        assert!(ec, "a third admission evicts");
        tokio::time::timeout(std::time::Duration::from_secs(1), a.evicted())
            .await
            .expect("oldest evicted");
        assert!(!b.token.is_cancelled());
        drop(a);
        assert_eq!(gate.len(), 2);
        drop(b);
        drop(c);
        assert!(gate.is_empty());
    }
}
