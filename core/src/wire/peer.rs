//! Peer message frames: a SWIM packet or a broadcast message, with the format and cluster id.

use super::*;

/// A message between two nodes, as it travels in one QUIC stream or datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMessage {
    /// A SWIM packet (opaque here: the membership shell encodes it).
    Membership(Vec<u8>),
    /// A broadcast message and the site that sent it.
    Broadcast {
        /// The sender.
        from: SiteId,
        /// The message.
        msg: crate::broadcast::BroadcastMsg,
    },
    /// Before a sync round, the question to the partner: what is your
    /// [`crate::versions::Bookkeeping::state_hash`]? Equal to the asker's, the round would
    /// find nothing.
    SyncCheck {
        /// Pairs the answer with the question (random: an answer is matched by it alone).
        nonce: u64,
    },
    /// The answer to a [`PeerMessage::SyncCheck`]: the partner's state hash.
    SyncCheckAnswer {
        /// The question's nonce.
        nonce: u64,
        /// The answering node's state hash.
        hash: u64,
    },
}

const TAG_MEMBERSHIP: u8 = 1;
const TAG_BROADCAST: u8 = 2;
const TAG_SYNC_CHECK: u8 = 3;
const CHECK_QUESTION: u8 = 0;
const CHECK_ANSWER: u8 = 1;
const MSG_GOSSIP: u8 = 1;
const MSG_IHAVE: u8 = 2;
const MSG_GRAFT: u8 = 3;
const MSG_PRUNE: u8 = 4;
const MSG_PING: u8 = 5;
const MSG_PONG: u8 = 6;
const MSG_KEPT_GOSSIP: u8 = 7;
const MSG_KEEP: u8 = 8;

/// Most ids in one "I have" or graft.
pub const IDS_PER_MESSAGE_MAX: usize = 4096;

/// Encodes a peer message: format byte, cluster id (u16 little-endian), kind, payload.
pub fn encode_peer_message(cluster: u16, message: &PeerMessage) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    out.extend_from_slice(&cluster.to_le_bytes());
    match message {
        PeerMessage::Membership(bytes) => {
            out.push(TAG_MEMBERSHIP);
            out.extend_from_slice(bytes);
        }
        PeerMessage::Broadcast { from, msg } => {
            use crate::broadcast::BroadcastMsg;
            out.push(TAG_BROADCAST);
            out.extend_from_slice(&from.0);
            match msg {
                BroadcastMsg::Gossip(cs) => {
                    out.push(MSG_GOSSIP);
                    encode_changeset(cs, &mut out);
                }
                BroadcastMsg::KeptGossip(cs) => {
                    out.push(MSG_KEPT_GOSSIP);
                    encode_changeset(cs, &mut out);
                }
                BroadcastMsg::IHave(ids) | BroadcastMsg::Graft(ids) => {
                    out.push(if matches!(msg, BroadcastMsg::IHave(_)) {
                        MSG_IHAVE
                    } else {
                        MSG_GRAFT
                    });
                    put_varint(&mut out, ids.len() as u64);
                    for part in ids {
                        out.extend_from_slice(&part.id.site.0);
                        put_varint(&mut out, part.id.version.get());
                        put_varint(&mut out, u64::from(part.start.get()));
                    }
                }
                BroadcastMsg::Prune => out.push(MSG_PRUNE),
                BroadcastMsg::Keep => out.push(MSG_KEEP),
                BroadcastMsg::Ping(at) | BroadcastMsg::Pong(at) => {
                    out.push(if matches!(msg, BroadcastMsg::Ping(_)) {
                        MSG_PING
                    } else {
                        MSG_PONG
                    });
                    put_varint(&mut out, *at);
                }
            }
        }
        PeerMessage::SyncCheck { nonce } => {
            out.push(TAG_SYNC_CHECK);
            out.push(CHECK_QUESTION);
            put_varint(&mut out, *nonce);
        }
        PeerMessage::SyncCheckAnswer { nonce, hash } => {
            out.push(TAG_SYNC_CHECK);
            out.push(CHECK_ANSWER);
            put_varint(&mut out, *nonce);
            out.extend_from_slice(&hash.to_le_bytes());
        }
    }
    out
}

/// Why a peer message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerMessageError {
    /// The message is for another cluster.
    #[error("message for cluster {0}")]
    OtherCluster(u16),
    /// The bytes are malformed.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Decodes a peer message from untrusted bytes.
