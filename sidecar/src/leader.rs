//! The leading loop's decisions, apart from I/O: a `Leader` is fed
//! `Event`s (bytes from the replication link, an append's outcome, a lease
//! renewal's outcome, the control link's answers, a timer) and answers a
//! `Step`: the `Action`s to perform (append, renew, `KEEL.ACK`,
//! `KEEL.LEASE`, `KEEL.FENCED`, `REPLCONF ACK`, stop), when to wake it up
//! next, and whether to read the replication link meanwhile. The runner in
//! primary.rs does the I/O and nothing else.
//!
//! The write path: Redis's replication stream arrives (`Event::Bytes`) →
//! bytes wait in `pending` until an append may leave (group commit, below)
//! → `Action::Append` of records ending at a cut point (cuts.rs) →
//! `Event::Appended(Confirmed)` once a quorum of the journal fsync'd them →
//! `Action::Ack(end)` (`KEEL.ACK end`: the module releases the replies of
//! writes up to `end`).
//!
//! Invariants (checked with `assert!`, they are cheap):
//! - offsets never go back: `acked <= durable <= offset` (the end of the
//!   bytes handed to appends), and an append in flight ends at `offset`;
//! - `Action::Ack(o)` only for `o` a confirmed append's end: an append that
//!   failed or whose outcome is unknown never acknowledges anything;
//! - at most one append in flight; bytes arriving meanwhile form the next
//!   one (group commit). An append whose outcome is unknown is sent again,
//!   the same records with the same `expect_last_seq`, so it lands exactly
//!   once (a `SeqMismatch` answer is resolved by the runner reading the
//!   record back: it landed, or someone else appended: `Overtaken`);
//! - while an append is in flight the replication link is not read, for at
//!   most `READ_DURING_APPEND_AFTER_US`: Redis's bytes wait in the socket
//!   and are read in one go when it returns (one read per append instead of
//!   one wake-up per event-loop turn of Redis), yet a journal in trouble
//!   does not let Redis's replica buffer grow;
//! - after a confirmation the next append may wait (at most
//!   `merge_wait_us`) until about as many bytes are pending as the clients
//!   just answered and those already waiting wrote last time (`Merge`):
//!   clients answered together write again together, and their writes join
//!   the waiting ones in one append instead of alternating in two half-size
//!   groups;
//! - the lease is renewed every `lease_ms / 3` while Redis answers the
//!   control link (lease.rs), one renewal at a time; each renewal's deadline
//!   goes to the module (`KEEL.LEASE`). A confirmation that arrives after
//!   the module's lease lapsed waits for a renewal before its `KEEL.ACK`
//!   (an ack now could only answer KEEL_UNCONFIRMED); meanwhile no append
//!   leaves and the link is not read;
//! - `FENCED` from the journal (on an append or a renewal) or `Overtaken`:
//!   the module is told (`Action::Fenced`), then the loop stops. After
//!   `Action::Stop` the leader takes no more events.

use std::sync::Arc;

use crate::cuts::Cuts;
use crate::engine::Writer;
use crate::lease::Renewal;
use crate::primary::Stop;
use crate::record::Kind;
use crate::record::MAX_PAYLOAD_BYTES;
use crate::record::Record;

/// Most records (of at most `MAX_PAYLOAD_BYTES`) in one append.
pub const MAX_RECORDS_PER_APPEND: usize = 14;
/// Most stream bytes one append carries: a command up to this size is
/// journaled whole.
pub const MAX_APPEND_PAYLOAD_BYTES: usize = MAX_RECORDS_PER_APPEND * MAX_PAYLOAD_BYTES;
/// A bound on one record's header (kind, replid, offsets, writer): well under this.
const MAX_RECORD_HEADER_BYTES: usize = 1024;
const _: () = assert!(crate::record::MAX_HEADER_BYTES <= MAX_RECORD_HEADER_BYTES);
// With each record's header, the largest append fits the journal's limit.
const _: () = assert!(
    MAX_APPEND_PAYLOAD_BYTES + MAX_RECORDS_PER_APPEND * MAX_RECORD_HEADER_BYTES <= keel_journal_client::limits::MAX_APPEND_BYTES
);

/// How long an append may be in flight before the replication link is
/// read again meanwhile.
pub const READ_DURING_APPEND_AFTER_US: u64 = 20_000;

/// How long an append refused for lack of room (`stream-full`) waits
/// before it is sent again.
pub const STREAM_FULL_RETRY_MS: u64 = 100;

/// Most confirmations sent on without waiting after waits that ran out.
const MERGE_MAX_BACKOFF: u32 = 64;

/// The bounds the leading loop works within (from `PrimaryConfig`).
#[derive(Debug, Clone)]
pub struct Limits {
    pub lease_ms: u64,
    pub drift_margin_ms: u64,
    /// Stream bytes read ahead of the journal before reading pauses.
    pub max_buffered_bytes: usize,
    /// Longest wait for answered clients' next writes before an append.
    pub merge_wait_us: u64,
    /// How often the replication link reports its offset to Redis.
    pub replconf_ack_ms: u64,
    /// Pause before an append whose outcome is unknown is sent again.
    pub retry_pause_ms: u64,
}

/// What happened, as the runner saw it.
#[derive(Debug)]
pub enum Event<'a> {
    /// The next bytes of the replication stream.
    Bytes(&'a [u8]),
    /// The replication link ended (closed or failed).
    LinkClosed(String),
    /// The append in flight came back.
    Appended(AppendOutcome),
    /// The lease renewal in flight succeeded.
    RenewalDone,
    /// The lease renewal in flight failed (the lease lapses if this goes on).
    RenewalFailed(String),
    /// The journal fenced this node on a renewal.
    RenewalFenced(String),
    /// Redis has answered this many commands of the control connection.
    ControlAnswered(u64),
    /// Redis answered an error on the control connection.
    ControlRefused(String),
    /// Nothing but time passed (the wake-up asked for, or earlier).
    Timer,
}

