//! Counters an application can export: [`SenderStats`] from [`Sender::stats`] and
//! [`ReceiverStats`] from [`Receiver::stats`], snapshots of monotonic counters (but
//! for the `current` gauges).
//!
//! Counting costs nothing per event beyond a plain integer on the `Sender` or
//! `Receiver` itself: deliveries are derived from each connection's sequence counters
//! (which exist anyway), failures are counted per failed range, bytes per socket
//! write or read, connections and handshakes once each.
//!
//! [`Sender::stats`]: crate::Sender::stats
//! [`Receiver::stats`]: crate::Receiver::stats

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use crate::report::FailReason;
use crate::HandshakeError;
use ipcbus_proto::compress::CompressionStats;
use ipcbus_proto::frame::RejectReason;

/// What a sender did since it was built: a snapshot from [`Sender::stats`].
///
/// Every count but those of [`current`](SenderStats::connected_receivers) only grows.
/// Serialized (serde) as an object with these field names; `failed` as an object from
/// each [`FailKind`] label to its count, every label present.
///
/// [`Sender::stats`]: crate::Sender::stats
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SenderStats {
    /// Events published (queued with a sequence number), whether or not any receiver
    /// was known.
    pub published: u64,
    /// Payload bytes of the events published (before compression).
    pub payload_bytes: u64,
    /// Deliveries acknowledged: for each receiver, the events it acknowledged, summed
    /// over receivers (an event taken by three receivers counts three).
    pub acked: u64,
    /// Events acknowledged by every receiver they were sent to (events published
    /// while no receiver was known are not counted): the events whose
    /// [`SendReport`](crate::SendReport) lists no failure and at least one receiver.
    pub acked_events: u64,
    /// Deliveries that failed, by reason: each (event, receiver) pair reported failed
    /// in a [`SendReport`](crate::SendReport) or a `SendFailed` event counts once.
    pub failed: ByKind<FailKind>,
    /// Bytes written to receiver sockets (frames, sealed or not, with acknowledgement
    /// requests).
    pub bytes_written: u64,
    /// What compression did ([`Sender::compression_stats`](crate::Sender::compression_stats)).
    pub compression: CompressionStats,
    /// Connections started (one per receiver discovered, one per reconnect).
    pub connects: u64,
    /// Connections started again to a receiver seen before (after its connection
    /// ended): the reconnects among `connects`.
    pub reconnects: u64,
    /// Handshakes that succeeded.
    pub handshakes: u64,
    /// Receivers connected now (handshake done, connection alive).
    pub connected_receivers: u64,
    /// Receivers events are sent to now: connected, connecting, or failed and not yet
    /// dropped by discovery (as of the last publish, `receivers()` or
    /// `wait_for_receivers()`, which take in discovery's changes).
    pub known_receivers: u64,
}

impl SenderStats {
    /// Deliveries that failed, all reasons together.
    pub fn failed_total(&self) -> u64 {
        self.failed.total()
    }
}

/// What a receiver did since it was bound: a snapshot from [`Receiver::stats`].
///
/// Every count but [`connected_senders`](ReceiverStats::connected_senders) only grows.
/// Serialized as an object with these field names; `rejected` as an object from each
/// [`RejectKind`] label to its count, every label present.
///
/// [`Receiver::stats`]: crate::Receiver::stats
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ReceiverStats {
    /// Events the application took (and so acknowledged).
    pub taken: u64,
    /// Payload bytes of those events (after inflation).
    pub payload_bytes: u64,
    /// Bytes read from sender connections after their handshake.
    pub bytes_read: u64,
    /// TCP connections accepted (before their handshake).
    pub accepted: u64,
    /// Handshakes that succeeded: sender connections established.
    pub handshakes: u64,
    /// Connections that did not become sender connections, by reason.
    pub rejected: ByKind<RejectKind>,
    /// Established sender connections that ended.
    pub closed: u64,
    /// Senders connected now.
    pub connected_senders: u64,
}

impl ReceiverStats {
    /// Connections refused or dropped before their handshake finished, all reasons
    /// together.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.total()
    }
}

