//! The settings a newcomer meets first, checked through the built binaries: one set of
//! password and salt variables everywhere (`IPCBUS_*` and `IPCBUS_EPM_*` alike), the
//! examples' `--password-file`, EPM addresses that are checked before use, exit codes,
//! options a command does not take, each command's `--help`, and logs without colour
//! codes when stderr is not a terminal.

mod cli_support;

use std::process::Command;

use cli_support::{epm_service, example, ipcbus_cmd, run, Epm, Proc, Tmp, IPCBUS_VARS, T};
use serde_json::Value;

/// `ipcbus listen` in the background; returns it once it printed `ready`.
fn listen(rt: &Tmp, args: &[&str], env: &[(&str, &str)]) -> Proc {
    cli_support::listen(rt, args, env).0
}

fn ipcbus(rt: &Tmp, args: &[&str], env: &[(&str, &str)]) -> cli_support::Ran {
    let mut c = ipcbus_cmd(rt.path());
    c.args(args).envs(env.iter().copied());
    run(c, b"")
}

#[test]
fn epm_names_and_plain_names_are_the_same_settings() {
    let rt = Tmp::new("names");
    // The receiver gets its password under the EPM names, the sender under the plain
    // ones, a third sender from a file named by IPCBUS_EPM_PASSWORD_FILE: all one key.
    let mut l = listen(
        &rt,
        &["names", "--count", "2"],
        &[
            ("IPCBUS_EPM_PASSWORD", "s3cret"),
            ("IPCBUS_EPM_SALT", "{0x01,0x02,0x03}"),
        ],
    );
    let r = ipcbus(
        &rt,
        &["send", "names", "--json", "one"],
        &[("IPCBUS_PASSWORD", "s3cret"), ("IPCBUS_SALT", "010203")],
    );
    assert_eq!(r.code(), 0, "{r:?}");
    let pw = rt.path().join("pw");
    std::fs::write(&pw, "s3cret\n").expect("write the password file");
    let r = ipcbus(
        &rt,
        &["send", "names", "--json", "two"],
        &[
            ("IPCBUS_EPM_PASSWORD_FILE", pw.to_str().expect("utf-8")),
            ("IPCBUS_EPM_SALT", "010203"),
        ],
    );
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(l.wait(T).is_some_and(|s| s.success()));
    assert_eq!(l.stdout_rest(), "one\ntwo\n");
}

#[test]
fn an_authentication_failure_names_the_settings_that_must_match() {
    let rt = Tmp::new("authnames");
    let _l = listen(
        &rt,
        &["authnames"],
        &[("IPCBUS_PASSWORD", "right"), ("IPCBUS_SALT", "01")],
    );
    let r = ipcbus(
        &rt,
        &["send", "authnames", "--json", "x"],
        &[("IPCBUS_PASSWORD", "wrong"), ("IPCBUS_SALT", "01")],
    );
    assert_eq!(r.code(), 1, "{r:?}");
    let rep: Value = serde_json::from_str(r.stdout.lines().next().unwrap_or("")).expect("JSON");
    let reason = rep["failed"][0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("IPCBUS_PASSWORD") && reason.contains("IPCBUS_SALT"),
        "{reason}"
    );
}

#[test]
fn two_different_values_under_both_names_are_refused() {
    let rt = Tmp::new("conflict");
    let r = ipcbus(
        &rt,
        &["send", "h", "x"],
        &[
            ("IPCBUS_PASSWORD", "a"),
            ("IPCBUS_EPM_PASSWORD", "b"),
            ("IPCBUS_SALT", "01"),
        ],
    );
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(
        r.stderr.contains("IPCBUS_PASSWORD") && r.stderr.contains("IPCBUS_EPM_PASSWORD"),
        "{r:?}"
    );
    // A salt without a password says what to set, naming where the salt came from.
    let r = ipcbus(&rt, &["send", "h", "x"], &[("IPCBUS_EPM_SALT", "01")]);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("IPCBUS_EPM_SALT"), "{r:?}");
    assert!(r.stderr.contains("--password-file"), "{r:?}");
    // An unreadable password file: one line, the cause said once.
    let r = ipcbus(
        &rt,
        &[
            "send",
            "h",
            "x",
            "--password-file",
            "/nonexistent/ipcbus-pw",
            "--salt",
            "01",
        ],
        &[],
    );
    assert_eq!(r.code(), 2, "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    assert_eq!(r.stderr.matches("No such file").count(), 1, "{r:?}");
}

