//! What the desired state is made of: policies, endpoints, and the platform
//! TLS ports the agent knows about.

use std::{
    borrow::Borrow,
    cmp::Ordering,
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Deref,
    path::PathBuf,
    sync::Arc,
};

use policy_common::maps::proto;
use serde::{Deserialize, Serialize};

/// The one domain internal routes live under.
pub use policy_api::wire::INTERNAL_DOMAIN;

/// An app's id, shared: the state interns the names it takes in (see
/// `State::intern`), so every policy and endpoint naming one app holds the
/// same allocation. A million policies between a thousand apps hold a
/// thousand names, not two million copies, and cloning a policy allocates
/// nothing. Compares, hashes and serializes as the text it holds.
///
/// The first eight bytes of the text are kept beside the pointer: two
/// names that differ there (nearly all, for app GUIDs) are ordered without
/// reading either text, which is most of what a search of a million
/// policies does. 16 bytes, as a `String` would be 24.
#[derive(Clone, Default)]
pub struct AppName {
    /// The text's first 8 bytes, big-endian, zero-padded. Where two
    /// prefixes differ they order the names as their texts do (a text
    /// that ends compares as if followed by zeros, and a zero byte is
    /// the least).
    prefix: u64,
    name: Arc<Box<str>>,
}

impl AppName {
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// Whether both hold the same allocation (interned: the same app).
    pub fn same(&self, other: &AppName) -> bool {
        Arc::ptr_eq(&self.name, &other.name)
    }

    fn new(text: &str) -> Self {
        let mut head = [0u8; 8];
        let n = text.len().min(8);
        head[..n].copy_from_slice(&text.as_bytes()[..n]);
        Self { prefix: u64::from_be_bytes(head), name: Arc::new(text.into()) }
    }
}

impl Deref for AppName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl AsRef<str> for AppName {
    fn as_ref(&self) -> &str {
        &self.name
    }
}

impl Borrow<str> for AppName {
    fn borrow(&self) -> &str {
        &self.name
    }
}

impl PartialEq for AppName {
    fn eq(&self, other: &Self) -> bool {
        self.prefix == other.prefix && (self.same(other) || self.name == other.name)
    }
}

impl Eq for AppName {}

impl std::hash::Hash for AppName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialOrd for AppName {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for AppName {
    fn cmp(&self, other: &Self) -> Ordering {
        match self.prefix.cmp(&other.prefix) {
            Ordering::Equal if self.same(other) => Ordering::Equal,
            Ordering::Equal => self.as_str().cmp(other.as_str()),
            unequal => unequal,
        }
    }
}

impl PartialEq<str> for AppName {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for AppName {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for AppName {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other.as_str()
    }
}

impl From<&str> for AppName {
    fn from(name: &str) -> Self {
        Self::new(name)
    }
}

impl From<String> for AppName {
    fn from(name: String) -> Self {
        Self::new(&name)
    }
}

impl From<&String> for AppName {
    fn from(name: &String) -> Self {
        Self::new(name)
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self)
    }
}

impl fmt::Debug for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for AppName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self)
    }
}

impl<'de> Deserialize<'de> for AppName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = AppName;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an app id")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<AppName, E> {
                Ok(AppName::from(v))
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// A policy's protocol (the CLI's `--protocol`, the API's
/// `destination.protocol`). `icmp` and `icmpv6` are our documented
/// extension (Cloud Foundry's policy server takes tcp and udp only): ICMP
/// allows IPv4's messages, ICMPv6 IPv6's (echo request is type 8 in one,
/// 128 in the other). TCP and UDP policies allow both families.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

impl Protocol {
    /// The IP protocol number, as the maps key it.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => proto::TCP,
            Protocol::Udp => proto::UDP,
            Protocol::Icmp => proto::ICMP,
            Protocol::Icmpv6 => proto::ICMPV6,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            proto::TCP => Some(Protocol::Tcp),
            proto::UDP => Some(Protocol::Udp),
            proto::ICMP => Some(Protocol::Icmp),
            proto::ICMPV6 => Some(Protocol::Icmpv6),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
            Protocol::Icmpv6 => "icmpv6",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "icmp" => Some(Protocol::Icmp),
            "icmpv6" => Some(Protocol::Icmpv6),
            _ => None,
        }
    }

    /// TCP and UDP: policies name destination ports. ICMP policies name a
    /// type and code instead.
    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }
}

/// The ICMP messages an icmp policy allows: a type (None: any) and a code
/// (None: any code of the type). Stored in the policy's `start..=end` as
/// the kernel matches ICMP messages: `type << 8 | code`
/// ([`policy_common::packet::icmp_port`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpTypes {
    pub icmp_type: Option<u8>,
    pub code: Option<u8>,
}

impl IcmpTypes {
    /// `start..=end` of a policy allowing these messages. A code without a
    /// type is not a set of messages: the caller refuses it first.
    pub fn range(self) -> (u16, u16) {
        use policy_common::packet::icmp_port;
        match (self.icmp_type, self.code) {
            (None, _) => (0, u16::MAX),
            (Some(t), None) => (icmp_port(t, 0), icmp_port(t, u8::MAX)),
            (Some(t), Some(c)) => (icmp_port(t, c), icmp_port(t, c)),
        }
    }

