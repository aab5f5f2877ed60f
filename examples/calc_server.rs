//! A typed service: serves the [`Calc`](ipcbus_examples::calc::Calc) contract on
//! handle `calc` (see `calc_client`), and calls back into each caller of `sum` with
//! its progress.
//!
//! ```text
//! cargo run -p ipcbus-examples --example calc_server      # terminal 1
//! cargo run -p ipcbus-examples --example calc_client      # terminal 2
//! ```

use clap::Parser;
use ipcbus::{Handle, Peer, Server};
use ipcbus_examples::calc::{calc_callback, Calc, CalcError, CalcServer};
use ipcbus_examples::Opts;

/// Serve the calculator on HANDLE until Ctrl-C.
#[derive(Parser, Debug)]
struct Args {
    /// Handle to serve
    #[arg(long, default_value = "calc")]
    handle: Handle,
    #[command(flatten)]
    opts: Opts,
}

/// The implementation: stateless, one for all connections.
struct Calculator;

impl Calc for Calculator {
    async fn add(&self, a: i64, b: i64) -> Result<i64, CalcError> {
        a.checked_add(b).ok_or(CalcError::Overflow)
    }

    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError> {
        if b == 0 {
            return Err(CalcError::DivideByZero { dividend: a });
        }
        a.checked_div(b).ok_or(CalcError::Overflow)
    }

    async fn sum(&self, numbers: Vec<i64>) -> Result<i64, CalcError> {
        // The client that made this call, to report progress to.
        let events = Peer::current().map(|p| calc_callback(&p));
        let of = numbers.len() as u64;
        let mut total = 0i64;
        for (i, n) in numbers.into_iter().enumerate() {
            total = total.checked_add(n).ok_or(CalcError::Overflow)?;
            let done = i as u64 + 1;
            if let Some(events) = events.as_ref().filter(|_| done % 4 == 0 || done == of) {
                // A client that has gone does not stop the sum.
                let _ = events.progress(done, of, total).await;
            }
        }
        Ok(total)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ipcbus_examples::init_tracing();
    let args = Args::parse();
    let server = Server::builder(args.handle.clone())
        .discovery(args.opts.discovery()?)
        .security(args.opts.security()?)
        .service(CalcServer::new(Calculator))
        .bind()
        .await?;
    let endpoints: Vec<String> = server.endpoints().iter().map(ToString::to_string).collect();
    println!(
        "calc_server: serving \"{}\" at {} ({}); Ctrl-C to stop",
        args.handle,
        endpoints.join(" "),
        args.opts.describe()
    );
    tokio::signal::ctrl_c().await?;
    server.close().await;
    Ok(())
}