/// How one attempt of an append ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    /// It landed; the stream's last seq is now this.
    Confirmed { last_seq: u64 },
    /// Nobody knows whether it landed (or the journal is unavailable):
    /// send it again, with the same `expect_last_seq`.
    Unknown(String),
    /// The stream is full: nothing was appended; try again later.
    StreamFull(String),
    /// The journal fenced this node.
    Fenced(String),
    /// Someone else appended under this node's lease.
    Overtaken(String),
    /// Refused for another reason: nothing to retry.
    Refused(String),
}

/// What to do after an append attempt ended: one decision for the leading
/// loop and for the appends made before it (base RDB, voids).
#[derive(Debug)]
pub enum AfterAppend {
    Done { last_seq: u64 },
    RetryAfterMs(u64),
    Stop(Stop),
}

impl AppendOutcome {
    pub fn next(self, retry_pause_ms: u64) -> AfterAppend {
        match self {
            AppendOutcome::Confirmed { last_seq } => AfterAppend::Done { last_seq },
            AppendOutcome::Unknown(_) => AfterAppend::RetryAfterMs(retry_pause_ms),
            AppendOutcome::StreamFull(_) => AfterAppend::RetryAfterMs(STREAM_FULL_RETRY_MS),
            AppendOutcome::Fenced(m) => AfterAppend::Stop(Stop::Fenced(m)),
            AppendOutcome::Overtaken(m) => AfterAppend::Stop(Stop::Overtaken(m)),
            AppendOutcome::Refused(m) => AfterAppend::Stop(Stop::Fatal(format!("append refused: {m}"))),
        }
    }
}

/// What the runner is to do.
#[derive(Debug)]
pub enum Action {
    /// Append these encoded records as the records after `expect_last_seq`
    /// (`attempt` 1 is the first send, higher ones resend the same).
    Append { records: Arc<Vec<Vec<u8>>>, expect_last_seq: u64, attempt: u32 },
    /// Renew the lease (one at a time; answer with `Renewal*`).
    StartRenewal,
    /// `KEEL.ACK o` on the control connection.
    Ack(u64),
    /// `KEEL.LEASE deadline_ms` on the control connection.
    Lease(u64),
    /// `KEEL.FENCED why` on the control connection (best effort).
    Fenced(String),
    /// `REPLCONF ACK o` on the replication link.
    ReplconfAck(u64),
    /// Leading ends.
    Stop(Stop),
}

/// The answer to one event.
#[derive(Debug)]
pub struct Step {
    pub actions: Vec<Action>,
    /// Feed `Event::Timer` at this monotonic time (µs) if nothing else
    /// came first.
    pub wake_at_us: Option<u64>,
    /// Whether to read the replication link now.
    pub read: bool,
}

/// The append in flight (from its first send until confirmed).
#[derive(Debug)]
struct InFlight {
    records: Arc<Vec<Vec<u8>>>,
    expect_last_seq: u64,
    /// Stream bytes it carries, and the offset they end at.
    bytes: usize,
    end: u64,
    since_us: u64,
    attempt: u32,
    /// Waiting to be sent again (after an unknown outcome or a full stream).
    retry_at_us: Option<u64>,
    /// Since when the stream has been full for it.
    full_since_us: Option<u64>,
}

/// The leading loop's state.
#[derive(Debug)]
pub struct Leader {
    limits: Limits,
    replid: String,
    /// The engine every record names (its server's, read once per round).
    writer: Option<Writer>,
    /// Where the bytes not yet handed to an append start.
    offset: u64,
    pending: Vec<u8>,
    /// Appends end only where a replica's offset can stand (cuts.rs).
    cuts: Cuts,
    merge: Merge,
    /// The stream's last seq as far as this node's appends took it.
    last_seq: u64,
    /// The end of the last confirmed append.
    durable: u64,
    /// The last `KEEL.ACK` sent.
    acked: u64,
    inflight: Option<InFlight>,
    /// Stream bytes of the last confirmed append (for `Merge`).
    confirmed_bytes: usize,
    /// A confirmation waits for the renewal in flight before its ack.
    ack_waits_for_renewal: bool,
    renewal: Renewal,
    /// The renewal in flight: when it was sent (monotonic ms).
    renewing_since_ms: Option<u64>,
    /// The deadline last sent to the module (monotonic ms).
    lease_until_ms: u64,
    /// Commands sent on the control connection so far, and which of them
    /// was the last `KEEL.LEASE`; how many Redis answered.
    control_sent: u64,
    lease_notice: u64,
    control_answered: u64,
    next_renew_us: u64,
    next_replconf_us: u64,
    /// Bytes that could be appended now (0 while one is in flight).
    sendable: usize,
    stopped: bool,
}

