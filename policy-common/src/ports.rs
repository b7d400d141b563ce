//! Port ranges of one (source, destination, protocol) pair: building the
//! `POLICIES` value and looking a port up in it.
//!
//! The ranges are kept as the policies wrote them (they may overlap), sorted
//! by `start`. Each range also records `reach`, the highest `end` among itself
//! and every range before it. A port is allowed iff the last range with
//! `start <= port` has `reach >= port`: one binary search over at most
//! [`MAX_PORT_RANGES`] entries, whatever the ranges look like.

use crate::maps::{MAX_PORT_RANGES, PortRange, PortRules};

/// A range as a policy states it: `start..=end`, and the policy's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allowance {
    pub start: u16,
    pub end: u16,
    pub policy_id: u32,
}

/// Why a set of ranges cannot be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortsError {
    /// `start > end`.
    InvalidRange { start: u16, end: u16 },
    /// More distinct ranges than one pair can hold.
    TooManyRanges { limit: usize },
}

impl core::fmt::Display for PortsError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PortsError::InvalidRange { start, end } => write!(
                f,
                "invalid port range {start}-{end}: ports are 1-65535 and start must not exceed end"
            ),
            PortsError::TooManyRanges { limit } => write!(
                f,
                "more than {limit} distinct port ranges between one pair of apps for one protocol"
            ),
        }
    }
}

impl core::error::Error for PortsError {}

/// Iterations that always finish a binary search over `MAX_PORT_RANGES` items.
const SEARCH_STEPS: usize = (usize::BITS - MAX_PORT_RANGES.leading_zeros()) as usize;

impl PortRules {
    pub const EMPTY: PortRules = PortRules {
        len: 0,
        _pad: 0,
        ranges: [PortRange { start: 0, end: 0, reach: 0, reach_index: 0, _pad: 0, policy_id: 0 };
            MAX_PORT_RANGES],
    };

    /// Builds the value for a set of allowances. Identical ranges are stored
    /// once (under the lowest policy id).
    pub fn build(allowances: &[Allowance]) -> Result<PortRules, PortsError> {
        let mut rules = PortRules::EMPTY;
        let mut len = 0usize;
        for a in allowances {
            if a.start > a.end {
                return Err(PortsError::InvalidRange { start: a.start, end: a.end });
            }
            if let Some(same) =
                rules.ranges[..len].iter_mut().find(|r| r.start == a.start && r.end == a.end)
            {
                same.policy_id = same.policy_id.min(a.policy_id);
                continue;
            }
            if len == MAX_PORT_RANGES {
                return Err(PortsError::TooManyRanges { limit: MAX_PORT_RANGES });
            }
            rules.ranges[len] = PortRange {
                start: a.start,
                end: a.end,
                policy_id: a.policy_id,
                ..PortRange::default()
            };
            len += 1;
        }
        let ranges = &mut rules.ranges[..len];
        ranges.sort_unstable_by_key(|r| (r.start, r.end, r.policy_id));
        let mut reach = 0u16;
        let mut reach_index = 0u8;
        for (i, r) in ranges.iter_mut().enumerate() {
            if r.end > reach {
                reach = r.end;
                reach_index = i as u8;
            }
            r.reach = reach;
            r.reach_index = reach_index;
        }
        rules.len = len as u32;
        Ok(rules)
    }

