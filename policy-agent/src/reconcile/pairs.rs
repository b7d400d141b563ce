//! `POLICIES`, one entry per app pair and protocol: the pairs a policy
//! change touches, read before it and written after it, adds and changes
//! before removals, all or nothing.

use std::collections::BTreeSet;

use policy_common::{maps::PairKey, ports::Allowance};
use tracing::warn;

use super::Kernel;
use crate::{
    DataplaneError,
    state::{AppName, Policy, Protocol, State},
};

/// An app pair and protocol, by app id.
pub type AppPair = (AppName, AppName, Protocol);

/// One pair entry to write: key, its old allowances, its new ones.
pub type PairChange = (PairKey, Vec<Allowance>, Vec<Allowance>);

/// The app pairs (and protocols) a policy change touches.
pub fn touched(policies: &[Policy]) -> BTreeSet<AppPair> {
    policies.iter().map(|p| (p.source.clone(), p.destination.clone(), p.protocol)).collect()
}

pub(super) fn same_allowances(have: Option<&Vec<Allowance>>, want: &[Allowance]) -> bool {
    let Some(have) = have else { return false };
    let triple = |a: &Allowance| (a.start, a.end, a.policy_id);
    // Most pairs have one or two ranges: compared without allocating.
    match (have.as_slice(), want) {
        (h, w) if h.len() != w.len() => return false,
        ([h], [w]) => return triple(h) == triple(w),
        ([h0, h1], [w0, w1]) => {
            let (h0, h1, w0, w1) = (triple(h0), triple(h1), triple(w0), triple(w1));
            return (h0.min(h1), h0.max(h1)) == (w0.min(w1), w0.max(w1));
        }
        _ => {}
    }
    let sorted = |v: &[Allowance]| {
        let mut v: Vec<_> = v.iter().map(|a| (a.start, a.end, a.policy_id)).collect();
        v.sort_unstable();
        v
    };
    sorted(have) == sorted(want)
}

/// Writes pair changes, adds and changes first, removals last. On error,
/// every pair already written is restored and the error returned.
fn write_pairs<K: Kernel>(
    kernel: &mut K,
    changes: &mut [PairChange],
) -> Result<(), DataplaneError> {
    // New pairs (in one write where the kernel can), then changed ones,
    // then those that go.
    changes.sort_by_key(|(_, old, new)| (new.is_empty(), !old.is_empty()));
    let fresh = changes.iter().take_while(|(_, old, new)| old.is_empty() && !new.is_empty());
    let fresh = fresh.count();
    let gone = changes.iter().position(|(_, _, new)| new.is_empty()).unwrap_or(changes.len());
    kernel.add_pairs(&changes[..fresh])?;
    let failed = 'write: {
        for (i, (key, _, new)) in changes.iter().enumerate().take(gone).skip(fresh) {
            if let Err(err) = kernel.set_pair(*key, new) {
                break 'write Some((i, err));
            }
        }
        kernel.remove_pairs(&changes[gone..]).err().map(|err| (gone, err))
    };
    let Some((written, err)) = failed else { return Ok(()) };
    for (key, old, _) in changes[..written].iter().rev() {
        if let Err(undo) = kernel.set_pair(*key, old) {
            warn!(error = %undo, "rolling back a policy pair failed");
        }
    }
    Err(err)
}

/// Writes every pair that differs between two states (walks all policies:
/// for tests and small states; a change writes [`touched_pairs`]).
pub fn pairs<K: Kernel>(kernel: &mut K, old: &State, new: &State) -> Result<(), DataplaneError> {
    let (old_pairs, new_pairs) = (old.pairs(), new.pairs());
    let mut changes: Vec<PairChange> = new_pairs
        .iter()
        .filter(|(k, v)| !same_allowances(old_pairs.get(k), v))
        .map(|(k, v)| (*k, old_pairs.get(k).cloned().unwrap_or_default(), v.clone()))
        .collect();
    changes.extend(
        old_pairs
            .iter()
            .filter(|(k, _)| !new_pairs.contains_key(k))
            .map(|(k, v)| (*k, v.clone(), Vec::new())),
    );
    write_pairs(kernel, &mut changes)
}

/// The pairs a change will touch as they were before it: allowances and
/// the apps' tags (a removal may take an app's tag away).
#[derive(Debug)]
pub struct PairsBefore(Vec<PairBefore>);

/// A pair, its allowances, and its source and destination apps' tags.
type PairBefore = (AppPair, Vec<Allowance>, Option<u32>, Option<u32>);

/// Reads the touched pairs before the change: range queries, so the cost is
/// proportional to the change, not to the number of policies.
pub fn before_change(state: &State, touched: BTreeSet<AppPair>) -> PairsBefore {
    PairsBefore(
        touched
            .into_iter()
            .map(|pair| {
                let allowances = state.pair_allowances(&pair.0, &pair.1, pair.2);
                let (src, dst) = (state.tag(&pair.0), state.tag(&pair.1));
                (pair, allowances, src, dst)
            })
            .collect(),
    )
}

/// Writes the touched pairs that differ between `before` and `state` now;
/// returns what it wrote, for [`undo_pairs`]. On error nothing stays written.
pub fn touched_pairs<K: Kernel>(
    kernel: &mut K,
    state: &State,
    before: &PairsBefore,
) -> Result<Vec<PairChange>, DataplaneError> {
    let mut changes = Vec::new();
    for ((source, destination, protocol), old, old_src, old_dst) in &before.0 {
        let after = state.pair_allowances(source, destination, *protocol);
        if same_allowances(Some(old), &after) {
            continue;
        }
        let (Some(src), Some(dst)) =
            (state.tag(source).or(*old_src), state.tag(destination).or(*old_dst))
        else {
            continue;
        };
        changes.push((PairKey::new(src, dst, protocol.number()), old.clone(), after));
    }
    write_pairs(kernel, &mut changes)?;
    Ok(changes)
}

/// Puts back what [`touched_pairs`] wrote (best effort: failures are
/// logged; the next start reconciles).
pub fn undo_pairs<K: Kernel>(kernel: &mut K, written: Vec<PairChange>) {
    let mut reverse: Vec<PairChange> =
        written.into_iter().map(|(key, old, new)| (key, new, old)).collect();
    if let Err(e) = write_pairs(kernel, &mut reverse) {
        warn!(error = %e, "undoing policy pairs failed");
    }
}
