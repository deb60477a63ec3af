//! Sealed datagrams: the transport's datagrams (broadcast copies, SWIM packets) sent as plain
//! UDP datagrams on the endpoint's own socket, encrypted and authenticated with keys exported
//! from the QUIC connection to the peer (so with its mutual TLS), instead of as QUIC DATAGRAM
//! frames.
//!
//! Why: a QUIC datagram is a packet through quinn's connection state machine at both ends (its
//! task woken, frames built and parsed, timers set) and, since a DATAGRAM frame must be
//! acknowledged, an acknowledgement packet back, which QUIC sends alone after `max_ack_delay`
//! when, as in a cluster, each link carries about one copy per write. Those acknowledgements
//! were half the packets of a write and the copies two thirds of a write's CPU (BENCHMARKS,
//! "Where a write's CPU goes"). A sealed datagram is one AEAD seal and one `sendmsg` at the
//! sender, one lookup, one AEAD open and the inbox at the receiver, and nothing back.
//!
//! What QUIC still does: the handshake (mutual TLS; no key exists without it), streams (sync
//! sessions, messages larger than a datagram) and the connection's lifetime. The keys are
//! registered when the connection is pooled and forgotten when it closes, unless it closed for
//! idleness: then both ends keep them for a while, and datagrams to that peer go sealed with
//! no connection (the transport's `KeptKeys`: a SWIM probe then costs no handshake). Each end,
//! once it has registered its keys, says so on an empty QUIC stream, and sends sealed only
//! after its peer did (until then datagrams go as QUIC ones), so the first datagrams of a new
//! connection are never lost to a race with the other end's registration. What the
//! acknowledgements gave and sealed datagrams do not: a sign that the peer is still there. A
//! crashed peer is SWIM's to find (it probes); a restarted one cannot open what comes with the
//! old keys, so a node that gets a sealed datagram under a key it does not know answers with a
//! notice naming the key ([`NOTICE_MARK`] and the id: 9 bytes, smaller than any sealed
//! datagram, so a forged source address gains an attacker nothing). The sender of that key,
//! if the notice comes from the key's peer, stops sending sealed on the connection: its QUIC
//! datagrams then reach the restarted process, which resets the connection (or the silence
//! check closes it within a second), and the next message connects afresh, with new keys. A
//! forged notice needs the key's id, which only a party on the path sees, and costs no more
//! than QUIC datagrams on that connection.
//!
//! Wire format: byte 0 is [`MARK`] (its top two bits are zero, which no QUIC packet's are: a
//! QUIC packet sets the fixed bit 0x40, and the endpoint does not offer to grease it), then the
//! 8-byte id of the key, the 8-byte big-endian counter of the message under that key, the
//! ciphertext, and AES-128-GCM's 16-byte tag; the 17 header bytes are the associated data and
//! the counter the nonce. Each direction of a connection has its own key and id, and the
//! receiver keeps a window of recent counters, so a datagram replayed (by anyone) is refused.
//! Used only when both ends offered ALPN [`crate::net::tls::ALPN_SEALED`]: an older node is
//! sent QUIC datagrams as before.

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};

use crate::net::transport::TransportStats;

/// First byte of a sealed datagram.
pub const MARK: u8 = 0x1d;
/// Header bytes: the mark, the key's id, the counter.
pub const HEADER_BYTES: usize = 1 + 8 + 8;
/// AEAD tag bytes.
pub const TAG_BYTES: usize = 16;
/// Bytes a sealed datagram adds to its message.
pub const OVERHEAD_BYTES: usize = HEADER_BYTES + TAG_BYTES;
/// Label of the keying material exported from a connection's TLS session.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-patina-sealed-datagrams-v1";
/// First byte of a notice that the sender does not know a key.
pub const NOTICE_MARK: u8 = 0x1e;
/// Bytes of a notice: the mark and the key's id.
pub const NOTICE_BYTES: usize = 1 + 8;
/// Datagrams sealed under one key at most: AES-GCM's confidentiality limit as QUIC counts it
/// (RFC 9001, 6.6). Then the transport opens a new connection, whose keys are new, to replace
/// this one in its pool (see [`SealedLink::exhausted`]).
pub const SEALED_PER_KEY_MAX: u64 = 1 << 23;
/// Counters behind the highest seen that the replay window remembers. Datagrams arrive out of
/// order only by a little (one path, one sender's socket).
const WINDOW: u64 = 128;

