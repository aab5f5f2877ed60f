//! `ipcbus serve -- CMD` and `ipcbus call` as a user runs them: the reply on stdout,
//! a failing command's stderr as the remote error (exit 1), no servers, a timeout
//! that kills the command, --all over two servers, the body from stdin, --json,
//! usage errors (exit 2), a password on both sides and a wrong one, a command that
//! does not exist, SIGTERM, and --at / --to without a registry.

mod cli_support;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cli_support::{ipcbus_cmd, json_lines, run, Proc, Ran, Tmp, T};
use serde_json::Value;

const PW: [(&str, &str); 2] = [("IPCBUS_PASSWORD", "s3cret"), ("IPCBUS_SALT", "010203")];

/// Starts `ipcbus serve HANDLE ARGS -- CMD...` and waits for its `ready` line
/// (stderr, in the form `listen` prints).
fn serve(rt: &Tmp, handle: &str, args: &[&str], cmd: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut c = ipcbus_cmd(rt.path());
    c.arg("serve")
        .arg(handle)
        .args(args)
        .arg("--")
        .args(cmd)
        .envs(env.iter().copied());
    let p = Proc::spawn(c);
    let ready = p.stderr_line("ready ");
    assert!(
        ready.starts_with(&format!("ready {handle} ")),
        "ready line {ready:?}"
    );
    p
}

/// Runs `ipcbus call ARGS` with `stdin` to completion (killed after [`T`]); its
/// stdout and stderr byte for byte (lossy UTF-8), unlike [`run`], which collects
/// lines.
fn call(rt: &Tmp, args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Ran {
    call_in(rt.path(), args, env, stdin)
}

/// [`call`] with the registry directory `dir`.
fn call_in(dir: &Path, args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Ran {
    let mut c = ipcbus_cmd(dir);
    c.arg("call")
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn ipcbus call");
    let all = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    };
    let out = all(child
        .stdout
        .take()
        .map(|o| Box::new(o) as Box<dyn Read + Send>));
    let err = all(child
        .stderr
        .take()
        .map(|e| Box::new(e) as Box<dyn Read + Send>));
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(stdin);
    }
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ipcbus call {args:?} did not finish within {T:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = |h: std::thread::JoinHandle<Vec<u8>>| {
        String::from_utf8_lossy(&h.join().expect("reader thread")).into_owned()
    };
    Ran {
        status,
        stdout: text(out),
        stderr: text(err),
    }
}

fn one_json(r: &Ran) -> Value {
    let v = json_lines(&r.stdout);
    assert_eq!(v.len(), 1, "one JSON line: {r:?}");
    v.into_iter().next().unwrap_or_default()
}

#[test]
fn serve_cat_answers_a_call_with_its_body() {
    let rt = Tmp::new("calls-cat");
    let _s = serve(&rt, "echo", &[], &["cat"], &[]);
    let r = call(&rt, &["echo", "hello"], &[], b"");
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(r.stdout, "hello");
    assert_eq!(r.stderr, "");
    // Many calls in a row on the same server.
    for i in 0..3 {
        let body = format!("call {i}");
        let r = call(&rt, &["echo", &body], &[], b"");
        assert_eq!((r.code(), r.stdout.as_str()), (0, body.as_str()), "{r:?}");
    }
}

#[test]
fn the_body_comes_from_stdin_with_a_dash_or_without_a_body() {
    let rt = Tmp::new("calls-stdin");
    let _s = serve(&rt, "echo", &[], &["cat"], &[]);
    let r = call(&rt, &["echo", "-"], &[], b"from stdin\nline 2\n");
    assert_eq!(
        (r.code(), r.stdout.as_str()),
        (0, "from stdin\nline 2\n"),
        "{r:?}"
    );
    let r = call(&rt, &["echo"], &[], b"no body argument");
    assert_eq!(
        (r.code(), r.stdout.as_str()),
        (0, "no body argument"),
        "{r:?}"
    );
    let r = call(&rt, &["echo"], &[], b"");
    assert_eq!((r.code(), r.stdout.as_str()), (0, ""), "{r:?}");
}

#[test]
fn a_failing_command_is_a_remote_error_with_its_stderr_and_exit_1() {
    let rt = Tmp::new("calls-fail");
    let _s = serve(
        &rt,
        "fails",
        &[],
        &[
            "sh",
            "-c",
            "cat >/dev/null; echo partial; echo oops >&2; exit 3",
        ],
        &[],
    );
    let r = call(&rt, &["fails", "x"], &[], b"");
    assert_eq!(r.code(), 1, "{r:?}");
    assert_eq!(r.stdout, "", "no reply body on failure: {r:?}");
    assert_eq!(
        r.stderr.trim_end(),
        "error: remote error (application): oops (exit status 3)",
        "{r:?}"
    );
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");

    let r = call(&rt, &["fails", "--json", "x"], &[], b"");
    assert_eq!(r.code(), 1, "{r:?}");
    let v = one_json(&r);
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"]["kind"], "remote", "{v}");
    assert_eq!(v["error"]["code"], "application", "{v}");
    assert_eq!(v["error"]["message"], "oops (exit status 3)", "{v}");
}

#[test]
fn a_missing_command_is_a_remote_error_and_the_server_goes_on() {
    let rt = Tmp::new("calls-missing");
    let mut s = serve(&rt, "nocmd", &[], &["/nonexistent/ipcbus-test-cmd"], &[]);
    for _ in 0..2 {
        let r = call(&rt, &["nocmd", "x"], &[], b"");
        assert_eq!(r.code(), 1, "{r:?}");
        assert!(r.stderr.contains("command not found"), "{r:?}");
        assert!(r.stderr.contains("/nonexistent/ipcbus-test-cmd"), "{r:?}");
    }
    assert!(
        s.child.try_wait().expect("try_wait").is_none(),
        "serve exited"
    );
}

#[test]
fn no_servers_fails_at_once_with_exit_1() {
    let rt = Tmp::new("calls-none");
    // A long timeout: the answer "no servers" must not wait for it.
    let r = call(&rt, &["nobody", "--timeout", "600000", "x"], &[], b"");
    assert_eq!(r.code(), 1, "{r:?}");
    assert_eq!(
        r.stderr.trim_end(),
        "error: no servers registered for handle nobody",
        "{r:?}"
    );
    let r = call(&rt, &["nobody", "--json", "x"], &[], b"");
    assert_eq!(r.code(), 1, "{r:?}");
    assert_eq!(one_json(&r)["error"]["kind"], "no_servers", "{r:?}");
    let r = call(&rt, &["nobody", "--all", "--json", "x"], &[], b"");
    assert_eq!(r.code(), 1, "{r:?}");
    assert_eq!(one_json(&r)["error"]["kind"], "no_servers", "{r:?}");
}

#[test]
fn an_unreachable_server_is_refused_and_did_not_run() {
    let rt = Tmp::new("calls-unreach");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let to = format!("tcp://127.0.0.1:{port}");
    let r = call(&rt, &["gone", "--to", &to, "x"], &[], b"");
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stdout.is_empty(), "{r:?}");
    assert!(
        r.stderr.starts_with("error: refused: cannot connect to ")
            && r.stderr.trim_end().ends_with("(the call did not run)"),
        "{r:?}"
    );
    let r = call(&rt, &["gone", "--to", &to, "--json", "x"], &[], b"");
    assert_eq!(r.code(), 1, "{r:?}");
    assert_eq!(one_json(&r)["error"]["kind"], "refused", "{r:?}");
}

