//! Driving the `policy-cni` plugin exactly as a runtime does: the network
//! configuration on stdin, `CNI_*` in the environment, run in the host's
//! network namespace; and podman with the plugin as its CNI network.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};

use crate::{agent::built_bin, daemon::Daemon, netns::NetNs};

pub fn cni_bin() -> PathBuf {
    built_bin("policy-cni")
}

/// One plugin run: exit status and stdout parsed as JSON (Null if empty).
pub struct Outcome {
    pub ok: bool,
    pub out: Value,
    pub stderr: String,
}

/// Runs the plugin in `host` (the runtime's namespace) with `command`, for
/// container `id` whose namespace is `netns` (None: unset), `ifname`,
/// `args` as CNI_ARGS, `config` on stdin.
pub fn run_plugin(
    host: &NetNs,
    command: &str,
    id: &str,
    netns: Option<&Path>,
    ifname: &str,
    config: &Value,
) -> Outcome {
    run_plugin_with(host, command, id, netns, ifname, "", config)
}

pub fn run_plugin_with(
    host: &NetNs,
    command: &str,
    id: &str,
    netns: Option<&Path>,
    ifname: &str,
    args: &str,
    config: &Value,
) -> Outcome {
    let plugin = Plugin { bin: &cni_bin(), cni_path: "/opt/cni/bin" };
    plugin.run(host, command, id, netns, ifname, args, config)
}

/// Any CNI plugin binary, with the directory it finds its delegates in
/// (`CNI_PATH`; the reference `ptp` calls `host-local` from there).
pub struct Plugin<'a> {
    pub bin: &'a Path,
    pub cni_path: &'a str,
}

