//! The monitoring endpoint (`--http ADDR`): a deliberately small HTTP/1.1 server.
//!
//! GET only, one request per connection (`Connection: close`), the request head
//! capped at [`MAX_HEAD`] bytes and [`READ_TIMEOUT`], at most [`MAX_CONNECTIONS`]
//! connections at once (more get `503` and are closed), and the same
//! cancellation token and task tracker as the EPM listeners, so SIGTERM stops it.
//! Parsing the head, checking credentials and routing are plain functions
//! ([`parse_head`], [`Auth::allows`], [`route`]); [`serve`] is the thin driver.
//!
//! Paths: `/status` (JSON), `/metrics` (Prometheus text format), `/` (a page that
//! reloads itself). See `docs/EPM.md`, "Monitoring".

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::monitor::Report;

/// Largest request head (request line and headers) read; a longer one gets `431`.
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its whole request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the whole answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Monitoring connections at once; more are answered `503` and closed.
pub const MAX_CONNECTIONS: usize = 32;

/// Connections past [`MAX_CONNECTIONS`] being answered `503` at once; past it they
/// are closed without an answer.
const MAX_REFUSING: usize = 8;

/// The realm named in `WWW-Authenticate`.
pub const REALM: &str = "ipcbus-epm";

/// Where the endpoint gets its figures: the server's shared state.
pub trait Source: Send + Sync + 'static {
    /// The state now.
    fn report(&self) -> Report;
}

/// Who may read the endpoint.
#[derive(Clone, Default)]
pub struct Auth {
    /// The EPM password: HTTP Basic with any user name and this password.
    pub password: Option<Vec<u8>>,
    /// `Authorization: Bearer TOKEN` with this token (`--http-token-file`).
    pub token: Option<Vec<u8>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl Auth {
    /// Whether any credential is required.
    pub fn required(&self) -> bool {
        self.password.is_some() || self.token.is_some()
    }

    /// Whether a request with this `Authorization` header value may read.
    pub fn allows(&self, authorization: Option<&str>) -> bool {
        if !self.required() {
            return true;
        }
        let Some(value) = authorization else {
            return false;
        };
        let value = value.trim();
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let Some(password) = &self.password else {
                return false;
            };
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest) else {
                return false;
            };
            let Some(colon) = decoded.iter().position(|&b| b == b':') else {
                return false;
            };
            same(&decoded[colon + 1..], password)
        } else if scheme.eq_ignore_ascii_case("bearer") {
            self.token
                .as_ref()
                .is_some_and(|t| same(rest.as_bytes(), t))
        } else {
            false
        }
    }
}

/// Compares a secret in time that depends only on the lengths, not on where the
/// bytes differ.
fn same(given: &[u8], secret: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != secret.len());
    for i in 0..given.len().max(secret.len()) {
        let a = given.get(i).copied().unwrap_or(0);
        let b = secret.get(i).copied().unwrap_or(0);
        diff |= a ^ b;
    }
    std::hint::black_box(diff) == 0
}

/// A request head, as far as this endpoint cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path without the query string.
    pub path: String,
    /// The `Authorization` header's value.
    pub authorization: Option<String>,
}

/// Why a request head is not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeadError {
    /// No end of the head within [`MAX_HEAD`] bytes.
    #[error("request head larger than {MAX_HEAD} bytes")]
    TooLarge,
    /// Not an HTTP/1.x request head.
    #[error("malformed request head")]
    Malformed,
}

/// Parses the request head at the start of `buf`: `Ok(None)` while it is incomplete.
///
/// # Errors
/// [`HeadError::TooLarge`] when [`MAX_HEAD`] bytes hold no complete head;
/// [`HeadError::Malformed`] for anything but `METHOD TARGET HTTP/1.x` and
/// `Name: value` lines.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, HeadError> {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2));
    let Some(end) = end.filter(|&e| e <= MAX_HEAD) else {
        return if buf.len() >= MAX_HEAD {
            Err(HeadError::TooLarge)
        } else {
            Ok(None)
        };
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| HeadError::Malformed)?;
    let mut lines = text.lines();
    let mut first = lines.next().ok_or(HeadError::Malformed)?.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (first.next(), first.next(), first.next(), first.next())
    else {
        return Err(HeadError::Malformed);
    };
    if method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !target.starts_with('/')
        || !matches!(version, "HTTP/1.0" | "HTTP/1.1")
    {
        return Err(HeadError::Malformed);
    }
    let mut authorization = None;
    for line in lines.map(|l| l.trim_end_matches('\r')) {
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').ok_or(HeadError::Malformed)?;
        if name.is_empty() || name.contains(' ') {
            return Err(HeadError::Malformed);
        }
        if name.eq_ignore_ascii_case("authorization") {
            authorization = Some(value.trim().to_owned());
        }
    }
    let path = target.split(['?', '#']).next().unwrap_or(target).to_owned();
    Ok(Some(Head {
        method: method.to_owned(),
        path,
        authorization,
    }))
}

