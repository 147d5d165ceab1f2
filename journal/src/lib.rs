//! The Keel journal: a multi-node, quorum-replicated, fsync'd, ordered log of
//! streams with fencing and leases, served over gRPC. Consensus is openraft,
//! the on-disk log is raft-log; the client library hides leader redirects.

pub mod book;
pub mod client;
pub mod errors;
pub mod raft_log_store;
pub mod records;
pub mod membership;
pub mod metrics;
pub mod network;
pub mod server;
pub mod state_machine;
pub mod streams;
pub mod tls;
pub mod types;
