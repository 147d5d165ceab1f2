//! The sidecar of Keel: runs beside each redis-server and does the talking:
//! journals the primary's replication stream as the stream's fenced leader
//! and acknowledges durable offsets to the module. (Replicas, election and
//! discovery come next.)

pub mod primary;
pub mod record;
pub mod resp;
