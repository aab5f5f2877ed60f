//! Benchmark of the endpoint manager. Prints figures; asserts nothing.
//!
//! ```text
//! cargo build --release -p ipcbus-epm --bin epm-service --example epm_bench
//! target/release/examples/epm_bench [--service PATH] [--seconds N] [--clients N]
//! ```
//!
//! It starts `epm-service` (found next to this example's directory, or `--service`)
//! on 127.0.0.1 port 0 and measures:
//! 1. service memory (RSS) before and after 10,000 registrations (100 connections x
//!    100 registrations over 1,000 handles);
//! 2. lookups per second and latency percentiles with 100 concurrent clients, each on
//!    its own connection, looking up random handles (10 receivers each);
//! 3. time from a registration to a watching client seeing it (EPM level), and from
//!    a `Receiver` binding to a watching `Sender` being connected to it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipcbus::epm::WatchEvent;
use ipcbus::registry::record_now;
use ipcbus::{Epm, Handle, ReceiverId};

const REGISTRATIONS: usize = 10_000;
const REG_CONNS: usize = 100;
const HANDLES: usize = 1_000;

struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn arg(name: &str) -> Option<String> {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1).cloned())
}

fn service_path() -> anyhow::Result<PathBuf> {
    if let Some(p) = arg("--service") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/epm_bench -> target/<profile>/epm-service
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("epm-service"))
        .context("cannot locate target dir")?;
    if !p.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p ipcbus-epm --bin epm-service` or pass --service PATH",
            p.display()
        );
    }
    Ok(p)
}

fn start() -> anyhow::Result<(Service, SocketAddr, u32)> {
    let mut child = Command::new(service_path()?)
        .args([
            "--bind",
            "127.0.0.1:0",
            "--lease-ms",
            "3600000",
            "--max-registrations-per-connection",
            "1000",
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn epm-service")?;
    let pid = child.id();
    let err = child.stderr.take().context("stderr")?;
    let svc = Service(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split("listening on ").nth(1) {
                let _ = tx.send(rest.trim().to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(10))
        .context("no 'listening on' line")?
        .parse()
        .context("bad address")?;
    Ok((svc, addr, pid))
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")
}

fn handle(i: usize) -> Handle {
    Handle::new(format!("bench.handle.{i:05}")).unwrap_or_else(|_| unreachable!())
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = arg("--seconds").map_or(Ok(5), |s| s.parse())?;
    let clients: usize = arg("--clients").map_or(Ok(100), |s| s.parse())?;
    let (_svc, addr, pid) = start()?;
    let epm = Epm::builder(addr.to_string()).build();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = rss_kib(pid)?;

    // 1. 10,000 registrations.
    let t = Instant::now();
    let mut holders = Vec::new();
    let mut joins = Vec::new();
    for c in 0..REG_CONNS {
        let epm = epm.clone();
        joins.push(tokio::spawn(async move {
            let mut client = epm.client().await?;
            for k in 0..REGISTRATIONS / REG_CONNS {
                let n = c * (REGISTRATIONS / REG_CONNS) + k;
                let port = 10_000 + (n % 50_000) as u16;
                let rec = record_now(
                    handle(n % HANDLES),
                    vec![SocketAddr::from(([127, 0, 0, 1], port)).into()],
                    ReceiverId::random(),
                );
                client.register(&rec, Duration::ZERO).await?;
            }
            Ok::<_, anyhow::Error>(client)
        }));
    }
    for j in joins {
        holders.push(j.await??);
    }
    let reg_time = t.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss1 = rss_kib(pid)?;
    let st = epm.status().await?;
    println!(
        "registrations:        {} over {} handles by {} connections in {:.2} s ({:.0}/s)",
        st.registrations,
        st.handles,
        REG_CONNS,
        reg_time.as_secs_f64(),
        REGISTRATIONS as f64 / reg_time.as_secs_f64()
    );
    println!(
        "service RSS:          {} KiB idle, {} KiB with {} registrations: {} KiB per 10,000 registrations",
        rss0,
        rss1,
        st.registrations,
        (rss1.saturating_sub(rss0)) * 10_000 / u64::from(st.registrations.max(1))
    );

    // 2. Lookups from concurrent clients.
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut joins = Vec::new();
    for c in 0..clients {
        let epm = epm.clone();
        joins.push(tokio::spawn(async move {
            let mut client = epm.client().await?;
            let mut lat = Vec::with_capacity(100_000);
            let mut i = c * 7919;
            while Instant::now() < deadline {
                i = (i * 31 + 17) % HANDLES;
                let t = Instant::now();
                let recs = client.lookup(&handle(i)).await?;
                lat.push(t.elapsed());
                if recs.len() != REGISTRATIONS / HANDLES {
                    bail!("lookup returned {} records", recs.len());
                }
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let start = Instant::now();
    let mut all = Vec::new();
    for j in joins {
        all.extend(j.await??);
    }
    let took = start.elapsed();
    all.sort();
    println!(
        "lookups:              {} clients, {:.0} lookups/s ({} in {:.1} s); latency p50 {}, p99 {}, max {}",
        clients,
        all.len() as f64 / took.as_secs_f64(),
        all.len(),
        took.as_secs_f64(),
        us(pct(&all, 0.50)),
        us(pct(&all, 0.99)),
        us(pct(&all, 1.0)),
    );

    // 3a. Registration -> watcher sees it (EPM level).
    let h = Handle::new("bench.watch")?;
    let mut watcher = epm.client().await?;
    watcher.watch(&h).await?;
    let mut reg = epm.client().await?;
    let mut lat = Vec::new();
    for i in 0..200u16 {
        let rec = record_now(
            h.clone(),
            vec![SocketAddr::from(([127, 0, 0, 1], 20_000 + i)).into()],
            ReceiverId::random(),
        );
        let t = Instant::now();
        reg.register(&rec, Duration::ZERO).await?;
        loop {
            match watcher.next_event().await? {
                WatchEvent::Added(r) if r.receiver == rec.receiver => break,
                _ => continue,
            }
        }
        lat.push(t.elapsed());
        reg.unregister(&h, rec.receiver).await?;
    }
    lat.sort();
    println!(
        "register -> watcher:  p50 {}, p99 {} (200 registrations)",
        us(pct(&lat, 0.5)),
        us(pct(&lat, 0.99))
    );

    // 3b. Receiver binds -> a watching Sender is connected to it.
    let h = Handle::new("bench.sender")?;
    let mut tx = ipcbus::Sender::builder(h.clone())
        .epm(epm.clone())
        .build()
        .await?;
    let mut lat = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let rx = ipcbus::Receiver::builder(h.clone())
            .epm(epm.clone())
            .bind()
            .await?;
        let n = tx.wait_for_receivers(1, Duration::from_secs(5)).await;
        lat.push(t.elapsed());
        if n != 1 {
            bail!("sender did not connect");
        }
        rx.close().await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !tx.receivers().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    lat.sort();
    println!(
        "receiver bind -> sender connected: p50 {}, p99 {} (50 receivers; includes the receiver's EPM connection, registration, the watch event, TCP connect and handshake)",
        us(pct(&lat, 0.5)),
        us(pct(&lat, 0.99))
    );
    tx.close().await;
    drop(holders);
    Ok(())
}
