//! The host registry: each agent keeps a record of its host in etcd
//! (`hosts/NAME`: underlay address, how far it has applied the log, when it
//! last reported) under a lease it renews every third of the lease time
//! (`lease`). When an agent is gone for longer than the lease, its record
//! expires. The registration's round also keeps the overlay in line with
//! the registry (`peers`), lets hosts gone for good leave (`gone`) and
//! takes back a returning host's endpoints (`held`).

mod gone;
mod held;
mod lease;
mod peers;

use std::{
    net::Ipv4Addr,
    thread,
    time::{SystemTime, UNIX_EPOCH},
};

use lease::Lease;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{
    ClusterConfig,
    follow::{self, OnChange},
    overlay::{self, Overlay},
};
use crate::{
    agent::{self, SharedAgent},
    etcd::{Etcd, EtcdError, keys::Keys, prefix_end},
    store::lineage::LogId,
};

/// One host as registered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub host: String,
    pub underlay_address: Ipv4Addr,
    /// Changes of the log this host has applied.
    pub applied_seq: u64,
    /// etcd's revision it had read up to.
    pub applied_revision: i64,
    /// When it last reported (seconds since the epoch).
    pub reported_at: u64,
    /// Its /24 of the overlay network.
    #[serde(default)]
    pub subnet: Option<Ipv4Addr>,
    /// Its VXLAN device's MAC address.
    #[serde(default)]
    pub vtep_mac: Option<String>,
    /// The identity of the log it applied (see `lineage`).
    #[serde(default)]
    pub log_id: Option<String>,
    /// Why the log in etcd is not the one it applied (`lineage`'s cause),
    /// if it is not.
    #[serde(default)]
    pub diverged: Option<String>,
}

/// The newest change of the log in etcd.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Newest {
    /// Its number (0: no log).
    pub seq: u64,
    /// etcd's revision when read.
    pub revision: i64,
    /// The log's identity, if it has one.
    pub log: Option<LogId>,
}

/// This host's part of the overlay, which the registration keeps in step
/// with the other hosts' records.
pub struct Membership {
    pub subnet: Ipv4Addr,
    /// Its index: the key `subnets/INDEX` in etcd.
    pub index: u8,
    pub overlay: Overlay,
    /// The runtime netlink requests run on.
    pub runtime: tokio::runtime::Handle,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Every registered host, by name.
pub fn list(etcd: &Etcd, keys: &Keys) -> Result<Vec<HostRecord>, EtcdError> {
    let hosts = keys.hosts();
    let range = etcd.range(&hosts, &prefix_end(&hosts))?;
    Ok(range.kvs.iter().filter_map(|kv| serde_json::from_slice(&kv.value).ok()).collect())
}

/// The newest change in the log, the log's identity and etcd's revision
/// (the head and the id, which sort last in the log, in one read).
pub fn newest(etcd: &Etcd, keys: &Keys) -> Result<Newest, EtcdError> {
    let range = etcd.range(&keys.head(), &prefix_end(&keys.log()))?;
    let mut newest = Newest { revision: range.revision, ..Newest::default() };
    for kv in &range.kvs {
        if kv.key == keys.head() {
            newest.seq = String::from_utf8_lossy(&kv.value).parse().unwrap_or(0);
        } else if kv.key == keys.log_id() {
            newest.log = serde_json::from_slice(&kv.value).ok();
        }
    }
    Ok(newest)
}

/// Keeps this host registered, catches up with the log, and brings the
/// overlay (routes to the other hosts, the peers the underlay program
/// accepts) in line with the registry, at each renewal; runs forever on its
/// own thread. Each round, in order: catch up; report this host under its
/// lease (`lease`); keep its subnet's lease (`overlay`); follow the other
/// hosts (`peers`); unless the log diverged, let hosts gone for good leave
/// (`gone`) and take back this host's held endpoints (`held`).
pub fn register(
    agent: SharedAgent,
    config: ClusterConfig,
    on_change: OnChange,
    mut membership: Membership,
) {
    let (etcd, keys) = (config.etcd(), config.keys());
    let mut lease = Lease::new(etcd.clone(), keys.host(&config.host), config.lease_seconds);
    let mut healthy = true;
    let mut missing_since = gone::MissingSince::new();
    loop {
        let _ = follow::catch_up(&agent, &on_change);
        let record = this_host(&agent, &config, &membership);
        let diverged = record.diverged.is_some();
        let result = (|| -> Result<(), EtcdError> {
            lease.report(&record)?;
            let hosts = list(&etcd, &keys)?;
            let subnets = etcd.range(&keys.subnets(), &prefix_end(&keys.subnets()))?;
            overlay::keep_lease(&etcd, &keys, &config.host, membership.index, &subnets)?;
            // A diverged log (a wiped or restored etcd) may lack hosts that
            // are there: routes are only added, and nobody is reaped or
            // registered again, until it is republished.
            let leased = subnets
                .kvs
                .iter()
                .filter_map(|kv| kv.key.strip_prefix(&keys.subnets())?.parse().ok())
                .collect();
            peers::follow(&agent, &mut membership, &config.host, &hosts, &leased, !diverged);
            if !diverged {
                gone::reap(&agent, &etcd, &config, &hosts, &subnets, &mut missing_since)?;
                held::register(&agent, &etcd, &keys, &config, &membership)?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => healthy = true,
            Err(e) if healthy => {
                warn!(error = %e, "cannot register this host in the cluster; retrying");
                healthy = false;
                lease.lost();
            }
            Err(_) => lease.lost(),
        }
        thread::sleep(lease.period());
    }
}

/// What this host reports: where it is, how far it applied the log and
/// whether the log diverged, its subnet and VXLAN device.
fn this_host(agent: &SharedAgent, config: &ClusterConfig, membership: &Membership) -> HostRecord {
    let agent = agent::lock(agent);
    let position = agent.position();
    HostRecord {
        host: config.host.clone(),
        underlay_address: config.underlay_address,
        applied_seq: position.seq,
        applied_revision: position.revision,
        reported_at: now(),
        subnet: Some(membership.subnet),
        vtep_mac: Some(policy_api::link::mac_text(&membership.overlay.mac)),
        log_id: agent.log_id().map(str::to_owned),
        diverged: agent.diverged().map(|d| d.cause().to_owned()),
    }
}
