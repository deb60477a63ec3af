//! Membership: SWIM through foca. This shell owns the foca instance, its timers and its
//! outgoing packets; it turns foca's notifications into [`MemberEvent`]s (peer up, peer down)
//! for the broadcast core, which never sees foca.
//!
//! A member's identity is its gossip address, its site id, a bump (start time in ms, raised
//! when foca renews an identity declared down) and the cluster id. foca keys members by
//! address: a node that comes back at the same address with a newer bump replaces the old one.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Instant;

use crate::store::FastMap;
use foca::{
    AccumulatingRuntime, Codec, Foca, Identity, Message, OwnedNotification, PostcardCodec, State,
    Timer,
};
use patina_core::ids::SiteId;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

/// A member's identity as foca sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Actor {
    /// Gossip address (foca's key).
    pub addr: SocketAddr,
    /// Site id; all zeros in a bootstrap placeholder, before the real identity is learned.
    pub site: [u8; 16],
    /// Start time in ms since the epoch, raised on renewal.
    pub bump: u64,
    /// Cluster id.
    pub cluster: u16,
}

impl Actor {
    /// The site id.
    pub fn site_id(&self) -> SiteId {
        SiteId(self.site)
    }
}

impl Identity for Actor {
    type Addr = SocketAddr;

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn renew(&self) -> Option<Self> {
        Some(Actor {
            bump: self.bump + 1,
            ..self.clone()
        })
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

/// Whether a member may have `addr`: not unspecified, multicast or broadcast, nor port 0.
/// Such an address, gossiped by a faulty peer, reached every node's view and members file,
/// and a node bound to every interface would then advertise itself on loopback.
pub fn member_address(addr: &SocketAddr) -> bool {
    let ip = addr.ip();
    let broadcast = matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast());
    addr.port() != 0 && !ip.is_unspecified() && !ip.is_multicast() && !broadcast
}

/// A change of membership, for the broadcast core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    /// A member is up (or came back with a new identity).
    Up {
        /// Its site.
        site: SiteId,
        /// Its gossip address.
        addr: SocketAddr,
    },
    /// A member is down or left.
    Down {
        /// Its site.
        site: SiteId,
    },
}

/// A foca timer, ordered by due time (foca's own `Ord` is by kind only).
#[derive(Debug)]
struct Due(Instant, u64, Timer<Actor>);

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.0, self.1) == (other.0, other.1)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(other.0, other.1))
    }
}

type FocaNode = Foca<Actor, PostcardCodec, SmallRng, foca::NoCustomBroadcast>;

/// The membership state of one node.
pub struct Membership {
    foca: FocaNode,
    runtime: AccumulatingRuntime<Actor>,
    timers: BinaryHeap<Reverse<Due>>,
    timer_seq: u64,
    /// Live members by site (their latest address). Hashed: every broadcast message sent
    /// looks up its destination here, and an ordered map of hundreds of sites was 1.5% of a
    /// writing cluster's CPU (`loadgen live`, 800 agents).
    members: FastMap<SiteId, SocketAddr>,
    /// The bump of the identity each of `members` is held under: an identity of the same
    /// site at another address replaces it only if newer.
    member_bumps: FastMap<SiteId, u64>,
    sized_for: u32,
    probe_period: std::time::Duration,
    /// Chooses the warm members that dissemination is moved to.
    rng: SmallRng,
    /// Local health (Lifeguard's idea): 0 when foca's timers fire on time, up to
    /// [`HEALTH_MAX`] when this node is too loaded to run them on time. foca's timers are
    /// stretched by `1 + health`, so a slow node probes less often and waits longer before it
    /// accuses anyone.
    health: u32,
    /// Timer rounds on time in a row since health last changed.
    timely_rounds: u32,
    /// Doublings of the periodic announce's interval now (beyond 64 members; see
    /// [`Membership::announce_stretch`]).
    announce_doublings: u32,
    /// A member came, went or changed address since the last periodic announce.
    view_changed: bool,
    /// Periodic announces so far (the first ones never back off).
    periodic_announces: u32,
    /// Complete answers to announces in the current second (since `feeds_window`): at most
    /// [`COMPLETE_FEEDS_PER_S`].
    complete_feeds: u32,
    feeds_window: Option<Instant>,
    /// Packets handed to foca without the updates that repeat what it holds (see
    /// [`Membership::prepared`]).
    packets_filtered: u64,
    /// Identities foca holds at most, active and down (`gossip.members_max`): beyond, an
    /// update or a sender new to it is refused (see [`Membership::prepared`]).
    members_max: usize,
    /// Updates and packets refused by [`Membership::prepared`].
    refused: u64,
    /// When a refusal was last logged at warn.
    refusal_warned: Option<Instant>,
}

/// A packet as [`Membership::prepared`] hands it to foca.
#[derive(Debug, Default)]
struct Prepared {
    /// The packet rewritten, if any update was left out.
    packet: Option<Vec<u8>>,
    /// Updates refused, and why the last one was.
    refused: u16,
    refused_why: Option<&'static str>,
    /// Updates left out for repeating what foca holds.
    repeats: u16,
}

/// How far ahead of this node's clock a member's bump (its start time in ms) may be. An
/// identity's bump decides every address conflict (`win_addr_conflict`): one from the far
/// future, gossiped by a faulty peer or a clock gone wrong, would take its address from the
/// node that lives there until the clocks caught up with it, and at `u64::MAX` for good. A
/// day is far beyond the skew of any clock a cluster runs with.
pub const BUMP_AHEAD_MAX_MS: u64 = 24 * 3600 * 1000;

/// Default of `gossip.members_max`: identities a node holds at most.
pub const MEMBERS_MAX_DEFAULT: usize = 10_000;

/// Highest local health score: an overloaded node runs SWIM up to this many times + 1 slower.
pub const HEALTH_MAX: u32 = 7;

/// Timer rounds on time in a row before the health score goes down by one.
const TIMELY_ROUNDS_TO_RECOVER: u32 = 4;

/// Doublings of the periodic announce's interval at most (beyond 64 members), reached while
/// the view stays the same from one announce to the next.
pub const ANNOUNCE_BACKOFF_DOUBLINGS: u32 = 2;

/// A node's first periodic announces keep the base interval whatever its view does: while
/// the others are still learning of a node that joined, its own view may already hold still,
/// and its announces to members that do not know it yet are how they learn of it.
pub const ANNOUNCES_BEFORE_BACKOFF: u32 = 4;

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("members", &self.members)
            .finish()
    }
}

/// Largest SWIM packet (bytes). The packets travel on QUIC streams, not as raw datagrams, so
/// they need not fit one: a feed (the answer to an announce) then carries a few hundred members
/// and every probe carries a few hundred pending updates, so a node joining a large cluster
/// learns it from a few packets instead of hundreds. Every member must use the same limit
/// (foca refuses larger packets).
pub const SWIM_PACKET_BYTES: usize = 16 * 1024;

/// Most packets an announce is answered with (see [`Membership::complete_feed`]): 64 KiB, about
/// 1,900 members with IPv4 addresses, 1,450 with IPv6.
pub const FEED_PACKETS_MAX: usize = 4;

/// Most announces answered with every member per second; the rest get foca's one packet. An
/// announce is a few dozen bytes and its complete answer up to 64 KiB, sent to whatever source
/// its header names: without a bound, a peer announcing in a loop would spend the node's send
/// budget (16 MiB/s) on answers. Ten a second is 640 KiB/s at most; a node sees about one
/// announce every 20 s from each of its members' periodic ones spread over the cluster, and a
/// bootstrap node one per joiner.
pub const COMPLETE_FEEDS_PER_S: u32 = 10;

/// How a packet of some length reaches a member without waiting for a handshake
/// (see [`Membership::prefer_warm`]), in order of preference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reach {
    /// Only through a new connection: a handshake.
    Cold,
    /// Under a kept key, cut to its datagram ([`Membership::fit_updates`]).
    Cut,
    /// Whole: on a pooled connection, or under a kept key whose datagram it fits.
    Whole,
}

/// Random members [`Membership::prefer_warm`] tries for a warm one before a gossip packet
/// keeps its cold destination: with one member in six warm, all 64 cold is a chance in 100,000.
const PREFER_WARM_TRIES: usize = 64;

/// Packets with fewer member updates than this go to foca as they came (see
/// [`Membership::prepared`]): building the index costs more than a few searches.
pub const FILTER_UPDATES_MIN: u16 = 32;

/// SWIM's message kinds, in the order of [`packet_kind`]'s answer: what a node sends, counted
/// to tell direct probes from indirect ones, dissemination and rejoins.
pub const SWIM_KINDS: [&str; 11] = [
    "ping",
    "ack",
    "ping-req",
    "indirect-ping",
    "indirect-ack",
    "forwarded-ack",
    "announce",
    "feed",
    "gossip",
    "broadcast",
    "turn-undead",
];

/// The kind of a SWIM packet (an index into [`SWIM_KINDS`]), or `None` if its header does not
/// decode.
pub fn packet_kind(packet: &[u8]) -> Option<usize> {
    let header: foca::Header<Actor> = PostcardCodec.decode_header(packet).ok()?;
    Some(match header.message {
        Message::Ping(_) => 0,
        Message::Ack(_) => 1,
        Message::PingReq { .. } => 2,
        Message::IndirectPing { .. } => 3,
        Message::IndirectAck { .. } => 4,
        Message::ForwardedAck { .. } => 5,
        Message::Announce => 6,
        Message::Feed => 7,
        Message::Gossip => 8,
        Message::Broadcast => 9,
        Message::TurnUndead => 10,
    })
}

/// `packet` with its destination replaced by `to`, if it decodes and still fits a packet.
fn readdress(packet: &[u8], to: &Actor) -> Option<Vec<u8>> {
    let mut rest = packet;
    let mut header: foca::Header<Actor> = PostcardCodec.decode_header(&mut rest).ok()?;
    header.dst = to.clone();
    let mut out = Vec::with_capacity(packet.len() + 16);
    PostcardCodec.encode_header(&header, &mut out).ok()?;
    out.extend_from_slice(rest);
    (out.len() <= SWIM_PACKET_BYTES).then_some(out)
}

