//! A returning host takes back its endpoints: those the cluster removed
//! while it was gone are held (`agent::returning`) until it holds its /24
//! again.

use std::net::IpAddr;

use tracing::{info, warn};

use super::Membership;
use crate::{
    agent::{self, SharedAgent},
    cluster::ClusterConfig,
    etcd::{Etcd, EtcdError, ModRevisionIs, key_end, keys::Keys},
};

/// This host's endpoints that the cluster removed while it was gone (see
/// `agent::returning`) are registered again once the host holds its /24
/// again: kept if still its own, taken back if freed meanwhile. If another
/// host has leased it, they stay held (and denied where their addresses
/// went to other endpoints).
pub(super) fn register(
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
    let range = etcd.range(&key, &key_end(&key))?;
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
