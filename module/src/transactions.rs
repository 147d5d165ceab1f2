//! MULTI/EXEC and WATCH, kept by the module instead of Redis.
//!
//! Why: Redis refuses to block a client inside EXEC (`RM_BlockClient` answers
//! "Blocking module command called from transaction"), so a transaction run
//! by Redis's own EXEC could only answer before its writes are durable. The
//! module therefore keeps the transaction: `MULTI` opens it, commands are
//! queued here (`+QUEUED`), and `EXEC` runs them back to back inside one
//! module command, which Redis executes atomically and propagates wrapped in
//! MULTI/EXEC; its reply is then held like any write's.
//!
//! The invariant this file protects: **an EXEC runs only if no key its client
//! WATCHed was touched since the WATCH**, as Redis's own WATCH promises.
//! Touches are reported by the FFI layer from keyspace notifications (every
//! write notifies), FLUSHDB/FLUSHALL (keys that existed) and SWAPDB.
//!
//! Life cycle of one client's transaction:
//! 1. `watch` (only outside MULTI) remembers `(db, key)`; a touch marks the
//!    client dirty and forgets its watches (nothing more can change that).
//! 2. `multi` opens a transaction (`nested` error if one is open).
//! 3. `queue` adds a command; `queue_error` marks the transaction aborted
//!    (unknown command, wrong arity…), so EXEC answers EXECABORT.
//! 4. `exec` closes the transaction and forgets the watches: it returns the
//!    commands to run, or why nothing runs. `discard` closes it, too.
//! 5. `disconnected` forgets everything of a client.
//!
//! Redis may refuse a routed command before the module sees it (BUSY script,
//! OOM, ACL, MISCONF…). Natively that aborts the transaction; here the
//! filter reports each routed command (`routed`) and the module each one it
//! ran (`ran`): a routed command that never ran aborts its client's
//! transaction (an EXEC that never ran discards it), so a transaction never
//! runs with a command missing. Where the server cannot name the sender
//! (Redis 7.0), a refusal aborts every open transaction: a spurious
//! EXECABORT rather than half a transaction.
//!
//! Pure logic, no Redis.

use std::collections::HashMap;
use std::collections::HashSet;

pub type ClientId = u64;
pub type Db = i32;
/// A command as its arguments (name first).
pub type Argv = Vec<Vec<u8>>;

/// What `exec` decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Exec {
    /// EXEC without MULTI.
    NoMulti,
    /// A command failed to queue: nothing runs (EXECABORT).
    Aborted,
    /// A watched key was touched: nothing runs (null reply).
    WatchTouched,
    /// Run these, in order.
    Run(Vec<Argv>),
}

#[derive(Debug, Default)]
struct Tx {
    queued: Vec<Argv>,
    aborted: bool,
    queued_bytes: usize,
}

#[derive(Debug, Default)]
pub struct Transactions {
    open: HashMap<ClientId, Tx>,
    /// Watched key -> clients watching it.
    watchers: HashMap<(Db, Vec<u8>), HashSet<ClientId>>,
    /// Client -> the keys it watches.
    watching: HashMap<ClientId, Vec<(Db, Vec<u8>)>>,
    /// Clients whose watched keys were touched (until EXEC/DISCARD/UNWATCH).
    dirty: HashSet<ClientId>,
    /// Routed commands not yet run, by sender (value: it is an EXEC).
    awaiting: HashMap<ClientId, bool>,
    /// Sender unknown: the last routed command, not yet run (is it EXEC).
    awaiting_unknown: Option<bool>,
}

/// Who sent a routed command, as far as the server tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    Known(ClientId),
    Unknown,
}

/// Why a queue request was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum QueueError {
    /// The transaction holds too many bytes of commands; it is aborted.
    TooLarge,
}

impl Transactions {
    /// Whether `client` has an open MULTI.
    pub fn in_multi(&self, client: ClientId) -> bool {
        self.open.contains_key(&client)
    }

    /// Whether any client has an open MULTI.
    pub fn any_open(&self) -> bool {
        !self.open.is_empty()
    }

    /// Whether any key is watched (touches need reporting).
    pub fn any_watched(&self) -> bool {
        !self.watchers.is_empty()
    }

    /// Opens a transaction; false if one is already open (nested MULTI).
    pub fn multi(&mut self, client: ClientId) -> bool {
        if self.open.contains_key(&client) {
            return false;
        }
        self.open.insert(client, Tx::default());
        true
    }

