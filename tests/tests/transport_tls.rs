//! The QUIC transport with mutual TLS on loopback: nodes with certificates signed by the
//! cluster CA exchange messages both ways; a stranger with a certificate from another CA, or
//! with none, cannot deliver anything, and the nodes keep working.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use patina::net::tls::{generate_ca, generate_signed, CertUse, NodeTls};
use patina::net::transport::{Channel, Received, TlsMode, Transport, TransportConfig, MTU_PROBED};
use tokio::sync::mpsc;

fn node_tls(ca_cert: &str, ca_key: &str) -> NodeTls {
    let pair = generate_signed(ca_key, &["127.0.0.1".to_string()], CertUse::Node).unwrap();
    NodeTls::from_pem(&pair.cert_pem, &pair.key_pem, ca_cert).unwrap()
}

fn bind(tls: TlsMode) -> (Transport, mpsc::Receiver<Received>) {
    bind_with(tls, TransportConfig::default())
}

fn bind_with(tls: TlsMode, config: TransportConfig) -> (Transport, mpsc::Receiver<Received>) {
    let (tx, rx) = mpsc::channel(64);
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    (Transport::bind(addr, &tls, config, tx).unwrap(), rx)
}

async fn recv(rx: &mut mpsc::Receiver<Received>) -> Option<Received> {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .ok()
        .flatten()
}

#[tokio::test]
async fn signed_nodes_talk_and_strangers_are_refused() {
    let ca = generate_ca().unwrap();
    let (a, mut a_rx) = bind(TlsMode::Mutual(node_tls(&ca.cert_pem, &ca.key_pem)));
    let (b, mut b_rx) = bind(TlsMode::Mutual(node_tls(&ca.cert_pem, &ca.key_pem)));

    a.send(
        b.local_addr(),
        Channel::Stream,
        Bytes::from_static(b"hello b"),
    );
    let got = recv(&mut b_rx).await.expect("b got nothing");
    assert_eq!(
        (got.bytes.as_ref(), got.from, got.channel),
        (&b"hello b"[..], a.local_addr(), Channel::Stream)
    );
    // The same connection carries the answer, and datagrams.
    b.send(
        a.local_addr(),
        Channel::Datagram,
        Bytes::from_static(b"dgram"),
    );
    b.send(
        a.local_addr(),
        Channel::Stream,
        Bytes::from_static(b"hello a"),
    );
    let mut got: Vec<Vec<u8>> = Vec::new();
    for _ in 0..2 {
        got.push(recv(&mut a_rx).await.expect("a got nothing").bytes.to_vec());
    }
    got.sort();
    assert_eq!(got, vec![b"dgram".to_vec(), b"hello a".to_vec()]);

    // A stranger whose certificate another CA signed, and one with no certificate at all.
    let other_ca = generate_ca().unwrap();
    let (stranger, mut stranger_rx) = bind(TlsMode::Mutual(node_tls(
        &other_ca.cert_pem,
        &other_ca.key_pem,
    )));
    let (plain, _plain_rx) = bind(TlsMode::Plaintext);
    for _ in 0..3 {
        stranger.send(
            b.local_addr(),
            Channel::Stream,
            Bytes::from_static(b"inject"),
        );
        plain.send(
            b.local_addr(),
            Channel::Stream,
            Bytes::from_static(b"inject"),
        );
    }
    // b refuses them during the handshake; nothing reaches its inbox, and b cannot reach the
    // stranger either.
    b.send(
        stranger.local_addr(),
        Channel::Stream,
        Bytes::from_static(b"to stranger"),
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), b_rx.recv())
            .await
            .is_err(),
        "a stranger got through"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), stranger_rx.recv())
            .await
            .is_err()
    );
    assert!(
        b.stats().handshake_failures.load(Ordering::Relaxed)
            + stranger.stats().handshake_failures.load(Ordering::Relaxed)
            >= 1
    );

    // The signed nodes still talk.
    a.send(
        b.local_addr(),
        Channel::Stream,
        Bytes::from_static(b"still here"),
    );
    assert_eq!(recv(&mut b_rx).await.unwrap().bytes.as_ref(), b"still here");
    for t in [a, b, stranger, plain] {
        t.close().await;
    }
}

#[tokio::test]
async fn plaintext_nodes_talk_to_each_other() {
    let (a, _a_rx) = bind(TlsMode::Plaintext);
    let (b, mut b_rx) = bind(TlsMode::Plaintext);
    a.send(
        b.local_addr(),
        Channel::Stream,
        Bytes::from_static(b"dev mode"),
    );
    assert_eq!(recv(&mut b_rx).await.unwrap().bytes.as_ref(), b"dev mode");
}

#[tokio::test]
async fn a_message_too_large_for_a_datagram_goes_on_a_stream() {
    let ca = generate_ca().unwrap();
    let (a, _a_rx) = bind(TlsMode::Mutual(node_tls(&ca.cert_pem, &ca.key_pem)));
    let (b, mut b_rx) = bind(TlsMode::Mutual(node_tls(&ca.cert_pem, &ca.key_pem)));
    // Gossip sends SWIM packets (up to 16 KiB) and changesets as datagrams when they fit.
    let large = Bytes::from(vec![9u8; 8 * 1024]);
    a.send(
        b.local_addr(),
        Channel::Datagram,
        Bytes::from_static(b"small"),
    );
    let got = recv(&mut b_rx).await.expect("the small datagram");
    assert_eq!(
        (got.bytes.as_ref(), got.channel),
        (&b"small"[..], Channel::Datagram)
    );
    a.send(b.local_addr(), Channel::Datagram, large.clone());
    let got = recv(&mut b_rx).await.expect("the large message was lost");
    assert_eq!((got.bytes, got.channel), (large, Channel::Stream));
}

