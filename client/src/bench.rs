//! `ipcbus bench`: throughput figures from real processes.
//!
//! The run is one sender (this process) to N receivers, each a child process (this
//! same binary re-executed with the hidden `bench-receiver` command), on a private
//! temporary registry unless an EPM is configured. Each receiver times its own events
//! from the first to the last; the sender times from its first publish to the last
//! report. Figures are printed, never asserted.
//!
//! Layout for later scenarios: [`Args`] names the run, [`Spawned`] owns the child
//! processes (killed by pid when dropped), [`Figures`] is what gets printed.

use std::collections::VecDeque;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipcbus::{Handle, PendingReport, Receiver, Sender};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::common::{parse_secs, Common, ConfigContext};
use crate::out;

/// Measure throughput: one sender to N receiver processes
///
/// Prints the events per second each receiver took (minimum and median), the
/// aggregate over all receivers, and the rate at which the sender saw events
/// acknowledged by every receiver. Exit status 1 if any event was not acknowledged.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Receiver processes
    #[arg(long, short = 'n', default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub receivers: u16,

    /// Payload size of each event in bytes
    #[arg(long, default_value_t = 64)]
    pub size: usize,

    /// Events to send
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,

    /// Events in flight before the sender waits for the oldest report
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u64).range(1..))]
    pub window: u64,

    /// Give up on a receiver that has not finished after SECS
    #[arg(long, value_name = "SECS", default_value = "120", value_parser = parse_secs)]
    pub timeout: Duration,
}

/// Arguments of one receiver process of a bench run (hidden command).
#[derive(clap::Args, Debug)]
pub struct ReceiverArgs {
    /// Handle to receive.
    pub handle: Handle,
    /// Events to take before reporting.
    #[arg(long)]
    pub count: u64,
    /// Stop waiting after this long without an event.
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    pub idle: Duration,
}

/// What one receiver process reports on stdout when done.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReceiverResult {
    received: u64,
    /// Seconds from the first event to the last.
    secs: f64,
}

impl ReceiverResult {
    fn rate(&self) -> f64 {
        rate(self.received, self.secs)
    }
}

/// The figures of a run.
#[derive(Debug, Serialize)]
struct Figures {
    receivers: usize,
    size: usize,
    count: u64,
    /// Events per second each receiver took, in receiver order.
    per_receiver: Vec<f64>,
    min: f64,
    median: f64,
    /// Events taken by all receivers together, per second of the sender's run.
    aggregate: f64,
    /// Events acknowledged by every receiver, per second of the sender's run.
    sender_acked_rate: f64,
    acked: u64,
    failed: u64,
    secs: f64,
}

/// The receiver processes of a run, killed by pid when dropped.
struct Spawned {
    children: Vec<(Child, Lines<BufReader<ChildStdout>>)>,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        for (c, _) in &mut self.children {
            let _ = c.start_kill();
        }
    }
}