/// True if a received UDP payload is a sealed datagram rather than a QUIC packet.
pub fn is_sealed(packet: &[u8]) -> bool {
    packet.first().is_some_and(|b| b & 0xc0 == 0)
}

/// One connection's sealed-datagram keys, both directions.
pub struct SealedLink {
    /// The peer (canonical form): what received messages say they came from.
    pub peer: SocketAddr,
    send_key: LessSafeKey,
    send_id: [u8; 8],
    next_counter: AtomicU64,
    /// Datagrams this key seals at most ([`SEALED_PER_KEY_MAX`] unless a test lowers it).
    limit: u64,
    recv_key: LessSafeKey,
    recv_id: [u8; 8],
    /// Counters opened lately.
    window: Mutex<ReplayWindow>,
    /// Sealed datagrams sent and received: the pool's sign that the connection is in use.
    pub activity: AtomicU64,
    /// Sealed datagrams opened: the peer is there (the silence check counts them as answers).
    pub received: AtomicU64,
    /// The peer has registered its keys (it said so on the connection, or sent a sealed
    /// datagram): sending sealed before would race its registration, and lose the datagram.
    confirmed: AtomicBool,
    /// When the keys were made (the connection's handshake): kept keys have an age limit.
    created: std::time::Instant,
    /// Both ends keep these keys when their connection closes for idleness (they negotiated
    /// [`crate::net::tls::ALPN_SEALED_KEPT`]).
    pub keeps: bool,
}