    /// Queues a command. `max_bytes` bounds a transaction's queued size.
    pub fn queue(&mut self, client: ClientId, argv: Argv, max_bytes: usize) -> Result<(), QueueError> {
        let tx = self.open.get_mut(&client).expect("queue only inside MULTI");
        let size: usize = argv.iter().map(|a| a.len() + 16).sum();
        if tx.queued_bytes + size > max_bytes {
            tx.aborted = true;
            tx.queued.clear();
            return Err(QueueError::TooLarge);
        }
        tx.queued_bytes += size;
        tx.queued.push(argv);
        Ok(())
    }

    /// A command could not be queued: the transaction will not run.
    pub fn queue_error(&mut self, client: ClientId) {
        if let Some(tx) = self.open.get_mut(&client) {
            tx.aborted = true;
            tx.queued.clear();
        }
    }

    /// Closes the transaction and forgets the client's watches.
    pub fn exec(&mut self, client: ClientId) -> Exec {
        let Some(tx) = self.open.remove(&client) else {
            return Exec::NoMulti;
        };
        let touched = self.dirty.contains(&client);
        self.unwatch(client);
        if tx.aborted {
            Exec::Aborted
        } else if touched {
            Exec::WatchTouched
        } else {
            Exec::Run(tx.queued)
        }
    }

    /// Closes the transaction (false: none was open) and forgets watches.
    pub fn discard(&mut self, client: ClientId) -> bool {
        let was_open = self.open.remove(&client).is_some();
        if was_open {
            self.unwatch(client);
        }
        was_open
    }

    /// Watches keys of `db`. The caller refuses WATCH inside MULTI.
    pub fn watch(&mut self, client: ClientId, db: Db, keys: &[Vec<u8>]) {
        assert!(!self.in_multi(client), "WATCH inside MULTI must be refused by the caller");
        if self.dirty.contains(&client) {
            return; // EXEC fails anyway.
        }
        let list = self.watching.entry(client).or_default();
        for k in keys {
            let key = (db, k.clone());
            if list.contains(&key) {
                continue;
            }
            list.push(key.clone());
            self.watchers.entry(key).or_default().insert(client);
        }
    }

    /// Forgets the client's watches and its dirty mark.
    pub fn unwatch(&mut self, client: ClientId) {
        self.dirty.remove(&client);
        self.forget_watches(client);
    }

    fn forget_watches(&mut self, client: ClientId) {
        for key in self.watching.remove(&client).unwrap_or_default() {
            if let Some(set) = self.watchers.get_mut(&key) {
                set.remove(&client);
                if set.is_empty() {
                    self.watchers.remove(&key);
                }
            }
        }
    }

    /// A key was modified: its watchers' next EXEC fails.
    pub fn touched(&mut self, db: Db, key: &[u8]) {
        let Some(clients) = self.watchers.get(&(db, key.to_vec())) else {
            return;
        };
        let clients: Vec<ClientId> = clients.iter().copied().collect();
        for c in clients {
            self.dirty.insert(c);
            self.forget_watches(c);
        }
    }

    /// The watched keys of `db` (to check which exist before a flush).
    pub fn watched_in(&self, db: Option<Db>) -> Vec<(Db, Vec<u8>)> {
        self.watchers.keys().filter(|(d, _)| db.is_none_or(|want| *d == want)).cloned().collect()
    }

    /// The client is gone.
    pub fn disconnected(&mut self, client: ClientId) {
        self.open.remove(&client);
        self.awaiting.remove(&client);
        self.unwatch(client);
    }

    /// The filter sent a command to the module (before it runs). A command
    /// routed earlier by the same sender that never ran was refused by
    /// Redis: its transaction is aborted (discarded if it was the EXEC).
    pub fn routed(&mut self, sender: Sender, is_exec: bool) {
        match sender {
            Sender::Known(c) => {
                if let Some(was_exec) = self.awaiting.remove(&c) {
                    self.refused(c, was_exec);
                }
                if self.in_multi(c) {
                    self.awaiting.insert(c, is_exec);
                }
            }
            Sender::Unknown => {
                if let Some(was_exec) = self.awaiting_unknown.take() {
                    let open: Vec<ClientId> = self.open.keys().copied().collect();
                    if let [only] = open[..] {
                        // Only one transaction is open: the refused command was its.
                        self.refused(only, was_exec);
                    } else {
                        for c in open {
                            self.queue_error(c);
                        }
                    }
                }
                if self.any_open() {
                    self.awaiting_unknown = Some(is_exec);
                }
            }
        }
    }

    /// The module ran a routed command of `client`.
    pub fn ran(&mut self, client: ClientId) {
        self.awaiting.remove(&client);
        self.awaiting_unknown = None;
    }

    fn refused(&mut self, client: ClientId, was_exec: bool) {
        if was_exec {
            self.discard(client);
        } else {
            self.queue_error(client);
        }
    }

