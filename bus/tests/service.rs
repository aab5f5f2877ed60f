//! `#[ipcbus::service]`: the generated client and server, first through an in-memory
//! loopback `Caller` that hands each call to a server's `dispatch` (the wire format,
//! typed errors, unknown methods, bad arguments, contracts), then over real sockets.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use ipcbus::{CallError, Caller, Contract, Peer, RemoteCode, RemoteError, Service, ServiceError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CalcError {
    Overflow,
    DivideByZero { dividend: i64 },
}

/// Arithmetic, with every shape of method.
#[ipcbus::service(version = 2, aliases = ["calc.v1", "arith"])]
pub trait Calc {
    /// `a + b`, or `Overflow`.
    async fn add(&self, a: i64, b: i64) -> Result<i64, CalcError>;
    /// `a / b`.
    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError>;
    /// One argument.
    async fn neg(&self, a: i64) -> i64;
    /// No argument, nothing returned.
    async fn reset(&self);
    /// No argument.
    async fn total(&self) -> u64;
    /// Owned compound types.
    async fn join(&self, parts: Vec<String>, sep: Option<char>) -> String;
    /// A raw identifier: called "type" on the wire.
    async fn r#type(&self) -> String;
    /// A default body.
    async fn twice(&self, a: i64) -> Result<i64, CalcError> {
        self.add(a, a).await
    }
}

/// Counts the calls it serves.
#[derive(Default)]
struct Adder {
    calls: Mutex<u64>,
}

impl Adder {
    fn count(&self) {
        *self.calls.lock().unwrap() += 1;
    }
}

impl Calc for Adder {
    async fn add(&self, a: i64, b: i64) -> Result<i64, CalcError> {
        self.count();
        a.checked_add(b).ok_or(CalcError::Overflow)
    }

    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError> {
        self.count();
        tokio::task::yield_now().await;
        a.checked_div(b)
            .ok_or(CalcError::DivideByZero { dividend: a })
    }

    async fn neg(&self, a: i64) -> i64 {
        self.count();
        -a
    }

    async fn reset(&self) {
        *self.calls.lock().unwrap() = 0;
    }

    async fn total(&self) -> u64 {
        *self.calls.lock().unwrap()
    }

    async fn join(&self, parts: Vec<String>, sep: Option<char>) -> String {
        self.count();
        parts.join(&sep.map(String::from).unwrap_or_default())
    }

    async fn r#type(&self) -> String {
        "adder".into()
    }
}

/// No arguments to the attribute: the contract is the trait's name, version 1.
#[ipcbus::service]
pub trait Plain {
    async fn hello(&self, name: String) -> String;
}

/// The callback of `Chat`: what the server calls back into its clients with.
#[ipcbus::service(name = "chat.events")]
pub trait ChatEvents {
    async fn said(&self, who: String, text: String);
}

/// A service with a callback trait.
#[ipcbus::service(name = "chat", callback = ChatEvents)]
pub trait Chat {
    async fn say(&self, text: String) -> usize;
}

/// A service without methods (every call is an unknown method).
#[ipcbus::service(name = "empty")]
pub trait Empty {}

mod events {
    /// A callback trait in another module.
    #[ipcbus::service]
    pub trait Ticks {
        async fn tick(&self, n: u64);
    }
}

/// Its callback named by path.
#[ipcbus::service(callback = events::Ticks)]
pub trait Clock {
    async fn start(&self) -> Result<(), String>;
}

type Dispatch = dyn Fn(&str, Bytes) -> BoxFuture<'static, Result<Bytes, RemoteError>> + Send + Sync;

/// A `Caller` that runs each call on a server in this process: checks the contract
/// as a server does, then dispatches. Remembers the timeouts it was given.
#[derive(Clone)]
struct Loopback {
    contract: Contract,
    dispatch: Arc<Dispatch>,
    timeouts: Arc<Mutex<Vec<Option<Duration>>>>,
}

