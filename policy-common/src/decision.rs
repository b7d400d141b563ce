//! The verdict for a packet, as a pure function of the parsed headers and the
//! map contents. The kernel programs call these functions with their maps
//! behind [`Lookups`]; the host tests call them with in-memory tables.

use crate::family::Family;
use crate::maps::{
    Attachment, Conn, ConnKey, EndpointValue, Ipv6Key, NO_IPV4, PairKey, PairPorts, PortRules,
    SmallPortSet, endpoint_flags, origin, proto,
};
use crate::packet::{Flow, Parsed, icmp_port};
use crate::verdict::{Reason, Verdict};

/// Read access to the maps the destination-side decision consults, for the
/// address family `A` (the IPv4 maps, or their IPv6 twins).
pub trait Lookups<A: Family = u32> {
    /// `ENDPOINTS[addr]` (`ENDPOINTS6`).
    fn endpoint(&self, addr: A) -> Option<EndpointValue>;
    /// `POLICIES[key]` (one map for both families: tags name apps).
    fn pair_ports(&self, key: &PairKey) -> Option<&PairPorts>;
    /// `PORT_SETS[key]`: the ranges of a pair with three to `SET_RANGES`.
    fn port_set(&self, key: &PairKey) -> Option<&SmallPortSet>;
    /// `PORT_SETS_WIDE[key]`: the ranges of a pair with more.
    fn wide_port_set(&self, key: &PairKey) -> Option<&PortRules>;
    /// `CONNTRACK[key]` (`CONNTRACK6`).
    fn conn(&self, key: &ConnKey<A>) -> Option<Conn>;
    /// `Config::epoch`.
    fn epoch(&self) -> u32;
    /// Whether `FRAGMENTS` (`FRAGMENTS6`) holds `key`.
    fn fragment_allowed(&self, key: &A::Fragment) -> bool;
}

/// A change the program makes to `CONNTRACK` along with its verdict:
/// `kind` (see [`conn_update`]) says which; `key` and `conn` are always set
/// (zero where unused). Not an enum with payloads: stored where a
/// decision's paths meet, the payload a variant lacks would be undefined on
/// its paths, and the kernel programs would read registers those paths never
/// set (the verifier refuses that, `!read_ok`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnUpdate<A = u32> {
    pub kind: u8,
    pub key: ConnKey<A>,
    pub conn: Conn,
}

/// [`ConnUpdate::kind`].
pub mod conn_update {
    pub const NONE: u8 = 0;
    /// Create the entry, or refresh it after a re-check.
    pub const INSERT: u8 = 1;
    /// The connection is no longer allowed (or no longer managed).
    pub const REMOVE: u8 = 2;
}

impl<A: Family> ConnUpdate<A> {
    #[inline(always)]
    pub fn none() -> Self {
        Self { kind: conn_update::NONE, key: ConnKey::default(), conn: Conn::default() }
    }

    #[inline(always)]
    pub fn insert(key: ConnKey<A>, conn: Conn) -> Self {
        Self { kind: conn_update::INSERT, key, conn }
    }

    #[inline(always)]
    pub fn remove(key: ConnKey<A>) -> Self {
        Self { kind: conn_update::REMOVE, key, conn: Conn::default() }
    }
}

/// The verdict and the map changes that go with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision<A: Family = u32> {
    pub verdict: Verdict,
    pub conn: ConnUpdate<A>,
    /// The first fragment of a datagram passed: let its later fragments pass.
    pub record_fragment: Option<A::Fragment>,
    /// The policy that allowed the packet (its connection's), 0 if none.
    pub policy_id: u32,
    /// App tags of the two ends, where the decision looked them up (new
    /// flows and denials); 0 otherwise.
    pub src_tag: u32,
    pub dst_tag: u32,
}

impl<A: Family> Decision<A> {
    /// A decision with no map effects.
    #[inline(always)]
    pub fn from_verdict(verdict: Verdict) -> Self {
        Self::just(verdict)
    }

    #[inline(always)]
    fn just(verdict: Verdict) -> Self {
        Self {
            verdict,
            conn: ConnUpdate::none(),
            record_fragment: None,
            policy_id: 0,
            src_tag: 0,
            dst_tag: 0,
        }
    }
}

