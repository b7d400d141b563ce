//! Port ranges of one (source, destination, protocol) pair: the `POLICIES`
//! and `PORT_SETS` values, building them and looking a port up in them.
//!
//! A pair with up to two ranges holds them in its 24-byte `POLICIES` value.
//! A pair with more keeps them in `PORT_SETS`, as the policies wrote them (they may
//! overlap), sorted by `start`. Each range there also records `reach`, the
//! highest `end` among itself and every range before it. A port is allowed
//! iff the last range with `start <= port` has `reach >= port`: one binary
//! search over at most [`MAX_PORT_RANGES`] entries, whatever the ranges look
//! like.

use crate::hint::opaque;

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

/// `POLICIES` and `PORT_SETS` key: one per (source app, destination app,
/// protocol).
///
/// No field is wildcarded: a policy always names both apps and a protocol.
/// Ports are not part of the key; they are ranges inside the value, so the
/// lookup is one hash lookup (two for a pair with several ranges) plus a
/// bounded search whatever the number of policies.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PairKey {
    /// Tag of the source app.
    pub src_tag: u32,
    /// Tag of the destination app.
    pub dst_tag: u32,
    /// IP protocol number ([`proto::TCP`] or [`proto::UDP`]), widened to
    /// 32 bits so that the key has no padding to zero on the fast path.
    pub protocol: u32,
}
const _: () = assert!(size_of::<PairKey>() == 12);

impl PairKey {
    pub const fn new(src_tag: u32, dst_tag: u32, protocol: u8) -> Self {
        Self { src_tag, dst_tag, protocol: protocol as u32 }
    }
}

/// Most distinct port ranges one (source, destination, protocol) pair
/// holds: a `PORT_SETS` value is then 3,080 bytes, allocated only for the
/// pairs with more than one range.
pub const MAX_PORT_RANGES: usize = 256;

/// One allowed destination port range, inclusive, and the policy it comes from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
    /// Highest `end` among this range and all ranges sorted before it (see
    /// [`crate::ports`]): lets the lookup answer with one binary search even
    /// when ranges overlap.
    pub reach: u16,
    /// Index of the range whose `end` is `reach`.
    pub reach_index: u8,
    pub _pad: u8,
    /// Id of the policy that allows this range (the agent's numbering).
    pub policy_id: u32,
}
const _: () = assert!(size_of::<PortRange>() == 12);

/// Ranges a `PORT_SETS` value holds: a pair with a few ports (Cloud
/// Foundry's usual, a few ports of one app and the TLS port fronting it)
/// takes the kernel's 192-byte allocation, not a wide set's 4 KiB.
pub const SET_RANGES: usize = 8;

/// Port ranges allowed for one pair, sorted by `start`, at most `N`: a
/// `PORT_SETS` value ([`SmallPortSet`]) or a `PORT_SETS_WIDE` one
/// ([`PortRules`], also the agent's and the tests' whole view of a pair).
/// Built by [`PortRules::build`]; only the first `len` entries are
/// meaningful, the rest are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSet<const N: usize> {
    pub len: u32,
    pub _pad: u32,
    pub ranges: [PortRange; N],
}

/// A pair's ranges, all of them: what the agent builds and compares, and
/// the `PORT_SETS_WIDE` value of a pair with more than [`SET_RANGES`].
pub type PortRules = PortSet<MAX_PORT_RANGES>;
const _: () = assert!(size_of::<PortRules>() == 8 + 12 * MAX_PORT_RANGES);

/// The `PORT_SETS` value of a pair with more than [`INLINE_RANGES`] and at
/// most [`SET_RANGES`].
pub type SmallPortSet = PortSet<SET_RANGES>;
const _: () = assert!(size_of::<SmallPortSet>() == 8 + 12 * SET_RANGES);

/// Ranges a `POLICIES` value holds itself: a pair with one policy, and a
/// TCP pair with one policy and the platform TLS port fronting it (61443),
/// cost one lookup. A hash entry of this 24-byte value takes the kernel's
/// 96-byte allocation, as one holding a single range would.
pub const INLINE_RANGES: usize = 2;

