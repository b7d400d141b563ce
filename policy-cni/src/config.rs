//! The network configuration on stdin and the `CNI_*` environment, and
//! which app a container belongs to.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{CniError, Result, code};
use policy_api::{Ipv6Prefix, wire};

/// Spec versions this plugin speaks (garden sends 0.3.1).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The app a container is registered under when nothing names one: it is
/// policed like any other app (denied by default), never left unmanaged.
pub const DEFAULT_APP: &str = "unassigned";

pub const DEFAULT_SOCKET: &str = "/run/policy-agent/agent.sock";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/policy-cni";

/// The network configuration (unknown keys are ignored, as CNI configs
/// carry keys for other plugins).
#[derive(Debug, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub name: String,
    /// The agent's API socket.
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
    /// Where leases are kept (a directory per network name).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Addresses to hand out, `A.B.C.D/N`; default: the agent's
    /// (`GET /v1/ipam`: the overlay on one host, the host's /24 in a cluster).
    #[serde(default)]
    pub subnet: Option<String>,
    /// Dual stack: an IPv6 /96 (`fd00:255::/96`); each container also gets
    /// this prefix with its IPv4 address in the last 32 bits, as a /128
    /// with a default route via `fe80::1`. Absent: IPv4 only.
    #[serde(default)]
    pub ipv6_prefix: Option<String>,
    /// The containers' MTU; absent or 0: the agent's (the VXLAN device's
    /// when the overlay crosses hosts), else the kernel's default.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Listed in the result's DNS (as silk).
    #[serde(default)]
    pub dns_servers: Vec<String>,
    /// The app of containers that name none (default `unassigned`).
    #[serde(default)]
    pub default_app: Option<String>,
    /// garden-external-networker's container metadata, at the top level
    /// of each plugin's config (its `cni_controller.go`):
    /// `policy_group_id` is the app id policies name.
    #[serde(default)]
    pub metadata: BTreeMap<String, Value>,
    #[serde(default, rename = "runtimeConfig")]
    pub runtime_config: RuntimeConfig,
    /// CNI 1.1 GC: the attachments that are still valid.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RuntimeConfig {
    /// NetIn (garden's `host_port`/`container_port`, or the CNI
    /// convention's `hostPort`/`containerPort`).
    #[serde(default, rename = "portMappings")]
    pub port_mappings: Vec<wire::PortMapping>,
    /// NetOut: Application Security Groups as egress allow rules.
    /// (absent: the app's egress out of the overlay is not checked;
    /// present, even empty: only what the rules allow).
    #[serde(default, rename = "netOutRules")]
    pub net_out_rules: Option<Vec<wire::NetOutRule>>,
    /// Where this plugin read garden's metadata before it knew garden puts
    /// it at the top level: still taken, after the top level.
    #[serde(default)]
    pub metadata: BTreeMap<String, Value>,
    /// podman's network aliases, per network name.
    #[serde(default)]
    pub aliases: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl NetConf {
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let conf: NetConf = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(code::DECODE_FAILURE, "the network configuration is not valid JSON")
                .details(e)
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "cniVersion {} is not supported (supported: {})",
                    conf.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        if conf.name.is_empty()
            || !conf.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("network name {:?} must be letters, digits, '-', '_' or '.'", conf.name),
            ));
        }
        if let Some(subnet) = &conf.subnet {
            parse_subnet(subnet)?;
        }
        Ok(conf)
    }

    pub fn socket(&self) -> PathBuf {
        self.agent_socket.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }

    pub fn lease_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)).join(&self.name)
    }

    /// A string of garden's metadata (`space_id`, `container_workload`):
    /// at the top level, else in `runtimeConfig.metadata`; empty is none.
    pub fn garden(&self, key: &str) -> Option<String> {
        [&self.metadata, &self.runtime_config.metadata].into_iter().find_map(|m| match m.get(key) {
            Some(Value::String(v)) if !v.is_empty() => Some(v.clone()),
            _ => None,
        })
    }

    /// The app the container belongs to, and where that came from, in
    /// order: garden's `metadata.policy_group_id` (top level; also taken
    /// from `runtimeConfig.metadata`); the
    /// `POLICY_APP_ID` key of `CNI_ARGS`; a podman network alias
    /// `app.ID`; else `default_app` (`unassigned`).
    pub fn app(&self, cni_args: &str) -> (String, &'static str) {
        for (metadata, place) in [
            (&self.metadata, "metadata.policy_group_id"),
            (&self.runtime_config.metadata, "runtimeConfig.metadata.policy_group_id"),
        ] {
            if let Some(Value::String(id)) = metadata.get("policy_group_id")
                && !id.is_empty()
            {
                return (id.clone(), place);
            }
        }
        if let Some(id) = cni_args
            .split(';')
            .find_map(|kv| kv.strip_prefix("POLICY_APP_ID="))
            .filter(|id| !id.is_empty())
        {
            return (id.to_owned(), "CNI_ARGS POLICY_APP_ID");
        }
        if let Some(id) = self
            .runtime_config
            .aliases
            .get(&self.name)
            .into_iter()
            .flatten()
            .find_map(|a| a.strip_prefix("app."))
            .filter(|id| !id.is_empty())
        {
            return (id.to_owned(), "network alias app.ID");
        }
        (self.default_app.clone().unwrap_or_else(|| DEFAULT_APP.to_owned()), "default_app")
    }
}