    /// The messages a policy's range stands for, if it is one [`Self::range`]
    /// makes.
    pub fn from_range(start: u16, end: u16) -> Option<Self> {
        let [t, c] = start.to_be_bytes();
        let all = Self { icmp_type: None, code: None };
        let of_type = Self { icmp_type: Some(t), code: None };
        let exact = Self { icmp_type: Some(t), code: Some(c) };
        [all, of_type, exact].into_iter().find(|m| m.range() == (start, end))
    }
}

/// One policy: `source` app may reach `destination` app on `protocol`,
/// destination ports `start..=end`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Policy {
    pub source: AppName,
    pub destination: AppName,
    pub protocol: Protocol,
    pub start: u16,
    pub end: u16,
    /// Allow only the TLS port fronting the app port, not the port itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls_only: bool,
}

/// A container instance, as a CNI plugin reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The endpoint's key: its IPv4 address, or its IPv6 address if it has
    /// no IPv4 one (an IPv6-only endpoint).
    pub ip: IpAddr,
    /// Its IPv6 address, if it has one (dual stack, or the same as `ip` on
    /// an IPv6-only endpoint). Policies are family-agnostic: they allow the
    /// app on both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Addr>,
    pub app: AppName,
    /// Host-side veth.
    pub ifname: String,
    /// The container's network namespace (a path such as /var/run/netns/X).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The host (cell) it runs on, in cluster mode; None on a single host.
    /// Only that host's agent attaches to its veth and serves its TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// NetIn: ports of the host's addresses that lead to the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_mappings: Vec<PortMapping>,
    /// Cloud Foundry: the container's space (garden's `space_id`), which
    /// picks its dynamic security groups (`enable_asg_syncing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub space_id: Option<String>,
    /// Cloud Foundry: `app`, `task` or `staging` (garden's
    /// `container_workload`), which picks its space's groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

/// One Application Security Group rule (garden's NetOutRule): egress to
/// destinations outside the overlay that it allows.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NetOutRule {
    pub protocol: NetOutProtocol,
    /// Inclusive address ranges; empty: none.
    pub networks: Vec<AddressRange>,
    /// Inclusive TCP/UDP destination port ranges; empty: any port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpan>,
    /// ICMP type and code (absent: any; code absent: any code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmps: Option<IcmpMatch>,
    /// Report the packets it allows.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub log: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetOutProtocol {
    All,
    Tcp,
    Udp,
    Icmp,
}

impl NetOutProtocol {
    /// The IP protocol number the kernel matches (0: all).
    pub fn number(self) -> u8 {
        match self {
            NetOutProtocol::All => 0,
            NetOutProtocol::Tcp => proto::TCP,
            NetOutProtocol::Udp => proto::UDP,
            NetOutProtocol::Icmp => 1,
        }
    }

    /// A protocol by its name in a security group rule: exactly `all`,
    /// `tcp`, `udp` or `icmp` (Cloud Foundry matches them so).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "all" => Some(NetOutProtocol::All),
            "tcp" => Some(NetOutProtocol::Tcp),
            "udp" => Some(NetOutProtocol::Udp),
            "icmp" => Some(NetOutProtocol::Icmp),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AddressRange {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortSpan {
    pub start: u16,
    pub end: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IcmpMatch {
    #[serde(rename = "type")]
    pub icmp_type: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u8>,
}

/// A NetIn port mapping (garden's `host_port` → `container_port`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

impl Policy {
    /// The ICMP messages an icmp policy allows (None for tcp and udp).
    pub fn icmp_types(&self) -> Option<IcmpTypes> {
        (!self.protocol.has_ports()).then(|| IcmpTypes::from_range(self.start, self.end))?
    }
}

impl Endpoint {
    /// Its IPv4 address, if it has one.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        match self.ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        }
    }

    /// Its addresses: IPv4 first, then IPv6.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ipv4().map(IpAddr::V4).into_iter().chain(self.ipv6.map(IpAddr::V6))
    }

    /// Whether the endpoint runs on `host` (the agent's own host; None:
    /// single-host mode, where every endpoint is local).
    pub fn runs_on(&self, host: Option<&str>) -> bool {
        host.is_none() || self.host.as_deref() == host
    }
}

/// A TLS port fronting an app port on every instance (Cloud Foundry's
/// `internal_tls_proxy` for `internal`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsFront {
    pub app_port: u16,
    pub tls_port: u16,
}

/// Platform TLS ports: the default front and per-app app ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPorts {
    pub default: TlsFront,
    /// App id → the app port its TLS listener forwards to, if not the default.
    pub per_app: BTreeMap<String, u16>,
}

/// Tags as the API shows them: zero-padded upper-case hex ("0001").
pub fn tag_text(tag: u32) -> String {
    format!("{tag:04X}")
}

#[cfg(test)]
impl Endpoint {
    /// An IPv4 endpoint 10.255.0.LAST of `app` on veth `hvLAST` (for tests).
    pub(crate) fn test(last: u8, app: &str) -> Self {
        Self {
            ip: IpAddr::from([10, 255, 0, last]),
            ipv6: None,
            app: app.into(),
            ifname: format!("hv{last}"),
            netns: None,
            host: None,
            port_mappings: Vec::new(),
            space_id: None,
            workload: None,
        }
    }
}

#[cfg(test)]
impl Policy {
    /// A TCP policy on one port (for tests).
    pub(crate) fn tcp(source: &str, destination: &str, port: u16) -> Self {
        Self {
            source: source.into(),
            destination: destination.into(),
            protocol: Protocol::Tcp,
            start: port,
            end: port,
            tls_only: false,
        }
    }
}