impl Leader {
    /// A leader of stream `replid` whose server's engine is `writer` (its
    /// records name it), journaled through `offset` (record
    /// `last_seq`), holding a lease whose taking was sent at
    /// `lease_sent_at_ms`; `control_sent` commands went on the control
    /// connection so far. The first step tells the module the lease and
    /// that everything journaled is durable.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        limits: Limits,
        replid: String,
        writer: Option<Writer>,
        offset: u64,
        last_seq: u64,
        lease_sent_at_ms: u64,
        control_sent: u64,
        now_us: u64,
    ) -> (Leader, Step) {
        let mut renewal = Renewal::new(limits.lease_ms, limits.drift_margin_ms);
        let lease_until_ms = renewal.renewed(lease_sent_at_ms, now_us / 1_000);
        let mut l = Leader {
            merge: Merge::new(limits.merge_wait_us),
            limits,
            replid,
            writer,
            offset,
            pending: Vec::new(),
            cuts: Cuts::new(offset),
            last_seq,
            durable: offset,
            acked: offset,
            inflight: None,
            confirmed_bytes: 0,
            ack_waits_for_renewal: false,
            renewal,
            renewing_since_ms: None,
            lease_until_ms,
            control_sent,
            lease_notice: 0,
            control_answered: 0,
            // Renewal and REPLCONF ACK go out at once, then every period.
            next_renew_us: now_us,
            next_replconf_us: now_us,
            sendable: 0,
            stopped: false,
        };
        let mut out = vec![l.control(Action::Lease(lease_until_ms))];
        l.lease_notice = l.control_sent;
        out.push(l.control(Action::Ack(offset)));
        let step = l.finish(out, now_us);
        (l, step)
    }

    /// Takes one event at monotonic time `now_us`.
    pub fn handle(&mut self, event: Event<'_>, now_us: u64) -> Step {
        assert!(!self.stopped, "a leader that stopped takes no more events");
        let now_ms = now_us / 1_000;
        let mut out = Vec::new();
        match event {
            Event::Bytes(bytes) => {
                self.pending.extend_from_slice(bytes);
                let was_broken = self.cuts.broken().is_some();
                self.cuts.feed(bytes);
                if let (false, Some(why)) = (was_broken, self.cuts.broken()) {
                    tracing::error!(%why, "the replication stream is not RESP as expected; appends may now end mid-command");
                }
            }
            Event::LinkClosed(why) => self.stop(Stop::Retry(why), &mut out),
            Event::Appended(outcome) => self.appended(outcome, now_us, &mut out),
            Event::RenewalDone => {
                let sent_at = self.renewing_since_ms.take().expect("a renewal was in flight");
                let until = self.renewal.renewed(sent_at, now_ms);
                self.lease_until_ms = until;
                out.push(self.control(Action::Lease(until)));
                self.lease_notice = self.control_sent;
                self.ack_after_renewal(now_us, &mut out);
            }
            Event::RenewalFailed(why) => {
                assert!(self.renewing_since_ms.take().is_some(), "a renewal was in flight");
                tracing::warn!(error = %why, "lease renewal failed");
                self.ack_after_renewal(now_us, &mut out);
            }
            Event::RenewalFenced(message) => {
                self.renewing_since_ms = None;
                self.stop(Stop::Fenced(message), &mut out);
            }
            Event::ControlAnswered(n) => {
                assert!(n >= self.control_answered, "answers are counted, they never go back");
                self.control_answered = n;
            }
            Event::ControlRefused(why) => {
                // A refused KEEL.* (an ACL change, say): what it said is said
                // again on a new connection by the next leading round.
                self.stop(Stop::Retry(format!("Redis refused a command on the control connection ({why})")), &mut out);
            }
            Event::Timer => {}
        }
        if !self.stopped {
            self.due(now_us, &mut out);
            self.pump(now_us, &mut out);
        }
        self.finish(out, now_us)
    }

    /// The end of the last confirmed append.
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// The last `KEEL.ACK` sent.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Commands the leader had sent on the control connection.
    pub fn control_sent(&self) -> u64 {
        self.control_sent
    }

    fn finish(&mut self, actions: Vec<Action>, now_us: u64) -> Step {
        self.check();
        if self.stopped {
            return Step { actions, wake_at_us: None, read: false };
        }
        Step { actions, wake_at_us: self.wake_at(now_us), read: self.may_read(now_us) }
    }

    fn check(&self) {
        assert!(self.acked <= self.durable, "acked {} beyond the durable end {}", self.acked, self.durable);
        assert!(self.durable <= self.offset, "durable end {} beyond the appended bytes' end {}", self.durable, self.offset);
        if let Some(f) = &self.inflight {
            assert!(f.end == self.offset && self.durable < f.end, "the append in flight ends where appended bytes end");
        } else {
            assert!(self.durable == self.offset, "with no append in flight every appended byte is durable");
        }
    }

    /// Appended records `self.last_seq + 1..` are confirmed or not.
    fn appended(&mut self, outcome: AppendOutcome, now_us: u64, out: &mut Vec<Action>) {
        let f = self.inflight.as_mut().expect("an append was in flight");
        assert!(f.retry_at_us.is_none(), "an append waiting to be resent has no outcome");
        match &outcome {
            AppendOutcome::Unknown(e) => tracing::warn!(error = %e, "append not confirmed; retrying"),
            AppendOutcome::StreamFull(e) => {
                // Back-pressure, not a failure: nothing was appended, and the
                // snapshotter's next trim makes room. Writes stay held (the
                // module answers those past its write timeout as unconfirmed);
                // the lease is renewed meanwhile.
                f.full_since_us.get_or_insert_with(|| {
                    tracing::warn!(error = %e, "the journal stream is full: appends wait for a snapshot to trim it");
                    now_us
                });
            }
            _ => {}
        }
        let last_seq = match outcome.next(self.limits.retry_pause_ms) {
            AfterAppend::Done { last_seq } => last_seq,
            AfterAppend::RetryAfterMs(ms) => {
                self.inflight.as_mut().expect("an append was in flight").retry_at_us = Some(now_us + ms * 1_000);
                return;
            }
            AfterAppend::Stop(stop) => return self.stop(stop, out),
        };
        let f = self.inflight.take().expect("an append was in flight");
        if let Some(t) = f.full_since_us {
            tracing::info!(waited_ms = (now_us - t) / 1_000, "the journal stream has room again");
        }
        assert_eq!(last_seq, f.expect_last_seq + f.records.len() as u64, "the journal confirmed other records than this append's");
        assert!(f.end >= self.durable, "durable offset went back");
        self.last_seq = last_seq;
        self.durable = f.end;
        self.confirmed_bytes = f.bytes;
        let now_ms = now_us / 1_000;
        if now_ms >= self.lease_until_ms {
            // The module's lease lapsed (this process was paused, or
            // renewals were slow): a confirmation now could only answer
            // KEEL_UNCONFIRMED. A renewal decides first.
            self.note_answers();
            if self.renewing_since_ms.is_none() && self.renewal.may_renew(now_ms) {
                self.start_renewal(now_ms, out);
            }
            if self.renewing_since_ms.is_some() {
                self.ack_waits_for_renewal = true;
                return;
            }
        }
        self.ack(now_us, out);
    }

    fn ack_after_renewal(&mut self, now_us: u64, out: &mut Vec<Action>) {
        if std::mem::take(&mut self.ack_waits_for_renewal) {
            self.ack(now_us, out);
        }
    }

    fn ack(&mut self, now_us: u64, out: &mut Vec<Action>) {
        assert!(self.durable >= self.acked, "acks never go back");
        self.acked = self.durable;
        out.push(self.control(Action::Ack(self.durable)));
        self.merge.confirmed(self.confirmed_bytes, self.pending.len(), now_us);
    }

    /// Counts a command for the control connection.
    fn control(&mut self, a: Action) -> Action {
        self.control_sent += 1;
        a
    }

    fn note_answers(&mut self) {
        if self.control_answered >= self.lease_notice {
            self.renewal.redis_answered();
        }
    }

    fn start_renewal(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        assert!(self.renewing_since_ms.is_none(), "one renewal at a time");
        self.renewing_since_ms = Some(now_ms);
        out.push(Action::StartRenewal);
    }

    fn stop(&mut self, stop: Stop, out: &mut Vec<Action>) {
        if let Stop::Fenced(m) | Stop::Overtaken(m) = &stop {
            out.push(self.control(Action::Fenced(m.clone())));
        }
        out.push(Action::Stop(stop));
        self.stopped = true;
    }

    /// Timed work that is due: resending an append, `REPLCONF ACK`, the
    /// renewal cadence.
    fn due(&mut self, now_us: u64, out: &mut Vec<Action>) {
        if let Some(f) = self.inflight.as_mut() {
            if f.retry_at_us.is_some_and(|t| now_us >= t) {
                f.retry_at_us = None;
                f.attempt += 1;
                out.push(Action::Append { records: f.records.clone(), expect_last_seq: f.expect_last_seq, attempt: f.attempt });
            }
        }
        if now_us >= self.next_replconf_us {
            out.push(Action::ReplconfAck(self.durable));
            self.next_replconf_us = next_tick(self.next_replconf_us, self.limits.replconf_ack_ms * 1_000, now_us);
        }
        if now_us >= self.next_renew_us {
            self.next_renew_us = next_tick(self.next_renew_us, self.renewal.period_ms() * 1_000, now_us);
            let now_ms = now_us / 1_000;
            self.note_answers();
            if self.renewing_since_ms.is_some() {
                return; // the previous renewal is still out
            }
            if !self.renewal.may_renew(now_ms) {
                tracing::warn!("the local Redis does not answer; letting the lease lapse");
                return;
            }
            // Renewed off the loop: a slow journal (the client retries for
            // seconds) must not hold up confirmations meanwhile.
            self.start_renewal(now_ms, out);
        }
    }

    /// Sends the next append if one may leave.
    fn pump(&mut self, now_us: u64, out: &mut Vec<Action>) {
        self.sendable = 0;
        if self.inflight.is_some() || self.ack_waits_for_renewal {
            return;
        }
        let most = MAX_APPEND_PAYLOAD_BYTES.min(self.limits.max_buffered_bytes) as u64;
        let sendable = self.cuts.sendable(MAX_PAYLOAD_BYTES as u64, most) as usize;
        assert!(sendable <= self.pending.len(), "cut points lie within the bytes read");
        if sendable == 0 {
            return;
        }
        if !self.merge.may_send(sendable, now_us) {
            self.sendable = sendable;
            return;
        }
        let mut records = Vec::with_capacity(sendable.div_ceil(MAX_PAYLOAD_BYTES));
        let start = self.offset;
        let mut left = sendable;
        let mut at = 0;
        while left > 0 {
            let n = left.min(MAX_PAYLOAD_BYTES);
            let rec = Record {
                kind: Kind::Stream,
                replid: self.replid.clone(),
                start: self.offset,
                end: self.offset + n as u64,
                payload: self.pending[at..at + n].to_vec(),
                writer: self.writer,
            };
            records.push(rec.encode());
            self.offset += n as u64;
            at += n;
            left -= n;
        }
        self.pending.drain(..sendable);
        self.cuts.take(sendable as u64);
        assert_eq!(self.offset, start + sendable as u64);
        let records = Arc::new(records);
        out.push(Action::Append { records: records.clone(), expect_last_seq: self.last_seq, attempt: 1 });
        self.inflight = Some(InFlight {
            records,
            expect_last_seq: self.last_seq,
            bytes: sendable,
            end: self.offset,
            since_us: now_us,
            attempt: 1,
            retry_at_us: None,
            full_since_us: None,
        });
    }

    fn append_young(&self, now_us: u64) -> bool {
        self.inflight.as_ref().is_some_and(|f| now_us < f.since_us + READ_DURING_APPEND_AFTER_US)
    }

    fn may_read(&self, now_us: u64) -> bool {
        !self.ack_waits_for_renewal && self.pending.len() < self.limits.max_buffered_bytes && !self.append_young(now_us)
    }

    fn wake_at(&self, now_us: u64) -> Option<u64> {
        let mut at = self.next_renew_us.min(self.next_replconf_us);
        if self.sendable > 0 {
            if let Some(t) = self.merge.deadline_us() {
                at = at.min(t);
            }
        }
        if let Some(f) = &self.inflight {
            if self.append_young(now_us) {
                at = at.min(f.since_us + READ_DURING_APPEND_AFTER_US);
            }
            if let Some(t) = f.retry_at_us {
                at = at.min(t);
            }
        }
        Some(at)
    }
}

