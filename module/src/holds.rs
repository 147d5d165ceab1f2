//! Held replies: the invariant of Keel's primary is that **no reply to a
//! write leaves before the replication offset covering that write is durable
//! in the journal**.
//!
//! Life cycle of a held reply:
//! 1. `hold(c)`: a write ran for client `c` during this event-loop turn; its
//!    reply is kept, the client is blocked.
//! 2. `end_turn(offset)`: in beforeSleep, after Redis propagated every effect
//!    of this turn, `master_repl_offset` covers all of them: every reply held
//!    this turn waits for that one offset (one target per turn = group commit).
//! 3. `durable(offset)`: the sidecar reports the journal holds the stream up
//!    to `offset`; every reply whose target is at most `offset` is released,
//!    in the order the writes ran.
//! 4. `fail_all()`: the journal fenced this node (or it stepped down): every
//!    held reply becomes an error; none is ever sent as a success.
//!
//! A reply can also leave by timeout (`remove`), as an error that says the
//! outcome is unknown. Pure logic, no Redis: the FFI layer in lib.rs feeds it.

use std::collections::VecDeque;

/// Decides when held replies may be released.
#[derive(Debug)]
pub struct Holds<T> {
    /// Held during the current turn; target not known yet.
    turn: Vec<T>,
    /// (target offset, client), targets non-decreasing.
    waiting: VecDeque<(u64, T)>,
    durable: u64,
    last_target: u64,
}

impl<T> Default for Holds<T> {
    fn default() -> Self {
        Holds { turn: Vec::new(), waiting: VecDeque::new(), durable: 0, last_target: 0 }
    }
}

