//! A sender's events stay in order at the receiver across the sender's reconnects.
//!
//! Found by the soak test (`tests/src/bin/soak.rs`): a receiver paused with SIGSTOP
//! made its senders time out, report the unacknowledged events failed and connect
//! again; after SIGCONT the receiver handed the application the new connection's
//! events and then the old connection's late ones, so the application saw one
//! sender's sequence go backwards. Events from an older connection that arrive after
//! newer ones were taken are now dropped (their sender has reported them failed).

use std::time::Duration;

use bytes::BytesMut;
use ipcbus::{Discovery, Handle, Receiver, Security, SenderId};
use ipcbus_proto::codec::put_frame;
use ipcbus_proto::frame::{Flags, Kind};
use tokio::io::AsyncWriteExt;

mod common;
use common::{handshake, Stream, T};

/// An open-mode connection of sender `id`, by hand.
async fn connect_as(addr: std::net::SocketAddr, id: SenderId) -> Stream {
    handshake(addr, "order", id, None).await.0
}

async fn data(s: &mut Stream, seqs: &[u64]) {
    let mut out = BytesMut::new();
    for &q in seqs {
        put_frame(&mut out, Kind::Data, Flags(0), q, &q.to_be_bytes());
    }
    s.write_all(&out).await.unwrap();
}

#[tokio::test]
async fn late_events_of_an_old_connection_are_not_delivered_after_newer_ones() {
    let dir = std::env::temp_dir().join(format!(
        "ipcbus-reconnect-order-{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
    ));
    let mut rx = Receiver::builder(Handle::new("order").unwrap())
        .discovery(Discovery::local_at(&dir).unwrap())
        .security(Security::Open)
        .bind()
        .await
        .unwrap();
    let id = SenderId::random();
    let mut old = connect_as(rx.local_addr().unwrap(), id).await;
    let mut new = connect_as(rx.local_addr().unwrap(), id).await;

    // The new connection's event 10 is taken first.
    data(&mut new, &[10]).await;
    let m = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
    assert_eq!(m.seq(), 10);
    // Then the old connection's 5 and 6 come in, and after them the new one's 11.
    data(&mut old, &[5, 6]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    data(&mut new, &[11]).await;
    let m = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
    assert_eq!(
        m.seq(),
        11,
        "an older connection's event came after a newer one"
    );

    // Another sender is not affected by the first one's numbers.
    let mut other = connect_as(rx.local_addr().unwrap(), SenderId::random()).await;
    data(&mut other, &[1]).await;
    let m = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
    assert_eq!(m.seq(), 1);
    rx.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}