/// One range in a `POLICIES` value, inclusive, and the policy allowing it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InlineRange {
    pub start: u16,
    pub end: u16,
    pub policy_id: u32,
}
const _: () = assert!(size_of::<InlineRange>() == 8);

/// `POLICIES` value: what one pair allows, in 24 bytes. A pair with up to
/// [`INLINE_RANGES`] port ranges holds them here, sorted as in
/// [`PortRules`], and its packets cost one lookup; a pair with more holds
/// only their `count`, and its ranges are the `PORT_SETS` value under the
/// same key (up to [`SET_RANGES`]) or the `PORT_SETS_WIDE` one. The agent
/// writes a set before a `POLICIES` entry counts on it and deletes it only
/// once no `POLICIES` entry does.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PairPorts {
    /// The first `count` are the pair's ranges when `count` is at most
    /// [`INLINE_RANGES`] (the rest zero); all zero otherwise.
    pub ranges: [InlineRange; INLINE_RANGES],
    /// Distinct ranges the pair allows (at least 1).
    pub count: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<PairPorts>() == 24);

/// Where a pair's ranges are, by how many it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// In its `POLICIES` value.
    Inline,
    /// In `PORT_SETS`.
    Set,
    /// In `PORT_SETS_WIDE`.
    Wide,
}

impl Tier {
    pub fn of(count: u32) -> Tier {
        match count as usize {
            n if n <= INLINE_RANGES => Tier::Inline,
            n if n <= SET_RANGES => Tier::Set,
            _ => Tier::Wide,
        }
    }
}

impl<const N: usize> PortSet<N> {
    /// Iterations that always finish a binary search over `N` items.
    const STEPS: usize = (usize::BITS - N.leading_zeros()) as usize;

    pub const EMPTY: Self = Self {
        len: 0,
        _pad: 0,
        ranges: [PortRange { start: 0, end: 0, reach: 0, reach_index: 0, _pad: 0, policy_id: 0 };
            N],
    };

    /// The allowances stored, in `start` order.
    pub fn allowances(&self) -> impl Iterator<Item = Allowance> + '_ {
        self.ranges[..(self.len as usize).min(N)].iter().map(|r| Allowance {
            start: r.start,
            end: r.end,
            policy_id: r.policy_id,
        })
    }

    /// The policy allowing `port`, if any: a binary search of `STEPS` fixed
    /// steps without a branch (each step adds its width to the count of
    /// ranges starting at or below `port` when the range it probes does),
    /// so the verifier follows one path through it instead of one per
    /// outcome of every comparison. Bounded whatever the map holds: every
    /// index is masked into the array.
    #[inline(always)]
    pub fn find(&self, port: u16) -> Option<u32> {
        const { assert!(N.is_power_of_two(), "indexes are masked into the array") };
        // Opaque, so that the compiler cannot prove a difference below
        // small and turn its sign bit back into a comparison (a branch).
        let port_plus_one = opaque(u64::from(port) + 1);
        let len_plus_one = opaque(u64::from(self.len) + 1);
        let mut below = 0u64;
        let mut step = N as u64;
        for _ in 0..Self::STEPS {
            // Probe the `probe`-th range: counted if it exists and starts
            // at or below `port` (then every range before it does too).
            let probe = below + step;
            let r = &self.ranges[(probe as usize - 1) & (N - 1)];
            let starts_below = opaque(u64::from(r.start)).wrapping_sub(port_plus_one) >> 63;
            let exists = probe.wrapping_sub(len_plus_one) >> 63;
            below += opaque(starts_below & exists) * step;
            step >>= 1;
        }
        if below == 0 {
            return None;
        }
        let last = &self.ranges[(below as usize - 1) & (N - 1)];
        if last.reach < port {
            return None;
        }
        self.ranges.get(last.reach_index as usize).map(|r| r.policy_id)
    }
}

impl PortRules {
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

