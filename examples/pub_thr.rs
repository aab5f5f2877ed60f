//! Throughput, sending side: publishes N events as fast as the receivers take them
//! (many in flight) and prints the rate at which they were acknowledged.
//!
//! Start `sub_thr` first (see there).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use clap::Parser;
use ipcbus::Handle;
use ipcbus_examples::Opts;

/// Publish N events and print the acknowledged rate.
#[derive(Parser, Debug)]
struct Args {
    /// Handle to send to
    #[arg(long, default_value = "thr")]
    handle: Handle,
    /// Events to send
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Payload bytes per event
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Receivers to wait for before starting
    #[arg(long, default_value_t = 1)]
    receivers: usize,
    /// Events in flight before waiting for the oldest report
    #[arg(long, default_value_t = 8192)]
    window: usize,
    /// Seconds to wait for the receivers before giving up
    #[arg(long, default_value_t = 10)]
    wait_secs: u64,
    #[command(flatten)]
    opts: Opts,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ipcbus_examples::init_tracing();
    let args = Args::parse();
    let mut tx = args.opts.sender(args.handle.clone())?.build().await?;
    // Receivers already running are usually connected within moments; only a longer
    // wait is worth a word, so the user knows what it waits for.
    let wait = Duration::from_secs(args.wait_secs);
    let grace = wait.min(Duration::from_millis(300));
    let mut n = tx.wait_for_receivers(args.receivers, grace).await;
    if n < args.receivers {
        eprintln!(
            "pub_thr: waiting up to {} s for {} receiver{} of \"{}\" (start sub_thr --handle {} first)",
            args.wait_secs,
            args.receivers,
            if args.receivers == 1 { "" } else { "s" },
            args.handle,
            args.handle
        );
        n = tx
            .wait_for_receivers(args.receivers, wait.saturating_sub(grace))
            .await;
    }
    anyhow::ensure!(
        n >= args.receivers,
        "only {n} of {} receivers of \"{}\" found within {} s; start sub_thr --handle {} first",
        args.receivers,
        args.handle,
        args.wait_secs,
        args.handle
    );
    let payload = bytes::Bytes::from(vec![0xabu8; args.size]);
    let mut window = VecDeque::new();
    let (mut acked, mut failed) = (0u64, 0u64);
    let t0 = Instant::now();
    for _ in 0..args.count {
        window.push_back(tx.publish_bytes(payload.clone()).await?);
        while window.len() >= args.window.max(1) {
            if let Some(p) = window.pop_front() {
                let r = p.await;
                acked += u64::from(r.all_acked());
                failed += u64::from(!r.all_acked());
            }
        }
    }
    for p in window {
        let r = p.await;
        acked += u64::from(r.all_acked());
        failed += u64::from(!r.all_acked());
    }
    let secs = t0.elapsed().as_secs_f64();
    tx.close().await;
    println!(
        "pub_thr: {} of {} B to {} in {secs:.3} s: {:.0} msgs/s acknowledged by all ({failed} failed)",
        ipcbus_examples::plural(args.count, "event"),
        args.size,
        ipcbus_examples::plural(n as u64, "receiver"),
        acked as f64 / secs.max(1e-9)
    );
    anyhow::ensure!(
        failed == 0,
        "{} not acknowledged",
        ipcbus_examples::plural(failed, "event")
    );
    Ok(())
}
