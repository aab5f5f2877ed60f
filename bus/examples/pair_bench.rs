//! Two-process throughput of 1 sender → 1 receiver with small events, next to a plain
//! tokio TCP pair (u32 length prefix + payload, nothing else) measured in the same run.
//!
//! ```text
//! cargo run --release -p ipcbus --example pair_bench -- [EVENTS] [SIZE] [RUNS]
//! ```
//! Prints events/s per run and the median of each, and the ratio.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipcbus::{Discovery, Handle, Receiver, Sender};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader as TBufReader, BufWriter};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // PAIR_RT=current runs each process on a single-threaded runtime.
    let rt = if std::env::var("PAIR_RT").as_deref() == Ok("current") {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    };
    if args.get(1).map(String::as_str) == Some("child") {
        rt.block_on(child(&args[2], &args[3], args[4].parse().expect("n")));
        return;
    }
    let n: u64 = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let size: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(64);
    let runs: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(5);
    let mut raw = Vec::new();
    let mut bus = Vec::new();
    for run in 1..=runs {
        // PAIR_ONLY=bus (or raw) runs one side only, for profiling.
        let only = std::env::var("PAIR_ONLY").unwrap_or_default();
        let r = if only == "bus" {
            f64::NAN
        } else {
            rt.block_on(parent("raw", n, size))
        };
        let b = if only == "raw" {
            f64::NAN
        } else {
            rt.block_on(parent("bus", n, size))
        };
        println!(
            "run {run}: raw tcp {:>12.0} ev/s   ipcbus {:>12.0} ev/s   ratio {:.2}",
            r,
            b,
            b / r
        );
        raw.push(r);
        bus.push(b);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (r, b) = (med(&mut raw), med(&mut bus));
    println!(
        "median of {runs}: {size} B events, {n} per run: raw tcp {r:.0} ev/s, ipcbus {b:.0} ev/s ({:.1} MB/s), ratio {:.2}",
        b * size as f64 / 1e6,
        b / r
    );
}

async fn parent(mode: &str, n: u64, size: usize) -> f64 {
    let dir = std::env::temp_dir().join(format!("ipcbus-pairbench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "child",
            mode,
            dir.to_str().expect("utf8 path"),
            &n.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let ready = lines.next().expect("ready line").expect("read");
    let payload = vec![0x5au8; size];
    let rate = match mode {
        "raw" => {
            let addr: std::net::SocketAddr = ready.trim().parse().expect("addr");
            let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.set_nodelay(true).expect("nodelay");
            let (mut rd, wr) = s.into_split();
            let mut w = BufWriter::with_capacity(64 * 1024, wr);
            let t = Instant::now();
            for _ in 0..n {
                w.write_u32(size as u32).await.expect("write");
                w.write_all(&payload).await.expect("write");
            }
            w.flush().await.expect("flush");
            let mut done = [0u8; 1];
            rd.read_exact(&mut done).await.expect("done byte");
            n as f64 / t.elapsed().as_secs_f64()
        }
        _ => {
            let disc = Discovery::local_at(&dir).expect("registry");
            let mut tx = Sender::builder(Handle::new("bench").expect("handle"))
                .discovery(disc)
                .compress(false)
                .queue_capacity(
                    std::env::var("PAIR_WINDOW")
                        .ok()
                        .and_then(|w| w.parse().ok())
                        .unwrap_or(65536),
                )
                .build()
                .await
                .expect("sender");
            tx.wait_for_receivers(1, Duration::from_secs(10)).await;
            // A static payload, like the raw side's borrowed slice: no reference
            // count traffic per event in the benchmark loop itself.
            let bytes = bytes::Bytes::from_static(payload.leak());
            let t = Instant::now();
            for _ in 0..n {
                tx.queue_bytes(&bytes).await.expect("queue");
            }
            let r = tx.last_report().await;
            assert_eq!(r.acked.len(), 1, "{r:?}");
            let rate = n as f64 / t.elapsed().as_secs_f64();
            tx.close().await;
            rate
        }
    };
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    rate
}

async fn child(mode: &str, dir: &str, n: u64) {
    let mut out = std::io::stdout();
    match mode {
        "raw" => {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            writeln!(out, "{}", l.local_addr().expect("addr")).expect("stdout");
            out.flush().expect("flush");
            let (s, _) = l.accept().await.expect("accept");
            s.set_nodelay(true).expect("nodelay");
            let (rd, mut wr) = s.into_split();
            let mut r = TBufReader::with_capacity(64 * 1024, rd);
            let mut buf = vec![0u8; 1 << 20];
            for _ in 0..n {
                let len = r.read_u32().await.expect("len") as usize;
                r.read_exact(&mut buf[..len]).await.expect("body");
            }
            wr.write_all(&[1]).await.expect("done");
        }
        _ => {
            let disc = Discovery::local_at(dir).expect("registry");
            let mut rx = Receiver::builder(Handle::new("bench").expect("handle"))
                .discovery(disc)
                .bind()
                .await
                .expect("bind");
            writeln!(out, "ready").expect("stdout");
            out.flush().expect("flush");
            for _ in 0..n {
                rx.recv().await.expect("event");
            }
            rx.close().await;
        }
    }
}
