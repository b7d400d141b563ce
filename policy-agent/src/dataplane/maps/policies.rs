//! `POLICIES`, `PORT_SETS` and `PORT_SETS_WIDE`: the port ranges each app
//! pair allows. A pair with up to two ranges is one 24-byte `POLICIES`
//! entry; a pair with more also has its ranges in `PORT_SETS` (up to
//! eight) or `PORT_SETS_WIDE` (see `policy_common::ports`).
//!
//! Order of writes, so that a program between its two lookups never sees a
//! pair allow less than before and after the change: a set is written
//! before a `POLICIES` entry counts on it, and deleted only later,
//! once the change is kept ([`Maps::forget_port_sets`]) and no `POLICIES`
//! entry counts on it any more.

use aya::maps::IterableMap as _;
use policy_common::{
    maps::{PairKey, PairPorts, PortRules, names},
    ports::{Allowance, PairValues, Tier},
};

use super::{Maps, insert_err, is_absent, map_err};
use crate::{DataplaneError, reconcile::PairChange};

/// The allowances of a pair whose ranges are all in its `POLICIES` value,
/// as [`PairValues::rules`] gives them (ordered by range; None if the
/// value is not one the agent writes), without building the 2 KiB
/// `PortRules` that takes: a restart reads a million of them.
fn inline_allowances(pair: &PairPorts) -> Option<Vec<Allowance>> {
    let len = (pair.count as usize).min(pair.ranges.len());
    let mut all: Vec<Allowance> = pair.ranges[..len]
        .iter()
        .map(|r| Allowance { start: r.start, end: r.end, policy_id: r.policy_id })
        .collect();
    all.sort_unstable_by_key(|a| (a.start, a.end, a.policy_id));
    let valid = all.iter().all(|a| a.start <= a.end)
        && all.windows(2).all(|w| (w[0].start, w[0].end) != (w[1].start, w[1].end));
    valid.then_some(all)
}

impl Maps {
    /// A pair's ranges as one value, from `POLICIES` and, past two ranges,
    /// `PORT_SETS` or `PORT_SETS_WIDE` (None: no entry, or a count without
    /// its set).
    pub fn pair_rules(&self, key: &PairKey) -> Option<PortRules> {
        let pair = self.policies.get(key, 0).ok()?;
        self.values_of(key, pair).rules()
    }

    fn values_of(&self, key: &PairKey, pair: PairPorts) -> PairValues {
        PairValues {
            pair,
            set: (pair.tier() == Tier::Set).then(|| self.port_sets.get(key, 0).ok()).flatten(),
            wide: (pair.tier() == Tier::Wide)
                .then(|| self.port_sets_wide.get(key, 0).ok())
                .flatten(),
        }
    }

    /// The allowances stored for a pair (empty if none).
    pub fn pair(&self, key: &PairKey) -> Vec<Allowance> {
        self.pair_rules(key).map(|r| r.allowances().collect()).unwrap_or_default()
    }

    /// All pairs and their allowances.
    pub fn pairs(&self) -> Vec<(PairKey, Vec<Allowance>)> {
        // In batches (see `batch`); key by key only if the kernel refuses.
        let entries = super::batch::read_all::<PairKey, PairPorts>(self.policies.map())
            .unwrap_or_else(|_| self.policies.iter().filter_map(Result::ok).collect());
        entries
            .into_iter()
            .map(|(k, pair)| {
                let all = match pair.tier() {
                    Tier::Inline => inline_allowances(&pair),
                    _ => self.values_of(&k, pair).rules().map(|r| r.allowances().collect()),
                };
                (k, all.unwrap_or_default())
            })
            .collect()
    }