pub fn decode_peer_message(
    bytes: &[u8],
    cluster: u16,
    limits: &Limits,
) -> Result<PeerMessage, PeerMessageError> {
    use crate::broadcast::BroadcastMsg;
    let mut r = Reader::for_cluster(bytes, cluster, limits)?;
    match r.u8("message kind")? {
        TAG_MEMBERSHIP => Ok(PeerMessage::Membership(r.bytes.to_vec())),
        TAG_BROADCAST => {
            let from = SiteId::from_slice(r.take(SITE_ID_LEN, "sender")?)
                .map_err(|_| DecodeError::Truncated("sender"))?;
            let msg = match r.u8("broadcast kind")? {
                kind @ (MSG_GOSSIP | MSG_KEPT_GOSSIP) => {
                    let rest = std::mem::take(&mut r.bytes);
                    let cs = std::sync::Arc::new(decode_changeset(rest, limits)?);
                    if kind == MSG_GOSSIP {
                        BroadcastMsg::Gossip(cs)
                    } else {
                        BroadcastMsg::KeptGossip(cs)
                    }
                }
                kind @ (MSG_IHAVE | MSG_GRAFT) => {
                    let n = r.count("id count", IDS_PER_MESSAGE_MAX, SITE_ID_LEN + 2)?;
                    let mut ids = Vec::with_capacity(n);
                    for _ in 0..n {
                        let site = SiteId::from_slice(r.take(SITE_ID_LEN, "site id")?)
                            .map_err(|_| DecodeError::Truncated("site id"))?;
                        let version = DbVersion(r.varint()?);
                        let start =
                            Seq(u32::try_from(r.varint()?)
                                .map_err(|_| DecodeError::Range("seq"))?);
                        ids.push(PartId {
                            id: ChangesetId { site, version },
                            start,
                        });
                    }
                    if kind == MSG_IHAVE {
                        BroadcastMsg::IHave(ids)
                    } else {
                        BroadcastMsg::Graft(ids)
                    }
                }
                MSG_PRUNE => BroadcastMsg::Prune,
                MSG_KEEP => BroadcastMsg::Keep,
                MSG_PING => BroadcastMsg::Ping(r.varint()?),
                MSG_PONG => BroadcastMsg::Pong(r.varint()?),
                other => return Err(DecodeError::ValueTag(other).into()),
            };
            if !r.bytes.is_empty() {
                return Err(DecodeError::Trailing(r.bytes.len()).into());
            }
            Ok(PeerMessage::Broadcast { from, msg })
        }
        TAG_SYNC_CHECK => {
            let kind = r.u8("sync check kind")?;
            let nonce = r.varint()?;
            let message = match kind {
                CHECK_QUESTION => PeerMessage::SyncCheck { nonce },
                CHECK_ANSWER => {
                    let hash = r.take(8, "state hash")?;
                    let hash = u64::from_le_bytes(
                        hash.try_into()
                            .map_err(|_| DecodeError::Truncated("state hash"))?,
                    );
                    PeerMessage::SyncCheckAnswer { nonce, hash }
                }
                other => return Err(DecodeError::ValueTag(other).into()),
            };
            if !r.bytes.is_empty() {
                return Err(DecodeError::Trailing(r.bytes.len()).into());
            }
            Ok(message)
        }
        other => Err(DecodeError::ValueTag(other).into()),
    }
}

/// A broadcast message carrying a changeset (or part), read only as far as the changeset's head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GossipCopy {
    /// The node that sent it.
    pub from: SiteId,
    /// Sent over a kept link ([`crate::broadcast::BroadcastMsg::KeptGossip`]).
    pub kept: bool,
    /// The changeset or part it carries.
    pub part: PartId,
}

/// The copy a broadcast message of a changeset carries, from its first bytes, or `None` for
/// any other message and for bytes [`decode_peer_message`] would refuse before the changes.
/// Enough to drop a copy already seen (see `Protocol::receive_seen_copy`) without decoding
/// its changes; any other message is decoded whole.
pub fn peek_gossip_copy(bytes: &[u8], cluster: u16, limits: &Limits) -> Option<GossipCopy> {
    let mut r = Reader::for_cluster(bytes, cluster, limits).ok()?;
    if r.u8("message kind").ok()? != TAG_BROADCAST {
        return None;
    }
    let from = SiteId::from_slice(r.take(SITE_ID_LEN, "sender").ok()?).ok()?;
    let kept = match r.u8("broadcast kind").ok()? {
        MSG_GOSSIP => false,
        MSG_KEPT_GOSSIP => true,
        _ => return None,
    };
    let head = decode_changeset_head(r.bytes, limits).ok()?;
    Some(GossipCopy {
        from,
        kept,
        part: head.part_id(),
    })
}

#[cfg(test)]
mod peer_message_tests {
    use super::*;
    use crate::broadcast::BroadcastMsg;
    use proptest::prelude::*;

