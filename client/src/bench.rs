//! `ipcbus bench`: throughput and latency figures from real processes.
//!
//! Throughput: one sender (this process) to N receivers, each a child process (this
//! same binary re-executed with the hidden `bench-receiver` command), on a private
//! temporary registry unless an EPM is configured. Each receiver times its own events
//! from the first to the last; the sender times from its first event to the last
//! acknowledgement. Lists of receiver counts, sizes and compression/encryption
//! settings run as a matrix of workloads, each `--runs` times (medians reported).
//!
//! Without `--count`, each workload is first calibrated with short runs (which warm
//! up both sides) and then sent as many events as last `--duration` (1 s) on each
//! side, three times; a run of 0.04 s measured mostly start-up and noise.
//!
//! `--rpc` measures calls instead (see the `rpc` module): latency one call at a time
//! and throughput with many in flight, each against a plain request/response pair
//! over the same transport, and the one-way event rate for comparison.
//!
//! `--baseline` runs every workload again over plain tokio TCP (a u32 length prefix and
//! the payload, nothing else; the same child processes in raw mode) in the same
//! invocation, and shows our figure as a ratio of it. `--latency` adds a ping-pong
//! between two processes over two handles (and over one raw TCP connection with
//! `--baseline`): p50/p99/p999 round trips. Figures are printed, never asserted.
//!
//! Layout: [`Args`] names the run, [`Spawned`] owns the child processes (killed by pid
//! when dropped), [`Figures`] is the one-workload report (the original output, kept
//! as it was), [`Report`] the matrix report.

use std::io::IsTerminal;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::{FutureExt, StreamExt};
use ipcbus::{Handle, Key, Receiver, Security, Sender, Transport};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, Lines};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::process::{Child, ChildStdout, Command};

use crate::common::{parse_secs, Backend, Common, ConfigContext, Salt};
use crate::out;

mod rpc;

/// Measure throughput (one sender to N receiver processes) and latency
///
/// Prints the events per second each receiver took (minimum and median), the
/// aggregate over all receivers, and the rate at which the sender saw events
/// acknowledged by every receiver. Lists (`-n 1,5,20 --size 64,1024`) run every
/// combination and print a table; `--baseline` adds the same workloads over plain
/// TCP and the ratio; `--latency` adds a ping-pong. By default every workload is
/// calibrated by short, untimed runs of each side (a warm-up), then run 3 times for
/// about a second each (--duration), and medians are shown; with --count, the
/// given number of events (a table then starts with one untimed warm-up run of
/// each side). Exit status 1 if any event was not acknowledged.
///
/// --rpc measures calls instead, over each --transport, against a server process
/// that echoes the body: the latency of one call at a time (p50/p99/p999 of --pings
/// calls) and the calls per second with --in-flight calls outstanding on one
/// connection (as many calls as take --duration, or --count), each against a plain
/// request/response pair over the same transport in the same run (length-prefixed
/// frames echoed by a child process: one at a time, and with the same number in
/// flight), and the one-way event rate of the same --size (the first one) for
/// comparison; medians of --runs. With --json one object: {"rpc":[{"transport",
/// "size","encrypt","latency":{"ipcbus":{"p50_us","p99_us","p999_us",...},
/// "baseline":{...},"p50_ratio"},"throughput":{"in_flight","calls","runs","ipcbus",
/// "baseline","ratio","events","events_ratio","failed"}}]} (rates per second).
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub json_opt: crate::common::JsonOpt,

    #[command(flatten)]
    pub bind: crate::common::BindOpts,

    /// Receiver processes; a comma-separated list runs each (e.g. 1,5,20)
    #[arg(long, short = 'n', default_value = "2", value_delimiter = ',',
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub receivers: Vec<u16>,

    /// Payload size of each event in bytes; a list runs each (e.g. 64,1024,65536)
    #[arg(long, default_value = "64", value_delimiter = ',')]
    pub size: Vec<usize>,

    /// Events to send per run (capped by --max-bytes for large payloads); default: as
    /// many as take --duration, measured by calibration runs
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    /// Without --count: how long each run should last, on each side (the bus and
    /// plain TCP)
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_secs)]
    pub duration: Duration,

    /// With --count: most payload bytes one receiver gets in one workload; fewer
    /// events are sent when count x size is more (at least 1000)
    #[arg(long, value_name = "BYTES", default_value_t = 256 << 20)]
    pub max_bytes: u64,

    /// Events in flight per receiver (unacknowledged) before the sender waits
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u64).range(1..))]
    pub window: u64,

    /// Give up on a receiver that has not finished after SECS
    #[arg(long, value_name = "SECS", default_value = "120", value_parser = parse_secs)]
    pub timeout: Duration,

    /// gzip compression of payloads of 512 bytes and more; a list runs each (e.g.
    /// auto,on). The table says what was in effect
    #[arg(long, value_enum, default_value = "auto", value_delimiter = ',')]
    pub compress: Vec<Compress>,

    /// Payload bytes: text (gzip shrinks it about 3x) or random (gzip cannot)
    #[arg(long, value_enum, default_value = "text")]
    pub payload: Payload,

    /// AES-256-GCM sealing: off, on, or off,on (on uses the configured password, else
    /// a random one for the run); with a password configured, the default is on
    #[arg(long, value_enum, value_delimiter = ',')]
    pub encrypt: Vec<Toggle>,

    /// Run every workload this many times and report medians [default: 3, or 1 with
    /// --count]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub runs: Option<u64>,

    /// Also run every workload over plain tokio TCP with length-prefixed frames, and
    /// show the ratio
    #[arg(long)]
    pub baseline: bool,

    /// Also measure ping-pong round trips between two processes over two handles
    #[arg(long)]
    pub latency: bool,

    /// Round trips per latency run (after 1000 for warm-up)
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub pings: u64,

    /// The standard suite: -n 1,5,20 --size 64,1024,65536 with compression off, plus
    /// 1 KiB with gzip and AES on, --baseline and --latency (add --runs 5)
    #[arg(long)]
    pub suite: bool,

    /// tokio runtime of the measuring process and of every child: current (one
    /// thread per process) or multi (a worker per core)
    #[arg(long, value_enum, default_value = "current")]
    pub rt: Rt,

    /// Transport between the processes: tcp, unix, or a list (tcp,unix) to run each;
    /// the plain baseline uses the same one (a plain Unix-socket pair for unix)
    /// [default: what the library picks: unix with the local registry, tcp with an
    /// EPM; --suite: tcp,unix]
    #[arg(long, value_delimiter = ',', value_parser = parse_transport)]
    pub transport: Vec<Transport>,

    /// Measure calls (request/reply) instead of events: latency and throughput
    /// against a plain request/response pair, and the one-way event rate
    #[arg(long, conflicts_with_all = ["suite", "baseline", "latency"])]
    pub rpc: bool,

    /// With --rpc: calls outstanding on one connection in the throughput runs
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub in_flight: u32,
}