/// A new connection probes its path's MTU once, at the largest size it looks for (which
/// loopback carries), where quinn's default search sends four probes (and gets four
/// acknowledgements) on every connection; a message of that size then leaves as one datagram.
#[tokio::test]
async fn a_new_connection_probes_its_mtu_once() {
    let (a, _a_rx) = bind(TlsMode::Plaintext);
    let (b, mut b_rx) = bind(TlsMode::Plaintext);
    a.send(
        b.local_addr(),
        Channel::Datagram,
        Bytes::from_static(b"hello"),
    );
    assert_eq!(recv(&mut b_rx).await.unwrap().bytes.as_ref(), b"hello");
    let probed = |from: &Transport, to: SocketAddr| {
        from.path_stats(to)
            .is_some_and(|path| path.current_mtu == MTU_PROBED)
    };
    assert!(
        eventually(Duration::from_secs(10), || probed(&a, b.local_addr())
            && probed(&b, a.local_addr()))
        .await,
        "the MTU was not raised to {MTU_PROBED}: {:?}, {:?}",
        a.path_stats(b.local_addr()),
        b.path_stats(a.local_addr())
    );
    for (from, to) in [(&a, b.local_addr()), (&b, a.local_addr())] {
        let path = from.path_stats(to).unwrap();
        assert_eq!(path.sent_plpmtud_probes, 1, "{path:?}");
    }
    let near_the_mtu = Bytes::from(vec![3u8; 1_300]);
    a.send(b.local_addr(), Channel::Datagram, near_the_mtu.clone());
    let got = recv(&mut b_rx)
        .await
        .expect("the 1,300-byte message was lost");
    assert_eq!((got.bytes, got.channel), (near_the_mtu, Channel::Datagram));
}

#[tokio::test]
async fn oversized_messages_are_refused() {
    let (tx, mut b_rx) = mpsc::channel(8);
    let config = TransportConfig {
        message_bytes_max: 1024,
        ..TransportConfig::default()
    };
    let b = Transport::bind(
        "127.0.0.1:0".parse().unwrap(),
        &TlsMode::Plaintext,
        config,
        tx,
    )
    .unwrap();
    let (a, _a_rx) = bind(TlsMode::Plaintext);
    a.send(
        b.local_addr(),
        Channel::Stream,
        Bytes::from(vec![0u8; 4096]),
    );
    // Small enough for a datagram (about 1,150 bytes on a new connection), too large here.
    a.send(
        b.local_addr(),
        Channel::Datagram,
        Bytes::from(vec![0u8; 1050]),
    );
    a.send(
        b.local_addr(),
        Channel::Stream,
        Bytes::from_static(b"small"),
    );
    assert_eq!(recv(&mut b_rx).await.unwrap().bytes.as_ref(), b"small");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), b_rx.recv())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn the_send_budget_sheds_a_burst_instead_of_buffering_it() {
    let (b, mut b_rx) = bind(TlsMode::Plaintext);
    let (tx, _a_rx) = mpsc::channel(8);
    let config = TransportConfig {
        send_bytes_per_sec_max: 64 * 1024,
        queue_len_max: 16,
        ..TransportConfig::default()
    };
    let a = Transport::bind(
        "127.0.0.1:0".parse().unwrap(),
        &TlsMode::Plaintext,
        config,
        tx,
    )
    .unwrap();
    for _ in 0..100 {
        a.send(
            b.local_addr(),
            Channel::Stream,
            Bytes::from(vec![7u8; 8 * 1024]),
        );
    }
    let mut received = 0;
    let window = tokio::time::sleep(Duration::from_millis(500));
    tokio::pin!(window);
    loop {
        tokio::select! {
            _ = &mut window => break,
            got = b_rx.recv() => if got.is_some() { received += 1 },
        }
    }
    // One second's budget is 8 messages; half a second more allows 4.
    assert!(
        received <= 16,
        "{received} messages got through a 64 KiB/s budget"
    );
    assert!(
        a.stats().dropped.load(Ordering::Relaxed) >= 50,
        "the burst was buffered, not shed"
    );
}

/// Two plaintext nodes; a has sent b one datagram and now sends it sealed.
async fn sealed_pair(config: TransportConfig) -> (Transport, Transport, mpsc::Receiver<Received>) {
    let (a, _a_rx) = bind_with(TlsMode::Plaintext, config);
    let (b, mut b_rx) = bind_with(TlsMode::Plaintext, config);
    a.send(
        b.local_addr(),
        Channel::Datagram,
        Bytes::from_static(b"first"),
    );
    assert_eq!(recv(&mut b_rx).await.unwrap().bytes.as_ref(), b"first");
    assert!(eventually(Duration::from_secs(5), || a.sends_sealed(b.local_addr())).await);
    (a, b, b_rx)
}

