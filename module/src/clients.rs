//! Blocked clients: one record per client the module has blocked, keyed by
//! one id (its blocked-client handle), whatever it waits for.
//!
//! Invariant: a client is in exactly one stage, and every index agrees with
//! its record: it is in the release order (`Holds`) if and only if it is
//! `Held`, in the key index (`Waiters`) if and only if it is `Waiting`, and
//! in the popped index if and only if it is `Held` after a pop.
//!
//! Life cycle of a blocked client:
//! - a write, a read of data not durable yet, an EXEC, or a blocking pop that
//!   found data at once: `hold(c, answer)` → **Held**;
//! - a blocking pop that found nothing: `wait(c, …)` → **Waiting** on its
//!   keys; a write of one makes it retry (`key_written`, `take_ready`):
//!   - it popped, and its reply must wait for durability: `popped(c, answer)`
//!     → **Held**, with a timer of its own (its command's timeout is not the
//!     write timeout);
//!   - it was answered at once, timed out, its client left, or its stream
//!     vanished: `stop_waiting(c)` → gone;
//! - a Held client leaves: released once durable (`end_turn`, `durable`,
//!   with its answer), timed out (`timed_out`, `popped_timed_out`), or
//!   failed (`fail_all`: fenced, role changed).
//!
//! Pure bookkeeping, no Redis: `hold.rs` and `blocking.rs` feed it.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;

use crate::holds::Holds;
use crate::waiters::Db;
use crate::waiters::WaiterId;
use crate::waiters::Waiters;

enum Stage<A, W> {
    /// A blocking pop waiting for data (`id` in the key index).
    Waiting { id: WaiterId, waiter: W },
    /// Its reply is kept until durable; `popped`: it was a blocking pop
    /// (the id its own timeout timer carries).
    Held { answer: A, popped: Option<WaiterId> },
}

/// What a timed-out client was.
#[derive(Debug, PartialEq, Eq)]
pub enum TimedOut<W> {
    /// Waiting for data: its command's own timeout.
    Waiting(W),
    /// Held for durability: the write timeout.
    Held,
    /// No record (answered otherwise already).
    Unknown,
}

/// Every blocked client failed at once.
#[derive(Debug, PartialEq, Eq)]
pub struct Failed<K, W> {
    /// Held replies, in the order they were held.
    pub held: Vec<K>,
    pub waiting: Vec<(K, W)>,
}

/// The module's blocked clients (`K`: client key, `A`: a held answer, `W`:
/// a waiting pop).
pub struct HeldClients<K, A, W> {
    records: HashMap<K, Stage<A, W>>,
    /// Release order of Held clients.
    holds: Holds<K>,
    /// Waiting clients by key.
    waiters: Waiters<K>,
    /// Held clients that popped, by the id their timer carries.
    popped: HashMap<WaiterId, K>,
}

impl<K, A, W> Default for HeldClients<K, A, W> {
    fn default() -> Self {
        HeldClients { records: HashMap::new(), holds: Holds::default(), waiters: Waiters::default(), popped: HashMap::new() }
    }
}

impl<K: Copy + Eq + Hash + Debug, A, W> HeldClients<K, A, W> {
    /// Replies held for durability.
    pub fn held_count(&self) -> usize {
        self.holds.len()
    }

    /// Pops waiting for data.
    pub fn waiting_count(&self) -> usize {
        self.waiters.len()
    }

    /// Whether any reply was held during the current turn.
    pub fn turn_has_writes(&self) -> bool {
        self.holds.turn_has_writes()
    }

    pub fn durable_offset(&self) -> u64 {
        self.holds.durable_offset()
    }

    /// Holds `answer` as the reply of a newly blocked client.
    pub fn hold(&mut self, c: K, answer: A) {
        // Cheap, and a second record would lose the first answer.
        assert!(!self.records.contains_key(&c), "client {c:?} blocked twice");
        self.records.insert(c, Stage::Held { answer, popped: None });
        self.holds.hold(c);
    }