/// An answer, written with `Content-Length` and `Connection: close`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Extra header lines, each `Name: value`.
    pub headers: Vec<String>,
    /// The body.
    pub body: String,
}

impl Answer {
    fn text(status: u16, body: &str) -> Answer {
        Answer {
            status,
            content_type: "text/plain; charset=utf-8",
            headers: Vec::new(),
            body: format!("{body}\n"),
        }
    }

    /// The bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Error",
        };
        let mut s = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Connection: close\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        for h in &self.headers {
            s.push_str(h);
            s.push_str("\r\n");
        }
        s.push_str("\r\n");
        s.push_str(&self.body);
        s.into_bytes()
    }
}

/// The answer to `head`: credentials first, then the method, then the path.
pub fn route(head: &Head, auth: &Auth, source: &dyn Source) -> Answer {
    if !auth.allows(head.authorization.as_deref()) {
        let mut a = Answer::text(
            401,
            "unauthorized: give the EPM password (HTTP Basic) or the token",
        );
        a.headers
            .push(format!("WWW-Authenticate: Basic realm=\"{REALM}\""));
        return a;
    }
    if head.method != "GET" {
        let mut a = Answer::text(405, "only GET");
        a.headers.push("Allow: GET".to_owned());
        return a;
    }
    match head.path.as_str() {
        "/status" => Answer {
            status: 200,
            content_type: "application/json",
            headers: Vec::new(),
            body: source.report().json(),
        },
        "/metrics" => Answer {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            headers: Vec::new(),
            body: source.report().metrics(),
        },
        "/" => Answer {
            status: 200,
            content_type: "text/html; charset=utf-8",
            // Nothing but the page itself and inline style: no scripts, no fetches.
            headers: vec![
                "Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'".to_owned(),
            ],
            body: source.report().page(),
        },
        _ => Answer::text(404, "not found: try /, /status or /metrics"),
    }
}

/// Serves the monitoring endpoint on `listener` until `token` is cancelled; each
/// connection is a task of `tasks`.
pub async fn serve(
    listener: TcpListener,
    auth: Auth,
    source: Arc<dyn Source>,
    token: CancellationToken,
    tasks: TaskTracker,
) {
    let auth = Arc::new(auth);
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = token.cancelled() => return,
            r = listener.accept() => r,
        };
        let (sock, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "http accept failed; backing off");
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(10);
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "http connection limit reached; refusing");
            // Answered 503 by a few tasks at most; past them, just closed.
            if let Ok(p) = refusing.clone().try_acquire_owned() {
                let t = token.child_token();
                tasks.spawn(async move {
                    let busy = Answer::text(503, "busy: too many connections");
                    tokio::select! {
                        _ = t.cancelled() => {}
                        _ = answer(sock, &busy) => {}
                    }
                    drop(p);
                });
            }
            continue;
        };
        let (auth, source, t) = (auth.clone(), source.clone(), token.child_token());
        tasks.spawn(async move {
            tokio::select! {
                _ = t.cancelled() => {}
                _ = connection(sock, peer, &auth, &*source) => {}
            }
            drop(permit);
        });
    }
}

/// One request and its answer.
async fn connection(mut sock: TcpStream, peer: SocketAddr, auth: &Auth, source: &dyn Source) {
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 2048];
        loop {
            let want = chunk.len().min(MAX_HEAD + 1 - buf.len().min(MAX_HEAD));
            let before = buf.len();
            match sock.read(&mut chunk[..want]).await {
                Ok(0) | Err(_) => return Err(None),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            // Parse only once the head may be complete: the blank line has come (looked
            // for in the new bytes and the 3 before them, so a client trickling bytes
            // costs linear time, not a rescan per byte) or the cap is reached.
            let from = before.saturating_sub(3);
            let ended = buf[from..].windows(2).any(|w| w == b"\n\n")
                || buf[from..].windows(4).any(|w| w == b"\r\n\r\n");
            if ended || buf.len() >= MAX_HEAD {
                match parse_head(&buf) {
                    Ok(Some(head)) => return Ok(head),
                    Ok(None) => {}
                    Err(e) => return Err(Some(e)),
                }
            }
        }
    })
    .await;
    let reply = match head {
        Ok(Ok(head)) => {
            let a = route(&head, auth, source);
            match a.status {
                401 if head.authorization.is_some() => {
                    tracing::warn!(%peer, path = %head.path.escape_debug(), "http request with wrong credentials")
                }
                405 => tracing::debug!(%peer, method = %head.method, "http method not allowed"),
                _ => {}
            }
            a
        }
        Ok(Err(Some(e))) => {
            tracing::warn!(%peer, error = %e, "bad http request");
            match e {
                HeadError::TooLarge => Answer::text(431, "request head too large"),
                HeadError::Malformed => Answer::text(400, "bad request"),
            }
        }
        // Closed or failed before a whole head: nothing to answer.
        Ok(Err(None)) => return,
        Err(_) => {
            tracing::debug!(%peer, "http request head not received in time");
            Answer::text(408, "request timeout")
        }
    };
    answer(sock, &reply).await;
}