/// A kind of counted reason, with a stable snake_case label (the keys of the
/// serialized [`ByKind`]).
pub trait ReasonKind: Copy + Eq + fmt::Debug + 'static {
    /// Every kind, in the order they are listed and serialized.
    const ALL: &'static [Self];
    /// The stable label.
    fn label(self) -> &'static str;
}

/// Why deliveries failed, as counted in [`SenderStats::failed`]: a [`FailReason`]
/// without its details ([`FailReason::kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailKind {
    /// `refused`: [`FailReason::Refused`].
    Refused,
    /// `timed_out`: [`FailReason::TimedOut`].
    TimedOut,
    /// `authentication_failed`: [`FailReason::AuthenticationFailed`].
    AuthenticationFailed,
    /// `rejected`: [`FailReason::Rejected`], any reason.
    Rejected,
    /// `wrong_receiver`: [`FailReason::WrongReceiver`].
    WrongReceiver,
    /// `disconnected`: [`FailReason::Disconnected`].
    Disconnected,
    /// `receiver_closed`: [`FailReason::ReceiverLeft`].
    ReceiverClosed,
    /// `protocol`: [`FailReason::Protocol`].
    Protocol,
    /// `sender_closed`: [`FailReason::SenderClosed`].
    SenderClosed,
}

impl ReasonKind for FailKind {
    const ALL: &'static [FailKind] = &[
        FailKind::Refused,
        FailKind::TimedOut,
        FailKind::AuthenticationFailed,
        FailKind::Rejected,
        FailKind::WrongReceiver,
        FailKind::Disconnected,
        FailKind::ReceiverClosed,
        FailKind::Protocol,
        FailKind::SenderClosed,
    ];

    fn label(self) -> &'static str {
        match self {
            FailKind::Refused => "refused",
            FailKind::TimedOut => "timed_out",
            FailKind::AuthenticationFailed => "authentication_failed",
            FailKind::Rejected => "rejected",
            FailKind::WrongReceiver => "wrong_receiver",
            FailKind::Disconnected => "disconnected",
            FailKind::ReceiverClosed => "receiver_closed",
            FailKind::Protocol => "protocol",
            FailKind::SenderClosed => "sender_closed",
        }
    }
}

impl FailReason {
    /// The reason's kind, as [`SenderStats::failed`] counts it.
    pub fn kind(&self) -> FailKind {
        match self {
            FailReason::Refused => FailKind::Refused,
            FailReason::TimedOut => FailKind::TimedOut,
            FailReason::AuthenticationFailed => FailKind::AuthenticationFailed,
            FailReason::Rejected(_) => FailKind::Rejected,
            FailReason::WrongReceiver => FailKind::WrongReceiver,
            FailReason::Disconnected => FailKind::Disconnected,
            FailReason::ReceiverLeft => FailKind::ReceiverClosed,
            FailReason::Protocol(_) => FailKind::Protocol,
            FailReason::SenderClosed => FailKind::SenderClosed,
        }
    }
}

/// Why a connection to a receiver did not become a sender connection, as counted in
/// [`ReceiverStats::rejected`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectKind {
    /// `authentication_failed`: the key proof did not verify (another password,
    /// salt or user).
    AuthenticationFailed,
    /// `security_mismatch`: one side encrypts or has a key and the other does not.
    SecurityMismatch,
    /// `wrong_handle`: the sender asked for another handle.
    WrongHandle,
    /// `malformed`: not a valid handshake (bad bytes, unsupported version, another
    /// protocol).
    Malformed,
    /// `busy`: the connection limit was reached, or the handshake was evicted by newer
    /// ones.
    Busy,
    /// `timed_out`: the handshake did not finish within the handshake timeout.
    TimedOut,
    /// `disconnected`: the peer closed or reset the connection during the handshake.
    Disconnected,
    /// `wrong_user`: a Unix-socket peer running as another user (`SO_PEERCRED`),
    /// refused before the handshake.
    WrongUser,
}

