//! The gossip transport: QUIC (quinn) with mutual TLS. One endpoint per node both accepts and
//! opens connections; one connection per peer is kept and reused in both directions. A
//! message travels either on its own unidirectional stream (reliable, unordered between
//! messages) or as a datagram (unreliable, cheaper; a message larger than the connection's
//! datagram limit goes on a stream anyway): the sender picks the [`Channel`]. SWIM's packets
//! and the broadcast's changesets and upkeep are datagrams, since something else repairs
//! their loss; sync sessions are bidirectional streams. Between nodes that both offer them, a
//! datagram travels sealed with keys exported from the connection, beside QUIC rather than in
//! it: no acknowledgement, no pass through the connection's state machine ([`super::sealed`]).
//!
//! Connections are pooled, not kept forever: a connection with no traffic either way for
//! `connection_idle_ms` is closed (and opened again on the next message), and beyond
//! `connections_max` the least recently active ones are closed. So a node holds connections
//! only to the peers it talks to now (its kept links, recent SWIM probes, a sync partner),
//! whatever the cluster size: each costs about 40 KiB and a handshake costs about 1.5 ms of
//! CPU (bench `transport_cost`), so neither keep-alive traffic nor memory grow with the
//! cluster.
//!
//! Bounds: each peer has a send queue of at most `queue_len_max` messages, and the oldest is
//! dropped when it is full (anti-entropy repairs what is lost); the inbox towards the agent is
//! bounded the same way; a received message larger than `message_bytes_max` is refused. The node
//! as a whole sends at most `send_bytes_per_sec_max` (a token bucket of one second's worth) with
//! at most `send_in_flight_max` streams being written at once; past that, queues fill and shed.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::udp::Transmit;
use tokio::sync::{mpsc, Notify};

use crate::net::resume::{self, CountingTicketer, PeerTickets};
use crate::net::sealed::{self, DemuxSocket, SealedLink, SealedReceiver};
use crate::net::tls::{insecure_configs, NodeTls, TlsError, ALPN, ALPN_SEALED, ALPN_SEALED_KEPT};

/// How the endpoint authenticates.
#[derive(Debug, Clone)]
pub enum TlsMode {
    /// Mutual TLS with certificates signed by the cluster CA.
    Mutual(NodeTls),
    /// No verification (local development only).
    Plaintext,
}

/// Why the transport failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TLS setup.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Socket setup.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// QUIC crypto setup.
    #[error("quic crypto: {0}")]
    Crypto(String),
}

/// What kind of payload arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// A reliable message (stream).
    Stream,
    /// An unreliable datagram: no retransmission, no stream to open, acknowledge and close,
    /// about 30% less CPU per message at both ends (bench `transport_cost --datagrams`). For
    /// messages whose loss something else repairs. A message larger than the connection's
    /// datagram limit goes on a stream instead.
    Datagram,
}

/// A message from a peer.
#[derive(Debug, Clone)]
pub struct Received {
    /// The peer's address.
    pub from: SocketAddr,
    /// How it came.
    pub channel: Channel,
    /// The bytes.
    pub bytes: Bytes,
}

/// Transport settings.
#[derive(Debug, Clone, Copy)]
pub struct TransportConfig {
    /// Messages queued per peer before the oldest is dropped.
    pub queue_len_max: usize,
    /// Largest message accepted, in bytes.
    pub message_bytes_max: usize,
    /// A pooled connection with no traffic either way for this long is closed (ms).
    pub connection_idle_ms: u64,
    /// Pooled connections at most; beyond, the least recently active are closed.
    pub connections_max: usize,
    /// Bytes per second the whole node may send.
    pub send_bytes_per_sec_max: u64,
    /// Messages being written at once, over all peers.
    pub send_in_flight_max: usize,
    /// Offer sealed datagrams to peers ([`super::sealed`]); off, every datagram is a QUIC one.
    pub sealed_datagrams: bool,
    /// Datagrams sealed under one connection's key before that connection is replaced by a
    /// new one (new keys): [`sealed::SEALED_PER_KEY_MAX`], which is also the most this takes;
    /// tests lower it to see the replacement.
    pub sealed_per_key_max: u64,
    /// How long the sealed keys of a connection closed for idleness are kept to send datagrams
    /// to its peer without a connection (ms; 0: not kept). See [`Transport::is_warm`].
    pub sealed_kept_max_age_ms: u64,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            queue_len_max: 4096,
            message_bytes_max: 16 * 1024 * 1024,
            connection_idle_ms: 20_000,
            connections_max: 128,
            send_bytes_per_sec_max: 16 * 1024 * 1024,
            send_in_flight_max: 256,
            sealed_datagrams: true,
            sealed_per_key_max: sealed::SEALED_PER_KEY_MAX,
            sealed_kept_max_age_ms: 3_600_000,
        }
    }
}

/// Counters.
#[derive(Debug, Default)]
pub struct TransportStats {
    /// Messages handed to QUIC.
    pub sent: AtomicU64,
    /// Bytes handed to QUIC.
    pub sent_bytes: AtomicU64,
    /// Messages dropped because a queue was full or a send failed.
    pub dropped: AtomicU64,
    /// Handshakes refused or failed.
    pub handshake_failures: AtomicU64,
    /// Connections opened by this node (handshakes it started).
    pub connections_opened: AtomicU64,
    /// Handshakes with this node resumed from a ticket it issued (tickets it decrypted; see
    /// [`super::resume`]).
    pub handshakes_resumed: Arc<AtomicU64>,
    /// Connections accepted from peers.
    pub connections_accepted: AtomicU64,
    /// Connections closed because they were idle or over `connections_max`.
    pub connections_closed_idle: AtomicU64,
    /// Connections pooled now.
    pub connections_open: AtomicU64,
    /// Connections closed because a send to the peer stalled (a crashed peer, or one that
    /// stopped reading): the next message opens a new connection.
    pub connections_closed_stalled: AtomicU64,
    /// Sealed datagrams sent ([`super::sealed`]; also counted in `sent`).
    pub sealed_sent: AtomicU64,
    /// Sealed datagrams opened and handed on.
    pub sealed_received: AtomicU64,
    /// Sealed datagrams refused: too short or too long, replayed, failing authentication, or
    /// under a key this node does not know (a peer that kept a connection to its previous
    /// process: it gets a notice); stray notices.
    pub sealed_refused: AtomicU64,
    /// Notices from peers that they do not know the key this node sealed under (a restarted
    /// peer): that connection's datagrams went on QUIC.
    pub sealed_unknown: AtomicU64,
    /// Connections replaced in the pool by a new one (new keys) because their sealed key
    /// reached its limit.
    pub sealed_rekeys: AtomicU64,
    /// Sealed keys of closed connections kept now (see [`Transport::is_warm`]).
    pub sealed_keys_kept: AtomicU64,
    /// Sealed datagrams sent under a kept key, with no connection (also in `sealed_sent`).
    pub sealed_sent_kept: AtomicU64,
}

/// A pooled connection and when it was last seen carrying anything.
struct Pooled {
    conn: quinn::Connection,
    /// Its sealed-datagram keys, when both ends offered them.
    sealed: Option<Arc<SealedLink>>,
    /// UDP datagrams sent plus received (QUIC's and sealed ones), at the last check.
    datagrams: u64,
    /// When `datagrams` last changed.
    active_at: std::time::Instant,
    /// QUIC's UDP datagrams alone, at the last check, and when they last changed: a
    /// connection carrying only sealed datagrams is kept alive within quinn's idle timeout.
    quic_datagrams: u64,
    quic_active_at: std::time::Instant,
    /// UDP datagrams received from the peer, at the last send.
    received: u64,
    /// The first send since the peer last sent anything (an acknowledgement will do).
    unanswered_since: Option<std::time::Instant>,
    /// Once its sealed key is spent: a replacement connection is being made.
    renewing: bool,
    /// Replacements that failed in a row, and when the next may be tried.
    renew_failures: u32,
    renew_after: Option<std::time::Instant>,
}

