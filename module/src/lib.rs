//! The Redis module of Keel: loaded with `redis-server --loadmodule`, it holds
//! each write's reply until the journal has the write's effects durably.
//!
//! The write path: client → filter → `KEEL.W` → held → `KEEL.ACK` → reply.
//! - the command filter (`filter.rs`, rules in `routing.rs`) rewrites a
//!   client's write `CMD args…` into `KEEL.W CMD args…` (reads pass
//!   untouched);
//! - `KEEL.W` (`wrappers.rs`) runs the command with `RM_Call` (as the
//!   client's ACL user, in its database and protocol, propagated to
//!   replicas), keeps the reply and blocks the client (`hold.rs`);
//! - in beforeSleep (`events.rs`), after Redis propagated the turn's
//!   effects, the turn's held replies get `master_repl_offset` as their
//!   target (`holds.rs`);
//! - the sidecar, which receives the replication stream and appends it to
//!   the journal, calls `KEEL.ACK <offset>` (`control_commands.rs`) once
//!   the journal holds it; replies whose target is covered are released and
//!   sent to their clients.
//!
//! A reply not released within `write_timeout_ms` is answered with an error
//! saying the write's durability is unknown; `KEEL.FENCED` answers every held
//! reply with an error. A read of a key with a pending write is prefixed
//! with `KEEL.R`: it runs at once and its reply is held like a write's
//! (`hazards.rs`). Transactions (`transactions.rs`) and blocking pops
//! (`waiters.rs`, `blocking.rs`) are kept by the module too; the README
//! describes each.
//!
//! Rooms. Pure decisions, unit-tested without Redis: `routing.rs` (what the
//! filter does with a command), `holds.rs` (when a reply may leave),
//! `clients.rs` (one record per blocked client), `hazards.rs`, `gate.rs`
//! (role, lease, fence), `handover.rs` (FAILOVER / SHUTDOWN requests), `transactions.rs`, `waiters.rs`, `commands.rs`
//! (the `keel.*` names, listed once, and the command table), `acl.rs`,
//! `control.rs`, `secret.rs`, `config.rs`, `resp.rs`. Over Redis: `redis.rs`
//! (the only `unsafe`: safe wrappers over the module API and the entry
//! points), `state.rs` (the state and its lock discipline), `register.rs`
//! (loading), `filter.rs`, `wrappers.rs`, `blocking.rs`, `run.rs` (running
//! a client's command and holding its reply), `hold.rs`, `reply.rs`,
//! `control_commands.rs`, `grants.rs` (ACL users), `events.rs` and
//! `info.rs`.

pub mod acl;
pub mod clients;
pub mod commands;
pub mod config;
pub mod control;
pub mod gate;
pub mod handover;
pub mod hazards;
pub mod holds;
pub mod resp;
pub mod routing;
pub mod secret;
pub mod transactions;
pub mod view;
pub mod waiters;
// The layer over Redis; unit tests run without Redis, so they leave it out.
#[cfg(not(test))]
mod blocking;
#[cfg(not(test))]
mod control_commands;
#[cfg(not(test))]
mod events;
#[cfg(not(test))]
mod filter;
#[cfg(not(test))]
mod grants;
#[cfg(not(test))]
mod handover_commands;
#[cfg(not(test))]
mod hold;
#[cfg(not(test))]
mod info;
#[cfg(not(test))]
mod redis;
#[cfg(not(test))]
mod register;
#[cfg(not(test))]
mod reply;
#[cfg(not(test))]
mod run;
#[cfg(not(test))]
mod state;
#[cfg(not(test))]
mod wrappers;
