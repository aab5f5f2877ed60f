//! `soak`: a fault-injection soak test of delivery through the endpoint manager (over
//! TCP), or through the local registry (over what `IPCBUS_TRANSPORTS` says).
//!
//! ```text
//! soak run [--secs N] [--out DIR] [--seed S] [--keep] [--local]
//! ```
//! runs, for N seconds (default 30), an `epm-service` (this binary in `epm` mode), 2
//! sender processes and up to 8 receiver processes on 127.0.0.1, while a chaos
//! driver starts receivers, SIGKILLs them, stops them gracefully (SIGTERM), pauses
//! one with SIGSTOP/SIGCONT, and kills and restarts the EPM on the same port. With
//! `--local` there is no EPM: everyone uses a registry directory in the log
//! directory, and the receivers listen on what `IPCBUS_TRANSPORTS` says (by
//! default TCP and a Unix socket, which the senders use). Then it checks the logs
//! and prints one line:
//!
//! ```text
//! soak: 600 s, events sent N, acknowledged A, reported failed F, duplicates 0, lost after ack 0, out of order 0, unreported 0 (...)
//! ```
//! and exits 0 when duplicates, lost after ack, out of order and unreported are all 0.
//!
//! Every event carries a unique id (sender index, number from 1). Each receiver
//! writes a line to its log with one `write(2)` for every event it takes, before it
//! takes the next, so a SIGKILL loses at most the one event per sender it had taken
//! (and so acknowledged) but not yet written: the checker counts those apart, as
//! "in the kill window", and only for receivers it SIGKILLed. Senders log every
//! event before publishing it and every report when it resolves.
//!
//! The checker proves, per receiver process R:
//! * no event is in R's log twice (duplicates);
//! * each sender's events are in R's log in increasing order (out of order);
//! * every event a report says R acknowledged is in R's log (lost after ack);
//! * every event sent while R was registered and alive — from 3 s after R said it
//!   was registered until it was killed or stopped, outside the EPM's outages (from
//!   its kill until 5 s after it is back) — is in R's log or reported failed for R
//!   (unreported). Every event has a report at all.
//!
//! The modes `epm`, `recv` and `send` are the child processes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use ipcbus::{Discovery, Epm, Handle, Receiver, Sender};
use ipcbus_tests::{say, Args};

const HANDLE: &str = "soak";
/// An event sent this long after a receiver said it is registered must reach it.
const JOIN_GRACE_MS: u64 = 3000;
/// After the EPM is back, this long for everyone to register and watch again.
const EPM_GRACE_MS: u64 = 5000;
/// Senders give up on a receiver after this long without progress.
const SEND_TIMEOUT: Duration = Duration::from_secs(3);
/// Most receivers at once.
const MAX_RECEIVERS: usize = 8;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------
// Child modes.

/// Where a child registers or discovers: `--registry DIR` (a local registry), else
/// `--epm ADDR`.
fn discovery(a: &Args) -> anyhow::Result<Discovery> {
    Ok(match a.get("--registry") {
        Some(dir) => Discovery::local_at(dir)?,
        None => Discovery::Epm(Epm::builder(a.req("--epm")?).build()),
    })
}

async fn terminated() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    term.recv().await;
    Ok(())
}

async fn epm_mode(a: &Args) -> anyhow::Result<()> {
    let addr: SocketAddr = a.req("--bind")?.parse()?;
    let listeners = ipcbus_epm::bind_all(&[addr])?;
    let local = listeners
        .first()
        .and_then(|l| l.local_addr().ok())
        .context("no listener")?;
    let term = {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        async move {
            term.recv().await;
        }
    };
    say(&format!("listening {local}"));
    ipcbus_epm::run(listeners, ipcbus_epm::Config::new(vec![addr]), term).await;
    Ok(())
}

