//! Tests of the broadcast state machine.

use super::*;
use crate::change::ChangesetId;
use crate::ids::DbVersion;

fn site(n: u8) -> SiteId {
    SiteId([n; 16])
}

fn changeset(author: u8, version: u64) -> Arc<Changeset> {
    Arc::new(Changeset::whole(
        ChangesetId {
            site: site(author),
            version: DbVersion(version),
        },
        Vec::new(),
    ))
}

/// The Plumtree tree alone (no kept links, no probes).
fn tree_config() -> BroadcastConfig {
    BroadcastConfig {
        eager_peers_max: 4,
        lazy_peers_max: 8,
        near_peers: 0,
        far_peers: 0,
        probe_interval_ms: 0,
        ..BroadcastConfig::default()
    }
}

/// Messages in flight between simulated nodes (10 ms each), with optional loss.
struct Net {
    in_flight: BTreeMap<(u64, u64), (u8, u8, BroadcastMsg)>,
    seq: u64,
    sent: u64,
    /// Copies sent for a widened first hop.
    widened: u64,
    counting: bool,
    drop_every: Option<u64>,
}

impl Net {
    fn push(
        &mut self,
        now: u64,
        from: u8,
        effects: Vec<Effect>,
        delivered: &mut BTreeSet<ChangesetId>,
    ) {
        for e in effects {
            let sends: Vec<(SiteId, BroadcastMsg)> = match e {
                Effect::Send { to, msg } => vec![(to, msg)],
                Effect::SendToSome {
                    candidates,
                    count,
                    msg,
                } => {
                    let sends: Vec<_> = candidates
                        .into_iter()
                        .take(count)
                        .map(|to| (to, msg.clone()))
                        .collect();
                    self.widened += sends.len() as u64;
                    sends
                }
                Effect::Deliver(cs) => {
                    delivered.insert(cs.id);
                    continue;
                }
            };
            for (to, msg) in sends {
                self.seq += 1;
                self.sent += u64::from(self.counting && !msg.is_upkeep());
                if self.counting && self.drop_every.is_some_and(|k| self.seq.is_multiple_of(k)) {
                    continue;
                }
                self.in_flight
                    .insert((now + 10, self.seq), (to.0[0], from, msg));
            }
        }
    }

    fn step(&mut self, now: u64, nodes: &mut [Broadcast], delivered: &mut [BTreeSet<ChangesetId>]) {
        while let Some((&(at, s), _)) = self.in_flight.iter().next() {
            if at > now {
                break;
            }
            let (to, from, msg) = self.in_flight.remove(&(at, s)).unwrap();
            let effects = nodes[to as usize].receive(Millis(now), site(from), msg);
            self.push(now, to, effects, &mut delivered[to as usize]);
        }
        for i in 0..nodes.len() {
            let effects = nodes[i].tick(Millis(now));
            self.push(now, i as u8, effects, &mut delivered[i]);
        }
    }
}

/// Runs N nodes, fully connected, with a fixed latency of 10 ms: 2 s of ticks first (the
/// probes and kept-link requests), then the writes, until quiet. Returns deliveries per
/// node and the messages sent from the first write on (upkeep not counted).
fn simulate(
    config: BroadcastConfig,
    n: u8,
    writes: u64,
    drop_every: Option<u64>,
) -> (Vec<BTreeSet<ChangesetId>>, u64, u64) {
    let mut nodes: Vec<Broadcast> = (0..n)
        .map(|i| Broadcast::new(site(i), config, u64::from(i)))
        .collect();
    for a in 0..n {
        for b in 0..n {
            nodes[a as usize].peer_up(site(b));
        }
    }
    let mut delivered: Vec<BTreeSet<ChangesetId>> = vec![BTreeSet::new(); n as usize];
    let mut net = Net {
        in_flight: BTreeMap::new(),
        seq: 0,
        sent: 0,
        widened: 0,
        counting: false,
        drop_every,
    };
    let mut now = 0u64;
    while now < 2_000 {
        now += 1;
        net.step(now, &mut nodes, &mut delivered);
    }
    net.counting = true;
    for w in 0..writes {
        let author = (w % u64::from(n)) as u8;
        let cs = changeset(author, w + 1);
        delivered[author as usize].insert(cs.id);
        let effects = nodes[author as usize].local_commit(cs);
        net.push(now, author, effects, &mut delivered[author as usize]);
        for _ in 0..5 {
            now += 1;
            net.step(now, &mut nodes, &mut delivered);
        }
    }
    for _ in 0..10_000 {
        let quiet = net.in_flight.values().all(|(_, _, msg)| msg.is_upkeep());
        if quiet
            && nodes
                .iter()
                .all(|n| n.missing_count() == 0 && n.pending_ihave.is_empty())
        {
            break;
        }
        now += 1;
        net.step(now, &mut nodes, &mut delivered);
    }
    (delivered, net.sent, net.widened)
}

