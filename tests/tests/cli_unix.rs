//! The command line's endpoints and transports: `listen --at`, `send --to`,
//! `IPCBUS_TRANSPORTS`, and the endpoints `list` shows.

mod cli_support;

use std::path::Path;

use cli_support::{ipcbus_cmd, json_lines, listen, listen_at, run, send, Tmp, T};
use ipcbus::{Endpoint, Transport};
use serde_json::Value;

/// A registry directory with no records that shares `of`'s per-user secret, as a
/// sender of the same user elsewhere would.
fn empty_registry_sharing_the_secret(of: &Tmp, tag: &str) -> Tmp {
    let other = Tmp::new(tag);
    // Creates the registry (and the secret) of `of` if `listen` has not yet.
    ipcbus::LocalRegistry::open(of.path())
        .and_then(|r| r.secret_key())
        .unwrap();
    ipcbus::LocalRegistry::open(other.path()).unwrap();
    std::fs::copy(of.path().join("secret"), other.path().join("secret")).unwrap();
    other
}

fn records(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("receivers"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// `send --json` to `to` from `rt`; returns the one report line's `delivered`.
fn send_to(rt: &Tmp, handle: &str, to: &str, payload: &str) -> Value {
    let r = send(rt, &[handle, "--to", to, "--json", payload], &[], b"");
    assert_eq!(r.code(), 0, "{r:?}");
    let reports: Vec<Value> = json_lines(&r.stdout)
        .into_iter()
        .filter(|v| v.get("seq").is_some())
        .collect();
    assert_eq!(reports.len(), 1, "{r:?}");
    assert_eq!(reports[0]["failed"], serde_json::json!([]), "{r:?}");
    reports[0]["delivered"].clone()
}

/// The payloads a `listen --json --count N` printed, once it exited.
fn payloads(l: &mut cli_support::Proc) -> Vec<Value> {
    let st = l.wait(T).expect("listen exits after --count events");
    assert!(st.success(), "listen exit {st:?}");
    json_lines(&l.stdout_rest())
        .into_iter()
        .map(|e| e["payload"].clone())
        .collect()
}

#[test]
fn listen_at_a_unix_path_and_send_to_it_with_an_empty_registry() {
    let rt = Tmp::new("at-unix");
    let sock = rt.path().join("x.sock");
    let at = format!("unix://{}", sock.display());
    let (mut l, endpoints) = listen_at(&rt, &["atu", "--at", &at, "--json", "--count", "1"], &[]);
    assert_eq!(endpoints, [Endpoint::unix(&sock)]);
    let srt = empty_registry_sharing_the_secret(&rt, "at-unix-tx");
    assert_eq!(
        send_to(&srt, "atu", &at, "by path"),
        serde_json::json!([at])
    );
    assert_eq!(payloads(&mut l), ["by path"]);
    assert!(!sock.exists(), "listen left its socket file");
    assert_eq!(records(srt.path()), 0);
}

#[test]
fn send_to_a_tcp_endpoint() {
    let rt = Tmp::new("to-tcp");
    let (mut l, addr) = listen(&rt, &["tot", "--json", "--count", "2"], &[]);
    let srt = empty_registry_sharing_the_secret(&rt, "to-tcp-tx");
    let to = format!("tcp://{addr}");
    assert_eq!(send_to(&srt, "tot", &to, "one"), serde_json::json!([to]));
    // A bare ip:port is TCP too.
    assert_eq!(send_to(&srt, "tot", &addr, "two"), serde_json::json!([to]));
    assert_eq!(payloads(&mut l), ["one", "two"]);
}

#[test]
fn bad_endpoints_exit_2_naming_the_problem() {
    let rt = Tmp::new("bad-ep");
    let mut c = ipcbus_cmd(rt.path());
    c.args(["listen", "h", "--at", "unix://relative.sock"]);
    let r = run(c, b"");
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("not absolute"), "{r:?}");
    assert!(r.stderr.contains("relative.sock"), "{r:?}");

    let r = send(&rt, &["h", "--to", "http://x", "m"], &[], b"");
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("unknown transport"), "{r:?}");
    assert!(r.stderr.contains("http"), "{r:?}");

    let r = send(&rt, &["h", "--to", "tcp://localhost:1", "m"], &[], b"");
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("not IP:PORT"), "{r:?}");
}