impl Pooled {
    fn new(conn: quinn::Connection, sealed: Option<Arc<SealedLink>>) -> Pooled {
        Pooled {
            conn,
            sealed,
            datagrams: 0,
            active_at: std::time::Instant::now(),
            quic_datagrams: 0,
            quic_active_at: std::time::Instant::now(),
            received: 0,
            unanswered_since: None,
            renewing: false,
            renew_failures: 0,
            renew_after: None,
        }
    }

    /// For a connection whose sealed key is spent: true if a replacement should be started
    /// now (none is being made, and the back-off after a failed one is over); marks it begun.
    fn begin_renewal(&mut self, now: std::time::Instant) -> bool {
        let due = !self.renewing && self.renew_after.is_none_or(|at| now >= at);
        self.renewing |= due;
        due
    }

    /// A replacement failed: the next waits [`RENEW_RETRY_MIN`], doubling with each further
    /// failure up to [`RENEW_RETRY_MAX`].
    fn renewal_failed(&mut self, now: std::time::Instant) {
        self.renewing = false;
        let doublings = self.renew_failures.min(6);
        self.renew_failures = self.renew_failures.saturating_add(1);
        let wait = RENEW_RETRY_MIN
            .saturating_mul(1 << doublings)
            .min(RENEW_RETRY_MAX);
        self.renew_after = Some(now + wait);
    }

    /// Called before each send on QUIC: true if the peer has answered nothing (not even an
    /// acknowledgement) for [`STALL_MIN`] (or four round trips) while this node sent to it. A
    /// peer that crashed keeps its connection "open" here until quinn's idle timeout (tens of
    /// seconds), and a restarted one at the same address cannot decrypt what comes on it:
    /// datagrams sent there vanish without an error (a stream would stall, which closes the
    /// connection too; see `send_on_stream`).
    fn stalled(&mut self, now: std::time::Instant) -> bool {
        let received = self.conn.stats().udp_rx.datagrams
            + self
                .sealed
                .as_ref()
                .map_or(0, |link| link.received.load(Ordering::Relaxed));
        if received != self.received {
            self.received = received;
            self.unanswered_since = None;
        }
        let since = *self.unanswered_since.get_or_insert(now);
        now.duration_since(since) >= STALL_MIN.max(self.conn.rtt() * 4)
    }
}

struct PeerQueue {
    /// Messages to send, each with whether its loss (a fault) was drawn already: the direct
    /// datagram path draws it before it can find that the queue must take the message.
    messages: Mutex<VecDeque<(Channel, Bytes, bool)>>,
    wake: Notify,
}

struct Shared {
    endpoint: quinn::Endpoint,
    /// TLS of connections this node opens; each gets its peer's ticket store added.
    client_tls: rustls::ClientConfig,
    /// QUIC settings of every connection.
    quic: Arc<quinn::TransportConfig>,
    /// Session tickets from peers, by address.
    tickets: Arc<PeerTickets>,
    /// The name a peer's certificate must carry; its IP when `None`.
    server_name: Option<String>,
    /// When a refused peer was last logged, by IP.
    refused_logged: Mutex<HashMap<std::net::IpAddr, Instant>>,
    config: TransportConfig,
    /// The endpoint's UDP socket, which sealed datagrams are sent on.
    socket: Arc<dyn quinn::AsyncUdpSocket>,
    /// Sealed datagrams' receiving side, when this node offers them.
    sealed: Option<Arc<SealedReceiver>>,
    connections: Mutex<HashMap<SocketAddr, Pooled>>,
    /// Sealed keys of connections closed for idleness, by peer.
    kept: Mutex<KeptKeys>,
    queues: Mutex<HashMap<SocketAddr, Arc<PeerQueue>>>,
    inbox: mpsc::Sender<Received>,
    stats: Arc<TransportStats>,
    budget: Mutex<TokenBucket>,
    in_flight: Arc<tokio::sync::Semaphore>,
    sessions: Mutex<Option<mpsc::Sender<Session>>>,
    faults: Arc<Faults>,
}

/// A message [`Transport::send`] hands to the peer's queue.
struct ForQueue {
    bytes: Bytes,
    /// Its loss was drawn already (the queue's task must not draw it again).
    loss_drawn: bool,
    /// It needs no new connection (see [`Transport::send`]).
    warm: bool,
}

impl ForQueue {
    fn warm(bytes: Bytes, loss_drawn: bool) -> ForQueue {
        ForQueue {
            bytes,
            loss_drawn,
            warm: true,
        }
    }
}

/// One-way latency to add per destination (WAN emulation in user space).
pub type LatencyFn = Arc<dyn Fn(SocketAddr) -> Duration + Send + Sync>;

/// Fault injection for tests, at the level of whole messages (QUIC repairs the packets of a
/// stream by itself, and a lost datagram is a lost message, so message loss covers both): drop a share of outgoing messages, cut the
/// node off from a set of peers (both directions, sessions included), delay every send, or
/// delay sends by destination (a latency model), or refuse new connections while those
/// open go on (a peer whose certificate expired since). A delayed message waits on its own
/// timer, so delay adds latency without limiting throughput.
#[derive(Default)]
pub struct Faults {
    /// Outgoing messages dropped, in parts per thousand.
    pub drop_per_mille: std::sync::atomic::AtomicU32,
    /// Extra delay before each send (ms).
    pub delay_ms: AtomicU64,
    /// Incoming handshakes refused (QUIC's CONNECTION_REFUSED); open connections go on.
    pub refuse_connections: std::sync::atomic::AtomicBool,
    cut: Mutex<std::collections::HashSet<SocketAddr>>,
    latency: Mutex<Option<LatencyFn>>,
    counter: AtomicU64,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("drop_per_mille", &self.drop_per_mille)
            .field("delay_ms", &self.delay_ms)
            .finish_non_exhaustive()
    }
}

impl Faults {
    /// Cuts the node off from these peers (replacing any earlier cut).
    pub fn cut_off(&self, peers: impl IntoIterator<Item = SocketAddr>) {
        *self.cut.lock().unwrap_or_else(|e| e.into_inner()) = peers.into_iter().collect();
    }

    /// Heals every cut, stops dropping, delaying and refusing.
    pub fn heal(&self) {
        self.cut.lock().unwrap_or_else(|e| e.into_inner()).clear();
        *self.latency.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.drop_per_mille.store(0, Ordering::Relaxed);
        self.delay_ms.store(0, Ordering::Relaxed);
        self.refuse_connections.store(false, Ordering::Relaxed);
    }

    /// Delays every message by `latency(destination)` (a WAN model), on top of `delay_ms`.
    pub fn set_latency(&self, latency: LatencyFn) {
        *self.latency.lock().unwrap_or_else(|e| e.into_inner()) = Some(latency);
    }

    fn delay_to(&self, peer: SocketAddr) -> Duration {
        let fixed = Duration::from_millis(self.delay_ms.load(Ordering::Relaxed));
        let modelled = self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|f| f(peer))
            .unwrap_or_default();
        fixed + modelled
    }

    fn is_cut(&self, peer: &SocketAddr) -> bool {
        self.cut
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(peer)
    }

    /// Deterministic spread: a multiplicative hash of a counter, not a random generator.
    fn drops_next(&self) -> bool {
        let share = self.drop_per_mille.load(Ordering::Relaxed);
        if share == 0 {
            return false;
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        (n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 54) % 1000 < u64::from(share)
    }
}

/// A bidirectional stream a peer opened (a sync session).
#[derive(Debug)]
pub struct Session {
    /// The peer.
    pub from: SocketAddr,
    /// Our side's writer.
    pub send: quinn::SendStream,
    /// Our side's reader.
    pub recv: quinn::RecvStream,
}

/// Bytes the node may still send: refilled at `rate` per second, holding at most one second.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    tokens: f64,
    refilled: std::time::Instant,
}

impl TokenBucket {
    fn new(rate: u64) -> TokenBucket {
        TokenBucket {
            rate: rate as f64,
            tokens: rate as f64,
            refilled: std::time::Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = std::time::Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.refilled).as_secs_f64() * self.rate)
            .min(self.rate);
        self.refilled = now;
    }

    /// Takes `bytes` if the budget has them now; false (taking nothing) if not.
    fn try_take(&mut self, bytes: u64) -> bool {
        self.refill();
        let room = self.tokens >= bytes as f64;
        if room {
            self.tokens -= bytes as f64;
        }
        room
    }

    /// Takes `bytes`; returns how long to wait first if the budget is spent.
    fn take(&mut self, bytes: u64) -> Duration {
        self.refill();
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// A node's QUIC endpoint.
#[derive(Clone)]
pub struct Transport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("local_addr", &self.local_addr())
            .finish()
    }
}

