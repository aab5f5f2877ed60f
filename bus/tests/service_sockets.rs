//! `#[ipcbus::service]` over real sockets, in process: a typed client and server
//! over TCP and Unix sockets, with and without a key; typed errors, panics, contract
//! mismatches and aliases, untyped calls to a typed server, per-connection instances,
//! and callbacks from the server into its client through the callback trait.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use ipcbus::{
    CallError, Client, Discovery, Handle, Key, Peer, RemoteCode, Security, Server, ServiceError,
    Transport,
};

/// The bound of every wait.
const T: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CalcError {
    Overflow,
    /// A call back into the client failed.
    Callback(String),
}

/// What the server reports back to the client that called `Calc::job`.
#[ipcbus::service(name = "test.progress")]
pub trait Progress {
    /// Step `done` of `of`; the client answers `done * 10`.
    async fn step(&self, done: u32, of: u32) -> u32;
}

#[ipcbus::service(name = "Calc", version = 2, aliases = ["calc.v1"], callback = Progress)]
pub trait Calc {
    async fn add(&self, a: i64, b: i64) -> Result<i64, CalcError>;
    /// Panics.
    async fn boom(&self) -> u8;
    /// How many `add`s this instance ran.
    async fn count(&self) -> u64;
    /// Sleeps `ms` milliseconds.
    async fn sleep(&self, ms: u64);
    /// Calls `step(i, steps)` back for i in 1..=steps; returns the sum of the answers.
    async fn job(&self, steps: u32) -> Result<u32, CalcError>;
}

/// The same contract name at another version.
#[ipcbus::service(name = "Calc", version = 1)]
pub trait CalcV1 {
    async fn add(&self, a: i64, b: i64) -> Result<i64, CalcError>;
}

/// A client built before the rename: its name is an alias of `Calc`'s.
#[ipcbus::service(name = "calc.v1", version = 9)]
pub trait OldCalc {
    async fn add(&self, a: i64, b: i64) -> Result<i64, CalcError>;
    /// A method the server does not have.
    async fn mul(&self, a: i64, b: i64) -> i64;
}

/// One instance per server, or per connection (with the connection's peer).
#[derive(Default)]
struct Adder {
    adds: AtomicU64,
    peer: Option<Peer>,
}

impl Calc for Adder {
    async fn add(&self, a: i64, b: i64) -> Result<i64, CalcError> {
        self.adds.fetch_add(1, Ordering::Relaxed);
        a.checked_add(b).ok_or(CalcError::Overflow)
    }

    async fn boom(&self) -> u8 {
        panic!("boom, as asked")
    }

    async fn count(&self) -> u64 {
        self.adds.load(Ordering::Relaxed)
    }

