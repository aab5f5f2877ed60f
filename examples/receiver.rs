//! The classic receiver: prints every event sent to the handle.
//!
//! ```text
//! cargo run -p ipcbus-examples --example receiver
//! cargo run -p ipcbus-examples --example receiver -- --password-file pw --salt '{0x01,0x02,0x03}'
//! ```

use clap::Parser;
use ipcbus::Handle;
use ipcbus_examples::Opts;

/// Print every event sent to a handle.
#[derive(Parser, Debug)]
struct Args {
    /// Handle to receive
    #[arg(long, default_value = "foo")]
    handle: Handle,
    /// Exit after N events [default: run until Ctrl-C]
    #[arg(long)]
    count: Option<u64>,
    #[command(flatten)]
    opts: Opts,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ipcbus_examples::init_tracing();
    let args = Args::parse();
    let mut rx = args.opts.receiver(args.handle.clone())?.bind().await?;
    println!(
        "receiving \"{}\" on {} via {}",
        args.handle,
        rx.endpoints_text(),
        args.opts.describe()
    );
    let mut got = 0u64;
    while args.count.map_or(true, |n| got < n) {
        let m = tokio::select! {
            m = rx.recv() => m,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(m) = m else { break };
        got += 1;
        println!(
            "got #{} from sender {}: {}",
            m.seq(),
            m.sender(),
            String::from_utf8_lossy(m.payload())
        );
    }
    rx.close().await;
    Ok(())
}