    /// The allowances stored, in `start` order.
    pub fn allowances(&self) -> impl Iterator<Item = Allowance> + '_ {
        self.ranges[..(self.len as usize).min(MAX_PORT_RANGES)].iter().map(|r| Allowance {
            start: r.start,
            end: r.end,
            policy_id: r.policy_id,
        })
    }

    /// The policy allowing `port`, if any. Bounded: at most
    /// `SEARCH_STEPS` iterations, no matter what the map holds.
    #[inline(always)]
    pub fn find(&self, port: u16) -> Option<u32> {
        let len = self.len as usize;
        let (mut lo, mut hi) = (0usize, if len < MAX_PORT_RANGES { len } else { MAX_PORT_RANGES });
        // Find the number of ranges with start <= port.
        for _ in 0..SEARCH_STEPS {
            if lo >= hi {
                break;
            }
            let mid = (lo + hi) / 2;
            match self.ranges.get(mid) {
                Some(r) if r.start <= port => lo = mid + 1,
                Some(_) => hi = mid,
                None => return None,
            }
        }
        let last = self.ranges.get(lo.checked_sub(1)?)?;
        if last.reach < port {
            return None;
        }
        self.ranges.get(last.reach_index as usize).map(|r| r.policy_id)
    }

    /// Whether every port `other` allows is also allowed here (userspace:
    /// decides whether a change takes an allowance away).
    pub fn covers(&self, other: &PortRules) -> bool {
        other.allowances().all(|a| {
            let mut port = a.start;
            loop {
                // The furthest any range covering `port` reaches.
                let Some(end) = self
                    .allowances()
                    .filter(|r| r.start <= port && port <= r.end)
                    .map(|r| r.end)
                    .max()
                else {
                    return false;
                };
                if end >= a.end {
                    return true;
                }
                // end < a.end <= 65535: no overflow.
                port = end + 1;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(start: u16, end: u16, policy_id: u32) -> Allowance {
        Allowance { start, end, policy_id }
    }

    fn naive(allowances: &[Allowance], port: u16) -> bool {
        allowances.iter().any(|a| a.start <= port && port <= a.end)
    }

    #[test]
    fn edges_of_a_range() {
        let rules = PortRules::build(&[allow(8080, 8090, 7)]).unwrap();
        assert_eq!(rules.find(8079), None);
        assert_eq!(rules.find(8080), Some(7));
        assert_eq!(rules.find(8090), Some(7));
        assert_eq!(rules.find(8091), None);
    }

    #[test]
    fn full_port_space_and_extremes() {
        let rules = PortRules::build(&[allow(1, 65535, 1)]).unwrap();
        assert_eq!(rules.find(0), None);
        assert_eq!(rules.find(1), Some(1));
        assert_eq!(rules.find(65535), Some(1));
        let single = PortRules::build(&[allow(65535, 65535, 2)]).unwrap();
        assert_eq!(single.find(65534), None);
        assert_eq!(single.find(65535), Some(2));
    }

    #[test]
    fn overlapping_ranges_use_reach() {
        // A wide range early, then narrow ones after it: ports after the
        // narrow ones are still covered by the wide one.
        let rules =
            PortRules::build(&[allow(100, 1000, 1), allow(200, 210, 2), allow(300, 300, 3)])
                .unwrap();
        assert_eq!(rules.find(500), Some(1));
        assert_eq!(rules.find(205), Some(1));
        assert_eq!(rules.find(1001), None);
        assert_eq!(rules.find(99), None);
    }

    #[test]
    fn rejects_bad_ranges_and_overflow() {
        // 0 is a value like any other here (an icmp policy for echo
        // replies, type 0); TCP and UDP ports are checked by the agent.
        assert_eq!(PortRules::build(&[allow(0, 10, 1)]).unwrap().find(0), Some(1));
        assert_eq!(
            PortRules::build(&[allow(10, 9, 1)]),
            Err(PortsError::InvalidRange { start: 10, end: 9 })
        );
        let many: [Allowance; 17] =
            core::array::from_fn(|i| allow(i as u16 * 10 + 1, i as u16 * 10 + 1, i as u32));
        assert_eq!(
            PortRules::build(&many),
            Err(PortsError::TooManyRanges { limit: MAX_PORT_RANGES })
        );
        // Duplicates do not count twice.
        let dup: [Allowance; 20] = core::array::from_fn(|i| allow(5, 6, i as u32 + 3));
        let rules = PortRules::build(&dup).unwrap();
        assert_eq!(rules.len, 1);
        assert_eq!(rules.find(5), Some(3));
    }

    #[test]
    fn round_trips_allowances() {
        let input = [allow(9000, 9000, 4), allow(80, 81, 2)];
        let rules = PortRules::build(&input).unwrap();
        let mut out = [allow(0, 0, 0); 2];
        for (slot, a) in out.iter_mut().zip(rules.allowances()) {
            *slot = a;
        }
        assert_eq!(out, [allow(80, 81, 2), allow(9000, 9000, 4)]);
    }

    #[test]
    fn covers_subsets_only() {
        let wide = PortRules::build(&[allow(1, 100, 1), allow(200, 300, 2)]).unwrap();
        let narrow = PortRules::build(&[allow(50, 60, 3), allow(250, 250, 4)]).unwrap();
        let split = PortRules::build(&[allow(1, 50, 5), allow(51, 100, 6)]).unwrap();
        let outside = PortRules::build(&[allow(100, 200, 7)]).unwrap();
        assert!(wide.covers(&narrow));
        assert!(!narrow.covers(&wide));
        assert!(split.covers(&PortRules::build(&[allow(1, 100, 8)]).unwrap()));
        assert!(!wide.covers(&outside));
        assert!(wide.covers(&PortRules::EMPTY));
    }

    #[test]
    fn find_agrees_with_a_linear_scan_on_random_sets() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(0x5eed);
        for _ in 0..2000 {
            let n = rng.random_range(0..=MAX_PORT_RANGES);
            let set: [Allowance; MAX_PORT_RANGES] = core::array::from_fn(|i| {
                let start = rng.random_range(1..=200u16);
                let end = start + rng.random_range(0..40u16);
                allow(start, end, i as u32)
            });
            let rules = PortRules::build(&set[..n]).unwrap();
            for port in 0..=260u16 {
                let found = rules.find(port);
                assert_eq!(
                    found.is_some(),
                    naive(&set[..n], port),
                    "port {port} in {:?}",
                    &set[..n]
                );
                if let Some(id) = found {
                    let r = set[..n].iter().find(|a| a.policy_id == id).unwrap();
                    assert!(
                        r.start <= port && port <= r.end,
                        "attributed to a range not covering it"
                    );
                }
            }
        }
    }
}
