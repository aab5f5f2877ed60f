//! `epm-service --http`: the monitoring endpoint as a real process on `127.0.0.1:0`,
//! read back from its `http on ADDR` log line, with receivers registered through the
//! library. `/status` is parsed as JSON, `/metrics` with the Prometheus text-format
//! parser below (not a regex), and `/` is loaded in headless Chromium when it is
//! installed (`.ci/run` installs Debian's `chromium`; without it that test prints
//! `SKIPPED: chromium not found` and passes).

mod cli_support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use cli_support::{strip_ansi, Epm, Proc, Tmp, T};
use ipcbus::{Handle, Receiver, Sender};

const EPM_BIN: &str = env!("CARGO_BIN_EXE_test-epm-service");

/// A handle that needs HTML escaping.
const ODD: &str = "a<b>&\"c\"";

/// `epm-service` on loopback with `--http 127.0.0.1:0` and `extra` arguments; returns
/// it with its EPM and HTTP addresses.
fn start(extra: &[&str]) -> (Epm, SocketAddr) {
    let mut args = vec![
        "--bind",
        "127.0.0.1",
        "--port",
        "0",
        "--http",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let epm = Epm::start(Path::new(EPM_BIN), &args);
    let line = strip_ansi(&epm.proc.stderr_line("http on "));
    let http = line
        .split("http on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (epm, http)
}

/// One HTTP answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `raw` and reads the answer until the server closes (bounded).
fn exchange(addr: SocketAddr, raw: &[u8]) -> std::io::Result<Answer> {
    let mut s = TcpStream::connect_timeout(&addr, T)?;
    s.set_read_timeout(Some(T))?;
    s.set_write_timeout(Some(T))?;
    s.write_all(raw)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8(buf).expect("utf-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status = parts.next().and_then(|c| c.parse().ok()).expect("status");
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header line");
            (n.to_owned(), v.trim().to_owned())
        })
        .collect();
    let a = Answer {
        status,
        headers,
        body: body.to_owned(),
    };
    let len: usize = a
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .expect("content-length");
    assert_eq!(len, a.body.len(), "content-length");
    assert_eq!(a.header("connection"), Some("close"));
    Ok(a)
}

fn request(addr: SocketAddr, method: &str, path: &str, auth: Option<&str>) -> Answer {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    if let Some(a) = auth {
        raw.push_str(&format!("Authorization: {a}\r\n"));
    }
    raw.push_str("\r\n");
    exchange(addr, raw.as_bytes()).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn get(addr: SocketAddr, path: &str) -> Answer {
    request(addr, "GET", path, None)
}

fn basic(user_pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(user_pass)
    )
}

fn status_json(addr: SocketAddr) -> serde_json::Value {
    let a = get(addr, "/status");
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("content-type"), Some("application/json"));
    serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{e}: {}", a.body))
}

fn metrics(addr: SocketAddr) -> BTreeMap<String, prom::Family> {
    let a = get(addr, "/metrics");
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        a.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    prom::parse(&a.body).unwrap_or_else(|e| panic!("{e}\n{}", a.body))
}

/// The value of `name{label="value"}` (or of the unlabelled `name`).
fn sample(m: &BTreeMap<String, prom::Family>, name: &str, label: Option<(&str, &str)>) -> f64 {
    let f = m
        .get(name)
        .unwrap_or_else(|| panic!("no family {name}: {:?}", m.keys()));
    f.samples
        .iter()
        .find(|s| match label {
            None => s.labels.is_empty(),
            Some((k, v)) => s.labels.get(k).map(String::as_str) == Some(v),
        })
        .unwrap_or_else(|| panic!("no sample {name} {label:?} in {f:?}"))
        .value
}

/// Polls `f` every 20 ms until it is true, for at most [`T`].
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < deadline, "not within {T:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A tokio runtime with a watcher (`Sender`) on `sensors` and receivers on `sensors`
/// and on [`ODD`], registered at `epm`.
struct Clients {
    rt: tokio::runtime::Runtime,
    _held: Option<(Sender, Receiver, Receiver)>,
    ids: Vec<String>,
}