/// Runs `ipcbus bench`.
///
/// # Errors
/// Configuration errors, or when receivers cannot be started.
pub async fn run(common: &Common, args: Args) -> anyhow::Result<ExitCode> {
    let key = common.key()?;
    let creds = common.credentials()?;
    let handle: Handle = format!("ipcbus-bench-{}-{:08x}", std::process::id(), rand_u32())
        .parse()
        .context("bench handle")?;
    let dir = tempfile::Builder::new()
        .prefix("ipcbus-bench-")
        .tempdir()
        .config("cannot create a temporary registry directory")?;
    let discovery = match &common.epm {
        Some(_) => common.discovery()?,
        None => ipcbus::Discovery::local_at(dir.path()).config("cannot open the bench registry")?,
    };
    let n = usize::from(args.receivers);

    let mut spawned = spawn_receivers(common, &args, &handle, dir.path(), creds).await?;

    let mut b = Sender::builder(handle).discovery(discovery);
    if let Some(k) = key {
        b = b.key(k);
    }
    let mut tx = b.build().await?;
    let found = tx.wait_for_receivers(n, Duration::from_secs(10)).await;
    if found < n {
        bail!("the sender reached {found} of {n} receivers");
    }

    let payload = bytes::Bytes::from(vec![0x5au8; args.size]);
    let mut window: VecDeque<PendingReport> = VecDeque::new();
    let (mut acked, mut failed) = (0u64, 0u64);
    let mut tally = |r: ipcbus::SendReport| {
        if r.all_acked() && r.acked.len() == n {
            acked += 1;
        } else {
            failed += 1;
        }
    };
    let t0 = Instant::now();
    for _ in 0..args.count {
        window.push_back(tx.publish_bytes(payload.clone()).await?);
        while window.len() as u64 >= args.window {
            if let Some(p) = window.pop_front() {
                tally(p.await);
            }
        }
    }
    for p in window {
        tally(p.await);
    }
    let secs = t0.elapsed().as_secs_f64();
    tx.close().await;

    let mut results = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + args.timeout;
    for (i, (child, lines)) in spawned.children.iter_mut().enumerate() {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .with_context(|| format!("receiver {i} did not report in time"))?
            .with_context(|| format!("reading receiver {i}"))?
            .with_context(|| format!("receiver {i} exited without a report"))?;
        let r: ReceiverResult = serde_json::from_str(&line)
            .with_context(|| format!("receiver {i} reported {line:?}"))?;
        results.push(r);
        let _ = tokio::time::timeout_at(deadline, child.wait()).await;
    }
    drop(spawned);

    let mut rates: Vec<f64> = results.iter().map(ReceiverResult::rate).collect();
    let per_receiver = rates.clone();
    rates.sort_by(f64::total_cmp);
    let received: u64 = results.iter().map(|r| r.received).sum();
    let fig = Figures {
        receivers: n,
        size: args.size,
        count: args.count,
        per_receiver,
        min: rates.first().copied().unwrap_or(0.0),
        median: median(&rates),
        aggregate: rate(received, secs),
        sender_acked_rate: rate(acked, secs),
        acked,
        failed,
        secs,
    };
    print(common, &fig)?;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn spawn_receivers(
    common: &Common,
    args: &Args,
    handle: &Handle,
    dir: &Path,
    creds: Option<(Vec<u8>, crate::common::Salt)>,
) -> anyhow::Result<Spawned> {
    let exe = std::env::current_exe().context("cannot find the ipcbus executable")?;
    let mut spawned = Spawned {
        children: Vec::new(),
    };
    for _ in 0..args.receivers {
        let mut cmd = Command::new(&exe);
        cmd.arg("bench-receiver")
            .arg(handle.as_str())
            .arg("--count")
            .arg(args.count.to_string())
            .env_remove("IPCBUS_PASSWORD_FILE")
            .env_remove("IPCBUS_PASSWORD")
            .env_remove("IPCBUS_SALT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        match &common.epm {
            Some(epm) => {
                cmd.arg("--epm").arg(epm);
            }
            None => {
                cmd.env("IPCBUS_RUNTIME_DIR", dir).env_remove("IPCBUS_EPM");
            }
        }
        if let Some(ip) = common.ip {
            cmd.arg("--ip").arg(ip.to_string());
        }
        if let Some(ports) = &common.ports {
            let list: Vec<String> = ports.0.iter().map(u16::to_string).collect();
            cmd.arg("--ports").arg(list.join(","));
        }
        if let Some((pw, salt)) = &creds {
            cmd.env("IPCBUS_PASSWORD", std::ffi::OsString::from_vec(pw.clone()))
                .env("IPCBUS_SALT", salt.to_hex());
        }
        let mut child = cmd.spawn().context("cannot start a receiver process")?;
        let stdout = child
            .stdout
            .take()
            .context("receiver process has no stdout")?;
        spawned
            .children
            .push((child, BufReader::new(stdout).lines()));
    }
    for (i, (_, lines)) in spawned.children.iter_mut().enumerate() {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .with_context(|| format!("receiver {i} did not start in time"))?
            .with_context(|| format!("reading receiver {i}"))?
            .with_context(|| format!("receiver {i} exited before it was ready"))?;
        if !line.starts_with("ready ") {
            bail!("receiver {i} said {line:?} instead of ready");
        }
    }
    Ok(spawned)
}

/// Runs one receiver process of a bench: prints `ready ADDR`, takes `count` events,
/// prints a JSON [`ReceiverResult`].
///
/// # Errors
/// When it cannot bind, or stdout is closed.
pub async fn run_receiver(common: &Common, args: ReceiverArgs) -> anyhow::Result<ExitCode> {
    let mut b = Receiver::builder(args.handle)
        .discovery(common.discovery()?)
        .security(common.security()?)
        .queue_capacity(8192);
    if let Some(ip) = common.ip {
        b = b.ip(ip);
    }
    if let Some(p) = &common.ports {
        b = b.allowed_ports(p.0.iter().copied());
    }
    let mut rx = b.bind().await?;
    out::line(format!("ready {}", rx.local_addr()))?;
    let mut received = 0u64;
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    while received < args.count {
        match tokio::time::timeout(args.idle, rx.recv()).await {
            Ok(Some(_)) => {
                last = Instant::now();
                first.get_or_insert(last);
                received += 1;
            }
            _ => break,
        }
    }
    rx.close().await;
    let secs = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    out::line(serde_json::to_string(&ReceiverResult { received, secs })?)?;
    Ok(ExitCode::SUCCESS)
}

fn print(common: &Common, f: &Figures) -> anyhow::Result<()> {
    if common.json {
        out::line(serde_json::to_string(f)?)?;
        return Ok(());
    }
    out::line(format!(
        "bench: 1 sender -> {} receiver processes, {} events of {} B",
        f.receivers, f.count, f.size
    ))?;
    out::line(format!(
        "  per receiver: min {} msgs/s, median {} msgs/s",
        human(f.min),
        human(f.median)
    ))?;
    out::line(format!(
        "  aggregate:    {} msgs/s taken by all receivers together",
        human(f.aggregate)
    ))?;
    out::line(format!(
        "  sender:       {} msgs/s acknowledged by every receiver ({} of {} events, {:.2} s)",
        human(f.sender_acked_rate),
        f.acked,
        f.count,
        f.secs
    ))?;
    if f.failed > 0 {
        out::note(format!(
            "{} events were not acknowledged by every receiver",
            f.failed
        ));
    }
    Ok(())
}

fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// A rate with thousands separators, e.g. `1 234 567`.
fn human(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[1.0]), 1.0);
        assert_eq!(median(&[1.0, 3.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
    }

    #[test]
    fn human_numbers() {
        assert_eq!(human(0.0), "0");
        assert_eq!(human(999.4), "999");
        assert_eq!(human(1000.0), "1 000");
        assert_eq!(human(1234567.0), "1 234 567");
    }
}
