//! `ipcbus demo`: two receivers and a sender in a private registry, showing typed and
//! raw events, compression, encryption, reports and a rejected wrong password.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use ipcbus::{Discovery, Key, Message, Receiver, ReceiverId, SendReport, Sender};
use serde::{Deserialize, Serialize};

use crate::common::{Common, ConfigContext};
use crate::out;

/// Run a self-contained demonstration: two receivers and one sender
///
/// Uses a private temporary registry (nothing else sees it, no set-up needed), sends
/// typed and raw events encrypted with a password, prints what each receiver got and
/// every send report, then cleans up. It takes no options: --epm, --etcd,
/// --password-file and --salt are refused (exit 2), and IPCBUS_EPM, IPCBUS_ETCD and
/// the password variables are not used.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// The typed event of the demo: any serde type works.
#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: u32,
    item: String,
    qty: u16,
}

const HANDLE: &str = "demo.orders";
const PASSWORD: &str = "demo password";
const SALT: [u8; 3] = [0x01, 0x02, 0x03];
const T: Duration = Duration::from_secs(5);
/// Events the demo sends; the receivers expect exactly this many.
const EVENTS: usize = 4;

/// Runs `ipcbus demo`.
///
/// # Errors
/// When the temporary registry cannot be made, a receiver cannot bind, or an event is
/// not delivered as the demo expects.
pub async fn run(common: &Common, _args: Args) -> anyhow::Result<ExitCode> {
    let given: Vec<&str> = [
        ("--epm", common.epm.is_some()),
        ("--etcd", common.etcd.is_some()),
        ("--password-file", common.password_file.is_some()),
        ("--salt", common.salt.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    if !given.is_empty() {
        return Err(crate::common::config_error(format!(
            "demo runs in a private registry with a password of its own; {} cannot apply \
             (leave {} out, or try `ipcbus listen` and `ipcbus send`)",
            given.join(", "),
            if given.len() == 1 { "it" } else { "them" }
        )));
    }
    let dir = tempfile::Builder::new()
        .prefix("ipcbus-demo-")
        .tempdir()
        .config("cannot create a temporary registry directory")?;
    let result = demo(dir.path()).await;
    let path = dir.path().display().to_string();
    dir.close()
        .config(format!("cannot remove the demo registry {path}"))?;
    result?;
    out::line(format!(
        "\ncleaned up: receivers closed, sender closed, {path} removed."
    ))?;
    Ok(ExitCode::SUCCESS)
}

async fn demo(dir: &std::path::Path) -> anyhow::Result<()> {
    let disc = Discovery::local_at(dir).config("cannot open the demo registry")?;
    let handle: ipcbus::Handle = HANDLE.parse()?;
    let key = Key::derive(PASSWORD, SALT)?;

    out::line(format!(
        "ipcbus demo: two receivers and one sender on handle \"{HANDLE}\""
    ))?;
    out::line(format!(
        "  registry:   {} (private, removed at the end)",
        dir.display()
    ))?;
    out::line(format!(
        "  encryption: AES-256-GCM, key from password {PASSWORD:?} + salt {} (hex; Argon2id)",
        hex::encode(SALT)
    ))?;
    out::line(
        "  compression: gzip for events of 512 bytes or more (forced on: by default it is off on loopback)\n",
    )?;

    let mut names = Vec::new();
    let mut tasks = Vec::new();
    for name in ["A", "B"] {
        let rx = Receiver::builder(handle.clone())
            .discovery(disc.clone())
            .key(key.clone())
            .bind()
            .await
            .with_context(|| format!("receiver {name} cannot bind"))?;
        out::line(format!(
            "receiver {name} listening on {} (registered in the registry)",
            rx.endpoints_text()
        ))?;
        names.push((rx.id(), name));
        tasks.push(tokio::spawn(take_events(rx)));
    }

    let mut tx = Sender::builder(handle.clone())
        .discovery(disc.clone())
        .key(key.clone())
        .compress(true)
        .build()
        .await?;
    let found = tx.wait_for_receivers(2, T).await;
    out::line(format!(
        "sender discovered {found} receivers of \"{HANDLE}\" by itself\n"
    ))?;
    if found < 2 {
        bail!("the sender found {found} of 2 receivers");
    }

    out::line("sending (each line: the event, then its report):")?;
    let orders = [
        Order {
            id: 1,
            item: "coffee".into(),
            qty: 2,
        },
        Order {
            id: 2,
            item: "tea".into(),
            qty: 1,
        },
    ];
    let mut all_ok = true;
    for o in &orders {
        let r = tx.send(o).await?;
        all_ok &= report(&format!("typed {o:?}"), &r, &names)?;
    }
    let raw = "plain bytes, no schema";
    let r = tx.send_bytes(raw).await?;
    all_ok &= report(&format!("raw   {raw:?} ({} B)", raw.len()), &r, &names)?;
    let big = big_text();
    let wire = ipcbus_proto::compress::gzip(&big, 1).map_or(big.len(), |z| z.len());
    let r = tx.send_bytes(big.clone()).await?;
    all_ok &= report(
        &format!(
            "raw   {} KiB of log text (gzip: {} B on the wire)",
            big.len() / 1024,
            wire
        ),
        &r,
        &names,
    )?;

    tx.close().await;
    out::line("")?;
    let mut receivers = Vec::new();
    for (task, (_, name)) in tasks.into_iter().zip(&names) {
        let (got, rx) = task.await.context("a receiver task failed")?;
        receivers.push(rx);
        all_ok &= got.len() == EVENTS;
        out::line(format!("receiver {name} got {} events:", got.len()))?;
        for m in &got {
            out::line(format!("  #{} {}", m.seq(), describe(m, &big)))?;
        }
    }

    out::line("\na sender with the wrong password tries the same handle:")?;
    let wrong = Key::derive("wrong password", SALT)?;
    let mut intruder = Sender::builder(handle)
        .discovery(disc)
        .key(wrong)
        .send_timeout(T)
        .build()
        .await?;
    let r = intruder.send_bytes("let me in").await?;
    report("raw   \"let me in\"", &r, &names)?;
    intruder.close().await;
    for rx in receivers {
        rx.close().await;
    }
    if r.acked.is_empty() && r.failed.len() == 2 {
        out::line("  -> nothing reached the receivers: they only accept the right key.")?;
    } else {
        bail!("the wrong password was not rejected by both receivers");
    }
    if !all_ok {
        bail!("some events were not acknowledged by both receivers");
    }
    Ok(())
}

/// Receives the demo's events (bounded in count and time) and hands the receiver
/// back, still registered, so the wrong-password attempt meets it too.
async fn take_events(mut rx: Receiver) -> (Vec<Message>, Receiver) {
    let mut got = Vec::new();
    while got.len() < EVENTS {
        match tokio::time::timeout(T, rx.recv()).await {
            Ok(Some(m)) => got.push(m),
            _ => break,
        }
    }
    (got, rx)
}

fn report(what: &str, r: &SendReport, names: &[(ReceiverId, &str)]) -> anyhow::Result<bool> {
    let name = |id: ReceiverId| names.iter().find(|(i, _)| *i == id).map_or("?", |(_, n)| n);
    let mut s = format!("  #{} {what}\n       -> ", r.seq);
    if !r.acked.is_empty() {
        let mut who: Vec<&str> = r.acked.iter().map(|a| name(a.id)).collect();
        who.sort_unstable();
        let _ = write!(s, "acked by {}", who.join(", "));
    }
    let mut failed: Vec<_> = r.failed.iter().collect();
    failed.sort_by_key(|(who, _)| name(who.id));
    for (i, (who, why)) in failed.into_iter().enumerate() {
        let sep = if i == 0 && r.acked.is_empty() {
            ""
        } else {
            "; "
        };
        let _ = write!(s, "{sep}{} failed: {why}", name(who.id));
    }
    if r.targeted() == 0 {
        s.push_str("no receivers");
    }
    out::line(s)?;
    Ok(r.failed.is_empty() && r.acked.len() == names.len())
}

fn describe(m: &Message, big: &[u8]) -> String {
    match m.seq() {
        1 | 2 => match m.decode::<Order>() {
            Ok(o) => format!("{o:?}"),
            Err(e) => format!("undecodable order: {e}"),
        },
        _ if m.payload().len() == big.len() => {
            let intact = if &m.payload()[..] == big {
                "intact after gzip"
            } else {
                "CORRUPT"
            };
            format!("{} KiB of log text, {intact}", big.len() / 1024)
        }
        _ => format!("{:?}", String::from_utf8_lossy(m.payload())),
    }
}

/// 64 KiB of repetitive text, which gzip shrinks a lot.
fn big_text() -> Vec<u8> {
    let mut s = String::with_capacity(64 * 1024 + 64);
    let mut i = 0u32;
    while s.len() < 64 * 1024 {
        let _ = writeln!(s, "{i:05} INFO orders: order accepted, queue depth ok");
        i += 1;
    }
    s.truncate(64 * 1024);
    s.into_bytes()
}
