//! nats_pubsub: one NATS core publisher to N subscriber processes through a
//! nats-server on loopback, the counterpart of `ipcbus bench` (compare/README.md).
//!
//! ```text
//! nats_pubsub pub --subs N --count C [--size 64] [--subject S] [--server URL] [--timeout SECS]
//! nats_pubsub sub --count C [--subject S] [--server URL] [--timeout SECS] [--capacity M]
//! ```
//!
//! Start-up: a subscriber subscribes to S, flushes (the server's PONG means it has
//! the subscription), then sends a request on `S.ready` with its pid, retrying while
//! the server answers "no responders" (the publisher is not there yet). The
//! publisher answers each such request and, once N distinct subscribers have asked,
//! publishes C messages of SIZE bytes on S as fast as the client takes them, then an
//! empty end marker, and flushes. Everything the publisher sends after reading a
//! subscriber's request finds that subscriber's subscription in place.
//!
//! NATS core is at most once: the server cuts off a subscriber whose pending data
//! passes its limit (a "slow consumer"; 64 MB by default), and the client drops
//! messages when a subscription's queue is full. `--capacity` (default 2^20
//! messages, the client's own default is 65 536) makes the client queue large
//! enough that only the server's policy applies.
//!
//! Each subscriber prints one line, `received=R expected=C secs=S rate=M`, S from
//! its first data message to its last, M = R / S; it gives up after --timeout
//! without a first message, or 10 s without the next one. Connection events
//! (slow consumer, disconnect) go to stderr, as does the publisher's
//! `sent=C secs=S rate=M`. Runs on a current-thread tokio runtime.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, ConnectOptions, Event, RequestErrorKind, Subject};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const USAGE: &str = "usage: nats_pubsub pub --subs N --count C [--size BYTES] [--subject S] [--server URL] [--timeout SECS]
       nats_pubsub sub --count C [--subject S] [--server URL] [--timeout SECS] [--capacity MSGS]";

/// No message for this long once data flows: the publisher is gone or the end
/// marker was dropped.
const IDLE: Duration = Duration::from_secs(10);

struct Args {
    mode: String,
    subs: u64,
    count: u64,
    size: usize,
    subject: String,
    server: String,
    timeout: Duration,
    capacity: usize,
}

fn parse_args() -> Args {
    let usage = |msg: &str| -> ! {
        eprintln!("nats_pubsub: {msg}\n{USAGE}");
        std::process::exit(2)
    };
    let mut it = std::env::args().skip(1);
    let mode = it.next().unwrap_or_else(|| usage("no mode"));
    if mode != "pub" && mode != "sub" {
        usage(&format!("unknown mode '{mode}'"));
    }
    let mut a = Args {
        mode,
        subs: 1,
        count: 0,
        size: 64,
        subject: "bench".into(),
        server: "nats://127.0.0.1:4222".into(),
        timeout: Duration::from_secs(120),
        capacity: 1 << 20,
    };
    while let Some(flag) = it.next() {
        let val = it
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let num = |v: &str| -> u64 {
            match v.parse::<u64>() {
                Ok(n) if n > 0 => n,
                _ => usage(&format!("{flag}: bad number '{v}'")),
            }
        };
        match flag.as_str() {
            "--subs" => a.subs = num(&val),
            "--count" => a.count = num(&val),
            "--size" => a.size = num(&val) as usize,
            "--subject" => a.subject = val,
            "--server" => a.server = val,
            "--timeout" => a.timeout = Duration::from_secs(num(&val)),
            "--capacity" => a.capacity = num(&val) as usize,
            _ => usage(&format!("unknown flag '{flag}'")),
        }
    }
    if a.count == 0 {
        usage("--count is required");
    }
    a
}

