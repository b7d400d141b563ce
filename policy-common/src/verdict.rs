//! Verdicts and the reasons for them. `VERDICTS` (per-CPU) counts packets by
//! [`Reason`]; the index of a reason is its discriminant.

/// Why a packet passed or was dropped.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Neither IPv4 nor IPv6 (ARP, LLDP, ...): outside the scope of the
    /// policy.
    NotIp = 0,
    /// IPv4, but not between two registered endpoints (the host itself, an
    /// unregistered address, an interface with no endpoint).
    Unmanaged = 1,
    /// Source side: the source address is the endpoint's own.
    SourceVerified = 2,
    /// Destination side: a packet in the direction the connection was opened.
    Established = 3,
    /// Destination side: a packet of an allowed connection, coming back.
    Reply = 4,
    /// Destination side: first packet of a connection a policy allows.
    NewAllowed = 5,
    /// A later fragment of a datagram whose first fragment was allowed.
    Fragment = 6,
    /// An ICMP error about an allowed connection, or the reject (TCP RST,
    /// ICMP unreachable) the programs sent for a denied one.
    Related = 7,
    /// Destination side: no policy allows this source app, protocol and port.
    NoPolicy = 8,
    /// A packet claims what it is not: a source address not the endpoint's
    /// (source side), a container's datagram to the cluster's tunnel port,
    /// a tunnel packet from outside the cluster, an ICMP error between
    /// addresses that are not the ends of the connection it quotes.
    Spoofed = 9,
    /// An IPv4 header (or the TCP/UDP/ICMP header after it) that is cut short
    /// or inconsistent; the kernel's IP stack would drop it too.
    Malformed = 10,
    /// A later fragment whose first fragment was not seen or not allowed.
    FragmentUnknown = 11,
    /// A packet of a tracked connection whose policy has since been removed.
    Revoked = 12,
    /// Leaving the overlay, allowed by a security group rule marked `log`.
    AsgAllowed = 13,
    /// Leaving the overlay, allowed by no security group rule of its app.
    AsgDenied = 14,
    /// IPv6 link plumbing: neighbour discovery, router solicitation and
    /// advertisement, multicast listener messages (always passed).
    LinkControl = 15,
}

impl Reason {
    /// Number of reasons: the size of the `VERDICTS` array.
    pub const COUNT: u32 = 16;

    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::NotIp,
        Reason::Unmanaged,
        Reason::SourceVerified,
        Reason::Established,
        Reason::Reply,
        Reason::NewAllowed,
        Reason::Fragment,
        Reason::Related,
        Reason::NoPolicy,
        Reason::Spoofed,
        Reason::Malformed,
        Reason::FragmentUnknown,
        Reason::Revoked,
        Reason::AsgAllowed,
        Reason::AsgDenied,
        Reason::LinkControl,
    ];

    /// Stable lower-case name, used in metrics and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::NotIp => "not_ip",
            Reason::Unmanaged => "unmanaged",
            Reason::SourceVerified => "source_verified",
            Reason::Established => "established",
            Reason::Reply => "reply",
            Reason::NewAllowed => "new_allowed",
            Reason::Fragment => "fragment",
            Reason::Related => "related",
            Reason::NoPolicy => "no_policy",
            Reason::Spoofed => "spoofed",
            Reason::Malformed => "malformed",
            Reason::FragmentUnknown => "fragment_unknown",
            Reason::Revoked => "revoked",
            Reason::AsgAllowed => "asg_allowed",
            Reason::AsgDenied => "asg_denied",
            Reason::LinkControl => "link_control",
        }
    }

    /// Whether packets counted under this reason were passed.
    pub const fn passes(self) -> bool {
        (self as u32) < (Reason::NoPolicy as u32)
            || matches!(self, Reason::AsgAllowed | Reason::LinkControl)
    }
}

/// What to do with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass(Reason),
    Drop(Reason),
}

impl Verdict {
    pub const fn reason(self) -> Reason {
        match self {
            Verdict::Pass(r) | Verdict::Drop(r) => r,
        }
    }

    pub const fn is_pass(self) -> bool {
        matches!(self, Verdict::Pass(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_dense_and_split_pass_from_drop() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        assert!(Reason::Related.passes());
        assert!(!Reason::NoPolicy.passes());
        assert!(!Reason::Revoked.passes());
        assert!(Reason::AsgAllowed.passes());
        assert!(!Reason::AsgDenied.passes());
        assert!(Reason::LinkControl.passes());
    }
}
