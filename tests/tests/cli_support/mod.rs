//! Helpers for the tests that run the built `ipcbus` and `epm-service` binaries as a
//! user would: finding them, temporary directories, and child processes that are
//! killed by pid and reaped however the test ends, with every wait bounded.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Longest any single command or wait in these tests may take.
pub const T: Duration = Duration::from_secs(30);

/// `target/<profile>/`, where cargo puts the workspace's binaries: the test
/// executable lives in `target/<profile>/deps/`.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let deps = exe.parent().expect("test executable has a directory");
    deps.parent().expect("deps has a parent").to_path_buf()
}

/// A workspace binary next to the test executable. `cargo test --workspace` builds it
/// (each binary crate has an integration test, which makes cargo build its binary).
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the workspace binaries first (cargo build --workspace, \
         or run cargo test --workspace)",
        p.display()
    );
    p
}

/// The `ipcbus` command line.
pub fn ipcbus() -> PathBuf {
    bin("ipcbus")
}

/// The `epm-service` daemon, or when it was not built, the tests crate's copy of the
/// same entry point.
pub fn epm_service() -> PathBuf {
    let p = target_dir().join("epm-service");
    if p.is_file() {
        return p;
    }
    match option_env!("CARGO_BIN_EXE_test-epm-service") {
        Some(q) => PathBuf::from(q),
        None => bin("epm-service"),
    }
}

/// The repository root (this crate is `tests/` in it).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A private temporary directory, removed on drop.
#[derive(Debug)]
pub struct Tmp(PathBuf);

impl Tmp {
    /// A new, empty, mode-0700 directory named after `tag`.
    pub fn new(tag: &str) -> Tmp {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "ipcbus-cli-test-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&p)
            .expect("create temp dir");
        Tmp(p)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `ipcbus` with a private registry directory and no inherited ipcbus settings.
pub fn ipcbus_cmd(runtime: &Path) -> Command {
    let mut c = Command::new(ipcbus());
    for v in IPCBUS_VARS {
        c.env_remove(v);
    }
    c.env("IPCBUS_RUNTIME_DIR", runtime);
    c
}

/// Every variable that changes what an ipcbus program does; the tests start their
/// programs without them (and set what each test needs).
pub const IPCBUS_VARS: [&str; 13] = [
    "IPCBUS_EPM",
    "IPCBUS_ETCD",
    "IPCBUS_ETCD_CA",
    "IPCBUS_PASSWORD",
    "IPCBUS_PASSWORD_FILE",
    "IPCBUS_SALT",
    "IPCBUS_EPM_PASSWORD",
    "IPCBUS_EPM_PASSWORD_FILE",
    "IPCBUS_EPM_SALT",
    "RUST_LOG",
    "NO_COLOR",
    "IPCBUS_RUNTIME_DIR",
    "IPCBUS_TRANSPORTS",
];

/// A runnable example of `ipcbus-examples` (`cargo test --workspace` builds them).
pub fn example(name: &str) -> PathBuf {
    let p = target_dir().join("examples").join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the examples first (cargo build --workspace --examples)",
        p.display()
    );
    p
}

/// Starts `ipcbus listen` with `args` and waits for its `ready HANDLE ADDR
/// [ENDPOINT...]` line; returns the process and ADDR (the TCP `ip:port`).
pub fn listen(runtime: &Tmp, args: &[&str], env: &[(&str, &str)]) -> (Proc, String) {
    let (p, endpoints) = listen_at(runtime, args, env);
    let addr = endpoints
        .iter()
        .find_map(|e| e.tcp_addr())
        .unwrap_or_else(|| panic!("no tcp address among {endpoints:?}"));
    (p, addr.to_string())
}

/// Like [`listen`], returning every endpoint of the `ready` line.
pub fn listen_at(
    runtime: &Tmp,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Proc, Vec<ipcbus::Endpoint>) {
    let mut c = ipcbus_cmd(runtime.path());
    c.arg("listen").args(args).envs(env.iter().copied());
    let p = Proc::spawn(c);
    let ready = p.stderr_line("ready ");
    let parts: Vec<&str> = ready.split_whitespace().collect();
    assert!(parts.len() >= 3, "ready line {ready:?}");
    assert_eq!(parts[0], "ready");
    let endpoints = parts[2..]
        .iter()
        .map(|e| {
            e.parse()
                .unwrap_or_else(|err| panic!("{e:?} in {ready:?}: {err}"))
        })
        .collect();
    (p, endpoints)
}

/// Runs `ipcbus send` with `args`, `env` and `stdin` to completion.
pub fn send(runtime: &Tmp, args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Ran {
    let mut c = ipcbus_cmd(runtime.path());
    c.arg("send").args(args).envs(env.iter().copied());
    run(c, stdin)
}

/// The JSON objects of `s`, one a line (empty lines skipped).
pub fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?} is not JSON: {e}")))
        .collect()
}

