//! The sidecar of Keel: runs beside each redis-server and does the talking.
//! A node follows the journal stream (feeding its Redis as a replica), takes
//! the lease when the primary's lapses, then leads: it journals its Redis's
//! replication stream and acknowledges durable offsets to the module.

pub mod auth;
pub mod clock;
pub mod cuts;
pub mod feeder;
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
