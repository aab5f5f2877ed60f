//! `ipcbus bench --rpc`: calls against a plain request/response pair over the same
//! transport, in the same run.
//!
//! A server child process (this binary's hidden `bench-receiver --mode rpc`) echoes
//! every call's body; this process calls it through a [`Client`]:
//!
//! * latency: one call at a time, `--pings` of them after 1000 for warm-up;
//!   p50/p99/p999 per run, medians over `--runs`. The baseline is the ping-pong of
//!   `--latency`: one plain connection, a u32 length and the payload each way.
//! * throughput: `--in-flight` calls outstanding on one connection, as many calls
//!   as last `--duration` (measured by a short calibration run), calls per second
//!   from the first sent to the last reply. The baseline: the same number of frames
//!   over one plain connection to an echo child, the writer at most `--in-flight`
//!   frames ahead of the replies read.
//! * the one-way event rate of the same size to one receiver process (what `bench`
//!   measures without `--rpc`), for the target "64 in flight: at least half the
//!   event rate".

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use ipcbus::{Client, Handle, Server, Transport};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::sync::Semaphore;

use super::{
    bench_handle, median, median_latency, payload, plain_connect, progress, spawn_children,
    transport_name, ChildMode, Compress, Ctx, Latency, ReceiverArgs, ReceiverResult, Watchdog,
};
use crate::common::Common;
use crate::out;

/// Calls of the first, untimed throughput run that measures how many make
/// `--duration`.
const CALIBRATION_CALLS: u64 = 20_000;

/// Calls (or plain round trips) before the timed ones of a latency run.
const WARM: u64 = 1000;

/// The target of issue 12: call latency p50 at most this times the plain pair's.
const LATENCY_TARGET: f64 = 1.3;

/// The target of issue 12: calls per second with 64 in flight at least this times
/// the one-way event rate.
const THROUGHPUT_TARGET: f64 = 0.5;

/// The report of `bench --rpc`.
#[derive(Debug, Serialize)]
struct Report {
    /// One row per transport.
    rpc: Vec<Row>,
}

/// The figures of one transport.
#[derive(Debug, Serialize)]
struct Row {
    #[serde(serialize_with = "transport_name")]
    transport: Transport,
    size: usize,
    encrypt: bool,
    /// One call at a time: round trips in microseconds.
    latency: LatencyPair,
    /// `in_flight` calls outstanding on one connection.
    throughput: Throughput,
}

#[derive(Debug, Serialize)]
struct LatencyPair {
    ipcbus: Latency,
    baseline: Latency,
    /// ipcbus p50 / baseline p50 (target: at most 1.3).
    p50_ratio: f64,
}

#[derive(Debug, Serialize)]
struct Throughput {
    in_flight: usize,
    /// Calls per run.
    calls: u64,
    runs: usize,
    /// Calls per second (median of the runs).
    ipcbus: f64,
    /// Plain round trips per second, the same in flight (median).
    baseline: f64,
    /// ipcbus / baseline.
    ratio: f64,
    /// One-way events per second of the same size to one receiver process, acknowledged
    /// (median), and calls per second / that (target: at least 0.5).
    events: f64,
    events_ratio: f64,
    /// Calls that failed in all runs.
    failed: u64,
}

