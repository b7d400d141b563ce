//! The daemon's configuration: TOML, every key optional.
//!
//! ```toml
//! state_dir = "/var/lib/policy-agent"        # durable desired state
//! socket = "/run/policy-agent/agent.sock"    # API on a Unix socket
//! pin_dir = "/sys/fs/bpf/policy-agent"       # pinned maps and links
//! listen = "127.0.0.1:9090"                  # optional TCP API address (mTLS)
//! listen_plaintext = false                   # plain HTTP there; loopback only
//! log_level = "info"                         # error, warn, info, debug, trace
//! overlay_network = "10.255.0.0/16"          # container network; "": no array slots
//! max_policies_per_source = 150              # absent or 0: no limit
//! max_body_bytes = 8388608                   # largest API request body
//!
//! flow_log = "/var/log/policy-agent/flows.log" # flow events, JSON lines
//! flow_log_max_bytes = 104857600             # rotate past this size
//! flow_log_keep = 3                          # rotated files kept
//! metrics_listen = "127.0.0.1:9100"          # Prometheus /metrics; absent: off
//! dns_listen = "169.254.0.1:53"              # apps.internal DNS; "": off
//! tls = true                                 # TLS on 61443 in each endpoint's netns
//! tls_upstream_port = 8080                   # where it forwards, in the same netns
//!
//! mtls_apps = ["my-app-guid"]                # apps whose 61443 requires client certificates
//! identity_validity = "24h"                  # instance identities and 61443 certificates
//! netin_interfaces = ["eth0"]                # NetIn port mappings listen on these addresses
//!
//! [tls_app_ports]                            # per app, where not tls_upstream_port
//! "my-app-guid" = 9090
//!
//! [flow_events]
//! allowed = true                             # first packet of allowed connections
//! denied_per_second = 100                    # per destination; 0: none
//! policy_counters = true                     # packets/bytes per policy
//!
//! [capacities]                               # map sizes at first load
//! endpoints = 65536
//! policies = 262144
//! conntrack = 262144
//!
//! [limits]                                   # what a client may hold (see `limits`)
//! api_connections = 256
//!
//! [cluster]                                  # cluster mode (see `cluster`); absent: one host
//! etcd_endpoints = ["https://10.0.0.10:2379"]
//! etcd_ca_file = "/etc/policy-agent/etcd/ca.pem"
//! etcd_cert_file = "/etc/policy-agent/etcd/client.pem"
//! etcd_key_file = "/etc/policy-agent/etcd/client-key.pem"
//! host = "cell-1"
//! underlay_address = "10.0.0.1"
//! ```

use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Deserializer, de::Error as _};

use crate::{
    Capacities,
    cluster::ClusterConfig,
    dataplane::{DenyAction, DenySettings, EventSettings, OverlayNetwork},
    limits::Limits,
};