/// foca's settings for a cluster of about `n` nodes, probing a member every `probe_period`:
/// - up to 64 members, twice foca's retransmissions of each update (at least 6), because a
///   node that misses a join otherwise learns of it only when the new node's probe cycle
///   reaches it; beyond, foca's own count (4 log10(n + 1): 11 at 800 members). There every
///   node retransmits every member's join that many times, which keeps SWIM packets full
///   (16 KiB) for minutes after the cluster forms, and a missed join comes anyway with the
///   next announce's answer (every member): doubled, an idle agent took 15-20% more CPU in
///   the first minute after 800-1,000 agents formed, for about a second less of formation
///   (docs/BENCHMARKS.md);
/// - suspicion as foca's LAN settings compute it from the cluster size and the period (twice
///   as long beyond 64 members);
/// - up to 64 members, pending updates gossiped every 200 ms to 3 random members and an
///   announce to two random members every second, whose answer (a feed of members) closes any
///   remaining gap: cluster formation in well under a second;
/// - beyond, each of those goes to one member, updates every probe period and announces
///   every n / 50 s: a message to a member not talked to recently costs a QUIC handshake
///   (about 1.5 ms of CPU), so the rate of new partners per node stays about constant (and
///   the announces back off while nothing changes: see [`Membership::announce_stretch`]).
fn foca_config(n: u32, probe_period: std::time::Duration) -> foca::Config {
    use std::time::Duration;
    let n = NonZeroU32::new(n.max(2)).expect("at least 2");
    let small = n.get() <= 64;
    let mut config = foca::Config::new_lan(n);
    if small {
        let doubled = config.max_transmissions.get().saturating_mul(2).max(6);
        config.max_transmissions = std::num::NonZeroU8::new(doubled).expect("at least 6");
    }
    config.probe_period = probe_period;
    // An answer later than this counts as missing; foca needs it shorter than the period.
    // Half a period: the first message to a member usually waits for a QUIC handshake, which
    // takes longer on a loaded machine, and a late answer costs indirect probes to three more
    // members (three more handshakes) and a suspicion to spread.
    config.probe_rtt = probe_period / 2;
    // A suspicion is refuted when the suspect hears of it and its answer spreads back; in a
    // large cluster that gossip is slower (one random member per period), and declaring a
    // live member down costs more than noticing a dead one late (its kept links, sync partner
    // and probes all move): foca's LAN multiplier (4) for small clusters, 8 beyond.
    let multiplier = if small { 4.0 } else { 8.0 };
    let suspicion_s = f64::from(n.get()).log10().max(1.0) * multiplier * probe_period.as_secs_f64();
    config.suspect_to_down_after = Duration::from_secs_f64(suspicion_s);
    config.max_packet_size = NonZeroUsize::new(SWIM_PACKET_BYTES).expect("> 0");
    let every = |frequency: Duration, members: usize| {
        Some(foca::PeriodicParams {
            frequency,
            num_members: NonZeroUsize::new(members).expect("at least one member"),
        })
    };
    if small {
        config.periodic_gossip = every(Duration::from_millis(200), 3);
        config.periodic_announce = every(Duration::from_secs(1), 2);
    } else {
        config.periodic_gossip = every(probe_period, 1);
        config.periodic_announce = every(Duration::from_secs(u64::from(n.get() / 50)), 1);
    }
    // After a partition heals, each side believes the other down; announcing to down members
    // every few seconds (foca's LAN default is 65 s) lets them find each other again.
    config.periodic_announce_to_down_members = if small {
        every(Duration::from_secs(3), 2)
    } else {
        every(Duration::from_secs(u64::from(n.get() / 50).max(3)), 1)
    };
    config
}

impl Membership {
    /// A node with identity `me`, probing a member every `probe_period`; `seed` drives foca's
    /// random choices.
    pub fn new(me: Actor, seed: u64, probe_period: std::time::Duration) -> Membership {
        let foca = Foca::new(
            me,
            foca_config(2, probe_period),
            SmallRng::seed_from_u64(seed),
            PostcardCodec,
        );
        Membership {
            foca,
            runtime: AccumulatingRuntime::new(),
            timers: BinaryHeap::new(),
            timer_seq: 0,
            members: FastMap::default(),
            member_bumps: FastMap::default(),
            sized_for: 2,
            probe_period,
            rng: SmallRng::seed_from_u64(seed ^ 0x5eed_0f3a_4d00),
            health: 0,
            timely_rounds: 0,
            announce_doublings: 0,
            view_changed: false,
            periodic_announces: 0,
            complete_feeds: 0,
            feeds_window: None,
            packets_filtered: 0,
            members_max: MEMBERS_MAX_DEFAULT,
            refused: 0,
            refusal_warned: None,
        }
    }

    /// Sets the most identities foca may hold (`gossip.members_max`).
    pub fn set_members_max(&mut self, members_max: usize) {
        self.members_max = members_max;
    }

    /// Member updates left out of packets, and packets refused for their sender, so far (see
    /// [`Membership::prepared`]).
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Live members, in no order.
    pub fn members(&self) -> &FastMap<SiteId, SocketAddr> {
        &self.members
    }

    /// Every member foca knows, down ones included: (identity, state, incarnation).
    pub fn states(&self) -> Vec<(Actor, &'static str, u64)> {
        self.foca
            .iter_membership_state()
            .map(|m| {
                let state = match m.state() {
                    foca::State::Alive => "alive",
                    foca::State::Suspect => "suspect",
                    foca::State::Down => "down",
                };
                (m.id().clone(), state, u64::from(m.incarnation()))
            })
            .collect()
    }

    /// Members foca itself counts as active (for diagnostics; should match `members`).
    pub fn foca_member_count(&self) -> usize {
        self.foca.num_members()
    }

    /// The address of a live member.
    pub fn addr_of(&self, site: &SiteId) -> Option<SocketAddr> {
        self.members.get(site).copied()
    }

    /// Joins through a node known only by its address.
    pub fn announce(&mut self, addr: SocketAddr, cluster: u16) {
        let placeholder = Actor {
            addr,
            site: [0; 16],
            bump: 0,
            cluster,
        };
        if let Err(e) = self.foca.announce(placeholder, &mut self.runtime) {
            tracing::debug!(%addr, "announce failed: {e}");
        }
    }

