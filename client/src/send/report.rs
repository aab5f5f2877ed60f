//! What `ipcbus send` says about the reports: the per-receiver tally and its summary
//! line, the per-event line of `-v`, and the JSON objects of `--json`.

use super::*;

pub(super) use crate::out::plural;

/// What one receiver did with the events sent to it.
#[derive(Debug, Clone, Default)]
pub(super) struct PerReceiver {
    /// Events it acknowledged.
    pub(super) acked: u64,
    /// Events it did not.
    pub(super) failed: u64,
    /// The first event sent to it.
    pub(super) first_seq: u64,
    /// Its first failure: the event and the reason.
    pub(super) first_failure: Option<(u64, FailReason)>,
}

/// Outcomes so far, per receiver.
#[derive(Debug, Default)]
pub(super) struct Tally {
    /// Events reported.
    pub(super) events: u64,
    /// Events some receiver did not acknowledge.
    pub(super) failed_events: u64,
    /// Events sent while no receiver was known (they went nowhere).
    pub(super) untargeted: u64,
    /// Receivers in the order they were first sent to.
    pub(super) order: Vec<ReceiverInfo>,
    pub(super) per: HashMap<ReceiverInfo, PerReceiver>,
}

impl Tally {
    /// Counts `r`; returns the receivers that failed for the first time.
    pub(super) fn add(&mut self, r: &SendReport) -> Vec<ReceiverInfo> {
        self.events += 1;
        if !r.all_acked() {
            self.failed_events += 1;
        }
        if r.targeted() == 0 {
            self.untargeted += 1;
        }
        for who in &r.acked {
            self.entry(who, r.seq).acked += 1;
        }
        let mut first = Vec::new();
        for (who, why) in &r.failed {
            let p = self.entry(who, r.seq);
            p.failed += 1;
            if p.first_failure.is_none() {
                p.first_failure = Some((r.seq, why.clone()));
                first.push(who.clone());
            }
        }
        first
    }

    fn entry(&mut self, who: &ReceiverInfo, seq: u64) -> &mut PerReceiver {
        let order = &mut self.order;
        self.per.entry(who.clone()).or_insert_with(|| {
            order.push(who.clone());
            PerReceiver {
                first_seq: seq,
                ..PerReceiver::default()
            }
        })
    }

    /// How to name `who`: its address, with its id when another receiver had the same
    /// address (one restarted on the same port).
    pub(super) fn name(&self, who: &ReceiverInfo) -> String {
        self.named(who, short_name(&who.endpoint))
    }

    /// How JSON names `who`: like [`name`](Self::name), with its endpoint's text form
    /// (`tcp://...`), as the report lines' `addr` and `delivered` do.
    pub(super) fn json_name(&self, who: &ReceiverInfo) -> String {
        self.named(who, who.endpoint.to_string())
    }

    fn named(&self, who: &ReceiverInfo, short: String) -> String {
        if self
            .order
            .iter()
            .filter(|o| o.endpoint == who.endpoint)
            .count()
            > 1
        {
            format!("{short} ({})", who.id)
        } else {
            short
        }
    }

