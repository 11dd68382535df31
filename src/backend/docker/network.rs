//! The walls on the Docker Engine: which network each container berth makes is put on.
//!
//! No berth container is left on the engine's default bridge, where every container reaches
//! every other on any port. Instead:
//! - a challenge of one container joins its instance's shared challenge network, made with
//!   inter-container traffic off (`enable_icc=false`): its containers reach nobody there, and only
//!   their published ports answer, from the host;
//! - a challenge with sidecars or replicas gets a network of its own, where its containers reach each other by
//!   name, and nothing else is on it;
//! - pipeline steps and the builds they make join the instance's shared steps network, also with
//!   inter-container traffic off: a step reaches neither a challenge nor another run;
//! - `network: {egress: false}` makes each of these an internal network: no route out at all.
//!
//! The engine keeps networks apart from each other. Its default address pools hold about 30
//! networks, so berth takes every subnet from a pool of its own ([`SubnetPool`], 10.213.0.0/16 by
//! default), a small one per challenge with sidecars, so 1,000 challenges fit without changing
//! the daemon. Every bridge berth makes is named `berth` and ten hex digits ([`bridge_name`]), so
//! one host firewall rule (`-i berth+`) can close the host's own services to all of them.

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use bollard::models::{Ipam, IpamConfig, Network, NetworkCreateRequest};
use bollard::query_parameters::{InspectContainerOptions, ListNetworksOptions};
use sha2::{Digest, Sha256};

use super::{Attempt, DockerBackend, Trouble, is_status, remove_container};
use crate::backend::{LABEL_INSTANCE, LABEL_NAME};
use crate::descriptor::{Kind, ObjectRef};

/// Label on a network saying which wall it is (`challenges`, `steps`, `own`, `instances`).
pub(super) const LABEL_WALL: &str = "berth.wall";

/// The pool berth takes subnets from unless told otherwise (`BERTH_SUBNET_POOL`).
pub const DEFAULT_SUBNET_POOL: &str = "10.213.0.0/16";

/// The prefix of every bridge interface berth makes; the host firewall matches `berth+`.
pub const BRIDGE_PREFIX: &str = "berth";

/// A block of IPv4 addresses: `10.213.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetPool {
    base: u32,
    prefix: u8,
}

/// Why a text is not a subnet pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadSubnetPool {
    /// Not `a.b.c.d/n`.
    #[error("\"{0}\" is not an IPv4 block; expected e.g. 10.213.0.0/16")]
    NotABlock(String),
    /// A block too large or too small to hold berth's networks.
    #[error("\"{0}\": a subnet pool must be from /8 to /24, to hold networks of /28 and more")]
    Size(String),
    /// Bits set past the prefix: the block meant, and its prefix.
    #[error("\"{written}\" has host bits set; did you mean {meant}?")]
    HostBits {
        /// As written.
        written: String,
        /// The block it is in.
        meant: String,
    },
    /// `BERTH_SUBNET_POOL` holds no pool.
    #[error("BERTH_SUBNET_POOL: {0}")]
    Environment(Box<BadSubnetPool>),
}

impl FromStr for SubnetPool {
    type Err = BadSubnetPool;
    fn from_str(text: &str) -> Result<Self, BadSubnetPool> {
        let invalid = || BadSubnetPool::NotABlock(text.into());
        let (address, prefix) = text.split_once('/').ok_or_else(invalid)?;
        let address: Ipv4Addr = address.parse().map_err(|_| invalid())?;
        let prefix: u8 = prefix.parse().map_err(|_| invalid())?;
        if !(8..=24).contains(&prefix) {
            return Err(BadSubnetPool::Size(text.into()));
        }
        let base = u32::from(address);
        if base & !mask(prefix) != 0 {
            return Err(BadSubnetPool::HostBits {
                written: text.into(),
                meant: format!("{}/{prefix}", Ipv4Addr::from(base & mask(prefix))),
            });
        }
        Ok(SubnetPool { base, prefix })
    }
}

impl fmt::Display for SubnetPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

impl Default for SubnetPool {
    fn default() -> Self {
        DEFAULT_SUBNET_POOL
            .parse()
            .expect("the default pool parses")
    }
}

impl SubnetPool {
    /// The pool `BERTH_SUBNET_POOL` names, or the default; the error names the variable.
    pub fn from_env() -> Result<SubnetPool, BadSubnetPool> {
        match std::env::var("BERTH_SUBNET_POOL") {
            Ok(text) if !text.is_empty() => text
                .parse()
                .map_err(|e| BadSubnetPool::Environment(Box::new(e))),
            _ => Ok(SubnetPool::default()),
        }
    }
}