impl Clients {
    fn start(epm: &str) -> Clients {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let held = rt.block_on(async {
            let epm = ipcbus::Epm::builder(epm).connect().await.expect("epm");
            let tx = Sender::builder(Handle::new("sensors").unwrap())
                .epm(epm.clone())
                .build()
                .await
                .expect("sender");
            let r1 = Receiver::builder(Handle::new("sensors").unwrap())
                .epm(epm.clone())
                .bind()
                .await
                .expect("receiver");
            let r2 = Receiver::builder(Handle::new(ODD).unwrap())
                .epm(epm)
                .bind()
                .await
                .expect("receiver");
            (tx, r1, r2)
        });
        let ids = vec![held.1.id().to_string(), held.2.id().to_string()];
        Clients {
            rt,
            _held: Some(held),
            ids,
        }
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        let _g = self.rt.enter();
        self._held.take();
    }
}

#[test]
fn status_json_lists_handles_receivers_and_counts() {
    let (epm, http) = start(&["--max-connections", "77"]);
    let clients = Clients::start(&epm.addr);
    let v = status_json(http);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["uptime_s"].is_u64());
    assert_eq!(v["handles"], 2, "{v:#}");
    assert_eq!(v["registrations"], 2);
    assert!(v["connections"].as_u64().unwrap() >= 1, "{v:#}");
    assert_eq!(v["watches"], 1);
    assert_eq!(v["lease_ms"], 10_000);
    assert_eq!(v["limits"]["max_connections"], 77);
    assert_eq!(v["limits"]["max_frame"], 1_048_576);
    assert_eq!(v["truncated"], false);
    let by: Vec<&str> = v["by_handle"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["handle"].as_str().unwrap())
        .collect();
    assert_eq!(by, vec![ODD, "sensors"]);
    let r = &v["by_handle"][1]["receivers"][0];
    assert_eq!(r["receiver_id"], clients.ids[0].as_str());
    assert!(r["addr"].as_str().unwrap().starts_with("127.0.0.1:"), "{r}");
    assert_eq!(r["pid"], std::process::id());
    assert!(
        cli_support::is_rfc3339_utc(r["since"].as_str().unwrap()),
        "{r}"
    );
    assert!(r["since_ms"].as_u64().unwrap() > 1_600_000_000_000);
    assert!(v["counters"]["requests"]["register"].as_u64().unwrap() >= 2);
    assert!(v["counters"]["requests"]["watch"].as_u64().unwrap() >= 1);
    drop(clients);
    eventually("registrations gone after the receivers closed", || {
        status_json(http)["registrations"] == 0
    });
}

