//! Several hosts on one machine: a network namespace per host, each with its own address on a
//! shared bridge (veth pairs into a hub namespace), and names for them in the host's own
//! `/etc/hosts` (`ip netns exec` mounts `/etc/netns/<ns>/hosts` over it). Everything lives in
//! namespaces this process creates, named after its pid, and is removed on drop; the machine's
//! own network is not touched.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Output};

/// A lab of hosts `1..=n` at `10.77.0.<i>/24`.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    hosts: usize,
}

/// Why no lab could be made (not root, no `ip`, no namespaces in this sandbox).
pub type Unavailable = String;

fn ip(args: &[&str]) -> Result<Output, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Lab {
    /// Creates `hosts` hosts; `names` are extra `/etc/hosts` lines every host sees
    /// (`(name, host index)`), besides `host<i>` for each.
    pub fn new(hosts: usize, names: &[(&str, usize)]) -> Result<Lab, Unavailable> {
        assert!((1..=200).contains(&hosts));
        let lab = Lab {
            prefix: format!("pt{}", std::process::id()),
            hosts,
        };
        // The first namespace tells whether this machine lets us make any (root, iproute2).
        ip(&["netns", "add", &lab.hub()]).map_err(|e| {
            format!("cannot create network namespaces here (root and iproute2 needed): {e}")
        })?;
        let hub = lab.hub();
        let in_hub = |args: &[&str]| {
            let mut all = vec!["-n", hub.as_str()];
            all.extend_from_slice(args);
            ip(&all)
        };
        in_hub(&["link", "add", "br0", "type", "bridge"])?;
        in_hub(&["link", "set", "br0", "up"])?;
        in_hub(&["link", "set", "lo", "up"])?;
        let mut hosts_file = String::from("127.0.0.1 localhost\n");
        for i in 1..=hosts {
            hosts_file.push_str(&format!("{} host{i}\n", lab.addr(i)));
        }
        for (name, i) in names {
            hosts_file.push_str(&format!("{} {name}\n", lab.addr(*i)));
        }
        for i in 1..=hosts {
            let ns = lab.ns(i);
            ip(&["netns", "add", &ns])?;
            let port = format!("v{i}");
            in_hub(&[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            in_hub(&["link", "set", &port, "master", "br0", "up"])?;
            let cidr = format!("{}/24", lab.addr(i));
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            let etc = lab.etc(i);
            std::fs::create_dir_all(&etc).map_err(|e| format!("{}: {e}", etc.display()))?;
            std::fs::write(etc.join("hosts"), &hosts_file)
                .map_err(|e| format!("{}: {e}", etc.display()))?;
        }
        Ok(lab)
    }

    fn hub(&self) -> String {
        format!("{}-hub", self.prefix)
    }

    /// The namespace of host `i`.
    pub fn ns(&self, i: usize) -> String {
        format!("{}-h{i}", self.prefix)
    }

    fn etc(&self, i: usize) -> PathBuf {
        PathBuf::from("/etc/netns").join(self.ns(i))
    }

    /// Host `i`'s address.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, i as u8)
    }

    /// A command run inside host `i`'s namespace (`ip netns exec`).
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns(i)]).arg(program);
        command
    }

    /// Takes host `i`'s link down (`up = false`) or up again: the host is cut off from the
    /// others, its processes keep running.
    pub fn set_link(&self, i: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.ns(i), "link", "set", "eth0", state])
            .unwrap_or_else(|e| panic!("setting host{i}'s link {state}: {e}"));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of every veth pair, and so the pair.
        for i in 1..=self.hosts {
            let _ = ip(&["netns", "del", &self.ns(i)]);
            let _ = std::fs::remove_dir_all(self.etc(i));
        }
        let _ = ip(&["netns", "del", &self.hub()]);
    }
}
