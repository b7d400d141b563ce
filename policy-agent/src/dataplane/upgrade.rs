//! What older versions pinned in another layout, carried over when this
//! version loads over their maps.

use std::{fs, path::Path};

use aya::maps::{Array, HashMap, Map, MapData, MapType, PerCpuHashMap};
use log::warn;
use policy_common::{
    maps::{Config, PairKey, PairPorts, PolicyCounters, PortRange, names},
    ports::Allowance,
};

use crate::DataplaneError;

/// The values a version before `CONFIG` pinned as single-value arrays
/// (`names::LEGACY_CONFIG`), if it did: the epoch, the tunnel and the
/// NetIn/NetOut counts as they are, and the overlay (the network whose
/// slots `set_overlay` clears if the configured one differs). The settings
/// are not read: every load writes them.
pub(super) fn legacy_config(maps_dir: &Path) -> Option<Config> {
    let [epoch, _settings, overlay, tunnel, netin, netout] = names::LEGACY_CONFIG;
    let epoch = read_pinned::<u32>(maps_dir, epoch)?;
    Some(Config {
        epoch,
        netin_mappings: read_pinned(maps_dir, netin).unwrap_or(0),
        netout_apps: read_pinned(maps_dir, netout).unwrap_or(0),
        _pad: 0,
        overlay: read_pinned(maps_dir, overlay).unwrap_or_default(),
        tunnel: read_pinned(maps_dir, tunnel).unwrap_or_default(),
        settings: Default::default(),
    })
}

/// Entry 0 of the array pinned as `maps_dir/name`, if it is one of `T`s.
fn read_pinned<T: aya::Pod>(maps_dir: &Path, name: &str) -> Option<T> {
    let data = MapData::from_pin(maps_dir.join(name)).ok()?;
    let array = Array::<MapData, T>::try_from(Map::from_map_data(data).ok()?).ok()?;
    array.get(&0, 0).ok()
}

/// Pairs and their allowances, as `Maps::set_pair` takes them.
type Pairs = Vec<(PairKey, Vec<Allowance>)>;

/// Most ranges a pair held before `PORT_SETS`.
const WHOLE_PAIR_RANGES: usize = 16;

/// A `POLICIES` value of the versions before `PORT_SETS`: each pair's
/// ranges, all of them, in its entry (200 bytes whatever it held).
#[repr(C)]
#[derive(Clone, Copy)]
struct WholePair {
    len: u32,
    _pad: u32,
    ranges: [PortRange; WHOLE_PAIR_RANGES],
}
const _: () = assert!(size_of::<WholePair>() == 200);

// SAFETY: `#[repr(C)]`, integers and an array of `Pod` structs, no implicit
// padding (size asserted above).
unsafe impl aya::Pod for WholePair {}

/// If the pinned `POLICIES` is an older version's (whole pairs in each
/// value), its pairs, and the pin removed so that this load creates
/// `POLICIES` and `PORT_SETS` anew; the caller writes the pairs into them
/// before the new programs take over the links (the old programs keep the
/// old map until then). `None`: nothing to carry over.
pub(super) fn take_whole_pairs(maps_dir: &Path) -> Result<Option<Pairs>, DataplaneError> {
    let pin = maps_dir.join(names::POLICIES);
    let Ok(data) = MapData::from_pin(&pin) else {
        return Ok(None);
    };
    let value_size = data.info().map(|i| i.value_size() as usize).unwrap_or(0);
    if value_size == size_of::<PairPorts>() {
        return Ok(None);
    }
    let mut pairs = Vec::new();
    if value_size == size_of::<WholePair>() {
        let map = Map::from_map_data(data).ok();
        let whole = map.and_then(|m| HashMap::<MapData, PairKey, WholePair>::try_from(m).ok());
        for (key, value) in whole.iter().flat_map(|m| m.iter().filter_map(Result::ok)) {
            let len = (value.len as usize).min(WHOLE_PAIR_RANGES);
            let allowances = value.ranges[..len]
                .iter()
                .map(|r| Allowance { start: r.start, end: r.end, policy_id: r.policy_id })
                .collect();
            pairs.push((key, allowances));
        }
    } else {
        // No version wrote this: the full reconcile writes every pair.
        warn!("the pinned {} has {value_size}-byte values: made anew", names::POLICIES);
    }
    fs::remove_file(&pin).map_err(DataplaneError::io("cannot replace", &pin))?;
    Ok(Some(pairs))
}

/// If the pinned `POLICY_STATS` is an older version's (a per-CPU hash), each
/// policy's counts summed over CPUs, and the pin removed so that this load
/// creates the shared map; the caller writes them into it. Packets the old
/// programs count between this read and the links' move are not carried.
/// `None`: nothing to carry over.
pub(super) fn take_per_cpu_counters(
    maps_dir: &Path,
) -> Result<Option<Vec<(u32, PolicyCounters)>>, DataplaneError> {
    let pin = maps_dir.join(names::POLICY_STATS);
    let Ok(data) = MapData::from_pin(&pin) else {
        return Ok(None);
    };
    if !matches!(data.info().and_then(|i| i.map_type()), Ok(MapType::PerCpuHash)) {
        return Ok(None);
    }
    let map = Map::from_map_data(data).ok();
    let per_cpu = map.and_then(|m| PerCpuHashMap::<MapData, u32, PolicyCounters>::try_from(m).ok());
    let counts = per_cpu
        .iter()
        .flat_map(|m| m.iter().filter_map(Result::ok))
        .map(|(id, values)| {
            let sum = values.iter().fold(PolicyCounters::default(), |acc, c| PolicyCounters {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            });
            (id, sum)
        })
        .collect();
    fs::remove_file(&pin).map_err(DataplaneError::io("cannot replace", &pin))?;
    Ok(Some(counts))
}