#[test]
fn metrics_parse_with_types_and_labels() {
    let (epm, http) = start(&[]);
    let _clients = Clients::start(&epm.addr);
    // A connection that is not an ipcbus client: one rejected handshake.
    let mut junk = TcpStream::connect(&epm.addr).unwrap();
    junk.set_read_timeout(Some(T)).unwrap();
    let _ = junk.write_all(b"GET / HTTP/1.1\r\n\r\n\r\n\r\n\r\n\r\n");
    let _ = junk.read_to_end(&mut Vec::new());
    eventually("the rejected handshake is counted", || {
        let m = metrics(http);
        sample(
            &m,
            "ipcbus_epm_handshakes_rejected_total",
            Some(("reason", "protocol")),
        ) >= 1.0
    });
    let m = metrics(http);
    let types: BTreeMap<&str, &str> = m
        .iter()
        .map(|(n, f)| (n.as_str(), f.kind.as_deref().unwrap_or("")))
        .collect();
    for (name, kind) in [
        ("ipcbus_epm_registrations", "gauge"),
        ("ipcbus_epm_handles", "gauge"),
        ("ipcbus_epm_connections", "gauge"),
        ("ipcbus_epm_watches", "gauge"),
        ("ipcbus_epm_uptime_seconds", "gauge"),
        ("ipcbus_epm_build_info", "gauge"),
        ("ipcbus_epm_requests_total", "counter"),
        ("ipcbus_epm_handshakes_rejected_total", "counter"),
        ("ipcbus_epm_lease_expiries_total", "counter"),
        ("ipcbus_epm_watch_notifications_total", "counter"),
    ] {
        assert_eq!(types.get(name), Some(&kind), "{name}: {types:?}");
        assert!(
            !m[name].help.as_deref().unwrap_or("").is_empty(),
            "{name} HELP"
        );
    }
    assert!(m.keys().all(|n| n.starts_with("ipcbus_epm_")), "{m:?}");
    assert_eq!(sample(&m, "ipcbus_epm_registrations", None), 2.0);
    assert_eq!(sample(&m, "ipcbus_epm_handles", None), 2.0);
    assert_eq!(sample(&m, "ipcbus_epm_watches", None), 1.0);
    assert!(sample(&m, "ipcbus_epm_connections", None) >= 1.0);
    assert_eq!(sample(&m, "ipcbus_epm_lease_seconds", None), 10.0);
    assert_eq!(
        sample(
            &m,
            "ipcbus_epm_build_info",
            Some(("version", env!("CARGO_PKG_VERSION")))
        ),
        1.0
    );
    assert!(sample(&m, "ipcbus_epm_requests_total", Some(("kind", "register"))) >= 2.0);
    assert!(sample(&m, "ipcbus_epm_requests_total", Some(("kind", "watch"))) >= 1.0);
    assert_eq!(
        sample(
            &m,
            "ipcbus_epm_handshakes_rejected_total",
            Some(("reason", "authentication_failed"))
        ),
        0.0
    );
    assert_eq!(sample(&m, "ipcbus_epm_lease_expiries_total", None), 0.0);
    // The watcher on `sensors` was told about its receiver.
    assert!(sample(&m, "ipcbus_epm_watch_notifications_total", None) >= 1.0);
    // Every request kind and reject reason is a labelled sample of one family.
    let kinds: Vec<&str> = m["ipcbus_epm_requests_total"]
        .samples
        .iter()
        .map(|s| s.labels["kind"].as_str())
        .collect();
    for k in [
        "register",
        "unregister",
        "keep_alive",
        "lookup",
        "watch",
        "unwatch",
        "list",
        "status",
    ] {
        assert!(kinds.contains(&k), "{k}: {kinds:?}");
    }
}

#[test]
fn password_protects_it_with_basic_auth_or_a_token() {
    let dir = Tmp::new("http-auth");
    let pw = dir.path().join("pw");
    let tok = dir.path().join("tok");
    std::fs::write(&pw, "s3cret\n").unwrap();
    std::fs::write(&tok, "tok-123\n").unwrap();
    let (epm, http) = start(&[
        "--password-file",
        pw.to_str().unwrap(),
        "--salt",
        "0102",
        "--http-token-file",
        tok.to_str().unwrap(),
    ]);
    for path in ["/", "/status", "/metrics", "/nope"] {
        let a = get(http, path);
        assert_eq!(a.status, 401, "{path}: {a:?}");
        assert_eq!(
            a.header("www-authenticate"),
            Some("Basic realm=\"ipcbus-epm\""),
            "{path}"
        );
    }
    for good in [
        basic("admin:s3cret"),
        basic(":s3cret"),
        "Bearer tok-123".to_owned(),
    ] {
        let a = request(http, "GET", "/status", Some(&good));
        assert_eq!(a.status, 200, "{good}: {a:?}");
        assert!(a.body.contains("\"registrations\""));
    }
    for bad in [
        basic("admin:wrong"),
        basic("admin:s3cret "),
        basic("s3cret"),
        "Bearer tok-124".to_owned(),
        "Bearer s3cret".to_owned(),
        "Basic not base64!".to_owned(),
    ] {
        let a = request(http, "GET", "/metrics", Some(&bad));
        assert_eq!(a.status, 401, "{bad}: {a:?}");
    }
    // A client with the wrong password is counted by reason.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let wrong = ipcbus::Key::derive("not-it", [1u8, 2]).unwrap();
    let r = rt.block_on(ipcbus::Epm::builder(epm.addr.as_str()).key(wrong).connect());
    assert!(r.is_err(), "a wrong key is refused");
    eventually("the failed handshake is counted", || {
        let a = request(http, "GET", "/metrics", Some("Bearer tok-123"));
        let m = prom::parse(&a.body).unwrap();
        sample(
            &m,
            "ipcbus_epm_handshakes_rejected_total",
            Some(("reason", "authentication_failed")),
        ) == 1.0
    });
    // Authenticated but unknown: 404, wrong method: 405.
    assert_eq!(
        request(http, "GET", "/x", Some("Bearer tok-123")).status,
        404
    );
    assert_eq!(
        request(http, "POST", "/status", Some("Bearer tok-123")).status,
        405
    );
}

