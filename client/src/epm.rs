//! `ipcbus epm ...`: talk to an endpoint manager service.

use std::process::ExitCode;

use anyhow::Context;
use ipcbus::Epm;
use serde::Serialize;

use crate::common::Common;
use crate::out;

/// Where `epm status` looks when neither `--epm` nor `IPCBUS_EPM` is set: the EPM on
/// this host, on its default port.
const DEFAULT_EPM: &str = "127.0.0.1:4455";

/// Commands for an endpoint manager (EPM) service.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Show the EPM's status: version, uptime, connections, and the registrations per
    /// handle (--epm, else IPCBUS_EPM, else 127.0.0.1:4455)
    #[command(after_help = crate::common::ENV_HELP)]
    Status(StatusArgs),
}

/// Options of `epm status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub json_opt: crate::common::JsonOpt,
}

/// `epm status --json`.
#[derive(Serialize)]
struct StatusJson {
    addr: String,
    version: String,
    uptime_s: u64,
    connections: u32,
    registrations: u32,
    handles: u32,
    watches: u32,
    lease_ms: u32,
    by_handle: Vec<HandleJson>,
}

/// One handle and its receiver count.
#[derive(Serialize)]
struct HandleJson {
    handle: String,
    receivers: u32,
}

/// Runs `ipcbus epm ...`.
///
/// # Errors
/// Configuration errors, or the EPM cannot be reached or refuses the key.
pub async fn run(common: &Common, cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Status(a) => status(&common.clone().with_json(a.json_opt)).await,
    }
}

async fn status(common: &Common) -> anyhow::Result<ExitCode> {
    let epm = match common.epm()? {
        Some(e) => e,
        None => {
            let mut b = Epm::builder(DEFAULT_EPM);
            if let Some(k) = common.key()? {
                b = b.key(k);
            }
            b.build()
        }
    };
    let at = epm.addr().to_string();
    let mut client = epm.client().await.context("epm status")?;
    let st = client
        .status()
        .await
        .with_context(|| format!("status request to the epm at {at}"))?;
    let (counts, _) = client
        .list()
        .await
        .with_context(|| format!("list request to the epm at {at}"))?;
    client.close().await;
    let addr = epm.resolve().await.map_or(at, |a| a.to_string());
    let s = StatusJson {
        addr,
        version: st.version,
        uptime_s: st.uptime_s,
        connections: st.connections,
        registrations: st.registrations,
        handles: st.handles,
        watches: st.watches,
        lease_ms: st.lease_ms,
        by_handle: counts
            .into_iter()
            .map(|c| HandleJson {
                handle: c.handle.to_string(),
                receivers: c.receivers,
            })
            .collect(),
    };
    if common.json {
        out::line(serde_json::to_string(&s)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    out::line(format!(
        "epm {}: version {}, up {}",
        s.addr,
        s.version,
        uptime(s.uptime_s)
    ))?;
    out::line(format!(
        "  connections {}, registrations {}, handles {}, watches {}, lease {} ms",
        s.connections, s.registrations, s.handles, s.watches, s.lease_ms
    ))?;
    for h in &s.by_handle {
        let noun = if h.receivers == 1 {
            "receiver"
        } else {
            "receivers"
        };
        out::line(format!("  {}: {} {noun}", h.handle, h.receivers))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `3d 04h 05m 06s`, shortest form that fits.
fn uptime(s: u64) -> String {
    let (d, h, m, s) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s:02}s"),
        (0, _, _) => format!("{h}h {m:02}m {s:02}s"),
        _ => format!("{d}d {h:02}h {m:02}m {s:02}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptimes() {
        assert_eq!(uptime(5), "5s");
        assert_eq!(uptime(65), "1m 05s");
        assert_eq!(uptime(3605), "1h 00m 05s");
        assert_eq!(uptime(90_061), "1d 01h 01m 01s");
    }
}