async fn recv_mode(a: &Args) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let discovery = discovery(a)?;
    let log_path = PathBuf::from(a.req("--log")?);
    // Unbuffered: one write(2) per event, so the line is in the kernel before the
    // next event is taken, and a SIGKILL cannot lose it.
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("open {}", log_path.display()))?;
    let mut rx = Receiver::builder(Handle::new(HANDLE)?)
        .discovery(discovery)
        .bind()
        .await?;
    say(&format!("ready {}", rx.id()));
    let term = terminated();
    tokio::pin!(term);
    loop {
        tokio::select! {
            m = rx.recv() => {
                let Some(m) = m else { break };
                let p = m.payload();
                let (idx, n) = match (p.first(), p.get(1..9)) {
                    (Some(&i), Some(b)) => {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(b);
                        (i, u64::from_be_bytes(a))
                    }
                    _ => bail!("payload of {} bytes is not a soak event", p.len()),
                };
                let line = format!("{idx} {n} {}\n", m.seq());
                log.write_all(line.as_bytes())?;
            }
            r = &mut term => {
                r?;
                break;
            }
        }
    }
    rx.close().await;
    say("closed");
    Ok(())
}

async fn send_mode(a: &Args) -> anyhow::Result<()> {
    let discovery = discovery(a)?;
    let idx = u8::try_from(a.num("--index", 0)?)?;
    let interval = Duration::from_micros(a.num("--interval-us", 1000)?);
    let log_path = PathBuf::from(a.req("--log")?);
    let mut tx = Sender::builder(Handle::new(HANDLE)?)
        .discovery(discovery)
        .send_timeout(SEND_TIMEOUT)
        .compress(true) // the default skips gzip on loopback; the soak wants it on the path
        .build()
        .await?;
    say(&format!("ready {}", tx.id()));
    // Reports resolve in other tasks; one writer task owns the log.
    let (lines_tx, mut lines_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn({
        let file = std::fs::File::create(&log_path)
            .with_context(|| format!("create {}", log_path.display()))?;
        async move {
            let mut w = BufWriter::new(file);
            while let Some(l) = lines_rx.recv().await {
                w.write_all(l.as_bytes())?;
            }
            w.flush()
        }
    });
    let term = terminated();
    tokio::pin!(term);
    let mut reports = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tokio::select! {
            r = &mut term => { r?; break; }
            _ = tick.tick() => {}
        }
        n += 1;
        // Every 64th event is large and compressible, so gzip is on the path too.
        let mut payload = vec![idx];
        payload.extend_from_slice(&n.to_be_bytes());
        if n.is_multiple_of(64) {
            payload.extend_from_slice(&[b'z'; 4096]);
        }
        let _ = lines_tx.send(format!("P {n} {}\n", now_ms()));
        let pending = tx.publish_bytes(payload).await?;
        let out = lines_tx.clone();
        reports.spawn(async move {
            let r = pending.await;
            let mut line = format!("R {n} A");
            for a in &r.acked {
                line.push_str(&format!(" {}", a.id));
            }
            line.push_str(" F");
            for (f, why) in &r.failed {
                line.push_str(&format!(" {}={}", f.id, why.to_string().replace(' ', "_")));
            }
            line.push('\n');
            let _ = out.send(line);
        });
        while reports.try_join_next().is_some() {}
    }
    while reports.join_next().await.is_some() {}
    drop(lines_tx);
    writer.await??;
    tx.close().await;
    say(&format!("done {n}"));
    Ok(())
}

// ---------------------------------------------------------------------------------
// The driver.