/// `A.B.C.D/N` → (network, prefix), the host bits cleared.
pub fn parse_subnet(text: &str) -> Result<(Ipv4Addr, u8)> {
    let bad = || {
        CniError::new(code::INVALID_CONFIG, format!("subnet {text:?} is not A.B.C.D/N (N 8-30)"))
    };
    let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if !(8..=30).contains(&prefix) {
        return Err(bad());
    }
    let mask = u32::MAX << (32 - prefix);
    Ok((Ipv4Addr::from(u32::from(addr) & mask), prefix))
}

/// `ipv6_prefix`: a /96 whose last 32 bits are zero, not link-local or
/// multicast.
pub fn parse_ipv6_prefix(text: &str) -> Result<Ipv6Prefix> {
    Ipv6Prefix::parse(text).map_err(|e| CniError::new(code::INVALID_CONFIG, e.to_string()))
}

/// The `CNI_*` environment.
/// Hex digits of the hash in a host-side veth's name: `pc` and 13 fill
/// IFNAMSIZ - 1.
const HOST_IFNAME_DIGITS: usize = 13;

#[derive(Debug)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: String,
}

impl Env {
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        let env = Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: std::env::var_os("CNI_NETNS").filter(|v| !v.is_empty()).map(PathBuf::from),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
        };
        if env.command.is_empty() {
            return Err(CniError::new(code::INVALID_ENVIRONMENT, "CNI_COMMAND is not set"));
        }
        Ok(env)
    }

    /// Checks what ADD, CHECK and DEL need.
    pub fn require_attachment(&self, netns: bool) -> Result<()> {
        if self.container_id.is_empty() {
            return Err(CniError::new(code::INVALID_ENVIRONMENT, "CNI_CONTAINERID is not set"));
        }
        if self.ifname.is_empty()
            || self.ifname.len() > 15
            || self.ifname.contains('/')
            || self.ifname.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("CNI_IFNAME {:?} is not a valid interface name", self.ifname),
            ));
        }
        if netns && self.netns.is_none() {
            return Err(CniError::new(code::INVALID_ENVIRONMENT, "CNI_NETNS is not set"));
        }
        Ok(())
    }

    /// The host-side veth's name: `pc` and the first 13 hex digits (52
    /// bits) of SHA-256 over `CONTAINER_ID/IFNAME`, IFNAMSIZ - 1 = 15
    /// characters. Stable, so DEL after a crash finds it. Unambiguous input
    /// (an interface name holds no `/`), and a cryptographic hash: making
    /// a container id whose name is a given container's takes about 2^52
    /// hashes (with the CRC32 names of [`Self::legacy_host_ifname`] a
    /// colliding id took milliseconds). ADD never takes over a veth another
    /// container holds anyway (see `main.rs`).
    pub fn host_ifname(&self) -> String {
        let input = format!("{}/{}", self.container_id, self.ifname);
        let digest = ring::digest::digest(&ring::digest::SHA256, input.as_bytes());
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("pc{}", &hex[..HOST_IFNAME_DIGITS])
    }

    /// The name earlier versions gave the host-side veth: `pc` and the
    /// CRC32 of `CONTAINER_ID/IFNAME` in 8 hex digits. DEL, CHECK and GC
    /// still find containers made by them (only where the name is shown to
    /// be this container's: see `main.rs`).
    pub fn legacy_host_ifname(&self) -> String {
        let mut h = crc32fast::Hasher::new();
        h.update(self.container_id.as_bytes());
        h.update(b"/");
        h.update(self.ifname.as_bytes());
        format!("pc{:08x}", h.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GARDEN: &str = include_str!("../../fixtures/cf-cni/garden-add-config.json");

    #[test]
    fn garden_config_parses_and_names_its_app() {
        let conf = NetConf::parse(GARDEN.as_bytes()).unwrap();
        assert_eq!(conf.cni_version, "0.3.1");
        assert_eq!(conf.dns_servers, ["169.254.0.1"]);
        assert_eq!(
            conf.app(""),
            ("5b8d7c1e-0c3f-4a52-9d1e-0f6a2b7c9e41".to_owned(), "metadata.policy_group_id")
        );
        assert_eq!(conf.runtime_config.port_mappings.len(), 2);
        assert_eq!(conf.runtime_config.net_out_rules.as_ref().map(Vec::len), Some(4));
        // The space picks the policy server's security groups.
        assert_eq!(
            conf.garden("space_id").as_deref(),
            Some("a1c2e3f4-1111-4222-8333-944455566677")
        );
        assert_eq!(conf.garden("container_workload"), None);
    }

    #[test]
    fn the_old_place_of_garden_metadata_is_a_fallback() {
        let old = NetConf::parse(
            br#"{"cniVersion":"0.3.1","name":"net","runtimeConfig":{"metadata":{"policy_group_id":"old"}}}"#,
        )
        .unwrap();
        assert_eq!(old.app(""), ("old".to_owned(), "runtimeConfig.metadata.policy_group_id"));
        let both = NetConf::parse(
            br#"{"cniVersion":"0.3.1","name":"net","metadata":{"policy_group_id":"top"},
                "runtimeConfig":{"metadata":{"policy_group_id":"old"}}}"#,
        )
        .unwrap();
        assert_eq!(both.app("").0, "top");
    }

    #[test]
    fn other_runtimes_name_the_app_by_cni_args_or_alias_or_get_the_default() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"net","type":"policy-cni",
                "runtimeConfig":{"aliases":{"net":["web","app.frontend","abc123"]}}}"#,
        )
        .unwrap();
        assert_eq!(conf.app("IgnoreUnknown=1;POLICY_APP_ID=backend").0, "backend");
        assert_eq!(conf.app("IgnoreUnknown=1;K8S_POD_NAME=c1").0, "frontend");
        let bare = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"net"}"#).unwrap();
        assert_eq!(bare.app(""), (DEFAULT_APP.to_owned(), "default_app"));
    }

    #[test]
    fn bad_configs_are_refused_with_their_code() {
        let e = NetConf::parse(b"{").unwrap_err();
        assert_eq!(e.code, code::DECODE_FAILURE);
        let e = NetConf::parse(br#"{"cniVersion":"9.9.9","name":"n"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","subnet":"10.0.0.0/33"}"#)
            .unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"../x"}"#).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert_eq!(parse_subnet("10.255.3.7/24").unwrap(), (Ipv4Addr::new(10, 255, 3, 0), 24));
    }

    #[test]
    fn the_shipped_examples_parse() {
        let garden = NetConf::parse(include_bytes!("../../deploy/cni/cf-garden.json")).unwrap();
        assert_eq!(garden.socket(), PathBuf::from(DEFAULT_SOCKET));
        let list: Value =
            serde_json::from_str(include_str!("../../deploy/cni/policy-net.conflist")).unwrap();
        let mut plugin = list["plugins"][0].clone();
        plugin["cniVersion"] = list["cniVersion"].clone();
        plugin["name"] = list["name"].clone();
        let podman = NetConf::parse(plugin.to_string().as_bytes()).unwrap();
        assert_eq!(podman.lease_dir(), PathBuf::from("/var/lib/policy-cni/policy-net"));
    }

    fn attachment(container_id: &str, ifname: &str) -> Env {
        Env {
            command: "ADD".into(),
            container_id: container_id.into(),
            netns: None,
            ifname: ifname.into(),
            args: String::new(),
        }
    }

    #[test]
    fn host_veth_names_are_stable_full_length_and_do_not_collide_as_crc32_did() {
        let env =
            attachment("1b19ec20c8117becaab70c8709ec96423f7b339e43d88625bb0d2c07d6521e3b", "eth0");
        let name = env.host_ifname();
        // SHA-256("1b19...3b/eth0"), its first 13 hex digits: fixed, so a
        // plugin upgrade never renames a running container's veth.
        assert_eq!(name, "pc0309cbe7143c3");
        assert_eq!(name.len(), 15, "IFNAMSIZ - 1");
        assert_eq!(name, env.host_ifname());
        assert_ne!(name, attachment(&env.container_id, "eth1").host_ifname());
        // Two ids whose CRC32 names collide (found by a birthday search; a
        // targeted one takes milliseconds, CRC32 being linear): their
        // names now differ.
        let (a, b) = (attachment("victim-68", "eth0"), attachment("victim-21326606", "eth0"));
        assert_eq!(a.legacy_host_ifname(), b.legacy_host_ifname(), "the old names collide");
        assert_eq!(a.legacy_host_ifname(), "pc0d1c4b06");
        assert_ne!(a.host_ifname(), b.host_ifname());
        // Among 100,000 names of 32 bits about one collision is expected; of
        // 52 bits, none.
        let names: std::collections::BTreeSet<String> =
            (0..100_000).map(|i| attachment(&format!("c-{i}"), "eth0").host_ifname()).collect();
        assert_eq!(names.len(), 100_000);
    }
}
