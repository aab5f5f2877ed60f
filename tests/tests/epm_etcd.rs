//! Several `epm-service` processes on one etcd (`--store etcd://...`) serve one view:
//! a real etcd (Debian's `etcd-server`) started by the test on free loopback ports,
//! real `epm-service` processes on 127.0.0.1 port 0, in-process receivers and
//! senders; everything killed by pid when the test ends. Without an `etcd` binary
//! the tests that need one say they skip (`.ci/run` installs it).

mod cli_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use cli_support::{epm_service, strip_ansi, Epm as Service};
use ipcbus::epm::WatchEvent;
use ipcbus::registry::record_now;
use ipcbus::{Epm, Etcd, Handle, Receiver, ReceiverId, Role, Sender};
use ipcbus_tests::etcd::Cluster;
use ipcbus_tests::eventually;

const T: Duration = Duration::from_secs(15);

fn cluster() -> Option<Cluster> {
    let c = Cluster::start(1);
    if c.is_none() {
        eprintln!(
            "skipped: no etcd binary (install Debian's etcd-server, or set IPCBUS_TEST_ETCD)"
        );
    }
    c
}

/// `epm-service` on loopback port 0 with its registrations in `store`.
fn start(store: &str, extra: &[&str]) -> Service {
    let mut args = vec!["--port", "0", "--bind", "127.0.0.1", "--store", store];
    args.extend_from_slice(extra);
    Service::start(&epm_service(), &args)
}

/// `etcd://127.0.0.1:PORT` for the cluster's `http://127.0.0.1:PORT`.
fn etcd_form(c: &Cluster) -> String {
    c.endpoints().replace("http://", "etcd://")
}

fn epm(addrs: &str) -> Epm {
    Epm::parse(addrs)
        .unwrap()
        .timeout(Duration::from_secs(2))
        .build()
}

fn h(s: &str) -> Handle {
    Handle::new(s).unwrap()
}

async fn ids_at(e: &Epm, handle: &Handle) -> Vec<ReceiverId> {
    let mut v: Vec<_> = e
        .lookup(handle)
        .await
        .map(|r| r.into_iter().map(|r| r.receiver).collect())
        .unwrap_or_default();
    v.sort();
    v
}

async fn next_event(c: &mut ipcbus::EpmClient) -> WatchEvent {
    tokio::time::timeout(T, c.next_event())
        .await
        .expect("watch event in time")
        .expect("watch event")
}