#[test]
fn help_names_the_http_flags() {
    let r = cli_support::run(
        {
            let mut c = Command::new(EPM_BIN);
            c.arg("--help");
            c
        },
        b"",
    );
    assert_eq!(r.code(), 0);
    for s in [
        "--http <ADDR>",
        "--http-token-file <FILE>",
        "/metrics",
        "Bearer",
    ] {
        assert!(r.stdout.contains(s), "{s}: {}", r.stdout);
    }
}

#[test]
fn methods_paths_and_content_types() {
    let (_epm, http) = start(&[]);
    for (path, ctype) in [
        ("/", "text/html; charset=utf-8"),
        ("/?x=1", "text/html; charset=utf-8"),
        ("/status", "application/json"),
        ("/metrics", "text/plain; version=0.0.4; charset=utf-8"),
    ] {
        let a = get(http, path);
        assert_eq!(a.status, 200, "{path}");
        assert_eq!(a.header("content-type"), Some(ctype), "{path}");
    }
    for path in ["/nope", "/status/", "/metrics.txt", "/index.html"] {
        assert_eq!(get(http, path).status, 404, "{path}");
    }
    for method in ["POST", "PUT", "DELETE", "HEAD"] {
        let a = request(http, method, "/status", None);
        assert_eq!(a.status, 405, "{method}");
        assert_eq!(a.header("allow"), Some("GET"), "{method}");
    }
    let a = exchange(http, b"this is not http\r\n\r\n").unwrap();
    assert_eq!(a.status, 400);
}

#[test]
fn request_size_and_connections_are_bounded() {
    let (mut epm, http) = start(&[]);
    // An oversized head: 431, or at least the connection is closed; never hangs.
    let mut raw = b"GET /status HTTP/1.1\r\nX-Filler: ".to_vec();
    raw.resize(64 * 1024, b'a');
    raw.extend_from_slice(b"\r\n\r\n");
    match exchange(http, &raw) {
        Ok(a) => assert_eq!(a.status, 431, "{a:?}"),
        Err(e) => eprintln!("oversized head: connection closed ({e})"),
    }
    assert_eq!(get(http, "/status").status, 200);

    // Idle connections take the slots; past the cap (32) a connection gets 503 at
    // once, and once they close the endpoint serves again.
    let mut idle: Vec<TcpStream> = (0..32).map(|_| TcpStream::connect(http).unwrap()).collect();
    // A connection answered before may still hold a slot for a moment (so one of the
    // idle ones was refused instead), and idle ones are cut off after 5 s: while the
    // probe is served, one more idle connection takes a slot. Bounded.
    eventually("a connection past the cap is refused with 503", || {
        let probe = format!("GET /status HTTP/1.1\r\nHost: {http}\r\n\r\n");
        match exchange(http, probe.as_bytes()) {
            Ok(a) if a.status == 503 => return true,
            Ok(a) => assert_eq!(a.status, 200, "{a:?}"),
            // The 503 is written and the socket closed at once, with our request
            // unread: the kernel may answer with a reset before we read the 503.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(e) => panic!("GET /status past the cap: {e}"),
        }
        if idle.len() < 256 {
            idle.push(TcpStream::connect(http).unwrap());
        }
        false
    });
    // The EPM itself is not affected.
    assert!(TcpStream::connect(&epm.addr).is_ok());
    drop(idle);
    eventually("the endpoint serves again", || {
        get(http, "/status").status == 200
    });

    // A slow client is cut off after the read timeout (5 s), answered 408.
    let mut slow = TcpStream::connect(http).unwrap();
    slow.set_read_timeout(Some(T)).unwrap();
    slow.write_all(b"GET /status HTTP/1.1\r\n").unwrap();
    let started = Instant::now();
    let mut got = String::new();
    let _ = slow.read_to_string(&mut got);
    assert!(got.starts_with("HTTP/1.1 408 "), "{got:?}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // SIGTERM stops the service with an HTTP connection open.
    let _open = TcpStream::connect(http).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    epm.proc.signal(libc::SIGTERM);
    let st = epm.proc.wait(T).expect("exits on SIGTERM");
    assert!(st.success(), "{st:?}");
}

/// Debian's `chromium`, if installed.
fn chromium() -> Option<PathBuf> {
    let fixed = Path::new("/usr/bin/chromium");
    if fixed.is_file() {
        return Some(fixed.to_owned());
    }
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("chromium"))
            .find(|c| c.is_file())
    })
}

