//! The journal's decisions: what each command does to the streams.
//!
//! Invariants this file protects, for every stream:
//! - records are numbered 1, 2, 3… with no gap and no reuse; `last_seq` only
//!   grows, `first_seq` (the oldest retained record) only grows;
//! - an append is applied only if its writer is the stream's current leader
//!   (fencing): a deposed leader can never add a record;
//! - the leader changes only by compare-and-set (`SetLeader`) or by taking an
//!   expired lease while caught up (`TakeLease`), so at most one writer wins;
//! - time comes only from `stamp_unix_ms` written by the Raft leader into the
//!   entry; the journal clock is the largest stamp seen and never goes back;
//! - `retained_bytes` is exactly the payload of `first_seq..=last_seq`: an
//!   append adds its bytes, a trim subtracts the dropped prefix's bytes,
//!   which the Raft leader stamps into the `Trim` (`upto_bytes`, read from its
//!   record store) and `apply` checks against what it knows.
//!
//! `Streams::apply` is a pure function of (state, command): every node applies
//! the same entries in the same order and reaches the same state. No I/O here:
//! record payloads are not part of this state; `apply_with` says what to do
//! to the record store (`Effect`, done by `state_machine.rs` via `records.rs`).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::Serialize;

use crate::types::Command;
use crate::types::Outcome;
use crate::types::Payload;

/// Largest single record.
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// Largest total payload of one append (shared with the clients).
pub use keel_journal_client::limits::MAX_APPEND_BYTES;
/// Most records in one append.
pub const MAX_APPEND_RECORDS: usize = 65_536;
/// Longest stream name or meta key.
pub const MAX_NAME_BYTES: usize = 256;
/// Largest meta value.
pub const MAX_META_VALUE_BYTES: usize = 64 << 10;
/// Most meta keys per stream.
pub const MAX_META_KEYS: usize = 256;
/// Last-resort cap on a stream's untrimmed payload, decided in `apply` (the
/// same on every node whatever its flags). The room users meet first is the
/// per-node `--stream-quota-bytes`, checked by the Raft leader before it
/// proposes an append (`admit_append`); it may not exceed this.
pub const MAX_RETAINED_BYTES_PER_STREAM: u64 = 64 << 30;
/// Lease length given by `SetLeader` when the stream never had a lease.
pub const DEFAULT_LEASE_MS: u64 = 1_000;
/// Longest lease a candidate may ask for.
pub const MAX_LEASE_MS: u64 = 60_000;

/// One stream's state (its records live in the record store).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stream {
    /// Names the stream's record files; assigned at creation, never reused.
    pub id: u64,
    /// Current leader uuid; empty when none.
    pub leader: String,
    pub lease_deadline_unix_ms: u64,
    pub lease_ms: u64,
    /// The oldest retained seq; `last_seq + 1` when no record is retained.
    pub first_seq: u64,
    pub last_seq: u64,
    /// Payload bytes of seqs `first_seq..=last_seq`.
    pub retained_bytes: u64,
    /// Payload bytes of seqs `1..=last_seq` (trimmed or not).
    pub appended_bytes: u64,
    pub meta: BTreeMap<String, Payload>,
}

impl Stream {
    fn new(id: u64) -> Stream {
        Stream { id, first_seq: 1, lease_ms: DEFAULT_LEASE_MS, ..Default::default() }
    }

    fn check_invariants(&self) {
        assert!(self.first_seq <= self.last_seq + 1, "first_seq {} past last_seq {} + 1", self.first_seq, self.last_seq);
        assert!(self.retained_bytes <= self.appended_bytes);
        // Records are never empty: each retained one holds at least a byte.
        assert!(self.retained_bytes >= self.last_seq + 1 - self.first_seq);
    }
}

/// What applying a command does to the record store, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect<'c> {
    /// Store `records` as seqs `first_seq..` of stream `id`, after
    /// `cum_before` bytes appended before them.
    Append { id: u64, first_seq: u64, cum_before: u64, records: &'c [Payload] },
    /// Stream `id` no longer holds seqs below `first_seq`.
    Trim { id: u64, first_seq: u64 },
}

