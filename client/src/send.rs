//! `ipcbus send`: send arguments, stdin lines, all of stdin or a file as events, and
//! report which receivers acknowledged them: a summary, failures per receiver, and
//! receivers joining or leaving while it sends.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{BufRead, Read};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use ipcbus::proto::crypto::TAG_LEN;
use ipcbus::proto::frame::{DEFAULT_MAX_FRAME, HEADER_LEN};
use ipcbus::{FailReason, Handle, PendingReport, ReceiverInfo, SendReport, Sender, SenderEvent};
use serde::Serialize;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::common::{config_error, parse_secs, Common};
use crate::out;

/// Events in flight at once before the next report is awaited.
const WINDOW: usize = 1024;

/// Bytes of input read ahead of the sender at most (a larger event is still read, but
/// alone).
const READ_AHEAD: usize = 4 << 20;

/// Lines at least this long are handed over without a copy (and their buffer with them).
const MOVE_LINE: usize = 64 * 1024;

/// How long to wait at the end for the "left" of a receiver whose events failed.
const LEFT_GRACE: Duration = Duration::from_secs(1);

/// The largest event the sender takes with its default maximum frame: 16 MiB minus
/// the frame header and an encryption tag (16777190 bytes).
pub fn max_event() -> usize {
    DEFAULT_MAX_FRAME - HEADER_LEN - TAG_LEN
}

/// Send each MESSAGE as one event (or each line of stdin, all of stdin, or a file)
///
/// Input: each MESSAGE is one event. Without MESSAGEs (or with --stdin) each line of
/// stdin is one event: a line ends at LF (or at the end of input) and a CR at its end
/// is removed, so CR LF files work; an empty line is sent as an empty event (as
/// mosquitto_pub -l does); other bytes are sent as they are. -s/--stdin-whole sends
/// all of stdin as one event, --file PATH the whole file (empty input: one empty
/// event). An event is at most 16777190 bytes (16 MiB minus 26): a longer line, stdin
/// or file is bad input, an error with exit status 1 once the events before it are
/// reported; reading stops at that size, so memory stays bounded whatever the input.
///
/// Output: one summary line on stdout at the end, e.g. `3000 events: 2 receivers
/// acknowledged all; 127.0.0.1:4000 failed 998 from event 1003 (receiver closed)`,
/// `1 event: 1 receiver acknowledged`, or `1 event: no receivers` (with `no receivers
/// found` on stderr). On stderr: the first failure of each receiver with its reason
/// (`127.0.0.1:4000: event 1003 failed: receiver closed`; the rest are counted in the
/// summary), and `receiver ADDR joined` / `receiver ADDR left: REASON` when a
/// receiver comes or goes while sending. -v adds a line per event on stdout (`event
/// 7: 2 receivers acknowledged`); -q prints only errors: failures, and the summary
/// only when something failed.
///
/// With --json (whatever -v/-q) stdout has a line per event {"seq","delivered":[ADDR,
/// ...],"failed":[{"addr","reason"},...]}; {"event":"joined","receiver":ADDR} and
/// {"event":"left","receiver":ADDR,"reason":REASON} when a receiver comes or goes
/// while sending; and last {"event":"summary","events":N,"failed_events":N,
/// "receivers":[{"receiver","acked","failed","first_seq","first_failed_seq",
/// "reason"},...]}. Failures are also noted on stderr.
///
/// Exit status: 0 when every targeted receiver acknowledged every event (also when
/// there were none), 1 when any failed or an input event was too large or unreadable,
/// 2 on usage or configuration errors (an unreadable --file too).
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub json_opt: crate::common::JsonOpt,

    /// Handle (topic) to send to
    pub handle: Handle,

    /// Messages to send, one event each [default: the lines of stdin]
    pub messages: Vec<OsString>,

    /// Send each line of stdin as an event, without its LF or CR LF; empty lines are
    /// empty events (what happens anyway without MESSAGEs)
    #[arg(long, conflicts_with_all = ["messages", "stdin_whole", "file"])]
    pub stdin: bool,

    /// Send all of stdin as one event
    #[arg(short = 's', long, conflicts_with_all = ["messages", "file"])]
    pub stdin_whole: bool,

    /// Send the whole file as one event
    #[arg(long, value_name = "PATH", conflicts_with = "messages")]
    pub file: Option<PathBuf>,

    /// Send each message N times
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,

    /// Wait until K receivers are known before sending
    #[arg(long, value_name = "K")]
    pub wait_for: Option<usize>,

    /// How long --wait-for waits before giving up (exit 1)
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_secs)]
    pub wait_timeout: Duration,

    /// Print a line per event too (text output)
    #[arg(short, long, conflicts_with = "quiet")]
    pub verbose: bool,

    /// Print nothing but errors: failures, and the summary when something failed
    #[arg(short, long)]
    pub quiet: bool,
}

