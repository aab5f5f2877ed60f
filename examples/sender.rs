//! The classic sender: sends "Foo1", "Foo2", … once a second to every receiver of the
//! handle and prints each report.
//!
//! ```text
//! cargo run -p ipcbus-examples --example receiver        # in one terminal (or two)
//! cargo run -p ipcbus-examples --example sender          # in another
//! ```

use std::time::Duration;

use clap::Parser;
use ipcbus::Handle;
use ipcbus_examples::Opts;

/// Send "Foo1", "Foo2", … once a second and print each report.
#[derive(Parser, Debug)]
struct Args {
    /// Handle to send to
    #[arg(long, default_value = "foo")]
    handle: Handle,
    /// Stop after N events [default: run until Ctrl-C]
    #[arg(long)]
    count: Option<u64>,
    /// Milliseconds between events
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    #[command(flatten)]
    opts: Opts,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ipcbus_examples::init_tracing();
    let args = Args::parse();
    let mut tx = args.opts.sender(args.handle.clone())?.build().await?;
    println!(
        "sending to \"{}\" via {}",
        args.handle,
        args.opts.describe()
    );
    let mut tick = tokio::time::interval(Duration::from_millis(args.interval_ms.max(1)));
    let mut i = 0u64;
    while args.count.map_or(true, |n| i < n) {
        tick.tick().await;
        i += 1;
        let text = format!("Foo{i}");
        let report = tx.send_bytes(text.clone()).await?;
        let acked: Vec<String> = report
            .acked
            .iter()
            .map(|r| r.endpoint.to_string())
            .collect();
        print!("{text}: acked by {} [{}]", acked.len(), acked.join(", "));
        for (who, why) in &report.failed {
            print!("; {} failed: {why}", who.endpoint);
        }
        if report.targeted() == 0 {
            print!(" (no receivers yet)");
        }
        println!();
    }
    tx.close().await;
    Ok(())
}
