//! `calls_load`: the processes of the calls load test (`tests/tests/calls_load.rs`).
//!
//! ```text
//! calls_load server HANDLE ID
//! calls_load client HANDLE ID CALLS SERVERS
//! ```
//!
//! A server binds an [`ipcbus::Server`] for HANDLE (discovery and security from
//! the environment, as any program: `IPCBUS_RUNTIME_DIR`, `IPCBUS_TRANSPORTS`, ...),
//! prints `ready ENDPOINT...` on stdout, and answers every request with `ID|BODY`
//! (its own id, a bar, the request's body) until SIGTERM or SIGINT.
//!
//! A client waits (at most 10 s) until it knows SERVERS servers of HANDLE, then makes
//! CALLS calls at once, each with a unique body `cID-N-NONCE`, and checks that each
//! reply is `SERVER|` followed by that call's own body. It prints one line:
//!
//! ```text
//! ok N failed M servers ID=K,ID=K
//! ```
//!
//! (`servers`: how many replies came from each server), the first failures on
//! stderr, and exits 0 when every call was answered with its own body.
//!
//! Both die with their parent (`PR_SET_PDEATHSIG`).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use ipcbus::{Client, Handle, Server};
use tokio::signal::unix::{signal, SignalKind};

/// How long a client waits for the servers, and for all of its calls.
const WAIT: Duration = Duration::from_secs(10);
const CALLS_TIMEOUT: Duration = Duration::from_secs(60);

/// Failures printed on stderr at most (the rest are counted).
const SHOWN: usize = 5;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag of this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("calls_load: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async {
        match args.first().map(String::as_str) {
            Some("server") => server(&args[1..]).await,
            Some("client") => client(&args[1..]).await,
            _ => bail!(
                "usage: calls_load server HANDLE ID | calls_load client HANDLE ID CALLS SERVERS"
            ),
        }
    });
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("calls_load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn arg<'a>(args: &'a [String], i: usize, what: &str) -> anyhow::Result<&'a str> {
    args.get(i)
        .map(String::as_str)
        .with_context(|| format!("missing {what}"))
}

async fn server(args: &[String]) -> anyhow::Result<ExitCode> {
    let handle: Handle = arg(args, 0, "HANDLE")?.parse()?;
    let id = Bytes::from(format!("{}|", arg(args, 1, "ID")?));
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let server = Server::builder(handle).bind().await?;
    let endpoints: Vec<String> = server.endpoints().iter().map(ToString::to_string).collect();
    println!("ready {}", endpoints.join(" "));
    let serving = server.serve(
        move |req| {
            let mut reply = Vec::with_capacity(id.len() + req.body().len());
            reply.extend_from_slice(&id);
            reply.extend_from_slice(req.body());
            async move {
                // A caller that has gone is its own failure, counted by the client.
                let _ = req.reply_bytes(reply);
            }
        },
        1024,
    );
    tokio::select! {
        () = serving => {}
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    Ok(ExitCode::SUCCESS)
}

async fn client(args: &[String]) -> anyhow::Result<ExitCode> {
    let handle: Handle = arg(args, 0, "HANDLE")?.parse()?;
    let id = arg(args, 1, "ID")?.to_owned();
    let calls: usize = arg(args, 2, "CALLS")?.parse()?;
    let servers: usize = arg(args, 3, "SERVERS")?.parse()?;
    let client = Client::builder(handle)
        .timeout(CALLS_TIMEOUT)
        .build()
        .await?;
    let known = client.wait_for_servers(servers, WAIT).await;
    if known < servers {
        bail!("found {known} of {servers} servers within {WAIT:?}");
    }
    let nonce = std::process::id();
    let mut pending = FuturesUnordered::new();
    for n in 0..calls {
        let body = Bytes::from(format!("c{id}-{n}-{nonce}"));
        let call = client.call_bytes(body.clone());
        pending.push(async move { (body, call.await) });
    }
    let (mut ok, mut failed) = (0usize, 0usize);
    let mut by_server: BTreeMap<String, usize> = BTreeMap::new();
    let mut shown = 0;
    let mut fail = |why: String| {
        failed += 1;
        if shown < SHOWN {
            shown += 1;
            eprintln!("calls_load client {id}: {why}");
        }
    };
    while let Some((body, r)) = pending.next().await {
        match r {
            Ok(reply) => {
                let got = reply.body();
                match got.iter().position(|&b| b == b'|') {
                    Some(at) if got[at + 1..] == body[..] => {
                        ok += 1;
                        let server = String::from_utf8_lossy(&got[..at]).into_owned();
                        *by_server.entry(server).or_default() += 1;
                    }
                    _ => fail(format!(
                        "call {:?} answered {:?}",
                        String::from_utf8_lossy(&body),
                        String::from_utf8_lossy(got)
                    )),
                }
            }
            Err(e) => fail(format!(
                "call {:?} failed: {e}",
                String::from_utf8_lossy(&body)
            )),
        }
    }
    let per: Vec<String> = by_server.iter().map(|(s, n)| format!("{s}={n}")).collect();
    println!("ok {ok} failed {failed} servers {}", per.join(","));
    client.close().await;
    Ok(if failed == 0 && ok == calls {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