/// How much text to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

/// One item of input: an event (with the read-ahead it holds), or why input stopped.
enum Input {
    Event(Bytes, Option<OwnedSemaphorePermit>),
    Error(anyhow::Error),
}

/// Where events come from.
enum Source {
    Messages(Vec<Bytes>),
    Lines,
    StdinWhole,
}

/// Runs `ipcbus send`.
///
/// # Errors
/// Configuration errors, too-large or unreadable input, or stdout closing.
pub async fn run(common: &Common, args: Args) -> anyhow::Result<ExitCode> {
    let max = max_event();
    // Input that is already at hand is checked before anything is connected.
    let source = if let Some(path) = &args.file {
        Source::Messages(vec![read_file(path, max)?])
    } else if args.stdin_whole {
        Source::StdinWhole
    } else if args.messages.is_empty() || args.stdin {
        Source::Lines
    } else {
        let list: Vec<Bytes> = args
            .messages
            .into_iter()
            .map(|m| Bytes::from(m.into_vec()))
            .collect();
        for (i, m) in list.iter().enumerate() {
            if m.len() > max {
                anyhow::bail!(too_large(&format!("message {}", i + 1), Some(m.len()), max));
            }
        }
        Source::Messages(list)
    };
    let verbosity = if args.quiet {
        Verbosity::Quiet
    } else if args.verbose {
        Verbosity::Verbose
    } else {
        Verbosity::Normal
    };

    let discovery = common.discovery()?;
    let security = common.security()?;
    let mut tx = Sender::builder(args.handle.clone())
        .discovery(discovery)
        .security(security)
        .build()
        .await
        .with_context(|| format!("cannot send to handle {}", args.handle))?;
    // Subscribed before the receivers known now are listed: a receiver that joins in
    // between is in both, and is not announced as joining.
    let mut events: Pin<Box<dyn Stream<Item = SenderEvent> + Send>> = Box::pin(tx.events());

    if let Some(k) = args.wait_for {
        wait_known(&mut tx, k, args.wait_timeout).await?;
    }
    let mut show = Show {
        json: common.json,
        verbosity,
        handle: args.handle.clone(),
        initial: tx.receivers().into_iter().collect(),
        joined: HashSet::new(),
        gone: HashSet::new(),
        tally: Tally::default(),
        said_no_receivers: false,
    };

    let (msgs_tx, mut msgs) = mpsc::channel::<Input>(WINDOW);
    let count = args.count;
    match source {
        Source::Lines | Source::StdinWhole => {
            let whole = matches!(source, Source::StdinWhole);
            let budget = Arc::new(Semaphore::new(READ_AHEAD));
            // A plain thread: a blocking stdin read must not hold up runtime shutdown.
            std::thread::spawn(move || {
                let stdin = std::io::stdin();
                let lock = stdin.lock();
                if whole {
                    read_whole(lock, &msgs_tx, &budget, count, max);
                } else {
                    read_lines(lock, &msgs_tx, &budget, count, max);
                }
            });
        }
        Source::Messages(list) => {
            tokio::spawn(async move {
                for m in list {
                    for _ in 0..count {
                        if msgs_tx.send(Input::Event(m.clone(), None)).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    }

    let mut window: VecDeque<PendingReport> = VecDeque::new();
    let mut eof = false;
    let mut events_open = true;
    let mut input_error = None;
    while !eof || !window.is_empty() {
        tokio::select! {
            biased;
            report = next(&mut window), if !window.is_empty() => {
                window.pop_front();
                show.report(&report)?;
            }
            ev = events.next(), if events_open => match ev {
                Some(ev) => show.event(ev)?,
                None => events_open = false,
            },
            m = msgs.recv(), if !eof && window.len() < WINDOW => match m {
                Some(Input::Event(m, permit)) => {
                    let len = m.len();
                    let p = tx.publish_bytes(m).await.with_context(|| {
                        format!("cannot send an event of {len} bytes")
                    })?;
                    drop(permit);
                    window.push_back(p);
                }
                Some(Input::Error(e)) => {
                    input_error = Some(e);
                    eof = true;
                }
                None => eof = true,
            },
        }
    }
    // A receiver's "left" comes just after its failed reports: wait for it (briefly),
    // and take any other news already there.
    let deadline = tokio::time::Instant::now() + LEFT_GRACE;
    while events_open {
        let ev = if show.awaiting_left() {
            match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(ev) => ev,
                Err(_) => break,
            }
        } else {
            match events.next().now_or_never() {
                Some(ev) => ev,
                None => break,
            }
        };
        match ev {
            Some(ev) => show.event(ev)?,
            None => events_open = false,
        }
    }
    if input_error.is_none() || show.tally.events > 0 {
        show.summary()?;
    }
    let any_failed = show.tally.failed_events > 0;
    tx.close().await;
    if let Some(e) = input_error {
        return Err(e);
    }
    Ok(if any_failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Waits (bounded) until the front report resolves.
async fn next(window: &mut VecDeque<PendingReport>) -> SendReport {
    match window.front_mut() {
        Some(p) => p.await,
        None => std::future::pending().await,
    }
}

/// Waits until `k` receivers are known (discovered, connected or connecting).
async fn wait_known(tx: &mut Sender, k: usize, timeout: Duration) -> anyhow::Result<()> {
    let start = tokio::time::Instant::now();
    loop {
        let n = tx.receivers().len();
        if n >= k {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            anyhow::bail!(
                "timed out after {:.1} s waiting for {} of {} ({n} found)",
                timeout.as_secs_f64(),
                plural(k as u64, "receiver"),
                tx.handle()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The error for an event over the maximum, worded like the library's
/// `SendError::TooLarge` (`len` is `None` when reading stopped past the maximum).
fn too_large(what: &str, len: Option<usize>, max: usize) -> String {
    match len {
        Some(len) => {
            format!("cannot send {what}: payload of {len} bytes exceeds the maximum of {max}")
        }
        None => format!(
            "cannot send {what}: payload of more than {max} bytes exceeds the maximum of {max}"
        ),
    }
}

/// Reads a --file, at most `max` + 1 bytes of it.
fn read_file(path: &std::path::Path, max: usize) -> anyhow::Result<Bytes> {
    let what = format!("file {}", path.display());
    let f = std::fs::File::open(path)
        .map_err(|e| config_error(format!("cannot read file {}: {e}", path.display())))?;
    let size = f.metadata().ok().filter(|m| m.is_file()).map(|m| m.len());
    if let Some(size) = size {
        if size > max as u64 {
            anyhow::bail!(too_large(
                &what,
                Some(usize::try_from(size).unwrap_or(usize::MAX)),
                max
            ));
        }
    }
    let mut buf = Vec::with_capacity(size.map_or(0, |s| s as usize));
    f.take(max as u64 + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("cannot read file {}", path.display()))?;
    if buf.len() > max {
        anyhow::bail!(too_large(&what, None, max));
    }
    Ok(Bytes::from(buf))
}

/// Hands `event` to the sender `count` times, holding read-ahead for its size; false
/// when the sender is gone.
fn hand_over(tx: &mpsc::Sender<Input>, budget: &Arc<Semaphore>, event: Bytes, count: u64) -> bool {
    // READ_AHEAD fits u32 (it is a few MiB).
    let n = u32::try_from(event.len().min(READ_AHEAD)).unwrap_or(u32::MAX);
    let Ok(permit) = futures::executor::block_on(budget.clone().acquire_many_owned(n)) else {
        return false;
    };
    let mut permit = Some(permit);
    for i in 0..count {
        // The last copy keeps the read-ahead until the sender has taken it.
        let p = if i + 1 == count { permit.take() } else { None };
        if tx.blocking_send(Input::Event(event.clone(), p)).is_err() {
            return false;
        }
    }
    true
}

/// One line of input, read by [`read_line`].
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A line (without its LF, or CR LF) is in the buffer.
    Read,
    /// The line is longer than the maximum; reading stopped there.
    TooLong,
    /// No more input.
    Eof,
}

/// Reads one line into `buf`, never more than `max` + 1 bytes of it (room for a CR).
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>, max: usize) -> std::io::Result<Line> {
    buf.clear();
    let mut any = false;
    loop {
        let avail = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            if !any {
                return Ok(Line::Eof);
            }
            break;
        }
        any = true;
        let nl = avail.iter().position(|&b| b == b'\n');
        let part = &avail[..nl.unwrap_or(avail.len())];
        if buf.len() + part.len() > max + 1 {
            return Ok(Line::TooLong);
        }
        buf.extend_from_slice(part);
        let used = nl.map_or(avail.len(), |i| i + 1);
        r.consume(used);
        if nl.is_some() {
            break;
        }
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(if buf.len() > max {
        Line::TooLong
    } else {
        Line::Read
    })
}

/// Sends each line of `r` as an event (see [`read_line`]), until the end of input, an
/// error (sent as [`Input::Error`]) or the sender going away.
fn read_lines(
    mut r: impl BufRead,
    tx: &mpsc::Sender<Input>,
    budget: &Arc<Semaphore>,
    count: u64,
    max: usize,
) {
    let mut buf = Vec::new();
    let mut n = 0u64;
    loop {
        n += 1;
        let event = match read_line(&mut r, &mut buf, max) {
            Ok(Line::Eof) => return,
            Ok(Line::Read) if buf.len() >= MOVE_LINE => Bytes::from(std::mem::take(&mut buf)),
            Ok(Line::Read) => Bytes::copy_from_slice(&buf),
            Ok(Line::TooLong) => {
                let e = anyhow::anyhow!(too_large(&format!("line {n} of stdin"), None, max));
                let _ = tx.blocking_send(Input::Error(e));
                return;
            }
            Err(e) => {
                let e = anyhow::Error::new(e).context(format!("cannot read line {n} of stdin"));
                let _ = tx.blocking_send(Input::Error(e));
                return;
            }
        };
        if !hand_over(tx, budget, event, count) {
            return;
        }
    }
}

/// Sends all of `r` as one event, or an [`Input::Error`] when it is over `max` bytes.
fn read_whole(
    r: impl Read,
    tx: &mpsc::Sender<Input>,
    budget: &Arc<Semaphore>,
    count: u64,
    max: usize,
) {
    let mut buf = Vec::new();
    let e = match r.take(max as u64 + 1).read_to_end(&mut buf) {
        Ok(_) if buf.len() <= max => {
            hand_over(tx, budget, Bytes::from(buf), count);
            return;
        }
        Ok(_) => anyhow::anyhow!(too_large("stdin", None, max)),
        Err(e) => anyhow::Error::new(e).context("cannot read stdin"),
    };
    let _ = tx.blocking_send(Input::Error(e));
}

/// `1 event`, `2 events`.
fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// What one receiver did with the events sent to it.
#[derive(Debug, Clone, Default)]
struct PerReceiver {
    /// Events it acknowledged.
    acked: u64,
    /// Events it did not.
    failed: u64,
    /// The first event sent to it.
    first_seq: u64,
    /// Its first failure: the event and the reason.
    first_failure: Option<(u64, FailReason)>,
}

/// Outcomes so far, per receiver.
#[derive(Debug, Default)]
struct Tally {
    /// Events reported.
    events: u64,
    /// Events some receiver did not acknowledge.
    failed_events: u64,
    /// Receivers in the order they were first sent to.
    order: Vec<ReceiverInfo>,
    per: HashMap<ReceiverInfo, PerReceiver>,
}

impl Tally {
    /// Counts `r`; returns the receivers that failed for the first time.
    fn add(&mut self, r: &SendReport) -> Vec<ReceiverInfo> {
        self.events += 1;
        if !r.all_acked() {
            self.failed_events += 1;
        }
        for who in &r.acked {
            self.entry(*who, r.seq).acked += 1;
        }
        let mut first = Vec::new();
        for (who, why) in &r.failed {
            let p = self.entry(*who, r.seq);
            p.failed += 1;
            if p.first_failure.is_none() {
                p.first_failure = Some((r.seq, why.clone()));
                first.push(*who);
            }
        }
        first
    }

    fn entry(&mut self, who: ReceiverInfo, seq: u64) -> &mut PerReceiver {
        let order = &mut self.order;
        self.per.entry(who).or_insert_with(|| {
            order.push(who);
            PerReceiver {
                first_seq: seq,
                ..PerReceiver::default()
            }
        })
    }

    /// How to name `who`: its address, with its id when another receiver had the same
    /// address (one restarted on the same port).
    fn name(&self, who: &ReceiverInfo) -> String {
        if self.order.iter().filter(|o| o.addr == who.addr).count() > 1 {
            who.to_string()
        } else {
            who.addr.to_string()
        }
    }

    /// The summary line: `3000 events: 2 receivers acknowledged all; 127.0.0.1:4000
    /// failed 998 from event 1003 (receiver closed)`.
    fn summary(&self) -> String {
        let head = plural(self.events, "event");
        if self.events == 0 {
            return head;
        }
        if self.order.is_empty() {
            return format!("{head}: no receivers");
        }
        let one = self.events == 1;
        let mut all = 0u64;
        let mut parts = Vec::new();
        let mut any_failed = false;
        for who in &self.order {
            let p = &self.per[who];
            if p.failed == 0 && p.acked == self.events {
                all += 1;
            } else if p.failed == 0 {
                parts.push(format!(
                    "{} acknowledged {} from event {}",
                    self.name(who),
                    p.acked,
                    p.first_seq
                ));
            } else {
                any_failed = true;
            }
        }
        let late = parts.len();
        for who in &self.order {
            let p = &self.per[who];
            let Some((seq, why)) = &p.first_failure else {
                continue;
            };
            let name = self.name(who);
            parts.push(match (one, p.failed) {
                (true, _) => format!("{name} failed ({why})"),
                (false, 1) => format!("{name} failed event {seq} ({why})"),
                (false, n) => format!("{name} failed {n} from event {seq} ({why})"),
            });
        }
        let all_part = if all > 0 {
            Some(format!(
                "{} acknowledged{}",
                plural(all, "receiver"),
                if one { "" } else { " all" }
            ))
        } else if any_failed && late == 0 {
            let any_acked = self.per.values().any(|p| p.acked > 0);
            Some(if any_acked {
                "no receiver acknowledged all".to_string()
            } else {
                "no receiver acknowledged".to_string()
            })
        } else {
            None
        };
        let mut s = format!("{head}: ");
        s.push_str(
            &all_part
                .into_iter()
                .chain(parts)
                .collect::<Vec<_>>()
                .join("; "),
        );
        s
    }
}

/// One event's line for -v: `event 7: 2 receivers acknowledged; 127.0.0.1:4000
/// failed (receiver closed)`.
fn event_line(r: &SendReport) -> String {
    if r.targeted() == 0 {
        return format!("event {}: no receivers", r.seq);
    }
    let mut s = format!("event {}: ", r.seq);
    if r.acked.is_empty() {
        s.push_str("no receiver acknowledged");
    } else {
        s.push_str(&plural(r.acked.len() as u64, "receiver"));
        s.push_str(" acknowledged");
    }
    for (who, why) in &r.failed {
        s.push_str(&format!("; {} failed ({why})", who.addr));
    }
    s
}

/// One report as `send --json` prints it.
#[derive(Serialize)]
struct ReportJson {
    seq: u64,
    delivered: Vec<String>,
    failed: Vec<FailedJson>,
}

/// A receiver that did not acknowledge, and why.
#[derive(Serialize)]
struct FailedJson {
    addr: String,
    reason: String,
}

/// A receiver joining or leaving, as `send --json` prints it.
#[derive(Serialize)]
struct PresenceJson<'a> {
    event: &'a str,
    receiver: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// The last line of `send --json`.
#[derive(Serialize)]
struct SummaryJson {
    event: &'static str,
    events: u64,
    failed_events: u64,
    receivers: Vec<ReceiverJson>,
}

/// One receiver in the summary.
#[derive(Serialize)]
struct ReceiverJson {
    receiver: String,
    acked: u64,
    failed: u64,
    first_seq: u64,
    first_failed_seq: Option<u64>,
    reason: Option<String>,
}

/// Prints reports and receiver news as they come, and the summary at the end.
struct Show {
    json: bool,
    verbosity: Verbosity,
    handle: Handle,
    /// Receivers known before sending whose "joined" has not come yet (it is not news).
    initial: HashSet<ReceiverInfo>,
    /// Receivers connected now: their "joined" came, or they acknowledged an event
    /// (a receiver known before sending may have joined before we listened).
    joined: HashSet<ReceiverInfo>,
    /// Receivers whose "left" came (and no "joined" since).
    gone: HashSet<ReceiverInfo>,
    tally: Tally,
    said_no_receivers: bool,
}

impl Show {
    fn report(&mut self, r: &SendReport) -> anyhow::Result<()> {
        let first_failures = self.tally.add(r);
        for who in &r.acked {
            if !self.joined.contains(who) && !self.gone.contains(who) {
                self.joined.insert(*who);
            }
        }
        if self.json {
            let line = ReportJson {
                seq: r.seq,
                delivered: r.acked.iter().map(|a| a.addr.to_string()).collect(),
                failed: r
                    .failed
                    .iter()
                    .map(|(who, why)| FailedJson {
                        addr: who.addr.to_string(),
                        reason: why.to_string(),
                    })
                    .collect(),
            };
            out::line(serde_json::to_string(&line)?)?;
        } else if self.verbosity == Verbosity::Verbose {
            out::line(event_line(r))?;
        }
        if r.targeted() == 0 && !self.said_no_receivers && self.verbosity != Verbosity::Quiet {
            self.said_no_receivers = true;
            out::note(format!("no receivers found for {}", self.handle));
        }
        for who in first_failures {
            if let Some((seq, why)) = &self.tally.per[&who].first_failure {
                let name = self.tally.name(&who);
                out::note(format!("{name}: event {seq} failed: {why}"));
            }
        }
        Ok(())
    }

    fn event(&mut self, ev: SenderEvent) -> anyhow::Result<()> {
        match ev {
            SenderEvent::ReceiverJoined(who) => {
                self.joined.insert(who);
                self.gone.remove(&who);
                if !self.initial.remove(&who) {
                    self.presence("joined", &who, None)?;
                }
            }
            SenderEvent::ReceiverLeft { receiver, reason } => {
                // Closing ourselves is no news; a receiver that never connected is
                // reported by its failed events.
                self.initial.remove(&receiver);
                self.gone.insert(receiver);
                if reason != FailReason::SenderClosed && self.joined.remove(&receiver) {
                    self.presence("left", &receiver, Some(&reason))?;
                }
            }
            // Every failed event is in a report too.
            _ => {}
        }
        Ok(())
    }

    fn presence(
        &self,
        what: &str,
        who: &ReceiverInfo,
        reason: Option<&FailReason>,
    ) -> anyhow::Result<()> {
        let name = self.tally.name(who);
        if self.json {
            out::line(serde_json::to_string(&PresenceJson {
                event: what,
                receiver: name,
                reason: reason.map(ToString::to_string),
            })?)?;
        } else if self.verbosity != Verbosity::Quiet {
            match reason {
                Some(why) => out::note(format!("receiver {name} {what}: {why}")),
                None => out::note(format!("receiver {name} {what}")),
            }
        }
        Ok(())
    }

    /// Whether a connected receiver had events fail but its "left" has not come.
    fn awaiting_left(&self) -> bool {
        self.joined
            .iter()
            .any(|who| self.tally.per.get(who).is_some_and(|p| p.failed > 0))
    }

    fn summary(&self) -> anyhow::Result<()> {
        let t = &self.tally;
        if self.json {
            let receivers = t
                .order
                .iter()
                .map(|who| {
                    let p = &t.per[who];
                    ReceiverJson {
                        receiver: t.name(who),
                        acked: p.acked,
                        failed: p.failed,
                        first_seq: p.first_seq,
                        first_failed_seq: p.first_failure.as_ref().map(|f| f.0),
                        reason: p.first_failure.as_ref().map(|f| f.1.to_string()),
                    }
                })
                .collect();
            out::line(serde_json::to_string(&SummaryJson {
                event: "summary",
                events: t.events,
                failed_events: t.failed_events,
                receivers,
            })?)?;
        } else if self.verbosity != Verbosity::Quiet || t.failed_events > 0 {
            out::line(t.summary())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn who(port: u16) -> ReceiverInfo {
        ReceiverInfo {
            id: ipcbus::ReceiverId::random(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn report(
        seq: u64,
        acked: &[ReceiverInfo],
        failed: &[(ReceiverInfo, FailReason)],
    ) -> SendReport {
        SendReport {
            seq,
            acked: acked.to_vec(),
            failed: failed.to_vec(),
        }
    }

    #[test]
    fn summaries() {
        let (a, b, c) = (who(4000), who(4001), who(4002));
        let mut t = Tally::default();
        assert_eq!(t.summary(), "0 events");
        t.add(&report(1, &[], &[]));
        assert_eq!(t.summary(), "1 event: no receivers");

        let mut t = Tally::default();
        t.add(&report(1, &[a], &[]));
        assert_eq!(t.summary(), "1 event: 1 receiver acknowledged");

        let mut t = Tally::default();
        t.add(&report(1, &[], &[(a, FailReason::AuthenticationFailed)]));
        assert_eq!(
            t.summary(),
            "1 event: no receiver acknowledged; 127.0.0.1:4000 failed (authentication failed)"
        );

        let mut t = Tally::default();
        for seq in 1..=3000 {
            // The receiver at 4000 closes after event 1002 and is dropped after 2000.
            if seq < 1003 {
                t.add(&report(seq, &[a, b, c], &[]));
            } else if seq <= 2000 {
                t.add(&report(seq, &[b, c], &[(a, FailReason::ReceiverLeft)]));
            } else {
                t.add(&report(seq, &[b, c], &[]));
            }
        }
        assert_eq!(
            t.summary(),
            "3000 events: 2 receivers acknowledged all; 127.0.0.1:4000 failed 998 from event 1003 (receiver closed)"
        );

        let mut t = Tally::default();
        t.add(&report(1, &[a], &[]));
        t.add(&report(2, &[a], &[(b, FailReason::Disconnected)]));
        t.add(&report(3, &[a, c], &[]));
        assert_eq!(
            t.summary(),
            "3 events: 1 receiver acknowledged all; 127.0.0.1:4002 acknowledged 1 from event 3; \
             127.0.0.1:4001 failed event 2 (disconnected)"
        );

        let mut t = Tally::default();
        t.add(&report(1, &[], &[(a, FailReason::AuthenticationFailed)]));
        t.add(&report(2, &[], &[(a, FailReason::AuthenticationFailed)]));
        assert_eq!(
            t.summary(),
            "2 events: no receiver acknowledged; 127.0.0.1:4000 failed 2 from event 1 (authentication failed)"
        );

        let mut t = Tally::default();
        t.add(&report(1, &[a], &[]));
        t.add(&report(2, &[], &[(a, FailReason::Disconnected)]));
        assert_eq!(
            t.summary(),
            "2 events: no receiver acknowledged all; 127.0.0.1:4000 failed event 2 (disconnected)"
        );
    }

    #[test]
    fn event_lines() {
        let (a, b) = (who(4000), who(4001));
        assert_eq!(event_line(&report(1, &[], &[])), "event 1: no receivers");
        assert_eq!(
            event_line(&report(2, &[a], &[])),
            "event 2: 1 receiver acknowledged"
        );
        assert_eq!(
            event_line(&report(3, &[], &[(b, FailReason::TimedOut)])),
            "event 3: no receiver acknowledged; 127.0.0.1:4001 failed (timed out)"
        );
    }

    fn lines(input: &[u8], max: usize) -> Vec<Result<Vec<u8>, Line>> {
        // A tiny buffer so lines span several fills.
        let mut r = std::io::BufReader::with_capacity(3, input);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for _ in 0..100 {
            match read_line(&mut r, &mut buf, max).expect("in-memory read") {
                Line::Read => out.push(Ok(buf.clone())),
                Line::Eof => break,
                Line::TooLong => {
                    out.push(Err(Line::TooLong));
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn line_splitting() {
        let ok = |s: &[u8]| Ok(s.to_vec());
        assert_eq!(
            lines(b"a\r\n\r\n\nbc\rd\nlast", 10),
            vec![ok(b"a"), ok(b""), ok(b""), ok(b"bc\rd"), ok(b"last")]
        );
        assert_eq!(lines(b"", 10), vec![]);
        // Exactly the maximum, with LF, CR LF or nothing after it.
        assert_eq!(lines(b"12345\n", 5), vec![ok(b"12345")]);
        assert_eq!(lines(b"12345\r\n", 5), vec![ok(b"12345")]);
        assert_eq!(lines(b"12345", 5), vec![ok(b"12345")]);
        assert_eq!(lines(b"123456\n", 5), vec![Err(Line::TooLong)]);
        assert_eq!(lines(b"12345\r", 5), vec![ok(b"12345")]);
        assert_eq!(
            lines(b"ab\n1234567890", 5),
            vec![ok(b"ab"), Err(Line::TooLong)]
        );
    }

    #[test]
    fn plurals() {
        assert_eq!(plural(0, "event"), "0 events");
        assert_eq!(plural(1, "event"), "1 event");
        assert_eq!(plural(2, "receiver"), "2 receivers");
    }
}
