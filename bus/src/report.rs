//! What a send produced: which receivers acknowledged and which failed, and why.

use std::fmt;

use ipcbus_proto::endpoint::Endpoint;
use ipcbus_proto::frame::RejectReason;
use ipcbus_proto::ids::ReceiverId;

/// One receiver as a sender sees it. Cheap to clone (the endpoint's path is shared).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReceiverInfo {
    /// Its identity: the id it registered with; for a receiver given by endpoint
    /// ([`SenderBuilder::endpoint`](crate::SenderBuilder::endpoint)), whose id is not
    /// known before connecting, a stable id derived from the endpoint.
    pub id: ReceiverId,
    /// Where it is reached, and so over which transport
    /// ([`Endpoint::transport`]): the Unix socket when the receiver has one and the
    /// sender is on its host, else TCP.
    pub endpoint: Endpoint,
}

impl fmt::Display for ReceiverInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.endpoint, self.id)
    }
}

/// Why an event was not acknowledged by a receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailReason {
    /// The connection was refused: nothing listens there any more (stale registration).
    Refused,
    /// The receiver did not take the event in time: its queue stayed full, or the
    /// handshake or acknowledgement did not come within the send timeout.
    TimedOut,
    /// The keys differ: wrong password, salt or secret, or one side uses none.
    AuthenticationFailed,
    /// The receiver refused the connection for another reason.
    Rejected(RejectReason),
    /// A different receiver (or another program) now answers at that address.
    WrongReceiver,
    /// The connection was lost, or the receiver closed, before it acknowledged.
    Disconnected,
    /// The receiver closed and unregistered before it took the event.
    ReceiverLeft,
    /// The receiver broke the protocol; the connection was dropped.
    Protocol(String),
    /// The sender was closed or dropped before the receiver acknowledged.
    SenderClosed,
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailReason::Refused => f.write_str("connection refused"),
            FailReason::TimedOut => f.write_str("timed out"),
            FailReason::AuthenticationFailed => f.write_str(
                "authentication failed: the password and salt (IPCBUS_PASSWORD, IPCBUS_SALT) differ, or only one side has them",
            ),
            FailReason::Rejected(r) => write!(f, "rejected: {r}"),
            FailReason::WrongReceiver => {
                f.write_str("a different receiver answers at that address")
            }
            FailReason::Disconnected => f.write_str("disconnected"),
            FailReason::ReceiverLeft => f.write_str("receiver closed"),
            FailReason::Protocol(e) => write!(f, "protocol error: {e}"),
            FailReason::SenderClosed => f.write_str("sender closed"),
        }
    }
}

/// The outcome of one event: every receiver it targeted, each acknowledged or failed.
///
/// An acknowledgement means the receiving application has taken the event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SendReport {
    /// The event's sequence number.
    pub seq: u64,
    /// Receivers whose application took the event.
    pub acked: Vec<ReceiverInfo>,
    /// Receivers that did not acknowledge it, with the reason.
    pub failed: Vec<(ReceiverInfo, FailReason)>,
}

impl SendReport {
    /// How many receivers the event was sent to.
    pub fn targeted(&self) -> usize {
        self.acked.len() + self.failed.len()
    }

    /// Whether every targeted receiver acknowledged (true when there were none).
    pub fn all_acked(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Something that happened to a sender's set of receivers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SenderEvent {
    /// A receiver was discovered and its handshake succeeded.
    ReceiverJoined(ReceiverInfo),
    /// A receiver's connection ended.
    ReceiverLeft {
        /// The receiver.
        receiver: ReceiverInfo,
        /// Why.
        reason: FailReason,
    },
    /// Events were not acknowledged by a receiver (a range, since a receiver that
    /// fails usually fails for every event it had not acknowledged).
    SendFailed {
        /// First sequence number of the range.
        first_seq: u64,
        /// Last sequence number of the range (inclusive).
        last_seq: u64,
        /// The receiver.
        receiver: ReceiverInfo,
        /// Why.
        reason: FailReason,
    },
}
