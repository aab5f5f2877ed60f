//! Real etcd for the tests and the figures program: Debian's `etcd` (package
//! `etcd-server`) started on free loopback ports with its data in a temporary
//! directory, one member or a cluster, killed by pid when dropped.
//!
//! Ports: each is chosen by binding 127.0.0.1 port 0, reading the port and
//! releasing it just before etcd binds it (etcd takes no port 0). Another process
//! could take one in between; start then fails within its bounded wait and says so.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TempDir;

/// Longest wait for a started cluster to report healthy.
const START_WAIT: Duration = Duration::from_secs(20);

/// The etcd binary: `IPCBUS_TEST_ETCD` if set, else `etcd` on the PATH, else
/// `/usr/bin/etcd`. `None` when there is none (tests then say they skip).
pub fn etcd_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("IPCBUS_TEST_ETCD") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .chain([PathBuf::from("/usr/bin/etcd")])
        .find(|p| p.is_file())
}

/// One etcd member process.
#[derive(Debug)]
pub struct Member {
    /// Its name in the cluster (`m0`, `m1`, ...).
    pub name: String,
    /// `http://127.0.0.1:PORT` (or `https://` with TLS) for clients.
    pub client_url: String,
    peer_url: String,
    /// Plain HTTP `/health` and `/metrics`, also when clients use TLS.
    metrics_url: String,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster of one or more members on loopback.
#[derive(Debug)]
pub struct Cluster {
    bin: PathBuf,
    /// The members, in start order.
    pub members: Vec<Member>,
    initial: String,
    tls: Option<Tls>,
    _dir: TempDir,
}

/// A CA and a server certificate for 127.0.0.1 it signed, made with `openssl`, for
/// an etcd that serves its clients over TLS.
#[derive(Debug, Clone)]
pub struct Tls {
    /// The CA certificate (PEM): what clients trust.
    pub ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Tls {
    /// Makes them in `dir` with the `openssl` command; `None` when it is missing or
    /// fails (the caller says it skips).
    pub fn make(dir: &Path) -> Option<Tls> {
        let run = |args: &[&str]| {
            Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth,clientAuth\n",
        )
        .ok()?;
        let ok = run(&[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem"],
            &["-days", "2", "-subj", "/CN=ipcbus test CA"],
        ]
        .concat())
            && run(&[
                &["req"][..],
                &ec,
                &["-keyout", "server.key", "-out", "server.csr"],
                &["-subj", "/CN=127.0.0.1"],
            ]
            .concat())
            && run(&[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ]);
        ok.then(|| Tls {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        })
    }
}

/// A free loopback port, and the listener holding it until the caller drops it (so
/// the next call cannot get the same port).
fn free_port() -> (u16, TcpListener) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    (l.local_addr().expect("local address").port(), l)
}

impl Cluster {
    /// Starts `n` members and waits (bounded) until every one reports healthy.
    /// `None` when there is no etcd binary.
    ///
    /// # Panics
    /// When etcd does not start or become healthy in time (the log is shown).
    pub fn start(n: usize) -> Option<Cluster> {
        Cluster::start_with(n, None)
    }

    /// As [`Cluster::start`], serving clients over TLS with `tls` (`https://` URLs).
    pub fn start_tls(n: usize, tls: &Tls) -> Option<Cluster> {
        Cluster::start_with(n, Some(tls.clone()))
    }

    fn start_with(n: usize, tls: Option<Tls>) -> Option<Cluster> {
        let bin = etcd_binary()?;
        let dir = TempDir::new("etcd");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut members = Vec::new();
        let mut held = Vec::new();
        for i in 0..n {
            let ((c, lc), (p, lp), (m, lm)) = (free_port(), free_port(), free_port());
            held.extend([lc, lp, lm]);
            members.push(Member {
                name: format!("m{i}"),
                client_url: format!("{scheme}://127.0.0.1:{c}"),
                peer_url: format!("http://127.0.0.1:{p}"),
                metrics_url: format!("http://127.0.0.1:{m}"),
                data: dir.path().join(format!("m{i}.data")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            });
        }
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        // Released just before etcd binds them.
        drop(held);
        let mut cluster = Cluster {
            bin,
            members,
            initial,
            tls,
            _dir: dir,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_healthy(i, START_WAIT);
        }
        Some(cluster)
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("etcd log file");
        let mut cmd = Command::new(&self.bin);
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key);
        }
        let child = cmd
            .args(["--name", &m.name])
            .args(["--listen-metrics-urls", &m.metrics_url])
            .arg("--data-dir")
            .arg(&m.data)
            .args(["--listen-client-urls", &m.client_url])
            .args(["--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &self.initial])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "ipcbus-test"])
            // Short timers: a lost leader is replaced within about a second and the
            // shortest lease etcd grants is 1 s.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn etcd");
        self.members[i].child = Some(child);
    }

    /// The client URLs of every member, comma-separated (what `IPCBUS_ETCD` takes).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client_url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The process id of member `i`, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// SIGKILLs member `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its ports and data, and waits until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_healthy(i, START_WAIT);
    }

    /// The index of the member that is leader now, if one says so.
    pub fn leader(&self) -> Option<usize> {
        (0..self.members.len()).find(|&i| {
            self.members[i].child.is_some()
                && http_get(&self.members[i].metrics_url, "/metrics")
                    .is_some_and(|m| m.lines().any(|l| l.trim() == "etcd_server_is_leader 1"))
        })
    }

    /// Whether member `i` answers `/health` with `"health":"true"`.
    pub fn healthy(&self, i: usize) -> bool {
        http_get(&self.members[i].metrics_url, "/health")
            .is_some_and(|b| b.contains("\"health\":\"true\""))
    }

    fn wait_healthy(&mut self, i: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.healthy(i) {
                return;
            }
            if let Some(Ok(Some(st))) = self.members[i].child.as_mut().map(Child::try_wait) {
                panic!(
                    "etcd member {} exited ({st}) while starting:\n{}",
                    self.members[i].name,
                    self.log(i)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "etcd member {} not healthy within {within:?}:\n{}",
            self.members[i].name,
            self.log(i)
        );
    }

    /// Member `i`'s log (its last 4 KiB).
    pub fn log(&self, i: usize) -> String {
        let s = std::fs::read_to_string(&self.members[i].log).unwrap_or_default();
        let start = s.len().saturating_sub(4096);
        let start = (start..s.len())
            .find(|&k| s.is_char_boundary(k))
            .unwrap_or(s.len());
        s[start..].to_string()
    }

    /// The data directory of member `i`.
    pub fn data_dir(&self, i: usize) -> &Path {
        &self.members[i].data
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// One HTTP/1.0 GET on loopback, bounded to 2 s; the body, or `None`.
fn http_get(base: &str, path: &str) -> Option<String> {
    let hostport = base.strip_prefix("http://")?;
    let addr = hostport.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n").ok()?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).ok()?;
    if !status.contains(" 200 ") {
        return None;
    }
    let mut body = String::new();
    // Bounded: /metrics is a few hundred KiB at most.
    r.take(4 << 20).read_to_string(&mut body).ok()?;
    Some(body)
}