impl Loopback {
    fn new<S: Service + Clone>(
        server: S,
        dispatch: fn(&S, &str, Bytes) -> BoxFuture<'static, Result<Bytes, RemoteError>>,
    ) -> Loopback {
        Loopback {
            contract: server.contract(),
            dispatch: Arc::new(move |m: &str, b: Bytes| dispatch(&server, m, b)),
            timeouts: Arc::default(),
        }
    }

    /// A loopback whose every call is answered `err`.
    fn failing(err: RemoteError) -> Loopback {
        Loopback {
            contract: Contract::untyped(),
            dispatch: Arc::new(move |_: &str, _: Bytes| {
                let err = err.clone();
                Box::pin(async move { Err(err) })
            }),
            timeouts: Arc::default(),
        }
    }
}

impl Caller for Loopback {
    fn call_raw(
        &self,
        contract: &Contract,
        method: &str,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> BoxFuture<'static, Result<Bytes, CallError>> {
        self.timeouts.lock().unwrap().push(timeout);
        if !self.contract.name().is_empty()
            && !self.contract.accepts(contract.name(), contract.version())
        {
            let err = CallError::ContractMismatch {
                ours: contract.to_string(),
                theirs: self.contract.to_string(),
                message: String::new(),
            };
            return Box::pin(async move { Err(err) });
        }
        let reply = (self.dispatch)(method, body);
        Box::pin(async move { reply.await.map_err(CallError::Remote) })
    }

    fn notify_raw(&self, _: &Contract, _: &str, _: Bytes) -> Result<(), CallError> {
        Err(CallError::Closed)
    }
}

fn calc() -> (CalcClient<Loopback>, Arc<Adder>) {
    let adder = Arc::new(Adder::default());
    let server = CalcServer::from_arc(Arc::clone(&adder));
    let lo = Loopback::new(server, CalcServer::dispatch);
    (CalcClient::new(lo), adder)
}