impl ReasonKind for RejectKind {
    const ALL: &'static [RejectKind] = &[
        RejectKind::AuthenticationFailed,
        RejectKind::SecurityMismatch,
        RejectKind::WrongHandle,
        RejectKind::Malformed,
        RejectKind::Busy,
        RejectKind::TimedOut,
        RejectKind::Disconnected,
        RejectKind::WrongUser,
    ];

    fn label(self) -> &'static str {
        match self {
            RejectKind::AuthenticationFailed => "authentication_failed",
            RejectKind::SecurityMismatch => "security_mismatch",
            RejectKind::WrongHandle => "wrong_handle",
            RejectKind::Malformed => "malformed",
            RejectKind::Busy => "busy",
            RejectKind::TimedOut => "timed_out",
            RejectKind::Disconnected => "disconnected",
            RejectKind::WrongUser => "wrong_user",
        }
    }
}

impl RejectKind {
    /// How a receiver counts a failed handshake.
    pub(crate) fn of(e: &HandshakeError) -> RejectKind {
        match e {
            HandshakeError::AuthenticationFailed => RejectKind::AuthenticationFailed,
            HandshakeError::SecurityMismatch => RejectKind::SecurityMismatch,
            HandshakeError::WrongHandle(_) => RejectKind::WrongHandle,
            HandshakeError::Timeout => RejectKind::TimedOut,
            HandshakeError::Io(_) | HandshakeError::Closed => RejectKind::Disconnected,
            HandshakeError::Rejected { reason, .. } => match reason {
                RejectReason::AuthenticationFailed => RejectKind::AuthenticationFailed,
                RejectReason::SecurityMismatch => RejectKind::SecurityMismatch,
                RejectReason::WrongHandle => RejectKind::WrongHandle,
                RejectReason::Busy | RejectReason::ShuttingDown => RejectKind::Busy,
                _ => RejectKind::Malformed,
            },
            _ => RejectKind::Malformed,
        }
    }
}

/// A count per kind: a small fixed map from each of `K::ALL` to a count. Serialized
/// as an object from each kind's label to its count, every kind present (zeros too),
/// in the order of `K::ALL`.
#[derive(Clone, PartialEq, Eq)]
pub struct ByKind<K: ReasonKind> {
    counts: Vec<(K, u64)>,
}

impl<K: ReasonKind> ByKind<K> {
    /// Every kind at zero.
    pub fn new() -> Self {
        ByKind {
            counts: K::ALL.iter().map(|&k| (k, 0)).collect(),
        }
    }

    /// The count of `kind`.
    pub fn get(&self, kind: K) -> u64 {
        self.counts.iter().find(|e| e.0 == kind).map_or(0, |e| e.1)
    }

    /// Every kind with its count, in the order of `K::ALL`.
    pub fn iter(&self) -> impl Iterator<Item = (K, u64)> + '_ {
        self.counts.iter().copied()
    }

    /// All kinds together.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|e| e.1).sum()
    }

    pub(crate) fn add(&mut self, kind: K, n: u64) {
        if let Some(e) = self.counts.iter_mut().find(|e| e.0 == kind) {
            e.1 += n;
        }
    }
}

impl<K: ReasonKind> Default for ByKind<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: ReasonKind> fmt::Debug for ByKind<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.counts.iter().map(|(k, n)| (k.label(), n)))
            .finish()
    }
}

impl<K: ReasonKind> fmt::Display for ByKind<K> {
    /// The kinds that are not zero, e.g. `2 timed_out, 5 receiver_closed`, or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (k, n) in self.iter().filter(|e| e.1 > 0) {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            write!(f, "{n} {}", k.label())?;
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

impl<K: ReasonKind> Serialize for ByKind<K> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.counts.len()))?;
        for (k, n) in &self.counts {
            m.serialize_entry(k.label(), n)?;
        }
        m.end()
    }
}

/// The receiver's counters updated by its accept loop and connection tasks: a few
/// times per connection, and once per socket read for `bytes_read`.
#[derive(Debug, Default)]
pub(crate) struct ReceiverCounters {
    pub(crate) bytes_read: AtomicU64,
    pub(crate) accepted: AtomicU64,
    pub(crate) handshakes: AtomicU64,
    pub(crate) closed: AtomicU64,
    rejected: [AtomicU64; 8],
}

