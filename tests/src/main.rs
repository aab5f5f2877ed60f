//! `ipcbus-testpeer`: a receiver or sender process driven by the black-box tests.
//!
//! ```text
//! ipcbus-testpeer recv --handle H [--expect N] [--until-seq S] [--stall-after K]
//!                      [--password P --salt S] [--timeout SECS]
//!                      [--etcd URLS [--lease-secs N]]
//!     prints "ready ADDR RECEIVER_ID" once registered (ADDR: the TCP ip:port, or
//!     the Unix endpoint with IPCBUS_TRANSPORTS=unix), then at the end
//!     "summary {json}" with per-sender first/last/count/dups/out_of_order.
//! ipcbus-testpeer send --handle H --count N [--wait-for K] [--size B]
//!                      [--interval-us U] [--password P --salt S]
//!     prints "ready SENDER_ID" once K receivers are connected, then
//!     "summary {json}" with per-receiver endpoint, acked and failed counts.
//! ```
//! The registry is the one of `IPCBUS_RUNTIME_DIR`, or etcd at `--etcd` with a lease of
//! `--lease-secs` (default 10); receivers listen on what `IPCBUS_TRANSPORTS` says.

use std::collections::{BTreeMap, VecDeque};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use ipcbus::{Handle, Key, Receiver, Security, Sender};
use ipcbus_tests::{say, Args};
use serde::Serialize;

/// Security from `--password` and `--salt`, else the local-user default.
fn security(a: &Args) -> anyhow::Result<Security> {
    Ok(match (a.get("--password"), a.get("--salt")) {
        (Some(p), Some(s)) => Security::Encrypt(Key::derive(p, s.as_bytes())?),
        _ => Security::LocalUser,
    })
}

#[derive(Serialize, Default)]
struct PerSender {
    first: u64,
    last: u64,
    count: u64,
    dups: u64,
    out_of_order: u64,
}

#[derive(Serialize, Default)]
struct PerReceiver {
    /// Where the receiver was reached (`tcp://...`, `unix://...`).
    endpoint: String,
    acked: u64,
    failed: u64,
    reasons: BTreeMap<String, u64>,
}

async fn recv(a: &Args) -> anyhow::Result<()> {
    let handle = Handle::new(a.get("--handle").context("--handle")?)?;
    let expect = a.num("--expect", u64::MAX)?;
    let until_seq = a.num("--until-seq", u64::MAX)?;
    let stall_after = a.num("--stall-after", u64::MAX)?;
    let timeout = Duration::from_secs(a.num("--timeout", 60)?);
    let mut b = Receiver::builder(handle).security(security(a)?);
    if let Some(urls) = a.get("--etcd") {
        let lease = Duration::from_secs(a.num("--lease-secs", 10)?);
        b = b.etcd(ipcbus::Etcd::parse(urls)?.lease(lease).build());
    }
    let mut rx = b.bind().await?;
    // The TCP ip:port when it listens on TCP (what older callers parse), else its
    // first endpoint (IPCBUS_TRANSPORTS=unix).
    let addr = match rx.local_addr() {
        Some(a) => a.to_string(),
        None => rx
            .endpoints()
            .first()
            .context("the receiver has no endpoint")?
            .to_string(),
    };
    say(&format!("ready {addr} {}", rx.id()));
    let mut per: BTreeMap<String, PerSender> = BTreeMap::new();
    let mut total = 0u64;
    let deadline = tokio::time::Instant::now() + timeout;
    while total < expect {
        if total == stall_after {
            // Stop reading: the application is stuck.
            tokio::time::sleep_until(deadline).await;
            break;
        }
        let Ok(Some(m)) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            break;
        };
        total += 1;
        let s = per.entry(m.sender().to_string()).or_default();
        if s.count == 0 {
            s.first = m.seq();
        } else if m.seq() <= s.last {
            s.dups += 1;
        } else if m.seq() != s.last + 1 {
            s.out_of_order += 1;
        }
        s.last = s.last.max(m.seq());
        s.count += 1;
        if m.seq() >= until_seq {
            break;
        }
    }
    say(&format!("summary {}", serde_json::to_string(&per)?));
    rx.close().await;
    Ok(())
}

async fn send(a: &Args) -> anyhow::Result<()> {
    let handle = Handle::new(a.get("--handle").context("--handle")?)?;
    let count = a.num("--count", 1)?;
    let wait_for = a.num("--wait-for", 0)? as usize;
    let size = a.num("--size", 16)? as usize;
    let interval = Duration::from_micros(a.num("--interval-us", 0)?);
    let mut tx = Sender::builder(handle)
        .security(security(a)?)
        .build()
        .await?;
    let got = tx
        .wait_for_receivers(wait_for, Duration::from_secs(20))
        .await;
    if got < wait_for {
        bail!("only {got} of {wait_for} receivers connected");
    }
    say(&format!("ready {}", tx.id()));
    let mut per: BTreeMap<String, PerReceiver> = BTreeMap::new();
    let mut pending = VecDeque::new();
    let mut tally = |r: ipcbus::SendReport| {
        for a in r.acked {
            let e = per.entry(a.id.to_string()).or_default();
            e.endpoint = a.endpoint.to_string();
            e.acked += 1;
        }
        for (f, why) in r.failed {
            let e = per.entry(f.id.to_string()).or_default();
            e.endpoint = f.endpoint.to_string();
            e.failed += 1;
            *e.reasons.entry(why.to_string()).or_default() += 1;
        }
    };
    for i in 1..=count {
        let mut payload = vec![0u8; size.max(8)];
        payload[..8].copy_from_slice(&i.to_be_bytes());
        pending.push_back(tx.publish_bytes(payload).await?);
        while pending.len() > 10_000 {
            if let Some(p) = pending.pop_front() {
                tally(p.await);
            }
        }
        if !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
    }
    for p in pending {
        tally(p.await);
    }
    say(&format!("summary {}", serde_json::to_string(&per)?));
    tx.close().await;
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::from_env();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let r = rt.block_on(async {
        match args.mode() {
            Some("recv") => recv(&args).await,
            Some("send") => send(&args).await,
            _ => bail!("usage: ipcbus-testpeer recv|send ..."),
        }
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
