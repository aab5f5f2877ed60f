//! `ipcbus call`: one call to a server of a handle (or to all of them), the reply
//! body on stdout, a failure on stderr.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use bytes::Bytes;
use ipcbus::{CallError, Client, Endpoint, Gathered, Handle, Reply, ServerInfo};
use serde::Serialize;

use crate::common::{config_error, Common};
use crate::out;

/// The largest request body read from stdin: the default maximum frame (16 MiB).
/// What does not fit in a frame with its header is refused by the client.
const MAX_BODY: usize = ipcbus_proto::frame::DEFAULT_MAX_FRAME;

/// How long a call waits for the first server to be discovered when none is known
/// yet at start (discovery of known endpoints may still be under way); past it the
/// call fails with "no servers".
const FIRST_SERVER_WAIT: Duration = Duration::from_millis(100);

/// Call a server of HANDLE with BODY and print its reply
///
/// BODY is sent as its raw bytes; `-` or no BODY sends all of stdin (at most 16 MiB).
/// The call goes to one server of the handle (the one with the fewest calls in
/// flight), or with --all to every server registered now, gathered within --timeout.
///
/// Output: the reply body as it is, nothing added, on stdout. A failure is one line
/// on stderr: `error: remote error (CODE): MESSAGE` when the server answered with an
/// error (CODE is application, panicked, busy, deadline_exceeded, ...; with `ipcbus
/// serve`, MESSAGE is the command's stderr and exit status), `error: call timed out
/// after MS ms (...)`, `error: no servers registered for handle HANDLE`, and so on.
///
/// With --all: one block per server on stdout, in the order the servers
/// registered: a line `--- ENDPOINT ok (N bytes)` then the body (a newline added
/// when it does not end with one), or a line `--- ENDPOINT error: MESSAGE`; each
/// failure is also noted on stderr.
///
/// With --json one line on stdout:
/// {"ok":true,"server":ENDPOINT,"size":N,"body":TEXT} where body is the reply as
/// text when it is UTF-8, else {"base64":...}; or
/// {"ok":false,"server":ENDPOINT,"error":{"kind":KIND,"code":CODE,"message":TEXT}}
/// with KIND one of remote, timeout, no_servers,
/// contract_mismatch, disconnected, refused, busy, encode, decode, closed, other
/// (code only for remote; server only with --all). With --all: a JSON array of those
/// objects, one per server; when the call fails as a whole (no servers) the one
/// error object. Failures are also noted on stderr.
///
/// Exit status: 0 when the call (with --all: every server) replied, 1 on a remote
/// error, a timeout, no servers or any other failed call, 2 on usage or configuration
/// errors (a malformed handle or option).
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub json_opt: crate::common::JsonOpt,

    /// Handle (service name) to call
    pub handle: Handle,

    /// Request body, sent as its bytes; `-` or none: all of stdin
    pub body: Option<OsString>,

    /// Give up after MS milliseconds (exit 1); with --all, the deadline for every
    /// server's reply
    #[arg(long, value_name = "MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    pub timeout: u64,

    /// Call every server of the handle and print each one's reply
    #[arg(long)]
    pub all: bool,

    /// Method name to send with the call [default: none, for servers that take any
    /// request, like `ipcbus serve`]
    #[arg(long, value_name = "NAME")]
    pub method: Option<String>,

    /// Call the server at ENDPOINT: tcp://IP:PORT, IP:PORT or unix:///PATH, with no
    /// discovery (no registry read, no EPM asked)
    #[arg(long, value_name = "ENDPOINT")]
    pub to: Option<Endpoint>,
}

