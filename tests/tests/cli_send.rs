//! `ipcbus send` as a user runs it: the summary line and its plurals, -q and -v,
//! a receiver killed mid-stream (one failure line and a "left" note, or JSON
//! objects), --file and -s, how stdin lines are split, and input larger than an
//! event read with bounded memory. Receivers joining, leaving and killed are run
//! over TCP and over Unix sockets.

mod cli_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cli_support::{ipcbus_cmd, json_lines, run, Proc, Ran, Tmp, T};
use ipcbus::{Endpoint, Transport};
use serde_json::Value;

/// The largest event: 16 MiB minus the frame header (10) and an encryption tag (16).
const MAX_EVENT: usize = (16 << 20) - 26;

/// Peak RSS the sender may reach whatever its input.
const RSS_LIMIT_KIB: u64 = 64 * 1024;

/// `ipcbus listen ARGS` once ready, and its ADDR.
/// Starts a listener; returns it and how a sender on this host names it: its Unix
/// socket endpoint, which such a sender uses.
fn listen(runtime: &Tmp, args: &[&str]) -> (Proc, String) {
    let (p, endpoints) = cli_support::listen_at(runtime, args, &[]);
    let unix = endpoints
        .iter()
        .find(|e| e.transport() == ipcbus::Transport::Unix)
        .unwrap_or_else(|| panic!("no unix socket among {endpoints:?}"));
    (p, unix.to_string())
}

/// Starts a listener on transport `t` only; returns it with its endpoint.
fn listen_over(runtime: &Tmp, t: Transport, args: &[&str]) -> (Proc, Endpoint) {
    let (p, endpoints) =
        cli_support::listen_at(runtime, args, &[("IPCBUS_TRANSPORTS", t.as_str())]);
    assert_eq!(endpoints.len(), 1, "{endpoints:?}");
    assert_eq!(endpoints[0].transport(), t);
    let e = endpoints[0].clone();
    (p, e)
}

/// How the human lines name a receiver at `e`: bare ip:port for TCP (JSON names it
/// by its text form, `tcp://...`).
fn human(e: &Endpoint) -> String {
    e.tcp_addr()
        .map_or_else(|| e.to_string(), |a| a.to_string())
}

fn send(runtime: &Tmp, args: &[&str], stdin: &[u8]) -> Ran {
    cli_support::send(runtime, args, &[], stdin)
}

/// The payloads a `listen --json` printed, after it exited.
fn payloads(l: &mut Proc) -> Vec<Value> {
    let st = l.wait(T).expect("listen exits after --count events");
    assert!(st.success(), "listen exit {st:?}");
    json_lines(&l.stdout_rest())
        .into_iter()
        .map(|e| e["payload"].clone())
        .collect()
}

/// A child with stdin, stdout and stderr piped: stdin is written by the test (or by a
/// feeding thread), stdout is collected by a thread, stderr is read line by line (so
/// a test can wait for a note). Killed and reaped on drop unless it was reaped already.
struct Piped {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Option<JoinHandle<String>>,
    err: mpsc::Receiver<String>,
    /// Stderr lines read by [`Piped::err_line`], kept for [`Piped::finish`].
    err_seen: Vec<String>,
    reaped: bool,
}

fn collect(r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let mut r = r;
        let _ = r.read_to_string(&mut s);
        s
    })
}

impl Piped {
    fn spawn(mut cmd: Command) -> Piped {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdin = child.stdin.take();
        let out = child.stdout.take().map(collect);
        let (tx, err) = mpsc::channel();
        if let Some(e) = child.stderr.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(e).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Piped {
            child,
            stdin,
            out,
            err,
            err_seen: Vec::new(),
            reaped: false,
        }
    }