impl<A: Family> ConnKey<A> {
    /// The connection a packet belongs to, and which end of it sent the packet.
    ///
    /// An ICMP query and its answer are one connection: the key holds the
    /// two addresses (lower first), the identifier as `port_lo`, and as
    /// `port_hi` the request's type and which address asked
    /// (`icmp_port(request, 1 if the lower one)`), whichever of the pair the
    /// packet is. So an echo request the other way with the same identifier
    /// is another exchange, and the key rebuilds the request
    /// ([`ConnKey::opening_flow`]) for a re-check. Only requests open
    /// exchanges (see [`Flow::opens_connection`]).
    #[inline(always)]
    pub fn of(flow: &Flow<A>) -> (ConnKey<A>, u32) {
        if flow.protocol == A::ICMP {
            let sender_is_lo = flow.saddr <= flow.daddr;
            let port_hi = match A::icmp_query((flow.dport >> 8) as u8) {
                Some(q) => icmp_port(q.request, (sender_is_lo != q.is_reply) as u8),
                None => flow.dport,
            };
            let (addr_lo, addr_hi, side) = if sender_is_lo {
                (flow.saddr, flow.daddr, origin::LO)
            } else {
                (flow.daddr, flow.saddr, origin::HI)
            };
            let key = ConnKey {
                addr_lo,
                addr_hi,
                port_lo: flow.sport,
                port_hi,
                protocol: u32::from(A::ICMP),
            };
            return (key, side);
        }
        let sender_is_lo = (flow.saddr, flow.sport) <= (flow.daddr, flow.dport);
        let (addr_lo, port_lo, addr_hi, port_hi, side) = if sender_is_lo {
            (flow.saddr, flow.sport, flow.daddr, flow.dport, origin::LO)
        } else {
            (flow.daddr, flow.dport, flow.saddr, flow.sport, origin::HI)
        };
        let key =
            ConnKey { addr_lo, addr_hi, port_lo, port_hi, protocol: u32::from(flow.protocol) };
        (key, side)
    }

    /// The first packet of the connection, as the end `origin` sent it.
    #[inline(always)]
    pub fn opening_flow(&self, origin: u32) -> Flow<A> {
        if self.protocol == u32::from(A::ICMP) {
            let (saddr, daddr) = if origin == origin::LO {
                (self.addr_lo, self.addr_hi)
            } else {
                (self.addr_hi, self.addr_lo)
            };
            let (sport, dport) = (self.port_lo, self.port_hi & 0xff00);
            return Flow { saddr, daddr, sport, dport, protocol: A::ICMP };
        }
        let (saddr, sport, daddr, dport) = if origin == origin::LO {
            (self.addr_lo, self.port_lo, self.addr_hi, self.port_hi)
        } else {
            (self.addr_hi, self.port_hi, self.addr_lo, self.port_lo)
        };
        Flow { saddr, daddr, sport, dport, protocol: self.protocol as u8 }
    }
}

/// Result of checking one flow against the policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Source or destination is not a registered endpoint.
    Unmanaged,
    /// Allowed by `policy_id`.
    Allowed { policy_id: u32, src_tag: u32, dst_tag: u32 },
    /// Both ends are endpoints; no policy allows it.
    Denied { src_tag: u32, dst_tag: u32 },
}

/// Checks a new flow: (source app tag, destination app tag, protocol) selects
/// the pair's port ranges; the destination port must fall in one of them.
#[inline(always)]
pub fn check_flow<A: Family, T: Lookups<A>>(tables: &T, flow: &Flow<A>) -> Check {
    let Some(dst) = tables.endpoint(flow.daddr) else {
        return Check::Unmanaged;
    };
    let Some(src) = tables.endpoint(flow.saddr) else {
        return Check::Unmanaged;
    };
    let key = PairKey::new(src.tag, dst.tag, flow.protocol);
    let (src_tag, dst_tag) = (src.tag, dst.tag);
    // One lookup for a pair with up to two ranges, two for one with more
    // (in `PORT_SETS` or `PORT_SETS_WIDE`).
    // ICMP's "port" is its type and code (`icmp_port`).
    let allowed = tables.pair_ports(&key).and_then(|pair| {
        pair.find(flow.dport, || tables.port_set(&key), || tables.wide_port_set(&key))
    });
    match allowed {
        Some(policy_id) => Check::Allowed { policy_id, src_tag, dst_tag },
        None => Check::Denied { src_tag, dst_tag },
    }
}