#[test]
fn a_timeout_exits_1_and_the_command_is_killed() {
    let rt = Tmp::new("calls-timeout");
    // The command writes its pid, then sleeps far longer than the call's timeout.
    let pidfile = rt.path().join("slow.pid");
    let script = format!("echo $$ > '{}'; exec sleep 60", pidfile.display());
    let _s = serve(
        &rt,
        "slow",
        &["--concurrency", "1"],
        &["sh", "-c", &script],
        &[],
    );
    let r = call(&rt, &["slow", "--timeout", "500", "x"], &[], b"");
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(
        r.stderr.starts_with("error: call timed out after 500 ms"),
        "{r:?}"
    );
    let r = call(&rt, &["slow", "--timeout", "300", "--json", "x"], &[], b"");
    assert_eq!(r.code(), 1, "{r:?}");
    assert_eq!(one_json(&r)["error"]["kind"], "timeout", "{r:?}");

    // The command of a call past its deadline is killed: the pid goes away (bounded
    // wait), so the one slot of --concurrency 1 is free again.
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("the command wrote its pid")
        .trim()
        .parse()
        .expect("a pid");
    let mut gone = false;
    for _ in 0..500 {
        // SAFETY: signal 0 only checks that the process exists.
        if unsafe { libc::kill(pid, 0) } != 0 {
            gone = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(gone, "the command {pid} of the timed-out call still runs");
}

#[test]
fn all_gathers_every_servers_reply() {
    let rt = Tmp::new("calls-all");
    let _one = serve(&rt, "many", &[], &["sh", "-c", "printf one:; cat"], &[]);
    let _two = serve(&rt, "many", &[], &["sh", "-c", "printf two:; cat"], &[]);
    let r = call(&rt, &["many", "--all", "hi"], &[], b"");
    assert_eq!(r.code(), 0, "{r:?}");
    let heads: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with("--- ")).collect();
    assert_eq!(heads.len(), 2, "{r:?}");
    for h in &heads {
        assert!(h.ends_with(" ok (6 bytes)"), "{h:?}");
        assert!(
            h.contains("unix://"),
            "a server on this host is reached over its socket: {h:?}"
        );
    }
    let mut bodies: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| !l.starts_with("--- "))
        .collect();
    bodies.sort_unstable();
    assert_eq!(bodies, ["one:hi", "two:hi"], "{r:?}");

    let r = call(&rt, &["many", "--all", "--json", "hi"], &[], b"");
    assert_eq!(r.code(), 0, "{r:?}");
    let v = one_json(&r);
    let list = v.as_array().expect("an array");
    assert_eq!(list.len(), 2, "{v}");
    let mut bodies: Vec<&str> = list.iter().filter_map(|o| o["body"].as_str()).collect();
    bodies.sort_unstable();
    assert_eq!(bodies, ["one:hi", "two:hi"], "{v}");
    for o in list {
        assert_eq!(o["ok"], true, "{v}");
        assert!(
            o["server"]
                .as_str()
                .is_some_and(|s| s.starts_with("unix://")),
            "{v}"
        );
    }

    // One failing server: exit 1, its block says why, the other's reply is there.
    let _bad = serve(&rt, "many", &[], &["sh", "-c", "echo bad >&2; exit 9"], &[]);
    let r = call(&rt, &["many", "--all", "hi"], &[], b"");
    assert_eq!(r.code(), 1, "{r:?}");
    let errors: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.contains(" error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{r:?}");
    assert!(
        errors[0].ends_with("error: remote error (application): bad (exit status 9)"),
        "{r:?}"
    );
    assert_eq!(
        r.stdout
            .lines()
            .filter(|l| l.ends_with(" ok (6 bytes)"))
            .count(),
        2,
        "{r:?}"
    );
    assert!(r.stderr.contains("bad (exit status 9)"), "{r:?}");
}

