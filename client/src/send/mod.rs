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
use ipcbus::{
    Endpoint, FailReason, Handle, PendingReport, ReceiverInfo, SendReport, Sender, SenderEvent,
};
use ipcbus_proto::crypto::TAG_LEN;
use ipcbus_proto::frame::{DEFAULT_MAX_FRAME, HEADER_LEN};
use serde::Serialize;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::common::{config_error, parse_secs, Common};
use crate::out;

mod input;
mod report;

use input::*;
use report::*;

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
/// found` on stderr); events sent after every receiver left are counted at the end
/// (`...; 21 had no receivers`, with `no receivers left` on stderr). On stderr: the first failure of each receiver with its reason
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
/// "no_receivers":N,"receivers":[{"receiver","acked","failed","first_seq","first_failed_seq",
/// "reason"},...]}. Failures are also noted on stderr.
///
/// With --stats the sender's counters follow the summary: `stats: ...` lines on
/// stderr, or with --json one more object after the summary, the last line on stdout:
/// {"event":"stats","published","payload_bytes","acked","acked_events",
/// "failed":{"refused","timed_out","authentication_failed","rejected",
/// "wrong_receiver","disconnected","receiver_closed","protocol","sender_closed"},
/// "bytes_written",
/// "compression":{"eligible","compressed","not_smaller","skipped_loopback",
/// "skipped_poor","off"}, "connects","reconnects","handshakes",
/// "connected_receivers","known_receivers"} (acked and failed count deliveries: one
/// per event and receiver; acked_events the events every receiver they were sent to
/// acknowledged).
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

    /// Send to the receiver at ENDPOINT (repeatable): tcp://IP:PORT, IP:PORT or
    /// unix:///PATH, with no discovery (no registry read, no EPM asked)
    #[arg(long, value_name = "ENDPOINT")]
    pub to: Vec<Endpoint>,

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

    /// Print the sender's counters after the summary (stderr; with --json a
    /// {"event":"stats",...} object after the summary, the last line on stdout)
    #[arg(long)]
    pub stats: bool,
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
    let mut builder = Sender::builder(args.handle.clone())
        .discovery(discovery)
        .security(security);
    for e in &args.to {
        builder = builder.endpoint(e.clone());
    }
    let mut tx = builder
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
    if args.stats {
        crate::stats::print_sender(common.json, &tx.stats())?;
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
                self.joined.insert(who.clone());
            }
        }
        if self.json {
            let line = ReportJson {
                seq: r.seq,
                delivered: r.acked.iter().map(|a| a.endpoint.to_string()).collect(),
                failed: r
                    .failed
                    .iter()
                    .map(|(who, why)| FailedJson {
                        addr: who.endpoint.to_string(),
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
            if self.tally.order.is_empty() {
                out::note(format!("no receivers found for {}", self.handle));
            } else {
                out::note(format!(
                    "no receivers left for {}: later events go nowhere until one comes",
                    self.handle
                ));
            }
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
                self.gone.remove(&who);
                self.joined.insert(who.clone());
                if !self.initial.remove(&who) {
                    self.presence("joined", &who, None)?;
                }
            }
            SenderEvent::ReceiverLeft { receiver, reason } => {
                // Closing ourselves is no news; a receiver that never connected is
                // reported by its failed events.
                let was_initial = self.initial.remove(&receiver);
                self.gone.insert(receiver.clone());
                // A receiver known at start whose connection was up before we
                // subscribed has no "joined" event; if it said goodbye it was
                // connected, even when its acknowledgement is not reported yet.
                let said_bye = was_initial && reason == FailReason::ReceiverLeft;
                if reason != FailReason::SenderClosed && (self.joined.remove(&receiver) || said_bye)
                {
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
        let name = if self.json {
            self.tally.json_name(who)
        } else {
            self.tally.name(who)
        };
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
                        receiver: t.json_name(who),
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
                no_receivers: t.untargeted,
                receivers,
            })?)?;
        } else if self.verbosity != Verbosity::Quiet || t.failed_events > 0 {
            out::line(t.summary())?;
        }
        Ok(())
    }
}