    /// The summary line: `3000 events: 2 receivers acknowledged all; 127.0.0.1:4000
    /// failed 998 from event 1003 (receiver closed)`.
    pub(super) fn summary(&self) -> String {
        let head = plural(self.events, "event");
        if self.events == 0 {
            return head;
        }
        if self.order.is_empty() {
            return format!("{head}: no receivers");
        }
        let one = self.events == 1;
        let mut all = 0u64;
        let mut parts = Vec::new();
        let mut any_failed = false;
        for who in &self.order {
            let p = &self.per[who];
            if p.failed == 0 && p.acked == self.events {
                all += 1;
            } else if p.failed == 0 {
                parts.push(format!(
                    "{} acknowledged {} from event {}",
                    self.name(who),
                    p.acked,
                    p.first_seq
                ));
            } else {
                any_failed = true;
            }
        }
        let late = parts.len();
        for who in &self.order {
            let p = &self.per[who];
            let Some((seq, why)) = &p.first_failure else {
                continue;
            };
            let name = self.name(who);
            parts.push(match (one, p.failed) {
                (true, _) => format!("{name} failed ({why})"),
                (false, 1) => format!("{name} failed event {seq} ({why})"),
                (false, n) => format!("{name} failed {n} from event {seq} ({why})"),
            });
        }
        let all_part = if all > 0 {
            Some(format!(
                "{} acknowledged{}",
                plural(all, "receiver"),
                if one { "" } else { " all" }
            ))
        } else if any_failed && late == 0 {
            let any_acked = self.per.values().any(|p| p.acked > 0);
            Some(if any_acked {
                "no receiver acknowledged all".to_string()
            } else {
                "no receiver acknowledged".to_string()
            })
        } else {
            None
        };
        // Events sent while every receiver had gone (or before the first came).
        let nowhere = (self.untargeted > 0).then(|| {
            if self.untargeted == 1 {
                "1 had no receiver".to_string()
            } else {
                format!("{} had no receivers", self.untargeted)
            }
        });
        let mut s = format!("{head}: ");
        s.push_str(
            &all_part
                .into_iter()
                .chain(parts)
                .chain(nowhere)
                .collect::<Vec<_>>()
                .join("; "),
        );
        s
    }
}

/// One event's line for -v: `event 7: 2 receivers acknowledged; 127.0.0.1:4000
/// failed (receiver closed)`.
pub(super) fn event_line(r: &SendReport) -> String {
    if r.targeted() == 0 {
        return format!("event {}: no receivers", r.seq);
    }
    let mut s = format!("event {}: ", r.seq);
    if r.acked.is_empty() {
        s.push_str("no receiver acknowledged");
    } else {
        s.push_str(&plural(r.acked.len() as u64, "receiver"));
        s.push_str(" acknowledged");
    }
    for (who, why) in &r.failed {
        s.push_str(&format!("; {} failed ({why})", short_name(&who.endpoint)));
    }
    s
}

/// How the human-readable lines name a receiver: a TCP one by its bare `ip:port` (the
/// form these lines always had), any other by its endpoint's text form
/// (`unix:///...`), which names the transport. JSON lines use the text form always.
pub(super) fn short_name(e: &Endpoint) -> String {
    match e.tcp_addr() {
        Some(a) => a.to_string(),
        None => e.to_string(),
    }
}

/// One report as `send --json` prints it.
#[derive(Serialize)]
pub(super) struct ReportJson {
    pub(super) seq: u64,
    pub(super) delivered: Vec<String>,
    pub(super) failed: Vec<FailedJson>,
}

/// A receiver that did not acknowledge, and why.
#[derive(Serialize)]
pub(super) struct FailedJson {
    pub(super) addr: String,
    pub(super) reason: String,
}

/// A receiver joining or leaving, as `send --json` prints it.
#[derive(Serialize)]
pub(super) struct PresenceJson<'a> {
    pub(super) event: &'a str,
    pub(super) receiver: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) reason: Option<String>,
}

/// The last line of `send --json`.
#[derive(Serialize)]
pub(super) struct SummaryJson {
    pub(super) event: &'static str,
    pub(super) events: u64,
    pub(super) failed_events: u64,
    /// Events sent while no receiver was known.
    pub(super) no_receivers: u64,
    pub(super) receivers: Vec<ReceiverJson>,
}

/// One receiver in the summary.
#[derive(Serialize)]
pub(super) struct ReceiverJson {
    pub(super) receiver: String,
    pub(super) acked: u64,
    pub(super) failed: u64,
    pub(super) first_seq: u64,
    pub(super) first_failed_seq: Option<u64>,
    pub(super) reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn who(port: u16) -> ReceiverInfo {
        ReceiverInfo {
            id: ipcbus::ReceiverId::random(),
            endpoint: SocketAddr::from(([127, 0, 0, 1], port)).into(),
        }
    }

