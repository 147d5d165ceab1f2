//! Read hazards: a read must not answer with data that is not durable yet.
//!
//! Every key a held write touched is *pending* until the journal covers the
//! write's offset. A read that touches a pending key runs at once but its
//! reply is held like a write's (it waits for the end of the current turn,
//! whose offset covers every earlier write). Reads of other keys pass
//! through untouched: when nothing is pending, checking costs one branch.
//!
//! Keys are tracked by name across databases (a read of `k` in db 2 may wait
//! for a write of `k` in db 0: a harmless extra wait). A write with no keys
//! (FLUSHALL, SWAPDB, FUNCTION LOAD…) makes every read wait until it is
//! durable. Keys are reported both from the command's key arguments and
//! from Redis's keyspace notifications, so writes a script makes to keys it
//! did not declare, and expiry deletions, are hazards too. Pure logic; fed
//! by the FFI layer.

use std::collections::HashMap;
use std::collections::VecDeque;

/// The offset of writes whose turn has not ended yet.
const THIS_TURN: u64 = u64::MAX;

#[derive(Debug, Default)]
pub struct Hazards {
    /// Pending key -> target offset (THIS_TURN until the turn ends).
    keys: HashMap<Vec<u8>, u64>,
    /// Keys written this turn.
    turn: Vec<Vec<u8>>,
    /// (target, key) in target order, to forget keys once durable.
    expiry: VecDeque<(u64, Vec<u8>)>,
    /// A keyless write is pending until this offset (THIS_TURN: this turn).
    global: Option<u64>,
    /// The journal holds the stream up to here.
    durable: u64,
}

impl Hazards {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.global.is_none()
    }

    /// A held write touched `keys` (none: it may touch anything).
    pub fn write(&mut self, keys: Vec<Vec<u8>>) {
        if keys.is_empty() {
            self.global = Some(THIS_TURN);
            return;
        }
        for k in keys {
            self.keys.insert(k.clone(), THIS_TURN);
            self.turn.push(k);
        }
    }

    /// Whether a key was written during the current turn.
    pub fn turn_has_writes(&self) -> bool {
        !self.turn.is_empty() || self.global == Some(THIS_TURN)
    }

    /// Whether a read of `keys` must be held (no keys: only a pending
    /// keyless write holds it).
    pub fn must_wait(&self, keys: &[&[u8]]) -> bool {
        self.global.is_some() || keys.iter().any(|k| self.keys.contains_key(*k))
    }

    /// The turn ended at `offset`: this turn's writes get it as target.
    pub fn end_turn(&mut self, offset: u64) {
        for k in self.turn.drain(..) {
            // A later write of the same key in this turn already set THIS_TURN.
            if self.keys.get(&k) == Some(&THIS_TURN) {
                self.keys.insert(k.clone(), offset);
                self.expiry.push_back((offset, k));
            }
        }
        if self.global == Some(THIS_TURN) {
            self.global = Some(offset);
        }
        // A turn that wrote nothing new is durable already.
        self.durable(self.durable);
    }

    /// The journal holds everything up to `offset`.
    pub fn durable(&mut self, offset: u64) {
        self.durable = self.durable.max(offset);
        while let Some((target, _)) = self.expiry.front() {
            if *target > offset {
                break;
            }
            let (target, k) = self.expiry.pop_front().unwrap();
            // Only forget the key if no later write re-armed it.
            if self.keys.get(&k) == Some(&target) {
                self.keys.remove(&k);
            }
        }
        if matches!(self.global, Some(t) if t != THIS_TURN && t <= offset) {
            self.global = None;
        }
    }

    /// Everything pending is void (the node was fenced).
    pub fn clear(&mut self) {
        *self = Hazards::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_pending_until_its_write_is_durable() {
        let mut h = Hazards::default();
        assert!(h.is_empty());
        h.write(vec![b"k".to_vec()]);
        assert!(h.must_wait(&[b"k"]));
        assert!(!h.must_wait(&[b"other"]));
        h.end_turn(100);
        h.durable(99);
        assert!(h.must_wait(&[b"k"]));
        h.durable(100);
        assert!(!h.must_wait(&[b"k"]));
        assert!(h.is_empty());
    }

    #[test]
    fn a_rewrite_keeps_the_key_pending_until_the_later_write() {
        let mut h = Hazards::default();
        h.write(vec![b"k".to_vec()]);
        h.end_turn(10);
        h.write(vec![b"k".to_vec()]);
        h.durable(10);
        assert!(h.must_wait(&[b"k"]), "the second write is not durable");
        h.end_turn(20);
        h.durable(15);
        assert!(h.must_wait(&[b"k"]));
        h.durable(20);
        assert!(h.is_empty());
    }

    #[test]
    fn keyless_writes_hold_every_read() {
        let mut h = Hazards::default();
        h.write(vec![]);
        assert!(h.must_wait(&[b"anything"]));
        assert!(h.must_wait(&[]));
        h.end_turn(5);
        h.durable(4);
        assert!(h.must_wait(&[]));
        h.durable(5);
        assert!(!h.must_wait(&[b"anything"]));
    }

    #[test]
    fn a_turn_ending_at_a_durable_offset_leaves_nothing_pending() {
        let mut h = Hazards::default();
        h.durable(50);
        h.write(vec![b"k".to_vec()]);
        h.write(vec![]);
        h.end_turn(50);
        assert!(h.is_empty(), "no later acknowledgement will come for an offset already durable");
    }

    #[test]
    fn a_durable_report_before_the_turn_ends_frees_nothing() {
        let mut h = Hazards::default();
        h.write(vec![b"k".to_vec()]);
        h.write(vec![]);
        h.durable(1_000_000);
        assert!(h.must_wait(&[b"k"]));
        assert!(h.must_wait(&[]));
    }
}