/// Polls `done` every 50 ms for at most `within`.
async fn eventually(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

#[tokio::test]
async fn idle_connections_close_and_open_again_when_needed() {
    let (a, _a_rx) = bind_with(
        TlsMode::Plaintext,
        TransportConfig {
            connection_idle_ms: 1_000,
            ..TransportConfig::default()
        },
    );
    let (b, mut b_rx) = bind(TlsMode::Plaintext);
    a.send(b.local_addr(), Channel::Stream, Bytes::from_static(b"one"));
    assert_eq!(recv(&mut b_rx).await.unwrap().bytes.as_ref(), b"one");
    assert_eq!(a.stats().connections_opened.load(Ordering::Relaxed), 1);
    // Nothing more is sent: the connection goes after its idle time (checked every 250 ms).
    assert!(
        eventually(Duration::from_secs(5), || a
            .stats()
            .connections_closed_idle
            .load(Ordering::Relaxed)
            == 1)
        .await,
        "the idle connection was not closed"
    );
    assert_eq!(a.stats().connections_open.load(Ordering::Relaxed), 0);
    // The send queue for b (and its task) goes too.
    assert!(
        eventually(Duration::from_secs(5), || a.queued_peers() == 0).await,
        "the idle send queue was kept"
    );
    // The next message opens a new one and arrives.
    a.send(b.local_addr(), Channel::Stream, Bytes::from_static(b"two"));
    assert_eq!(recv(&mut b_rx).await.unwrap().bytes.as_ref(), b"two");
    assert_eq!(a.stats().connections_opened.load(Ordering::Relaxed), 2);
    // And b can answer over it.
    b.send(a.local_addr(), Channel::Stream, Bytes::from_static(b"back"));
}

/// A datagram to a peer with a pooled connection leaves without the peer's send queue and
/// its task (one wake-up less per broadcast copy); one to a peer not connected yet still goes
/// through a queue, whose task connects.
#[tokio::test]
async fn datagrams_on_a_pooled_connection_skip_the_send_queue() {
    let (a, mut a_rx) = bind(TlsMode::Plaintext);
    let (b, mut b_rx) = bind(TlsMode::Plaintext);
    a.send(
        b.local_addr(),
        Channel::Datagram,
        Bytes::from_static(b"hello"),
    );
    assert_eq!(
        a.queued_peers(),
        1,
        "the first message waits for a connection"
    );
    assert_eq!(recv(&mut b_rx).await.unwrap().bytes.as_ref(), b"hello");
    // b accepted a's connection and pooled it: its answers need no queue.
    for n in 0..20u8 {
        b.send(a.local_addr(), Channel::Datagram, Bytes::from(vec![n; 100]));
        assert_eq!(recv(&mut a_rx).await.unwrap().bytes.as_ref(), &[n; 100][..]);
    }
    assert_eq!(b.queued_peers(), 0, "a send queue (and task) was made");
    assert_eq!(b.stats().sent.load(Ordering::Relaxed), 20);
    assert_eq!(b.stats().connections_opened.load(Ordering::Relaxed), 0);
    // A message too large for a datagram still goes through the queue, on a stream.
    let large = Bytes::from(vec![7u8; 4_000]);
    b.send(a.local_addr(), Channel::Datagram, large.clone());
    assert_eq!(recv(&mut a_rx).await.unwrap().bytes, large);
    assert_eq!(b.queued_peers(), 1);
}

#[tokio::test]
async fn the_pool_keeps_at_most_connections_max() {
    let (a, _a_rx) = bind_with(
        TlsMode::Plaintext,
        TransportConfig {
            connections_max: 2,
            connection_idle_ms: 8_000,
            ..TransportConfig::default()
        },
    );
    let peers: Vec<_> = (0..5).map(|_| bind(TlsMode::Plaintext)).collect();
    for (peer, _) in &peers {
        a.send(
            peer.local_addr(),
            Channel::Stream,
            Bytes::from_static(b"hi"),
        );
    }
    let mut peers = peers;
    for (_, rx) in &mut peers {
        assert_eq!(recv(rx).await.unwrap().bytes.as_ref(), b"hi");
    }
    // The pool is checked every 2 s at this idle time, long before any connection is idle;
    // the least recently active go first.
    assert!(
        eventually(Duration::from_secs(6), || a
            .stats()
            .connections_closed_idle
            .load(Ordering::Relaxed)
            >= 3)
        .await,
        "the pool was not trimmed to its cap"
    );
    assert!(a.stats().connections_open.load(Ordering::Relaxed) <= 2);
    // A closed peer is still reachable: a new connection is opened for it.
    let (first, rx) = &mut peers[0];
    a.send(
        first.local_addr(),
        Channel::Stream,
        Bytes::from_static(b"again"),
    );
    assert_eq!(recv(rx).await.unwrap().bytes.as_ref(), b"again");
}

#[tokio::test]
async fn one_certificate_for_a_name_serves_every_node_with_server_name() {
    // Where addresses are not known in advance (pods, containers), every node presents one
    // certificate for the name "patina"; peers check that name instead of the peer's IP.
    let ca = generate_ca().unwrap();
    let shared = generate_signed(&ca.key_pem, &["patina".to_string()], CertUse::Node).unwrap();
    let tls = |server_name: Option<&str>| {
        let mut node = NodeTls::from_pem(&shared.cert_pem, &shared.key_pem, &ca.cert_pem).unwrap();
        node.server_name = server_name.map(str::to_owned);
        TlsMode::Mutual(node)
    };
    let (a, _a_rx) = bind(tls(Some("patina")));
    let (b, mut b_rx) = bind(tls(Some("patina")));
    a.send(
        b.local_addr(),
        Channel::Stream,
        Bytes::from_static(b"by name"),
    );
    assert_eq!(
        recv(&mut b_rx).await.expect("b got nothing").bytes.as_ref(),
        b"by name"
    );
    // Checked against the IP, the same certificate is refused: the name is what lets it in.
    let (c, _c_rx) = bind(tls(None));
    c.send(
        b.local_addr(),
        Channel::Stream,
        Bytes::from_static(b"by ip"),
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), b_rx.recv())
            .await
            .is_err(),
        "a certificate without the peer's IP was accepted"
    );
    assert!(c.stats().handshake_failures.load(Ordering::Relaxed) >= 1);
    for t in [a, b, c] {
        t.close().await;
    }
}

