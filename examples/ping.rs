//! Latency, asking side: sends an event on `NAME.ping`, waits for it to come back on
//! `NAME.pong`, and prints round-trip percentiles. Start `pong` first.

use std::time::{Duration, Instant};

use clap::Parser;
use ipcbus::Handle;
use ipcbus_examples::Opts;

/// Measure round trips through `pong`.
#[derive(Parser, Debug)]
struct Args {
    /// Base name of the two handles
    #[arg(long, default_value = "latency")]
    name: String,
    /// Round trips
    #[arg(long, default_value_t = 1000)]
    count: u64,
    /// Payload bytes
    #[arg(long, default_value_t = 64)]
    size: usize,
    #[command(flatten)]
    opts: Opts,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ipcbus_examples::init_tracing();
    let args = Args::parse();
    let ping: Handle = format!("{}.ping", args.name).parse()?;
    let pong: Handle = format!("{}.pong", args.name).parse()?;
    let mut rx = args.opts.receiver(pong.clone())?.bind().await?;
    let mut tx = args.opts.sender(ping.clone())?.build().await?;
    anyhow::ensure!(
        tx.wait_for_receivers(1, Duration::from_secs(10)).await >= 1,
        "no pong is listening on \"{ping}\" (start the pong example first)"
    );
    let mut rtts = Vec::with_capacity(args.count as usize);
    let mut payload = vec![0u8; args.size.max(8)];
    for i in 0..args.count {
        payload[..8].copy_from_slice(&i.to_be_bytes());
        let t = Instant::now();
        drop(tx.publish_bytes(payload.clone()).await?);
        let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .map_err(|_| anyhow::anyhow!("no answer to ping {i} within 5 s"))?
            .ok_or_else(|| anyhow::anyhow!("receiver closed"))?;
        rtts.push(t.elapsed());
        anyhow::ensure!(
            m.payload()[..] == payload[..],
            "pong answered another payload"
        );
    }
    tx.close().await;
    rx.close().await;
    rtts.sort();
    let pct = |p: f64| {
        let i = ((rtts.len() as f64 - 1.0) * p).round() as usize;
        rtts.get(i).copied().unwrap_or_default()
    };
    println!(
        "ping: {} round trips of {} B: min {:?}, p50 {:?}, p99 {:?}, max {:?}",
        rtts.len(),
        args.size,
        pct(0.0),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    Ok(())
}
