//! Helpers for the black-box tests: temporary registry directories and child
//! processes that are killed by pid when the test ends, however it ends.

pub mod etcd;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A private temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new directory under the system temp dir, named after `tag`.
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p =
            std::env::temp_dir().join(format!("ipcbus-test-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed (SIGKILL) and reaped when dropped; its stdout lines are read
/// by a thread and delivered through a channel.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Spawns `cmd` with stdout piped.
    pub fn spawn(mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped()).stdin(Stdio::null());
        let mut child = cmd.spawn().expect("spawn child process");
        let out: ChildStdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines: rx }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for a stdout line starting with `prefix`; returns the rest.
    pub fn expect_line(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(rest) = l.strip_prefix(prefix) {
                        return rest.trim().to_string();
                    }
                }
                Err(_) => panic!("no line starting with {prefix:?} within {timeout:?}"),
            }
        }
    }

    /// Sends SIGKILL now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `timeout` for the child to exit; returns whether it succeeded.
    pub fn wait_success(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Everything the child wrote on stderr (when spawned with stderr piped), after it
    /// has exited.
    pub fn stderr_text(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

/// `--name value` command-line arguments of the test programs (`ipcbus-testpeer`,
/// `soak`): tiny on purpose, so the programs have no parser to test.
#[derive(Debug)]
pub struct Args(pub Vec<String>);

impl Args {
    /// This process's arguments after the program name.
    pub fn from_env() -> Args {
        Args(std::env::args().skip(1).collect())
    }

    /// The value after `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .position(|a| a == name)
            .and_then(|i| self.0.get(i + 1))
            .map(String::as_str)
    }

    /// The value after `name`, or an error naming it.
    pub fn req(&self, name: &str) -> anyhow::Result<&str> {
        use anyhow::Context;
        self.get(name)
            .with_context(|| format!("{name} is required"))
    }

    /// The number after `name`, or `default` when absent.
    pub fn num(&self, name: &str, default: u64) -> anyhow::Result<u64> {
        use anyhow::Context;
        match self.get(name) {
            Some(v) => v.parse().with_context(|| format!("{name} {v}")),
            None => Ok(default),
        }
    }

    /// Whether the flag `name` is present.
    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }

    /// The first argument (the mode).
    pub fn mode(&self) -> Option<&str> {
        self.0.first().map(String::as_str)
    }
}

/// Prints one line on stdout and flushes it (tests read these lines as they come).
pub fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Polls `$cond` (an expression that may `.await`) every 20 ms until it is true or
/// `$within` (a `Duration`) passes, in an async test; evaluates to whether it became
/// true. Bounded by `$within`.
#[macro_export]
macro_rules! eventually {
    ($within:expr, $cond:expr) => {{
        let deadline = ::std::time::Instant::now() + $within;
        let mut ok = false;
        while ::std::time::Instant::now() < deadline {
            if $cond {
                ok = true;
                break;
            }
            ::tokio::time::sleep(::std::time::Duration::from_millis(20)).await;
        }
        ok
    }};
}