/// A child process with its stdout lines read by a thread. SIGKILLed and reaped on
/// drop if still running.
struct Kid {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Kid {
    fn spawn(exe: &Path, args: &[&str], stderr: &Path) -> anyhow::Result<Kid> {
        let err = std::fs::File::create(stderr)?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .env_remove("IPCBUS_EPM")
            .spawn()
            .with_context(|| format!("spawn {} {args:?}", exe.display()))?;
        let out = child.stdout.take().context("piped stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Kid { child, lines: rx })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of our own child, which is not reaped yet (we
        // reap only in `wait` and `drop`).
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// A line starting with `prefix` if one has arrived (without waiting).
    fn poll_line(&self, prefix: &str) -> Option<String> {
        while let Ok(l) = self.lines.try_recv() {
            if let Some(rest) = l.strip_prefix(prefix) {
                return Some(rest.trim().to_owned());
            }
        }
        None
    }

    fn wait_line(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(rest) = l.strip_prefix(prefix) {
                        return Some(rest.trim().to_owned());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => return None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits up to `timeout` for the exit; SIGKILLs after that.
    fn wait(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Alive,
    Killed,
    Stopped,
    /// It exited by itself.
    Exited,
    NeverReady,
}

struct Rcv {
    kid: Option<Kid>,
    log: PathBuf,
    id: Option<String>,
    spawned_ms: u64,
    ready_ms: Option<u64>,
    end_ms: Option<u64>,
    end: End,
    paused_until: Option<Instant>,
}

/// A small xorshift generator: the chaos is reproducible from `--seed`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Default)]
struct Counts {
    started: u64,
    killed: u64,
    stopped: u64,
    paused: u64,
    epm_restarts: u64,
}

struct Driver {
    exe: PathBuf,
    out: PathBuf,
    epm_addr: SocketAddr,
    epm: Option<Kid>,
    /// With `--local`, the registry directory everyone uses instead of the EPM.
    registry: Option<PathBuf>,
    epm_gen: u32,
    receivers: Vec<Rcv>,
    /// (down, back up) wall-clock ms of each EPM outage.
    outages: Vec<(u64, u64)>,
    counts: Counts,
    rng: Rng,
}

impl Driver {
    /// The children's arguments that say where to register and discover.
    fn discovery_args(&self) -> [String; 2] {
        match &self.registry {
            Some(dir) => ["--registry".into(), dir.to_string_lossy().into_owned()],
            None => ["--epm".into(), self.epm_addr.to_string()],
        }
    }

    fn start_epm(&mut self, bind: SocketAddr) -> anyhow::Result<SocketAddr> {
        self.epm_gen += 1;
        let bind_s = bind.to_string();
        let err = self.out.join(format!("epm-{}.err", self.epm_gen));
        for _ in 0..20 {
            let kid = Kid::spawn(&self.exe, &["epm", "--bind", &bind_s], &err)?;
            if let Some(l) = kid.wait_line("listening ", Duration::from_secs(5)) {
                self.epm = Some(kid);
                return Ok(l.parse()?);
            }
            // The port may still be held for a moment: try again.
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("epm-service did not start on {bind}")
    }

    fn start_receiver(&mut self) -> anyhow::Result<()> {
        let k = self.receivers.len();
        let log = self.out.join(format!("recv-{k}.log"));
        let err = self.out.join(format!("recv-{k}.err"));
        let [flag, value] = self.discovery_args();
        let kid = Kid::spawn(
            &self.exe,
            &["recv", &flag, &value, "--log", &log.to_string_lossy()],
            &err,
        )?;
        self.receivers.push(Rcv {
            kid: Some(kid),
            log,
            id: None,
            spawned_ms: now_ms(),
            ready_ms: None,
            end_ms: None,
            end: End::Alive,
            paused_until: None,
        });
        self.counts.started += 1;
        Ok(())
    }

    /// Collects ready lines, resumes paused receivers that are due, notices exits.
    fn poll(&mut self) {
        let now = Instant::now();
        for r in &mut self.receivers {
            let Some(kid) = r.kid.as_mut() else { continue };
            if r.id.is_none() {
                if let Some(id) = kid.poll_line("ready ") {
                    r.id = Some(id);
                    r.ready_ms = Some(now_ms());
                }
            }
            if r.paused_until.is_some_and(|t| now >= t) {
                kid.signal(libc::SIGCONT);
                r.paused_until = None;
            }
            if r.end == End::Alive && kid.exited() {
                // It gave up by itself (for example it could not register while the
                // EPM was down): from now on it is not alive.
                r.end = if r.id.is_some() {
                    End::Exited
                } else {
                    End::NeverReady
                };
                r.end_ms = Some(now_ms());
                r.kid = None;
            }
        }
    }

    fn alive(&self) -> Vec<usize> {
        (0..self.receivers.len())
            .filter(|&i| self.receivers[i].end == End::Alive && self.receivers[i].kid.is_some())
            .collect()
    }

    fn pick(&mut self) -> Option<usize> {
        let alive = self.alive();
        if alive.is_empty() {
            None
        } else {
            Some(alive[self.rng.below(alive.len() as u64) as usize])
        }
    }

    fn end_receiver(&mut self, i: usize, graceful: bool) {
        let r = &mut self.receivers[i];
        let Some(mut kid) = r.kid.take() else { return };
        r.end_ms = Some(now_ms());
        if r.paused_until.take().is_some() {
            kid.signal(libc::SIGCONT);
        }
        if r.id.is_none() {
            r.end = End::NeverReady;
        } else if graceful {
            r.end = End::Stopped;
        } else {
            r.end = End::Killed;
        }
        if graceful {
            kid.signal(libc::SIGTERM);
            // Reaped in the background: a graceful close takes up to ~2 s.
            std::thread::spawn(move || {
                kid.wait(Duration::from_secs(10));
            });
            self.counts.stopped += 1;
        } else {
            kid.signal(libc::SIGKILL);
            kid.wait(Duration::from_secs(5));
            self.counts.killed += 1;
        }
    }

    /// Kills the EPM (SIGKILL or SIGTERM), waits a moment and starts a new one on the
    /// same port.
    fn restart_epm(&mut self) -> anyhow::Result<()> {
        // A paused receiver could not register again until resumed: resume it first,
        // so the outage window covers everyone.
        for r in &mut self.receivers {
            if r.paused_until.take().is_some() {
                if let Some(kid) = &r.kid {
                    kid.signal(libc::SIGCONT);
                }
            }
        }
        let down = now_ms();
        if let Some(mut kid) = self.epm.take() {
            if self.rng.below(2) == 0 {
                kid.signal(libc::SIGKILL);
            } else {
                kid.signal(libc::SIGTERM);
            }
            kid.wait(Duration::from_secs(10));
        }
        std::thread::sleep(Duration::from_millis(200 + self.rng.below(2000)));
        let addr = self.epm_addr;
        self.start_epm(addr)?;
        self.outages.push((down, now_ms()));
        self.counts.epm_restarts += 1;
        Ok(())
    }

    fn chaos_step(&mut self) -> anyhow::Result<()> {
        let alive = self.alive().len();
        let roll = self.rng.below(100);
        if alive < 2 || (roll < 35 && alive < MAX_RECEIVERS) {
            return self.start_receiver();
        }
        match roll {
            35..=54 => {
                if let Some(i) = self.pick() {
                    self.end_receiver(i, false);
                }
            }
            55..=69 => {
                if let Some(i) = self.pick() {
                    self.end_receiver(i, true);
                }
            }
            70..=84 => {
                let paused = self.receivers.iter().any(|r| r.paused_until.is_some());
                if !paused {
                    if let Some(i) = self.pick() {
                        let ms = 500 + self.rng.below(4500);
                        let r = &mut self.receivers[i];
                        if let Some(kid) = &r.kid {
                            kid.signal(libc::SIGSTOP);
                            r.paused_until = Some(Instant::now() + Duration::from_millis(ms));
                            self.counts.paused += 1;
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn run_mode(a: &Args) -> anyhow::Result<bool> {
    let secs = a.num("--secs", 30)?;
    let seed = a.num("--seed", now_ms())?;
    // About 1000 events/s per sender in a short run, 500 in a long one (the logs of a
    // 10-minute run stay around 100 MB).
    let interval_us = a.num("--interval-us", if secs < 120 { 1000 } else { 2000 })?;
    let exe = std::env::current_exe()?;
    let out = match a.get("--out") {
        Some(d) => PathBuf::from(d),
        None => std::env::temp_dir().join(format!("ipcbus-soak-{}", std::process::id())),
    };
    std::fs::create_dir_all(&out)?;
    eprintln!("soak: {secs} s, seed {seed}, logs in {}", out.display());
    let mut d = Driver {
        exe,
        out: out.clone(),
        epm_addr: "127.0.0.1:0".parse()?,
        epm: None,
        registry: a.has("--local").then(|| out.join("registry")),
        epm_gen: 0,
        receivers: Vec::new(),
        outages: Vec::new(),
        counts: Counts::default(),
        rng: Rng(seed | 1),
    };
    if d.registry.is_none() {
        let any = d.epm_addr;
        d.epm_addr = d.start_epm(any)?;
    }
    for _ in 0..3 {
        d.start_receiver()?;
    }
    let [flag, value] = d.discovery_args();
    let mut senders = Vec::new();
    for i in 0..2u8 {
        let log = out.join(format!("send-{i}.log"));
        let kid = Kid::spawn(
            &d.exe,
            &[
                "send",
                &flag,
                &value,
                "--index",
                &i.to_string(),
                "--log",
                &log.to_string_lossy(),
                "--interval-us",
                &interval_us.to_string(),
            ],
            &out.join(format!("send-{i}.err")),
        )?;
        if kid.wait_line("ready ", Duration::from_secs(20)).is_none() {
            bail!("sender {i} did not start; see {}", out.display());
        }
        senders.push((kid, log));
    }

    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    // In a short run, one EPM restart in the middle; in a long one, one every 30-60 s.
    let mut next_epm = start + Duration::from_secs(if secs < 60 { secs / 2 } else { 20 });
    while Instant::now() < end {
        d.poll();
        if d.registry.is_none() && Instant::now() >= next_epm {
            d.restart_epm()?;
            let gap = if secs < 60 {
                secs * 10
            } else {
                30 + d.rng.below(30)
            };
            next_epm = Instant::now() + Duration::from_secs(gap);
        } else {
            d.chaos_step()?;
        }
        let pause = 300 + d.rng.below(900);
        let until = Instant::now() + Duration::from_millis(pause);
        while Instant::now() < until {
            d.poll();
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Calm down: resume paused receivers, stop the senders (they await every report),
    // then stop the receivers and the EPM.
    for r in &mut d.receivers {
        if r.paused_until.take().is_some() {
            if let Some(kid) = &r.kid {
                kid.signal(libc::SIGCONT);
            }
        }
    }
    d.poll();
    for (kid, _) in &senders {
        kid.signal(libc::SIGTERM);
    }
    let mut senders_ok = true;
    for (kid, _) in &mut senders {
        senders_ok &= kid.wait(Duration::from_secs(60));
    }
    let stop_ms = now_ms();
    d.poll();
    for i in d.alive() {
        d.receivers[i].end_ms = Some(stop_ms);
        if let Some(kid) = &d.receivers[i].kid {
            kid.signal(libc::SIGTERM);
        }
    }
    for r in &mut d.receivers {
        if let Some(mut kid) = r.kid.take() {
            kid.wait(Duration::from_secs(10));
        }
    }
    if let Some(mut kid) = d.epm.take() {
        kid.signal(libc::SIGTERM);
        kid.wait(Duration::from_secs(10));
    }
    if !senders_ok {
        bail!("a sender did not finish cleanly; see {}", out.display());
    }
    let logs: Vec<PathBuf> = senders.into_iter().map(|(_, l)| l).collect();
    let v = check(&d, &logs, secs)?;
    println!("{}", v.line);
    if !a.has("--keep") && v.ok {
        let _ = std::fs::remove_dir_all(&out);
    } else {
        eprintln!("soak: logs kept in {}", out.display());
    }
    Ok(v.ok)
}

// ---------------------------------------------------------------------------------
// The checker.

struct Verdict {
    line: String,
    ok: bool,
}

struct Event {
    sent_ms: u64,
    /// Receivers (interned ids) that acknowledged.
    acked: Vec<u32>,
    /// Receivers reported failed.
    failed: Vec<u32>,
    reported: bool,
}

/// Receiver ids as small numbers, so a long run's reports fit in memory.
#[derive(Default)]
struct Ids(HashMap<String, u32>);

impl Ids {
    fn of(&mut self, id: &str) -> u32 {
        let n = self.0.len() as u32;
        *self.0.entry(id.to_owned()).or_insert(n)
    }
}

fn read_sender(path: &Path, ids: &mut Ids) -> anyhow::Result<BTreeMap<u64, Event>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut ev: BTreeMap<u64, Event> = BTreeMap::new();
    for line in text.lines() {
        let mut w = line.split(' ');
        match (w.next(), w.next().and_then(|n| n.parse::<u64>().ok())) {
            (Some("P"), Some(n)) => {
                let t = w.next().and_then(|t| t.parse().ok()).unwrap_or(0);
                ev.insert(
                    n,
                    Event {
                        sent_ms: t,
                        acked: Vec::new(),
                        failed: Vec::new(),
                        reported: false,
                    },
                );
            }
            (Some("R"), Some(n)) => {
                let e = ev.get_mut(&n).context("report of an event never sent")?;
                e.reported = true;
                let mut failed = false;
                for tok in w {
                    match tok {
                        "A" => failed = false,
                        "F" => failed = true,
                        id if failed => {
                            let id = id.split('=').next().unwrap_or_default();
                            e.failed.push(ids.of(id));
                        }
                        id => e.acked.push(ids.of(id)),
                    }
                }
            }
            _ => bail!("{}: bad line {line:?}", path.display()),
        }
    }
    Ok(ev)
}

fn check(d: &Driver, sender_logs: &[PathBuf], secs: u64) -> anyhow::Result<Verdict> {
    let mut ids = Ids::default();
    let senders: Vec<BTreeMap<u64, Event>> = sender_logs
        .iter()
        .map(|p| read_sender(p, &mut ids))
        .collect::<Result<_, _>>()?;
    // Interned id -> receiver index, and receiver index -> interned id.
    let rid: Vec<Option<u32>> = d
        .receivers
        .iter()
        .map(|r| r.id.as_deref().map(|id| ids.of(id)))
        .collect();
    let by_id: HashMap<u32, usize> = rid
        .iter()
        .enumerate()
        .filter_map(|(i, id)| id.map(|id| (id, i)))
        .collect();

    let (mut dups, mut out_of_order, mut lost, mut kill_window, mut unreported) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut no_report = 0u64;
    // (event, receiver) pairs that had to be delivered or reported failed.
    let mut expected = 0u64;
    let mut problems: Vec<String> = Vec::new();
    // Per receiver: the set of (sender, n) it logged, and the last n per sender.
    let mut got: Vec<HashSet<(u8, u64)>> = Vec::new();
    let mut last: Vec<HashMap<u8, u64>> = Vec::new();
    for (i, r) in d.receivers.iter().enumerate() {
        let text = std::fs::read_to_string(&r.log).unwrap_or_default();
        let mut seen = HashSet::new();
        let mut prev: HashMap<u8, (u64, u64)> = HashMap::new();
        for line in text.lines() {
            let f: Vec<u64> = line.split(' ').filter_map(|x| x.parse().ok()).collect();
            let [idx, n, seq] = f[..] else {
                // A torn last line can only come from a SIGKILL mid-write.
                continue;
            };
            let idx = idx as u8;
            if !seen.insert((idx, n)) {
                dups += 1;
                problems.push(format!("receiver {i}: event {idx}/{n} twice"));
            }
            if let Some(&(pn, ps)) = prev.get(&idx) {
                if n <= pn || seq <= ps {
                    out_of_order += 1;
                    problems.push(format!("receiver {i}: event {idx}/{n} after {idx}/{pn}"));
                }
            }
            prev.insert(idx, (n, seq));
        }
        last.push(prev.into_iter().map(|(k, (n, _))| (k, n)).collect());
        got.push(seen);
    }

    let (mut sent, mut acked, mut failed) = (0u64, 0u64, 0u64);
    for (s, events) in senders.iter().enumerate() {
        let s8 = s as u8;
        for (&n, e) in events {
            sent += 1;
            acked += e.acked.len() as u64;
            failed += e.failed.len() as u64;
            if !e.reported {
                no_report += 1;
                problems.push(format!("event {s}/{n}: no report"));
                continue;
            }
            for id in &e.acked {
                let Some(&ri) = by_id.get(id) else {
                    problems.push(format!("event {s}/{n}: acked by unknown receiver {id}"));
                    lost += 1;
                    continue;
                };
                if !got[ri].contains(&(s8, n)) {
                    let r = &d.receivers[ri];
                    let next_after_last = last[ri].get(&s8).is_none_or(|&l| n > l);
                    if r.end == End::Killed && next_after_last {
                        kill_window += 1;
                    } else {
                        lost += 1;
                        problems.push(format!(
                            "event {s}/{n}: acked by receiver {ri}, not in its log"
                        ));
                    }
                }
            }
            let in_outage = d
                .outages
                .iter()
                .any(|&(down, up)| e.sent_ms >= down && e.sent_ms <= up + EPM_GRACE_MS);
            if in_outage {
                continue;
            }
            for (ri, r) in d.receivers.iter().enumerate() {
                let (Some(id), Some(ready)) = (&rid[ri], r.ready_ms) else {
                    continue;
                };
                let end = r.end_ms.unwrap_or(u64::MAX);
                if e.sent_ms < ready + JOIN_GRACE_MS || e.sent_ms >= end {
                    continue;
                }
                expected += 1;
                let covered =
                    e.acked.contains(id) || e.failed.contains(id) || got[ri].contains(&(s8, n));
                if !covered {
                    unreported += 1;
                    if problems.len() < 50 {
                        problems.push(format!(
                            "event {s}/{n} (sent at +{} ms): receiver {ri} alive and registered since +{} ms, neither delivered nor reported",
                            e.sent_ms.saturating_sub(d.receivers[0].spawned_ms),
                            ready.saturating_sub(d.receivers[0].spawned_ms)
                        ));
                    }
                }
            }
        }
    }
    for p in problems.iter().take(50) {
        eprintln!("soak: {p}");
    }
    let c = &d.counts;
    let ok = dups == 0 && lost == 0 && out_of_order == 0 && unreported == 0 && no_report == 0;
    let line = format!(
        "soak: {secs} s, events sent {sent}, acknowledged {acked}, reported failed {failed}, \
         duplicates {dups}, lost after ack {lost}, out of order {out_of_order}, \
         unreported {} (of {expected} that had to be; receivers started {}, sigkilled {}, stopped {}, paused {}, epm restarts {}, \
         acked but unlogged in a sigkill window {kill_window})",
        unreported + no_report,
        c.started,
        c.killed,
        c.stopped,
        c.paused,
        c.epm_restarts
    );
    Ok(Verdict { line, ok })
}

fn main() -> ExitCode {
    let args = Args::from_env();
    let mode = args.0.first().cloned().unwrap_or_default();
    if mode != "run" {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_writer(std::io::stderr)
            .init();
    }
    if mode != "run" {
        // A child dies with the driver, however the driver ends.
        // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag of this process.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        }
    }
    let r = match mode.as_str() {
        "run" => run_mode(&args),
        "epm" | "recv" | "send" => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| {
                rt.block_on(async {
                    match mode.as_str() {
                        "epm" => epm_mode(&args).await,
                        "recv" => recv_mode(&args).await,
                        _ => send_mode(&args).await,
                    }
                })
            })
            .map(|()| true),
        _ => Err(anyhow::anyhow!(
            "usage: soak run [--secs N] [--out DIR] [--seed S] [--keep] [--local] | epm | recv | send"
        )),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