    // The head read of a changeset's copy names what the whole decode finds; every other
    // message, another cluster's, and bytes cut inside the head give nothing.
    #[test]
    fn a_gossip_copy_is_known_from_its_head() {
        let limits = Limits::default();
        let from = SiteId([3; 16]);
        let id = ChangesetId {
            site: SiteId([4; 16]),
            version: DbVersion(1 << 40),
        };
        let mut cs = Changeset::whole(id, vec![]);
        cs.span = SeqSpan {
            start: Seq(2),
            end: Seq(5),
            last: Seq(9),
        };
        let cs = std::sync::Arc::new(cs);
        for (msg, kept) in [
            (BroadcastMsg::Gossip(cs.clone()), false),
            (BroadcastMsg::KeptGossip(cs.clone()), true),
        ] {
            let bytes = encode_peer_message(7, &PeerMessage::Broadcast { from, msg });
            let copy = peek_gossip_copy(&bytes, 7, &limits).unwrap();
            assert_eq!(
                copy,
                GossipCopy {
                    from,
                    kept,
                    part: cs.part_id()
                }
            );
            assert_eq!(peek_gossip_copy(&bytes, 8, &limits), None);
            // The head ends with the span, before the empty changeset's three counts (tables,
            // columns, changes); cut anywhere before its end, nothing.
            let head_end = bytes.len() - 3;
            for cut in 0..head_end {
                assert_eq!(
                    peek_gossip_copy(&bytes[..cut], 7, &limits),
                    None,
                    "cut {cut}"
                );
            }
        }
        for msg in [
            PeerMessage::Membership(vec![1, 2, 3]),
            PeerMessage::Broadcast {
                from,
                msg: BroadcastMsg::Prune,
            },
            PeerMessage::Broadcast {
                from,
                msg: BroadcastMsg::IHave(vec![cs.part_id()]),
            },
        ] {
            assert_eq!(
                peek_gossip_copy(&encode_peer_message(7, &msg), 7, &limits),
                None
            );
        }
    }

    #[test]
    fn peer_messages_round_trip() {
        let from = SiteId([3; 16]);
        let id = ChangesetId {
            site: SiteId([4; 16]),
            version: DbVersion(1 << 40),
        };
        let cs = std::sync::Arc::new(Changeset::whole(id, vec![]));
        let id = PartId {
            id,
            start: Seq(70_000),
        };
        for msg in [
            PeerMessage::Membership(vec![1, 2, 3]),
            PeerMessage::Broadcast {
                from,
                msg: BroadcastMsg::Gossip(cs.clone()),
            },
            PeerMessage::Broadcast {
                from,
                msg: BroadcastMsg::KeptGossip(cs),
            },
            PeerMessage::Broadcast {
                from,
                msg: BroadcastMsg::IHave(vec![id, id]),
            },
            PeerMessage::Broadcast {
                from,
                msg: BroadcastMsg::Graft(vec![id]),
            },
            PeerMessage::Broadcast {
                from,
                msg: BroadcastMsg::Prune,
            },
            PeerMessage::Broadcast {
                from,
                msg: BroadcastMsg::Keep,
            },
            PeerMessage::Broadcast {
                from,
                msg: BroadcastMsg::Ping(u64::MAX),
            },
            PeerMessage::Broadcast {
                from,
                msg: BroadcastMsg::Pong(12_345),
            },
            PeerMessage::SyncCheck { nonce: 0 },
            PeerMessage::SyncCheck { nonce: u64::MAX },
            PeerMessage::SyncCheckAnswer {
                nonce: u64::MAX,
                hash: 0x0123_4567_89ab_cdef,
            },
        ] {
            let bytes = encode_peer_message(7, &msg);
            assert_eq!(
                decode_peer_message(&bytes, 7, &Limits::default()),
                Ok(msg.clone())
            );
            assert_eq!(
                decode_peer_message(&bytes, 8, &Limits::default()),
                Err(PeerMessageError::OtherCluster(7))
            );
            if let PeerMessage::Broadcast { .. }
            | PeerMessage::SyncCheck { .. }
            | PeerMessage::SyncCheckAnswer { .. } = msg
            {
                for len in 0..bytes.len() {
                    assert!(decode_peer_message(&bytes[..len], 7, &Limits::default()).is_err());
                }
            }
        }
    }

    proptest! {
        #[test]
        fn peer_message_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut framed = vec![FORMAT_VERSION, 7, 0, TAG_BROADCAST];
            framed.extend_from_slice(&bytes);
            let _ = decode_peer_message(&framed, 7, &Limits::default());
            let _ = decode_peer_message(&bytes, 7, &Limits::default());
            let mut framed = vec![FORMAT_VERSION, 7, 0, TAG_SYNC_CHECK];
            framed.extend_from_slice(&bytes);
            let _ = decode_peer_message(&framed, 7, &Limits::default());
        }
    }

    // A sync check is refused with a kind other than question or answer, and with bytes
    // after its fields.
    #[test]
    fn a_sync_check_is_exactly_its_fields() {
        let check = PeerMessage::SyncCheckAnswer {
            nonce: 300,
            hash: 42,
        };
        let bytes = encode_peer_message(7, &check);
        // A question with a hash after its nonce has bytes too many.
        let mut question = bytes.clone();
        question[4] = CHECK_QUESTION;
        assert_eq!(
            decode_peer_message(&question, 7, &Limits::default()),
            Err(PeerMessageError::Decode(DecodeError::Trailing(8)))
        );
        let mut kind = bytes.clone();
        kind[4] = 2;
        assert_eq!(
            decode_peer_message(&kind, 7, &Limits::default()),
            Err(PeerMessageError::Decode(DecodeError::ValueTag(2)))
        );
        let mut longer = bytes;
        longer.push(0);
        assert_eq!(
            decode_peer_message(&longer, 7, &Limits::default()),
            Err(PeerMessageError::Decode(DecodeError::Trailing(1)))
        );
    }
}
