//! The fan-out core: no sockets, no tasks, no clocks. The publisher encodes each
//! event once into the [`Stage`]; whole chunks of it are handed to every target's
//! [`Window`] as one shared `Bytes`. A window is one receiver connection's state as
//! the publisher, its writer and its acknowledgement reader share it: the chunks
//! queued and not yet written ([`Out`]), the highest event queued and the highest
//! acknowledged, the failure, the waiters for outcomes, and the counters.
//!
//! What only the async side can do (wake a writer task, put a failed range on the
//! sender's event stream) is asked through [`Destination`] or returned as a value
//! ([`Acked`], the range [`Window::fail`] counted, the `bool`s that say "wake the
//! writer"), so everything here is unit-tested with plain `#[test]`s. Waiting
//! reports register a `std::task::Waker`, which needs no runtime either.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::pool::Pool;
use crate::report::FailReason;
use crate::stats::{ByKind, FailKind};

/// A target of the fan-out as the core sees it: its window, and the two things only
/// the async side can do for it.
pub(super) trait Destination {
    /// Its window.
    fn window(&self) -> &Window;
    /// Wakes its writer, which sleeps because it had nothing to write.
    fn wake_writer(&self);
    /// Events `first..=last` were not queued for it because it had failed for
    /// `reason`; the window has counted them failed already.
    fn skipped(&self, first: u64, last: u64, reason: &FailReason);
}

/// The bounds every target's window shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Limits {
    /// Events a target may have queued and not acknowledged.
    pub(super) window: u64,
    /// Encoded bytes a target may have queued and not written.
    pub(super) buffer: usize,
}

impl Limits {
    /// No bounds (the stage's before it has targets).
    const NONE: Limits = Limits {
        window: u64::MAX,
        buffer: usize::MAX,
    };
}

/// Most bytes staged before they are handed to the connections: about one good
/// write's worth (a single larger frame makes a larger chunk).
pub(super) const STAGE_CHUNK: usize = 128 * 1024;

/// Spare stage buffers kept, and the largest kept.
const STAGE_POOL: usize = 8;
const STAGE_POOL_MAX: usize = 1 << 20;

/// Events encoded once for every receiver: the publisher appends each frame here, and
/// whole chunks are handed to every target connection's queue as one shared `Bytes`
/// (a reference each, not a copy). A hand-over happens when a writer has run dry
/// (the publisher sees `idle_writers`, or the writer finds events staged before it
/// sleeps), when the stage reaches [`STAGE_CHUNK`], when the publisher yields, and
/// before the targets change. So staged events never wait for a next publish: a writer
/// only sleeps with the stage empty.
pub(super) struct Stage<C> {
    buf: Vec<u8>,
    first_seq: u64,
    last_seq: u64,
    targets: Arc<[Arc<C>]>,
    limits: Limits,
    /// Writers asleep with nothing to write since the last hand-over.
    idle_writers: usize,
    /// Every live target had window for events up to this sequence number when last
    /// checked (acknowledgements only move it up): the publisher's fast check.
    room_until: u64,
    /// A target's queue went over the buffer limit at a hand-over.
    over: bool,
    pool: Arc<Pool>,
}

impl<C: Destination> Stage<C> {
    /// An empty stage without targets.
    pub(super) fn new() -> Stage<C> {
        Stage {
            buf: Vec::new(),
            first_seq: 0,
            last_seq: 0,
            targets: Arc::from(Vec::new()),
            limits: Limits::NONE,
            idle_writers: 0,
            room_until: 0,
            over: false,
            pool: Pool::new(STAGE_POOL, STAGE_POOL_MAX),
        }
    }

    /// Whether event `seq` fits without a closer look ([`Stage::blocker`]).
    pub(super) fn has_room(&self, seq: u64) -> bool {
        seq <= self.room_until && !self.over
    }

    /// Appends one encoded frame, event `seq`.
    pub(super) fn push(&mut self, seq: u64, header: &[u8], body: &[u8]) {
        let len = header.len() + body.len();
        if !self.buf.is_empty() && self.buf.len() + len > STAGE_CHUNK {
            self.hand_over();
        }
        if self.buf.is_empty() {
            self.first_seq = seq;
            self.buf.reserve(len.max(STAGE_CHUNK.min(4 * 1024)));
        }
        self.buf.extend_from_slice(header);
        self.buf.extend_from_slice(body);
        self.last_seq = seq;
        if self.idle_writers > 0 {
            self.hand_over();
        }
    }

