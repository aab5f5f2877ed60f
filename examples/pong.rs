//! Latency, answering side: receives on `NAME.ping` and sends each event straight back
//! on `NAME.pong`.
//!
//! ```text
//! cargo run --release -p ipcbus-examples --example pong
//! cargo run --release -p ipcbus-examples --example ping -- --count 10000
//! ```

use clap::Parser;
use ipcbus::Handle;
use ipcbus_examples::Opts;

/// Echo every event of NAME.ping back on NAME.pong.
#[derive(Parser, Debug)]
struct Args {
    /// Base name of the two handles
    #[arg(long, default_value = "latency")]
    name: String,
    /// Exit after answering N events [default: run until Ctrl-C]
    #[arg(long)]
    count: Option<u64>,
    #[command(flatten)]
    opts: Opts,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ipcbus_examples::init_tracing();
    let args = Args::parse();
    let ping: Handle = format!("{}.ping", args.name).parse()?;
    let pong: Handle = format!("{}.pong", args.name).parse()?;
    let mut rx = args.opts.receiver(ping.clone())?.bind().await?;
    let mut tx = args.opts.sender(pong.clone())?.build().await?;
    println!(
        "pong: answering \"{ping}\" on \"{pong}\" ({})",
        rx.endpoints_text()
    );
    let mut n = 0u64;
    while args.count.map_or(true, |c| n < c) {
        let m = tokio::select! {
            m = rx.recv() => m,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(m) = m else { break };
        if tx.receivers().is_empty() {
            // The pinger's receiver registered just before its first ping; give
            // discovery a moment to see it.
            tx.wait_for_receivers(1, std::time::Duration::from_secs(5))
                .await;
        }
        // Do not wait for the report: the next ping may already be waiting.
        drop(tx.publish_bytes(m.into_payload()).await?);
        n += 1;
    }
    tx.close().await;
    rx.close().await;
    println!("pong: answered {}", ipcbus_examples::plural(n, "event"));
    Ok(())
}