/// Destination side (TC egress of the host-side veth, cgroup_skb ingress):
/// the policy decision for a packet about to enter an endpoint.
///
/// Precedence, first match wins:
/// 1. not an IP packet of this family → pass (ARP; for the IPv4 programs an
///    IPv6 packet, which the same decision decides with `A` = IPv6 in the
///    IPv6 programs); IPv6 link plumbing that stays on the link (neighbour
///    discovery, router solicitation, MLD) → pass;
/// 2. malformed IP/L4 headers → drop;
/// 3. a tracked connection checked at the current epoch → pass (established
///    or reply); one checked at an older epoch is checked again now and
///    refreshed, or removed and dropped (the policy that allowed it is gone);
/// 4. either end not a registered endpoint → pass (not container-to-container);
/// 5. a policy (source tag, destination tag, protocol) with a range holding the
///    destination port → pass and track the connection;
/// 6. otherwise → drop.
///
/// Later fragments pass iff their first fragment passed (4 still applies);
/// ICMP errors pass iff they quote a tracked connection between their own
/// two ends (see [`decide_icmp_error`]).
#[inline(always)]
pub fn decide_destination<A: Family, T: Lookups<A>>(tables: &T, parsed: &Parsed<A>) -> Decision<A> {
    // Read the epoch before any policy lookup: the agent removes policies
    // first and bumps the epoch second, so a connection recorded with this
    // epoch was checked against rules at least as new as the epoch.
    let epoch = tables.epoch();
    match *parsed {
        Parsed::OtherFamily => Decision::just(Verdict::Pass(Reason::NotIp)),
        Parsed::LinkControl => Decision::just(Verdict::Pass(Reason::LinkControl)),
        Parsed::Malformed => Decision::just(Verdict::Drop(Reason::Malformed)),
        Parsed::LaterFragment(key) => {
            let (saddr, daddr) = A::fragment_ends(&key);
            if tables.endpoint(daddr).is_none() || tables.endpoint(saddr).is_none() {
                Decision::just(Verdict::Pass(Reason::Unmanaged))
            } else if tables.fragment_allowed(&key) {
                Decision::just(Verdict::Pass(Reason::Fragment))
            } else {
                Decision::just(Verdict::Drop(Reason::FragmentUnknown))
            }
        }
        Parsed::IcmpError { saddr, daddr, about } => {
            Decision::just(decide_icmp_error(tables, epoch, saddr, daddr, about))
        }
        Parsed::Flow { flow, fragment } => decide_flow(tables, epoch, &flow, fragment),
    }
}

/// An ICMP error from `saddr` to `daddr` quoting the datagram `about`. What
/// it claims (that `about` met trouble on its way) is believed only from
/// where such an error can come from: it goes back to the quoted datagram's
/// sender, and comes from that datagram's destination or from a router on
/// its path, which is never an endpoint (the host's gateway address, a
/// router beyond the host for traffic leaving the overlay). Containers
/// cannot forge those addresses (the source side's anti-spoofing check;
/// another host's containers, that host's).
///
/// 1. `daddr` is not the quoted datagram's source → drop (spoofed: it
///    quotes someone else's packet, a way to carry data past the policy);
/// 2. `saddr` is an endpoint other than the quoted datagram's destination
///    → drop (spoofed: an endpoint speaking for another's connection);
/// 3. the quoted connection is tracked at the current epoch → pass;
/// 4. either end is not an endpoint → pass (unmanaged: a router's error,
///    or nothing here to protect);
/// 5. otherwise → drop (no policy: two endpoints with no connection).
///
/// Values only, and the lookups in the order the checks need them: in the
/// kernel programs the decision's stack frame is near the 512-byte limit.
#[inline(always)]
pub fn decide_icmp_error<A: Family, T: Lookups<A>>(
    tables: &T,
    epoch: u32,
    saddr: A,
    daddr: A,
    about: Flow<A>,
) -> Verdict {
    if about.saddr != daddr || (saddr != about.daddr && tables.endpoint(saddr).is_some()) {
        Verdict::Drop(Reason::Spoofed)
    } else if tables.conn(&ConnKey::of(&about).0).is_some_and(|conn| conn.epoch == epoch) {
        Verdict::Pass(Reason::Related)
    } else if tables.endpoint(daddr).is_none() || tables.endpoint(saddr).is_none() {
        Verdict::Pass(Reason::Unmanaged)
    } else {
        Verdict::Drop(Reason::NoPolicy)
    }
}