/// All streams, plus the journal clock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Streams {
    /// The largest `stamp_unix_ms` applied so far.
    pub clock_unix_ms: u64,
    pub streams: BTreeMap<String, Stream>,
    /// The id the next new stream gets.
    pub next_stream_id: u64,
}

/// Validation shared by the gRPC layer (before proposing) and `apply`.
pub fn validate(cmd: &Command) -> Result<(), String> {
    fn name(what: &str, s: &str) -> Result<(), String> {
        if s.is_empty() {
            return Err(format!("{what} must not be empty"));
        }
        if s.len() > MAX_NAME_BYTES {
            return Err(format!("{what} is {} bytes; the limit is {MAX_NAME_BYTES}", s.len()));
        }
        Ok(())
    }
    fn uuid(what: &str, s: &str, allow_empty: bool) -> Result<(), String> {
        if s.is_empty() && allow_empty {
            return Ok(());
        }
        uuid::Uuid::parse_str(s).map(|_| ()).map_err(|e| format!("{what} {s:?} is not a uuid: {e}"))
    }
    match cmd {
        Command::Append { stream, leader, records, .. } => {
            name("stream", stream)?;
            uuid("leader_uuid", leader, false)?;
            if records.is_empty() {
                return Err("append carries no records".into());
            }
            if records.len() > MAX_APPEND_RECORDS {
                return Err(format!("append carries {} records; the limit is {MAX_APPEND_RECORDS}", records.len()));
            }
            let mut total = 0usize;
            for (i, r) in records.iter().enumerate() {
                if r.is_empty() {
                    return Err(format!("record {i} is empty; records must carry at least one byte"));
                }
                if r.len() > MAX_RECORD_BYTES {
                    return Err(format!("record {i} is {} bytes; the limit is {MAX_RECORD_BYTES}", r.len()));
                }
                total += r.len();
            }
            if total > MAX_APPEND_BYTES {
                return Err(format!("append is {total} bytes; the limit is {MAX_APPEND_BYTES}"));
            }
        }
        Command::SetLeader { stream, new, expected_old, .. } => {
            name("stream", stream)?;
            uuid("new_uuid", new, true)?;
            uuid("expected_old", expected_old, true)?;
        }
        Command::TakeLease { stream, candidate, lease_ms, .. } => {
            name("stream", stream)?;
            uuid("candidate_uuid", candidate, false)?;
            if *lease_ms == 0 || *lease_ms > MAX_LEASE_MS {
                return Err(format!("lease_ms {lease_ms} is out of range 1..={MAX_LEASE_MS}"));
            }
        }
        Command::RenewLease { stream, uuid: u, .. } => {
            name("stream", stream)?;
            uuid("uuid", u, false)?;
        }
        Command::Trim { stream, .. } => name("stream", stream)?,
        Command::Batch(cmds) => {
            if cmds.iter().any(|c| matches!(c, Command::Batch(_))) {
                return Err("a batch must not contain a batch".into());
            }
        }
        Command::CasMeta { stream, key, value, .. } => {
            name("stream", stream)?;
            name("key", key)?;
            if value.len() > MAX_META_VALUE_BYTES {
                return Err(format!("meta value is {} bytes; the limit is {MAX_META_VALUE_BYTES}", value.len()));
            }
        }
    }
    Ok(())
}

/// Admission control for an append of `add` bytes to a stream holding
/// `retained_bytes` untrimmed bytes, with `in_flight_bytes` of earlier appends
/// admitted but not applied yet: refused (with what the stream holds,
/// counting those in flight) when the total would exceed `quota_bytes`.
///
/// Decided by the Raft leader before proposing, never in `apply`: the quota
/// is a per-node flag, and nodes with different flags must apply the same.
pub fn admit_append(retained_bytes: u64, in_flight_bytes: u64, add: u64, quota_bytes: u64) -> Result<(), u64> {
    let held = retained_bytes.saturating_add(in_flight_bytes);
    if held.saturating_add(add) > quota_bytes {
        return Err(held);
    }
    Ok(())
}

fn show(bytes: Option<&Payload>) -> String {
    match bytes {
        None => "<absent>".into(),
        Some(b) => String::from_utf8_lossy(b).into_owned(),
    }
}

