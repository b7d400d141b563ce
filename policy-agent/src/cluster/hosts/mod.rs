//! The host registry: each agent keeps a record of its host in etcd
//! (`hosts/NAME`: underlay address, how far it has applied the log, when it
//! last reported) under a lease it renews every third of the lease time.
//! When an agent is gone for longer than the lease, its record expires.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{
    ClusterConfig,
    follow::{self, OnChange},
    overlay::{self, Overlay, Peer},
};
use crate::{
    agent::{self, SharedAgent},
    etcd::{Etcd, EtcdError, ModRevisionIs, Range, keys::Keys, prefix_end},
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
/// own thread.
pub fn register(
    agent: SharedAgent,
    config: ClusterConfig,
    on_change: OnChange,
    mut membership: Membership,
) {
    let (etcd, keys) = (config.etcd(), config.keys());
    let key = keys.host(&config.host);
    let ttl = i64::from(config.lease_seconds.max(3));
    let period = Duration::from_secs((ttl / 3) as u64);
    let mut lease = 0;
    let mut healthy = true;
    let mut missing_since = BTreeMap::new();
    loop {
        let _ = follow::catch_up(&agent, &on_change);
        let (position, log_id, diverged) = {
            let agent = agent::lock(&agent);
            let diverged = agent.diverged().map(|d| d.cause().to_owned());
            (agent.position(), agent.log_id().map(str::to_owned), diverged)
        };
        let record = HostRecord {
            host: config.host.clone(),
            underlay_address: config.underlay_address,
            applied_seq: position.seq,
            applied_revision: position.revision,
            reported_at: now(),
            subnet: Some(membership.subnet),
            vtep_mac: Some(overlay::mac_text(&membership.overlay.mac)),
            log_id,
            diverged: diverged.clone(),
        };
        let result = (|| -> Result<(), EtcdError> {
            if lease == 0 || !etcd.keep_alive(lease)? {
                lease = etcd.grant_lease(ttl)?;
            }
            let value = serde_json::to_vec(&record).expect("host records serialize");
            etcd.put_if(&[], &[(&key, &value, lease)])?;
            let hosts = list(&etcd, &keys)?;
            let subnets = etcd.range(&keys.subnets(), &prefix_end(&keys.subnets()))?;
            overlay::keep_lease(&etcd, &keys, &config.host, membership.index, &subnets)?;
            // A diverged log (a wiped or restored etcd) may lack hosts that
            // are there: routes are only added, and nobody is reaped or
            // registered again, until it is republished.
            follow_peers(&agent, &mut membership, &config.host, &hosts, diverged.is_none());
            if diverged.is_none() {
                reap_gone_hosts(&agent, &etcd, &config, &hosts, &subnets, &mut missing_since)?;
                register_held(&agent, &etcd, &keys, &config, &membership)?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => healthy = true,
            Err(e) if healthy => {
                warn!(error = %e, "cannot register this host in the cluster; retrying");
                healthy = false;
                lease = 0;
            }
            Err(_) => lease = 0,
        }
        thread::sleep(period);
    }
}

/// Routes to every other host's subnet, and accepts tunnel packets from
/// every registered host; with `remove` false, keeps those of hosts that
/// are not registered too.
fn follow_peers(
    agent: &SharedAgent,
    membership: &mut Membership,
    me: &str,
    hosts: &[HostRecord],
    remove: bool,
) {
    let mut peers: std::collections::BTreeSet<Peer> = hosts
        .iter()
        .filter(|h| h.host != me)
        .filter_map(|h| {
            Some(Peer {
                subnet: h.subnet?,
                underlay: h.underlay_address,
                mac: overlay::parse_mac(h.vtep_mac.as_deref()?)?,
            })
        })
        .collect();
    let Membership { overlay, runtime, .. } = membership;
    if !remove {
        let named: std::collections::BTreeSet<Ipv4Addr> = peers.iter().map(|p| p.subnet).collect();
        peers.extend(overlay.routed().iter().filter(|p| !named.contains(&p.subnet)).cloned());
    }
    let addresses = hosts
        .iter()
        .filter(|h| h.host != me)
        .map(|h| h.underlay_address)
        .chain(peers.iter().map(|p| p.underlay))
        .collect();
    if let Err(e) = agent::lock(agent).set_peers(&addresses) {
        warn!(error = %e, "cannot update the cluster's peers in the kernel");
    }
    if let Err(e) = runtime.block_on(overlay.sync(&peers)) {
        warn!(error = %e, "cannot update the routes to the other hosts");
    }
}

/// This host's endpoints that the cluster removed while it was gone (see
/// `agent::returning`) are registered again once the host holds its /24
/// again: kept if still its own, taken back if freed meanwhile. If another
/// host has leased it, they stay held (and denied where their addresses
/// went to other endpoints).
fn register_held(
    agent: &SharedAgent,
    etcd: &Etcd,
    keys: &Keys,
    config: &ClusterConfig,
    membership: &Membership,
) -> Result<(), EtcdError> {
    if agent::lock(agent).held().is_empty() {
        return Ok(());
    }
    let key = keys.subnet(membership.index);
    // This key alone (`subnets/1` is a prefix of `subnets/10`).
    let range = etcd.range(&key, format!("{key}\0").as_bytes())?;
    let ours = match range.kvs.first() {
        Some(kv) => kv.value == config.host.as_bytes(),
        None => {
            let taken = etcd.put_if(
                &[ModRevisionIs { key: key.clone(), mod_revision: 0 }],
                &[(&key, config.host.as_bytes(), 0)],
            )?;
            taken.0
        }
    };
    if !ours {
        warn!(
            subnet = %membership.subnet,
            "this host's /24 was leased by another host while it was gone: its held endpoints \
             stay held until their containers go"
        );
    }
    let subnet = u32::from(membership.subnet) >> 8;
    let in_subnet = |ip: IpAddr| matches!(ip, IpAddr::V4(v4) if u32::from(v4) >> 8 == subnet);
    let held = agent::lock(agent).register_held(ours, in_subnet);
    if !held.registered.is_empty() || !held.gone.is_empty() {
        info!(
            registered = held.registered.len(),
            gone = held.gone.len(),
            kept = held.kept.len(),
            "held endpoints"
        );
    }
    Ok(())
}

/// A host whose record has expired (its agent gone longer than the lease)
/// for longer than `host_grace_seconds` leaves the cluster: its endpoints
/// are removed from the shared state (so every host's DNS stops naming
/// them) and its subnet is freed. Any agent may do it; doing it twice is
/// harmless (removing a missing endpoint is not an error, the subnet is
/// deleted only if unchanged).
fn reap_gone_hosts(
    agent: &SharedAgent,
    etcd: &Etcd,
    config: &ClusterConfig,
    hosts: &[HostRecord],
    subnets: &Range,
    missing_since: &mut BTreeMap<String, Instant>,
) -> Result<(), EtcdError> {
    let present: std::collections::BTreeSet<&str> = hosts.iter().map(|h| h.host.as_str()).collect();
    let grace = Duration::from_secs(u64::from(config.host_grace_seconds));
    missing_since.retain(|host, _| !present.contains(host.as_str()));
    for kv in &subnets.kvs {
        let owner = String::from_utf8_lossy(&kv.value).into_owned();
        if present.contains(owner.as_str()) || owner == config.host {
            continue;
        }
        let since = *missing_since.entry(owner.clone()).or_insert_with(Instant::now);
        if since.elapsed() < grace {
            continue;
        }
        let endpoints: Vec<IpAddr> = agent::lock(agent)
            .state()
            .endpoints()
            .filter(|e| e.host.as_deref() == Some(owner.as_str()))
            .map(|e| e.ip)
            .collect();
        for ip in &endpoints {
            if let Err(e) = agent::lock(agent).remove_endpoint(*ip) {
                warn!(host = owner, %ip, error = %e, "cannot remove a gone host's endpoint");
                return Ok(());
            }
        }
        etcd.delete_if(
            &[ModRevisionIs { key: kv.key.clone(), mod_revision: kv.mod_revision }],
            &kv.key,
        )?;
        missing_since.remove(&owner);
        info!(
            host = owner,
            endpoints = endpoints.len(),
            subnet = kv.key,
            "a host gone past its grace time left the cluster"
        );
    }
    Ok(())
}