fn parse_transport(s: &str) -> Result<Transport, String> {
    s.parse::<Transport>()
        .map_err(|_| format!("{s:?} is not a transport: write tcp or unix"))
}

/// Which tokio runtime the bench processes run on.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rt {
    /// One thread per process (`new_current_thread`).
    Current,
    /// The command's own multi-threaded runtime.
    Multi,
}

impl Rt {
    fn as_arg(self) -> &'static str {
        match self {
            Rt::Current => "current",
            Rt::Multi => "multi",
        }
    }
}

/// Runs `fut` to completion: on this runtime, or on a current-thread runtime of its
/// own in a dedicated thread.
async fn on_runtime<F, T>(rt: Rt, make: F) -> anyhow::Result<T>
where
    F: FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<T>>>>
        + Send
        + 'static,
    T: Send + 'static,
{
    if rt == Rt::Multi {
        return make().await;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench".into())
        .spawn(move || {
            let r = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start a current-thread runtime")
                .and_then(|rt| rt.block_on(make()));
            let _ = tx.send(r);
        })
        .context("cannot start the bench thread")?;
    rx.await
        .context("the bench thread ended without a result")?
}

/// `--encrypt`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Toggle {
    /// Not sealed (the local-user authentication of the default security)
    Off,
    /// Sealed with AES-256-GCM under a key derived from the password
    On,
}

impl Toggle {
    fn on(self) -> bool {
        self == Toggle::On
    }
}

/// `--payload`: what the events carry.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Payload {
    /// JSON-like text, compressible about 3x
    Text,
    /// Pseudo-random bytes, incompressible
    Random,
}

/// `--compress`: the sender's compression mode.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compress {
    /// The library's default: off on loopback (as here unless --ip or --epm say
    /// otherwise), on for other addresses, skipped while events do not compress
    Auto,
    /// Forced on (`compress(true)`): every event of 512 bytes or more
    On,
    /// Forced off (`compress(false)`)
    Off,
}

impl Compress {
    fn mode(self) -> ipcbus::Compression {
        match self {
            Compress::Auto => ipcbus::Compression::Auto,
            Compress::On => ipcbus::Compression::Always,
            Compress::Off => ipcbus::Compression::Never,
        }
    }
}

/// What a child process of a bench run does.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildMode {
    /// Receive events on the handle.
    Bus,
    /// Accept one plain TCP connection and read length-prefixed frames.
    Raw,
    /// Receive events on the handle and send each back on `--reply`.
    Pong,
    /// Accept one plain TCP connection and echo each length-prefixed frame.
    RawPong,
    /// Serve calls on the handle, replying with each request's body.
    Rpc,
}

/// Arguments of one receiver process of a bench run (hidden command).
#[derive(clap::Args, Debug)]
pub struct ReceiverArgs {
    #[command(flatten)]
    pub bind: crate::common::BindOpts,

    /// Handle to receive.
    pub handle: Handle,
    /// Events to take before reporting.
    #[arg(long)]
    pub count: u64,
    /// Stop waiting after this long without an event.
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    pub idle: Duration,
    /// What to do.
    #[arg(long, value_enum, default_value = "bus")]
    pub mode: ChildMode,
    /// Handle to send replies to (mode pong).
    #[arg(long)]
    pub reply: Option<Handle>,
    /// tokio runtime to run on.
    #[arg(long, value_enum, default_value = "multi")]
    pub rt: Rt,
    /// Transport to listen on.
    #[arg(long, default_value = "tcp", value_parser = parse_transport)]
    pub transport: Transport,
}

/// What one receiver process reports on stdout when done.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReceiverResult {
    received: u64,
    /// Seconds from the first event to the last.
    secs: f64,
}

impl ReceiverResult {
    fn rate(&self) -> f64 {
        rate(self.received, self.secs)
    }
}

/// The figures of a run.
#[derive(Debug, Serialize)]
struct Figures {
    #[serde(serialize_with = "transport_name")]
    transport: Transport,
    receivers: usize,
    size: usize,
    count: u64,
    /// Events per second each receiver took, in receiver order.
    per_receiver: Vec<f64>,
    min: f64,
    median: f64,
    /// Events taken by all receivers together, per second of the sender's run.
    aggregate: f64,
    /// Events acknowledged by every receiver, per second of the sender's run.
    sender_acked_rate: f64,
    acked: u64,
    failed: u64,
    secs: f64,
    /// The sender's compression mode, and what it did (e.g. "off: loopback").
    compression: String,
    compression_in_effect: String,
}

/// One throughput workload of a matrix run.
#[derive(Debug, Clone, Copy, Serialize)]
struct Workload {
    #[serde(serialize_with = "transport_name")]
    transport: Transport,
    receivers: usize,
    size: usize,
    compress: Compress,
    encrypt: bool,
    payload: Payload,
    /// Events sent per run.
    count: u64,
}

fn transport_name<S: serde::Serializer>(t: &Transport, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(t.as_str())
}

/// Medians over the runs of one workload on one transport.
#[derive(Debug, Clone, Serialize)]
struct Summary {
    runs: usize,
    /// Per-receiver events/s: the slowest receiver, and the median receiver.
    min: f64,
    median: f64,
    /// Megabytes (10^6) of payload per second for the median receiver.
    median_mb_s: f64,
    /// Events taken by all receivers together per second.
    aggregate: f64,
    /// Events acknowledged by every receiver per second (plain TCP: delivered to every
    /// receiver, there are no acknowledgements).
    sender_rate: f64,
    failed: u64,
    /// Seconds per run (from the first event sent to the last delivered).
    secs: f64,
}

/// One row of the matrix report.
#[derive(Debug, Serialize)]
struct Row {
    #[serde(flatten)]
    workload: Workload,
    ipcbus: Summary,
    baseline: Option<Summary>,
    /// ipcbus median per-receiver rate / baseline's.
    ratio: Option<f64>,
    /// What the bus's compression did in the last run (e.g. "off: loopback").
    compression_in_effect: String,
}

/// Round-trip percentiles in microseconds (medians over runs).
#[derive(Debug, Clone, Serialize)]
struct Latency {
    size: usize,
    pings: u64,
    runs: usize,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
}

/// The report of a matrix run.
#[derive(Debug, Serialize)]
struct Report {
    throughput: Vec<Row>,
    /// The first of `latencies` (the form of this field before transports).
    latency: Option<LatencyRow>,
    /// One ping-pong per transport.
    latencies: Vec<LatencyRow>,
}