#[inline(always)]
fn decide_flow<A: Family, T: Lookups<A>>(
    tables: &T,
    epoch: u32,
    flow: &Flow<A>,
    fragment: Option<A::Fragment>,
) -> Decision<A> {
    let (key, side) = ConnKey::of(flow);
    if let Some(conn) = tables.conn(&key) {
        if conn.origin & origin::REJECTED != 0 {
            if side != conn.origin & origin::END {
                // The reject itself (sent from this end's address).
                return Decision {
                    conn: ConnUpdate::remove(key),
                    ..Decision::just(Verdict::Pass(Reason::Related))
                };
            }
            // The rejected end tries again: decided afresh.
            return decide_new(tables, epoch, flow, key, side, fragment);
        }
        let end = conn.origin & origin::END;
        let reason = if side == end { Reason::Established } else { Reason::Reply };
        // One decided by another cell (`track_outgoing`) has nothing here
        // to be checked against again: it holds at any epoch.
        if conn.epoch == epoch || conn.origin & origin::DECIDED_ELSEWHERE != 0 {
            return Decision {
                verdict: Verdict::Pass(reason),
                record_fragment: fragment,
                policy_id: conn.policy_id,
                ..Decision::just(Verdict::Pass(reason))
            };
        }
        return match check_flow(tables, &key.opening_flow(end)) {
            Check::Allowed { policy_id, src_tag, dst_tag } => Decision {
                verdict: Verdict::Pass(reason),
                conn: ConnUpdate::insert(key, Conn { epoch, policy_id, ..conn }),
                record_fragment: fragment,
                policy_id,
                src_tag,
                dst_tag,
            },
            Check::Unmanaged => Decision {
                conn: ConnUpdate::remove(key),
                ..Decision::just(Verdict::Pass(Reason::Unmanaged))
            },
            Check::Denied { src_tag, dst_tag } => Decision {
                conn: ConnUpdate::remove(key),
                src_tag,
                dst_tag,
                ..Decision::just(Verdict::Drop(Reason::Revoked))
            },
        };
    }
    decide_new(tables, epoch, flow, key, side, fragment)
}

/// A flow with no tracked connection: the policy decides.
#[inline(always)]
fn decide_new<A: Family, T: Lookups<A>>(
    tables: &T,
    epoch: u32,
    flow: &Flow<A>,
    key: ConnKey<A>,
    side: u32,
    fragment: Option<A::Fragment>,
) -> Decision<A> {
    match check_flow(tables, flow) {
        Check::Unmanaged => Decision::just(Verdict::Pass(Reason::Unmanaged)),
        Check::Allowed { policy_id, src_tag, dst_tag } => Decision {
            verdict: Verdict::Pass(Reason::NewAllowed),
            conn: if flow.opens_connection() {
                ConnUpdate::insert(
                    key,
                    Conn { epoch, policy_id, origin: side, pending_packets: 0, pending_bytes: 0 },
                )
            } else {
                ConnUpdate::none()
            },
            record_fragment: fragment,
            policy_id,
            src_tag,
            dst_tag,
        },
        Check::Denied { src_tag, dst_tag } => {
            Decision { src_tag, dst_tag, ..Decision::just(Verdict::Drop(Reason::NoPolicy)) }
        }
    }
}

/// The flow of a denied packet that is answered with a reject when rejects
/// are on: TCP and UDP packets that no policy allows (`no_policy`) or whose
/// connection lost its policy (`revoked`). Not answered: ICMP (no error
/// about ICMP), later fragments, malformed packets, spoofed sources (an
/// answer would go to the forged address), and security-group denials. The
/// program also leaves TCP RSTs unanswered, as every TCP stack does.
#[inline(always)]
pub fn rejectable<A: Family>(parsed: &Parsed<A>, verdict: Verdict) -> Option<Flow<A>> {
    // Integer compares (see `Verdict::reason`): no enum compare in BPF.
    let reason = verdict.reason() as u32;
    if verdict.is_pass() || (reason != Reason::NoPolicy as u32 && reason != Reason::Revoked as u32)
    {
        return None;
    }
    match *parsed {
        Parsed::Flow { flow, .. } if flow.protocol == proto::TCP || flow.protocol == proto::UDP => {
            Some(flow)
        }
        _ => None,
    }
}