impl Transport {
    /// Binds the endpoint and starts accepting. Received messages go to `inbox`.
    pub fn bind(
        addr: SocketAddr,
        tls: &TlsMode,
        config: TransportConfig,
        inbox: mpsc::Sender<Received>,
    ) -> Result<Transport, TransportError> {
        let server_name = match tls {
            TlsMode::Mutual(node) => node.server_name.clone(),
            TlsMode::Plaintext => None,
        };
        let (mut server_tls, mut client_tls) = match tls {
            TlsMode::Mutual(node) => (node.server_config()?, node.client_config()?),
            TlsMode::Plaintext => insecure_configs()?,
        };
        if config.sealed_datagrams {
            // Both ends offering the sealed protocol first is how each knows the other opens
            // sealed datagrams; a node without it negotiates the plain one.
            // A node that keeps the keys of idle-closed connections offers that first.
            let mut offered = vec![ALPN_SEALED.to_vec(), ALPN.to_vec()];
            if config.sealed_kept_max_age_ms > 0 {
                offered.insert(0, ALPN_SEALED_KEPT.to_vec());
            }
            server_tls.alpn_protocols = offered.clone();
            client_tls.alpn_protocols = offered;
        }
        let stats = Arc::new(TransportStats::default());
        resume::issue_tickets(
            &mut server_tls,
            CountingTicketer::new(stats.handshakes_resumed.clone())
                .map_err(|e| TransportError::Crypto(e.to_string()))?,
        );
        let crypto_err =
            |e: quinn::crypto::rustls::NoInitialCipherSuite| TransportError::Crypto(e.to_string());
        // quinn's own idle timeout only closes what the pool lost track of (both peers opened a
        // connection at once, and the map kept the other one); the pool closes idle
        // connections first, with a close frame the peer sees at once.
        let idle = quinn::IdleTimeout::try_from(Duration::from_millis(
            config.connection_idle_ms.saturating_mul(2).max(1_000),
        ))
        .map_err(|e: quinn::VarIntBoundsExceeded| TransportError::Crypto(e.to_string()))?;
        let transport = Arc::new({
            let mut transport = quinn::TransportConfig::default();
            // quinn sets aside state for every stream the peer may open at once (about 40
            // bytes each, 41 KiB per connection at 1,024): 64 messages in flight per peer are
            // plenty, and a sync session is one bidirectional stream.
            transport
                .max_concurrent_uni_streams(64u32.into())
                .max_concurrent_bidi_streams(8u32.into())
                .max_idle_timeout(Some(idle))
                // No keep-alive: a connection nobody uses should go away.
                .keep_alive_interval(None)
                .mtu_discovery_config(Some(one_probe_mtu_discovery()));
            transport
        });
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(server_tls).map_err(crypto_err)?,
        ));
        server.transport_config(transport.clone());
        // No connection migration: a node's connections are known by the peer's address
        // (the pool, the kept keys, the address a message came from, which the sync check
        // trusts). With it, a member could send one packet from another member's address
        // right after its handshake, and be filed under that address for good: quinn reverts
        // once validation fails, the pool does not. Nodes have fixed addresses.
        server.migration(false);
        // Checked once here, so that building a connection's config later cannot fail.
        QuicClientConfig::try_from(client_tls.clone()).map_err(crypto_err)?;
        let faults = Arc::new(Faults::default());
        let runtime = Arc::new(quinn::TokioRuntime);
        let socket = quinn::Runtime::wrap_udp_socket(&*runtime, udp_socket(addr)?)?;
        let sealed = config.sealed_datagrams.then(|| {
            let (inbox, faults, counters) = (inbox.clone(), faults.clone(), stats.clone());
            Arc::new(SealedReceiver::new(
                Box::new(move |from, bytes| {
                    deliver_to(
                        &inbox,
                        &faults,
                        &counters,
                        Received {
                            from,
                            channel: Channel::Datagram,
                            bytes,
                        },
                    )
                }),
                config.message_bytes_max,
                stats.clone(),
            ))
        });
        let endpoint_socket: Arc<dyn quinn::AsyncUdpSocket> = match &sealed {
            Some(receiver) => Arc::new(DemuxSocket::new(socket.clone(), receiver.clone())),
            None => socket.clone(),
        };
        let mut endpoint_config = quinn::EndpointConfig::default();
        // Not offering peers to grease QUIC's fixed bit keeps it set on every QUIC packet this
        // endpoint receives, which is what tells them from sealed datagrams.
        endpoint_config.grease_quic_bit(false);
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server),
            endpoint_socket,
            runtime,
        )?;
        let shared = Arc::new(Shared {
            endpoint,
            client_tls,
            quic: transport,
            tickets: Arc::new(PeerTickets::default()),
            server_name,
            refused_logged: Mutex::new(HashMap::new()),
            config,
            socket,
            sealed,
            connections: Mutex::new(HashMap::new()),
            kept: Mutex::new(KeptKeys::default()),
            queues: Mutex::new(HashMap::new()),
            inbox,
            stats,
            budget: Mutex::new(TokenBucket::new(config.send_bytes_per_sec_max.max(1))),
            in_flight: Arc::new(tokio::sync::Semaphore::new(
                config.send_in_flight_max.max(1),
            )),
            sessions: Mutex::new(None),
            faults,
        });
        crate::logging::spawn(accept_loop(shared.clone()));
        crate::logging::spawn(reap_loop(Arc::downgrade(&shared)));
        Ok(Transport { shared })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared
            .endpoint
            .local_addr()
            .expect("a bound endpoint has an address")
    }

    /// Counters.
    pub fn stats(&self) -> &TransportStats {
        &self.shared.stats
    }

    /// Sends a message to a peer; never blocks. A datagram on a connection that is ready leaves
    /// at once (see `send_datagram_direct`); anything else goes through the peer's queue, whose
    /// task connects first if needed. When the peer's queue is full the oldest message is
    /// dropped. Returns whether the message was warm: it left, or waits, without a new
    /// connection to the peer (one is pooled, or a datagram went under a kept key), found on
    /// the way instead of by a lookup of its own ([`Transport::is_warm`]).
    pub fn send(&self, to: SocketAddr, channel: Channel, bytes: Bytes) -> bool {
        let ForQueue {
            bytes,
            loss_drawn,
            warm,
        } = match channel {
            Channel::Datagram => match self.send_datagram_direct(to, bytes) {
                Some(back) => back,
                None => return true,
            },
            // A stream needs a connection: a kept key does not carry it.
            Channel::Stream => ForQueue {
                warm: self.is_connected(to),
                bytes,
                loss_drawn: false,
            },
        };
        // The message is queued under the map's lock: a sender loop that finds its queue
        // empty removes it under the same lock, so no message lands in a queue nobody reads.
        let queue = {
            let mut queues = self.shared.queues.lock().unwrap_or_else(|e| e.into_inner());
            let queue = queues
                .entry(to)
                .or_insert_with(|| {
                    let queue = Arc::new(PeerQueue {
                        messages: Mutex::new(VecDeque::new()),
                        wake: Notify::new(),
                    });
                    crate::logging::spawn(tracing::Instrument::instrument(
                        send_loop(self.shared.clone(), to, queue.clone()),
                        tracing::info_span!("peer", addr = %to),
                    ));
                    queue
                })
                .clone();
            let mut messages = queue.messages.lock().unwrap_or_else(|e| e.into_inner());
            if messages.len() >= self.shared.config.queue_len_max {
                messages.pop_front();
                self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            messages.push_back((channel, bytes, loss_drawn));
            drop(messages);
            queue
        };
        queue.wake.notify_one();
        warm
    }

    /// Sends a datagram without the peer's queue and its task when they would change nothing:
    /// nothing is queued for the peer, its pooled connection answers, the message fits a
    /// datagram and the send budget has room. Through the queue each message cost a wake-up of
    /// the peer's task besides the queue's locks; every broadcast copy is such a message
    /// (BENCHMARKS, "Where a write's CPU goes"). Gives the message back when the queue
    /// must take it (to connect, to wait for the budget, or to send it on a stream), with
    /// whether its loss was drawn already (so the queue's task does not draw it again).
    /// `None`: it left (or was dropped, or waits on its modelled delay) warm.
    fn send_datagram_direct(&self, to: SocketAddr, bytes: Bytes) -> Option<ForQueue> {
        let shared = &self.shared;
        let queued = shared
            .queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&to)
            .is_some_and(|q| {
                !q.messages
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_empty()
            });
        if queued {
            return Some(ForQueue {
                warm: self.is_warm(to),
                bytes,
                loss_drawn: false,
            });
        }
        let (conn, link) = {
            let mut connections = shared.connections.lock().unwrap_or_else(|e| e.into_inner());
            let Some(pooled) = connections
                .get_mut(&to)
                .filter(|pooled| pooled.conn.close_reason().is_none())
            else {
                drop(connections);
                return self.send_kept(to, bytes);
            };
            if pooled
                .conn
                .max_datagram_size()
                .is_none_or(|max| bytes.len() > max)
                || pooled.sealed.as_ref().is_some_and(|link| link.exhausted())
            {
                // (An exhausted key: the queue's task starts its replacement.)
                return Some(ForQueue::warm(bytes, false));
            }
            // As in the queue's task: faults before the silence check, so a message never
            // sent does not count as unanswered.
            if shared.faults.is_cut(&to) || shared.faults.drops_next() {
                shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            let link = sealed_link_for(pooled, bytes.len());
            // A sealed datagram is never answered: only QUIC sends wait for an answer.
            if link.is_none() && pooled.stalled(Instant::now()) {
                // The queue's task closes the silent connection and connects afresh.
                return Some(ForQueue::warm(bytes, true));
            }
            (pooled.conn.clone(), link)
        };
        let delay = shared.faults.delay_to(to);
        if !delay.is_zero() {
            let shared = shared.clone();
            crate::logging::spawn(async move {
                tokio::time::sleep(delay).await;
                send_now(
                    &shared,
                    Link { conn, sealed: link },
                    Channel::Datagram,
                    bytes,
                )
                .await;
            });
            return None;
        }
        if !shared.budget_allows(bytes.len()) {
            return Some(ForQueue::warm(bytes, true));
        }
        // No in-flight permit: a datagram leaves (or is refused) at once; the permits bound
        // stream writes that wait on the peer.
        let len = bytes.len() as u64;
        let sent = match &link {
            Some(link) => send_sealed_or_quic(shared, &conn, link, bytes),
            None => send_datagram(&conn, bytes),
        };
        if sent {
            shared.stats.sent.fetch_add(1, Ordering::Relaxed);
            shared.stats.sent_bytes.fetch_add(len, Ordering::Relaxed);
        } else {
            shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        None
    }

    /// Sends a datagram to a peer with no pooled connection under the kept key of an earlier
    /// one ([`KeptKeys`]), if there is one; gives the message back as `send_datagram_direct`
    /// does (then the queue's task connects).
    fn send_kept(&self, to: SocketAddr, bytes: Bytes) -> Option<ForQueue> {
        let shared = &self.shared;
        let Some((link, addr)) = shared.kept_key_for(to, bytes.len()) else {
            return Some(ForQueue {
                bytes,
                loss_drawn: false,
                warm: false,
            });
        };
        if shared.faults.is_cut(&to) || shared.faults.drops_next() {
            shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if !shared.budget_allows(bytes.len()) {
            return Some(ForQueue::warm(bytes, true));
        }
        let delay = shared.faults.delay_to(to);
        if delay.is_zero() {
            shared.send_under_kept(&link, addr, &bytes);
        } else {
            let shared = shared.clone();
            crate::logging::spawn(async move {
                tokio::time::sleep(delay).await;
                shared.send_under_kept(&link, addr, &bytes);
            });
        }
        None
    }

    /// Peers with a send queue (and its task) now; a queue goes when idle for
    /// `connection_idle_ms`.
    pub fn queued_peers(&self) -> usize {
        self.shared
            .queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// True if datagrams to the peer go sealed now ([`super::sealed`]): its connection is
    /// pooled, both ends offered sealed datagrams, and the peer said it opens them.
    pub fn sends_sealed(&self, to: SocketAddr) -> bool {
        self.shared
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&to)
            .and_then(|pooled| pooled.sealed.as_ref())
            .is_some_and(|link| link.confirmed())
    }

    /// Forgets every sealed-datagram key this node registered, as a restart would, while its
    /// connections stay open (tests: what peers holding keys of a restarted node see).
    #[doc(hidden)]
    pub fn forget_sealed_keys(&self) {
        self.shared.take_kept(|_, _| true);
        self.shared.kept().retiring.clear();
        if let Some(receiver) = &self.shared.sealed {
            receiver.forget_all();
        }
    }

    /// True if a datagram to the peer needs no handshake: a connection to it is pooled, or the
    /// sealed key of an earlier one is kept ([`KeptKeys`]).
    pub fn is_warm(&self, to: SocketAddr) -> bool {
        self.is_connected(to) || self.shared.kept_key_for(to, 0).is_some()
    }

    /// The most bytes a datagram to `to` may carry to leave under a kept key, when that is how
    /// it would leave: the peer has no pooled connection and a key is kept for it. A larger
    /// message to such a peer waits for a new connection, a handshake (see
    /// `Membership::fit_updates`).
    pub fn kept_datagram_room(&self, to: SocketAddr) -> Option<usize> {
        if self.is_connected(to) {
            return None;
        }
        self.shared
            .usable_kept_key(to)
            .map(|(_, _, datagram_max)| datagram_max.saturating_sub(sealed::TAG_BYTES))
    }

    /// Sends an optional datagram only if it leaves now as one datagram, on the peer's pooled
    /// connection or under a kept key, with nothing queued for the peer and room in the send
    /// budget; otherwise drops it and returns false. Never connects, so never costs a
    /// handshake: for copies another path carries anyway (a widened first hop).
    pub fn send_datagram_without_handshake(&self, to: SocketAddr, bytes: Bytes) -> bool {
        self.send_datagram_direct(to, bytes).is_none()
    }

    /// The path figures of the connection pooled for the peer (its MTU, round-trip time, MTU
    /// probes sent), if one is pooled.
    pub fn path_stats(&self, to: SocketAddr) -> Option<quinn::PathStats> {
        self.shared
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&to)
            .map(|c| c.conn.stats().path)
    }

    /// True if a connection to the peer is pooled now (a message to it needs no handshake).
    pub fn is_connected(&self, to: SocketAddr) -> bool {
        self.shared
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&to)
            .is_some_and(|c| c.conn.close_reason().is_none())
    }

    /// The fault injector (tests only; everything off by default).
    pub fn faults(&self) -> Arc<Faults> {
        self.shared.faults.clone()
    }

    /// Where sessions peers open go; without a handler (or when it is full) they are refused.
    pub fn set_session_handler(&self, handler: mpsc::Sender<Session>) {
        *self
            .shared
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(handler);
    }

    /// Opens a session (a bidirectional stream) with a peer.
    pub async fn open_session(
        &self,
        to: SocketAddr,
    ) -> Option<(quinn::SendStream, quinn::RecvStream)> {
        if self.shared.faults.is_cut(&to) {
            return None;
        }
        let link = connection(&self.shared, to, None).await?;
        link.conn.open_bi().await.ok()
    }

    /// Closes every connection and the endpoint.
    pub async fn close(&self) {
        self.shared.endpoint.close(0u32.into(), b"shutdown");
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.shared.endpoint.wait_idle()).await;
    }
}

