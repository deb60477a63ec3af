//! What the gossip transport costs in CPU: a new connection (QUIC + mutual TLS handshake), a
//! message over a pooled connection, and an idle pooled connection per second. These are the
//! figures that decide how many partners an agent can afford to talk to, and how often, when
//! hundreds of agents share two cores (loadgen).
//!
//! One node opens a connection to each of K others (one message each), then sends M messages
//! round-robin over the open connections, then stays idle, then (once its connections closed
//! for being idle) sends one message to each peer again; the process CPU time of each phase
//! is divided by its count.
//!
//! `cargo run --release -p patina-bench --bin transport_cost -- [--peers 200] [--messages 20000] [--idle-s 10] [--datagrams]`

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use patina::net::tls::{generate_ca, generate_signed, CertUse, NodeTls};
use patina::net::transport::{Channel, Received, TlsMode, Transport, TransportConfig};
use tokio::sync::mpsc;

fn rss_mib() -> f64 {
    patina_tests::process_usage().0
}

fn cpu_seconds() -> f64 {
    patina_tests::process_usage().1
}

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number"))
        })
        .unwrap_or(default)
}

async fn wait_for(counter: &AtomicU64, target: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while counter.load(Ordering::Relaxed) < target && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        counter.load(Ordering::Relaxed) >= target,
        "only {} of {target} messages arrived",
        counter.load(Ordering::Relaxed)
    );
}

/// Sends one message from `from` to each of `peers` and waits until all arrived (`received`
/// counted `before` when this began). Ten at a time: a burst of hundreds of handshakes
/// overflows the UDP receive buffers, and the lost packets then cost QUIC's retransmission
/// timers, not CPU.
async fn send_to_each(
    from: &Transport,
    peers: &[Transport],
    payload: &bytes::Bytes,
    received: &AtomicU64,
    before: u64,
) {
    for (i, peer) in peers.iter().enumerate() {
        from.send(peer.local_addr(), Channel::Stream, payload.clone());
        if i % 10 == 9 {
            wait_for(received, before + i as u64 + 1).await;
        }
    }
    wait_for(received, before + peers.len() as u64).await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let peers = arg(&args, "--peers", 200) as usize;
    let messages = arg(&args, "--messages", 20_000);
    let idle_s = arg(&args, "--idle-s", 10);
    let plaintext = args.iter().any(|a| a == "--plaintext");
    // The channel of the pooled-connection messages (a uni stream each, or a QUIC datagram).
    let message_channel = if args.iter().any(|a| a == "--datagrams") {
        Channel::Datagram
    } else {
        Channel::Stream
    };

    let ca = generate_ca().expect("a CA");
    let tls = || {
        if plaintext {
            TlsMode::Plaintext
        } else {
            let pair = generate_signed(&ca.key_pem, &["127.0.0.1".to_string()], CertUse::Node)
                .expect("a certificate");
            TlsMode::Mutual(
                NodeTls::from_pem(&pair.cert_pem, &pair.key_pem, &ca.cert_pem).expect("PEM"),
            )
        }
    };
    let received = Arc::new(AtomicU64::new(0));
    let bind = |tls: TlsMode| {
        let (tx, mut rx) = mpsc::channel::<Received>(4096);
        let transport = Transport::bind(
            "127.0.0.1:0".parse::<SocketAddr>().expect("an address"),
            &tls,
            TransportConfig::default(),
            tx,
        )
        .expect("a transport");
        let received = received.clone();
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                received.fetch_add(1, Ordering::Relaxed);
            }
        });
        transport
    };
    let tls_modes: Vec<TlsMode> = (0..peers + 2).map(|_| tls()).collect();
    let rss = rss_mib();
    let mut bound: Vec<Transport> = tls_modes.into_iter().map(bind).collect();
    println!(
        "memory: {:.1} KiB resident per bound endpoint",
        (rss_mib() - rss) * 1024.0 / (peers + 2) as f64
    );
    let others = bound.split_off(2);
    let second = bound.pop().expect("a second sender");
    let sender = bound.pop().expect("the sender");
    let payload = bytes::Bytes::from(vec![7u8; 200]);

    // The first round also warms every endpoint (its receive buffers are touched by the first
    // packets); the second shows what one more connection costs on warm endpoints.
    for (round, from) in [("first", &sender), ("second", &second)] {
        let before = received.load(Ordering::Relaxed);
        let rss = rss_mib();
        let cpu = cpu_seconds();
        let wall = Instant::now();
        send_to_each(from, &others, &payload, &received, before).await;
        println!(
            "new connections, {round} round: {peers} in {:.2} s wall, {:.3} ms CPU and {:.1} KiB resident each (both ends, handshake and first message)",
            wall.elapsed().as_secs_f64(),
            (cpu_seconds() - cpu) / peers as f64 * 1e3,
            (rss_mib() - rss) * 1024.0 / peers as f64
        );
    }
    let base = received.load(Ordering::Relaxed);

    let cpu = cpu_seconds();
    let wall = Instant::now();
    for i in 0..messages {
        let peer = &others[i as usize % peers];
        sender.send(peer.local_addr(), message_channel, payload.clone());
        if i % 256 == 255 {
            // Let the queues drain: the per-peer queues shed their oldest when full.
            wait_for(&received, base + i - 512.min(i)).await;
        }
    }
    wait_for(&received, base + messages).await;
    let message_cpu = cpu_seconds() - cpu;
    println!(
        "messages on pooled connections ({message_channel:?}): {messages} in {:.2} s wall, {:.1} µs CPU each (both ends)",
        wall.elapsed().as_secs_f64(),
        message_cpu / messages as f64 * 1e6
    );

    let cpu = cpu_seconds();
    tokio::time::sleep(Duration::from_secs(idle_s)).await;
    let idle_cpu = cpu_seconds() - cpu;
    println!(
        "idle: {peers} open connections for {idle_s} s: {:.2} µs CPU per connection per second",
        idle_cpu / idle_s as f64 / peers as f64 * 1e6
    );

    // The sender's connections close after the idle time; the next message to each peer opens
    // a connection again, resuming the TLS session with the peer's ticket.
    let deadline = Instant::now() + Duration::from_secs(120);
    while others.iter().any(|p| sender.is_connected(p.local_addr())) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resumed = || -> u64 {
        others
            .iter()
            .map(|p| p.stats().handshakes_resumed.load(Ordering::Relaxed))
            .sum()
    };
    let before = received.load(Ordering::Relaxed);
    let resumed_before = resumed();
    let cpu = cpu_seconds();
    let wall = Instant::now();
    send_to_each(&sender, &others, &payload, &received, before).await;
    println!(
        "connections opened again after idle: {peers} in {:.2} s wall, {:.3} ms CPU each (both ends), {} of {peers} resumed from a ticket",
        wall.elapsed().as_secs_f64(),
        (cpu_seconds() - cpu) / peers as f64 * 1e3,
        resumed() - resumed_before
    );
}