/// The `CONNTRACK` entry recorded when a reject is sent for `flow`: it
/// lets the reject, and nothing else, pass where it enters the sender (see
/// [`origin::REJECTED`]).
#[inline(always)]
pub fn reject_entry<A: Family>(flow: &Flow<A>, epoch: u32) -> (ConnKey<A>, Conn) {
    let (key, side) = ConnKey::of(flow);
    let conn = Conn {
        epoch,
        policy_id: 0,
        origin: side | origin::REJECTED,
        pending_packets: 0,
        pending_bytes: 0,
    };
    (key, conn)
}

/// The lookups for a packet that arrived through the cluster's tunnel: its
/// source is the app whose tag the sending host wrote into the tunnel header
/// (after that host's anti-spoofing check), whatever the endpoint map says
/// of the address; every other lookup is the map's. Replies and re-checks of
/// a tracked connection see the same identity, as the sender's host put it
/// on every packet.
pub struct TunnelSource<'a, L, A = u32> {
    pub lookups: &'a L,
    /// The packet's source address (wire order).
    pub saddr: A,
    /// The tag from the tunnel header; 0: none (not from the tunnel, or no
    /// identity in its header), and the map decides.
    pub tag: u32,
}

impl<A: Family, L: Lookups<A>> Lookups<A> for TunnelSource<'_, L, A> {
    #[inline(always)]
    fn endpoint(&self, addr: A) -> Option<EndpointValue> {
        if self.tag != 0 && addr == self.saddr {
            return Some(EndpointValue { tag: self.tag, flags: 0 });
        }
        self.lookups.endpoint(addr)
    }
    #[inline(always)]
    fn pair_ports(&self, key: &PairKey) -> Option<&PairPorts> {
        self.lookups.pair_ports(key)
    }
    #[inline(always)]
    fn port_set(&self, key: &PairKey) -> Option<&SmallPortSet> {
        self.lookups.port_set(key)
    }
    #[inline(always)]
    fn wide_port_set(&self, key: &PairKey) -> Option<&PortRules> {
        self.lookups.wide_port_set(key)
    }
    #[inline(always)]
    fn conn(&self, key: &ConnKey<A>) -> Option<Conn> {
        self.lookups.conn(key)
    }
    #[inline(always)]
    fn epoch(&self) -> u32 {
        self.lookups.epoch()
    }
    #[inline(always)]
    fn fragment_allowed(&self, key: &A::Fragment) -> bool {
        self.lookups.fragment_allowed(key)
    }
}

/// The source address of a parsed packet, if it has one.
#[inline(always)]
pub fn source_address<A: Family>(parsed: &Parsed<A>) -> Option<A> {
    match *parsed {
        Parsed::OtherFamily | Parsed::Malformed | Parsed::LinkControl => None,
        Parsed::Flow { flow, .. } => Some(flow.saddr),
        Parsed::LaterFragment(key) => Some(A::fragment_ends(&key).0),
        Parsed::IcmpError { saddr, .. } => Some(saddr),
    }
}

/// What the source side does about a packet to another host's endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outgoing<A = u32> {
    pub conn: ConnUpdate<A>,
    /// No policy allows this opening: this host decides, as the other host
    /// would (same policies), and drops it here — answered with a reject
    /// where rejects are on — so the decision is recorded where it is made.
    pub denied: bool,
    /// The two ends' app tags, where `denied` (for its report).
    pub src_tag: u32,
    pub dst_tag: u32,
}