impl<T: PartialEq> Holds<T> {
    /// Number of replies held (this turn and waiting).
    pub fn len(&self) -> usize {
        self.turn.len() + self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether any reply was held during the current turn.
    pub fn turn_has_writes(&self) -> bool {
        !self.turn.is_empty()
    }

    pub fn durable_offset(&self) -> u64 {
        self.durable
    }

    /// A write ran for `client` this turn.
    pub fn hold(&mut self, client: T) {
        self.turn.push(client);
    }

    /// The turn ended with the replication stream at `offset`. Returns the
    /// replies that are already durable (when the journal got ahead).
    pub fn end_turn(&mut self, offset: u64) -> Vec<T> {
        if self.turn.is_empty() {
            return Vec::new();
        }
        // Offsets never go back within one replication history (a role
        // change starts a new `Holds`). `u64::MAX` (no stream to be durable
        // in) is never reached by `durable` and is not remembered as a
        // target. One comparison: checked in release builds too.
        assert!(offset >= self.last_target, "replication offset went back: {offset} < {}", self.last_target);
        let target = offset.max(self.last_target);
        if target != u64::MAX {
            self.last_target = target;
        }
        for c in self.turn.drain(..) {
            self.waiting.push_back((target, c));
        }
        self.release()
    }

    /// The journal holds the stream up to `offset`; returns released replies.
    pub fn durable(&mut self, offset: u64) -> Vec<T> {
        // `u64::MAX` marks writes in no stream: no acknowledgement covers them.
        assert!(offset < u64::MAX, "durable offset u64::MAX would release writes that are in no stream");
        self.durable = self.durable.max(offset.min(u64::MAX - 1));
        self.release()
    }

    fn release(&mut self) -> Vec<T> {
        let mut out = Vec::new();
        while let Some((target, _)) = self.waiting.front() {
            if *target > self.durable {
                break;
            }
            let (target, c) = self.waiting.pop_front().unwrap();
            assert!(target <= self.durable, "releasing a reply before its offset is durable");
            out.push(c);
        }
        out
    }

    /// Removes one held reply (it timed out); true if it was held.
    pub fn remove(&mut self, client: &T) -> bool {
        if let Some(i) = self.turn.iter().position(|c| c == client) {
            self.turn.remove(i);
            return true;
        }
        if let Some(i) = self.waiting.iter().position(|(_, c)| c == client) {
            self.waiting.remove(i);
            return true;
        }
        false
    }

    /// Every held reply, to be answered with an error.
    pub fn fail_all(&mut self) -> Vec<T> {
        let mut out: Vec<T> = self.waiting.drain(..).map(|(_, c)| c).collect();
        out.append(&mut self.turn);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_released_before_its_turn_ends_and_is_durable() {
        let mut h = Holds::default();
        h.hold(1);
        h.hold(2);
        // The journal reports progress before the turn ended: nothing leaves,
        // the writes' offset is not known yet.
        assert!(h.durable(1_000).is_empty());
        assert_eq!(h.end_turn(1_100), Vec::<i32>::new());
        assert!(h.durable(1_099).is_empty());
        assert_eq!(h.durable(1_100), vec![1, 2]);
        assert!(h.is_empty());
    }

    #[test]
    fn writes_outside_any_stream_are_never_released() {
        let mut h = Holds::default();
        h.hold(1);
        assert!(h.end_turn(u64::MAX).is_empty());
        assert!(h.durable(1 << 40).is_empty());
        assert!(h.remove(&1));
        // A later turn with a real offset is not held back by it.
        h.hold(2);
        assert_eq!(h.end_turn(1 << 41), Vec::<i32>::new());
        assert_eq!(h.durable(1 << 41), vec![2]);
    }

    #[test]
    fn turns_release_in_order() {
        let mut h = Holds::default();
        h.hold(1);
        h.end_turn(10);
        h.hold(2);
        h.end_turn(20);
        h.hold(3);
        h.end_turn(30);
        assert_eq!(h.durable(25), vec![1, 2]);
        assert_eq!(h.durable(24), Vec::<i32>::new(), "durable never goes back");
        assert_eq!(h.durable(31), vec![3]);
    }

    #[test]
    fn a_turn_already_durable_is_released_at_its_end() {
        let mut h = Holds::default();
        h.durable(50);
        h.hold(7);
        assert_eq!(h.end_turn(40), vec![7]);
    }

    #[test]
    fn timeouts_and_fencing_remove_held_replies() {
        let mut h = Holds::default();
        h.hold(1);
        h.end_turn(10);
        h.hold(2);
        assert!(h.remove(&1));
        assert!(!h.remove(&1));
        h.hold(3);
        let mut failed = h.fail_all();
        failed.sort();
        assert_eq!(failed, vec![2, 3]);
        assert!(h.durable(100).is_empty());
    }

    #[test]
    fn exhaustive_small_histories_keep_the_invariant() {
        // Every interleaving of up to 6 events over 3 clients and offsets in
        // 0..4: a released reply's target is durable, each reply leaves once.
        #[derive(Clone, Copy, Debug)]
        enum Ev {
            Hold,
            End(u64),
            Durable(u64),
        }
        let events: Vec<Ev> = std::iter::once(Ev::Hold)
            .chain((0..4).map(Ev::End))
            .chain((0..4).map(Ev::Durable))
            .collect();
        let mut stack = vec![Vec::<Ev>::new()];
        let mut histories = 0;
        while let Some(hist) = stack.pop() {
            histories += 1;
            let mut h = Holds::default();
            let mut next_id = 0u32;
            let mut target_of = std::collections::HashMap::new();
            let mut pending_turn = Vec::new();
            let mut released = std::collections::HashSet::new();
            let mut end = 0u64;
            let mut durable = 0u64;
            for ev in &hist {
                let out = match *ev {
                    Ev::Hold => {
                        h.hold(next_id);
                        pending_turn.push(next_id);
                        next_id += 1;
                        vec![]
                    }
                    Ev::End(o) => {
                        end = end.max(o);
                        for c in pending_turn.drain(..) {
                            target_of.insert(c, end);
                        }
                        h.end_turn(end)
                    }
                    Ev::Durable(o) => {
                        durable = durable.max(o);
                        h.durable(o)
                    }
                };
                for c in out {
                    assert!(target_of[&c] <= durable, "{hist:?}: released {c} early");
                    assert!(released.insert(c), "{hist:?}: released {c} twice");
                }
            }
            // Everything whose target is durable has been released.
            for (c, t) in &target_of {
                if *t <= durable {
                    assert!(released.contains(c), "{hist:?}: {c} stuck");
                }
            }
            if hist.len() < 6 {
                for ev in &events {
                    let mut next = hist.clone();
                    next.push(*ev);
                    stack.push(next);
                }
            }
        }
        assert!(histories > 500_000);
    }
}
