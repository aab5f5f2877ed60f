//! What the HTTP monitoring endpoint shows, without any I/O: the service's counters
//! ([`Stats`], cheap atomics the server bumps), a point-in-time [`Report`] the server
//! builds under its registry lock, and the three renderings of a report: `/status`
//! JSON, `/metrics` in the Prometheus text format (version 0.0.4) and the `/` page.
//!
//! The exact JSON shape and metric names are documented in `docs/EPM.md`,
//! "Monitoring".

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use ipcbus::{Handle, HandshakeError};
use ipcbus_proto::epm::Entry;
use serde::Serialize;

use crate::config::Limits;

/// Most receivers listed in one report (`by_handle`); past it `truncated` is true.
/// Keeps a `/status` answer under about 2 MB however full the registry is.
pub const REPORT_MAX_RECEIVERS: usize = 10_000;

/// The kinds of client request, the `kind` label of `ipcbus_epm_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// `Register` (also each renewal by registering again).
    Register,
    /// `Unregister`.
    Unregister,
    /// `KeepAlive`.
    KeepAlive,
    /// `Lookup`.
    Lookup,
    /// `Watch`.
    Watch,
    /// `Unwatch`.
    Unwatch,
    /// `List`.
    List,
    /// `Status`.
    Status,
    /// A request this version does not know.
    Unknown,
}

impl RequestKind {
    /// Every kind, in the order of the metric lines.
    pub const ALL: [RequestKind; 9] = [
        RequestKind::Register,
        RequestKind::Unregister,
        RequestKind::KeepAlive,
        RequestKind::Lookup,
        RequestKind::Watch,
        RequestKind::Unwatch,
        RequestKind::List,
        RequestKind::Status,
        RequestKind::Unknown,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            RequestKind::Register => "register",
            RequestKind::Unregister => "unregister",
            RequestKind::KeepAlive => "keep_alive",
            RequestKind::Lookup => "lookup",
            RequestKind::Watch => "watch",
            RequestKind::Unwatch => "unwatch",
            RequestKind::List => "list",
            RequestKind::Status => "status",
            RequestKind::Unknown => "unknown",
        }
    }
}

/// Why a client connection was refused before or during its handshake, the `reason`
/// label of `ipcbus_epm_handshakes_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectKind {
    /// The connection limit was reached (`Busy`).
    Busy,
    /// The handshake did not finish within `--handshake-timeout-ms`.
    Timeout,
    /// Evicted by newer connections while too many handshakes were unfinished.
    Evicted,
    /// Wrong password or salt.
    AuthenticationFailed,
    /// A password on one side only.
    SecurityMismatch,
    /// Not an ipcbus EPM client: bytes that are no handshake, another handle or
    /// protocol version.
    Protocol,
    /// The client closed the connection or the socket failed during the handshake.
    Closed,
}

impl RejectKind {
    /// Every reason, in the order of the metric lines.
    pub const ALL: [RejectKind; 7] = [
        RejectKind::Busy,
        RejectKind::Timeout,
        RejectKind::Evicted,
        RejectKind::AuthenticationFailed,
        RejectKind::SecurityMismatch,
        RejectKind::Protocol,
        RejectKind::Closed,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            RejectKind::Busy => "busy",
            RejectKind::Timeout => "timeout",
            RejectKind::Evicted => "evicted",
            RejectKind::AuthenticationFailed => "authentication_failed",
            RejectKind::SecurityMismatch => "security_mismatch",
            RejectKind::Protocol => "protocol",
            RejectKind::Closed => "closed",
        }
    }

    /// The reason of a failed handshake.
    pub fn of(e: &HandshakeError) -> RejectKind {
        match e {
            HandshakeError::AuthenticationFailed => RejectKind::AuthenticationFailed,
            HandshakeError::SecurityMismatch => RejectKind::SecurityMismatch,
            HandshakeError::Timeout => RejectKind::Timeout,
            HandshakeError::Io(_) | HandshakeError::Closed => RejectKind::Closed,
            _ => RejectKind::Protocol,
        }
    }
}

/// The service's counters since start: relaxed atomics, bumped on the request path.
#[derive(Debug, Default)]
pub struct Stats {
    requests: [AtomicU64; RequestKind::ALL.len()],
    rejected: [AtomicU64; RejectKind::ALL.len()],
    lease_expiries: AtomicU64,
    notifications: AtomicU64,
    store_events: AtomicU64,
    store_skipped: AtomicU64,
}

