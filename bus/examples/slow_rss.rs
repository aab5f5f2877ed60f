//! Memory of a receiver that reads slowly while a sender floods it: the receiver's
//! resident set (VmRSS) is sampled once a second and printed, so one can see it stay
//! bounded (the receiver's queue, its read buffers and the socket buffers are all
//! bounded; the sender feels backpressure and waits).
//!
//! ```text
//! cargo run --release -p ipcbus --example slow_rss -- [SECS] [SIZE] [TAKE_EVERY_US]
//! ```

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipcbus::{Discovery, Handle, Receiver, Sender};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if args.get(1).map(String::as_str) == Some("child") {
        let every: u64 = args[4].parse().expect("us");
        rt.block_on(child(&args[2], args[3].parse().expect("secs"), every));
        return;
    }
    let secs: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let size: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let every: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(100);
    let dir = std::env::temp_dir().join(format!("ipcbus-slowrss-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "child",
            dir.to_str().expect("utf8"),
            &secs.to_string(),
            &every.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let _ready = lines.next();
    let sent = rt.block_on(async {
        let mut tx = Sender::builder(Handle::new("slow").expect("handle"))
            .discovery(Discovery::local_at(&dir).expect("registry"))
            .compress(false)
            .send_timeout(Duration::from_secs(secs + 30))
            .build()
            .await
            .expect("sender");
        tx.wait_for_receivers(1, Duration::from_secs(10)).await;
        let payload = bytes::Bytes::from(vec![0x5au8; size]);
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < Duration::from_secs(secs) {
            drop(tx.publish_bytes(payload.clone()).await.expect("publish"));
            n += 1;
        }
        drop(tx);
        n
    });
    for l in lines.map_while(Result::ok) {
        println!("{l}");
    }
    let _ = child.wait();
    println!("sender queued {sent} events of {size} B in {secs} s");
    let _ = std::fs::remove_dir_all(&dir);
}

async fn child(dir: &str, secs: u64, every_us: u64) {
    let mut rx = Receiver::builder(Handle::new("slow").expect("handle"))
        .discovery(Discovery::local_at(dir).expect("registry"))
        .bind()
        .await
        .expect("bind");
    let mut out = std::io::stdout();
    writeln!(out, "ready").expect("stdout");
    out.flush().expect("flush");
    let t = Instant::now();
    let mut next = 1u64;
    let mut taken = 0u64;
    let mut peak = 0u64;
    while t.elapsed() < Duration::from_secs(secs) {
        if tokio::time::timeout(Duration::from_secs(1), rx.recv())
            .await
            .is_ok()
        {
            taken += 1;
        }
        tokio::time::sleep(Duration::from_micros(every_us)).await;
        if t.elapsed() >= Duration::from_secs(next) {
            let r = rss_kib();
            peak = peak.max(r);
            writeln!(out, "t={next:>3}s receiver RSS {r} KiB, taken {taken}").expect("stdout");
            next += 1;
        }
    }
    writeln!(out, "receiver peak RSS {peak} KiB, took {taken} events").expect("stdout");
}
