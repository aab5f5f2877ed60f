//! Hostile input and resource exhaustion against a running receiver process
//! (`ipcbus-testpeer recv`, sealed with a password) and a running `epm-service`.
//!
//! `bus/tests/hostile.rs` covers single bad connections in-process; here the
//! attacked side is a real process whose file descriptors and peak RSS (`VmHWM` in
//! `/proc/PID/status`) are measured, under floods: thousands of connections that
//! never finish the handshake, slowloris senders, 4 GiB length prefixes, gzip bombs,
//! bit-flipped and replayed sealed frames, and registration floods from one
//! connection and from many. After every phase (and during the floods) a legitimate
//! client must still be served.
//!
//! Bounds (documented in docs/SECURITY.md):
//! * receiver: peak RSS under 160 MiB through every attack (a 16 MiB frame cap, so
//!   a few inflated frames in flight at most); open fds back within 16 of the
//!   baseline 5 s + 3 s after a flood (handshake timeout 5 s).
//! * epm-service: peak RSS under 128 MiB with 50,000 registrations from 200
//!   connections and 2,000 half-open connections; fds back to the baseline after.
//!
//! Every loop is bounded in count and time; only 127.0.0.1.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ipcbus::{Discovery, Epm, Handle, Key, ReceiverId, Security, Sender, SenderId};
use ipcbus_proto::codec::{put_frame, CodecV1};
use ipcbus_proto::compress::gzip;
use ipcbus_proto::crypto::Sealer;
use ipcbus_proto::epm::{decode_body, encode_body, Entry, Op, Request, Response, EPM_HANDLE};
use ipcbus_proto::frame::{Flags, Hello, Kind, Mode, VERSION};
use ipcbus_proto::handshake::{Client, ClientConfig, Status};
use ipcbus_tests::{Proc, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

const PEER: &str = env!("CARGO_BIN_EXE_ipcbus-testpeer");
const EPM_BIN: &str = env!("CARGO_BIN_EXE_test-epm-service");
const T: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;

/// Peak RSS bound of the attacked receiver.
const RECEIVER_HWM: u64 = 160 * MIB;
/// Peak RSS bound of the attacked epm-service.
const EPM_HWM: u64 = 128 * MIB;

/// Raises this process's soft fd limit (children inherit it) so that thousands of
/// connections fit on both ends.
fn raise_fd_limit(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        let target = want.min(lim.rlim_max);
        if lim.rlim_cur < target {
            lim.rlim_cur = target;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// A field of `/proc/PID/status` in bytes (`VmHWM`, `VmRSS`).
fn status_bytes(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Waits up to `timeout` for the process's fd count to fall to at most `max`.
async fn fds_fall_to(pid: u32, max: usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let n = fds(pid);
        if n <= max || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens up to `n` connections to `addr` and writes `first` on each (possibly
/// nothing); returns the ones that opened. Bounded by `n` and 20 s.
async fn open_many(addr: SocketAddr, n: usize, first: &[u8]) -> Vec<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if Instant::now() >= deadline {
            break;
        }
        match tokio::time::timeout(T, TcpStream::connect(addr)).await {
            Ok(Ok(mut s)) => {
                if !first.is_empty() {
                    let _ = s.write_all(first).await;
                }
                out.push(s);
            }
            _ => break,
        }
    }
    out
}

/// Like [`open_many`], on the Unix socket at `path`.
async fn open_many_unix(path: &std::path::Path, n: usize, first: &[u8]) -> Vec<UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if Instant::now() >= deadline {
            break;
        }
        match tokio::time::timeout(T, UnixStream::connect(path)).await {
            Ok(Ok(mut s)) => {
                if !first.is_empty() {
                    let _ = s.write_all(first).await;
                }
                out.push(s);
            }
            _ => break,
        }
    }
    out
}

/// True when the peer closed `s` (EOF or reset) within `timeout`.
async fn closed_within(s: &mut TcpStream, timeout: Duration) -> bool {
    let mut b = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

fn frame(kind: Kind, flags: u8, seq: u64, body: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    put_frame(&mut b, kind, Flags(flags), seq, body);
    b
}

fn hello_frame(handle: &str, mode: Mode) -> (BytesMut, Hello, BytesMut) {
    let hello = Hello {
        version: VERSION,
        mode,
        handle: Handle::new(handle).unwrap(),
        sender: SenderId::random(),
        nonce: rand_nonce(),
    };
    let mut body = BytesMut::new();
    hello.encode(&mut body);
    (frame(Kind::Hello, 0, 0, &body), hello, body)
}

fn rand_nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    let t = Instant::now().elapsed().as_nanos() as u64 ^ u64::from(std::process::id());
    for (i, b) in n.iter_mut().enumerate() {
        *b = (t >> (i % 8)) as u8 ^ i as u8;
    }
    n
}

/// The client side of a handshake, driving the protocol core's state machine; returns
/// the stream, when keyed the client-to-server sealer, and the bytes read past the
/// handshake.
async fn handshake(
    addr: SocketAddr,
    handle: &str,
    key: Option<&Key>,
) -> (TcpStream, Option<Sealer>, BytesMut) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mode = if key.is_some() {
        Mode::Sealed
    } else {
        Mode::Open
    };
    let handle = Handle::new(handle).unwrap();
    let config = ClientConfig::new(handle, SenderId::random(), mode, key.cloned(), rand_nonce());
    let mut out = BytesMut::new();
    let mut client = Client::new(config, &mut out);
    let mut buf = BytesMut::new();
    loop {
        s.write_all(&out).await.unwrap();
        out.clear();
        let n = tokio::time::timeout(T, s.read_buf(&mut buf))
            .await
            .expect("handshake in time")
            .unwrap();
        assert!(n > 0, "closed during the handshake");
        if let Status::Established(e) = client.feed(&mut buf, &mut out).expect("handshake") {
            s.write_all(&out).await.unwrap();
            return (s, e.tx, buf);
        }
    }
}

// ---------------------------------------------------------------------------------
// The receiver.

struct Rx {
    /// The registry directory (its sockets directory holds the Unix socket).
    dir: TempDir,
    proc: Proc,
    addr: SocketAddr,
    key: Key,
    disc: Discovery,
}

fn start_receiver() -> Rx {
    let dir = TempDir::new("hostile-rx");
    let mut cmd = Command::new(PEER);
    cmd.args([
        "recv",
        "--handle",
        "victim",
        "--password",
        "hostile pw",
        "--salt",
        "salt",
        "--timeout",
        "600",
    ])
    .env("IPCBUS_RUNTIME_DIR", dir.path())
    .env("RUST_LOG", "error");
    let proc = Proc::spawn(cmd);
    let ready = proc.expect_line("ready ", T);
    let addr: SocketAddr = ready.split_whitespace().next().unwrap().parse().unwrap();
    let disc = Discovery::local_at(dir.path()).unwrap();
    Rx {
        dir,
        proc,
        addr,
        key: Key::derive("hostile pw", b"salt").unwrap(),
        disc,
    }
}

impl Rx {
    /// A legitimate sender delivers one event and gets its acknowledgement.
    async fn serves(&self, what: &str) {
        self.serves_within(what, T).await
    }

    /// A legitimate sender connects and gets an event acknowledged within `limit`.
    async fn serves_within(&self, what: &str, limit: Duration) {
        let t = Instant::now();
        let mut tx = Sender::builder(Handle::new("victim").unwrap())
            .discovery(self.disc.clone())
            .security(Security::Encrypt(self.key.clone()))
            .build()
            .await
            .unwrap();
        assert_eq!(
            tx.wait_for_receivers(1, T).await,
            1,
            "{what}: legitimate sender cannot connect"
        );
        let r = tokio::time::timeout(T, tx.send_bytes(what.as_bytes().to_vec()))
            .await
            .unwrap_or_else(|_| panic!("{what}: no report"))
            .unwrap();
        assert_eq!(r.acked.len(), 1, "{what}: {r:?}");
        assert!(
            t.elapsed() < limit,
            "{what}: served only after {:?}",
            t.elapsed()
        );
        tx.close().await;
    }

    fn hwm(&self) -> u64 {
        status_bytes(self.proc.pid(), "VmHWM")
    }
}

/// The handshake flood of [`receiver_process_under_attack_stays_bounded_and_serving`]
/// on the receiver's Unix socket, which senders on its host use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_process_under_a_unix_socket_flood_stays_bounded_and_serving() {
    raise_fd_limit(8192);
    let rx = start_receiver();
    let pid = rx.proc.pid();
    rx.serves("baseline").await;
    let base_fds = fds(pid);
    let sockets: Vec<_> = std::fs::read_dir(rx.dir.path().join("sockets"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert_eq!(sockets.len(), 1, "{sockets:?}");
    let (hello, _, _) = hello_frame("victim", Mode::Sealed);
    let mut flood = open_many_unix(&sockets[0], 1000, &[]).await;
    flood.extend(open_many_unix(&sockets[0], 1000, &hello[..hello.len() / 2]).await);
    eprintln!("unix flood: {} connections open", flood.len());
    // A full accept queue refuses a Unix connect at once (EAGAIN), where TCP waits.
    assert!(
        flood.len() >= 500,
        "only {} connections opened",
        flood.len()
    );
    rx.serves_within("during the unix handshake flood", Duration::from_secs(3))
        .await;
    let left = fds_fall_to(pid, base_fds + 16, Duration::from_secs(8)).await;
    assert!(
        left <= base_fds + 16,
        "fds stay at {left} (baseline {base_fds})"
    );
    rx.serves("after the unix handshake flood").await;
    drop(flood);
    assert!(rx.hwm() < RECEIVER_HWM, "VmHWM {} KiB", rx.hwm() / 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_process_under_attack_stays_bounded_and_serving() {
    raise_fd_limit(8192);
    let rx = start_receiver();
    let pid = rx.proc.pid();
    rx.serves("baseline").await;
    let base_fds = fds(pid);
    eprintln!(
        "receiver baseline: {} fds, VmHWM {} KiB",
        base_fds,
        rx.hwm() / 1024
    );

    // 1. Thousands of connections that never finish the handshake: half send
    //    nothing, half half a Hello. The receiver takes 256 at a time and closes the
    //    rest; its handshake timeout (5 s) frees the ones it took.
    let (hello, _, _) = hello_frame("victim", Mode::Sealed);
    let mut flood = open_many(rx.addr, 1000, &[]).await;
    flood.extend(open_many(rx.addr, 1000, &hello[..hello.len() / 2]).await);
    eprintln!("flood: {} connections open", flood.len());
    assert!(
        flood.len() >= 1500,
        "only {} connections opened",
        flood.len()
    );
    // The half-open flood evicts itself (oldest first), so a sender is served while
    // the attacker's connections are still open.
    // Within 3 s: well before the 5 s handshake timeout would free the slots anyway.
    rx.serves_within("during the handshake flood", Duration::from_secs(3))
        .await;
    let t = Instant::now();
    let left = fds_fall_to(pid, base_fds + 16, Duration::from_secs(8)).await;
    eprintln!("flood: receiver fds back to {left} after {:?}", t.elapsed());
    assert!(
        left <= base_fds + 16,
        "fds stay at {left} (baseline {base_fds})"
    );
    rx.serves("after the handshake flood").await;
    drop(flood);

    // 2. Slowloris before the handshake: a Hello one byte every 300 ms is cut off by
    //    the handshake timeout. Meanwhile a legitimate sender is served.
    let mut slow = TcpStream::connect(rx.addr).await.unwrap();
    let slow_task = tokio::spawn(async move {
        let t = Instant::now();
        for b in hello.iter() {
            if slow.write_all(&[*b]).await.is_err() {
                return Some(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            if t.elapsed() > Duration::from_secs(15) {
                return None;
            }
        }
        None
    });
    rx.serves("during a slowloris handshake").await;
    let cut = slow_task.await.unwrap();
    assert!(
        cut.is_some_and(|d| d < Duration::from_secs(9)),
        "slowloris not cut off: {cut:?}"
    );

    // 3. Slowloris after the handshake: a frame header, then its body a byte at a
    //    time; others are served meanwhile.
    let (mut s, sealer, _) = handshake(rx.addr, "victim", Some(&rx.key)).await;
    let sealer = sealer.unwrap();
    let mut f = BytesMut::new();
    sealer.put_sealed(&mut f, Kind::Data, Flags(0), 1, &[0u8; 64]);
    s.write_all(&f[..20]).await.unwrap();
    for b in &f[20..30] {
        s.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rx.serves("during a slow frame").await;
    drop(s);

    // 4. A 4 GiB length prefix, before and after the handshake: closed at once,
    //    nothing allocated.
    let mut s = TcpStream::connect(rx.addr).await.unwrap();
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 0x01, 0x00])
        .await
        .unwrap();
    assert!(
        closed_within(&mut s, T).await,
        "4 GiB prefix before handshake"
    );
    let (mut s, _, _) = handshake(rx.addr, "victim", Some(&rx.key)).await;
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 0x10, 0x02])
        .await
        .unwrap();
    assert!(
        closed_within(&mut s, T).await,
        "4 GiB prefix after handshake"
    );

    // 5. gzip bombs from a peer that has the key: 64 MiB of zeros in a ~64 KiB body,
    //    past the 16 MiB cap: the connection is closed.
    let bomb = gzip(&vec![0u8; 64 << 20], 9).unwrap();
    for _ in 0..3 {
        let (mut s, sealer, _) = handshake(rx.addr, "victim", Some(&rx.key)).await;
        let mut f = BytesMut::new();
        sealer
            .unwrap()
            .put_sealed(&mut f, Kind::Data, Flags(Flags::COMPRESSED), 1, &bomb);
        let _ = s.write_all(&f).await;
        assert!(closed_within(&mut s, T).await, "gzip bomb");
    }
    // Bodies that inflate to just under the cap are legal events; a few of them in
    // one burst are what a hostile keyed peer can make the receiver hold at once.
    let near = gzip(&vec![0u8; (16 << 20) - 64], 9).unwrap();
    let (mut s, sealer, _) = handshake(rx.addr, "victim", Some(&rx.key)).await;
    let sealer = sealer.unwrap();
    let mut burst = BytesMut::new();
    for seq in 1..=4 {
        sealer.put_sealed(&mut burst, Kind::Data, Flags(Flags::COMPRESSED), seq, &near);
    }
    s.write_all(&burst).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(s);
    rx.serves("after the gzip bombs").await;
    eprintln!("after bombs: VmHWM {} KiB", rx.hwm() / 1024);

    // 6. A bit flipped in the ciphertext, and a replayed sealed frame: closed.
    let (mut s, sealer, _) = handshake(rx.addr, "victim", Some(&rx.key)).await;
    let mut f = BytesMut::new();
    sealer
        .unwrap()
        .put_sealed(&mut f, Kind::Data, Flags(0), 1, b"flip me");
    let last = f.len() - 20;
    f[last] ^= 0x04;
    s.write_all(&f).await.unwrap();
    assert!(closed_within(&mut s, T).await, "bit-flipped ciphertext");
    let (mut s, sealer, _) = handshake(rx.addr, "victim", Some(&rx.key)).await;
    let mut f = BytesMut::new();
    sealer
        .unwrap()
        .put_sealed(&mut f, Kind::Data, Flags(0), 1, b"once only");
    s.write_all(&f).await.unwrap();
    s.write_all(&f).await.unwrap();
    assert!(closed_within(&mut s, T).await, "replayed sealed frame");

    rx.serves("after every attack").await;
    let hwm = rx.hwm();
    eprintln!("receiver peak RSS (VmHWM): {} KiB", hwm / 1024);
    assert!(
        hwm < RECEIVER_HWM,
        "receiver peak RSS {} MiB over the {} MiB bound",
        hwm / MIB,
        RECEIVER_HWM / MIB
    );
}

// ---------------------------------------------------------------------------------
// The endpoint manager.

struct Svc {
    child: Child,
}

impl Drop for Svc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_epm(args: &[&str]) -> (Svc, SocketAddr) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(EPM_BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "info")
        .env_remove("IPCBUS_EPM_PASSWORD")
        .env_remove("IPCBUS_EPM_SALT")
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if !sent {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
                    sent = true;
                }
            }
            // Keep draining so the service never blocks on a full pipe.
        }
    });
    let addr = rx.recv_timeout(T).expect("listening on").parse().unwrap();
    (Svc { child }, addr)
}