impl std::fmt::Debug for SealedLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedLink")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl SealedLink {
    /// The keys of a connection whose ends both offered sealed datagrams; `None` if the
    /// connection cannot export keying material. Its send key seals at most `limit` datagrams
    /// (at most [`SEALED_PER_KEY_MAX`]).
    pub fn from_connection(
        conn: &quinn::Connection,
        limit: u64,
        keeps: bool,
    ) -> Option<SealedLink> {
        let mut material = [0u8; 48];
        conn.export_keying_material(&mut material, EXPORTER_LABEL, b"")
            .ok()?;
        let mut link = SealedLink::from_material(
            &material,
            conn.side() == quinn::Side::Client,
            conn.remote_address(),
        )?;
        // (At least one: a limit of 0 would make every connection spent at once.)
        link.limit = limit.clamp(1, SEALED_PER_KEY_MAX);
        link.keeps = keeps;
        Some(link)
    }

    /// The keys of one end of a connection from its 48 bytes of exported material (each
    /// direction's 16-byte key and 8-byte id, the client's first).
    fn from_material(material: &[u8; 48], client: bool, peer: SocketAddr) -> Option<SealedLink> {
        let (client_to_server, server_to_client) = material.split_at(24);
        let (send, recv) = if client {
            (client_to_server, server_to_client)
        } else {
            (server_to_client, client_to_server)
        };
        let key = |half: &[u8]| {
            UnboundKey::new(&AES_128_GCM, &half[..16])
                .ok()
                .map(LessSafeKey::new)
        };
        let id = |half: &[u8]| -> [u8; 8] { half[16..24].try_into().expect("8 bytes") };
        Some(SealedLink {
            peer: crate::net::addrs::canonical(peer),
            send_key: key(send)?,
            send_id: id(send),
            next_counter: AtomicU64::new(0),
            limit: SEALED_PER_KEY_MAX,
            recv_key: key(recv)?,
            recv_id: id(recv),
            window: Mutex::new(ReplayWindow::default()),
            activity: AtomicU64::new(0),
            received: AtomicU64::new(0),
            confirmed: AtomicBool::new(false),
            created: std::time::Instant::now(),
            keeps: false,
        })
    }

    /// The notice that this node no longer knows the key the peer seals under: sent to the
    /// peer when this node drops a kept key, so the peer stops sealing under it.
    pub fn retire_notice(&self) -> [u8; NOTICE_BYTES] {
        let mut notice = [0u8; NOTICE_BYTES];
        notice[0] = NOTICE_MARK;
        notice[1..].copy_from_slice(&self.recv_id);
        notice
    }

    /// How long ago the keys were made.
    pub fn age(&self) -> std::time::Duration {
        self.created.elapsed()
    }

    /// The id under which the peer's datagrams arrive.
    pub fn recv_id(&self) -> [u8; 8] {
        self.recv_id
    }

    /// Records that the peer opens sealed datagrams now.
    pub fn confirm(&self) {
        self.confirmed.store(true, Ordering::Relaxed);
    }

    /// True while the peer opens sealed datagrams and the key has room: otherwise datagrams
    /// go on QUIC.
    pub fn confirmed(&self) -> bool {
        self.confirmed.load(Ordering::Relaxed) && !self.exhausted()
    }

    /// True once the send key sealed its limit of datagrams. The transport then connects
    /// again beside the sends (which go on this connection's QUIC meanwhile), and the new
    /// connection, with new exported keys, replaces this one in the pool; this one, no longer
    /// sent on, closes when idle (what it still brings is opened until then). Without this a
    /// busy link would go on QUIC datagrams for good, since it never idles.
    pub fn exhausted(&self) -> bool {
        self.next_counter.load(Ordering::Relaxed) >= self.limit
    }

    /// `message` sealed for the peer.
    pub fn seal(&self, message: &[u8]) -> Vec<u8> {
        let counter = self.next_counter.fetch_add(1, Ordering::Relaxed);
        let mut packet = Vec::with_capacity(OVERHEAD_BYTES + message.len());
        packet.push(MARK);
        packet.extend_from_slice(&self.send_id);
        packet.extend_from_slice(&counter.to_be_bytes());
        packet.extend_from_slice(message);
        let (header, body) = packet.split_at_mut(HEADER_BYTES);
        let tag = self
            .send_key
            .seal_in_place_separate_tag(nonce(counter), Aad::from(&*header), body)
            .expect("AES-GCM seals any message shorter than 64 GiB");
        packet.extend_from_slice(tag.as_ref());
        packet
    }

    /// Sends `message` sealed on `socket` to `destination` (the connection's address for the
    /// peer now); false if the socket refused it (its buffer full).
    pub fn send(
        &self,
        socket: &dyn AsyncUdpSocket,
        destination: SocketAddr,
        message: &[u8],
    ) -> bool {
        let packet = self.seal(message);
        let sent = socket
            .try_send(&Transmit {
                destination,
                ecn: None,
                contents: &packet,
                segment_size: None,
                src_ip: None,
            })
            .is_ok();
        if sent {
            self.activity.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// The message in `packet` (whose id is this link's receive id), or why not.
    fn open(&self, packet: &[u8]) -> Result<Bytes, Refused> {
        if packet.len() < OVERHEAD_BYTES {
            return Err(Refused::Malformed);
        }
        let counter = u64::from_be_bytes(packet[9..17].try_into().expect("8 bytes"));
        if !self.window().admits(counter) {
            return Err(Refused::Replayed);
        }
        let mut body = BytesMut::from(&packet[HEADER_BYTES..]);
        let len = self
            .recv_key
            .open_in_place(
                nonce(counter),
                Aad::from(&packet[..HEADER_BYTES]),
                &mut body,
            )
            .map_err(|_| Refused::Forged)?
            .len();
        // Only an authentic datagram moves the window: a forged one must not push real ones
        // out of it.
        if !self.window().record(counter) {
            return Err(Refused::Replayed);
        }
        body.truncate(len);
        self.activity.fetch_add(1, Ordering::Relaxed);
        self.received.fetch_add(1, Ordering::Relaxed);
        self.confirm();
        Ok(body.freeze())
    }

    fn window(&self) -> std::sync::MutexGuard<'_, ReplayWindow> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The counters a link opened lately: the highest, and a bitmap of the [`WINDOW`] up to it
/// (bit i: `highest - i` opened). Empty until the first.
#[derive(Debug, Default, Clone, Copy)]
struct ReplayWindow {
    highest: u64,
    seen: u128,
}

impl ReplayWindow {
    /// True unless `counter` was opened already or is too far behind to tell.
    fn admits(&self, counter: u64) -> bool {
        if self.seen == 0 || counter > self.highest {
            return true;
        }
        let behind = self.highest - counter;
        behind < WINDOW && self.seen & (1u128 << behind) == 0
    }

    /// Records `counter` as opened; false if it was already (or is too far behind).
    fn record(&mut self, counter: u64) -> bool {
        if !self.admits(counter) {
            return false;
        }
        if self.seen == 0 {
            *self = ReplayWindow {
                highest: counter,
                seen: 1,
            };
        } else if counter > self.highest {
            let shift = counter - self.highest;
            let moved = if shift >= WINDOW {
                0
            } else {
                self.seen << shift
            };
            *self = ReplayWindow {
                highest: counter,
                seen: moved | 1,
            };
        } else {
            self.seen |= 1u128 << (self.highest - counter);
        }
        true
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(bytes)
}

/// Why a sealed datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    Malformed,
    Replayed,
    Forged,
}

/// A received message, as the transport's receive side hands it on.
pub type Deliver = Box<dyn Fn(SocketAddr, Bytes) + Send + Sync>;

/// Registered links by the id of each direction.
#[derive(Default)]
struct Links {
    /// By the id the peer seals under: what arrives.
    by_recv_id: HashMap<[u8; 8], Arc<SealedLink>>,
    /// By the id this node seals under: what a notice names.
    by_send_id: HashMap<[u8; 8], Arc<SealedLink>>,
}

/// The receiving side: the keys of every open connection by id, and where messages go.
pub struct SealedReceiver {
    links: RwLock<Links>,
    deliver: Deliver,
    message_bytes_max: usize,
    stats: Arc<TransportStats>,
}

impl std::fmt::Debug for SealedReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedReceiver").finish_non_exhaustive()
    }
}

