//! Delivery guarantees with receivers and senders in separate processes, over TCP
//! and over Unix sockets: the receiver processes listen on the one transport
//! `IPCBUS_TRANSPORTS` names, so the senders find only that one in their records.
//! The Unix runs (the default on a host) keep the full counts; the TCP runs of the
//! longer tests send fewer events.

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use ipcbus::{Discovery, FailReason, Handle, Sender, SenderEvent, Transport};
use ipcbus_tests::{Proc, TempDir};
use serde_json::Value;

const PEER: &str = env!("CARGO_BIN_EXE_ipcbus-testpeer");
const T: Duration = Duration::from_secs(60);

/// A test peer whose receivers listen on `t` only.
fn peer(dir: &TempDir, t: Transport, args: &[&str]) -> Proc {
    let mut cmd = Command::new(PEER);
    cmd.args(args)
        .env("IPCBUS_RUNTIME_DIR", dir.path())
        .env("IPCBUS_TRANSPORTS", t.as_str());
    Proc::spawn(cmd)
}

/// Starts a receiver process listening on `t`; returns it with its receiver id.
fn receiver(dir: &TempDir, t: Transport, handle: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["recv", "--handle", handle];
    args.extend_from_slice(extra);
    let p = peer(dir, t, &args);
    let ready = p.expect_line("ready ", T);
    let id = ready.split_whitespace().nth(1).unwrap().to_string();
    (p, id)
}

fn summary(p: &Proc) -> Value {
    serde_json::from_str(&p.expect_line("summary ", T)).unwrap()
}

fn sender_in_process(dir: &TempDir, handle: &str) -> ipcbus::SenderBuilder {
    Sender::builder(Handle::new(handle).unwrap())
        .discovery(Discovery::local_at(dir.path()).unwrap())
}

/// Checks every report endpoint in `reports` is of transport `t`.
fn all_over(t: Transport, reports: &[ipcbus::SendReport]) {
    for r in reports {
        for who in r.acked.iter().chain(r.failed.iter().map(|(w, _)| w)) {
            assert_eq!(who.endpoint.transport(), t, "{who}");
        }
    }
}

#[test]
fn three_receivers_two_senders_exactly_once_in_order_over_unix() {
    three_receivers_two_senders(Transport::Unix, 10_000)
}

#[test]
fn three_receivers_two_senders_exactly_once_in_order_over_tcp() {
    three_receivers_two_senders(Transport::Tcp, 3_000)
}

