//! The sidecar of Keel: runs beside each redis-server and does the talking:
//! fenced appends to the journal, lease renewal, election, replica catch-up.
//! Not built yet: this crate only reserves its place in the workspace.
