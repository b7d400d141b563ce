//! Containers on a cell, made and removed as garden-external-networker
//! does in a real cell: CF's cni-wrapper-plugin (CNI ADD/DEL) with the
//! container's `metadata` at the top level of its config, delegating to
//! silk-cni (here `silk-cni-stderr`), which delegates to host-local.

use std::{
    fs,
    io::Write as _,
    net::Ipv4Addr,
    process::{Output, Stdio},
};

use super::{Cell, config};
use crate::{cf::merge, netns::NetNs};

/// A container's network namespace, made by the CNI plugins: `eth0` with
/// its overlay address (peer 169.254.0.1, the default route), the
/// host-side veth `s-IP` in the cell. Its namespace is removed on drop;
/// [`Cell::remove_container`] is CNI DEL.
pub struct SilkContainer {
    /// `PREFIXNAME`.
    pub ns: NetNs,
    /// What host-local gave it, as the CNI result and the metadata store say.
    pub ip: Ipv4Addr,
    /// garden's handle (`NAME-handle`): the metadata store's key, the
    /// `CNI_CONTAINERID`, in cni-wrapper-plugin's chain names.
    pub handle: String,
    /// The app it runs: its `policy_group_id`, which policies name.
    pub app: String,
    /// Its `space_id` (ASGs are bound to spaces).
    pub space: String,
}

impl Cell<'_> {
    /// A container `name` (its namespace `PREFIXNAME`, its handle
    /// `NAME-handle`) of `app` in `space` on this cell, through CNI ADD.
    /// The ADD asks the policy agent for a poll and for the container's
    /// ASGs on [`Cell::force_poll_address`]: with [`super::CellAgent::None`]
    /// start yours first. Panics with the plugins' output unless ADD
    /// succeeds.
    pub fn add_container(&self, name: &str, app: &str, space: &str) -> SilkContainer {
        let ns = NetNs::new(format!("{}{name}", self.overlay.prefix));
        let mut container = SilkContainer {
            ns,
            ip: Ipv4Addr::UNSPECIFIED,
            handle: format!("{name}-handle"),
            app: app.to_owned(),
            space: space.to_owned(),
        };
        let out = self.cni("ADD", &container);
        let result: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("ADD {name}: a result that is not JSON ({e})"));
        let address = result["ips"][0]["address"].as_str().unwrap_or_default();
        container.ip = address
            .split('/')
            .next()
            .and_then(|ip| ip.parse().ok())
            .unwrap_or_else(|| panic!("ADD {name}: no IPv4 address in the result {result}"));
        container
    }

    /// CNI DEL of `container`: its iptables chains, NAT rule, veth,
    /// host-local reservation and store entries go (its namespace stays
    /// until it drops). Asks the policy agent for an ASG cleanup. Panics
    /// with the plugins' output unless DEL succeeds.
    pub fn remove_container(&self, container: &SilkContainer) {
        self.cni("DEL", container);
    }

    /// Runs cni-wrapper-plugin in the cell with `command`, as
    /// garden-external-networker calls it: its output, also appended to
    /// `cni.log`; panics unless it succeeds.
    fn cni(&self, command: &str, container: &SilkContainer) -> Output {
        let config = fs::read(self.cni_config()).expect("cni-wrapper-plugin's config");
        let mut config: serde_json::Value = serde_json::from_slice(&config).expect("JSON");
        merge(&mut config, config::container_keys(&container.app, &container.space));
        let binaries = &self.overlay.binaries;
        let mut child = self
            .network()
            .command(binaries.join("cni-wrapper-plugin"))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &container.handle)
            .env("CNI_NETNS", container.ns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", binaries)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run cni-wrapper-plugin");
        let written =
            child.stdin.take().map(|mut stdin| stdin.write_all(config.to_string().as_bytes()));
        let out = child.wait_with_output().expect("wait for cni-wrapper-plugin");
        let said = format!(
            "=== {command} {}: {}\n{}{}\n",
            container.handle,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if let Ok(mut log) = fs::OpenOptions::new().create(true).append(true).open(self.cni_log()) {
            let _ = log.write_all(said.as_bytes());
        }
        assert!(
            out.status.success() && matches!(written, Some(Ok(()))),
            "cni-wrapper-plugin {command} {} on cell {}: {said}{}",
            container.handle,
            self.n(),
            self.logs()
        );
        out
    }

    fn cni_log(&self) -> std::path::PathBuf {
        self.dir().join("cni.log")
    }
}
