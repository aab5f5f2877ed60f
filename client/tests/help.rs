//! Smoke test of the built `ipcbus` binary: every command answers `--help`.
//!
//! Having an integration test here also makes `cargo test` build the `ipcbus`
//! binary itself, which the black-box tests in `tests/` run.

use std::process::Command;

#[test]
fn every_command_has_help() {
    let exe = env!("CARGO_BIN_EXE_ipcbus");
    for args in [
        &["--help"][..],
        &["listen", "--help"],
        &["send", "--help"],
        &["list", "--help"],
        &["call", "--help"],
        &["serve", "--help"],
        &["demo", "--help"],
        &["bench", "--help"],
        &["epm", "--help"],
        &["epm", "status", "--help"],
    ] {
        let out = Command::new(exe).args(args).output().expect("run ipcbus");
        assert!(out.status.success(), "ipcbus {args:?} failed: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage:"), "ipcbus {args:?}: {text}");
        assert!(
            text.contains("--epm"),
            "ipcbus {args:?} lacks --epm: {text}"
        );
    }
}
