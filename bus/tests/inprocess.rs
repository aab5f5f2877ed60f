//! In-process tests of the async layer over real loopback sockets.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use ipcbus::{Discovery, FailReason, Handle, Key, Receiver, Security, Sender, Transport};

fn registry(name: &str) -> (Discovery, PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "ipcbus-it-{name}-{}-{}",
        std::process::id(),
        rand_u32()
    ));
    (Discovery::local_at(&dir).unwrap(), dir)
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .elapsed()
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish() as u32
}

fn handle(s: &str) -> Handle {
    Handle::new(s).unwrap()
}

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn one_to_one_typed_and_raw() {
    let (disc, dir) = registry("one");
    let mut rx = Receiver::builder(handle("h"))
        .discovery(disc.clone())
        .bind()
        .await
        .unwrap();
    let mut tx = Sender::builder(handle("h"))
        .discovery(disc)
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    let recv = tokio::spawn(async move {
        let a = rx.recv().await.unwrap();
        let b = rx.recv().await.unwrap();
        (a, b, rx)
    });
    let r1 = tx.send(&("typed", 42u32)).await.unwrap();
    let r2 = tx.send_bytes(vec![7u8; 5000]).await.unwrap();
    let (a, b, _rx) = tokio::time::timeout(T, recv).await.unwrap().unwrap();
    assert_eq!(
        a.decode::<(String, u32)>().unwrap(),
        ("typed".to_string(), 42)
    );
    assert_eq!(a.seq(), 1);
    assert_eq!(b.payload().len(), 5000);
    assert_eq!(b.seq(), 2);
    assert_eq!(a.sender(), tx.id());
    assert_eq!((r1.acked.len(), r1.failed.len()), (1, 0));
    assert_eq!((r2.acked.len(), r2.failed.len(), r2.seq), (1, 0, 2));
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn no_receivers_is_not_an_error() {
    let (disc, dir) = registry("none");
    let mut tx = Sender::builder(handle("nobody"))
        .discovery(disc)
        .build()
        .await
        .unwrap();
    let r = tx.send_bytes("x").await.unwrap();
    assert_eq!(r.targeted(), 0);
    assert_eq!(r.seq, 1);
    std::fs::remove_dir_all(dir).ok();
}

/// Over the Unix sockets, which senders on the receivers' host use.
#[tokio::test]
async fn pipelined_fan_out_in_order_over_unix() {
    fan_out_in_order("fan", Transport::Unix, 20_000).await;
}

#[tokio::test]
async fn pipelined_fan_out_in_order_over_tcp() {
    fan_out_in_order("fantcp", Transport::Tcp, 10_000).await;
}

/// The same on a multi-threaded runtime: the publisher, the writers (which hand the
/// stage over when they run dry) and the readers run on different threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_fan_out_in_order_across_threads_over_unix() {
    fan_out_in_order("fanmt", Transport::Unix, 20_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_fan_out_in_order_across_threads_over_tcp() {
    fan_out_in_order("fanmttcp", Transport::Tcp, 10_000).await;
}

/// A burst queued without a wait, then no more publishing: the last events staged
/// must still reach every receiver (a writer that runs dry takes them).
#[tokio::test]
async fn a_burst_then_silence_delivers_everything() {
    let (disc, dir) = registry("burst");
    let mut rxs = Vec::new();
    for _ in 0..2 {
        rxs.push(
            Receiver::builder(handle("burst"))
                .discovery(disc.clone())
                .queue_capacity(1 << 16)
                .bind()
                .await
                .unwrap(),
        );
    }
    let mut tx = Sender::builder(handle("burst"))
        .discovery(disc)
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(2, T).await, 2);
    let n = 30_001u64;
    let readers: Vec<_> = rxs
        .into_iter()
        .map(|mut rx| {
            tokio::spawn(async move {
                for expect in 1..=n {
                    let m = tokio::time::timeout(T, rx.next()).await.unwrap().unwrap();
                    assert_eq!(m.seq(), expect);
                }
                rx
            })
        })
        .collect();
    for i in 1..=n {
        tx.queue_bytes(i.to_be_bytes()).await.unwrap();
    }
    // Nothing else is published: no later event pushes these out.
    let r = tokio::time::timeout(T, tx.last_report()).await.unwrap();
    assert_eq!((r.seq, r.acked.len()), (n, 2), "{r:?}");
    for r in readers {
        tokio::time::timeout(T, r).await.unwrap().unwrap();
    }
    std::fs::remove_dir_all(dir).ok();
}

async fn fan_out_in_order(name: &str, t: Transport, n: u64) {
    let (disc, dir) = registry(name);
    let mut rxs = Vec::new();
    for _ in 0..3 {
        rxs.push(
            Receiver::builder(handle(name))
                .discovery(disc.clone())
                .transports([t])
                .bind()
                .await
                .unwrap(),
        );
    }
    let mut tx = Sender::builder(handle(name))
        .discovery(disc)
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(3, T).await, 3);
    assert!(tx.receivers().iter().all(|r| r.endpoint.transport() == t));
    let readers: Vec<_> = rxs
        .into_iter()
        .map(|mut rx| {
            tokio::spawn(async move {
                let mut expect = 1;
                while expect <= n {
                    let m = tokio::time::timeout(T, rx.next()).await.unwrap().unwrap();
                    assert_eq!(m.seq(), expect);
                    assert_eq!(&m.payload()[..], expect.to_be_bytes());
                    expect += 1;
                }
                rx
            })
        })
        .collect();
    let mut pending = std::collections::VecDeque::new();
    for i in 1..=n {
        pending.push_back(tx.publish_bytes(i.to_be_bytes().to_vec()).await.unwrap());
        if pending.len() > 5000 {
            let r = pending.pop_front().unwrap().await;
            assert_eq!(r.acked.len(), 3, "{r:?}");
        }
    }
    for p in pending {
        let r = tokio::time::timeout(T, p).await.unwrap();
        assert_eq!(r.acked.len(), 3, "{r:?}");
    }
    for r in readers {
        tokio::time::timeout(T, r).await.unwrap().unwrap();
    }
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn encrypted_round_trip_and_wrong_key() {
    let (disc, dir) = registry("enc");
    let key = Key::derive("secret", [1u8, 2, 3]).unwrap();
    let mut rx = Receiver::builder(handle("enc"))
        .discovery(disc.clone())
        .key(key.clone())
        .bind()
        .await
        .unwrap();
    let mut tx = Sender::builder(handle("enc"))
        .discovery(disc.clone())
        .key(key)
        .build()
        .await
        .unwrap();
    let recv = tokio::spawn(async move { rx.recv().await.map(|m| m.into_payload()) });
    let r = tx.send_bytes("top secret".repeat(100)).await.unwrap();
    assert_eq!(r.acked.len(), 1, "{r:?}");
    assert_eq!(
        recv.await.unwrap().unwrap(),
        "top secret".repeat(100).as_bytes()
    );

    let wrong = Key::derive("other", [1u8, 2, 3]).unwrap();
    let _rx2 = Receiver::builder(handle("enc2"))
        .discovery(disc.clone())
        .key(wrong)
        .bind()
        .await
        .unwrap();
    let mut tx2 = Sender::builder(handle("enc2"))
        .discovery(disc.clone())
        .security(Security::Encrypt(
            Key::derive("secret", [1u8, 2, 3]).unwrap(),
        ))
        .build()
        .await
        .unwrap();
    let r = tx2.send_bytes("x").await.unwrap();
    assert_eq!(r.failed.len(), 1);
    assert_eq!(r.failed[0].1, FailReason::AuthenticationFailed);
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn a_capture_of_encrypted_traffic_holds_no_plaintext() {
    // The receiver registers in one registry; the sender looks in another where a
    // record points at a recording proxy in front of the receiver.
    let (disc_rx, dir_rx) = registry("cap-rx");
    let (disc_tx, dir_tx) = registry("cap-tx");
    let key = Key::derive("pw", [1u8, 2, 3]).unwrap();
    let mut rx = Receiver::builder(handle("cap"))
        .discovery(disc_rx)
        .key(key.clone())
        .bind()
        .await
        .unwrap();
    let (proxy, capture) = recording_proxy(rx.local_addr().unwrap()).await;
    let Discovery::Local(reg) = &disc_tx else {
        unreachable!()
    };
    let _reg = reg
        .register(&ipcbus::registry::record_now(
            handle("cap"),
            vec![proxy.into()],
            rx.id(),
        ))
        .unwrap();
    let mut tx = Sender::builder(handle("cap"))
        .discovery(disc_tx.clone())
        .key(key)
        .compress(true) // on loopback, compression is off unless forced
        .build()
        .await
        .unwrap();
    let small = "PLAINTEXT-MARKER-small";
    let big = "PLAINTEXT-MARKER-big ".repeat(200); // compressed, then sealed
    let p1 = tx.publish_bytes(small).await.unwrap();
    let p2 = tx.publish(&big).await.unwrap();
    assert_eq!(&rx.recv().await.unwrap().payload()[..], small.as_bytes());
    assert_eq!(rx.recv().await.unwrap().decode::<String>().unwrap(), big);
    assert_eq!(tokio::time::timeout(T, p1).await.unwrap().acked.len(), 1);
    assert_eq!(tokio::time::timeout(T, p2).await.unwrap().acked.len(), 1);
    tx.close().await;
    rx.close().await;
    let bytes = capture.all().await;
    assert!(bytes.len() > 200, "captured {} bytes", bytes.len());
    assert!(
        !bytes.windows(9).any(|w| w == b"PLAINTEXT"),
        "plaintext visible on the wire"
    );
    std::fs::remove_dir_all(dir_rx).ok();
    std::fs::remove_dir_all(dir_tx).ok();
}

#[tokio::test]
async fn allowed_ports_bind_the_first_free_one_and_say_when_all_are_taken() {
    let (disc, dir) = registry("ports");
    // Two ports we hold, then one we free again: the receiver must skip the held ones.
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ports = [
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
        free.local_addr().unwrap().port(),
    ];
    drop(free);
    let rx = Receiver::builder(handle("ports"))
        .discovery(disc.clone())
        .allowed_ports(ports)
        .bind()
        .await
        .unwrap();
    assert_eq!(rx.local_addr().unwrap().port(), ports[2]);
    let err = Receiver::builder(handle("ports"))
        .discovery(disc)
        .allowed_ports(ports)
        .bind()
        .await
        .unwrap_err();
    assert!(
        matches!(err, ipcbus::BindError::PortsExhausted { tried: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("all 3 allowed ports"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn queue_bytes_without_reports_delivers_in_order_and_reports_failures() {
    let (disc, dir) = registry("queue");
    let mut keep = Receiver::builder(handle("queue"))
        .discovery(disc.clone())
        .bind()
        .await
        .unwrap();
    let mut gone = Some(
        Receiver::builder(handle("queue"))
            .discovery(disc.clone())
            .bind()
            .await
            .unwrap(),
    );
    let mut tx = Sender::builder(handle("queue"))
        .discovery(disc)
        .queue_capacity(64)
        .build()
        .await
        .unwrap();
    // Nothing sent yet: an empty report.
    let r = tx.last_report().await;
    assert_eq!((r.seq, r.targeted()), (0, 0));
    assert_eq!(tx.wait_for_receivers(2, T).await, 2);
    let mut events = Box::pin(tx.events());
    let n = 5_000u64;
    let reader = tokio::spawn(async move {
        for expect in 1..=n {
            let m = tokio::time::timeout(T, keep.next()).await.unwrap().unwrap();
            assert_eq!(m.seq(), expect);
            assert_eq!(&m.payload()[..], expect.to_be_bytes());
        }
        keep
    });
    // `gone` takes nothing and is dropped after 50 events (inside its window of 64).
    for i in 1..=n {
        if i == 51 {
            drop(gone.take());
        }
        assert_eq!(tx.queue_bytes(i.to_be_bytes().to_vec()).await.unwrap(), i);
    }
    let r = tokio::time::timeout(T, tx.last_report()).await.unwrap();
    assert_eq!(r.seq, n);
    assert_eq!(r.acked.len(), 1, "{r:?}");
    assert!(r.failed.len() <= 1, "{r:?}");
    tokio::time::timeout(T, tx.flush()).await.unwrap();
    // The events the dropped receiver did not take are reported failed, from 1.
    loop {
        let ev = tokio::time::timeout(T, events.next())
            .await
            .unwrap()
            .unwrap();
        if let ipcbus::SenderEvent::SendFailed {
            first_seq: 1,
            last_seq,
            ..
        } = ev
        {
            assert!(last_seq >= 50, "{last_seq}");
            break;
        }
    }
    tokio::time::timeout(T, reader).await.unwrap().unwrap();
    std::fs::remove_dir_all(dir).ok();
}

/// The only receiver stops reading, so its writer blocks in a write; a tail of events
/// is staged behind it; then the receiver goes away. Every event, the staged tail
/// included, must be reported failed on `events()` (no later publish comes to hand
/// the tail over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_tail_is_reported_when_its_receiver_goes() {
    let (disc, dir) = registry("tail");
    let rx = Receiver::builder(handle("tail"))
        .discovery(disc.clone())
        .bind()
        .await
        .unwrap();
    let mut tx = Sender::builder(handle("tail"))
        .discovery(disc)
        .buffer_limit(256 << 20)
        .compress(false)
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    let mut events = Box::pin(tx.events());
    // Enough that the receiver's queue and both socket buffers fill up.
    let payload = vec![0x5a_u8; 1024];
    for _ in 0..30_000 {
        tx.queue_bytes(&payload).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut last = 0;
    for _ in 0..3 {
        last = tx.queue_bytes(b"tail").await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(rx);
    let r = tokio::time::timeout(T, tx.last_report()).await.unwrap();
    assert_eq!(
        (r.seq, r.acked.len(), r.failed.len()),
        (last, 0, 1),
        "{r:?}"
    );
    let mut reported_up_to = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while reported_up_to < last {
        let Ok(Some(ev)) = tokio::time::timeout_at(deadline, events.next()).await else {
            break;
        };
        if let ipcbus::SenderEvent::SendFailed { last_seq, .. } = ev {
            reported_up_to = reported_up_to.max(last_seq);
        }
    }
    assert_eq!(reported_up_to, last, "the staged tail was never reported");
    std::fs::remove_dir_all(dir).ok();
}

/// What a recording proxy saw, in each direction, as it passes (readable while the
/// connection is open); `done` ends when both directions have closed.
struct Capture {
    up: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    down: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    done: tokio::task::JoinHandle<()>,
}

impl Capture {
    /// Everything, once both directions have closed.
    async fn all(self) -> Vec<u8> {
        tokio::time::timeout(T, self.done).await.unwrap().unwrap();
        let mut all = self.up.lock().unwrap().clone();
        all.extend_from_slice(&self.down.lock().unwrap());
        all
    }
}

/// A proxy in front of `to` for one connection, recording both directions.
async fn recording_proxy(to: std::net::SocketAddr) -> (std::net::SocketAddr, Capture) {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    async fn pump(
        mut from: impl AsyncRead + Unpin,
        mut to: impl AsyncWrite + Unpin,
        seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    ) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                break;
            }
            seen.lock().unwrap().extend_from_slice(&buf[..n]);
        }
        let _ = to.shutdown().await;
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let up = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let down = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (up2, down2) = (up.clone(), down.clone());
    let done = tokio::spawn(async move {
        let (a, _) = l.accept().await.unwrap();
        let b = tokio::net::TcpStream::connect(to).await.unwrap();
        let (ar, aw) = a.into_split();
        let (br, bw) = b.into_split();
        tokio::join!(pump(ar, bw, up2), pump(br, aw, down2));
    });
    (addr, Capture { up, down, done })
}

/// The frames of one direction of a capture: (kind, body) of each.
fn frames(capture: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = capture;
    while rest.len() >= 4 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < 10 || rest.len() < 4 + len {
            break;
        }
        out.push((rest[4], rest[14..4 + len].to_vec()));
        rest = &rest[4 + len..];
    }
    out
}

/// Waiting for a report asks every receiver for a prompt acknowledgement (an
/// AckRequest naming the event) at once, not one receiver after another: while no
/// receiver has taken the event, every connection already carries the request.
#[tokio::test]
async fn a_waiting_report_asks_every_receiver_at_once() {
    let (disc_rx, dir_rx) = registry("ask-rx");
    let (disc_tx, dir_tx) = registry("ask-tx");
    let Discovery::Local(reg) = &disc_tx else {
        unreachable!()
    };
    let mut rxs = Vec::new();
    let mut captures = Vec::new();
    let mut regs = Vec::new();
    for _ in 0..3 {
        let rx = Receiver::builder(handle("ask"))
            .discovery(disc_rx.clone())
            .bind()
            .await
            .unwrap();
        let (proxy, capture) = recording_proxy(rx.local_addr().unwrap()).await;
        regs.push(
            reg.register(&ipcbus::registry::record_now(
                handle("ask"),
                vec![proxy.into()],
                rx.id(),
            ))
            .unwrap(),
        );
        captures.push(capture);
        rxs.push(rx);
    }
    // Local-user mode on both sides: the sender's registry needs the same secret.
    std::fs::copy(dir_rx.join("secret"), dir_tx.join("secret")).unwrap();
    let mut tx = Sender::builder(handle("ask"))
        .discovery(disc_tx.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(3, T).await, 3);
    let mut pending = tx.publish_bytes(&b"question"[..]).await.unwrap();
    // Nobody takes the event; the report is awaited for a while.
    let waited = tokio::time::timeout(Duration::from_millis(300), &mut pending).await;
    assert!(
        waited.is_err(),
        "resolved although no receiver took the event"
    );
    // Still nobody has taken it, and every connection carries the request.
    for capture in &captures {
        let bytes = capture.up.lock().unwrap().clone();
        let asked = frames(&bytes)
            .into_iter()
            .any(|(kind, body)| kind == 0x13 && body == 1u64.to_be_bytes());
        assert!(
            asked,
            "a receiver's connection carried no AckRequest for event 1"
        );
    }
    for rx in rxs {
        rx.close().await;
    }
    let r = tokio::time::timeout(T, pending).await.unwrap();
    assert_eq!(r.failed.len(), 3, "{r:?}");
    tx.close().await;
    drop(regs);
    std::fs::remove_dir_all(dir_rx).ok();
    std::fs::remove_dir_all(dir_tx).ok();
}
