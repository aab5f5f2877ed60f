//! Throughput, receiving side: takes N events and prints how many per second arrived.
//!
//! ```text
//! cargo run --release -p ipcbus-examples --example sub_thr -- --count 1000000
//! cargo run --release -p ipcbus-examples --example pub_thr -- --count 1000000
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use ipcbus::Handle;
use ipcbus_examples::Opts;

/// Receive N events and print the rate.
#[derive(Parser, Debug)]
struct Args {
    /// Handle to receive
    #[arg(long, default_value = "thr")]
    handle: Handle,
    /// Events to take
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Give up after this many seconds without an event
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
    #[command(flatten)]
    opts: Opts,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ipcbus_examples::init_tracing();
    let args = Args::parse();
    let mut rx = args
        .opts
        .receiver(args.handle.clone())?
        .queue_capacity(8192)
        .bind()
        .await?;
    println!(
        "sub_thr: waiting for {} on \"{}\" at {}",
        ipcbus_examples::plural(args.count, "event"),
        args.handle,
        rx.endpoints_text()
    );
    let idle = Duration::from_secs(args.idle_secs.max(1));
    let mut got = 0u64;
    let mut bytes = 0u64;
    let mut first = None;
    while got < args.count {
        match tokio::time::timeout(idle, rx.recv()).await {
            Ok(Some(m)) => {
                first.get_or_insert_with(Instant::now);
                got += 1;
                bytes += m.payload().len() as u64;
            }
            _ => break,
        }
    }
    let secs = first.map_or(0.0, |t: Instant| t.elapsed().as_secs_f64());
    rx.close().await;
    if secs > 0.0 {
        println!(
            "sub_thr: {} in {secs:.3} s: {:.0} msgs/s, {:.1} MB/s",
            ipcbus_examples::plural(got, "event"),
            got as f64 / secs,
            bytes as f64 / secs / 1e6
        );
    } else {
        println!("sub_thr: {}", ipcbus_examples::plural(got, "event"));
    }
    Ok(())
}