#[derive(Debug, Clone, Serialize)]
struct LatencyRow {
    #[serde(serialize_with = "transport_name")]
    transport: Transport,
    ipcbus: Latency,
    baseline: Option<Latency>,
    /// ipcbus p50 / baseline p50.
    p50_ratio: Option<f64>,
}

/// The receiver processes of a run, killed by pid when dropped.
struct Spawned {
    children: Vec<(Child, Lines<BufReader<ChildStdout>>)>,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        for (c, _) in &mut self.children {
            let _ = c.start_kill();
        }
    }
}

/// Bytes per receiver the first calibration run of a workload moves at most.
const CALIBRATION_BYTES: u64 = 16 << 20;

/// Password and salt for the processes of an encrypted workload.
type Creds = Option<(Vec<u8>, Salt)>;

/// Everything a run needs that does not change between workloads.
struct Ctx<'a> {
    common: &'a Common,
    args: &'a Args,
    dir: &'a Path,
    /// The configured password, or one made up for `--encrypt on`.
    creds: Creds,
    key: Option<Key>,
}

/// Runs `ipcbus bench`.
///
/// # Errors
/// Configuration errors, or when receivers cannot be started.
pub async fn run(common: &Common, args: Args) -> anyhow::Result<ExitCode> {
    let common = common.clone();
    on_runtime(args.rt, move || Box::pin(run_here(common, args))).await
}

