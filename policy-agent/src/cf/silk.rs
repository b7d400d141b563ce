//! Joining Cloud Foundry's silk overlay on a cell (`underlay_ips` set):
//! silk-daemon's `silk-vtep` (VNI 1, UDP 4789, Group Based Policy) becomes
//! the programs' tunnel — a container's packets leave with its app's tag
//! in the GBP field, as vxlan-policy-agent's marks do, and packets from
//! other cells are judged by the tag in theirs (none: an app no policy
//! names, `tunnel_flags::SILK`) — and the underlay interface (the one
//! holding `underlay_ips[0]`) is guarded: tunnel packets are taken only
//! from other cells, the `dst` addresses of silk-vtep's forwarding table,
//! which silk-daemon keeps to silk-controller's leases. Re-read every
//! poll; nothing is done until silk-daemon has made its device.

use std::{collections::BTreeSet, ffi::CString, net::Ipv4Addr};

use policy_common::maps::tunnel_flags;
use tracing::{info, warn};

use crate::agent::{self, SharedAgent};

/// silk's VXLAN port (silk-daemon's `vtep_port`, CF's only value).
pub const VTEP_PORT: u16 = 4789;

pub struct SilkOverlay {
    vtep: String,
    underlay_ips: Vec<Ipv4Addr>,
    /// The device's ifindex and the underlay interface, once joined.
    joined: Option<(u32, String)>,
    peers: Option<BTreeSet<Ipv4Addr>>,
    waiting_said: bool,
}

impl SilkOverlay {
    pub fn new(vtep: &str, underlay_ips: &[Ipv4Addr]) -> Self {
        Self {
            vtep: vtep.to_owned(),
            underlay_ips: underlay_ips.to_vec(),
            joined: None,
            peers: None,
            waiting_said: false,
        }
    }

    /// The VXLAN device's name, once joined.
    pub fn joined_vtep(&self) -> Option<&str> {
        self.joined.as_ref().map(|_| self.vtep.as_str())
    }

    /// Joins (or follows) the overlay: peers first, then the tunnel, so a
    /// guard never drops a cell the forwarding table names.
    pub fn sync(&mut self, agent: &SharedAgent) -> Result<(), String> {
        let Some(ifindex) = if_index(&self.vtep) else {
            if !self.waiting_said {
                info!(
                    vtep = self.vtep,
                    "silk's VXLAN device is not there yet: traffic across cells waits for silk-daemon"
                );
                self.waiting_said = true;
            }
            return Ok(());
        };
        let underlay_ip = *self.underlay_ips.first().ok_or("no underlay_ips")?;
        let underlay = interface_with(underlay_ip)
            .ok_or_else(|| format!("no interface holds underlay_ips address {underlay_ip}"))?;
        let peers = fdb_peers(&self.vtep)?;
        if self.peers.as_ref() != Some(&peers) {
            agent::lock(agent).set_peers(&peers).map_err(|e| {
                format!("cannot take the cells of {}'s forwarding table: {e}", self.vtep)
            })?;
            info!(
                vtep = self.vtep,
                cells = peers.len(),
                "the overlay's other cells (silk-vtep's forwarding table)"
            );
            self.peers = Some(peers);
        }
        let wanted = (ifindex, underlay);
        if self.joined.as_ref() != Some(&wanted) {
            agent::lock(agent)
                .set_tunnel(wanted.0, VTEP_PORT, tunnel_flags::SILK, &wanted.1)
                .map_err(|e| format!("cannot join silk's overlay on {}: {e}", self.vtep))?;
            info!(
                vtep = self.vtep,
                ifindex = wanted.0,
                underlay = wanted.1,
                "joined silk's overlay: tags travel in its VXLAN GBP field"
            );
            self.joined = Some(wanted);
        }
        Ok(())
    }
}

fn if_index(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated name; the call reads it only.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The interface holding `address`.
fn interface_with(address: Ipv4Addr) -> Option<String> {
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills the list it allocates; freed below.
    if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cursor = addrs;
    while !cursor.is_null() {
        // SAFETY: a node of the list getifaddrs returned, not yet freed.
        let entry = unsafe { &*cursor };
        // SAFETY: ifa_addr, when not null, points at a sockaddr whose
        // family says its type.
        let matches = !entry.ifa_addr.is_null()
            && unsafe { (*entry.ifa_addr).sa_family } == libc::AF_INET as libc::sa_family_t
            && {
                // SAFETY: an AF_INET sockaddr is a sockaddr_in.
                let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)) == address
            };
        if matches {
            // SAFETY: ifa_name is a NUL-terminated name.
            let name = unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) };
            found = Some(name.to_string_lossy().into_owned());
            break;
        }
        cursor = entry.ifa_next;
    }
    // SAFETY: the list getifaddrs allocated, freed once.
    unsafe { libc::freeifaddrs(addrs) };
    found
}

/// The `dst` addresses of `vtep`'s forwarding table (`bridge fdb`):
/// silk-daemon writes one per other cell's lease.
fn fdb_peers(vtep: &str) -> Result<BTreeSet<Ipv4Addr>, String> {
    let out = std::process::Command::new("bridge")
        .args(["-j", "fdb", "show", "dev", vtep])
        .output()
        .map_err(|e| format!("cannot run `bridge fdb show` (iproute2): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "bridge fdb show dev {vtep}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    peers_in(&out.stdout)
}

fn peers_in(json: &[u8]) -> Result<BTreeSet<Ipv4Addr>, String> {
    let entries: Vec<serde_json::Value> =
        serde_json::from_slice(json).map_err(|e| format!("bridge fdb's JSON: {e}"))?;
    let mut peers = BTreeSet::new();
    for entry in entries {
        match entry.get("dst").and_then(|d| d.as_str()).map(str::parse::<Ipv4Addr>) {
            Some(Ok(addr)) => {
                peers.insert(addr);
            }
            Some(Err(_)) => warn!(%entry, "a forwarding entry whose dst is not IPv4: left out"),
            None => {}
        }
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cells_of_the_forwarding_table() {
        let fdb = br#"[{"mac":"ee:ee:0a:ff:d3:00","dst":"10.99.0.12","flags":["self"],"state":"permanent"},
            {"mac":"ee:ee:0a:ff:d4:00","dst":"10.99.0.13","flags":["self"],"state":"permanent"},
            {"mac":"00:00:00:00:00:00","flags":["self"],"state":"permanent"}]"#;
        assert_eq!(
            peers_in(fdb).unwrap(),
            BTreeSet::from([Ipv4Addr::new(10, 99, 0, 12), Ipv4Addr::new(10, 99, 0, 13)])
        );
        assert!(peers_in(b"not json").is_err());
        assert_eq!(interface_with(Ipv4Addr::new(192, 0, 2, 222)), None);
        assert!(interface_with(Ipv4Addr::LOCALHOST).is_some(), "lo holds 127.0.0.1");
    }
}