    /// A packet from the network.
    pub fn handle_packet(&mut self, packet: &[u8]) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        if self.foca.iter_membership_state().len() >= self.members_max {
            self.forget_down_members();
        }
        let prepared = match self.prepared(packet, now_ms) {
            Ok(prepared) => prepared,
            Err(why) => {
                self.refused += 1;
                self.warn_refused(&format!("a SWIM packet whose sender has {why}"));
                return;
            }
        };
        self.packets_filtered += u64::from(prepared.repeats > 0);
        if let Some(why) = prepared.refused_why {
            self.refused += u64::from(prepared.refused);
            self.warn_refused(&format!(
                "{} member update(s), one with {why}",
                prepared.refused
            ));
        }
        let packet = prepared.packet.as_deref().unwrap_or(packet);
        if let Err(e) = self.foca.handle_data(packet, &mut self.runtime) {
            tracing::debug!("membership packet refused: {e}");
        }
    }

    /// Logs a refusal at warn at most once a minute (a node whose clock is a day behind
    /// refuses every peer, and a full member list every newcomer: say so), at debug otherwise.
    fn warn_refused(&mut self, what: &str) {
        let now = Instant::now();
        if self
            .refusal_warned
            .is_none_or(|at| now.duration_since(at) >= std::time::Duration::from_secs(60))
        {
            self.refusal_warned = Some(now);
            tracing::warn!(
                "membership: refused {what} (patina_member_updates_refused_total counts them; \
                 gossip.members_max = {}); the next minute's refusals are logged at debug",
                self.members_max
            );
        } else {
            tracing::debug!("membership: refused {what}");
        }
    }

    /// Forgets the members foca holds down, when it holds `members_max` identities: foca keeps
    /// a down member for a day (so a stale update cannot bring it back), and a day of churn
    /// (or a faulty peer's made-up members, which go down once probed) would otherwise fill
    /// the list and refuse every newcomer. One that comes back is probed and goes down again.
    fn forget_down_members(&mut self) {
        let down: Vec<Actor> = self
            .foca
            .iter_membership_state()
            .filter(|member| member.state() == State::Down)
            .map(|member| member.id().clone())
            .collect();
        for id in down {
            if let Err(e) = self
                .foca
                .handle_timer(Timer::RemoveDown(id), &mut self.runtime)
            {
                tracing::debug!("forgetting a down member failed: {e}");
            }
        }
    }

    /// Why `actor` may not be a member here, if it may not: it belongs to another cluster,
    /// has no site id (only an announce's placeholder has none), an address no member can have
    /// ([`member_address`]), or a bump further ahead of `now_ms` than [`BUMP_AHEAD_MAX_MS`].
    /// foca would hold any of them, probe it and gossip it on to every node.
    fn refusal(&self, actor: &Actor, now_ms: u64) -> Option<&'static str> {
        if actor.cluster != self.foca.identity().cluster {
            Some("another cluster's id")
        } else if actor.site == [0; 16] {
            Some("no site id")
        } else if !member_address(&actor.addr) {
            Some("an address no member can have")
        } else if actor.bump > now_ms.saturating_add(BUMP_AHEAD_MAX_MS) {
            Some("a start time (bump) over a day ahead of this node's clock")
        } else {
            None
        }
    }

    /// `packet` as foca should see it, in one pass over its updates:
    ///
    /// - **Screened**: without the member updates foca must not take, identities no member may
    ///   be ([`Membership::refusal`]) and, beyond `members_max` identities held, those at an
    ///   address new to foca; `Err` with the reason when the sender itself may not be taken,
    ///   since foca takes every packet's sender as an alive member. Why: foca takes whatever
    ///   identity a peer names, so one faulty or hostile member could otherwise have every
    ///   node hold, probe and gossip members of another cluster or at unusable addresses,
    ///   take any address with a bump from the far future (`u64::MAX` for good), or grow
    ///   every node's member list without bound.
    /// - **Without repeats**: without the updates that repeat what foca holds already (the
    ///   same identity, incarnation and state), if the packet carries at least
    ///   [`FILTER_UPDATES_MIN`] (and is not an announce, or for another identity of this
    ///   node, or from its address: foca drops those before it reads their updates). Why:
    ///   foca finds each update's member by a linear search of its member list, so a full
    ///   packet of ~470 updates costs ~470 x n comparisons (the 1,000-node formation test spent
    ///   62% less CPU without them), and while a large cluster forms nearly every SWIM packet
    ///   is full (feeds, and the updates every joiner gossips about the members it learned).
    ///   Most of them repeat what the receiver knows, which foca would apply as no-ops:
    ///   dropped here with one hash map built per packet. Updates about this node's own
    ///   address always go through (foca refutes or renames on them). The map is built before
    ///   any update applies, which is safe because a member's state only moves one way (an
    ///   update equal to the state it left changes nothing again); the one exception, two
    ///   identities at one address with the same bump, already flaps in foca.
    ///
    /// The packet goes as it came (`packet: None`) when nothing is left out, when it is
    /// longer than foca takes, and when anything fails to decode (foca then reports it).
    fn prepared(&self, packet: &[u8], now_ms: u64) -> Result<Prepared, &'static str> {
        let mut prepared = Prepared::default();
        if packet.len() > SWIM_PACKET_BYTES {
            return Ok(prepared);
        }
        let mut rest = packet;
        let Ok(header) = PostcardCodec.decode_header(&mut rest) else {
            return Ok(prepared);
        };
        if let Some(why) = self.refusal(&header.src, now_ms) {
            return Err(why);
        }
        let updates = header.message != Message::Broadcast && rest.len() >= 2;
        let count = if updates {
            u16::from_be_bytes([rest[0], rest[1]])
        } else {
            0
        };
        let me = self.foca.identity().addr;
        // foca drops a packet for another identity of ours, or from our own address, before
        // it reads the updates: no search to save.
        let skip_repeats = count >= FILTER_UPDATES_MIN
            && !matches!(header.message, Message::Announce | Message::TurnUndead)
            && header.dst == *self.foca.identity()
            && header.src.addr != me;
        let held_count = self.foca.iter_membership_state().len();
        // Room for identities at new addresses; the members held are looked up only when the
        // packet could fill it (a healthy cluster's never can).
        let mut room = self.members_max.saturating_sub(held_count);
        let near_full = room <= usize::from(count) + 1;
        // foldhash, not SipHash: built for every such packet, over every member (building it
        // with SipHash was about 1% of the CPU of 1,000 young agents writing).
        let known: Option<crate::store::FastMap<SocketAddr, &foca::Member<Actor>>> =
            (skip_repeats || near_full).then(|| {
                self.foca
                    .iter_membership_state()
                    .map(|member| (member.id().addr, member))
                    .collect()
            });
        let mut takes_new = |addr: &SocketAddr| -> bool {
            let new = *addr != me
                && near_full
                && known
                    .as_ref()
                    .is_some_and(|known| !known.contains_key(addr));
            if !new {
                return true;
            }
            let fits = room > 0;
            room = room.saturating_sub(1);
            fits
        };
        if !takes_new(&header.src.addr) {
            return Err("a new identity while this node holds gossip.members_max");
        }
        if !updates {
            return Ok(prepared);
        }
        let head_len = packet.len() - rest.len();
        rest = &rest[2..];
        let mut out: Option<Vec<u8>> = None;
        let mut kept: u16 = 0;
        for _ in 0..count {
            let before = rest;
            let Ok(update): Result<foca::Member<Actor>, _> = PostcardCodec.decode_member(&mut rest)
            else {
                return Ok(Prepared::default());
            };
            let bytes = &before[..before.len() - rest.len()];
            let addr = update.id().addr;
            let refused = match self.refusal(update.id(), now_ms) {
                Some(why) => Some(why),
                None if !takes_new(&addr) => Some("a new address beyond gossip.members_max"),
                None => None,
            };
            let repeat = refused.is_none()
                && skip_repeats
                && addr != me
                && known
                    .as_ref()
                    .and_then(|known| known.get(&addr))
                    .is_some_and(|held| **held == update);
            if let Some(why) = refused {
                prepared.refused += 1;
                prepared.refused_why = Some(why);
            }
            prepared.repeats += u16::from(repeat);
            let keep = refused.is_none() && !repeat;
            match &mut out {
                Some(out) if keep => {
                    out.extend_from_slice(bytes);
                    kept += 1;
                }
                Some(_) => {}
                None if keep => kept += 1,
                // The first left out: copy what came before it.
                None => out = Some(packet[..packet.len() - before.len()].to_vec()),
            }
        }
        if let Some(mut out) = out {
            // Whatever follows the updates (custom broadcasts; none here) goes through as it
            // came.
            out.extend_from_slice(rest);
            out[head_len..head_len + 2].copy_from_slice(&kept.to_be_bytes());
            prepared.packet = Some(out);
        }
        Ok(prepared)
    }

    /// `packet` cut to at most `max_len` bytes by leaving out its last member updates, when it
    /// is longer and carries updates as piggyback (every message but announces, feeds,
    /// broadcasts and turn-undead); `None` when it fits already, cannot be cut to fit, or does
    /// not decode (it then goes as it came).
    ///
    /// Why: a packet for a member this node holds a kept key for but no connection leaves as
    /// one sealed datagram only if it fits one; otherwise it waits for a new connection, a
    /// handshake (about 0.75 ms of CPU at both ends). While a large cluster's updates are
    /// still being retransmitted (each about 20 times by every node), nearly every packet is
    /// full, 16 KiB: at 800 agents about a third of an idle node's handshakes were such
    /// packets to members it held a key for. foca counts the updates left out as sent: each
    /// loses one of this node's transmissions, as in a lost packet (other nodes relay the
    /// same updates), and foca packs the ones sent fewest times first, so the ones left out
    /// are those sent most. Gossip, whose packets exist only to carry updates, is steered to
    /// members that take it whole (`prefer_warm`); what is cut is mostly probes and their
    /// answers. This node's own state rides in every header, never among the updates.
    pub fn fit_updates(packet: &[u8], max_len: usize) -> Option<Vec<u8>> {
        if packet.len() <= max_len {
            return None;
        }
        let mut rest = packet;
        let header: foca::Header<Actor> = PostcardCodec.decode_header(&mut rest).ok()?;
        if matches!(
            header.message,
            Message::Announce | Message::Broadcast | Message::TurnUndead | Message::Feed
        ) || rest.len() < 2
        {
            return None;
        }
        let head_len = packet.len() - rest.len();
        let count = u16::from_be_bytes([rest[0], rest[1]]);
        rest = &rest[2..];
        let mut end = head_len + 2;
        if end > max_len {
            return None;
        }
        let mut kept: u16 = 0;
        for _ in 0..count {
            let before = rest.len();
            let _: foca::Member<Actor> = PostcardCodec.decode_member(&mut rest).ok()?;
            let next = end + (before - rest.len());
            if next > max_len {
                break;
            }
            end = next;
            kept += 1;
        }
        // Only updates follow the count here (no custom broadcasts): the cut ends the packet.
        let mut out = packet[..end].to_vec();
        out[head_len..head_len + 2].copy_from_slice(&kept.to_be_bytes());
        Some(out)
    }

    /// When the next timer is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse(Due(at, ..))| *at)
    }

    /// Runs the timers due at `now`; how late the earliest ran tells this node's health.
    pub fn handle_timers(&mut self, now: Instant) {
        let mut lateness = None;
        while self
            .timers
            .peek()
            .is_some_and(|Reverse(Due(at, ..))| *at <= now)
        {
            let Reverse(Due(at, _, timer)) = self.timers.pop().expect("peeked");
            lateness.get_or_insert(now - at);
            if let Err(e) = self.foca.handle_timer(timer, &mut self.runtime) {
                tracing::debug!("membership timer: {e}");
            }
        }
        if let Some(lateness) = lateness {
            self.observe_lateness(lateness);
        }
    }

    /// How many times foca's interval the periodic announce being scheduled waits (foca
    /// schedules the next one as it sends one, and when the node joins). Beyond 64 members an
    /// announce every n / 50 s costs each node a handshake with a random member that often,
    /// about a third of an idle node's handshakes at 300-1,000 nodes, and once the view holds
    /// still its answers bring nothing: so the wait doubles each time no member came, went or
    /// moved since the previous announce, up to [`ANNOUNCE_BACKOFF_DOUBLINGS`] times, and is
    /// back to n / 50 s after any change. A node's first [`ANNOUNCES_BEFORE_BACKOFF`] announces
    /// since it joined keep n / 50 s. (Joins spread by SWIM's updates and probes, and
    /// partitions heal by announces to down members, which keep their interval.) Decided where
    /// foca schedules a real announce rather than when a timer fires: foca ignores the timers
    /// of a membership it left (a rejoin), which must not count.
    fn announce_stretch(&mut self) -> u32 {
        if self.sized_for <= 64 {
            return 1;
        }
        self.periodic_announces = self.periodic_announces.saturating_add(1);
        self.announce_doublings =
            if self.view_changed || self.periodic_announces <= ANNOUNCES_BEFORE_BACKOFF {
                0
            } else {
                (self.announce_doublings + 1).min(ANNOUNCE_BACKOFF_DOUBLINGS)
            };
        self.view_changed = false;
        1 << self.announce_doublings
    }

    /// Local health: how many times slower than configured SWIM runs here (1 when healthy).
    pub fn slowdown(&self) -> u32 {
        1 + self.health
    }

    /// A timer ran `lateness` after it was due. Later than an eighth of the probe period
    /// (a quarter of the time a probe waits for its answer) means this node is too slow to
    /// judge others: the score goes up at once. It comes down one step after a few rounds in a
    /// row within a 32nd of the period.
    ///
    /// Why: on an overloaded node every answer looks late, so it suspects healthy members,
    /// its indirect probes and the refutations they provoke add load everywhere, and the
    /// cluster churns (measured with 800 agents on 2 cores: three of four direct probes
    /// failed while the machine was saturated). A node that slows its own probing sheds that
    /// load and stops accusing.
    fn observe_lateness(&mut self, lateness: std::time::Duration) {
        if lateness > self.probe_period / 8 {
            self.health = (self.health + 1).min(HEALTH_MAX);
            self.timely_rounds = 0;
        } else if lateness <= self.probe_period / 32 {
            self.timely_rounds += 1;
            if self.timely_rounds >= TIMELY_ROUNDS_TO_RECOVER {
                self.health = self.health.saturating_sub(1);
                self.timely_rounds = 0;
            }
        }
    }

    /// Moves SWIM's gossip off cold members: a gossip packet that foca addressed to a random
    /// member it cannot reach whole without a handshake (`reach(addr, len)` says how a packet
    /// of `len` bytes reaches `addr`) is readdressed to a random live member that takes it
    /// whole, or failing one, cut rather than through a handshake; each member drawn is used
    /// at most once per call. Whole first: gossip exists only to carry updates, and a cut
    /// leaves most of a full packet's out. Everything else keeps its destination: probes (pings, indirect probes and
    /// their answers) because their answers are checked against it, announces because their
    /// answer (a feed of the receiver's members) heals a view only if the receiver is random.
    ///
    /// Why: in a large cluster nearly every random member is cold, and the first message to
    /// it costs a QUIC handshake (about 1.5 ms of CPU, the largest idle cost at hundreds of
    /// nodes). Gossip only needs *some* member to carry the updates on; the warm ones (kept
    /// broadcast links, recent probe partners) change over time and span the cluster, and
    /// pings still carry updates to random members. Measured at 800 agents: gossip was 35% of
    /// the cold SWIM sends, and moving announces too kept the cluster from ever settling.
    pub fn prefer_warm(
        &mut self,
        packets: &mut [(SocketAddr, Vec<u8>)],
        reach: impl Fn(SocketAddr, usize) -> Reach,
    ) {
        let movable = |packet: &[u8]| packet_kind(packet) == Some(8);
        if !packets
            .iter()
            .any(|(to, packet)| reach(*to, packet.len()) != Reach::Whole && movable(packet))
        {
            return;
        }
        // Members drawn at random until a warm one comes, each at most once per call (a
        // uniform choice among the warm ones, as when they were all listed first): testing
        // every member for warmth took two locks each, a thousand times per flush at 1,000
        // members (1.8% of the CPU of 1,000 agents writing). Among 1,000 agents on one machine
        // about one member in six is warm; after `PREFER_WARM_TRIES` draws without one that
        // takes the whole packet, the packet goes to the first drawn that takes it cut (if its
        // own destination would not), else keeps its destination.
        let mut candidates: Vec<&Actor> = self.foca.iter_members().map(|m| m.id()).collect();
        for (to, packet) in packets.iter_mut() {
            let here = reach(*to, packet.len());
            if here == Reach::Whole || !movable(packet) {
                continue;
            }
            let mut chosen = None;
            let mut fallback = None;
            for _ in 0..PREFER_WARM_TRIES {
                if candidates.is_empty() {
                    break;
                }
                let drawn = candidates.swap_remove(self.rng.random_range(0..candidates.len()));
                match reach(drawn.addr, packet.len()) {
                    Reach::Whole => {
                        chosen = Some(drawn);
                        break;
                    }
                    Reach::Cut if here == Reach::Cold && fallback.is_none() => {
                        fallback = Some(drawn);
                    }
                    _ => {}
                }
            }
            if let Some(drawn) = chosen.or(fallback) {
                if let Some(readdressed) = readdress(packet, drawn) {
                    *to = drawn.addr;
                    *packet = readdressed;
                }
            }
        }
    }

    /// The answer to an announce: foca's feed (`feed`) replaced by every active member but the
    /// announcer, shuffled, over as many packets as they take, at most [`FEED_PACKETS_MAX`]
    /// (a random part of the members beyond that). `None` keeps foca's own (no member to add,
    /// or a header that does not decode, or [`COMPLETE_FEEDS_PER_S`] reached).
    ///
    /// Why: foca's feed is one packet of random members, about 470 of them. A node joining a
    /// cluster of 1,000 learns the early members only from feeds (their joins' updates died out
    /// before it came), so two feeds left it a quarter of the cluster to find one periodic
    /// announce at a time, each answer again a random half: formation had a tail of minutes
    /// (in-memory, 1,000 nodes starting 0.1 s apart, every packet delivered: the last of them
    /// knew every other 230 s after the last start). A complete answer is SWIM's push-pull state
    /// exchange done by the pulling side: one announce fills a view. Older nodes take the extra
    /// packets as ordinary feeds.
    fn complete_feed(&mut self, feed: &[u8], now: Instant) -> Option<Vec<Vec<u8>>> {
        if self
            .feeds_window
            .is_none_or(|since| now.saturating_duration_since(since).as_secs() >= 1)
        {
            self.feeds_window = Some(now);
            self.complete_feeds = 0;
        }
        if self.complete_feeds >= COMPLETE_FEEDS_PER_S {
            return None;
        }
        let mut rest = feed;
        let header: foca::Header<Actor> = PostcardCodec.decode_header(&mut rest).ok()?;
        let head = &feed[..feed.len() - rest.len()];
        let mut members: Vec<foca::Member<Actor>> = self
            .foca
            .iter_membership_state()
            .filter(|member| {
                matches!(member.state(), State::Alive | State::Suspect)
                    && member.id().addr != header.dst.addr
            })
            .cloned()
            .collect();
        if members.is_empty() {
            return None;
        }
        members.shuffle(&mut self.rng);
        let mut members = members.iter().peekable();
        let mut packets = Vec::new();
        while packets.len() < FEED_PACKETS_MAX && members.peek().is_some() {
            let mut packet = Vec::with_capacity(SWIM_PACKET_BYTES);
            packet.extend_from_slice(head);
            let tally_at = packet.len();
            packet.extend_from_slice(&[0, 0]);
            let mut count: u16 = 0;
            while let Some(member) = members.peek() {
                let before = packet.len();
                PostcardCodec.encode_member(member, &mut packet).ok()?;
                if packet.len() > SWIM_PACKET_BYTES {
                    packet.truncate(before);
                    break;
                }
                count += 1;
                members.next();
            }
            if count == 0 {
                break;
            }
            packet[tally_at..tally_at + 2].copy_from_slice(&count.to_be_bytes());
            packets.push(packet);
        }
        if packets.is_empty() {
            return None;
        }
        self.complete_feeds += 1;
        Some(packets)
    }

    /// Leaves the cluster (the goodbye packets come out of [`Membership::drain`]).
    pub fn leave(&mut self) {
        if let Err(e) = self.foca.leave_cluster(&mut self.runtime) {
            tracing::debug!("leave: {e}");
        }
    }

    /// Holds `actor` as its site's member if it may be one: a real site at an address a
    /// member can have, and, when the site is held at another address, a newer identity
    /// (an older one, applied late from a feed or replayed, would take the site's traffic
    /// to an address it left, and its going down would then remove the site). True if held.
    fn take_up(&mut self, actor: &Actor) -> bool {
        if actor.site == [0; 16]
            || !member_address(&actor.addr)
            || actor.cluster != self.foca.identity().cluster
        {
            return false;
        }
        let site = actor.site_id();
        let held = match (self.members.get(&site), self.member_bumps.get(&site)) {
            (Some(addr), Some(bump)) => Some((*addr, *bump)),
            _ => None,
        };
        let (taken, bump) = match held {
            Some((addr, bump)) if addr == actor.addr => (true, bump.max(actor.bump)),
            Some((_, bump)) => (actor.bump > bump, actor.bump),
            None => (true, actor.bump),
        };
        if taken {
            self.members.insert(site, actor.addr);
            self.member_bumps.insert(site, bump);
        }
        taken
    }

    /// Collects what foca produced: packets to send (address, bytes) and member events.
    /// Schedules its timers. Call after every other method.
    pub fn drain(&mut self, now: Instant) -> (Vec<(SocketAddr, Vec<u8>)>, Vec<MemberEvent>) {
        let mut packets = Vec::new();
        let mut events = Vec::new();
        while let Some((to, bytes)) = self.runtime.to_send() {
            if packet_kind(&bytes) == Some(7) {
                if let Some(feed) = self.complete_feed(&bytes, now) {
                    packets.extend(feed.into_iter().map(|packet| (to.addr, packet)));
                    continue;
                }
            }
            packets.push((to.addr, bytes.to_vec()));
        }
        while let Some(notification) = self.runtime.to_notify() {
            match notification {
                // (The guard holds the member, if it may be held.)
                OwnedNotification::MemberUp(actor) if self.take_up(&actor) => {
                    events.push(MemberEvent::Up {
                        site: actor.site_id(),
                        addr: actor.addr,
                    });
                }
                OwnedNotification::Rename(old, new) => {
                    // Only the identity held goes (the site may have moved to another
                    // address since, or the old address be another site's now).
                    if old.site != new.site && self.members.get(&old.site_id()) == Some(&old.addr) {
                        self.members.remove(&old.site_id());
                        self.member_bumps.remove(&old.site_id());
                        events.push(MemberEvent::Down {
                            site: old.site_id(),
                        });
                    }
                    // foca renames whatever the state: a down identity renamed into another
                    // down one is no member.
                    let active = self.foca.iter_members().any(|m| m.id() == &new);
                    if active && self.take_up(&new) {
                        events.push(MemberEvent::Up {
                            site: new.site_id(),
                            addr: new.addr,
                        });
                    }
                }
                OwnedNotification::MemberDown(actor)
                    if self.members.get(&actor.site_id()) == Some(&actor.addr)
                        && self
                            .member_bumps
                            .get(&actor.site_id())
                            .is_none_or(|held| *held <= actor.bump) =>
                {
                    self.members.remove(&actor.site_id());
                    self.member_bumps.remove(&actor.site_id());
                    // Another identity of the site that foca holds active (one not taken up
                    // while this one was held: older, elsewhere) is the site's member now.
                    let other = self
                        .foca
                        .iter_members()
                        .map(|m| m.id().clone())
                        .filter(|id| id.site == actor.site && *id != actor)
                        .max_by_key(|id| id.bump);
                    match other {
                        Some(other) if self.take_up(&other) => events.push(MemberEvent::Up {
                            site: other.site_id(),
                            addr: other.addr,
                        }),
                        _ => events.push(MemberEvent::Down {
                            site: actor.site_id(),
                        }),
                    }
                }
                OwnedNotification::Active => {
                    // Joined (again): the first announces keep the base interval.
                    self.periodic_announces = 0;
                    self.announce_doublings = 0;
                }
                _ => {}
            }
        }
        // After the events: whether the view changed decides the next announce's wait.
        self.view_changed |= !events.is_empty();
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.timer_seq += 1;
            let mut stretch = self.slowdown();
            if matches!(timer, Timer::PeriodicAnnounce(_)) {
                // The back-off does not stack on an overloaded node's slowdown.
                stretch = stretch.max(self.announce_stretch());
            }
            self.timers
                .push(Reverse(Due(now + after * stretch, self.timer_seq, timer)));
        }
        // Keep foca's settings sized to the cluster (retransmissions, suspicion timeout).
        let n = self.foca.num_members() as u32 + 1;
        let resized = n > self.sized_for.saturating_mul(2) || n.saturating_mul(2) < self.sized_for;
        if resized
            && self
                .foca
                .set_config(foca_config(n, self.probe_period))
                .is_ok()
        {
            self.sized_for = n;
        }
        (packets, events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    /// A site held at one address is not moved to another by an older identity of it (a
    /// stale update from a feed, or one a faulty peer replays), whose going down would then
    /// have removed the site; a newer one moves it. An address no member can have is never
    /// taken, nor read back from the members file.
    #[test]
    fn only_a_newer_identity_moves_a_held_site_and_no_member_has_an_unusable_address() {
        let me = Actor {
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            site: [1; 16],
            bump: 1,
            cluster: 0,
        };
        let mut node = Membership::new(me, 1, Duration::from_secs(1));
        let at = |port: u16, bump: u64| Actor {
            addr: SocketAddr::from(([10, 0, 0, 1], port)),
            site: [7; 16],
            bump,
            cluster: 0,
        };
        let site = SiteId([7; 16]);
        assert!(node.take_up(&at(1, 10)));
        assert!(!node.take_up(&at(2, 9)), "older, elsewhere");
        assert_eq!(node.addr_of(&site), Some(at(1, 10).addr));
        assert!(node.take_up(&at(1, 9)), "the same address: its renewal");
        assert!(node.take_up(&at(3, 11)), "newer, elsewhere");
        assert_eq!(node.addr_of(&site), Some(at(3, 11).addr));
        for unusable in [
            "0.0.0.0:5",
            "224.0.0.1:5",
            "255.255.255.255:5",
            "10.0.0.1:0",
            "[::]:5",
        ] {
            let addr: SocketAddr = unusable.parse().unwrap();
            assert!(!member_address(&addr), "{addr}");
            let mut other = at(9, 99);
            other.site = [8; 16];
            other.addr = addr;
            assert!(!node.take_up(&other), "{addr}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("members");
        std::fs::write(
            &file,
            "10.0.0.1:7\n0.0.0.0:7\nnonsense\n[ff02::1]:7\n10.0.0.2:0\n",
        )
        .unwrap();
        assert_eq!(
            crate::net::gossip::remembered_members(&file),
            vec![SocketAddr::from(([10, 0, 0, 1], 7))]
        );
    }

    #[test]
    fn packet_kinds_are_read_from_the_header() {
        let me = |port: u16, site: u8| Actor {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            site: [site; 16],
            bump: 1,
            cluster: 0,
        };
        let mut a = Membership::new(me(1, 1), 1, Duration::from_secs(1));
        a.announce(me(2, 2).addr, 0);
        let (packets, _) = a.drain(Instant::now());
        let kinds: Vec<_> = packets.iter().map(|(_, p)| packet_kind(p)).collect();
        assert_eq!(kinds, vec![Some(6)], "one announce");
        assert_eq!(SWIM_KINDS[6], "announce");
        let mut b = Membership::new(me(2, 2), 2, Duration::from_secs(1));
        b.handle_packet(&packets[0].1);
        let (answers, _) = b.drain(Instant::now());
        assert!(
            answers.iter().any(|(_, p)| packet_kind(p) == Some(7)),
            "a feed"
        );
        assert_eq!(packet_kind(b"\xff\xff garbage"), None);
        assert_eq!(packet_kind(&[]), None);
    }

    /// Three members that know each other, driven by hand: packets are delivered at once.
    fn trio() -> Vec<Membership> {
        let actor = |i: u8| Actor {
            addr: SocketAddr::from(([127, 0, 0, i], 1)),
            site: [i; 16],
            bump: 1,
            cluster: 0,
        };
        let mut nodes: Vec<Membership> = (1..=3)
            .map(|i| Membership::new(actor(i), u64::from(i), Duration::from_secs(1)))
            .collect();
        nodes[1].announce(actor(1).addr, 0);
        nodes[2].announce(actor(1).addr, 0);
        let mut now = Instant::now();
        for _ in 0..20 {
            now += Duration::from_millis(500);
            let mut sent = Vec::new();
            for node in nodes.iter_mut() {
                node.handle_timers(now);
                sent.extend(node.drain(now).0);
            }
            for (to, packet) in sent {
                let i = usize::from(
                    to.ip()
                        .to_string()
                        .rsplit('.')
                        .next()
                        .unwrap()
                        .parse::<u8>()
                        .unwrap(),
                ) - 1;
                nodes[i].handle_packet(&packet);
            }
        }
        for node in nodes.iter_mut() {
            assert_eq!(node.members().len(), 2, "every member knows the other two");
            // The coarse clock above runs timers up to half a second late; start healthy.
            node.health = 0;
            node.timely_rounds = 0;
        }
        nodes
    }

    #[test]
    fn gossip_moves_to_warm_members_and_probes_stay() {
        let mut nodes = trio();
        let cold: SocketAddr = "127.0.0.2:1".parse().unwrap();
        let warm: SocketAddr = "127.0.0.3:1".parse().unwrap();
        let from_first = |message: Message<Actor>| {
            let header = foca::Header {
                src: nodes[0].foca.identity().clone(),
                src_incarnation: 0,
                dst: nodes[1].foca.identity().clone(),
                message,
            };
            let mut packet = Vec::new();
            PostcardCodec.encode_header(&header, &mut packet).unwrap();
            // A gossip packet carries updates after the header: none here.
            packet.extend_from_slice(&[0, 0]);
            packet
        };
        let gossip = from_first(Message::Gossip);
        let ping = from_first(Message::Ping(7));
        let mut announce = from_first(Message::Announce);
        announce.truncate(announce.len() - 2);
        let mut packets = vec![
            (cold, gossip.clone()),
            (cold, ping.clone()),
            (cold, announce.clone()),
        ];
        let whole_at = |at: SocketAddr| {
            move |addr: SocketAddr, _| {
                if addr == at {
                    Reach::Whole
                } else {
                    Reach::Cold
                }
            }
        };
        nodes[0].prefer_warm(&mut packets, whole_at(warm));
        assert_eq!(packets[0].0, warm, "gossip goes to the warm member");
        assert_eq!(packet_kind(&packets[0].1), Some(8));
        assert_eq!(packets[1], (cold, ping), "a probe keeps its destination");
        assert_eq!(packets[2], (cold, announce), "so does an announce");
        // foca accepts a packet only if it is addressed to its identity.
        let header: foca::Header<Actor> = PostcardCodec.decode_header(&packets[0].1[..]).unwrap();
        assert_eq!(&header.dst, nodes[2].foca.identity());
        assert_eq!(header.message, Message::Gossip);
        let third = &mut nodes[2];
        assert!(third
            .foca
            .handle_data(&packets[0].1, &mut third.runtime)
            .is_ok());
        // No warm member: nothing changes.
        let mut packets = vec![(cold, gossip.clone())];
        nodes[0].prefer_warm(&mut packets, |_, _| Reach::Cold);
        assert_eq!(packets, vec![(cold, gossip)]);
    }

    #[test]
    fn a_node_whose_timers_run_late_slows_its_swim_and_recovers() {
        let period = Duration::from_secs(1);
        let actor = |i: u8| Actor {
            addr: SocketAddr::from(([127, 0, 0, i], 1)),
            site: [i; 16],
            bump: 1,
            cluster: 0,
        };
        let mut node = Membership::new(actor(1), 1, period);
        assert_eq!(node.slowdown(), 1);
        // Timers a quarter of a period late: the score rises at once, up to the bound.
        for expected in 2..=HEALTH_MAX + 1 {
            node.observe_lateness(period / 4);
            assert_eq!(node.slowdown(), expected);
        }
        node.observe_lateness(period);
        assert_eq!(node.slowdown(), HEALTH_MAX + 1, "bounded");
        // Slightly late (between the two thresholds) changes nothing.
        for _ in 0..10 {
            node.observe_lateness(period / 16);
        }
        assert_eq!(node.slowdown(), HEALTH_MAX + 1);
        // On time: one step down every few rounds.
        for _ in 0..TIMELY_ROUNDS_TO_RECOVER {
            node.observe_lateness(Duration::ZERO);
        }
        assert_eq!(node.slowdown(), HEALTH_MAX);
        for _ in 0..TIMELY_ROUNDS_TO_RECOVER * HEALTH_MAX {
            node.observe_lateness(Duration::ZERO);
        }
        assert_eq!(node.slowdown(), 1, "fully recovered");

        // foca's timers are stretched by the slowdown. Two identical clusters; in one, the
        // first node is slow: the timers foca sets when its next ones run are twice as far.
        let (mut healthy, mut slow) = (trio(), trio());
        slow[0].observe_lateness(period);
        let new_timers = |node: &mut Membership| {
            let at = node.next_deadline().expect("a timer");
            let seq = node.timer_seq;
            node.handle_timers(at);
            node.drain(at);
            let mut offsets: Vec<Duration> = node
                .timers
                .iter()
                .filter(|Reverse(Due(_, s, _))| *s > seq)
                .map(|Reverse(Due(due, ..))| *due - at)
                .collect();
            offsets.sort();
            offsets
        };
        let on_time = new_timers(&mut healthy[0]);
        assert!(!on_time.is_empty());
        let stretched: Vec<Duration> = on_time.iter().map(|d| *d * 2).collect();
        assert_eq!(new_timers(&mut slow[0]), stretched);
        // A timer round run late counts.
        let node = &mut healthy[1];
        let due = node.next_deadline().expect("a timer");
        let before = node.slowdown();
        node.handle_timers(due + period / 2);
        assert_eq!(node.slowdown(), before + 1);
    }

    /// A wall clock for [`Membership::prepared`] (2027), after every test identity's bump.
    const NOW_MS: u64 = 1_800_000_000_000;

    /// A member `i` of a large cluster (addresses 10.x.y.z, so thousands fit).
    fn big_actor(i: u32) -> Actor {
        Actor {
            addr: SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 7000)),
            site: {
                let mut site = [3u8; 16];
                site[..4].copy_from_slice(&(i + 1).to_be_bytes());
                site
            },
            bump: 1_764_000_000_000 + u64::from(i),
            cluster: 0,
        }
    }

    /// A node (member 0) that knows members 1..=`members`.
    fn node_knowing(members: u32, now: Instant) -> Membership {
        let mut node = Membership::new(big_actor(0), 1, Duration::from_secs(1));
        let updates: Vec<foca::Member<Actor>> = (1..=members)
            .map(|i| foca::Member::alive(big_actor(i)))
            .collect();
        node.foca
            .apply_many(updates.into_iter(), false, &mut node.runtime)
            .expect("members applied");
        node.drain(now);
        assert_eq!(node.members().len(), members as usize);
        node
    }

    /// What a newcomer (member `newcomer`) announcing to `node` at `now` gets back: the
    /// answer's packets, and the newcomer's view after them.
    fn announce_to(
        node: &mut Membership,
        newcomer: u32,
        now: Instant,
    ) -> (Vec<Vec<u8>>, Membership) {
        let mut newcomer = Membership::new(big_actor(newcomer), 2, Duration::from_secs(1));
        newcomer.announce(big_actor(0).addr, 0);
        let (announce, _) = newcomer.drain(now);
        assert_eq!(announce.len(), 1);
        node.handle_packet(&announce[0].1);
        let (answer, _) = node.drain(now);
        let feeds: Vec<Vec<u8>> = answer
            .into_iter()
            .filter(|(to, packet)| {
                *to == newcomer.foca.identity().addr && packet_kind(packet) == Some(7)
            })
            .map(|(_, packet)| packet)
            .collect();
        for feed in &feeds {
            newcomer.handle_packet(feed);
        }
        newcomer.drain(now);
        (feeds, newcomer)
    }

    fn announce_to_node_knowing(members: u32) -> (Vec<Vec<u8>>, Membership) {
        let now = Instant::now();
        let mut node = node_knowing(members, now);
        announce_to(&mut node, members + 1, now)
    }

    #[test]
    fn gossip_finds_warm_members_of_a_large_view_without_testing_them_all() {
        let node_count = 1_000;
        let mut node = node_knowing(node_count, Instant::now());
        // One member in five warm (addresses ending in 0 or 6); among 1,000 agents on one
        // machine about one in six is.
        let is_warm = |addr: SocketAddr| addr.ip().to_string().ends_with(&['0', '6'][..]);
        let gossip = gossip_packet(&[]);
        let cold = big_actor(1).addr;
        assert!(!is_warm(cold));
        let mut packets: Vec<(SocketAddr, Vec<u8>)> =
            (0..3).map(|_| (cold, gossip.clone())).collect();
        let checks = std::cell::Cell::new(0u32);
        node.prefer_warm(&mut packets, |addr, _| {
            checks.set(checks.get() + 1);
            if is_warm(addr) {
                Reach::Whole
            } else {
                Reach::Cold
            }
        });
        let mut to: Vec<SocketAddr> = packets.iter().map(|(to, _)| *to).collect();
        assert!(to.iter().all(|addr| is_warm(*addr)), "{to:?}");
        to.sort();
        to.dedup();
        assert_eq!(to.len(), 3, "each warm member used once");
        // Listing every warm member first took a check of each of the 1,000.
        assert!(checks.get() < 200, "{} warmth checks", checks.get());
        // No warm member at all: the packets keep their destination, after a bounded search.
        let mut packets = vec![(cold, gossip.clone())];
        checks.set(0);
        node.prefer_warm(&mut packets, |_, _| {
            checks.set(checks.get() + 1);
            Reach::Cold
        });
        assert_eq!(packets, vec![(cold, gossip)]);
        // (The packet's own destination is checked twice: is any packet movable, is this one.)
        assert!(checks.get() as usize <= 2 + PREFER_WARM_TRIES);
    }

    /// Gossip goes to a member that takes it whole if one is drawn, else to one that takes it
    /// cut rather than through a handshake; a destination that takes it cut keeps it when no
    /// member takes it whole.
    #[test]
    fn gossip_prefers_a_member_that_takes_it_whole_then_one_that_takes_it_cut() {
        let mut node = node_knowing(40, Instant::now());
        let gossip = gossip_packet(&[]);
        let cold = big_actor(1).addr;
        let (whole, cut) = (big_actor(7).addr, big_actor(9).addr);
        let reach = |addr: SocketAddr, _| match addr {
            a if a == whole => Reach::Whole,
            a if a == cut => Reach::Cut,
            _ => Reach::Cold,
        };
        let mut packets = vec![(cold, gossip.clone())];
        node.prefer_warm(&mut packets, reach);
        assert_eq!(
            packets[0].0, whole,
            "whole first, even when a cut one is drawn before"
        );
        let no_whole = |addr: SocketAddr, _| if addr == cut { Reach::Cut } else { Reach::Cold };
        let mut packets = vec![(cold, gossip.clone())];
        node.prefer_warm(&mut packets, no_whole);
        assert_eq!(packets[0].0, cut, "cut rather than a handshake");
        let mut packets = vec![(big_actor(3).addr, gossip.clone())];
        node.prefer_warm(&mut packets, |addr: SocketAddr, len| {
            if addr == big_actor(3).addr {
                Reach::Cut
            } else {
                no_whole(addr, len)
            }
        });
        assert_eq!(packets[0].0, big_actor(3).addr, "no whole one: it stays");
    }

    /// A packet of updates from member 1 to member 0: `updates` after foca's header.
    fn gossip_packet(updates: &[foca::Member<Actor>]) -> Vec<u8> {
        gossip_packet_from(big_actor(1), updates)
    }

    /// A packet of updates from `src` to member 0.
    fn gossip_packet_from(src: Actor, updates: &[foca::Member<Actor>]) -> Vec<u8> {
        let header = foca::Header {
            src,
            src_incarnation: 0,
            dst: big_actor(0),
            message: Message::Gossip,
        };
        let mut packet = Vec::new();
        PostcardCodec
            .encode_header(&header, &mut packet)
            .expect("header");
        packet.extend_from_slice(&(updates.len() as u16).to_be_bytes());
        for update in updates {
            PostcardCodec
                .encode_member(update, &mut packet)
                .expect("member");
        }
        packet
    }

    /// Whether `node`'s foca holds exactly `actor`.
    fn holds(node: &Membership, actor: &Actor) -> bool {
        node.foca.iter_membership_state().any(|m| m.id() == actor)
    }

    /// Member updates no node may take are left out of a packet and the others taken: an
    /// identity of another cluster, without a site, at an unusable address, with a bump from
    /// the far future (one at a member's address would have taken that address from it for
    /// good); a packet whose sender is such an identity is refused whole (foca takes every
    /// sender as alive). Once the node holds `members_max` identities, a new address is
    /// refused and a known member's renewal is still taken.
    #[test]
    fn member_updates_no_node_may_hold_are_refused_and_the_member_list_is_bounded() {
        let now = Instant::now();
        let mut node = node_knowing(10, now);
        let other_cluster = Actor {
            cluster: 1,
            ..big_actor(12)
        };
        let no_site = Actor {
            site: [0; 16],
            ..big_actor(13)
        };
        let unusable = Actor {
            addr: SocketAddr::from(([0, 0, 0, 0], 7000)),
            ..big_actor(14)
        };
        let far_future = Actor {
            bump: u64::MAX,
            ..big_actor(15)
        };
        let takes_an_address = Actor {
            site: [9; 16],
            bump: u64::MAX,
            ..big_actor(3)
        };
        let refused = [
            other_cluster,
            no_site,
            unusable,
            far_future,
            takes_an_address,
        ];
        let mut updates = vec![foca::Member::alive(big_actor(11))];
        updates.extend(refused.iter().cloned().map(foca::Member::alive));
        updates.push(foca::Member::alive(big_actor(16)));
        node.handle_packet(&gossip_packet(&updates));
        node.drain(now);
        assert!(holds(&node, &big_actor(11)) && holds(&node, &big_actor(16)));
        for actor in &refused {
            assert!(!holds(&node, actor), "{actor:?}");
        }
        assert!(holds(&node, &big_actor(3)), "member 3 keeps its address");
        assert_eq!(node.refused(), refused.len() as u64);

        // A sender no node may hold: nothing of its packet is taken.
        for sender in &refused {
            node.handle_packet(&gossip_packet_from(
                sender.clone(),
                &[foca::Member::alive(big_actor(17))],
            ));
            node.drain(now);
            assert!(!holds(&node, &big_actor(17)) && !holds(&node, sender));
        }
        assert_eq!(node.refused(), 2 * refused.len() as u64);

        // Full: members 1..=11 and 16.
        node.set_members_max(12);
        let renewed = Actor {
            bump: big_actor(2).bump + 1,
            ..big_actor(2)
        };
        node.handle_packet(&gossip_packet(&[
            foca::Member::alive(big_actor(18)),
            foca::Member::alive(renewed.clone()),
        ]));
        node.drain(now);
        assert!(!holds(&node, &big_actor(18)), "new beyond the cap");
        assert!(
            holds(&node, &renewed),
            "a renewal at a held address is taken"
        );
        node.handle_packet(&gossip_packet_from(big_actor(19), &[]));
        node.drain(now);
        assert!(!holds(&node, &big_actor(19)), "a new sender beyond the cap");
        assert_eq!(node.refused(), 2 * refused.len() as u64 + 2);
        // Full, foca forgets the members it holds down (for a day otherwise): room for one.
        node.foca
            .apply_many(
                std::iter::once(foca::Member::down(big_actor(5))),
                false,
                &mut node.runtime,
            )
            .expect("applied");
        node.drain(now);
        node.handle_packet(&gossip_packet_from(big_actor(19), &[]));
        node.drain(now);
        assert!(
            holds(&node, &big_actor(19)),
            "in the room a down member left"
        );
        assert!(!node
            .foca
            .iter_membership_state()
            .any(|member| member.id() == &big_actor(5)));
        // One packet fills the room left, and no more.
        let held = node.foca.iter_membership_state().len();
        node.set_members_max(held + 2);
        let new: Vec<_> = (20..25)
            .map(|i| foca::Member::alive(big_actor(i)))
            .collect();
        node.handle_packet(&gossip_packet(&new));
        node.drain(now);
        let taken: Vec<bool> = (20..25).map(|i| holds(&node, &big_actor(i))).collect();
        assert_eq!(taken, [true, true, false, false, false]);
        assert_eq!(node.refused(), 2 * refused.len() as u64 + 5);
    }

    /// When the identity a site is held under goes down while foca holds another active
    /// identity of the site (an older one elsewhere, not taken up while the newer was held),
    /// that one becomes the site's member; when it goes down too, the site is down.
    #[test]
    fn when_a_sites_held_identity_goes_down_another_active_one_takes_its_place() {
        let now = Instant::now();
        let mut node = node_knowing(3, now);
        let site = big_actor(2).site_id();
        let older_elsewhere = Actor {
            addr: SocketAddr::from(([10, 9, 9, 9], 7000)),
            bump: big_actor(2).bump - 5,
            ..big_actor(2)
        };
        let apply = |node: &mut Membership, update: foca::Member<Actor>| {
            node.foca
                .apply_many(std::iter::once(update), false, &mut node.runtime)
                .expect("applied");
            node.drain(now).1
        };
        let events = apply(&mut node, foca::Member::alive(older_elsewhere.clone()));
        assert!(
            events.is_empty(),
            "older: not taken while the newer is held"
        );
        assert_eq!(node.addr_of(&site), Some(big_actor(2).addr));
        let events = apply(&mut node, foca::Member::down(big_actor(2)));
        assert_eq!(
            events,
            vec![MemberEvent::Up {
                site,
                addr: older_elsewhere.addr
            }]
        );
        assert_eq!(node.addr_of(&site), Some(older_elsewhere.addr));
        let events = apply(&mut node, foca::Member::down(older_elsewhere));
        assert_eq!(events, vec![MemberEvent::Down { site }]);
        assert_eq!(node.addr_of(&site), None);
    }

    /// A full packet for a member held under a kept key is cut to a datagram's room: its
    /// first updates in order, under their count, which foca takes; a packet that fits, one
    /// without piggybacked updates (an announce, a feed) and one whose header alone is too
    /// long are left as they are.
    #[test]
    fn a_packet_is_cut_to_a_datagram_by_leaving_out_its_last_updates() {
        let now = Instant::now();
        let updates: Vec<foca::Member<Actor>> = (2..302)
            .map(|i| foca::Member::alive(big_actor(i)))
            .collect();
        let packet = gossip_packet(&updates);
        let room = 1_200;
        assert!(packet.len() > 4 * room);
        let fitted = Membership::fit_updates(&packet, room).expect("cut");
        assert!(fitted.len() <= room);
        let mut rest = fitted.as_slice();
        let header: foca::Header<Actor> = PostcardCodec.decode_header(&mut rest).expect("header");
        assert_eq!(header.message, Message::Gossip);
        assert_eq!(header.dst, big_actor(0));
        let count = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
        for update in &updates[..count] {
            let decoded: foca::Member<Actor> =
                PostcardCodec.decode_member(&mut rest).expect("member");
            assert_eq!(&decoded, update);
        }
        assert!(rest.is_empty(), "nothing after the updates kept");
        assert!(
            gossip_packet(&updates[..count + 1]).len() > room,
            "as many as fit: {count}"
        );
        let mut receiver = node_knowing(1, now);
        receiver.handle_packet(&fitted);
        let (_, events) = receiver.drain(now);
        assert_eq!(events.len(), count, "every update kept comes up");

        assert!(
            Membership::fit_updates(&packet, packet.len()).is_none(),
            "fits"
        );
        let short = gossip_packet(&updates[..3]);
        assert!(Membership::fit_updates(&short, room).is_none(), "fits");
        assert!(
            Membership::fit_updates(&packet, 20).is_none(),
            "the header alone is longer"
        );
        let mut node = node_knowing(400, now);
        let (feed, _) = announce_to(&mut node, 2_000, now);
        assert!(feed[0].len() > room);
        assert_eq!(packet_kind(&feed[0]), Some(7), "a feed");
        assert!(Membership::fit_updates(&feed[0], room).is_none());
        let mut announcer = Membership::new(big_actor(3_000), 3, Duration::from_secs(1));
        announcer.announce(big_actor(0).addr, 0);
        let (announce, _) = announcer.drain(now);
        assert!(
            Membership::fit_updates(&announce[0].1, 10).is_none(),
            "an announce"
        );
        assert!(Membership::fit_updates(b"\xff\xff not a packet", 4).is_none());

        // Probes foca built itself, full of the updates of the members a node just learned:
        // cut, each is its header, a count and that many whole updates, nothing after.
        let mut prober = Membership::new(big_actor(0), 1, Duration::from_secs(1));
        let learned = (1..=400).map(|i| foca::Member::alive(big_actor(i)));
        prober
            .foca
            .apply_many(learned, true, &mut prober.runtime)
            .expect("members applied");
        prober.drain(now);
        let mut probes = Vec::new();
        for second in 1..=4 {
            let at = now + Duration::from_secs(second);
            prober.handle_timers(at);
            probes.extend(
                prober
                    .drain(at)
                    .0
                    .into_iter()
                    .filter(|(_, p)| packet_kind(p) == Some(0) && p.len() > room),
            );
        }
        assert!(!probes.is_empty(), "full probes");
        for (_, probe) in &probes {
            let cut = Membership::fit_updates(probe, room).expect("cut");
            assert!(cut.len() <= room);
            let mut rest = cut.as_slice();
            let header: foca::Header<Actor> =
                PostcardCodec.decode_header(&mut rest).expect("header");
            assert!(matches!(header.message, Message::Ping(_)));
            let head_len = cut.len() - rest.len();
            let count = u16::from_be_bytes([rest[0], rest[1]]);
            rest = &rest[2..];
            assert!(count > 0);
            for _ in 0..count {
                let _: foca::Member<Actor> =
                    PostcardCodec.decode_member(&mut rest).expect("member");
            }
            assert!(rest.is_empty());
            assert_eq!(cut[..head_len], probe[..head_len], "the header as it was");
            assert_eq!(
                cut[head_len + 2..],
                probe[head_len + 2..cut.len()],
                "the first updates as they were"
            );
        }
    }

    /// Updates that repeat what foca holds are dropped before foca searches for them, and
    /// what foca ends up holding is the same as with the whole packet: new members, newer
    /// incarnations and news about this node itself all go through.
    #[test]
    fn updates_foca_already_holds_are_dropped_before_it_searches_for_them() {
        let now = Instant::now();
        let mut updates: Vec<foca::Member<Actor>> =
            (2..62).map(|i| foca::Member::alive(big_actor(i))).collect();
        updates.extend((0..20).map(|i| foca::Member::alive(big_actor(5_000 + i))));
        updates.extend((0..20).map(|i| foca::Member::new(big_actor(100 + i), 1, State::Suspect)));
        updates.push(foca::Member::new(big_actor(0), 0, State::Suspect));
        let packet = gossip_packet(&updates);
        let mut filtering = node_knowing(1_200, now);
        let filtered = filtering
            .prepared(&packet, NOW_MS)
            .expect("taken")
            .packet
            .expect("repeats dropped");
        // Few updates, or none repeated: the packet goes as it came.
        assert!(filtering
            .prepared(&gossip_packet(&updates[..31]), NOW_MS)
            .expect("taken")
            .packet
            .is_none());
        assert!(filtering
            .prepared(&gossip_packet(&updates[60..]), NOW_MS)
            .expect("taken")
            .packet
            .is_none());
        let mut rest = filtered.as_slice();
        let _: foca::Header<Actor> = PostcardCodec.decode_header(&mut rest).expect("header");
        assert_eq!(
            u16::from_be_bytes([rest[0], rest[1]]),
            41,
            "60 of 101 dropped"
        );
        filtering.handle_packet(&packet);
        assert_eq!(filtering.packets_filtered, 1);
        let (_, events) = filtering.drain(now);
        // The same packet straight into foca.
        let mut whole = node_knowing(1_200, now);
        whole
            .foca
            .handle_data(&packet, &mut whole.runtime)
            .expect("accepted");
        let (_, whole_events) = whole.drain(now);
        assert_eq!(events, whole_events);
        assert_eq!(events.len(), 20, "the new members are up");
        let sorted = |node: &Membership| {
            let mut states = node.states();
            states.sort_by_key(|(actor, ..)| actor.addr);
            states
        };
        assert_eq!(sorted(&filtering), sorted(&whole));
        // The same updates to pass on: the new members and the suspicions.
        assert_eq!(
            filtering.foca.updates_backlog(),
            whole.foca.updates_backlog()
        );
        assert_eq!(whole.foca.updates_backlog(), 40);
    }

    /// At most [`COMPLETE_FEEDS_PER_S`] announces a second are answered with every member;
    /// beyond, foca's one packet: a peer announcing in a loop gets a bounded answer.
    #[test]
    fn complete_answers_to_announces_are_bounded_per_second() {
        let start = Instant::now();
        let mut node = node_knowing(1_200, start);
        let packets: Vec<usize> = (0..COMPLETE_FEEDS_PER_S + 5)
            .map(|i| announce_to(&mut node, 2_000 + i, start).0.len())
            .collect();
        let complete = packets.iter().filter(|count| **count > 1).count();
        assert_eq!(complete, COMPLETE_FEEDS_PER_S as usize, "{packets:?}");
        assert!(packets[COMPLETE_FEEDS_PER_S as usize..]
            .iter()
            .all(|count| *count == 1));
        // The next second: complete again.
        let (feeds, newcomer) = announce_to(&mut node, 3_000, start + Duration::from_secs(1));
        assert!(feeds.len() > 1);
        // Every member of the node (the other newcomers too, and the newcomer itself, whose
        // place the node takes in the newcomer's view).
        assert_eq!(newcomer.members().len(), node.members().len());
    }

    /// An announce is answered with every member the receiver knows, over as many packets as
    /// they take (foca's own feed is one packet of random members: about 470 of 1,200), each
    /// within the packet limit; a newcomer learns the whole cluster from one announce.
    #[test]
    fn an_announce_is_answered_with_every_member() {
        let (feeds, newcomer) = announce_to_node_knowing(1_200);
        assert!(feeds.len() >= 2, "{} packets", feeds.len());
        assert!(feeds.iter().all(|feed| feed.len() <= SWIM_PACKET_BYTES));
        assert_eq!(
            newcomer.members().len(),
            1_201,
            "the newcomer knows the node and every member it knew"
        );
        // A small cluster's answer is one packet, as foca's.
        let (feeds, newcomer) = announce_to_node_knowing(30);
        assert_eq!(feeds.len(), 1);
        assert_eq!(newcomer.members().len(), 31);
    }

    /// Beyond [`FEED_PACKETS_MAX`] packets' worth of members the answer is that many packets of
    /// distinct random members: an announce costs the receiver a bounded answer.
    #[test]
    fn an_announce_to_a_huge_cluster_is_answered_with_a_bounded_part_of_it() {
        let (feeds, newcomer) = announce_to_node_knowing(5_000);
        assert_eq!(feeds.len(), FEED_PACKETS_MAX);
        assert!(feeds.iter().all(|feed| feed.len() <= SWIM_PACKET_BYTES));
        let learned = newcomer.members().len();
        // Each packet holds about 470 members.
        assert!(
            (FEED_PACKETS_MAX * 400..=FEED_PACKETS_MAX * 520).contains(&learned),
            "{learned} members learned"
        );
    }

    #[test]
    fn settings_for_every_size_and_period_are_accepted_by_foca() {
        let me = Actor {
            addr: "127.0.0.1:1".parse().expect("an address"),
            site: [1; 16],
            bump: 1,
            cluster: 0,
        };
        for period_ms in [100, 1_000, 8_000, 60_000] {
            let period = Duration::from_millis(period_ms);
            let mut foca: FocaNode = Foca::new(
                me.clone(),
                foca_config(2, period),
                SmallRng::seed_from_u64(1),
                PostcardCodec,
            );
            for n in [2, 64, 65, 1_000, 100_000] {
                let config = foca_config(n, period);
                assert!(config.probe_rtt < config.probe_period);
                assert!(config.suspect_to_down_after >= config.probe_period);
                assert!(
                    foca.set_config(config).is_ok(),
                    "foca refused the settings for {n} members at {period_ms} ms"
                );
            }
        }
    }

    /// Runs `nodes` (node i at 127.0.0.1, port 1000 + i) up to `until`: every timer on
    /// time, every packet delivered at once. `observe` sees the nodes after each step; returns
    /// the announces sent.
    fn run_until(
        nodes: &mut [Membership],
        now: &mut Instant,
        until: Instant,
        mut observe: impl FnMut(&[Membership]),
    ) -> usize {
        let mut announces = 0;
        // First what the nodes have to send already (announces).
        let mut next = Some(*now);
        while let Some(at) = next {
            *now = at;
            let mut sent = Vec::new();
            for node in nodes.iter_mut() {
                node.handle_timers(at);
                sent.extend(node.drain(at).0);
            }
            while !sent.is_empty() {
                let mut answers = Vec::new();
                for (to, packet) in sent {
                    announces += usize::from(packet_kind(&packet) == Some(6));
                    let i = usize::from(to.port() - 1000);
                    if let Some(node) = nodes.get_mut(i) {
                        node.handle_packet(&packet);
                        answers.extend(node.drain(at).0);
                    }
                }
                sent = answers;
            }
            observe(nodes);
            next = nodes
                .iter()
                .filter_map(Membership::next_deadline)
                .min()
                .filter(|at| *at <= until);
        }
        *now = until;
        announces
    }

    /// Beyond 64 members the periodic announce backs off while the view holds still (every
    /// node then announces a quarter as often), and a member joining brings every node back
    /// to the base interval.
    #[test]
    fn periodic_announces_back_off_while_the_view_holds_and_resume_on_a_change() {
        let actor = |i: u16| Actor {
            addr: SocketAddr::from(([127, 0, 0, 1], 1000 + i)),
            site: {
                let mut site = [7u8; 16];
                site[..2].copy_from_slice(&(i + 1).to_be_bytes());
                site
            },
            bump: 1,
            cluster: 0,
        };
        // foca's settings are resized when the count doubles or halves: at 140 every node is
        // sized for more than 64.
        let n = 140u16;
        let period = Duration::from_secs(1);
        let mut nodes: Vec<Membership> = (0..n)
            .map(|i| Membership::new(actor(i), u64::from(i) + 1, period))
            .collect();
        let start = Instant::now();
        let mut now = start;
        for node in nodes.iter_mut().skip(1) {
            node.announce(actor(0).addr, 0);
        }
        run_until(
            &mut nodes,
            &mut now,
            start + Duration::from_secs(40),
            |_| {},
        );
        assert!(
            nodes
                .iter()
                .all(|node| node.members().len() == usize::from(n) - 1),
            "the cluster formed: {:?}",
            nodes
                .iter()
                .map(|node| node.members().len())
                .collect::<Vec<_>>()
        );
        let window = Duration::from_secs(40);
        let until = now + window;
        let announces = run_until(&mut nodes, &mut now, until, |_| {});
        // What the base interval (n / 50 s for the size each node's settings are for) gives.
        let base: u64 = nodes
            .iter()
            .map(|node| {
                assert!(node.sized_for > 64);
                window.as_secs() / u64::from(node.sized_for / 50).max(1)
            })
            .sum();
        let announces = announces as u64;
        assert!(
            nodes
                .iter()
                .all(|node| node.announce_doublings == ANNOUNCE_BACKOFF_DOUBLINGS),
            "every node backed off"
        );
        assert!(
            (base / 8..=base / 4 + u64::from(n)).contains(&announces),
            "{announces} announces in {window:?}, base {base}"
        );
        // A newcomer: every node goes back to the base interval once it knows of it.
        let mut newcomer = Membership::new(actor(n), 99, period);
        newcomer.announce(actor(0).addr, 0);
        nodes.push(newcomer);
        let mut reset = vec![false; nodes.len()];
        let until = now + Duration::from_secs(20);
        run_until(&mut nodes, &mut now, until, |nodes| {
            for (i, node) in nodes.iter().enumerate() {
                reset[i] |= node.members().len() == usize::from(n) && node.announce_doublings == 0;
            }
        });
        assert!(
            nodes
                .iter()
                .all(|node| node.members().len() == usize::from(n)),
            "the newcomer joined"
        );
        let not_reset = reset[..usize::from(n)].iter().filter(|r| !**r).count();
        assert_eq!(
            not_reset, 0,
            "nodes that kept the longer interval after a join"
        );
    }

    /// 1,000 nodes start 0.1 s apart, each announcing to the first and to a random earlier
    /// one, probing every 10 s (loadgen's setting at this size); packets take 50 ms, none is
    /// lost, timers run on time. Every node must know every other within a minute of the last
    /// start. With foca's one-packet feeds the last of them took 230 s here: nodes that joined
    /// late learn the early members only from feeds (the early joins' updates had died out),
    /// one random half at a time.
    #[test]
    fn a_thousand_nodes_starting_one_by_one_know_each_other_within_a_minute() {
        let n = 1_000u32;
        let period = Duration::from_secs(10);
        let start_gap = Duration::from_millis(100);
        let delay = Duration::from_millis(50);
        let index = |addr: SocketAddr| match addr.ip() {
            std::net::IpAddr::V4(v4) => {
                let [_, a, b, c] = v4.octets();
                (usize::from(a) << 16) | (usize::from(b) << 8) | usize::from(c)
            }
            std::net::IpAddr::V6(_) => unreachable!("IPv4 only"),
        };
        let start = Instant::now();
        let last_start = start + start_gap * (n - 1);
        let mut nodes: Vec<Option<Membership>> = (0..n).map(|_| None).collect();
        // Packets in flight (due, sequence, to) and the nodes' timers (due, node); a node's
        // entry is checked against its real deadline when it comes up.
        let mut packets: BinaryHeap<Reverse<(Instant, u64, usize)>> = BinaryHeap::new();
        let mut in_flight: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut timers: BinaryHeap<Reverse<(Instant, usize)>> = BinaryHeap::new();
        let mut seq = 0u64;
        let mut rng = SmallRng::seed_from_u64(1);
        let mut started = 0u32;
        let mut formed_at = None;
        let mut next_check = start;
        let until = last_start + Duration::from_secs(60);
        let mut send = |node: &mut Membership,
                        i: usize,
                        now: Instant,
                        packets: &mut BinaryHeap<Reverse<(Instant, u64, usize)>>,
                        in_flight: &mut HashMap<u64, Vec<u8>>,
                        timers: &mut BinaryHeap<Reverse<(Instant, usize)>>| {
            for (to, packet) in node.drain(now).0 {
                seq += 1;
                packets.push(Reverse((now + delay, seq, index(to))));
                in_flight.insert(seq, packet);
            }
            if let Some(at) = node.next_deadline() {
                timers.push(Reverse((at, i)));
            }
        };
        loop {
            let next_start = (started < n).then(|| start + start_gap * started);
            let next_packet = packets.peek().map(|Reverse((at, ..))| *at);
            let next_timer = timers.peek().map(|Reverse((at, _))| *at);
            let now = [next_start, next_packet, next_timer, Some(next_check)]
                .into_iter()
                .flatten()
                .min()
                .expect("a next event");
            if now > until {
                break;
            }
            if next_start == Some(now) {
                let i = started as usize;
                let mut node = Membership::new(big_actor(started), u64::from(started) + 1, period);
                if started > 0 {
                    node.announce(big_actor(0).addr, 0);
                    node.announce(big_actor(rng.random_range(0..started)).addr, 0);
                }
                send(&mut node, i, now, &mut packets, &mut in_flight, &mut timers);
                nodes[i] = Some(node);
                started += 1;
            }
            while packets.peek().is_some_and(|Reverse((at, ..))| *at <= now) {
                let Reverse((_, seq, to)) = packets.pop().expect("peeked");
                let packet = in_flight.remove(&seq).expect("in flight");
                if let Some(node) = nodes[to].as_mut() {
                    node.handle_packet(&packet);
                    send(node, to, now, &mut packets, &mut in_flight, &mut timers);
                }
            }
            while timers.peek().is_some_and(|Reverse((at, _))| *at <= now) {
                let Reverse((_, i)) = timers.pop().expect("peeked");
                let node = nodes[i].as_mut().expect("a started node");
                if node.next_deadline().is_some_and(|at| at <= now) {
                    node.handle_timers(now);
                    send(node, i, now, &mut packets, &mut in_flight, &mut timers);
                }
            }
            if now >= next_check {
                next_check = now + Duration::from_secs(1);
                if started == n
                    && nodes
                        .iter()
                        .flatten()
                        .all(|node| node.members().len() + 1 == n as usize)
                {
                    formed_at = Some(now);
                    break;
                }
            }
        }
        let formed_after = formed_at.map(|at| at.saturating_duration_since(last_start));
        let views: Vec<usize> = nodes
            .iter()
            .flatten()
            .map(|node| node.members().len())
            .filter(|known| known + 1 < n as usize)
            .collect();
        assert!(
            formed_after.is_some(),
            "not formed a minute after the last start; views still short: {views:?}"
        );
    }
}