/// Connects, reporting slow-consumer and disconnect events on stderr (counted).
async fn connect(a: &Args, who: &'static str) -> Result<(Client, Arc<AtomicU64>)> {
    let events = Arc::new(AtomicU64::new(0));
    let counter = events.clone();
    let client = ConnectOptions::new()
        .subscription_capacity(a.capacity)
        .event_callback(move |event| {
            let counter = counter.clone();
            async move {
                if matches!(
                    event,
                    Event::SlowConsumer(_) | Event::Disconnected | Event::ServerError(_)
                ) {
                    counter.fetch_add(1, Ordering::Relaxed);
                    eprintln!("nats_pubsub {who}: {event}");
                }
            }
        })
        .connect(a.server.as_str())
        .await?;
    Ok((client, events))
}

async fn run_pub(a: &Args) -> Result<bool> {
    let (client, _) = connect(a, "pub").await?;
    let mut ready = client.subscribe(format!("{}.ready", a.subject)).await?;
    client.flush().await?;

    let deadline = tokio::time::Instant::now() + a.timeout;
    let mut seen = HashSet::new();
    while (seen.len() as u64) < a.subs {
        let msg = match tokio::time::timeout_at(deadline, ready.next()).await {
            Ok(Some(msg)) => msg,
            Ok(None) => return Err("ready subscription closed".into()),
            Err(_) => {
                eprintln!(
                    "nats_pubsub pub: only {} of {} subscribers ready after {:?}",
                    seen.len(),
                    a.subs,
                    a.timeout
                );
                return Ok(false);
            }
        };
        if let Some(reply) = msg.reply {
            client.publish(reply, Bytes::new()).await?;
        }
        seen.insert(msg.payload);
    }
    client.flush().await?;

    let subject = Subject::from(a.subject.as_str());
    let payload = Bytes::from(vec![b'x'; a.size]);
    let start = Instant::now();
    for _ in 0..a.count {
        client.publish(subject.clone(), payload.clone()).await?;
    }
    client.publish(subject, Bytes::new()).await?;
    client.flush().await?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "sent={} secs={secs:.6} rate={:.0}",
        a.count,
        a.count as f64 / secs
    );
    Ok(true)
}

async fn run_sub(a: &Args) -> Result<bool> {
    let (client, events) = connect(a, "sub").await?;
    let mut sub = client.subscribe(a.subject.clone()).await?;
    client.flush().await?;

    // Tell the publisher, once it listens, that this subscription is in place.
    let ready = format!("{}.ready", a.subject);
    let id = Bytes::from(std::process::id().to_string());
    let deadline = Instant::now() + a.timeout;
    loop {
        match client.request(ready.clone(), id.clone()).await {
            Ok(_) => break,
            Err(e) if e.kind() == RequestErrorKind::NoResponders && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(format!("ready request: {e}").into()),
        }
    }

    let mut received: u64 = 0;
    let (mut first, mut last) = (Instant::now(), Instant::now());
    let mut wait = a.timeout;
    let mut complete = false;
    loop {
        // Only arm a timer when no message is waiting.
        let next = match sub.next().now_or_never() {
            Some(m) => m,
            None => match tokio::time::timeout(wait, sub.next()).await {
                Ok(m) => m,
                Err(_) => {
                    eprintln!("nats_pubsub sub: no message for {wait:?} after {received}");
                    break;
                }
            },
        };
        let Some(msg) = next else {
            eprintln!("nats_pubsub sub: subscription closed after {received}");
            break;
        };
        if msg.payload.is_empty() {
            complete = true;
            break;
        }
        last = Instant::now();
        if received == 0 {
            first = last;
            wait = IDLE.min(a.timeout);
        }
        received += 1;
    }
    let secs = last.duration_since(first).as_secs_f64();
    let rate = if secs > 0.0 {
        received as f64 / secs
    } else {
        0.0
    };
    println!(
        "received={received} expected={} secs={secs:.6} rate={rate:.0}",
        a.count
    );
    let n = events.load(Ordering::Relaxed);
    if n > 0 {
        eprintln!("nats_pubsub sub: {n} slow-consumer/disconnect/server-error event(s)");
    }
    Ok(complete && received == a.count)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let a = parse_args();
    let result = if a.mode == "pub" {
        run_pub(&a).await
    } else {
        run_sub(&a).await
    };
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("nats_pubsub {}: {e}", a.mode);
            std::process::ExitCode::from(2)
        }
    }
}
