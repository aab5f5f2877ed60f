//! EPM clients with several addresses (`IPCBUS_EPM=a:4455,b:4455`): the first that
//! answers is used, and when it goes away receivers register and senders watch at the
//! next one by themselves. Two real `epm-service` processes on 127.0.0.1 port 0,
//! killed by pid when the test ends.

mod cli_support;

use std::time::Duration;

use cli_support::{epm_service, ipcbus_cmd, run, Epm as Service, Tmp};
use ipcbus::{Epm, Handle, Receiver, Sender};

const T: Duration = Duration::from_secs(15);

fn start() -> Service {
    Service::start(&epm_service(), &["--port", "0", "--bind", "127.0.0.1"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_and_senders_move_to_the_next_epm() {
    let (mut a, b) = (start(), start());
    let epm = Epm::parse(&format!("{},{}", a.addr, b.addr))
        .unwrap()
        .timeout(Duration::from_secs(2))
        .build();
    assert_eq!(epm.addrs(), [a.addr.clone(), b.addr.clone()]);
    let h: Handle = "moving".parse().unwrap();
    let mut rx1 = Receiver::builder(h.clone())
        .epm(epm.clone())
        .bind()
        .await
        .unwrap();
    let mut tx = Sender::builder(h.clone())
        .epm(epm.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    // Both are at the first EPM.
    assert_eq!(epm.lookup(&h).await.unwrap().len(), 1);

    a.proc.signal(libc::SIGKILL);
    assert!(a.proc.wait(T).is_some());
    // The receiver registers at the second EPM; a new receiver does too, and the
    // sender, watching there now, connects to it.
    let b_only = Epm::parse(&b.addr).unwrap().build();
    let deadline = tokio::time::Instant::now() + T;
    while b_only.lookup(&h).await.map_or(0, |r| r.len()) < 1 {
        assert!(tokio::time::Instant::now() < deadline, "rx1 never moved");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut rx2 = Receiver::builder(h.clone())
        .epm(epm.clone())
        .bind()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(2, T).await, 2);
    let p = tx.publish_bytes("after the move").await.unwrap();
    rx1.recv().await.unwrap();
    rx2.recv().await.unwrap();
    assert_eq!(p.await.acked.len(), 2);
    assert_eq!(b_only.lookup(&h).await.unwrap().len(), 2);
    tx.close().await;
    rx1.close().await;
    rx2.close().await;
}

#[test]
fn an_epm_that_is_down_is_skipped_and_lists_are_checked() {
    let b = start();
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let rt = Tmp::new("epm-list");
    let both = format!("{down},{}", b.addr);
    let mut c = ipcbus_cmd(rt.path());
    c.args(["list", "--json"]).env("IPCBUS_EPM", &both);
    let r = run(c, b"");
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(r.stdout.trim(), "[]", "{r:?}");
    // A malformed item is named; an empty one is an error too.
    for (bad, part) in [
        (format!("{},h:x", b.addr), "\"x\" is not a port"),
        (format!("{},", b.addr), "empty"),
    ] {
        let mut c = ipcbus_cmd(rt.path());
        c.args(["--epm", bad.as_str(), "list"]);
        let r = run(c, b"");
        assert_eq!(r.code(), 2, "{bad}: {r:?}");
        assert!(r.stderr.contains(part), "{bad}: {r:?}");
    }
    // Every EPM down: the last one's error, exit 1.
    let mut c = ipcbus_cmd(rt.path());
    c.args(["--epm", &format!("{down},{down}"), "list"]);
    let r = run(c, b"");
    assert_eq!(r.code(), 1, "{r:?}");
}