#[test]
fn json_replies_are_text_or_base64() {
    let rt = Tmp::new("calls-json");
    let _t = serve(&rt, "text", &[], &["cat"], &[]);
    let r = call(&rt, &["text", "--json", "hé"], &[], b"");
    assert_eq!(r.code(), 0, "{r:?}");
    let v = one_json(&r);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["body"], "hé", "{v}");
    assert_eq!(v["size"], 3, "{v}");
    assert!(
        v["server"]
            .as_str()
            .is_some_and(|s| s.starts_with("unix://")),
        "{v}"
    );

    let _b = serve(
        &rt,
        "binary",
        &[],
        &["sh", "-c", "cat >/dev/null; printf '\\377\\000'"],
        &[],
    );
    let r = call(&rt, &["binary", "--json", "x"], &[], b"");
    assert_eq!(r.code(), 0, "{r:?}");
    let v = one_json(&r);
    assert_eq!(v["body"], serde_json::json!({"base64": "/wA="}), "{v}");
    assert_eq!(v["size"], 2, "{v}");
    // Without --json the bytes are written as they are (lossy here: U+FFFD, NUL).
    let r = call(&rt, &["binary", "x"], &[], b"");
    assert_eq!((r.code(), r.stdout.as_str()), (0, "\u{fffd}\0"), "{r:?}");
}

#[test]
fn usage_errors_exit_2() {
    let rt = Tmp::new("calls-usage");
    for args in [
        vec!["call", "bad/handle", "x"],
        vec!["call", "h", "--timeout", "0", "x"],
        vec!["call", "h", "--timeout", "soon", "x"],
        vec!["call", "h", "--bogus"],
        vec!["call"],
        vec!["serve", "h"],
        vec!["serve", "bad/handle", "--", "cat"],
        vec!["serve", "h", "--concurrency", "0", "--", "cat"],
    ] {
        let mut c = ipcbus_cmd(rt.path());
        c.args(&args);
        let r = run(c, b"");
        assert_eq!(r.code(), 2, "{args:?}: {r:?}");
        assert!(!r.stderr.is_empty(), "{args:?}: {r:?}");
    }
    // A password without a salt is a configuration error, for both commands.
    let r = call(&rt, &["h", "x"], &[("IPCBUS_PASSWORD", "pw")], b"");
    assert_eq!(r.code(), 2, "{r:?}");
}

#[test]
fn a_password_on_both_sides_works_and_a_wrong_one_is_refused() {
    let rt = Tmp::new("calls-pw");
    let _s = serve(&rt, "secure", &[], &["cat"], &PW);
    let r = call(&rt, &["secure", "secret body"], &PW, b"");
    assert_eq!((r.code(), r.stdout.as_str()), (0, "secret body"), "{r:?}");

    let wrong = [("IPCBUS_PASSWORD", "wrong"), ("IPCBUS_SALT", "010203")];
    let r = call(&rt, &["secure", "x"], &wrong, b"");
    assert_eq!(r.code(), 1, "{r:?}");
    assert_eq!(r.stdout, "", "{r:?}");
    assert!(r.stderr.contains("authentication failed"), "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");

    // No password against a server that has one fails the same way.
    let r = call(&rt, &["secure", "x"], &[], b"");
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr.contains("authentication failed"), "{r:?}");
}