/// GET `path` from the HTTP endpoint at `addr`; the body (bounded wait).
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, T).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut buf = String::new();
    s.take(4 << 20).read_to_string(&mut buf).unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_registered_at_one_epm_is_found_at_the_other() {
    let Some(c) = cluster() else { return };
    // Both spellings of the store: etcd://HOST:PORT and the http:// URL.
    let a = start(&etcd_form(&c), &[]);
    let b = start(&c.endpoints(), &["--http", "127.0.0.1:0"]);
    let http: SocketAddr = strip_ansi(&b.proc.stderr_line("http on "))
        .split("http on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .expect("http address");
    let (at_a, at_b) = (epm(&a.addr), epm(&b.addr));
    let handle = h("shared.view");

    let mut watcher = at_b.client().await.unwrap();
    assert!(watcher.watch(&handle).await.unwrap().is_empty());
    let t0 = Instant::now();
    let mut rx = Receiver::builder(handle.clone())
        .epm(at_a.clone())
        .bind()
        .await
        .unwrap();
    // B's watcher is told, and B's lookups and lists show it.
    match next_event(&mut watcher).await {
        WatchEvent::Added(r) => {
            assert_eq!(r.receiver, rx.id());
            assert_eq!(r.tcp_addr(), rx.local_addr());
        }
        other => panic!("{other:?}"),
    }
    eprintln!(
        "bind at EPM A -> Added at a watcher of EPM B: {:?}",
        t0.elapsed()
    );
    assert_eq!(ids_at(&at_b, &handle).await, vec![rx.id()]);
    let (handles, total) = at_b.list().await.unwrap();
    assert_eq!((handles.len(), total), (1, 1));
    // It is in etcd under the key a receiver registering there directly would use,
    // so etcd discovery sees it too.
    let etcd = Etcd::parse(&c.endpoints()).unwrap().build();
    let recs = etcd.lookup(&handle).await.unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].receiver, rx.id());
    assert_eq!(recs[0].tcp_addr(), rx.local_addr());

    // A sender using B reaches the receiver registered at A.
    let mut tx = Sender::builder(handle.clone())
        .epm(at_b.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    for i in 0..20 {
        let p = tx.publish_bytes(format!("event {i}")).await.unwrap();
        let m = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
        assert_eq!(m.payload(), format!("event {i}").as_bytes());
        assert_eq!(p.await.acked.len(), 1);
    }

    // A receiver registered directly in etcd is found at both EPMs, and not twice.
    let direct = Receiver::builder(handle.clone())
        .etcd(etcd.clone())
        .bind()
        .await
        .unwrap();
    let mut both = vec![rx.id(), direct.id()];
    both.sort();
    assert!(eventually!(T, ids_at(&at_a, &handle).await == both));
    assert!(eventually!(T, ids_at(&at_b, &handle).await == both));
    assert!(
        matches!(next_event(&mut watcher).await, WatchEvent::Added(r) if r.receiver == direct.id())
    );
    assert_eq!(tx.wait_for_receivers(2, T).await, 2);

    // B's monitoring counts the entries it learned from the store.
    let status: serde_json::Value = serde_json::from_str(&http_get(http, "/status")).unwrap();
    assert_eq!(status["registrations"], 2, "{status}");
    assert_eq!(status["store_registrations"], 2, "{status}");
    assert!(status["store"]
        .as_str()
        .unwrap()
        .starts_with("etcd http://127.0.0.1:"));
    assert!(
        status["counters"]["store_events"].as_u64().unwrap() >= 3,
        "{status}"
    );
    let metrics = http_get(http, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == "ipcbus_epm_store_registrations 2"),
        "{metrics}"
    );

    // The receiver closing at A: Removed at B, gone from etcd and from the sender.
    let id = rx.id();
    rx.close().await;
    assert_eq!(
        next_event(&mut watcher).await,
        WatchEvent::Removed {
            handle: handle.clone(),
            receiver: id
        }
    );
    assert_eq!(ids_at(&at_b, &handle).await, vec![direct.id()]);
    assert!(eventually!(
        T,
        etcd.lookup(&handle).await.unwrap().len() == 1
    ));
    assert!(eventually!(T, tx.receivers().len() == 1));
    tx.close().await;
    direct.close().await;
    assert!(eventually!(T, ids_at(&at_a, &handle).await.is_empty()));
}