/// The tick after `prev` of a cadence of `period_us`; a cadence that fell
/// behind (a paused process) resumes from now instead of firing in a burst.
fn next_tick(prev: u64, period_us: u64, now_us: u64) -> u64 {
    let next = prev + period_us.max(1);
    if next <= now_us { now_us + period_us.max(1) } else { next }
}

/// When the next append may leave after a confirmation (see the module
/// doc). Pure: fed sizes and times (µs), it answers whether to send.
///
/// A wait that runs out (the answered clients did not write again in time:
/// the load is not a closed loop) makes the next confirmations skip waiting,
/// 1, 2, 4… up to `MERGE_MAX_BACKOFF` of them; a wait that fills resets
/// that. So a load that never comes back pays the wait about once per 64
/// appends, and a closed loop pays it only until its groups have merged.
#[derive(Debug)]
struct Merge {
    max_wait_us: u64,
    /// Until when, and for how many pending bytes, the next append waits.
    wait: Option<(u64, usize)>,
    /// Confirmations left to send on without waiting.
    skip: u32,
    /// What `skip` becomes after the next wait that runs out (0: 1).
    backoff: u32,
}

impl Merge {
    fn new(max_wait_us: u64) -> Merge {
        Merge { max_wait_us, wait: None, skip: 0, backoff: 0 }
    }