#[test]
fn ipcbus_transports_chooses_what_listen_listens_on() {
    let rt = Tmp::new("transports");
    let (mut l, endpoints) = listen_at(
        &rt,
        &["tr", "--json", "--count", "1"],
        &[("IPCBUS_TRANSPORTS", "tcp")],
    );
    assert_eq!(endpoints.len(), 1, "{endpoints:?}");
    let tcp = endpoints[0].tcp_addr().expect("a tcp address");
    assert!(
        std::fs::read_dir(rt.path().join("sockets"))
            .unwrap()
            .next()
            .is_none(),
        "a unix socket with IPCBUS_TRANSPORTS=tcp"
    );
    // The sender finds only TCP in the record.
    let r = send(&rt, &["tr", "--json", "m"], &[], b"");
    assert_eq!(r.code(), 0, "{r:?}");
    let rep = &json_lines(&r.stdout)[0];
    assert_eq!(
        rep["delivered"],
        serde_json::json!([format!("tcp://{tcp}")])
    );
    assert_eq!(payloads(&mut l), ["m"]);

    let (_l, endpoints) = listen_at(&rt, &["tr"], &[("IPCBUS_TRANSPORTS", "unix")]);
    assert_eq!(endpoints.len(), 1, "{endpoints:?}");
    assert_eq!(endpoints[0].transport(), Transport::Unix);
    let r = send(&rt, &["tr", "--json", "m"], &[], b"");
    assert_eq!(r.code(), 0, "{r:?}");
    let rep = &json_lines(&r.stdout)[0];
    assert_eq!(
        rep["delivered"],
        serde_json::json!([endpoints[0].to_string()])
    );

    let (_l, endpoints) = listen_at(&rt, &["tr2"], &[("IPCBUS_TRANSPORTS", "unix,tcp")]);
    let kinds: Vec<Transport> = endpoints.iter().map(Endpoint::transport).collect();
    assert_eq!(kinds, [Transport::Tcp, Transport::Unix]);
}

#[test]
fn a_bad_ipcbus_transports_exits_2() {
    let rt = Tmp::new("transports-bad");
    for bad in ["bogus", "tcp,udp"] {
        let mut c = ipcbus_cmd(rt.path());
        c.args(["listen", "h"]).env("IPCBUS_TRANSPORTS", bad);
        let r = run(c, b"");
        assert_eq!(r.code(), 2, "{bad}: {r:?}");
        assert!(r.stderr.contains("IPCBUS_TRANSPORTS"), "{r:?}");
        assert!(r.stderr.contains(bad), "{r:?}");
    }
}

#[test]
fn list_shows_every_endpoint_and_its_transport() {
    let rt = Tmp::new("list-ep");
    let (_both, both) = listen_at(&rt, &["both"], &[]);
    let (_tcp, tcp) = listen_at(&rt, &["tcponly"], &[("IPCBUS_TRANSPORTS", "tcp")]);

    let mut c = ipcbus_cmd(rt.path());
    c.args(["list", "--json"]);
    let r = run(c, b"");
    assert_eq!(r.code(), 0, "{r:?}");
    let all: Value = serde_json::from_str(r.stdout.trim()).expect("list --json is JSON");
    let entry = |h: &str| {
        all.as_array()
            .unwrap()
            .iter()
            .find(|e| e["handle"] == h)
            .unwrap_or_else(|| panic!("no {h} in {all}"))
            .clone()
    };
    let texts = |eps: &[Endpoint]| eps.iter().map(ToString::to_string).collect::<Vec<_>>();
    let e = entry("both");
    assert_eq!(e["endpoints"], serde_json::json!(texts(&both)));
    assert_eq!(e["transports"], serde_json::json!(["tcp", "unix"]));
    assert_eq!(e["addr"], both[0].tcp_addr().unwrap().to_string());
    let e = entry("tcponly");
    assert_eq!(e["endpoints"], serde_json::json!(texts(&tcp)));
    assert_eq!(e["transports"], serde_json::json!(["tcp"]));

    let mut c = ipcbus_cmd(rt.path());
    c.arg("list");
    let r = run(c, b"");
    assert_eq!(r.code(), 0, "{r:?}");
    for ep in both.iter().chain(&tcp) {
        assert!(r.stdout.contains(&ep.to_string()), "{ep} in {r:?}");
    }
}

