//! The `[cf]` section: Cloud Foundry's policy server as the source of
//! policies and tags (the keys vxlan-policy-agent's job takes, under the
//! same meanings; see the README, "On a Cloud Foundry cell").
//!
//! ```toml
//! [cf]
//! policy_server_url = "https://policy-server.service.cf.internal:4003"
//! ca_cert_file = "/var/vcap/jobs/vxlan-policy-agent/config/certs/ca.crt"
//! client_cert_file = "/var/vcap/jobs/vxlan-policy-agent/config/certs/client.crt"
//! client_key_file = "/var/vcap/jobs/vxlan-policy-agent/config/certs/client.key"
//! poll_interval = "1s"            # vxlan-policy-agent: 5 s
//! client_timeout = "5s"
//! cni_datastore_path = "/var/vcap/data/container-metadata/store.json"  # optional
//! enable_asg_syncing = false
//! asg_poll_interval = "5s"        # vxlan-policy-agent: 60 s
//! force_policy_poll_cycle_listen = "127.0.0.1:8722"  # optional: vxlan-policy-agent's force endpoints
//! iptables_lock_file = "/var/vcap/data/garden-cni/iptables.lock"  # optional: cni-wrapper-plugin's lock
//! underlay_ips = ["10.0.16.5"]    # optional: join silk's overlay (silk-vtep) on this cell
//! vtep_name = "silk-vtep"
//! ```
//!
//! `policy-agent run --vxlan-policy-agent-config FILE` takes the same from
//! vxlan-policy-agent's own JSON config (see `vpa_config`).

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Deserializer, de::Error as _};

/// The `[cf]` section, checked: every file named exists and the URL is
/// `https://HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Fields")]
pub struct CfConfig {
    /// `https://HOST:PORT` of the policy server's internal API.
    pub policy_server_url: String,
    pub ca_cert_file: PathBuf,
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    /// How often `policies_last_updated` is asked.
    pub poll_interval: Duration,
    /// How long one request to the policy server may take.
    pub client_timeout: Duration,
    /// CF's container metadata store, when the cell's containers come
    /// from garden-external-networker / cni-wrapper-plugin.
    pub cni_datastore_path: Option<PathBuf>,
    pub enable_asg_syncing: bool,
    pub asg_poll_interval: Duration,
    /// Where vxlan-policy-agent's force endpoints are served (plain HTTP,
    /// as cni-wrapper-plugin calls them: `/force-policy-poll-cycle`, ...).
    pub force_policy_poll_cycle_listen: Option<std::net::SocketAddr>,
    /// The lock cni-wrapper-plugin takes around iptables changes (with a
    /// metadata store: see `cf::iptables`).
    pub iptables_lock_file: Option<PathBuf>,
    /// The cell's underlay addresses (vxlan-policy-agent's
    /// `underlay_ips`): with them the agent joins silk's overlay (see
    /// `cf::silk`).
    pub underlay_ips: Vec<std::net::Ipv4Addr>,
    /// silk-daemon's VXLAN device.
    pub vtep_name: String,
}

/// The section as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Fields {
    pub(super) policy_server_url: String,
    pub(super) ca_cert_file: PathBuf,
    pub(super) client_cert_file: PathBuf,
    pub(super) client_key_file: PathBuf,
    #[serde(default = "default_poll_interval", deserialize_with = "interval")]
    pub(super) poll_interval: Duration,
    #[serde(default = "default_client_timeout", deserialize_with = "interval")]
    pub(super) client_timeout: Duration,
    #[serde(default)]
    pub(super) cni_datastore_path: Option<PathBuf>,
    #[serde(default)]
    pub(super) enable_asg_syncing: bool,
    #[serde(default = "default_asg_poll_interval", deserialize_with = "interval")]
    pub(super) asg_poll_interval: Duration,
    #[serde(default)]
    pub(super) force_policy_poll_cycle_listen: Option<std::net::SocketAddr>,
    #[serde(default)]
    pub(super) iptables_lock_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) underlay_ips: Vec<std::net::Ipv4Addr>,
    #[serde(default = "default_vtep_name")]
    pub(super) vtep_name: String,
}

pub(super) fn default_vtep_name() -> String {
    "silk-vtep".to_owned()
}

fn default_poll_interval() -> Duration {
    Duration::from_secs(1)
}

fn default_client_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_asg_poll_interval() -> Duration {
    Duration::from_secs(5)
}

/// A duration such as `"1s"` or `"500ms"`, from 100 ms to one hour.
fn interval<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    let d = humantime::parse_duration(&text)
        .map_err(|e| D::Error::custom(format!("{text:?} is not a duration like \"1s\": {e}")))?;
    check_interval(d).map_err(|why| D::Error::custom(format!("{text:?} {why}")))
}

pub(super) fn check_interval(d: Duration) -> Result<Duration, &'static str> {
    if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
        return Err("is not between 100ms and 1h");
    }
    Ok(d)
}

impl TryFrom<Fields> for CfConfig {
    type Error = String;

