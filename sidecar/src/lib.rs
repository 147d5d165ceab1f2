//! The sidecar of Keel: runs beside each redis-server and does the talking.
//! A node follows the journal stream (feeding its Redis as a replica), takes
//! the lease when the primary's lapses, then leads: it journals its Redis's
//! replication stream and acknowledges durable offsets to the module.
//!
//! The rooms, each a file:
//! - node.rs: a node's life (follow, elect, lead, back to following);
//! - the write path: the replication link (redis.rs, attached by
//!   primary.rs) → the leader state machine (leader.rs: group commit,
//!   retries, lease cadence; pure) → journal append (primary.rs's runner,
//!   over keel-journal-client) → `KEEL.ACK` to the module on the control
//!   connection (redis.rs);
//! - the read path of a replica: feeder.rs (journal → Redis as its master),
//!   history.rs (which bytes a Redis can continue from), stall.rs,
//!   progress.rs;
//! - pure decisions: leader.rs, lease.rs (renewal and election rules),
//!   cuts.rs (where an append may end), history.rs, sentinel.rs's answers;
//! - talking to a Redis: link.rs (the socket), auth.rs (the control user),
//!   resp.rs (the one RESP codec), redis.rs (the one connection type);
//! - adopt.rs: a running Redis outside Keel becomes a new stream's
//!   source, then hands its primary role to a Keel node;
//! - records and snapshots: record.rs (the journal's record format),
//!   snapshot.rs, snapshotter.rs;
//! - around: sentinel.rs (discovery for clients), metrics.rs, clock.rs
//!   (the monotonic clock lease deadlines are read on).

pub mod adopt;
pub mod auth;
pub mod clock;
pub mod cuts;
pub mod engine;
pub mod feeder;
pub mod handover;
pub mod history;
pub mod leader;
pub mod lease;
pub mod link;
pub mod metrics;
pub mod node;
pub mod primary;
pub mod progress;
pub mod redis;
pub mod record;
pub mod resp;
pub mod sentinel;
pub mod snapshot;
pub mod snapshotter;
pub mod stall;
