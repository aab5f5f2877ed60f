//! `ipcbus serve`: a server whose handler is a command, run once per request with
//! the request body on stdin; its stdout is the reply, a failure a remote error
//! carrying its stderr.

use std::ffi::OsString;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use ipcbus::{Endpoint, Handle, RemoteCode, RemoteError, Request, Server};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::common::{config_error, Common, ConfigContext};
use crate::out;

/// The most of a command's stderr a remote error carries (its end, where the cause
/// usually is); the wire caps a message at 4096 bytes, and the exit status is added.
const STDERR_KEPT: usize = 3584;

/// The largest reply: the default maximum frame less room for the reply's header
/// (the frame header, the id, an encryption tag).
const MAX_REPLY: usize = ipcbus_proto::frame::DEFAULT_MAX_FRAME - 1024;

/// How long after a request's deadline its `deadline_exceeded` answer is sent.
const LATE_REPLY: Duration = Duration::from_secs(1);

/// How long a closing server waits for the commands still running.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Serve HANDLE: run CMD once per request, the body on stdin, its stdout the reply
///
/// Binds a server for HANDLE (like `listen` binds a receiver: the local-user
/// registry by default, --epm, --etcd, or exactly --at ENDPOINT) and, once
/// registered, prints `ready HANDLE ADDR [ENDPOINT...]` on stderr, the form `listen`
/// prints (ADDR is the TCP ip:port, then any other endpoint such as unix:///...).
///
/// For each request it runs CMD with ARGS (no shell: write `sh -c '...'` for one)
/// with the request body on its stdin and these variables set: IPCBUS_HANDLE,
/// IPCBUS_METHOD (the method the caller named, often empty). Exit status 0: its
/// stdout is the reply (at most 16 MiB less 1 KiB). Another exit status, or killed
/// by a signal: the caller gets a remote error (application) whose message is the
/// end of its stderr (trimmed, at most 3.5 KiB) and `(exit status N)` or
/// `(killed by signal N)`. A command that cannot be started (not found, not
/// executable) is a remote error saying so; the server goes on. When the caller's
/// deadline passes, the command is killed (SIGKILL); the call is answered
/// deadline_exceeded a second later, when the caller has given up and reported its
/// own timeout.
///
/// At most --concurrency commands run at once; further requests wait for a slot
/// (within their deadline). SIGINT or SIGTERM: stop taking requests, let running
/// commands finish and answer for up to 5 s, unregister, exit 0.
///
/// Exit status: 0 after SIGINT/SIGTERM, 1 when the server cannot bind, 2 on usage or
/// configuration errors.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Handle (service name) to serve
    pub handle: Handle,

    /// Listen exactly at ENDPOINT (repeatable): tcp://IP:PORT, IP:PORT or
    /// unix:///PATH, instead of an ephemeral port and the registry's socket; callers
    /// can reach it with `call --to ENDPOINT` without any registry
    #[arg(long, value_name = "ENDPOINT")]
    pub at: Vec<Endpoint>,

    /// Commands running at once at most [default: the number of CPUs]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub concurrency: Option<u32>,

    /// The command and its arguments, after `--`
    #[arg(required = true, last = true, value_name = "CMD")]
    pub cmd: Vec<OsString>,
}

