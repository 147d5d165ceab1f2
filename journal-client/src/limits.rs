//! Limits the journal and its clients share.

use std::time::Duration;

/// Largest append (all its records' payloads) a journal node accepts.
pub const MAX_APPEND_BYTES: usize = 8 << 20;

/// How long `AddNode` waits for a new node to catch up as a learner (it may
/// install a snapshot of every stream) before answering that it is still a
/// learner.
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(600);