/// Source side, cluster mode: a packet a local container sends to an
/// endpoint on another host opens (or continues) a connection that the
/// other host checks against policy; its replies come back to a host that
/// has no record of it. So the connection is recorded here too, when a
/// policy allows it from this side (the same check the other host makes),
/// and its replies come in as replies. Only allowed openings are recorded:
/// a packet the local end sends on a connection the other end opened (or
/// after the policy went) records nothing, so it can never turn the other
/// end's packets into "replies". The epoch makes a reply after a policy
/// change check the opening flow again, as for local connections. An
/// opening no policy allows is `denied` (the entry of a reject sent for it
/// does not count as tracked).
///
/// On CF's silk overlay (`other_cell`: the address is another cell's
/// container) the remote container is known by address only — the policy
/// server names apps — so this host cannot check the opening: the other
/// cell's agent does, as vxlan-policy-agent's cells do. An opening from
/// one of this host's endpoints is recorded as decided there
/// ([`origin::DECIDED_ELSEWHERE`], no policy id), so its replies come in
/// as replies; a policy change here does not re-check it (it holds at any
/// epoch, until conntrack forgets it).
#[inline(always)]
pub fn track_outgoing<A: Family, T: Lookups<A>>(
    tables: &T,
    parsed: &Parsed<A>,
    other_cell: impl Fn(A) -> bool,
) -> Outgoing<A> {
    let nothing = Outgoing { conn: ConnUpdate::none(), denied: false, src_tag: 0, dst_tag: 0 };
    let Parsed::Flow { flow, .. } = *parsed else { return nothing };
    let elsewhere = match tables.endpoint(flow.daddr) {
        Some(e) if e.flags & endpoint_flags::REMOTE != 0 => false,
        Some(_) => return nothing,
        None if other_cell(flow.daddr) && tables.endpoint(flow.saddr).is_some() => true,
        None => return nothing,
    };
    let (key, side) = ConnKey::of(&flow);
    if !flow.opens_connection() {
        return nothing;
    }
    if tables.conn(&key).is_some_and(|c| c.origin & origin::REJECTED == 0) {
        return nothing;
    }
    if elsewhere {
        let conn = Conn {
            epoch: tables.epoch(),
            policy_id: 0,
            origin: side | origin::DECIDED_ELSEWHERE,
            pending_packets: 0,
            pending_bytes: 0,
        };
        return Outgoing { conn: ConnUpdate::insert(key, conn), ..nothing };
    }
    match check_flow(tables, &flow) {
        Check::Allowed { policy_id, .. } => Outgoing {
            conn: ConnUpdate::insert(
                key,
                Conn {
                    epoch: tables.epoch(),
                    policy_id,
                    origin: side,
                    pending_packets: 0,
                    pending_bytes: 0,
                },
            ),
            ..nothing
        },
        Check::Denied { src_tag, dst_tag } => {
            Outgoing { conn: ConnUpdate::none(), denied: true, src_tag, dst_tag }
        }
        Check::Unmanaged => nothing,
    }
}

/// Underlay side (TC ingress of the underlay interface, cluster mode): a
/// tunnel packet (UDP to the tunnel `port`) is accepted only from a host of
/// the cluster (`is_peer`), by its source address: the underlay is trusted
/// as far as source addresses go (no authenticated overlay on this
/// kernel), as silk's is. Everything else passes untouched.
#[inline(always)]
pub fn decide_underlay(parsed: &Parsed, port: u16, is_peer: impl Fn(u32) -> bool) -> Verdict {
    match *parsed {
        Parsed::Flow { flow, .. }
            if flow.protocol == crate::maps::proto::UDP && flow.dport == port =>
        {
            if is_peer(flow.saddr) {
                Verdict::Pass(Reason::SourceVerified)
            } else {
                Verdict::Drop(Reason::Spoofed)
            }
        }
        _ => Verdict::Pass(Reason::Unmanaged),
    }
}

/// The cluster's tunnel as the source side sees it: a container's packet
/// to its UDP `port` at an address that is no endpoint reaches a VXLAN
/// socket (the kernel's listens on every local address, and another host's
/// takes what this host's masquerade sends it from the host's own address),
/// which would decapsulate it and believe the app tag in its header. So no
/// container may send one: tunnel headers come from the host's VXLAN device
/// only. `port` 0: no tunnel (a single host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelPort(pub u16);

impl TunnelPort {
    /// Whether `parsed` is a datagram to the tunnel port of an address that
    /// is not an endpoint (endpoints get it as any datagram, by policy).
    #[inline(always)]
    pub fn aimed_at<A: Family, T: Lookups<A>>(self, tables: &T, parsed: &Parsed<A>) -> bool {
        match *parsed {
            Parsed::Flow { flow, .. } => {
                self.0 != 0
                    && flow.protocol == proto::UDP
                    && flow.dport == self.0
                    && tables.endpoint(flow.daddr).is_none()
            }
            _ => false,
        }
    }
}

