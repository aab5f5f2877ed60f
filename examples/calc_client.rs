//! The typed client of `calc_server`: adds and divides two numbers, shows a typed
//! error arriving as that type, and sums a list while the server reports its progress
//! through the `CalcEvents` callback this client serves.
//!
//! ```text
//! cargo run -p ipcbus-examples --example calc_server            # terminal 1
//! cargo run -p ipcbus-examples --example calc_client -- 40 2    # terminal 2
//! ```

use std::time::Duration;

use clap::Parser;
use ipcbus::{Handle, ServiceError};
use ipcbus_examples::calc::{CalcClient, CalcError, CalcEvents, CalcEventsServer};
use ipcbus_examples::Opts;

/// Call calc_server: A + B, A / B, A / 0 (a typed error), and the sum of 1..=B with
/// progress called back.
#[derive(Parser, Debug)]
struct Args {
    /// First operand
    #[arg(default_value_t = 40, allow_negative_numbers = true)]
    a: i64,
    /// Second operand
    #[arg(default_value_t = 2, allow_negative_numbers = true)]
    b: i64,
    /// Handle of the server
    #[arg(long, default_value = "calc")]
    handle: String,
    /// How long to wait for a server to be registered, in seconds
    #[arg(long, default_value_t = 5)]
    wait_secs: u64,
    #[command(flatten)]
    opts: Opts,
}

/// The callback the server calls while it sums: prints the progress.
struct Progress;

impl CalcEvents for Progress {
    async fn progress(&self, done: u32, total: u32) {
        println!("calc_client:   progress {done}/{total} (called back by the server)");
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ipcbus_examples::init_tracing();
    let args = Args::parse();
    let handle: Handle = args.handle.parse()?;
    let client = args
        .opts
        .client(handle.clone())?
        .callback(CalcEventsServer::new(Progress))
        .timeout(Duration::from_secs(10))
        .build()
        .await?;
    if client
        .wait_for_servers(1, Duration::from_secs(args.wait_secs))
        .await
        == 0
    {
        anyhow::bail!(
            "no server of \"{handle}\" registered within {} s: start one with \
             `cargo run -p ipcbus-examples --example calc_server`",
            args.wait_secs
        );
    }
    let calc = CalcClient::new(client.clone());
    let (a, b) = (args.a, args.b);

    println!("calc_client: {a} + {b} = {}", calc.add(a, b).await?);
    match calc.div(a, b).await {
        Ok(q) => println!("calc_client: {a} / {b} = {q}"),
        Err(ServiceError::App(e)) => println!("calc_client: {a} / {b}: {e} (a CalcError)"),
        Err(e) => return Err(e.into()),
    }
    match calc.div(a, 0).await {
        Err(ServiceError::App(CalcError::DivideByZero)) => {
            println!("calc_client: {a} / 0: division by zero (CalcError::DivideByZero, typed)")
        }
        other => anyhow::bail!("{a} / 0 should be CalcError::DivideByZero, got {other:?}"),
    }
    let n = b.clamp(1, 10);
    let values: Vec<i64> = (1..=n).collect();
    println!("calc_client: summing 1..={n} on the server");
    println!("calc_client: sum = {}", calc.sum(values).await?);
    println!(
        "calc_client: the server has answered {} calls",
        calc.served().await?
    );
    client.close().await;
    Ok(())
}