/// `a.b.c.d/n` as a block, whatever its size (the engine's networks are of any).
fn parse_block(text: &str) -> Option<Block> {
    let (address, prefix) = text.split_once('/')?;
    let address: Ipv4Addr = address.parse().ok()?;
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
    Some((u32::from(address) & mask(prefix), prefix))
}

fn mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        _ => u32::MAX << (32 - u32::from(prefix)),
    }
}

/// A subnet in use, as `(first address, prefix)`.
type Block = (u32, u8);

fn overlaps(a: Block, b: Block) -> bool {
    let shorter = a.1.min(b.1);
    a.0 & mask(shorter) == b.0 & mask(shorter)
}

/// The first free block of `/prefix` in `pool` that overlaps none of `used`, looking from the
/// `start`th block on (and round the pool again): berths that lost a race for the lowest block
/// spread out instead of all trying the next one. Pure.
fn pick_subnet(pool: SubnetPool, used: &[Block], prefix: u8, start: u64) -> Option<Block> {
    if prefix < pool.prefix || prefix > 30 {
        return None;
    }
    let step = 1u64 << (32 - u32::from(prefix));
    let count = 1u64 << (u32::from(prefix) - u32::from(pool.prefix));
    (0..count)
        .map(|i| u64::from(pool.base) + ((start + i) % count) * step)
        .map(|at| (at as u32, prefix))
        .find(|candidate| !used.iter().any(|block| overlaps(*block, *candidate)))
}

/// The smallest prefix whose block holds `containers` (twice over, for start-first updates), the
/// network's own address, its gateway and its broadcast: never smaller than a /28.
fn prefix_for(containers: usize) -> u8 {
    let needed = (2 * containers + 3) as u64;
    let mut prefix = 28u8;
    while prefix > 16 && (1u64 << (32 - u32::from(prefix))) < needed {
        prefix -= 1;
    }
    prefix
}

/// `block` as Docker writes a subnet, and its gateway (the first host address).
fn subnet_and_gateway(block: Block) -> (String, String) {
    (
        format!("{}/{}", Ipv4Addr::from(block.0), block.1),
        Ipv4Addr::from(block.0 + 1).to_string(),
    )
}

/// The bridge interface of the network named `network`: `berth` and ten hex digits of its name's
/// digest (an interface name holds at most 15 characters).
pub fn bridge_name(network: &str) -> String {
    let digest = Sha256::digest(network.as_bytes());
    format!("{BRIDGE_PREFIX}{}", &hex::encode(digest)[..10])
}

/// One network berth puts containers on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wall {
    /// The instance's shared network for challenges of one container.
    Challenges {
        /// Whether it has a route out.
        egress: bool,
    },
    /// The instance's shared network for pipeline steps and the builds they make.
    Steps {
        /// Whether it has a route out.
        egress: bool,
    },
    /// A challenge's own network, for its replicas and sidecars only.
    Own {
        /// The challenge.
        key: ObjectRef,
        /// Whether it has a route out.
        egress: bool,
        /// How many containers it holds at most (replicas and sidecars).
        containers: usize,
    },
    /// The network of one instance (one version of it) with sidecars: its containers reach each
    /// other by name, and nothing else is on it.
    Instance {
        /// The challenge.
        key: ObjectRef,
        /// The instance's main container, whose name the network takes.
        container: String,
        /// Whether it has a route out.
        egress: bool,
        /// How many containers it holds (the main one and the sidecars).
        containers: usize,
    },
    /// The network of one version of an instanced challenge, for its per-team instances, which
    /// reach nobody on it.
    Instances {
        /// The challenge.
        key: ObjectRef,
        /// The version's template hash.
        version: String,
        /// Whether it has a route out.
        egress: bool,
        /// How many containers it holds at most (`max` and `pool`).
        containers: usize,
    },
}

impl Wall {
    /// The label of an instanced challenge's networks.
    pub const INSTANCES: &str = "instances";

    fn egress(&self) -> bool {
        match self {
            Wall::Challenges { egress }
            | Wall::Steps { egress }
            | Wall::Own { egress, .. }
            | Wall::Instance { egress, .. }
            | Wall::Instances { egress, .. } => *egress,
        }
    }