/// Runs the RPC suite on every `--transport`.
///
/// # Errors
/// When a child process cannot be started or does not answer in time.
pub(super) async fn run(ctx: &Ctx<'_>, runs: u64) -> anyhow::Result<bool> {
    let args = ctx.args;
    let size = args.size.first().copied().unwrap_or(64);
    let in_flight = args.in_flight as usize;
    let encrypt = args.encrypt.first().is_some_and(|t| t.on());
    let steps = args.transport.len() as u64 * (runs * 5 + 2);
    let bar = progress(ctx.common, steps);
    let mut rows = Vec::new();
    let mut failed = 0u64;
    for &t in &args.transport {
        bar.set_message(format!("{t} calibration"));
        let calls = match args.count {
            Some(c) => c,
            None => {
                let (rate, _) = ctx
                    .rpc_throughput(t, size, CALIBRATION_CALLS, encrypt)
                    .await?;
                ((rate * args.duration.as_secs_f64()) as u64).max(1000)
            }
        };
        bar.inc(1);
        let mut w = ctx.workload(t, 1, size, Compress::Off, encrypt);
        w.count = match args.count {
            Some(c) => c,
            None => ctx.calibrate(w, &indicatif::ProgressBar::hidden()).await?,
        };
        bar.inc(1);
        let (mut lat_bus, mut lat_raw) = (Vec::new(), Vec::new());
        let (mut thr_bus, mut thr_raw, mut thr_ev) = (Vec::new(), Vec::new(), Vec::new());
        // Interleaved, so both sides see the same machine load.
        for _ in 0..runs {
            bar.set_message(format!("{t} call latency"));
            lat_bus.push(ctx.rpc_latency(t, size, encrypt).await?);
            bar.inc(1);
            bar.set_message(format!("{t} plain latency"));
            lat_raw.push(ctx.raw_latency(t, size).await?);
            bar.inc(1);
            bar.set_message(format!("{t} calls, {in_flight} in flight"));
            let (rate, f) = ctx.rpc_throughput(t, size, calls, encrypt).await?;
            failed += f;
            thr_bus.push(rate);
            bar.inc(1);
            bar.set_message(format!("{t} plain, {in_flight} in flight"));
            thr_raw.push(ctx.raw_throughput(t, size, calls).await?);
            bar.inc(1);
            bar.set_message(format!("{t} one-way events"));
            let (_, run) = ctx.bus_run(w).await?;
            thr_ev.push(run.sender_rate);
            bar.inc(1);
        }
        let ipcbus = median_latency(&lat_bus, size, args.pings);
        let baseline = median_latency(&lat_raw, size, args.pings);
        let p50_ratio = ratio(ipcbus.p50_us, baseline.p50_us);
        let (bus, raw, ev) = (med(thr_bus), med(thr_raw), med(thr_ev));
        rows.push(Row {
            transport: t,
            size,
            encrypt,
            latency: LatencyPair {
                ipcbus,
                baseline,
                p50_ratio,
            },
            throughput: Throughput {
                in_flight,
                calls,
                runs: runs as usize,
                ipcbus: bus,
                baseline: raw,
                ratio: ratio(bus, raw),
                events: ev,
                events_ratio: ratio(bus, ev),
                failed,
            },
        });
    }
    bar.finish_and_clear();
    print(ctx.common, &Report { rpc: rows })?;
    Ok(failed == 0)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

fn med(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    median(&v)
}

impl Ctx<'_> {
    /// A client of the server child at `handle`, once it sees the server.
    async fn rpc_client(&self, handle: Handle, encrypt: bool) -> anyhow::Result<Client> {
        let client = Client::builder(handle)
            .discovery(self.discovery()?)
            .security(self.security(encrypt))
            .timeout(self.args.timeout)
            .build()
            .await?;
        if client.wait_for_servers(1, Duration::from_secs(10)).await < 1 {
            bail!("the bench client found no server");
        }
        Ok(client)
    }

    /// One call at a time to an echo server child; round trips in microseconds.
    async fn rpc_latency(
        &self,
        transport: Transport,
        size: usize,
        encrypt: bool,
    ) -> anyhow::Result<Vec<f64>> {
        let handle = bench_handle()?;
        let pings = self.args.pings;
        let mut spawned = spawn_children(
            self,
            1,
            WARM + pings,
            &handle,
            (ChildMode::Rpc, transport),
            None,
            self.creds(encrypt),
        )
        .await?;
        let client = self.rpc_client(handle, encrypt).await?;
        let body = Bytes::from(payload(size));
        // In a task of its own, as the event ping-pong (see `bus_latency`).
        let calling = tokio::spawn(async move {
            let mut rtts = Vec::with_capacity(pings as usize);
            for i in 0..WARM + pings {
                let t = Instant::now();
                let reply = client.call_bytes(body.clone()).await?;
                if reply.body().len() != body.len() {
                    bail!("echo of {} bytes for {}", reply.body().len(), body.len());
                }
                if i >= WARM {
                    rtts.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
            anyhow::Ok((client, rtts))
        });
        let (client, rtts) = tokio::time::timeout(self.args.timeout, calling)
            .await
            .context("the calls did not finish in time")???;
        client.close().await;
        let _ = super::collect(&mut spawned, self.args.timeout).await;
        Ok(rtts)
    }

    /// `calls` calls with `--in-flight` outstanding on one connection; calls per
    /// second and how many failed.
    async fn rpc_throughput(
        &self,
        transport: Transport,
        size: usize,
        calls: u64,
        encrypt: bool,
    ) -> anyhow::Result<(f64, u64)> {
        let handle = bench_handle()?;
        let mut spawned = spawn_children(
            self,
            1,
            calls,
            &handle,
            (ChildMode::Rpc, transport),
            None,
            self.creds(encrypt),
        )
        .await?;
        let client = self.rpc_client(handle, encrypt).await?;
        let body = Bytes::from(payload(size));
        let in_flight = self.args.in_flight.max(1) as usize;
        let calling = tokio::spawn(async move {
            let mut pending = FuturesUnordered::new();
            let (mut sent, mut failed) = (0u64, 0u64);
            let mut first_error = None;
            let t0 = Instant::now();
            while sent < calls || !pending.is_empty() {
                while sent < calls && pending.len() < in_flight {
                    pending.push(client.call_bytes(body.clone()).into_future());
                    sent += 1;
                }
                if let Some(Err(e)) = pending.next().await {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            (client, secs, failed, first_error)
        });
        let (client, secs, failed, first_error) = tokio::time::timeout(self.args.timeout, calling)
            .await
            .context("the calls did not finish in time")??;
        if let Some(e) = first_error {
            out::note(format!(
                "{} of {calls} failed over {transport}, the first: {e}",
                out::plural(failed, "call")
            ));
        }
        client.close().await;
        let _ = super::collect(&mut spawned, self.args.timeout).await;
        Ok((super::rate(calls - failed, secs), failed))
    }

    /// The plain pair of [`Ctx::rpc_throughput`]: `calls` length-prefixed frames to
    /// an echo child over one connection, the writer at most `--in-flight` ahead of
    /// the replies read; round trips per second.
    async fn raw_throughput(
        &self,
        transport: Transport,
        size: usize,
        calls: u64,
    ) -> anyhow::Result<f64> {
        let handle = bench_handle()?;
        let mut spawned = spawn_children(
            self,
            1,
            calls,
            &handle,
            (ChildMode::RawPong, transport),
            None,
            None,
        )
        .await?;
        let addr = spawned.addrs.first().context("no plain echo address")?;
        let (mut rd, wr) = plain_connect(addr).await?;
        let mut frame = Vec::with_capacity(4 + size);
        frame.extend_from_slice(&u32::try_from(size)?.to_be_bytes());
        frame.extend_from_slice(&payload(size));
        let window = Arc::new(Semaphore::new(self.args.in_flight.max(1) as usize));
        let t0 = Instant::now();
        let writing = {
            let window = window.clone();
            tokio::spawn(async move {
                let mut wr = BufWriter::with_capacity(64 * 1024, wr);
                for _ in 0..calls {
                    match window.try_acquire() {
                        Ok(p) => p.forget(),
                        Err(_) => {
                            // Nothing more may go out before a reply: send what is
                            // buffered, then wait.
                            wr.flush().await?;
                            window.acquire().await?.forget();
                        }
                    }
                    wr.write_all(&frame).await?;
                }
                wr.flush().await?;
                anyhow::Ok(wr)
            })
        };
        let reading = tokio::spawn(async move {
            let mut rd = tokio::io::BufReader::with_capacity(64 * 1024, &mut rd);
            let mut back = vec![0u8; 4 + size];
            for _ in 0..calls {
                rd.read_exact(&mut back).await?;
                window.add_permits(1);
            }
            anyhow::Ok(())
        });
        tokio::time::timeout(self.args.timeout, reading)
            .await
            .context("the plain echo did not finish in time")???;
        let secs = t0.elapsed().as_secs_f64();
        let wr = writing.await??;
        drop(wr);
        let _ = super::collect(&mut spawned.inner, self.args.timeout).await;
        Ok(super::rate(calls, secs))
    }
}

/// The server child of `bench --rpc`: echoes `--count` calls (or stops after
/// `--idle` without one), then reports.
///
/// # Errors
/// When it cannot bind, or stdout is closed.
pub(super) async fn server_child(
    common: &Common,
    args: &ReceiverArgs,
) -> anyhow::Result<ReceiverResult> {
    let server = Server::builder(args.handle.clone())
        .discovery(common.discovery()?)
        .security(common.security()?)
        .transports([args.transport])
        // Whatever --in-flight asks (at most 65536), not "busy" past the default 256.
        .concurrency(65_536)
        .max_in_flight(65_536)
        .bind()
        .await?;
    let endpoints: Vec<String> = server.endpoints().iter().map(ToString::to_string).collect();
    out::line(format!("ready {}", endpoints.join(" ")))?;
    let (count, idle) = (args.count, args.idle);
    // A task of its own (see `bus_latency`).
    let serving = tokio::spawn(async move {
        let mut server = server;
        let mut received = 0u64;
        let mut first: Option<Instant> = None;
        let mut last = Instant::now();
        let mut watchdog = Watchdog::new(idle);
        let mut caller = None;
        while received < count {
            let req = tokio::select! {
                r = server.next_request() => r,
                () = watchdog.expired(last) => None,
            };
            let Some(req) = req else { break };
            last = Instant::now();
            first.get_or_insert(last);
            received += 1;
            if caller.is_none() {
                caller = Some(req.peer().clone());
            }
            let body = req.body().clone();
            // A caller that gave up is no failure of the server.
            let _ = req.reply_bytes(body);
        }
        // The last replies may still be on their way: the caller hangs up when it has
        // them (closing first could cut them off).
        if let Some(p) = caller {
            let _ = tokio::time::timeout(idle, p.closed()).await;
        }
        (server, received, first, last)
    });
    let (server, received, first, last) = serving.await?;
    server.close().await;
    let secs = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    Ok(ReceiverResult { received, secs })
}

fn print(common: &Common, r: &Report) -> anyhow::Result<()> {
    if common.json {
        out::line(serde_json::to_string(r)?)?;
        return Ok(());
    }
    for row in &r.rpc {
        let l = &row.latency;
        out::line(format!(
            "call latency over {} (one call at a time, {} B{}, {} calls; medians of {} run{}):",
            row.transport,
            row.size,
            if row.encrypt { ", aes" } else { "" },
            l.ipcbus.pings,
            l.ipcbus.runs,
            if l.ipcbus.runs == 1 { "" } else { "s" }
        ))?;
        let line = |name: &str, x: &Latency| {
            format!(
                "  {name:<12} p50 {:>8.1} us   p99 {:>8.1} us   p999 {:>8.1} us",
                x.p50_us, x.p99_us, x.p999_us
            )
        };
        out::line(line("ipcbus call", &l.ipcbus))?;
        out::line(line(&format!("plain {}", row.transport), &l.baseline))?;
        out::line(format!(
            "  p50 ratio {:.2} (target: at most {LATENCY_TARGET})",
            l.p50_ratio
        ))?;
        let t = &row.throughput;
        out::line(format!(
            "call throughput over {} ({} in flight on one connection, {} B, {} calls a run):",
            row.transport, t.in_flight, row.size, t.calls
        ))?;
        out::line(format!(
            "  ipcbus calls      {:>12} calls/s",
            super::human(t.ipcbus)
        ))?;
        out::line(format!(
            "  plain {:<11} {:>12} round trips/s   ratio {:.2}",
            row.transport.as_str(),
            super::human(t.baseline),
            t.ratio
        ))?;
        out::line(format!(
            "  one-way events    {:>12} events/s       calls/events {:.2} (target: at least {THROUGHPUT_TARGET})",
            super::human(t.events),
            t.events_ratio
        ))?;
        if t.failed > 0 {
            out::note(format!("{} failed", out::plural(t.failed, "call")));
        }
    }
    Ok(())
}
