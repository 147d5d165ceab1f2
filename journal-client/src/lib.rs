//! Talking to the Keel journal: the client library (`client`: any node,
//! leader redirects and the membership hidden; `book`: the nodes it knows),
//! the wire errors (`errors`), the deployment's TLS identities and
//! certificates (`tls`), and the metrics listener every Keel process serves
//! (`metrics`). It depends on no consensus or storage crate: a sidecar
//! compiles this, not the journal's server.

pub mod book;
pub mod client;
pub mod errors;
pub mod limits;
pub mod metrics;
pub mod tls;
