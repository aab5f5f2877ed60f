//! The endpoint manager as a real process (`epm-service`'s entry point, built here as
//! `test-epm-service`), with in-process clients and `ipcbus-testpeer` processes.
//!
//! Every service listens on 127.0.0.1 port 0 and is found through its `listening
//! on ADDR` log line; every process is killed by pid when its guard drops. The LAN
//! test builds its own network namespaces and runs only when `IPCBUS_TEST_NETNS=1` is
//! set, as root, with `ip`.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ipcbus::epm::WatchEvent;
use ipcbus::registry::record_now;
use ipcbus::{
    BindError, Epm, EpmError, Handle, HandshakeError, Key, Receiver, ReceiverId, Record,
    RejectReason, Role, Sender, SenderId,
};
use ipcbus_proto::codec::{put_frame, CodecV1};
use ipcbus_proto::epm::{Entry, ErrorCode, Op, Request, EPM_HANDLE};
use ipcbus_proto::frame::{Flags, Hello, Kind, Mode, VERSION};
use ipcbus_tests::{Proc, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const EPM_BIN: &str = env!("CARGO_BIN_EXE_test-epm-service");
const PEER: &str = env!("CARGO_BIN_EXE_ipcbus-testpeer");
const T: Duration = Duration::from_secs(10);

/// A running `epm-service`: SIGKILLed and reaped when dropped. Its stderr (the log) is
/// read by a thread line by line.
struct Service {
    child: Child,
    log: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Service {
    fn spawn(cmd: Command) -> Service {
        let mut cmd = cmd;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "info")
            .env_remove("IPCBUS_EPM_PASSWORD")
            .env_remove("IPCBUS_EPM_SALT");
        let mut child = cmd.spawn().expect("spawn epm-service");
        let err = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Service {
            child,
            log: rx,
            seen: Vec::new(),
        }
    }

    /// Starts the service with `args` and waits for its first `listening on` line.
    fn start(args: &[&str]) -> (Service, SocketAddr) {
        let mut cmd = Command::new(EPM_BIN);
        cmd.args(args);
        let mut s = Service::spawn(cmd);
        let addr = s.listening();
        (s, addr)
    }

    fn listening(&mut self) -> SocketAddr {
        let line = self.wait_log("listening on ", T);
        let rest = line
            .split("listening on ")
            .nth(1)
            .expect("address after 'listening on'");
        rest.split_whitespace()
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
    }

    /// Waits up to `timeout` for a log line containing `needle` (also among the lines
    /// seen before); returns it.
    fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no log line containing {needle:?} within {timeout:?}; log so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of our own child, not yet reaped.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits up to `timeout` for the process to exit.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// All log lines so far (waits briefly for the reader thread to catch up).
    fn log_text(&mut self) -> String {
        while let Ok(l) = self.log.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(l);
        }
        self.seen.join("\n")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn h(s: &str) -> Handle {
    Handle::new(s).unwrap()
}

fn record(handle: &str, port: u16) -> Record {
    record_now(
        h(handle),
        vec![SocketAddr::from(([127, 0, 0, 1], port)).into()],
        ReceiverId::random(),
    )
}

/// Runs a blocking wait on the log from async code without stalling the runtime.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    tokio::task::block_in_place(f)
}

/// A second receiver of `handle` registers at the EPM; the watching sender `tx`
/// reaches it and `first` with one event, which both acknowledge. Returns the second.
async fn second_receiver_is_reached(
    epm: &Epm,
    handle: &str,
    tx: &mut Sender,
    first: &mut Receiver,
    payload: &str,
) -> Receiver {
    let mut second = Receiver::builder(h(handle))
        .epm(epm.clone())
        .bind()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(2, T).await, 2);
    let pending = tx.publish_bytes(payload.to_string()).await.unwrap();
    for r in [&mut *first, &mut second] {
        let m = tokio::time::timeout(T, r.recv()).await.unwrap().unwrap();
        assert_eq!(&m.payload()[..], payload.as_bytes());
    }
    let report = pending.await;
    assert_eq!(report.acked.len(), 2, "{report:?}");
    second
}

async fn next_event(c: &mut ipcbus::EpmClient) -> WatchEvent {
    tokio::time::timeout(T, c.next_event())
        .await
        .expect("watch event in time")
        .expect("watch event")
}

