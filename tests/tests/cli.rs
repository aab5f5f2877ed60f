//! The `ipcbus` command line, run as a user would: listen/send round trips in both
//! discovery modes, JSON outputs, exit codes, `list`, `demo`, `bench`, `epm status`.

mod cli_support;

use std::io::Write;

use cli_support::{
    epm_service, ipcbus_cmd, is_rfc3339_utc, json_lines, listen, listen_at, run, send, Epm, Proc,
    Tmp, T,
};
use serde_json::Value;

#[test]
fn listen_and_send_round_trip_with_json() {
    let rt = Tmp::new("round");
    let (mut l, endpoints) = listen_at(&rt, &["orders", "--count", "4", "--json"], &[]);
    // TCP first, then the Unix socket, which a sender on this host uses.
    assert_eq!(endpoints.len(), 2, "{endpoints:?}");
    assert_eq!(endpoints[0].transport(), ipcbus::Transport::Tcp);
    assert_eq!(endpoints[1].transport(), ipcbus::Transport::Unix);
    let addr = endpoints[1].to_string();

    let r = send(&rt, &["orders", "one", "twö"], &[], b"");
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(r.stdout, "2 events: 1 receiver acknowledged all\n", "{r:?}");

    // Lines of stdin when there are no MESSAGE arguments; binary stays binary.
    let r = send(&rt, &["orders", "--json"], &[], b"three\n\xff\xfe\n");
    assert_eq!(r.code(), 0, "{r:?}");
    // Report lines have a seq; receivers leaving and the summary are "event" objects.
    let mut reports = json_lines(&r.stdout);
    assert_eq!(reports.last().map(|s| &s["event"]), Some(&"summary".into()));
    reports.retain(|v| v.get("seq").is_some());
    assert_eq!(reports.len(), 2, "{r:?}");
    for (i, rep) in reports.iter().enumerate() {
        assert_eq!(rep["seq"], i as u64 + 1);
        assert_eq!(rep["delivered"], serde_json::json!([addr]));
        assert_eq!(rep["failed"], serde_json::json!([]));
    }

    let st = l.wait(T).expect("listen exits after --count events");
    assert!(st.success(), "listen exit {st:?}");
    let events = json_lines(&l.stdout_rest());
    assert_eq!(events.len(), 4, "{events:?}");
    let payloads: Vec<&Value> = events.iter().map(|e| &e["payload"]).collect();
    assert_eq!(payloads[0], "one");
    assert_eq!(payloads[1], "twö");
    assert_eq!(payloads[2], "three");
    assert_eq!(payloads[3], &serde_json::json!({ "base64": "//4=" }));
    for e in &events {
        assert_eq!(e["handle"], "orders");
        let sender = e["sender"].as_str().expect("sender is a string");
        assert_eq!(sender.len(), 32, "{e}");
        assert!(e["seq"].as_u64().is_some_and(|s| s >= 1), "{e}");
    }
    assert_eq!(events[1]["size"], "twö".len());
    assert_eq!(events[3]["size"], 2);
    // Two senders: the first sent seq 1 and 2, the second seq 1 and 2.
    assert_eq!(events[0]["sender"], events[1]["sender"]);
    assert_ne!(events[1]["sender"], events[2]["sender"]);
}

#[test]
fn plain_text_listen_and_count_repeats() {
    let rt = Tmp::new("text");
    let (mut l, _) = listen(&rt, &["h", "--count", "3"], &[]);
    let r = send(&rt, &["h", "--count", "3", "hello"], &[], b"");
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(r.stdout, "3 events: 1 receiver acknowledged all\n", "{r:?}");
    assert!(l.wait(T).is_some_and(|s| s.success()));
    assert_eq!(l.stdout_rest(), "hello\nhello\nhello\n");
}

#[test]
fn no_receivers_is_success_with_a_note() {
    let rt = Tmp::new("none");
    let r = send(&rt, &["nobody", "x"], &[], b"");
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(r.stdout, "1 event: no receivers\n");
    assert!(r.stderr.contains("no receivers found"), "{r:?}");
    let r = send(&rt, &["nobody", "--json", "x"], &[], b"");
    assert_eq!(
        json_lines(&r.stdout)[0],
        serde_json::json!({"seq": 1, "delivered": [], "failed": []})
    );
}

