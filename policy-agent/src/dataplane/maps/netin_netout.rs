//! NetIn and NetOut in the maps: `NETIN`'s port mappings (and the
//! connections through them), `NETOUT`'s rules per app.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{IterableMap as _, lpm_trie::Key as LpmKey};
use policy_common::{
    maps::{NetInConnKey, NetInKey, NetInTarget, names},
    netout::NetOutRules,
};

use super::{Maps, insert_err, map_err};
use crate::DataplaneError;

impl Maps {
    /// Makes `NETIN` hold exactly `wanted` (new entries before the count
    /// the programs check, gone ones after), and forgets the connections
    /// of mappings that are gone.
    pub fn set_netin(
        &mut self,
        wanted: &BTreeMap<NetInKey, NetInTarget>,
    ) -> Result<(), DataplaneError> {
        for (key, target) in wanted {
            if self.netin.get(key, 0).ok().as_ref() != Some(target) {
                self.netin
                    .insert(*key, *target, 0)
                    .map_err(insert_err(names::NETIN, self.netin.map()))?;
            }
        }
        let count = u32::try_from(wanted.len()).unwrap_or(u32::MAX);
        if count > 0 {
            self.update_config(|c| c.netin_mappings = count)?;
        }
        let gone: Vec<NetInKey> =
            self.netin.keys().filter_map(Result::ok).filter(|k| !wanted.contains_key(k)).collect();
        for key in gone {
            self.netin.remove(&key).map_err(map_err(names::NETIN))?;
        }
        if count == 0 {
            self.update_config(|c| c.netin_mappings = 0)?;
        }
        let targets: BTreeSet<(u32, u16)> = wanted.values().map(|t| (t.addr, t.port)).collect();
        let stale: Vec<NetInConnKey> = self
            .netin_conns
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !targets.contains(&(k.container, k.container_port)))
            .collect();
        for key in stale {
            let _ = self.netin_conns.remove(&key);
        }
        Ok(())
    }

    /// Makes `NETOUT` hold exactly `wanted`; `Config::netout_apps` counts its
    /// apps (new entries before it turns on, gone ones after it turns off).
    pub fn set_netout(
        &mut self,
        wanted: &BTreeMap<crate::netout::TrieKey, NetOutRules>,
    ) -> Result<(), DataplaneError> {
        let have: BTreeMap<crate::netout::TrieKey, NetOutRules> = self
            .netout
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| ((k.prefix_len(), k.data()), v))
            .collect();
        for (key, rules) in wanted {
            if have.get(key) != Some(rules) {
                let k = LpmKey::new(key.0, key.1);
                self.netout
                    .insert(&k, rules, 0)
                    .map_err(insert_err(names::NETOUT, self.netout.map()))?;
            }
        }
        let apps = wanted.keys().filter(|k| k.0 == policy_common::netout::key_prefix(0)).count();
        let apps = u32::try_from(apps).unwrap_or(u32::MAX);
        if apps > 0 {
            self.update_config(|c| c.netout_apps = apps)?;
        }
        for key in have.keys().filter(|k| !wanted.contains_key(k)) {
            let k = LpmKey::new(key.0, key.1);
            self.netout.remove(&k).map_err(map_err(names::NETOUT))?;
        }
        if apps == 0 {
            self.update_config(|c| c.netout_apps = 0)?;
        }
        Ok(())
    }

    /// `NETIN`'s entries.
    pub fn netin(&self) -> Vec<(NetInKey, NetInTarget)> {
        self.netin.iter().filter_map(Result::ok).collect()
    }
}
