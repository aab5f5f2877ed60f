//! `pub_thr` run as a user would, with nobody listening: it says on stderr what it
//! waits for instead of waiting silently.
//!
//! The example is built by `cargo test -p ipcbus-examples` (and `--workspace`), which
//! builds every example before running the tests.

use std::path::PathBuf;
use std::process::{Command, Stdio};
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

#[test]
fn pub_thr_without_receiver_says_what_it_waits_for() {
    let dir = std::env::temp_dir().join(format!("ipcbus-pub-thr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir runtime dir");
    let t0 = Instant::now();
    let mut child = Command::new(example("pub_thr"))
        .args([
            "--handle",
            "pubthr.lonely",
            "--count",
            "1",
            "--wait-secs",
            "2",
        ])
        .env("IPCBUS_RUNTIME_DIR", &dir)
        .env_remove("IPCBUS_EPM")
        .env_remove("IPCBUS_PASSWORD")
        .env_remove("IPCBUS_SALT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pub_thr");
    let deadline = t0 + Duration::from_secs(30);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&dir);
            panic!("pub_thr did not give up within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("pub_thr output");
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "no receiver, yet: {out:?}");
    assert!(
        err.contains(
            "waiting up to 2 s for 1 receiver of \"pubthr.lonely\" \
             (start sub_thr --handle pubthr.lonely first)"
        ),
        "{err}"
    );
    assert!(err.contains("only 0 of 1 receivers"), "{err}");
}