#[test]
fn wrong_password_fails_with_authentication_failed_and_exit_1() {
    let rt = Tmp::new("auth");
    let good = [
        ("IPCBUS_PASSWORD", "right"),
        ("IPCBUS_SALT", "{0x01,0x02,0x03}"),
    ];
    let (_l, endpoints) = listen_at(&rt, &["secure"], &good);
    let addr = endpoints[1].to_string();

    let bad = [("IPCBUS_PASSWORD", "wrong"), ("IPCBUS_SALT", "010203")];
    let r = send(&rt, &["secure", "--json", "intrusion"], &bad, b"");
    assert_eq!(r.code(), 1, "{r:?}");
    let rep = &json_lines(&r.stdout)[0];
    assert_eq!(rep["delivered"], serde_json::json!([]));
    assert_eq!(rep["failed"][0]["addr"], addr.as_str());
    let reason = rep["failed"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("authentication failed"), "{rep}");

    // No password at all against an encrypted receiver fails the same way.
    let r = send(&rt, &["secure", "plain"], &[], b"");
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr.contains("authentication failed"), "{r:?}");

    // The right password from a file works (hex salt = the classic form's bytes).
    let pw = rt.path().join("pw");
    std::fs::write(&pw, "right\n").expect("write password file");
    let pw = pw.to_str().expect("utf-8 path");
    let r = send(
        &rt,
        &["secure", "--password-file", pw, "--salt", "010203", "ok"],
        &[],
        b"",
    );
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(r.stdout, "1 event: 1 receiver acknowledged\n");
}

#[test]
fn usage_and_configuration_errors_exit_2_with_one_line() {
    let rt = Tmp::new("usage");
    // Errors of our own: exactly one line on stderr.
    let missing = rt.path().join("no-such-file");
    let missing = missing.to_str().expect("utf-8 path");
    for (args, env) in [
        (
            vec!["send", "h", "x", "--password-file", missing, "--salt", "01"],
            vec![],
        ),
        (vec!["send", "h", "x"], vec![("IPCBUS_PASSWORD", "pw")]),
        (vec!["send", "h", "x"], vec![("IPCBUS_SALT", "0102")]),
        (vec!["listen", "h"], vec![("IPCBUS_PASSWORD", "pw")]),
    ] {
        let mut c = ipcbus_cmd(rt.path());
        c.args(&args).envs(env.iter().copied());
        let r = run(c, b"");
        assert_eq!(r.code(), 2, "{args:?} {env:?}: {r:?}");
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {r:?}");
        assert!(r.stderr.starts_with("error: "), "{r:?}");
        assert!(!r.stderr.contains("panicked"), "{r:?}");
    }
    // clap's usage errors also exit 2.
    for args in [
        vec!["send", "a/b", "x"],
        vec!["send", "h", "x", "--salt", "{0x01"],
        vec!["send", "h", "x", "--salt", "zz"],
        vec!["listen", "h", "--ports", "9010-9000"],
        vec!["listen", "h", "--count", "0"],
        vec!["send", "h", "--no-such-flag"],
        vec!["send"],
        vec!["frobnicate"],
    ] {
        let mut c = ipcbus_cmd(rt.path());
        c.args(&args);
        let r = run(c, b"");
        assert_eq!(r.code(), 2, "{args:?}: {r:?}");
        assert!(r.stderr.contains("error"), "{args:?}: {r:?}");
    }
}

#[test]
fn wait_for_times_out_with_exit_1() {
    let rt = Tmp::new("waitfor");
    let r = send(
        &rt,
        &["lonely", "--wait-for", "1", "--wait-timeout", "0.3", "x"],
        &[],
        b"",
    );
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr.contains("waiting for 1 receiver of"), "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
}