    /// Writes pairs `POLICIES` has no entry for (see `Kernel::add_pairs`):
    /// those whose ranges fit their entry in one syscall, the others one
    /// by one with their sets. All or nothing. No epoch bump: nothing that
    /// was allowed stops being so.
    pub fn add_pairs(&mut self, pairs: &[PairChange]) -> Result<(), DataplaneError> {
        let mut inline = Vec::with_capacity(pairs.len());
        let mut rest = Vec::new();
        for (key, _, allowances) in pairs {
            let rules = PortRules::build(allowances)?;
            match rules.pair_ports() {
                pair if pair.tier() == Tier::Inline => inline.push((*key, pair)),
                _ => rest.push((*key, allowances.as_slice())),
            }
        }
        // The inline pairs a failed write leaves, deleted in one syscall.
        let take_back = |map: &aya::maps::MapData, written: usize| {
            let keys: Vec<PairKey> = inline[..written].iter().map(|(k, _)| *k).collect();
            if let Err(e) = super::batch::delete_all(map, &keys) {
                tracing::warn!(error = %e.error, "cannot take back the pairs of a failed write");
            }
        };
        let map = self.policies.map();
        if let Err(stopped) = super::batch::update_all(map, &inline) {
            take_back(map, stopped.written);
            let err = super::batch_err(names::POLICIES, map, stopped);
            // As for the other take-backs (and `set_pair`'s removals): a
            // flow a taken-back pair let through meanwhile is checked again.
            if let Err(undo) = self.bump_epoch() {
                tracing::warn!(error = %undo, "cannot take back a new pair");
            }
            return Err(err);
        }
        for (i, (key, allowances)) in rest.iter().enumerate() {
            if let Err(e) = self.set_pair(*key, allowances) {
                take_back(self.policies.map(), inline.len());
                // What a packet met in the meantime goes with them.
                if let Err(undo) = self.bump_epoch() {
                    tracing::warn!(error = %undo, "cannot take back a new pair");
                }
                for (key, _) in &rest[..i] {
                    if let Err(undo) = self.set_pair(*key, &[]) {
                        tracing::warn!(error = %undo, "cannot take back a new pair");
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Deletes pairs that go (see `Kernel::remove_pairs`) in batches, with
    /// one epoch bump for all of them; a pair already missing is passed
    /// over. Their sets go once the change is kept. All or nothing.
    pub fn remove_pairs(&mut self, pairs: &[PairChange]) -> Result<(), DataplaneError> {
        if pairs.is_empty() {
            return Ok(());
        }
        let keys: Vec<PairKey> = pairs.iter().map(|(k, _, _)| *k).collect();
        if let Err(stopped) = super::batch::delete_present(self.policies.map(), &keys) {
            for (key, old, _) in &pairs[..stopped.written] {
                if let Err(undo) = self.set_pair(*key, old) {
                    tracing::warn!(error = %undo, "cannot put back a pair of a failed removal");
                }
            }
            return Err(super::delete_err(names::POLICIES, stopped));
        }
        for (key, old, _) in pairs {
            let tier = PortRules::build(old).map(|r| r.pair_ports().tier());
            if !matches!(tier, Ok(Tier::Inline)) {
                self.retired_sets.insert(*key);
            }
        }
        self.bump_epoch()
    }

    /// Writes a pair's set where `tier` keeps it (nothing for inline).
    fn write_set(
        &mut self,
        key: PairKey,
        rules: &PortRules,
        tier: Tier,
    ) -> Result<(), DataplaneError> {
        match tier {
            Tier::Inline => Ok(()),
            Tier::Set => {
                let set = rules.small().expect("a set-tier pair fits PORT_SETS");
                self.port_sets
                    .insert(key, set, 0)
                    .map_err(insert_err(names::PORT_SETS, self.port_sets.map()))
            }
            Tier::Wide => self
                .port_sets_wide
                .insert(key, rules, 0)
                .map_err(insert_err(names::PORT_SETS_WIDE, self.port_sets_wide.map())),
        }
    }

    /// Replaces the allowances of one pair. Bumps the epoch if a port that
    /// was allowed no longer is. An error leaves the pair as it was.
    pub fn set_pair(
        &mut self,
        key: PairKey,
        allowances: &[Allowance],
    ) -> Result<(), DataplaneError> {
        let old_pair = self.policies.get(&key, 0).ok();
        let old = old_pair.and_then(|pair| self.values_of(&key, pair).rules());
        let old_tier = old_pair.map(|p| p.tier());
        if allowances.is_empty() {
            if old_pair.is_some() {
                match self.policies.remove(&key) {
                    Ok(()) => {}
                    Err(e) if is_absent(&e) => {}
                    Err(e) => return Err(map_err(names::POLICIES)(e)),
                }
                if old_tier != Some(Tier::Inline) {
                    self.retired_sets.insert(key);
                }
                self.bump_epoch()?;
            }
            return Ok(());
        }
        let new = PortRules::build(allowances)?;
        let pair = new.pair_ports();
        let tier = pair.tier();
        self.write_set(key, &new, tier)?;
        if let Err(e) = self.policies.insert(key, pair, 0) {
            // Put the set back as the old entry knows it.
            let restored = match old.filter(|_| old_tier == Some(tier)) {
                Some(old) => self.write_set(key, &old, tier),
                None => {
                    self.retired_sets.insert(key);
                    Ok(())
                }
            };
            if let Err(undo) = restored {
                tracing::warn!(error = %undo, "cannot put a pair's old port set back");
            }
            return Err(insert_err(names::POLICIES, self.policies.map())(e));
        }
        if old_tier.is_some_and(|t| t != tier && t != Tier::Inline) {
            self.retired_sets.insert(key);
        }
        if old.is_some_and(|old| !new.covers(&old)) {
            self.bump_epoch()?;
        }
        Ok(())
    }

    /// Deletes the `PORT_SETS` and `PORT_SETS_WIDE` entries no `POLICIES`
    /// entry counts on any more: those of pairs removed or moved to another
    /// tier since the last call (`all`: every entry, at a start, for what a
    /// crash left). A program that read a pair's old count before the
    /// change has finished by the time the change is kept.
    pub fn forget_port_sets(&mut self, all: bool) -> Result<usize, DataplaneError> {
        let candidates: Vec<PairKey> = if all {
            let set = self.port_sets.keys().filter_map(Result::ok);
            set.chain(self.port_sets_wide.keys().filter_map(Result::ok)).collect()
        } else {
            std::mem::take(&mut self.retired_sets).into_iter().collect()
        };
        let mut forgotten = 0;
        for key in candidates {
            let tier = self.policies.get(&key, 0).ok().map(|p| p.tier());
            let removed = if tier == Some(Tier::Set) {
                Ok(false)
            } else {
                remove_present(&mut self.port_sets, &key, names::PORT_SETS)
            }
            .and_then(|set| {
                if tier == Some(Tier::Wide) {
                    return Ok(set);
                }
                remove_present(&mut self.port_sets_wide, &key, names::PORT_SETS_WIDE)
                    .map(|wide| set || wide)
            });
            match removed {
                Ok(true) => forgotten += 1,
                Ok(false) => {}
                Err(e) => {
                    self.retired_sets.insert(key);
                    return Err(e);
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

/// Deletes `key` from a set map: whether it was there.
fn remove_present<V: aya::Pod>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, PairKey, V>,
    key: &PairKey,
    name: &'static str,
) -> Result<bool, DataplaneError> {
    match map.remove(key) {
        Ok(()) => Ok(true),
        Err(e) if is_absent(&e) => Ok(false),
        Err(e) => Err(map_err(name)(e)),
    }
}