/// A node that talked to a peer before opens its next connection to it with the session
/// ticket it was given (no certificates checked again, no signatures), not with a full
/// handshake, even when every peer presents the same name (here 127.0.0.1: tickets are filed
/// by address); a ticket from a node that has since restarted on the same address is refused
/// by the new process, and the connection falls back to a full handshake.
#[tokio::test]
async fn reconnects_resume_the_tls_session_and_a_restarted_peer_gets_a_full_handshake() {
    let ca = generate_ca().unwrap();
    let quick_idle = TransportConfig {
        connection_idle_ms: 300,
        ..TransportConfig::default()
    };
    let (a, _a_rx) = bind_with(
        TlsMode::Mutual(node_tls(&ca.cert_pem, &ca.key_pem)),
        quick_idle,
    );
    let b_tls = node_tls(&ca.cert_pem, &ca.key_pem);
    let (b, mut b_rx) = bind_with(TlsMode::Mutual(b_tls.clone()), quick_idle);
    let (c, mut c_rx) = bind_with(
        TlsMode::Mutual(node_tls(&ca.cert_pem, &ca.key_pem)),
        quick_idle,
    );
    let b_addr = b.local_addr();
    let resumed = |t: &Transport| t.stats().handshakes_resumed.load(Ordering::Relaxed);

    for (peer, rx) in [(&b, &mut b_rx), (&c, &mut c_rx)] {
        a.send(
            peer.local_addr(),
            Channel::Stream,
            Bytes::from_static(b"first"),
        );
        assert_eq!(recv(rx).await.unwrap().bytes.as_ref(), b"first");
        assert_eq!(resumed(peer), 0, "a first connection cannot resume");
    }
    for round in 1..=2 {
        for (peer, rx) in [(&b, &mut b_rx), (&c, &mut c_rx)] {
            let addr = peer.local_addr();
            assert!(
                eventually(Duration::from_secs(5), || !a.is_connected(addr)).await,
                "the idle connection stayed open"
            );
            a.send(addr, Channel::Stream, Bytes::from_static(b"again"));
            assert_eq!(recv(rx).await.unwrap().bytes.as_ref(), b"again");
            assert_eq!(
                resumed(peer),
                round,
                "reconnect {round} did a full handshake"
            );
        }
    }
    assert_eq!(
        a.stats().connections_opened.load(Ordering::Relaxed),
        6,
        "each round opened one connection per peer"
    );
    c.close().await;

    // b restarts on the same address: its tickets die with it.
    b.close().await;
    drop((b, b_rx));
    assert!(eventually(Duration::from_secs(5), || !a.is_connected(b_addr)).await);
    let (tx, mut b_rx) = mpsc::channel(64);
    // The old endpoint's socket goes when its driver task ends.
    let mut rebound = None;
    for _ in 0..100 {
        match Transport::bind(
            b_addr,
            &TlsMode::Mutual(b_tls.clone()),
            quick_idle,
            tx.clone(),
        ) {
            Ok(t) => {
                rebound = Some(t);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let b = rebound.expect("the address stayed in use");
    a.send(
        b_addr,
        Channel::Stream,
        Bytes::from_static(b"after restart"),
    );
    assert_eq!(
        recv(&mut b_rx).await.unwrap().bytes.as_ref(),
        b"after restart"
    );
    assert_eq!(resumed(&b), 0, "a ticket of the old process was honoured");
    for t in [a, b] {
        t.close().await;
    }
}

/// Certificates made before `patina tls` switched to Ed25519 keys keep working: a cluster CA
/// with a P-256 key signs new (Ed25519) node certificates, and a node whose own certificate
/// has a P-256 key talks both ways with one whose certificate has an Ed25519 key.
#[tokio::test]
async fn p256_certificates_made_before_still_work_beside_ed25519_ones() {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    };
    // As `patina tls ca generate` made it, subject name included (new certificates name
    // their issuer by it).
    let ca_params = || {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "Patina cluster CA");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params
    };
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let ca_cert = ca_params().self_signed(&ca_key).unwrap();
    let (ca_pem, ca_key_pem) = (ca_cert.pem(), ca_key.serialize_pem());
    let old_leaf = {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params
            .signed_by(&key, &Issuer::new(ca_params(), ca_key))
            .unwrap();
        NodeTls::from_pem(&cert.pem(), &key.serialize_pem(), &ca_pem).unwrap()
    };
    let (old, mut old_rx) = bind(TlsMode::Mutual(old_leaf));
    let (new, mut new_rx) = bind(TlsMode::Mutual(node_tls(&ca_pem, &ca_key_pem)));
    old.send(
        new.local_addr(),
        Channel::Stream,
        Bytes::from_static(b"old"),
    );
    assert_eq!(recv(&mut new_rx).await.unwrap().bytes.as_ref(), b"old");
    new.send(
        old.local_addr(),
        Channel::Stream,
        Bytes::from_static(b"new"),
    );
    assert_eq!(recv(&mut old_rx).await.unwrap().bytes.as_ref(), b"new");
    for t in [old, new] {
        t.close().await;
    }
}

/// Between nodes that both offer them, datagrams travel sealed beside QUIC (keys exported from
/// the connection), both ways; with a node that does not, as QUIC datagrams; streams as before.
#[tokio::test]
async fn datagrams_travel_sealed_between_nodes_that_offer_it_and_as_quic_ones_otherwise() {
    let ca = generate_ca().unwrap();
    let tls = || TlsMode::Mutual(node_tls(&ca.cert_pem, &ca.key_pem));
    let (a, mut a_rx) = bind(tls());
    let (b, mut b_rx) = bind(tls());
    let (c, mut c_rx) = bind_with(
        tls(),
        TransportConfig {
            sealed_datagrams: false,
            ..TransportConfig::default()
        },
    );
    let sealed = |t: &Transport| {
        (
            t.stats().sealed_sent.load(Ordering::Relaxed),
            t.stats().sealed_received.load(Ordering::Relaxed),
        )
    };
    // The first datagram goes as a QUIC one: each end of a new connection sends sealed once it
    // has heard that the other registered the keys.
    let datagram = |from: &Transport, to: &Transport, bytes: Bytes| {
        from.send(to.local_addr(), Channel::Datagram, bytes)
    };
    datagram(&a, &b, Bytes::from_static(b"first"));
    assert_eq!(recv(&mut b_rx).await.unwrap().bytes.as_ref(), b"first");
    assert!(
        eventually(Duration::from_secs(5), || a.sends_sealed(b.local_addr())
            && b.sends_sealed(a.local_addr()))
        .await,
        "the ends never agreed on sealed datagrams"
    );
    for n in 0..10u8 {
        datagram(&a, &b, Bytes::from(vec![n; 300]));
        let got = recv(&mut b_rx).await.expect("b got nothing");
        assert_eq!(
            (got.bytes.as_ref(), got.from, got.channel),
            (&[n; 300][..], a.local_addr(), Channel::Datagram)
        );
    }
    datagram(&b, &a, Bytes::from_static(b"back"));
    assert_eq!(recv(&mut a_rx).await.unwrap().bytes.as_ref(), b"back");
    assert_eq!((sealed(&a), sealed(&b)), ((10, 1), (1, 10)));
    a.send(b.local_addr(), Channel::Stream, Bytes::from_static(b"on"));
    let got = recv(&mut b_rx).await.unwrap();
    assert_eq!(
        (got.bytes.as_ref(), got.channel),
        (&b"on"[..], Channel::Stream)
    );

    // c does not offer sealed datagrams: QUIC datagrams both ways.
    for (from, to, rx) in [(&a, &c, &mut c_rx), (&c, &a, &mut a_rx)] {
        for _ in 0..3 {
            datagram(from, to, Bytes::from_static(b"plain"));
            let got = recv(rx).await.expect("a QUIC datagram was lost");
            assert_eq!(got.bytes.as_ref(), b"plain");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(!a.sends_sealed(c.local_addr()) && !c.sends_sealed(a.local_addr()));
    assert_eq!((sealed(&a), sealed(&c)), ((10, 1), (0, 0)));
    for t in [a, b, c] {
        t.close().await;
    }
}

/// A connection that carries only sealed datagrams (which QUIC does not see) is neither closed
/// by the pool as idle nor timed out by quinn (twice `connection_idle_ms` here: 2 s).
#[tokio::test]
async fn a_connection_carrying_only_sealed_datagrams_stays_open() {
    let quick_idle = TransportConfig {
        connection_idle_ms: 1_000,
        ..TransportConfig::default()
    };
    let (a, b, mut b_rx) = sealed_pair(quick_idle).await;
    for n in 0..25u8 {
        a.send(b.local_addr(), Channel::Datagram, Bytes::from(vec![n; 100]));
        assert_eq!(recv(&mut b_rx).await.unwrap().bytes.as_ref(), &[n; 100][..]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(a.stats().sealed_sent.load(Ordering::Relaxed), 25);
    let opened = a.stats().connections_opened.load(Ordering::Relaxed)
        + b.stats().connections_opened.load(Ordering::Relaxed);
    let closed_idle = a.stats().connections_closed_idle.load(Ordering::Relaxed)
        + b.stats().connections_closed_idle.load(Ordering::Relaxed);
    assert_eq!(
        (opened, closed_idle),
        (1, 0),
        "the connection in use was closed"
    );
    for t in [a, b] {
        t.close().await;
    }
}

/// A connection whose sealed key reached its limit (lowered to 10 here; 2^23 in production)
/// is replaced by a new connection with new keys, and datagrams go sealed again on it: none is
/// lost on the way (the ones sent while the new connection is made go on the old one's QUIC).
/// Without the replacement a busy link would send QUIC datagrams for good (it never idles, so
/// it is never closed).
#[tokio::test]
async fn a_sealed_key_at_its_limit_is_replaced_by_a_new_connection() {
    let (a, b, mut b_rx, mut n) = spent_key_pair().await;
    let sealed_sent = |t: &Transport| t.stats().sealed_sent.load(Ordering::Relaxed);
    assert_eq!(sealed_sent(&a), 10);
    // The next message finds the key spent: it goes on the old connection while a new one
    // is made.
    let sent = send_numbered(&a, &b, &mut n);
    assert_eq!(
        recv(&mut b_rx)
            .await
            .expect("lost at the replacement")
            .bytes
            .as_ref(),
        &sent[..]
    );
    assert!(
        eventually(Duration::from_secs(5), || a.sends_sealed(b.local_addr())).await,
        "the new connection never sealed"
    );
    assert_eq!(a.stats().sealed_rekeys.load(Ordering::Relaxed), 1);
    assert_eq!(a.stats().connections_opened.load(Ordering::Relaxed), 2);
    let before = sealed_sent(&a);
    for _ in 0..5 {
        let sent = send_numbered(&a, &b, &mut n);
        assert_eq!(
            recv(&mut b_rx).await.expect("lost").bytes.as_ref(),
            &sent[..]
        );
    }
    assert_eq!(sealed_sent(&a), before + 5, "sealed under the new keys");
    for t in [a, b] {
        t.close().await;
    }
}

/// Two nodes whose sealed key (limit lowered to 10) sealed its ten datagrams from `a` to `b`,
/// all received; the number of the next datagram.
async fn spent_key_pair() -> (Transport, Transport, mpsc::Receiver<Received>, u8) {
    let limited = TransportConfig {
        sealed_per_key_max: 10,
        ..TransportConfig::default()
    };
    let (a, b, mut b_rx) = sealed_pair(limited).await;
    let mut n = 0u8;
    for _ in 0..10 {
        let sent = send_numbered(&a, &b, &mut n);
        assert_eq!(
            recv(&mut b_rx).await.expect("lost").bytes.as_ref(),
            &sent[..]
        );
    }
    assert!(!a.sends_sealed(b.local_addr()), "the key is spent");
    (a, b, b_rx, n)
}

/// Sends `a` datagram of 100 bytes `n` to `b`, numbering the next; returns what was sent.
fn send_numbered(a: &Transport, b: &Transport, n: &mut u8) -> Vec<u8> {
    a.send(
        b.local_addr(),
        Channel::Datagram,
        Bytes::from(vec![*n; 100]),
    );
    *n = n.wrapping_add(1);
    vec![n.wrapping_sub(1); 100]
}

/// A peer that keeps its connection but refuses new ones (its certificate expired since, say)
/// while the sealed key of that connection is spent: every message still arrives, on the old
/// connection's QUIC, and a new connection is tried once, then again only after a back-off,
/// not once per message; when the peer accepts again, the link is renewed and seals again.
#[tokio::test]
async fn a_spent_key_whose_peer_refuses_new_connections_is_renewed_with_back_off() {
    let (a, b, mut b_rx, mut n) = spent_key_pair().await;
    let failures = |t: &Transport| t.stats().handshake_failures.load(Ordering::Relaxed);
    b.faults().refuse_connections.store(true, Ordering::Relaxed);
    for _ in 0..30 {
        let sent = send_numbered(&a, &b, &mut n);
        assert_eq!(
            recv(&mut b_rx)
                .await
                .expect("lost while the peer refuses")
                .bytes
                .as_ref(),
            &sent[..]
        );
    }
    assert!(
        eventually(Duration::from_secs(5), || failures(&a) >= 1).await,
        "no new connection was tried"
    );
    // Thirty messages in well under the first back-off (a second): one attempt.
    assert_eq!(failures(&a), 1, "a new connection tried per message");
    assert_eq!(a.stats().sealed_rekeys.load(Ordering::Relaxed), 0);
    assert_eq!(a.stats().connections_opened.load(Ordering::Relaxed), 1);
    b.faults().heal();
    // After the back-off, the next message starts a replacement that succeeds.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let renewed = eventually(Duration::from_secs(5), || {
        send_numbered(&a, &b, &mut n);
        a.sends_sealed(b.local_addr())
    })
    .await;
    assert!(renewed, "never renewed once the peer accepted again");
    assert_eq!(a.stats().sealed_rekeys.load(Ordering::Relaxed), 1);
    assert_eq!(failures(&a), 1);
    for t in [a, b] {
        t.close().await;
    }
}

/// A sealed datagram under a key the node does not know is refused and answered with a
/// notice naming the key, smaller than the datagram (a forged source address gains nothing);
/// the node opens no connection for it, and the junk that is neither QUIC nor sealed gets no
/// answer.
#[tokio::test]
async fn a_sealed_datagram_under_an_unknown_key_gets_a_small_notice_and_nothing_else() {
    use patina::net::sealed::{MARK, NOTICE_BYTES, NOTICE_MARK, OVERHEAD_BYTES};
    let (b, mut b_rx) = bind(TlsMode::Plaintext);
    let stranger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut junk = vec![0x01u8; OVERHEAD_BYTES + 20];
    stranger.send_to(&junk, b.local_addr()).await.unwrap();
    junk[0] = MARK;
    junk[1..9].copy_from_slice(b"no such!");
    stranger.send_to(&junk, b.local_addr()).await.unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), stranger.recv_from(&mut buf))
        .await
        .expect("no notice")
        .unwrap();
    assert_eq!(
        (from, &buf[..n]),
        (
            b.local_addr(),
            &[&[NOTICE_MARK][..], b"no such!"].concat()[..]
        )
    );
    assert_eq!(n, NOTICE_BYTES);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stranger.recv_from(&mut buf))
            .await
            .is_err(),
        "more than one answer"
    );
    assert_eq!(b.stats().sealed_refused.load(Ordering::Relaxed), 2);
    assert_eq!(b.stats().connections_opened.load(Ordering::Relaxed), 0);
    // The node works on.
    let (a, _a_rx) = bind(TlsMode::Plaintext);
    a.send(
        b.local_addr(),
        Channel::Datagram,
        Bytes::from_static(b"fine"),
    );
    assert_eq!(recv(&mut b_rx).await.unwrap().bytes.as_ref(), b"fine");
    assert!(b_rx.try_recv().is_err(), "a forged datagram was delivered");
    for t in [a, b] {
        t.close().await;
    }
}