#[test]
fn list_shows_receivers_as_json() {
    let rt = Tmp::new("list");
    let (l1, a1) = listen(&rt, &["alpha"], &[]);
    let (_l2, _) = listen(&rt, &["beta"], &[]);
    let (_l3, _) = listen(&rt, &["beta"], &[]);

    let mut c = ipcbus_cmd(rt.path());
    c.args(["list", "--json"]);
    let r = run(c, b"");
    assert_eq!(r.code(), 0, "{r:?}");
    let all: Value = serde_json::from_str(r.stdout.trim()).expect("list --json is JSON");
    let all = all.as_array().expect("an array");
    assert_eq!(all.len(), 3, "{all:?}");
    let alpha: Vec<&Value> = all.iter().filter(|e| e["handle"] == "alpha").collect();
    assert_eq!(alpha.len(), 1);
    assert_eq!(alpha[0]["addr"], a1.as_str());
    assert_eq!(alpha[0]["pid"], l1.child.id());
    assert_eq!(alpha[0]["receiver_id"].as_str().map(str::len), Some(32));
    for e in all {
        let since = e["since"].as_str().expect("since is a string");
        assert!(is_rfc3339_utc(since), "{since}");
    }

    let mut c = ipcbus_cmd(rt.path());
    c.args(["list", "beta", "--json"]);
    let r = run(c, b"");
    let beta: Value = serde_json::from_str(r.stdout.trim()).expect("JSON");
    assert_eq!(beta.as_array().map(Vec::len), Some(2), "{beta}");

    let mut c = ipcbus_cmd(rt.path());
    c.arg("list");
    let r = run(c, b"");
    assert_eq!(r.code(), 0);
    assert!(r.stdout.contains("beta (2 receivers)"), "{r:?}");
    assert!(r.stdout.contains(&a1), "{r:?}");
}

#[test]
fn sigterm_unregisters_and_exits_0() {
    let rt = Tmp::new("sigterm");
    let (mut l, _) = listen(&rt, &["leaving"], &[]);
    l.signal(libc::SIGTERM);
    let st = l.wait(T).expect("listen exits on SIGTERM");
    assert!(st.success(), "{st:?}");
    let mut c = ipcbus_cmd(rt.path());
    c.args(["list", "--json"]);
    let r = run(c, b"");
    assert_eq!(r.stdout.trim(), "[]", "{r:?}");
}

#[test]
fn listen_timeout_with_count_exits_1() {
    let rt = Tmp::new("timeout");
    let (mut l, _) = listen(&rt, &["quiet", "--count", "1", "--timeout", "0.3"], &[]);
    let st = l.wait(T).expect("listen gives up after --timeout");
    assert_eq!(st.code(), Some(1));
    let (mut l, _) = listen(&rt, &["quiet", "--timeout", "0.3"], &[]);
    assert!(l.wait(T).is_some_and(|s| s.success()));
}

