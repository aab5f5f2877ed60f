//! `calc_server` and `calc_client` run as a user would, as two processes: typed
//! results, a typed error, and progress called back from the server into the client.
//! With a password on both ends, and a client with another password refused.
//!
//! The examples are built by `cargo test -p ipcbus-examples` (and `--workspace`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
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
    assert!(p.is_file(), "{} is missing", p.display());
    p
}

/// A temporary registry directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("ipcb-calc-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("mkdir");
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The server process, killed (by pid) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn command(name: &str, dir: &Path, password: Option<&str>) -> Command {
    let mut c = Command::new(example(name));
    c.env("IPCBUS_RUNTIME_DIR", dir)
        .env_remove("IPCBUS_EPM")
        .env_remove("IPCBUS_ETCD")
        .env_remove("IPCBUS_PASSWORD_FILE")
        .env_remove("IPCBUS_TRANSPORTS")
        .stdin(Stdio::null());
    match password {
        Some(p) => c.env("IPCBUS_PASSWORD", p).env("IPCBUS_SALT", "010203"),
        None => c.env_remove("IPCBUS_PASSWORD").env_remove("IPCBUS_SALT"),
    };
    c
}

/// Starts calc_server and waits (bounded) for its "serving" line.
fn server(dir: &Path, password: Option<&str>) -> Killed {
    let mut child = command("calc_server", dir, password)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn calc_server");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("calc_server printed nothing within 30 s");
    assert!(
        line.starts_with("calc_server: serving \"calc\" (ipcbus_examples::calc::Calc v2)"),
        "{line}"
    );
    Killed(child)
}

/// Runs calc_client to the end (bounded).
fn client(dir: &Path, password: Option<&str>, args: &[&str]) -> Output {
    let mut child = command("calc_client", dir, password)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn calc_client");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("calc_client did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("calc_client output")
}

fn check_calc_session(password: Option<&str>, tag: &str) {
    let dir = Dir::new(tag);
    let _server = server(&dir.0, password);
    let out = client(&dir.0, password, &["40", "3"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for want in [
        "calc_client: 40 + 3 = 43",
        "calc_client: 40 / 3 = 13",
        "calc_client: 40 / 0: division by zero (CalcError::DivideByZero, typed)",
        "calc_client:   progress 1/3 (called back by the server)",
        "calc_client:   progress 3/3 (called back by the server)",
        "calc_client: sum = 6",
        "calc_client: the server has answered 4 calls",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn calc_client_gets_results_a_typed_error_and_progress_callbacks() {
    check_calc_session(None, "plain");
}

#[test]
fn calc_pair_with_a_password_and_a_client_with_another_one() {
    check_calc_session(Some("calc-secret"), "pw");
    let dir = Dir::new("wrong");
    let _server = server(&dir.0, Some("right"));
    let out = client(&dir.0, Some("wrong"), &["--wait-secs", "2"]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("authentication failed"), "{err}");
}

#[test]
fn calc_client_without_a_server_says_how_to_start_one() {
    let dir = Dir::new("none");
    let out = client(&dir.0, None, &["--wait-secs", "1"]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no server of \"calc\" registered within 1 s"),
        "{err}"
    );
}