    /// The network's name for `instance`.
    pub fn name(&self, instance: &str) -> String {
        let offline = if self.egress() { "" } else { "-offline" };
        match self {
            Wall::Challenges { .. } => format!("berth-{instance}-challenges{offline}"),
            Wall::Steps { .. } => format!("berth-{instance}-steps{offline}"),
            Wall::Own { key, .. } => format!("berth-{instance}-{}-walled{offline}", key.name),
            Wall::Instance { container, .. } => format!("{container}{offline}"),
            Wall::Instances { key, version, .. } => format!(
                "berth-{instance}-{}-instances-{}{offline}",
                key.name,
                &version[..version.len().min(12)]
            ),
        }
    }

    /// Which wall, as templates record it: `challenges`, `own-offline`; an instanced
    /// challenge's with its size (`instances/23`), so a `max` that needs a larger network makes
    /// a new version.
    pub fn describe(&self) -> String {
        let wall = match self {
            Wall::Instances { .. } => format!("{}/{}", self.label(), self.prefix()),
            _ => self.label().to_string(),
        };
        match self.egress() {
            true => wall,
            false => format!("{wall}-offline"),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Wall::Challenges { .. } => "challenges",
            Wall::Steps { .. } => "steps",
            Wall::Own { .. } => "own",
            Wall::Instance { .. } => "instance",
            Wall::Instances { .. } => Wall::INSTANCES,
        }
    }

    /// Whether containers on it reach each other: only on a challenge's (or an instance's) own
    /// network.
    fn inter_container(&self) -> bool {
        matches!(self, Wall::Own { .. } | Wall::Instance { .. })
    }

    fn prefix(&self) -> u8 {
        match self {
            // Room for a CTF's worth of challenges, replicas and updates.
            Wall::Challenges { .. } => 20,
            Wall::Steps { .. } => 22,
            Wall::Own { containers, .. }
            | Wall::Instance { containers, .. }
            | Wall::Instances { containers, .. } => prefix_for(*containers),
        }
    }
}

