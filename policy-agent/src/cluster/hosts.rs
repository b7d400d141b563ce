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
    etcd::{Etcd, EtcdError, ModRevisionIs, prefix_end},
    follow::{self, OnChange},
    overlay::{self, Overlay, Peer},
};
use crate::agent::{self, SharedAgent};

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

fn hosts_prefix(prefix: &str) -> String {
    format!("{}/hosts/", prefix.trim_end_matches('/'))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Every registered host, by name.
pub fn list(etcd: &Etcd, prefix: &str) -> Result<Vec<HostRecord>, EtcdError> {
    let hosts = hosts_prefix(prefix);
    let range = etcd.range(&hosts, &prefix_end(&hosts))?;
    Ok(range.kvs.iter().filter_map(|kv| serde_json::from_slice(&kv.value).ok()).collect())
}

/// The newest change in the log (its sequence number), and etcd's revision.
pub fn newest(etcd: &Etcd, prefix: &str) -> Result<(u64, i64), EtcdError> {
    let head = format!("{}/log/head", prefix.trim_end_matches('/'));
    let range = etcd.range(&head, &prefix_end(&head))?;
    let seq = range
        .kvs
        .first()
        .and_then(|kv| String::from_utf8_lossy(&kv.value).parse().ok())
        .unwrap_or(0);
    Ok((seq, range.revision))
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
    let etcd = config.etcd();
    let key = format!("{}{}", hosts_prefix(&config.prefix), config.host);
    let ttl = i64::from(config.lease_seconds.max(3));
    let period = Duration::from_secs((ttl / 3) as u64);
    let mut lease = 0;
    let mut healthy = true;
    let mut missing_since = BTreeMap::new();
    loop {
        let _ = follow::catch_up(&agent, &on_change);
        let position = agent::lock(&agent).position();
        let record = HostRecord {
            host: config.host.clone(),
            underlay_address: config.underlay_address,
            applied_seq: position.seq,
            applied_revision: position.revision,
            reported_at: now(),
            subnet: Some(membership.subnet),
            vtep_mac: Some(overlay::mac_text(&membership.overlay.mac)),
        };
        let result = (|| -> Result<(), EtcdError> {
            if lease == 0 || !etcd.keep_alive(lease)? {
                lease = etcd.grant_lease(ttl)?;
            }
            let value = serde_json::to_vec(&record).expect("host records serialize");
            etcd.put_if(&[], &[(&key, &value, lease)])?;
            let hosts = list(&etcd, &config.prefix)?;
            follow_peers(&agent, &mut membership, &config.host, &hosts);
            reap_gone_hosts(&agent, &etcd, &config, &hosts, &mut missing_since)?;
            register_held(&agent, &etcd, &config, &membership)?;
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
/// every registered host.
fn follow_peers(agent: &SharedAgent, membership: &mut Membership, me: &str, hosts: &[HostRecord]) {
    let peers: std::collections::BTreeSet<Peer> = hosts
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
    let addresses = hosts.iter().filter(|h| h.host != me).map(|h| h.underlay_address).collect();
    if let Err(e) = agent::lock(agent).set_peers(&addresses) {
        warn!(error = %e, "cannot update the cluster's peers in the kernel");
    }
    let Membership { overlay, runtime, .. } = membership;
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
    config: &ClusterConfig,
    membership: &Membership,
) -> Result<(), EtcdError> {
    if agent::lock(agent).held().is_empty() {
        return Ok(());
    }
    let key = format!("{}/subnets/{}", config.prefix.trim_end_matches('/'), membership.index);
    let range = etcd.range(&key, &prefix_end(&key))?;
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
    missing_since: &mut BTreeMap<String, Instant>,
) -> Result<(), EtcdError> {
    let dir = format!("{}/subnets/", config.prefix.trim_end_matches('/'));
    let subnets = etcd.range(&dir, &prefix_end(&dir))?;
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