    async fn sleep(&self, ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    async fn job(&self, steps: u32) -> Result<u32, CalcError> {
        // Per connection, the peer it was made for; shared, the current call's.
        let peer = match &self.peer {
            Some(p) => p.clone(),
            None => Peer::current().ok_or(CalcError::Callback("no current peer".into()))?,
        };
        let progress = calc_callback(&peer);
        let mut sum = 0;
        for done in 1..=steps {
            sum += progress
                .step(done, steps)
                .await
                .map_err(|e| CalcError::Callback(e.to_string()))?;
        }
        Ok(sum)
    }
}

/// The client's side of the callback: records each step.
#[derive(Clone, Default)]
struct Recorder {
    steps: Arc<Mutex<Vec<(u32, u32)>>>,
}

impl Progress for Recorder {
    async fn step(&self, done: u32, of: u32) -> u32 {
        self.steps.lock().unwrap().push((done, of));
        done * 10
    }
}

/// A temporary directory for the registry, removed on drop.
struct Tmp(std::path::PathBuf);

impl Tmp {
    fn new(tag: &str) -> Tmp {
        let p = std::env::temp_dir().join(format!(
            "ipcb-svc-{tag}-{}-{}",
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

fn handle() -> Handle {
    Handle::new("svc.calc").unwrap()
}

/// With a password: the key both ends derive from it; without: the local user's.
fn security(password: bool) -> Security {
    if password {
        Security::Encrypt(Key::derive("service password", b"salt".as_slice()).unwrap())
    } else {
        Security::LocalUser
    }
}

/// A client of `handle` in `tmp`'s registry that has found its server.
async fn client(tmp: &Tmp, sec: &Security, events: Option<Recorder>) -> Client {
    let mut b = CalcClient::builder(handle())
        .discovery(tmp.disc())
        .security(sec.clone())
        .timeout(T);
    if let Some(events) = events {
        b = b.callback(ProgressServer::new(events));
    }
    let c = b.build().await.unwrap();
    assert_eq!(c.wait_for_servers(1, T).await, 1);
    c
}

async fn within<F: std::future::IntoFuture>(f: F) -> F::Output {
    tokio::time::timeout(T, f).await.expect("within the bound")
}

/// Everything the typed layer promises, over `transport`, with or without a password.
async fn typed_calls(transport: Transport, password: bool) {
    let tmp = Tmp::new("typed");
    let sec = security(password);
    let server = Server::builder(handle())
        .discovery(tmp.disc())
        .transports([transport])
        .security(sec.clone())
        .service(CalcServer::new(Adder::default()))
        .bind()
        .await
        .unwrap();
    assert_eq!(server.endpoints()[0].transport(), transport);

    let events = Recorder::default();
    let calc = CalcClient::new(client(&tmp, &sec, Some(events.clone())).await);

    // Round trip, and a typed error.
    assert_eq!(within(calc.add(40, 2)).await.unwrap(), 42);
    match within(calc.add(i64::MAX, 1)).await {
        Err(ServiceError::App(CalcError::Overflow)) => {}
        other => panic!("{other:?}"),
    }

    // A panic is a remote error; the server goes on serving.
    match within(calc.boom()).await {
        Err(CallError::Remote(e)) => assert_eq!(e.code, RemoteCode::Panicked, "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(within(calc.count()).await.unwrap(), 2);

    // The server calls back into this client through the callback trait, in the
    // middle of the call.
    assert_eq!(within(calc.job(3)).await.unwrap(), 60);
    assert_eq!(*events.steps.lock().unwrap(), [(1, 3), (2, 3), (3, 3)]);

    // A client's own timeout: a call longer than it times out; the connection goes on.
    let short = calc.clone().with_timeout(Duration::from_millis(50));
    match within(short.sleep(20_000)).await {
        Err(CallError::Timeout(d)) => assert_eq!(d, Duration::from_millis(50)),
        other => panic!("{other:?}"),
    }
    within(calc.sleep(0)).await.unwrap();

    // Another version of the same name: a contract mismatch; the call did not run.
    let v1 = CalcV1Client::new(calc.caller().clone());
    match within(v1.add(1, 1)).await {
        Err(ServiceError::Call(CallError::ContractMismatch { ours, theirs, .. })) => {
            assert_eq!((ours.as_str(), theirs.as_str()), ("Calc v1", "Calc v2"));
        }
        other => panic!("{other:?}"),
    }
    // An alias is accepted at any version; a method the server lacks is a mismatch.
    let old = OldCalcClient::new(calc.caller().clone());
    assert_eq!(within(old.add(2, 2)).await.unwrap(), 4);
    match within(old.mul(2, 2)).await {
        Err(CallError::ContractMismatch { message, .. }) => {
            assert!(message.contains("mul"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(within(calc.count()).await.unwrap(), 3);

    // An untyped call with the arguments as a tuple, under the contract or none.
    let r = within(
        calc.caller()
            .call(&(5i64, 6i64))
            .method("add")
            .contract(CalcClient::<Client>::contract()),
    )
    .await
    .unwrap();
    assert_eq!(r.decode::<i64>().unwrap(), 11);
    let r = within(calc.caller().call(&(1i64, 1i64)).method("add"))
        .await
        .unwrap();
    assert_eq!(r.decode::<i64>().unwrap(), 2);
    // Arguments of another shape: a bad request.
    match within(calc.caller().call("seven").method("add")).await {
        Err(CallError::Remote(e)) => assert_eq!(e.code, RemoteCode::BadRequest, "{e}"),
        other => panic!("{other:?}"),
    }

    server.close().await;
}

#[tokio::test]
async fn typed_calls_over_tcp() {
    typed_calls(Transport::Tcp, false).await;
}

#[tokio::test]
async fn typed_calls_over_tcp_with_a_password() {
    typed_calls(Transport::Tcp, true).await;
}

#[tokio::test]
async fn typed_calls_over_unix() {
    typed_calls(Transport::Unix, false).await;
}

#[tokio::test]
async fn typed_calls_over_unix_with_a_password() {
    typed_calls(Transport::Unix, true).await;
}

/// `service_factory`: each connection gets its own instance, holding its peer.
async fn per_connection(transport: Transport, password: bool) {
    let tmp = Tmp::new("factory");
    let sec = security(password);
    let made = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&made);
    let _server = Server::builder(handle())
        .discovery(tmp.disc())
        .transports([transport])
        .security(sec.clone())
        .service_factory(move |peer| {
            counter.fetch_add(1, Ordering::SeqCst);
            CalcServer::new(Adder {
                peer: Some(peer.clone()),
                ..Adder::default()
            })
        })
        .bind()
        .await
        .unwrap();

    let (ev1, ev2) = (Recorder::default(), Recorder::default());
    let c1 = CalcClient::new(client(&tmp, &sec, Some(ev1.clone())).await);
    let c2 = CalcClient::new(client(&tmp, &sec, Some(ev2.clone())).await);
    for i in 0..3 {
        within(c1.add(i, i)).await.unwrap();
    }
    within(c2.add(1, 1)).await.unwrap();
    assert_eq!(within(c1.count()).await.unwrap(), 3);
    assert_eq!(within(c2.count()).await.unwrap(), 1);
    assert_eq!(made.load(Ordering::SeqCst), 2);
    // Each instance calls back its own client.
    assert_eq!(within(c1.job(2)).await.unwrap(), 30);
    assert_eq!(within(c2.job(1)).await.unwrap(), 10);
    assert_eq!(*ev1.steps.lock().unwrap(), [(1, 2), (2, 2)]);
    assert_eq!(*ev2.steps.lock().unwrap(), [(1, 1)]);
}

#[tokio::test]
async fn per_connection_instances_over_tcp() {
    per_connection(Transport::Tcp, false).await;
}

#[tokio::test]
async fn per_connection_instances_over_unix_with_a_password() {
    per_connection(Transport::Unix, true).await;
}

#[tokio::test]
async fn connect_and_connect_with_callback_use_the_environment() {
    // The default discovery (the local user's registry) and security, as an
    // application gets them; a handle of its own.
    let h = Handle::new(format!("svc.env.{}", rand::random::<u32>())).unwrap();
    let _server = Server::builder(h.clone())
        .service(CalcServer::new(Adder::default()))
        .bind()
        .await
        .unwrap();
    let plain = CalcClient::connect(h.clone()).await.unwrap();
    assert_eq!(plain.caller().wait_for_servers(1, T).await, 1);
    assert_eq!(within(plain.add(1, 2)).await.unwrap(), 3);
    let events = Recorder::default();
    let calc = CalcClient::connect_with_callback(h, events.clone())
        .await
        .unwrap()
        .with_timeout(T);
    assert_eq!(calc.caller().wait_for_servers(1, T).await, 1);
    assert_eq!(within(calc.job(2)).await.unwrap(), 30);
    assert_eq!(events.steps.lock().unwrap().len(), 2);
}