    /// A newly blocked client waits for data on `keys` of `db`.
    pub fn wait(&mut self, c: K, waiter: W, db: Db, keys: Vec<Vec<u8>>) -> WaiterId {
        assert!(!self.records.contains_key(&c), "client {c:?} blocked twice");
        let id = self.waiters.add(c, db, keys);
        self.records.insert(c, Stage::Waiting { id, waiter });
        id
    }

    /// A key was written: whether some client waits on it (retry soon).
    pub fn key_written(&mut self, db: Db, key: &[u8]) -> bool {
        self.waiters.ready(db, key)
    }

    /// A whole database changed (`None`: all of them).
    pub fn db_changed(&mut self, db: Option<Db>) -> bool {
        self.waiters.ready_db(db)
    }

    /// The waiters of ready keys, oldest first.
    pub fn take_ready(&mut self) -> Vec<WaiterId> {
        self.waiters.take_ready()
    }

    /// A waiting client, by its waiter id: its key, pop and database.
    pub fn waiting(&self, id: WaiterId) -> Option<(K, &W, Db)> {
        let c = *self.waiters.get(id)?;
        match self.records.get(&c) {
            Some(Stage::Waiting { id: w, waiter }) if *w == id => Some((c, waiter, self.waiters.db_of(id)?)),
            _ => panic!("waiter {id} of client {c:?} has no waiting record"),
        }
    }

    /// A waiting client stops waiting (answered, timed out, left).
    pub fn stop_waiting(&mut self, c: K) -> Option<W> {
        let Some(Stage::Waiting { id, .. }) = self.records.get(&c) else { return None };
        let id = *id;
        let removed = self.waiters.remove(id);
        assert_eq!(removed, Some(c), "the key index lost waiter {id}");
        match self.records.remove(&c) {
            Some(Stage::Waiting { waiter, .. }) => Some(waiter),
            _ => unreachable!("checked above"),
        }
    }

    /// A waiting client popped data: its reply is held. Returns the id its
    /// own timeout timer must carry.
    pub fn popped(&mut self, c: K, answer: A) -> WaiterId {
        let Some(Stage::Waiting { id, .. }) = self.records.get(&c) else {
            panic!("client {c:?} popped without waiting");
        };
        let id = *id;
        assert_eq!(self.waiters.remove(id), Some(c), "the key index lost waiter {id}");
        self.records.insert(c, Stage::Held { answer, popped: Some(id) });
        self.holds.hold(c);
        self.popped.insert(id, c);
        id
    }

    /// The turn ended with the stream at `offset`: the replies already
    /// durable, with their answers.
    pub fn end_turn(&mut self, offset: u64) -> Vec<(K, A)> {
        let released = self.holds.end_turn(offset);
        self.take_answers(released)
    }

    /// The journal holds the stream up to `offset`: the released replies.
    pub fn durable(&mut self, offset: u64) -> Vec<(K, A)> {
        let released = self.holds.durable(offset);
        self.take_answers(released)
    }

    fn take_answers(&mut self, released: Vec<K>) -> Vec<(K, A)> {
        released
            .into_iter()
            .map(|c| match self.records.remove(&c) {
                Some(Stage::Held { answer, popped }) => {
                    if let Some(id) = popped {
                        self.popped.remove(&id);
                    }
                    (c, answer)
                }
                _ => panic!("released client {c:?} had no held reply"),
            })
            .collect()
    }

    /// The client's timeout fired (its command's own while it waits, the
    /// write timeout once held): it leaves; a held answer is dropped.
    pub fn timed_out(&mut self, c: K) -> TimedOut<W> {
        match self.records.get(&c) {
            None => TimedOut::Unknown,
            Some(Stage::Waiting { .. }) => TimedOut::Waiting(self.stop_waiting(c).expect("waiting")),
            Some(Stage::Held { .. }) => {
                self.drop_held(c);
                TimedOut::Held
            }
        }
    }

    /// A popped reply's own timer fired: the client, if it is still held.
    pub fn popped_timed_out(&mut self, id: WaiterId) -> Option<K> {
        let c = *self.popped.get(&id)?;
        self.drop_held(c);
        Some(c)
    }

