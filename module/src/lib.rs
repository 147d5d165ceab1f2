//! The Redis module of Keel: loaded with `redis-server --loadmodule`, it holds
//! each write's reply until the journal has the write's effects durably.
//! Not built yet: this crate only reserves its place in the workspace.
