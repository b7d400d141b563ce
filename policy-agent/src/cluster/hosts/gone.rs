//! Hosts gone for good leave the cluster: their endpoints are removed from
//! the shared state and their subnets freed, after a grace time.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::HostRecord;
use crate::{
    agent::{self, SharedAgent},
    cluster::ClusterConfig,
    etcd::{Etcd, EtcdError, ModRevisionIs, Range},
};

/// Since when each host holding a subnet has been seen without a record.
pub(super) type MissingSince = BTreeMap<String, Instant>;

/// A host whose record has expired (its agent gone longer than the lease)
/// for longer than `host_grace_seconds` leaves the cluster: its endpoints
/// are removed from the shared state (so every host's DNS stops naming
/// them) and its subnet is freed. Any agent may do it; doing it twice is
/// harmless (removing a missing endpoint is not an error, the subnet is
/// deleted only if unchanged).
pub(super) fn reap(
    agent: &SharedAgent,
    etcd: &Etcd,
    config: &ClusterConfig,
    hosts: &[HostRecord],
    subnets: &Range,
    missing_since: &mut MissingSince,
) -> Result<(), EtcdError> {
    let present: BTreeSet<&str> = hosts.iter().map(|h| h.host.as_str()).collect();
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