/// Runs headless Chromium with `args` and the page's URL; returns its stdout.
fn chromium_run(exe: &Path, profile: &Path, args: &[&str], url: &str) -> String {
    let mut cmd = Command::new(exe);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url);
    let mut p = Proc::spawn(cmd);
    let st = p
        .wait(Duration::from_secs(60))
        .expect("chromium finishes within 60 s");
    let out = p.stdout_rest();
    assert!(st.success(), "chromium: {st:?}\n{}", p.stderr_rest());
    out
}

#[test]
fn the_page_shows_receivers_in_chromium() {
    let (epm, http) = start(&[]);
    let clients = Clients::start(&epm.addr);
    // The page itself: self-contained, escaped, reloading.
    let page = get(http, "/").body;
    assert!(page.contains("http-equiv=\"refresh\""), "{page}");
    assert!(page.contains("a&lt;b&gt;&amp;&quot;c&quot;"), "{page}");
    assert!(!page.contains(ODD));
    assert!(
        !page.contains("src=") && !page.contains("<script"),
        "{page}"
    );
    assert!(page.contains(&clients.ids[0]));

    let Some(exe) = chromium() else {
        println!("SKIPPED: chromium not found");
        return;
    };
    let dir = Tmp::new("chromium");
    let url = format!("http://{http}/");
    let dom = chromium_run(&exe, &dir.path().join("profile"), &["--dump-dom"], &url);
    assert!(dom.contains("<td class=\"handle\""), "{dom}");
    assert!(dom.contains(">sensors</td>"), "{dom}");
    // The odd handle is text, not markup.
    assert!(dom.contains("a&lt;b&gt;&amp;\"c\""), "{dom}");
    assert!(!dom.contains("<b>&amp;"), "{dom}");
    assert!(
        dom.contains(&clients.ids[0]) && dom.contains(&clients.ids[1]),
        "{dom}"
    );

    let png = dir.path().join("page.png");
    chromium_run(
        &exe,
        &dir.path().join("profile"),
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1024,600",
            "--hide-scrollbars",
        ],
        &url,
    );
    let bytes = std::fs::read(&png).expect("screenshot written");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    // IHDR: width and height.
    assert_eq!(&bytes[16..24], &[0, 0, 4, 0, 0, 0, 2, 0x58]);
}

/// A parser of the Prometheus text exposition format 0.0.4
/// (<https://prometheus.io/docs/instrumenting/exposition_formats/>): `# HELP` and
/// `# TYPE` lines, samples with optional labels (escaped values), float values
/// including `NaN` and `±Inf`, optional timestamps. Strict: anything else is an
/// error, as is a TYPE after its family's samples, a family's samples not together,
/// or a duplicate sample.
mod prom {
    use std::collections::BTreeMap;

