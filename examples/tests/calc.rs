//! `calc_server` and `calc_client` run as a user would: typed replies, a typed error,
//! and the server's progress calls back into the client.
//!
//! The examples are built by `cargo test -p ipcbus-examples` (and `--workspace`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>/examples/NAME`, next to this test's `deps/`.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let p = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .join("examples")
        .join(name);
    assert!(
        p.is_file(),
        "{} is missing: run cargo test -p ipcbus-examples (which builds the examples)",
        p.display()
    );
    p
}

/// Kills and reaps the child on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cmd(name: &str, dir: &std::path::Path) -> Command {
    let mut c = Command::new(example(name));
    c.env("IPCBUS_RUNTIME_DIR", dir);
    for v in [
        "IPCBUS_EPM",
        "IPCBUS_ETCD",
        "IPCBUS_PASSWORD",
        "IPCBUS_PASSWORD_FILE",
        "IPCBUS_SALT",
        "IPCBUS_TRANSPORTS",
    ] {
        c.env_remove(v);
    }
    c
}

#[test]
fn calc_client_gets_typed_replies_a_typed_error_and_progress_callbacks() {
    let dir = std::env::temp_dir().join(format!("ipcbus-calc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir runtime dir");
    let mut server = Killed(
        cmd("calc_server", &dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn calc_server"),
    );
    // Its first line says it is registered (a bounded wait: the server exits or
    // writes it).
    let stdout = server.0.stdout.take().expect("server stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("calc_server prints a line once serving");
    assert!(
        first.starts_with("calc_server: serving \"calc\""),
        "{first:?}"
    );

    let mut client = Killed(
        cmd("calc_client", &dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn calc_client"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = client.0.try_wait().expect("try_wait") {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "calc_client did not finish in 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    let mut err = String::new();
    use std::io::Read;
    if let Some(mut o) = client.0.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = client.0.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "calc_client: {status:?}\n{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "add(2, 3) = 5", "{out}");
    assert_eq!(
        lines[1], "div(7, 0) failed: 7 divided by zero (a CalcError::DivideByZero)",
        "{out}"
    );
    assert_eq!(lines[2], "add(i64::MAX, 1) failed: overflow", "{out}");
    let progress: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("  progress: "))
        .collect();
    assert_eq!(
        progress,
        [
            "  progress: 4/10, running total 10",
            "  progress: 8/10, running total 36",
            "  progress: 10/10, running total 55",
        ],
        "{out}"
    );
    assert_eq!(lines.last().copied(), Some("sum(1..=10) = 55"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
