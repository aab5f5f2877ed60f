//! `ipcbus listen --stats` and `ipcbus send --stats`: the counters at the end, as
//! JSON objects (the last line on stdout) and as `stats:` lines on stderr.

mod cli_support;

use cli_support::{ipcbus_cmd, json_lines, run, Proc, Ran, Tmp, T};

fn listen(runtime: &Tmp, args: &[&str]) -> Proc {
    cli_support::listen(runtime, args, &[]).0
}

fn send(runtime: &Tmp, args: &[&str], stdin: &[u8]) -> Ran {
    cli_support::send(runtime, args, &[], stdin)
}

#[test]
fn listen_and_send_print_their_counters_as_json() {
    let rt = Tmp::new("stats-json");
    let mut a = listen(&rt, &["--json", "--count", "3", "--stats", "stats.json"]);
    let mut b = listen(&rt, &["--json", "--count", "3", "--stats", "stats.json"]);
    let r = send(
        &rt,
        &["--json", "--stats", "--wait-for", "2", "stats.json"],
        b"one\ntwo\nthree\n",
    );
    assert_eq!(r.code(), 0, "{r:?}");
    let lines = json_lines(&r.stdout);
    let n = lines.len();
    assert!(n >= 2, "{r:?}");
    assert_eq!(lines[n - 2]["event"], "summary", "{r:?}");
    let s = &lines[n - 1];
    assert_eq!(s["event"], "stats", "{r:?}");
    assert_eq!(s["published"], 3);
    assert_eq!(s["payload_bytes"], 11);
    assert_eq!(s["acked"], 6, "two receivers, three events: {s}");
    assert_eq!(s["acked_events"], 3);
    assert_eq!(s["failed"]["receiver_closed"], 0);
    assert_eq!(s["failed"]["timed_out"], 0);
    // The listeners may have left already (they exit after --count events).
    assert!(s["connected_receivers"].as_u64().unwrap() <= 2, "{s}");
    assert!(s["known_receivers"].as_u64().unwrap() <= 2, "{s}");
    assert_eq!(s["connects"], 2);
    assert_eq!(s["handshakes"], 2);
    assert_eq!(s["reconnects"], 0);
    assert!(s["bytes_written"].as_u64().unwrap() >= 6 * 14, "{s}");
    assert_eq!(s["compression"]["eligible"], 0);

    for l in [&mut a, &mut b] {
        let st = l.wait(T).expect("listen exits after --count events");
        assert!(st.success(), "listen exit {st:?}");
        let lines = json_lines(&l.stdout_rest());
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[0]["payload"], "one");
        let s = &lines[3];
        assert_eq!(s["event"], "stats", "{s}");
        assert_eq!(s["taken"], 3);
        assert_eq!(s["payload_bytes"], 11);
        assert_eq!(s["accepted"], 1);
        assert_eq!(s["handshakes"], 1);
        assert_eq!(s["rejected"]["authentication_failed"], 0);
        assert_eq!(s["rejected"]["busy"], 0);
        assert!(s["bytes_read"].as_u64().unwrap() >= 3 * 14, "{s}");
    }
}

#[test]
fn a_wrong_password_counts_as_a_rejected_handshake() {
    let rt = Tmp::new("stats-auth");
    let mut c = ipcbus_cmd(rt.path());
    c.args([
        "listen",
        "--json",
        "--stats",
        "--timeout",
        "3",
        "stats.auth",
    ])
    .env("IPCBUS_PASSWORD", "right")
    .env("IPCBUS_SALT", "0102030405060708");
    let mut l = Proc::spawn(c);
    l.stderr_line("ready ");
    let mut c = ipcbus_cmd(rt.path());
    c.args(["send", "--json", "--stats", "stats.auth", "x"])
        .env("IPCBUS_PASSWORD", "wrong")
        .env("IPCBUS_SALT", "0102030405060708");
    let r = run(c, b"");
    assert_eq!(r.code(), 1, "{r:?}");
    let lines = json_lines(&r.stdout);
    let s = lines.last().unwrap();
    assert_eq!(s["event"], "stats", "{r:?}");
    assert_eq!(s["failed"]["authentication_failed"], 1, "{s}");
    assert_eq!(s["acked"], 0);
    assert_eq!(s["handshakes"], 0);

    let st = l.wait(T).expect("listen exits after --timeout");
    assert!(st.success(), "listen exit {st:?}");
    let lines = json_lines(&l.stdout_rest());
    let s = lines.last().expect("a stats line");
    assert_eq!(s["event"], "stats", "{s}");
    assert_eq!(s["taken"], 0);
    assert!(
        s["rejected"]["authentication_failed"].as_u64().unwrap() >= 1,
        "{s}"
    );
    assert_eq!(s["handshakes"], 0);
}

#[test]
fn text_mode_prints_stats_lines_on_stderr() {
    let rt = Tmp::new("stats-text");
    let mut l = listen(&rt, &["--count", "2", "--stats", "stats.text"]);
    let r = send(
        &rt,
        &["--stats", "--wait-for", "1", "stats.text", "a", "bb"],
        b"",
    );
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(
        r.stdout.trim(),
        "2 events: 1 receiver acknowledged all",
        "{r:?}"
    );
    let stats: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("stats: "))
        .collect();
    assert_eq!(stats.len(), 3, "{r:?}");
    assert!(
        stats[0].starts_with("stats: 2 events published (3 payload bytes), 2 acknowledged by all; 2 deliveries acknowledged, 0 failed (none)"),
        "{stats:?}"
    );
    assert!(
        stats[1].contains(" bytes written; compression: "),
        "{stats:?}"
    );
    assert!(
        stats[2].starts_with("stats: receivers: ")
            && stats[2].ends_with("; 1 connect, 0 reconnects, 1 handshakes"),
        "{stats:?}"
    );
    let st = l.wait(T).expect("listen exits");
    assert!(st.success());
    assert_eq!(l.stdout_rest().lines().count(), 2, "stats stay off stdout");
    let err = l.stderr_rest();
    assert!(
        err.contains("stats: 2 events taken (3 payload bytes)"),
        "{err}"
    );
    assert!(err.contains("stats: senders: "), "{err}");
}