impl SealedReceiver {
    /// A receiver handing messages to `deliver`.
    pub fn new(
        deliver: Deliver,
        message_bytes_max: usize,
        stats: Arc<TransportStats>,
    ) -> SealedReceiver {
        SealedReceiver {
            links: RwLock::new(Links::default()),
            deliver,
            message_bytes_max,
            stats,
        }
    }

    fn links_mut(&self) -> std::sync::RwLockWriteGuard<'_, Links> {
        self.links.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts accepting datagrams under `link`'s keys; false (and not registered) if another
    /// open connection has one of the same ids, which then keeps QUIC datagrams.
    pub fn register(&self, link: &Arc<SealedLink>) -> bool {
        let mut links = self.links_mut();
        if links.by_recv_id.contains_key(&link.recv_id)
            || links.by_send_id.contains_key(&link.send_id)
        {
            return false;
        }
        links.by_recv_id.insert(link.recv_id, link.clone());
        links.by_send_id.insert(link.send_id, link.clone());
        true
    }

    /// Stops accepting datagrams under `link`'s keys (its connection closed).
    pub fn forget(&self, link: &Arc<SealedLink>) {
        let mut links = self.links_mut();
        if links
            .by_recv_id
            .get(&link.recv_id)
            .is_some_and(|known| Arc::ptr_eq(known, link))
        {
            links.by_recv_id.remove(&link.recv_id);
            links.by_send_id.remove(&link.send_id);
        }
    }

    /// Forgets every key, as a restart would (tests: what peers holding keys of this node's
    /// previous process see).
    pub fn forget_all(&self) {
        *self.links_mut() = Links::default();
    }