    /// Waits (bounded) for a stderr line containing `needle`.
    fn err_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.err.recv_timeout(left) {
                Ok(l) => {
                    self.err_seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no stderr line with {needle:?} within {T:?}; saw {:#?}",
                    self.err_seen
                ),
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        let i = self.stdin.as_mut().expect("stdin still open");
        i.write_all(bytes).expect("write to send's stdin");
        i.flush().expect("flush send's stdin");
    }

    /// Waits (bounded) for the child to exit; returns its exit code (-1 for a
    /// signal), stdout, stderr, and the highest peak RSS (VmHWM, KiB) seen while it ran.
    ///
    /// (Not `wait4`'s `ru_maxrss`: a child spawned from this process starts with this
    /// process's peak, since exec keeps the larger of the old and new ones.)
    fn finish(mut self) -> (i32, String, String, u64) {
        drop(self.stdin.take());
        let status_file = format!("/proc/{}/status", self.child.id());
        let deadline = Instant::now() + T;
        let mut peak = 0;
        let status = loop {
            if let Some(kib) = std::fs::read_to_string(&status_file)
                .ok()
                .and_then(|s| vm_hwm_kib(&s))
            {
                peak = peak.max(kib);
            }
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                break st;
            }
            assert!(Instant::now() < deadline, "send did not exit within {T:?}");
            std::thread::sleep(Duration::from_millis(1));
        };
        self.reaped = true;
        let join = |h: Option<JoinHandle<String>>| {
            h.map(|h| h.join().expect("output reader"))
                .unwrap_or_default()
        };
        let out = join(self.out.take());
        let mut err = String::new();
        for l in self.err_seen.drain(..) {
            err.push_str(&l);
            err.push('\n');
        }
        // The child has exited: its stderr ends as soon as the reader drains it.
        while let Ok(l) = self.err.recv_timeout(Duration::from_secs(5)) {
            err.push_str(&l);
            err.push('\n');
        }
        (status.code().unwrap_or(-1), out, err, peak)
    }
}

/// The `VmHWM:` (peak resident set) of a `/proc/PID/status`, in KiB.
fn vm_hwm_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

impl Drop for Piped {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `ipcbus send ARGS` with `prefix` and then `zeros` NUL bytes (no newline) on
/// stdin, written by a thread that stops when send stops reading; returns what
/// [`Piped::finish`] does.
fn send_fed(rt: &Tmp, args: &[&str], prefix: &[u8], zeros: usize) -> (i32, String, String, u64) {
    let mut c = ipcbus_cmd(rt.path());
    c.arg("send").args(args);
    let mut p = Piped::spawn(c);
    let mut stdin = p.stdin.take().expect("stdin");
    let prefix = prefix.to_vec();
    let feeder = std::thread::spawn(move || {
        if stdin.write_all(&prefix).is_err() {
            return;
        }
        let chunk = vec![0u8; 1 << 20];
        let mut left = zeros;
        while left > 0 {
            let n = left.min(chunk.len());
            // A broken pipe once send has stopped reading ends the feed.
            if stdin.write_all(&chunk[..n]).is_err() {
                return;
            }
            left -= n;
        }
    });
    let r = p.finish();
    feeder.join().expect("feeder thread");
    r
}

#[test]
fn summary_line_with_two_listeners_and_plurals() {
    let rt = Tmp::new("send-summary");
    let (_l1, _) = listen(&rt, &["two"]);
    let (_l2, _) = listen(&rt, &["two"]);
    let r = send(&rt, &["two", "a", "b", "c"], b"");
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(
        r.stdout, "3 events: 2 receivers acknowledged all\n",
        "{r:?}"
    );
    assert_eq!(r.stderr, "", "{r:?}");

    let (_l3, _) = listen(&rt, &["one"]);
    let r = send(&rt, &["one", "x"], b"");
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(r.stdout, "1 event: 1 receiver acknowledged\n", "{r:?}");
    assert_eq!(r.stderr, "", "{r:?}");

    let r = send(&rt, &["nobody", "x", "y"], b"");
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(r.stdout, "2 events: no receivers\n", "{r:?}");
    assert_eq!(r.stderr, "no receivers found for nobody\n", "{r:?}");
}

#[test]
fn nobody_acknowledging_is_a_failure_summary_with_one_failure_line() {
    let rt = Tmp::new("send-nobody");
    let mut c = ipcbus_cmd(rt.path());
    c.args(["listen", "secure"])
        .env("IPCBUS_PASSWORD", "right")
        .env("IPCBUS_SALT", "01");
    let l = Proc::spawn(c);
    let ready = l.stderr_line("ready ");
    // The sender on this host uses the Unix socket, the last endpoint of the line.
    let addr = ready.split_whitespace().last().expect("ADDR").to_string();

    let mut c = ipcbus_cmd(rt.path());
    c.args(["send", "secure", "--count", "50", "x"])
        .env("IPCBUS_PASSWORD", "wrong")
        .env("IPCBUS_SALT", "01");
    let r = run(c, b"");
    assert_eq!(r.code(), 1, "{r:?}");
    let reason = ipcbus::FailReason::AuthenticationFailed;
    assert_eq!(
        r.stdout,
        format!("50 events: no receiver acknowledged; {addr} failed 50 from event 1 ({reason})\n")
    );
    let reason = ipcbus::FailReason::AuthenticationFailed;
    assert_eq!(r.stderr, format!("{addr}: event 1 failed: {reason}\n"));

    let mut c = ipcbus_cmd(rt.path());
    c.args(["send", "secure", "-q", "x"])
        .env("IPCBUS_PASSWORD", "wrong")
        .env("IPCBUS_SALT", "01");
    let r = run(c, b"");
    assert_eq!(r.code(), 1, "{r:?}");
    assert_eq!(
        r.stdout,
        format!("1 event: no receiver acknowledged; {addr} failed ({reason})\n")
    );
}

#[test]
fn quiet_prints_nothing_and_verbose_a_line_per_event() {
    let rt = Tmp::new("send-qv");
    let (_l1, _) = listen(&rt, &["h"]);
    let (_l2, _) = listen(&rt, &["h"]);
    let r = send(&rt, &["h", "-q", "a", "b"], b"");
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("", ""), "{r:?}");
    let r = send(&rt, &["h", "--quiet"], b"a\nb\nc\n");
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("", ""), "{r:?}");
    // No receivers is not an error either.
    let r = send(&rt, &["nobody", "-q", "a"], b"");
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("", ""), "{r:?}");

    let r = send(&rt, &["h", "-v", "--count", "3", "x"], b"");
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(
        r.stdout,
        "event 1: 2 receivers acknowledged\n\
         event 2: 2 receivers acknowledged\n\
         event 3: 2 receivers acknowledged\n\
         3 events: 2 receivers acknowledged all\n",
        "{r:?}"
    );
    let r = send(&rt, &["nobody", "--verbose", "x"], b"");
    assert_eq!(
        r.stdout, "event 1: no receivers\n1 event: no receivers\n",
        "{r:?}"
    );
}