/// Source side (TC ingress of the host-side veth, cgroup_skb egress): the
/// anti-spoofing check. `own` is the endpoint behind this interface or cgroup.
///
/// 1. not IPv4 → pass; 2. malformed → drop; 3. no endpoint here → pass;
/// 4. a datagram to the tunnel port of a non-endpoint (see [`TunnelPort`])
///    → drop (spoofed: a tunnel header claims an app);
/// 5. source address is the endpoint's → pass; 6. otherwise → drop (spoofed).
///
/// An IPv6-only endpoint has no IPv4 address ([`NO_IPV4`]): all its IPv4
/// packets are dropped.
#[inline(always)]
pub fn decide_source<T: Lookups>(
    tables: &T,
    parsed: &Parsed,
    own: Option<Attachment>,
    tunnel: TunnelPort,
) -> Verdict {
    let saddr = match *parsed {
        Parsed::OtherFamily | Parsed::LinkControl => return Verdict::Pass(Reason::NotIp),
        Parsed::Malformed => return Verdict::Drop(Reason::Malformed),
        Parsed::Flow { flow, .. } => flow.saddr,
        Parsed::LaterFragment(key) => key.saddr,
        Parsed::IcmpError { saddr, .. } => saddr,
    };
    match own {
        None => Verdict::Pass(Reason::Unmanaged),
        Some(_) if tunnel.aimed_at(tables, parsed) => Verdict::Drop(Reason::Spoofed),
        Some(own) if own.addr == saddr && saddr != NO_IPV4 => Verdict::Pass(Reason::SourceVerified),
        Some(_) => Verdict::Drop(Reason::Spoofed),
    }
}

/// The IPv6 anti-spoofing check. `own` is the IPv6 address of the endpoint
/// behind this interface; `Ipv6Key::default()` (::, which nothing sends
/// from) for an endpoint without one, so that its IPv6 packets are dropped.
///
/// 1. not IPv6 → pass;
/// 2. link plumbing (neighbour discovery, router solicitation, MLD) that
///    stays on the link → pass (the parser gives `LinkControl` only to
///    messages from a link-local or unspecified source to a link-local or
///    multicast destination, which the host never forwards; every other
///    such message is a flow, checked as any other below);
/// 3. malformed → drop;
/// 4. no endpoint here → pass;
/// 5. a datagram to the tunnel port of a non-endpoint → drop (spoofed);
/// 6. source address is the endpoint's → pass;
/// 7. a link-local source to a link-scoped destination (traffic with the
///    host on the link) → pass;
/// 8. otherwise → drop (spoofed).
#[inline(always)]
pub fn decide_source6<T: Lookups<Ipv6Key>>(
    tables: &T,
    parsed: &Parsed<Ipv6Key>,
    own: Option<Ipv6Key>,
    tunnel: TunnelPort,
) -> Verdict {
    let (saddr, daddr) = match *parsed {
        Parsed::OtherFamily => return Verdict::Pass(Reason::NotIp),
        Parsed::LinkControl => return Verdict::Pass(Reason::LinkControl),
        Parsed::Malformed => return Verdict::Drop(Reason::Malformed),
        Parsed::Flow { flow, .. } => (flow.saddr, flow.daddr),
        Parsed::LaterFragment(key) => (key.saddr, key.daddr),
        Parsed::IcmpError { saddr, daddr, .. } => (saddr, daddr),
    };
    match own {
        None => Verdict::Pass(Reason::Unmanaged),
        Some(_) if tunnel.aimed_at(tables, parsed) => Verdict::Drop(Reason::Spoofed),
        Some(own) if own == saddr && !saddr.is_unspecified() => {
            Verdict::Pass(Reason::SourceVerified)
        }
        Some(_) if saddr.is_link_local() && daddr.is_link_scoped() => {
            Verdict::Pass(Reason::Unmanaged)
        }
        Some(_) => Verdict::Drop(Reason::Spoofed),
    }
}

#[cfg(test)]
mod tests;
