//! A walk-through of EPM mode: discovery through the endpoint manager service, as
//! between hosts on a LAN. Start an EPM first, then point this at it:
//!
//! ```text
//! epm-service --port 4455 --bind 127.0.0.1          # or installer/install.sh on a LAN host
//! cargo run -p ipcbus-examples --example lan -- --epm 127.0.0.1:4455
//! ```
//!
//! Each step prints what happened: the EPM's status, a receiver registering (with the
//! address of the interface that routes to the EPM), the EPM's view of the handle, a
//! sender discovering the receiver and delivering an event, and the registration
//! disappearing the moment the receiver leaves.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use ipcbus::{Discovery, Epm, Handle, Receiver, Security, Sender};
use ipcbus_examples::Opts;

/// Walk through EPM mode step by step against a running epm-service.
#[derive(Parser, Debug)]
struct Args {
    /// Handle to use [default: lan.walkthrough-PID]
    #[arg(long)]
    handle: Option<Handle>,
    /// Address the receiver registers [default: the interface that routes to the EPM]
    #[arg(long)]
    ip: Option<IpAddr>,
    #[command(flatten)]
    opts: Opts,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ipcbus_examples::init_tracing();
    let args = Args::parse();
    let addr = args
        .opts
        .epm_addr()
        .context("give the EPM with --epm HOST:PORT (or IPCBUS_EPM)")?;
    let handle = match args.handle {
        Some(h) => h,
        None => format!("lan.walkthrough-{}", std::process::id()).parse()?,
    };
    let key = args.opts.key()?;

    println!("1. connect to the EPM at {addr}");
    let mut b = Epm::parse(&addr).context("--epm")?;
    if let Some(k) = &key {
        b = b.key(k.clone());
    }
    let epm = b
        .connect()
        .await
        .with_context(|| format!("cannot use the EPM at {addr}"))?;
    let st = epm.status().await?;
    println!(
        "   epm {} up {} s: {} registrations on {} handles, lease {} ms",
        st.version, st.uptime_s, st.registrations, st.handles, st.lease_ms
    );
    let sec_is_keyed = key.is_some();
    let sec = match key {
        Some(k) => {
            println!("   a password is set: the EPM link and every event are encrypted");
            Security::Encrypt(k)
        }
        None => {
            println!(
                "   no password: fine on a trusted LAN, use --password-file and --salt otherwise"
            );
            Security::default()
        }
    };

    println!("\n2. a receiver binds a port and registers \"{handle}\" at the EPM");
    let mut rb = Receiver::builder(handle.clone())
        .discovery(Discovery::Epm(epm.clone()))
        .security(sec.clone());
    if let Some(ip) = args.ip {
        rb = rb.ip(ip);
    }
    let mut rx = rb.bind().await?;
    println!(
        "   registered {} (the address that routes to the EPM, unless --ip says otherwise)",
        rx.endpoints_text()
    );

    println!("\n3. what the EPM now knows about \"{handle}\"");
    for r in epm.lookup(&handle).await? {
        println!(
            "   {} receiver {} pid {}",
            r.endpoints[0],
            r.receiver,
            r.pid.map_or("-".to_string(), |p| p.to_string())
        );
    }

    println!("\n4. a sender watches \"{handle}\" at the EPM and sends an event");
    let mut tx = Sender::builder(handle.clone())
        .discovery(Discovery::Epm(epm.clone()))
        .security(sec)
        .build()
        .await?;
    let n = tx.wait_for_receivers(1, Duration::from_secs(5)).await;
    println!("   the watch found {n} receiver(s)");
    let recv = tokio::spawn(async move {
        let m = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        (m, rx)
    });
    let report = tx.send_bytes("hello across the LAN").await?;
    for a in &report.acked {
        println!("   acknowledged by {}", a.endpoint);
    }
    for (who, why) in &report.failed {
        println!("   {} failed: {why}", who.endpoint);
    }
    let (m, rx) = recv.await?;
    if let Ok(Some(m)) = m {
        println!(
            "\n5. the receiver got #{}: {:?}",
            m.seq(),
            String::from_utf8_lossy(m.payload())
        );
    }

    println!("\n6. the receiver leaves; the EPM drops its registration at once");
    rx.close().await;
    let t = Instant::now();
    let mut left = usize::MAX;
    while t.elapsed() < Duration::from_secs(3) {
        left = epm.lookup(&handle).await?.len();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "   {} registered for \"{handle}\" after {} ms",
        ipcbus_examples::plural(left as u64, "receiver"),
        t.elapsed().as_millis()
    );
    tx.close().await;
    let creds = if sec_is_keyed {
        " --password-file FILE --salt SALT"
    } else {
        ""
    };
    if epm.resolve().await.is_ok_and(|a| a.ip().is_loopback()) {
        println!(
            "\nnext: this EPM listens on loopback, so only this host can use it. For two \
             hosts, start it on a LAN address (`epm-service --bind 0.0.0.0`, or \
             installer/install.sh), then run `ipcbus --epm LANHOST:PORT{creds} listen \
             {handle}` on one host and `ipcbus --epm LANHOST:PORT{creds} send {handle} hi` \
             on the other"
        );
    } else {
        println!(
            "\nnext: on two hosts, `ipcbus --epm {addr}{creds} listen {handle}` on one and \
             `ipcbus --epm {addr}{creds} send {handle} hi` on the other"
        );
    }
    anyhow::ensure!(
        report.all_acked() && report.targeted() == 1,
        "the event was not delivered"
    );
    Ok(())
}