/// A legitimate client's lookup answers within T.
async fn epm_serves(addr: SocketAddr, what: &str) {
    let r = tokio::time::timeout(T, async {
        let epm = Epm::connect(addr.to_string()).await?;
        epm.lookup(&Handle::new("legit").unwrap()).await
    })
    .await;
    assert!(matches!(r, Ok(Ok(_))), "{what}: {r:?}");
}

fn register(id: u32, handle: &str, rid: [u8; 16], port: u16) -> Request {
    Request {
        id,
        op: Op::Register {
            handle: Handle::new(handle).unwrap(),
            entry: Entry {
                endpoint: SocketAddr::from(([127, 0, 0, 1], port)),
                receiver: ReceiverId(rid),
                pid: None,
                version: 1,
                since_ms: 1,
            },
            lease_ms: 0,
        },
    }
}

/// Sends `reqs` on an open-mode EPM connection as one burst, reads one reply per
/// request (ignoring watch events); returns how many were refused with an error.
async fn burst(s: &mut TcpStream, buf: &mut BytesMut, seq: &mut u64, reqs: &[Request]) -> usize {
    let mut out = BytesMut::new();
    for r in reqs {
        *seq += 1;
        put_frame(&mut out, Kind::Data, Flags(0), *seq, &encode_body(r));
    }
    s.write_all(&out).await.unwrap();
    let mut refused = 0;
    let mut replies = 0;
    let mut codec = CodecV1::default();
    while replies < reqs.len() {
        let f = loop {
            if let Some(f) = codec.decode(buf).unwrap() {
                break f;
            }
            let n = tokio::time::timeout(T, s.read_buf(buf))
                .await
                .expect("reply in time")
                .unwrap();
            assert!(n > 0, "epm closed the connection");
        };
        if let Ok(Response::Reply { answer, .. }) = decode_body::<Response>(&f.body) {
            replies += 1;
            if matches!(answer, ipcbus_proto::epm::Answer::Error { .. }) {
                refused += 1;
            }
        }
    }
    refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epm_service_under_attack_stays_bounded_and_serving() {
    raise_fd_limit(8192);
    let (svc, addr) = start_epm(&["--bind", "127.0.0.1:0", "--handshake-timeout-ms", "2000"]);
    let pid = svc.child.id();
    epm_serves(addr, "baseline").await;
    let base_fds = fds(pid);

    // 1. 2,000 connections that never finish the handshake (half silent, half half
    //    a Hello): over 1,024 the EPM answers Busy and closes; the rest go at the
    //    handshake timeout (2 s here).
    let (hello, _, _) = hello_frame(EPM_HANDLE, Mode::Open);
    let mut flood = open_many(addr, 1000, &[]).await;
    flood.extend(open_many(addr, 1000, &hello[..hello.len() / 2]).await);
    assert!(
        flood.len() >= 1500,
        "only {} connections opened",
        flood.len()
    );
    // The half-open flood evicts itself (oldest first), so a client is served while
    // the attacker's connections are still open.
    epm_serves(addr, "during the handshake flood").await;
    let left = fds_fall_to(pid, base_fds + 16, Duration::from_secs(6)).await;
    assert!(
        left <= base_fds + 16,
        "fds stay at {left} (baseline {base_fds})"
    );
    epm_serves(addr, "after the handshake flood").await;
    drop(flood);

    // 2. Slowloris handshake: cut off by the handshake timeout.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    let t = Instant::now();
    let mut cut = None;
    for b in hello.iter() {
        if slow.write_all(&[*b]).await.is_err() {
            cut = Some(t.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if t.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    if cut.is_none() && closed_within(&mut slow, Duration::from_secs(3)).await {
        cut = Some(t.elapsed());
    }
    assert!(cut.is_some_and(|d| d < Duration::from_secs(6)), "{cut:?}");

    // 3. A 4 GiB prefix before and after the handshake.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
    assert!(
        closed_within(&mut s, T).await,
        "4 GiB prefix before handshake"
    );
    let (mut s, _, _) = handshake(addr, EPM_HANDLE, None).await;
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 0x10, 0x00])
        .await
        .unwrap();
    assert!(
        closed_within(&mut s, T).await,
        "4 GiB prefix after handshake"
    );

    // 4. A gzip bomb in a request: past the 1 MiB cap, closed.
    let (mut s, _, _) = handshake(addr, EPM_HANDLE, None).await;
    let bomb = gzip(&vec![0u8; 32 << 20], 9).unwrap();
    let _ = s
        .write_all(&frame(Kind::Data, Flags::COMPRESSED, 1, &bomb))
        .await;
    assert!(closed_within(&mut s, T).await, "gzip bomb");

    // 5. A registration flood from one connection: 5,000 registrations of distinct
    //    handles; past the per-connection limit (256) each is refused, and the
    //    connection and everyone else are still served.
    let (mut one, _, mut buf) = handshake(addr, EPM_HANDLE, None).await;
    let mut seq = 0;
    let mut refused = 0;
    for chunk in 0..10u32 {
        let reqs: Vec<Request> = (0..500u32)
            .map(|i| {
                let n = chunk * 500 + i;
                let mut rid = [0u8; 16];
                rid[..4].copy_from_slice(&n.to_be_bytes());
                register(n, &format!("flood-{n}"), rid, 1000 + (n % 60000) as u16)
            })
            .collect();
        refused += burst(&mut one, &mut buf, &mut seq, &reqs).await;
    }
    assert_eq!(refused, 5000 - 256, "per-connection registration limit");
    epm_serves(addr, "during a one-connection registration flood").await;

    // 6. From many: 200 connections x 250 registrations = 50,000.
    let mut many = Vec::new();
    for c in 0..200u32 {
        let (mut s, _, mut buf) = handshake(addr, EPM_HANDLE, None).await;
        let mut seq = 0;
        let reqs: Vec<Request> = (0..250u32)
            .map(|i| {
                let mut rid = [0u8; 16];
                rid[..4].copy_from_slice(&c.to_be_bytes());
                rid[4..8].copy_from_slice(&i.to_be_bytes());
                register(
                    i,
                    &format!("many-{}", (c * 250 + i) % 5000),
                    rid,
                    2000 + i as u16,
                )
            })
            .collect();
        let refused = burst(&mut s, &mut buf, &mut seq, &reqs).await;
        assert_eq!(refused, 0, "connection {c}");
        many.push(s);
    }
    epm_serves(addr, "with 50,000 registrations").await;
    let st = tokio::time::timeout(T, async {
        Epm::connect(addr.to_string()).await?.status().await
    })
    .await
    .unwrap()
    .unwrap();
    assert!(st.registrations >= 50_000, "{st:?}");
    drop(many);
    drop(one);
    // Everything goes with its connections.
    let deadline = Instant::now() + T;
    loop {
        let st = Epm::connect(addr.to_string())
            .await
            .unwrap()
            .status()
            .await
            .unwrap();
        if st.registrations == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "registrations left: {st:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    epm_serves(addr, "after every attack").await;
    let left = fds_fall_to(pid, base_fds + 16, Duration::from_secs(5)).await;
    assert!(
        left <= base_fds + 16,
        "fds stay at {left} (baseline {base_fds})"
    );
    let hwm = status_bytes(pid, "VmHWM");
    eprintln!("epm-service peak RSS (VmHWM): {} KiB", hwm / 1024);
    assert!(
        hwm < EPM_HWM,
        "epm-service peak RSS {} MiB over the {} MiB bound",
        hwm / MIB,
        EPM_HWM / MIB
    );
}
