//! `--stats` of `listen` and `send`: the library's counters printed at the end, as a
//! few `stats: ...` lines on stderr, or with --json as one `{"event":"stats",...}`
//! object on stdout.

use ipcbus::{ReceiverStats, SenderStats};
use serde::Serialize;

use crate::out::{self, plural};

/// The stats object of `--json`: `"event":"stats"` and the counters' own fields.
#[derive(Serialize)]
struct StatsJson<'a, T: Serialize> {
    event: &'static str,
    #[serde(flatten)]
    stats: &'a T,
}

/// Prints a sender's counters.
///
/// # Errors
/// Writing stdout (with --json).
pub fn print_sender(json: bool, s: &SenderStats) -> anyhow::Result<()> {
    print(json, s, sender_lines(s))
}

/// Prints a receiver's counters.
///
/// # Errors
/// Writing stdout (with --json).
pub fn print_receiver(json: bool, s: &ReceiverStats) -> anyhow::Result<()> {
    print(json, s, receiver_lines(s))
}

fn print<T: Serialize>(json: bool, stats: &T, lines: Vec<String>) -> anyhow::Result<()> {
    if json {
        out::line(serde_json::to_string(&StatsJson {
            event: "stats",
            stats,
        })?)?;
    } else {
        for l in lines {
            out::note(format!("stats: {l}"));
        }
    }
    Ok(())
}

fn sender_lines(s: &SenderStats) -> Vec<String> {
    vec![
        format!(
            "{} published ({} payload bytes), {} acknowledged by all; {} acknowledged, {} failed ({})",
            plural(s.published, "event"),
            s.payload_bytes,
            s.acked_events,
            deliveries(s.acked),
            s.failed_total(),
            s.failed,
        ),
        format!(
            "{} bytes written; compression: {}",
            s.bytes_written, s.compression
        ),
        format!(
            "receivers: {} connected, {} known; {}, {} reconnects, {} handshakes",
            s.connected_receivers,
            s.known_receivers,
            plural(s.connects, "connect"),
            s.reconnects,
            s.handshakes,
        ),
    ]
}

/// `1 delivery`, `2 deliveries` (not a regular plural).
fn deliveries(n: u64) -> String {
    if n == 1 {
        "1 delivery".to_owned()
    } else {
        format!("{n} deliveries")
    }
}

fn receiver_lines(s: &ReceiverStats) -> Vec<String> {
    vec![
        format!(
            "{} taken ({} payload bytes); {} bytes read",
            plural(s.taken, "event"),
            s.payload_bytes,
            s.bytes_read,
        ),
        format!(
            "senders: {} connected; {} accepted, {} handshakes, {} closed; {} rejected ({})",
            s.connected_senders,
            plural(s.accepted, "connection"),
            s.handshakes,
            s.closed,
            s.rejected_total(),
            s.rejected,
        ),
    ]
}