    /// Hands what is staged to every target as one shared chunk, and wakes the
    /// writers that sleep. A target already failed takes nothing: the events are
    /// counted failed for it and reported ([`Destination::skipped`]).
    pub(super) fn hand_over(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let next = self.pool.get(0);
        let chunk = self.pool.share(std::mem::replace(&mut self.buf, next));
        let (first, last) = (self.first_seq, self.last_seq);
        for c in self.targets.iter() {
            match c.window().enqueue(&chunk, last, self.limits.buffer) {
                Enqueued::Failed(reason) => {
                    c.window().note_skipped(first, last);
                    c.skipped(first, last, &reason);
                }
                Enqueued::Queued { over, wake } => {
                    self.over |= over;
                    if wake {
                        c.wake_writer();
                    }
                }
            }
        }
        self.idle_writers = 0;
    }

    /// Events from now on go to `targets`; what is staged goes to the previous ones
    /// first.
    pub(super) fn retarget(&mut self, targets: Arc<[Arc<C>]>, limits: Limits) {
        self.hand_over();
        self.targets = targets;
        self.limits = limits;
        self.room_until = 0;
        // A new target's writer may have gone to sleep before it was a target (the
        // hand-over then did not wake it): the next event is handed over at once.
        self.idle_writers = self.idle_writers.max(1);
    }

    /// The writer of `c` found nothing queued. If events are staged, hands them over
    /// and returns `false` (look again); else marks the writer waiting, so the next
    /// hand-over or ack request wakes it, and returns whether it may sleep.
    pub(super) fn park(&mut self, c: &C) -> bool {
        if !self.buf.is_empty() {
            self.hand_over();
            return false;
        }
        let mut out = lock_out(&c.window().out);
        if out.chunks.is_empty() {
            out.writer_waiting = true;
            self.idle_writers += 1;
        }
        out.writer_waiting
    }

    /// For a publisher that found no room for event `seq`: hands what is staged to
    /// the writers, asks every target whose window is full for its acknowledgements
    /// (all at once, not one per round trip), refreshes the fast check, and returns
    /// the first live target that has no room for `seq`, if any.
    pub(super) fn blocker(&mut self, seq: u64) -> Option<Arc<C>> {
        self.hand_over();
        self.over = false;
        let mut room_until = u64::MAX;
        let mut blocker = None;
        for c in self.targets.iter() {
            let w = c.window();
            if w.failure.get().is_some() {
                continue;
            }
            let until = w
                .acked
                .load(Ordering::Acquire)
                .saturating_add(self.limits.window);
            room_until = room_until.min(until);
            if seq > until && w.request_ack(w.queued.load(Ordering::Acquire)) {
                c.wake_writer();
            }
            if blocker.is_none() && !w.has_room(seq, self.limits) {
                blocker = Some(c.clone());
            }
        }
        self.room_until = room_until;
        blocker
    }
}

/// Chunks handed to a connection and not yet taken by its writer.
#[derive(Debug, Default)]
pub(super) struct Out {
    /// Each chunk with the sequence number of its last event.
    pub(super) chunks: VecDeque<(Bytes, u64)>,
    /// Bytes in `chunks`.
    bytes: usize,
    /// The writer sleeps until woken (`Destination::wake_writer`).
    writer_waiting: bool,
}

/// What [`Window::enqueue`] did with a chunk.
#[derive(Debug, PartialEq, Eq)]
enum Enqueued {
    /// Queued; `over`: the queue is now at or over the buffer limit; `wake`: the
    /// writer sleeps, wake it.
    Queued { over: bool, wake: bool },
    /// Not queued: the connection had failed (the events are counted failed).
    Failed(FailReason),
}