/// Runs `ipcbus serve`.
///
/// # Errors
/// Configuration errors, or a failure to bind.
pub async fn run(common: &Common, args: Args) -> anyhow::Result<ExitCode> {
    let concurrency = match args.concurrency {
        Some(n) => n as usize,
        None => std::thread::available_parallelism().map_or(4, |n| n.get()),
    };
    let mut b = Server::builder(args.handle.clone())
        .discovery(common.discovery()?)
        .security(common.security()?);
    for e in &args.at {
        b = b.bind_at(e.clone());
    }
    let mut server = match b.bind().await {
        Ok(s) => s,
        // What only another setting fixes is a configuration error (exit 2).
        Err(
            e @ (ipcbus::BindError::BadTransports { .. }
            | ipcbus::BindError::UnixNeedsPath
            | ipcbus::BindError::NoTransports
            | ipcbus::BindError::Unix(ipcbus::UnixBindError::PathTooLong { .. })),
        ) => return Err(config_error(e.to_string())),
        Err(e) => {
            return Err(anyhow::Error::new(e))
                .with_context(|| format!("cannot serve handle {}", args.handle))
        }
    };
    let mut sigint = signal(SignalKind::interrupt()).config("cannot install a SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).config("cannot install a SIGTERM handler")?;
    out::note(format!("ready {} {}", args.handle, ready_addrs(&server)));

    let cmd = Arc::new(Cmd {
        handle: args.handle.clone(),
        argv: args.cmd,
    });
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut running = JoinSet::new();
    loop {
        // A slot first, then a request: requests past the limit wait in the server.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        };
        let req = tokio::select! {
            r = server.next_request() => match r {
                Some(r) => r,
                None => break,
            },
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        };
        let cmd = cmd.clone();
        running.spawn(async move {
            cmd.answer(req).await;
            drop(permit);
        });
        // Reap finished tasks so the set stays small.
        while running.try_join_next().is_some() {}
    }
    // Let the commands running finish and answer (bounded; the rest are killed with
    // their tasks), then unregister and close: `Server::close` ends the connections
    // at once, so answers still to be written would be lost if it came first.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    running.abort_all();
    let _ = tokio::time::timeout(CLOSE_GRACE, server.close()).await;
    Ok(ExitCode::SUCCESS)
}

/// The command to run per request.
struct Cmd {
    handle: Handle,
    argv: Vec<OsString>,
}

/// What running the command once gave.
enum Outcome {
    /// It exited 0 with this stdout.
    Replied(Bytes),
    /// It failed: the error to answer.
    Failed(RemoteError),
}

impl Cmd {
    /// Runs the command for `req` and answers it.
    async fn answer(&self, req: Request) {
        let outcome = match req.time_left() {
            Some(left) if left.is_zero() => return late(req),
            Some(left) => match tokio::time::timeout(left, self.run(&req)).await {
                Ok(o) => o,
                // The future (and with it the child, kill_on_drop) is dropped.
                Err(_) => return late(req),
            },
            None => self.run(&req).await,
        };
        // A caller that has gone sees its call as timed out or disconnected; there is
        // nobody to tell here.
        let _ = match outcome {
            Outcome::Replied(body) => req.reply_bytes(body),
            Outcome::Failed(e) => req.reply_err(e),
        };
    }

    fn name(&self) -> String {
        self.argv
            .first()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Runs the command once with the request's body on stdin.
    async fn run(&self, req: &Request) -> Outcome {
        let Some((prog, rest)) = self.argv.split_first() else {
            return Outcome::Failed(RemoteError::new("no command to run"));
        };
        let mut child = match Command::new(prog)
            .args(rest)
            .env("IPCBUS_HANDLE", self.handle.as_str())
            .env("IPCBUS_METHOD", req.method())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
        {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Outcome::Failed(RemoteError::new(format!(
                    "cannot run {}: command not found",
                    self.name()
                )))
            }
            Err(e) => {
                return Outcome::Failed(RemoteError::new(format!(
                    "cannot run {}: {e}",
                    self.name()
                )))
            }
        };
        let body = req.body().clone();
        let stdin = child.stdin.take();
        let feed = async move {
            if let Some(mut i) = stdin {
                // A command that does not read its stdin closes the pipe: not an error.
                let _ = i.write_all(&body).await;
                let _ = i.shutdown().await;
            }
        };
        let stdout = read_capped(child.stdout.take(), MAX_REPLY);
        let stderr = read_tail(child.stderr.take(), STDERR_KEPT);
        let ((), stdout, stderr, status) = tokio::join!(feed, stdout, stderr, child.wait());
        let status = match status {
            Ok(s) => s,
            Err(e) => {
                return Outcome::Failed(RemoteError::new(format!(
                    "cannot wait for {}: {e}",
                    self.name()
                )))
            }
        };
        let stderr = stderr.unwrap_or_default();
        match stdout {
            Ok(Some(out)) if status.success() => Outcome::Replied(out),
            Ok(None) if status.success() => Outcome::Failed(RemoteError::new(format!(
                "{} wrote more than {MAX_REPLY} bytes to stdout, the largest reply",
                self.name()
            ))),
            Err(e) if status.success() => Outcome::Failed(RemoteError::new(format!(
                "cannot read the stdout of {}: {e}",
                self.name()
            ))),
            _ => Outcome::Failed(RemoteError::new(failure_message(&stderr, status))),
        }
    }
}

/// Answers a request whose deadline has passed (its command killed, or never
/// started) with `deadline_exceeded`, [`LATE_REPLY`] later and without holding a
/// slot: by then the caller has given up and reports its own timeout, instead of
/// this reply racing its timer.
fn late(req: Request) {
    tokio::spawn(async move {
        tokio::time::sleep(LATE_REPLY).await;
        let _ = req.reply_err(RemoteError {
            code: RemoteCode::DeadlineExceeded,
            message: "the caller's deadline passed: command killed".into(),
            detail: Bytes::new(),
        });
    });
}

/// The message of a failed command: its stderr, trimmed, and how it ended.
fn failure_message(stderr: &[u8], status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    let how = match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => "failed".to_owned(),
    };
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if text.is_empty() {
        format!("command failed ({how}) with nothing on stderr")
    } else {
        format!("{text} ({how})")
    }
}

