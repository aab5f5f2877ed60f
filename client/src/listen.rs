//! `ipcbus listen`: bind a receiver and print every event it gets.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use ipcbus::{Endpoint, Handle, Message, Receiver};
use serde::Serialize;
use tokio::signal::unix::{signal, SignalKind};

use crate::common::{parse_secs, Common, ConfigContext};
use crate::out;

/// Bind a receiver for HANDLE and print each event it gets, one per line
///
/// Once registered it prints `ready HANDLE ADDR [ENDPOINT...]` on stderr: ADDR is the
/// TCP ip:port (when it listens on TCP), then any other endpoint in its text form
/// (`unix:///...`). With the local registry it listens on TCP and on a Unix socket in
/// the registry directory; senders on this host use the Unix socket. Each event is printed as
/// UTF-8 text (lossy), or with --json as {"handle","sender","seq","size","payload"},
/// where payload is the text or {"base64": ...} for binary. Exits 0 after --count
/// events, or on SIGINT/SIGTERM after unregistering.
///
/// With --stats it prints the receiver's counters at the end: `stats: ...` lines on
/// stderr, or with --json one object on stdout as the last line: {"event":"stats",
/// "taken","payload_bytes","bytes_read","accepted","handshakes",
/// "rejected":{"authentication_failed","security_mismatch","wrong_handle",
/// "malformed","busy","timed_out","disconnected"}, "closed","connected_senders"}
/// (counts; rejected: connections that did not finish their handshake, by reason).
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub json_opt: crate::common::JsonOpt,

    #[command(flatten)]
    pub bind: crate::common::BindOpts,

    /// Handle (topic) to receive
    pub handle: Handle,

    /// Listen exactly at ENDPOINT (repeatable): tcp://IP:PORT, IP:PORT or
    /// unix:///PATH, instead of an ephemeral port and the registry's socket; senders
    /// can reach it with `send --to ENDPOINT` without any registry
    #[arg(long, value_name = "ENDPOINT", conflicts_with_all = ["ip", "ports"])]
    pub at: Vec<Endpoint>,

    /// Exit after N events
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    /// Give up after SECS seconds (exit 0 without --count; with --count, exit 1 if fewer
    /// than N events came)
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub timeout: Option<Duration>,

    /// Print the receiver's counters at the end (stderr; with --json a
    /// {"event":"stats",...} object, the last line on stdout)
    #[arg(long)]
    pub stats: bool,
}

/// Runs `ipcbus listen`.
///
/// # Errors
/// Configuration errors, a failure to bind, or stdout closing.
pub async fn run(common: &Common, args: Args) -> anyhow::Result<ExitCode> {
    let discovery = common.discovery()?;
    let security = common.security()?;
    let mut b = Receiver::builder(args.handle.clone())
        .discovery(discovery)
        .security(security);
    if let Some(ip) = common.ip {
        b = b.ip(ip);
    }
    if let Some(ports) = &common.ports {
        b = b.allowed_ports(ports.0.iter().copied());
    }
    for e in &args.at {
        b = b.bind_at(e.clone());
    }
    let mut rx = match b.bind().await {
        Ok(rx) => rx,
        // What only another setting fixes is a configuration error (exit 2).
        Err(
            e @ (ipcbus::BindError::BadTransports { .. }
            | ipcbus::BindError::UnixNeedsPath
            | ipcbus::BindError::NoTransports
            | ipcbus::BindError::Unix(ipcbus::UnixBindError::PathTooLong { .. })),
        ) => return Err(crate::common::config_error(e.to_string())),
        Err(e) => {
            return Err(anyhow::Error::new(e))
                .with_context(|| format!("cannot listen on handle {}", args.handle))
        }
    };
    let mut sigint = signal(SignalKind::interrupt()).config("cannot install a SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).config("cannot install a SIGTERM handler")?;
    out::note(format!("ready {} {}", args.handle, ready_addrs(&rx)));

    let deadline = args.timeout.map(|t| tokio::time::Instant::now() + t);
    let sleep = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep);
    let mut got = 0u64;
    let outcome = loop {
        if args.count.is_some_and(|n| got >= n) {
            break Ok(ExitCode::SUCCESS);
        }
        tokio::select! {
            m = rx.recv() => match m {
                Some(m) => {
                    got += 1;
                    if let Err(e) = print(common.json, &args.handle, &m) {
                        break Err(e);
                    }
                }
                None => break Ok(ExitCode::SUCCESS),
            },
            _ = sigint.recv() => break Ok(ExitCode::SUCCESS),
            _ = sigterm.recv() => break Ok(ExitCode::SUCCESS),
            _ = &mut sleep => break match args.count {
                Some(n) => {
                    out::note(format!("timed out with {got} of {n} events"));
                    Ok(ExitCode::FAILURE)
                }
                None => Ok(ExitCode::SUCCESS),
            },
        }
    };
    let stats = rx.stats();
    // Unregister, acknowledge what was taken, and say goodbye to senders.
    rx.close().await;
    if args.stats && outcome.is_ok() {
        crate::stats::print_receiver(common.json, &stats)?;
    }
    outcome
}

/// One event as `listen --json` prints it.
#[derive(Serialize)]
struct EventJson<'a> {
    handle: &'a str,
    sender: String,
    seq: u64,
    size: usize,
    payload: Payload,
}

/// The payload: text when it is UTF-8, else base64.
#[derive(Serialize)]
#[serde(untagged)]
enum Payload {
    Text(String),
    Binary { base64: String },
}

fn print(json: bool, handle: &Handle, m: &Message) -> anyhow::Result<()> {
    let p = m.payload();
    if json {
        let payload = match std::str::from_utf8(p) {
            Ok(s) => Payload::Text(s.to_owned()),
            Err(_) => Payload::Binary {
                base64: base64::engine::general_purpose::STANDARD.encode(p),
            },
        };
        out::line(serde_json::to_string(&EventJson {
            handle: handle.as_str(),
            sender: m.sender().to_string(),
            seq: m.seq(),
            size: p.len(),
            payload,
        })?)?;
    } else {
        out::line(String::from_utf8_lossy(p))?;
    }
    Ok(())
}

/// The endpoints of the `ready` line: the TCP address as bare `ip:port` first (the
/// line's form since the first version), then any other endpoint in its text form.
fn ready_addrs(rx: &Receiver) -> String {
    let mut parts: Vec<String> = rx.local_addr().map(|a| a.to_string()).into_iter().collect();
    parts.extend(
        rx.endpoints()
            .iter()
            .filter(|e| e.tcp_addr().is_none())
            .map(ToString::to_string),
    );
    parts.join(" ")
}