/// Receive buffer asked of the kernel for the endpoint's UDP socket (bytes; the kernel caps it
/// at `net.core.rmem_max`). The usual default (208 KiB) holds about a hundred datagrams: when
/// hundreds of agents share two cores (loadgen), an endpoint is not read for tens of
/// milliseconds at a time, and bursts (handshake flights, 16 KiB SWIM packets) overflowed it:
/// 5% of datagrams were dropped at 800 agents, so handshakes waited for retransmission timers
/// and SWIM probes timed out.
pub const SOCKET_RECV_BUFFER_BYTES: usize = 4 << 20;

fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // `[::]` serves IPv4 peers too (as mapped addresses, made canonical on receipt),
        // whatever the host's bindv6only default.
        socket.set_only_v6(false)?;
    }
    if let Err(e) = socket.set_recv_buffer_size(SOCKET_RECV_BUFFER_BYTES) {
        tracing::debug!("cannot enlarge the UDP receive buffer: {e}");
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        if shared.faults.refuse_connections.load(Ordering::Relaxed) {
            incoming.refuse();
            continue;
        }
        let shared = shared.clone();
        let remote = crate::net::addrs::canonical(incoming.remote_address());
        let span = tracing::info_span!("peer", addr = %remote);
        crate::logging::spawn(tracing::Instrument::instrument(
            async move {
                match incoming.await {
                    Ok(conn) => {
                        let peer = crate::net::addrs::canonical(conn.remote_address());
                        shared
                            .stats
                            .connections_accepted
                            .fetch_add(1, Ordering::Relaxed);
                        let link = pool(&shared, peer, &conn);
                        receive_loop(shared, conn, link).await;
                    }
                    Err(e) => {
                        // A peer without a certificate signed by our CA ends here.
                        shared
                            .stats
                            .handshake_failures
                            .fetch_add(1, Ordering::Relaxed);
                        log_refused(&shared, remote, &e);
                    }
                }
            },
            span,
        ));
    }
}