    /// The `POLICIES` value of a pair with these ranges; past
    /// [`INLINE_RANGES`], the ranges themselves go to `PORT_SETS`.
    pub fn pair_ports(&self) -> PairPorts {
        let mut pair = PairPorts { count: self.len, ..PairPorts::default() };
        if (self.len as usize) <= INLINE_RANGES {
            for (inline, r) in pair.ranges.iter_mut().zip(&self.ranges) {
                *inline = InlineRange { start: r.start, end: r.end, policy_id: r.policy_id };
            }
        }
        pair
    }

    /// The `PORT_SETS` value of these ranges, if they fit one.
    pub fn small(&self) -> Option<SmallPortSet> {
        let len = self.len as usize;
        if len > SET_RANGES {
            return None;
        }
        let mut set = SmallPortSet { len: self.len, ..SmallPortSet::EMPTY };
        set.ranges[..len].copy_from_slice(&self.ranges[..len]);
        Some(set)
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

impl PairPorts {
    /// Where the pair's ranges are.
    pub fn tier(&self) -> Tier {
        Tier::of(self.count)
    }

    /// The policy allowing `port` for a pair with this `POLICIES` value:
    /// the same answer as [`PortRules::find`] on the pair's ranges. `set`
    /// and `wide` give its `PORT_SETS` and `PORT_SETS_WIDE` values, looked
    /// up only for a pair whose ranges are there. Port 0 is a value like any
    /// other (ICMP type 0).
    #[inline(always)]
    pub fn find<'a>(
        &self,
        port: u16,
        set: impl FnOnce() -> Option<&'a SmallPortSet>,
        wide: impl FnOnce() -> Option<&'a PortRules>,
    ) -> Option<u32> {
        let [a, b] = &self.ranges;
        match self.count {
            1 => (a.start <= port && port <= a.end).then_some(a.policy_id),
            // The last range starting at or below `port` decides, reaching
            // as far as the furthest end up to it (the first range ending
            // there when both do).
            2 if b.start <= port => {
                let (end, policy_id) =
                    if b.end > a.end { (b.end, b.policy_id) } else { (a.end, a.policy_id) };
                (port <= end).then_some(policy_id)
            }
            2 => (a.start <= port && port <= a.end).then_some(a.policy_id),
            n if n as usize <= SET_RANGES => set()?.find(port),
            _ => wide()?.find(port),
        }
    }
}

/// A pair's values in every map, as the agent writes them (the host tests'
/// and `explain`'s view of the kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairValues {
    pub pair: PairPorts,
    pub set: Option<SmallPortSet>,
    pub wide: Option<PortRules>,
}

impl PairValues {
    pub fn of(rules: &PortRules) -> Self {
        let pair = rules.pair_ports();
        PairValues {
            pair,
            set: rules.small().filter(|_| pair.tier() == Tier::Set),
            wide: (pair.tier() == Tier::Wide).then_some(*rules),
        }
    }

    /// The pair's ranges, all of them (None: a count without its set).
    pub fn rules(&self) -> Option<PortRules> {
        match self.pair.tier() {
            Tier::Wide => self.wide,
            Tier::Set => {
                let set = self.set?;
                let mut rules = PortRules { len: set.len, ..PortRules::EMPTY };
                let len = (set.len as usize).min(SET_RANGES);
                rules.ranges[..len].copy_from_slice(&set.ranges[..len]);
                Some(rules)
            }
            Tier::Inline => {
                let len = (self.pair.count as usize).min(INLINE_RANGES);
                let all = self.pair.ranges.map(|r| Allowance {
                    start: r.start,
                    end: r.end,
                    policy_id: r.policy_id,
                });
                PortRules::build(&all[..len]).ok()
            }
        }
    }