impl Streams {
    /// Applies one command; the outcome says what happened. (Effects on the
    /// record store are dropped: for tests of the decisions alone.)
    pub fn apply(&mut self, cmd: &Command) -> Outcome {
        self.apply_with(cmd, &mut Vec::new())
    }

    fn create(&mut self, stream: &str) -> &mut Stream {
        if !self.streams.contains_key(stream) {
            let id = self.next_stream_id;
            self.next_stream_id += 1;
            self.streams.insert(stream.to_string(), Stream::new(id));
        }
        self.streams.get_mut(stream).unwrap()
    }

    /// Applies one command, pushing what it does to the record store onto
    /// `effects`; the outcome says what happened.
    pub fn apply_with<'c>(&mut self, cmd: &'c Command, effects: &mut Vec<Effect<'c>>) -> Outcome {
        if let Err(reason) = validate(cmd) {
            return Outcome::Invalid { reason };
        }
        match cmd {
            // Each command of a batch is validated and applied on its own:
            // one bad command does not fail its neighbours.
            Command::Batch(cmds) => Outcome::Batch(cmds.iter().map(|c| self.apply_with(c, effects)).collect()),
            Command::Append { stream, leader, records, expect_last_seq } => {
                let Some(s) = self.streams.get_mut(stream) else {
                    return Outcome::UnknownStream { stream: stream.clone() };
                };
                if s.leader != *leader {
                    return Outcome::Fenced { stream: stream.clone(), leader: s.leader.clone() };
                }
                if let Some(expect) = expect_last_seq {
                    if *expect != s.last_seq {
                        return Outcome::SeqMismatch { last_seq: s.last_seq };
                    }
                }
                let add: u64 = records.iter().map(|r| r.len() as u64).sum();
                if s.retained_bytes + add > MAX_RETAINED_BYTES_PER_STREAM {
                    return Outcome::StreamFull {
                        stream: stream.clone(),
                        retained_bytes: s.retained_bytes,
                        limit: MAX_RETAINED_BYTES_PER_STREAM,
                    };
                }
                effects.push(Effect::Append { id: s.id, first_seq: s.last_seq + 1, cum_before: s.appended_bytes, records });
                s.retained_bytes += add;
                s.appended_bytes += add;
                s.last_seq += records.len() as u64;
                s.check_invariants();
                Outcome::Appended { last_seq: s.last_seq }
            }
            Command::SetLeader { stream, new, expected_old, stamp_unix_ms } => {
                let now = self.tick(*stamp_unix_ms);
                let current = self.streams.get(stream).map(|s| s.leader.as_str()).unwrap_or("");
                if current != expected_old {
                    return Outcome::CasFailed { actual: current.to_string() };
                }
                let s = self.create(stream);
                let old = std::mem::replace(&mut s.leader, new.clone());
                s.lease_deadline_unix_ms = if new.is_empty() { 0 } else { now + s.lease_ms };
                Outcome::LeaderSet { old }
            }
            Command::TakeLease { stream, candidate, caught_up_seq, lease_ms, stamp_unix_ms } => {
                let now = self.tick(*stamp_unix_ms);
                let s = match self.streams.contains_key(stream) {
                    true => self.streams.get_mut(stream).unwrap(),
                    false if *caught_up_seq == 0 => self.create(stream),
                    false => return Outcome::UnknownStream { stream: stream.clone() },
                };
                if !s.leader.is_empty() && s.leader != *candidate && now < s.lease_deadline_unix_ms {
                    return Outcome::LeaseHeld { leader: s.leader.clone(), deadline_unix_ms: s.lease_deadline_unix_ms };
                }
                if *caught_up_seq != s.last_seq {
                    return Outcome::NotCaughtUp { last_seq: s.last_seq };
                }
                s.leader = candidate.clone();
                s.lease_ms = *lease_ms;
                s.lease_deadline_unix_ms = now + lease_ms;
                Outcome::Lease { leader: s.leader.clone(), deadline_unix_ms: s.lease_deadline_unix_ms, last_seq: s.last_seq }
            }
            Command::RenewLease { stream, uuid, stamp_unix_ms } => {
                let now = self.tick(*stamp_unix_ms);
                let Some(s) = self.streams.get_mut(stream) else {
                    return Outcome::UnknownStream { stream: stream.clone() };
                };
                if s.leader != *uuid {
                    return Outcome::Fenced { stream: stream.clone(), leader: s.leader.clone() };
                }
                s.lease_deadline_unix_ms = s.lease_deadline_unix_ms.max(now + s.lease_ms);
                Outcome::Lease { leader: s.leader.clone(), deadline_unix_ms: s.lease_deadline_unix_ms, last_seq: s.last_seq }
            }
            Command::Trim { stream, upto_seq, upto_bytes } => {
                let Some(s) = self.streams.get_mut(stream) else {
                    return Outcome::UnknownStream { stream: stream.clone() };
                };
                if *upto_seq > s.last_seq {
                    return Outcome::Invalid {
                        reason: format!("cannot trim {stream} up to {upto_seq}: its last seq is {}", s.last_seq),
                    };
                }
                if *upto_seq < s.first_seq {
                    return Outcome::Trimmed { first_seq: s.first_seq };
                }
                // The bytes of 1..=upto_seq, stamped by the Raft leader: at
                // least those of the records already trimmed plus one per
                // dropped record, leaving at least one per record kept.
                let trimmed = s.appended_bytes - s.retained_bytes;
                let (dropped, kept) = (*upto_seq + 1 - s.first_seq, s.last_seq - *upto_seq);
                let fits = |b: u64| b >= trimmed + dropped && b <= s.appended_bytes - kept && (kept > 0 || b == s.appended_bytes);
                match upto_bytes {
                    Some(b) if fits(*b) => {
                        s.retained_bytes = s.appended_bytes - b;
                        s.first_seq = *upto_seq + 1;
                    }
                    _ => {
                        return Outcome::Invalid {
                            reason: format!("trim of {stream} up to {upto_seq} carries byte count {upto_bytes:?}, which does not fit the stream"),
                        }
                    }
                }
                effects.push(Effect::Trim { id: s.id, first_seq: s.first_seq });
                s.check_invariants();
                Outcome::Trimmed { first_seq: s.first_seq }
            }
            Command::CasMeta { stream, key, expected, value } => {
                let Some(s) = self.streams.get_mut(stream) else {
                    return Outcome::UnknownStream { stream: stream.clone() };
                };
                let current = s.meta.get(key);
                if current != expected.as_ref() {
                    return Outcome::CasFailed { actual: show(current) };
                }
                if current.is_none() && s.meta.len() >= MAX_META_KEYS {
                    return Outcome::Invalid { reason: format!("stream {stream} already has {MAX_META_KEYS} meta keys") };
                }
                s.meta.insert(key.clone(), value.clone());
                Outcome::MetaSet
            }
        }
    }

    /// Advances the journal clock to `stamp` (never backwards); returns it.
    fn tick(&mut self, stamp_unix_ms: u64) -> u64 {
        self.clock_unix_ms = self.clock_unix_ms.max(stamp_unix_ms);
        self.clock_unix_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "s1";

    fn id(n: u8) -> String {
        uuid::Uuid::from_bytes([n; 16]).to_string()
    }
    fn rec(s: &str) -> Payload {
        Payload::from(s.as_bytes().to_vec())
    }
    fn append(leader: &str, recs: &[&str]) -> Command {
        Command::Append {
            stream: S.into(),
            leader: leader.into(),
            records: recs.iter().map(|r| rec(r)).collect(),
            expect_last_seq: None,
        }
    }
    fn set_leader(new: &str, old: &str, t: u64) -> Command {
        Command::SetLeader { stream: S.into(), new: new.into(), expected_old: old.into(), stamp_unix_ms: t }
    }
    fn take(c: &str, seq: u64, lease: u64, t: u64) -> Command {
        Command::TakeLease { stream: S.into(), candidate: c.into(), caught_up_seq: seq, lease_ms: lease, stamp_unix_ms: t }
    }
    fn renew(c: &str, t: u64) -> Command {
        Command::RenewLease { stream: S.into(), uuid: c.into(), stamp_unix_ms: t }
    }

    /// The record store as the effects describe it: every record appended
    /// per stream id, and where each stream starts.
    #[derive(Default, Debug)]
    struct Store {
        recs: BTreeMap<u64, Vec<Payload>>,
        first: BTreeMap<u64, u64>,
    }

    impl Store {
        /// Applies `cmd` to `st` and its effects to this store.
        fn run(&mut self, st: &mut Streams, cmd: &Command) -> Outcome {
            let mut fx = Vec::new();
            let out = st.apply_with(cmd, &mut fx);
            for e in fx {
                match e {
                    Effect::Append { id, first_seq, cum_before, records } => {
                        let v = self.recs.entry(id).or_default();
                        assert_eq!(v.len() as u64 + 1, first_seq, "appends follow on");
                        assert_eq!(cum_before, v.iter().map(|r| r.len() as u64).sum::<u64>());
                        v.extend(records.iter().cloned());
                    }
                    Effect::Trim { id, first_seq } => {
                        assert!(first_seq >= self.first.get(&id).copied().unwrap_or(1), "trim went back");
                        self.first.insert(id, first_seq);
                    }
                }
            }
            out
        }

        /// The bytes of seqs 1..=upto of stream S, as the leader stamps them.
        fn upto_bytes(&self, st: &Streams, upto: u64) -> Option<u64> {
            let s = st.streams.get(S)?;
            if upto < s.first_seq || upto > s.last_seq {
                return None;
            }
            Some(self.recs[&s.id][..upto as usize].iter().map(|r| r.len() as u64).sum())
        }

        fn trim(&mut self, st: &mut Streams, upto: u64) -> Outcome {
            let cmd = Command::Trim { stream: S.into(), upto_seq: upto, upto_bytes: self.upto_bytes(st, upto) };
            self.run(st, &cmd)
        }

        /// The records of stream S from `from` on, as (seq, bytes).
        fn records(&self, st: &Streams, from: u64) -> Vec<(u64, Vec<u8>)> {
            let s = &st.streams[S];
            let first = self.first.get(&s.id).copied().unwrap_or(1);
            assert_eq!(first, s.first_seq, "the store starts where the state does");
            let all = self.recs.get(&s.id).cloned().unwrap_or_default();
            assert_eq!(all.len() as u64, s.last_seq, "the store ends where the state does");
            (from.max(first)..=s.last_seq).map(|q| (q, all[q as usize - 1].to_vec())).collect()
        }
    }

    #[test]
    fn append_to_unknown_stream_is_rejected() {
        let mut st = Streams::default();
        assert_eq!(st.apply(&append(&id(1), &["a"])), Outcome::UnknownStream { stream: S.into() });
    }

    #[test]
    fn only_the_leader_appends_and_seqs_are_dense() {
        let (mut st, mut store) = (Streams::default(), Store::default());
        assert_eq!(store.run(&mut st, &set_leader(&id(1), "", 10)), Outcome::LeaderSet { old: "".into() });
        assert_eq!(store.run(&mut st, &append(&id(1), &["a", "b"])), Outcome::Appended { last_seq: 2 });
        assert_eq!(store.run(&mut st, &append(&id(2), &["x"])), Outcome::Fenced { stream: S.into(), leader: id(1) });
        assert_eq!(store.run(&mut st, &append(&id(1), &["c"])), Outcome::Appended { last_seq: 3 });
        assert_eq!(store.records(&st, 1), vec![(1, b"a".to_vec()), (2, b"b".to_vec()), (3, b"c".to_vec())]);
    }

    #[test]
    fn set_leader_is_compare_and_set() {
        let mut st = Streams::default();
        st.apply(&set_leader(&id(1), "", 10));
        assert_eq!(st.apply(&set_leader(&id(2), "", 11)), Outcome::CasFailed { actual: id(1) });
        assert_eq!(st.apply(&set_leader(&id(2), &id(3), 11)), Outcome::CasFailed { actual: id(1) });
        assert_eq!(st.apply(&set_leader(&id(2), &id(1), 12)), Outcome::LeaderSet { old: id(1) });
        // The old leader is fenced from now on.
        assert!(matches!(st.apply(&append(&id(1), &["a"])), Outcome::Fenced { .. }));
    }

    #[test]
    fn lease_cannot_be_taken_while_live_and_can_after_expiry() {
        let mut st = Streams::default();
        assert!(matches!(st.apply(&take(&id(1), 0, 1000, 100)), Outcome::Lease { deadline_unix_ms: 1100, .. }));
        assert_eq!(
            st.apply(&take(&id(2), 0, 1000, 1099)),
            Outcome::LeaseHeld { leader: id(1), deadline_unix_ms: 1100 }
        );
        // Renewal by the holder extends it.
        assert!(matches!(st.apply(&renew(&id(1), 1099)), Outcome::Lease { deadline_unix_ms: 2099, .. }));
        assert!(matches!(st.apply(&take(&id(2), 0, 1000, 2098)), Outcome::LeaseHeld { .. }));
        // Renewal by anyone else is fenced.
        assert!(matches!(st.apply(&renew(&id(2), 1060)), Outcome::Fenced { .. }));
        // After expiry a caught-up candidate wins and fences the old one.
        assert!(matches!(st.apply(&take(&id(2), 0, 500, 2099)), Outcome::Lease { deadline_unix_ms: 2599, .. }));
        assert!(matches!(st.apply(&append(&id(1), &["late"])), Outcome::Fenced { .. }));
        assert!(matches!(st.apply(&renew(&id(1), 2100)), Outcome::Fenced { .. }));
        assert_eq!(st.apply(&append(&id(2), &["a"])), Outcome::Appended { last_seq: 1 });
    }

    #[test]
    fn lagging_candidate_cannot_take_the_lease() {
        let mut st = Streams::default();
        st.apply(&take(&id(1), 0, 100, 0));
        st.apply(&append(&id(1), &["a", "b"]));
        assert_eq!(st.apply(&take(&id(2), 1, 100, 1000)), Outcome::NotCaughtUp { last_seq: 2 });
        assert_eq!(st.apply(&take(&id(2), 3, 100, 1000)), Outcome::NotCaughtUp { last_seq: 2 });
        assert!(matches!(st.apply(&take(&id(2), 2, 100, 1000)), Outcome::Lease { .. }));
    }

    #[test]
    fn the_clock_never_goes_back() {
        let mut st = Streams::default();
        st.apply(&take(&id(1), 0, 100, 5000));
        // A stamp from a node whose clock is behind does not reopen the lease.
        assert!(matches!(st.apply(&take(&id(2), 0, 100, 1000)), Outcome::LeaseHeld { .. }));
        assert_eq!(st.clock_unix_ms, 5000);
    }

    #[test]
    fn trim_drops_prefix_and_keeps_seqs() {
        let (mut st, mut store) = (Streams::default(), Store::default());
        store.run(&mut st, &set_leader(&id(1), "", 0));
        store.run(&mut st, &append(&id(1), &["a", "bb", "ccc"]));
        // A byte count that cannot fit the stream (fewer than one byte per
        // dropped record, or leaving less than one per kept record) is
        // refused and nothing changes. Within those bounds the leader's
        // stamp is trusted, like its clock.
        for wrong in [None, Some(1), Some(6), Some(u64::MAX)] {
            let cmd = Command::Trim { stream: S.into(), upto_seq: 2, upto_bytes: wrong };
            assert!(matches!(store.run(&mut st, &cmd), Outcome::Invalid { .. }), "{wrong:?}");
        }
        assert_eq!(st.streams[S].first_seq, 1);
        assert_eq!(store.trim(&mut st, 2), Outcome::Trimmed { first_seq: 3 });
        assert_eq!(st.streams[S].retained_bytes, 3);
        assert_eq!(store.records(&st, 1), vec![(3, b"ccc".to_vec())]);
        // Trimming what is gone already changes nothing; past the end is invalid.
        assert_eq!(store.trim(&mut st, 1), Outcome::Trimmed { first_seq: 3 });
        assert!(matches!(store.trim(&mut st, 9), Outcome::Invalid { .. }));
        assert_eq!(store.run(&mut st, &append(&id(1), &["d"])), Outcome::Appended { last_seq: 4 });
        assert_eq!(store.trim(&mut st, 4), Outcome::Trimmed { first_seq: 5 });
        assert_eq!((st.streams[S].retained_bytes, st.streams[S].appended_bytes), (0, 7));
    }

    #[test]
    fn expect_last_seq_makes_retries_safe() {
        let mut st = Streams::default();
        st.apply(&set_leader(&id(1), "", 0));
        let cmd = Command::Append { stream: S.into(), leader: id(1), records: vec![rec("a")], expect_last_seq: Some(0) };
        assert_eq!(st.apply(&cmd), Outcome::Appended { last_seq: 1 });
        assert_eq!(st.apply(&cmd), Outcome::SeqMismatch { last_seq: 1 });
    }

    #[test]
    fn meta_is_compare_and_set() {
        let mut st = Streams::default();
        st.apply(&set_leader(&id(1), "", 0));
        let cas = |exp: Option<&str>, v: &str| Command::CasMeta {
            stream: S.into(),
            key: "addr".into(),
            expected: exp.map(rec),
            value: rec(v),
        };
        assert_eq!(st.apply(&cas(None, "a:1")), Outcome::MetaSet);
        assert_eq!(st.apply(&cas(None, "b:1")), Outcome::CasFailed { actual: "a:1".into() });
        assert_eq!(st.apply(&cas(Some("a:1"), "b:1")), Outcome::MetaSet);
    }

    #[test]
    fn bad_input_is_invalid_not_a_panic() {
        let mut st = Streams::default();
        st.apply(&set_leader(&id(1), "", 0));
        let bad = [
            append("not-a-uuid", &["a"]),
            append(&id(1), &[]),
            append(&id(1), &[""]),
            Command::Append {
                stream: S.into(),
                leader: id(1),
                records: vec![Payload::from(vec![0u8; MAX_RECORD_BYTES + 1])],
                expect_last_seq: None,
            },
            Command::Append { stream: "".into(), leader: id(1), records: vec![rec("a")], expect_last_seq: None },
            take(&id(2), 0, 0, 0),
            take(&id(2), 0, MAX_LEASE_MS + 1, 0),
            set_leader("zzz", "", 0),
        ];
        for cmd in bad {
            assert!(matches!(st.apply(&cmd), Outcome::Invalid { .. }), "{cmd:?}");
        }
        assert_eq!(st.streams[S].last_seq, 0);
    }

    #[test]
    fn a_batch_applies_each_command_in_order() {
        let mut st = Streams::default();
        let batch = Command::Batch(vec![
            set_leader(&id(1), "", 0),
            append(&id(1), &["a"]),
            append(&id(2), &["x"]),
            append("bad", &["y"]),
            append(&id(1), &["b"]),
        ]);
        let Outcome::Batch(out) = st.apply(&batch) else { panic!("a batch answers a batch") };
        assert_eq!(out.len(), 5);
        assert_eq!(out[0], Outcome::LeaderSet { old: "".into() });
        assert_eq!(out[1], Outcome::Appended { last_seq: 1 });
        assert_eq!(out[2], Outcome::Fenced { stream: S.into(), leader: id(1) });
        assert!(matches!(&out[3], Outcome::Invalid { reason } if reason.contains("not a uuid")));
        assert_eq!(out[4], Outcome::Appended { last_seq: 2 });
        assert!(matches!(st.apply(&Command::Batch(vec![Command::Batch(vec![])])), Outcome::Invalid { .. }));
    }

    #[test]
    fn admission_refuses_what_would_pass_the_quota() {
        assert_eq!(admit_append(0, 0, 100, 100), Ok(()));
        assert_eq!(admit_append(0, 0, 101, 100), Err(0));
        assert_eq!(admit_append(60, 0, 40, 100), Ok(()));
        assert_eq!(admit_append(60, 30, 20, 100), Err(90), "appends in flight count");
        assert_eq!(admit_append(100, 0, 1, 100), Err(100));
        assert_eq!(admit_append(u64::MAX - 1, 1, 1, u64::MAX - 1), Err(u64::MAX), "no overflow");
    }

    mod prop {
        use proptest::prelude::*;

        use super::*;

        fn any_cmd() -> impl Strategy<Value = Command> {
            let who = 0u8..3;
            prop_oneof![
                (who.clone(), proptest::collection::vec(1usize..4, 1..3), proptest::option::of(0u64..6)).prop_map(
                    |(w, lens, exp)| Command::Append {
                        stream: S.into(),
                        leader: id(w),
                        records: lens.into_iter().map(|n| Payload::from(vec![b'x'; n])).collect(),
                        expect_last_seq: exp,
                    }
                ),
                (who.clone(), who.clone(), 0u64..3000).prop_map(|(n, o, t)| set_leader(&id(n), &id(o), t)),
                (who.clone(), 0u64..6, 1u64..1000, 0u64..3000).prop_map(|(c, s, l, t)| take(&id(c), s, l, t)),
                (who, 0u64..3000).prop_map(|(c, t)| renew(&id(c), t)),
                // upto_bytes is a code here, replaced by the stamp the leader
                // would write (0, 1), or one that cannot fit: 0 bytes (2) or
                // more than ever appended (3).
                (0u64..8, 0u64..4).prop_map(|(u, k)| Command::Trim { stream: S.into(), upto_seq: u, upto_bytes: Some(k) }),
            ]
        }

        proptest! {
            /// Whatever the order, admitted appends never take a stream over
            /// its quota, and an append that fits is admitted.
            #[test]
            fn admission_keeps_the_stream_under_quota(quota in 0u64..10_000, adds in proptest::collection::vec(0u64..3_000, 0..40)) {
                let mut held = 0u64;
                for add in adds {
                    match admit_append(held, 0, add, quota) {
                        Ok(()) => held += add,
                        Err(h) => {
                            prop_assert_eq!(h, held);
                            prop_assert!(held + add > quota);
                        }
                    }
                    prop_assert!(held <= quota);
                }
            }

            #[test]
            fn invariants_hold_under_any_command_sequence(cmds in proptest::collection::vec(any_cmd(), 0..60)) {
                let (mut st, mut store) = (Streams::default(), Store::default());
                let mut last = 0u64;
                let mut first = 1u64;
                let mut clock = 0u64;
                let mut applied = Vec::new();
                for cmd in &cmds {
                    let mut skewed = false;
                    let cmd = match cmd {
                        Command::Trim { stream, upto_seq, upto_bytes: Some(k) } => {
                            let stamp = store.upto_bytes(&st, *upto_seq);
                            skewed = stamp.is_some() && *k >= 2;
                            let appended = st.streams.get(S).map(|s| s.appended_bytes).unwrap_or(0);
                            let upto_bytes = match k { 2 => stamp.map(|_| 0), 3 => stamp.map(|_| appended + 1), _ => stamp };
                            Command::Trim { stream: stream.clone(), upto_seq: *upto_seq, upto_bytes }
                        }
                        other => other.clone(),
                    };
                    let before = st.streams.get(S).cloned();
                    let out = store.run(&mut st, &cmd);
                    applied.push(cmd.clone());
                    let s = st.streams.get(S).cloned().unwrap_or_else(|| Stream::new(0));
                    prop_assert!(s.last_seq >= last, "last_seq went back");
                    prop_assert!(s.first_seq >= first, "first_seq went back");
                    prop_assert!(st.clock_unix_ms >= clock, "clock went back");
                    if st.streams.contains_key(S) {
                        let held = store.records(&st, 0);
                        prop_assert_eq!(s.first_seq + held.len() as u64, s.last_seq + 1);
                        prop_assert_eq!(s.retained_bytes, held.iter().map(|(_, r)| r.len() as u64).sum::<u64>());
                    }
                    // A trim whose byte count cannot fit never applies.
                    if skewed {
                        prop_assert!(matches!(out, Outcome::Invalid { .. }), "{:?} -> {:?}", cmd, out);
                    }
                    // Records change only through an accepted append by the leader, or a trim.
                    if s.last_seq != last {
                        let is_leader_append = matches!((&cmd, &before), (Command::Append { leader, .. }, Some(b)) if *leader == b.leader);
                        prop_assert!(is_leader_append, "records added by {:?} -> {:?}", cmd, out);
                    }
                    last = s.last_seq;
                    first = s.first_seq;
                    clock = st.clock_unix_ms;
                    // Applying the same history on another node gives the same state.
                }
                let mut replay = Streams::default();
                for cmd in &applied { replay.apply(cmd); }
                prop_assert_eq!(replay, st);
            }
        }
    }
}
