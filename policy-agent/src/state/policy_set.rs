//! The policies of a state, found by app pair: a hash table from (source
//! app, destination app, protocol) to that pair's policies, with the apps
//! numbered. Finding a pair is one hash probe whatever the number of
//! policies: the ordered map this replaces walked ~20 keys (and their
//! names) down a B-tree of a million, several times per policy written
//! (1M policies: ~45 % of a load's time). Order is made only where it is
//! shown or stored ([`PolicySet::sorted`]).

use std::collections::{HashMap, hash_map::Entry};

use foldhash::fast::RandomState;

use super::{AppName, Policy, Protocol};

/// An app pair and protocol, the apps by number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Pair {
    source: u32,
    destination: u32,
    protocol: Protocol,
}

/// One policy of a pair: its ports, whether TLS-only, its id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    pub start: u16,
    pub end: u16,
    pub tls_only: bool,
    pub id: u32,
}

impl Ports {
    /// What tells a pair's policies apart (the id does not), in their
    /// order.
    fn key(&self) -> (u16, u16, bool) {
        (self.start, self.end, self.tls_only)
    }

    pub(super) fn same_policy(&self, p: &Policy) -> bool {
        self.key() == (p.start, p.end, p.tls_only)
    }
}

/// A pair's policies: nearly every pair has one, held inline.
#[derive(Clone, Debug)]
enum PairPolicies {
    One(Ports),
    /// Boxed as a slice: the table's slots stay 32 bytes.
    Many(Box<[Ports]>),
}

impl PairPolicies {
    fn as_slice(&self) -> &[Ports] {
        match self {
            Self::One(one) => std::slice::from_ref(one),
            Self::Many(many) => many,
        }
    }
}

/// How many policy ends name an app (as a source, of those).
#[derive(Clone, Copy, Debug, Default)]
struct Ends {
    all: u32,
    as_source: u32,
}

/// A policy as the set holds it, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct PolicyRef<'a> {
    pub source: &'a AppName,
    pub destination: &'a AppName,
    pub protocol: Protocol,
    pub ports: Ports,
}

impl PolicyRef<'_> {
    pub fn to_policy(self) -> Policy {
        Policy {
            source: self.source.clone(),
            destination: self.destination.clone(),
            protocol: self.protocol,
            start: self.ports.start,
            end: self.ports.end,
            tls_only: self.ports.tls_only,
        }
    }
}

/// The pairs' table is this many tables, a pair's chosen by its apps:
/// each grows (rehashing what it holds) on its own, so a write that makes
/// one grow waits for 1/64th of the pairs (~1 ms at 1M), not all of them
/// (~60 ms in one table).
const SHARDS: usize = 64;

type Shard = HashMap<Pair, PairPolicies, RandomState>;

