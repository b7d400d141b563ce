//! NetOut, Cloud Foundry's Application Security Groups: egress from a
//! container to destinations outside the overlay, allowed only by its app's
//! rules. The agent turns each app's rules into an LPM trie keyed by (app
//! tag, destination prefix) whose value holds every rule covering that
//! prefix, so one trie lookup finds the rules that can apply to a packet
//! and a bounded scan of at most [`MAX_NETOUT_RULES`] decides it.

/// Rules one trie entry holds (rules covering one destination prefix).
pub const MAX_NETOUT_RULES: usize = 16;

/// Any ICMP type or code.
pub const ICMP_ANY: u8 = 0xff;

/// The data of a `NETOUT` trie key: the app's tag (big-endian, always
/// matched whole: prefix lengths are 32 + the address prefix) then the
/// destination address (wire order).
#[inline(always)]
pub const fn key_data(tag: u32, addr: u32) -> [u8; 8] {
    let t = tag.to_be_bytes();
    let a = addr.to_ne_bytes();
    [t[0], t[1], t[2], t[3], a[0], a[1], a[2], a[3]]
}

/// The prefix length of a key covering a destination prefix of `bits`.
pub const fn key_prefix(bits: u8) -> u32 {
    32 + bits as u32
}

/// One rule as the kernel matches it (its address ranges are in the key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct NetOutMatch {
    /// IP protocol number; 0: every protocol.
    pub protocol: u8,
    /// 1: report the packets it allows.
    pub log: u8,
    /// ICMP type and code ([`ICMP_ANY`]: any).
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// TCP/UDP destination ports, inclusive (0-0: any).
    pub port_start: u16,
    pub port_end: u16,
}
const _: () = assert!(size_of::<NetOutMatch>() == 8);

/// `NETOUT` value: the rules covering a prefix (`count` of them; 0: the
/// app has security groups and none covers this destination).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NetOutRules {
    pub count: u32,
    pub rules: [NetOutMatch; MAX_NETOUT_RULES],
}
const _: () = assert!(size_of::<NetOutRules>() == 4 + 8 * MAX_NETOUT_RULES);

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;

impl NetOutMatch {
    #[inline(always)]
    pub fn matches(&self, protocol: u8, dport: u16, icmp: (u8, u8)) -> bool {
        if self.protocol != 0 && self.protocol != protocol {
            return false;
        }
        match self.protocol {
            TCP | UDP => {
                (self.port_start == 0 && self.port_end == 0)
                    || (self.port_start <= dport && dport <= self.port_end)
            }
            ICMP => {
                (self.icmp_type == ICMP_ANY || self.icmp_type == icmp.0)
                    && (self.icmp_code == ICMP_ANY || self.icmp_code == icmp.1)
            }
            _ => true,
        }
    }
}

impl NetOutRules {
    /// Whether a rule allows the packet: Some(log) if one does (log: any
    /// allowing rule asks for reports), None if none does.
    #[inline(always)]
    pub fn allows(&self, protocol: u8, dport: u16, icmp: (u8, u8)) -> Option<bool> {
        let mut allowed = false;
        let mut log = false;
        let n = if (self.count as usize) < MAX_NETOUT_RULES {
            self.count as usize
        } else {
            MAX_NETOUT_RULES
        };
        for i in 0..MAX_NETOUT_RULES {
            if i >= n {
                break;
            }
            let rule = &self.rules[i];
            if rule.matches(protocol, dport, icmp) {
                allowed = true;
                log |= rule.log != 0;
            }
        }
        if allowed { Some(log) } else { None }
    }
}

/// 169.254.0.0/16 (wire order): the gateway, the agent's DNS: never NetOut's.
#[inline(always)]
pub fn is_link_local(addr: u32) -> bool {
    let [a, b, _, _] = addr.to_ne_bytes();
    a == 169 && b == 254
}

// SAFETY: `#[repr(C)]`, integers and arrays of integers only, no implicit
// padding (sizes asserted above): every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for NetOutRules {}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(protocol: u8, ports: (u16, u16), icmp: (u8, u8), log: u8) -> NetOutMatch {
        NetOutMatch {
            protocol,
            log,
            icmp_type: icmp.0,
            icmp_code: icmp.1,
            port_start: ports.0,
            port_end: ports.1,
        }
    }

    #[test]
    fn rules_match_protocol_ports_and_icmp_type() {
        let mut set = NetOutRules::default();
        set.rules[0] = rule(TCP, (443, 443), (0, 0), 1);
        set.rules[1] = rule(ICMP, (0, 0), (8, ICMP_ANY), 0);
        set.rules[2] = rule(UDP, (53, 53), (0, 0), 0);
        set.count = 3;
        assert_eq!(set.allows(TCP, 443, (0, 0)), Some(true), "logged rule");
        assert_eq!(set.allows(TCP, 444, (0, 0)), None);
        assert_eq!(set.allows(UDP, 53, (0, 0)), Some(false));
        assert_eq!(set.allows(UDP, 443, (0, 0)), None);
        assert_eq!(set.allows(ICMP, 0, (8, 0)), Some(false), "echo request");
        assert_eq!(set.allows(ICMP, 0, (13, 0)), None, "timestamp request");
        let all = NetOutRules { count: 1, rules: [rule(0, (0, 0), (0, 0), 0); MAX_NETOUT_RULES] };
        assert_eq!(all.allows(47, 0, (0, 0)), Some(false), "protocol all");
        assert_eq!(NetOutRules::default().allows(TCP, 443, (0, 0)), None, "no rule: denied");
        assert!(is_link_local(u32::from_ne_bytes([169, 254, 0, 1])));
        assert!(!is_link_local(u32::from_ne_bytes([192, 0, 2, 1])));
    }
}