/// What an acknowledgement did to a window ([`Window::ack`]).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Acked {
    /// Nothing new: at or below the previous acknowledgement.
    Stale,
    /// The window moved up to it, and the waiters at or below it were woken; a
    /// publisher waiting for room should be told.
    Moved,
    /// Beyond the last event queued: the receiver broke the protocol.
    Beyond,
    /// The connection failed before: every outcome past the previous acknowledgement
    /// was counted failed, so this one must not count some of them acknowledged.
    Failed(FailReason),
}

/// One receiver connection's window, queue, outcomes and counters.
#[derive(Debug)]
pub(super) struct Window {
    pub(super) out: SpinMutex<Out>,
    /// Highest sequence number queued for this receiver.
    pub(super) queued: AtomicU64,
    /// Highest sequence number the receiver acknowledged.
    pub(super) acked: AtomicU64,
    /// Set once, when the connection is dead; `acked` no longer moves after that.
    pub(super) failure: OnceLock<FailReason>,
    /// Highest sequence number whose acknowledgement someone waits for.
    pub(super) ack_wanted: AtomicU64,
    waiters: Mutex<Vec<(u64, Waker)>>,
    /// The sequence number before its first event: `acked - base` events were
    /// acknowledged on this connection.
    base: AtomicU64,
    /// Events reported failed on this connection (all for the reason in `failure`);
    /// counted per failed range, not per event.
    failed: AtomicU64,
    /// Bytes its writer wrote; counted per write, by the writer alone.
    pub(super) bytes_written: AtomicU64,
}

/// What connections' counters add up to, for `Sender::stats`.
#[derive(Debug, Clone, Default)]
pub(super) struct ConnTotals {
    pub(super) acked: u64,
    pub(super) failed: ByKind<FailKind>,
    pub(super) bytes_written: u64,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            out: SpinMutex::new(Out::default()),
            queued: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            failure: OnceLock::new(),
            ack_wanted: AtomicU64::new(0),
            waiters: Mutex::new(Vec::new()),
            base: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        }
    }
}

impl Window {
    /// The window starts after event `last`: the connection's first event is the
    /// next one. Under the queue's lock, so a concurrent [`Window::fail`] sees both
    /// counters before or both after.
    pub(super) fn start_after(&self, last: u64) {
        let _out = lock_out(&self.out);
        self.acked.store(last, Ordering::Release);
        self.queued.store(last, Ordering::Release);
        self.base.store(last, Ordering::Relaxed);
    }

    /// Adds this connection's counts to `t`.
    pub(super) fn add_to(&self, t: &mut ConnTotals) {
        let acked = self.acked.load(Ordering::Acquire);
        t.acked += acked.saturating_sub(self.base.load(Ordering::Relaxed));
        t.bytes_written += self.bytes_written.load(Ordering::Relaxed);
        let failed = self.failed.load(Ordering::Acquire);
        if let Some(why) = self.failure.get().filter(|_| failed > 0) {
            t.failed.add(why.kind(), failed);
        }
    }

    /// The outcome of event `seq` for this receiver, if it is known yet.
    #[inline]
    pub(super) fn outcome(&self, seq: u64) -> Option<Result<(), FailReason>> {
        if self.acked.load(Ordering::Acquire) >= seq {
            return Some(Ok(()));
        }
        // `acked` is final once `failure` is set, and it is set after the last ack.
        self.failure.get().map(|f| {
            if self.acked.load(Ordering::Acquire) >= seq {
                Ok(())
            } else {
                Err(f.clone())
            }
        })
    }

    /// `waker` waits for the outcome of event `seq`; asks for a prompt ack of it.
    /// Returns whether the writer must be woken to send that request.
    pub(super) fn register_waiter(&self, seq: u64, waker: &Waker) -> bool {
        {
            let mut w = lock(&self.waiters);
            if let Some(e) = w.iter_mut().find(|e| e.0 == seq && e.1.will_wake(waker)) {
                e.1.clone_from(waker);
            } else {
                w.push((seq, waker.clone()));
            }
        }
        self.request_ack(seq)
    }

    /// Someone waits for the outcome of event `seq`: the writer is to ask the
    /// receiver to acknowledge it as soon as it is taken (receivers otherwise batch
    /// acks). Returns whether the writer sleeps and must be woken for it.
    #[inline]
    pub(super) fn request_ack(&self, seq: u64) -> bool {
        self.ack_wanted.fetch_max(seq, Ordering::AcqRel) < seq
            && std::mem::take(&mut lock_out(&self.out).writer_waiting)
    }

