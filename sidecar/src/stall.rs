//! A record the feeder cannot feed: the stall of a node's feed.
//!
//! A journal record that does not decode as a Keel record (record.rs), or
//! that `History` refuses as inconsistent with what came before (a gap, an
//! overlap, a second base), can never reach Redis: feeding it would give
//! the replica bytes the primary's Redis never produced. Reading it again
//! changes nothing, so the feed *stalls* at it:
//!
//! 1. met: the feeder stops at record `seq` (History stays at `seq - 1`); the
//!    first time a (seq, reason) is met it is news: logged once at error
//!    level with what the operator can do (`advice`), never at every retry;
//! 2. stalled: the feeder does not read that record again; a Redis
//!    connecting for a resync waits (its PSYNC is not answered) while the
//!    stall is checked every `STALL_RECHECK_MS`; the node tells its Redis
//!    (`KEEL.STALLED <seq> <reason>`, shown by `INFO keel`) and does not
//!    stand for election (node.rs): its Redis has not applied what the
//!    stream holds;
//! 3. passed: a published snapshot standing at or past `seq` covers the
//!    record (the journal may then be trimmed past it): the history starts
//!    over from that snapshot and the feed goes on (`KEEL.STALLED 0`).
//!    A restart of the sidecar forgets the stall and meets it again if the
//!    record is still there.
//!
//! Nothing here repairs the stream: a snapshot cannot be built past a record
//! no feeder can read (the snapshotter replays the journal with this same
//! feeder), so the operator decides (docs/security.md, "A record no node
//! can read").

/// How often a stalled feed looks whether a snapshot now covers the record.
pub const STALL_RECHECK_MS: u64 = 1_000;
/// Longest reason kept (it is shown in `INFO keel`).
pub const MAX_REASON_BYTES: usize = 200;

/// Where the feed stopped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stalled {
    pub seq: u64,
    pub reason: String,
}

/// The stall of one feeder; plain state fed events.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stall {
    at: Option<Stalled>,
}

impl Stall {
    /// Record `seq` could not be fed, for `reason`. True when this is news
    /// (a stall not met before): log it then, and only then.
    pub fn met(&mut self, seq: u64, reason: &str) -> bool {
        let reason = one_line(reason);
        if self.at.as_ref().is_some_and(|s| s.seq == seq && s.reason == reason) {
            return false;
        }
        assert!(seq > 0, "record seqs start at 1");
        self.at = Some(Stalled { seq, reason });
        true
    }

    /// A snapshot standing at record `snapshot_seq` is published: when it
    /// covers the stalled record, the stall is over (true: the history
    /// must start over from that snapshot).
    pub fn covered_by(&mut self, snapshot_seq: u64) -> bool {
        match &self.at {
            Some(s) if snapshot_seq >= s.seq => {
                self.at = None;
                true
            }
            _ => false,
        }
    }

    pub fn at(&self) -> Option<&Stalled> {
        self.at.as_ref()
    }
}

/// `reason` on one line, at most `MAX_REASON_BYTES` (on a char boundary):
/// fit for an `INFO` field and a log line.
pub fn one_line(reason: &str) -> String {
    let mut s: String = reason.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if s.len() > MAX_REASON_BYTES {
        let mut cut = MAX_REASON_BYTES;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// What the operator can do about a stall at record `seq` of `stream`.
pub fn advice(stream: &str, seq: u64) -> String {
    format!(
        "record {seq} of {stream} is not a Keel record this node can feed: the feed stopped at it and this node will not \
         become primary; no node can read past it, so the stream has no primary until an operator acts: find who wrote it \
         (the journal takes appends from any process that names the leader), then restart the nodes on a new stream \
         (--stream) with the Redis that holds the most data as its first node (a new stream's base is that Redis's data); \
         a snapshot cannot be built past this record"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_is_news_once() {
        let mut s = Stall::default();
        assert_eq!(s.at(), None);
        assert!(s.met(4, "record is 6 bytes"));
        assert!(!s.met(4, "record is 6 bytes"), "the same record again is not news");
        assert!(!s.met(4, "record is 6 bytes"));
        assert_eq!(s.at(), Some(&Stalled { seq: 4, reason: "record is 6 bytes".into() }));
        assert!(s.met(4, "another reason"), "a different reason is news");
        assert!(s.met(9, "another reason"), "a different record is news");
    }

    #[test]
    fn only_a_snapshot_at_or_past_the_record_ends_it() {
        let mut s = Stall::default();
        assert!(!s.covered_by(100), "nothing to end");
        s.met(4, "x");
        assert!(!s.covered_by(3));
        assert!(s.at().is_some());
        assert!(s.covered_by(4));
        assert_eq!(s.at(), None);
        assert!(s.met(4, "x"), "met again after it ended: news again");
        assert!(s.covered_by(10));
    }

    #[test]
    fn reasons_fit_an_info_field() {
        assert_eq!(one_line("a\r\nb\tc"), "a  b c");
        let long = "é".repeat(MAX_REASON_BYTES);
        let s = one_line(&long);
        assert!(s.len() <= MAX_REASON_BYTES && s.chars().all(|c| c == 'é'));
        let mut st = Stall::default();
        st.met(1, "x\ny");
        assert_eq!(st.at().unwrap().reason, "x y");
        assert!(!st.met(1, "x\ny"), "compared after cleaning");
    }
}
