//! The simulated network: one-way latency between two nodes, and loss.
//!
//! The WAN model places nodes in 19 regions in proportion to the fleet in data/wan-regions.csv
//! (each region at least one node): RTT between regions = 4 ms + great-circle km / 75, within a
//! region 1 ms; one-way latency is half, with up to 5% jitter per message.

use patina_core::stats::SplitMix64;

/// The region model, as shipped in the repository.
const WAN_REGIONS: &str = include_str!("../data/wan-regions.csv");

/// A region: name, coordinates, share of the fleet.
#[derive(Debug, Clone)]
pub struct Region {
    /// Airport code.
    pub name: String,
    /// Latitude (degrees).
    pub lat: f64,
    /// Longitude (degrees).
    pub lon: f64,
    /// Relative number of nodes.
    pub weight: u64,
}

/// The 19 regions of the WAN model.
pub fn regions() -> Vec<Region> {
    WAN_REGIONS
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("region") && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Region {
                name: f[0].to_owned(),
                lat: f[1].parse().expect("latitude"),
                lon: f[2].parse().expect("longitude"),
                weight: f[3].trim().parse().expect("weight"),
            }
        })
        .collect()
}

fn great_circle_km(a: &Region, b: &Region) -> f64 {
    let (la1, lo1, la2, lo2) = (
        a.lat.to_radians(),
        a.lon.to_radians(),
        b.lat.to_radians(),
        b.lon.to_radians(),
    );
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().asin()
}

#[derive(Debug, Clone)]
enum Latency {
    Uniform {
        one_way_us: f64,
    },
    Wan {
        region_of: Vec<usize>,
        one_way_us: Vec<Vec<f64>>,
    },
}

/// Latency and loss between simulated nodes.
#[derive(Debug, Clone)]
pub struct Network {
    latency: Latency,
    loss: f64,
}

impl Network {
    /// Every pair at `one_way_ms`; `loss` is the share of messages lost.
    pub fn uniform(_nodes: usize, one_way_ms: f64, loss: f64) -> Network {
        Network {
            latency: Latency::Uniform {
                one_way_us: one_way_ms * 1000.0,
            },
            loss,
        }
    }

    /// The 19-region WAN model for `nodes` nodes, placed by the seed.
    pub fn wan(nodes: usize, loss: f64, seed: u64) -> Network {
        let regions = regions();
        let total: u64 = regions.iter().map(|r| r.weight).sum();
        let mut region_of = Vec::with_capacity(nodes);
        for (i, r) in regions.iter().enumerate() {
            let share = ((nodes as u64 * r.weight) / total).max(1) as usize;
            region_of.extend(std::iter::repeat_n(i, share));
        }
        // Rounding: trim or top up by weight order, then shuffle who is where.
        let mut by_weight: Vec<usize> = (0..regions.len()).collect();
        by_weight.sort_by_key(|&i| std::cmp::Reverse(regions[i].weight));
        let mut k = 0;
        while region_of.len() < nodes {
            region_of.push(by_weight[k % by_weight.len()]);
            k += 1;
        }
        region_of.truncate(nodes);
        let mut rng = SplitMix64::new(seed ^ 0xa11ce);
        for i in (1..region_of.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            region_of.swap(i, j);
        }
        let one_way_us = regions
            .iter()
            .map(|a| {
                regions
                    .iter()
                    .map(|b| {
                        let rtt_ms = if a.name == b.name {
                            1.0
                        } else {
                            4.0 + great_circle_km(a, b) / 75.0
                        };
                        rtt_ms * 1000.0 / 2.0
                    })
                    .collect()
            })
            .collect();
        Network {
            latency: Latency::Wan {
                region_of,
                one_way_us,
            },
            loss,
        }
    }

    /// One-way latency of a message from `a` to `b` (µs), with jitter.
    pub fn latency_us(&self, a: usize, b: usize, rng: &mut SplitMix64) -> u64 {
        let base = match &self.latency {
            Latency::Uniform { one_way_us } => *one_way_us,
            Latency::Wan {
                region_of,
                one_way_us,
            } => one_way_us[region_of[a]][region_of[b]],
        };
        (base * (1.0 + 0.05 * rng.unit())).max(1.0) as u64
    }

    /// One-way latency from `a` to `b` without jitter (µs).
    pub fn base_latency_us(&self, a: usize, b: usize) -> f64 {
        match &self.latency {
            Latency::Uniform { one_way_us } => *one_way_us,
            Latency::Wan {
                region_of,
                one_way_us,
            } => one_way_us[region_of[a]][region_of[b]],
        }
    }

    /// True if this message is lost.
    pub fn loses(&self, rng: &mut SplitMix64) -> bool {
        self.loss > 0.0 && rng.unit() < self.loss
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_has_19_regions_and_sane_latencies() {
        let r = regions();
        assert_eq!(r.len(), 19);
        let ams = r.iter().find(|x| x.name == "ams").unwrap();
        let syd = r.iter().find(|x| x.name == "syd").unwrap();
        let km = great_circle_km(ams, syd);
        assert!((16_000.0..17_000.0).contains(&km), "{km}");
        let net = Network::wan(4453, 0.0, 1);
        let Latency::Wan { region_of, .. } = &net.latency else {
            unreachable!()
        };
        assert_eq!(region_of.len(), 4453);
        assert_eq!(
            region_of.iter().filter(|&&i| r[i].name == "sjc").count(),
            682
        );
    }
}