    /// The receiver acknowledged every event up to `up_to`.
    #[inline]
    pub(super) fn ack(&self, up_to: u64) -> Acked {
        if up_to > self.queued.load(Ordering::Acquire) {
            return Acked::Beyond;
        }
        if up_to <= self.acked.load(Ordering::Acquire) {
            return Acked::Stale;
        }
        // Under the queue's lock, and not once the connection failed: `fail` counted
        // everything past the old `acked` as failed.
        {
            let _out = lock_out(&self.out);
            if let Some(reason) = self.failure.get() {
                return Acked::Failed(reason.clone());
            }
            self.acked.store(up_to, Ordering::Release);
        }
        self.wake_up_to(up_to);
        Acked::Moved
    }

    fn wake_up_to(&self, acked: u64) {
        let mut w = lock(&self.waiters);
        if w.is_empty() {
            return;
        }
        let mut i = 0;
        while i < w.len() {
            if w[i].0 <= acked {
                w.swap_remove(i).1.wake();
            } else {
                i += 1;
            }
        }
    }

    /// Wakes every waiter (their outcomes are known: the connection failed).
    pub(super) fn wake_all(&self) {
        let drained: Vec<_> = lock(&self.waiters).drain(..).collect();
        for (_, w) in drained {
            w.wake();
        }
    }

    /// Marks the connection failed; the first reason wins. The first call counts
    /// every event queued and not acknowledged as failed, once, and returns that
    /// range (`None` if empty or failed before). The caller reports it and wakes the
    /// waiters ([`Window::wake_all`]).
    pub(super) fn fail(&self, reason: FailReason) -> Option<(u64, u64)> {
        self.failure.set(reason).ok()?;
        // Under the queue's lock: a hand-over either queued its chunk before this
        // (counted here) or sees the failure (and counts the chunk itself).
        let (first, last) = {
            let _out = lock_out(&self.out);
            (
                self.acked.load(Ordering::Acquire) + 1,
                self.queued.load(Ordering::Acquire),
            )
        };
        if last < first {
            return None;
        }
        self.failed.fetch_add(last - first + 1, Ordering::Release);
        Some((first, last))
    }

    /// Whether event `seq` fits this connection's window and buffer.
    #[inline]
    pub(super) fn has_room(&self, seq: u64, limits: Limits) -> bool {
        seq - self.acked.load(Ordering::Acquire) <= limits.window
            && lock_out(&self.out).bytes < limits.buffer
    }

    /// Queues a chunk whose last event is `last`, unless the connection failed.
    #[inline]
    fn enqueue(&self, chunk: &Bytes, last: u64, buffer_limit: usize) -> Enqueued {
        let mut out = lock_out(&self.out);
        if let Some(reason) = self.failure.get() {
            return Enqueued::Failed(reason.clone());
        }
        out.bytes += chunk.len();
        out.chunks.push_back((chunk.clone(), last));
        self.queued.store(last, Ordering::Release);
        Enqueued::Queued {
            over: out.bytes >= buffer_limit,
            wake: std::mem::take(&mut out.writer_waiting),
        }
    }

    /// Counts events `first..=last`, never queued because the connection had
    /// failed, as failed.
    fn note_skipped(&self, first: u64, last: u64) {
        self.failed
            .fetch_add(last.saturating_sub(first) + 1, Ordering::Release);
    }

    /// The writer takes every queued chunk into `batch`; returns the last event
    /// taken, if any.
    #[inline]
    pub(super) fn take_queued(&self, batch: &mut Vec<Bytes>) -> Option<u64> {
        let mut out = lock_out(&self.out);
        let last = out.chunks.back().map(|c| c.1);
        out.bytes = 0;
        batch.extend(out.chunks.drain(..).map(|c| c.0));
        last
    }
}

/// The batches a connection wrote that the receiver has not acknowledged yet, each
/// with when it was written: the connection is dead once the oldest stays
/// unacknowledged past the send timeout. Time is passed in.
#[derive(Debug, Default)]
pub(super) struct Unacked {
    /// (last event of a written batch, when it was written), oldest first.
    batches: VecDeque<(u64, Instant)>,
}

