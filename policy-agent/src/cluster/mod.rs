//! Cluster mode: the desired state of every host in etcd, shared by the
//! agents of all hosts (see `store::etcd` for how writes stay
//! all-or-nothing and ordered, `etcd::keys` for the layout), each agent
//! following it (`follow`) unless it diverged from what the agent applied
//! (`store::lineage`, recovered with `republish`), registering its host
//! with a lease (`hosts`), and trusting every host's platform CA, whose
//! certificates (never keys) it finds there (`cas`).
//!
//! The layering, lowest first: `etcd` (the client and the key names) ←
//! `store` (the change log in etcd behind the `Store` trait, as the local
//! journal is) ← `agent` ← `cluster` (this: the configuration, and what
//! runs beside the agent — following, hosts, overlay, CAs). Nothing below
//! imports from here.
//!
//! Without a `[cluster]` section the agent is a single host on its local
//! journal; nothing here runs.

pub mod cas;
pub mod follow;
pub mod hosts;
pub mod overlay;
pub mod republish;

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use serde::{Deserialize, Deserializer, de::Error as _};

use crate::{
    etcd::{self, keys},
    state::check_app_id,
};

/// The `[cluster]` section of the configuration.
///
/// ```toml
/// [cluster]
/// etcd_endpoints = ["https://10.0.0.10:2379", "https://10.0.0.11:2379"]  # etcd's members
/// etcd_ca_file = "/etc/policy-agent/etcd/ca.pem"      # the CA etcd's certificates chain to
/// etcd_cert_file = "/etc/policy-agent/etcd/client.pem" # this agent's client certificate
/// etcd_key_file = "/etc/policy-agent/etcd/client-key.pem"
/// etcd_username = "policy-agent"                       # optional: etcd user and password
/// etcd_password_file = "/etc/policy-agent/etcd/password"
/// etcd_allow_plaintext = false                         # true: http:// endpoints accepted
/// host = "cell-1"                              # this host's unique name
/// underlay_address = "10.0.0.1"                # where other hosts reach it
/// prefix = "/policy-agent"                     # keys in etcd
/// lease_seconds = 10                           # a host's record outlives its agent this long
/// host_grace_seconds = 60                      # then, after this, its endpoints and subnet go
/// ipv6_prefix = "fd00:255::/96"                # optional: route IPv6 between hosts too
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Fields")]
pub struct ClusterConfig {
    pub etcd_endpoints: Vec<String>,
    /// How to reach etcd: the endpoints, TLS files and user, checked.
    pub etcd: etcd::Settings,
    pub host: String,
    pub underlay_address: Ipv4Addr,
    pub prefix: String,
    pub lease_seconds: u32,
    /// How long a host may be gone (its record expired) before its
    /// endpoints are removed from the cluster's state and its subnet freed.
    pub host_grace_seconds: u32,
    /// The CNI plugin's `ipv6_prefix` (a /96 the containers' IPv4 addresses
    /// complete): with it, IPv6 is routed between hosts as well.
    pub ipv6_prefix: Option<policy_api::Ipv6Prefix>,
    /// The one client of this configuration's etcd, made on first use.
    client: SharedClient,
}

/// The `[cluster]` section as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields {
    etcd_endpoints: Vec<String>,
    #[serde(default)]
    etcd_ca_file: Option<PathBuf>,
    #[serde(default)]
    etcd_cert_file: Option<PathBuf>,
    #[serde(default)]
    etcd_key_file: Option<PathBuf>,
    #[serde(default)]
    etcd_username: Option<String>,
    #[serde(default)]
    etcd_password_file: Option<PathBuf>,
    #[serde(default)]
    etcd_allow_plaintext: bool,
    #[serde(deserialize_with = "host_name")]
    host: String,
    underlay_address: Ipv4Addr,
    #[serde(default = "default_prefix")]
    prefix: String,
    #[serde(default = "default_lease_seconds")]
    lease_seconds: u32,
    #[serde(default = "default_host_grace_seconds")]
    host_grace_seconds: u32,
    #[serde(default)]
    ipv6_prefix: Option<policy_api::Ipv6Prefix>,
}

impl TryFrom<Fields> for ClusterConfig {
    type Error = String;

    fn try_from(f: Fields) -> Result<Self, String> {
        let etcd = etcd_settings(&f)?;
        Ok(Self {
            etcd_endpoints: f.etcd_endpoints,
            etcd,
            host: f.host,
            underlay_address: f.underlay_address,
            prefix: f.prefix,
            lease_seconds: f.lease_seconds,
            host_grace_seconds: f.host_grace_seconds,
            ipv6_prefix: f.ipv6_prefix,
            client: SharedClient::default(),
        })
    }
}