    #[derive(Debug, Default)]
    pub struct Family {
        pub help: Option<String>,
        pub kind: Option<String>,
        pub samples: Vec<Sample>,
    }

    #[derive(Debug)]
    pub struct Sample {
        pub name: String,
        pub labels: BTreeMap<String, String>,
        pub value: f64,
        pub timestamp: Option<i64>,
    }

    pub fn parse(text: &str) -> Result<BTreeMap<String, Family>, String> {
        let mut fams: BTreeMap<String, Family> = BTreeMap::new();
        let mut done: Vec<String> = Vec::new();
        let mut current: Option<String> = None;
        for (no, line) in text.split('\n').enumerate() {
            let err = |m: &str| format!("line {}: {m}: {line:?}", no + 1);
            if line.trim().is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix('#') {
                let rest = rest.trim_start_matches([' ', '\t']);
                let mut it = rest.splitn(3, [' ', '\t']);
                let word = it.next().unwrap_or("");
                if word != "HELP" && word != "TYPE" {
                    continue; // a plain comment
                }
                let name = it.next().ok_or_else(|| err("no metric name"))?;
                check_name(name, true).map_err(|e| err(&e))?;
                let arg = it.next().unwrap_or("");
                let f = fams.entry(name.to_owned()).or_default();
                if word == "HELP" {
                    if f.help.is_some() {
                        return Err(err("second HELP"));
                    }
                    f.help = Some(unescape(arg, false).map_err(|e| err(&e))?);
                } else {
                    if f.kind.is_some() {
                        return Err(err("second TYPE"));
                    }
                    if !f.samples.is_empty() {
                        return Err(err("TYPE after samples"));
                    }
                    if !matches!(
                        arg,
                        "counter" | "gauge" | "histogram" | "summary" | "untyped"
                    ) {
                        return Err(err("unknown type"));
                    }
                    f.kind = Some(arg.to_owned());
                }
                continue;
            }
            let s = sample(line).map_err(|e| err(&e))?;
            let family = family_of(&fams, &s.name);
            if current.as_deref() != Some(&family) {
                if done.contains(&family) {
                    return Err(err("samples of a family are not together"));
                }
                if let Some(c) = current.take() {
                    done.push(c);
                }
                current = Some(family.clone());
            }
            let f = fams.entry(family).or_default();
            if f.samples
                .iter()
                .any(|o| o.name == s.name && o.labels == s.labels)
            {
                return Err(err("duplicate sample"));
            }
            f.samples.push(s);
        }
        Ok(fams)
    }