/// Two listeners on `t`; the second is stopped, sent 20 more events, and killed, so
/// its events in flight fail. Returns send's output and the killed listener's
/// endpoint.
fn kill_listener_mid_stream(rt: &Tmp, t: Transport, json: bool) -> (i32, String, String, Endpoint) {
    let (l1, _) = listen_over(rt, t, &["stream"]);
    let (l2, a2) = listen_over(rt, t, &["stream"]);
    let mut c = ipcbus_cmd(rt.path());
    c.args(["send", "stream"]);
    if json {
        c.arg("--json");
    }
    let mut s = Piped::spawn(c);
    for i in 1..=5 {
        s.write(format!("a{i}\n").as_bytes());
    }
    l1.stdout_line("a5");
    l2.stdout_line("a5");
    // Time to acknowledge them (a receiver does within 20 ms).
    std::thread::sleep(Duration::from_millis(200));
    // Stopped, it takes no more events (and acknowledges none)...
    l2.signal(libc::SIGSTOP);
    for i in 1..=20 {
        s.write(format!("b{i}\n").as_bytes());
    }
    // ... all of which were sent to it too, since they reached the other listener.
    l1.stdout_line("b20");
    drop(l2); // SIGKILL, reaped
    let (code, out, err, _) = s.finish();
    (code, out, err, a2)
}

/// `N from event M` in `s` after `prefix`: (N, M).
fn failed_range(s: &str, prefix: &str) -> (u64, u64) {
    let rest = s
        .split(prefix)
        .nth(1)
        .unwrap_or_else(|| panic!("no {prefix:?} in {s:?}"));
    let words: Vec<&str> = rest.split_whitespace().collect();
    assert_eq!(words.get(1..3), Some(&["from", "event"][..]), "{s:?}");
    let n = words[0].parse().expect("a count");
    let m = words[3].parse().expect("an event number");
    (n, m)
}

#[test]
fn killed_listener_gives_one_failure_line_a_left_note_and_a_summary_over_unix() {
    killed_listener_gives_one_failure_line(Transport::Unix)
}

