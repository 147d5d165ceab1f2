//! Test harness: starts real keel processes.
