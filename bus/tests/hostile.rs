//! Bad input on a receiver's port or Unix socket closes that connection only; the
//! receiver keeps serving everyone else. Frames are crafted by hand with the public
//! `proto` module. Each test runs over TCP and over a Unix socket (the receiver
//! listens on that one only, so the registry's sender uses it too).

use std::time::Duration;

use bytes::BytesMut;
use ipcbus::registry::record_now;
use ipcbus::{
    Discovery, Endpoint, FailReason, Handle, Key, Receiver, Security, Sender, SenderId, Transport,
};
use ipcbus_proto::codec::put_frame;
use ipcbus_proto::frame::{Flags, Hello, Kind, Mode, VERSION};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

mod common;
use common::{connect, handshake, read_frame, T};

/// A fresh directory name, short enough for the registry's Unix sockets.
fn tmp(tag: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::env::temp_dir().join(format!(
        "ipcbus-hostile-{tag}-{}-{nanos}",
        std::process::id()
    ))
}

/// The receiver closed the connection (EOF or reset) within the timeout.
async fn closed<S: AsyncRead + Unpin + ?Sized>(s: &mut S) -> bool {
    let mut b = [0u8; 1024];
    loop {
        match tokio::time::timeout(T, s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

async fn still_serves(disc: &Discovery, rx: &mut Receiver, security: Security) {
    let mut tx = Sender::builder(rx.handle().clone())
        .discovery(disc.clone())
        .security(security)
        .build()
        .await
        .unwrap();
    let p = tx.publish_bytes("still here").await.unwrap();
    let m = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
    assert_eq!(&m.payload()[..], b"still here");
    let r = tokio::time::timeout(T, p).await.unwrap();
    assert_eq!(r.acked.len(), 1, "{r:?}");
    // Over the transport under test, the receiver's only one.
    assert_eq!(r.acked[0].endpoint, rx.endpoints()[0]);
}

/// The receiver's one endpoint, of the transport under test.
fn only_endpoint(rx: &Receiver, t: Transport) -> Endpoint {
    assert_eq!(rx.endpoints().len(), 1, "{:?}", rx.endpoints());
    let ep = rx.endpoints()[0].clone();
    assert_eq!(ep.transport(), t);
    ep
}

#[tokio::test]
async fn garbage_truncated_and_oversized_input_closes_only_that_connection_over_tcp() {
    garbage_truncated_and_oversized_input(Transport::Tcp).await
}

#[tokio::test]
async fn garbage_truncated_and_oversized_input_closes_only_that_connection_over_unix() {
    garbage_truncated_and_oversized_input(Transport::Unix).await
}

async fn garbage_truncated_and_oversized_input(t: Transport) {
    let dir = tmp("bad");
    let disc = Discovery::local_at(&dir).unwrap();
    let mut rx = Receiver::builder(Handle::new("h").unwrap())
        .discovery(disc.clone())
        .security(Security::Open)
        .max_frame_len(1 << 20)
        .handshake_timeout(Duration::from_millis(500))
        .transports([t])
        .bind()
        .await
        .unwrap();
    let addr = only_endpoint(&rx, t);

    // Not our protocol at all.
    let mut s = connect(addr.clone()).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(closed(&mut s).await);

    // A hello that never finishes: freed by the handshake timeout.
    let mut s = connect(addr.clone()).await;
    s.write_all(&[0, 0, 0, 60, 1, 0]).await.unwrap();
    assert!(closed(&mut s).await);

    // Oversized length after the handshake: rejected from the prefix alone.
    let (mut s, _) = handshake(addr.clone(), "h", SenderId::random(), None).await;
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 0x10, 0])
        .await
        .unwrap();
    assert!(closed(&mut s).await);

    // A replayed sequence number.
    let (mut s, _) = handshake(addr.clone(), "h", SenderId::random(), None).await;
    let mut out = BytesMut::new();
    put_frame(&mut out, Kind::Data, Flags(0), 1, b"one");
    put_frame(&mut out, Kind::Data, Flags(0), 1, b"again");
    s.write_all(&out).await.unwrap();
    assert!(closed(&mut s).await);
    let m = rx.recv().await.unwrap();
    assert_eq!(&m.payload()[..], b"one");

    // A gzip bomb: 64 MiB of zeros in a small frame, past the 1 MiB cap.
    let (mut s, _) = handshake(addr.clone(), "h", SenderId::random(), None).await;
    let bomb = ipcbus_proto::compress::gzip(&vec![0u8; 64 << 20], 9).unwrap();
    assert!(bomb.len() < 1 << 20);
    let mut out = BytesMut::new();
    put_frame(&mut out, Kind::Data, Flags(Flags::COMPRESSED), 1, &bomb);
    s.write_all(&out).await.unwrap();
    assert!(closed(&mut s).await);

    // Wrong handle: the receiver rejects it in the handshake.
    let mut s = connect(addr.clone()).await;
    let mut body = BytesMut::new();
    Hello {
        version: VERSION,
        mode: Mode::Open,
        handle: Handle::new("other").unwrap(),
        sender: SenderId::random(),
        nonce: [1; 32],
    }
    .encode(&mut body);
    let mut out = BytesMut::new();
    put_frame(&mut out, Kind::Hello, Flags(0), 0, &body);
    s.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let f = read_frame(&mut s, &mut buf).await.unwrap();
    assert_eq!(f.kind, Kind::Reject);
    assert_eq!(f.body[0], 2, "reason: wrong handle");

    still_serves(&disc, &mut rx, Security::Open).await;
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn tampered_and_replayed_sealed_frames_close_the_connection_over_tcp() {
    tampered_and_replayed_sealed_frames(Transport::Tcp).await
}

#[tokio::test]
async fn tampered_and_replayed_sealed_frames_close_the_connection_over_unix() {
    tampered_and_replayed_sealed_frames(Transport::Unix).await
}

async fn tampered_and_replayed_sealed_frames(t: Transport) {
    let dir = tmp("sealed");
    let disc = Discovery::local_at(&dir).unwrap();
    let key = Key::derive("pw", [1u8, 2, 3]).unwrap();
    let mut rx = Receiver::builder(Handle::new("s").unwrap())
        .discovery(disc.clone())
        .key(key.clone())
        .transports([t])
        .bind()
        .await
        .unwrap();
    let addr = only_endpoint(&rx, t);

    // A correctly sealed frame, then the same bytes again (replay).
    let (mut s, sealer) = handshake(addr.clone(), "s", SenderId::random(), Some(&key)).await;
    let sealer = sealer.unwrap();
    let mut out = BytesMut::new();
    sealer.put_sealed(&mut out, Kind::Data, Flags(0), 1, b"first");
    let replay = out.clone();
    s.write_all(&out).await.unwrap();
    assert_eq!(&rx.recv().await.unwrap().payload()[..], b"first");
    s.write_all(&replay).await.unwrap();
    assert!(closed(&mut s).await);

    // A bit flipped in the ciphertext.
    let (mut s, sealer) = handshake(addr.clone(), "s", SenderId::random(), Some(&key)).await;
    let mut out = BytesMut::new();
    sealer
        .unwrap()
        .put_sealed(&mut out, Kind::Data, Flags(0), 1, b"tampered");
    let last = out.len() - 20;
    out[last] ^= 0x40;
    s.write_all(&out).await.unwrap();
    assert!(closed(&mut s).await);

    // A plain frame on a sealed connection.
    let (mut s, _) = handshake(addr.clone(), "s", SenderId::random(), Some(&key)).await;
    let mut out = BytesMut::new();
    put_frame(&mut out, Kind::Data, Flags(0), 1, b"plain");
    s.write_all(&out).await.unwrap();
    assert!(closed(&mut s).await);

    still_serves(&disc, &mut rx, Security::Encrypt(key)).await;
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn a_port_reused_by_another_handle_or_program_is_detected_and_dropped_over_tcp() {
    reused_by_another_handle_or_program(Transport::Tcp).await
}

#[tokio::test]
async fn a_socket_reused_by_another_handle_or_program_is_detected_and_dropped_over_unix() {
    reused_by_another_handle_or_program(Transport::Unix).await
}

/// A program that is not ipcbus, listening on `t`: it greets with an SSH banner and
/// reads what the client says until it hangs up.
async fn not_ipcbus(t: Transport, dir: &std::path::Path) -> Endpoint {
    async fn greet<S: tokio::io::AsyncWrite + AsyncRead + Unpin + Send + 'static>(mut s: S) {
        tokio::spawn(async move {
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
            let mut b = [0u8; 1024];
            while let Ok(Ok(n)) = tokio::time::timeout(T, s.read(&mut b)).await {
                if n == 0 {
                    break;
                }
            }
        });
    }
    match t {
        Transport::Tcp => {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let ep = Endpoint::Tcp(l.local_addr().unwrap());
            tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    greet(s).await;
                }
            });
            ep
        }
        Transport::Unix => {
            let path = dir.join("other.sock");
            let l = tokio::net::UnixListener::bind(&path).unwrap();
            tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    greet(s).await;
                }
            });
            Endpoint::unix(path)
        }
    }
}

