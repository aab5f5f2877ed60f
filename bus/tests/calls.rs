//! Calls end to end over real sockets, in process: round trips over TCP and Unix
//! sockets, with and without a key; pipelining; errors, panics, contract checks;
//! timeouts, cancellation, busy servers; calls to every server; calls and
//! notifications from a server back to its client; reconnects; hostile peers.

use std::future::IntoFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::StreamExt;
use ipcbus::{
    CallError, Client, Contract, Discovery, Endpoint, Handle, Key, Peer, RemoteCode, RemoteError,
    Security, Server, Service, Transport,
};
use ipcbus_proto::frame::{Flags, Kind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{handshake, read_frame, T};

/// A temporary directory, removed on drop; short, for the registry's sockets.
struct Tmp(std::path::PathBuf);

impl Tmp {
    fn new(tag: &str) -> Tmp {
        let p = std::env::temp_dir().join(format!(
            "ipcb-call-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }

    fn disc(&self) -> Discovery {
        Discovery::local_at(&self.0).unwrap()
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn h(s: &str) -> Handle {
    Handle::new(s).unwrap()
}

fn key() -> Key {
    Key::derive("calls", [1u8, 2, 3]).unwrap()
}

async fn echo_server(tmp: &Tmp, name: &str, t: Transport, sec: Security) -> Server {
    Server::builder(h(name))
        .discovery(tmp.disc())
        .transports([t])
        .security(sec)
        .concurrency(2048)
        .bind()
        .await
        .unwrap()
}

/// Serves: "panic" panics, "err" answers an application error with a detail,
/// "drop" drops the request, "sleep" never answers in time, else echoes.
fn spawn_echo(server: Server) {
    tokio::spawn(server.serve(
        |req| async move {
            match &req.body()[..] {
                b"panic" => panic!("asked to"),
                b"err" => {
                    let e = RemoteError::with_detail("bad thing", &(7u32, "x")).unwrap();
                    let _ = req.reply_err(e);
                }
                b"drop" => drop(req),
                b"sleep" => {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    drop(req);
                }
                _ => {
                    let b = req.body().clone();
                    let _ = req.reply_bytes(b);
                }
            }
        },
        2048,
    ));
}

async fn client(tmp: &Tmp, name: &str, sec: Security) -> Client {
    Client::builder(h(name))
        .discovery(tmp.disc())
        .security(sec)
        .timeout(T)
        .build()
        .await
        .unwrap()
}

async fn round_trip_and_pipelining(t: Transport, sec: Security) {
    let tmp = Tmp::new("rt");
    let server = echo_server(&tmp, "rt", t, sec.clone()).await;
    assert_eq!(server.endpoints()[0].transport(), t);
    spawn_echo(server);
    let c = client(&tmp, "rt", sec).await;
    let r = c.call_bytes("hello").await.unwrap();
    assert_eq!(&r.body()[..], b"hello");
    assert_eq!(r.server().unwrap().endpoint.transport(), t);
    // Typed.
    let r = c.call(&(1u32, "two")).await.unwrap();
    assert_eq!(r.decode::<(u32, String)>().unwrap(), (1, "two".to_owned()));
    // A large body (compression may or may not be used; it round-trips).
    let big = vec![b'z'; 200_000];
    let r = c.call_bytes(big.clone()).await.unwrap();
    assert_eq!(&r.body()[..], &big[..]);
    // Large bodies at once: more than a socket takes without waiting.
    let bigs = (0..4u8).map(|i| {
        let c = c.clone();
        async move {
            let body = vec![i; 512 << 10];
            let r = c.call_bytes(body.clone()).await.unwrap();
            assert_eq!(&r.body()[..], &body[..]);
        }
    });
    futures::future::join_all(bigs).await;
    // 1000 pipelined calls, every reply matched.
    let calls = (0..1000u32).map(|i| {
        let c = c.clone();
        async move {
            let r = c.call(&i).await.unwrap();
            assert_eq!(r.decode::<u32>().unwrap(), i);
        }
    });
    futures::future::join_all(calls).await;
    assert_eq!(c.in_flight(), 0);
    // Errors.
    match c.call_bytes("err").await {
        Err(CallError::Remote(e)) => {
            assert_eq!(e.code, RemoteCode::Application);
            assert_eq!(e.message, "bad thing");
            assert_eq!(e.decode_detail::<(u32, String)>().unwrap(), (7, "x".into()));
        }
        other => panic!("{other:?}"),
    }
    match c.call_bytes("drop").await {
        Err(CallError::Remote(e)) => assert_eq!(e.code, RemoteCode::NoReply),
        other => panic!("{other:?}"),
    }
    match c.call_bytes("panic").await {
        Err(CallError::Remote(e)) => {
            assert_eq!(e.code, RemoteCode::Panicked);
            assert_eq!(e.message, "handler panicked");
        }
        other => panic!("{other:?}"),
    }
    // The next call works.
    assert_eq!(&c.call_bytes("after").await.unwrap().body()[..], b"after");
}

#[tokio::test]
async fn round_trip_over_tcp() {
    round_trip_and_pipelining(Transport::Tcp, Security::LocalUser).await
}

#[tokio::test]
async fn round_trip_over_unix() {
    round_trip_and_pipelining(Transport::Unix, Security::LocalUser).await
}

#[tokio::test]
async fn round_trip_sealed_over_tcp() {
    round_trip_and_pipelining(Transport::Tcp, Security::Encrypt(key())).await
}

#[tokio::test]
async fn round_trip_sealed_over_unix() {
    round_trip_and_pipelining(Transport::Unix, Security::Encrypt(key())).await
}

#[tokio::test]
async fn wrong_key_is_refused_and_known_endpoints_work() {
    let tmp = Tmp::new("key");
    let server = echo_server(&tmp, "key", Transport::Tcp, Security::Encrypt(key())).await;
    let ep = server.endpoints()[0].clone();
    spawn_echo(server);
    let wrong = client(
        &tmp,
        "key",
        Security::Encrypt(Key::derive("no", [1u8, 2, 3]).unwrap()),
    )
    .await;
    match wrong.call_bytes("x").await {
        Err(CallError::Refused(text)) => assert!(text.contains("authentication"), "{text}"),
        other => panic!("{other:?}"),
    }
    // By endpoint, no registry.
    let by_ep = Client::builder(h("key"))
        .endpoint(ep)
        .security(Security::Encrypt(key()))
        .build()
        .await
        .unwrap();
    assert_eq!(&by_ep.call_bytes("ep").await.unwrap().body()[..], b"ep");
}

struct Calc {
    contract: Contract,
    cancelled: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
}

struct OnDrop(Arc<AtomicUsize>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Service for Calc {
    fn contract(&self) -> Contract {
        self.contract.clone()
    }

    fn call(
        &self,
        method: &str,
        body: Bytes,
        _peer: Peer,
    ) -> BoxFuture<'static, Result<Bytes, RemoteError>> {
        let method = method.to_owned();
        let contract = self.contract.clone();
        let cancelled = self.cancelled.clone();
        let running = self.running.clone();
        Box::pin(async move {
            match method.as_str() {
                "add" => {
                    let (a, b): (i32, i32) =
                        postcard::from_bytes(&body).map_err(RemoteError::bad_request)?;
                    assert!(Peer::current().is_some());
                    Ok(Bytes::from(postcard::to_allocvec(&(a + b)).unwrap()))
                }
                "hang" => {
                    running.fetch_add(1, Ordering::SeqCst);
                    let _guard = OnDrop(cancelled);
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok(Bytes::new())
                }
                "boom" => panic!("boom"),
                m => Err(RemoteError::unknown_method(&contract, m)),
            }
        })
    }
}

fn calc() -> (Calc, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let cancelled = Arc::new(AtomicUsize::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    (
        Calc {
            contract: Contract::new("Calc", 2).with_aliases(["OldCalc"]),
            cancelled: cancelled.clone(),
            running: running.clone(),
        },
        cancelled,
        running,
    )
}

#[tokio::test]
async fn services_contracts_panics_and_cancel() {
    let tmp = Tmp::new("svc");
    let (svc, cancelled, running) = calc();
    let _server = Server::builder(h("svc"))
        .discovery(tmp.disc())
        .service(svc)
        .concurrency(3)
        .bind()
        .await
        .unwrap();
    let c = client(&tmp, "svc", Security::LocalUser).await;
    let args = postcard::to_allocvec(&(2, 3)).unwrap();
    let add = |contract: Contract| c.call_bytes(args.clone()).method("add").contract(contract);
    let r = add(Contract::new("Calc", 2)).await.unwrap();
    assert_eq!(r.decode::<i32>().unwrap(), 5);
    // Alias, any version; untyped.
    assert_eq!(
        add(Contract::new("OldCalc", 9))
            .await
            .unwrap()
            .decode::<i32>()
            .unwrap(),
        5
    );
    assert_eq!(
        add(Contract::untyped())
            .await
            .unwrap()
            .decode::<i32>()
            .unwrap(),
        5
    );
    // Mismatch: another version, another name.
    match add(Contract::new("Calc", 1)).await {
        Err(CallError::ContractMismatch { ours, theirs, .. }) => {
            assert_eq!(ours, "Calc v1");
            assert_eq!(theirs, "Calc v2");
        }
        other => panic!("{other:?}"),
    }
    // Unknown method.
    match c
        .call_bytes("")
        .method("mul")
        .contract(Contract::new("Calc", 2))
        .await
    {
        Err(CallError::ContractMismatch {
            theirs, message, ..
        }) => {
            assert_eq!(theirs, "Calc v2");
            assert!(message.contains("mul"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // Bad arguments.
    match c.call_bytes("").method("add").await {
        Err(CallError::Remote(e)) => assert_eq!(e.code, RemoteCode::BadRequest),
        other => panic!("{other:?}"),
    }
    // A panicking service answers Panicked and goes on.
    match c.call_bytes("").method("boom").await {
        Err(CallError::Remote(e)) => assert_eq!(e.code, RemoteCode::Panicked),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        add(Contract::untyped())
            .await
            .unwrap()
            .decode::<i32>()
            .unwrap(),
        5
    );

    // A timeout cancels on the server, and frees the client's slot.
    let e = c
        .call_bytes("")
        .method("hang")
        .timeout(Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(e, CallError::Timeout(_)), "{e:?}");
    assert_eq!(c.in_flight(), 0);
    wait_until(|| cancelled.load(Ordering::SeqCst) == 1).await;

    // Dropping the call future cancels it on the server.
    let call = tokio::spawn(IntoFuture::into_future(c.call_bytes("").method("hang")));
    wait_until(|| running.load(Ordering::SeqCst) == 2).await;
    call.abort();
    wait_until(|| cancelled.load(Ordering::SeqCst) == 2).await;
    wait_until(|| c.in_flight() == 0).await;

    // Busy past the concurrency limit (3 per connection).
    let hanging: Vec<_> = (0..3)
        .map(|_| tokio::spawn(IntoFuture::into_future(c.call_bytes("").method("hang"))))
        .collect();
    wait_until(|| running.load(Ordering::SeqCst) == 5).await;
    match c.call_bytes("").method("hang").await {
        Err(CallError::Busy) => {}
        other => panic!("{other:?}"),
    }
    for t in hanging {
        t.abort();
    }
    wait_until(|| cancelled.load(Ordering::SeqCst) == 5).await;
    assert_eq!(
        add(Contract::untyped())
            .await
            .unwrap()
            .decode::<i32>()
            .unwrap(),
        5
    );
}

/// Polls `f` every 10 ms, for at most `T`.
async fn wait_until(f: impl Fn() -> bool) {
    let end = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < end, "condition not reached in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn no_servers_at_once_and_timeout_frees_the_slot() {
    let tmp = Tmp::new("none");
    let c = Client::builder(h("none"))
        .discovery(tmp.disc())
        .timeout(Duration::from_secs(20))
        .build()
        .await
        .unwrap();
    let start = Instant::now();
    assert!(matches!(
        c.call_bytes("x").await,
        Err(CallError::NoServers(_))
    ));
    assert!(start.elapsed() < Duration::from_secs(20));
    assert!(matches!(
        c.call_all_bytes("x").await,
        Err(CallError::NoServers(_))
    ));

    // A server that never answers: the call times out, the table is emptied.
    let mut server = Server::builder(h("none"))
        .discovery(tmp.disc())
        .bind()
        .await
        .unwrap();
    let held = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Some(r) = server.next_request().await {
            kept.push(r);
        }
    });
    let e = c
        .call_bytes("x")
        .timeout(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, CallError::Timeout(_)), "{e:?}");
    assert_eq!(c.in_flight(), 0);
    held.abort();
}

#[tokio::test]
async fn call_all_gathers_from_every_server() {
    let tmp = Tmp::new("all");
    for _ in 0..2 {
        let mut s = echo_server(&tmp, "all", Transport::Tcp, Security::LocalUser).await;
        tokio::spawn(async move {
            while let Some(r) = s.next_request().await {
                let id = r.peer().id();
                let _ = r.reply_bytes(id.to_string());
            }
        });
    }
    let c = client(&tmp, "all", Security::LocalUser).await;
    assert_eq!(c.wait_for_servers(2, T).await, 2);
    let all = c.call_all_bytes("x").await.unwrap();
    assert_eq!(all.len(), 2);
    assert_ne!(all[0].server.id, all[1].server.id);
    for g in &all {
        assert!(g.result.is_ok(), "{:?}", g.result);
    }
    // Calls spread over both servers.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..10 {
        seen.insert(c.call_bytes("y").await.unwrap().server().unwrap().id);
    }
    assert_eq!(seen.len(), 2);
}

#[tokio::test]
async fn server_calls_back_and_notifies_its_client() {
    let tmp = Tmp::new("back");
    let mut s = echo_server(&tmp, "back", Transport::Unix, Security::LocalUser).await;
    tokio::spawn(async move {
        while let Some(r) = s.next_request().await {
            let peer = r.peer().clone();
            tokio::spawn(async move {
                peer.notify("tick", &1u8).unwrap();
                let back = peer.call_bytes("question").await;
                let answer = match back {
                    Ok(b) => b.into_body(),
                    Err(e) => Bytes::from(e.to_string()),
                };
                let _ = r.reply_bytes(answer);
            });
        }
    });
    // Through the incoming stream.
    let c = client(&tmp, "back", Security::LocalUser).await;
    let mut incoming = c.incoming();
    let answer = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(r) = incoming.next().await {
            got.push((r.method().to_owned(), r.is_one_way()));
            if !r.is_one_way() {
                let _ = r.reply_bytes("answer");
                return got;
            }
        }
        got
    });
    let r = c.call_bytes("go").await.unwrap();
    assert_eq!(&r.body()[..], b"answer");
    let got = tokio::time::timeout(T, answer).await.unwrap().unwrap();
    assert_eq!(got, vec![("tick".to_owned(), true), (String::new(), false)]);

    // Through a callback service.
    struct Cb(Arc<AtomicUsize>);
    impl Service for Cb {
        fn contract(&self) -> Contract {
            Contract::untyped()
        }
        fn call(
            &self,
            m: &str,
            _: Bytes,
            _: Peer,
        ) -> BoxFuture<'static, Result<Bytes, RemoteError>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let m = m.to_owned();
            Box::pin(async move { Ok(Bytes::from(format!("cb {m}"))) })
        }
    }
    let n = Arc::new(AtomicUsize::new(0));
    let c2 = Client::builder(h("back"))
        .discovery(tmp.disc())
        .callback(Cb(n.clone()))
        .build()
        .await
        .unwrap();
    let r = c2.call_bytes("go").await.unwrap();
    assert_eq!(&r.body()[..], b"cb ");
    wait_until(|| n.load(Ordering::SeqCst) == 2).await;
}

#[tokio::test]
async fn on_connect_runs_again_after_a_restart_and_in_flight_calls_fail_disconnected() {
    let tmp = Tmp::new("re");
    let path = tmp.0.join("srv.sock");
    let start_server = || async {
        let s = Server::builder(h("re"))
            .discovery(tmp.disc())
            .bind_at(Endpoint::unix(&path))
            .bind()
            .await
            .unwrap();
        s
    };
    let s = start_server().await;
    let inits = Arc::new(AtomicUsize::new(0));
    let i2 = inits.clone();
    let c = Client::builder(h("re"))
        .endpoint(Endpoint::unix(&path))
        .security(Security::LocalUser)
        .discovery(tmp.disc())
        .timeout(T)
        .on_connect(move |peer: Peer| {
            let i2 = i2.clone();
            async move {
                peer.call_bytes("init").await?;
                i2.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    // The server answers "init" and holds everything else.
    let serve = |mut s: Server| {
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(r) = s.next_request().await {
                if &r.body()[..] == b"init" {
                    let _ = r.reply_bytes("ok");
                } else {
                    // Never answered, not even when the server goes (as if it died).
                    held.push(r);
                    std::mem::forget(held.pop());
                }
            }
        })
    };
    let task = serve(s);
    let call = tokio::spawn(IntoFuture::into_future(c.call_bytes("held")));
    wait_until(|| c.in_flight() == 1).await;
    assert_eq!(inits.load(Ordering::SeqCst), 1);
    // The server dies: the held call fails Disconnected.
    task.abort();
    let r = tokio::time::timeout(T, call).await.unwrap().unwrap();
    assert!(matches!(r, Err(CallError::Disconnected(_))), "{r:?}");
    // It comes back at the same path: on_connect runs again before the next call.
    let s = start_server().await;
    let task = serve(s);
    wait_until(|| inits.load(Ordering::SeqCst) == 2).await;
    task.abort();
}

#[tokio::test]
async fn senders_ignore_servers_and_clients_ignore_receivers() {
    let tmp = Tmp::new("roles");
    let mut rx = ipcbus::Receiver::builder(h("roles"))
        .discovery(tmp.disc())
        .bind()
        .await
        .unwrap();
    let s = echo_server(&tmp, "roles", Transport::Tcp, Security::LocalUser).await;
    spawn_echo(s);
    let c = client(&tmp, "roles", Security::LocalUser).await;
    assert_eq!(c.servers().len(), 1);
    assert_eq!(&c.call_bytes("x").await.unwrap().body()[..], b"x");
    let mut tx = ipcbus::Sender::builder(h("roles"))
        .discovery(tmp.disc())
        .build()
        .await
        .unwrap();
    assert_eq!(tx.wait_for_receivers(1, T).await, 1);
    assert_eq!(tx.receivers().len(), 1);
    let pending = tx.publish_bytes("ev").await.unwrap();
    let m = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
    assert_eq!(&m.payload()[..], b"ev");
    let report = tokio::time::timeout(T, pending).await.unwrap();
    assert_eq!(report.acked.len(), 1);
    assert!(report.failed.is_empty(), "{report:?}");
}

#[tokio::test]
async fn hostile_peer_closes_only_its_connection() {
    let tmp = Tmp::new("host");
    let server = Server::builder(h("host"))
        .discovery(tmp.disc())
        .transports([Transport::Tcp])
        .security(Security::Open)
        .bind()
        .await
        .unwrap();
    let ep = server.endpoints()[0].clone();
    spawn_echo(server);
    let c = client(&tmp, "host", Security::Open).await;
    assert_eq!(&c.call_bytes("a").await.unwrap().body()[..], b"a");

    // A reply to a call the server never made.
    let (mut raw, _) = handshake(ep.clone(), "host", ipcbus::SenderId::random(), None).await;
    let mut body = BytesMut::new();
    ipcbus_proto::call::Reply {
        id: 99,
        outcome: Ok(Bytes::from_static(b"?")),
    }
    .encode(&mut body);
    let mut out = BytesMut::new();
    ipcbus_proto::codec::put_frame(&mut out, Kind::Reply, Flags(0), 1, &body);
    raw.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let mut closed = false;
    for _ in 0..10 {
        match read_frame(&mut raw, &mut buf).await {
            None => {
                closed = true;
                break;
            }
            Some(f) if f.kind == Kind::Bye => {}
            Some(_) => {}
        }
    }
    assert!(closed);

    // Garbage after a good handshake.
    let (mut raw, _) = handshake(ep.clone(), "host", ipcbus::SenderId::random(), None).await;
    raw.write_all(&[0xff; 64]).await.unwrap();
    let mut b = [0u8; 256];
    let mut closed = false;
    for _ in 0..10 {
        match tokio::time::timeout(T, raw.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => {}
            Err(_) => break,
        }
    }
    assert!(closed);

    // A good request over a raw connection is answered.
    let (mut raw, _) = handshake(ep, "host", ipcbus::SenderId::random(), None).await;
    let mut body = BytesMut::new();
    ipcbus_proto::call::encode_request_head(&mut body, 1, 1000, 0, "", 0, "");
    body.extend_from_slice(b"raw");
    let mut out = BytesMut::new();
    ipcbus_proto::codec::put_frame(&mut out, Kind::Request, Flags(0), 1, &body);
    raw.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let f = read_frame(&mut raw, &mut buf).await.unwrap();
    assert_eq!(f.kind, Kind::Reply);
    let r = ipcbus_proto::call::Reply::parse(f.body.freeze()).unwrap();
    assert_eq!(r.id, 1);
    assert_eq!(r.outcome.unwrap(), Bytes::from_static(b"raw"));

    // The library's client was not disturbed.
    assert_eq!(&c.call_bytes("b").await.unwrap().body()[..], b"b");
}

/// The worked example of docs/PROTOCOL.md §8.7, byte for byte.
#[test]
fn protocol_md_example_bytes() {
    use ipcbus_proto::call::{encode_cancel, Reply, Request};
    use ipcbus_proto::codec::put_frame;
    let mut body = BytesMut::new();
    Request {
        id: 1,
        deadline_ms: 1000,
        flags: 0,
        contract: "Calc".into(),
        version: 2,
        method: "add".into(),
        body: Bytes::from(postcard::to_allocvec(&(1i32, 2i32)).unwrap()),
    }
    .encode(&mut body);
    let mut frame = BytesMut::new();
    put_frame(&mut frame, Kind::Request, Flags(0), 1, &body);
    assert_eq!(
        hex::encode(&frame),
        "00000024200000000000000000010000000000000001000003e8000443616c63000203616464 0204"
            .replace(' ', "")
    );
    let mut body = BytesMut::new();
    Reply {
        id: 1,
        outcome: Ok(Bytes::from(postcard::to_allocvec(&3i32).unwrap())),
    }
    .encode(&mut body);
    let mut frame = BytesMut::new();
    put_frame(&mut frame, Kind::Reply, Flags(0), 1, &body);
    assert_eq!(
        hex::encode(&frame),
        "0000001421000000000000000001000000000000000100 06".replace(' ', "")
    );
    let mut body = BytesMut::new();
    encode_cancel(&mut body, 0x0102);
    let mut frame = BytesMut::new();
    put_frame(&mut frame, Kind::Cancel, Flags(0), 2, &body);
    assert_eq!(
        hex::encode(&frame),
        "00000012220000000000000000020000000000000102"
    );
}

/// A service instance per connection, holding state of its own; `Peer::current`
/// in a `serve` handler.
#[tokio::test]
async fn per_connection_instances_and_current_peer() {
    struct Counter {
        n: AtomicUsize,
    }
    impl Service for Counter {
        fn contract(&self) -> Contract {
            Contract::new("Counter", 1)
        }
        fn call(
            &self,
            _: &str,
            _: Bytes,
            _: Peer,
        ) -> BoxFuture<'static, Result<Bytes, RemoteError>> {
            let n = self.n.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move { Ok(Bytes::from(n.to_string())) })
        }
    }
    let tmp = Tmp::new("fact");
    let made = Arc::new(AtomicUsize::new(0));
    let m2 = made.clone();
    let _server = Server::builder(h("fact"))
        .discovery(tmp.disc())
        .service_factory(move |_peer: &Peer| {
            m2.fetch_add(1, Ordering::SeqCst);
            Counter {
                n: AtomicUsize::new(0),
            }
        })
        .bind()
        .await
        .unwrap();
    let a = client(&tmp, "fact", Security::LocalUser).await;
    let b = client(&tmp, "fact", Security::LocalUser).await;
    for want in ["1", "2", "3"] {
        assert_eq!(&a.call_bytes("").await.unwrap().body()[..], want.as_bytes());
    }
    assert_eq!(&b.call_bytes("").await.unwrap().body()[..], b"1");
    assert_eq!(made.load(Ordering::SeqCst), 2);

    let tmp = Tmp::new("cur");
    let server = echo_server(&tmp, "cur", Transport::Tcp, Security::LocalUser).await;
    tokio::spawn(server.serve(
        |req| async move {
            let same = Peer::current().is_some_and(|p| p.id() == req.peer().id());
            let _ = req.reply(&same);
        },
        4,
    ));
    assert!(Peer::current().is_none());
    let c = client(&tmp, "cur", Security::LocalUser).await;
    assert!(c.call_bytes("").await.unwrap().decode::<bool>().unwrap());
}

/// Many clients, two servers, every reply matched; then a server that closes lets
/// its running calls finish, and a closed client fails its calls `Closed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_two_servers_then_close() {
    let tmp = Tmp::new("many");
    let mut servers = Vec::new();
    let slow_started = Arc::new(AtomicUsize::new(0));
    for _ in 0..2 {
        let started = slow_started.clone();
        let mut s = echo_server(&tmp, "many", Transport::Unix, Security::LocalUser).await;
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = s.next_request() => match r {
                        Some(r) => {
                            let started = started.clone();
                            tokio::spawn(async move {
                                if &r.body()[..] == b"slow" {
                                    started.fetch_add(1, Ordering::SeqCst);
                                    tokio::time::sleep(Duration::from_millis(300)).await;
                                }
                                let b = r.body().clone();
                                let _ = r.reply_bytes(b);
                            });
                        }
                        None => break,
                    },
                    _ = &mut stop_rx => break,
                }
            }
            s.close().await;
        });
        servers.push((stop_tx, task));
    }
    let mut clients = Vec::new();
    for _ in 0..20 {
        let c = client(&tmp, "many", Security::LocalUser).await;
        assert_eq!(c.wait_for_servers(2, T).await, 2);
        clients.push(c);
    }
    let calls = clients.iter().enumerate().flat_map(|(ci, c)| {
        (0..100u32).map(move |i| {
            let c = c.clone();
            async move {
                let v = (ci as u32, i);
                let r = c.call(&v).await.unwrap();
                assert_eq!(r.decode::<(u32, u32)>().unwrap(), v);
            }
        })
    });
    futures::future::join_all(calls).await;

    // A call running when its server closes still gets its reply.
    let c = clients.pop().unwrap();
    let slow = tokio::spawn(IntoFuture::into_future(c.call_bytes("slow")));
    // Running: taken by the server's handler.
    wait_until(|| slow_started.load(Ordering::SeqCst) == 1).await;
    let (stop, task) = servers.pop().unwrap();
    let (stop2, task2) = servers.pop().unwrap();
    let _ = stop.send(());
    let _ = stop2.send(());
    let r = tokio::time::timeout(T, slow).await.unwrap().unwrap();
    assert_eq!(&r.unwrap().body()[..], b"slow");
    task.await.unwrap();
    task2.await.unwrap();

    let c = clients.pop().unwrap();
    c.clone().close().await;
    assert!(matches!(c.call_bytes("x").await, Err(CallError::Closed)));
}

