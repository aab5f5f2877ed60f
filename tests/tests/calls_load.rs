//! 5,000 concurrent calls from 50 client processes to 2 server processes: no
//! failures, every reply matched to its call (each reply carries its call's own
//! body), both servers used. Over Unix sockets (the default with the local
//! registry) and over TCP (`IPCBUS_TRANSPORTS=tcp`). The processes are the
//! `calls_load` program (see `tests/src/bin/calls_load.rs`).

mod cli_support;

use std::process::Command;
use std::time::Duration;

use cli_support::{Proc, Tmp, IPCBUS_VARS};

const CALLS_LOAD: &str = env!("CARGO_BIN_EXE_calls_load");

const SERVERS: usize = 2;
const CLIENTS: usize = 50;
const CALLS: usize = 100;

/// How long the 50 clients may take in all (each has its own 60 s call timeout).
const CLIENTS_DONE: Duration = Duration::from_secs(120);

/// The two runs take turns: each is 52 processes on a small machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cmd(runtime: &Tmp, transports: Option<&str>) -> Command {
    let mut c = Command::new(CALLS_LOAD);
    for v in IPCBUS_VARS {
        c.env_remove(v);
    }
    c.env("IPCBUS_RUNTIME_DIR", runtime.path());
    if let Some(t) = transports {
        c.env("IPCBUS_TRANSPORTS", t);
    }
    c
}

/// The number after `name ` in a summary line.
fn field(line: &str, name: &str) -> usize {
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == name {
            if let Some(n) = words.next().and_then(|n| n.parse().ok()) {
                return n;
            }
        }
    }
    panic!("no number after {name:?} in {line:?}")
}

fn load(transports: Option<&str>, expect: &str) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let runtime = Tmp::new("calls-load");
    let handle = format!("calls-load-{}", std::process::id());
    let servers: Vec<Proc> = (0..SERVERS)
        .map(|i| {
            let mut c = cmd(&runtime, transports);
            c.args(["server", &handle, &format!("s{i}")]);
            Proc::spawn(c)
        })
        .collect();
    for s in &servers {
        let ready = s.stdout_line("ready ");
        assert!(ready.contains(expect), "{ready:?} should list {expect}");
        if transports == Some("tcp") {
            assert!(!ready.contains("unix://"), "{ready:?}: TCP only");
        }
    }
    let mut clients: Vec<Proc> = (0..CLIENTS)
        .map(|i| {
            let mut c = cmd(&runtime, transports);
            c.args([
                "client",
                &handle,
                &i.to_string(),
                &CALLS.to_string(),
                &SERVERS.to_string(),
            ]);
            Proc::spawn(c)
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    let mut per_server = std::collections::BTreeMap::<String, usize>::new();
    let deadline = std::time::Instant::now() + CLIENTS_DONE;
    for (i, c) in clients.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let st = c
            .wait(left)
            .unwrap_or_else(|| panic!("client {i} did not finish within {CLIENTS_DONE:?}"));
        let out = c.stdout_rest();
        let err = c.stderr_rest();
        let line = out
            .lines()
            .find(|l| l.starts_with("ok "))
            .unwrap_or_else(|| panic!("client {i} ({st:?}) printed no summary; stderr:\n{err}"));
        ok += field(line, "ok");
        failed += field(line, "failed");
        if let Some(list) = line.split(" servers ").nth(1) {
            for part in list.split(',').filter(|p| !p.is_empty()) {
                let (s, n) = part.split_once('=').expect("server=count");
                *per_server.entry(s.to_owned()).or_default() += n.parse::<usize>().expect("count");
            }
        }
        assert!(st.success(), "client {i}: {line}\n{err}");
    }
    println!("{ok} calls matched, {failed} failed, per server {per_server:?}");
    assert_eq!(failed, 0);
    assert_eq!(ok, CLIENTS * CALLS);
    assert_eq!(
        per_server.len(),
        SERVERS,
        "both servers used: {per_server:?}"
    );
    assert!(per_server.values().all(|&n| n > 0), "{per_server:?}");
    assert_eq!(per_server.values().sum::<usize>(), CLIENTS * CALLS);
}

#[test]
fn five_thousand_calls_from_fifty_processes_to_two_servers_over_unix() {
    load(None, "unix://");
}

#[test]
fn five_thousand_calls_from_fifty_processes_to_two_servers_over_tcp() {
    load(Some("tcp"), "tcp://");
}
