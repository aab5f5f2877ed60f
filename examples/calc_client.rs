//! The client of `calc_server`: typed calls (`add`, `div`), a typed error
//! (`CalcError::DivideByZero` arrives as that value), and a callback (`sum` reports
//! its progress by calling back into this client's `CalcEvents`).
//!
//! ```text
//! cargo run -p ipcbus-examples --example calc_server      # terminal 1
//! cargo run -p ipcbus-examples --example calc_client      # terminal 2
//! ```

use std::time::Duration;

use clap::Parser;
use ipcbus::{Handle, ServiceError};
use ipcbus_examples::calc::{CalcClient, CalcError, CalcEvents, CalcEventsServer};
use ipcbus_examples::Opts;

/// Call the calculator on HANDLE and print what it answers.
#[derive(Parser, Debug)]
struct Args {
    /// Handle of the calculator
    #[arg(long, default_value = "calc")]
    handle: Handle,
    /// How long to wait for a calculator to be registered
    #[arg(long, default_value_t = 10)]
    wait_secs: u64,
    #[command(flatten)]
    opts: Opts,
}

/// The callback service this client runs: the server calls it during `sum`.
struct Progress;

impl CalcEvents for Progress {
    async fn progress(&self, done: u64, of: u64, total: i64) {
        println!("  progress: {done}/{of}, running total {total}");
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ipcbus_examples::init_tracing();
    let args = Args::parse();
    let client = CalcClient::<ipcbus::Client>::builder(args.handle.clone())
        .discovery(args.opts.discovery()?)
        .security(args.opts.security()?)
        .callback(CalcEventsServer::new(Progress))
        .build()
        .await?;
    let wait = Duration::from_secs(args.wait_secs);
    anyhow::ensure!(
        client.wait_for_servers(1, wait).await >= 1,
        "no calculator is serving \"{}\" (start the calc_server example first)",
        args.handle
    );
    let calc = CalcClient::new(client.clone());

    println!("add(2, 3) = {}", calc.add(2, 3).await?);
    match calc.div(7, 0).await {
        Ok(q) => println!("div(7, 0) = {q}?"),
        // The server's error, as the type it returned.
        Err(ServiceError::App(e @ CalcError::DivideByZero { .. })) => {
            println!("div(7, 0) failed: {e} (a CalcError::DivideByZero)")
        }
        Err(e) => return Err(e.into()),
    }
    match calc.add(i64::MAX, 1).await {
        Err(ServiceError::App(CalcError::Overflow)) => {
            println!("add(i64::MAX, 1) failed: overflow")
        }
        other => println!("add(i64::MAX, 1) = {other:?}?"),
    }
    println!("sum(1..=10), with progress called back from the server:");
    let total = calc.sum((1..=10).collect()).await?;
    println!("sum(1..=10) = {total}");
    client.close().await;
    Ok(())
}