async fn reused_by_another_handle_or_program(t: Transport) {
    let dir = tmp("reuse");
    let disc = Discovery::local_at(&dir).unwrap();
    let Discovery::Local(reg) = &disc else {
        unreachable!()
    };
    // A receiver of handle "b" now owns the port (or socket) a stale "a" record
    // points to.
    let mut rb = Receiver::builder(Handle::new("b").unwrap())
        .discovery(disc.clone())
        .transports([t])
        .bind()
        .await
        .unwrap();
    let rb_ep = only_endpoint(&rb, t);
    let stale = record_now(
        Handle::new("a").unwrap(),
        vec![rb_ep.clone()],
        ipcbus::ReceiverId::random(),
    );
    std::mem::forget(reg.register(&stale).unwrap());
    // And a program that is not ipcbus at all.
    let junk = record_now(
        Handle::new("a").unwrap(),
        vec![not_ipcbus(t, &dir).await],
        ipcbus::ReceiverId::random(),
    );
    std::mem::forget(reg.register(&junk).unwrap());

    let mut tx = Sender::builder(Handle::new("a").unwrap())
        .discovery(disc.clone())
        .build()
        .await
        .unwrap();
    let r = tokio::time::timeout(T, tx.send_bytes("x"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.failed.len(), 2, "{r:?}");
    for (who, why) in &r.failed {
        if who.endpoint == rb_ep {
            assert_eq!(
                *why,
                FailReason::Rejected(ipcbus::RejectReason::WrongHandle)
            );
        } else {
            assert!(matches!(why, FailReason::Protocol(_)), "{why:?}");
        }
    }
    // The wrong-handle record is removed; afterwards the sender targets nobody there.
    let deadline = tokio::time::Instant::now() + T;
    while reg
        .scan(Some(&Handle::new("a").unwrap()))
        .unwrap()
        .iter()
        .any(|r| r.receiver == stale.receiver)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stale record not removed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... and only the record: the receiver it pointed to still serves.
    still_serves(&disc, &mut rb, Security::LocalUser).await;
    std::fs::remove_dir_all(dir).ok();
}