    fn report(
        seq: u64,
        acked: &[&ReceiverInfo],
        failed: &[(&ReceiverInfo, FailReason)],
    ) -> SendReport {
        SendReport {
            seq,
            acked: acked.iter().map(|&a| a.clone()).collect(),
            failed: failed
                .iter()
                .map(|(w, r)| ((*w).clone(), r.clone()))
                .collect(),
        }
    }

    #[test]
    fn summaries() {
        let (a, b, c) = (who(4000), who(4001), who(4002));
        let mut t = Tally::default();
        assert_eq!(t.summary(), "0 events");
        t.add(&report(1, &[], &[]));
        assert_eq!(t.summary(), "1 event: no receivers");

        let mut t = Tally::default();
        t.add(&report(1, &[&a], &[]));
        assert_eq!(t.summary(), "1 event: 1 receiver acknowledged");

        // The only receiver left: the events after it went nowhere, and say so.
        let mut t = Tally::default();
        t.add(&report(1, &[&a], &[]));
        t.add(&report(2, &[&a], &[]));
        for seq in 3..=5 {
            t.add(&report(seq, &[], &[]));
        }
        assert_eq!(
            t.summary(),
            "5 events: 127.0.0.1:4000 acknowledged 2 from event 1; 3 had no receivers"
        );

        let mut t = Tally::default();
        t.add(&report(1, &[], &[(&a, FailReason::Refused)]));
        assert_eq!(
            t.summary(),
            "1 event: no receiver acknowledged; 127.0.0.1:4000 failed (connection refused)"
        );

        let mut t = Tally::default();
        for seq in 1..=3000 {
            // The receiver at 4000 closes after event 1002 and is dropped after 2000.
            if seq < 1003 {
                t.add(&report(seq, &[&a, &b, &c], &[]));
            } else if seq <= 2000 {
                t.add(&report(seq, &[&b, &c], &[(&a, FailReason::ReceiverLeft)]));
            } else {
                t.add(&report(seq, &[&b, &c], &[]));
            }
        }
        assert_eq!(
            t.summary(),
            "3000 events: 2 receivers acknowledged all; 127.0.0.1:4000 failed 998 from event 1003 (receiver closed)"
        );

        let mut t = Tally::default();
        t.add(&report(1, &[&a], &[]));
        t.add(&report(2, &[&a], &[(&b, FailReason::Disconnected)]));
        t.add(&report(3, &[&a, &c], &[]));
        assert_eq!(
            t.summary(),
            "3 events: 1 receiver acknowledged all; 127.0.0.1:4002 acknowledged 1 from event 3; \
             127.0.0.1:4001 failed event 2 (disconnected)"
        );

        let mut t = Tally::default();
        t.add(&report(1, &[], &[(&a, FailReason::TimedOut)]));
        t.add(&report(2, &[], &[(&a, FailReason::TimedOut)]));
        assert_eq!(
            t.summary(),
            "2 events: no receiver acknowledged; 127.0.0.1:4000 failed 2 from event 1 (timed out)"
        );

        let mut t = Tally::default();
        t.add(&report(1, &[&a], &[]));
        t.add(&report(2, &[], &[(&a, FailReason::Disconnected)]));
        assert_eq!(
            t.summary(),
            "2 events: no receiver acknowledged all; 127.0.0.1:4000 failed event 2 (disconnected)"
        );
    }

    #[test]
    fn event_lines() {
        let (a, b) = (who(4000), who(4001));
        assert_eq!(event_line(&report(1, &[], &[])), "event 1: no receivers");
        assert_eq!(
            event_line(&report(2, &[&a], &[])),
            "event 2: 1 receiver acknowledged"
        );
        assert_eq!(
            event_line(&report(3, &[], &[(&b, FailReason::TimedOut)])),
            "event 3: no receiver acknowledged; 127.0.0.1:4001 failed (timed out)"
        );
    }
}