#[test]
fn the_examples_take_a_password_file_and_the_same_variables() {
    let rt = Tmp::new("examples");
    let pw = rt.path().join("pw");
    std::fs::write(&pw, "ex-pass\n").expect("write the password file");
    let handle = format!("ex.pw.{}", std::process::id());
    let mut recv = Command::new(example("receiver"));
    for v in IPCBUS_VARS {
        recv.env_remove(v);
    }
    recv.env("IPCBUS_RUNTIME_DIR", rt.path()).args([
        "--handle",
        &handle,
        "--count",
        "1",
        "--password-file",
        pw.to_str().expect("utf-8"),
        "--salt",
        "0a0b",
    ]);
    let mut recv = Proc::spawn(recv);
    recv.stdout_line("receiving");
    // The sender takes the same key from the EPM-named variables.
    let mut send = Command::new(example("sender"));
    for v in IPCBUS_VARS {
        send.env_remove(v);
    }
    send.env("IPCBUS_RUNTIME_DIR", rt.path())
        .env("IPCBUS_EPM_PASSWORD", "ex-pass")
        .env("IPCBUS_EPM_SALT", "{0x0a,0x0b}")
        .args(["--handle", &handle, "--count", "1", "--interval-ms", "10"]);
    let r = run(send, b"");
    assert_eq!(r.code(), 0, "{r:?}");
    let st = recv.wait(T).expect("the receiver exits after one event");
    assert!(st.success(), "receiver: {st:?} {}", recv.stderr_rest());
}

#[test]
fn epm_addresses_are_checked_and_the_bad_part_named() {
    let rt = Tmp::new("epmaddr");
    for (addr, part) in [
        ("127.0.0.1:99999", "\"99999\" is not a port"),
        ("http://h:4455", "http://"),
        ("h:", "\"\" is not a port"),
    ] {
        let r = ipcbus(&rt, &["--epm", addr, "list"], &[]);
        assert_eq!(r.code(), 2, "{addr}: {r:?}");
        assert!(r.stderr.contains(part), "{addr}: {r:?}");
        assert!(
            !r.stderr.contains(&format!("{addr}:4455")),
            "{addr}: no port appended: {r:?}"
        );
        // The same from the environment.
        let r = ipcbus(&rt, &["list"], &[("IPCBUS_EPM", addr)]);
        assert_eq!(r.code(), 2, "IPCBUS_EPM={addr}: {r:?}");
        assert!(r.stderr.contains("IPCBUS_EPM"), "{addr}: {r:?}");
    }
    // A well-formed address where nothing listens is a runtime failure: exit 1.
    for args in [&["list"][..], &["epm", "status"], &["send", "h", "x"]] {
        let mut all = vec!["--epm", "127.0.0.1:1"];
        all.extend_from_slice(args);
        let r = ipcbus(&rt, &all, &[]);
        assert_eq!(r.code(), 1, "{args:?}: {r:?}");
        // One line, and the address and the word "epm" are not said twice in a row.
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {r:?}");
        assert_eq!(
            r.stderr.matches("127.0.0.1:1").count(),
            1,
            "{args:?}: {r:?}"
        );
        assert!(!r.stderr.contains("epm: epm"), "{args:?}: {r:?}");
    }
}

#[test]
fn options_a_command_does_not_take_are_refused() {
    let rt = Tmp::new("refused");
    for args in [
        &["demo", "--json"][..],
        &["list", "--ports", "9000"],
        &["list", "--ip", "127.0.0.1"],
        &["send", "h", "--ports", "9000", "x"],
        &["epm", "status", "--ip", "127.0.0.1"],
    ] {
        let r = ipcbus(&rt, args, &[]);
        assert_eq!(r.code(), 2, "{args:?}: {r:?}");
        assert!(r.stderr.contains("unexpected argument"), "{args:?}: {r:?}");
    }
    // The demo has a registry and a password of its own: it refuses the global
    // options rather than silently ignoring them.
    for args in [
        &["demo", "--epm", "127.0.0.1:4455"][..],
        &["--salt", "01", "demo"],
    ] {
        let r = ipcbus(&rt, args, &[]);
        assert_eq!(r.code(), 2, "{args:?}: {r:?}");
        assert!(r.stderr.contains("cannot apply"), "{args:?}: {r:?}");
    }
}

