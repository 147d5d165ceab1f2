//! The Redis module of Keel: loaded with `redis-server --loadmodule`, it holds
//! each write's reply until the journal has the write's effects durably.
//! Decisions live in `holds.rs`; this file is the thin layer over Redis.
//!
//! How a write flows:
//! - a command filter rewrites a client's write command `CMD args…` into
//!   `KEEL.W CMD args…` (reads pass untouched);
//! - `KEEL.W` runs the command with `RM_Call` (as the client's ACL user, in
//!   its database and protocol, propagated to replicas), keeps the reply and
//!   blocks the client;
//! - in beforeSleep, after Redis propagated the turn's effects, the turn's
//!   held replies get `master_repl_offset` as their target;
//! - the sidecar, which receives the replication stream and appends it to the
//!   journal, calls `KEEL.ACK <offset>` once the journal holds it; replies
//!   whose target is covered are released.
//! A reply not released within `write_timeout_ms` is answered with an error
//! saying the write's durability is unknown; `KEEL.FENCED` answers every held
//! reply with an error.
//!
//! - a read of a key with a pending write is prefixed with `KEEL.R`: it runs
//!   at once and its reply is held like a write's (`hazards.rs`).
//! Transactions (`transactions.rs`) and blocking pops (`waiters.rs`,
//! `blocking.rs`) are kept by the module too; the README describes each.

pub mod acl;
pub mod clients;
pub mod commands;
pub mod config;
pub mod control;
pub mod gate;
pub mod hazards;
pub mod holds;
pub mod resp;
pub mod routing;
pub mod secret;
pub mod transactions;
pub mod waiters;
// The layer over Redis; unit tests run without Redis, so they leave it out.
#[cfg(not(test))]
mod blocking;
#[cfg(not(test))]
mod ffi;
#[cfg(not(test))]
mod reply;