/// In `serve`, a call the client gives up on stops its handler.
#[tokio::test]
async fn cancel_stops_a_serve_handler() {
    let tmp = Tmp::new("cserve");
    let server = echo_server(&tmp, "cserve", Transport::Unix, Security::LocalUser).await;
    let stopped = Arc::new(AtomicUsize::new(0));
    let s2 = stopped.clone();
    tokio::spawn(server.serve(
        move |req| {
            let guard = OnDrop(s2.clone());
            async move {
                let _guard = guard;
                tokio::time::sleep(Duration::from_secs(60)).await;
                drop(req);
            }
        },
        8,
    ));
    let c = client(&tmp, "cserve", Security::LocalUser).await;
    let e = c
        .call_bytes("x")
        .timeout(Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(e, CallError::Timeout(_)), "{e:?}");
    wait_until(|| stopped.load(Ordering::SeqCst) == 1).await;
}

/// A burst of calls made right after a client starts spreads over every server, not
/// only the first one whose connection is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_at_start_spreads_over_every_server() {
    let tmp = Tmp::new("burst");
    for tag in ["a", "b"] {
        let mut s = echo_server(&tmp, "burst", Transport::Tcp, Security::LocalUser).await;
        tokio::spawn(async move {
            while let Some(r) = s.next_request().await {
                let _ = r.reply_bytes(tag);
            }
        });
    }
    // Build and call at once: no wait for the connections.
    let c = client(&tmp, "burst", Security::LocalUser).await;
    assert_eq!(c.servers().len(), 2);
    let calls = (0..20).map(|_| c.call_bytes("x").into_future());
    let mut seen = std::collections::HashMap::<Bytes, usize>::new();
    for r in futures::future::join_all(calls).await {
        *seen.entry(r.unwrap().into_body()).or_default() += 1;
    }
    assert_eq!(seen.len(), 2, "every call went to one server: {seen:?}");
}

/// A server that cannot be reached fails the call as `Refused` (it did not run),
/// not as `Disconnected` (which says it may have).
#[tokio::test]
async fn an_unreachable_server_is_refused_not_disconnected() {
    let tmp = Tmp::new("unreach");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gone_sock = tmp.0.join("gone.sock");
    for ep in [
        format!("tcp://127.0.0.1:{port}"),
        format!("unix://{}", gone_sock.display()),
    ] {
        let c = Client::builder(h("unreach"))
            .endpoint(ep.parse::<Endpoint>().unwrap())
            .security(Security::Open)
            .timeout(T)
            .build()
            .await
            .unwrap();
        for e in [
            c.call_bytes("x").await.unwrap_err(),
            c.call_all_bytes("x").await.unwrap()[0]
                .result
                .clone()
                .unwrap_err(),
        ] {
            assert!(matches!(e, CallError::Refused(_)), "{ep}: {e:?}");
            assert!(e.to_string().contains("did not run"), "{e}");
        }
    }
}