/// A peer that lost the keys of a connection (a restart behind a connection the sender still
/// holds) answers sealed datagrams with notices, and the sender's datagrams go on QUIC again
/// instead of vanishing: within a few datagrams they arrive.
#[tokio::test]
async fn datagrams_to_a_peer_that_lost_the_keys_go_on_quic_again() {
    let (a, b, mut b_rx) = sealed_pair(TransportConfig::default()).await;
    b.forget_sealed_keys();
    let mut arrived = 0;
    for n in 0..20u8 {
        a.send(b.local_addr(), Channel::Datagram, Bytes::from(vec![n; 50]));
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Ok(got) = b_rx.try_recv() {
            assert_eq!(got.bytes.as_ref(), &[n; 50][..]);
            arrived += 1;
        }
    }
    assert!(!a.sends_sealed(b.local_addr()));
    assert!(
        arrived >= 18,
        "only {arrived} of 20 datagrams arrived after the keys were lost"
    );
    assert_eq!(a.stats().sealed_unknown.load(Ordering::Relaxed), 1);
    for t in [a, b] {
        t.close().await;
    }
}

/// Two nodes whose connection was closed for idleness, each with its inbox; both sent a
/// sealed datagram on it first (so each knows the other opens them). Waits until both kept
/// the keys, if `kept`.
async fn idle_closed_pair(
    config: TransportConfig,
    kept: bool,
) -> (
    Transport,
    mpsc::Receiver<Received>,
    Transport,
    mpsc::Receiver<Received>,
) {
    idle_closed_pair_of(config, config, kept).await
}

