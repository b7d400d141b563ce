//! What each of CF's programs is told: their JSON configs, as
//! `two-cells.sh` in the cf-silk fixture writes them (every key read; the
//! fixture's README says what each means), and a cell's files they name.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde_json::{Value, json};

use crate::cf::merge;

use super::{
    FORCE_POLL_PORT, METRON_PORT, OVERLAY_NETWORK, SILK_DAEMON_PORT, SUBNET_PREFIX_LENGTH,
};

/// A CA and a client (or server) certificate and key, as CF's configs name
/// them.
pub(super) struct Tls<'a> {
    pub(super) ca: &'a Path,
    pub(super) cert: &'a Path,
    pub(super) key: &'a Path,
}

/// silk-controller's config: the lease API (mutual TLS) on `listen`, its
/// leases in the database `database` of the Postgres at 127.0.0.1:`postgres_port`.
pub(super) fn silk_controller(
    listen: (Ipv4Addr, u16),
    health_check_port: u16,
    debug_server_port: u16,
    server: &Tls,
    (postgres_port, database): (u16, &str),
) -> Value {
    json!({
        "listen_host": listen.0.to_string(), "listen_port": listen.1,
        "debug_server_port": debug_server_port, "health_check_port": health_check_port,
        "ca_cert_file": server.ca, "server_cert_file": server.cert, "server_key_file": server.key,
        "network": OVERLAY_NETWORK, "subnet_prefix_length": SUBNET_PREFIX_LENGTH,
        "database": {
            "type": "postgres", "user": "postgres", "password": "", "host": "127.0.0.1",
            "port": postgres_port, "timeout": 5, "database_name": database,
        },
        "lease_expiration_seconds": 604_800, "staleness_threshold_seconds": 3600,
        "metrics_emit_seconds": 30, "metron_port": METRON_PORT, "log_prefix": "cfnetworking",
        "max_idle_connections": 10, "max_open_connections": 200,
        "connections_max_lifetime_seconds": 3600,
    })
}

/// A cell's files, all under its directory: what silk-daemon, silk-cni,
/// cni-wrapper-plugin and vxlan-policy-agent share.
pub(super) struct CellFiles {
    pub(super) dir: PathBuf,
}

impl CellFiles {
    /// silk-cni's own store (netns file name → IP), which silk-daemon reads.
    pub(super) fn silk_store(&self) -> PathBuf {
        self.dir.join("silk/store.json")
    }

    /// The container metadata store (cni-wrapper-plugin writes it, the
    /// policy agent reads it).
    pub(super) fn metadata_store(&self) -> PathBuf {
        self.dir.join("container-metadata/store.json")
    }

    /// host-local's state (`ipam/` below it).
    pub(super) fn host_local(&self) -> PathBuf {
        self.dir.join("host-local")
    }

    /// The flock cni-wrapper-plugin and vxlan-policy-agent take around
    /// every iptables change.
    pub(super) fn iptables_lock(&self) -> PathBuf {
        self.dir.join("garden-cni/iptables.lock")
    }

    /// The directories the files above live in (vxlan-policy-agent exits
    /// unless the metadata store's exists).
    pub(super) fn create_dirs(&self) {
        for file in [self.silk_store(), self.metadata_store(), self.iptables_lock()] {
            let dir = file.parent().expect("a file in a directory");
            std::fs::create_dir_all(dir).expect("a cell's data dir");
        }
        std::fs::create_dir_all(self.host_local()).expect("host-local's dir");
    }
}

/// silk-daemon's config for the cell at `underlay_ip`, polling
/// silk-controller every second (CF: 30 s, the fixture's script: 5 s), so
/// that cells learn each other's leases quickly.
pub(super) fn silk_daemon(
    underlay_ip: Ipv4Addr,
    controller_url: &str,
    client: &Tls,
    files: &CellFiles,
) -> Value {
    json!({
        "underlay_ip": underlay_ip.to_string(), "vxlan_interface_name": "",
        "subnet_prefix_length": SUBNET_PREFIX_LENGTH, "overlay_network": OVERLAY_NETWORK,
        "vtep_name": "silk-vtep", "vni": 1, "vtep_port": 4789,
        "connectivity_server_url": controller_url,
        "ca_cert_file": client.ca, "client_cert_file": client.cert, "client_key_file": client.key,
        "client_timeout_seconds": 5, "poll_interval": 1, "partition_tolerance_seconds": 604_800,
        "health_check_port": SILK_DAEMON_PORT, "debug_server_port": 22233,
        "datastore": files.silk_store(), "metron_port": METRON_PORT,
        "log_prefix": "cfnetworking", "log_level": "info", "single_ip_only": false,
    })
}