/// A server of calls registered at one EPM is a server at the other too (never a
/// receiver there), and leaves both when its connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_registered_at_one_epm_is_a_server_at_the_other() {
    let Some(c) = cluster() else { return };
    let a = start(&etcd_form(&c), &[]);
    let b = start(&etcd_form(&c), &[]);
    let (at_a, at_b) = (epm(&a.addr), epm(&b.addr));
    let handle = h("shared.calls");
    let mut servers = at_b.client().await.unwrap();
    assert!(servers.watch_servers(&handle).await.unwrap().is_empty());
    let mut receivers = at_b.client().await.unwrap();
    assert!(receivers.watch(&handle).await.unwrap().is_empty());

    let mut conn = at_a.client().await.unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], 7201));
    let srv =
        record_now(handle.clone(), vec![addr.into()], ReceiverId::random()).with_role(Role::Server);
    let rec = record_now(
        handle.clone(),
        vec![SocketAddr::from(([127, 0, 0, 1], 7202)).into()],
        ReceiverId::random(),
    );
    conn.register(&srv, Duration::ZERO).await.unwrap();
    match next_event(&mut servers).await {
        WatchEvent::ServerAdded(r) => {
            assert_eq!((r.receiver, r.role), (srv.receiver, Role::Server));
            assert_eq!(r.tcp_addr(), Some(addr));
        }
        other => panic!("{other:?}"),
    }
    // The receiver watch at B: the receiver registered after the server is its
    // first event.
    conn.register(&rec, Duration::ZERO).await.unwrap();
    assert!(
        matches!(next_event(&mut receivers).await, WatchEvent::Added(r) if r.receiver == rec.receiver)
    );
    let at_b_servers = at_b.lookup_servers(&handle).await.unwrap();
    assert_eq!(at_b_servers.len(), 1);
    assert_eq!(ids_at(&at_b, &handle).await, vec![rec.receiver]);

    // The connection closes at A: the server leaves B's view.
    conn.close().await;
    assert_eq!(
        next_event(&mut servers).await,
        WatchEvent::ServerRemoved {
            handle: handle.clone(),
            server: srv.receiver
        }
    );
    assert!(eventually!(
        T,
        at_b.lookup_servers(&handle).await.unwrap().is_empty()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registrations_of_a_killed_epm_expire_from_the_others_view() {
    let Some(c) = cluster() else { return };
    // A 2 s lease at A: in etcd too.
    let mut a = start(&etcd_form(&c), &["--lease-ms", "2000"]);
    let b = start(&etcd_form(&c), &[]);
    let (at_a, at_b) = (epm(&a.addr), epm(&b.addr));
    let handle = h("killed.epm");
    let rx = Receiver::builder(handle.clone())
        .epm(at_a.clone())
        .bind()
        .await
        .unwrap();
    // A receiver that knows both EPMs registers at A, the first.
    let moving = Receiver::builder(handle.clone())
        .epm(epm(&format!("{},{}", a.addr, b.addr)))
        .bind()
        .await
        .unwrap();
    let mut both = vec![rx.id(), moving.id()];
    both.sort();
    assert!(eventually!(T, ids_at(&at_b, &handle).await == both));
    let mut watcher = at_b.client().await.unwrap();
    assert_eq!(watcher.watch(&handle).await.unwrap().len(), 2);

    // SIGKILL: nothing is revoked; the lease runs out in etcd and B is told.
    a.proc.signal(libc::SIGKILL);
    assert!(a.proc.wait(T).is_some());
    let t0 = Instant::now();
    // (The moving receiver's re-registration at B may come first, as an Added.)
    let mut removed = false;
    for _ in 0..10 {
        match next_event(&mut watcher).await {
            WatchEvent::Removed { receiver, .. } if receiver == rx.id() => {
                removed = true;
                break;
            }
            WatchEvent::Added(r) if r.receiver == moving.id() => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(removed);
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(10), "{took:?}");
    eprintln!("a killed EPM's registration left the other's view after {took:?} (2 s lease)");
    // The receiver that knows both moved to B and stays, in B's view and in etcd,
    // after A's lease ran out.
    assert_eq!(ids_at(&at_b, &handle).await, vec![moving.id()]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ids_at(&at_b, &handle).await, vec![moving.id()]);
    let etcd = Etcd::parse(&c.endpoints()).unwrap().build();
    let in_etcd: Vec<ReceiverId> = etcd
        .lookup(&handle)
        .await
        .unwrap()
        .iter()
        .map(|r| r.receiver)
        .collect();
    assert_eq!(in_etcd, vec![moving.id()]);
    drop(rx);
    moving.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_epm_takes_its_registrations_with_it_at_once() {
    let Some(c) = cluster() else { return };
    // A 10 s lease: what is seen within 3 s is the revoke, not the expiry.
    let mut a = start(&etcd_form(&c), &["--lease-ms", "10000"]);
    let b = start(&etcd_form(&c), &[]);
    let (at_a, at_b) = (epm(&a.addr), epm(&b.addr));
    let handle = h("stopped.epm");
    let rx = Receiver::builder(handle.clone())
        .epm(at_a.clone())
        .bind()
        .await
        .unwrap();
    assert!(eventually!(
        T,
        ids_at(&at_b, &handle).await == vec![rx.id()]
    ));
    let t0 = Instant::now();
    a.proc.signal(libc::SIGTERM);
    assert!(a.proc.wait(T).is_some_and(|s| s.success()));
    assert!(eventually!(
        Duration::from_secs(3),
        ids_at(&at_b, &handle).await.is_empty()
    ));
    let etcd = Etcd::parse(&c.endpoints()).unwrap().build();
    assert!(etcd.lookup(&handle).await.unwrap().is_empty());
    eprintln!(
        "a stopped EPM's registration left the other's view after {:?}",
        t0.elapsed()
    );
    drop(rx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_with_two_epms_keeps_delivering_when_the_first_dies() {
    let Some(c) = cluster() else { return };
    let mut a = start(&etcd_form(&c), &[]);
    let b = start(&etcd_form(&c), &[]);
    let at_b = epm(&b.addr);
    let both = epm(&format!("{},{}", a.addr, b.addr));
    let handle = h("two.epms");
    // The receiver registers at B; the sender watches at A (the first that answers).
    let mut rx1 = Receiver::builder(handle.clone())
        .epm(at_b.clone())
        .bind()
        .await
        .unwrap();
    let mut tx = Sender::builder(handle.clone())
        .epm(both.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    let p = tx.publish_bytes("before").await.unwrap();
    assert_eq!(&rx1.recv().await.unwrap().payload()[..], b"before");
    assert_eq!(p.await.acked.len(), 1);

    a.proc.signal(libc::SIGKILL);
    assert!(a.proc.wait(T).is_some());
    // Delivery carries on: every event acknowledged, in order, none twice.
    for i in 0..50 {
        let p = tx.publish_bytes(format!("during {i}")).await.unwrap();
        let m = tokio::time::timeout(T, rx1.recv()).await.unwrap().unwrap();
        assert_eq!(m.payload(), format!("during {i}").as_bytes());
        let r = p.await;
        assert_eq!((r.acked.len(), r.failed.len()), (1, 0), "{r:?}");
    }
    // The sender now watches at B: a receiver joining there is reached.
    let mut rx2 = Receiver::builder(handle.clone())
        .epm(at_b.clone())
        .bind()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(2, T).await, 2);
    let p = tx.publish_bytes("after").await.unwrap();
    assert_eq!(&rx1.recv().await.unwrap().payload()[..], b"after");
    assert_eq!(&rx2.recv().await.unwrap().payload()[..], b"after");
    assert_eq!(p.await.acked.len(), 2);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), rx1.recv())
            .await
            .is_err(),
        "an event was delivered twice"
    );
    tx.close().await;
    rx1.close().await;
    rx2.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_restart_keeps_the_view_and_the_watch_resumes() {
    let Some(mut c) = cluster() else { return };
    let a = start(&etcd_form(&c), &[]);
    let b = start(&etcd_form(&c), &[]);
    let (at_a, at_b) = (epm(&a.addr), epm(&b.addr));
    let handle = h("etcd.restart");
    let rx1 = Receiver::builder(handle.clone())
        .epm(at_a.clone())
        .bind()
        .await
        .unwrap();
    assert!(eventually!(
        T,
        ids_at(&at_b, &handle).await == vec![rx1.id()]
    ));

    c.kill(0);
    // etcd away: both EPMs keep serving what they know, and take registrations.
    let rx2 = Receiver::builder(handle.clone())
        .epm(at_a.clone())
        .bind()
        .await
        .unwrap();
    assert_eq!(ids_at(&at_b, &handle).await, vec![rx1.id()]);
    assert_eq!(ids_at(&at_a, &handle).await.len(), 2);
    tokio::time::sleep(Duration::from_millis(500)).await;

    c.restart(0);
    // The registration made meanwhile reaches etcd and B; the watch resumed.
    let mut want = vec![rx1.id(), rx2.id()];
    want.sort();
    assert!(
        eventually!(T, ids_at(&at_b, &handle).await == want),
        "B sees {:?}",
        ids_at(&at_b, &handle).await
    );
    let rx3 = Receiver::builder(handle.clone())
        .epm(at_a.clone())
        .bind()
        .await
        .unwrap();
    assert!(eventually!(T, ids_at(&at_b, &handle).await.len() == 3));
    rx1.close().await;
    assert!(eventually!(T, ids_at(&at_b, &handle).await.len() == 2));
    rx2.close().await;
    rx3.close().await;
}

#[test]
fn an_etcd_that_is_down_at_start_or_a_bad_store_is_an_error() {
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    for (store, code, says) in [
        (format!("etcd://{down}"), 1, "cannot use the etcd store"),
        ("redis://x".to_owned(), 2, "store \"redis://x\""),
        ("etcd://h:99999".to_owned(), 2, "is not a port"),
    ] {
        let mut cmd = std::process::Command::new(epm_service());
        for v in cli_support::IPCBUS_VARS {
            cmd.env_remove(v);
        }
        cmd.args(["--port", "0", "--bind", "127.0.0.1", "--store", &store]);
        let t0 = Instant::now();
        let r = cli_support::run(cmd, b"");
        assert_eq!(r.code(), code, "{store}: {r:?}");
        let err = strip_ansi(&r.stderr);
        assert!(err.contains(says), "{store}: {err}");
        assert!(!err.contains("listening on"), "{store}: {err}");
        assert!(t0.elapsed() < Duration::from_secs(20), "{store}");
    }
}
