//! `POLICIES`: the port ranges each app pair allows, one update per pair.

use aya::maps::{IterableMap as _, MapError};
use policy_common::{
    maps::{PairKey, PortRules, names},
    ports::Allowance,
};

use super::{Maps, insert_err, map_err};
use crate::DataplaneError;

impl Maps {
    /// The `POLICIES` value of a pair.
    pub fn pair_rules(&self, key: &PairKey) -> Option<PortRules> {
        self.policies.get(key, 0).ok()
    }

    /// The allowances stored for a pair (empty if none).
    pub fn pair(&self, key: &PairKey) -> Vec<Allowance> {
        self.policies.get(key, 0).map(|r| r.allowances().collect()).unwrap_or_default()
    }

    /// All pairs and their allowances.
    pub fn pairs(&self) -> Vec<(PairKey, Vec<Allowance>)> {
        self.policies
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k, v.allowances().collect()))
            .collect()
    }

    /// Replaces the allowances of one pair in one update. Bumps the epoch if
    /// a port that was allowed no longer is. An error leaves the entry as it
    /// was.
    pub fn set_pair(
        &mut self,
        key: PairKey,
        allowances: &[Allowance],
    ) -> Result<(), DataplaneError> {
        let old = self.policies.get(&key, 0).ok();
        if allowances.is_empty() {
            if old.is_some() {
                match self.policies.remove(&key) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(names::POLICIES)(e)),
                }
                self.bump_epoch()?;
            }
            return Ok(());
        }
        let new = PortRules::build(allowances)?;
        let capacity = Self::capacity(self.policies.map());
        self.policies.insert(key, new, 0).map_err(insert_err(names::POLICIES, capacity))?;
        if old.is_some_and(|old| !new.covers(&old)) {
            self.bump_epoch()?;
        }
        Ok(())
    }

    /// Adds one allowance to a pair (a no-op if the same range is there),
    /// its policy's counters first when the programs count per policy.
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
    pub fn revoke(&mut self, key: PairKey, start: u16, end: u16) -> Result<(), DataplaneError> {
        let mut all = self.pair(&key);
        let Some(gone) = all.iter().position(|a| a.start == start && a.end == end) else {
            return Ok(());
        };
        let policy_id = all.remove(gone).policy_id;
        self.set_pair(key, &all)?;
        let named = self.pairs().iter().any(|(_, a)| a.iter().any(|a| a.policy_id == policy_id));
        if !named {
            self.remove_policy_counters(policy_id)?;
        }
        Ok(())
    }
}
