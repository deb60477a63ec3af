//! Everything between nodes: the QUIC transport with mutual TLS, SWIM membership, the gossip
//! task that drives the broadcast core, and anti-entropy sync sessions.

pub mod addrs;
pub mod gossip;
pub mod membership;
pub mod resume;
pub mod sealed;
pub mod sync;
pub mod tls;
pub mod transport;
