//! vxlan-policy-agent's own JSON config file (`policy-agent run
//! --vxlan-policy-agent-config FILE`), so an operator can swap the binary
//! in its job with the rendered config unchanged. The keys that apply are
//! taken under their meanings; every other key is named in a warning (an
//! iptables setting has no meaning here), never silently ignored.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde_json::Value;

use super::{
    CfConfig,
    config::{Fields, check_interval},
};

/// The keys this agent takes from vxlan-policy-agent's config.
pub const APPLIED: [&str; 13] = [
    "policy_server_url",
    "ca_cert_file",
    "client_cert_file",
    "client_key_file",
    "client_timeout_seconds",
    "poll_interval",
    "cni_datastore_path",
    "enable_asg_syncing",
    "asg_poll_interval",
    "force_policy_poll_cycle_host",
    "force_policy_poll_cycle_port",
    "iptables_lock_file",
    "underlay_ips",
];

/// The `[cf]` settings vxlan-policy-agent's config `text` gives, and the
/// keys in it that do not apply here (sorted).
pub fn from_vxlan_policy_agent(text: &str) -> Result<(CfConfig, Vec<String>), String> {
    let config: BTreeMap<String, Value> = serde_json::from_str(text)
        .map_err(|e| format!("not vxlan-policy-agent's JSON config (an object): {e}"))?;
    let string = |key: &str| -> Result<Option<String>, String> {
        match config.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!("{key}: {other} is not a string")),
        }
    };
    let required = |key: &str| string(key)?.ok_or_else(|| format!("{key} is missing"));
    let seconds = |key: &str, default: u64| -> Result<Duration, String> {
        let n = match config.get(key) {
            None | Some(Value::Null) => default,
            Some(v) => {
                v.as_u64().ok_or_else(|| format!("{key}: {v} is not a whole number of seconds"))?
            }
        };
        check_interval(Duration::from_secs(n)).map_err(|why| format!("{key}: {n} s {why}"))
    };
    let enable_asg_syncing = match config.get("enable_asg_syncing") {
        None | Some(Value::Null) => false,
        Some(v) => {
            v.as_bool().ok_or_else(|| format!("enable_asg_syncing: {v} is not true or false"))?
        }
    };
    let force =
        match (string("force_policy_poll_cycle_host")?, config.get("force_policy_poll_cycle_port"))
        {
            (Some(host), Some(port)) => {
                let port = port
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("force_policy_poll_cycle_port: {port} is not a port"))?;
                let addr = format!("{host}:{port}").parse().map_err(|_| {
                    format!("force_policy_poll_cycle_host: {host:?} is not an IP address")
                })?;
                Some(addr)
            }
            (None, None) => None,
            _ => {
                return Err(
                    "force_policy_poll_cycle_host and force_policy_poll_cycle_port go together"
                        .into(),
                );
            }
        };
    let fields = Fields {
        policy_server_url: required("policy_server_url")?,
        ca_cert_file: PathBuf::from(required("ca_cert_file")?),
        client_cert_file: PathBuf::from(required("client_cert_file")?),
        client_key_file: PathBuf::from(required("client_key_file")?),
        // vxlan-policy-agent's own defaults where its config has none.
        poll_interval: seconds("poll_interval", 5)?,
        client_timeout: seconds("client_timeout_seconds", 5)?,
        cni_datastore_path: string("cni_datastore_path")?
            .filter(|p| !p.is_empty())
            .map(PathBuf::from),
        enable_asg_syncing,
        asg_poll_interval: seconds("asg_poll_interval", 60)?,
        force_policy_poll_cycle_listen: force,
        iptables_lock_file: string("iptables_lock_file")?
            .filter(|p| !p.is_empty())
            .map(PathBuf::from),
        underlay_ips: match config.get("underlay_ips") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|_| format!("underlay_ips: {v} is not a list of IPv4 addresses"))?,
        },
        vtep_name: super::config::default_vtep_name(),
    };
    let cf = CfConfig::checked(fields)?;
    let ignored = config.keys().filter(|k| !APPLIED.contains(&k.as_str())).cloned().collect();
    Ok((cf, ignored))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's rendered config for a cell (shared/fixtures/cf-silk).
    fn rendered(dir: &std::path::Path) -> String {
        let d = dir.display();
        format!(
            r#"{{"policy_server_url":"https://10.99.0.1:4003","ca_cert_file":"{d}/ca.crt","client_cert_file":"{d}/client.crt","client_key_file":"{d}/client.key",
 "client_timeout_seconds":5,"poll_interval":5,"enable_asg_syncing":true,"asg_poll_interval":60,
 "cni_datastore_path":"{d}/store.json","iptables_lock_file":"/path/garden-cni/iptables.lock",
 "underlay_ips":["10.99.0.11"],"overlay_network":"10.255.0.0/16","vni":1,
 "force_policy_poll_cycle_host":"127.0.0.1","force_policy_poll_cycle_port":8722,
 "debug_server_host":"127.0.0.1","debug_server_port":8721,
 "enable_overlay_ingress_rules":false,"disable_container_network_policy":false,
 "iptables_c2c_logging":false,"iptables_asg_logging":false,"iptables_accepted_udp_logs_per_sec":100,"iptables_denied_logs_per_sec":1,
 "deny_networks":{{"always":[],"running":[],"staging":[]}},
 "outbound_connections":{{"limit":false,"logging":false,"burst":1000,"rate_per_sec":100}},
 "metron_address":"127.0.0.1:3457","log_prefix":"cfnetworking","log_level":"info","loggregator":{{"loggregator_use_v2_api":false}}}}"#
        )
    }

    #[test]
    fn a_rendered_config_is_taken_and_the_rest_named() {
        let dir = std::env::temp_dir().join(format!("vpa-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["ca.crt", "client.crt", "client.key"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let (cf, ignored) = from_vxlan_policy_agent(&rendered(&dir)).unwrap();
        assert_eq!(cf.policy_server_url, "https://10.99.0.1:4003");
        assert_eq!(cf.poll_interval, Duration::from_secs(5));
        assert_eq!(cf.asg_poll_interval, Duration::from_secs(60));
        assert_eq!(cf.client_timeout, Duration::from_secs(5));
        assert!(cf.enable_asg_syncing);
        assert_eq!(cf.cni_datastore_path, Some(dir.join("store.json")));
        assert_eq!(cf.force_policy_poll_cycle_listen, Some("127.0.0.1:8722".parse().unwrap()));
        assert_eq!(cf.iptables_lock_file, Some(PathBuf::from("/path/garden-cni/iptables.lock")));
        assert!(ignored.contains(&"iptables_c2c_logging".to_owned()), "{ignored:?}");
        assert_eq!(cf.underlay_ips, vec![std::net::Ipv4Addr::new(10, 99, 0, 11)]);
        assert!(ignored.contains(&"vni".to_owned()), "{ignored:?}");
        assert!(!ignored.iter().any(|k| APPLIED.contains(&k.as_str())), "{ignored:?}");
        // Errors name the key.
        let broken = rendered(&dir).replace("\"poll_interval\":5", "\"poll_interval\":\"5s\"");
        assert!(from_vxlan_policy_agent(&broken).unwrap_err().contains("poll_interval"));
        let broken = rendered(&dir).replace("\"force_policy_poll_cycle_port\":8722,", "");
        assert!(from_vxlan_policy_agent(&broken).unwrap_err().contains("go together"));
        assert!(from_vxlan_policy_agent("[]").unwrap_err().contains("JSON config"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