/// How long after logging a refused peer further refusals of it are only counted.
const REFUSED_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Logs a failed handshake at info level once per peer and [`REFUSED_LOG_INTERVAL`]: a peer
/// without a certificate of the cluster's CA retries for as long as it runs, and must neither
/// go unseen nor flood the log.
fn log_refused(shared: &Shared, peer: SocketAddr, why: &dyn std::fmt::Display) {
    let now = Instant::now();
    let mut logged = shared
        .refused_logged
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if logged.len() >= 4096 {
        logged.retain(|_, at| now.duration_since(*at) < REFUSED_LOG_INTERVAL);
    }
    let due = logged
        .get(&peer.ip())
        .is_none_or(|at| now.duration_since(*at) >= REFUSED_LOG_INTERVAL);
    if due && logged.len() < 4096 {
        logged.insert(peer.ip(), now);
        tracing::info!(
            %peer,
            "refused a TLS handshake with {peer}: {why} (more from it within {} s are only counted in patina_handshake_failures_total)",
            REFUSED_LOG_INTERVAL.as_secs()
        );
    } else {
        tracing::debug!(%peer, "refused a TLS handshake: {why}");
    }
}

/// Hands a message read from a stream to the inbox. An empty stream is the peer's word that it
/// opens sealed datagrams under the connection's keys (`sealed`), not a message.
fn deliver_stream(
    shared: &Shared,
    from: SocketAddr,
    sealed: Option<&SealedLink>,
    read: Result<Vec<u8>, quinn::ReadToEndError>,
) {
    match read {
        Ok(bytes) if bytes.is_empty() => {
            if let Some(link) = sealed {
                link.confirm();
            }
        }
        Ok(bytes) => deliver(
            shared,
            Received {
                from,
                channel: Channel::Stream,
                bytes: Bytes::from(bytes),
            },
        ),
        Err(e) => tracing::debug!(%from, "refused message: {e}"),
    }
}

async fn receive_loop(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    sealed: Option<Arc<SealedLink>>,
) {
    let from = crate::net::addrs::canonical(conn.remote_address());
    loop {
        tokio::select! {
            stream = conn.accept_uni() => {
                let Ok(mut stream) = stream else { break };
                let limit = shared.config.message_bytes_max;
                let mut reading = Box::pin(async move { stream.read_to_end(limit).await });
                // A small message usually arrives whole with its stream: read it here, and
                // leave only the rest to a task of its own (one slow stream must not hold up
                // the others), saving a task and a wake-up per message.
                let first = std::future::poll_fn(|cx| {
                    std::task::Poll::Ready(std::future::Future::poll(reading.as_mut(), cx))
                })
                .await;
                match first {
                    std::task::Poll::Ready(read) => {
                        deliver_stream(&shared, from, sealed.as_deref(), read)
                    }
                    std::task::Poll::Pending => {
                        let shared = shared.clone();
                        let sealed = sealed.clone();
                        crate::logging::spawn(async move {
                            deliver_stream(&shared, from, sealed.as_deref(), reading.await);
                        });
                    }
                }
            }
            session = conn.accept_bi() => {
                let Ok((mut send, mut recv)) = session else { break };
                if shared.faults.is_cut(&from) {
                    let _ = send.reset(1u32.into());
                    let _ = recv.stop(1u32.into());
                    continue;
                }
                let handler = shared.sessions.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let refused = match handler {
                    Some(h) => h.try_send(Session { from, send, recv }).err().map(|e| e.into_inner()),
                    None => {
                        let _ = recv.stop(1u32.into());
                        None
                    }
                };
                if let Some(mut session) = refused {
                    let _ = session.send.reset(1u32.into());
                    let _ = session.recv.stop(1u32.into());
                }
            }
            datagram = conn.read_datagram() => {
                let Ok(bytes) = datagram else { break };
                if bytes.is_empty() {
                    // The keep-alive of a connection carrying only sealed datagrams.
                    continue;
                }
                if bytes.len() > shared.config.message_bytes_max {
                    tracing::debug!(%from, "refused a datagram of {} bytes", bytes.len());
                    continue;
                }
                deliver(&shared, Received { from, channel: Channel::Datagram, bytes });
            }
        }
    }
    if let (Some(receiver), Some(link)) = (&shared.sealed, &sealed) {
        // Closed for idleness by a peer that kept the keys: keep them too (this end's pool
        // kept them already when it was the one to close), unless a newer connection with
        // the peer is pooled (whose keys the peer uses now); a peer whose keys this end
        // cannot keep is told.
        let peer_kept = matches!(
            conn.close_reason(),
            Some(quinn::ConnectionError::ApplicationClosed(close))
                if close.error_code == IDLE_CLOSE_CODE.into()
                    && close.reason.as_ref() == IDLE_KEPT_CLOSE_REASON
        );
        let newer = shared
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&from)
            .is_some_and(|c| c.conn.stable_id() != conn.stable_id());
        let kept = shared.is_kept(link) || (peer_kept && !newer && shared.keep_key(link, &conn));
        if !kept {
            receiver.forget(link);
            if peer_kept && !newer {
                shared.send_notice(link, conn.remote_address());
            }
        }
    }
    let mut connections = shared.connections.lock().unwrap_or_else(|e| e.into_inner());
    if connections
        .get(&from)
        .is_some_and(|c| c.conn.stable_id() == conn.stable_id())
    {
        connections.remove(&from);
    }
}

/// Pools a connection just made, with its sealed-datagram keys when both ends offered them
/// (registered for receiving, then the peer told so on an empty stream); returns the keys.
fn pool(shared: &Shared, peer: SocketAddr, conn: &quinn::Connection) -> Option<Arc<SealedLink>> {
    let link = shared.sealed.as_ref().and_then(|receiver| {
        let protocol = conn
            .handshake_data()
            .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|data| data.protocol);
        let keeps = protocol.as_deref() == Some(ALPN_SEALED_KEPT);
        let negotiated = keeps || protocol.as_deref() == Some(ALPN_SEALED);
        let link = Arc::new(
            SealedLink::from_connection(conn, shared.config.sealed_per_key_max, keeps)
                .filter(|_| negotiated)?,
        );
        receiver.register(&link).then_some(link)
    });
    shared
        .connections
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(peer, Pooled::new(conn.clone(), link.clone()));
    // The new connection's keys replace a kept one, which still opens what the peer sends
    // until it has pooled this connection too.
    let replaced = shared.take_kept(|kept_peer, _| *kept_peer == peer);
    if !replaced.is_empty() {
        let until = Instant::now() + RETIRE_GRACE;
        shared
            .kept()
            .retiring
            .extend(replaced.into_iter().map(|key| (until, key.link)));
    }
    if link.is_some() {
        let conn = conn.clone();
        crate::logging::spawn(async move {
            if let Ok(mut stream) = conn.open_uni().await {
                let _ = stream.finish();
            }
        });
    }
    link
}