#[test]
fn a_registry_too_deep_for_a_socket_path_means_tcp_only_unless_unix_is_asked_for() {
    let rt = Tmp::new("deep");
    let deep = rt.path().join("d".repeat(100));
    std::fs::create_dir_all(&deep).unwrap();

    let mut c = ipcbus_cmd(&deep);
    c.args(["listen", "deep"]);
    let p = cli_support::Proc::spawn(c);
    let warning = p.stderr_line("limit is 107");
    assert!(warning.contains("tcp only"), "{warning}");
    let ready = p.stderr_line("ready ");
    let endpoints: Vec<&str> = ready.split_whitespace().skip(2).collect();
    assert_eq!(endpoints.len(), 1, "{ready}");
    assert!(
        endpoints[0].parse::<std::net::SocketAddr>().is_ok(),
        "{ready}"
    );
    drop(p);

    let mut c = ipcbus_cmd(&deep);
    c.args(["listen", "deep"]).env("IPCBUS_TRANSPORTS", "unix");
    let r = run(c, b"");
    assert_eq!(r.code(), 2, "a configuration error: {r:?}");
    assert!(r.stderr.contains("limit is 107"), "{r:?}");
    assert!(r.stderr.contains("IPCBUS_RUNTIME_DIR"), "{r:?}");
}

#[test]
fn unix_with_an_epm_needs_a_path() {
    let rt = Tmp::new("epm-unix");
    let mut c = ipcbus_cmd(rt.path());
    // Nothing listens at the EPM's address: binding fails before anyone is asked.
    c.args(["listen", "h"])
        .env("IPCBUS_EPM", "127.0.0.1:1")
        .env("IPCBUS_TRANSPORTS", "unix");
    let r = run(c, b"");
    assert_eq!(r.code(), 2, "a configuration error: {r:?}");
    assert!(r.stderr.contains("--at unix:///PATH"), "{r:?}");
}

#[test]
fn send_json_names_a_tcp_receiver_one_way_in_reports_and_summary() {
    let rt = Tmp::new("json-names");
    // Nothing listens on port 1: the event fails there.
    let r = send(
        &rt,
        &["h", "--to", "tcp://127.0.0.1:1", "--json", "m"],
        &[],
        b"",
    );
    assert_eq!(r.code(), 1, "{r:?}");
    let lines = json_lines(&r.stdout);
    let report = lines.iter().find(|v| v.get("seq").is_some()).unwrap();
    assert_eq!(report["failed"][0]["addr"], "tcp://127.0.0.1:1", "{r:?}");
    let summary = lines.last().unwrap();
    assert_eq!(summary["event"], "summary", "{r:?}");
    assert_eq!(
        summary["receivers"][0]["receiver"], "tcp://127.0.0.1:1",
        "{r:?}"
    );
}

#[test]
fn listen_at_a_path_in_use_fails_and_at_one_left_by_a_killed_listener_works() {
    let rt = Tmp::new("at-reuse");
    let sock = rt.path().join("r.sock");
    let at = format!("unix://{}", sock.display());
    let (first, _) = listen_at(&rt, &["reuse", "--at", &at], &[]);
    let mut c = ipcbus_cmd(rt.path());
    c.args(["listen", "reuse", "--at", &at]);
    let r = run(c, b"");
    assert_ne!(r.code(), 0, "{r:?}");
    assert!(r.stderr.contains("in use"), "{r:?}");

    drop(first); // SIGKILL: the socket file stays, nothing listens there
    assert!(sock.exists());
    let (mut l, endpoints) = listen_at(&rt, &["reuse", "--at", &at, "--json", "--count", "1"], &[]);
    assert_eq!(endpoints, [Endpoint::unix(&sock)]);
    assert_eq!(send_to(&rt, "reuse", &at, "again"), serde_json::json!([at]));
    assert_eq!(payloads(&mut l), ["again"]);
}