#[tokio::test(flavor = "multi_thread")]
async fn register_lookup_watch_and_close_removes_at_once() {
    let (_svc, addr) = Service::start(&["--bind", "127.0.0.1:0"]);
    let epm = Epm::connect(addr.to_string()).await.unwrap();
    let mut watcher = epm.client().await.unwrap();
    assert!(watcher.watch(&h("orders")).await.unwrap().is_empty());

    let mut reg = epm.client().await.unwrap();
    let rec = record("orders", 7001);
    let lease = reg.register(&rec, Duration::ZERO).await.unwrap();
    assert_eq!(lease, Duration::from_secs(10), "the default lease");

    assert_eq!(
        next_event(&mut watcher).await,
        WatchEvent::Added(rec.clone())
    );
    assert_eq!(epm.lookup(&h("orders")).await.unwrap(), vec![rec.clone()]);
    let (handles, total) = epm.list().await.unwrap();
    assert_eq!((handles.len(), total), (1, 1));
    assert_eq!(handles[0].receivers, 1);
    let st = epm.status().await.unwrap();
    assert_eq!(st.registrations, 1);
    assert_eq!(st.watches, 1);
    assert!(st.connections >= 2);

    // Closing the registering connection removes the registration at once.
    let t = Instant::now();
    reg.close().await;
    assert_eq!(
        next_event(&mut watcher).await,
        WatchEvent::Removed {
            handle: h("orders"),
            receiver: rec.receiver
        }
    );
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(epm.lookup(&h("orders")).await.unwrap().is_empty());

    // Unregister, and refusing to unregister what another connection owns.
    let mut a = epm.client().await.unwrap();
    let mut b = epm.client().await.unwrap();
    let rec2 = record("orders", 7002);
    a.register(&rec2, Duration::ZERO).await.unwrap();
    assert!(matches!(
        b.unregister(&rec2.handle, rec2.receiver).await,
        Err(EpmError::Refused {
            code: ErrorCode::NotFound,
            ..
        })
    ));
    a.unregister(&rec2.handle, rec2.receiver).await.unwrap();
    assert!(matches!(
        next_event(&mut watcher).await,
        WatchEvent::Added(_)
    ));
    assert!(matches!(
        next_event(&mut watcher).await,
        WatchEvent::Removed { .. }
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn unrenewed_registration_expires_after_its_lease() {
    let (mut svc, addr) = Service::start(&["--bind", "127.0.0.1:0", "--lease-ms", "400"]);
    let epm = Epm::builder(addr.to_string()).build();
    let mut watcher = epm.client().await.unwrap();
    watcher.watch(&h("lease")).await.unwrap();
    // This connection stays open but never renews: like a host that vanished.
    let mut silent = epm.client().await.unwrap();
    let rec = record("lease", 7003);
    let lease = silent.register(&rec, Duration::ZERO).await.unwrap();
    assert_eq!(lease, Duration::from_millis(400));
    let t = Instant::now();
    assert!(matches!(
        next_event(&mut watcher).await,
        WatchEvent::Added(_)
    ));
    assert!(matches!(
        next_event(&mut watcher).await,
        WatchEvent::Removed { .. }
    ));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    blocking(|| svc.wait_log("registration expired", T));
    drop(silent);
}

/// A server of calls and a receiver under the same handle are kept apart: a watch of
/// receivers sees only the receiver, a watch of servers only the server (events of
/// the other role would arrive in order between the ones checked), lookups and
/// lists answer per role, and a server's registration goes when its connection
/// closes.
#[tokio::test(flavor = "multi_thread")]
async fn servers_and_receivers_of_one_handle_are_watched_apart() {
    let (mut svc, addr) = Service::start(&["--bind", "127.0.0.1:0"]);
    let epm = Epm::connect(addr.to_string()).await.unwrap();
    let mut receivers = epm.client().await.unwrap();
    assert!(receivers.watch(&h("calc")).await.unwrap().is_empty());
    let mut servers = epm.client().await.unwrap();
    assert!(servers.watch_servers(&h("calc")).await.unwrap().is_empty());

    let mut rx_conn = epm.client().await.unwrap();
    let mut srv_conn = epm.client().await.unwrap();
    let rec = record("calc", 7101);
    let srv = record("calc", 7102).with_role(Role::Server);
    rx_conn.register(&rec, Duration::ZERO).await.unwrap();
    srv_conn.register(&srv, Duration::ZERO).await.unwrap();
    blocking(|| svc.wait_log("server registered", T));
    // A second of each: the next event of each watch is its own kind's.
    let rec2 = record("calc", 7103);
    let srv2 = record("calc", 7104).with_role(Role::Server);
    rx_conn.register(&rec2, Duration::ZERO).await.unwrap();
    srv_conn.register(&srv2, Duration::ZERO).await.unwrap();
    assert_eq!(
        next_event(&mut receivers).await,
        WatchEvent::Added(rec.clone())
    );
    assert_eq!(
        next_event(&mut receivers).await,
        WatchEvent::Added(rec2.clone())
    );
    assert_eq!(
        next_event(&mut servers).await,
        WatchEvent::ServerAdded(srv.clone())
    );
    assert_eq!(
        next_event(&mut servers).await,
        WatchEvent::ServerAdded(srv2.clone())
    );

    let sorted = |mut v: Vec<Record>| {
        v.sort_by_key(|r| r.receiver);
        v
    };
    assert_eq!(
        sorted(epm.lookup(&h("calc")).await.unwrap()),
        sorted(vec![rec.clone(), rec2.clone()])
    );
    let found = sorted(epm.lookup_servers(&h("calc")).await.unwrap());
    assert_eq!(found, sorted(vec![srv.clone(), srv2.clone()]));
    assert!(found.iter().all(|r| r.role == Role::Server));
    let (handles, total) = servers.list_servers().await.unwrap();
    assert_eq!((handles[0].receivers, total), (2, 1));
    assert_eq!(epm.status().await.unwrap().registrations, 2, "receivers");

    // The servers' connection closes: both servers go, the receivers stay.
    srv_conn.close().await;
    let mut gone = Vec::new();
    for _ in 0..2 {
        match next_event(&mut servers).await {
            WatchEvent::ServerRemoved { handle, server } => {
                assert_eq!(handle, h("calc"));
                gone.push(server);
            }
            other => panic!("{other:?}"),
        }
    }
    gone.sort();
    let mut want = vec![srv.receiver, srv2.receiver];
    want.sort();
    assert_eq!(gone, want);
    blocking(|| svc.wait_log("server unregistered: connection closed", T));
    assert!(epm.lookup_servers(&h("calc")).await.unwrap().is_empty());
    assert_eq!(epm.lookup(&h("calc")).await.unwrap().len(), 2);

    // Unregister reaches a receiver as before; the receiver watch saw no server
    // event in between.
    rx_conn.unregister(&rec.handle, rec.receiver).await.unwrap();
    assert_eq!(
        next_event(&mut receivers).await,
        WatchEvent::Removed {
            handle: h("calc"),
            receiver: rec.receiver
        }
    );
}

/// The EPM carries TCP endpoints only: a receiver given a Unix path and a TCP
/// address registers the TCP one, EPM senders reach it over TCP and a sender given
/// the path over the Unix socket; one with only a Unix path cannot register.
#[tokio::test(flavor = "multi_thread")]
async fn the_epm_carries_the_tcp_endpoint_of_a_receiver_also_on_a_unix_socket() {
    let (_svc, addr) = Service::start(&["--bind", "127.0.0.1:0"]);
    let epm = Epm::connect(addr.to_string()).await.unwrap();
    let dir = TempDir::new("epm-unix");
    let path = dir.path().join("rx.sock");
    let key = Key::derive("epm unix", b"salt").unwrap();
    let mut rx = Receiver::builder(h("both-ways"))
        .epm(epm.clone())
        .key(key.clone())
        .bind_at("tcp://127.0.0.1:0".parse().unwrap())
        .bind_at(ipcbus::Endpoint::unix(&path))
        .bind()
        .await
        .unwrap();
    let tcp = rx.endpoints()[0].clone();
    let regs = epm.lookup(&h("both-ways")).await.unwrap();
    assert_eq!(regs.len(), 1);
    assert_eq!(regs[0].endpoints, std::slice::from_ref(&tcp));

    let by_epm = ipcbus::Sender::builder(h("both-ways"))
        .epm(epm.clone())
        .key(key.clone());
    let by_path = ipcbus::Sender::builder(h("both-ways"))
        .key(key.clone())
        .endpoint(ipcbus::Endpoint::unix(&path));
    for (b, over) in [(by_epm, tcp), (by_path, ipcbus::Endpoint::unix(&path))] {
        let mut tx = b.build().await.unwrap();
        assert_eq!(tx.wait_for_receivers(1, T).await, 1);
        let pending = tx.publish_bytes("x").await.unwrap();
        let m = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
        assert_eq!(&m.payload()[..], b"x");
        let report = tokio::time::timeout(T, pending).await.unwrap();
        assert_eq!(report.acked.len(), 1, "{report:?}");
        assert_eq!(report.acked[0].endpoint, over);
        tx.close().await;
    }
    rx.close().await;
    assert!(!path.exists());

    let e = Receiver::builder(h("unix-only"))
        .epm(epm.clone())
        .key(key)
        .bind_at(ipcbus::Endpoint::unix(&path))
        .bind()
        .await
        .unwrap_err();
    assert!(
        matches!(e, BindError::Epm(EpmError::NoTcpEndpoint)),
        "{e:?}"
    );
    assert!(!path.exists(), "the failed receiver left its socket");
}

#[tokio::test(flavor = "multi_thread")]
async fn receiver_and_sender_deliver_through_the_epm() {
    let (_svc, addr) = Service::start(&["--bind", "127.0.0.1:0"]);
    let epm = Epm::connect(addr.to_string()).await.unwrap();
    let mut rx = Receiver::builder(h("deliver"))
        .epm(epm.clone())
        .bind()
        .await
        .unwrap();
    // The EPM is on loopback, so the receiver registers loopback.
    assert!(
        rx.local_addr().unwrap().ip().is_loopback(),
        "{}",
        rx.local_addr().unwrap()
    );
    let regs = epm.lookup(&h("deliver")).await.unwrap();
    assert_eq!(regs.len(), 1);
    assert_eq!(regs[0].tcp_addr(), rx.local_addr());
    assert_eq!(regs[0].receiver, rx.id());

    let mut tx = ipcbus::Sender::builder(h("deliver"))
        .epm(epm.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    // Acknowledged means the application took it: receive before awaiting the report.
    let pending = tx.publish_bytes("over the epm").await.unwrap();
    let m = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
    assert_eq!(&m.payload()[..], b"over the epm");
    let report = pending.await;
    assert_eq!(report.acked.len(), 1, "{report:?}");

    // A receiver that joins later is seen by the watching sender.
    let rx2 = second_receiver_is_reached(&epm, "deliver", &mut tx, &mut rx, "both").await;
    // Closing a receiver unregisters it.
    rx2.close().await;
    let deadline = Instant::now() + T;
    while epm.lookup(&h("deliver")).await.unwrap().len() != 1 {
        assert!(Instant::now() < deadline, "receiver not unregistered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tx.close().await;
    rx.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_of_a_receiver_process_removes_it() {
    let (_svc, addr) = Service::start(&["--bind", "127.0.0.1:0"]);
    let epm = Epm::connect(addr.to_string()).await.unwrap();
    let mut watcher = epm.client().await.unwrap();
    assert!(watcher.watch(&h("killme")).await.unwrap().is_empty());
    let dir = TempDir::new("epm-kill");
    let mut cmd = Command::new(PEER);
    cmd.args(["recv", "--handle", "killme", "--timeout", "60"])
        .env("IPCBUS_RUNTIME_DIR", dir.path())
        .env("IPCBUS_EPM", addr.to_string())
        .env_remove("IPCBUS_EPM_PASSWORD")
        .env_remove("IPCBUS_EPM_SALT");
    let mut peer = Proc::spawn(cmd);
    let ready = blocking(|| peer.expect_line("ready ", T));
    let WatchEvent::Added(rec) = next_event(&mut watcher).await else {
        panic!("expected Added")
    };
    assert!(
        ready.starts_with(&rec.tcp_addr().unwrap().to_string()),
        "{ready}"
    );
    let t = Instant::now();
    peer.kill();
    assert_eq!(
        next_event(&mut watcher).await,
        WatchEvent::Removed {
            handle: h("killme"),
            receiver: rec.receiver
        }
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn epm_restart_receivers_register_again_within_2s_and_senders_deliver_again() {
    let (svc, addr) = Service::start(&["--bind", "127.0.0.1:0"]);
    let epm = Epm::builder(addr.to_string()).build();
    let mut rx1 = Receiver::builder(h("restart"))
        .epm(epm.clone())
        .bind()
        .await
        .unwrap();
    let mut tx = ipcbus::Sender::builder(h("restart"))
        .epm(epm.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);

    // Kill the EPM hard and start a new one on the same port: it knows nothing.
    drop(svc);
    let bind = addr.to_string();
    let (_svc2, addr2) = Service::start(&["--bind", &bind]);
    assert_eq!(addr2, addr);
    let restarted = Instant::now();
    let deadline = restarted + T;
    loop {
        let regs = epm.lookup(&h("restart")).await.unwrap_or_default();
        if regs.iter().any(|r| r.receiver == rx1.id()) {
            break;
        }
        assert!(Instant::now() < deadline, "receiver never registered again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = restarted.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "registered again after {took:?}"
    );

    // The sender watches again: a receiver that joins after the restart is reached.
    let _rx2 =
        second_receiver_is_reached(&epm, "restart", &mut tx, &mut rx1, "after restart").await;
    tx.close().await;
}

fn password_file(dir: &TempDir, pw: &str) -> String {
    let p = dir.path().join("password");
    std::fs::write(&p, format!("{pw}\n")).unwrap();
    p.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_is_a_named_error_on_both_sides() {
    let dir = TempDir::new("epm-pw");
    let pwf = password_file(&dir, "right horse");
    let (mut svc, addr) = Service::start(&[
        "--bind",
        "127.0.0.1:0",
        "--password-file",
        &pwf,
        "--salt",
        "{0x01,0x02,0x03}",
    ]);
    let wrong = Key::derive("wrong horse", [1u8, 2, 3]).unwrap();
    let e = Epm::builder(addr.to_string())
        .key(wrong.clone())
        .connect()
        .await
        .unwrap_err();
    assert!(e.is_auth_failure(), "{e}");
    assert!(
        matches!(e, EpmError::Handshake(HandshakeError::AuthenticationFailed)),
        "{e:?}"
    );
    assert!(e.to_string().contains("authentication failed"), "{e}");
    let line = blocking(|| svc.wait_log("handshake failed", T));
    assert!(line.contains("authentication failed"), "{line}");
    assert!(line.contains("127.0.0.1:"), "peer address logged: {line}");

    // No key at all against a password: also refused, also named.
    let e = Epm::connect(addr.to_string()).await.unwrap_err();
    assert!(e.is_auth_failure(), "{e}");

    // A receiver with the wrong key fails to bind with the same named error.
    let e = Receiver::builder(h("pw"))
        .epm(Epm::builder(addr.to_string()).key(wrong).build())
        .bind()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, BindError::Epm(epm) if epm.is_auth_failure()),
        "{e}"
    );

    // The right key works, and data connections use it too.
    let right = Key::derive("right horse", [1u8, 2, 3]).unwrap();
    let epm = Epm::builder(addr.to_string())
        .key(right)
        .connect()
        .await
        .unwrap();
    let mut rx = Receiver::builder(h("pw"))
        .epm(epm.clone())
        .bind()
        .await
        .unwrap();
    let mut tx = ipcbus::Sender::builder(h("pw"))
        .epm(epm)
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    let pending = tx.publish_bytes("sealed").await.unwrap();
    let m = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
    assert_eq!(&m.payload()[..], b"sealed");
    assert_eq!(pending.await.acked.len(), 1);
    tx.close().await;
}

/// Completes an open-mode handshake by hand, so the test can then send raw frames.
async fn raw_handshake(addr: SocketAddr) -> (tokio::net::TcpStream, BytesMut) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut body = BytesMut::new();
    Hello {
        version: VERSION,
        mode: Mode::Open,
        handle: h(EPM_HANDLE),
        sender: SenderId::random(),
        nonce: [9; 32],
    }
    .encode(&mut body);
    let mut out = BytesMut::new();
    put_frame(&mut out, Kind::Hello, Flags(0), 0, &body);
    s.write_all(&out).await.unwrap();
    let mut codec = CodecV1::default();
    let mut buf = BytesMut::new();
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            kinds.push(f.kind);
            if f.kind == Kind::Welcome {
                let mut out = BytesMut::new();
                put_frame(&mut out, Kind::Proof, Flags(0), 0, &[]);
                s.write_all(&out).await.unwrap();
            }
        }
        if kinds.len() >= 2 {
            break;
        }
        let n = tokio::time::timeout(T, s.read_buf(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed during handshake");
    }
    assert_eq!(kinds, vec![Kind::Welcome, Kind::Ready]);
    (s, buf)
}

/// Reads until the service closes the connection; panics if it does not within T.
async fn expect_closed(s: &mut tokio::net::TcpStream) {
    let mut sink = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut sink)).await {
            Err(_) => panic!("service did not close the connection"),
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_and_oversized_frames_leave_the_service_serving() {
    let (mut svc, addr) = Service::start(&["--bind", "127.0.0.1:0", "--max-frame", "65536"]);
    let epm = Epm::connect(addr.to_string()).await.unwrap();
    // A registration that must survive everything below.
    let mut keeper = epm.client().await.unwrap();
    let rec = record("survivor", 7010);
    keeper.register(&rec, Duration::ZERO).await.unwrap();

    // Not the protocol at all.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    expect_closed(&mut s).await;
    // A huge length prefix before the handshake.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 0x01]).await.unwrap();
    expect_closed(&mut s).await;
    // After a good handshake: an oversized frame ...
    let (mut s, _) = raw_handshake(addr).await;
    let mut out = BytesMut::new();
    out.extend_from_slice(&(1u32 << 20).to_be_bytes());
    out.extend_from_slice(&[Kind::Data as u8, 0]);
    s.write_all(&out).await.unwrap();
    expect_closed(&mut s).await;
    blocking(|| svc.wait_log("exceeds the maximum", T));
    // ... a Data frame whose body is not a request ...
    let (mut s, _) = raw_handshake(addr).await;
    let mut out = BytesMut::new();
    put_frame(
        &mut out,
        Kind::Data,
        Flags(0),
        1,
        &[0xde, 0xad, 0xbe, 0xef, 0x99],
    );
    s.write_all(&out).await.unwrap();
    expect_closed(&mut s).await;
    let line = blocking(|| svc.wait_log("closing connection on bad input", T));
    assert!(line.contains("127.0.0.1:"), "peer address logged: {line}");
    // ... a replayed sequence number ...
    let (mut s, _) = raw_handshake(addr).await;
    let req = ipcbus_proto::epm::encode_body(&Request {
        id: 1,
        op: Op::Status,
    });
    let mut out = BytesMut::new();
    put_frame(&mut out, Kind::Data, Flags(0), 1, &req);
    put_frame(&mut out, Kind::Data, Flags(0), 1, &req);
    s.write_all(&out).await.unwrap();
    expect_closed(&mut s).await;
    // ... a registration of an unspecified address is refused, not fatal.
    let mut c = epm.client().await.unwrap();
    let bad = record_now(
        h("survivor"),
        vec!["0.0.0.0:1".parse().unwrap()],
        ReceiverId::random(),
    );
    assert!(matches!(
        c.register(&bad, Duration::ZERO).await,
        Err(EpmError::Refused {
            code: ErrorCode::Invalid,
            ..
        })
    ));
    // ... and a stalled handshake times out without holding anything.
    let _stalled = tokio::net::TcpStream::connect(addr).await.unwrap();

    // Everyone else is still served, and the registration is intact.
    assert_eq!(epm.lookup(&h("survivor")).await.unwrap(), vec![rec.clone()]);
    let st = c.status().await.unwrap();
    assert_eq!(st.registrations, 1);
    let _ = Entry::from_record(&rec);
    keeper.keep_alive().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_limit_refuses_with_busy() {
    let (_svc, addr) = Service::start(&["--bind", "127.0.0.1:0", "--max-connections", "2"]);
    let epm = Epm::builder(addr.to_string()).build();
    let a = epm.client().await.unwrap();
    let _b = epm.client().await.unwrap();
    let e = epm.client().await.unwrap_err();
    assert!(
        matches!(
            e,
            EpmError::Handshake(HandshakeError::Rejected {
                reason: RejectReason::Busy,
                ..
            })
        ),
        "{e:?}"
    );
    a.close().await;
    let deadline = Instant::now() + T;
    loop {
        match epm.client().await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "never admitted again: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn sigterm_shuts_down_gracefully() {
    let (mut svc, _addr) = Service::start(&["--bind", "127.0.0.1:0"]);
    svc.signal(libc::SIGTERM);
    let st = svc.wait_exit(T).expect("exits after SIGTERM");
    assert!(st.success(), "{st:?}");
    let log = svc.log_text();
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("stopped"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn classic_positional_form_and_its_malformed_salts() {
    // PORT PASSWORD SALT, with --bind keeping it on loopback (a bare IP takes PORT).
    let (mut svc, addr) =
        Service::start(&["0", "classic", "{0x01,0x02,0x03}", "--bind", "127.0.0.1"]);
    let line = blocking(|| svc.wait_log("command line", T));
    assert!(line.contains("WARN"), "{line}");
    let key = Key::derive("classic", [1u8, 2, 3]).unwrap();
    Epm::builder(addr.to_string())
        .key(key)
        .connect()
        .await
        .unwrap();
    drop(svc);

    for bad in ["{0x01,0x02", "{0x01,,0x03}", "{0x1ff}", "{}", "xyz"] {
        let mut cmd = Command::new(EPM_BIN);
        cmd.args(["0", "classic", bad, "--bind", "127.0.0.1"]);
        let mut svc = Service::spawn(cmd);
        let st = blocking(|| svc.wait_exit(T)).expect("exits on a malformed salt");
        assert!(!st.success(), "{bad}: {st:?}");
        let log = svc.log_text();
        assert!(log.contains("salt"), "{bad}: {log}");
        assert!(!log.contains("listening on"), "{bad}: {log}");
    }
}

// ---------------------------------------------------------------------------------
// LAN test with network namespaces.

/// Network namespaces made by the test; deleted (with their veths and bridge) on
/// drop.
struct Lab {
    namespaces: Vec<String>,
}

impl Lab {
    fn ip(args: &[&str]) -> Result<(), String> {
        let out = Command::new("ip")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("ip {args:?}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn add_ns(&mut self, name: &str) -> Result<(), String> {
        Lab::ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        Lab::ip(&["-n", name, "link", "set", "lo", "up"])
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Lab::ip(&["netns", "del", ns]);
        }
    }
}

fn skip(why: &str) {
    // Written to the real stderr, not the captured test output, so it shows.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED lan_across_network_namespaces: {why}"
    );
}

/// Why the LAN test must not run, if it must not: it changes the machine's network
/// (namespaces, veth pairs, a bridge), so it runs only when asked for with
/// `IPCBUS_TEST_NETNS=1` (`.ci/run` sets it), and only as root.
fn lan_test_refusal(netns_var: Option<&str>, euid: u32) -> Option<&'static str> {
    if netns_var != Some("1") {
        return Some(
            "it creates network namespaces, veth pairs and a bridge; \
             set IPCBUS_TEST_NETNS=1 (as root) to run it",
        );
    }
    if euid != 0 {
        return Some("IPCBUS_TEST_NETNS=1 is set but it needs root (network namespaces)");
    }
    None
}

#[test]
fn lan_test_runs_only_when_asked_for_and_as_root() {
    assert!(lan_test_refusal(None, 0).is_some_and(|why| why.contains("IPCBUS_TEST_NETNS=1")));
    assert!(lan_test_refusal(Some("0"), 0).is_some());
    assert!(lan_test_refusal(Some(""), 0).is_some());
    assert!(lan_test_refusal(Some("1"), 1000).is_some_and(|why| why.contains("root")));
    assert_eq!(lan_test_refusal(Some("1"), 0), None);
}

/// The EPM in one namespace, two receivers in two others and a sender in a fourth,
/// joined by a bridge in a fifth; a password is set. Runs only with
/// `IPCBUS_TEST_NETNS=1`, as root, with `ip`.
#[test]
fn lan_across_network_namespaces() {
    let var = std::env::var("IPCBUS_TEST_NETNS").ok();
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if let Some(why) = lan_test_refusal(var.as_deref(), euid) {
        return skip(why);
    }
    if Lab::ip(&["netns", "list"]).is_err() {
        return skip("the `ip` command (iproute2) is not available");
    }
    let tag = format!("ipcb{}", std::process::id());
    let mut lab = Lab {
        namespaces: Vec::new(),
    };
    let br = format!("{tag}-br");
    if let Err(e) = lab.add_ns(&br) {
        return skip(&format!("cannot create a network namespace: {e}"));
    }
    let setup = |lab: &mut Lab| -> Result<Vec<(String, String)>, String> {
        Lab::ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        Lab::ip(&["-n", &br, "link", "set", "br0", "up"])?;
        let mut hosts = Vec::new();
        for (i, role) in ["epm", "r1", "r2", "s"].iter().enumerate() {
            let ns = format!("{tag}-{role}");
            lab.add_ns(&ns)?;
            let port = format!("p{i}");
            let ip = format!("10.77.0.{}", i + 1);
            Lab::ip(&[
                "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            Lab::ip(&["-n", &br, "link", "set", &port, "master", "br0"])?;
            Lab::ip(&["-n", &br, "link", "set", &port, "up"])?;
            Lab::ip(&["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            Lab::ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            hosts.push((ns, ip));
        }
        Ok(hosts)
    };
    let hosts = match setup(&mut lab) {
        Ok(h) => h,
        Err(e) => panic!("network namespace setup failed: {e}"),
    };
    let dir = TempDir::new("epm-lan");
    let pwf = password_file(&dir, "lan secret");
    let salt = "{0x01,0x02,0x03}";
    let epm_addr = format!("{}:4455", hosts[0].1);

    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &hosts[0].0, EPM_BIN]).args([
        "--bind",
        &epm_addr,
        "--password-file",
        &pwf,
        "--salt",
        salt,
    ]);
    let mut svc = Service::spawn(cmd);
    assert_eq!(svc.listening().to_string(), epm_addr);

    let peer = |ns: &str, args: &[&str]| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, PEER])
            .args(args)
            .env("IPCBUS_RUNTIME_DIR", dir.path())
            .env("IPCBUS_EPM", &epm_addr)
            .env("IPCBUS_EPM_PASSWORD", "lan secret")
            .env("IPCBUS_EPM_SALT", salt);
        Proc::spawn(cmd)
    };
    let n = 20u64;
    let receivers: Vec<Proc> = [&hosts[1], &hosts[2]]
        .iter()
        .map(|(ns, _)| {
            peer(
                ns,
                &[
                    "recv",
                    "--handle",
                    "lan",
                    "--expect",
                    &n.to_string(),
                    "--timeout",
                    "30",
                ],
            )
        })
        .collect();
    for (p, (_, ip)) in receivers.iter().zip([&hosts[1], &hosts[2]]) {
        let ready = p.expect_line("ready ", T);
        // Registered the address of the interface that routes to the EPM.
        assert!(ready.starts_with(&format!("{ip}:")), "{ready}");
    }
    let sender = peer(
        &hosts[3].0,
        &[
            "send",
            "--handle",
            "lan",
            "--count",
            &n.to_string(),
            "--wait-for",
            "2",
        ],
    );
    let summary: serde_json::Value =
        serde_json::from_str(&sender.expect_line("summary ", Duration::from_secs(30))).unwrap();
    let per = summary.as_object().expect("per-receiver summary");
    assert_eq!(per.len(), 2, "{summary}");
    for (_, v) in per {
        assert_eq!(v["acked"], n, "{summary}");
        assert_eq!(v["failed"], 0, "{summary}");
    }
    for p in &receivers {
        let s: serde_json::Value =
            serde_json::from_str(&p.expect_line("summary ", Duration::from_secs(30))).unwrap();
        let senders = s.as_object().expect("per-sender summary");
        assert_eq!(senders.len(), 1, "{s}");
        for (_, v) in senders {
            assert_eq!(v["count"], n, "{s}");
            assert_eq!(v["dups"], 0, "{s}");
        }
    }
    let log = svc.log_text();
    assert!(log.contains("registered"), "{log}");
    drop(sender);
    drop(receivers);
    drop(svc);
    drop(lab);
}

/// A server of calls and a receiver of events under one handle, both through the EPM:
/// the client reaches only the server, the sender only the receiver.
#[tokio::test(flavor = "multi_thread")]
async fn calls_and_events_through_the_epm_reach_only_their_own_kind() {
    let (_svc, addr) = Service::start(&["--bind", "127.0.0.1:0"]);
    let epm = Epm::connect(addr.to_string()).await.unwrap();
    let mut rx = Receiver::builder(h("both"))
        .epm(epm.clone())
        .bind()
        .await
        .unwrap();
    let server = ipcbus::Server::builder(h("both"))
        .discovery(ipcbus::Discovery::Epm(epm.clone()))
        .bind()
        .await
        .unwrap();
    let server_id = server.id();
    tokio::spawn(server.serve(
        |req| async move {
            let mut body = b"echo ".to_vec();
            body.extend_from_slice(req.body());
            let _ = req.reply_bytes(body);
        },
        4,
    ));
    let servers = epm.lookup_servers(&h("both")).await.unwrap();
    assert_eq!(servers.len(), 1);
    assert_eq!(servers[0].receiver, server_id);
    assert_eq!(epm.lookup(&h("both")).await.unwrap().len(), 1, "receivers");

    let client = ipcbus::Client::builder(h("both"))
        .discovery(ipcbus::Discovery::Epm(epm.clone()))
        .build()
        .await
        .unwrap();
    assert_eq!(client.wait_for_servers(1, T).await, 1);
    let reply = client.call_bytes("hi").timeout(T).await.unwrap();
    assert_eq!(&reply.body()[..], b"echo hi");
    assert_eq!(client.servers()[0].id, server_id);

    let mut tx = Sender::builder(h("both"))
        .epm(epm.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    let receivers = tx.receivers();
    assert_eq!(receivers.len(), 1);
    assert_eq!(
        receivers[0].id,
        rx.id(),
        "the sender sees the receiver only"
    );
    let pending = tx.publish_bytes("event").await.unwrap();
    let m = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
    assert_eq!(&m.payload()[..], b"event");
    assert_eq!(pending.await.acked.len(), 1);
    tx.close().await;
    client.close().await;
    rx.close().await;
}