    /// The family a sample belongs to: its own name, or for histograms and summaries
    /// the name without `_bucket`, `_sum` or `_count`.
    fn family_of(fams: &BTreeMap<String, Family>, name: &str) -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if fams
                    .get(base)
                    .is_some_and(|f| matches!(f.kind.as_deref(), Some("histogram" | "summary")))
                {
                    return base.to_owned();
                }
            }
        }
        name.to_owned()
    }

    fn check_name(name: &str, metric: bool) -> Result<(), String> {
        let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (metric && c == ':');
        let ok = |c: char| ok_first(c) || c.is_ascii_digit();
        let mut cs = name.chars();
        match cs.next() {
            Some(c) if ok_first(c) && cs.all(ok) => Ok(()),
            _ => Err(format!("bad name {name:?}")),
        }
    }

    /// Undoes `\\`, `\n` and (in label values) `\"`.
    fn unescape(s: &str, quotes: bool) -> Result<String, String> {
        let mut out = String::new();
        let mut cs = s.chars();
        while let Some(c) = cs.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match cs.next() {
                Some('\\') => out.push('\\'),
                Some('n') => out.push('\n'),
                Some('"') if quotes => out.push('"'),
                other => return Err(format!("bad escape \\{other:?}")),
            }
        }
        Ok(out)
    }

    fn sample(line: &str) -> Result<Sample, String> {
        let name_end = line.find(['{', ' ', '\t']).ok_or("no value")?;
        let name = &line[..name_end];
        check_name(name, true)?;
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(r) = rest.strip_prefix('{') {
            rest = r;
            loop {
                rest = rest.trim_start();
                if let Some(r) = rest.strip_prefix('}') {
                    rest = r;
                    break;
                }
                let eq = rest.find('=').ok_or("label without '='")?;
                let lname = rest[..eq].trim();
                check_name(lname, false)?;
                rest = rest[eq + 1..].trim_start();
                rest = rest.strip_prefix('"').ok_or("label value not quoted")?;
                // Find the closing quote, skipping escaped characters.
                let mut end = None;
                let mut esc = false;
                for (i, c) in rest.char_indices() {
                    match (esc, c) {
                        (true, _) => esc = false,
                        (false, '\\') => esc = true,
                        (false, '"') => {
                            end = Some(i);
                            break;
                        }
                        _ => {}
                    }
                }
                let end = end.ok_or("unterminated label value")?;
                let value = unescape(&rest[..end], true)?;
                if labels.insert(lname.to_owned(), value).is_some() {
                    return Err(format!("label {lname} twice"));
                }
                rest = rest[end + 1..].trim_start();
                if let Some(r) = rest.strip_prefix(',') {
                    rest = r;
                } else if !rest.starts_with('}') {
                    return Err("expected ',' or '}' after a label".into());
                }
            }
        }
        if !rest.starts_with([' ', '\t']) {
            return Err("no space before the value".into());
        }
        let mut fields = rest.split_whitespace();
        let value = match fields.next().ok_or("no value")? {
            "NaN" => f64::NAN,
            "+Inf" | "Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse::<f64>().map_err(|e| format!("value {v:?}: {e}"))?,
        };
        let timestamp = match fields.next() {
            None => None,
            Some(t) => Some(
                t.parse::<i64>()
                    .map_err(|e| format!("timestamp {t:?}: {e}"))?,
            ),
        };
        if fields.next().is_some() {
            return Err("trailing text".into());
        }
        Ok(Sample {
            name: name.to_owned(),
            labels,
            value,
            timestamp,
        })
    }

    #[test]
    fn the_parser_reads_the_format_and_rejects_what_is_not() {
        let text = "# HELP a_total Things \\\\ done.\\nReally.\n# TYPE a_total counter\n\
                    a_total{k=\"x\\\"y\",l=\"\\\\n\"} 3 1700000000000\na_total{k=\"z\",} 4\n\
                    # a comment\n\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 2.5\nh_count 1\n\
                    g NaN\ng2 -Inf\ng3 1e3\n";
        let m = parse(text).unwrap();
        let a = &m["a_total"];
        assert_eq!(a.help.as_deref(), Some("Things \\ done.\nReally."));
        assert_eq!(a.kind.as_deref(), Some("counter"));
        assert_eq!(a.samples[0].labels["k"], "x\"y");
        assert_eq!(a.samples[0].labels["l"], "\\n");
        assert_eq!(a.samples[0].timestamp, Some(1_700_000_000_000));
        assert_eq!(a.samples[1].value, 4.0);
        assert_eq!(m["h"].samples.len(), 3);
        assert!(m["g"].samples[0].value.is_nan());
        assert_eq!(m["g3"].samples[0].value, 1000.0);
        for bad in [
            "a{k=\"x} 1\n",
            "a{k=x} 1\n",
            "a{1k=\"x\"} 1\n",
            "a 1 2 3\n",
            "a one\n",
            "a\n",
            "a 1\nb 1\na 2\n",
            "a 1\n# TYPE a gauge\n",
            "# TYPE a gauge\n# TYPE a gauge\n",
            "# TYPE a thing\n",
            "a{k=\"x\",k=\"y\"} 1\n",
            "a{k=\"x\"} 1\na{k=\"x\"} 2\n",
            "9a 1\n",
            "a{k=\"\\q\"} 1\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