async fn idle_closed_pair_of(
    a_config: TransportConfig,
    b_config: TransportConfig,
    kept: bool,
) -> (
    Transport,
    mpsc::Receiver<Received>,
    Transport,
    mpsc::Receiver<Received>,
) {
    let (a, mut a_rx) = bind_with(TlsMode::Plaintext, a_config);
    let (b, mut b_rx) = bind_with(TlsMode::Plaintext, b_config);
    assert!(
        !a.send(b.local_addr(), Channel::Datagram, Bytes::from_static(b"hi")),
        "a first message needs a connection: cold"
    );
    assert_eq!(recv(&mut b_rx).await.unwrap().bytes.as_ref(), b"hi");
    assert!(eventually(Duration::from_secs(5), || a.sends_sealed(b.local_addr())).await);
    b.send(a.local_addr(), Channel::Datagram, Bytes::from_static(b"ho"));
    assert_eq!(recv(&mut a_rx).await.unwrap().bytes.as_ref(), b"ho");
    assert!(eventually(Duration::from_secs(5), || b.sends_sealed(a.local_addr())).await);
    assert!(
        eventually(Duration::from_secs(10), || !a.is_connected(b.local_addr())
            && !b.is_connected(a.local_addr()))
        .await,
        "the idle connection was not closed"
    );
    if kept {
        let keeps = |t: &Transport| t.stats().sealed_keys_kept.load(Ordering::Relaxed) == 1;
        assert!(
            eventually(Duration::from_secs(5), || keeps(&a) && keeps(&b)).await,
            "the keys were not kept at both ends"
        );
    }
    (a, a_rx, b, b_rx)
}