impl Unacked {
    /// A batch whose last event is `last` was written at `at`.
    pub(super) fn written(&mut self, last: u64, at: Instant) {
        self.batches.push_back((last, at));
    }

    /// Forgets the batches acknowledged up to `acked`; returns whether the oldest
    /// left was written more than `timeout` before `now`.
    pub(super) fn overdue(&mut self, acked: u64, now: Instant, timeout: Duration) -> bool {
        while self.batches.front().is_some_and(|b| b.0 <= acked) {
            self.batches.pop_front();
        }
        self.batches
            .front()
            .is_some_and(|b| now.saturating_duration_since(b.1) > timeout)
    }
}

/// Events published to one set of targets: from `first` to the next segment's first
/// (or the latest event).
#[derive(Debug)]
pub(super) struct Segment<C> {
    pub(super) first: u64,
    pub(super) targets: Arc<[Arc<C>]>,
}

impl<C: Destination> Segment<C> {
    /// How many of its events up to `last` every target acknowledged (acks are
    /// cumulative, so the lowest acknowledgement bounds them).
    fn acked_events(&self, last: u64) -> u64 {
        let Some(low) = self
            .targets
            .iter()
            .map(|c| c.window().acked.load(Ordering::Acquire))
            .min()
        else {
            return 0;
        };
        (low.min(last) + 1).saturating_sub(self.first)
    }

    /// Whether every event up to `last` is acknowledged or failed by every target.
    fn settled(&self, last: u64) -> bool {
        self.targets.iter().all(|c| {
            let w = c.window();
            w.failure.get().is_some() || w.acked.load(Ordering::Acquire) >= last
        })
    }
}

/// Folds the oldest segments whose every outcome is known into `done` (their count
/// of events acknowledged by all their targets), keeping the newest.
pub(super) fn fold_settled<C: Destination>(segments: &mut VecDeque<Segment<C>>, done: &mut u64) {
    while segments.len() >= 2 {
        let last = segments[1].first - 1;
        if !segments[0].settled(last) {
            break;
        }
        *done += segments[0].acked_events(last);
        segments.pop_front();
    }
}

/// Events acknowledged by every target in `segments`, the latest event being
/// `latest`.
pub(super) fn acked_events<C: Destination>(segments: &VecDeque<Segment<C>>, latest: u64) -> u64 {
    let mut sum = 0;
    for (i, seg) in segments.iter().enumerate() {
        let last = segments.get(i + 1).map_or(latest, |next| next.first - 1);
        sum += seg.acked_events(last);
    }
    sum
}

/// The stage's and the output queues' lock. The stage's is taken for every event, and
/// both are almost never contended (the publisher appends, a writer takes, both in a
/// few instructions, mostly on the same thread), so it is a spin lock: its release is
/// a plain store, where `std::sync::Mutex` needs a second atomic read-modify-write (a
/// full barrier on x86) per event. Contended, it spins briefly, then yields the
/// thread, so a holder that was preempted gets the CPU.
pub(super) type SpinMutex<T> = spin::mutex::SpinMutex<T>;
pub(super) type SpinGuard<'a, T> = spin::mutex::SpinMutexGuard<'a, T>;

pub(super) fn lock_stage<C>(m: &SpinMutex<Stage<C>>) -> SpinGuard<'_, Stage<C>> {
    spin_lock(m)
}

pub(super) fn lock_out(m: &SpinMutex<Out>) -> SpinGuard<'_, Out> {
    spin_lock(m)
}

