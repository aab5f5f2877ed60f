//! `ipcbus send`: send arguments or stdin lines as events and print each report.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::BufRead;
use std::os::unix::ffi::OsStringExt;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use ipcbus::{Handle, PendingReport, SendReport, Sender};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::common::{parse_secs, Common};
use crate::out;

/// Events in flight at once before the next report is awaited.
const WINDOW: usize = 1024;

/// Send each MESSAGE as one event (or each line of stdin when there is none)
///
/// Prints a line per event on stdout: `sent to N receivers` (and `no receivers found`
/// on stderr when N is 0), or with --json {"seq","delivered":[addr...],
/// "failed":[{"addr","reason"}...]}. Exit status: 0 when every targeted receiver
/// acknowledged every event, 1 when any failed, 2 on usage or configuration errors.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub json_opt: crate::common::JsonOpt,

    /// Handle (topic) to send to
    pub handle: Handle,

    /// Messages to send, one event each [default: the lines of stdin]
    pub messages: Vec<OsString>,

    /// Read events from stdin, one per line (what happens anyway without MESSAGEs)
    #[arg(long, conflicts_with = "messages")]
    pub stdin: bool,

    /// Send each message N times
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,

    /// Wait until K receivers are known before sending
    #[arg(long, value_name = "K")]
    pub wait_for: Option<usize>,

    /// How long --wait-for waits before giving up (exit 1)
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_secs)]
    pub wait_timeout: Duration,
}

/// Runs `ipcbus send`.
///
/// # Errors
/// Configuration errors, too-large events, or stdout closing.
pub async fn run(common: &Common, args: Args) -> anyhow::Result<ExitCode> {
    let discovery = common.discovery()?;
    let security = common.security()?;
    let mut tx = Sender::builder(args.handle.clone())
        .discovery(discovery)
        .security(security)
        .build()
        .await
        .with_context(|| format!("cannot send to handle {}", args.handle))?;

    if let Some(k) = args.wait_for {
        wait_known(&mut tx, k, args.wait_timeout).await?;
    }

    let (msgs_tx, mut msgs) = mpsc::channel::<Bytes>(WINDOW);
    let count = args.count;
    if args.messages.is_empty() || args.stdin {
        // A plain thread: a blocking stdin read must not hold up runtime shutdown.
        std::thread::spawn(move || read_stdin(&msgs_tx, count));
    } else {
        let list: Vec<Bytes> = args
            .messages
            .into_iter()
            .map(|m| Bytes::from(m.into_vec()))
            .collect();
        tokio::spawn(async move {
            for m in list {
                for _ in 0..count {
                    if msgs_tx.send(m.clone()).await.is_err() {
                        return;
                    }
                }
            }
        });
    }

    let mut window: VecDeque<PendingReport> = VecDeque::new();
    let mut eof = false;
    let mut any_failed = false;
    loop {
        tokio::select! {
            biased;
            report = next(&mut window), if !window.is_empty() => {
                window.pop_front();
                any_failed |= !report.all_acked();
                print_report(common.json, &report)?;
            }
            m = msgs.recv(), if !eof && window.len() < WINDOW => match m {
                Some(m) => {
                    let len = m.len();
                    let p = tx.publish_bytes(m).await.with_context(|| {
                        format!("cannot send an event of {len} bytes")
                    })?;
                    window.push_back(p);
                }
                None => eof = true,
            },
            else => break,
        }
    }
    tx.close().await;
    Ok(if any_failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Waits (bounded) until the front report resolves.
async fn next(window: &mut VecDeque<PendingReport>) -> SendReport {
    match window.front_mut() {
        Some(p) => p.await,
        None => std::future::pending().await,
    }
}

/// Waits until `k` receivers are known (discovered, connected or connecting).
async fn wait_known(tx: &mut Sender, k: usize, timeout: Duration) -> anyhow::Result<()> {
    let start = tokio::time::Instant::now();
    loop {
        let n = tx.receivers().len();
        if n >= k {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            anyhow::bail!(
                "timed out after {:.1} s waiting for {k} receivers of {} ({n} found)",
                timeout.as_secs_f64(),
                tx.handle()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn read_stdin(tx: &mpsc::Sender<Bytes>, count: u64) {
    let stdin = std::io::stdin();
    let mut lock = stdin.lock();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match lock.read_until(b'\n', &mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                out::note(format!("error: reading stdin: {e}"));
                return;
            }
        }
        let mut line = &buf[..];
        line = line.strip_suffix(b"\n").unwrap_or(line);
        line = line.strip_suffix(b"\r").unwrap_or(line);
        let line = Bytes::copy_from_slice(line);
        for _ in 0..count {
            if tx.blocking_send(line.clone()).is_err() {
                return;
            }
        }
    }
}

/// One report as `send --json` prints it.
#[derive(Serialize)]
struct ReportJson {
    seq: u64,
    delivered: Vec<String>,
    failed: Vec<FailedJson>,
}

/// A receiver that did not acknowledge, and why.
#[derive(Serialize)]
struct FailedJson {
    addr: String,
    reason: String,
}

fn print_report(json: bool, r: &SendReport) -> anyhow::Result<()> {
    if json {
        let line = ReportJson {
            seq: r.seq,
            delivered: r.acked.iter().map(|a| a.addr.to_string()).collect(),
            failed: r
                .failed
                .iter()
                .map(|(who, why)| FailedJson {
                    addr: who.addr.to_string(),
                    reason: why.to_string(),
                })
                .collect(),
        };
        out::line(serde_json::to_string(&line)?)?;
    } else if r.failed.is_empty() {
        out::line(format!("sent to {} receivers", r.targeted()))?;
    } else {
        out::line(format!(
            "sent to {} receivers, {} failed",
            r.targeted(),
            r.failed.len()
        ))?;
    }
    if r.targeted() == 0 {
        out::note("no receivers found");
    }
    for (who, why) in &r.failed {
        out::note(format!("event {}: {} failed: {why}", r.seq, who.addr));
    }
    Ok(())
}