/// Runs `ipcbus call`.
///
/// # Errors
/// Configuration errors, an unreadable stdin, a client that cannot be built, or
/// stdout closing.
pub async fn run(common: &Common, args: Args) -> anyhow::Result<ExitCode> {
    if let Some(m) = &args.method {
        if m.len() > ipcbus_proto::call::MAX_NAME {
            return Err(config_error(format!(
                "--method is {} bytes long; at most {} are allowed",
                m.len(),
                ipcbus_proto::call::MAX_NAME
            )));
        }
    }
    let body = match args.body.as_deref() {
        Some(b) if b != "-" => Bytes::from(b.to_os_string().into_vec()),
        _ => read_stdin().await?,
    };
    let timeout = Duration::from_millis(args.timeout);
    let mut b = Client::builder(args.handle.clone())
        .discovery(common.discovery()?)
        .security(common.security()?)
        .timeout(timeout);
    if let Some(e) = &args.to {
        b = b.endpoint(e.clone());
    }
    let client = b
        .build()
        .await
        .with_context(|| format!("cannot call handle {}", args.handle))?;
    if client.servers().is_empty() {
        client
            .wait_for_servers(1, FIRST_SERVER_WAIT.min(timeout))
            .await;
    }
    let code = if args.all {
        let mut call = client.call_all_bytes(body).timeout(timeout);
        if let Some(m) = &args.method {
            call = call.method(m);
        }
        match call.await {
            Ok(all) => print_all(common.json, &args.handle, &all)?,
            Err(e) => fail(common.json, &args.handle, None, &e)?,
        }
    } else {
        let mut call = client.call_bytes(body).timeout(timeout);
        if let Some(m) = &args.method {
            call = call.method(m);
        }
        match call.await {
            Ok(reply) => print_reply(common.json, &reply)?,
            Err(e) => fail(common.json, &args.handle, None, &e)?,
        }
    };
    client.close().await;
    Ok(code)
}

/// All of stdin, at most [`MAX_BODY`] bytes.
async fn read_stdin() -> anyhow::Result<Bytes> {
    let read = tokio::task::spawn_blocking(|| {
        let mut buf = Vec::new();
        std::io::stdin()
            .lock()
            .take(MAX_BODY as u64 + 1)
            .read_to_end(&mut buf)
            .map(|_| buf)
    });
    let buf = read
        .await
        .context("the stdin reader stopped")?
        .context("cannot read the request body from stdin")?;
    if buf.len() > MAX_BODY {
        anyhow::bail!("the request body on stdin is larger than {MAX_BODY} bytes");
    }
    Ok(Bytes::from(buf))
}

/// Writes raw bytes to stdout and flushes.
fn raw(bytes: &[u8]) -> std::io::Result<()> {
    let mut o = std::io::stdout().lock();
    o.write_all(bytes)?;
    o.flush()
}

