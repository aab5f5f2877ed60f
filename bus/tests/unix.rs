//! Unix domain sockets end to end, in process over real sockets: what a receiver
//! listens on and registers, which transport a sender picks, the socket files' modes
//! and lifetime, stale sockets and records, long paths, endpoints given by hand, and
//! the peer-uid check.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use ipcbus::registry::record_now;
use ipcbus::{
    BindError, Discovery, Endpoint, FailReason, Handle, Key, LocalRegistry, Receiver, ReceiverId,
    RejectKind, Security, Sender, Transport, UnixBindError, MAX_UNIX_PATH,
};

const T: Duration = Duration::from_secs(10);

/// A temporary directory, removed on drop.
struct Tmp(PathBuf);

impl Tmp {
    fn new(tag: &str) -> Tmp {
        let p = std::env::temp_dir().join(format!(
            "ipcbus-unix-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn registry(&self) -> Discovery {
        Discovery::local_at(&self.0).unwrap()
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn handle(s: &str) -> Handle {
    Handle::new(s).unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// The files in `dir` (empty when it does not exist).
fn files(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(d) => d.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Leaves a socket file at `path` that nothing listens on.
fn stale_socket(path: &Path) {
    drop(std::os::unix::net::UnixListener::bind(path).unwrap());
    assert!(path.exists());
}

/// Sends one event and checks `rx` takes it; returns the report's acked endpoints.
async fn round_trip(tx: &mut Sender, rx: &mut Receiver, payload: &'static str) -> Vec<Endpoint> {
    let p = tx.publish_bytes(payload).await.unwrap();
    let m = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
    assert_eq!(&m.payload()[..], payload.as_bytes());
    let r = tokio::time::timeout(T, p).await.unwrap();
    assert!(r.failed.is_empty(), "{r:?}");
    r.acked.into_iter().map(|a| a.endpoint).collect()
}

#[tokio::test]
async fn default_receiver_listens_on_tcp_then_unix_and_a_local_sender_uses_unix() {
    let dir = Tmp::new("default");
    let disc = dir.registry();
    let reg = LocalRegistry::open(dir.path()).unwrap();
    let mut rx = Receiver::builder(handle("d"))
        .discovery(disc.clone())
        .bind()
        .await
        .unwrap();
    let eps = rx.endpoints().to_vec();
    assert_eq!(eps.len(), 2, "{eps:?}");
    assert_eq!(eps[0].transport(), Transport::Tcp);
    assert_eq!(eps[0].tcp_addr(), rx.local_addr());
    let sock = reg.socket_path(&rx.id());
    assert_eq!(eps[1], Endpoint::unix(&sock));
    assert_eq!(mode(&sock), 0o600, "socket file mode");
    assert_eq!(mode(&reg.sockets_dir()), 0o700, "sockets dir mode");
    // Both endpoints are registered.
    let recs = reg.scan(Some(&handle("d"))).unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].endpoints, eps);

    let mut tx = Sender::builder(handle("d"))
        .discovery(disc)
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    assert_eq!(
        round_trip(&mut tx, &mut rx, "hello").await,
        [Endpoint::unix(&sock)]
    );
    assert_eq!(tx.receivers()[0].endpoint, Endpoint::unix(&sock));

    rx.close().await;
    assert!(!sock.exists(), "socket file left after close");
    assert!(files(&reg.sockets_dir()).is_empty());
}

#[tokio::test]
async fn the_socket_file_goes_when_the_receiver_is_dropped() {
    let dir = Tmp::new("drop");
    let reg = LocalRegistry::open(dir.path()).unwrap();
    let rx = Receiver::builder(handle("d"))
        .discovery(dir.registry())
        .bind()
        .await
        .unwrap();
    let sock = reg.socket_path(&rx.id());
    assert!(sock.exists());
    drop(rx);
    assert!(!sock.exists(), "socket file left after drop");
    assert!(files(&reg.sockets_dir()).is_empty());
    assert!(files(&reg.receivers_dir()).is_empty());
}

#[tokio::test]
async fn tcp_only_and_unix_only() {
    let dir = Tmp::new("only");
    let disc = dir.registry();
    let reg = LocalRegistry::open(dir.path()).unwrap();

    let mut tcp = Receiver::builder(handle("t"))
        .discovery(disc.clone())
        .transports([Transport::Tcp])
        .bind()
        .await
        .unwrap();
    assert_eq!(tcp.endpoints().len(), 1);
    assert_eq!(tcp.endpoints()[0].transport(), Transport::Tcp);
    assert!(
        files(&reg.sockets_dir()).is_empty(),
        "tcp only made a socket"
    );
    let mut tx = Sender::builder(handle("t"))
        .discovery(disc.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    let acked = round_trip(&mut tx, &mut tcp, "over tcp").await;
    assert_eq!(acked, tcp.endpoints());

    let mut unix = Receiver::builder(handle("u"))
        .discovery(disc.clone())
        .transports([Transport::Unix])
        .bind()
        .await
        .unwrap();
    assert_eq!(
        unix.endpoints(),
        [Endpoint::unix(reg.socket_path(&unix.id()))]
    );
    assert_eq!(unix.local_addr(), None);
    let mut tx = Sender::builder(handle("u"))
        .discovery(disc)
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    let acked = round_trip(&mut tx, &mut unix, "over unix").await;
    assert_eq!(acked, unix.endpoints());
}

#[tokio::test]
async fn a_stale_socket_file_is_replaced_and_a_live_one_is_in_use() {
    let dir = Tmp::new("stale-file");
    let path = dir.path().join("x.sock");
    stale_socket(&path);
    let key = Key::derive("p", b"s".as_slice()).unwrap();
    let mut rx = Receiver::builder(handle("s"))
        .discovery(dir.registry())
        .key(key.clone())
        .bind_at(Endpoint::unix(&path))
        .bind()
        .await
        .unwrap();
    assert_eq!(rx.endpoints(), [Endpoint::unix(&path)]);
    assert_eq!(mode(&path), 0o600);
    let err = Receiver::builder(handle("s"))
        .discovery(dir.registry())
        .key(key.clone())
        .bind_at(Endpoint::unix(&path))
        .bind()
        .await
        .unwrap_err();
    assert!(
        matches!(err, BindError::Unix(UnixBindError::InUse(ref p)) if p == &path),
        "{err:?}"
    );
    // The live receiver was not disturbed by the attempt.
    let mut tx = Sender::builder(handle("s"))
        .key(key)
        .endpoint(Endpoint::unix(&path))
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    round_trip(&mut tx, &mut rx, "x").await;
}

#[tokio::test]
async fn a_record_naming_a_dead_socket_is_refused_and_removed_with_its_socket() {
    let dir = Tmp::new("stale-rec");
    let reg = LocalRegistry::open(dir.path()).unwrap();
    let id = ReceiverId::random();
    let sock = reg.socket_path(&id);
    stale_socket(&sock);
    // This process is alive, so only connecting shows the record is stale.
    let rec = record_now(handle("r"), vec![Endpoint::unix(&sock)], id);
    let _registration = reg.register(&rec).unwrap();
    let mut tx = Sender::builder(handle("r"))
        .discovery(dir.registry())
        .build()
        .await
        .unwrap();
    let r = tokio::time::timeout(T, tx.send_bytes("x"))
        .await
        .unwrap()
        .unwrap();
    assert!(r.acked.is_empty(), "{r:?}");
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert_eq!(r.failed[0].0.endpoint, Endpoint::unix(&sock));
    assert_eq!(r.failed[0].1, FailReason::Refused);
    let deadline = Instant::now() + T;
    while sock.exists() || !files(&reg.receivers_dir()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "stale record or socket left: {:?} {:?}",
            files(&reg.receivers_dir()),
            files(&reg.sockets_dir())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_record_of_a_dead_process_is_removed_with_its_socket_by_the_scan() {
    let dir = Tmp::new("dead-pid");
    let reg = LocalRegistry::open(dir.path()).unwrap();
    let id = ReceiverId::random();
    let sock = reg.socket_path(&id);
    stale_socket(&sock);
    let mut rec = record_now(
        handle("p"),
        vec!["127.0.0.1:1".parse().unwrap(), Endpoint::unix(&sock)],
        id,
    );
    rec.pid = Some(0x3fff_fff0); // above pid_max: no such process
    let registration = reg.register(&rec).unwrap();
    std::mem::forget(registration); // as if its process died
    let mut tx = Sender::builder(handle("p"))
        .discovery(dir.registry())
        .build()
        .await
        .unwrap();
    let r = tx.send_bytes("x").await.unwrap();
    assert_eq!(
        r.targeted(),
        0,
        "a dead process's record was targeted: {r:?}"
    );
    assert!(!sock.exists(), "the dead receiver's socket stays");
    assert!(files(&reg.receivers_dir()).is_empty());
}

#[tokio::test]
async fn a_registry_path_too_long_for_a_socket_falls_back_to_tcp_unless_unix_is_asked_for() {
    let dir = Tmp::new("long");
    // $DIR/sockets/<32 hex>.sock must exceed the limit.
    let deep = dir.path().join("d".repeat(MAX_UNIX_PATH));
    let disc = Discovery::local_at(&deep).unwrap();
    let mut rx = Receiver::builder(handle("l"))
        .discovery(disc.clone())
        .bind()
        .await
        .unwrap();
    assert_eq!(rx.endpoints().len(), 1, "{:?}", rx.endpoints());
    assert_eq!(rx.endpoints()[0].transport(), Transport::Tcp);
    let mut tx = Sender::builder(handle("l"))
        .discovery(disc.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    round_trip(&mut tx, &mut rx, "fallback").await;

    for transports in [vec![Transport::Unix], vec![Transport::Tcp, Transport::Unix]] {
        let err = Receiver::builder(handle("l"))
            .discovery(disc.clone())
            .transports(transports.clone())
            .bind()
            .await
            .unwrap_err();
        match err {
            BindError::Unix(UnixBindError::PathTooLong { len, .. }) => {
                assert!(len > MAX_UNIX_PATH)
            }
            other => panic!("{transports:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn epm_mode_listens_on_tcp_and_unix_needs_a_path() {
    let epm = ipcbus::Epm::builder("127.0.0.1:1").build();
    let err = Receiver::builder(handle("e"))
        .discovery(Discovery::Epm(epm))
        .security(Security::Open)
        .transports([Transport::Unix])
        .bind()
        .await
        .unwrap_err();
    assert!(matches!(err, BindError::UnixNeedsPath), "{err:?}");
    assert!(err.to_string().contains("bind_at"), "{err}");
}

#[tokio::test]
async fn endpoints_given_by_hand_need_no_registry_on_the_sender_side() {
    let rdir = Tmp::new("at-rx");
    let sdir = Tmp::new("at-tx");
    let path = rdir.path().join("at.sock");
    let mut rx = Receiver::builder(handle("a"))
        .discovery(rdir.registry())
        .bind_at(Endpoint::Tcp("127.0.0.1:0".parse().unwrap()))
        .bind_at(Endpoint::unix(&path))
        .bind()
        .await
        .unwrap();
    let eps = rx.endpoints().to_vec();
    assert_eq!(eps.len(), 2, "{eps:?}");
    let tcp = eps[0].clone();
    assert_ne!(tcp.tcp_addr().unwrap().port(), 0);
    assert_eq!(eps[1], Endpoint::unix(&path));

    // The sender's registry is empty; it only shares the per-user secret.
    let sender_disc = sdir.registry();
    std::fs::copy(rdir.path().join("secret"), sdir.path().join("secret")).unwrap();
    for ep in [Endpoint::unix(&path), tcp] {
        let mut tx = Sender::builder(handle("a"))
            .discovery(sender_disc.clone())
            .endpoint(ep.clone())
            .build()
            .await
            .unwrap();
        assert_eq!(tx.wait_for_receivers(1, T).await, 1, "{ep}");
        assert_eq!(round_trip(&mut tx, &mut rx, "by hand").await, [ep]);
        tx.close().await;
    }
    assert!(files(&sdir.path().join("receivers")).is_empty());
}

#[tokio::test]
async fn a_sender_given_an_endpoint_reconnects_after_the_receiver_restarts_there() {
    let dir = Tmp::new("restart");
    let path = dir.path().join("r.sock");
    let at = Endpoint::unix(&path);
    let bind = || {
        Receiver::builder(handle("r"))
            .discovery(dir.registry())
            .bind_at(at.clone())
            .bind()
    };
    let mut rx = bind().await.unwrap();
    let mut tx = Sender::builder(handle("r"))
        .discovery(dir.registry())
        .endpoint(at.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    round_trip(&mut tx, &mut rx, "first").await;
    let mut events = tx.events();
    rx.close().await;
    assert!(!path.exists());

    let mut rx = bind().await.unwrap();
    // The sender connects again once its backoff (at most 5 s) lets it.
    let joined = async {
        while let Some(ev) = events.next().await {
            if let ipcbus::SenderEvent::ReceiverJoined(who) = ev {
                return who;
            }
        }
        panic!("the sender's events ended");
    };
    let who = tokio::time::timeout(Duration::from_secs(20), joined)
        .await
        .expect("no reconnect within 20 s");
    assert_eq!(who.endpoint, at);
    assert_eq!(round_trip(&mut tx, &mut rx, "again").await, [at]);
    assert!(tx.stats().reconnects >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_receivers_get_10000_events_exactly_once_in_order_over_unix() {
    let dir = Tmp::new("fan");
    let disc = dir.registry();
    let mut rxs = Vec::new();
    for _ in 0..2 {
        rxs.push(
            Receiver::builder(handle("fan"))
                .discovery(disc.clone())
                .transports([Transport::Unix])
                .bind()
                .await
                .unwrap(),
        );
    }
    let mut tx = Sender::builder(handle("fan"))
        .discovery(disc)
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(2, T).await, 2);
    let n = 10_000u64;
    let readers: Vec<_> = rxs
        .into_iter()
        .map(|mut rx| {
            tokio::spawn(async move {
                for expect in 1..=n {
                    let m = tokio::time::timeout(T, rx.next()).await.unwrap().unwrap();
                    assert_eq!(m.seq(), expect);
                    assert_eq!(&m.payload()[..], expect.to_be_bytes());
                }
                // Nothing more: exactly once.
                assert!(rx.try_recv().is_none());
                rx
            })
        })
        .collect();
    let mut pending = std::collections::VecDeque::new();
    let check = |r: ipcbus::SendReport| {
        assert_eq!(r.acked.len(), 2, "{r:?}");
        assert!(r
            .acked
            .iter()
            .all(|a| a.endpoint.transport() == Transport::Unix));
    };
    for i in 1..=n {
        pending.push_back(tx.publish_bytes(i.to_be_bytes().to_vec()).await.unwrap());
        if pending.len() > 2000 {
            check(
                tokio::time::timeout(T, pending.pop_front().unwrap())
                    .await
                    .unwrap(),
            );
        }
    }
    for p in pending {
        check(tokio::time::timeout(T, p).await.unwrap());
    }
    for r in readers {
        let rx = tokio::time::timeout(T, r).await.unwrap().unwrap();
        assert_eq!(rx.stats().taken, n);
    }
}

/// Set in the child of [`a_peer_of_another_uid_is_refused_before_the_handshake`]: the
/// socket to connect to.
const CHILD_ENV: &str = "IPCBUS_TEST_UID_CHILD_CONNECT";

/// The child's side: connects to the socket, sends nothing, and prints how many bytes
/// it read before the receiver closed the connection. Does nothing unless run as that
/// child.
#[test]
#[ignore = "run by a_peer_of_another_uid_is_refused_before_the_handshake as another uid"]
fn uid_child() {
    use std::io::Read;
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let mut s = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            println!("child: connect failed: {e}");
            return;
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => println!("child: closed after {} bytes", got.len()),
        Err(e) => println!("child: read failed after {} bytes: {e}", got.len()),
    }
}

#[tokio::test]
async fn a_peer_of_another_uid_is_refused_before_the_handshake() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: needs root to run a peer as uid 65534");
        return;
    }
    use std::os::unix::fs::DirBuilderExt;
    use std::os::unix::process::CommandExt;
    let dir = Tmp::new("uid");
    // The registry's sockets dir is 0700: listen where the other uid can reach.
    let open = dir.path().join("open");
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&open)
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = open.join("x.sock");
    let rx = Receiver::builder(handle("uid"))
        .discovery(Discovery::local_at(dir.path().join("reg")).unwrap())
        // Far longer than the test: a close is the refusal, not a handshake timeout.
        .handshake_timeout(Duration::from_secs(120))
        .bind_at(Endpoint::unix(&path))
        .bind()
        .await
        .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();

    let exe = std::env::current_exe().unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(exe)
            .args(["uid_child", "--exact", "--ignored", "--nocapture"])
            .env(CHILD_ENV, &path)
            .uid(65534)
            .gid(65534)
            .output()
    });
    let out = match tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .unwrap()
        .unwrap()
    {
        Ok(out) => out,
        // No CAP_SETUID, or the test binary is not reachable by that uid.
        Err(e) => {
            println!("skipped: cannot run this test binary as uid 65534: {e}");
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("child: closed after 0 bytes"),
        "child said: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats = rx.stats();
    assert_eq!(stats.rejected.get(RejectKind::WrongUser), 1, "{stats:?}");
    assert_eq!(stats.handshakes, 0, "{stats:?}");
    assert_eq!(stats.connected_senders, 0, "{stats:?}");
}

#[tokio::test]
async fn a_receiver_whose_socket_file_was_deleted_is_still_reached_over_tcp() {
    let dir = Tmp::new("deleted");
    let disc = dir.registry();
    let reg = LocalRegistry::open(dir.path()).unwrap();
    let mut rx = Receiver::builder(handle("del"))
        .discovery(disc.clone())
        .bind()
        .await
        .unwrap();
    // Someone (a cleaner of old files in /tmp, a careless rm) removes the socket; the
    // receiver still listens on TCP and is still registered.
    std::fs::remove_file(reg.socket_path(&rx.id())).unwrap();
    let mut tx = Sender::builder(handle("del"))
        .discovery(disc)
        .build()
        .await
        .unwrap();
    assert_eq!(
        tx.wait_for_receivers(1, Duration::from_secs(20)).await,
        1,
        "not connected; records {:?}",
        files(&reg.receivers_dir())
    );
    let tcp = rx.endpoints()[0].clone();
    assert_eq!(round_trip(&mut tx, &mut rx, "still there").await, [tcp]);
    assert_eq!(files(&reg.receivers_dir()).len(), 1, "the live record went");
}

#[tokio::test]
async fn a_closing_receiver_says_goodbye_over_tcp() {
    closing_receiver_says_goodbye(Transport::Tcp).await
}

#[tokio::test]
async fn a_closing_receiver_says_goodbye_over_unix() {
    closing_receiver_says_goodbye(Transport::Unix).await
}

/// A receiver that closes with events not taken: the sender hears it left (not a
/// dropped connection) and reports those events failed for that reason.
async fn closing_receiver_says_goodbye(t: Transport) {
    let dir = Tmp::new("bye");
    let disc = dir.registry();
    let mut rx = Receiver::builder(handle("bye"))
        .discovery(disc.clone())
        .transports([t])
        .bind()
        .await
        .unwrap();
    let mut tx = Sender::builder(handle("bye"))
        .discovery(disc)
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    round_trip(&mut tx, &mut rx, "taken").await;
    let mut events = tx.events();
    let untaken = tx.publish_bytes("not taken").await.unwrap();
    // Let it reach the receiver's queue before it closes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    rx.close().await;
    let r = tokio::time::timeout(T, untaken).await.unwrap();
    assert!(r.acked.is_empty(), "{r:?}");
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert_eq!(r.failed[0].0.endpoint.transport(), t);
    assert_eq!(r.failed[0].1, FailReason::ReceiverLeft, "{r:?}");
    let left = async {
        while let Some(ev) = events.next().await {
            if let ipcbus::SenderEvent::ReceiverLeft { reason, .. } = ev {
                return reason;
            }
        }
        panic!("the sender's events ended");
    };
    let reason = tokio::time::timeout(T, left).await.unwrap();
    assert_eq!(reason, FailReason::ReceiverLeft);
}

#[tokio::test]
async fn a_sender_given_an_endpoint_waits_for_a_receiver_that_is_not_there_yet() {
    let dir = Tmp::new("later");
    let path = dir.path().join("later.sock");
    let at = Endpoint::unix(&path);
    let mut tx = Sender::builder(handle("later"))
        .discovery(dir.registry())
        .endpoint(at.clone())
        .build()
        .await
        .unwrap();
    // Nobody there: refused, and nothing of ours removed.
    let r = tokio::time::timeout(T, tx.send_bytes("early"))
        .await
        .unwrap()
        .unwrap();
    assert!(r.acked.is_empty(), "{r:?}");
    if let Some((who, why)) = r.failed.first() {
        assert_eq!(who.endpoint, at);
        assert_eq!(*why, FailReason::Refused);
    }
    let mut rx = Receiver::builder(handle("later"))
        .discovery(dir.registry())
        .bind_at(at.clone())
        .bind()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, Duration::from_secs(20)).await, 1);
    assert_eq!(round_trip(&mut tx, &mut rx, "late").await, [at]);
}

#[test]
fn binding_where_a_listener_never_accepts_is_in_use_not_a_hang() {
    use socket2::{Domain, SockAddr, Socket, Type};
    let dir = Tmp::new("backlog");
    let path = dir.path().join("busy.sock");
    // A listener that never accepts, its queue full.
    let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
    listener.bind(&SockAddr::unix(&path).unwrap()).unwrap();
    listener.listen(1).unwrap();
    let mut queued = Vec::new();
    for _ in 0..64 {
        let c = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        c.set_nonblocking(true).unwrap();
        match c.connect(&SockAddr::unix(&path).unwrap()) {
            Ok(()) => queued.push(c),
            Err(_) => break, // the queue is full
        }
    }
    assert!(queued.len() < 64, "the listener's queue never filled");
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let at = Endpoint::unix(&path);
    let reg = dir.path().join("reg");
    // In a thread of its own: a bind that blocks cannot be timed out from its task.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(
            Receiver::builder(handle("busy"))
                .discovery(Discovery::local_at(reg).unwrap())
                .bind_at(at)
                .bind(),
        );
        let _ = done_tx.send(r.map(|rx| rx.endpoints().to_vec()));
    });
    match done_rx.recv_timeout(T) {
        Ok(Err(BindError::Unix(UnixBindError::InUse(p)))) => assert_eq!(p, path),
        Ok(other) => panic!("{other:?}"),
        Err(_) => panic!("bind hung on a listener that does not accept"),
    }
    drop(queued);
    drop(listener);
}

#[tokio::test]
async fn no_transports_at_all_is_an_error_not_a_receiver_nobody_can_reach() {
    let dir = Tmp::new("none");
    let r = Receiver::builder(handle("none"))
        .discovery(dir.registry())
        .transports([])
        .bind()
        .await;
    match r {
        Err(e @ BindError::NoTransports) => assert!(e.to_string().contains("tcp, unix")),
        Err(e) => panic!("{e:?}"),
        Ok(rx) => panic!(
            "bound with endpoints {:?}; records {:?}",
            rx.endpoints(),
            files(&dir.path().join("receivers"))
        ),
    }
    assert!(files(&dir.path().join("receivers")).is_empty());
}