#[test]
fn killed_listener_gives_one_failure_line_a_left_note_and_a_summary_over_tcp() {
    killed_listener_gives_one_failure_line(Transport::Tcp)
}

fn killed_listener_gives_one_failure_line(t: Transport) {
    let rt = Tmp::new("send-kill");
    let (code, out, err, a2) = kill_listener_mid_stream(&rt, t, false);
    let a2 = human(&a2);
    assert_eq!(code, 1, "stdout {out:?} stderr {err:?}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out:?}");
    assert!(
        lines[0].starts_with("25 events: 1 receiver acknowledged all; "),
        "{out:?}"
    );
    // Events 6 to 25 at least (the last acknowledgements may not have gone out).
    let (n, first) = failed_range(lines[0], &format!("{a2} failed "));
    assert!(n >= 20 && n + first == 26, "{out:?}");
    assert!(
        lines[0].ends_with(')'),
        "the reason in parentheses: {out:?}"
    );

    let failures: Vec<&str> = err.lines().filter(|l| l.contains("failed")).collect();
    assert_eq!(failures.len(), 1, "one failure line: {err:?}");
    assert!(
        failures[0].starts_with(&format!("{a2}: event {first} failed: ")),
        "{err:?}"
    );
    let left: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with(&format!("receiver {a2} left: ")))
        .collect();
    assert_eq!(left.len(), 1, "one left note: {err:?}");
    assert_eq!(err.lines().count(), 2, "{err:?}");
    assert!(!err.contains("joined"), "{err:?}");
}

#[test]
fn killed_listener_in_json_gives_a_left_object_and_a_summary_object_over_unix() {
    killed_listener_in_json(Transport::Unix)
}

#[test]
fn killed_listener_in_json_gives_a_left_object_and_a_summary_object_over_tcp() {
    killed_listener_in_json(Transport::Tcp)
}

fn killed_listener_in_json(t: Transport) {
    let rt = Tmp::new("send-kill-json");
    let (code, out, err, a2) = kill_listener_mid_stream(&rt, t, true);
    // JSON names a receiver by its endpoint's text form everywhere.
    let a2 = a2.to_string();
    assert_eq!(code, 1, "stdout {out:?} stderr {err:?}");
    let all = json_lines(&out);
    let reports: Vec<&Value> = all.iter().filter(|v| v.get("seq").is_some()).collect();
    assert_eq!(reports.len(), 25, "{out}");
    let failed: Vec<&&Value> = reports
        .iter()
        .filter(|r| r["failed"].as_array().is_some_and(|f| !f.is_empty()))
        .collect();
    assert!(failed.len() >= 20, "{out}");
    for r in &failed {
        assert_eq!(r["failed"][0]["addr"], a2.as_str(), "{r}");
    }
    let left: Vec<&Value> = all.iter().filter(|v| v["event"] == "left").collect();
    assert_eq!(left.len(), 1, "{out}");
    assert_eq!(left[0]["receiver"], a2.as_str());
    assert!(left[0]["reason"].as_str().is_some_and(|r| !r.is_empty()));
    assert!(!all.iter().any(|v| v["event"] == "joined"), "{out}");

    let summary = all.last().expect("a summary line");
    assert_eq!(summary["event"], "summary", "{out}");
    assert_eq!(summary["events"], 25);
    assert_eq!(summary["failed_events"], failed.len());
    let receivers = summary["receivers"].as_array().expect("receivers");
    assert_eq!(receivers.len(), 2, "{summary}");
    let r2 = receivers
        .iter()
        .find(|r| r["receiver"] == a2.as_str())
        .expect("the killed receiver is in the summary");
    assert_eq!(r2["failed"], failed.len());
    assert_eq!(r2["first_failed_seq"], failed[0]["seq"]);
    let r1 = receivers
        .iter()
        .find(|r| r["receiver"] != a2.as_str())
        .expect("the other receiver");
    assert_eq!((&r1["acked"], &r1["failed"]), (&25.into(), &0.into()));

    let failures: Vec<&str> = err.lines().filter(|l| l.contains("failed")).collect();
    assert_eq!(failures.len(), 1, "one failure line: {err:?}");
}

#[test]
fn a_receiver_joining_mid_stream_is_announced_over_unix() {
    a_receiver_joining_mid_stream(Transport::Unix)
}

#[test]
fn a_receiver_joining_mid_stream_is_announced_over_tcp() {
    a_receiver_joining_mid_stream(Transport::Tcp)
}

