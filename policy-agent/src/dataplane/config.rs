//! What the dataplane is loaded with: map capacities, what the programs
//! report, and the overlay network whose endpoints get array slots.

use std::{net::Ipv4Addr, path::PathBuf};

use policy_common::maps::{Settings, capacity, settings};

/// Map capacities (max_entries), fixed when the maps are first created.
/// Pinned maps keep the capacity they were created with.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Capacities {
    pub endpoints: u32,
    pub veths: u32,
    pub cgroups: u32,
    /// (source app, destination app, protocol) pairs.
    pub policies: u32,
    /// Pairs with three to eight port ranges.
    pub port_sets: u32,
    /// Pairs with more.
    pub port_sets_wide: u32,
    pub conntrack: u32,
    pub fragments: u32,
    /// Bytes of the flow event ring buffer (a power of two, at least a page).
    pub flow_events: u32,
    /// Destinations tracked by the denied-event rate limit.
    pub event_limits: u32,
    /// Policies with counters.
    pub policy_stats: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            endpoints: capacity::ENDPOINTS,
            veths: capacity::VETHS,
            cgroups: capacity::CGROUPS,
            policies: capacity::POLICIES,
            port_sets: capacity::PORT_SETS,
            port_sets_wide: capacity::PORT_SETS_WIDE,
            conntrack: capacity::CONNTRACK,
            fragments: capacity::FRAGMENTS,
            flow_events: capacity::FLOW_EVENTS,
            event_limits: capacity::EVENT_LIMITS,
            policy_stats: capacity::POLICY_STATS,
        }
    }
}

/// What the programs report as flow events.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventSettings {
    /// Report the first packet of each allowed connection.
    pub allowed: bool,
    /// Denied-packet events per destination address per second (0: none).
    pub denied_per_second: u32,
    /// Count packets and bytes per policy.
    pub policy_counters: bool,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self { allowed: true, denied_per_second: 100, policy_counters: true }
    }
}

impl EventSettings {
    /// Nothing reported, nothing counted per policy (benchmark floor).
    pub fn off() -> Self {
        Self { allowed: false, denied_per_second: 0, policy_counters: false }
    }

    fn flags(&self) -> u32 {
        let mut flags = 0;
        if self.allowed {
            flags |= settings::ALLOWED_EVENTS;
        }
        if self.policy_counters {
            flags |= settings::POLICY_COUNTERS;
        }
        flags
    }
}

/// What happens to a packet the policy denies (`deny_action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DenyAction {
    /// TCP gets a RST, UDP an ICMP port unreachable: the client fails at
    /// once ("connection refused"), as with Cloud Foundry's iptables REJECT.
    Reject,
    /// Dropped silently: the client waits out its timeout.
    Drop,
}

/// How denied packets are answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenySettings {
    pub action: DenyAction,
    /// Rejects sent to one sender address per second at most; denied
    /// packets past it are dropped unanswered.
    pub rejects_per_second: u32,
}

impl Default for DenySettings {
    fn default() -> Self {
        Self { action: DenyAction::Reject, rejects_per_second: 1000 }
    }
}

impl DenySettings {
    /// Every denied packet dropped silently.
    pub fn drop() -> Self {
        Self { action: DenyAction::Drop, ..Self::default() }
    }
}

#[derive(Clone, Debug)]
pub struct DataplaneConfig {
    /// Directory on bpffs for the pins (created, bpffs mounted if needed).
    pub pin_dir: PathBuf,
    pub capacities: Capacities,
    pub events: EventSettings,
    pub deny: DenySettings,
    /// The container network whose endpoints get array slots; None: every
    /// endpoint lookup hashes.
    pub overlay: Option<OverlayNetwork>,
}

impl DataplaneConfig {
    pub fn new(pin_dir: impl Into<PathBuf>) -> Self {
        Self {
            pin_dir: pin_dir.into(),
            capacities: Capacities::default(),
            events: EventSettings::default(),
            deny: DenySettings::default(),
            overlay: Some(OverlayNetwork::default()),
        }
    }

    /// The programs' `Config::settings`.
    pub fn kernel_settings(&self) -> Settings {
        kernel_settings(&self.events, &self.deny)
    }
}

/// The programs' `Config::settings` for what they report and how they deny.
pub fn kernel_settings(events: &EventSettings, deny: &DenySettings) -> Settings {
    let mut flags = events.flags() | settings::FLOW_CACHE;
    if deny.action == DenyAction::Reject {
        flags |= settings::REJECT;
    }
    Settings {
        flags,
        denied_events_per_second: events.denied_per_second,
        rejects_per_second: deny.rejects_per_second,
        _pad: 0,
    }
}

/// The container (overlay) network, as Cloud Foundry's silk configures it:
/// endpoints in it are found by an array index instead of a hash lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverlayNetwork {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Default for OverlayNetwork {
    /// Silk's default, 10.255.0.0/16.
    fn default() -> Self {
        Self { network: Ipv4Addr::new(10, 255, 0, 0), prefix: 16 }
    }
}

impl OverlayNetwork {
    /// The largest network with slots: /12 (a million slots, 8 MiB).
    pub const MIN_PREFIX: u8 = 12;

    /// `A.B.C.D/N`, N from 12 to 32, no host bits set.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) =
            text.split_once('/').ok_or_else(|| format!("{text:?} is not ADDRESS/PREFIX"))?;
        let network: Ipv4Addr =
            addr.parse().map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        let prefix: u8 =
            prefix.parse().map_err(|_| format!("{prefix:?} is not a prefix length"))?;
        if !(Self::MIN_PREFIX..=32).contains(&prefix) {
            return Err(format!(
                "prefix /{prefix} is out of range: /{} (a million addresses) to /32",
                Self::MIN_PREFIX
            ));
        }
        let host_bits = if prefix == 32 { 0 } else { u32::MAX >> prefix };
        if u32::from(network) & host_bits != 0 {
            return Err(format!(
                "{text} has host bits set (the network is {}/{prefix})",
                Ipv4Addr::from(u32::from(network) & !host_bits)
            ));
        }
        Ok(Self { network, prefix })
    }

    /// Addresses in the network.
    pub fn slots(&self) -> u32 {
        1u32 << (32 - u32::from(self.prefix))
    }
}

impl std::fmt::Display for OverlayNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}