impl Pair {
    /// Which of the [`SHARDS`] tables holds the pair (a multiplicative
    /// mix, independent of the tables' own hash).
    fn shard(&self) -> usize {
        let mixed = (u64::from(self.source) << 32 | u64::from(self.destination))
            .wrapping_add(self.protocol as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (mixed >> (64 - SHARDS.trailing_zeros())) as usize
    }
}

/// Policies with their ids, by app pair.
#[derive(Clone)]
pub struct PolicySet {
    /// Each app some policy names → its number.
    apps: HashMap<AppName, u32, RandomState>,
    /// By number; a number no policy uses holds an empty name and is on
    /// `free`.
    names: Vec<AppName>,
    /// By number.
    ends: Vec<Ends>,
    free: Vec<u32>,
    pairs: Box<[Shard]>,
    len: usize,
}

impl Default for PolicySet {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl PolicySet {
    pub fn with_capacity(policies: usize) -> Self {
        // One seed for all: a shard is chosen by the pair, not the hash.
        let hasher = RandomState::default();
        let each = policies.div_ceil(SHARDS);
        Self {
            apps: HashMap::default(),
            names: Vec::new(),
            ends: Vec::new(),
            free: Vec::new(),
            pairs: (0..SHARDS)
                .map(|_| HashMap::with_capacity_and_hasher(each, hasher.clone()))
                .collect(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    fn pair_of(&self, source: &str, destination: &str, protocol: Protocol) -> Option<Pair> {
        let (source, destination) = (*self.apps.get(source)?, *self.apps.get(destination)?);
        Some(Pair { source, destination, protocol })
    }

    /// The policies of one app pair and protocol.
    pub fn pair(&self, source: &str, destination: &str, protocol: Protocol) -> &[Ports] {
        self.pair_of(source, destination, protocol)
            .and_then(|pair| self.pairs[pair.shard()].get(&pair))
            .map_or(&[], PairPolicies::as_slice)
    }

    /// The id of `p`, if the set holds it.
    pub fn get(&self, p: &Policy) -> Option<u32> {
        let ports = self.pair(&p.source, &p.destination, p.protocol);
        ports.iter().find(|ports| ports.same_policy(p)).map(|ports| ports.id)
    }

    /// How many policies have `source` as their source.
    pub fn of_source(&self, source: &str) -> usize {
        self.apps.get(source).map_or(0, |&n| self.ends[n as usize].as_source as usize)
    }

    /// Adds `p` with `id`; false (and nothing changed) if the set holds it
    /// already. The set keeps `p`'s names (interned by the caller). One
    /// probe of the pairs' table.
    pub fn insert(&mut self, p: &Policy, id: u32) -> bool {
        let ports = Ports { start: p.start, end: p.end, tls_only: p.tls_only, id };
        // A new app gets a number here (no policy end yet): no pair of it
        // exists, so the policy is new.
        let (source, destination) = (self.number(&p.source), self.number(&p.destination));
        let pair = Pair { source, destination, protocol: p.protocol };
        if !self.add_to(pair, ports) {
            return false;
        }
        self.count_end(source, true);
        self.count_end(destination, false);
        self.len += 1;
        true
    }

    /// Adds many policies at once (a snapshot read back): numbered first,
    /// then written shard by shard, so that each shard's table stays in
    /// cache while it fills (one at a time, 1M inserts land all over 64
    /// MB). Returns those it held already, which it did not add.
    pub fn extend(&mut self, policies: impl IntoIterator<Item = (Policy, u32)>) -> Vec<Policy> {
        let mut by_shard: Vec<Vec<(Pair, Ports)>> = vec![Vec::new(); SHARDS];
        for (p, id) in policies {
            let (source, destination) = (self.number(&p.source), self.number(&p.destination));
            let pair = Pair { source, destination, protocol: p.protocol };
            let ports = Ports { start: p.start, end: p.end, tls_only: p.tls_only, id };
            by_shard[pair.shard()].push((pair, ports));
        }
        let mut held = Vec::new();
        for (shard, adds) in by_shard.into_iter().enumerate() {
            self.pairs[shard].reserve(adds.len());
            for (pair, ports) in adds {
                if self.add_to(pair, ports) {
                    self.count_end(pair.source, true);
                    self.count_end(pair.destination, false);
                    self.len += 1;
                } else {
                    held.push((pair, ports));
                }
            }
        }
        // A policy held already has its pair, so both its apps keep
        // counted ends: no number to give back.
        let held: Vec<Policy> = held
            .into_iter()
            .map(|(pair, ports)| self.policy_ref(&pair, ports).to_policy())
            .collect();
        held
    }

    /// Adds `ports` to `pair`'s policies; false if it holds that policy.
    fn add_to(&mut self, pair: Pair, ports: Ports) -> bool {
        match self.pairs[pair.shard()].entry(pair) {
            Entry::Vacant(slot) => {
                slot.insert(PairPolicies::One(ports));
            }
            Entry::Occupied(mut slot) => {
                if slot.get().as_slice().iter().any(|held| held.key() == ports.key()) {
                    return false;
                }
                // A pair holds a few ranges at most (its kernel entry's).
                let mut grown = slot.get().as_slice().to_vec();
                grown.push(ports);
                *slot.get_mut() = PairPolicies::Many(grown.into_boxed_slice());
            }
        }
        true
    }

    /// Removes `p`; returns its id, None if the set did not hold it.
    pub fn remove(&mut self, p: &Policy) -> Option<u32> {
        let pair = self.pair_of(&p.source, &p.destination, p.protocol)?;
        let Entry::Occupied(mut slot) = self.pairs[pair.shard()].entry(pair) else {
            return None;
        };
        let id = match slot.get_mut() {
            PairPolicies::One(one) if one.same_policy(p) => slot.remove().as_slice()[0].id,
            PairPolicies::One(_) => return None,
            PairPolicies::Many(many) => {
                let at = many.iter().position(|ports| ports.same_policy(p))?;
                let mut kept = many.to_vec();
                let id = kept.swap_remove(at).id;
                *slot.get_mut() = match kept.as_slice() {
                    [last] => PairPolicies::One(*last),
                    _ => PairPolicies::Many(kept.into_boxed_slice()),
                };
                id
            }
        };
        self.len -= 1;
        self.drop_app(&p.source, true);
        self.drop_app(&p.destination, false);
        Some(id)
    }

    /// `app`'s number, a new one (counting no policy end yet) if it has
    /// none.
    fn number(&mut self, app: &AppName) -> u32 {
        if let Some(&number) = self.apps.get(app.as_str()) {
            return number;
        }
        let number = match self.free.pop() {
            Some(number) => {
                self.names[number as usize] = app.clone();
                number
            }
            None => {
                self.names.push(app.clone());
                self.ends.push(Ends::default());
                (self.names.len() - 1) as u32
            }
        };
        self.apps.insert(app.clone(), number);
        number
    }

    /// Counts one more policy end naming app `number`.
    fn count_end(&mut self, number: u32, as_source: bool) {
        let ends = &mut self.ends[number as usize];
        ends.all += 1;
        ends.as_source += u32::from(as_source);
    }

    /// Counts one policy end naming `app` less; with none left its number
    /// is free.
    fn drop_app(&mut self, app: &str, as_source: bool) {
        let Some(&number) = self.apps.get(app) else { return };
        let ends = &mut self.ends[number as usize];
        ends.all -= 1;
        ends.as_source -= u32::from(as_source);
        if ends.all == 0 {
            self.apps.remove(app);
            self.names[number as usize] = AppName::default();
            self.free.push(number);
        }
    }

    /// The names by number (an unused number's is empty), for a caller
    /// that looks something up once per app rather than once per policy.
    pub fn names(&self) -> &[AppName] {
        &self.names
    }

    /// One of `pair`'s policies, with its apps' names.
    fn policy_ref(&self, pair: &Pair, ports: Ports) -> PolicyRef<'_> {
        PolicyRef {
            source: &self.names[pair.source as usize],
            destination: &self.names[pair.destination as usize],
            protocol: pair.protocol,
            ports,
        }
    }

    /// Every policy with its apps' numbers, in no particular order.
    pub fn iter_numbered(&self) -> impl Iterator<Item = (u32, u32, PolicyRef<'_>)> {
        self.pairs.iter().flatten().flat_map(move |(pair, policies)| {
            policies
                .as_slice()
                .iter()
                .map(move |&ports| (pair.source, pair.destination, self.policy_ref(pair, ports)))
        })
    }

    /// Every policy, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = PolicyRef<'_>> {
        self.iter_numbered().map(|(_, _, policy)| policy)
    }

    /// Every policy, in [`Policy`]'s order: the pairs ordered (16 bytes
    /// each while it runs: 16 MB at 1M), then each pair's few policies.
    pub fn sorted(&self) -> impl Iterator<Item = PolicyRef<'_>> {
        let mut pairs: Vec<(&Pair, &PairPolicies)> = self.pairs.iter().flatten().collect();
        let names = &self.names;
        pairs.sort_unstable_by(|(a, _), (b, _)| {
            let key = |p: &Pair| (&names[p.source as usize], &names[p.destination as usize]);
            key(a).cmp(&key(b)).then(a.protocol.cmp(&b.protocol))
        });
        pairs.into_iter().flat_map(move |(pair, policies)| {
            // Only a pair of several policies is copied to be ordered.
            let (one, many) = match policies {
                PairPolicies::One(one) => (Some(*one), Vec::new()),
                PairPolicies::Many(many) => {
                    let mut many = many.to_vec();
                    many.sort_unstable_by_key(Ports::key);
                    (None, many)
                }
            };
            one.into_iter().chain(many).map(move |ports| self.policy_ref(pair, ports))
        })
    }
}

impl PartialEq for PolicySet {
    /// The same policies with the same ids (however numbered and laid out).
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len
            && self
                .iter()
                .all(|r| other.pair(r.source, r.destination, r.protocol).contains(&r.ports))
    }
}

impl Eq for PolicySet {}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.sorted().map(|r| (r.to_policy(), r.ports.id))).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(source: &str, destination: &str, start: u16, end: u16) -> Policy {
        Policy {
            source: source.into(),
            destination: destination.into(),
            protocol: Protocol::Tcp,
            start,
            end,
            tls_only: false,
        }
    }

    #[test]
    fn a_pairs_policies_are_found_and_removed_one_by_one() {
        let mut set = PolicySet::default();
        assert!(set.insert(&policy("a", "b", 80, 80), 1));
        assert!(set.insert(&policy("a", "b", 443, 443), 2));
        assert!(set.insert(&policy("a", "b", 8000, 8999), 3));
        assert!(!set.insert(&policy("a", "b", 443, 443), 9), "held already: not replaced");
        assert!(set.insert(&policy("c", "b", 80, 80), 4));
        assert_eq!(set.len(), 4);
        assert_eq!(set.get(&policy("a", "b", 443, 443)), Some(2));
        assert_eq!(set.get(&policy("b", "a", 443, 443)), None);
        assert_eq!(set.pair("a", "b", Protocol::Tcp).len(), 3);
        assert_eq!(set.pair("a", "b", Protocol::Udp).len(), 0);
        assert_eq!((set.of_source("a"), set.of_source("b"), set.of_source("c")), (3, 0, 1));
        assert_eq!(set.remove(&policy("a", "b", 80, 80)), Some(1));
        assert_eq!(set.remove(&policy("a", "b", 80, 80)), None);
        assert_eq!(set.remove(&policy("a", "b", 8000, 8999)), Some(3));
        assert_eq!(
            set.pair("a", "b", Protocol::Tcp),
            [Ports { start: 443, end: 443, tls_only: false, id: 2 }]
        );
        assert_eq!(set.remove(&policy("a", "b", 443, 443)), Some(2));
        assert_eq!((set.len(), set.of_source("a")), (1, 0));
        assert!(!set.apps.contains_key("a"), "an app no policy names loses its number");
        assert_eq!(set.free.len(), 1);
        // Its number goes to the next new app; the old pair is not revived.
        assert!(set.insert(&policy("d", "b", 80, 80), 5));
        assert!(set.free.is_empty());
        assert_eq!(set.get(&policy("a", "b", 80, 80)), None);
        assert_eq!(set.get(&policy("d", "b", 80, 80)), Some(5));
    }

    #[test]
    fn sorted_is_the_order_of_policies_and_equality_ignores_layout() {
        let policies = [
            policy("b", "a", 80, 80),
            policy("a", "c", 80, 80),
            policy("a", "b", 443, 443),
            policy("a", "b", 80, 90),
            policy("a", "b", 80, 80),
        ];
        let mut set = PolicySet::default();
        let mut other = PolicySet::default();
        for (id, p) in policies.iter().enumerate() {
            set.insert(p, id as u32);
        }
        for (id, p) in policies.iter().enumerate().rev() {
            other.insert(p, id as u32);
        }
        let mut expected: Vec<(Policy, u32)> = policies.iter().cloned().zip(0..).collect();
        expected.sort();
        let sorted: Vec<(Policy, u32)> =
            set.sorted().map(|r| (r.to_policy(), r.ports.id)).collect();
        assert_eq!(sorted, expected);
        assert_eq!(set, other);
        other.remove(&policies[0]);
        other.insert(&policies[0], 99);
        assert_ne!(set, other, "another id");
    }

    #[test]
    fn pairs_spread_over_the_shards() {
        let mut set = PolicySet::default();
        for source in 0..100 {
            for destination in 0..64 {
                set.insert(
                    &policy(&format!("app-{source}"), &format!("dest-{destination}"), 80, 80),
                    1,
                );
            }
        }
        let sizes: Vec<usize> = set.pairs.iter().map(|shard| shard.len()).collect();
        let (least, most) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        assert!(*least >= 50 && *most <= 150, "100 pairs per shard on average: {sizes:?}");
        assert_eq!(set.iter().count(), 6400);
    }

    #[test]
    fn extend_is_inserting_one_by_one_and_returns_what_it_held() {
        let policies = [
            (policy("a", "b", 80, 80), 1),
            (policy("a", "b", 443, 443), 2),
            (policy("c", "b", 80, 80), 3),
            (policy("a", "b", 80, 80), 4),
        ];
        let mut one_by_one = PolicySet::default();
        for (p, id) in &policies {
            one_by_one.insert(p, *id);
        }
        let mut set = PolicySet::default();
        assert_eq!(set.extend(policies.iter().cloned()), [policy("a", "b", 80, 80)]);
        assert_eq!(set, one_by_one);
        assert_eq!((set.len(), set.of_source("a"), set.get(&policies[0].0)), (3, 2, Some(1)));
    }
}