async fn run_here(common: Common, mut args: Args) -> anyhow::Result<ExitCode> {
    let common = &common;
    let configured = common.credentials()?;
    if args.encrypt.is_empty() {
        args.encrypt = vec![if configured.is_some() {
            Toggle::On
        } else {
            Toggle::Off
        }];
    }
    if args.transport.is_empty() {
        args.transport = if args.suite {
            vec![Transport::Tcp, Transport::Unix]
        } else if common.epm_addr()?.is_some() {
            vec![Transport::Tcp]
        } else {
            vec![Transport::Unix]
        };
    }
    if args.suite {
        args.receivers = vec![1, 5, 20];
        args.size = vec![64, 1024, 64 * 1024];
        args.compress = vec![Compress::Off];
        args.encrypt = vec![Toggle::Off];
        args.baseline = true;
        args.latency = true;
    }
    let (creds, key) = match configured {
        Some(c) => {
            let key = common.key()?;
            (Some(c), key)
        }
        None if args.encrypt.contains(&Toggle::On) || args.suite => {
            let pw = format!("bench-{:08x}{:08x}", rand_u32(), rand_u32()).into_bytes();
            let salt = Salt(b"ipcbus bench".to_vec());
            let key = Key::derive(&pw, &salt.0).context("bench key")?;
            (Some((pw, salt)), Some(key))
        }
        None => (None, None),
    };
    let dir = tempfile::Builder::new()
        .prefix("ipcbus-bench-")
        .tempdir()
        .config("cannot create a temporary registry directory")?;
    let ctx = Ctx {
        common,
        args: &args,
        dir: dir.path(),
        creds,
        key,
    };

    let mut workloads = Vec::new();
    for &t in &args.transport {
        for &n in &args.receivers {
            for &size in &args.size {
                for &compress in &args.compress {
                    for &encrypt in &args.encrypt {
                        workloads.push(ctx.workload(t, n, size, compress, encrypt.on()));
                    }
                }
            }
        }
        if args.suite {
            workloads.push(ctx.workload(t, 1, 1024, Compress::On, true));
        }
    }
    let by_time = args.count.is_none();
    let runs = args.runs.unwrap_or(if by_time { 3 } else { 1 });
    if args.rpc {
        let ok = rpc::run(&ctx, runs).await?;
        return Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }

    let single = workloads.len() == 1 && runs == 1 && !args.baseline && !args.latency;
    if single {
        let mut w = workloads[0];
        if by_time {
            w.count = ctx.calibrate(w, &indicatif::ProgressBar::hidden()).await?;
        }
        let (fig, _) = ctx.bus_run(w).await?;
        print(common, &fig)?;
        return Ok(if fig.failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }

    let per = if args.baseline { 2 } else { 1 };
    let pingpongs = if args.latency {
        args.transport.len() as u64
    } else {
        0
    };
    let steps = workloads.len() as u64 * runs * per + pingpongs * runs * per;
    let bar = progress(common, steps);
    // One short, untimed run of each side first: the first run of an invocation
    // otherwise pays for cold caches and page faults (it measured the lowest of all
    // workloads in two suites). By time, every workload's calibration does that.
    if let Some(first) = workloads.first().filter(|_| !by_time) {
        let warm = Workload {
            count: first.count.min(100_000),
            ..*first
        };
        bar.set_message("warm-up");
        ctx.bus_run(warm).await?;
        if args.baseline {
            ctx.raw_run(warm).await?;
        }
    }
    let mut rows = Vec::new();
    let mut failed = 0u64;
    for w in &mut workloads {
        if by_time {
            w.count = ctx.calibrate(*w, &bar).await?;
        }
        let mut bus = Vec::new();
        let mut raw = Vec::new();
        let mut in_effect = String::new();
        for _ in 0..runs {
            // Interleaved, so both see the same machine load.
            bar.set_message(format!("{} ipcbus", w.label()));
            let (fig, run) = ctx.bus_run(*w).await?;
            in_effect = fig.compression_in_effect;
            bus.push(run);
            bar.inc(1);
            if args.baseline {
                bar.set_message(format!("{} plain {}", w.label(), w.transport));
                raw.push(ctx.raw_run(*w).await?);
                bar.inc(1);
            }
        }
        let ipcbus = summarize(&bus, w.size);
        failed += ipcbus.failed;
        let baseline = args.baseline.then(|| summarize(&raw, w.size));
        let ratio = baseline.as_ref().map(|b| ipcbus.median / b.median);
        rows.push(Row {
            workload: *w,
            ipcbus,
            baseline,
            ratio,
            compression_in_effect: in_effect,
        });
    }
    let mut latencies = Vec::new();
    for &t in args.transport.iter().filter(|_| args.latency) {
        let size = args.size.first().copied().unwrap_or(64);
        let mut bus = Vec::new();
        let mut raw = Vec::new();
        for _ in 0..runs {
            bar.set_message(format!("ping-pong ipcbus {t}"));
            bus.push(ctx.bus_latency(t, size).await?);
            bar.inc(1);
            if args.baseline {
                bar.set_message(format!("ping-pong plain {t}"));
                raw.push(ctx.raw_latency(t, size).await?);
                bar.inc(1);
            }
        }
        let ipcbus = median_latency(&bus, size, args.pings);
        let baseline = args
            .baseline
            .then(|| median_latency(&raw, size, args.pings));
        let p50_ratio = baseline.as_ref().map(|b| ipcbus.p50_us / b.p50_us);
        latencies.push(LatencyRow {
            transport: t,
            ipcbus,
            baseline,
            p50_ratio,
        });
    }
    bar.finish_and_clear();
    let report = Report {
        throughput: rows,
        latency: latencies.first().cloned(),
        latencies,
    };
    print_report(common, &report)?;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

impl Ctx<'_> {
    fn workload(
        &self,
        transport: Transport,
        n: u16,
        size: usize,
        compress: Compress,
        encrypt: bool,
    ) -> Workload {
        let cap = (self.args.max_bytes / size.max(1) as u64).max(1000);
        Workload {
            transport,
            receivers: usize::from(n),
            size,
            compress,
            encrypt,
            payload: self.args.payload,
            // By time: set by `calibrate` before the workload runs.
            count: self.args.count.map_or(0, |c| c.min(cap)),
        }
    }

    fn payload(&self, n: usize) -> Vec<u8> {
        match self.args.payload {
            Payload::Text => payload(n),
            Payload::Random => random_payload(n),
        }
    }

    /// How many events make runs of `--duration` on each side: short untimed runs of
    /// the bus, ten times longer each (at most) until one lasts 40 % of that,
    /// then one of plain TCP as long (with `--baseline`); the count is the faster
    /// side's rate times the duration, but at most twice the bus's (so a bus that
    /// is much slower, e.g. compressing, does not run for many seconds). These runs
    /// are the workload's warm-up too.
    async fn calibrate(&self, w: Workload, bar: &indicatif::ProgressBar) -> anyhow::Result<u64> {
        let want = self.args.duration.as_secs_f64();
        bar.set_message(format!("{} warm-up", w.label()));
        // The first run moves at most 16 MiB per receiver (10,000 events up to 1 KiB;
        // 4 events of 4 MiB), so large events do not start with minutes of warm-up.
        let mut count = (CALIBRATION_BYTES / (w.size as u64).max(1)).clamp(1, 10_000);
        let mut rate;
        loop {
            let (_, run) = self.bus_run(Workload { count, ..w }).await?;
            rate = run.sender_rate.max(1.0);
            let secs = count as f64 / rate;
            if secs >= want * 0.4 || count >= 1 << 40 {
                break;
            }
            let grow = (want * 0.5 / secs.max(1e-6)).clamp(2.0, 10.0);
            count = (count as f64 * grow) as u64;
        }
        if self.args.baseline {
            let raw = self.raw_run(Workload { count, ..w }).await?;
            rate = rate.max(raw.sender_rate.min(2.0 * rate));
        }
        // Half as much again: shorter runs go slower (start-up), and the load moves.
        // With 10 % over and calibration runs of a tenth, and with 30 % over and runs
        // of 40 %, a second asked for gave 0.92-0.97 s at 1 KiB.
        Ok(((rate * want * 1.5) as u64).max(3))
    }

    fn discovery(&self) -> anyhow::Result<ipcbus::Discovery> {
        Ok(match self.common.backend()? {
            Backend::Epm(_) | Backend::Etcd(_) => self.common.discovery()?,
            Backend::Local => {
                ipcbus::Discovery::local_at(self.dir).config("cannot open the bench registry")?
            }
        })
    }

    fn security(&self, encrypt: bool) -> Security {
        match (&self.key, encrypt) {
            (Some(k), true) => Security::Encrypt(k.clone()),
            _ => Security::default(),
        }
    }

    fn creds(&self, encrypt: bool) -> Creds {
        if encrypt {
            self.creds.clone()
        } else {
            None
        }
    }

    /// One throughput run over the bus: the original one-workload figures, and the
    /// summary form of the same run.
    async fn bus_run(&self, w: Workload) -> anyhow::Result<(Figures, RunFigures)> {
        let n = w.receivers;
        let handle = bench_handle()?;
        let mut spawned = spawn_children(
            self,
            n,
            w.count,
            &handle,
            (ChildMode::Bus, w.transport),
            None,
            self.creds(w.encrypt),
        )
        .await?;

        // `--window` events in flight per receiver: the sender's own queue capacity,
        // so `queue_bytes` waits for acknowledgements exactly as a window of reports
        // would, without a report handle per event.
        let mut tx = Sender::builder(handle)
            .discovery(self.discovery()?)
            .security(self.security(w.encrypt))
            .compression(w.compress.mode())
            .queue_capacity(usize::try_from(self.args.window).unwrap_or(usize::MAX))
            .build()
            .await?;
        let found = tx.wait_for_receivers(n, Duration::from_secs(10)).await;
        if found < n {
            bail!("the sender reached {found} of {n} receivers");
        }

        let payload = bytes::Bytes::from(self.payload(w.size));
        // Every event a receiver did not acknowledge is reported here.
        let mut events = Box::pin(tx.events());
        let t0 = Instant::now();
        for _ in 0..w.count {
            tx.queue_bytes(&payload).await?;
        }
        // Acknowledgements are cumulative: the last event acknowledged by all n
        // receivers, with no failure reported, means every event was.
        let last = tx.last_report().await;
        let secs = t0.elapsed().as_secs_f64();
        let mut failed = 0u64;
        while let Some(Some(ev)) = events.next().now_or_never() {
            if let ipcbus::SenderEvent::SendFailed {
                first_seq,
                last_seq,
                ..
            } = ev
            {
                failed += last_seq - first_seq + 1;
            }
        }
        if !(last.all_acked() && last.acked.len() == n) {
            failed = failed.max(1);
        }
        let failed = failed.min(w.count);
        let acked = w.count - failed;
        let compression = tx.compression().to_string();
        let compression_in_effect = tx.compression_stats().to_string();
        tx.close().await;

        let results = collect(&mut spawned, self.args.timeout).await?;
        drop(spawned);
        let run = RunFigures::new(&results, rate(acked, secs), secs, failed);
        let fig = Figures {
            transport: w.transport,
            receivers: n,
            size: w.size,
            count: w.count,
            per_receiver: results.iter().map(ReceiverResult::rate).collect(),
            min: run.min,
            median: run.median,
            aggregate: run.aggregate,
            sender_acked_rate: run.sender_rate,
            acked,
            failed,
            secs,
            compression,
            compression_in_effect,
        };
        Ok((fig, run))
    }

    /// The same workload over plain TCP: one connection per receiver process, each
    /// event written to each connection as a u32 length and the payload, through a
    /// 64 KiB buffer; the run ends when every receiver says it has all events.
    async fn raw_run(&self, w: Workload) -> anyhow::Result<RunFigures> {
        let handle = bench_handle()?;
        let mut spawned = spawn_children(
            self,
            w.receivers,
            w.count,
            &handle,
            (ChildMode::Raw, w.transport),
            None,
            None,
        )
        .await?;
        let mut conns = Vec::new();
        for addr in &spawned.addrs {
            let (rd, wr) = plain_connect(addr).await?;
            conns.push((rd, BufWriter::with_capacity(64 * 1024, wr)));
        }
        let payload = self.payload(w.size);
        let len = u32::try_from(w.size).context("payload too large")?;
        let t0 = Instant::now();
        for _ in 0..w.count {
            for (_, wr) in &mut conns {
                wr.write_u32(len).await?;
                wr.write_all(&payload).await?;
            }
        }
        for (rd, wr) in &mut conns {
            wr.flush().await?;
            let mut done = [0u8; 1];
            tokio::time::timeout(self.args.timeout, rd.read_exact(&mut done))
                .await
                .context("plain receiver did not finish in time")??;
        }
        let secs = t0.elapsed().as_secs_f64();
        drop(conns);
        let results = collect(&mut spawned.inner, self.args.timeout).await?;
        Ok(RunFigures::new(&results, rate(w.count, secs), secs, 0))
    }

    /// Ping-pong over two handles: this process sends on one and receives the echo on
    /// the other; a child process receives and sends back. Round trips in microseconds.
    async fn bus_latency(&self, transport: Transport, size: usize) -> anyhow::Result<Vec<f64>> {
        let ping = bench_handle()?;
        let pong = bench_handle()?;
        let warm = 1000u64;
        let mut rx = Receiver::builder(pong.clone())
            .discovery(self.discovery()?)
            .transports([transport])
            .bind()
            .await?;
        let mut spawned = spawn_children(
            self,
            1,
            warm + self.args.pings,
            &ping,
            (ChildMode::Pong, transport),
            Some(&pong),
            None,
        )
        .await?;
        let mut tx = Sender::builder(ping)
            .discovery(self.discovery()?)
            .build()
            .await?;
        if tx.wait_for_receivers(1, Duration::from_secs(10)).await < 1 {
            bail!("the ping sender found no receiver");
        }
        let payload = bytes::Bytes::from(payload(size));
        let mut rtts = Vec::with_capacity(self.args.pings as usize);
        // One deadline for the whole run, like the plain TCP ping (a timer per ping
        // would cost the bus a timer registration per round trip that plain TCP
        // does not pay).
        let pings = self.args.pings;
        // In a task of its own, not in the runtime's `block_on` future: a wake-up of
        // that future from another task (the bus's reader) costs tokio one more turn of
        // the I/O driver per round trip. The plain TCP ping runs the same way.
        let ping = tokio::spawn(async move {
            for i in 0..warm + pings {
                let t = Instant::now();
                drop(tx.publish_bytes(payload.clone()).await?);
                rx.recv().await.context("pong receiver closed")?;
                if i >= warm {
                    rtts.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
            anyhow::Ok((tx, rx, rtts))
        });
        let (tx, rx, rtts) = tokio::time::timeout(self.args.timeout, ping)
            .await
            .context("no pong in time")???;
        tx.close().await;
        rx.close().await;
        let _ = collect(&mut spawned, self.args.timeout).await;
        Ok(rtts)
    }

    /// Ping-pong over one plain TCP connection with length-prefixed frames.
    async fn raw_latency(&self, transport: Transport, size: usize) -> anyhow::Result<Vec<f64>> {
        let warm = 1000u64;
        let handle = bench_handle()?;
        let mut spawned = spawn_children(
            self,
            1,
            warm + self.args.pings,
            &handle,
            (ChildMode::RawPong, transport),
            None,
            None,
        )
        .await?;
        let addr = spawned.addrs.first().context("no plain pong address")?;
        let (mut rd, mut wr) = plain_connect(addr).await?;
        let mut frame = Vec::with_capacity(4 + size);
        frame.extend_from_slice(&u32::try_from(size)?.to_be_bytes());
        frame.extend_from_slice(&payload(size));
        let mut back = vec![0u8; frame.len()];
        let mut rtts = Vec::with_capacity(self.args.pings as usize);
        let pings = self.args.pings;
        let ping = tokio::spawn(async move {
            for i in 0..warm + pings {
                let t = Instant::now();
                wr.write_all(&frame).await?;
                rd.read_exact(&mut back).await?;
                if i >= warm {
                    rtts.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
            anyhow::Ok((rd, wr, rtts))
        });
        let (rd, wr, rtts) = tokio::time::timeout(self.args.timeout, ping)
            .await
            .context("no plain pong in time")???;
        drop((rd, wr));
        let _ = collect(&mut spawned.inner, self.args.timeout).await;
        Ok(rtts)
    }
}

impl Workload {
    fn label(&self) -> String {
        format!(
            "{} 1->{} {} B{}{}{}",
            self.transport,
            self.receivers,
            self.size,
            match self.compress {
                Compress::Auto => "",
                Compress::On => " gzip",
                Compress::Off => " gzip off",
            },
            if self.encrypt { " aes" } else { "" },
            if self.payload == Payload::Random {
                " random"
            } else {
                ""
            }
        )
    }
}

/// One run's figures, in the form the summary takes medians of.
#[derive(Debug, Clone)]
struct RunFigures {
    min: f64,
    median: f64,
    aggregate: f64,
    sender_rate: f64,
    failed: u64,
    secs: f64,
}

impl RunFigures {
    fn new(results: &[ReceiverResult], sender_rate: f64, secs: f64, failed: u64) -> RunFigures {
        let mut rates: Vec<f64> = results.iter().map(ReceiverResult::rate).collect();
        rates.sort_by(f64::total_cmp);
        let received: u64 = results.iter().map(|r| r.received).sum();
        RunFigures {
            min: rates.first().copied().unwrap_or(0.0),
            median: median(&rates),
            aggregate: rate(received, secs),
            sender_rate,
            failed,
            secs,
        }
    }
}

fn summarize(runs: &[RunFigures], size: usize) -> Summary {
    let med = |f: fn(&RunFigures) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        median(&v)
    };
    let m = med(|r| r.median);
    Summary {
        runs: runs.len(),
        min: med(|r| r.min),
        median: m,
        median_mb_s: m * size as f64 / 1e6,
        aggregate: med(|r| r.aggregate),
        sender_rate: med(|r| r.sender_rate),
        failed: runs.iter().map(|r| r.failed).sum(),
        secs: med(|r| r.secs),
    }
}

fn median_latency(runs: &[Vec<f64>], size: usize, pings: u64) -> Latency {
    let pick = |q: f64| {
        let mut per: Vec<f64> = runs
            .iter()
            .map(|r| {
                let mut v = r.clone();
                v.sort_by(f64::total_cmp);
                percentile(&v, q)
            })
            .collect();
        per.sort_by(f64::total_cmp);
        median(&per)
    };
    Latency {
        size,
        pings,
        runs: runs.len(),
        p50_us: pick(0.50),
        p99_us: pick(0.99),
        p999_us: pick(0.999),
    }
}

/// The `q` quantile of sorted values (nearest rank).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Text-like payload bytes (gzip shrinks them about 3x, as it would JSON or logs).
fn payload(n: usize) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "{\"order\":",
        "\"price\":",
        "\"qty\":",
        "\"side\":\"buy\"",
        "\"side\":\"sell\"",
        "\"ts\":1763700000,",
        "\"EUR\",",
        "\"status\":\"filled\"",
        "12.50,",
        "3,",
        "},",
        " ",
    ];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut out = Vec::with_capacity(n + 24);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize].as_bytes());
    }
    out.truncate(n);
    out
}