/// Path MTU discovery with one probe: quinn's default searches between the 1,200 bytes every
/// QUIC path carries and 1,452 (Ethernet's 1,500 less IPv6's and UDP's headers) by halving the
/// gap down to 20 bytes, four padded probes and their acknowledgements on every new connection.
/// With a minimum change as large as the whole gap it probes 1,452 alone, and on a path that
/// loses that probe keeps 1,200.
///
/// Why: a node opens connections all the time (first contacts, reconnects after idleness), and
/// the three probes more cost a sixth of a new connection's CPU and a quarter of a reconnect's
/// (`transport_cost`, both ends: 1.51 -> 1.27 ms and 1.21 -> 0.92 ms). What the search would
/// find between the bounds (an overlay network's 1,400 or so) only lets messages of about
/// 1,150-1,400 bytes go as one datagram instead of on a stream.
fn one_probe_mtu_discovery() -> quinn::MtuDiscoveryConfig {
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_PROBED)
        .minimum_change(MTU_PROBED - MTU_INITIAL);
    mtu
}

/// The UDP payload every QUIC path carries (quinn's initial MTU).
const MTU_INITIAL: u16 = 1_200;
/// The one UDP payload size probed: Ethernet's MTU less IPv6's and UDP's headers.
pub const MTU_PROBED: u16 = 1_452;

/// Sealed keys kept at most (about 1 KiB each); beyond, a random one goes, not the least
/// recently used: SWIM probes members round-robin, and in a cluster larger than this that order
/// would drop every key just before its use.
pub const KEPT_KEYS_MAX: usize = 1024;

/// The close a connection gets for idleness.
const IDLE_CLOSE_CODE: u32 = 0;
const IDLE_CLOSE_REASON: &[u8] = b"idle";
/// The close reason when the closing end kept the connection's sealed keys: its peer keeps
/// them too.
const IDLE_KEPT_CLOSE_REASON: &[u8] = b"idle, keys kept";
/// How long the keys of a kept key replaced by a new connection still open what comes under
/// them: the peer may send under them until it has pooled the new connection too.
const RETIRE_GRACE: Duration = Duration::from_secs(5);

/// The sealed keys of connections closed for idleness, kept to send datagrams to their peers
/// without a connection.
///
/// Why: in a cluster larger than the pool nearly every SWIM probe goes to a member whose
/// connection closed for idleness since the last one, and a new connection costs a handshake
/// (0.7-0.85 ms of CPU at both ends together, against about 40 µs for a message on an open
/// one): most of an idle agent's CPU. When both ends offered to keep keys (ALPN
/// [`crate::net::tls::ALPN_SEALED_KEPT`]), the end whose pool closes the connection for
/// idleness keeps its keys and says so in the close reason, and the other end keeps them on
/// that close; the keys stay registered for receiving, and a datagram to the peer goes sealed
/// under them with no connection. A kept key authenticates as its connection did (its mutual
/// TLS, resumed or not): it is kept at most `sealed_kept_max_age_ms` from its handshake (the
/// sender stops a tenth of that earlier, so as not to send under a key the receiver just
/// dropped) and never past its datagram limit. An end that drops a key the peer may still use
/// (full, aged out, or unable to keep it) sends the peer a notice naming it, and a peer that
/// lost a key (restarted) answers a datagram under it with one: either way the key is not used
/// again, and the next message connects (the one that met a restarted peer's notice is lost,
/// as on a pooled connection). A new connection with the peer replaces its key (which still
/// opens what comes for [`RETIRE_GRACE`]).
#[derive(Default)]
struct KeptKeys {
    by_peer: HashMap<SocketAddr, KeptKey>,
    /// Keys replaced by a new connection, forgotten for receiving after their time.
    retiring: Vec<(Instant, Arc<SealedLink>)>,
    /// Picks the key that goes when full (xorshift).
    rng: u64,
}

struct KeptKey {
    link: Arc<SealedLink>,
    /// Where the connection's packets went (the form the socket took).
    addr: SocketAddr,
    /// The connection's largest datagram when it closed.
    datagram_max: usize,
}

impl Shared {
    fn kept(&self) -> std::sync::MutexGuard<'_, KeptKeys> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `len` bytes from the send budget if it has them now.
    fn budget_allows(&self, len: usize) -> bool {
        self.budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_take(len as u64)
    }

    fn kept_max_age(&self) -> Duration {
        Duration::from_millis(self.config.sealed_kept_max_age_ms)
    }

    /// Keeps `link`, whose connection (`conn`) closes for idleness; false if it may not be
    /// kept (the ends did not agree to keep, the peer never confirmed it, it is spent or too
    /// old, or keeping is off).
    fn keep_key(&self, link: &Arc<SealedLink>, conn: &quinn::Connection) -> bool {
        let (true, Some(datagram_max)) = (self.sealed.is_some(), conn.max_datagram_size()) else {
            return false;
        };
        if !link.keeps || !link.confirmed() || link.age() >= self.kept_max_age() {
            return false;
        }
        let (mut evicted, mut replaced) = (Vec::new(), Vec::new());
        {
            let mut kept = self.kept();
            if !kept.by_peer.contains_key(&link.peer) && kept.by_peer.len() >= KEPT_KEYS_MAX {
                let KeptKeys { by_peer, rng, .. } = &mut *kept;
                evicted.extend(resume::remove_random(by_peer, rng));
            }
            let key = KeptKey {
                link: link.clone(),
                addr: conn.remote_address(),
                datagram_max,
            };
            if let Some(old) = kept.by_peer.insert(link.peer, key) {
                if !Arc::ptr_eq(&old.link, link) {
                    replaced.push(old);
                }
            }
            self.stats
                .sealed_keys_kept
                .store(kept.by_peer.len() as u64, Ordering::Relaxed);
        }
        // The evicted key's peer may still seal under it: tell it. A replaced one's peer
        // replaced it in the same way.
        self.retire(evicted, true);
        self.retire(replaced, false);
        true
    }

    fn is_kept(&self, link: &Arc<SealedLink>) -> bool {
        self.kept()
            .by_peer
            .get(&link.peer)
            .is_some_and(|key| Arc::ptr_eq(&key.link, link))
    }

    /// The kept key that seals a message of `len` bytes to `to` now, with the address to
    /// send it to, if any.
    fn kept_key_for(&self, to: SocketAddr, len: usize) -> Option<(Arc<SealedLink>, SocketAddr)> {
        let (link, addr, datagram_max) = self.usable_kept_key(to)?;
        (len + sealed::TAG_BYTES <= datagram_max).then_some((link, addr))
    }

    /// The key kept for `to`, if one may still be sent under (confirmed, not near its age
    /// limit), with the largest datagram it was made for.
    fn usable_kept_key(&self, to: SocketAddr) -> Option<(Arc<SealedLink>, SocketAddr, usize)> {
        let max_age = self.kept_max_age();
        let kept = self.kept();
        let key = kept.by_peer.get(&to)?;
        (key.link.confirmed() && key.link.age() + max_age / 10 < max_age)
            .then(|| (key.link.clone(), key.addr, key.datagram_max))
    }

    /// Takes the kept keys `pick` chooses out of the map (they are no longer sent under).
    fn take_kept(&self, mut pick: impl FnMut(&SocketAddr, &KeptKey) -> bool) -> Vec<KeptKey> {
        let mut kept = self.kept();
        let mut taken = Vec::new();
        let peers: Vec<SocketAddr> = kept
            .by_peer
            .iter()
            .filter(|(peer, key)| pick(peer, key))
            .map(|(peer, _)| *peer)
            .collect();
        for peer in peers {
            taken.extend(kept.by_peer.remove(&peer));
        }
        self.stats
            .sealed_keys_kept
            .store(kept.by_peer.len() as u64, Ordering::Relaxed);
        taken
    }

    /// Forgets taken keys for receiving; with `notify`, tells each peer (see [`KeptKeys`]).
    fn retire(&self, keys: Vec<KeptKey>, notify: bool) {
        let Some(receiver) = &self.sealed else {
            return;
        };
        for key in keys {
            receiver.forget(&key.link);
            if notify {
                self.send_notice(&key.link, key.addr);
            }
        }
    }

