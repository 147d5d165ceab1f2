//! The Keel journal: a multi-node, quorum-replicated, fsync'd, ordered log of
//! streams with fencing and leases, served over gRPC. Consensus is openraft,
//! the on-disk log is raft-log. The client library, TLS identities and the
//! metrics listener are keel-journal-client's (re-exported here).
//! The rooms of a node, along the write path, are listed at the top of
//! server.rs (start-up) and in the README's layout table.

pub use keel_journal_client::book;
pub use keel_journal_client::client;
pub mod errors;
pub mod format;
pub mod raft_log_store;
pub mod records;
pub mod membership;
pub use keel_journal_client::metrics;
pub mod network;
pub mod proposer;
pub mod raft_service;
pub mod server;
pub mod service;
pub mod state_machine;
pub mod streams;
pub use keel_journal_client::tls;
pub mod types;