/// Both ends of a connection closed for idleness keep its sealed keys: datagrams then go
/// both ways with no new connection (no handshake), and arrive as from the peer; a stream
/// message still connects, and the new connection replaces the kept key.
#[tokio::test]
async fn datagrams_to_a_peer_whose_connection_idled_out_go_sealed_without_a_handshake() {
    let config = TransportConfig {
        connection_idle_ms: 1_000,
        ..TransportConfig::default()
    };
    let (a, mut a_rx, b, mut b_rx) = idle_closed_pair(config, true).await;
    let handshakes = |t: &Transport| {
        let s = t.stats();
        s.connections_opened.load(Ordering::Relaxed)
            + s.connections_accepted.load(Ordering::Relaxed)
    };
    assert_eq!((handshakes(&a), handshakes(&b)), (1, 1));
    assert!(a.is_warm(b.local_addr()) && b.is_warm(a.local_addr()));
    assert_eq!(a.stats().sealed_keys_kept.load(Ordering::Relaxed), 1);
    for i in 0..5u8 {
        assert!(
            a.send(b.local_addr(), Channel::Datagram, Bytes::from(vec![i; 50])),
            "a datagram under a kept key is warm"
        );
        let got = recv(&mut b_rx).await.expect("lost a→b");
        assert_eq!(
            (got.from, got.bytes.as_ref()),
            (a.local_addr(), &[i; 50][..])
        );
        b.send(a.local_addr(), Channel::Datagram, Bytes::from(vec![i; 60]));
        let got = recv(&mut a_rx).await.expect("lost b→a");
        assert_eq!(
            (got.from, got.bytes.as_ref()),
            (b.local_addr(), &[i; 60][..])
        );
    }
    assert_eq!(
        (handshakes(&a), handshakes(&b)),
        (1, 1),
        "a datagram needed a new connection"
    );
    assert_eq!(a.stats().sealed_sent_kept.load(Ordering::Relaxed), 5);
    assert_eq!(b.stats().sealed_sent_kept.load(Ordering::Relaxed), 5);
    assert!(!a.is_connected(b.local_addr()));
    // A stream needs a connection; the new one's keys replace the kept ones at both ends.
    assert!(
        !a.send(
            b.local_addr(),
            Channel::Stream,
            Bytes::from_static(b"stream"),
        ),
        "a stream is cold without a pooled connection, kept key or not"
    );
    assert_eq!(recv(&mut b_rx).await.unwrap().bytes.as_ref(), b"stream");
    assert_eq!(a.stats().connections_opened.load(Ordering::Relaxed), 2);
    assert!(
        eventually(Duration::from_secs(5), || {
            a.stats().sealed_keys_kept.load(Ordering::Relaxed) == 0
                && b.stats().sealed_keys_kept.load(Ordering::Relaxed) == 0
        })
        .await,
        "the kept keys outlived the new connection"
    );
    for t in [a, b] {
        t.close().await;
    }
}

/// An optional datagram (`send_datagram_without_handshake`: the copies of a widened first
/// hop) leaves on a pooled connection or under a kept key, and is dropped rather than
/// connected for: to a peer never contacted, when too large for one datagram under the kept
/// key, and once the send budget is spent.
#[tokio::test]
async fn an_optional_datagram_goes_only_where_no_handshake_is_needed() {
    let config = TransportConfig {
        connection_idle_ms: 1_000,
        send_bytes_per_sec_max: 64 * 1024,
        ..TransportConfig::default()
    };
    let (a, _a_rx, b, mut b_rx) = idle_closed_pair(config, true).await;
    let (c, mut c_rx) = bind_with(TlsMode::Plaintext, config);
    let opened = |t: &Transport| t.stats().connections_opened.load(Ordering::Relaxed);
    let before = opened(&a);
    assert!(a.send_datagram_without_handshake(b.local_addr(), Bytes::from(vec![1u8; 50])));
    assert_eq!(
        recv(&mut b_rx).await.expect("lost a→b").bytes.as_ref(),
        &[1u8; 50][..]
    );
    assert!(!a.send_datagram_without_handshake(b.local_addr(), Bytes::from(vec![2u8; 4_000])));
    assert!(!a.send_datagram_without_handshake(c.local_addr(), Bytes::from_static(b"x")));
    let sent = (0..200)
        .filter(|_| {
            a.send_datagram_without_handshake(b.local_addr(), Bytes::from(vec![3u8; 1_000]))
        })
        .count();
    assert!(sent < 200, "a 64 KiB/s budget let 200 KB through");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        opened(&a),
        before,
        "an optional datagram opened a connection"
    );
    assert!(!a.is_connected(b.local_addr()) && !a.is_connected(c.local_addr()));
    assert!(c_rx.try_recv().is_err());
    for t in [a, b, c] {
        t.close().await;
    }
}