fn a_receiver_joining_mid_stream(t: Transport) {
    let rt = Tmp::new("send-join");
    let (l1, a1) = listen_over(&rt, t, &["late"]);
    let mut s = Piped::spawn({
        let mut c = ipcbus_cmd(rt.path());
        c.args(["send", "late"]);
        c
    });
    s.write(b"first\n");
    l1.stdout_line("first");
    let (l2, a2) = listen_over(&rt, t, &["late"]);
    let a2 = human(&a2);
    // Discovery picks the new receiver up shortly (inotify, else a rescan every 2 s):
    // send until it has one event (a thread watches its output).
    let (got_tx, got) = std::sync::mpsc::channel();
    let watcher = std::thread::spawn(move || {
        l2.stdout_line("again");
        let _ = got_tx.send(());
        l2
    });
    let deadline = Instant::now() + T;
    let mut sent = 1u64;
    while got.recv_timeout(Duration::from_millis(100)).is_err() {
        assert!(Instant::now() < deadline, "the new receiver got nothing");
        s.write(b"again\n");
        sent += 1;
    }
    let (code, out, err, _) = s.finish();
    let _l2 = watcher.join().expect("watcher thread");
    assert_eq!(code, 0, "stdout {out:?} stderr {err:?}");
    assert_eq!(err, format!("receiver {a2} joined\n"));
    let prefix = format!("{sent} events: 1 receiver acknowledged all; {a2} acknowledged ");
    assert!(out.starts_with(&prefix), "{out:?} (first receiver {a1})");
    let words: Vec<&str> = out[prefix.len()..].split_whitespace().collect();
    let (k, from): (u64, u64) = match words[..] {
        [k, "from", "event", from] => (k.parse().expect("count"), from.parse().expect("seq")),
        _ => panic!("{out:?}"),
    };
    assert_eq!(k + from, sent + 1, "{out:?}");
}

#[test]
fn a_receiver_leaving_with_nothing_in_flight_is_announced_over_unix() {
    a_receiver_leaving_with_nothing_in_flight(Transport::Unix)
}

#[test]
fn a_receiver_leaving_with_nothing_in_flight_is_announced_over_tcp() {
    a_receiver_leaving_with_nothing_in_flight(Transport::Tcp)
}

fn a_receiver_leaving_with_nothing_in_flight(t: Transport) {
    let rt = Tmp::new("send-leave");
    let (l1, _) = listen_over(&rt, t, &["idle"]);
    let (mut l2, a2) = listen_over(&rt, t, &["idle"]);
    let a2 = human(&a2);
    let mut s = Piped::spawn({
        let mut c = ipcbus_cmd(rt.path());
        c.args(["send", "idle"]);
        c
    });
    s.write(b"one\n");
    l1.stdout_line("one");
    l2.stdout_line("one");
    // It unregisters and says goodbye while send waits for the next line.
    l2.signal(libc::SIGTERM);
    assert!(l2.wait(T).is_some_and(|st| st.success()));
    let note = s.err_line("left");
    assert_eq!(note, format!("receiver {a2} left: receiver closed"));
    let (code, out, err, _) = s.finish();
    assert_eq!(code, 0, "stdout {out:?} stderr {err:?}");
    assert_eq!(out, "1 event: 2 receivers acknowledged\n");
    assert_eq!(err, format!("{note}\n"));
}

#[test]
fn file_and_stdin_whole_are_one_event_each() {
    let rt = Tmp::new("send-whole");
    let (mut l, _) = listen(&rt, &["whole", "--json", "--count", "5"]);
    let path = rt.path().join("event.txt");
    std::fs::write(&path, "line one\r\nline two\n\n").expect("write the event file");
    let path = path.to_str().expect("utf-8 path");

    let r = send(&rt, &["whole", "--file", path], b"ignored\n");
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(r.stdout, "1 event: 1 receiver acknowledged\n", "{r:?}");
    let r = send(&rt, &["whole", "-s"], b"a\nb\n");
    assert_eq!(r.stdout, "1 event: 1 receiver acknowledged\n", "{r:?}");
    let r = send(&rt, &["whole", "--stdin-whole", "--count", "2"], b"twice");
    assert_eq!(r.stdout, "2 events: 1 receiver acknowledged all\n", "{r:?}");
    // Empty input is one empty event.
    let r = send(&rt, &["whole", "-s"], b"");
    assert_eq!(r.stdout, "1 event: 1 receiver acknowledged\n", "{r:?}");

    assert_eq!(
        payloads(&mut l),
        ["line one\r\nline two\n\n", "a\nb\n", "twice", "twice", ""]
    );
}