fn print_reply(json: bool, reply: &Reply) -> anyhow::Result<ExitCode> {
    if json {
        out::line(serde_json::to_string(&Outcome::ok(reply))?)?;
    } else {
        raw(reply.body())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a failed call: the JSON object (with --json) and the stderr line.
fn fail(
    json: bool,
    handle: &Handle,
    server: Option<&ServerInfo>,
    e: &CallError,
) -> anyhow::Result<ExitCode> {
    if json {
        out::line(serde_json::to_string(&Outcome::err(handle, server, e))?)?;
    }
    out::note(format!("error: {}", message(handle, e)));
    Ok(ExitCode::FAILURE)
}

fn print_all(json: bool, handle: &Handle, all: &[Gathered]) -> anyhow::Result<ExitCode> {
    let failed = all.iter().filter(|g| g.result.is_err()).count();
    if json {
        let list: Vec<Outcome> = all
            .iter()
            .map(|g| match &g.result {
                Ok(r) => Outcome::ok(r).with_server(&g.server),
                Err(e) => Outcome::err(handle, Some(&g.server), e),
            })
            .collect();
        out::line(serde_json::to_string(&list)?)?;
    }
    for g in all {
        let who = &g.server.endpoint;
        match &g.result {
            Ok(r) if !json => {
                out::line(format!("--- {who} ok ({} bytes)", r.body().len()))?;
                raw(r.body())?;
                if !r.body().is_empty() && !r.body().ends_with(b"\n") {
                    raw(b"\n")?;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let m = message(handle, e);
                if !json {
                    out::line(format!("--- {who} error: {m}"))?;
                }
                out::note(format!("error: {who}: {m}"));
            }
        }
    }
    Ok(if failed == 0 && !all.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The one-line message of a failed call.
pub fn message(handle: &Handle, e: &CallError) -> String {
    match e {
        CallError::Remote(r) => format!("remote error ({}): {}", r.code.name(), r.message),
        CallError::NoServers(_) => format!("no servers registered for handle {handle}"),
        CallError::Timeout(d) => format!(
            "call timed out after {} ms (it may or may not have run)",
            d.as_millis()
        ),
        other => other.to_string(),
    }
}

/// The `kind` of a failed call in JSON.
fn kind(e: &CallError) -> &'static str {
    match e {
        CallError::Remote(_) => "remote",
        CallError::Timeout(_) => "timeout",
        CallError::NoServers(_) => "no_servers",
        CallError::ContractMismatch { .. } => "contract_mismatch",
        CallError::Disconnected(_) => "disconnected",
        CallError::Refused(_) => "refused",
        CallError::Busy => "busy",
        CallError::Encode(_) => "encode",
        CallError::Decode(_) => "decode",
        CallError::Closed => "closed",
        _ => "other",
    }
}

/// One call's outcome as `--json` prints it.
#[derive(Serialize)]
struct Outcome {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<Body>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorJson>,
}

/// A reply body: text when it is UTF-8, else base64 (as `listen --json` prints
/// payloads).
#[derive(Serialize)]
#[serde(untagged)]
enum Body {
    Text(String),
    Binary { base64: String },
}

#[derive(Serialize)]
struct ErrorJson {
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    message: String,
}

impl Outcome {
    fn ok(r: &Reply) -> Outcome {
        let b = r.body();
        let body = match std::str::from_utf8(b) {
            Ok(s) => Body::Text(s.to_owned()),
            Err(_) => Body::Binary {
                base64: base64::engine::general_purpose::STANDARD.encode(b),
            },
        };
        Outcome {
            ok: true,
            server: r.server().map(|s| s.endpoint.to_string()),
            size: Some(b.len()),
            body: Some(body),
            error: None,
        }
    }

    fn with_server(mut self, s: &ServerInfo) -> Outcome {
        self.server = Some(s.endpoint.to_string());
        self
    }

    fn err(handle: &Handle, server: Option<&ServerInfo>, e: &CallError) -> Outcome {
        let (code, message) = match e {
            CallError::Remote(r) => (Some(r.code.name()), r.message.clone()),
            other => (None, self::message(handle, other)),
        };
        Outcome {
            ok: false,
            server: server.map(|s| s.endpoint.to_string()),
            size: None,
            body: None,
            error: Some(ErrorJson {
                kind: kind(e),
                code,
                message,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipcbus::RemoteError;

    fn h() -> Handle {
        "svc".parse().unwrap()
    }

    #[test]
    fn messages_name_the_failure_on_one_line() {
        let e = CallError::Remote(RemoteError::new("oops (exit status 3)"));
        assert_eq!(
            message(&h(), &e),
            "remote error (application): oops (exit status 3)"
        );
        assert_eq!(
            message(&h(), &CallError::NoServers(h())),
            "no servers registered for handle svc"
        );
        assert!(
            message(&h(), &CallError::Timeout(Duration::from_millis(500)))
                .starts_with("call timed out after 500 ms")
        );
    }

    #[test]
    fn json_outcomes() {
        let e = CallError::Remote(RemoteError::new("oops"));
        let v = serde_json::to_value(Outcome::err(&h(), None, &e)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ok":false,"error":{"kind":"remote","code":"application","message":"oops"}})
        );
        let v = serde_json::to_value(Outcome::err(&h(), None, &CallError::NoServers(h()))).unwrap();
        assert_eq!(v["error"]["kind"], "no_servers");
        assert!(v["error"].get("code").is_none());
    }
}