fn spin_lock<T>(m: &SpinMutex<T>) -> SpinGuard<'_, T> {
    let mut spins = 0u32;
    loop {
        if let Some(g) = m.try_lock() {
            return g;
        }
        if spins < 64 {
            spins += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    /// A target that records what the core asked of the async side.
    #[derive(Default)]
    struct Probe {
        window: Window,
        wakes: AtomicUsize,
        skipped: Mutex<Vec<(u64, u64, FailReason)>>,
    }

    impl Destination for Probe {
        fn window(&self) -> &Window {
            &self.window
        }
        fn wake_writer(&self) {
            self.wakes.fetch_add(1, Ordering::SeqCst);
        }
        fn skipped(&self, first: u64, last: u64, reason: &FailReason) {
            lock(&self.skipped).push((first, last, reason.clone()));
        }
    }

    impl Probe {
        fn wakes(&self) -> usize {
            self.wakes.load(Ordering::SeqCst)
        }
        fn failed(&self) -> u64 {
            self.window.failed.load(Ordering::SeqCst)
        }
    }

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Count {
        fn woken(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    const LIMITS: Limits = Limits {
        window: 4,
        buffer: 1 << 20,
    };

    /// A stage with `n` targets whose windows start after event 0.
    fn setup(n: usize, limits: Limits) -> (Stage<Probe>, Vec<Arc<Probe>>) {
        let targets: Vec<Arc<Probe>> = (0..n).map(|_| Arc::new(Probe::default())).collect();
        for t in &targets {
            t.window.start_after(0);
        }
        let mut stage = Stage::new();
        stage.retarget(Arc::from(targets.clone()), limits);
        (stage, targets)
    }

    /// Stages events `seqs` (a frame of 10 bytes each) and hands them over.
    fn publish(stage: &mut Stage<Probe>, seqs: std::ops::RangeInclusive<u64>) {
        for seq in seqs {
            stage.push(seq, &seq.to_be_bytes(), b"ab");
        }
        stage.hand_over();
    }

    #[test]
    fn windows_fill_and_free() {
        let (mut stage, t) = setup(1, LIMITS);
        let w = &t[0].window;
        assert!(!stage.has_room(1), "nothing known before the first look");
        assert!(stage.blocker(1).is_none());
        assert!(stage.has_room(4) && !stage.has_room(5));
        publish(&mut stage, 1..=4);
        assert!(w.has_room(4, LIMITS) && !w.has_room(5, LIMITS));
        // Full: the blocker is the target, and it is asked for its acks.
        assert!(Arc::ptr_eq(&stage.blocker(5).expect("full"), &t[0]));
        assert_eq!(w.ack_wanted.load(Ordering::SeqCst), 4);
        assert_eq!(w.ack(2), Acked::Moved);
        assert!(w.has_room(6, LIMITS) && !w.has_room(7, LIMITS));
        assert!(stage.blocker(6).is_none());
        assert!(stage.has_room(6) && !stage.has_room(7));
        // The buffer: full once the queued bytes reach the limit, free once taken.
        let tight = Limits {
            window: 100,
            buffer: 25,
        };
        let (mut stage, t) = setup(1, tight);
        let w = &t[0].window;
        assert!(stage.blocker(1).is_none() && stage.has_room(4));
        publish(&mut stage, 1..=3);
        assert!(
            !stage.has_room(4),
            "a hand-over reaching the limit stops the fast path"
        );
        assert!(!w.has_room(4, tight));
        let mut batch = Vec::new();
        assert_eq!(w.take_queued(&mut batch), Some(3));
        assert_eq!(batch.concat().len(), 30);
        assert!(w.has_room(4, tight));
        assert!(stage.blocker(4).is_none() && stage.has_room(4));
        assert_eq!(w.take_queued(&mut batch), None);
    }

    #[test]
    fn outcomes_of_acked_failed_and_skipped_ranges() {
        let (mut stage, t) = setup(1, LIMITS);
        let (p, w) = (&t[0], &t[0].window);
        publish(&mut stage, 1..=4);
        assert_eq!(w.outcome(1), None);
        assert_eq!(w.ack(3), Acked::Moved);
        assert_eq!(w.ack(2), Acked::Stale);
        assert_eq!(w.ack(5), Acked::Beyond, "event 5 was never queued");
        assert_eq!(w.outcome(3), Some(Ok(())));
        assert_eq!(w.outcome(4), None);
        assert_eq!(w.fail(FailReason::Disconnected), Some((4, 4)));
        assert_eq!(w.outcome(3), Some(Ok(())));
        assert_eq!(w.outcome(4), Some(Err(FailReason::Disconnected)));
        // Events handed over after the failure are not queued, but skipped: counted
        // failed and reported, for the reason the connection failed.
        publish(&mut stage, 5..=6);
        assert_eq!(*lock(&p.skipped), vec![(5, 6, FailReason::Disconnected)]);
        assert_eq!(w.queued.load(Ordering::SeqCst), 4);
        assert_eq!(w.outcome(6), Some(Err(FailReason::Disconnected)));
        let mut t = ConnTotals::default();
        w.add_to(&mut t);
        assert_eq!(t.acked, 3);
        assert_eq!(t.failed.get(FailKind::Disconnected), 3);
        assert_eq!(t.failed.total(), 3);
    }

    #[test]
    fn an_ack_wakes_exactly_the_waiters_at_or_below_it() {
        let (mut stage, t) = setup(
            1,
            Limits {
                window: 100,
                ..LIMITS
            },
        );
        let w = &t[0].window;
        publish(&mut stage, 1..=10);
        let wakers: Vec<Arc<Count>> = (0..4).map(|_| Arc::new(Count::default())).collect();
        for (seq, c) in [3, 5, 8, 10].into_iter().zip(&wakers) {
            w.register_waiter(seq, &Waker::from(c.clone()));
        }
        // Registering again for the same event with the same waker adds nothing.
        w.register_waiter(3, &Waker::from(wakers[0].clone()));
        assert_eq!(w.ack_wanted.load(Ordering::SeqCst), 10);
        assert_eq!(w.ack(5), Acked::Moved);
        let woken: Vec<usize> = wakers.iter().map(|c| c.woken()).collect();
        assert_eq!(woken, [1, 1, 0, 0]);
        assert_eq!(w.ack(7), Acked::Moved);
        assert_eq!(wakers[2].woken(), 0);
        assert_eq!(w.ack(8), Acked::Moved);
        assert_eq!(wakers[2].woken(), 1);
        // A failure wakes the rest.
        w.fail(FailReason::TimedOut);
        w.wake_all();
        let woken: Vec<usize> = wakers.iter().map(|c| c.woken()).collect();
        assert_eq!(woken, [1, 1, 1, 1]);
    }

    #[test]
    fn a_hand_over_gives_every_target_the_same_chunk_and_wakes_the_sleepers() {
        let (mut stage, t) = setup(
            3,
            Limits {
                window: 100,
                ..LIMITS
            },
        );
        // The first event after a retarget is handed over at once.
        stage.push(1, &1u64.to_be_bytes(), b"ab");
        // Target 0's writer goes to sleep; target 1's finds work queued.
        let mut batch = Vec::new();
        assert_eq!(t[0].window.take_queued(&mut batch), Some(1));
        assert!(stage.park(&t[0]), "nothing staged, nothing queued: sleeps");
        assert!(!stage.park(&t[1]), "its queue has work");
        // Target 2 failed: it takes nothing.
        assert_eq!(t[2].window.fail(FailReason::ReceiverLeft), Some((1, 1)));
        // The sleeping writer makes the next event go at once.
        stage.push(2, &2u64.to_be_bytes(), b"cd");
        stage.push(3, &3u64.to_be_bytes(), b"ef");
        stage.hand_over();
        assert_eq!(t[0].wakes(), 1, "woken once");
        assert_eq!(t[1].wakes(), 0, "was not asleep");
        let chunks: Vec<Vec<Bytes>> = t[..2]
            .iter()
            .map(|p| {
                let mut b = Vec::new();
                p.window.take_queued(&mut b);
                b
            })
            .collect();
        // One shared chunk per hand-over: target 0 has events 2 and 3, target 1 all.
        assert_eq!(chunks[0].len(), 2);
        assert_eq!(chunks[1].len(), 3);
        assert_eq!(
            chunks[0][0].as_ptr(),
            chunks[1][1].as_ptr(),
            "shared, not copied"
        );
        assert_eq!(chunks[0][1].as_ptr(), chunks[1][2].as_ptr());
        assert_eq!(&chunks[0][0][8..], b"cd");
        assert_eq!(
            *lock(&t[2].skipped),
            vec![
                (2, 2, FailReason::ReceiverLeft),
                (3, 3, FailReason::ReceiverLeft)
            ]
        );
        assert_eq!(t[2].failed(), 3);
        // A full chunk is handed over without waiting for a sleeper.
        let big = vec![0u8; STAGE_CHUNK];
        stage.push(4, &4u64.to_be_bytes(), &big);
        assert_eq!(t[1].window.queued.load(Ordering::SeqCst), 3);
        stage.push(5, &5u64.to_be_bytes(), b"x");
        assert_eq!(t[1].window.queued.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn a_failure_after_partial_acks_is_counted_once() {
        let (mut stage, t) = setup(
            1,
            Limits {
                window: 100,
                ..LIMITS
            },
        );
        let w = &t[0].window;
        publish(&mut stage, 1..=10);
        assert_eq!(w.ack(4), Acked::Moved);
        assert_eq!(w.fail(FailReason::TimedOut), Some((5, 10)));
        assert_eq!(
            w.fail(FailReason::Disconnected),
            None,
            "the first reason wins"
        );
        assert_eq!(w.failure.get(), Some(&FailReason::TimedOut));
        // An ack arriving after the failure does not turn failed events acked.
        assert_eq!(w.ack(8), Acked::Failed(FailReason::TimedOut));
        assert_eq!(w.outcome(8), Some(Err(FailReason::TimedOut)));
        let mut totals = ConnTotals::default();
        w.add_to(&mut totals);
        assert_eq!(totals.acked, 4);
        assert_eq!(totals.failed.get(FailKind::TimedOut), 6);
        assert_eq!(totals.failed.total(), 6);
        // Nothing in flight: a failure counts nothing.
        let (_, t) = setup(1, LIMITS);
        assert_eq!(t[0].window.fail(FailReason::SenderClosed), None);
        assert_eq!(t[0].failed(), 0);
    }

    #[test]
    fn an_ack_request_wakes_a_sleeping_writer_once() {
        let (mut stage, t) = setup(1, LIMITS);
        let w = &t[0].window;
        assert!(stage.park(&t[0]));
        assert!(w.request_ack(3), "asleep: wake it");
        assert!(!w.request_ack(3), "asked already");
        assert!(!w.request_ack(2), "lower: nothing new");
        assert!(stage.park(&t[0]));
        assert!(w.request_ack(5));
        assert!(!w.request_ack(6), "awake: nothing to wake");
    }

    #[test]
    fn a_batch_unacknowledged_past_the_timeout_is_overdue() {
        let (t0, timeout) = (Instant::now(), Duration::from_secs(1));
        let ms = Duration::from_millis;
        let mut u = Unacked::default();
        assert!(!u.overdue(0, t0 + ms(10_000), timeout), "nothing written");
        u.written(5, t0);
        u.written(9, t0 + ms(500));
        assert!(!u.overdue(0, t0 + ms(1000), timeout), "not past it yet");
        assert!(u.overdue(0, t0 + ms(1001), timeout));
        assert!(
            !u.overdue(5, t0 + ms(1001), timeout),
            "the first batch is acked"
        );
        assert!(
            u.overdue(7, t0 + ms(1501), timeout),
            "a batch acked in part counts"
        );
        assert!(!u.overdue(9, t0 + ms(100_000), timeout), "all acked");
    }

    #[test]
    fn segments_count_events_acked_by_all_their_targets() {
        let (mut stage, t) = setup(
            2,
            Limits {
                window: 100,
                ..LIMITS
            },
        );
        publish(&mut stage, 1..=6);
        let mut segments = VecDeque::from([
            Segment {
                first: 1,
                targets: Arc::from(t.clone()),
            },
            Segment {
                first: 5,
                targets: Arc::from(vec![t[0].clone()]),
            },
        ]);
        t[0].window.ack(6);
        t[1].window.ack(2);
        // 1..=2 by both in the first; 5..=6 by its one target in the second.
        assert_eq!(acked_events(&segments, 6), 4);
        let mut done = 0;
        fold_settled(&mut segments, &mut done);
        assert_eq!(
            (segments.len(), done),
            (2, 0),
            "target 1 has not settled 3..=4"
        );
        t[1].window.fail(FailReason::Disconnected);
        fold_settled(&mut segments, &mut done);
        assert_eq!((segments.len(), done), (1, 2));
        assert_eq!(done + acked_events(&segments, 6), 4);
    }
}