#[test]
fn each_help_shows_its_own_options_global_ones_apart_and_the_environment() {
    let rt = Tmp::new("help");
    for (args, own, foreign) in [
        (
            &["listen", "--help"][..],
            &["--json", "--ip", "--ports", "--count"][..],
            &["--wait-for"][..],
        ),
        (&["send", "--help"], &["--json"], &["--ports", "--ip"]),
        (
            &["list", "--help"],
            &["--json"],
            &["--ports", "--ip", "--count"],
        ),
        (&["demo", "--help"], &[], &["--json", "--ports", "--ip"]),
        (
            &["epm", "status", "--help"],
            &["--json"],
            &["--ports", "--ip"],
        ),
        (
            &["bench", "--help"],
            &["--json", "--ip", "--ports"],
            &["--wait-for"],
        ),
    ] {
        let r = ipcbus(&rt, args, &[]);
        assert_eq!(r.code(), 0, "{args:?}: {r:?}");
        let text = &r.stdout;
        let (mine, global) = text
            .split_once("Global options:")
            .unwrap_or_else(|| panic!("{args:?}: no Global options heading: {text}"));
        for o in own {
            assert!(mine.contains(o), "{args:?} lacks {o}: {text}");
        }
        for o in foreign {
            assert!(
                !text.contains(&format!("{o} ")),
                "{args:?} shows {o}: {text}"
            );
        }
        for g in ["--epm", "--password-file", "--salt"] {
            assert!(global.contains(g), "{args:?}: {g} not under Global options");
            assert!(
                !mine.contains(&format!("{g} <")),
                "{args:?}: {g} among own options"
            );
        }
        for v in [
            "IPCBUS_EPM_PASSWORD",
            "IPCBUS_PASSWORD",
            "IPCBUS_SALT",
            "RUST_LOG",
            "NO_COLOR",
        ] {
            assert!(text.contains(v), "{args:?} does not name {v}");
        }
        assert!(text.contains("Exit status"), "{args:?}");
    }
}

#[test]
fn logs_have_no_colour_codes_when_stderr_is_not_a_terminal() {
    let rt = Tmp::new("colour");
    // Debug logging says when a receiver registers: there is something to colour.
    let mut c = ipcbus_cmd(rt.path());
    c.args(["listen", "colours", "--timeout", "0.3"])
        .env("RUST_LOG", "debug");
    let r = run(c, b"");
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stderr.contains("DEBUG"), "no log line to check: {r:?}");
    assert!(
        !r.stderr.contains('\u{1b}'),
        "colour codes in a pipe: {r:?}"
    );

    let mut c = Command::new(example("receiver"));
    for v in IPCBUS_VARS {
        c.env_remove(v);
    }
    // The examples log through the same subscriber set-up: the library's debug line
    // when the receiver registers.
    c.env("IPCBUS_RUNTIME_DIR", rt.path())
        .env("RUST_LOG", "debug")
        .args(["--handle", "colours.ex", "--count", "1"]);
    let p = Proc::spawn(c);
    let line = p.stderr_line("DEBUG");
    assert!(!line.contains('\u{1b}'), "colour codes in a pipe: {line:?}");
}

#[test]
fn a_password_file_is_read_once_so_a_pipe_works_with_an_epm() {
    let rt = Tmp::new("pwpipe");
    let pw = rt.path().join("pw");
    std::fs::write(&pw, "piped\n").expect("write the password file");
    let epm = Epm::start(
        &epm_service(),
        &[
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--password-file",
            pw.to_str().expect("utf-8"),
            "--salt",
            "01",
        ],
    );
    // The password arrives on a pipe, which can be read only once.
    let mut c = ipcbus_cmd(rt.path());
    c.args([
        "--epm",
        &epm.addr,
        "--password-file",
        "/dev/stdin",
        "--salt",
        "01",
        "send",
        "nobody.here",
        "x",
    ]);
    let r = run(c, b"piped\n");
    assert_eq!(r.code(), 0, "{r:?}");
}

#[test]
fn empty_epm_and_unreadable_file_are_configuration_errors() {
    let rt = Tmp::new("emptyepm");
    let r = ipcbus(&rt, &["send", "--epm", "", "h", "x"], &[]);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("--epm is empty"), "{r:?}");
    // A blank IPCBUS_EPM counts as unset: the local registry.
    let r = ipcbus(&rt, &["send", "h", "x"], &[("IPCBUS_EPM", " ")]);
    assert_eq!(r.code(), 0, "{r:?}");
    // A directory given as --file opens but cannot be read: exit 2 as for a missing
    // file.
    let dir = rt.path().to_str().expect("utf-8").to_owned();
    let r = ipcbus(&rt, &["send", "h", "--file", &dir], &[]);
    assert_eq!(r.code(), 2, "{r:?}");
    let r = ipcbus(
        &rt,
        &["send", "h", "--file", "/nonexistent/ipcbus-file"],
        &[],
    );
    assert_eq!(r.code(), 2, "{r:?}");
}