#[test]
fn sigterm_unregisters_and_exits_0() {
    let rt = Tmp::new("calls-term");
    let mut s = serve(&rt, "term", &[], &["cat"], &[]);
    assert_eq!(call(&rt, &["term", "x"], &[], b"").code(), 0);
    s.signal(libc::SIGTERM);
    let st = s.wait(T).expect("serve exits after SIGTERM");
    assert_eq!(st.code(), Some(0), "{st:?}");
    let r = call(&rt, &["term", "x"], &[], b"");
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr.contains("no servers"), "{r:?}");
}

/// SIGTERM while a command runs: its answer still reaches the caller (the server
/// lets running calls finish before closing, and the client lets calls in flight to
/// a server that unregistered finish).
#[test]
fn sigterm_lets_a_running_command_answer_first() {
    let rt = Tmp::new("calls-term-running");
    let started = rt.path().join("started");
    let script = format!("touch '{}'; sleep 1; echo finished", started.display());
    let mut s = serve(&rt, "busy", &[], &["sh", "-c", &script], &[]);
    let caller = {
        let path = rt.path().to_path_buf();
        std::thread::spawn(move || call_in(&path, &["busy", "x"], &[], b""))
    };
    let deadline = Instant::now() + T;
    while !started.exists() {
        assert!(Instant::now() < deadline, "the command did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    s.signal(libc::SIGTERM);
    let r = caller.join().expect("caller thread");
    assert_eq!((r.code(), r.stdout.as_str()), (0, "finished\n"), "{r:?}");
    let st = s.wait(T).expect("serve exits after SIGTERM");
    assert_eq!(st.code(), Some(0), "{st:?}");
}

#[test]
fn serve_at_an_endpoint_and_call_it_without_a_registry() {
    let rt = Tmp::new("calls-at");
    let sock = rt.path().join("calc.sock");
    let at = format!("unix://{}", sock.display());
    let _s = serve(&rt, "direct", &["--at", &at], &["cat"], &[]);
    // Another registry directory (with the same local-user secret): only --to can
    // find the server.
    let other = Tmp::new("calls-at-other");
    ipcbus::LocalRegistry::open(rt.path())
        .and_then(|r| r.secret_key())
        .expect("the registry's secret");
    ipcbus::LocalRegistry::open(other.path()).expect("another registry");
    std::fs::copy(rt.path().join("secret"), other.path().join("secret")).expect("copy secret");
    let r = call(&other, &["direct", "--to", &at, "straight"], &[], b"");
    assert_eq!((r.code(), r.stdout.as_str()), (0, "straight"), "{r:?}");
    let r = call(&other, &["direct", "x"], &[], b"");
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr.contains("no servers"), "{r:?}");
}

#[test]
fn bench_rpc_prints_calls_against_the_plain_pair_as_json() {
    let rt = Tmp::new("calls-bench");
    let mut c = ipcbus_cmd(rt.path());
    c.args([
        "bench",
        "--rpc",
        "--transport",
        "tcp,unix",
        "--runs",
        "1",
        "--pings",
        "200",
        "--count",
        "2000",
        "--in-flight",
        "16",
        "--json",
    ]);
    let r = run(c, b"");
    assert_eq!(r.code(), 0, "{r:?}");
    let v: Value = serde_json::from_str(r.stdout.trim()).expect("bench --rpc --json is JSON");
    let rows = v["rpc"].as_array().expect("rpc rows");
    assert_eq!(rows.len(), 2, "{v}");
    for (row, t) in rows.iter().zip(["tcp", "unix"]) {
        assert_eq!(row["transport"], t, "{v}");
        assert_eq!(row["size"], 64, "{v}");
        for side in ["ipcbus", "baseline"] {
            let p50 = row["latency"][side]["p50_us"].as_f64().unwrap_or(0.0);
            assert!(p50 > 0.0, "{side} p50 in {row}");
        }
        let t = &row["throughput"];
        assert_eq!(t["in_flight"], 16, "{row}");
        assert_eq!(t["calls"], 2000, "{row}");
        assert_eq!(t["failed"], 0, "{row}");
        for k in ["ipcbus", "baseline", "events", "ratio", "events_ratio"] {
            assert!(t[k].as_f64().unwrap_or(0.0) > 0.0, "{k} in {row}");
        }
    }
}
