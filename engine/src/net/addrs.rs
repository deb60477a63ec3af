//! Peer addresses as operators write them: `host:port`, where the host is an IP (`[v6]` in
//! brackets) or a DNS name, and the address a node advertises to its peers.
//!
//! Names are resolved by the system resolver (so `/etc/hosts`, a Kubernetes headless Service
//! or a Compose service name all work); a name with several records stands for several nodes.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

/// A `host:port` entry of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// An IP literal or a DNS name (without brackets).
    pub host: String,
    /// The port.
    pub port: u16,
}

impl HostPort {
    /// Parses `1.2.3.4:8787`, `[fd00::1]:8787` or `name.example:8787`.
    pub fn parse(text: &str) -> Result<HostPort, String> {
        let text = text.trim();
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(HostPort {
                host: addr.ip().to_string(),
                port: addr.port(),
            });
        }
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(format!("{text:?} has no port: write host:port"));
        };
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{text:?}: {port:?} is not a port number"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let valid_name = !host.is_empty()
            && host.len() <= 253
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
        if host.parse::<IpAddr>().is_err() && !valid_name {
            return Err(format!(
                "{text:?}: {host:?} is neither an IP nor a DNS name"
            ));
        }
        Ok(HostPort {
            host: host.to_string(),
            port,
        })
    }

    /// The address itself when the host is an IP literal.
    pub fn literal(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }

    /// Every address the host resolves to, within `timeout`.
    pub async fn resolve(&self, timeout: Duration) -> Result<Vec<SocketAddr>, String> {
        if let Some(addr) = self.literal() {
            return Ok(vec![addr]);
        }
        let lookup = tokio::net::lookup_host((self.host.as_str(), self.port));
        match tokio::time::timeout(timeout, lookup).await {
            Ok(Ok(addrs)) => {
                let mut addrs: Vec<SocketAddr> = addrs.map(canonical).collect();
                addrs.sort();
                addrs.dedup();
                Ok(addrs)
            }
            Ok(Err(e)) => Err(format!("resolving {self}: {e}")),
            Err(_) => Err(format!("resolving {self}: no answer within {timeout:?}")),
        }
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Resolves every entry at once; names that fail are logged and skipped, so one dead name
/// does not keep a node from joining through the others.
pub async fn resolve_all(entries: &[HostPort], timeout: Duration) -> Vec<SocketAddr> {
    let mut lookups = tokio::task::JoinSet::new();
    for entry in entries {
        let entry = entry.clone();
        lookups.spawn(async move { entry.resolve(timeout).await });
    }
    let mut out = Vec::new();
    while let Some(result) = lookups.join_next().await {
        match result {
            Ok(Ok(addrs)) => out.extend(addrs),
            Ok(Err(e)) => tracing::warn!("bootstrap: {e}"),
            Err(e) => tracing::warn!("bootstrap: a lookup failed: {e}"),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// An IPv4 address seen through an IPv6 socket (`::ffff:a.b.c.d`) as the IPv4 address, so a
/// peer has one address whichever socket family saw it.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The address this node tells its peers to reach it at.
///
/// `external` (from `gossip.external_addr`) wins. Otherwise a specific bound address is its own
/// answer; a wildcard bind (`0.0.0.0`, `[::]`) takes the local address the system would use to
/// reach the first peer it knows (no packet is sent), and fails when there is none, since a
/// wildcard is no address to give a peer.
pub fn advertised(
    bound: SocketAddr,
    external: Option<SocketAddr>,
    peers: &[SocketAddr],
) -> Result<SocketAddr, String> {
    if let Some(external) = external {
        if external.ip().is_unspecified() || external.port() == 0 {
            return Err(format!(
                "gossip.external_addr {external} is not an address peers can reach"
            ));
        }
        return Ok(external);
    }
    if !bound.ip().is_unspecified() {
        return Ok(bound);
    }
    // A peer on loopback (this host's own name often maps to 127.0.1.1) says nothing about
    // the address others reach this host at: routes to other hosts first, loopback only when
    // every peer is on this host.
    let (remote, local): (Vec<&SocketAddr>, Vec<&SocketAddr>) =
        peers.iter().partition(|p| !p.ip().is_loopback());
    for peer in remote.into_iter().chain(local) {
        if let Some(ip) = route_source(bound.ip(), *peer) {
            if !ip.is_unspecified() {
                return Ok(SocketAddr::new(ip, bound.port()));
            }
        }
    }
    Err(format!(
        "gossip.addr {bound} is a wildcard and no bootstrap peer could be reached to find this \
         host's own address: set gossip.external_addr"
    ))
}

/// The local IP the routing table picks for `peer` (a connected UDP socket; nothing is sent).
fn route_source(bound: IpAddr, peer: SocketAddr) -> Option<IpAddr> {
    let any: SocketAddr = match (bound, peer) {
        (IpAddr::V6(_), SocketAddr::V6(_)) => "[::]:0".parse().ok()?,
        (_, SocketAddr::V4(_)) => "0.0.0.0:0".parse().ok()?,
        (IpAddr::V4(_), SocketAddr::V6(_)) => return None,
    };
    let socket = UdpSocket::bind(any).ok()?;
    socket.connect(peer).ok()?;
    socket.local_addr().ok().map(|a| a.ip().to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        let p = |s: &str| HostPort::parse(s);
        assert_eq!(
            p("10.0.0.1:8787").unwrap().literal(),
            "10.0.0.1:8787".parse().ok()
        );
        assert_eq!(
            p("[fd00::1]:8787").unwrap().literal(),
            "[fd00::1]:8787".parse().ok()
        );
        let name = p("patina-0.patina.default.svc.cluster.local:8787").unwrap();
        assert_eq!(name.host, "patina-0.patina.default.svc.cluster.local");
        assert_eq!(name.port, 8787);
        assert_eq!(name.literal(), None);
        assert_eq!(
            name.to_string(),
            "patina-0.patina.default.svc.cluster.local:8787"
        );
        assert_eq!(p("[fd00::1]:1").unwrap().to_string(), "[fd00::1]:1");
        for bad in [
            "node1",
            "node1:",
            "node1:99999",
            ":8787",
            "bad host:1",
            "a/b:1",
        ] {
            assert!(p(bad).is_err(), "{bad} accepted");
        }
    }

    #[tokio::test]
    async fn names_resolve_and_dead_names_are_skipped() {
        let entries = [
            HostPort::parse("localhost:4000").unwrap(),
            HostPort::parse("no-such-host.invalid:4000").unwrap(),
            HostPort::parse("127.0.0.2:4001").unwrap(),
        ];
        let addrs = resolve_all(&entries, Duration::from_secs(5)).await;
        assert!(
            addrs.contains(&"127.0.0.1:4000".parse().unwrap()),
            "{addrs:?}"
        );
        assert!(
            addrs.contains(&"127.0.0.2:4001".parse().unwrap()),
            "{addrs:?}"
        );
        assert!(addrs.iter().all(|a| a.port() != 0));
    }

    #[test]
    fn advertised_address() {
        let bound_any: SocketAddr = "0.0.0.0:8787".parse().unwrap();
        let external: SocketAddr = "10.1.2.3:8787".parse().unwrap();
        assert_eq!(advertised(bound_any, Some(external), &[]), Ok(external));
        let specific: SocketAddr = "127.0.0.1:8787".parse().unwrap();
        assert_eq!(advertised(specific, None, &[]), Ok(specific));
        // A wildcard takes the route to a peer: loopback for a loopback peer.
        assert_eq!(
            advertised(bound_any, None, &["127.0.0.1:9000".parse().unwrap()]),
            Ok("127.0.0.1:8787".parse().unwrap())
        );
        assert!(advertised(bound_any, None, &[]).is_err());
        assert!(advertised(bound_any, Some(bound_any), &[]).is_err());
        assert_eq!(
            canonical("[::ffff:10.0.0.1]:1".parse().unwrap()),
            "10.0.0.1:1".parse::<SocketAddr>().unwrap()
        );
    }
}