impl Plugin<'_> {
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        host: &NetNs,
        command: &str,
        id: &str,
        netns: Option<&Path>,
        ifname: &str,
        args: &str,
        config: &Value,
    ) -> Outcome {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", host.path().display()))
            .arg(self.bin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_IFNAME", ifname)
            .env("CNI_ARGS", args)
            .env("CNI_PATH", self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(netns) = netns {
            cmd.env("CNI_NETNS", netns);
        }
        let mut child = cmd.spawn().expect("run policy-cni");
        child.stdin.take().unwrap().write_all(config.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        Outcome {
            ok: out.status.success(),
            out: serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// The address an ADD result gave the container.
pub fn result_ip(result: &Value) -> Ipv4Addr {
    let address = result["ips"][0]["address"].as_str().expect("an address in the result");
    address.split('/').next().unwrap().parse().expect("an IPv4 address")
}

/// Interface names in `ns` (`ip -o link`).
pub fn links(ns: &NetNs) -> Vec<String> {
    let out = ns.command("ip").args(["-o", "link", "show"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| Some(l.split(": ").nth(1)?.split('@').next()?.to_owned()))
        .collect()
}

/// podman (CNI backend) with this plugin as its network, confined to a
/// directory of its own: configuration, storage, run state, a busybox root
/// filesystem (no image pull) and a cgroup parent; removed on drop.
pub struct Podman {
    pub dir: PathBuf,
    pub network: String,
    host: PathBuf,
    cgroup_parent: String,
}

impl Podman {
    /// A network named uniquely, its plugin talking to the agent on
    /// `socket`, for containers whose host namespace is `host`.
    pub fn new(host: &NetNs, socket: &Path) -> Self {
        let network = crate::unique_name("net");
        let dir = std::env::temp_dir().join(&network);
        let plugins = dir.join("plugins");
        let networks = dir.join("networks");
        let rootfs = dir.join("rootfs");
        for d in [&plugins, &networks, &rootfs.join("bin"), &rootfs.join("www")] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::os::unix::fs::symlink(cni_bin(), plugins.join("policy-cni")).unwrap();
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": network,
            "plugins": [{
                "type": "policy-cni",
                "agent_socket": socket,
                "data_dir": dir.join("leases"),
                "dns_servers": ["169.254.0.1"],
                "capabilities": {"aliases": true}
            }]
        });
        std::fs::write(networks.join(format!("{network}.conflist")), conflist.to_string()).unwrap();
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\"]\nnetwork_config_dir = \"{}\"\n\
                 [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nevents_logfile_path = \"{}\"\ntmp_dir = \"{}\"\n",
                plugins.display(),
                networks.display(),
                dir.join("events.log").display(),
                dir.join("tmp").display(),
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                dir.join("run").display(),
                dir.join("storage").display()
            ),
        )
        .unwrap();
        // The root filesystem: the host's static busybox and its applets.
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox-static");
        for applet in ["sh", "httpd", "nc", "printf", "sleep", "ip", "cat"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        std::fs::write(rootfs.join("www/index.html"), "hello from a podman container\n").unwrap();
        let cgroup_parent = format!("/{network}");
        Self { dir, network, host: host.path(), cgroup_parent }
    }

    /// A second network on the reference plugins (`ptp` + `host-local`,
    /// 10.66.0.0/16), for comparisons; returns its name.
    pub fn add_reference_network(&self) -> String {
        let name = format!("{}-ref", self.network);
        for plugin in ["ptp", "host-local"] {
            let link = self.dir.join("plugins").join(plugin);
            if !link.exists() {
                std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(plugin), link).unwrap();
            }
        }
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": name,
            "plugins": [{
                "type": "ptp",
                "ipam": {
                    "type": "host-local",
                    "subnet": "10.66.0.0/16",
                    "dataDir": self.dir.join("ref-leases"),
                    "routes": [{"dst": "0.0.0.0/0"}]
                }
            }]
        });
        std::fs::write(
            self.dir.join("networks").join(format!("{name}.conflist")),
            conflist.to_string(),
        )
        .unwrap();
        name
    }

    /// `podman ARGS...` in the host namespace; (success, stdout + stderr).
    pub fn run(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.host.display()))
            .arg("podman")
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .output()
            .expect("run podman");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// The arguments of `podman run` on this network as app `app`, with
    /// the settings this machine needs (runc, no raised limits).
    pub fn run_args(&self, name: &str, app: &str) -> Vec<String> {
        self.run_args_on(&self.network, name, app)
    }

    /// `run_args` on another of its networks (the app alias only means
    /// something on a `policy-cni` one).
    pub fn run_args_on(&self, network: &str, name: &str, app: &str) -> Vec<String> {
        [
            "--runtime",
            "runc",
            "run",
            "--name",
            name,
            "--network",
            network,
            "--network-alias",
            &format!("app.{app}"),
            "--cgroup-parent",
            &self.cgroup_parent,
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--rootfs",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([self.dir.join("rootfs").display().to_string()])
        .collect()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "-a", "-f", "-t", "0"]);
        // runc leaves the containers' cgroups under the parent.
        if let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") {
            for c in controllers.flatten() {
                remove_cgroup(&c.path().join(self.cgroup_parent.trim_start_matches('/')));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes a cgroup directory and the ones below it, deepest first (a
/// cgroup directory goes with `rmdir` once it has no processes).
fn remove_cgroup(dir: &Path) {
    if let Ok(children) = std::fs::read_dir(dir) {
        for child in children.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
            remove_cgroup(&child.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// A network configuration for this daemon (garden's keys), `app` as
/// garden's `policy_group_id`.
pub fn config(daemon: &Daemon, version: &str, app: Option<&str>) -> Value {
    let mut c = json!({
        "cniVersion": version,
        "name": "policy-net",
        "type": "policy-cni",
        "agent_socket": daemon.socket,
        "data_dir": daemon.dir.join("cni"),
        "dns_servers": ["169.254.0.1"],
        "mtu": 0,
    });
    if let Some(app) = app {
        c["metadata"] = json!({"policy_group_id": app});
    }
    c
}

pub fn endpoints(daemon: &Daemon) -> Vec<Value> {
    daemon.curl("GET", "/v1/endpoints", None).1["endpoints"].as_array().unwrap().clone()
}

pub fn leases(daemon: &Daemon) -> Vec<String> {
    std::fs::read_dir(daemon.dir.join("cni/policy-net"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.parse::<Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

pub fn plugin_links(host: &NetNs) -> Vec<String> {
    links(host).into_iter().filter(|l| l.starts_with("pc")).collect()
}

/// No endpoint, lease or plugin veth is left.
pub fn assert_nothing_left(daemon: &Daemon, host: &NetNs) {
    assert!(endpoints(daemon).is_empty(), "endpoints left: {:?}", endpoints(daemon));
    assert!(leases(daemon).is_empty(), "leases left: {:?}", leases(daemon));
    assert!(plugin_links(host).is_empty(), "veths left: {:?}", plugin_links(host));
}

/// A host namespace that forwards and a namespace outside it, joined by a
/// veth (`ifname` on the host, with `host_cidr`; `eth0` outside, with
/// `outside_cidrs`).
pub fn host_with_outside(ifname: &str, host_cidr: &str, outside_cidrs: &[&str]) -> (NetNs, NetNs) {
    let host = NetNs::new(crate::unique_name("h"));
    host.sysctl("net.ipv4.ip_forward", "1");
    let outside = crate::topology::outside(&host, ifname, host_cidr, outside_cidrs);
    (host, outside)
}

/// A host namespace that forwards, with an agent in it.
pub fn host_with_agent(extra_config: &str) -> (NetNs, Daemon) {
    let host = NetNs::new(crate::unique_name("h"));
    host.sysctl("net.ipv4.ip_forward", "1");
    let daemon = Daemon::start(&host, extra_config);
    (host, daemon)
}

pub fn assert_failed(o: &Outcome, code: u64, says: &str) {
    assert!(!o.ok, "expected a failure: {}", o.out);
    assert_eq!(o.out["code"], code, "{} {}", o.out, o.stderr);
    let msg = o.out["msg"].as_str().unwrap_or_default();
    assert!(msg.contains(says), "{msg:?} does not say {says:?}: {}", o.out);
}