#[test]
fn stdin_lines_lose_lf_and_crlf_and_empty_lines_are_empty_events() {
    let rt = Tmp::new("send-lines");
    let (mut l, _) = listen(&rt, &["lines", "--json", "--count", "5"]);
    let r = send(&rt, &["lines"], b"a\r\n\r\n\nb\rc\nlast");
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(r.stdout, "5 events: 1 receiver acknowledged all\n", "{r:?}");
    assert_eq!(payloads(&mut l), ["a", "", "", "b\rc", "last"]);
}

#[test]
fn input_options_conflict_with_exit_2() {
    let rt = Tmp::new("send-conflicts");
    let f = rt.path().join("f");
    std::fs::write(&f, "x").expect("write file");
    let f = f.to_str().expect("utf-8 path");
    for args in [
        vec!["send", "h", "x", "--file", f],
        vec!["send", "h", "x", "-s"],
        vec!["send", "h", "-s", "--file", f],
        vec!["send", "h", "--stdin", "-s"],
        vec!["send", "h", "--stdin", "--file", f],
        vec!["send", "h", "-q", "-v", "x"],
    ] {
        let mut c = ipcbus_cmd(rt.path());
        c.args(&args);
        let r = run(c, b"");
        assert_eq!(r.code(), 2, "{args:?}: {r:?}");
        assert!(r.stderr.contains("cannot be used with"), "{args:?}: {r:?}");
    }
    // A --file that cannot be read is a configuration error: one line, exit 2.
    let missing = rt.path().join("missing");
    let r = send(&rt, &["h", "--file", missing.to_str().expect("utf-8")], b"");
    assert_eq!(r.code(), 2, "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    assert!(r.stderr.starts_with("error: cannot read file "), "{r:?}");
}

#[test]
fn too_large_input_stops_with_the_size_error_and_bounded_memory() {
    let rt = Tmp::new("send-big");
    let too_large =
        format!("payload of more than {MAX_EVENT} bytes exceeds the maximum of {MAX_EVENT}");

    // A line of exactly the maximum is an event; 40 MB more without a newline is not.
    let mut first = vec![b'x'; MAX_EVENT];
    first.push(b'\n');
    let (code, out, err, rss) = send_fed(&rt, &["h"], &first, 40_000_000);
    assert_eq!(code, 1, "stdout {out:?} stderr {err:?}");
    assert_eq!(out, "1 event: no receivers\n");
    assert!(
        err.ends_with(&format!(
            "error: cannot send line 2 of stdin: {too_large}\n"
        )),
        "{err:?}"
    );
    // It did hold the 16 MiB line (so the peak was measured), and not much more.
    assert!(rss > 16 * 1024, "peak RSS {rss} KiB");
    assert!(rss < RSS_LIMIT_KIB, "peak RSS {rss} KiB");

    let (code, out, err, rss) = send_fed(&rt, &["h", "-s"], b"", 40_000_000);
    assert_eq!(code, 1, "stdout {out:?} stderr {err:?}");
    assert_eq!(out, "", "nothing was sent");
    assert_eq!(err, format!("error: cannot send stdin: {too_large}\n"));
    assert!(rss < RSS_LIMIT_KIB, "peak RSS {rss} KiB");

    // A file is measured before it is read (this one is sparse).
    let path = rt.path().join("big");
    let f = std::fs::File::create(&path).expect("create file");
    f.set_len(40_000_000).expect("size the file");
    let (code, out, err, rss) =
        send_fed(&rt, &["h", "--file", path.to_str().expect("utf-8")], b"", 0);
    assert_eq!(code, 1, "stdout {out:?} stderr {err:?}");
    assert_eq!(
        err,
        format!(
            "error: cannot send file {}: payload of 40000000 bytes exceeds the maximum of {MAX_EVENT}\n",
            path.display()
        )
    );
    assert!(rss < RSS_LIMIT_KIB, "peak RSS {rss} KiB");
}
