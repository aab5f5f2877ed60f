//! Discovery in etcd against a real etcd (Debian's `etcd-server`), started by each
//! test on free loopback ports with its data in a temporary directory, and killed by
//! pid when the test ends: one member for the functional tests, three for the
//! failover test. Without an `etcd` binary every test says it skips (`.ci/run`
//! installs it).

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use ipcbus::registry::record_now;
use ipcbus::{
    BindError, BuildError, Etcd, EtcdError, Handle, Receiver, ReceiverId, Sender, SenderEvent,
};
use ipcbus_tests::etcd::Cluster;
use ipcbus_tests::eventually;
use ipcbus_tests::Proc;

const PEER: &str = env!("CARGO_BIN_EXE_ipcbus-testpeer");
const T: Duration = Duration::from_secs(10);

fn cluster(n: usize) -> Option<Cluster> {
    let c = Cluster::start(n);
    if c.is_none() {
        eprintln!(
            "skipped: no etcd binary (install Debian's etcd-server, or set IPCBUS_TEST_ETCD)"
        );
    }
    c
}

fn etcd(c: &Cluster) -> Etcd {
    Etcd::parse(&c.endpoints()).unwrap().build()
}

fn h(s: &str) -> Handle {
    Handle::new(s).unwrap()
}

async fn ids(e: &Etcd, handle: &Handle) -> Vec<ReceiverId> {
    let mut v: Vec<_> = e
        .lookup(handle)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.receiver)
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_register_senders_watch_joins_and_leaves() {
    let Some(c) = cluster(1) else { return };
    let e = etcd(&c);
    let handle = h("orders");
    let mut rx1 = Receiver::builder(handle.clone())
        .etcd(e.clone())
        .bind()
        .await
        .unwrap();
    assert_eq!(ids(&e, &handle).await, vec![rx1.id()]);
    let recs = e.lookup(&handle).await.unwrap();
    assert_eq!(recs[0].tcp_addr(), rx1.local_addr());
    assert_eq!(recs[0].pid, Some(std::process::id()));

    let mut tx = Sender::builder(handle.clone())
        .etcd(e.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    let mut events = tx.events();
    let p = tx.publish_bytes("one").await.unwrap();
    assert_eq!(&rx1.recv().await.unwrap().payload()[..], b"one");
    assert_eq!(p.await.acked.len(), 1);

    // A receiver joins: the watch sees it, the sender connects to it.
    let mut rx2 = Receiver::builder(handle.clone())
        .etcd(e.clone())
        .bind()
        .await
        .unwrap();
    let id2 = rx2.id();
    assert_eq!(tx.wait_for_receivers(2, T).await, 2);
    let joined = tokio::time::timeout(T, async {
        use futures::StreamExt;
        while let Some(ev) = events.next().await {
            if let SenderEvent::ReceiverJoined(info) = ev {
                if info.id == id2 {
                    return;
                }
            }
        }
    })
    .await;
    assert!(joined.is_ok(), "no ReceiverJoined for the second receiver");
    let p = tx.publish_bytes("two").await.unwrap();
    assert_eq!(&rx1.recv().await.unwrap().payload()[..], b"two");
    assert_eq!(&rx2.recv().await.unwrap().payload()[..], b"two");
    assert_eq!(p.await.acked.len(), 2);

    // Closing removes the record at once (the lease is revoked), not at expiry.
    let t0 = Instant::now();
    rx2.close().await;
    assert_eq!(ids(&e, &handle).await, vec![rx1.id()]);
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(
        eventually!(T, tx.receivers().len() == 1),
        "the sender still sends to the closed receiver"
    );
    // Listing sees every handle.
    let _other = Receiver::builder(h("other"))
        .etcd(e.clone())
        .bind()
        .await
        .unwrap();
    let all = e.list().await.unwrap();
    let handles: Vec<&str> = all.iter().map(|r| r.handle.as_str()).collect();
    assert_eq!(handles, ["orders", "other"]);
    rx1.close().await;
    tx.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_receiver_process_goes_at_lease_expiry() {
    let Some(c) = cluster(1) else { return };
    let e = etcd(&c);
    let handle = h("killed");
    let mut cmd = Command::new(PEER);
    cmd.args(["recv", "--handle", "killed", "--timeout", "60"])
        .args(["--etcd", &c.endpoints(), "--lease-secs", "2"]);
    let mut peer = Proc::spawn(cmd);
    let ready = peer.expect_line("ready ", T);
    let id = ready.split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(ids(&e, &handle).await.len(), 1);
    assert_eq!(ids(&e, &handle).await[0].to_string(), id);
    // A sender watching sees it go too.
    let mut tx = Sender::builder(handle.clone())
        .etcd(e.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    // It stays while alive (the lease is renewed every third of it)...
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ids(&e, &handle).await.len(), 1, "a live receiver expired");
    // ...and goes within the lease (plus etcd's expiry check) after SIGKILL.
    let t0 = Instant::now();
    peer.kill();
    assert!(
        eventually!(Duration::from_secs(8), ids(&e, &handle).await.is_empty()),
        "the record of a killed receiver is still there"
    );
    let gone = t0.elapsed();
    eprintln!("record gone {gone:?} after SIGKILL (lease 2 s)");
    assert!(
        eventually!(T, tx.receivers().is_empty()),
        "the sender still lists the dead receiver"
    );
    tx.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_do_not_parse_are_skipped() {
    let Some(c) = cluster(1) else { return };
    let e = etcd(&c);
    let handle = h("bad");
    let mut raw = etcd_client::Client::connect([c.members[0].client_url.as_str()], None)
        .await
        .unwrap();
    let good_elsewhere = record_now(
        h("elsewhere"),
        vec!["127.0.0.1:1".parse().unwrap()],
        ReceiverId([9; 16]),
    );
    // Garbage, a key that is no id, and a valid record filed under the wrong handle.
    raw.put(
        "/ipcbus/handles/bad/00000000000000000000000000000001",
        "not json",
        None,
    )
    .await
    .unwrap();
    raw.put(
        "/ipcbus/handles/bad/not-an-id",
        good_elsewhere.to_json(),
        None,
    )
    .await
    .unwrap();
    let key = format!("/ipcbus/handles/bad/{}", good_elsewhere.receiver);
    raw.put(key.as_str(), good_elsewhere.to_json(), None)
        .await
        .unwrap();
    assert!(e.lookup(&handle).await.unwrap().is_empty());

    let mut rx = Receiver::builder(handle.clone())
        .etcd(e.clone())
        .bind()
        .await
        .unwrap();
    let mut tx = Sender::builder(handle.clone())
        .etcd(e.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    assert_eq!(tx.receivers().len(), 1);
    // Garbage put while watching is skipped too; the real receiver keeps working.
    raw.put(
        "/ipcbus/handles/bad/00000000000000000000000000000002",
        "{\"version\":1}",
        None,
    )
    .await
    .unwrap();
    let p = tx.publish_bytes("still fine").await.unwrap();
    assert_eq!(&rx.recv().await.unwrap().payload()[..], b"still fine");
    let r = p.await;
    assert_eq!((r.acked.len(), r.failed.len()), (1, 0), "{r:?}");
    assert_eq!(tx.receivers().len(), 1);
    // A receiver's record overwritten with garbage is no longer trusted.
    let key = format!("/ipcbus/handles/bad/{}", rx.id());
    raw.put(key.as_str(), "{", None).await.unwrap();
    assert!(
        eventually!(T, tx.receivers().is_empty()),
        "the sender still trusts an overwritten record"
    );
    tx.close().await;
    rx.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_down_at_start_is_a_clear_error() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let e = Etcd::parse(&url)
        .unwrap()
        .timeout(Duration::from_millis(1500))
        .build();
    let t0 = Instant::now();
    let err = Receiver::builder(h("down"))
        .etcd(e.clone())
        .bind()
        .await
        .unwrap_err();
    assert!(
        matches!(err, BindError::Etcd(EtcdError::Unavailable { .. })),
        "{err:?}"
    );
    let msg = ipcbus::error_chain(&err);
    assert!(msg.contains(&url) && msg.contains("unavailable"), "{msg}");
    let err = Sender::builder(h("down"))
        .etcd(e)
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(err, BuildError::Etcd(EtcdError::Unavailable { .. })),
        "{err:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_restart_keeps_the_view_and_the_watch_resumes() {
    let Some(mut c) = cluster(1) else { return };
    let e = etcd(&c);
    let handle = h("restart");
    let mut rx1 = Receiver::builder(handle.clone())
        .etcd(e.clone())
        .bind()
        .await
        .unwrap();
    let mut tx = Sender::builder(handle.clone())
        .etcd(e.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);

    // etcd goes away: delivery goes on, the sender keeps its view.
    c.kill(0);
    for i in 0..20u32 {
        let p = tx.publish_bytes(i.to_be_bytes().to_vec()).await.unwrap();
        rx1.recv().await.unwrap();
        assert_eq!(p.await.acked.len(), 1);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        tx.receivers().len(),
        1,
        "the view was lost while etcd was down"
    );

    // etcd comes back: the first receiver's lease is still kept, a new receiver's
    // registration reaches the sender through the resumed watch.
    c.restart(0);
    let mut rx2 = Receiver::builder(handle.clone())
        .etcd(e.clone())
        .bind()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(2, Duration::from_secs(20)).await, 2);
    let p = tx.publish_bytes("after").await.unwrap();
    rx1.recv().await.unwrap();
    rx2.recv().await.unwrap();
    assert_eq!(p.await.acked.len(), 2);
    let mut want = vec![rx1.id(), rx2.id()];
    want.sort();
    assert_eq!(ids(&e, &handle).await, want);
    // Removal is seen through the resumed watch as well.
    rx2.close().await;
    assert!(
        eventually!(T, tx.receivers().len() == 1),
        "a leave after the restart was missed"
    );
    tx.close().await;
    rx1.close().await;
}

/// Three members; two senders stream to two receivers while the leader is killed.
/// Registrations, watches and delivery carry on: every event is acknowledged or
/// reported failed by every receiver it was sent to, and no receiver sees one twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_loses_its_leader_while_senders_stream() {
    let Some(mut c) = cluster(3) else { return };
    // The election after the leader's loss may take seconds on a loaded machine: the
    // test is about carrying on, not about how soon.
    let e = Etcd::parse(&c.endpoints())
        .unwrap()
        .timeout(Duration::from_secs(15))
        .build();
    let handle = h("failover");
    let mut rxs = Vec::new();
    for _ in 0..2 {
        rxs.push(
            Receiver::builder(handle.clone())
                .etcd(e.clone())
                .bind()
                .await
                .unwrap(),
        );
    }
    const EVENTS: u32 = 400;
    let mut senders = Vec::new();
    for s in 0..2u32 {
        let mut tx = Sender::builder(handle.clone())
            .etcd(e.clone())
            .build()
            .await
            .unwrap();
        assert_eq!(tx.wait_for_receivers(2, T).await, 2);
        senders.push(tokio::spawn(async move {
            let mut reports = Vec::new();
            for i in 0..EVENTS {
                let mut body = s.to_be_bytes().to_vec();
                body.extend_from_slice(&i.to_be_bytes());
                reports.push(tx.publish_bytes(body).await.unwrap());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let mut out = Vec::new();
            for r in reports {
                out.push(r.await);
            }
            let known = tx.receivers().len();
            tx.close().await;
            (out, known)
        }));
    }
    // Receivers take everything, counting per (sender, event).
    let mut takers = Vec::new();
    for mut rx in rxs {
        takers.push(tokio::spawn(async move {
            let mut seen: HashMap<(ipcbus::SenderId, u64), u32> = HashMap::new();
            while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                *seen.entry((m.sender(), m.seq())).or_default() += 1;
            }
            (seen, rx)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let leader = c.leader().expect("a leader");
    let t0 = Instant::now();
    c.kill(leader);
    // Registrations carry on: a new receiver registers while (or right after) the
    // cluster elects a new leader, and the streaming senders' watches see it.
    let late = Receiver::builder(handle.clone())
        .etcd(e.clone())
        .bind()
        .await;
    let registered = t0.elapsed();
    let mut late = late.expect("registration after losing the leader");
    eprintln!("registered {registered:?} after killing leader m{leader}");
    let mut late_seen = 0u32;
    let mut reports = Vec::new();
    let mut knowns = Vec::new();
    let senders_done = async {
        for s in senders {
            let (r, known) = s.await.unwrap();
            reports.push(r);
            knowns.push(known);
        }
    };
    let late_takes = async {
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), late.recv()).await {
            late_seen += 1;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(senders_done, late_takes)
    })
    .await
    .expect("senders finished");
    assert!(
        late_seen > 0,
        "the receiver registered after the failover got nothing"
    );
    assert!(
        knowns.iter().all(|&k| k == 3),
        "senders know {knowns:?} receivers"
    );
    for t in takers {
        let (seen, rx) = t.await.unwrap();
        let dups = seen.values().filter(|&&n| n > 1).count();
        assert_eq!(dups, 0, "a receiver saw {dups} events twice");
        rx.close().await;
    }
    let mut acked = 0usize;
    let mut failed = 0usize;
    for r in reports.iter().flatten() {
        assert!(
            r.targeted() >= 2,
            "event {} went to {} receivers",
            r.seq,
            r.targeted()
        );
        acked += r.acked.len();
        failed += r.failed.len();
    }
    eprintln!("failover: {acked} deliveries acknowledged, {failed} failed");
    assert_eq!(failed, 0, "deliveries failed although no receiver left");
    late.close().await;
}

/// Log lines of this test binary, for the test that checks which path a watch took.
static LOG: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut l) = LOG.lock() {
            l.extend_from_slice(b);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The sender watches through one member only; while that member is down, a receiver
/// leaves, another joins, and the history is compacted away. When the member is back,
/// the sender's watch from its last revision is refused as compacted: it reads the
/// handle again and ends up with exactly the receivers registered now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_behind_a_compaction_reads_the_handle_again() {
    let _ = tracing_subscriber::fmt()
        .with_writer(|| LogWriter)
        .with_env_filter("ipcbus=info")
        .try_init();
    let Some(mut c) = cluster(3) else { return };
    let via0 = Etcd::parse(&c.members[0].client_url).unwrap().build();
    let via1 = Etcd::parse(&c.members[1].client_url).unwrap().build();
    let handle = h("compacted");
    let bind = |e: &Etcd| Receiver::builder(handle.clone()).etcd(e.clone()).bind();
    let mut stays = bind(&via1).await.unwrap();
    let leaves = bind(&via1).await.unwrap();
    let mut tx = Sender::builder(handle.clone())
        .etcd(via0.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(2, T).await, 2);

    c.kill(0);
    leaves.close().await;
    let mut joins = bind(&via1).await.unwrap();
    let mut raw = etcd_client::Client::connect([c.members[1].client_url.as_str()], None)
        .await
        .unwrap();
    let rev = raw
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    raw.compact(
        rev,
        Some(etcd_client::CompactionOptions::new().with_physical()),
    )
    .await
    .unwrap();
    c.restart(0);

    let mut want = vec![stays.id(), joins.id()];
    want.sort();
    let converged = eventually!(Duration::from_secs(30), {
        let mut ids: Vec<_> = tx.receivers().iter().map(|r| r.id).collect();
        ids.sort();
        ids == want
    });
    assert!(converged, "the sender's view: {:?}", tx.receivers());
    let p = tx.publish_bytes("after compaction").await.unwrap();
    stays.recv().await.unwrap();
    joins.recv().await.unwrap();
    assert_eq!(p.await.acked.len(), 2);
    let log = String::from_utf8_lossy(&LOG.lock().unwrap()).into_owned();
    assert!(
        log.contains("fell behind a compaction"),
        "the watch did not take the compaction path:\n{log}"
    );
    tx.close().await;
}

/// Clients over TLS: `https://` endpoints and the cluster's CA. Without the CA the
/// connection fails (no default trust store), as `Unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_endpoints_with_the_cluster_ca() {
    let dir = ipcbus_tests::TempDir::new("etcd-tls");
    let Some(tls) = ipcbus_tests::etcd::Tls::make(dir.path()) else {
        eprintln!("skipped: openssl could not make a test certificate");
        return;
    };
    let Some(c) = Cluster::start_tls(1, &tls) else {
        eprintln!("skipped: no etcd binary");
        return;
    };
    assert!(c.endpoints().starts_with("https://"), "{}", c.endpoints());
    let ca = std::fs::read(&tls.ca).unwrap();
    let e = Etcd::parse(&c.endpoints()).unwrap().tls(ca).build();
    let handle = h("tls");
    let mut rx = Receiver::builder(handle.clone())
        .etcd(e.clone())
        .bind()
        .await
        .unwrap();
    let mut tx = Sender::builder(handle.clone())
        .etcd(e.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    let p = tx.publish_bytes("over tls").await.unwrap();
    rx.recv().await.unwrap();
    assert_eq!(p.await.acked.len(), 1);
    let untrusted = Etcd::parse(&c.endpoints())
        .unwrap()
        .timeout(Duration::from_secs(2))
        .build();
    let err = Receiver::builder(handle)
        .etcd(untrusted)
        .bind()
        .await
        .unwrap_err();
    assert!(
        matches!(err, BindError::Etcd(EtcdError::Unavailable { .. })),
        "{err:?}"
    );
    tx.close().await;
    rx.close().await;
}