/// Every value is parsed into its type when the TOML is read, so
/// [`Config::parse`] is the one place configuration can fail, with an error
/// naming the key.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub listen: Option<SocketAddr>,
    /// Plain HTTP on `listen` (no client certificates): only on loopback.
    pub listen_plaintext: bool,
    pub log_level: String,
    pub max_policies_per_source: Option<usize>,
    pub max_body_bytes: usize,
    pub capacities: Capacities,
    /// Which flow events the programs report.
    pub flow_events: EventSettings,
    /// What a packet the policy denies gets: `"reject"` (a TCP RST or an
    /// ICMP port unreachable back to the sender, as Cloud Foundry) or
    /// `"drop"` (silence).
    pub deny_action: DenyAction,
    /// Rejects sent to one sender address per second at most.
    pub rejects_per_second: u32,
    /// Flow events as JSON lines, rotated by size.
    pub flow_log: PathBuf,
    pub flow_log_max_bytes: u64,
    /// Rotated files kept (flows.log.1 ... .N).
    pub flow_log_keep: u32,
    /// Prometheus `/metrics` address; none: off.
    pub metrics_listen: Option<SocketAddr>,
    /// `apps.internal` DNS address (UDP and TCP); "" (None) turns DNS off.
    /// The default is the gateway address containers use in the silk
    /// layout, bound even before a veth carries it.
    #[serde(deserialize_with = "off_or_address")]
    pub dns_listen: Option<SocketAddr>,
    /// Serve platform TLS on 61443 in every endpoint's namespace (endpoints
    /// registered with `--netns`).
    pub tls: bool,
    /// The app port the TLS listeners forward to.
    pub tls_upstream_port: u16,
    /// Per-app app ports, where not `tls_upstream_port` (`[tls_app_ports]`,
    /// app id = port).
    pub tls_app_ports: std::collections::BTreeMap<String, u16>,
    /// Apps whose TLS listeners require a client certificate (an instance
    /// identity of an app a policy allows) and pass the verified source app
    /// on in a header.
    pub mtls_apps: std::collections::BTreeSet<String>,
    /// How long instance identities and 61443 certificates are valid; each
    /// is re-issued when a third of it is left (`"24h"`, `"90m"`).
    #[serde(deserialize_with = "validity")]
    pub identity_validity: std::time::Duration,
    /// The container network (silk's overlay): its endpoints are found by an
    /// array index in the kernel instead of a hash lookup. "" (None) turns
    /// that off (every endpoint hashed); addresses outside it are always
    /// hashed.
    #[serde(deserialize_with = "off_or_network")]
    pub overlay_network: Option<OverlayNetwork>,
    /// Cluster mode: the desired state in etcd, shared by every host's
    /// agent. None: a single host on its local store.
    pub cluster: Option<ClusterConfig>,
    /// Cloud Foundry's policy server as the source of policies and tags
    /// (`[cf]`, see `cf::config`). None: policies are written to the agent.
    pub cf: Option<crate::cf::CfConfig>,
    /// Connections, timeouts and memory a client may hold (`[limits]`).
    pub limits: Limits,
    /// NetIn: the host's uplinks whose addresses port mappings listen on
    /// (cluster mode adds the underlay interface).
    pub netin_interfaces: Vec<String>,
}

pub const DEFAULT_SOCKET: &str = "/run/policy-agent/agent.sock";

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/policy-agent"),
            socket: PathBuf::from(DEFAULT_SOCKET),
            pin_dir: PathBuf::from("/sys/fs/bpf/policy-agent"),
            listen: None,
            listen_plaintext: false,
            log_level: "info".to_owned(),
            max_policies_per_source: None,
            max_body_bytes: 8 << 20,
            capacities: Capacities::default(),
            flow_events: EventSettings::default(),
            deny_action: DenySettings::default().action,
            rejects_per_second: DenySettings::default().rejects_per_second,
            flow_log: PathBuf::from("/var/log/policy-agent/flows.log"),
            flow_log_max_bytes: 100 << 20,
            flow_log_keep: 3,
            metrics_listen: None,
            dns_listen: Some(SocketAddr::from(([169, 254, 0, 1], 53))),
            tls: true,
            tls_upstream_port: 8080,
            tls_app_ports: Default::default(),
            mtls_apps: Default::default(),
            identity_validity: std::time::Duration::from_secs(24 * 3600),
            overlay_network: Some(OverlayNetwork::default()),
            cluster: None,
            cf: None,
            limits: Limits::default(),
            netin_interfaces: Vec::new(),
        }
    }
}

impl Config {
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The per-source limit, with 0 meaning none.
    pub fn policy_limit(&self) -> Option<usize> {
        self.max_policies_per_source.filter(|&n| n > 0)
    }
}

/// A duration such as `"24h"`, at least 5 s and at most 10 years.
fn validity<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
    let text = String::deserialize(d)?;
    let d = humantime::parse_duration(&text)
        .map_err(|e| D::Error::custom(format!("{text:?} is not a duration like \"24h\": {e}")))?;
    if d < std::time::Duration::from_secs(5) || d > std::time::Duration::from_secs(10 * 365 * 86400)
    {
        return Err(D::Error::custom(format!("{text:?} is not between 5s and 10 years")));
    }
    Ok(d)
}

