//! One "host" network namespace with "container" namespaces joined to it by
//! veth pairs, as Cloud Foundry's silk lays them out: the container has a /32
//! address and a default route via a link-local gateway; the host routes that
//! /32 to the host-side veth; no bridge.

use std::net::{Ipv4Addr, Ipv6Addr};

use policy_agent::Dataplane;
use policy_api::Ipv6Prefix;
/// The gateways every container uses (on every host-side veth), as the
/// agent and the CNI plugin define them.
pub use policy_api::{GATEWAY, GATEWAY6};

use crate::netns::NetNs;

/// The /96 dual-stack containers' IPv6 addresses are in: the prefix plus
/// their IPv4 address (the CNI plugin's and the cluster's `ipv6_prefix`).
pub const IPV6_PREFIX: &str = "fd00:255::/96";

pub struct Container {
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    /// Its IPv6 address on a dual-stack host (`Host::dual_stack`).
    pub ipv6: Option<Ipv6Addr>,
    /// Name of the host-side veth (in the host namespace).
    pub host_ifname: String,
}

/// The host namespace and its containers. Dropping it removes them all
/// (containers first; their veths go with them).
pub struct Host {
    pub containers: Vec<Container>,
    pub ns: NetNs,
}

impl Host {
    /// A host with `n` containers at 10.255.0.1, 10.255.0.2, ...
    pub fn new(n: usize) -> Self {
        Self::with_subnet(n, 0)
    }

    /// A host with `n` containers at 10.255.S.1, 10.255.S.2, ... (S:
    /// `subnet`, this host's /24 of the overlay in a cluster).
    pub fn with_subnet(n: usize, subnet: u8) -> Self {
        let ns = NetNs::new(crate::unique_name("h"));
        ns.sysctl("net.ipv4.ip_forward", "1");
        let mut host = Self { containers: Vec::new(), ns };
        for i in 0..n {
            host.add_container(i, subnet);
        }
        host
    }

    /// A host with `n` dual-stack containers: 10.255.0.N as in [`Self::new`]
    /// and the same address under [`IPV6_PREFIX`] (a /128 each, routed by
    /// the host to the veth, with the link-local gateway fe80::1 on every
    /// host-side veth), as the CNI plugin gives them.
    pub fn dual_stack(n: usize) -> Self {
        Self::dual_stack_with_subnet(n, 0)
    }

    /// [`Self::dual_stack`] in subnet 10.255.S.0 (a cluster host's).
    pub fn dual_stack_with_subnet(n: usize, subnet: u8) -> Self {
        let mut host = Self::with_subnet(n, subnet);
        host.ns.sysctl("net.ipv6.conf.all.forwarding", "1");
        let prefix = Ipv6Prefix::parse(IPV6_PREFIX).expect("a /96");
        for c in &mut host.containers {
            let ipv6 = prefix.address_of(c.ip);
            // No duplicate address detection: the address works at once.
            c.ns.ip(&["-6", "addr", "add", &format!("{ipv6}/128"), "dev", "eth0", "nodad"]);
            c.ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &GATEWAY6.to_string(),
                "dev",
                "eth0",
            ]);
            host.ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{GATEWAY6}/64"),
                "dev",
                &c.host_ifname,
                "nodad",
            ]);
            host.ns.ip(&["-6", "route", "add", &format!("{ipv6}/128"), "dev", &c.host_ifname]);
            c.ipv6 = Some(ipv6);
        }
        host
    }

    fn add_container(&mut self, i: usize, subnet: u8) {
        let ip = Ipv4Addr::new(10, 255, subnet, i as u8 + 1);
        let container = container_on(&self.ns, &format!("hv{i}"), ip);
        self.containers.push(container);
    }

    pub fn container(&self, i: usize) -> &Container {
        &self.containers[i]
    }

    /// The ifindex of a host-side veth.
    pub fn ifindex(&self, ifname: &str) -> u32 {
        let name = ifname.to_owned();
        self.ns
            .run(move || policy_agent::dataplane::nix_ifindex(&name))
            .unwrap_or_else(|| panic!("no interface {ifname} in the host namespace"))
    }

    /// Registers container `i` as an endpoint of the app tagged `tag` and
    /// attaches the programs to its host-side veth.
    pub fn register(&self, dataplane: &mut Dataplane, i: usize, tag: u32) {
        let c = self.container(i);
        let ifindex = self.ifindex(&c.host_ifname);
        let tables = dataplane.maps_mut();
        tables.set_endpoint(c.ip, tag).expect("set endpoint");
        tables.set_veth(ifindex, c.ip, tag).expect("set veth");
        let _in_host = self.ns.enter();
        dataplane
            .attach_veth(&c.host_ifname)
            .unwrap_or_else(|e| panic!("attach {}: {e}", c.host_ifname));
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Containers first, then the host (field order would do the
        // opposite of nothing in particular; be explicit).
        self.containers.clear();
    }
}

/// A namespace outside `host` (not a container: a client or a server
/// beyond the host's uplink), joined by a veth: `ifname` in `host` with
/// `host_cidr`, `eth0` outside with `outside_cidrs`.
pub fn outside(host: &NetNs, ifname: &str, host_cidr: &str, outside_cidrs: &[&str]) -> NetNs {
    let outside = NetNs::new(crate::unique_name("x"));
    veth_into(host, ifname, &outside);
    host.ip(&["addr", "add", host_cidr, "dev", ifname]);
    host.ip(&["link", "set", ifname, "up"]);
    for cidr in outside_cidrs {
        outside.ip(&["addr", "add", cidr, "dev", "eth0"]);
    }
    outside.ip(&["link", "set", "eth0", "up"]);
    outside
}

/// A container of `host` laid out as silk does, its host-side veth named
/// `host_ifname`: `ip`/32 on its `eth0` with a default route via the
/// gateway, which the host side holds, and the host's route to `ip`.
pub fn container_on(host: &NetNs, host_ifname: &str, ip: Ipv4Addr) -> Container {
    let ns = NetNs::new(crate::unique_name("c"));
    let cidr = format!("{ip}/32");
    let gateway = GATEWAY.to_string();
    veth_into(host, host_ifname, &ns);
    ns.ip(&["addr", "add", &cidr, "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&["route", "add", &gateway, "dev", "eth0", "scope", "link"]);
    ns.ip(&["route", "add", "default", "via", &gateway, "dev", "eth0"]);
    host.ip(&["addr", "add", &format!("{gateway}/32"), "dev", host_ifname]);
    host.ip(&["link", "set", host_ifname, "up"]);
    host.ip(&["route", "add", &cidr, "dev", host_ifname]);
    Container { ns, ip, ipv6: None, host_ifname: host_ifname.to_owned() }
}

/// A veth pair: `ifname` in `host`, its peer `eth0` in `ns`.
fn veth_into(host: &NetNs, ifname: &str, ns: &NetNs) {
    host.ip(&["link", "add", ifname, "type", "veth", "peer", "name", "eth0", "netns", ns.name()]);
}
