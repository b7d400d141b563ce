//! The per-address rate limits in the maps (`EVENT_LIMITS`,
//! `REJECT_LIMITS`; see `policy_common::limits`): their clock, the
//! entries, and forgetting them.

use std::collections::BTreeSet;

use aya::maps::{HashMap, MapData};
use policy_common::{
    limits::window_ended,
    maps::{EventLimit, names},
};

use super::{Maps, is_absent, map_err};
use crate::DataplaneError;

/// Now on the programs' clock for the limits: `bpf_ktime_get_coarse_ns`
/// is `ktime_get_coarse_ns()` (kernel/bpf/helpers.c), which is
/// `CLOCK_MONOTONIC_COARSE`.
pub fn limits_clock_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

impl Maps {
    /// The entries of `EVENT_LIMITS` and `REJECT_LIMITS`: map name, key
    /// and entry.
    pub fn limits(&self) -> Vec<(&'static str, u32, EventLimit)> {
        [(names::EVENT_LIMITS, &self.event_limits), (names::REJECT_LIMITS, &self.reject_limits)]
            .into_iter()
            .flat_map(|(name, map)| {
                map.iter().filter_map(Result::ok).map(move |(k, v)| (name, k, v))
            })
            .collect()
    }

    /// Deletes, in both maps, the entries keyed by `keys` (addresses that
    /// are gone) and every entry whose window has ended at `now` (on
    /// [`limits_clock_ns`]'s clock): one the programs would start afresh
    /// anyway. Returns how many went. A program may update an entry while
    /// it goes: at most that address's budget restarts early.
    pub fn forget_limits(
        &mut self,
        keys: &BTreeSet<u32>,
        now: u64,
    ) -> Result<usize, DataplaneError> {
        let events = forget_in(&mut self.event_limits, names::EVENT_LIMITS, keys, now)?;
        let rejects = forget_in(&mut self.reject_limits, names::REJECT_LIMITS, keys, now)?;
        Ok(events + rejects)
    }
}

/// [`Maps::forget_limits`] in one map.
fn forget_in(
    map: &mut HashMap<MapData, u32, EventLimit>,
    name: &'static str,
    keys: &BTreeSet<u32>,
    now: u64,
) -> Result<usize, DataplaneError> {
    let ended = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(key, limit)| !keys.contains(key) && window_ended(limit.window_start_ns, now))
        .map(|(key, _)| key)
        .collect::<Vec<_>>();
    let mut forgotten = 0;
    // The addresses' keys by name: an iteration racing the programs'
    // inserts and LRU evictions may skip an entry.
    for key in keys.iter().chain(&ended) {
        match map.remove(key) {
            Ok(()) => forgotten += 1,
            Err(e) if is_absent(&e) => {}
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    Ok(forgotten)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_is_the_monotonic_one() {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: valid out-pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let fine = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        let coarse = limits_clock_ns();
        // Coarse lags by at most a tick (4 ms at HZ=250; 100 ms of slack).
        assert!(coarse <= fine + 100_000_000 && fine - coarse < 100_000_000, "{coarse} {fine}");
    }
}