/// `""` → None, else `ADDRESS:PORT`.
fn off_or_address<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    if text.is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| D::Error::custom(format!("{text:?} is not ADDRESS:PORT (\"\" turns it off)")))
}

/// `""` → None, else `A.B.C.D/N`.
fn off_or_network<'de, D: Deserializer<'de>>(d: D) -> Result<Option<OverlayNetwork>, D::Error> {
    let text = String::deserialize(d)?;
    if text.is_empty() {
        return Ok(None);
    }
    OverlayNetwork::parse(&text).map(Some).map_err(D::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn the_overlay_network_is_checked() {
        let overlay = |text: &str| {
            Config::parse(&format!("overlay_network = {text:?}"))
                .map(|c| c.overlay_network)
                .map_err(|e| e.to_string())
        };
        assert_eq!(overlay("10.255.0.0/16").unwrap(), Some(OverlayNetwork::default()));
        assert_eq!(overlay("10.255.0.0/16").unwrap().unwrap().slots(), 65536);
        assert_eq!(overlay("10.0.0.0/12").unwrap().unwrap().slots(), 1 << 20);
        assert_eq!(overlay("10.255.0.7/32").unwrap().unwrap().slots(), 1);
        assert_eq!(overlay("").unwrap(), None);
        assert!(overlay("10.255.0.1/16").unwrap_err().contains("host bits"));
        assert!(overlay("10.0.0.0/8").unwrap_err().contains("out of range"));
        assert!(overlay("10.255.0.0").unwrap_err().contains("ADDRESS/PREFIX"));
        assert!(overlay("10.255.0/16").unwrap_err().contains("not an IPv4 address"));
    }

    #[test]
    fn each_default() {
        let c = Config::default();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/policy-agent"));
        assert_eq!(c.socket, PathBuf::from("/run/policy-agent/agent.sock"));
        assert_eq!(c.pin_dir, PathBuf::from("/sys/fs/bpf/policy-agent"));
        assert_eq!(c.listen, None);
        assert_eq!(c.log_level, "info");
        assert_eq!(c.policy_limit(), None);
        assert_eq!(c.max_body_bytes, 8 << 20);
        assert_eq!(c.capacities.endpoints, 65_536);
        assert_eq!(c.capacities.policies, 1 << 18);
        assert_eq!(c.capacities.port_sets, 1 << 16);
        assert_eq!(c.capacities.port_sets_wide, 1 << 12);
        assert_eq!(c.capacities.policy_stats, 1 << 18);
        assert_eq!(c.dns_listen, Some("169.254.0.1:53".parse().unwrap()));
        assert_eq!(c.overlay_network, Some(OverlayNetwork::default()));
        assert!(c.tls);
        assert_eq!(c.tls_upstream_port, 8080);
        assert_eq!(c.deny_action, DenyAction::Reject);
        assert_eq!(c.rejects_per_second, 1000);
    }

    #[test]
    fn deny_action_is_reject_or_drop() {
        let action =
            |text: &str| Config::parse(&format!("deny_action = {text:?}")).map(|c| c.deny_action);
        assert_eq!(action("drop").unwrap(), DenyAction::Drop);
        assert_eq!(action("reject").unwrap(), DenyAction::Reject);
        assert!(action("refuse").unwrap_err().to_string().contains("reject"));
    }

    #[test]
    fn bad_values_fail_at_parse_naming_the_key() {
        for (text, key) in [
            ("dns_listen = \"169.254.0.1\"", "dns_listen"),
            ("overlay_network = \"10.0.0.0/8\"", "overlay_network"),
            ("listen = \"nowhere\"", "listen"),
        ] {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        assert_eq!(Config::parse("dns_listen = \"\"").unwrap().dns_listen, None);
    }

    #[test]
    fn every_key_can_be_set() {
        let c = Config::parse(
            r#"
            state_dir = "/tmp/s"
            socket = "/tmp/a.sock"
            pin_dir = "/sys/fs/bpf/x"
            listen = "127.0.0.1:9090"
            log_level = "debug"
            max_policies_per_source = 150
            max_body_bytes = 1024
            [capacities]
            endpoints = 10
            policies = 20
            "#,
        )
        .unwrap();
        assert_eq!(c.listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(c.policy_limit(), Some(150));
        assert_eq!(
            (c.capacities.endpoints, c.capacities.policies, c.capacities.conntrack),
            (10, 20, 262_144)
        );
        assert_eq!(Config::parse("max_policies_per_source = 0").unwrap().policy_limit(), None);
    }

    #[test]
    fn the_cluster_section_is_checked() {
        let c = Config::parse(
            "[cluster]\netcd_endpoints = [\"http://10.0.0.10:2379\"]\netcd_allow_plaintext = true\nhost = \"cell-1\"\nunderlay_address = \"10.0.0.1\"\n",
        )
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!(
            (c.prefix.as_str(), c.lease_seconds, c.host_grace_seconds),
            ("/policy-agent", 10, 60)
        );
        for (text, key) in [
            (
                "etcd_endpoints = [\"etcd:2379\"]\nhost = \"a\"\nunderlay_address = \"10.0.0.1\"",
                "etcd_endpoints",
            ),
            (
                "etcd_endpoints = [\"http://10.0.0.10:2379\"]\netcd_allow_plaintext = true\nhost = \"a b\"\nunderlay_address = \"10.0.0.1\"",
                "host",
            ),
            (
                "etcd_endpoints = [\"http://10.0.0.10:2379\"]\netcd_allow_plaintext = true\nhost = \"a\"\nunderlay_address = \"x\"",
                "underlay_address",
            ),
            (
                "etcd_endpoints = [\"http://10.0.0.10:2379\"]\netcd_allow_plaintext = true\nhost = \"a\"",
                "underlay_address",
            ),
            // Plain text only when the operator says so; https with its CA.
            (
                "etcd_endpoints = [\"http://10.0.0.10:2379\"]\nhost = \"a\"\nunderlay_address = \"10.0.0.1\"",
                "etcd_allow_plaintext = true",
            ),
            (
                "etcd_endpoints = [\"https://10.0.0.10:2379\"]\nhost = \"a\"\nunderlay_address = \"10.0.0.1\"",
                "etcd_ca_file",
            ),
            (
                "etcd_endpoints = [\"https://10.0.0.10:2379\"]\netcd_ca_file = \"/nonexistent/ca.pem\"\nhost = \"a\"\nunderlay_address = \"10.0.0.1\"",
                "etcd_ca_file: cannot read /nonexistent/ca.pem",
            ),
            (
                "etcd_endpoints = [\"https://10.0.0.10:2379\", \"http://10.0.0.11:2379\"]\nhost = \"a\"\nunderlay_address = \"10.0.0.1\"",
                "not both",
            ),
            (
                "etcd_endpoints = [\"http://10.0.0.10:2379\"]\netcd_allow_plaintext = true\netcd_username = \"u\"\nhost = \"a\"\nunderlay_address = \"10.0.0.1\"",
                "etcd_username and etcd_password_file go together",
            ),
        ] {
            let err = Config::parse(&format!("[cluster]\n{text}")).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        assert_eq!(Config::default().cluster, None);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = Config::parse("stat_dir = \"/x\"").unwrap_err();
        assert!(err.to_string().contains("stat_dir"), "{err}");
    }
}

#[cfg(test)]
mod shipped {
    /// The example config in deploy/ parses and states the defaults.
    #[test]
    fn deploy_example_is_the_defaults() {
        let text = include_str!("../../deploy/policy-agent.toml");
        assert_eq!(super::Config::parse(text).unwrap(), super::Config::default());
    }
}