/// The etcd settings the fields describe, every rule between them checked
/// and every file they name read once (the key and password stay unread
/// here but for their presence).
fn etcd_settings(f: &Fields) -> Result<etcd::Settings, String> {
    if f.etcd_endpoints.is_empty() {
        return Err("etcd_endpoints: name at least one etcd member (https://HOST:PORT)".into());
    }
    let mut https = Vec::new();
    for url in &f.etcd_endpoints {
        https.push(etcd::check_endpoint(url).map_err(|e| format!("etcd_endpoints: {e}"))?);
    }
    let readable = |key: &str, path: &Option<PathBuf>| -> Result<(), String> {
        match path {
            Some(path) => std::fs::metadata(path)
                .map(|_| ())
                .map_err(|e| format!("{key}: cannot read {}: {e}", path.display())),
            None => Ok(()),
        }
    };
    readable("etcd_ca_file", &f.etcd_ca_file)?;
    readable("etcd_cert_file", &f.etcd_cert_file)?;
    readable("etcd_key_file", &f.etcd_key_file)?;
    readable("etcd_password_file", &f.etcd_password_file)?;
    let tls = if https.iter().all(|&h| h) {
        let ca = f.etcd_ca_file.clone().ok_or(
            "etcd_ca_file: https endpoints need the CA etcd's serving certificates chain to",
        )?;
        let identity = match (&f.etcd_cert_file, &f.etcd_key_file) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            _ => return Err("etcd_cert_file and etcd_key_file go together".into()),
        };
        Some(etcd::TlsFiles { ca, identity })
    } else if https.iter().any(|&h| h) {
        return Err("etcd_endpoints: all https:// or all http://, not both".into());
    } else if !f.etcd_allow_plaintext {
        return Err(format!(
            "etcd_endpoints: {} is plain http: anyone on the network could read and rewrite \
             the cluster's state. Use https:// endpoints with etcd_ca_file, etcd_cert_file and \
             etcd_key_file, or set etcd_allow_plaintext = true to accept that",
            f.etcd_endpoints[0]
        ));
    } else {
        if f.etcd_ca_file.is_some() || f.etcd_cert_file.is_some() || f.etcd_key_file.is_some() {
            return Err("etcd_ca_file, etcd_cert_file, etcd_key_file: the endpoints are http://, \
                        so they would not be used; use https:// endpoints"
                .into());
        }
        None
    };
    let user = match (&f.etcd_username, &f.etcd_password_file) {
        (Some(name), Some(path)) => {
            let password = std::fs::read_to_string(path)
                .map_err(|e| format!("etcd_password_file: cannot read {}: {e}", path.display()))?;
            Some((name.clone(), password.trim_end_matches(['\r', '\n']).to_owned()))
        }
        (None, None) => None,
        _ => return Err("etcd_username and etcd_password_file go together".into()),
    };
    Ok(etcd::Settings { endpoints: f.etcd_endpoints.clone(), tls, user, timeout: ETCD_TIMEOUT })
}

/// The etcd client a configuration shares among its clones: one set of
/// connections per agent.
#[derive(Clone, Default)]
struct SharedClient(Arc<OnceLock<etcd::Etcd>>);

impl PartialEq for SharedClient {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for SharedClient {}

impl std::fmt::Debug for SharedClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedClient")
    }
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

fn host_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let host = String::deserialize(d)?;
    check_app_id("host", &host).map_err(|e| D::Error::custom(e.reason))?;
    if host.contains('/') {
        return Err(D::Error::custom("must not contain '/'"));
    }
    Ok(host)
}

impl ClusterConfig {
    /// This configuration's etcd client (one per agent: clones share it).
    pub fn etcd(&self) -> etcd::Etcd {
        self.client
            .0
            .get_or_init(|| {
                etcd::Etcd::with_settings(self.etcd.clone())
                    .expect("the settings were checked when the config was read")
            })
            .clone()
    }

    /// The cluster's keys in etcd.
    pub fn keys(&self) -> keys::Keys {
        keys::Keys::new(&self.prefix)
    }

    /// Whether etcd is reached in plain text (logged as a warning at start).
    pub fn plaintext(&self) -> bool {
        self.etcd.tls.is_none()
    }
}