#[test]
fn every_write_reaches_every_node() {
    for config in [tree_config(), BroadcastConfig::default()] {
        let (delivered, _, _) = simulate(config, 12, 40, None);
        for d in &delivered {
            assert_eq!(d.len(), 40, "{config:?}");
        }
    }
}

#[test]
fn grafts_repair_lost_pushes() {
    // Every 7th message is lost: lazy announcements and grafts make up for it.
    let (delivered, _, _) = simulate(tree_config(), 12, 40, Some(7));
    for d in &delivered {
        assert_eq!(d.len(), 40);
    }
}

#[test]
fn kept_links_make_up_for_lost_pushes() {
    // Every 7th message is lost: every node has six ways in.
    let (delivered, _, _) = simulate(BroadcastConfig::default(), 12, 40, Some(7));
    for d in &delivered {
        assert_eq!(d.len(), 40);
    }
}

#[test]
fn duplicates_prune_the_tree() {
    let mut a = Broadcast::new(site(1), tree_config(), 1);
    a.peer_up(site(2));
    a.peer_up(site(3));
    let cs = changeset(9, 1);
    let first = a.receive(Millis(0), site(2), BroadcastMsg::Gossip(cs.clone()));
    assert!(first.contains(&Effect::Deliver(cs.clone())));
    let second = a.receive(Millis(1), site(3), BroadcastMsg::Gossip(cs));
    assert_eq!(
        second,
        vec![Effect::Send {
            to: site(3),
            msg: BroadcastMsg::Prune
        }]
    );
    assert!(a.lazy_peers().contains(&site(3)));
    assert_eq!(a.stats().duplicates, 1);
}

// A copy known by its part id alone (the receiver read only a message's head) is handled
// exactly as the whole copy would be when it was seen before, over a tree link and over a kept
// one, from itself too; a copy not seen is left to the caller, with nothing changed.
#[test]
fn a_seen_copy_known_by_its_id_is_handled_as_the_whole_copy() {
    let config = BroadcastConfig {
        near_peers: 1,
        far_peers: 1,
        ..tree_config()
    };
    let mut a = Broadcast::new(site(1), config, 1);
    for peer in 2..=5 {
        a.peer_up(site(peer));
    }
    let cs = changeset(9, 1);
    a.receive(Millis(0), site(2), BroadcastMsg::Gossip(cs.clone()));
    let unseen = changeset(9, 2);
    let before = a.clone();
    assert_eq!(a.receive_seen_copy(site(3), false, &unseen.part_id()), None);
    assert_eq!(a, before);
    for (from, kept) in [(site(3), false), (site(4), true), (site(1), false)] {
        let mut whole = a.clone();
        let msg = if kept {
            BroadcastMsg::KeptGossip(cs.clone())
        } else {
            BroadcastMsg::Gossip(cs.clone())
        };
        let expected = whole.receive(Millis(1), from, msg);
        let effects = a.receive_seen_copy(from, kept, &cs.part_id());
        assert_eq!(effects, Some(expected));
        assert_eq!(a, whole);
    }
    assert_eq!(a.stats().duplicates, 2);
}

#[test]
fn a_missing_id_is_grafted_after_the_timeout() {
    let config = tree_config();
    let mut a = Broadcast::new(site(1), config, 1);
    a.peer_up(site(2));
    let id = changeset(9, 1).part_id();
    assert!(a
        .receive(Millis(0), site(2), BroadcastMsg::IHave(vec![id]))
        .is_empty());
    assert!(a.tick(Millis(config.graft_timeout_ms - 1)).is_empty());
    let effects = a.tick(Millis(config.graft_timeout_ms));
    assert_eq!(
        effects,
        vec![Effect::Send {
            to: site(2),
            msg: BroadcastMsg::Graft(vec![id])
        }]
    );
    // The peer answers the graft from its cache.
    let mut b = Broadcast::new(site(2), config, 2);
    b.peer_up(site(1));
    b.local_commit(changeset(9, 1));
    let answer = b.receive(Millis(90), site(1), BroadcastMsg::Graft(vec![id]));
    assert!(
        matches!(&answer[0], Effect::Send { msg: BroadcastMsg::Gossip(cs), .. } if cs.part_id() == id)
    );
}