/// What a finished command did.
#[derive(Debug)]
pub struct Ran {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Ran {
    /// The exit code (-1 when killed by a signal).
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
}

/// Runs `cmd` to completion with `stdin` as input, killing it after [`T`].
pub fn run(mut cmd: Command, stdin: &[u8]) -> Ran {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut p = Proc::spawn_raw(cmd);
    if let Some(mut i) = p.child.stdin.take() {
        use std::io::Write;
        let _ = i.write_all(stdin);
    }
    let status = p
        .wait(T)
        .unwrap_or_else(|| panic!("command did not finish within {T:?}"));
    let stdout = p.stdout_rest();
    let stderr = p.stderr_rest();
    Ran {
        status,
        stdout,
        stderr,
    }
}

/// A child process, SIGKILLed and reaped on drop; its stdout and stderr are read line
/// by line by threads.
#[derive(Debug)]
pub struct Proc {
    /// The child.
    pub child: Child,
    out: Option<mpsc::Receiver<String>>,
    err: Option<mpsc::Receiver<String>>,
}

fn reader(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Proc {
    /// Spawns with stdout and stderr piped and read, stdin closed.
    pub fn spawn(mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Proc::spawn_raw(cmd)
    }

    fn spawn_raw(mut cmd: Command) -> Proc {
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let out = child.stdout.take().map(reader);
        let err = child.stderr.take().map(reader);
        Proc { child, out, err }
    }

    /// Spawns with stdout a pipe whose reading end is closed at once, so the child's
    /// first write to stdout fails with a broken pipe; stderr is read.
    pub fn spawn_stdout_closed(mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        drop(child.stdout.take());
        let err = child.stderr.take().map(reader);
        Proc {
            child,
            out: None,
            err,
        }
    }

    /// Waits for a line on stdout containing `needle`; returns it.
    pub fn stdout_line(&self, needle: &str) -> String {
        wait_line(self.out.as_ref(), needle, "stdout")
    }

    /// Waits for a line on stderr containing `needle`; returns it.
    pub fn stderr_line(&self, needle: &str) -> String {
        wait_line(self.err.as_ref(), needle, "stderr")
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `sig` to the child by pid.
    pub fn signal(&self, sig: i32) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits");
        // SAFETY: kill only sends a signal to our own child's pid.
        unsafe {
            libc::kill(pid, sig);
        }
    }

    /// The rest of stdout after exit (bounded wait).
    pub fn stdout_rest(&mut self) -> String {
        drain(self.out.as_ref())
    }

    /// The rest of stderr after exit (bounded wait).
    pub fn stderr_rest(&mut self) -> String {
        drain(self.err.as_ref())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_line(rx: Option<&mpsc::Receiver<String>>, needle: &str, what: &str) -> String {
    let rx = rx.unwrap_or_else(|| panic!("{what} is not read"));
    let deadline = Instant::now() + T;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return l,
            Ok(l) => seen.push(l),
            Err(_) => panic!("no {what} line with {needle:?} within {T:?}; saw {seen:#?}"),
        }
    }
}

fn drain(rx: Option<&mpsc::Receiver<String>>) -> String {
    let Some(rx) = rx else {
        return String::new();
    };
    let mut s = String::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Ok(l) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        s.push_str(&l);
        s.push('\n');
    }
    s
}

/// Removes ANSI colour sequences (log lines may carry them).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... final byte in @..~
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// A running `epm-service` on loopback with a free port, killed on drop.
#[derive(Debug)]
pub struct Epm {
    /// The process.
    pub proc: Proc,
    /// Where it listens (`ip:port`).
    pub addr: String,
}

impl Epm {
    /// Starts `epm-service` with `args` (plus whatever makes it listen on loopback)
    /// and waits for its `listening on ADDR` log line.
    pub fn start(exe: &Path, args: &[&str]) -> Epm {
        let mut cmd = Command::new(exe);
        for v in IPCBUS_VARS {
            cmd.env_remove(v);
        }
        cmd.args(args).env("RUST_LOG", "info");
        let proc = Proc::spawn(cmd);
        let line = strip_ansi(&proc.stderr_line("listening on "));
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        Epm { proc, addr }
    }
}

/// Whether `s` looks like RFC 3339 in UTC: `YYYY-MM-DDTHH:MM:SS(.fff)Z`.
pub fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|x| x.iter().all(u8::is_ascii_digit));
    b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && s.ends_with('Z')
}
