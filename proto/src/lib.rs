//! The wire contract of Keel: the journal's gRPC services and messages.
//! Generated from `proto/journal.proto`; no logic lives here.
//! Every other crate speaks to the journal only through these types.

#![allow(clippy::all)]

pub mod journal {
    tonic::include_proto!("keel.journal.v1");
}