/// Writes `a`, closes the writing side, and reads (and drops) a little of what the
/// client may still be sending, so that closing with unread bytes does not reset the
/// connection before the client reads the answer. Bounded in time.
async fn answer(mut sock: TcpStream, a: &Answer) {
    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
        sock.write_all(&a.to_bytes()).await?;
        sock.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024;
        while left > 0 {
            match sock.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n.min(left),
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;

    #[test]
    fn heads_parse_incrementally() {
        let req = b"GET /status?x=1 HTTP/1.1\r\nHost: a\r\nauthorization:  Basic eDp5 \r\n\r\n";
        for n in 0..req.len() {
            assert_eq!(parse_head(&req[..n]), Ok(None), "{n}");
        }
        assert_eq!(
            parse_head(req),
            Ok(Some(Head {
                method: "GET".into(),
                path: "/status".into(),
                authorization: Some("Basic eDp5".into()),
            }))
        );
        // bare LF line ends too
        assert!(parse_head(b"GET / HTTP/1.0\nHost: a\n\n")
            .unwrap()
            .is_some());
    }

    #[test]
    fn bad_heads() {
        for bad in [
            &b"GET /\r\n\r\n"[..],
            b"GET / HTTP/2\r\n\r\n",
            b"get / HTTP/1.1\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET / HTTP/1.1 x\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(
                parse_head(bad),
                Err(HeadError::Malformed),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD, b'a');
        assert_eq!(parse_head(&big), Err(HeadError::TooLarge));
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_head(&big), Err(HeadError::TooLarge));
    }

    #[test]
    fn credentials() {
        let open = Auth::default();
        assert!(open.allows(None));
        let auth = Auth {
            password: Some(b"pw:x".to_vec()),
            token: Some(b"tok".to_vec()),
        };
        let basic = |s: &str| format!("Basic {}", STANDARD.encode(s));
        assert!(!auth.allows(None));
        assert!(auth.allows(Some(&basic("anyone:pw:x"))));
        assert!(auth.allows(Some(&basic(":pw:x"))));
        assert!(auth.allows(Some(&format!("basic  {}", STANDARD.encode("u:pw:x")))));
        assert!(!auth.allows(Some(&basic("u:pw"))));
        assert!(!auth.allows(Some(&basic("u:pw:xx"))));
        assert!(!auth.allows(Some(&basic("pw:x"))));
        assert!(!auth.allows(Some("Basic !!!")));
        assert!(auth.allows(Some("Bearer tok")));
        assert!(!auth.allows(Some("Bearer tok2")));
        assert!(!auth.allows(Some("Bearer ")));
        assert!(!auth.allows(Some("Digest tok")));
        let token_only = Auth {
            password: None,
            token: Some(b"tok".to_vec()),
        };
        assert!(!token_only.allows(Some(&basic("u:tok"))));
        assert!(token_only.allows(Some("Bearer tok")));
        assert!(!format!("{auth:?}").contains("tok\""));
    }

    #[test]
    fn same_compares_whole_secrets() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"ab", b"abc"));
        assert!(!same(b"abc\0", b"abc"));
        assert!(same(b"", b""));
    }

    #[test]
    fn answers_on_the_wire() {
        let a = Answer::text(404, "nope");
        let s = String::from_utf8(a.to_bytes()).unwrap();
        assert!(s.starts_with("HTTP/1.1 404 Not Found\r\n"), "{s}");
        assert!(s.contains("\r\nContent-Length: 5\r\n"), "{s}");
        assert!(s.contains("\r\nConnection: close\r\n"), "{s}");
        assert!(s.ends_with("\r\n\r\nnope\n"), "{s}");
    }
}