fn three_receivers_two_senders(t: Transport, n: u64) {
    let dir = TempDir::new("3x2");
    let receivers: Vec<(Proc, String)> = (0..3)
        .map(|_| receiver(&dir, t, "fan", &["--expect", &(2 * n).to_string()]))
        .collect();
    let senders: Vec<Proc> = (0..2)
        .map(|_| {
            peer(
                &dir,
                t,
                &[
                    "send",
                    "--handle",
                    "fan",
                    "--count",
                    &n.to_string(),
                    "--wait-for",
                    "3",
                ],
            )
        })
        .collect();
    let sender_ids: Vec<String> = senders.iter().map(|s| s.expect_line("ready ", T)).collect();
    let sent: Vec<Value> = senders.iter().map(summary).collect();
    for (rp, rid) in &receivers {
        let got = summary(rp);
        for sid in &sender_ids {
            let s = &got[sid];
            assert_eq!(s["count"], n, "receiver {rid} from {sid}: {got}");
            assert_eq!(s["first"], 1);
            assert_eq!(s["last"], n);
            assert_eq!(s["dups"], 0);
            assert_eq!(s["out_of_order"], 0);
        }
        // The reports say exactly what the receiver saw.
        for rep in &sent {
            assert_eq!(rep[rid]["acked"], n, "{rep}");
            assert_eq!(rep[rid]["failed"], 0, "{rep}");
            let endpoint = rep[rid]["endpoint"].as_str().unwrap_or_default();
            assert!(
                endpoint.starts_with(&format!("{t}://")),
                "{rid} reached at {endpoint}, not over {t}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_joining_mid_stream_gets_each_later_event_once_over_unix() {
    receiver_joining_mid_stream(Transport::Unix).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_joining_mid_stream_gets_each_later_event_once_over_tcp() {
    receiver_joining_mid_stream(Transport::Tcp).await
}

async fn receiver_joining_mid_stream(t: Transport) {
    let dir = TempDir::new("join");
    let (a, a_id) = receiver(&dir, t, "join", &["--until-seq", "3000"]);
    let mut tx = sender_in_process(&dir, "join").build().await.unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    let mut reports = Vec::new();
    let mut b = None;
    for i in 1..=3000u64 {
        if i == 1000 {
            b = Some(receiver(&dir, t, "join", &["--until-seq", "3000"]));
        }
        reports.push(tx.publish_bytes(i.to_be_bytes().to_vec()).await.unwrap());
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let mut acked_by: HashMap<String, Vec<u64>> = HashMap::new();
    for p in reports {
        let r = tokio::time::timeout(T, p).await.unwrap();
        assert!(r.failed.is_empty(), "{r:?}");
        all_over(t, std::slice::from_ref(&r));
        for a in r.acked {
            acked_by.entry(a.id.to_string()).or_default().push(r.seq);
        }
    }
    let (b, b_id) = b.unwrap();
    let sa = summary(&a);
    let sb = summary(&b);
    let sid = tx.id().to_string();
    assert_eq!(sa[&sid]["count"], 3000);
    let first = sb[&sid]["first"].as_u64().unwrap();
    // B registered (and said ready) before event 1000 was published, after event
    // 999: it cannot have anything earlier, and discovery may or may not have seen
    // it in time for 1000 itself.
    assert!(first >= 1000, "joined before event 1000, first {first}");
    assert!(first < 3000, "B got nothing until the end: first {first}");
    assert_eq!(sb[&sid]["last"], 3000);
    assert_eq!(sb[&sid]["count"].as_u64().unwrap(), 3000 - first + 1);
    assert_eq!(sb[&sid]["dups"], 0);
    assert_eq!(sb[&sid]["out_of_order"], 0);
    // The reports name B for exactly the events B received.
    let b_acked = &acked_by[&b_id];
    assert_eq!(b_acked.first(), Some(&first));
    assert_eq!(b_acked.len() as u64, 3000 - first + 1);
    assert_eq!(acked_by[&a_id].len(), 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_receiver_is_reported_failed_fast_and_others_lose_nothing_over_unix() {
    sigkilled_receiver(Transport::Unix).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_receiver_is_reported_failed_fast_and_others_lose_nothing_over_tcp() {
    sigkilled_receiver(Transport::Tcp).await
}

async fn sigkilled_receiver(t: Transport) {
    let dir = TempDir::new("kill");
    let rs: Vec<(Proc, String)> = (0..3)
        .map(|_| receiver(&dir, t, "kill", &["--until-seq", "4000"]))
        .collect();
    let mut tx = sender_in_process(&dir, "kill").build().await.unwrap();
    assert_eq!(tx.wait_for_receivers(3, T).await, 3);
    let (mut victim, survivors) = {
        let mut rs = rs;
        let v = rs.remove(0);
        (v, rs)
    };
    let victim_rid = victim.1.clone();
    // The sender says the victim failed through its event stream (its connection
    // ended, and any events it had not acknowledged failed); reports name it failed
    // for the events it had in flight. When it had acknowledged everything at the
    // moment of the kill and discovery drops its registration before the next send,
    // no report needs to name it, so the event stream is what is timed.
    let mut events = Box::pin(tx.events());
    let vid = victim_rid.clone();
    let left = tokio::spawn(async move {
        while let Some(ev) = events.next().await {
            match ev {
                SenderEvent::ReceiverLeft { receiver, reason }
                    if receiver.id.to_string() == vid =>
                {
                    return Some((Instant::now(), reason));
                }
                _ => {}
            }
        }
        None
    });
    // Collect reports concurrently, noting when the first failure for the victim lands.
    let (rep_tx, mut rep_rx) = tokio::sync::mpsc::unbounded_channel();
    let collector = tokio::spawn(async move {
        let mut first_fail: Option<Instant> = None;
        let mut reports = Vec::new();
        while let Some(p) = rep_rx.recv().await {
            let r: ipcbus::SendReport = tokio::time::timeout(T, p).await.unwrap();
            if first_fail.is_none() && r.failed.iter().any(|(f, _)| f.id.to_string() == victim_rid)
            {
                first_fail = Some(Instant::now());
            }
            reports.push(r);
        }
        (reports, first_fail)
    });
    let mut killed_at = None;
    for i in 1..=4000u64 {
        if i == 1500 {
            victim.0.kill();
            killed_at = Some(Instant::now());
        }
        rep_tx
            .send(tx.publish_bytes(i.to_be_bytes().to_vec()).await.unwrap())
            .unwrap();
        tokio::time::sleep(Duration::from_micros(300)).await;
    }
    drop(rep_tx);
    let (reports, first_fail) = collector.await.unwrap();
    let (left_at, why) = tokio::time::timeout(T, left)
        .await
        .expect("event stream")
        .unwrap()
        .expect("the victim's departure is reported");
    assert_eq!(why, FailReason::Disconnected);
    let killed_at = killed_at.unwrap();
    let detect = left_at.saturating_duration_since(killed_at);
    assert!(
        detect < Duration::from_secs(1),
        "failure reported after {detect:?}"
    );
    if let Some(t) = first_fail {
        let d = t.saturating_duration_since(killed_at);
        assert!(d < Duration::from_secs(1), "failed report after {d:?}");
    }
    let victim_id_s = victim.1.clone();
    for (p, rid) in &survivors {
        let s = summary(p);
        let sid = tx.id().to_string();
        assert_eq!(s[&sid]["count"], 4000, "{rid}: {s}");
        assert_eq!(s[&sid]["dups"], 0);
    }
    // Every report accounts for every targeted receiver; survivors acked all events.
    all_over(t, &reports);
    for r in &reports {
        for (f, why) in &r.failed {
            assert_eq!(
                f.id.to_string(),
                victim_id_s,
                "only the victim fails: {why}"
            );
        }
        assert!(r.acked.len() >= 2);
    }
    // The stale registry record is cleaned up, and the Unix socket the killed
    // process left.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<_> = ["receivers", "sockets"]
            .iter()
            .flat_map(|d| std::fs::read_dir(dir.path().join(d)).unwrap())
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(&victim_id_s))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stale record or socket still present: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_receiver_does_not_hold_up_the_others_over_unix() {
    stalled_receiver(Transport::Unix, 60_000).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_receiver_does_not_hold_up_the_others_over_tcp() {
    stalled_receiver(Transport::Tcp, 20_000).await
}

async fn stalled_receiver(t: Transport, n: u64) {
    let dir = TempDir::new("stall");
    let (_stalled, stalled_id) = receiver(
        &dir,
        t,
        "stall",
        &["--stall-after", "10", "--timeout", "60"],
    );
    let healthy: Vec<(Proc, String)> = (0..2)
        .map(|_| receiver(&dir, t, "stall", &["--expect", &n.to_string()]))
        .collect();
    let mut tx = sender_in_process(&dir, "stall")
        .send_timeout(Duration::from_secs(1))
        .queue_capacity(1024)
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(3, T).await, 3);
    let mut pending = std::collections::VecDeque::new();
    let mut per: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut tally = |r: ipcbus::SendReport| {
        all_over(t, std::slice::from_ref(&r));
        for a in &r.acked {
            per.entry(a.id.to_string()).or_default().0 += 1;
        }
        for (f, why) in &r.failed {
            assert!(
                matches!(why, FailReason::TimedOut | FailReason::Disconnected),
                "{why}"
            );
            per.entry(f.id.to_string()).or_default().1 += 1;
        }
    };
    for i in 1..=n {
        let payload = vec![(i % 251) as u8; 256];
        pending.push_back(tx.publish_bytes(payload).await.unwrap());
        while pending.len() > 5000 {
            tally(
                tokio::time::timeout(T, pending.pop_front().unwrap())
                    .await
                    .unwrap(),
            );
        }
    }
    for p in pending {
        tally(tokio::time::timeout(T, p).await.unwrap());
    }
    for (p, rid) in &healthy {
        let s = summary(p);
        assert_eq!(s[tx.id().to_string()]["count"], n, "{rid}");
        assert_eq!(per[rid], (n, 0), "healthy receiver {rid} acked everything");
    }
    let (acked, failed) = per.get(&stalled_id).copied().unwrap_or_default();
    assert!(acked <= 10, "stalled receiver acked {acked}");
    assert!(failed > 0, "stalled receiver reported failed");
}

#[test]
fn wrong_password_is_named_on_both_sides_over_unix() {
    wrong_password(Transport::Unix)
}

#[test]
fn wrong_password_is_named_on_both_sides_over_tcp() {
    wrong_password(Transport::Tcp)
}

fn wrong_password(t: Transport) {
    let dir = TempDir::new("pw");
    let mut cmd = Command::new(PEER);
    cmd.args([
        "recv",
        "--handle",
        "pw",
        "--password",
        "right",
        "--salt",
        "s",
        // Long enough for the sender's key derivation (Argon2id, slow on a loaded
        // machine) and handshake: a receiver gone by then leaves it no receiver at all.
        "--timeout",
        "8",
    ])
    .env("IPCBUS_RUNTIME_DIR", dir.path())
    .env("IPCBUS_TRANSPORTS", t.as_str())
    .env("RUST_LOG", "warn")
    .stderr(std::process::Stdio::piped());
    let mut recv = Proc::spawn(cmd);
    recv.expect_line("ready ", T);
    let s = peer(
        &dir,
        t,
        &[
            "send",
            "--handle",
            "pw",
            "--count",
            "1",
            "--password",
            "wrong",
            "--salt",
            "s",
        ],
    );
    let rep = summary(&s);
    let (_, entry) = rep
        .as_object()
        .unwrap()
        .iter()
        .next()
        .expect("one receiver in report");
    assert_eq!(entry["failed"], 1);
    let endpoint = entry["endpoint"].as_str().unwrap_or_default();
    assert!(endpoint.starts_with(&format!("{t}://")), "{rep}");
    let auth = entry["reasons"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(k, _)| k.starts_with("authentication failed"))
        .map(|(_, v)| v.clone());
    assert_eq!(auth, Some(serde_json::json!(1)), "{rep}");
    assert!(recv.wait_success(Duration::from_secs(20)));
    let err = recv.stderr_text();
    assert!(err.contains("authentication failed"), "receiver log: {err}");
}