/// A kept key stops being used when the peer lost it (a restart: its notice) and when it is
/// older than `sealed_kept_max_age_ms`; the next datagram then connects, and arrives.
#[tokio::test]
async fn a_kept_key_goes_when_the_peer_lost_it_or_it_ages_out() {
    let config = TransportConfig {
        connection_idle_ms: 1_000,
        ..TransportConfig::default()
    };
    let (a, _a_rx, b, mut b_rx) = idle_closed_pair(config, true).await;
    assert!(a.is_warm(b.local_addr()));
    b.forget_sealed_keys();
    a.send(
        b.local_addr(),
        Channel::Datagram,
        Bytes::from_static(b"lost"),
    );
    assert!(
        eventually(Duration::from_secs(5), || !a.is_warm(b.local_addr())).await,
        "the notice did not retire the kept key"
    );
    assert_eq!(a.stats().sealed_unknown.load(Ordering::Relaxed), 1);
    a.send(
        b.local_addr(),
        Channel::Datagram,
        Bytes::from_static(b"again"),
    );
    assert_eq!(recv(&mut b_rx).await.unwrap().bytes.as_ref(), b"again");
    assert_eq!(a.stats().connections_opened.load(Ordering::Relaxed), 2);
    for t in [a, b] {
        t.close().await;
    }

    let aging = TransportConfig {
        connection_idle_ms: 1_000,
        sealed_kept_max_age_ms: 6_000,
        ..TransportConfig::default()
    };
    let (a, _a_rx, b, mut b_rx) = idle_closed_pair(aging, true).await;
    assert!(a.is_warm(b.local_addr()), "kept, before its age");
    assert!(
        eventually(Duration::from_secs(10), || !a.is_warm(b.local_addr())
            && b.stats().sealed_keys_kept.load(Ordering::Relaxed) == 0)
        .await,
        "a kept key outlived its age"
    );
    a.send(
        b.local_addr(),
        Channel::Datagram,
        Bytes::from_static(b"fresh"),
    );
    assert_eq!(recv(&mut b_rx).await.unwrap().bytes.as_ref(), b"fresh");
    assert_eq!(a.stats().connections_opened.load(Ordering::Relaxed), 2);
    assert_eq!(a.stats().sealed_sent_kept.load(Ordering::Relaxed), 0);
    for t in [a, b] {
        t.close().await;
    }
}

/// A node that does not keep keys (`sealed_kept_max_age_ms = 0`) and one that does agree not
/// to (ALPN): after an idle close neither keeps the keys, so neither seals under a key the
/// other forgot; the next datagram connects and arrives.
#[tokio::test]
async fn a_node_that_keeps_no_keys_and_one_that_does_agree_to_keep_none() {
    let keeping = TransportConfig {
        connection_idle_ms: 1_000,
        ..TransportConfig::default()
    };
    let not_keeping = TransportConfig {
        sealed_kept_max_age_ms: 0,
        ..keeping
    };
    let (a, _a_rx, b, mut b_rx) = idle_closed_pair_of(keeping, not_keeping, false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for t in [&a, &b] {
        assert_eq!(t.stats().sealed_keys_kept.load(Ordering::Relaxed), 0);
    }
    assert!(!a.is_warm(b.local_addr()) && !b.is_warm(a.local_addr()));
    a.send(
        b.local_addr(),
        Channel::Datagram,
        Bytes::from_static(b"after"),
    );
    assert_eq!(recv(&mut b_rx).await.unwrap().bytes.as_ref(), b"after");
    assert_eq!(a.stats().connections_opened.load(Ordering::Relaxed), 2);
    for t in [a, b] {
        t.close().await;
    }
}

/// Messages the fault injector delays (a latency model by destination, as loadgen's) leave
/// when due: none sooner than its delay, and those to a near peer sent after one to a far peer
/// leave first, at their own time; datagrams and messages on streams alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_leave_when_due_and_in_due_order() {
    let (a, _a_rx) = bind(TlsMode::Plaintext);
    let (far, mut far_rx) = bind(TlsMode::Plaintext);
    let (near, mut near_rx) = bind(TlsMode::Plaintext);
    // Connections first, with no delay.
    for (to, rx) in [
        (far.local_addr(), &mut far_rx),
        (near.local_addr(), &mut near_rx),
    ] {
        a.send(to, Channel::Datagram, Bytes::from_static(b"hello"));
        assert!(recv(rx).await.is_some());
    }
    let far_addr = far.local_addr();
    a.faults().set_latency(Arc::new(move |to: SocketAddr| {
        Duration::from_millis(if to == far_addr { 1_500 } else { 200 })
    }));
    let sent = tokio::time::Instant::now();
    a.send(far_addr, Channel::Datagram, Bytes::from_static(b"far 1"));
    a.send(far_addr, Channel::Stream, Bytes::from_static(b"far 2"));
    a.send(
        near.local_addr(),
        Channel::Datagram,
        Bytes::from_static(b"near 1"),
    );
    a.send(
        near.local_addr(),
        Channel::Datagram,
        Bytes::from_static(b"near 2"),
    );
    // Each message waits on its own timer: two due at once may leave in either order.
    let mut near_got = Vec::new();
    for _ in 0..2 {
        let got = recv(&mut near_rx).await.expect("a near message");
        let waited = sent.elapsed();
        assert!(
            waited >= Duration::from_millis(200),
            "left early: {waited:?}"
        );
        // Far below the far message's 1.5 s: it did not wait for the one sent before it.
        assert!(
            waited < Duration::from_millis(1_200),
            "waited for the far one: {waited:?}"
        );
        near_got.push(got.bytes.to_vec());
    }
    near_got.sort();
    assert_eq!(near_got, [b"near 1".to_vec(), b"near 2".to_vec()]);
    let mut far_got = Vec::new();
    for _ in 0..2 {
        let got = recv(&mut far_rx).await.expect("a far message");
        assert!(sent.elapsed() >= Duration::from_millis(1_500), "left early");
        far_got.push(got.bytes.to_vec());
    }
    far_got.sort();
    assert_eq!(far_got, [b"far 1".to_vec(), b"far 2".to_vec()]);
}
