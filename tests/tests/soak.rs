//! The soak program in its short mode: ~20 s of chaos (receivers started, SIGKILLed,
//! stopped, paused; the EPM restarted once) against 2 senders, then the checker.
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

#[test]
fn short_soak_has_no_duplicates_losses_or_reordering() {
    let out = Command::new(SOAK)
        .args(["run", "--secs", "20"])
        .output()
        .expect("run soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("soak: "))
        .unwrap_or_else(|| panic!("no summary line; stderr:\n{stderr}"));
    println!("{line}");
    assert!(field(line, "events sent") > 1000, "{line}");
    assert!(field(line, "acknowledged") > 1000, "{line}");
    assert_eq!(field(line, "duplicates"), 0, "{line}\n{stderr}");
    assert_eq!(field(line, "lost after ack"), 0, "{line}\n{stderr}");
    assert_eq!(field(line, "out of order"), 0, "{line}\n{stderr}");
    assert_eq!(field(line, "unreported"), 0, "{line}\n{stderr}");
    assert_eq!(field(line, "epm restarts"), 1, "{line}");
    assert!(out.status.success(), "{line}\n{stderr}");
}
