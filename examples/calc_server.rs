//! A typed service: serves the `Calc` contract of `ipcbus_examples::calc` (add, div,
//! sum, served) on handle `calc`, and calls back into each client with its progress
//! while it sums.
//!
//! ```text
//! cargo run -p ipcbus-examples --example calc_server            # terminal 1
//! cargo run -p ipcbus-examples --example calc_client -- 40 2    # terminal 2
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use ipcbus::{Handle, Peer};
use ipcbus_examples::calc::{calc_callback, Calc, CalcError, CalcServer};
use ipcbus_examples::Opts;

/// Serve the Calc contract (version 2, also answering clients of "calc.v1").
#[derive(Parser, Debug)]
struct Args {
    /// Handle to serve
    #[arg(long, default_value = "calc")]
    handle: String,
    #[command(flatten)]
    opts: Opts,
}

/// The implementation: stateless arithmetic and a count of the calls answered.
#[derive(Default)]
struct Calculator {
    served: AtomicU64,
}

impl Calculator {
    fn count(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }
}

impl Calc for Calculator {
    async fn add(&self, a: i64, b: i64) -> Result<i64, CalcError> {
        self.count();
        a.checked_add(b).ok_or(CalcError::Overflow)
    }

    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError> {
        self.count();
        if b == 0 {
            return Err(CalcError::DivideByZero);
        }
        a.checked_div(b).ok_or(CalcError::Overflow)
    }

    async fn sum(&self, values: Vec<i64>) -> Result<i64, CalcError> {
        self.count();
        // The caller of this call, reached back through its connection. A caller
        // without a CalcEvents service (an untyped client) does not answer: after a
        // short wait, stop telling it.
        let mut events = Peer::current()
            .as_ref()
            .map(|p| calc_callback(p).with_timeout(Duration::from_millis(500)));
        let total = u32::try_from(values.len()).unwrap_or(u32::MAX);
        let mut acc = 0i64;
        for (i, v) in values.iter().enumerate() {
            acc = acc.checked_add(*v).ok_or(CalcError::Overflow)?;
            if let Some(e) = &events {
                let done = u32::try_from(i + 1).unwrap_or(u32::MAX);
                if let Err(err) = e.progress(done, total).await {
                    eprintln!("calc_server: progress not delivered ({err}); no more for this call");
                    events = None;
                }
            }
        }
        Ok(acc)
    }

    async fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ipcbus_examples::init_tracing();
    let args = Args::parse();
    let handle: Handle = args.handle.parse()?;
    let server = args
        .opts
        .server(handle.clone())?
        .service(CalcServer::new(Calculator::default()))
        .bind()
        .await?;
    let endpoints: Vec<String> = server.endpoints().iter().map(|e| e.to_string()).collect();
    println!(
        "calc_server: serving \"{handle}\" ({}) at {} via {}",
        ipcbus_examples::calc::CalcClient::<ipcbus::Client>::contract(),
        endpoints.join(" "),
        args.opts.describe()
    );
    tokio::signal::ctrl_c().await?;
    server.close().await;
    println!("calc_server: closed");
    Ok(())
}