    /// An append of `confirmed_bytes` was confirmed while `pending_bytes`
    /// were waiting.
    fn confirmed(&mut self, confirmed_bytes: usize, pending_bytes: usize, now_us: u64) {
        if self.max_wait_us == 0 {
            return;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return;
        }
        // Writes rarely come back byte for byte: 90% of last time is enough.
        let target = ((confirmed_bytes + pending_bytes) * 9 / 10).min(MAX_PAYLOAD_BYTES);
        self.wait = Some((now_us + self.max_wait_us, target));
    }

    /// Whether an append of the `pending_bytes` may leave now.
    fn may_send(&mut self, pending_bytes: usize, now_us: u64) -> bool {
        let Some((until, target)) = self.wait else { return true };
        if pending_bytes >= target {
            self.backoff = 0;
        } else if now_us >= until {
            self.backoff = (self.backoff * 2).clamp(1, MERGE_MAX_BACKOFF);
            self.skip = self.backoff;
        } else {
            return false;
        }
        self.wait = None;
        true
    }

    #[cfg(test)]
    fn waiting(&self) -> bool {
        self.wait.is_some()
    }

    /// When the current wait ends, if one is on.
    fn deadline_us(&self) -> Option<u64> {
        self.wait.map(|(until, _)| until)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MS: u64 = 1_000;

    fn limits() -> Limits {
        Limits {
            lease_ms: 900,
            drift_margin_ms: 90,
            max_buffered_bytes: 64 << 20,
            merge_wait_us: 0,
            replconf_ack_ms: 1_000,
            retry_pause_ms: 50,
        }
    }

    fn set(key: &str) -> Vec<u8> {
        crate::resp::encode_command(&[b"SET", key.as_bytes(), b"v"])
    }

    fn appends(s: &Step) -> Vec<(u64, u32, usize)> {
        s.actions
            .iter()
            .filter_map(|a| match a {
                Action::Append { records, expect_last_seq, attempt } => Some((*expect_last_seq, *attempt, records.len())),
                _ => None,
            })
            .collect()
    }

    fn acks(s: &Step) -> Vec<u64> {
        s.actions.iter().filter_map(|a| if let Action::Ack(o) = a { Some(*o) } else { None }).collect()
    }

    fn writer() -> Option<Writer> {
        Writer::new("valkey", [9, 1, 0], 80)
    }

    fn started() -> Leader {
        let (mut l, s) = Leader::start(limits(), "a".repeat(40), writer(), 100, 7, 0, 1, 0);
        assert!(matches!(s.actions[..], [Action::Lease(810), Action::Ack(100)]), "{:?}", s.actions);
        // The first renewal leaves at once; answer it.
        let s = l.handle(Event::Timer, 0);
        assert!(s.actions.iter().any(|a| matches!(a, Action::StartRenewal)));
        l.handle(Event::RenewalDone, MS);
        l
    }

    #[test]
    fn a_write_is_acked_after_its_append_is_confirmed() {
        let mut l = started();
        let cmd = set("k");
        let s = l.handle(Event::Bytes(&cmd), 2 * MS);
        assert_eq!(appends(&s), vec![(7, 1, 1)]);
        assert!(acks(&s).is_empty());
        assert!(!s.read, "the link waits while a young append is out");
        assert_eq!(s.wake_at_us, Some(2 * MS + READ_DURING_APPEND_AFTER_US));
        let s = l.handle(Event::Appended(AppendOutcome::Confirmed { last_seq: 8 }), 3 * MS);
        assert_eq!(acks(&s), vec![100 + cmd.len() as u64]);
        assert!(s.read);
    }

    #[test]
    fn every_record_names_the_server_s_engine() {
        let mut l = started();
        // Bigger than one record: the append carries several.
        let big = crate::resp::encode_command(&[b"SET", b"k", &vec![b'x'; 2 * MAX_PAYLOAD_BYTES]]);
        let s = l.handle(Event::Bytes(&big), 2 * MS);
        let Some(Action::Append { records, .. }) = s.actions.iter().find(|a| matches!(a, Action::Append { .. })) else { panic!("{:?}", s.actions) };
        assert_eq!(records.len(), 3);
        for r in records.iter() {
            assert_eq!(Record::decode(r).unwrap().writer, writer());
        }
    }

    #[test]
    fn half_a_command_waits_for_the_rest() {
        let mut l = started();
        let cmd = set("key");
        let s = l.handle(Event::Bytes(&cmd[..5]), 2 * MS);
        assert!(appends(&s).is_empty());
        let s = l.handle(Event::Bytes(&cmd[5..]), 2 * MS);
        assert_eq!(appends(&s), vec![(7, 1, 1)]);
    }

    #[test]
    fn bytes_arriving_during_an_append_form_the_next_one() {
        let mut l = started();
        l.handle(Event::Bytes(&set("a")), 2 * MS);
        let s = l.handle(Event::Bytes(&[set("b"), set("c")].concat()), 3 * MS);
        assert!(appends(&s).is_empty(), "one append in flight");
        let s = l.handle(Event::Appended(AppendOutcome::Confirmed { last_seq: 8 }), 4 * MS);
        assert_eq!(appends(&s), vec![(8, 1, 1)], "b and c go together");
        let s = l.handle(Event::Appended(AppendOutcome::Confirmed { last_seq: 9 }), 5 * MS);
        assert_eq!(acks(&s), vec![100 + 3 * set("a").len() as u64]);
    }

    #[test]
    fn an_unknown_outcome_is_resent_the_same_after_the_pause() {
        let mut l = started();
        l.handle(Event::Bytes(&set("a")), 2 * MS);
        let s = l.handle(Event::Appended(AppendOutcome::Unknown("timeout".into())), 3 * MS);
        assert!(appends(&s).is_empty() && acks(&s).is_empty());
        assert_eq!(s.wake_at_us, Some(3 * MS + 50 * MS).min(Some(2 * MS + READ_DURING_APPEND_AFTER_US)));
        l.handle(Event::Timer, 22 * MS);
        let s = l.handle(Event::Timer, 53 * MS);
        assert_eq!(appends(&s), vec![(7, 2, 1)], "same records, same expect_last_seq");
        let s = l.handle(Event::Appended(AppendOutcome::StreamFull("full".into())), 54 * MS);
        assert_eq!(s.wake_at_us, Some(54 * MS + STREAM_FULL_RETRY_MS * MS));
        let s = l.handle(Event::Timer, 154 * MS);
        assert_eq!(appends(&s), vec![(7, 3, 1)]);
        let s = l.handle(Event::Appended(AppendOutcome::Confirmed { last_seq: 8 }), 155 * MS);
        assert_eq!(acks(&s).len(), 1);
    }

    #[test]
    fn fenced_tells_the_module_then_stops() {
        for outcome in [AppendOutcome::Fenced("f".into()), AppendOutcome::Overtaken("o".into())] {
            let mut l = started();
            l.handle(Event::Bytes(&set("a")), 2 * MS);
            let s = l.handle(Event::Appended(outcome), 3 * MS);
            assert!(matches!(&s.actions[..], [Action::Fenced(_), Action::Stop(Stop::Fenced(_) | Stop::Overtaken(_))]), "{:?}", s.actions);
        }
        let mut l = started();
        l.handle(Event::Bytes(&set("a")), 2 * MS);
        let s = l.handle(Event::Appended(AppendOutcome::Refused("bad".into())), 3 * MS);
        assert!(matches!(&s.actions[..], [Action::Stop(Stop::Fatal(_))]), "no KEEL.FENCED for a refusal: {:?}", s.actions);
        let mut l = started();
        l.handle(Event::ControlAnswered(4), 2 * MS);
        let s = l.handle(Event::Timer, 300 * MS);
        assert!(s.actions.iter().any(|a| matches!(a, Action::StartRenewal)));
        let s = l.handle(Event::RenewalFenced("gone".into()), 301 * MS);
        assert!(matches!(&s.actions[..], [Action::Fenced(_), Action::Stop(Stop::Fenced(_))]), "{:?}", s.actions);
    }

    #[test]
    fn renewals_follow_the_cadence_while_redis_answers() {
        let mut l = started(); // the last lease notice is command 4
        l.handle(Event::ControlAnswered(4), 2 * MS);
        let s = l.handle(Event::Timer, 300 * MS);
        assert!(s.actions.iter().any(|a| matches!(a, Action::StartRenewal)));
        let s = l.handle(Event::Timer, 600 * MS);
        assert!(!s.actions.iter().any(|a| matches!(a, Action::StartRenewal)), "one renewal at a time");
        let s = l.handle(Event::RenewalDone, 601 * MS);
        assert!(matches!(s.actions[..], [Action::Lease(1110)]), "sent at 300: {:?}", s.actions);
        // Redis never answers that notice: the next tick still renews (an
        // answer may come), the one after a whole period does not.
        let s = l.handle(Event::Timer, 900 * MS);
        assert!(s.actions.iter().any(|a| matches!(a, Action::StartRenewal)));
        l.handle(Event::RenewalFailed("slow".into()), 901 * MS);
        let s = l.handle(Event::Timer, 1200 * MS);
        assert!(!s.actions.iter().any(|a| matches!(a, Action::StartRenewal)), "Redis is silent: the lease lapses");
        l.handle(Event::ControlAnswered(5), 1201 * MS);
        let s = l.handle(Event::Timer, 1500 * MS);
        assert!(s.actions.iter().any(|a| matches!(a, Action::StartRenewal)));
    }

    #[test]
    fn a_confirmation_after_the_lease_lapsed_waits_for_a_renewal() {
        let mut l = started(); // lease until 810 ms
        l.handle(Event::ControlAnswered(4), 2 * MS);
        l.handle(Event::Bytes(&set("a")), 5 * MS);
        // The process was paused: no tick ran, the lease lapsed.
        let s = l.handle(Event::Appended(AppendOutcome::Confirmed { last_seq: 8 }), 2_000 * MS);
        assert!(acks(&s).is_empty());
        assert_eq!(s.actions.iter().filter(|a| matches!(a, Action::StartRenewal)).count(), 1);
        let s = l.handle(Event::Bytes(&set("b")), 2_001 * MS);
        assert!(appends(&s).is_empty(), "nothing leaves before the ack");
        let s = l.handle(Event::RenewalDone, 2_002 * MS);
        assert!(matches!(s.actions[..], [Action::Lease(_), Action::Ack(_), Action::Append { .. }]), "{:?}", s.actions);
    }

    #[test]
    fn replconf_ack_reports_the_durable_offset() {
        let mut l = started();
        l.handle(Event::Bytes(&set("a")), 2 * MS);
        let s = l.handle(Event::Timer, 1_000 * MS);
        assert!(s.actions.iter().any(|a| matches!(a, Action::ReplconfAck(100))), "{:?}", s.actions);
    }

    #[test]
    fn a_refused_control_command_or_a_closed_link_stops() {
        let mut l = started();
        let s = l.handle(Event::ControlRefused("NOPERM".into()), 2 * MS);
        assert!(matches!(&s.actions[..], [Action::Stop(Stop::Retry(_))]));
        let mut l = started();
        let s = l.handle(Event::LinkClosed("closed".into()), 2 * MS);
        assert!(matches!(&s.actions[..], [Action::Stop(Stop::Retry(_))]));
    }

    #[test]
    fn reading_pauses_when_the_buffer_is_full() {
        let mut l = started();
        l.limits.max_buffered_bytes = MAX_PAYLOAD_BYTES;
        // One command bigger than the buffer and one append: it is split.
        let big = crate::resp::encode_command(&[b"SET", b"k", &vec![b'x'; 3 * MAX_PAYLOAD_BYTES]]);
        let s = l.handle(Event::Bytes(&big), 2 * MS);
        assert_eq!(appends(&s), vec![(7, 1, 1)]);
        assert!(!s.read);
        let s = l.handle(Event::Timer, 30 * MS);
        assert!(!s.read, "the buffer is still full");
    }

    /// A simulated journal and Redis: random events in a valid order.
    #[derive(Debug, Clone)]
    enum Sim {
        Write(u8),
        Confirm,
        Unknown,
        Full,
        Fail,
        RenewOk,
        RenewFail,
        Answer,
        Advance(u16),
    }

    fn sim() -> impl Strategy<Value = Sim> {
        prop_oneof![
            4 => any::<u8>().prop_map(Sim::Write),
            3 => Just(Sim::Confirm),
            1 => Just(Sim::Unknown),
            1 => Just(Sim::Full),
            1 => Just(Sim::RenewOk),
            1 => Just(Sim::RenewFail),
            1 => Just(Sim::Answer),
            2 => any::<u16>().prop_map(Sim::Advance),
            1 => Just(Sim::Fail),
        ]
    }

    proptest! {
        /// Whatever the journal answers and whenever: acks are monotonic and
        /// never beyond a confirmed append's end; appends are contiguous and
        /// resent unchanged; at most one append and one renewal are out; an
        /// append that did not land acknowledges nothing.
        #[test]
        fn acks_follow_confirmations(steps in prop::collection::vec(sim(), 1..200), merge_wait_us in prop::sample::select(vec![0u64, 500, 5_000])) {
            let mut lim = limits();
            lim.merge_wait_us = merge_wait_us;
            let (mut l, first) = Leader::start(lim, "a".repeat(40), writer(), 0, 0, 0, 0, 0);
            let mut now = 0u64;
            let mut confirmed_end = 0u64;
            let mut last_ack = 0u64;
            let mut out: Option<(u64, u64, u32)> = None; // (expect, count, attempt)
            let mut out_end = 0u64;
            let mut renewing = false;
            let mut written = 0u64;
            let mut steps_done = vec![first];
            let mut stopped = false;
            // An append sent and not answered yet; whether the last event
            // was an append that did not land.
            let mut unanswered = false;
            let mut failed = false;
            for ev in steps {
                for s in steps_done.drain(..) {
                    for a in &s.actions {
                        match a {
                            Action::Append { records, expect_last_seq, attempt } => {
                                prop_assert!(!unanswered, "one append in flight at a time");
                                unanswered = true;
                                match out {
                                    None => {
                                        prop_assert_eq!(*attempt, 1);
                                        let first = Record::decode(&records[0]).unwrap();
                                        let last = Record::decode(records.last().unwrap()).unwrap();
                                        prop_assert_eq!(first.start, confirmed_end, "each append continues the last confirmed one");
                                        prop_assert!(last.end > confirmed_end);
                                        out_end = last.end;
                                    }
                                    Some((e, n, at)) => {
                                        prop_assert_eq!((e, n, at + 1), (*expect_last_seq, records.len() as u64, *attempt), "a resend is the same append");
                                    }
                                }
                                out = Some((*expect_last_seq, records.len() as u64, *attempt));
                            }
                            Action::StartRenewal => {
                                prop_assert!(!renewing, "one renewal at a time");
                                renewing = true;
                            }
                            Action::Ack(o) => {
                                prop_assert!(!failed, "an append that did not land acknowledges nothing");
                                prop_assert!(*o >= last_ack, "acks are monotonic");
                                prop_assert!(*o <= confirmed_end, "ack {} beyond the confirmed end {}", o, confirmed_end);
                                last_ack = *o;
                            }
                            Action::Stop(_) => stopped = true,
                            Action::Lease(_) | Action::Fenced(_) | Action::ReplconfAck(_) => {}
                        }
                    }
                }
                if stopped {
                    break;
                }
                now += 100;
                failed = false;
                let s = match ev {
                    Sim::Write(k) => {
                        let cmd = set(&k.to_string());
                        written += cmd.len() as u64;
                        l.handle(Event::Bytes(&cmd), now)
                    }
                    Sim::Confirm | Sim::Unknown | Sim::Full | Sim::Fail => match out {
                        // A resend that has not left yet has no answer.
                        Some((e, n, _)) if l.inflight.as_ref().is_some_and(|f| f.retry_at_us.is_none()) => {
                            unanswered = false;
                            failed = !matches!(ev, Sim::Confirm);
                            let outcome = match ev {
                                Sim::Confirm => {
                                    out = None;
                                    confirmed_end = out_end;
                                    AppendOutcome::Confirmed { last_seq: e + n }
                                }
                                Sim::Unknown => AppendOutcome::Unknown("?".into()),
                                Sim::Full => AppendOutcome::StreamFull("full".into()),
                                _ => AppendOutcome::Refused("no".into()),
                            };
                            l.handle(Event::Appended(outcome), now)
                        }
                        _ => l.handle(Event::Timer, now),
                    },
                    Sim::RenewOk | Sim::RenewFail if renewing => {
                        renewing = false;
                        l.handle(if matches!(ev, Sim::RenewOk) { Event::RenewalDone } else { Event::RenewalFailed("x".into()) }, now)
                    }
                    Sim::Answer => {
                        let sent = l.control_sent();
                        l.handle(Event::ControlAnswered(sent), now)
                    }
                    Sim::Advance(us) => {
                        now += us as u64 * 20;
                        l.handle(Event::Timer, now)
                    }
                    _ => l.handle(Event::Timer, now),
                };
                if let Some(t) = s.wake_at_us {
                    prop_assert!(t > now, "everything due at {} was done; the next wake-up is later, not {}", now, t);
                }
                steps_done.push(s);
            }
            prop_assert!(confirmed_end <= written);
        }
    }

    #[test]
    fn a_lone_client_is_never_held_back() {
        let mut m = Merge::new(500);
        assert!(m.may_send(50, 0));
        m.confirmed(50, 0, 0);
        // Its next write is as large as the last one: it leaves at once.
        assert!(m.may_send(50, 30));
    }

    #[test]
    fn answered_clients_join_the_waiting_ones() {
        let mut m = Merge::new(500);
        // 25 writes confirmed while 25 others (1250 bytes) waited.
        m.confirmed(1250, 1250, 0);
        assert!(!m.may_send(1250, 0), "the waiting group alone does not leave");
        assert!(!m.may_send(2000, 100));
        assert!(m.may_send(2250, 200), "most of both groups leave together");
        assert!(!m.waiting());
    }

    #[test]
    fn the_wait_is_bounded() {
        let mut m = Merge::new(500);
        m.confirmed(5000, 0, 0);
        assert!(!m.may_send(10, 499));
        assert_eq!(m.deadline_us(), Some(500));
        assert!(m.may_send(10, 500));
    }

    #[test]
    fn waits_that_run_out_back_off_and_a_filled_one_resets() {
        let ms = 1_000;
        let mut m = Merge::new(ms);
        let mut waits = 0;
        // 200 confirmations whose clients never come back: the wait runs out
        // after 1, 2, 4 … 64 confirmations sent on at once.
        for i in 0..200u64 {
            let now = ms * (i * 3);
            m.confirmed(1000, 0, now);
            if m.waiting() {
                waits += 1;
                assert!(!m.may_send(10, now));
                assert!(m.may_send(10, now + ms));
            } else {
                assert!(m.may_send(10, now));
            }
        }
        assert_eq!(waits, 9, "waits at confirmations 0, 2, 5, 10, 19, 36, 69, 134, 199: {m:?}");
        // Once the skips are used up, a wait that fills resets the back-off.
        let mut now = ms * 1000;
        while !m.waiting() {
            m.confirmed(1000, 0, now);
            now += ms;
        }
        assert!(m.may_send(900, now));
        m.confirmed(1000, 0, now);
        assert!(m.waiting(), "no skip after a wait that filled");
    }

    #[test]
    fn zero_wait_never_holds_back() {
        let mut m = Merge::new(0);
        m.confirmed(5000, 5000, 0);
        assert!(!m.waiting());
        assert!(m.may_send(1, 0));
    }

    #[test]
    fn the_target_never_exceeds_one_record() {
        let mut m = Merge::new(500);
        m.confirmed(MAX_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES, 0);
        assert!(m.may_send(MAX_PAYLOAD_BYTES, 0));
    }
}
