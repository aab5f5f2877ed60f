//! `Sender::stats` and `Receiver::stats` over real loopback sockets.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use ipcbus::{
    Discovery, FailKind, FailReason, Handle, Key, Receiver, RejectKind, Security, Sender,
    SenderEvent,
};

const T: Duration = Duration::from_secs(10);

fn registry(name: &str) -> (Discovery, PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "ipcbus-stats-{name}-{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    ));
    (Discovery::local_at(&dir).unwrap(), dir)
}

fn handle(s: &str) -> Handle {
    Handle::new(s).unwrap()
}

async fn take(rx: &mut Receiver, n: usize) {
    for _ in 0..n {
        tokio::time::timeout(T, rx.recv())
            .await
            .expect("an event in time")
            .expect("an event");
    }
}

/// One sender, two receivers; one closes with five events not taken.
#[tokio::test]
async fn deliveries_failures_and_receivers_are_counted() {
    let (disc, dir) = registry("two");
    let bind = || {
        Receiver::builder(handle("stats"))
            .discovery(disc.clone())
            .security(Security::Open)
            .bind()
    };
    let mut a = bind().await.unwrap();
    let mut b = bind().await.unwrap();
    let mut tx = Sender::builder(handle("stats"))
        .discovery(disc.clone())
        .security(Security::Open)
        .build()
        .await
        .unwrap();
    let mut events = tx.events();
    assert_eq!(tx.wait_for_receivers(2, T).await, 2);

    for _ in 0..10 {
        tx.queue_bytes(b"0123456789").await.unwrap();
    }
    take(&mut a, 10).await;
    take(&mut b, 10).await;
    tx.flush().await;
    let s = tx.stats();
    assert_eq!(
        (s.published, s.payload_bytes, s.acked),
        (10, 100, 20),
        "{s:?}"
    );
    assert_eq!(s.acked_events, 10);
    assert_eq!(s.failed_total(), 0);
    assert_eq!((s.connected_receivers, s.known_receivers), (2, 2));
    assert_eq!((s.connects, s.handshakes, s.reconnects), (2, 2, 0));
    // At least the 10 frames to each receiver (14-byte header each).
    assert!(s.bytes_written >= 2 * 10 * 24, "{s:?}");

    // Five more: `a` takes them, `b` closes without.
    for _ in 0..5 {
        tx.queue_bytes(b"abcde").await.unwrap();
    }
    take(&mut a, 5).await;
    assert_eq!(b.stats().taken, 10);
    assert_eq!(b.stats().payload_bytes, 100);
    b.close().await;
    tokio::time::timeout(T, tx.flush()).await.unwrap();
    assert!(!tx.last_report().await.all_acked());
    tokio::time::timeout(T, async {
        while let Some(ev) = events.next().await {
            if let SenderEvent::ReceiverLeft { reason, .. } = ev {
                assert_eq!(reason, FailReason::ReceiverLeft);
                break;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(tx.receivers().len(), 1);

    for _ in 0..3 {
        tx.queue_bytes(b"xyz").await.unwrap();
    }
    take(&mut a, 3).await;
    tx.flush().await;
    let s = tx.stats();
    assert_eq!(s.published, 18);
    assert_eq!(s.payload_bytes, 100 + 25 + 9);
    assert_eq!(s.acked, 10 + 10 + 5 + 3, "{s:?}");
    // The five `b` did not take were sent to both: not acknowledged by all.
    assert_eq!(s.acked_events, 10 + 3, "{s:?}");
    assert_eq!(s.failed.get(FailKind::ReceiverClosed), 5, "{s:?}");
    assert_eq!(s.failed_total(), 5);
    assert_eq!((s.connected_receivers, s.known_receivers), (1, 1));
    assert_eq!((s.connects, s.handshakes, s.reconnects), (2, 2, 0));

    let ra = a.stats();
    assert_eq!((ra.taken, ra.payload_bytes), (18, 134), "{ra:?}");
    assert_eq!((ra.accepted, ra.handshakes, ra.closed), (1, 1, 0));
    assert_eq!(ra.connected_senders, 1);
    assert_eq!(ra.rejected_total(), 0);
    assert!(ra.bytes_read >= 18 * 14, "{ra:?}");

    // The JSON form: field names and every failure label.
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["failed"]["receiver_closed"], 5);
    assert_eq!(json["failed"]["timed_out"], 0);
    assert_eq!(json["compression"]["eligible"], 0);
    let json = serde_json::to_value(&ra).unwrap();
    assert_eq!(json["rejected"]["authentication_failed"], 0);
    assert_eq!(json["taken"], 18);

    tx.close().await;
    // The sender's goodbye ends `a`'s connection.
    tokio::time::timeout(T, async {
        while a.stats().connected_senders > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(a.stats().closed, 1);
    a.close().await;
    std::fs::remove_dir_all(dir).ok();
}

/// A sender with another key: a failed delivery for it, a rejected handshake for the
/// receiver.
#[tokio::test]
async fn a_wrong_key_is_a_rejected_handshake() {
    let (disc, dir) = registry("key");
    let rx = Receiver::builder(handle("stats-key"))
        .discovery(disc.clone())
        .key(Key::derive("right", [1u8, 2, 3]).unwrap())
        .bind()
        .await
        .unwrap();
    let mut tx = Sender::builder(handle("stats-key"))
        .discovery(disc)
        .key(Key::derive("wrong", [1u8, 2, 3]).unwrap())
        .build()
        .await
        .unwrap();
    let r = tx.send_bytes("x").await.unwrap();
    assert_eq!(r.failed[0].1, FailReason::AuthenticationFailed);
    let s = tx.stats();
    assert_eq!(s.failed.get(FailKind::AuthenticationFailed), 1, "{s:?}");
    assert_eq!(s.acked, 0);
    assert_eq!((s.connects, s.handshakes, s.connected_receivers), (1, 0, 0));

    tokio::time::timeout(T, async {
        while rx.stats().rejected_total() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    let st = rx.stats();
    assert!(
        st.rejected.get(RejectKind::AuthenticationFailed) >= 1,
        "{st:?}"
    );
    assert_eq!(
        st.rejected_total(),
        st.rejected.get(RejectKind::AuthenticationFailed)
    );
    assert!(st.accepted >= 1);
    assert_eq!((st.handshakes, st.taken, st.connected_senders), (0, 0, 0));
    tx.close().await;
    rx.close().await;
    std::fs::remove_dir_all(dir).ok();
}

/// A receiver that takes nothing times out; the sender counts the failures, drops
/// the connection, and reconnects while the receiver stays registered.
#[tokio::test]
async fn a_timed_out_receiver_is_counted_and_reconnected() {
    let (disc, dir) = registry("timeout");
    let rx = Receiver::builder(handle("stats-slow"))
        .discovery(disc.clone())
        .security(Security::Open)
        .queue_capacity(1)
        .bind()
        .await
        .unwrap();
    let mut tx = Sender::builder(handle("stats-slow"))
        .discovery(disc)
        .security(Security::Open)
        .queue_capacity(4)
        .send_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    // Four fill the window; the fifth waits, times out, and fails the connection.
    for _ in 0..5 {
        tx.queue_bytes(b"slow").await.unwrap();
    }
    tokio::time::timeout(T, tx.flush()).await.unwrap();
    let s = tx.stats();
    assert_eq!(s.failed.get(FailKind::TimedOut), 5, "{s:?}");
    assert_eq!((s.published, s.acked, s.acked_events), (5, 0, 0));
    tokio::time::timeout(T, async {
        loop {
            tx.receivers();
            let s = tx.stats();
            if s.reconnects >= 1 && s.handshakes >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a reconnect");
    let s = tx.stats();
    assert!(s.connects >= 2, "{s:?}");
    assert_eq!(s.failed_total(), 5, "{s:?}");
    tokio::time::timeout(T, async {
        while rx.stats().closed == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the timed-out connection closed at the receiver");
    assert!(rx.stats().handshakes >= 2);
    tx.close().await;
    rx.close().await;
    std::fs::remove_dir_all(dir).ok();
}