    /// Tells the peer of `link` that this node no longer opens what it seals under it.
    fn send_notice(&self, link: &SealedLink, addr: SocketAddr) {
        let notice = link.retire_notice();
        let _ = self.socket.try_send(&Transmit {
            destination: addr,
            ecn: None,
            contents: &notice,
            segment_size: None,
            src_ip: None,
        });
    }

    /// Seals `bytes` under the kept key `link` and sends it to `addr`.
    fn send_under_kept(&self, link: &SealedLink, addr: SocketAddr, bytes: &[u8]) {
        if link.send(&*self.socket, addr, bytes) {
            self.stats.sealed_sent.fetch_add(1, Ordering::Relaxed);
            self.stats.sealed_sent_kept.fetch_add(1, Ordering::Relaxed);
            self.stats.sent.fetch_add(1, Ordering::Relaxed);
            self.stats
                .sent_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        } else {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A connection to send on, with its sealed-datagram keys if any.
struct Link {
    conn: quinn::Connection,
    sealed: Option<Arc<SealedLink>>,
}

/// The pooled connection's sealed keys if a message of `len` bytes may go sealed: the
/// connection's QUIC datagram limit less the seal's tag (the header takes about the room of
/// QUIC's own), so a sealed datagram is never larger than a QUIC one would be.
fn sealed_link_for(pooled: &Pooled, len: usize) -> Option<Arc<SealedLink>> {
    pooled
        .sealed
        .clone()
        .filter(|link| sealed_fits(link, &pooled.conn, len))
}

/// True if a message of `len` bytes goes sealed on `link` now (the peer opens sealed
/// datagrams, and it fits).
fn sealed_fits(link: &SealedLink, conn: &quinn::Connection, len: usize) -> bool {
    link.confirmed()
        && conn
            .max_datagram_size()
            .is_some_and(|max| len + sealed::TAG_BYTES <= max)
}

/// Sends one sealed datagram to the connection's peer, or, when the socket's send buffer is
/// full (a burst), a QUIC datagram, which quinn holds until the socket takes it instead of
/// losing it there; false if neither was sent.
fn send_sealed_or_quic(
    shared: &Shared,
    conn: &quinn::Connection,
    link: &SealedLink,
    bytes: Bytes,
) -> bool {
    if link.send(&*shared.socket, conn.remote_address(), &bytes) {
        shared.stats.sealed_sent.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    send_datagram(conn, bytes)
}

/// Closes pooled connections that carried nothing for `connection_idle_ms`, then the least
/// recently active ones beyond `connections_max`. Activity is read from quinn's datagram
/// counters, so a long sync session or a stream being written counts, not only our messages.
async fn reap_loop(shared: std::sync::Weak<Shared>) {
    let period = {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        Duration::from_millis((shared.config.connection_idle_ms / 4).clamp(100, 5_000))
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let max_age = shared.kept_max_age();
        // A key the peer lost (its notice) goes quietly; one that aged out, with a notice in
        // case the peer's clock of it runs behind.
        let lost = shared.take_kept(|_, key| !key.link.confirmed());
        shared.retire(lost, false);
        let aged = shared.take_kept(|_, key| key.link.age() >= max_age);
        shared.retire(aged, true);
        let retired: Vec<Arc<SealedLink>> = {
            let now = Instant::now();
            let mut kept = shared.kept();
            let (due, waiting) = std::mem::take(&mut kept.retiring)
                .into_iter()
                .partition(|(until, _)| *until <= now);
            kept.retiring = waiting;
            due.into_iter().map(|(_, link)| link).collect()
        };
        if let Some(receiver) = &shared.sealed {
            for link in retired {
                receiver.forget(&link);
            }
        }
        if shared.endpoint.open_connections() == 0
            && shared
                .connections
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
        {
            continue;
        }
        let now = std::time::Instant::now();
        let idle = Duration::from_millis(shared.config.connection_idle_ms);
        let mut closing = Vec::new();
        let open = {
            let mut connections = shared.connections.lock().unwrap_or_else(|e| e.into_inner());
            connections.retain(|_, pooled| {
                if pooled.conn.close_reason().is_some() {
                    return false;
                }
                let stats = pooled.conn.stats();
                let quic_datagrams = stats.udp_tx.datagrams + stats.udp_rx.datagrams;
                if quic_datagrams != pooled.quic_datagrams {
                    pooled.quic_datagrams = quic_datagrams;
                    pooled.quic_active_at = now;
                }
                let sealed = pooled
                    .sealed
                    .as_ref()
                    .map_or(0, |link| link.activity.load(Ordering::Relaxed));
                let datagrams = quic_datagrams + sealed;
                if datagrams != pooled.datagrams {
                    pooled.datagrams = datagrams;
                    pooled.active_at = now;
                    if now.duration_since(pooled.quic_active_at) >= idle / 2 {
                        // In use, but only by sealed datagrams, which QUIC does not see: an
                        // empty QUIC datagram (and its acknowledgement) keeps the connection
                        // within quinn's idle timeout (twice `connection_idle_ms`).
                        let _ = pooled.conn.send_datagram(Bytes::new());
                    }
                }
                if now.duration_since(pooled.active_at) >= idle {
                    let kept = pooled
                        .sealed
                        .as_ref()
                        .is_some_and(|link| shared.keep_key(link, &pooled.conn));
                    closing.push((pooled.conn.clone(), kept));
                    return false;
                }
                true
            });
            let excess = connections
                .len()
                .saturating_sub(shared.config.connections_max.max(1));
            if excess > 0 {
                let mut by_age: Vec<(std::time::Instant, SocketAddr)> = connections
                    .iter()
                    .map(|(addr, pooled)| (pooled.active_at, *addr))
                    .collect();
                by_age.sort();
                for (_, addr) in by_age.into_iter().take(excess) {
                    if let Some(pooled) = connections.remove(&addr) {
                        let kept = pooled
                            .sealed
                            .as_ref()
                            .is_some_and(|link| shared.keep_key(link, &pooled.conn));
                        closing.push((pooled.conn, kept));
                    }
                }
            }
            connections.len()
        };
        shared
            .stats
            .connections_closed_idle
            .fetch_add(closing.len() as u64, Ordering::Relaxed);
        shared
            .stats
            .connections_open
            .store(open as u64, Ordering::Relaxed);
        for (conn, kept) in closing {
            let reason = if kept {
                IDLE_KEPT_CLOSE_REASON
            } else {
                IDLE_CLOSE_REASON
            };
            conn.close(IDLE_CLOSE_CODE.into(), reason);
        }
    }
}

fn deliver(shared: &Shared, received: Received) {
    deliver_to(&shared.inbox, &shared.faults, &shared.stats, received);
}

fn deliver_to(
    inbox: &mpsc::Sender<Received>,
    faults: &Faults,
    stats: &TransportStats,
    received: Received,
) {
    if faults.is_cut(&received.from) {
        return;
    }
    if inbox.try_send(received).is_err() {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// The QUIC client config of a connection to `to`: the node's TLS with `to`'s tickets.
fn client_config(shared: &Shared, to: SocketAddr) -> Option<quinn::ClientConfig> {
    let mut tls = shared.client_tls.clone();
    tls.resumption = rustls::client::Resumption::store(shared.tickets.for_peer(to))
        .tls12_resumption(rustls::client::Tls12Resumption::Disabled);
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).ok()?));
    client.transport_config(shared.quic.clone());
    Some(client)
}

/// The pooled connection to `to`, or a new one. `datagram` is the length of the datagram to
/// send on it, if that is what it is for: one that goes sealed expects no answer, so it does
/// not count towards the peer's silence.
async fn connection(shared: &Arc<Shared>, to: SocketAddr, datagram: Option<usize>) -> Option<Link> {
    let stalled = {
        let mut connections = shared.connections.lock().unwrap_or_else(|e| e.into_inner());
        match connections.get_mut(&to) {
            Some(pooled)
                if pooled.conn.close_reason().is_none()
                    && pooled.sealed.as_ref().is_some_and(|link| link.exhausted()) =>
            {
                // Its sealed key is spent. The replacement (new keys) is made beside the
                // sends, which go on this connection's QUIC meanwhile: no message waits for a
                // handshake, and a peer that keeps this connection but refuses new ones (its
                // certificate expired since) gets one attempt per back-off, not one per
                // message.
                // A peer silent meanwhile (crashed, restarted) is connected to afresh, as below.
                let now = Instant::now();
                if !pooled.stalled(now) {
                    if pooled.begin_renewal(now) {
                        crate::logging::spawn(renew(shared.clone(), to, pooled.conn.stable_id()));
                    }
                    return Some(Link {
                        conn: pooled.conn.clone(),
                        sealed: pooled.sealed.clone(),
                    });
                }
                connections.remove(&to).map(|pooled| pooled.conn)
            }
            Some(pooled) if pooled.conn.close_reason().is_none() => {
                let sealed = datagram.is_some_and(|len| sealed_link_for(pooled, len).is_some());
                if sealed || !pooled.stalled(Instant::now()) {
                    return Some(Link {
                        conn: pooled.conn.clone(),
                        sealed: pooled.sealed.clone(),
                    });
                }
                connections.remove(&to).map(|pooled| pooled.conn)
            }
            _ => None,
        }
    };
    if let Some(conn) = stalled {
        conn.close(1u32.into(), b"peer silent");
        shared
            .stats
            .connections_closed_stalled
            .fetch_add(1, Ordering::Relaxed);
    }
    connect(shared, to).await
}

/// The first wait before trying again to replace a connection whose sealed key is spent.
const RENEW_RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest such wait.
const RENEW_RETRY_MAX: Duration = Duration::from_secs(60);

/// Replaces the pooled connection `spent` (by its stable id), whose sealed key is spent, with
/// a new one. The spent one is not closed: what is on its way still arrives, and with nothing
/// sent on it by either end (the peer pools the new one) it closes when idle. If no new
/// connection can be made, the spent one stays pooled and the next try waits.
async fn renew(shared: Arc<Shared>, to: SocketAddr, spent: usize) {
    if connect(&shared, to).await.is_some() {
        shared.stats.sealed_rekeys.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut connections = shared.connections.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(pooled) = connections
        .get_mut(&to)
        .filter(|pooled| pooled.conn.stable_id() == spent)
    {
        pooled.renewal_failed(Instant::now());
    }
}

/// Opens a new connection to `to` and pools it (replacing what was pooled for it).
async fn connect(shared: &Arc<Shared>, to: SocketAddr) -> Option<Link> {
    let name = shared
        .server_name
        .clone()
        .unwrap_or_else(|| to.ip().to_string());
    let connecting = client_config(shared, to)
        .and_then(|config| shared.endpoint.connect_with(config, to, &name).ok())?;
    match tokio::time::timeout(Duration::from_secs(5), connecting).await {
        Ok(Ok(conn)) => {
            shared
                .stats
                .connections_opened
                .fetch_add(1, Ordering::Relaxed);
            let sealed = pool(shared, to, &conn);
            crate::logging::spawn(tracing::Instrument::instrument(
                receive_loop(shared.clone(), conn.clone(), sealed.clone()),
                tracing::info_span!("peer", addr = %to),
            ));
            Some(Link { conn, sealed })
        }
        Ok(Err(e)) => {
            shared
                .stats
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            log_refused(shared, to, &e);
            None
        }
        Err(_) => None,
    }
}

async fn send_loop(shared: Arc<Shared>, to: SocketAddr, queue: Arc<PeerQueue>) {
    loop {
        let next = queue
            .messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        let Some((channel, bytes, loss_drawn)) = next else {
            // A peer not sent to for a connection's idle time loses its queue and this task,
            // so a node that talked to every member of a large cluster once does not keep a
            // task per member.
            let idle = Duration::from_millis(shared.config.connection_idle_ms);
            if tokio::time::timeout(idle, queue.wake.notified())
                .await
                .is_err()
            {
                let mut queues = shared.queues.lock().unwrap_or_else(|e| e.into_inner());
                let empty = queue
                    .messages
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_empty();
                if empty {
                    if queues.get(&to).is_some_and(|q| Arc::ptr_eq(q, &queue)) {
                        queues.remove(&to);
                    }
                    return;
                }
            }
            continue;
        };
        // Before the connection: a message never sent must not count as unanswered there.
        if shared.faults.is_cut(&to) || (!loss_drawn && shared.faults.drops_next()) {
            shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let datagram = (channel == Channel::Datagram).then_some(bytes.len());
        let Some(link) = connection(&shared, to, datagram).await else {
            shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            // Do not spin on an unreachable peer.
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let delay = shared.faults.delay_to(to);
        if delay.is_zero() {
            send_now(&shared, link, channel, bytes).await;
        } else {
            let shared = shared.clone();
            crate::logging::spawn(async move {
                tokio::time::sleep(delay).await;
                send_now(&shared, link, channel, bytes).await;
            });
        }
    }
}

/// Writes one message on a stream of its own; false if it was lost.
async fn send_on_stream(shared: &Shared, conn: &quinn::Connection, bytes: &[u8]) -> bool {
    let len = bytes.len() as u64;
    // A peer that crashed keeps its connection "open" here until quinn's idle timeout (tens
    // of seconds), and a restarted peer at the same address is unreachable through it: once
    // its stream credit is used up, open_uni waits for good. A send that stalls closes the
    // connection instead, so the next message connects afresh (to the restarted process, if
    // that is the story).
    let stall = STALL_MIN.max(conn.rtt() * 4);
    let write_time = stall + Duration::from_secs(len / STALL_BYTES_PER_SEC);
    // Err(true): stalled; Err(false): this stream failed (the peer refused or reset it, the
    // connection closed), which loses one message, not the link.
    let send = async {
        let mut stream = tokio::time::timeout(stall, conn.open_uni())
            .await
            .map_err(|_| true)?
            .map_err(|_| false)?;
        tokio::time::timeout(write_time, stream.write_all(bytes))
            .await
            .map_err(|_| true)?
            .map_err(|_| false)?;
        stream.finish().map_err(|_| false)
    };
    match send.await {
        Ok(()) => true,
        Err(false) => false,
        Err(true) => {
            if conn.close_reason().is_none() {
                conn.close(1u32.into(), b"send stalled");
                shared
                    .stats
                    .connections_closed_stalled
                    .fetch_add(1, Ordering::Relaxed);
            }
            false
        }
    }
}

/// The least time a send may wait to open a stream before its connection counts as stalled.
const STALL_MIN: Duration = Duration::from_secs(1);
/// The slowest write a live peer is allowed (bytes per second) before it counts as stalled.
const STALL_BYTES_PER_SEC: u64 = 1 << 20;

/// Sends a datagram that fits; false if it was not sent. quinn makes room in a full datagram
/// send buffer by dropping the oldest datagrams, silently: a full buffer (a peer or a path
/// that does not keep up) drops this one instead, where the `dropped` counter sees it.
fn send_datagram(conn: &quinn::Connection, bytes: Bytes) -> bool {
    conn.datagram_send_buffer_space() >= bytes.len() && conn.send_datagram(bytes).is_ok()
}

/// Writes one message to a peer's connection, within the send budget and in-flight limit.
async fn send_now(shared: &Shared, link: Link, channel: Channel, bytes: Bytes) {
    let Link { conn, sealed } = link;
    {
        let len = bytes.len() as u64;
        let wait = shared
            .budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(len);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let _permit = shared
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("the in-flight semaphore is never closed");
        let fits_datagram = conn
            .max_datagram_size()
            .is_some_and(|max| bytes.len() <= max);
        let sealed = sealed.filter(|link| sealed_fits(link, &conn, bytes.len()));
        let sent = match (channel, sealed) {
            (Channel::Datagram, Some(sealed)) => send_sealed_or_quic(shared, &conn, &sealed, bytes),
            (Channel::Datagram, None) if fits_datagram => send_datagram(&conn, bytes),
            (Channel::Datagram | Channel::Stream, _) => send_on_stream(shared, &conn, &bytes).await,
        };
        if sent {
            shared.stats.sent.fetch_add(1, Ordering::Relaxed);
            shared.stats.sent_bytes.fetch_add(len, Ordering::Relaxed);
        } else {
            shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
