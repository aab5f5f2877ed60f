//! The soak program in its short mode: ~20 s of chaos (receivers started, SIGKILLed,
//! stopped, paused; the EPM restarted once) against 2 senders, then the checker;
//! and ~10 s of the same over Unix sockets with the local registry instead of the
//! EPM.
//! The long run is `soak run --secs 600` by hand (see `tests/src/bin/soak.rs`).

use std::process::Command;

const SOAK: &str = env!("CARGO_BIN_EXE_soak");

fn field(line: &str, name: &str) -> u64 {
    let at = line
        .find(name)
        .unwrap_or_else(|| panic!("no {name:?} in {line:?}"));
    line[at + name.len()..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {name:?} in {line:?}"))
}

/// The two runs take turns: each is a dozen processes, timed by the checker.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `soak run ARGS` with `transports` as `IPCBUS_TRANSPORTS`; checks its verdict
/// and returns its summary line.
fn soak(args: &[&str], transports: Option<&str>) -> String {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new(SOAK);
    cmd.arg("run").args(args).env_remove("IPCBUS_TRANSPORTS");
    if let Some(t) = transports {
        cmd.env("IPCBUS_TRANSPORTS", t);
    }
    let out = cmd.output().expect("run soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("soak: "))
        .unwrap_or_else(|| panic!("no summary line; stderr:\n{stderr}"))
        .to_string();
    println!("{line}");
    assert!(field(&line, "events sent") > 1000, "{line}");
    assert!(field(&line, "acknowledged") > 1000, "{line}");
    assert_eq!(field(&line, "duplicates"), 0, "{line}\n{stderr}");
    assert_eq!(field(&line, "lost after ack"), 0, "{line}\n{stderr}");
    assert_eq!(field(&line, "out of order"), 0, "{line}\n{stderr}");
    assert_eq!(field(&line, "unreported"), 0, "{line}\n{stderr}");
    assert!(out.status.success(), "{line}\n{stderr}");
    line
}

#[test]
fn short_soak_through_the_epm_over_tcp_has_no_duplicates_losses_or_reordering() {
    let line = soak(&["--secs", "20"], None);
    assert_eq!(field(&line, "epm restarts"), 1, "{line}");
}

/// The same chaos without the EPM: the local registry, receivers on Unix sockets
/// only; shorter, as the EPM run covers the long tail.
#[test]
fn short_soak_over_unix_sockets_has_no_duplicates_losses_or_reordering() {
    let line = soak(&["--secs", "10", "--local"], Some("unix"));
    assert_eq!(field(&line, "epm restarts"), 0, "{line}");
}