/// Pseudo-random bytes (xorshift): gzip cannot shrink them.
fn random_payload(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn bench_handle() -> anyhow::Result<Handle> {
    format!("ipcbus-bench-{}-{:08x}", std::process::id(), rand_u32())
        .parse()
        .context("bench handle")
}

fn progress(common: &Common, steps: u64) -> indicatif::ProgressBar {
    if common.json || !std::io::stderr().is_terminal() || steps < 2 {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Children of one run, with the addresses the plain-TCP ones listen on.
struct Children {
    inner: Spawned,
    addrs: Vec<String>,
}

impl std::ops::Deref for Children {
    type Target = Spawned;
    fn deref(&self) -> &Spawned {
        &self.inner
    }
}

impl std::ops::DerefMut for Children {
    fn deref_mut(&mut self) -> &mut Spawned {
        &mut self.inner
    }
}

async fn spawn_children(
    ctx: &Ctx<'_>,
    n: usize,
    count: u64,
    handle: &Handle,
    (mode, transport): (ChildMode, Transport),
    reply: Option<&Handle>,
    creds: Creds,
) -> anyhow::Result<Children> {
    let common = ctx.common;
    let exe = std::env::current_exe().context("cannot find the ipcbus executable")?;
    let mut spawned = Spawned {
        children: Vec::new(),
    };
    for _ in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.arg("bench-receiver")
            .arg(handle.as_str())
            .arg("--count")
            .arg(count.to_string())
            .arg("--mode")
            .arg(match mode {
                ChildMode::Bus => "bus",
                ChildMode::Raw => "raw",
                ChildMode::Pong => "pong",
                ChildMode::RawPong => "raw-pong",
                ChildMode::Rpc => "rpc",
            })
            .arg("--rt")
            .arg(ctx.args.rt.as_arg())
            .arg("--transport")
            .arg(transport.as_str())
            // Bus receivers listen on this transport only, so the sender uses it.
            .env("IPCBUS_TRANSPORTS", transport.as_str())
            // The receivers get the password and salt below, or none.
            .env_remove("IPCBUS_PASSWORD_FILE")
            .env_remove("IPCBUS_PASSWORD")
            .env_remove("IPCBUS_SALT")
            .env_remove("IPCBUS_EPM_PASSWORD_FILE")
            .env_remove("IPCBUS_EPM_PASSWORD")
            .env_remove("IPCBUS_EPM_SALT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(r) = reply {
            cmd.arg("--reply").arg(r.as_str());
        }
        match common.backend()? {
            Backend::Epm(epm) => {
                cmd.arg("--epm").arg(epm);
            }
            Backend::Etcd(urls) => {
                cmd.arg("--etcd").arg(urls);
            }
            Backend::Local => {
                cmd.env("IPCBUS_RUNTIME_DIR", ctx.dir)
                    .env_remove("IPCBUS_EPM")
                    .env_remove("IPCBUS_ETCD");
            }
        }
        if let Some(ip) = common.ip {
            cmd.arg("--ip").arg(ip.to_string());
        }
        if let Some(ports) = &common.ports {
            let list: Vec<String> = ports.0.iter().map(u16::to_string).collect();
            cmd.arg("--ports").arg(list.join(","));
        }
        if let Some((pw, salt)) = &creds {
            cmd.env("IPCBUS_PASSWORD", std::ffi::OsString::from_vec(pw.clone()))
                .env("IPCBUS_SALT", salt.to_hex());
        }
        let mut child = cmd.spawn().context("cannot start a receiver process")?;
        let stdout = child
            .stdout
            .take()
            .context("receiver process has no stdout")?;
        spawned
            .children
            .push((child, BufReader::new(stdout).lines()));
    }
    let mut addrs = Vec::new();
    for (i, (_, lines)) in spawned.children.iter_mut().enumerate() {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .with_context(|| format!("receiver {i} did not start in time"))?
            .with_context(|| format!("reading receiver {i}"))?
            .with_context(|| format!("receiver {i} exited before it was ready"))?;
        match line.strip_prefix("ready ") {
            Some(addr) => addrs.push(addr.trim().to_string()),
            None => bail!("receiver {i} said {line:?} instead of ready"),
        }
    }
    Ok(Children {
        inner: spawned,
        addrs,
    })
}

/// Reads every child's result line and waits for it to exit.
async fn collect(spawned: &mut Spawned, timeout: Duration) -> anyhow::Result<Vec<ReceiverResult>> {
    let mut results = Vec::with_capacity(spawned.children.len());
    let deadline = tokio::time::Instant::now() + timeout;
    for (i, (child, lines)) in spawned.children.iter_mut().enumerate() {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .with_context(|| format!("receiver {i} did not report in time"))?
            .with_context(|| format!("reading receiver {i}"))?
            .with_context(|| format!("receiver {i} exited without a report"))?;
        let r: ReceiverResult = serde_json::from_str(&line)
            .with_context(|| format!("receiver {i} reported {line:?}"))?;
        results.push(r);
        let _ = tokio::time::timeout_at(deadline, child.wait()).await;
    }
    Ok(results)
}

/// Runs one child process of a bench: prints `ready ADDR`, does its part, prints a
/// JSON [`ReceiverResult`].
///
/// # Errors
/// When it cannot bind, or stdout is closed.
pub async fn run_receiver(common: &Common, args: ReceiverArgs) -> anyhow::Result<ExitCode> {
    let common = common.clone();
    on_runtime(args.rt, move || Box::pin(run_receiver_here(common, args))).await
}

async fn run_receiver_here(common: Common, args: ReceiverArgs) -> anyhow::Result<ExitCode> {
    let common = &common;
    let result = match args.mode {
        ChildMode::Bus | ChildMode::Pong => bus_child(common, &args).await?,
        ChildMode::Raw | ChildMode::RawPong => raw_child(common, &args).await?,
        ChildMode::Rpc => rpc::server_child(common, &args).await?,
    };
    out::line(serde_json::to_string(&result)?)?;
    Ok(ExitCode::SUCCESS)
}

async fn bus_child(common: &Common, args: &ReceiverArgs) -> anyhow::Result<ReceiverResult> {
    let mut b = Receiver::builder(args.handle.clone())
        .discovery(common.discovery()?)
        .security(common.security()?)
        .transports([args.transport])
        .queue_capacity(8192);
    if let Some(ip) = common.ip {
        b = b.ip(ip);
    }
    if let Some(p) = &common.ports {
        b = b.allowed_ports(p.0.iter().copied());
    }
    let mut rx = b.bind().await?;
    let mut reply = match (&args.reply, args.mode) {
        (Some(h), ChildMode::Pong) => {
            let mut tx = Sender::builder(h.clone())
                .discovery(common.discovery()?)
                .security(common.security()?)
                .build()
                .await?;
            if tx.wait_for_receivers(1, Duration::from_secs(10)).await < 1 {
                bail!("the pong sender found no receiver");
            }
            Some(tx)
        }
        _ => None,
    };
    out::line(format!("ready {}", rx.endpoints_text()))?;
    let (count, idle) = (args.count, args.idle);
    // A task of its own (see `bus_latency`), like the plain child's loop.
    let taking = tokio::spawn(async move {
        let mut received = 0u64;
        let mut first: Option<Instant> = None;
        let mut last = Instant::now();
        let mut watchdog = Watchdog::new(idle);
        while received < count {
            let next = match rx.try_recv() {
                Some(m) => Some(m),
                None => tokio::select! {
                    m = rx.recv() => m,
                    () = watchdog.expired(last) => None,
                },
            };
            match next {
                Some(m) => {
                    last = Instant::now();
                    first.get_or_insert(last);
                    received += 1;
                    if let Some(tx) = &mut reply {
                        drop(tx.publish_bytes(m.into_payload()).await?);
                    }
                }
                None => break,
            }
        }
        anyhow::Ok((rx, reply, received, first, last))
    });
    let (rx, reply, received, first, last) = taking.await??;
    if let Some(tx) = reply {
        tx.close().await;
    }
    rx.close().await;
    let secs = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    Ok(ReceiverResult { received, secs })
}

/// Ends a wait once nothing has arrived for `idle`, with one timer for the whole run
/// (re-armed only when it fires) instead of a timer per event.
struct Watchdog {
    idle: Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Watchdog {
    fn new(idle: Duration) -> Watchdog {
        Watchdog {
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
        }
    }

    /// Resolves once `idle` has passed since `last` (the latest arrival).
    async fn expired(&mut self, last: Instant) {
        loop {
            (&mut self.sleep).await;
            let due = last + self.idle;
            if Instant::now() >= due {
                return;
            }
            self.sleep.as_mut().reset(due.into());
        }
    }
}

/// The halves of a plain connection, whichever the transport.
type PlainRead = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
type PlainWrite = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

/// Connects to a plain child's `ready` address: `ip:port` (TCP, no Nagle) or
/// `unix:///path`.
async fn plain_connect(addr: &str) -> anyhow::Result<(PlainRead, PlainWrite)> {
    match addr.strip_prefix("unix://") {
        Some(path) => {
            let s = UnixStream::connect(path)
                .await
                .with_context(|| format!("connecting to plain receiver {addr}"))?;
            let (rd, wr) = s.into_split();
            Ok((Box::new(rd), Box::new(wr)))
        }
        None => {
            let s = TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to plain receiver {addr}"))?;
            s.set_nodelay(true)?;
            let (rd, wr) = s.into_split();
            Ok((Box::new(rd), Box::new(wr)))
        }
    }
}

/// Plain TCP or Unix socket: accept one connection, read (and with raw-pong echo) `count`
/// length-prefixed frames, then write one byte.
async fn raw_child(common: &Common, args: &ReceiverArgs) -> anyhow::Result<ReceiverResult> {
    let (rd, wr) = match args.transport {
        Transport::Tcp => {
            let ip = common
                .ip
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
            let l = TcpListener::bind((ip, 0)).await?;
            out::line(format!("ready {}", l.local_addr()?))?;
            let (s, _) = tokio::time::timeout(args.idle, l.accept())
                .await
                .context("no plain connection in time")??;
            s.set_nodelay(true)?;
            let (rd, wr) = s.into_split();
            (Box::new(rd) as PlainRead, Box::new(wr) as PlainWrite)
        }
        Transport::Unix => {
            let dir = tempfile::Builder::new()
                .prefix("ipcbus-plain-")
                .tempdir()
                .context("cannot create a socket directory")?;
            let path = dir.path().join("s.sock");
            let l = UnixListener::bind(&path)?;
            out::line(format!("ready unix://{}", path.display()))?;
            let (s, _) = tokio::time::timeout(args.idle, l.accept())
                .await
                .context("no plain connection in time")??;
            drop(dir);
            let (rd, wr) = s.into_split();
            (Box::new(rd) as PlainRead, Box::new(wr) as PlainWrite)
        }
    };
    let (count, idle, mode) = (args.count, args.idle, args.mode);
    let taking = tokio::spawn(async move {
        // Echoes are buffered and written when no more input is buffered: one write
        // per frame one at a time (ping-pong), one per batch when frames are
        // pipelined (`bench --rpc`'s plain pair with many in flight).
        let mut wr = BufWriter::with_capacity(64 * 1024, wr);
        let mut rd = tokio::io::BufReader::with_capacity(64 * 1024, rd);
        let mut buf = vec![0u8; 64 * 1024];
        let mut received = 0u64;
        let mut first: Option<Instant> = None;
        let mut last = Instant::now();
        let mut watchdog = Watchdog::new(idle);
        while received < count {
            let len = if rd.buffer().len() >= 4 {
                rd.read_u32().await? as usize
            } else {
                wr.flush().await?;
                tokio::select! {
                    n = rd.read_u32() => match n {
                        Ok(n) => n as usize,
                        Err(_) => break,
                    },
                    () = watchdog.expired(last) => break,
                }
            };
            if len > 16 << 20 {
                bail!("plain frame of {len} bytes");
            }
            if buf.len() < len {
                buf.resize(len, 0);
            }
            rd.read_exact(&mut buf[..len]).await?;
            if mode == ChildMode::RawPong {
                wr.write_all(&(len as u32).to_be_bytes()).await?;
                wr.write_all(&buf[..len]).await?;
            }
            last = Instant::now();
            first.get_or_insert(last);
            received += 1;
        }
        anyhow::Ok((wr, received, first, last))
    });
    let (mut wr, received, first, last) = taking.await??;
    if args.mode == ChildMode::Raw {
        wr.write_all(&[1]).await?;
    }
    wr.flush().await?;
    let secs = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    Ok(ReceiverResult { received, secs })
}

fn print(common: &Common, f: &Figures) -> anyhow::Result<()> {
    if common.json {
        out::line(serde_json::to_string(f)?)?;
        return Ok(());
    }
    out::line(format!(
        "bench: 1 sender -> {}, {} of {} B, over {}",
        if f.receivers == 1 {
            "1 receiver process".to_owned()
        } else {
            format!("{} receiver processes", f.receivers)
        },
        out::plural(f.count, "event"),
        f.size,
        f.transport
    ))?;
    out::line(format!(
        "  per receiver: min {} msgs/s, median {} msgs/s",
        human(f.min),
        human(f.median)
    ))?;
    out::line(format!(
        "  aggregate:    {} msgs/s taken by all receivers together",
        human(f.aggregate)
    ))?;
    out::line(format!(
        "  sender:       {} msgs/s acknowledged by every receiver ({} of {} events, {:.2} s)",
        human(f.sender_acked_rate),
        f.acked,
        f.count,
        f.secs
    ))?;
    out::line(format!(
        "  compression:  {} ({})",
        f.compression, f.compression_in_effect
    ))?;
    if f.failed > 0 {
        out::note(format!(
            "{} not acknowledged by every receiver",
            out::plural(f.failed, "event")
        ));
    }
    Ok(())
}

fn print_report(common: &Common, r: &Report) -> anyhow::Result<()> {
    if common.json {
        out::line(serde_json::to_string(r)?)?;
        return Ok(());
    }
    let runs = r.throughput.first().map_or(1, |row| row.ipcbus.runs);
    out::line(format!(
        "throughput (msgs/s; medians of {runs} run{}):",
        if runs == 1 { "" } else { "s" }
    ))?;
    out::line(format!(
        "{:<27} {:>9} {:>5} {:>12} {:>12} {:>9} {:>12} {:>12} {:>12} {:>6}",
        "workload",
        "events",
        "secs",
        "recv min",
        "recv median",
        "MB/s",
        "aggregate",
        "sender acked",
        "plain",
        "ratio"
    ))?;
    for row in &r.throughput {
        let w = &row.workload;
        let b = &row.ipcbus;
        out::line(format!(
            "{:<27} {:>9} {:>5.2} {:>12} {:>12} {:>9.1} {:>12} {:>12} {:>12} {:>6}",
            w.label(),
            w.count,
            b.secs,
            human(b.min),
            human(b.median),
            b.median_mb_s,
            human(b.aggregate),
            human(b.sender_rate),
            row.baseline
                .as_ref()
                .map_or("-".to_string(), |x| human(x.median)),
            row.ratio.map_or("-".to_string(), |x| format!("{x:.2}")),
        ))?;
    }
    print_notes(r)?;
    for l in &r.latencies {
        out::line(format!(
            "latency over {} (round trip, {} B, {} pings; medians of {} run{}):",
            l.transport,
            l.ipcbus.size,
            l.ipcbus.pings,
            l.ipcbus.runs,
            if l.ipcbus.runs == 1 { "" } else { "s" }
        ))?;
        let line = |name: &str, x: &Latency| {
            format!(
                "  {name:<10} p50 {:>8.1} us   p99 {:>8.1} us   p999 {:>8.1} us",
                x.p50_us, x.p99_us, x.p999_us
            )
        };
        out::line(line("ipcbus", &l.ipcbus))?;
        if let Some(b) = &l.baseline {
            out::line(line(&format!("plain {}", l.transport), b))?;
        }
        if let Some(x) = l.p50_ratio {
            out::line(format!("  p50 ratio {x:.2}"))?;
        }
    }
    let failed: u64 = r.throughput.iter().map(|row| row.ipcbus.failed).sum();
    if failed > 0 {
        out::note(format!(
            "{} not acknowledged by every receiver",
            out::plural(failed, "event")
        ));
    }
    Ok(())
}

/// What the columns of the throughput table mean, and what compression did.
fn print_notes(r: &Report) -> anyhow::Result<()> {
    let baseline = r.throughput.iter().any(|row| row.baseline.is_some());
    out::line(
        "  secs: length of one ipcbus run (median); recv: events/s one receiver took \
         (the slowest, the median); aggregate: all receivers together",
    )?;
    if baseline {
        out::line(
            "  ratio = ipcbus recv median / plain recv median: the same workload over a \
             plain tokio TCP or Unix-socket\n    connection of the same transport \
             (length-prefixed frames, no acknowledgements), run by run in this\n    \
             invocation; 1.00 = as fast",
        )?;
    } else {
        out::line(
            "  ratio: needs --baseline (the same workload over a plain connection, in this run)",
        )?;
    }
    for row in &r.throughput {
        let w = &row.workload;
        if w.size >= ipcbus_proto::compress::DEFAULT_THRESHOLD {
            out::line(format!(
                "  compression of {}: {} ({})",
                w.label(),
                w.compress.mode(),
                row.compression_in_effect
            ))?;
        }
    }
    if !r
        .throughput
        .iter()
        .any(|row| row.workload.size >= ipcbus_proto::compress::DEFAULT_THRESHOLD)
    {
        let modes: Vec<String> = r
            .throughput
            .iter()
            .map(|row| row.workload.compress.mode().to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        out::line(format!(
            "  compression: {} (no event reaches its {} B threshold)",
            modes.join(", "),
            ipcbus_proto::compress::DEFAULT_THRESHOLD
        ))?;
    }
    Ok(())
}

fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// A rate with thousands separators, e.g. `1 234 567`.
fn human(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[1.0]), 1.0);
        assert_eq!(median(&[1.0, 3.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
    }

    #[test]
    fn human_numbers() {
        assert_eq!(human(0.0), "0");
        assert_eq!(human(999.4), "999");
        assert_eq!(human(1000.0), "1 000");
        assert_eq!(human(1234567.0), "1 234 567");
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 500.0);
        assert_eq!(percentile(&v, 0.99), 990.0);
        assert_eq!(percentile(&v, 0.999), 999.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[7.0], 0.999), 7.0);
    }

    #[test]
    fn payload_is_compressible_text_of_the_size_asked() {
        for n in [0, 1, 64, 1024, 65536] {
            assert_eq!(payload(n).len(), n);
        }
        let p = payload(1024);
        let z = ipcbus_proto::compress::gzip(&p, 1).map_or(p.len(), |z| z.len());
        assert!(z < p.len() / 2, "{z}");
        let r = random_payload(1024);
        assert_eq!(r.len(), 1024);
        assert!(ipcbus_proto::compress::gzip(&r, 1).is_none());
    }
}