#[test]
fn bounded_memory() {
    let config = BroadcastConfig {
        seen_max: 10,
        cache_max: 5,
        missing_max: 3,
        ..tree_config()
    };
    let mut a = Broadcast::new(site(1), config, 1);
    a.peer_up(site(2));
    for v in 1..100 {
        a.local_commit(changeset(1, v));
        a.receive(
            Millis(v),
            site(2),
            BroadcastMsg::IHave(vec![changeset(7, v).part_id()]),
        );
    }
    assert!(a.seen.len() <= 10 && a.cache.len() <= 5 && a.missing.len() <= 3);
    // Kept links served are bounded too.
    for p in 0..=255u8 {
        a.receive(Millis(200), site(p), BroadcastMsg::Keep);
    }
    assert_eq!(a.kept_children().count(), CHILDREN_MAX);
}

#[test]
fn sends_per_change_stay_small() {
    let n = 20u8;
    let writes = 100u64;
    for (config, most) in [(tree_config(), 12.0), (BroadcastConfig::default(), 6.5)] {
        let (delivered, sent, _) = simulate(config, n, writes, None);
        assert!(delivered.iter().all(|d| d.len() == writes as usize));
        let per_change_per_node = sent as f64 / writes as f64 / f64::from(n);
        eprintln!("{n} nodes, {writes} writes: {per_change_per_node:.2} sends per change per node");
        // A spanning tree needs n - 1 pushes per change, but with writes 5 ms apart every
        // change is announced on its own to each of 8 lazy peers (about 9.6 here); kept
        // links cost one push each (six per node), a few refreshes add a little.
        assert!(
            per_change_per_node < most,
            "{per_change_per_node} {config:?}"
        );
    }
}

#[test]
fn kept_links_are_asked_for_served_and_released() {
    let config = BroadcastConfig {
        near_peers: 0,
        far_peers: 2,
        probe_interval_ms: 0,
        ..BroadcastConfig::default()
    };
    let mut a = Broadcast::new(site(1), config, 1);
    for p in 2..=4 {
        a.peer_up(site(p));
    }
    // Two of the three members are the far links (a uniform sample); the requests leave
    // at the next tick.
    let far: Vec<u8> = a.far_peers().iter().map(|p| p.0[0]).collect();
    assert_eq!(far.len(), 2);
    let other = (2..=4).find(|p| !far.contains(p)).unwrap();
    let keep = |to: u8| Effect::Send {
        to: site(to),
        msg: BroadcastMsg::Keep,
    };
    let prune = |to: u8| Effect::Send {
        to: site(to),
        msg: BroadcastMsg::Prune,
    };
    assert_eq!(a.tick(Millis(0)), vec![keep(far[0]), keep(far[1])]);
    // Duplicates over kept links prune nothing.
    let cs = changeset(9, 1);
    a.receive(
        Millis(1),
        site(far[0]),
        BroadcastMsg::KeptGossip(cs.clone()),
    );
    assert!(a
        .receive(
            Millis(2),
            site(far[1]),
            BroadcastMsg::KeptGossip(cs.clone())
        )
        .is_empty());
    // A kept link nobody asked for (a request released earlier) is released again.
    assert_eq!(
        a.receive(Millis(3), site(other), BroadcastMsg::KeptGossip(cs)),
        vec![prune(other)]
    );
    // A member that asks is served every changeset until it releases the link.
    a.receive(Millis(4), site(other), BroadcastMsg::Keep);
    let mine = changeset(1, 1);
    let pushes = a.local_commit(mine.clone());
    assert!(pushes.contains(&Effect::Send {
        to: site(other),
        msg: BroadcastMsg::KeptGossip(mine.clone())
    }));
    // Our own changes also go up our kept links.
    assert!(pushes.contains(&Effect::Send {
        to: site(far[0]),
        msg: BroadcastMsg::KeptGossip(mine)
    }));
    a.receive(Millis(5), site(other), BroadcastMsg::Prune);
    assert_eq!(a.kept_children().count(), 0);
    // A far peer that fails is replaced by another member, asked at the next tick.
    a.peer_down(site(far[0]));
    assert_eq!(a.far_peers(), &BTreeSet::from([site(far[1]), site(other)]));
    assert_eq!(a.tick(Millis(6)), vec![keep(other)]);
    // Requests are repeated, and children that stop repeating theirs are dropped.
    a.receive(Millis(7), site(5), BroadcastMsg::Keep);
    let refresh = a.tick(Millis(KEEP_REFRESH_MS));
    let mut expected = vec![keep(far[1]), keep(other)];
    expected.sort_by_key(|e| match e {
        Effect::Send { to, .. } => *to,
        _ => unreachable!(),
    });
    assert_eq!(refresh, expected);
    a.tick(Millis(5 * KEEP_REFRESH_MS));
    assert_eq!(a.kept_children().count(), 0);
}

