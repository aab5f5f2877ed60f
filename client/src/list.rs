//! `ipcbus list`: the registered receivers, per handle.

use std::process::ExitCode;

use anyhow::Context;
use ipcbus::{Discovery, Handle, Record};
use serde::Serialize;

use crate::common::{Common, ConfigContext};
use crate::out;
use crate::time::rfc3339_ms;

/// List handles and their receivers, from the local registry, the EPM or etcd
///
/// With --json prints an array of {"handle","addr","receiver_id","pid","since","role"}
/// (pid null when unknown, since in RFC 3339, role "receiver" or "server").
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub json_opt: crate::common::JsonOpt,

    /// Only this handle
    pub handle: Option<Handle>,
}

/// Runs `ipcbus list`.
///
/// # Errors
/// Configuration errors, an unreadable registry, or stdout closing.
pub async fn run(common: &Common, args: Args) -> anyhow::Result<ExitCode> {
    let records = records(common, args.handle.as_ref()).await?;
    if common.json {
        let arr: Vec<RecordJson> = records.iter().map(record_json).collect();
        out::line(serde_json::to_string(&arr)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if records.is_empty() {
        out::note(match &args.handle {
            Some(h) => format!("no receivers registered for {h}"),
            None => "no receivers registered".to_string(),
        });
        return Ok(ExitCode::SUCCESS);
    }
    let mut current: Option<&Handle> = None;
    for r in &records {
        if current != Some(&r.handle) {
            let n = records.iter().filter(|x| x.handle == r.handle).count();
            let noun = if n == 1 { "receiver" } else { "receivers" };
            out::line(format!("{} ({n} {noun})", r.handle))?;
            current = Some(&r.handle);
        }
        let pid = r.pid.map_or_else(|| "-".to_string(), |p| p.to_string());
        let endpoints: Vec<String> = r.endpoints.iter().map(ToString::to_string).collect();
        out::line(format!(
            "  {:<28} {} {}  pid {:<7} since {}",
            endpoints.join(" "),
            r.role.as_str(),
            r.receiver,
            pid,
            rfc3339_ms(r.since_ms)
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn records(common: &Common, handle: Option<&Handle>) -> anyhow::Result<Vec<Record>> {
    if let Some(epm) = common.epm()? {
        let handles = match handle {
            Some(h) => vec![h.clone()],
            None => {
                let (counts, _) = epm.list().await.context("cannot list the handles")?;
                counts.into_iter().map(|c| c.handle).collect()
            }
        };
        let mut out = Vec::new();
        for h in handles {
            let mut recs = epm
                .lookup(&h)
                .await
                .with_context(|| format!("cannot look up {h}"))?;
            recs.sort_by_key(|r| r.since_ms);
            out.extend(recs);
        }
        out.sort_by(|a, b| a.handle.cmp(&b.handle).then(a.since_ms.cmp(&b.since_ms)));
        return Ok(out);
    }
    match common.discovery()? {
        Discovery::Local(reg) => reg.scan(handle).config("cannot read the local registry"),
        Discovery::Etcd(etcd) => {
            let mut recs = match handle {
                Some(h) => etcd.lookup(h).await,
                None => etcd.list().await,
            }
            .context("cannot read the registrations in etcd")?;
            recs.sort_by(|a, b| a.handle.cmp(&b.handle).then(a.since_ms.cmp(&b.since_ms)));
            Ok(recs)
        }
        _ => Err(crate::common::config_error(
            "this discovery back end cannot be listed",
        )),
    }
}

/// One receiver as `list --json` prints it.
#[derive(Debug, Serialize)]
pub struct RecordJson {
    handle: String,
    /// The TCP address as bare `ip:port` (the field's form before endpoints), else
    /// the first endpoint in its text form.
    addr: String,
    /// Every endpoint in its text form (`tcp://...`, `unix:///...`).
    endpoints: Vec<String>,
    /// The transport of each endpoint, in the same order (`tcp`, `unix`).
    transports: Vec<&'static str>,
    receiver_id: String,
    pid: Option<u32>,
    since: String,
    /// `receiver` (of events) or `server` (of calls).
    role: &'static str,
}

/// The JSON form of one record, as `list --json` prints it.
pub fn record_json(r: &Record) -> RecordJson {
    RecordJson {
        handle: r.handle.to_string(),
        addr: match r.tcp_addr() {
            Some(a) => a.to_string(),
            None => r
                .endpoints
                .first()
                .map(ToString::to_string)
                .unwrap_or_default(),
        },
        endpoints: r.endpoints.iter().map(ToString::to_string).collect(),
        transports: r.endpoints.iter().map(|e| e.transport().as_str()).collect(),
        receiver_id: r.receiver.to_string(),
        pid: r.pid,
        since: rfc3339_ms(r.since_ms),
        role: r.role.as_str(),
    }
}
