//! `POLICIES` and `PORT_SETS`: the port ranges each app pair allows. A pair
//! with up to two ranges is one 24-byte `POLICIES` entry; a pair with more
//! also has its ranges in `PORT_SETS` (see `policy_common::ports`).
//!
//! Order of writes, so that a program between its two lookups never sees a
//! pair allow less than before and after the change: a `PORT_SETS` entry is
//! written before a `POLICIES` entry counts on it, and deleted only later,
//! once the change is kept ([`Maps::forget_port_sets`]) and no `POLICIES`
//! entry counts on it any more.

use aya::maps::IterableMap as _;
use policy_common::{
    maps::{PairKey, PairPorts, PortRules, names},
    ports::Allowance,
};

use super::{Maps, insert_err, is_absent, map_err};
use crate::DataplaneError;

impl Maps {
    /// A pair's ranges as one value, from `POLICIES` and, for more than two
    /// ranges, `PORT_SETS` (None: no entry, or a count without its set).
    pub fn pair_rules(&self, key: &PairKey) -> Option<PortRules> {
        let pair = self.policies.get(key, 0).ok()?;
        self.rules_of(key, pair)
    }

    fn rules_of(&self, key: &PairKey, pair: PairPorts) -> Option<PortRules> {
        if pair.in_set() {
            return self.port_sets.get(key, 0).ok();
        }
        let inline = pair.ranges.iter().take(pair.count as usize).map(|r| Allowance {
            start: r.start,
            end: r.end,
            policy_id: r.policy_id,
        });
        PortRules::build(&inline.collect::<Vec<_>>()).ok()
    }

    /// The allowances stored for a pair (empty if none).
    pub fn pair(&self, key: &PairKey) -> Vec<Allowance> {
        self.pair_rules(key).map(|r| r.allowances().collect()).unwrap_or_default()
    }

    /// All pairs and their allowances.
    pub fn pairs(&self) -> Vec<(PairKey, Vec<Allowance>)> {
        self.policies
            .iter()
            .filter_map(Result::ok)
            .map(|(k, pair)| {
                let all = self.rules_of(&k, pair).map(|r| r.allowances().collect());
                (k, all.unwrap_or_default())
            })
            .collect()
    }

    /// Replaces the allowances of one pair. Bumps the epoch if a port that
    /// was allowed no longer is. An error leaves the pair as it was.
    pub fn set_pair(
        &mut self,
        key: PairKey,
        allowances: &[Allowance],
    ) -> Result<(), DataplaneError> {
        let old_pair = self.policies.get(&key, 0).ok();
        let old = old_pair.and_then(|pair| self.rules_of(&key, pair));
        if allowances.is_empty() {
            if old_pair.is_some() {
                match self.policies.remove(&key) {
                    Ok(()) => {}
                    Err(e) if is_absent(&e) => {}
                    Err(e) => return Err(map_err(names::POLICIES)(e)),
                }
                self.retired_sets.insert(key);
                self.bump_epoch()?;
            }
            return Ok(());
        }
        let new = PortRules::build(allowances)?;
        let pair = new.pair_ports();
        let set_before = old_pair.is_some_and(|p| p.in_set());
        if pair.in_set() {
            let capacity = Self::capacity(self.port_sets.map());
            self.port_sets.insert(key, new, 0).map_err(insert_err(names::PORT_SETS, capacity))?;
        }
        let capacity = Self::capacity(self.policies.map());
        if let Err(e) = self.policies.insert(key, pair, 0) {
            // Put the set back as the old entry knows it.
            if pair.in_set() {
                let _ = match old.filter(|_| set_before) {
                    Some(old) => self.port_sets.insert(key, old, 0),
                    None => self.port_sets.remove(&key),
                };
            }
            return Err(insert_err(names::POLICIES, capacity)(e));
        }
        if set_before && !pair.in_set() {
            self.retired_sets.insert(key);
        }
        if old.is_some_and(|old| !new.covers(&old)) {
            self.bump_epoch()?;
        }
        Ok(())
    }

    /// Deletes the `PORT_SETS` entries no `POLICIES` entry counts on any
    /// more: those of pairs removed or left with two ranges or fewer since
    /// the last call (`all`: every entry, at a start, for what a crash left). A
    /// program that read a pair's old count before the change has finished
    /// by the time the change is kept.
    pub fn forget_port_sets(&mut self, all: bool) -> Result<usize, DataplaneError> {
        let candidates: Vec<PairKey> = if all {
            self.port_sets.keys().filter_map(Result::ok).collect()
        } else {
            std::mem::take(&mut self.retired_sets).into_iter().collect()
        };
        let mut forgotten = 0;
        for key in candidates {
            if self.policies.get(&key, 0).is_ok_and(|p| p.in_set()) {
                continue;
            }
            match self.port_sets.remove(&key) {
                Ok(()) => forgotten += 1,
                Err(e) if is_absent(&e) => {}
                Err(e) => {
                    self.retired_sets.insert(key);
                    return Err(map_err(names::PORT_SETS)(e));
                }
            }
        }
        Ok(forgotten)
    }

    /// Adds one allowance to a pair (a no-op if the same range is there),
    /// its policy's counters first when the programs count per policy.
    /// For tools writing the maps directly.
    pub fn allow(&mut self, key: PairKey, allowance: Allowance) -> Result<(), DataplaneError> {
        let mut all = self.pair(&key);
        if all.iter().any(|a| a.start == allowance.start && a.end == allowance.end) {
            return Ok(());
        }
        if allowance.policy_id != 0 && self.counts_policies() {
            self.add_policy_counters(allowance.policy_id)?;
        }
        all.push(allowance);
        self.set_pair(key, &all)
    }

    /// Removes the allowance for exactly `start..=end` from a pair (a no-op if
    /// it is not there), and its policy's counters once no pair names it.
    /// For tools: there is no change to keep, so a set no longer needed goes
    /// at once.
    pub fn revoke(&mut self, key: PairKey, start: u16, end: u16) -> Result<(), DataplaneError> {
        let mut all = self.pair(&key);
        let Some(gone) = all.iter().position(|a| a.start == start && a.end == end) else {
            return Ok(());
        };
        let policy_id = all.remove(gone).policy_id;
        self.set_pair(key, &all)?;
        self.forget_port_sets(false)?;
        let named = self.pairs().iter().any(|(_, a)| a.iter().any(|a| a.policy_id == policy_id));
        if !named {
            self.remove_policy_counters(policy_id)?;
        }
        Ok(())
    }
}
