//! `epm-service` as a user meets it at the start: its `--help`, its exit statuses
//! (2 for a configuration error, 1 for a failure while running), each error said
//! once, and a log coloured only on a terminal without `NO_COLOR`.

mod cli_support;

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cli_support::{run, Ran};

const EPM_BIN: &str = env!("CARGO_BIN_EXE_test-epm-service");

/// `epm-service ARGS` with a known log level and none of the password variables.
fn epm(args: &[&str]) -> Command {
    let mut c = Command::new(EPM_BIN);
    c.args(args).env("RUST_LOG", "info").env_remove("NO_COLOR");
    for v in [
        "IPCBUS_EPM_PASSWORD",
        "IPCBUS_EPM_PASSWORD_FILE",
        "IPCBUS_EPM_SALT",
        "IPCBUS_PASSWORD",
        "IPCBUS_PASSWORD_FILE",
        "IPCBUS_SALT",
    ] {
        c.env_remove(v);
    }
    c
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().filter(|l| !l.trim().is_empty()).collect()
}

#[test]
fn missing_password_file_exits_2_saying_so_once() {
    let r = run(
        epm(&[
            "--password-file",
            "/nonexistent/epm.password",
            "--salt",
            "01",
        ]),
        b"",
    );
    assert_eq!(r.code(), 2, "{r:?}");
    let l = lines(&r.stderr);
    assert_eq!(l.len(), 1, "one line: {r:?}");
    assert!(l[0].contains("ERROR"), "{r:?}");
    assert!(l[0].contains("/nonexistent/epm.password"), "{r:?}");
    assert_eq!(
        r.stderr.matches("No such file or directory").count(),
        1,
        "the cause once: {}",
        r.stderr
    );
}

#[test]
fn other_configuration_errors_exit_2() {
    for args in [
        vec!["--salt", "zz", "--password-file", "/dev/null"],
        vec!["--port", "1", "2"],
        vec!["--bind", "not-an-address"],
        vec!["--frobnicate"],
    ] {
        let r = run(epm(&args), b"");
        assert_eq!(r.code(), 2, "{args:?}: {r:?}");
    }
}

#[test]
fn port_in_use_exits_1_with_one_line() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = busy.local_addr().expect("its address").to_string();
    let r: Ran = run(epm(&["--bind", &addr]), b"");
    assert_eq!(r.code(), 1, "{r:?}");
    let l = lines(&r.stderr);
    assert_eq!(l.len(), 1, "one line: {r:?}");
    assert!(l[0].contains("ERROR"), "{r:?}");
    assert!(
        l[0].contains(&format!("cannot listen on {addr}")),
        "names the address: {r:?}"
    );
    assert_eq!(r.stderr.matches("in use").count(), 1, "{}", r.stderr);
}

#[test]
fn help_names_environment_and_exit_statuses() {
    let r = run(epm(&["--help"]), b"");
    assert_eq!(r.code(), 0, "{r:?}");
    for v in [
        "IPCBUS_EPM_PASSWORD",
        "IPCBUS_EPM_PASSWORD_FILE",
        "IPCBUS_EPM_SALT",
        "IPCBUS_PASSWORD",
        "IPCBUS_PASSWORD_FILE",
        "IPCBUS_SALT",
        "RUST_LOG",
        "NO_COLOR",
        "Exit status",
    ] {
        assert!(r.stdout.contains(v), "{v} missing in --help:\n{}", r.stdout);
    }
    let has = |code: &str, word: &str| {
        r.stdout
            .lines()
            .any(|l| l.trim_start().starts_with(code) && l.contains(word))
    };
    assert!(has("1 ", "listen"), "{}", r.stdout);
    assert!(has("2 ", "configuration"), "{}", r.stdout);
}

#[test]
fn piped_log_has_no_colour() {
    let r = run(
        epm(&[
            "--password-file",
            "/nonexistent/epm.password",
            "--salt",
            "01",
        ]),
        b"",
    );
    assert!(!r.stderr.contains('\u{1b}'), "escape in {:?}", r.stderr);
}

/// Runs `cmd` with its stderr on a new pseudo-terminal; returns what it wrote there.
fn stderr_on_a_terminal(mut cmd: Command) -> String {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors into the integers given; the other
    // arguments may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(slave));
    let mut child = cmd.spawn().expect("spawn epm-service");
    drop(cmd); // closes our copy of the terminal's slave side
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::from(master);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the child has exited and every slave descriptor is closed.
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("epm-service did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    reader.join().expect("reader thread")
}

#[test]
fn terminal_log_is_coloured_unless_no_color() {
    let args = [
        "--password-file",
        "/nonexistent/epm.password",
        "--salt",
        "01",
    ];
    let coloured = stderr_on_a_terminal(epm(&args));
    assert!(coloured.contains("cannot read"), "{coloured:?}");
    assert!(
        coloured.contains('\u{1b}'),
        "a terminal gets colours: {coloured:?}"
    );
    let mut c = epm(&args);
    c.env("NO_COLOR", "1");
    let plain = stderr_on_a_terminal(c);
    assert!(plain.contains("cannot read"), "{plain:?}");
    assert!(!plain.contains('\u{1b}'), "NO_COLOR=1 but: {plain:?}");
}
