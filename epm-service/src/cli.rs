//! What `epm-service`'s `main` does: parse the command line, log to stderr, bind,
//! and run until SIGTERM or SIGINT.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};

use crate::config::{process_env, Args, Config};

/// Exit status of a configuration error (bad arguments, config file, password file,
/// salt), as clap's own for a bad command line.
pub const EXIT_CONFIG: u8 = 2;
/// Exit status of a failure at run time (cannot listen, cannot start).
pub const EXIT_RUNTIME: u8 = 1;

/// Shown after the options in `--help`.
const AFTER_HELP: &str = "\
Environment:
  IPCBUS_EPM_PASSWORD, IPCBUS_PASSWORD
                  the password (not visible in `ps`, unlike PASSWORD)
  IPCBUS_EPM_PASSWORD_FILE, IPCBUS_PASSWORD_FILE
                  a file holding the password (its first line)
  IPCBUS_EPM_SALT, IPCBUS_SALT
                  the salt, like {0x01,0x02,0x03} or 010203
  IPCBUS_EPM_STORE
                  as --store: memory, or etcd://HOST[:PORT][,HOST[:PORT]...]
  IPCBUS_ETCD_CA  with an https:// store, the PEM file of the CA etcd's
                  certificates are signed by
  RUST_LOG        log filter, like info (the default), debug or ipcbus_epm=debug
  NO_COLOR        when set and not empty, the log has no colours (it has them only
                  when stderr is a terminal)
The command line wins over the environment, which wins over --config.

Several EPMs, one view (--store etcd://HOST:2379[,HOST2:2379]):
  Every registration made here is also put in etcd (the same key and record as a
  receiver registering in etcd directly, under a lease this EPM keeps alive), and
  every EPM on that etcd watches it: a receiver registered at one is found at all.
  etcd down at start: exit 1. etcd lost later: the current view is kept, and the
  writes and the watch resume by themselves.

Monitoring (--http ADDR, off by default):
  GET /status     JSON: counts, limits, counters, handles and their receivers
  GET /metrics    Prometheus text format, metrics named ipcbus_epm_*
  GET /           a status page that reloads itself every 2 s
  With a password set, give it as HTTP Basic (any user name), or the token of
  --http-token-file as `Authorization: Bearer TOKEN`.

Exit status:
  0  stopped by SIGTERM or SIGINT
  1  failure while running, such as no address to listen on (port in use) or an
     etcd store that does not answer at start
  2  configuration error: command line, config file, password file or salt";

/// Runs the service as the `epm-service` binary does; returns its exit code.
pub fn main() -> ExitCode {
    let matches = Args::command().after_help(AFTER_HELP).get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match start(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            tracing::error!("{}", describe(&e));
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Runtime(e)) => {
            tracing::error!("{}", describe(&e));
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// Whether the log is coloured: only on a terminal, and not when `NO_COLOR` is set to
/// something non-empty (<https://no-color.org>).
fn colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.map_or(true, |v| v.is_empty())
}

/// Why the service did not run.
enum Failure {
    /// Exit status 2.
    Config(anyhow::Error),
    /// Exit status 1.
    Runtime(anyhow::Error),
}

/// An error and its causes on one line, each cause once.
fn describe(e: &anyhow::Error) -> String {
    ipcbus::error_chain(e.as_ref())
}

fn start(args: Args) -> Result<(), Failure> {
    let config = Config::load(&args, &process_env)
        .context("invalid configuration")
        .map_err(Failure::Config)?;
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(Failure::Runtime)?;
    rt.block_on(async {
        // Catch the signals before anyone can see `listening on`.
        let shutdown = shutdown_signal().context("cannot watch SIGTERM and SIGINT")?;
        // An etcd store is connected and read before anything listens: an EPM that
        // cannot reach it would serve a view that is silently partial.
        let store = match &config.store {
            crate::config::Store::Memory => None,
            crate::config::Store::Etcd(etcd) => Some(
                crate::store::EtcdStore::connect(etcd.clone())
                    .await
                    .context("cannot use the etcd store")?,
            ),
        };
        // The error names each address and why it failed.
        let listeners = crate::server::bind_all(&config.binds)?;
        let http = match &config.http {
            None => None,
            Some(h) => {
                let l = tokio::net::TcpListener::bind(h.addr)
                    .await
                    .with_context(|| format!("cannot listen for http on {}", h.addr))?;
                tracing::info!("http on {}", l.local_addr().unwrap_or(h.addr));
                Some(l)
            }
        };
        crate::server::serve_with_store(listeners, http, store, config, shutdown).await;
        Ok(())
    })
    .map_err(Failure::Runtime)
}

/// Installs the SIGTERM and SIGINT handlers now; the future resolves on either.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
        assert!(!colour(false, Some(OsStr::new("1"))));
    }

    #[test]
    fn describe_names_each_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = anyhow::Error::new(crate::config::ConfigError::Read {
            path: "/nonexistent".into(),
            source: io,
        })
        .context("invalid configuration");
        let d = describe(&e);
        assert_eq!(d.matches("not found").count(), 1, "{d}");
        assert!(
            d.starts_with("invalid configuration: cannot read /nonexistent"),
            "{d}"
        );
    }
}