    /// Number of open transactions (for INFO).
    pub fn open_count(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(parts: &[&str]) -> Argv {
        parts.iter().map(|p| p.as_bytes().to_vec()).collect()
    }

    const MAX: usize = 1 << 20;

    #[test]
    fn queued_commands_run_in_order() {
        let mut t = Transactions::default();
        assert!(t.multi(1));
        assert!(!t.multi(1), "nested MULTI is refused");
        t.queue(1, argv(&["set", "a", "1"]), MAX).unwrap();
        t.queue(1, argv(&["incr", "a"]), MAX).unwrap();
        assert!(!t.in_multi(2));
        assert_eq!(t.exec(1), Exec::Run(vec![argv(&["set", "a", "1"]), argv(&["incr", "a"])]));
        assert!(!t.in_multi(1));
        assert_eq!(t.exec(1), Exec::NoMulti);
        assert!(!t.any_open());
    }

    #[test]
    fn a_queue_error_aborts_the_transaction() {
        let mut t = Transactions::default();
        t.multi(1);
        t.queue(1, argv(&["set", "a", "1"]), MAX).unwrap();
        t.queue_error(1);
        t.queue(1, argv(&["set", "b", "1"]), MAX).unwrap();
        assert_eq!(t.exec(1), Exec::Aborted);
        assert!(!t.in_multi(1), "an aborted EXEC clears the MULTI state");
    }

    #[test]
    fn oversize_transactions_abort() {
        let mut t = Transactions::default();
        t.multi(1);
        assert_eq!(t.queue(1, argv(&["set", "a", &"x".repeat(100)]), 64), Err(QueueError::TooLarge));
        assert_eq!(t.exec(1), Exec::Aborted);
    }

    #[test]
    fn a_touched_watch_fails_exec_only_for_its_watchers() {
        let mut t = Transactions::default();
        t.watch(1, 0, &[b"k".to_vec(), b"j".to_vec()]);
        t.watch(2, 0, &[b"j".to_vec()]);
        t.watch(3, 1, &[b"k".to_vec()]);
        t.touched(0, b"k");
        for c in [1, 2, 3] {
            t.multi(c);
        }
        assert_eq!(t.exec(1), Exec::WatchTouched);
        assert_eq!(t.exec(2), Exec::Run(vec![]));
        assert_eq!(t.exec(3), Exec::Run(vec![]), "a watch remembers its database");
        assert!(!t.any_watched(), "EXEC forgets watches");
    }

    #[test]
    fn exec_and_discard_and_unwatch_forget_watches() {
        let mut t = Transactions::default();
        t.watch(1, 0, &[b"k".to_vec()]);
        t.multi(1);
        assert_eq!(t.exec(1), Exec::Run(vec![]));
        t.touched(0, b"k");
        t.multi(1);
        assert_eq!(t.exec(1), Exec::Run(vec![]), "the key is no longer watched after EXEC");

        t.watch(1, 0, &[b"k".to_vec()]);
        t.touched(0, b"k");
        t.multi(1);
        assert!(t.discard(1));
        t.multi(1);
        assert_eq!(t.exec(1), Exec::Run(vec![]), "DISCARD clears the dirty mark");
        assert!(!t.discard(1));

        t.watch(1, 0, &[b"k".to_vec()]);
        t.touched(0, b"k");
        t.unwatch(1);
        t.multi(1);
        assert_eq!(t.exec(1), Exec::Run(vec![]), "UNWATCH clears the dirty mark");
    }

    #[test]
    fn disconnect_forgets_the_client() {
        let mut t = Transactions::default();
        t.watch(7, 0, &[b"k".to_vec()]);
        t.multi(7);
        t.queue(7, argv(&["ping"]), MAX).unwrap();
        t.disconnected(7);
        assert!(!t.any_open());
        assert!(!t.any_watched());
        assert!(t.watched_in(None).is_empty());
    }

    #[test]
    fn a_command_refused_before_the_module_aborts_its_transaction() {
        let mut t = Transactions::default();
        t.multi(1);
        t.multi(2);
        // Client 1's SET was routed and ran; its INCR was routed, refused.
        t.routed(Sender::Known(1), false);
        t.ran(1);
        t.queue(1, argv(&["set", "a", "1"]), MAX).unwrap();
        t.routed(Sender::Known(1), false);
        t.routed(Sender::Known(2), false);
        t.ran(2);
        t.queue(2, argv(&["set", "b", "1"]), MAX).unwrap();
        // The next command of client 1 reveals the refusal.
        t.routed(Sender::Known(1), true);
        t.ran(1);
        assert_eq!(t.exec(1), Exec::Aborted);
        assert_eq!(t.exec(2), Exec::Run(vec![argv(&["set", "b", "1"])]), "other clients are unaffected");

        // A refused EXEC discards the transaction.
        t.multi(1);
        t.routed(Sender::Known(1), true);
        t.routed(Sender::Known(1), false);
        assert!(!t.in_multi(1));
    }

    #[test]
    fn with_unknown_senders_a_refusal_aborts_every_open_transaction() {
        let mut t = Transactions::default();
        t.multi(1);
        t.multi(2);
        t.routed(Sender::Unknown, false);
        t.ran(1);
        t.queue(1, argv(&["set", "a", "1"]), MAX).unwrap();
        t.routed(Sender::Unknown, false); // refused
        t.routed(Sender::Unknown, true);
        t.ran(1);
        assert_eq!(t.exec(1), Exec::Aborted);
        assert_eq!(t.exec(2), Exec::Aborted);
        // With one transaction open, a refused EXEC is known to be its.
        t.multi(4);
        t.routed(Sender::Unknown, true);
        t.routed(Sender::Unknown, false);
        assert!(!t.in_multi(4));
        // Nothing open: nothing awaited, a later transaction is unaffected.
        t.routed(Sender::Unknown, false);
        t.multi(3);
        t.routed(Sender::Unknown, true);
        t.ran(3);
        assert_eq!(t.exec(3), Exec::Run(vec![]));
    }

    #[test]
    fn watched_in_filters_by_database() {
        let mut t = Transactions::default();
        t.watch(1, 0, &[b"a".to_vec()]);
        t.watch(2, 3, &[b"b".to_vec()]);
        assert_eq!(t.watched_in(Some(3)), vec![(3, b"b".to_vec())]);
        assert_eq!(t.watched_in(None).len(), 2);
    }

    /// Exhaustive over short histories of three clients on two keys: the
    /// fast structure answers EXEC exactly as a naive model does.
    #[test]
    fn matches_a_naive_model() {
        #[derive(Clone, Copy, Debug)]
        enum Op {
            Watch(u64, u8),
            Touch(u8),
            Multi(u64),
            Exec(u64),
            Discard(u64),
            Unwatch(u64),
        }
        let mut ops = Vec::new();
        for c in 1..=2u64 {
            ops.push(Op::Multi(c));
            ops.push(Op::Exec(c));
            ops.push(Op::Discard(c));
            ops.push(Op::Unwatch(c));
            for k in 0..2u8 {
                ops.push(Op::Watch(c, k));
            }
        }
        ops.push(Op::Touch(0));
        ops.push(Op::Touch(1));
        let n = ops.len();
        let len = 5;
        let mut history = vec![0usize; len];
        loop {
            let mut t = Transactions::default();
            // Naive model: per client, open?, watched keys, dirty?
            let mut open = [false; 3];
            let mut watched = [[false; 2]; 3];
            let mut dirty = [false; 3];
            for &i in &history {
                match ops[i] {
                    Op::Watch(c, k) => {
                        if !open[c as usize] {
                            t.watch(c, 0, &[vec![k]]);
                            if !dirty[c as usize] {
                                watched[c as usize][k as usize] = true;
                            }
                        }
                    }
                    Op::Touch(k) => {
                        t.touched(0, &[k]);
                        for c in 1..=2 {
                            if watched[c][k as usize] {
                                dirty[c] = true;
                                watched[c] = [false; 2];
                            }
                        }
                    }
                    Op::Multi(c) => {
                        assert_eq!(t.multi(c), !open[c as usize]);
                        open[c as usize] = true;
                    }
                    Op::Exec(c) => {
                        let want = if !open[c as usize] {
                            Exec::NoMulti
                        } else if dirty[c as usize] {
                            Exec::WatchTouched
                        } else {
                            Exec::Run(vec![])
                        };
                        let was_open = open[c as usize];
                        assert_eq!(t.exec(c), want, "{history:?}");
                        if was_open {
                            open[c as usize] = false;
                            dirty[c as usize] = false;
                            watched[c as usize] = [false; 2];
                        }
                    }
                    Op::Discard(c) => {
                        assert_eq!(t.discard(c), open[c as usize]);
                        if open[c as usize] {
                            open[c as usize] = false;
                            dirty[c as usize] = false;
                            watched[c as usize] = [false; 2];
                        }
                    }
                    Op::Unwatch(c) => {
                        t.unwatch(c);
                        dirty[c as usize] = false;
                        watched[c as usize] = [false; 2];
                    }
                }
            }
            // Advance the odometer.
            let mut i = 0;
            loop {
                if i == len {
                    return;
                }
                history[i] += 1;
                if history[i] < n {
                    break;
                }
                history[i] = 0;
                i += 1;
            }
        }
    }
}
