//! The module's state, behind one lock, and the rules for taking it.
//!
//! Lock discipline:
//! 1. `state()` is the only way to the state; its guard is held for a few
//!    statements, never across a call into Redis that can run commands or
//!    callbacks: `RM_Call` (`redis::Ctx::call`) runs a command whose
//!    keyspace notifications (`events::key_written`) and, during a busy
//!    script, other clients' filters lock the state themselves.
//! 2. The lock is not reentrant: locking it twice on one thread would
//!    deadlock the server.
//!
//! Both are asserted, in release builds too (a thread-local flag, one
//! branch): `state()` refuses a second lock, and `Ctx::call` refuses to run
//! while the lock is held. Calls that cannot run commands (replying,
//! blocking or unblocking a client, `RM_GetCommandKeys`, timers) may run
//! under the lock.

use std::cell::Cell;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::sync::OnceLock;

use crate::clients::HeldClients;
use crate::commands::CommandTable;
use crate::config::Config;
use crate::gate::Gate;
use crate::hazards::Hazards;
use crate::redis::Blocked;
use crate::secret::Rotation;
use crate::transactions::Transactions;

/// A blocking pop waiting for data (blocking.rs).
pub struct Waiter {
    /// The command, as it is retried (XREAD's `$` already resolved).
    pub argv: Vec<Vec<u8>>,
    pub write: bool,
    /// The client speaks RESP3 (retries run outside its context).
    pub resp3: bool,
    /// What the command answers when it times out (its null, in the
    /// client's protocol).
    pub null_reply: Vec<u8>,
}

/// What an unblocked client is answered with.
pub enum Answer {
    /// The reply's RESP bytes.
    Reply(Vec<u8>),
    Error(String),
    /// An error reply INFO errorstats already counted (see
    /// `wrappers::counted_error`): sent without counting it again.
    CountedError(Vec<u8>),
}

pub struct State {
    pub cfg: Config,
    /// Every client the module blocked: held replies and waiting pops, one
    /// record each (clients.rs).
    pub clients: HeldClients<Blocked, Answer, Waiter>,
    pub hazards: Hazards,
    /// Each client's last command a wrapper ran, for `CLIENT LIST`
    /// (view.rs).
    pub last_commands: crate::view::LastCommands,
    /// MULTI/EXEC and WATCH, kept by the module (see transactions.rs).
    pub txs: Transactions,
    /// What `COMMAND` says about every command (commands.rs).
    pub table: CommandTable,
    /// Role, lease and fence: whether data commands are served at all.
    pub gate: Gate,
    /// The journal stream and this node's leader uuid (from the sidecar).
    pub leader_uuid: String,
    pub stream: String,
    /// A replica: how far the journal reaches, as its sidecar last said.
    pub journal_offset: u64,
    /// The stream's published snapshot (seq, replication offset, creation
    /// time in Unix ms), as the sidecar last said; seq 0: none.
    pub snapshot: (u64, u64, u64),
    /// The record this node's feed stalled at and why, as the sidecar last
    /// said (seq 0: the feed is fine).
    pub stalled: (u64, String),
    /// A retry of waiting pops is scheduled (blocking.rs).
    pub retry_scheduled: bool,
    pub released_total: u64,
    pub timed_out_total: u64,
    /// Users may lack the wrappers (the module just loaded, or `ACL LOAD`
    /// ran): granted before the event loop sleeps (see acl.rs).
    pub acl_grant_pending: bool,
    /// Whether `replica-read-only` was checked (first beforeSleep).
    pub read_only_checked: bool,
    /// The highest `master_repl_offset` seen since the last role change:
    /// a `KEEL.ACK` up to it needs no look at INFO.
    pub produced_offset: u64,
    /// A graceful handover's request and its waiting clients (handover.rs).
    pub handover: crate::handover::Handover<Blocked>,
    /// The control user's passwords over time (secret.rs).
    pub secret: Rotation,
    /// When the current control secret was read (Unix ms), for `INFO keel`.
    pub secret_loaded_unix_ms: u64,
    /// How many times the secret file was read again (`INFO keel`).
    pub secret_polls: u64,
}

impl State {
    /// Whether a command (name lower-cased, first argument as sent) writes.
    pub fn is_write(&self, name: &[u8], sub: Option<&[u8]>) -> bool {
        self.table.is_write(name, sub)
    }
}

static STATE: OnceLock<Mutex<State>> = OnceLock::new();

thread_local! {
    /// This thread holds the state's lock.
    static LOCK_HELD: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread holds the state's lock.
pub fn lock_held() -> bool {
    LOCK_HELD.with(|h| h.get())
}

/// Sets the state once, at load.
pub fn init(state: State) {
    let _ = STATE.set(Mutex::new(state));
}

/// The state, locked (see the lock discipline at the top).
pub fn state() -> StateGuard {
    assert!(!lock_held(), "the module's state locked twice on one thread: it would deadlock");
    let guard = STATE.get().expect("keel module initialised").lock().unwrap();
    LOCK_HELD.with(|h| h.set(true));
    StateGuard(guard)
}

/// The locked state; unlocks (and clears the flag) when dropped.
pub struct StateGuard(MutexGuard<'static, State>);

impl std::ops::Deref for StateGuard {
    type Target = State;
    fn deref(&self) -> &State {
        &self.0
    }
}

impl std::ops::DerefMut for StateGuard {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.0
    }
}

impl Drop for StateGuard {
    fn drop(&mut self) {
        LOCK_HELD.with(|h| h.set(false));
    }
}