    fn drop_held(&mut self, c: K) {
        let Some(Stage::Held { popped, .. }) = self.records.remove(&c) else { panic!("client {c:?} is not held") };
        if let Some(id) = popped {
            self.popped.remove(&id);
        }
        assert!(self.holds.remove(&c), "held client {c:?} was not in the release order");
    }

    /// Every blocked client fails (fenced, role changed).
    pub fn fail_all(&mut self) -> Failed<K, W> {
        let held = self.holds.fail_all();
        self.waiters.drain();
        self.popped.clear();
        let mut waiting = Vec::new();
        for (c, stage) in self.records.drain() {
            if let Stage::Waiting { waiter, .. } = stage {
                waiting.push((c, waiter));
            }
        }
        Failed { held, waiting }
    }

    /// A new tenure (role change): nothing is blocked any more, and the
    /// durable offset starts again from the next acknowledgement.
    pub fn new_tenure(&mut self) {
        assert!(self.records.is_empty(), "a new tenure with {} clients still blocked", self.records.len());
        self.holds = Holds::default();
    }

    /// Checks every index against the records (tests; O(clients)).
    #[cfg(test)]
    fn check(&self) {
        let mut held = 0;
        let mut waiting = 0;
        for (c, stage) in &self.records {
            match stage {
                Stage::Held { popped, .. } => {
                    held += 1;
                    if let Some(id) = popped {
                        assert_eq!(self.popped.get(id), Some(c));
                    }
                }
                Stage::Waiting { id, .. } => {
                    waiting += 1;
                    assert_eq!(self.waiters.get(*id), Some(c));
                }
            }
        }
        assert_eq!(self.holds.len(), held);
        assert_eq!(self.waiters.len(), waiting);
        assert!(self.popped.values().all(|c| matches!(self.records.get(c), Some(Stage::Held { popped: Some(_), .. }))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Clients = HeldClients<u32, &'static str, &'static str>;

    #[test]
    fn a_held_reply_leaves_once_durable_with_its_answer() {
        let mut h = Clients::default();
        h.hold(1, "+OK");
        h.hold(2, ":1");
        assert_eq!(h.held_count(), 2);
        assert!(h.turn_has_writes());
        assert!(h.end_turn(100).is_empty());
        assert_eq!(h.durable(100), vec![(1, "+OK"), (2, ":1")]);
        assert_eq!(h.durable_offset(), 100);
        assert_eq!(h.held_count(), 0);
        h.check();
        // The handle may be reused by a later client.
        h.hold(1, "+again");
        assert_eq!(h.end_turn(110), Vec::new());
        assert_eq!(h.durable(120), vec![(1, "+again")]);
    }

    #[test]
    #[should_panic(expected = "blocked twice")]
    fn a_client_is_held_once() {
        let mut h = Clients::default();
        h.hold(1, "a");
        h.hold(1, "b");
    }

    #[test]
    fn a_waiting_pop_that_pops_is_held_and_has_its_own_timer() {
        let mut h = Clients::default();
        let id = h.wait(5, "blpop l 0", 0, vec![b"l".to_vec()]);
        assert_eq!(h.waiting_count(), 1);
        assert!(!h.key_written(0, b"other"));
        assert!(h.key_written(0, b"l"));
        assert_eq!(h.take_ready(), vec![id]);
        assert_eq!(h.waiting(id), Some((5, &"blpop l 0", 0)));
        assert_eq!(h.popped(5, "*2"), id);
        h.check();
        assert_eq!((h.waiting_count(), h.held_count()), (0, 1));
        assert_eq!(h.waiting(id), None);
        h.end_turn(10);
        assert_eq!(h.durable(10), vec![(5, "*2")]);
        assert_eq!(h.popped_timed_out(id), None, "released: its timer finds nothing");
        h.check();
    }

    #[test]
    fn a_popped_reply_times_out_by_its_timer_or_its_commands_timeout() {
        let mut h = Clients::default();
        let a = h.wait(1, "a", 0, vec![b"k".to_vec()]);
        let b = h.wait(2, "b", 0, vec![b"k".to_vec()]);
        h.popped(1, "ra");
        h.popped(2, "rb");
        assert_eq!(h.popped_timed_out(a), Some(1));
        assert_eq!(h.timed_out(2), TimedOut::Held);
        assert_eq!(h.popped_timed_out(b), None);
        assert_eq!(h.timed_out(1), TimedOut::Unknown);
        h.check();
        h.end_turn(5);
        assert!(h.durable(5).is_empty());
    }

    #[test]
    fn a_waiter_stops_waiting_once() {
        let mut h = Clients::default();
        h.wait(1, "a", 0, vec![b"k".to_vec()]);
        h.wait(2, "b", 3, vec![b"k".to_vec()]);
        assert_eq!(h.stop_waiting(1), Some("a"));
        assert_eq!(h.stop_waiting(1), None);
        assert_eq!(h.timed_out(2), TimedOut::Waiting("b"));
        assert!(!h.key_written(0, b"k"), "nobody waits any more");
        h.hold(3, "x");
        assert_eq!(h.stop_waiting(3), None, "a held client is not waiting");
        h.check();
    }

    #[test]
    fn a_write_timeout_drops_the_held_answer() {
        let mut h = Clients::default();
        h.hold(1, "a");
        h.hold(2, "b");
        assert_eq!(h.timed_out(1), TimedOut::Held);
        h.end_turn(7);
        assert_eq!(h.durable(7), vec![(2, "b")]);
        h.check();
    }

    #[test]
    fn failing_all_empties_every_index() {
        let mut h = Clients::default();
        h.hold(1, "a");
        h.end_turn(10);
        h.hold(2, "b");
        h.wait(3, "w", 0, vec![b"k".to_vec()]);
        let p = h.wait(4, "p", 0, vec![b"k".to_vec()]);
        h.popped(4, "rp");
        let mut failed = h.fail_all();
        failed.held.sort();
        assert_eq!(failed, Failed { held: vec![1, 2, 4], waiting: vec![(3, "w")] });
        h.check();
        assert_eq!(h.popped_timed_out(p), None);
        assert!(!h.key_written(0, b"k"));
        h.new_tenure();
        assert_eq!(h.durable_offset(), 0);
        h.hold(9, "n");
        h.end_turn(1);
        assert_eq!(h.durable(1), vec![(9, "n")]);
    }

    #[test]
    fn a_database_change_wakes_its_waiters() {
        let mut h = Clients::default();
        let a = h.wait(1, "a", 2, vec![b"k".to_vec()]);
        assert!(!h.db_changed(Some(0)));
        assert!(h.db_changed(Some(2)));
        assert_eq!(h.take_ready(), vec![a]);
        assert!(h.db_changed(None));
    }

    #[test]
    fn random_histories_keep_every_index_in_step() {
        // A small deterministic generator: every operation on a handful of
        // clients, in many orders; the indexes are checked after each.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..2_000 {
            let mut h = Clients::default();
            let mut offset = 0;
            let mut ids = Vec::new();
            for _ in 0..30 {
                let c = next(4) as u32;
                match next(10) {
                    0 => {
                        if h.records.get(&c).is_none() {
                            h.hold(c, "r");
                        }
                    }
                    1 => {
                        if h.records.get(&c).is_none() {
                            ids.push(h.wait(c, "w", 0, vec![vec![c as u8]]));
                        }
                    }
                    2 => {
                        if matches!(h.records.get(&c), Some(Stage::Waiting { .. })) {
                            ids.push(h.popped(c, "p"));
                        }
                    }
                    3 => {
                        h.stop_waiting(c);
                    }
                    4 => {
                        h.timed_out(c);
                    }
                    5 => {
                        if let Some(&id) = ids.get(next(ids.len() as u64 + 1) as usize) {
                            h.popped_timed_out(id);
                        }
                    }
                    6 => {
                        offset += next(3);
                        h.end_turn(offset);
                    }
                    7 => {
                        h.durable(next(offset + 1));
                    }
                    8 => {
                        if next(5) == 0 {
                            h.fail_all();
                        }
                    }
                    _ => {
                        h.key_written(0, &[c as u8]);
                        for id in h.take_ready() {
                            assert!(h.waiting(id).is_some());
                        }
                    }
                }
                h.check();
            }
        }
    }
}