impl ReceiverCounters {
    pub(crate) fn reject(&self, kind: RejectKind) {
        let i = RejectKind::ALL.iter().position(|&k| k == kind).unwrap_or(0);
        self.rejected[i].fetch_add(1, Ordering::Relaxed);
    }

    /// A snapshot, with the application side's counts.
    pub(crate) fn snapshot(&self, taken: u64, payload_bytes: u64) -> ReceiverStats {
        let mut rejected = ByKind::new();
        for (i, &k) in RejectKind::ALL.iter().enumerate() {
            rejected.add(k, self.rejected[i].load(Ordering::Relaxed));
        }
        let handshakes = self.handshakes.load(Ordering::Relaxed);
        let closed = self.closed.load(Ordering::Relaxed);
        ReceiverStats {
            taken,
            payload_bytes,
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            handshakes,
            rejected,
            closed,
            connected_senders: handshakes.saturating_sub(closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_label_and_slot() {
        assert_eq!(RejectKind::ALL.len(), 8, "ReceiverCounters::rejected");
        for all in [
            FailKind::ALL.iter().map(|k| k.label()).collect::<Vec<_>>(),
            RejectKind::ALL.iter().map(|k| k.label()).collect(),
        ] {
            let mut dedup = all.clone();
            dedup.sort_unstable();
            dedup.dedup();
            assert_eq!(dedup.len(), all.len(), "{all:?}");
        }
    }

    #[test]
    fn counts_by_kind_serialize_every_label_in_order() {
        let mut f = ByKind::<FailKind>::new();
        f.add(FailKind::ReceiverClosed, 5);
        f.add(FailKind::TimedOut, 2);
        f.add(FailKind::TimedOut, 1);
        assert_eq!(f.get(FailKind::TimedOut), 3);
        assert_eq!(f.total(), 8);
        assert_eq!(f.to_string(), "3 timed_out, 5 receiver_closed");
        assert_eq!(ByKind::<FailKind>::new().to_string(), "none");
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"refused":0,"timed_out":3,"authentication_failed":0,"rejected":0,"wrong_receiver":0,"disconnected":0,"receiver_closed":5,"protocol":0,"sender_closed":0}"#
        );
    }

    #[test]
    fn fail_reasons_map_to_their_kinds() {
        assert_eq!(FailReason::ReceiverLeft.kind().label(), "receiver_closed");
        assert_eq!(
            FailReason::Rejected(RejectReason::Busy).kind(),
            FailKind::Rejected
        );
        assert_eq!(FailReason::Protocol("x".into()).kind().label(), "protocol");
    }

    #[test]
    fn handshake_errors_map_to_reject_kinds() {
        let cases = [
            (
                HandshakeError::AuthenticationFailed,
                "authentication_failed",
            ),
            (HandshakeError::SecurityMismatch, "security_mismatch"),
            (HandshakeError::WrongHandle("x".into()), "wrong_handle"),
            (HandshakeError::Timeout, "timed_out"),
            (HandshakeError::Closed, "disconnected"),
            (HandshakeError::UnsupportedVersion(9), "malformed"),
            (
                HandshakeError::Rejected {
                    reason: RejectReason::Busy,
                    text: String::new(),
                },
                "busy",
            ),
        ];
        for (e, label) in cases {
            assert_eq!(RejectKind::of(&e).label(), label, "{e}");
        }
        let c = ReceiverCounters::default();
        c.reject(RejectKind::Busy);
        c.reject(RejectKind::Busy);
        c.handshakes.store(3, Ordering::Relaxed);
        c.closed.store(1, Ordering::Relaxed);
        let s = c.snapshot(10, 640);
        assert_eq!(s.rejected.get(RejectKind::Busy), 2);
        assert_eq!(s.rejected_total(), 2);
        assert_eq!(
            (s.taken, s.payload_bytes, s.connected_senders),
            (10, 640, 2)
        );
    }
}