/// What vxlan-policy-agent and cni-wrapper-plugin both say the same way.
fn shared_policy_keys() -> Value {
    json!({
        "iptables_c2c_logging": false, "iptables_asg_logging": false,
        "iptables_accepted_udp_logs_per_sec": 100, "iptables_denied_logs_per_sec": 1,
        "deny_networks": {"always": [], "running": [], "staging": []},
    })
}

/// vxlan-policy-agent's config for the cell at `underlay_ip`: policies
/// from `policy_server_url`, polled every 5 s (and whenever forced on
/// 127.0.0.1:[`FORCE_POLL_PORT`]), ASGs synced.
pub(super) fn vxlan_policy_agent(
    underlay_ip: Ipv4Addr,
    policy_server_url: &str,
    client: &Tls,
    files: &CellFiles,
) -> Value {
    let mut config = shared_policy_keys();
    merge(
        &mut config,
        json!({
            "policy_server_url": policy_server_url,
            "ca_cert_file": client.ca, "client_cert_file": client.cert,
            "client_key_file": client.key, "client_timeout_seconds": 5,
            "poll_interval": 5, "enable_asg_syncing": true, "asg_poll_interval": 60,
            "cni_datastore_path": files.metadata_store(),
            "iptables_lock_file": files.iptables_lock(),
            "underlay_ips": [underlay_ip.to_string()], "overlay_network": OVERLAY_NETWORK,
            "vni": 1,
            "force_policy_poll_cycle_host": "127.0.0.1",
            "force_policy_poll_cycle_port": FORCE_POLL_PORT,
            "debug_server_host": "127.0.0.1", "debug_server_port": 8721,
            "enable_overlay_ingress_rules": false, "disable_container_network_policy": false,
            "outbound_connections": {
                "limit": false, "logging": false, "burst": 1000, "rate_per_sec": 100,
            },
            "metron_address": format!("127.0.0.1:{METRON_PORT}"),
            "log_prefix": "cfnetworking", "log_level": "info",
            "loggregator": {"loggregator_use_v2_api": false},
        }),
    );
    config
}

/// cni-wrapper-plugin's config for the cell at `underlay_ip`, delegating
/// to `silk-cni-stderr` (which delegates to host-local); without the
/// `metadata` and `runtimeConfig` garden-external-networker adds per
/// container ([`container_keys`]).
pub(super) fn cni_wrapper(underlay_ip: Ipv4Addr, files: &CellFiles) -> Value {
    let mut config = shared_policy_keys();
    merge(
        &mut config,
        json!({
            "cniVersion": "1.0.0", "name": "cni-wrapper", "type": "cni-wrapper-plugin",
            "datastore": files.metadata_store(),
            "datastore_file_owner": "", "datastore_file_group": "",
            "iptables_lock_file": files.iptables_lock(),
            "instance_address": underlay_ip.to_string(),
            "underlay_ips": [underlay_ip.to_string()], "temporary_underlay_interface_names": [],
            "no_masquerade_cidr_range": OVERLAY_NETWORK, "vtep_name": "silk-vtep",
            "ingress_tag": "ffff0000",
            "policy_agent_force_poll_address": format!("127.0.0.1:{FORCE_POLL_PORT}"),
            "dns_servers": [], "host_tcp_services": [], "host_udp_services": [],
            "outbound_connections": {
                "limit": false, "logging": false, "burst": 1000, "rate_per_sec": 100,
                "dry_run": false,
            },
            "delegate": {
                "cniVersion": "1.0.0", "name": "silk", "type": "silk-cni-stderr",
                "daemonPort": SILK_DAEMON_PORT, "dataDir": files.host_local(),
                "datastore": files.silk_store(), "mtu": 0,
            },
        }),
    );
    config
}

/// What garden-external-networker adds to every plugin's config for one
/// container (cf-networking-release `garden-external-networker/cni/
/// cni_controller.go`): `metadata` at the top level, copied verbatim into
/// the metadata store, and `runtimeConfig` (no port mappings, no garden
/// NetOut rules), as the fixture's `cni.py` does.
pub(super) fn container_keys(app: &str, space: &str) -> Value {
    json!({
        "metadata": {
            "policy_group_id": app, "app_id": app, "space_id": space, "org_id": "org-1",
            "container_workload": "app", "ports": "8080",
        },
        "runtimeConfig": {"portMappings": [], "netOutRules": []},
    })
}