#[test]
fn probes_measure_round_trips_and_choose_the_nearest_links() {
    let config = BroadcastConfig {
        near_peers: 1,
        far_peers: 0,
        probe_interval_ms: 10,
        ..BroadcastConfig::default()
    };
    let mut a = Broadcast::new(site(1), config, 1);
    for p in 2..=5 {
        a.peer_up(site(p));
    }
    // Probe until every member is measured: member p answers after p * 10 ms.
    let mut now = 0;
    let mut asked = Vec::new();
    for _ in 0..100 {
        for effect in a.tick(Millis(now)) {
            match effect {
                Effect::Send {
                    to,
                    msg: BroadcastMsg::Ping(at),
                } => {
                    let back = now + u64::from(to.0[0]) * 10;
                    a.receive(Millis(back), to, BroadcastMsg::Pong(at));
                }
                Effect::Send {
                    to,
                    msg: BroadcastMsg::Keep,
                } => asked.push(to),
                _ => {}
            }
        }
        now += 10;
    }
    assert_eq!(a.rtt_ms(&site(2)), Some(20));
    assert_eq!(a.rtt_ms(&site(5)), Some(50));
    assert_eq!(a.near_peers(), &BTreeSet::from([site(2)]));
    assert!(asked.contains(&site(2)));
    // A ping is answered with its own clock value; a pong nobody asked for is ignored.
    assert_eq!(
        a.receive(Millis(0), site(3), BroadcastMsg::Ping(77)),
        vec![Effect::Send {
            to: site(3),
            msg: BroadcastMsg::Pong(77)
        }]
    );
    a.receive(Millis(now), site(9), BroadcastMsg::Pong(now - 1));
    assert_eq!(a.rtt_ms(&site(9)), None);
    // A near peer that fails is replaced by the next nearest.
    a.peer_down(site(2));
    assert_eq!(a.near_peers(), &BTreeSet::from([site(3)]));
}

/// The members a local commit's effects send to directly, and the widened first hop's
/// (candidates, count) if any.
fn first_hop(effects: &[Effect]) -> (BTreeSet<SiteId>, Option<(Vec<SiteId>, usize)>) {
    let mut direct = BTreeSet::new();
    let mut widened = None;
    for effect in effects {
        match effect {
            Effect::Send { to, .. } => {
                direct.insert(*to);
            }
            Effect::SendToSome {
                candidates, count, ..
            } => widened = Some((candidates.clone(), *count)),
            Effect::Deliver(_) => {}
        }
    }
    (direct, widened)
}

/// Node 0 with `members` other members (1..=members).
fn writer_among(config: BroadcastConfig, members: u8) -> Broadcast {
    let mut node = Broadcast::new(site(0), config, 7);
    for p in 1..=members {
        node.peer_up(site(p));
    }
    node
}

