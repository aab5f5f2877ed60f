//! `etcd-figures`: the figures of discovery in etcd, against a real etcd (Debian's
//! `etcd-server`) that it starts itself on free loopback ports.
//!
//! ```text
//! cargo run --release -p ipcbus-tests --bin etcd-figures [-- --joins N --records N --lookups N --failovers N]
//! ```
//!
//! 1. Join latency: a sender watches a handle; a receiver binds (registers under a
//!    lease); the time from the start of `Receiver::bind` until the sender is
//!    connected to it, p50/p99 over `--joins` receivers (default 200), one member.
//! 2. Registrations: `--records` records (default 10,000) over 100 handles, each
//!    under its own lease (what that many receivers do), 64 at a time: the total time
//!    and per registration p50/p99; then `--lookups` lookups of one handle (100
//!    records each, default 1,000) p50/p99, and one list of everything.
//! 3. Failover, three members: the leader is SIGKILLed; the time until a receiver's
//!    registration succeeds again, and until a watching sender is connected to that
//!    receiver, over `--failovers` rounds (default 3; the member is restarted between
//!    rounds).
//!
//! Every wait is bounded; the etcd processes are killed by pid on exit.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipcbus::registry::record_now;
use ipcbus::{Etcd, Handle, Receiver, ReceiverId, Sender};
use ipcbus_tests::etcd::Cluster;
use ipcbus_tests::Args;

const T: Duration = Duration::from_secs(20);

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "{name}: n={} p50 {} p99 {} max {}",
        v.len(),
        ms(pct(&v, 0.5)),
        ms(pct(&v, 0.99)),
        ms(v.last().copied().unwrap_or_default())
    );
}

async fn joins(n: u64) -> anyhow::Result<()> {
    let c = Cluster::start(1).context("no etcd binary: install Debian's etcd-server")?;
    let etcd = Etcd::parse(&c.endpoints())?.build();
    let h: Handle = "figures.join".parse()?;
    let mut tx = Sender::builder(h.clone())
        .etcd(etcd.clone())
        .build()
        .await?;
    let mut lat = Vec::new();
    let mut bind = Vec::new();
    for _ in 0..n {
        let t0 = Instant::now();
        let rx = Receiver::builder(h.clone())
            .etcd(etcd.clone())
            .bind()
            .await?;
        bind.push(t0.elapsed());
        if tx.wait_for_receivers(1, T).await != 1 {
            bail!("the sender did not connect within {T:?}");
        }
        lat.push(t0.elapsed());
        rx.close().await;
        let deadline = Instant::now() + T;
        while !tx.receivers().is_empty() {
            if Instant::now() > deadline {
                bail!("the sender did not see the receiver leave within {T:?}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    summary("Receiver::bind (register in etcd)", bind);
    summary("Receiver::bind -> watching sender connected", lat);
    tx.close().await;
    Ok(())
}

async fn registrations(records: u64, lookups: u64) -> anyhow::Result<()> {
    let c = Cluster::start(1).context("no etcd binary")?;
    let etcd = Etcd::parse(&c.endpoints())?
        .lease(Duration::from_secs(30))
        .build();
    let handles: Vec<Handle> = (0..100)
        .map(|i| format!("figures.h{i:03}").parse())
        .collect::<Result<_, _>>()?;
    let t0 = Instant::now();
    let mut per = Vec::with_capacity(records as usize);
    let mut regs = Vec::with_capacity(records as usize);
    let mut next = 0u64;
    while next < records {
        let batch: Vec<_> = (next..(next + 64).min(records))
            .map(|i| {
                let etcd = etcd.clone();
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&i.to_be_bytes());
                let port = 1024 + (i % 60_000) as u16;
                let rec = record_now(
                    handles[(i % 100) as usize].clone(),
                    vec![std::net::SocketAddr::from(([127, 0, 0, 1], port)).into()],
                    ReceiverId(id),
                );
                tokio::spawn(async move {
                    let t = Instant::now();
                    let r = etcd.register(&rec).await;
                    (t.elapsed(), r)
                })
            })
            .collect();
        for b in batch {
            let (d, r) = b.await?;
            regs.push(r?);
            per.push(d);
        }
        next = (next + 64).min(records);
    }
    let total = t0.elapsed();
    println!(
        "{records} registrations (own lease each, 64 at a time): {:.2} s, {:.0}/s",
        total.as_secs_f64(),
        records as f64 / total.as_secs_f64()
    );
    summary("  one registration", per);
    let mut lat = Vec::new();
    for i in 0..lookups {
        let h = &handles[(i % 100) as usize];
        let t = Instant::now();
        let got = etcd.lookup(h).await?;
        lat.push(t.elapsed());
        if got.len() as u64 != records / 100 {
            bail!("lookup of {h} found {} records", got.len());
        }
    }
    summary(
        &format!("lookup of one handle ({} records)", records / 100),
        lat,
    );
    let t = Instant::now();
    let all = etcd.list().await?;
    println!("list of all {} records: {}", all.len(), ms(t.elapsed()));
    let t = Instant::now();
    for r in regs {
        r.close().await;
    }
    println!(
        "{records} removals (lease revoked): {:.2} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn failovers(rounds: u64) -> anyhow::Result<()> {
    let mut c = Cluster::start(3).context("no etcd binary")?;
    let etcd = Etcd::parse(&c.endpoints())?.build();
    let h: Handle = "figures.failover".parse()?;
    let mut tx = Sender::builder(h.clone())
        .etcd(etcd.clone())
        .build()
        .await?;
    let mut reg = Vec::new();
    let mut seen = Vec::new();
    for round in 0..rounds {
        let leader = c.leader().context("no leader")?;
        let t0 = Instant::now();
        c.kill(leader);
        let rx = Receiver::builder(h.clone())
            .etcd(etcd.clone())
            .bind()
            .await
            .context("registration after killing the leader")?;
        reg.push(t0.elapsed());
        if tx.wait_for_receivers(1, T).await != 1 {
            bail!("round {round}: the sender did not connect within {T:?}");
        }
        seen.push(t0.elapsed());
        println!(
            "  round {round}: leader m{leader} killed; registered after {}, sender connected after {}",
            ms(reg[reg.len() - 1]),
            ms(seen[seen.len() - 1])
        );
        rx.close().await;
        let deadline = Instant::now() + T;
        while !tx.receivers().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        c.restart(leader);
        // Let the restarted member catch up before the next round.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    summary("failover: leader killed -> registration succeeds", reg);
    summary("failover: leader killed -> watching sender connected", seen);
    tx.close().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::from_env();
    println!("join latency (1 member):");
    joins(a.num("--joins", 200)?).await?;
    println!("registrations and lookups (1 member):");
    registrations(a.num("--records", 10_000)?, a.num("--lookups", 1_000)?).await?;
    println!("failover (3 members, leader SIGKILLed):");
    failovers(a.num("--failovers", 3)?).await?;
    Ok(())
}