    fn try_from(f: Fields) -> Result<Self, String> {
        Self::checked(f)
    }
}

impl CfConfig {
    pub(super) fn checked(f: Fields) -> Result<Self, String> {
        check_url(&f.policy_server_url)?;
        for (key, path) in [
            ("ca_cert_file", &f.ca_cert_file),
            ("client_cert_file", &f.client_cert_file),
            ("client_key_file", &f.client_key_file),
        ] {
            if !path.is_file() {
                return Err(format!("{key}: {} is not a readable file", path.display()));
            }
        }
        if let Some(store) = &f.cni_datastore_path {
            match store.parent() {
                Some(dir) if dir.is_dir() => {}
                _ => {
                    return Err(format!(
                        "cni_datastore_path: the directory of {} does not exist (garden's networker writes the store there)",
                        store.display()
                    ));
                }
            }
        }
        Ok(Self {
            policy_server_url: f.policy_server_url.trim_end_matches('/').to_owned(),
            ca_cert_file: f.ca_cert_file,
            client_cert_file: f.client_cert_file,
            client_key_file: f.client_key_file,
            poll_interval: f.poll_interval,
            client_timeout: f.client_timeout,
            cni_datastore_path: f.cni_datastore_path,
            enable_asg_syncing: f.enable_asg_syncing,
            asg_poll_interval: f.asg_poll_interval,
            force_policy_poll_cycle_listen: f.force_policy_poll_cycle_listen,
            iptables_lock_file: f.iptables_lock_file,
            underlay_ips: f.underlay_ips,
            vtep_name: f.vtep_name,
        })
    }
}

/// `https://HOST:PORT[/]`: the internal API is mutual TLS only.
fn check_url(url: &str) -> Result<(), String> {
    let bad = |why: &str| format!("policy_server_url {url:?} {why}");
    let rest = url.strip_prefix("https://").ok_or_else(|| {
        bad("is not https://HOST:PORT (the policy server's internal API is mutual TLS)")
    })?;
    let authority = rest.trim_end_matches('/');
    if authority.contains('/') || authority.contains('@') {
        return Err(bad("is not https://HOST:PORT (no path, no user)"));
    }
    let (host, port) = authority.rsplit_once(':').ok_or_else(|| bad("has no port"))?;
    if host.is_empty() {
        return Err(bad("is not https://HOST:PORT (no path, no user)"));
    }
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad("has no valid port (1-65535)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<CfConfig, String> {
        let dir = std::env::temp_dir().join(format!("cf-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["ca.crt", "client.crt", "client.key"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let text = format!(
            "policy_server_url = \"https://policy-server.service.cf.internal:4003\"\nca_cert_file = \"{d}/ca.crt\"\nclient_cert_file = \"{d}/client.crt\"\nclient_key_file = \"{d}/client.key\"\n{extra}",
            d = dir.display()
        );
        toml::from_str::<CfConfig>(&text).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.policy_server_url, "https://policy-server.service.cf.internal:4003");
        assert_eq!(c.poll_interval, Duration::from_secs(1));
        assert_eq!(c.client_timeout, Duration::from_secs(5));
        assert_eq!(c.asg_poll_interval, Duration::from_secs(5));
        assert_eq!(c.cni_datastore_path, None);
        assert!(!c.enable_asg_syncing);
        assert!(c.underlay_ips.is_empty());
        assert_eq!(c.vtep_name, "silk-vtep");
    }

    #[test]
    fn every_key_and_its_checks() {
        let c = parse(
            "poll_interval = \"250ms\"\nclient_timeout = \"2s\"\nenable_asg_syncing = true\nasg_poll_interval = \"60s\"\ncni_datastore_path = \"/tmp/store.json\"\n",
        )
        .unwrap();
        assert_eq!(c.poll_interval, Duration::from_millis(250));
        assert_eq!(c.client_timeout, Duration::from_secs(2));
        assert_eq!(c.asg_poll_interval, Duration::from_secs(60));
        assert_eq!(c.cni_datastore_path, Some(PathBuf::from("/tmp/store.json")));
        for (extra, says) in [
            ("poll_interval = \"0s\"", "between 100ms"),
            ("poll_interval = \"often\"", "not a duration"),
            ("cni_datastore_path = \"/nonexistent/dir/store.json\"", "does not exist"),
            ("policy_interval = \"1s\"", "policy_interval"),
        ] {
            let err = parse(extra).unwrap_err();
            assert!(err.contains(says), "{extra}: {err}");
        }
        let url = |u: &str| {
            toml::from_str::<CfConfig>(&format!(
                "policy_server_url = {u:?}\nca_cert_file = \"/\"\nclient_cert_file = \"/\"\nclient_key_file = \"/\""
            ))
            .unwrap_err()
            .to_string()
        };
        assert!(url("http://ps:4003").contains("mutual TLS"));
        assert!(url("https://ps").contains("no port"));
        assert!(url("https://ps:4003/x").contains("no path"));
        // Files are checked after the URL.
        assert!(url("https://ps:4003").contains("ca_cert_file"));
    }
}
