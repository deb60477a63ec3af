//! TLS session resumption between nodes: a node that talked to a peer before opens its next
//! connection to it with a ticket instead of a full mutual-TLS handshake.
//!
//! Why: connections are closed after `connection_idle_ms` without traffic, and in a large
//! cluster most SWIM probes go to a member not talked to recently, so an idle node keeps
//! opening connections. A full handshake verifies two certificate chains and makes two
//! signatures; a resumed one does neither (it still agrees a fresh key, so forward secrecy
//! holds). Profiles of hundreds of idle agents put the full handshakes' crypto at a fifth of
//! their CPU.
//!
//! Server side: stateless tickets, encrypted under a key only this process holds (rustls'
//! rotating ticketer), so a ticket is honoured only by the node that issued it and only while
//! it runs; the client certificate checked by the full handshake is part of the ticket. A
//! ticket never replaces the first handshake with a node: a peer without a certificate the CA
//! signed never gets one.
//!
//! Limit: a resumed handshake does not check the certificates again, and it is given a new
//! ticket, so a peer that keeps reconnecting within the ticket lifetime (rustls: 6 h per key,
//! the previous key still accepted) stays accepted past its certificate's expiry, as a pooled
//! connection that never goes idle does. Restarting a node (new ticket key) or the cluster
//! with a new CA ends that.
//!
//! Client side: rustls files tickets by server name, but every node may present the same name
//! (one certificate for `server_name = "patina"`, or one IP for a cluster on loopback), and a
//! ticket offered to another node than its issuer is wasted. So tickets are filed by the
//! peer's address instead: each connection gets a view of [`PeerTickets`] for its peer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::ServerName;
use rustls::server::ProducesTickets;
use rustls::NamedGroup;

/// Peers whose tickets are kept at most. A ticket with its session is about 1 KiB.
pub const PEERS_MAX: usize = 1024;

// When full, a random peer's entry goes, not the least recently used one: SWIM probes members
// round-robin, and in a cluster of more than PEERS_MAX members that order would evict every
// ticket just before its use, where random eviction keeps PEERS_MAX / members of them useful.

/// The most recent ticket (and key-exchange group) of each peer, by address.
#[derive(Debug, Default)]
pub struct PeerTickets {
    peers: Mutex<PeerMap>,
}

#[derive(Debug, Default)]
struct PeerMap {
    by_addr: HashMap<SocketAddr, PeerEntry>,
    /// Picks the entry that goes when full (xorshift).
    rng: u64,
}

#[derive(Debug, Default)]
struct PeerEntry {
    kx_hint: Option<NamedGroup>,
    /// One ticket suffices: each connection uses one and is given a new one.
    ticket: Option<Tls13ClientSessionValue>,
}

impl PeerTickets {
    /// The store rustls uses for one connection to `peer`.
    pub fn for_peer(self: &Arc<Self>, peer: SocketAddr) -> Arc<dyn ClientSessionStore> {
        Arc::new(PeerView {
            peer,
            tickets: self.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PeerMap> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, peer: SocketAddr, change: impl FnOnce(&mut PeerEntry)) {
        let mut map = self.lock();
        if !map.by_addr.contains_key(&peer) && map.by_addr.len() >= PEERS_MAX {
            let PeerMap { by_addr, rng } = &mut *map;
            remove_random(by_addr, rng);
        }
        change(map.by_addr.entry(peer).or_default());
    }
}

/// Removes a random entry of a full map and returns it (`rng`: a xorshift state). Used where
/// SWIM's round-robin order would make least-recently-used eviction drop each entry just
/// before its use.
pub(crate) fn remove_random<V>(map: &mut HashMap<SocketAddr, V>, rng: &mut u64) -> Option<V> {
    let mut x = *rng | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *rng = x;
    let len = map.len() as u64;
    let victim = map.keys().nth((x % len.max(1)) as usize).copied()?;
    map.remove(&victim)
}

/// [`PeerTickets`] as rustls sees it for one connection: the server name is ignored, the
/// peer's address is the key.
#[derive(Debug)]
struct PeerView {
    peer: SocketAddr,
    tickets: Arc<PeerTickets>,
}

impl ClientSessionStore for PeerView {
    fn set_kx_hint(&self, _: ServerName<'static>, group: NamedGroup) {
        self.tickets
            .update(self.peer, |entry| entry.kx_hint = Some(group));
    }

    fn kx_hint(&self, _: &ServerName<'_>) -> Option<NamedGroup> {
        self.tickets
            .lock()
            .by_addr
            .get(&self.peer)
            .and_then(|e| e.kx_hint)
    }

    // Nodes speak TLS 1.3 only.
    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(&self, _: ServerName<'static>, value: Tls13ClientSessionValue) {
        self.tickets
            .update(self.peer, |entry| entry.ticket = Some(value));
    }

    fn take_tls13_ticket(&self, _: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.tickets
            .lock()
            .by_addr
            .get_mut(&self.peer)
            .and_then(|e| e.ticket.take())
    }
}

/// rustls' ticketer, counting the tickets it could decrypt: each is a resumed handshake unless
/// rustls then refuses the ticket (too old, or for another protocol version or suite), which
/// between two nodes of one cluster does not happen.
#[derive(Debug)]
pub struct CountingTicketer {
    inner: Arc<dyn ProducesTickets>,
    accepted: Arc<AtomicU64>,
}

impl CountingTicketer {
    /// A ticketer with a fresh key of this process (rotated by rustls), counting into
    /// `accepted`.
    pub fn new(accepted: Arc<AtomicU64>) -> Result<Arc<CountingTicketer>, rustls::Error> {
        Ok(Arc::new(CountingTicketer {
            inner: rustls::crypto::ring::Ticketer::new()?,
            accepted,
        }))
    }
}

impl ProducesTickets for CountingTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.inner.lifetime()
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.inner.encrypt(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let plain = self.inner.decrypt(cipher);
        if plain.is_some() {
            self.accepted.fetch_add(1, Ordering::Relaxed);
        }
        plain
    }
}

/// Sets a server config up to issue one ticket per handshake under `ticketer`.
pub fn issue_tickets(config: &mut rustls::ServerConfig, ticketer: Arc<CountingTicketer>) {
    config.ticketer = ticketer;
    // Stateless tickets only: no server-side session cache to fill.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_bounded_and_a_new_one_always_gets_in() {
        let tickets = Arc::new(PeerTickets::default());
        let addr = |i: usize| SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16));
        for i in 0..3 * PEERS_MAX {
            tickets.update(addr(i), |e| e.kx_hint = Some(NamedGroup::X25519));
            assert!(tickets.lock().by_addr.contains_key(&addr(i)));
        }
        let map = tickets.lock();
        assert_eq!(map.by_addr.len(), PEERS_MAX);
        // Random eviction keeps some of every era, where the least recently used would keep
        // only the last PEERS_MAX.
        assert!((0..PEERS_MAX).any(|i| map.by_addr.contains_key(&addr(i))));
    }
}