/// Reads `r` to its end; `None` when it is longer than `max` (the rest is drained).
async fn read_capped(
    r: Option<impl AsyncRead + Unpin>,
    max: usize,
) -> std::io::Result<Option<Bytes>> {
    let Some(mut r) = r else {
        return Ok(Some(Bytes::new()));
    };
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut over = false;
    loop {
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        if !over && buf.len() + n <= max {
            buf.extend_from_slice(&chunk[..n]);
        } else {
            over = true;
            buf = Vec::new();
        }
    }
    Ok((!over).then(|| Bytes::from(buf)))
}

/// Reads `r` to its end, keeping its last `keep` bytes (cut at a character
/// boundary, with `...` in front when cut).
async fn read_tail(r: Option<impl AsyncRead + Unpin>, keep: usize) -> std::io::Result<Vec<u8>> {
    let Some(mut r) = r else {
        return Ok(Vec::new());
    };
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 8 * 1024];
    let mut cut = false;
    loop {
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 2 * keep {
            buf.drain(..buf.len() - keep);
            cut = true;
        }
    }
    Ok(tail(buf, keep, cut))
}

/// The last `keep` bytes of `buf`, starting at a UTF-8 character boundary.
fn tail(mut buf: Vec<u8>, keep: usize, mut cut: bool) -> Vec<u8> {
    if buf.len() > keep {
        buf.drain(..buf.len() - keep);
        cut = true;
    }
    if cut {
        // Skip continuation bytes so the text starts on a character.
        let skip = buf
            .iter()
            .take(3)
            .take_while(|b| (**b & 0xC0) == 0x80)
            .count();
        let mut out = b"...".to_vec();
        out.extend_from_slice(&buf[skip..]);
        return out;
    }
    buf
}

/// The endpoints of the `ready` line, as `listen` prints them: the TCP address as
/// bare `ip:port` first, then any other endpoint in its text form.
fn ready_addrs(s: &Server) -> String {
    let mut parts: Vec<String> = s.local_addr().map(|a| a.to_string()).into_iter().collect();
    parts.extend(
        s.endpoints()
            .iter()
            .filter(|e| e.tcp_addr().is_none())
            .map(ToString::to_string),
    );
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn failure_messages_carry_stderr_and_status() {
        let st = ExitStatus::from_raw(3 << 8);
        assert_eq!(failure_message(b"oops\n", st), "oops (exit status 3)");
        assert_eq!(
            failure_message(b"  \n", st),
            "command failed (exit status 3) with nothing on stderr"
        );
        let killed = ExitStatus::from_raw(9);
        assert_eq!(failure_message(b"x", killed), "x (killed by signal 9)");
    }

    #[test]
    fn tails_start_on_a_character() {
        assert_eq!(tail(b"abc".to_vec(), 10, false), b"abc");
        assert_eq!(tail(b"abcdef".to_vec(), 3, false), b"...def");
        // "é" is C3 A9: cutting between them skips the A9.
        let t = tail("aé".as_bytes().to_vec(), 1, false);
        assert_eq!(t, b"...");
        let t = tail("xéz".as_bytes().to_vec(), 2, false);
        assert_eq!(t, b"...z");
    }

    #[tokio::test]
    async fn capped_reads() {
        let data: &[u8] = b"hello";
        assert_eq!(
            read_capped(Some(data), 5).await.unwrap(),
            Some(Bytes::from_static(b"hello"))
        );
        assert_eq!(read_capped(Some(data), 4).await.unwrap(), None);
        let long = vec![b'x'; 10_000];
        let t = read_tail(Some(&long[..]), 100).await.unwrap();
        assert_eq!(t.len(), 103);
    }
}