#[test]
fn a_large_clusters_own_changesets_go_straight_to_more_members() {
    let config = BroadcastConfig {
        near_peers: 0,
        far_peers: 2,
        probe_interval_ms: 0,
        ..BroadcastConfig::default()
    };
    assert_eq!(config.origin_fanout, 48);
    let mut a = writer_among(config, 240);
    let (direct, widened) = first_hop(&a.local_commit(changeset(0, 1)));
    // Its two far links, then random members up to one in 16 of the 240 (15 in all).
    assert_eq!(&direct, a.far_peers());
    let (candidates, count) = widened.expect("a widened first hop");
    assert_eq!(count, 240 / ORIGIN_FANOUT_SHARE - 2);
    assert_eq!(candidates.len(), count * ORIGIN_CANDIDATES_PER_SEND);
    let distinct: BTreeSet<SiteId> = candidates.iter().copied().collect();
    assert_eq!(distinct.len(), candidates.len());
    assert!(!distinct.contains(&site(0)) && distinct.is_disjoint(&direct));
    // Another write picks other members.
    let (_, again) = first_hop(&a.local_commit(changeset(0, 2)));
    assert_ne!(again.expect("widened").0, candidates);
    // Forwarding someone else's changeset is not widened.
    let (_, forwarded) = first_hop(&a.receive(
        Millis(1),
        site(9),
        BroadcastMsg::KeptGossip(changeset(9, 1)),
    ));
    assert!(forwarded.is_none());

    // A small cluster (fewer than 32 members), or origin_fanout 0, sends as before.
    let mut small = writer_among(config, 31);
    assert!(first_hop(&small.local_commit(changeset(0, 1))).1.is_none());
    let mut off = writer_among(
        BroadcastConfig {
            origin_fanout: 0,
            ..config
        },
        240,
    );
    assert!(first_hop(&off.local_commit(changeset(0, 1))).1.is_none());

    // A changeset that leaves in parts is not widened (its kept links still get every part),
    // nor is anything with the optional tree on.
    let big = {
        let changes = (0..64)
            .map(|i| crate::change::Change {
                table: "t".into(),
                pk: crate::pk::PackedPk::pack(&[crate::value::Value::Integer(i)]).unwrap(),
                column: crate::change::Column::Name("v".into()),
                value: crate::value::Value::Text("x".repeat(100)),
                col_version: crate::ids::ColVersion(1),
                cl: crate::ids::CausalLength(1),
                seq: crate::ids::Seq(i as u32),
            })
            .collect();
        Arc::new(Changeset::whole(
            ChangesetId {
                site: site(0),
                version: DbVersion(3),
            },
            changes,
        ))
    };
    let mut parted = writer_among(
        BroadcastConfig {
            part_bytes: 1024,
            ..config
        },
        240,
    );
    let effects = parted.local_commit(big);
    let (direct, widened) = first_hop(&effects);
    assert!(widened.is_none());
    assert_eq!(&direct, parted.far_peers());
    assert!(effects.len() > 2 * direct.len(), "not sent in parts");
    let mut tree = writer_among(
        BroadcastConfig {
            eager_peers_max: 4,
            lazy_peers_max: 8,
            ..config
        },
        240,
    );
    assert!(first_hop(&tree.local_commit(changeset(0, 1))).1.is_none());
}

#[test]
fn a_copy_straight_from_its_author_is_not_refused_as_a_stale_link() {
    let config = BroadcastConfig {
        near_peers: 0,
        far_peers: 0,
        probe_interval_ms: 0,
        ..BroadcastConfig::default()
    };
    let mut b = Broadcast::new(site(1), config, 1);
    for p in [2, 3] {
        b.peer_up(site(p));
    }
    let prunes = |effects: &[Effect]| {
        effects
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Effect::Send {
                        msg: BroadcastMsg::Prune,
                        ..
                    }
                )
            })
            .count()
    };
    // Member 2 is neither a kept link of this node nor fed by it: its own changeset, first
    // and again, is welcome (a widened first hop); someone else's is a stale link.
    let first = b.receive(
        Millis(1),
        site(2),
        BroadcastMsg::KeptGossip(changeset(2, 1)),
    );
    assert!(first.contains(&Effect::Deliver(changeset(2, 1))));
    assert_eq!(prunes(&first), 0);
    let again = b.receive(
        Millis(2),
        site(2),
        BroadcastMsg::KeptGossip(changeset(2, 1)),
    );
    assert_eq!(prunes(&again), 0);
    let relayed = b.receive(
        Millis(3),
        site(2),
        BroadcastMsg::KeptGossip(changeset(3, 1)),
    );
    assert_eq!(prunes(&relayed), 1);
}

#[test]
fn every_write_reaches_every_node_of_a_larger_cluster_with_a_widened_first_hop() {
    // 250 members: 15 direct copies per write, a few more than the kept links' dozen.
    let n = 250u8;
    let writes = 20u64;
    let (delivered, sent, widened) = simulate(BroadcastConfig::default(), n, writes, Some(11));
    assert!(delivered.iter().all(|d| d.len() == writes as usize));
    assert!(widened > 0, "no write was widened");
    let per_change_per_node = sent as f64 / writes as f64 / f64::from(n);
    assert!(per_change_per_node < 7.0, "{per_change_per_node}");
}