impl DockerBackend {
    /// The networks of this instance named `name` (made for `key`, when one is given), oldest
    /// first.
    async fn networks_named(&self, name: &str, key: Option<&ObjectRef>) -> Attempt<Vec<Network>> {
        let label = match key {
            Some(key) => self
                .ownership
                .selector(Kind::Challenge, Some(key.name.as_str())),
            None => vec![format!("{LABEL_INSTANCE}={}", self.instance())],
        };
        let filters = HashMap::from([
            ("name".to_string(), vec![name.to_string()]),
            ("label".to_string(), label),
        ]);
        let mut networks = self
            .docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(filters),
            }))
            .await
            .map_err(|e| self.trouble("cannot list networks", e))?;
        // The engine's name filter matches substrings.
        networks.retain(|n| n.name.as_deref() == Some(name));
        networks.sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
        Ok(networks)
    }

    /// Every network this instance made for the challenge `key` (its own, of any wall or age).
    pub(super) async fn networks_of(&self, key: &ObjectRef) -> Attempt<Vec<Network>> {
        let filters = HashMap::from([(
            "label".to_string(),
            self.ownership
                .selector(Kind::Challenge, Some(key.name.as_str())),
        )]);
        self.docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(filters),
            }))
            .await
            .map_err(|e| self.trouble("cannot list networks", e))
    }

    /// The subnets every network on the engine uses, whoever made it.
    async fn used_blocks(&self) -> Attempt<Vec<Block>> {
        let networks = self
            .docker
            .list_networks(None::<ListNetworksOptions>)
            .await
            .map_err(|e| self.trouble("cannot list networks", e))?;
        Ok(networks
            .iter()
            .flat_map(|n| n.ipam.iter().flat_map(|i| i.config.iter().flatten()))
            .filter_map(|config| parse_block(config.subnet.as_deref()?))
            .collect())
    }

    /// The network of `wall`, made when missing, by name. The engine accepts two networks of one
    /// name (two berths racing); the oldest is kept, and the others are removed along with the
    /// containers of this challenge on them, which this pass then makes again on the kept one.
    pub(super) async fn ensure_wall(&self, wall: &Wall) -> Attempt<String> {
        let labels = match wall {
            Wall::Own { key, .. } | Wall::Instance { key, .. } | Wall::Instances { key, .. } => {
                self.ownership.labels(key, "")
            }
            _ => self.ownership.instance_labels(),
        };
        self.ensure_wall_labelled(wall, labels).await
    }

    /// [`Self::ensure_wall`], the network made with `labels` (and its wall's).
    pub(super) async fn ensure_wall_labelled(
        &self,
        wall: &Wall,
        labels: HashMap<String, String>,
    ) -> Attempt<String> {
        let name = wall.name(self.instance());
        let key = match wall {
            Wall::Own { key, .. } | Wall::Instance { key, .. } | Wall::Instances { key, .. } => {
                Some(key)
            }
            _ => None,
        };
        let mut networks = self.networks_named(&name, key).await?;
        if networks.is_empty() {
            // The steps of one pass run at once, and many want the same shared network: one
            // makes it, the others then find it.
            let _making = self.making_networks.lock().await;
            if self.networks_named(&name, key).await?.is_empty() {
                self.create_wall(wall, &name, labels).await?;
            }
            return Ok(name);
        }
        networks.remove(0);
        for duplicate in networks {
            self.remove_duplicate(&name, duplicate, key).await?;
        }
        Ok(name)
    }

    async fn create_wall(
        &self,
        wall: &Wall,
        name: &str,
        mut labels: HashMap<String, String>,
    ) -> Attempt<()> {
        labels.insert(LABEL_WALL.to_string(), wall.label().to_string());
        let options = HashMap::from([
            (
                "com.docker.network.bridge.name".to_string(),
                bridge_name(name),
            ),
            (
                "com.docker.network.bridge.enable_icc".to_string(),
                wall.inter_container().to_string(),
            ),
        ]);
        // Another berth may take the same subnet between the list and the create: the engine
        // refuses the overlap, and the next free one is tried.
        // The engine may still hold the subnet of a network just removed (it frees it a moment
        // later), so a refused subnet is passed over, not tried again.
        let mut refused = String::new();
        let mut passed_over: Vec<Block> = Vec::new();
        for attempt in 0..32 {
            let mut used = self.used_blocks().await?;
            used.extend(&passed_over);
            // The lowest free block first; after a refusal, from anywhere in the pool.
            let start = match attempt {
                0 => 0,
                _ => crate::backend::random_bytes()
                    .map(|bytes| u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")))
                    .unwrap_or(attempt),
            };
            let Some(block) = pick_subnet(self.subnet_pool, &used, wall.prefix(), start) else {
                return Err(Trouble::Failed(format!(
                    "no free /{} left in the subnet pool {} for network {name}; give berth a larger pool with BERTH_SUBNET_POOL",
                    wall.prefix(),
                    self.subnet_pool
                )));
            };
            let (subnet, gateway) = subnet_and_gateway(block);
            let request = NetworkCreateRequest {
                name: name.to_string(),
                driver: Some("bridge".into()),
                internal: Some(!wall.egress()),
                labels: Some(labels.clone()),
                options: Some(options.clone()),
                ipam: Some(Ipam {
                    driver: Some("default".into()),
                    config: Some(vec![IpamConfig {
                        subnet: Some(subnet),
                        gateway: Some(gateway),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            };
            match self.docker.create_network(request).await {
                Ok(_) => return Ok(()),
                Err(error) if super::engine_message(&error).contains("overlaps") => {
                    refused = super::engine_message(&error);
                    passed_over.push(block);
                    continue;
                }
                // Another berth (another process) made it meanwhile: its bridge name is ours.
                Err(error)
                    if super::engine_message(&error).contains("same bridge name")
                        || is_status(&error, 409) =>
                {
                    return Ok(());
                }
                Err(error) => {
                    return Err(self.trouble(&format!("cannot create network {name}"), error));
                }
            }
        }
        Err(Trouble::Transient(format!(
            "cannot create network {name}: every free subnet was taken by someone else meanwhile ({refused})"
        )))
    }

    async fn remove_duplicate(
        &self,
        name: &str,
        duplicate: Network,
        key: Option<&ObjectRef>,
    ) -> Attempt<()> {
        let id = duplicate.id.unwrap_or_default();
        tracing::warn!(network = %name, %id, "removing a duplicate network");
        let attached = self
            .docker
            .inspect_network(
                &id,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
            .ok()
            .and_then(|n| n.containers)
            .unwrap_or_default();
        for container in attached.keys() {
            // Only the instance's own containers (of this challenge, on its own network) are
            // removed, to be made again on the kept network; anything else is disconnected.
            let owned = self
                .docker
                .inspect_container(container, None::<InspectContainerOptions>)
                .await
                .ok()
                .and_then(|c| c.config)
                .and_then(|c| c.labels)
                .is_some_and(|labels| {
                    labels.get(LABEL_INSTANCE).map(String::as_str) == Some(self.instance())
                        && key.is_none_or(|key| {
                            labels.get(LABEL_NAME).map(String::as_str) == Some(key.name.as_str())
                        })
                });
            let result = match owned {
                true => remove_container(&self.docker, container).await,
                false => {
                    let request = bollard::models::NetworkDisconnectRequest {
                        container: container.clone(),
                        force: Some(true),
                    };
                    self.docker.disconnect_network(&id, request).await
                }
            };
            result.map_err(|e| self.trouble("cannot clear a duplicate network", e))?;
        }
        match self.docker.remove_network(&id).await {
            Err(error) if !is_status(&error, 404) => {
                Err(self.trouble("cannot remove a duplicate network", error))
            }
            _ => Ok(()),
        }
    }

    /// Removes the challenge's own networks other than `keep` (an older wall, or the one before
    /// its egress or sidecars changed), once nothing of it is on them. Best effort: a network
    /// something is still attached to stays until a later pass.
    pub(super) async fn remove_networks_of(&self, key: &ObjectRef, keep: Option<&str>) -> usize {
        let Ok(networks) = self.networks_of(key).await else {
            return 0;
        };
        let mut removed = 0;
        for network in networks {
            // An instance's own network is its instance's to remove, even while it is empty (a
            // spawn has just made it, or the instance's containers are stopped).
            let per_instance = network
                .labels
                .as_ref()
                .and_then(|labels| labels.get(LABEL_WALL))
                .is_some_and(|wall| wall == "instance");
            if network.name.as_deref() == keep || per_instance {
                continue;
            }
            let id = network.id.unwrap_or_default();
            if self.docker.remove_network(&id).await.is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(text: &str) -> Block {
        let (address, prefix) = text.split_once('/').unwrap();
        (
            u32::from(address.parse::<Ipv4Addr>().unwrap()),
            prefix.parse().unwrap(),
        )
    }

    #[test]
    fn pools_are_checked() {
        assert_eq!(
            "10.213.0.0/16".parse::<SubnetPool>().unwrap().to_string(),
            "10.213.0.0/16"
        );
        assert!("10.213.0.1/16".parse::<SubnetPool>().is_err());
        assert!("10.213.0.0/30".parse::<SubnetPool>().is_err());
        assert!("10.213.0.0".parse::<SubnetPool>().is_err());
        assert!("nonsense/16".parse::<SubnetPool>().is_err());
    }

    /// Subnets are taken first-fit, aligned, around whatever the engine already uses (berth's
    /// own, another instance's, or a network someone made by hand inside the pool).
    #[test]
    fn subnets_are_picked_around_those_in_use() {
        let pool: SubnetPool = "10.213.0.0/16".parse().unwrap();
        assert_eq!(pick_subnet(pool, &[], 28, 0), Some(block("10.213.0.0/28")));
        let used = [block("10.213.0.0/28"), block("172.17.0.0/16")];
        assert_eq!(
            pick_subnet(pool, &used, 28, 0),
            Some(block("10.213.0.16/28"))
        );
        // A larger block skips to the next aligned place that is wholly free.
        assert_eq!(
            pick_subnet(pool, &used, 20, 0),
            Some(block("10.213.16.0/20"))
        );
        // A network covering the whole pool leaves nothing.
        assert_eq!(pick_subnet(pool, &[block("10.0.0.0/8")], 28, 0), None);
        // Full.
        let all: Vec<Block> = (0..16).map(|i| (pool.base + (i << 12), 20)).collect();
        assert_eq!(pick_subnet(pool, &all, 28, 0), None);
        assert_eq!(pick_subnet(pool, &[], 8, 0), None, "larger than the pool");
        // From another start, the first free block at or after it, round the pool again.
        let from = pick_subnet(pool, &[block("10.213.0.32/28")], 28, 2);
        assert_eq!(from, Some(block("10.213.0.48/28")));
        let blocks = 1u64 << (28 - 16);
        let wrapped = pick_subnet(pool, &[], 28, blocks - 1 + blocks);
        assert_eq!(wrapped, Some(block("10.213.255.240/28")));
    }

    #[test]
    fn a_challenges_network_holds_its_containers_twice_over() {
        assert_eq!(prefix_for(1), 28);
        assert_eq!(prefix_for(6), 28);
        assert_eq!(prefix_for(7), 27);
        assert_eq!(prefix_for(101), 24);
    }

    #[test]
    fn bridges_are_named_for_one_firewall_rule() {
        let name = bridge_name("berth-default-challenges");
        assert!(
            name.starts_with(BRIDGE_PREFIX) && name.len() == 15,
            "{name}"
        );
        assert_ne!(name, bridge_name("berth-default-steps"));
    }
}
