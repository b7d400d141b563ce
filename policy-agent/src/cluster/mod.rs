//! Cluster mode: the desired state of every host in etcd, shared by the
//! agents of all hosts (see `store` for the data layout and how writes stay
//! all-or-nothing and ordered), each agent following it (`follow`) and
//! registering its host with a lease (`hosts`).
//!
//! Without a `[cluster]` section the agent is a single host on its local
//! journal; nothing here runs.

pub mod ca;
pub mod etcd;
pub mod follow;
pub mod hosts;
pub mod overlay;
pub mod store;

use std::{net::Ipv4Addr, time::Duration};

use serde::{Deserialize, Deserializer, de::Error as _};

use crate::state::check_app_id;

/// The `[cluster]` section of the configuration.
///
/// ```toml
/// [cluster]
/// etcd_endpoints = ["http://10.0.0.10:2379"]  # etcd client URLs, by IP
/// host = "cell-1"                              # this host's unique name
/// underlay_address = "10.0.0.1"                # where other hosts reach it
/// prefix = "/policy-agent"                     # keys in etcd
/// lease_seconds = 10                           # a host's record outlives its agent this long
/// host_grace_seconds = 60                      # then, after this, its endpoints and subnet go
/// ipv6_prefix = "fd00:255::/96"                # optional: route IPv6 between hosts too
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    #[serde(deserialize_with = "etcd_endpoints")]
    pub etcd_endpoints: Vec<String>,
    #[serde(deserialize_with = "host_name")]
    pub host: String,
    pub underlay_address: Ipv4Addr,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    #[serde(default = "default_lease_seconds")]
    pub lease_seconds: u32,
    /// How long a host may be gone (its record expired) before its
    /// endpoints are removed from the cluster's state and its subnet freed.
    #[serde(default = "default_host_grace_seconds")]
    pub host_grace_seconds: u32,
    /// The CNI plugin's `ipv6_prefix` (a /96 the containers' IPv4 addresses
    /// complete): with it, IPv6 is routed between hosts as well.
    #[serde(default)]
    pub ipv6_prefix: Option<overlay::Ipv6Prefix>,
}

fn default_host_grace_seconds() -> u32 {
    60
}

fn default_prefix() -> String {
    "/policy-agent".to_owned()
}

fn default_lease_seconds() -> u32 {
    10
}

/// How long one request to etcd may take before etcd counts as unreachable.
pub const ETCD_TIMEOUT: Duration = Duration::from_secs(2);

fn etcd_endpoints<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let endpoints = Vec::<String>::deserialize(d)?;
    etcd::Etcd::new(&endpoints, ETCD_TIMEOUT).map_err(D::Error::custom)?;
    Ok(endpoints)
}

fn host_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let host = String::deserialize(d)?;
    check_app_id("host", &host).map_err(|e| D::Error::custom(e.reason))?;
    if host.contains('/') {
        return Err(D::Error::custom("must not contain '/'"));
    }
    Ok(host)
}

impl ClusterConfig {
    pub fn etcd(&self) -> etcd::Etcd {
        etcd::Etcd::new(&self.etcd_endpoints, ETCD_TIMEOUT)
            .expect("checked when the config was read")
    }
}