#[test]
fn broken_stdout_pipe_exits_quietly() {
    let rt = Tmp::new("pipe");
    let mut c = ipcbus_cmd(rt.path());
    c.args(["listen", "piped", "--count", "5"]);
    let mut l = Proc::spawn_stdout_closed(c);
    l.stderr_line("ready ");
    let _ = send(&rt, &["piped", "a"], &[], b"");
    let st = l.wait(T).expect("listen exits when stdout is closed");
    assert!(st.success(), "{st:?}");
    let err = l.stderr_rest();
    assert!(!err.contains("error"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn demo_shows_both_receivers_getting_the_events() {
    let rt = Tmp::new("demo");
    let mut c = ipcbus_cmd(rt.path());
    c.arg("demo");
    let r = run(c, b"");
    assert_eq!(r.code(), 0, "{r:?}");
    for needle in [
        "receiver A got 4 events",
        "receiver B got 4 events",
        "Order { id: 1",
        "acked by A, B",
        "gzip",
        "AES-256-GCM",
        "authentication failed",
        "cleaned up",
    ] {
        assert!(
            r.stdout.contains(needle),
            "demo output lacks {needle:?}:\n{}",
            r.stdout
        );
    }
    assert!(r.stderr.is_empty(), "demo stderr: {}", r.stderr);
}

#[test]
fn bench_one_to_two_prints_json() {
    let rt = Tmp::new("bench");
    let mut c = ipcbus_cmd(rt.path());
    c.args(["bench", "--receivers", "2", "--count", "2000", "--json"]);
    let r = run(c, b"");
    assert_eq!(r.code(), 0, "{r:?}");
    let v: Value = serde_json::from_str(r.stdout.trim()).expect("bench --json is JSON");
    assert_eq!(v["receivers"], 2);
    assert_eq!(v["acked"], 2000);
    assert_eq!(v["failed"], 0);
    assert_eq!(v["per_receiver"].as_array().map(Vec::len), Some(2));
    for k in ["min", "median", "aggregate", "sender_acked_rate"] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {v}");
    }
}

#[test]
fn bench_by_time_reports_medians_and_the_compression_in_effect() {
    let rt = Tmp::new("bench-time");
    let mut c = ipcbus_cmd(rt.path());
    c.args([
        "bench",
        "-n",
        "1",
        "--size",
        "1024",
        "--duration",
        "0.1",
        "--runs",
        "2",
        "--json",
    ]);
    let r = run(c, b"");
    assert_eq!(r.code(), 0, "{r:?}");
    let v: Value = serde_json::from_str(r.stdout.trim()).expect("bench --json is JSON");
    let row = &v["throughput"][0];
    assert_eq!(row["compress"], "auto", "{v}");
    assert_eq!(row["compression_in_effect"], "off: loopback", "{v}");
    assert_eq!(row["ipcbus"]["runs"], 2, "{v}");
    assert!(row["count"].as_u64().is_some_and(|n| n >= 1000), "{v}");
    assert!(
        row["ipcbus"]["secs"].as_f64().is_some_and(|s| s > 0.0),
        "{v}"
    );
}

#[test]
fn epm_mode_round_trip_list_and_status() {
    let rt = Tmp::new("epm");
    let pw = rt.path().join("epm.password");
    let mut f = std::fs::File::create(&pw).expect("create password file");
    f.write_all(b"epm secret\n").expect("write password");
    drop(f);
    let pw = pw.to_str().expect("utf-8 path").to_string();
    let epm = Epm::start(
        &epm_service(),
        &[
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--password-file",
            &pw,
            "--salt",
            "{0x01,0x02,0x03}",
        ],
    );
    let env = [
        ("IPCBUS_EPM", epm.addr.as_str()),
        ("IPCBUS_PASSWORD_FILE", pw.as_str()),
        ("IPCBUS_SALT", "010203"),
    ];
    let (mut l, addr) = listen(&rt, &["lan.orders", "--count", "1", "--json"], &env);

    let mut c = ipcbus_cmd(rt.path());
    c.args(["list", "--json"]).envs(env.iter().copied());
    let r = run(c, b"");
    assert_eq!(r.code(), 0, "{r:?}");
    let all: Value = serde_json::from_str(r.stdout.trim()).expect("JSON");
    assert_eq!(all[0]["handle"], "lan.orders", "{all}");
    assert_eq!(all[0]["addr"], addr.as_str());
    assert!(is_rfc3339_utc(all[0]["since"].as_str().unwrap_or_default()));

    let mut c = ipcbus_cmd(rt.path());
    c.args(["epm", "status", "--json"])
        .envs(env.iter().copied());
    let r = run(c, b"");
    assert_eq!(r.code(), 0, "{r:?}");
    let st: Value = serde_json::from_str(r.stdout.trim()).expect("JSON");
    assert_eq!(st["registrations"], 1, "{st}");
    assert_eq!(st["by_handle"][0]["handle"], "lan.orders", "{st}");
    assert_eq!(st["by_handle"][0]["receivers"], 1, "{st}");

    let r = send(&rt, &["lan.orders", "over the epm"], &env, b"");
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(r.stdout, "1 event: 1 receiver acknowledged\n");
    assert!(l.wait(T).is_some_and(|s| s.success()));
    let got = json_lines(&l.stdout_rest());
    assert_eq!(got[0]["payload"], "over the epm");

    // The --epm flag works like the variable; a wrong password is refused by the EPM.
    let mut c = ipcbus_cmd(rt.path());
    c.args(["epm", "status", "--epm", &epm.addr, "--salt", "010203"])
        .env("IPCBUS_PASSWORD", "wrong");
    let r = run(c, b"");
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr.contains("authentication failed"), "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
}

#[test]
fn epm_unreachable_is_one_error_line() {
    let rt = Tmp::new("epm-down");
    // Port 1 on loopback: nothing listens there.
    let mut c = ipcbus_cmd(rt.path());
    c.args(["--epm", "127.0.0.1:1", "epm", "status"]);
    let r = run(c, b"");
    assert_eq!(r.code(), 1, "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    assert!(r.stderr.contains("127.0.0.1:1"), "{r:?}");
}
