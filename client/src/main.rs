//! `ipcbus`: the command line of the ipcbus event bus.
//!
//! Modules: `common` (options every command takes, and how they become discovery and
//! security), one module per command (`listen`, `send`, `call`, `serve`, `list`,
//! `demo`, `bench`, `epm`), `out` (line-at-a-time stdout) and `time` (RFC 3339 formatting).
//!
//! Exit status: 0 on success, 1 when the work failed (an event not acknowledged, a
//! bind failure), 2 on usage or configuration errors. A closed stdout (`| head`) ends
//! the program quietly with status 0.

mod bench;
mod call;
mod common;
mod demo;
mod epm;
mod list;
mod listen;
mod out;
mod send;
mod serve;
mod stats;
mod time;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::common::{Common, ConfigError, ENV_HELP};

/// Publish/subscribe events and make calls between processes on this host or across
/// a LAN.
///
/// Receivers register a handle (a topic name); senders send to every receiver of that
/// handle. Servers register a handle too; `call` asks one of them (or all) and prints
/// the reply. Try `ipcbus demo`.
#[derive(Parser, Debug)]
#[command(name = "ipcbus", version, propagate_version = true, after_help = ENV_HELP)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    #[command(after_help = ENV_HELP)]
    Listen(listen::Args),
    #[command(after_help = ENV_HELP)]
    Send(send::Args),
    #[command(after_help = ENV_HELP)]
    Call(call::Args),
    #[command(after_help = ENV_HELP)]
    Serve(serve::Args),
    #[command(after_help = ENV_HELP)]
    List(list::Args),
    #[command(after_help = ENV_HELP)]
    Demo(demo::Args),
    #[command(after_help = ENV_HELP)]
    Bench(bench::Args),
    /// Talk to an endpoint manager (EPM) service
    #[command(subcommand, after_help = ENV_HELP)]
    Epm(epm::Command),
    /// One receiver process of `ipcbus bench` (internal)
    #[command(hide = true, name = "bench-receiver")]
    BenchReceiver(bench::ReceiverArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A receiver's log of rejected peers is news to the person running `listen`; for
    // the other commands the reports already say what failed, so only errors are
    // logged unless RUST_LOG asks for more.
    let default_filter = match cli.command {
        Command::Listen(_) | Command::Serve(_) | Command::BenchReceiver(_) => "warn",
        _ => "error",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(colours())
        .with_target(false)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            out::note(format!("error: cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cli));
    // A stdin reader may still be blocked in read(2); do not wait for it.
    rt.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            out::note(format!("error: {}", one_line(&e)));
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // The global options, with each command's own --json, --ip and --ports.
    let g = cli.common;
    match cli.command {
        Command::Listen(a) => {
            let c = g.with_json(a.json_opt).with_bind(a.bind.clone());
            listen::run(&c, a).await
        }
        Command::Send(a) => send::run(&g.with_json(a.json_opt), a).await,
        Command::Call(a) => call::run(&g.with_json(a.json_opt), a).await,
        Command::Serve(a) => serve::run(&g, a).await,
        Command::List(a) => list::run(&g.with_json(a.json_opt), a).await,
        Command::Demo(a) => demo::run(&g, a).await,
        Command::Bench(a) => {
            let c = g.with_json(a.json_opt).with_bind(a.bind.clone());
            bench::run(&c, a).await
        }
        Command::Epm(c) => epm::run(&g, c).await,
        Command::BenchReceiver(a) => {
            let c = g.with_bind(a.bind.clone());
            bench::run_receiver(&c, a).await
        }
    }
}

/// Colours in logs only on a terminal, and not when `NO_COLOR` is set and not empty
/// (<https://no-color.org>).
fn colours() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").map_or(true, |v| v.is_empty())
}

/// The error and its causes on one line, like `{:#}`, but without repeating a cause
/// whose text the message before it already includes.
fn one_line(e: &anyhow::Error) -> String {
    ipcbus::error_chain(e.as_ref())
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn causes_are_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = anyhow::Error::new(io)
            .context("cannot connect to x: refused")
            .context("cannot send");
        assert_eq!(one_line(&e), "cannot send: cannot connect to x: refused");
        let e = anyhow::anyhow!("a").context("b");
        assert_eq!(one_line(&e), format!("{e:#}"));
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
