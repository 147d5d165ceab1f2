//! Lease decisions of a node, apart from I/O.
//!
//! The journal grants a lease to one node at a time and stamps its deadline
//! with the journal's clock (`deadline >= time the renewal was received +
//! lease_ms`). This node may therefore believe in its lease until
//! `sent_at + lease_ms - drift_margin_ms` on its own monotonic clock, where
//! `sent_at` is when the renewal request left: that is never later than the
//! journal's deadline while clocks run at the same rate within the margin.
//!
//! `Renewal` (the primary's side): renew every `lease_ms / 3`, but only
//! while the local Redis answers: a Redis that is paused (SIGSTOP) or gone
//! must let the lease lapse, so a replica can take over; when it wakes up
//! it finds its lease deadline already past and serves nothing.
//!
//! `Candidate` (a replica's side): try to take the lease once the journal's
//! deadline plus a per-node backoff has passed, and only when this node
//! has applied every record (the journal refuses a lagging candidate too),
//! and never while its feed is stalled on a record it cannot read
//! (stall.rs): its Redis has not applied what the stream holds, however the
//! counts look (a stream without a base, say, counts as caught up).

/// The primary's renewal bookkeeping.
#[derive(Debug, Clone)]
pub struct Renewal {
    pub lease_ms: u64,
    pub drift_margin_ms: u64,
    /// When the last lease notice was sent to Redis, if it is unanswered.
    unanswered_since_ms: Option<u64>,
}

impl Renewal {
    pub fn new(lease_ms: u64, drift_margin_ms: u64) -> Renewal {
        assert!(drift_margin_ms < lease_ms, "the drift margin must be shorter than the lease");
        Renewal { lease_ms, drift_margin_ms, unanswered_since_ms: None }
    }

    /// How often to renew.
    pub fn period_ms(&self) -> u64 {
        (self.lease_ms / 3).max(1)
    }

    /// Whether to renew now: not while Redis leaves a lease notice
    /// unanswered for longer than a renewal period.
    pub fn may_renew(&self, now_ms: u64) -> bool {
        match self.unanswered_since_ms {
            None => true,
            Some(t) => now_ms.saturating_sub(t) < self.period_ms(),
        }
    }

    /// The journal renewed a request sent at `sent_at_ms`: the deadline to
    /// tell Redis (monotonic ms).
    pub fn renewed(&mut self, sent_at_ms: u64, now_ms: u64) -> u64 {
        if self.unanswered_since_ms.is_none() {
            self.unanswered_since_ms = Some(now_ms);
        }
        sent_at_ms + self.lease_ms - self.drift_margin_ms
    }

    /// Redis answered every lease notice sent so far.
    pub fn redis_answered(&mut self) {
        self.unanswered_since_ms = None;
    }
}

/// What the journal says about the stream, as a candidate sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamView {
    pub leader: String,
    pub deadline_unix_ms: u64,
    pub last_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Ask again after this long.
    Wait { ms: u64, why: &'static str },
    /// Ask the journal for the lease, as caught up to this seq.
    Take { caught_up_seq: u64 },
}

/// A replica's election rules.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub me: String,
    pub lease_ms: u64,
    /// Extra wait after the deadline, different per node so candidates
    /// rarely collide (the journal decides anyway).
    pub backoff_ms: u64,
    pub poll_ms: u64,
}

impl Candidate {
    /// `applied_seq`: the last record the local Redis has applied;
    /// `stalled`: this node's feed stopped at a record it cannot read.
    pub fn step(&self, view: &StreamView, applied_seq: u64, stalled: bool, now_unix_ms: u64) -> Step {
        if stalled {
            return Step::Wait { ms: self.poll_ms, why: "the feed is stalled at a record this node cannot read" };
        }
        if applied_seq < view.last_seq {
            return Step::Wait { ms: self.poll_ms, why: "catching up" };
        }
        if view.leader == self.me {
            // Our own lease (a restart of this sidecar): take it back at once.
            return Step::Take { caught_up_seq: view.last_seq };
        }
        let open_at = if view.leader.is_empty() { 0 } else { view.deadline_unix_ms + self.backoff_ms };
        if now_unix_ms < open_at {
            return Step::Wait { ms: (open_at - now_unix_ms).min(self.poll_ms), why: "the lease is held" };
        }
        Step::Take { caught_up_seq: view.last_seq }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_believed_deadline_never_passes_the_journals() {
        // The journal's deadline is at least receive time + lease; receive
        // time is at least send time.
        for lease in [100u64, 1000, 5000] {
            for margin in [0, lease / 10, lease - 1] {
                let mut r = Renewal::new(lease, margin);
                for sent in [0u64, 7, 1000] {
                    for delay in [0u64, 3, 500] {
                        let journal_deadline = sent + delay + lease;
                        let ours = r.renewed(sent, sent + delay);
                        assert!(ours + margin <= journal_deadline);
                        r.redis_answered();
                    }
                }
            }
        }
    }

    #[test]
    fn a_silent_redis_lets_the_lease_lapse() {
        let mut r = Renewal::new(900, 90);
        assert!(r.may_renew(0));
        r.renewed(0, 1);
        assert!(r.may_renew(200), "an answer may still come");
        assert!(!r.may_renew(301), "Redis did not answer for a whole period");
        r.redis_answered();
        assert!(r.may_renew(302));
    }

    fn cand() -> Candidate {
        Candidate { me: "me".into(), lease_ms: 1000, backoff_ms: 100, poll_ms: 250 }
    }

    #[test]
    fn only_a_caught_up_candidate_after_expiry_and_backoff_tries() {
        let c = cand();
        let v = StreamView { leader: "old".into(), deadline_unix_ms: 10_000, last_seq: 50 };
        assert_eq!(c.step(&v, 49, false, 20_000), Step::Wait { ms: 250, why: "catching up" });
        assert_eq!(c.step(&v, 50, false, 9_000), Step::Wait { ms: 250, why: "the lease is held" });
        assert_eq!(c.step(&v, 50, false, 10_050), Step::Wait { ms: 50, why: "the lease is held" });
        assert_eq!(c.step(&v, 50, false, 10_100), Step::Take { caught_up_seq: 50 });
        let mine = StreamView { leader: "me".into(), ..v.clone() };
        assert_eq!(c.step(&mine, 50, false, 0), Step::Take { caught_up_seq: 50 });
        let nobody = StreamView { leader: String::new(), ..v };
        assert_eq!(c.step(&nobody, 50, false, 0), Step::Take { caught_up_seq: 50 });
    }

    #[test]
    fn a_stalled_candidate_never_tries() {
        let c = cand();
        let stalled = Step::Wait { ms: 250, why: "the feed is stalled at a record this node cannot read" };
        for leader in ["", "me", "old"] {
            for applied in [0, 49, 50, 51] {
                for now in [0, 10_100, u64::MAX / 2] {
                    let v = StreamView { leader: leader.into(), deadline_unix_ms: 10_000, last_seq: 50 };
                    assert_eq!(c.step(&v, applied, true, now), stalled, "leader {leader:?}, applied {applied}, now {now}");
                }
            }
        }
    }
}