#[tokio::test]
async fn loopback_round_trips_every_shape_of_method() {
    let (c, adder) = calc();
    assert_eq!(c.add(2, 3).await.unwrap(), 5);
    assert_eq!(c.div(7, 2).await.unwrap(), 3);
    assert_eq!(c.neg(4).await.unwrap(), -4);
    assert_eq!(
        c.join(vec!["a".into(), "b".into()], Some('-'))
            .await
            .unwrap(),
        "a-b"
    );
    assert_eq!(c.join(vec![], None).await.unwrap(), "");
    assert_eq!(c.r#type().await.unwrap(), "adder");
    assert_eq!(c.twice(21).await.unwrap(), 42);
    assert_eq!(c.total().await.unwrap(), 6);
    c.reset().await.unwrap();
    assert_eq!(c.total().await.unwrap(), 0);
    assert_eq!(*adder.calls.lock().unwrap(), 0);
}

#[tokio::test]
async fn client_futures_are_static_and_send() {
    let (c, _) = calc();
    let f = c.add(1, 1);
    drop(c);
    let h = tokio::spawn(f);
    assert_eq!(h.await.unwrap().unwrap(), 2);
}

#[tokio::test]
async fn a_method_error_arrives_typed() {
    let (c, _) = calc();
    match c.add(i64::MAX, 1).await {
        Err(ServiceError::App(CalcError::Overflow)) => {}
        other => panic!("{other:?}"),
    }
    match c.div(9, 0).await {
        Err(ServiceError::App(CalcError::DivideByZero { dividend: 9 })) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_method_error_travels_as_debug_message_and_postcard_detail() {
    let server = CalcServer::new(Adder::default());
    let args = postcard::to_stdvec(&(5i64, 0i64)).unwrap();
    let err = server.dispatch("div", args.into()).await.unwrap_err();
    assert_eq!(err.code, RemoteCode::Application);
    assert_eq!(err.message, "DivideByZero { dividend: 5 }");
    assert_eq!(
        err.decode_detail::<CalcError>().unwrap(),
        CalcError::DivideByZero { dividend: 5 }
    );
}

#[tokio::test]
async fn an_application_error_whose_detail_is_not_the_error_type_is_a_decode_error() {
    let c = CalcClient::new(Loopback::failing(RemoteError::new("no detail")));
    match c.add(1, 2).await {
        Err(ServiceError::Call(CallError::Decode(m))) => assert!(m.contains("no detail"), "{m}"),
        other => panic!("{other:?}"),
    }
    let garbage = RemoteError {
        detail: Bytes::from_static(&[0xff, 0xff]),
        ..RemoteError::new("garbage")
    };
    let c = CalcClient::new(Loopback::failing(garbage));
    assert!(matches!(
        c.add(1, 2).await,
        Err(ServiceError::Call(CallError::Decode(_)))
    ));
}

#[tokio::test]
async fn other_remote_errors_stay_call_errors() {
    let busy = RemoteError {
        code: RemoteCode::Panicked,
        message: "handler panicked".into(),
        detail: Bytes::new(),
    };
    let c = CalcClient::new(Loopback::failing(busy));
    match c.add(1, 2).await {
        Err(ServiceError::Call(CallError::Remote(e))) => assert_eq!(e.code, RemoteCode::Panicked),
        other => panic!("{other:?}"),
    }
    match c.neg(1).await {
        Err(CallError::Remote(e)) => assert_eq!(e.code, RemoteCode::Panicked),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_untyped_caller_calls_a_typed_server_with_a_tuple_body() {
    let (c, _) = calc();
    let lo = c.caller();
    let contract = CalcClient::<Loopback>::contract();
    let body = postcard::to_stdvec(&(40i64, 2i64)).unwrap();
    let reply = lo
        .call_raw(&contract, "add", body.into(), None)
        .await
        .unwrap();
    assert_eq!(postcard::from_bytes::<i64>(&reply).unwrap(), 42);
    // One argument: the value itself. None: no bytes.
    let body = postcard::to_stdvec(&7i64).unwrap();
    let reply = lo
        .call_raw(&contract, "neg", body.into(), None)
        .await
        .unwrap();
    assert_eq!(postcard::from_bytes::<i64>(&reply).unwrap(), -7);
    let reply = lo
        .call_raw(&contract, "type", Bytes::new(), None)
        .await
        .unwrap();
    assert_eq!(postcard::from_bytes::<String>(&reply).unwrap(), "adder");
    // The empty contract (untyped) is accepted too.
    let reply = lo
        .call_raw(&Contract::untyped(), "reset", Bytes::new(), None)
        .await
        .unwrap();
    assert!(reply.is_empty());
}

#[tokio::test]
async fn an_unknown_method_is_answered_unknown_method() {
    let (c, _) = calc();
    let contract = CalcClient::<Loopback>::contract();
    let err = c
        .caller()
        .call_raw(&contract, "mul", Bytes::new(), None)
        .await
        .unwrap_err();
    match err {
        CallError::Remote(e) => {
            assert_eq!(e.code, RemoteCode::ContractMismatch);
            assert!(e.message.contains("\"mul\""), "{e}");
            assert!(e.message.contains("Calc v2"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn arguments_that_do_not_decode_are_a_bad_request() {
    let (c, adder) = calc();
    let contract = CalcClient::<Loopback>::contract();
    let lo = c.caller();
    // Too few bytes, garbage, and one i64 too many: none runs the method.
    let cases: [Vec<u8>; 3] = [
        postcard::to_stdvec(&1i64).unwrap(),
        vec![0xff; 11],
        postcard::to_stdvec(&(1i64, 2i64, 3i64)).unwrap(),
    ];
    for body in cases {
        match lo.call_raw(&contract, "add", body.into(), None).await {
            Err(CallError::Remote(e)) => assert_eq!(e.code, RemoteCode::BadRequest, "{e}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(*adder.calls.lock().unwrap(), 0);
}

#[tokio::test]
async fn a_reply_of_another_type_is_a_decode_error() {
    // A "Calc" whose `neg` answers a String: the client asked for an i64.
    let lo = Loopback {
        contract: Contract::untyped(),
        dispatch: Arc::new(|_: &str, _: Bytes| {
            Box::pin(async { Ok(Bytes::from(postcard::to_stdvec("no").unwrap())) })
        }),
        timeouts: Arc::default(),
    };
    let c = CalcClient::new(lo);
    assert!(matches!(c.neg(1).await, Err(CallError::Decode(_))));
}

#[test]
fn contracts_name_version_and_aliases() {
    let calc = CalcClient::<ipcbus::Client>::contract();
    // The default name is the trait's path: this test crate's root module, then the trait.
    assert_eq!(calc.name(), "service::Calc");
    assert_eq!(calc.version(), 2);
    assert_eq!(calc.aliases().collect::<Vec<_>>(), ["calc.v1", "arith"]);
    assert!(calc.accepts("service::Calc", 2));
    assert!(!calc.accepts("service::Calc", 1));
    assert!(
        !calc.accepts("Calc", 2),
        "the bare trait name is another contract"
    );
    assert!(calc.accepts("calc.v1", 1));
    assert!(calc.accepts("arith", 9));
    assert_eq!(CalcServer::new(Adder::default()).contract(), calc);

    let plain = PlainClient::<ipcbus::Client>::contract();
    assert_eq!((plain.name(), plain.version()), ("service::Plain", 1));
    assert_eq!(plain.aliases().count(), 0);
    let chat = ChatClient::<ipcbus::Client>::contract();
    assert_eq!((chat.name(), chat.version()), ("chat", 1));
    let events = ChatEventsClient::<Peer>::contract();
    assert_eq!(events.name(), "chat.events");
}

#[tokio::test]
async fn a_contract_the_server_does_not_serve_is_a_mismatch() {
    struct Hi;
    impl Plain for Hi {
        async fn hello(&self, name: String) -> String {
            format!("hi {name}")
        }
    }
    let lo = Loopback::new(PlainServer::new(Hi), PlainServer::dispatch);
    assert_eq!(
        PlainClient::new(lo.clone())
            .hello("x".into())
            .await
            .unwrap(),
        "hi x"
    );
    // A Calc client against the Plain server.
    let c = CalcClient::new(lo);
    match c.neg(1).await {
        Err(CallError::ContractMismatch { ours, theirs, .. }) => {
            assert_eq!(
                (ours.as_str(), theirs.as_str()),
                ("service::Calc v2", "service::Plain v1")
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn with_timeout_sets_each_calls_timeout() {
    let (c, _) = calc();
    c.neg(1).await.unwrap();
    let c = c.with_timeout(Duration::from_millis(1500));
    c.neg(1).await.unwrap();
    c.add(1, 1).await.unwrap();
    let seen = c.caller().timeouts.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            None,
            Some(Duration::from_millis(1500)),
            Some(Duration::from_millis(1500))
        ]
    );
}

#[test]
fn the_callback_helper_gives_the_callback_client_over_a_peer() {
    let f: fn(&Peer) -> ChatEventsClient<Peer> = chat_callback;
    let _ = f;
    // The client side serves the callback trait.
    struct Events;
    impl ChatEvents for Events {
        async fn said(&self, _who: String, _text: String) {}
    }
    let server = ChatEventsServer::new(Events);
    assert_eq!(server.contract().name(), "chat.events");
}

#[test]
fn generated_types_are_debug_and_clone() {
    let server = CalcServer::new(Adder::default());
    let s2 = server.clone();
    assert!(Arc::ptr_eq(server.implementation(), s2.implementation()));
    assert_eq!(format!("{server:?}"), "CalcServer { .. }");
}

#[tokio::test]
async fn a_service_without_methods_answers_every_call_unknown_method() {
    struct Nothing;
    impl Empty for Nothing {}
    let server = EmptyServer::new(Nothing);
    let err = server.dispatch("x", Bytes::new()).await.unwrap_err();
    assert_eq!(err.code, RemoteCode::ContractMismatch);
    let f: fn(&Peer) -> events::TicksClient<Peer> = clock_callback;
    let _ = f;
}