    /// [`PairPorts::find`] over these values.
    pub fn find(&self, port: u16) -> Option<u32> {
        self.pair.find(port, || self.set.as_ref(), || self.wide.as_ref())
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
        let many: [Allowance; MAX_PORT_RANGES + 1] =
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
    fn each_pair_lives_where_its_count_says() {
        let never_set =
            || -> Option<&SmallPortSet> { panic!("a pair of up to two ranges read PORT_SETS") };
        let never_wide = || -> Option<&PortRules> { panic!("read PORT_SETS_WIDE") };
        let one = PortRules::build(&[allow(8080, 8090, 7), allow(8080, 8090, 9)]).unwrap();
        let pair = one.pair_ports();
        assert_eq!((pair.count, pair.tier()), (1, Tier::Inline));
        assert_eq!(pair.ranges[0], InlineRange { start: 8080, end: 8090, policy_id: 7 });
        assert_eq!(pair.find(8085, never_set, never_wide), Some(7));
        assert_eq!(pair.find(8091, never_set, never_wide), None);
        // ICMP echo reply: type 0 is a port like any other.
        let icmp = PortRules::build(&[allow(0, 0, 3)]).unwrap().pair_ports();
        assert_eq!(icmp.find(0, never_set, never_wide), Some(3));
        // Two ranges (a port and the TLS port) are here too, sorted.
        let two = PortRules::build(&[allow(61443, 61443, 2), allow(8080, 8080, 1)]).unwrap();
        let pair = two.pair_ports();
        assert_eq!(pair.tier(), Tier::Inline);
        assert_eq!(pair.ranges[0], InlineRange { start: 8080, end: 8080, policy_id: 1 });
        assert_eq!(pair.find(61443, never_set, never_wide), Some(2));
        assert_eq!(pair.find(8080, never_set, never_wide), Some(1));
        assert_eq!(pair.find(8081, never_set, never_wide), None);
        // Three to eight (three ports and TLS): only a count here, the
        // ranges in PORT_SETS; a missing entry allows nothing.
        let four: [Allowance; 4] =
            core::array::from_fn(|i| allow(9000 + i as u16, 9000 + i as u16, i as u32 + 1));
        let rules = PortRules::build(&four).unwrap();
        let values = PairValues::of(&rules);
        assert_eq!(values.pair, PairPorts { count: 4, ..PairPorts::default() });
        assert_eq!(values.pair.tier(), Tier::Set);
        assert!(values.wide.is_none());
        assert_eq!(values.pair.find(9002, || values.set.as_ref(), never_wide), Some(3));
        assert_eq!(values.pair.find(9002, || None, never_wide), None);
        assert_eq!(values.pair.find(9004, || values.set.as_ref(), never_wide), None);
        // More: PORT_SETS_WIDE.
        let nine: [Allowance; 9] =
            core::array::from_fn(|i| allow(100 + i as u16, 100 + i as u16, i as u32 + 1));
        let values = PairValues::of(&PortRules::build(&nine).unwrap());
        assert_eq!(values.pair.tier(), Tier::Wide);
        assert!(values.set.is_none());
        assert_eq!(values.pair.find(108, never_set, || values.wide.as_ref()), Some(9));
        assert_eq!(values.pair.find(108, never_set, || None), None);
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
            // Half of them small: inline, PORT_SETS and the edges between.
            let n = if rng.random_bool(0.5) {
                rng.random_range(0..=SET_RANGES + 2)
            } else {
                rng.random_range(0..=MAX_PORT_RANGES)
            };
            let set: [Allowance; MAX_PORT_RANGES] = core::array::from_fn(|i| {
                let start = rng.random_range(1..=200u16);
                let end = start + rng.random_range(0..40u16);
                allow(start, end, i as u32)
            });
            let rules = PortRules::build(&set[..n]).unwrap();
            let values = PairValues::of(&rules);
            assert_eq!(values.rules(), Some(rules), "the maps' values give the pair back");
            let small = rules.small();
            for port in 0..=260u16 {
                let found = rules.find(port);
                assert_eq!(values.find(port), found, "as the maps hold it");
                if let Some(small) = &small {
                    assert_eq!(small.find(port), found, "as PORT_SETS holds it");
                }
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
