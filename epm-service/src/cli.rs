//! What `epm-service`'s `main` does: parse the command line, log to stderr, bind,
//! and run until SIGTERM or SIGINT.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use crate::config::{process_env, Args, Config};

/// Runs the service as the `epm-service` binary does; returns its exit code.
pub fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match start(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn start(args: Args) -> anyhow::Result<()> {
    let config = Config::load(&args, &process_env).context("invalid configuration")?;
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let listeners = crate::server::bind_all(&config.binds).context("cannot listen")?;
        crate::server::run(listeners, config, shutdown_signal()).await;
        Ok(())
    })
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the service");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        r = tokio::signal::ctrl_c() => {
            if r.is_ok() {
                tracing::info!("SIGINT received");
            }
        }
    }
}