impl Stats {
    /// Counts one request.
    pub fn request(&self, kind: RequestKind) {
        self.requests[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one refused connection.
    pub fn rejected(&self, why: RejectKind) {
        self.rejected[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts registrations removed because their lease ran out.
    pub fn expired(&self, n: usize) {
        self.lease_expiries.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts watch notifications (`Added`, `Removed`) queued for watchers.
    pub fn notified(&self, n: usize) {
        self.notifications.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts one event of the store's watch applied (a snapshot counts once).
    pub fn store_event(&self) {
        self.store_events.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts registrations in the store not taken (no TCP endpoint, a limit).
    pub fn store_skipped(&self, n: usize) {
        self.store_skipped.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The counters' values now.
    pub fn counters(&self) -> Counters {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            requests: RequestKind::ALL
                .iter()
                .map(|&k| (k.label(), get(&self.requests[k as usize])))
                .collect(),
            handshakes_rejected: RejectKind::ALL
                .iter()
                .map(|&k| (k.label(), get(&self.rejected[k as usize])))
                .collect(),
            lease_expiries: get(&self.lease_expiries),
            watch_notifications: get(&self.notifications),
            store_events: get(&self.store_events),
            store_skipped: get(&self.store_skipped),
        }
    }
}

/// The counters' values at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Requests by kind label.
    pub requests: std::collections::BTreeMap<&'static str, u64>,
    /// Refused connections by reason label.
    pub handshakes_rejected: std::collections::BTreeMap<&'static str, u64>,
    /// Registrations removed because their lease ran out.
    pub lease_expiries: u64,
    /// `Added` and `Removed` notices queued for watchers.
    pub watch_notifications: u64,
    /// Events of the store's watch applied (puts, deletes, snapshots).
    pub store_events: u64,
    /// Registrations in the store not taken: no TCP endpoint, or a limit reached.
    pub store_skipped: u64,
}

/// The state of the service at one moment: the `/status` JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The service's version.
    pub version: &'static str,
    /// Seconds since start.
    pub uptime_s: u64,
    /// Handles with at least one receiver.
    pub handles: usize,
    /// Registrations (receivers) in all.
    pub registrations: usize,
    /// Servers of calls registered in all.
    pub servers: usize,
    /// Client connections open now (handshaking ones included).
    pub connections: usize,
    /// Watches in all.
    pub watches: usize,
    /// Where registrations are kept: `memory`, or `etcd URLS prefix PREFIX`.
    pub store: String,
    /// Registrations learned from the store (made at other EPMs or directly in
    /// etcd); included in `registrations`.
    pub store_registrations: usize,
    /// Registrations made here not yet confirmed in the store (0 with `memory`).
    pub store_pending: usize,
    /// The longest lease granted, in milliseconds.
    pub lease_ms: u64,
    /// The configured limits (the JSON names them as the config file does).
    pub limits: Limits,
    /// Counters since start.
    pub counters: Counters,
    /// Handles and their receivers, sorted by handle, each handle's oldest receiver
    /// first; at most [`REPORT_MAX_RECEIVERS`] receivers.
    pub by_handle: Vec<HandleReport>,
    /// Whether `by_handle` was cut short.
    pub truncated: bool,
}

/// One handle and its receivers.
#[derive(Debug, Clone, Serialize)]
pub struct HandleReport {
    /// The handle.
    pub handle: String,
    /// Its receivers.
    pub receivers: Vec<ReceiverReport>,
}

/// One registered receiver.
#[derive(Debug, Clone, Serialize)]
pub struct ReceiverReport {
    /// Where it accepts connections, `ip:port`.
    pub addr: String,
    /// Its id, 32 hex digits.
    pub receiver_id: String,
    /// Its process id, when it said.
    pub pid: Option<u32>,
    /// When it registered, RFC 3339 UTC (the receiver's clock).
    pub since: String,
    /// The same in milliseconds since the Unix epoch.
    pub since_ms: u64,
}

impl HandleReport {
    /// The report of `handle` and its entries.
    pub fn new(handle: &Handle, entries: &[Entry]) -> HandleReport {
        HandleReport {
            handle: handle.as_str().to_owned(),
            receivers: entries
                .iter()
                .map(|e| ReceiverReport {
                    addr: e.endpoint.to_string(),
                    receiver_id: e.receiver.to_string(),
                    pid: e.pid,
                    since: rfc3339_ms(e.since_ms),
                    since_ms: e.since_ms,
                })
                .collect(),
        }
    }
}

impl Report {
    /// The `/status` body.
    pub fn json(&self) -> String {
        // Serializing plain structs of strings and numbers cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".to_owned())
    }

    /// The `/metrics` body, Prometheus text format 0.0.4.
    pub fn metrics(&self) -> String {
        let mut m = Metrics(String::with_capacity(4096));
        m.one(
            "ipcbus_epm_build_info",
            "gauge",
            "Always 1; the label is the service's version.",
            &[("version", self.version)],
            1,
        );
        m.one(
            "ipcbus_epm_uptime_seconds",
            "gauge",
            "Seconds since the service started.",
            &[],
            self.uptime_s,
        );
        for (name, help, v) in [
            (
                "ipcbus_epm_registrations",
                "Receivers registered now.",
                self.registrations,
            ),
            (
                "ipcbus_epm_servers",
                "Servers of calls registered now.",
                self.servers,
            ),
            (
                "ipcbus_epm_handles",
                "Handles with at least one receiver now.",
                self.handles,
            ),
            (
                "ipcbus_epm_connections",
                "Client connections open now.",
                self.connections,
            ),
            ("ipcbus_epm_watches", "Watches held now.", self.watches),
            (
                "ipcbus_epm_store_registrations",
                "Receivers registered now that were learned from the store (other EPMs, etcd).",
                self.store_registrations,
            ),
            (
                "ipcbus_epm_store_pending",
                "Registrations made here not yet confirmed in the store.",
                self.store_pending,
            ),
            (
                "ipcbus_epm_connections_max",
                "The connection limit (--max-connections).",
                self.limits.max_connections,
            ),
            (
                "ipcbus_epm_registrations_max",
                "The registration limit (--max-registrations).",
                self.limits.max_registrations,
            ),
            (
                "ipcbus_epm_handles_max",
                "The handle limit (--max-handles).",
                self.limits.max_handles,
            ),
        ] {
            m.one(name, "gauge", help, &[], v as u64);
        }
        m.one(
            "ipcbus_epm_lease_seconds",
            "gauge",
            "The longest lease granted, in seconds.",
            &[],
            self.lease_ms as f64 / 1000.0,
        );
        m.family(
            "ipcbus_epm_requests_total",
            "counter",
            "Client requests handled, by kind.",
            "kind",
            &self.counters.requests,
        );
        m.family(
            "ipcbus_epm_handshakes_rejected_total",
            "counter",
            "Client connections refused before or during the handshake, by reason.",
            "reason",
            &self.counters.handshakes_rejected,
        );
        m.one(
            "ipcbus_epm_lease_expiries_total",
            "counter",
            "Registrations removed because their lease ran out.",
            &[],
            self.counters.lease_expiries,
        );
        m.one(
            "ipcbus_epm_watch_notifications_total",
            "counter",
            "Added and Removed notices queued for watchers.",
            &[],
            self.counters.watch_notifications,
        );
        m.one(
            "ipcbus_epm_store_events_total",
            "counter",
            "Events of the store's watch applied (puts, deletes, snapshots).",
            &[],
            self.counters.store_events,
        );
        m.one(
            "ipcbus_epm_store_skipped_total",
            "counter",
            "Registrations in the store not taken: no TCP endpoint, or a limit reached.",
            &[],
            self.counters.store_skipped,
        );
        m.0
    }

    /// The `/` page: self-contained HTML that reloads itself every 2 s.
    pub fn page(&self) -> String {
        let mut h = String::with_capacity(4096);
        let _ = write!(
            h,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta http-equiv=\"refresh\" content=\"2\">\
             <title>ipcbus epm</title><style>{STYLE}</style></head><body>\n\
             <h1>ipcbus endpoint manager</h1>\n<p class=\"sum\">version {} &middot; up {} \
             &middot; <b id=\"handles\">{}</b> handles &middot; <b id=\"registrations\">{}</b> \
             receivers &middot; <b id=\"connections\">{}</b> connections &middot; {} watches \
             &middot; lease {} ms &middot; store {}</p>\n",
            escape(self.version),
            uptime(self.uptime_s),
            self.handles,
            self.registrations,
            self.connections,
            self.watches,
            self.lease_ms,
            escape(&self.store),
        );
        if self.by_handle.is_empty() {
            h.push_str("<p class=\"none\">No receivers are registered.</p>\n");
        } else {
            h.push_str(
                "<table><thead><tr><th>handle</th><th>receiver address</th>\
                 <th>receiver id</th><th>pid</th><th>since (UTC)</th></tr></thead><tbody>\n",
            );
            for hr in &self.by_handle {
                for (i, r) in hr.receivers.iter().enumerate() {
                    h.push_str("<tr>");
                    if i == 0 {
                        let _ = write!(
                            h,
                            "<td class=\"handle\" rowspan=\"{}\">{}</td>",
                            hr.receivers.len(),
                            escape(&hr.handle)
                        );
                    }
                    let _ = writeln!(
                        h,
                        "<td>{}</td><td class=\"id\">{}</td><td>{}</td><td>{}</td></tr>",
                        escape(&r.addr),
                        escape(&r.receiver_id),
                        r.pid.map(|p| p.to_string()).unwrap_or_default(),
                        escape(&r.since),
                    );
                }
            }
            h.push_str("</tbody></table>\n");
            if self.truncated {
                let _ = writeln!(
                    h,
                    "<p class=\"none\">Only the first {REPORT_MAX_RECEIVERS} receivers are listed.</p>"
                );
            }
        }
        h.push_str(
            "<p class=\"foot\"><a href=\"/status\">/status</a> (JSON) &middot; \
             <a href=\"/metrics\">/metrics</a> (Prometheus)</p>\n</body></html>\n",
        );
        h
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.4em;margin:0 0 .3em}.sum{color:#555}\
table{border-collapse:collapse;margin-top:1em}\
th,td{border:1px solid #ccc;padding:.3em .7em;text-align:left;vertical-align:baseline}\
th{background:#f0f0f0}.handle{font-weight:bold}.id{font-family:monospace;font-size:.9em}\
.none,.foot{color:#777}";

/// Writes metric families in the text format.
struct Metrics(String);

impl Metrics {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn one(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        labels: &[(&str, &str)],
        v: impl std::fmt::Display,
    ) {
        self.head(name, kind, help);
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", label_escape(val));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {v}");
    }

    fn family(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        label: &str,
        values: &std::collections::BTreeMap<&'static str, u64>,
    ) {
        self.head(name, kind, help);
        for (l, v) in values {
            let _ = writeln!(self.0, "{name}{{{label}=\"{}\"}} {v}", label_escape(l));
        }
    }
}

/// A label value escaped for the text format: backslash, double quote, newline.
fn label_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Text escaped for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `3 d 04:05:06`-style uptime.
fn uptime(s: u64) -> String {
    let (d, h, m, s) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    if d > 0 {
        format!("{d} d {h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}:{s:02}")
    }
}

/// Formats milliseconds since the Unix epoch as RFC 3339 in UTC with milliseconds,
/// e.g. `2024-05-01T12:34:56.789Z`. The same arithmetic as the `ipcbus` command
/// line's `client/src/time.rs` (no date crate for a dozen lines).
fn rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let millis = ms % 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Days since 0000-03-01 in 400-year eras of 146 097 days; years start in March
    // so the leap day ends them.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipcbus::ReceiverId;

    fn report() -> Report {
        let stats = Stats::default();
        stats.request(RequestKind::Register);
        stats.request(RequestKind::Register);
        stats.rejected(RejectKind::AuthenticationFailed);
        stats.expired(3);
        stats.notified(5);
        let h = Handle::new("a<b>&\"c\"").unwrap();
        let e = Entry {
            endpoint: "10.0.0.2:5000".parse().unwrap(),
            receiver: ReceiverId([0xab; 16]),
            pid: Some(42),
            version: 1,
            since_ms: 1_700_000_000_123,
        };
        Report {
            version: "1.2.3",
            uptime_s: 90_061,
            handles: 1,
            registrations: 1,
            servers: 0,
            connections: 2,
            watches: 0,
            store: "memory".to_owned(),
            store_registrations: 0,
            store_pending: 0,
            lease_ms: 10_000,
            limits: Limits::default(),
            counters: stats.counters(),
            by_handle: vec![HandleReport::new(&h, &[e])],
            truncated: false,
        }
    }

    #[test]
    fn json_has_the_documented_shape() {
        let v: serde_json::Value = serde_json::from_str(&report().json()).unwrap();
        assert_eq!(v["version"], "1.2.3");
        assert_eq!(v["uptime_s"], 90_061);
        assert_eq!(v["limits"]["max_connections"], 1024);
        assert_eq!(v["counters"]["requests"]["register"], 2);
        assert_eq!(v["counters"]["requests"]["lookup"], 0);
        assert_eq!(
            v["counters"]["handshakes_rejected"]["authentication_failed"],
            1
        );
        assert_eq!(v["counters"]["lease_expiries"], 3);
        assert_eq!(v["counters"]["watch_notifications"], 5);
        let r = &v["by_handle"][0]["receivers"][0];
        assert_eq!(v["by_handle"][0]["handle"], "a<b>&\"c\"");
        assert_eq!(r["addr"], "10.0.0.2:5000");
        assert_eq!(r["receiver_id"], "ab".repeat(16));
        assert_eq!(r["pid"], 42);
        assert_eq!(r["since"], "2023-11-14T22:13:20.123Z");
        assert_eq!(r["since_ms"], 1_700_000_000_123u64);
        assert_eq!(v["truncated"], false);
    }

    #[test]
    fn metrics_lines() {
        let m = report().metrics();
        for line in [
            "# TYPE ipcbus_epm_requests_total counter",
            "ipcbus_epm_requests_total{kind=\"register\"} 2",
            "ipcbus_epm_requests_total{kind=\"keep_alive\"} 0",
            "ipcbus_epm_handshakes_rejected_total{reason=\"authentication_failed\"} 1",
            "ipcbus_epm_lease_expiries_total 3",
            "ipcbus_epm_watch_notifications_total 5",
            "ipcbus_epm_store_events_total 0",
            "ipcbus_epm_store_registrations 0",
            "# TYPE ipcbus_epm_registrations gauge",
            "ipcbus_epm_registrations 1",
            "ipcbus_epm_servers 0",
            "ipcbus_epm_build_info{version=\"1.2.3\"} 1",
            "ipcbus_epm_lease_seconds 10",
        ] {
            assert!(m.lines().any(|l| l == line), "{line:?} not in\n{m}");
        }
        // every sample's family has HELP and TYPE before it
        let mut typed = std::collections::HashSet::new();
        for l in m.lines() {
            if let Some(r) = l.strip_prefix("# TYPE ") {
                typed.insert(r.split(' ').next().unwrap().to_owned());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(typed.contains(name), "{l}");
            }
        }
        assert!(m.ends_with('\n'));
    }

    #[test]
    fn page_escapes_handles_and_reloads() {
        let p = report().page();
        assert!(p.contains("a&lt;b&gt;&amp;&quot;c&quot;"), "{p}");
        assert!(!p.contains("a<b>"));
        assert!(p.contains("http-equiv=\"refresh\""));
        assert!(p.contains("10.0.0.2:5000"));
        assert!(p.contains("1 d 01:01:01"));
        assert!(!p.contains("http://") && !p.contains("https://"));
    }

    #[test]
    fn handshake_failures_have_reasons() {
        use ipcbus::RejectReason;
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        for (e, want) in [
            (
                HandshakeError::AuthenticationFailed,
                "authentication_failed",
            ),
            (HandshakeError::SecurityMismatch, "security_mismatch"),
            (HandshakeError::Timeout, "timeout"),
            (HandshakeError::Closed, "closed"),
            (HandshakeError::Io(io), "closed"),
            (HandshakeError::UnsupportedVersion(9), "protocol"),
            (HandshakeError::WrongHandle("x".into()), "protocol"),
            (
                HandshakeError::Rejected {
                    reason: RejectReason::Busy,
                    text: String::new(),
                },
                "protocol",
            ),
        ] {
            assert_eq!(RejectKind::of(&e).label(), want, "{e}");
        }
        // every label is distinct, and every kind's index is in range
        let mut l: Vec<&str> = RejectKind::ALL.iter().map(|k| k.label()).collect();
        l.extend(RequestKind::ALL.iter().map(|k| k.label()));
        let n = l.len();
        l.sort_unstable();
        l.dedup();
        assert_eq!(l.len(), n);
        for (i, k) in RejectKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
        for (i, k) in RequestKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn known_instants() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_ms(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_709_164_800_000), "2024-02-29T00:00:00.000Z");
    }
}