    /// The link under `id` in one of the maps.
    fn link(
        &self,
        map: impl Fn(&Links) -> &HashMap<[u8; 8], Arc<SealedLink>>,
        id: &[u8; 8],
    ) -> Option<Arc<SealedLink>> {
        map(&self.links.read().unwrap_or_else(|e| e.into_inner()))
            .get(id)
            .cloned()
    }

    /// Keys registered now.
    pub fn links(&self) -> usize {
        self.links
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_recv_id
            .len()
    }

    /// Handles one datagram from `source` that is not QUIC; returns the notice to send back
    /// when it was sealed under a key this node does not know.
    pub fn receive(&self, source: SocketAddr, packet: &[u8]) -> Option<[u8; NOTICE_BYTES]> {
        let id: [u8; 8] = packet.get(1..9)?.try_into().expect("8 bytes");
        match packet[0] {
            MARK => {}
            NOTICE_MARK if packet.len() == NOTICE_BYTES => {
                self.notice(source, id);
                return None;
            }
            _ => {
                self.stats.sealed_refused.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
        let Some(link) = self.link(|links| &links.by_recv_id, &id) else {
            self.stats.sealed_refused.fetch_add(1, Ordering::Relaxed);
            if packet.len() < OVERHEAD_BYTES {
                return None;
            }
            let mut notice = [0u8; NOTICE_BYTES];
            notice[0] = NOTICE_MARK;
            notice[1..].copy_from_slice(&id);
            return Some(notice);
        };
        if packet.len() > self.message_bytes_max.saturating_add(OVERHEAD_BYTES) {
            self.stats.sealed_refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(from = %link.peer, "refused a datagram of {} bytes", packet.len());
            return None;
        }
        match link.open(packet) {
            Ok(message) => {
                self.stats.sealed_received.fetch_add(1, Ordering::Relaxed);
                (self.deliver)(link.peer, message);
            }
            Err(why) => {
                self.stats.sealed_refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(from = %link.peer, "refused a sealed datagram: {why:?}");
            }
        }
        None
    }

    /// A peer does not know the key this node seals under as `id`: if the notice comes from
    /// that key's peer, the connection's datagrams go on QUIC from now on.
    fn notice(&self, source: SocketAddr, id: [u8; 8]) {
        match self.link(|links| &links.by_send_id, &id) {
            Some(link) if link.peer == crate::net::addrs::canonical(source) => {
                self.stats.sealed_unknown.fetch_add(1, Ordering::Relaxed);
                if link.confirmed.swap(false, Ordering::Relaxed) {
                    tracing::debug!(peer = %link.peer, "the peer does not know this connection's keys (restarted?): datagrams go on QUIC");
                }
            }
            _ => {
                self.stats.sealed_refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The endpoint's UDP socket, with sealed datagrams taken out of what quinn receives.
#[derive(Debug)]
pub struct DemuxSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    receiver: Arc<SealedReceiver>,
}

impl DemuxSocket {
    /// `inner` with sealed datagrams going to `receiver`.
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, receiver: Arc<SealedReceiver>) -> DemuxSocket {
        DemuxSocket { inner, receiver }
    }
}

/// Takes the sealed datagrams out of one received buffer of `meta.len` bytes in segments of
/// `meta.stride` (several datagrams of one sender when the kernel coalesced them), handing
/// them to `receiver` (and its notices to `reply`) and moving the QUIC packets left together:
/// all but the last segment have the stride's length, and the last stays last. quinn skips a
/// buffer left empty.
fn take_sealed(
    receiver: &SealedReceiver,
    buf: &mut [u8],
    meta: &mut RecvMeta,
    mut reply: impl FnMut(SocketAddr, &[u8]),
) {
    let stride = meta.stride.max(1);
    let len = meta.len.min(buf.len());
    if !buf[..len].chunks(stride).any(is_sealed) {
        return;
    }
    let mut kept = 0;
    let mut start = 0;
    while start < len {
        let end = (start + stride).min(len);
        if is_sealed(&buf[start..end]) {
            if let Some(notice) = receiver.receive(meta.addr, &buf[start..end]) {
                reply(meta.addr, &notice);
            }
        } else {
            if kept != start {
                buf.copy_within(start..end, kept);
            }
            kept += end - start;
        }
        start = end;
    }
    meta.len = kept;
}

impl AsyncUdpSocket for DemuxSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> std::io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        let received = match self.inner.poll_recv(cx, bufs, meta) {
            Poll::Ready(Ok(received)) => received,
            other => return other,
        };
        for (buf, meta) in bufs.iter_mut().zip(meta.iter_mut()).take(received) {
            take_sealed(&self.receiver, buf, meta, |to, notice| {
                // Best effort, as any datagram: a lost notice is sent again with the next
                // datagram under the unknown key.
                let _ = self.inner.try_send(&Transmit {
                    destination: to,
                    ecn: None,
                    contents: notice,
                    segment_size: None,
                    src_ip: None,
                });
            });
        }
        Poll::Ready(Ok(received))
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (SealedLink, Arc<SealedLink>) {
        let material: [u8; 48] = std::array::from_fn(|i| (i as u8).wrapping_mul(7).wrapping_add(1));
        let client_addr: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let server_addr: SocketAddr = "127.0.0.1:2000".parse().unwrap();
        let client = SealedLink::from_material(&material, true, server_addr).unwrap();
        let server = SealedLink::from_material(&material, false, client_addr).unwrap();
        (client, Arc::new(server))
    }

    type Delivered = Arc<Mutex<Vec<(SocketAddr, Bytes)>>>;

    fn receiver(message_bytes_max: usize) -> (SealedReceiver, Delivered) {
        let delivered: Delivered = Arc::default();
        let sink = delivered.clone();
        let receiver = SealedReceiver::new(
            Box::new(move |from, bytes| sink.lock().unwrap().push((from, bytes))),
            message_bytes_max,
            Arc::default(),
        );
        (receiver, delivered)
    }

    #[test]
    fn a_sealed_datagram_opens_once_and_a_forged_replayed_or_unknown_one_never() {
        let (client, server) = pair();
        let (receiver, delivered) = receiver(1024);
        assert!(receiver.register(&server));
        let from: SocketAddr = "127.0.0.1:1000".parse().unwrap();

        let packet = client.seal(b"changeset");
        assert!(is_sealed(&packet));
        assert_eq!(packet.len(), b"changeset".len() + OVERHEAD_BYTES);
        assert_eq!(receiver.receive(from, &packet), None);
        assert_eq!(receiver.receive(from, &packet), None, "a replay");
        // Each byte after the key's id flipped in turn (counter, body, tag): nothing opens.
        for i in HEADER_BYTES - 8..packet.len() {
            let mut forged = packet.clone();
            forged[i] ^= 0x20;
            assert_eq!(receiver.receive(from, &forged), None);
        }
        // The server's own direction, relabelled with the client's id, does not open.
        let mut reflected = server.seal(b"reflected");
        reflected[1..9].copy_from_slice(&server.recv_id());
        receiver.receive(from, &reflected);
        // Too large for the node's message limit.
        receiver.receive(from, &client.seal(&[0u8; 2000]));
        // Not QUIC, not sealed: dropped without an answer.
        let mut junk = packet.clone();
        junk[0] = 0x01;
        assert_eq!(receiver.receive(from, &junk), None);
        let later = client.seal(b"later");
        receiver.receive(from, &later);
        assert_eq!(
            *delivered.lock().unwrap(),
            vec![
                (from, Bytes::from_static(b"changeset")),
                (from, Bytes::from_static(b"later"))
            ]
        );
        assert_eq!(receiver.stats.sealed_received.load(Ordering::Relaxed), 2);
        assert_eq!(server.received.load(Ordering::Relaxed), 2);

        // Forgotten (the connection closed, or the process restarted): a datagram under the
        // key gets a notice naming it, smaller than the datagram, and opens nothing.
        receiver.forget(&server);
        assert_eq!(receiver.links(), 0);
        let notice = receiver
            .receive(from, &client.seal(b"after close"))
            .unwrap();
        assert_eq!(notice[0], NOTICE_MARK);
        assert_eq!(notice[1..], server.recv_id());
        assert_eq!(delivered.lock().unwrap().len(), 2);
        // A duplicate id is refused, not swapped in.
        assert!(receiver.register(&server));
        assert!(!receiver.register(&pair().1));
    }

    #[test]
    fn a_notice_from_the_keys_peer_turns_the_connection_to_quic_datagrams() {
        // The client's end, registered on its node; the server forgot the keys.
        let (client, _server) = pair();
        let client = Arc::new(client);
        let (receiver, _delivered) = receiver(1024);
        assert!(receiver.register(&client));
        client.confirm();
        let server_addr: SocketAddr = "127.0.0.1:2000".parse().unwrap();
        let mut notice = [NOTICE_MARK; NOTICE_BYTES];
        notice[1..].copy_from_slice(&client.send_id);
        // From anyone but the peer, or naming another key: ignored.
        receiver.receive("127.0.0.1:2001".parse().unwrap(), &notice);
        let mut other = notice;
        other[1] ^= 1;
        receiver.receive(server_addr, &other);
        assert!(client.confirmed());
        receiver.receive(server_addr, &notice);
        assert!(
            !client.confirmed(),
            "still sealing under a key the peer lost"
        );
        assert_eq!(receiver.stats.sealed_unknown.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn sealed_datagrams_are_taken_out_of_a_coalesced_buffer_and_quic_packets_kept_in_order() {
        let (client, server) = pair();
        let (receiver, delivered) = receiver(1024);
        receiver.register(&server);
        let sealed = client.seal(b"0123456789abcdef");
        let stride = sealed.len();
        // QUIC packets set bit 0x40 of their first byte; the last segment may be shorter.
        let quic = |fill: u8, len: usize| vec![0x40 | fill; len];
        let mut buf = [quic(1, stride), sealed.clone(), quic(2, stride), quic(3, 5)].concat();
        let mut meta = RecvMeta {
            len: buf.len(),
            stride,
            ..RecvMeta::default()
        };
        take_sealed(&receiver, &mut buf, &mut meta, |_, _| {
            panic!("no notice due")
        });
        assert_eq!(meta.len, 2 * stride + 5);
        assert_eq!(
            buf[..meta.len],
            [quic(1, stride), quic(2, stride), quic(3, 5)].concat()[..]
        );
        assert_eq!(delivered.lock().unwrap().len(), 1);
        // A buffer of sealed datagrams only is left empty; one under an unknown key answered.
        let mut stale = client.seal(b"y");
        stale[1] ^= 1;
        let mut only = [client.seal(b"x"), stale].concat();
        let mut meta = RecvMeta {
            len: only.len(),
            stride: only.len() / 2,
            ..RecvMeta::default()
        };
        let mut notices = Vec::new();
        take_sealed(&receiver, &mut only, &mut meta, |to, notice| {
            notices.push((to, notice.to_vec()))
        });
        assert_eq!(meta.len, 0);
        assert_eq!(delivered.lock().unwrap().len(), 2);
        assert_eq!(notices.len(), 1);
        assert_eq!(notices[0].1[0], NOTICE_MARK);
    }

    #[test]
    fn the_replay_window_admits_each_counter_once_and_forgets_only_far_behind() {
        let mut window = ReplayWindow::default();
        let mut record = |counter: u64| window.record(counter);
        assert!(record(0));
        assert!(!record(0), "a replay of the first counter");
        assert!(record(5));
        assert!(record(3), "out of order within the window");
        assert!(!record(3));
        assert!(!record(5));
        assert!(record(200));
        assert!(!record(5), "too far behind: refused, not taken as new");
        assert!(record(199));
        assert!(record(73), "the window's last slot");
        assert!(!record(72), "one beyond the window");
    }
}
