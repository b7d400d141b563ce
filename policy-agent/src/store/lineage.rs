//! Whether the change log in etcd is still the one this host applied: the
//! check that keeps a restored backup, a wiped etcd or another cluster's log
//! from ever reaching the kernel.
//!
//! Each agent remembers the newest change it applied ([`Applied`]: its
//! number, the log's identity, and the change's own random stamp) in its
//! state directory. Each read of the log (at start and at every catch-up)
//! compares that with what etcd holds ([`Seen`]) — a pure function, here,
//! tested on the host. A log that diverged is not followed: the agent keeps
//! enforcing what it has and refuses writes until an operator republishes
//! the newest state (`policy-agent cluster republish`).

use serde::{Deserialize, Serialize};

/// A change log's identity: `log/id` in etcd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogId {
    /// Random (128 bits, hex).
    pub id: String,
    /// The change the log starts after: 0 for a log begun by its first
    /// change, N for one republished as a snapshot at change N. A
    /// republished log supersedes every log whose newest change is before N.
    #[serde(default)]
    pub base: u64,
    /// The host whose agent began it.
    #[serde(default)]
    pub host: String,
}

impl LogId {
    /// A new identity for a log starting after change `base`, begun by `host`.
    pub fn new(base: u64, host: &str) -> Self {
        Self { id: format!("{:032x}", rand::random::<u128>()), base, host: host.to_owned() }
    }

    /// The first characters of the id: enough to tell logs apart in messages.
    pub fn short(id: &str) -> &str {
        id.get(..8).unwrap_or(id)
    }
}

/// A republish done: this host's state published as the newest of the
/// cluster (see `cluster::republish` for which host may).
#[derive(Clone, Debug, Serialize)]
pub struct Republished {
    /// The change the republished state stands at.
    pub seq: u64,
    /// The new log's identity (its `base` is `seq`).
    pub log: LogId,
    /// What this host had applied before.
    pub previous: Applied,
}

/// What this host remembers of the newest change it applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Its number (0: nothing applied yet).
    pub seq: u64,
    /// The id of the log it belongs to (None: applied before logs had ids).
    #[serde(default, rename = "log_id")]
    pub log: Option<String>,
    /// The change's own random stamp (None: a snapshot's position, or a
    /// change written before changes had stamps).
    #[serde(default)]
    pub stamp: Option<u64>,
}

/// What etcd holds, as far as the check needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// `log/head` (None: no log).
    pub head: Option<u64>,
    /// `log/id` (None: none written).
    pub log: Option<LogId>,
    /// The change at the remembered number: None if it is not there
    /// (compacted, or never written); `Some(None)` if it has no stamp.
    pub entry: Option<Option<u64>>,
}

/// How the log in etcd relates to what this host applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The same log, at or past what this host applied: follow it.
    Follows,
    /// A log republished from a state newer than anything this host
    /// applied: load it whole (its snapshot and what follows) and reconcile
    /// the kernel to it, make-before-break.
    Supersedes,
    /// Not the log this host applied: keep what it has, refuse writes.
    Diverged(Divergence),
}

/// Why the log in etcd is not the one this host applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Divergence {
    /// The head is older than the newest change this host applied.
    RolledBack { applied: u64, head: u64 },
    /// There is no log, but this host applied changes of one.
    Wiped { applied: u64 },
    /// etcd holds a log of another identity that does not supersede this
    /// host's.
    AnotherLog { applied: u64, ours: Option<String>, theirs: Option<LogId> },
    /// The change at this host's number is not the one it applied: the log
    /// went back and was written again.
    Rewritten { applied: u64 },
}

/// Every cause, as `cause()` names it (the metric's label values).
pub const CAUSES: [&str; 4] = ["rolled_back", "wiped", "another_log", "rewritten"];

const RECOVER: &str = "run `policy-agent cluster republish` on the most advanced host";

impl Divergence {
    /// A short name: `rolled_back`, `wiped`, `another_log`, `rewritten`.
    pub fn cause(&self) -> &'static str {
        match self {
            Divergence::RolledBack { .. } => CAUSES[0],
            Divergence::Wiped { .. } => CAUSES[1],
            Divergence::AnotherLog { .. } => CAUSES[2],
            Divergence::Rewritten { .. } => CAUSES[3],
        }
    }
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Divergence::RolledBack { applied, head } => write!(
                f,
                "etcd's change log went back from {applied} to {head} (restored from a backup?); {RECOVER}"
            ),
            Divergence::Wiped { applied } => write!(
                f,
                "etcd's change log is gone while this host applied {applied} changes of it \
                 (etcd wiped, or started on an empty data directory?); {RECOVER}"
            ),
            Divergence::AnotherLog { applied, ours, theirs } => {
                let ours = ours.as_deref().map_or("(no id)", LogId::short);
                let theirs = theirs.as_ref().map_or_else(
                    || "one without an id".to_owned(),
                    |t| {
                        format!(
                            "{} (begun by {:?} after change {})",
                            LogId::short(&t.id),
                            t.host,
                            t.base
                        )
                    },
                );
                write!(
                    f,
                    "etcd holds another change log, {theirs}, than the one this host applied \
                     {applied} changes of ({ours}) (etcd replaced, or another cluster under this \
                     prefix?); {RECOVER}"
                )
            }
            Divergence::Rewritten { applied } => write!(
                f,
                "etcd's change {applied} is not the one this host applied (the log went back \
                 and was written again?); {RECOVER}"
            ),
        }
    }
}

/// Whether to follow the log etcd holds. The rules, in order:
///
/// 1. Nothing applied yet: follow whatever is there (a new host).
/// 2. No head while this host applied changes: the log was wiped.
/// 3. A log of another identity than the remembered one (or none, where
///    one is remembered): if it was republished after a change newer than
///    this host's newest (its `base` past it), it supersedes this host's
///    state; otherwise it is another log. (No remembered id — a copy from
///    before logs had ids — takes etcd's and goes on.)
/// 4. A head before this host's newest change: rolled back.
/// 5. The change at this host's number carries another stamp than the one
///    applied (both known): rewritten — the log went back, then forward
///    again to the same number with other changes.
/// 6. Otherwise: follow.
pub fn check(applied: &Applied, seen: &Seen) -> Verdict {
    let seq = applied.seq;
    if seq == 0 {
        return Verdict::Follows;
    }
    let Some(head) = seen.head else {
        return Verdict::Diverged(Divergence::Wiped { applied: seq });
    };
    if let Some(ours) = &applied.log
        && seen.log.as_ref().is_none_or(|theirs| theirs.id != *ours)
    {
        return match &seen.log {
            Some(theirs) if theirs.base > seq => Verdict::Supersedes,
            theirs => Verdict::Diverged(Divergence::AnotherLog {
                applied: seq,
                ours: Some(ours.clone()),
                theirs: theirs.clone(),
            }),
        };
    }
    if head < seq {
        return Verdict::Diverged(Divergence::RolledBack { applied: seq, head });
    }
    if let (Some(ours), Some(Some(theirs))) = (applied.stamp, seen.entry)
        && ours != theirs
    {
        return Verdict::Diverged(Divergence::Rewritten { applied: seq });
    }
    Verdict::Follows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(id: &str, base: u64) -> LogId {
        LogId { id: id.into(), base, host: "cell-0".into() }
    }

    fn applied(seq: u64, id: &str, stamp: u64) -> Applied {
        Applied { seq, log: Some(id.into()), stamp: Some(stamp) }
    }

    fn seen(head: u64, id: &str, base: u64, stamp: Option<u64>) -> Seen {
        Seen { head: Some(head), log: Some(log(id, base)), entry: stamp.map(Some) }
    }

    fn cause(verdict: Verdict) -> &'static str {
        match verdict {
            Verdict::Diverged(d) => d.cause(),
            other => panic!("not diverged: {other:?}"),
        }
    }

    #[test]
    fn the_same_log_at_or_past_what_was_applied_is_followed() {
        let me = applied(10, "a", 7);
        assert_eq!(check(&me, &seen(10, "a", 0, Some(7))), Verdict::Follows);
        assert_eq!(check(&me, &seen(12, "a", 0, Some(7))), Verdict::Follows);
        // The entry compacted away (a snapshot covers it): nothing to compare.
        assert_eq!(check(&me, &seen(2000, "a", 0, None)), Verdict::Follows);
        // A change written before stamps existed.
        let old = Seen { entry: Some(None), ..seen(10, "a", 0, None) };
        assert_eq!(check(&me, &old), Verdict::Follows);
    }

    #[test]
    fn a_new_host_follows_anything() {
        assert_eq!(check(&Applied::default(), &Seen::default()), Verdict::Follows);
        assert_eq!(check(&Applied::default(), &seen(5, "x", 0, None)), Verdict::Follows);
    }

    #[test]
    fn a_head_before_what_was_applied_is_a_rollback() {
        let verdict = check(&applied(10, "a", 7), &seen(8, "a", 0, None));
        assert_eq!(verdict, Verdict::Diverged(Divergence::RolledBack { applied: 10, head: 8 }));
        let Verdict::Diverged(d) = verdict else { unreachable!() };
        let message = d.to_string();
        assert!(message.contains("went back from 10 to 8"), "{message}");
        assert!(message.contains("policy-agent cluster republish"), "{message}");
    }

    #[test]
    fn no_log_after_changes_were_applied_is_a_wipe() {
        assert_eq!(cause(check(&applied(10, "a", 7), &Seen::default())), "wiped");
        // Even with an id left behind.
        let half = Seen { head: None, log: Some(log("a", 0)), entry: None };
        assert_eq!(cause(check(&applied(10, "a", 7), &half)), "wiped");
    }

    #[test]
    fn another_identity_is_another_log_unless_republished_past_this_host() {
        let me = applied(10, "a", 7);
        assert_eq!(cause(check(&me, &seen(30, "b", 0, None))), "another_log");
        // Republished from a state at or before this host's: this host has
        // changes it would lose.
        assert_eq!(cause(check(&me, &seen(30, "b", 10, None))), "another_log");
        assert_eq!(check(&me, &seen(11, "b", 11, None)), Verdict::Supersedes);
        // A log without an id where one is remembered: etcd was replaced.
        let anonymous = Seen { log: None, ..seen(12, "a", 0, None) };
        assert_eq!(cause(check(&me, &anonymous)), "another_log");
        // No id remembered (a copy from before ids): etcd's is taken.
        let unnamed = Applied { log: None, ..me };
        assert_eq!(check(&unnamed, &seen(10, "b", 0, Some(7))), Verdict::Follows);
        assert_eq!(cause(check(&unnamed, &seen(9, "b", 0, None))), "rolled_back");
    }

    #[test]
    fn the_same_number_with_another_change_is_a_rewrite() {
        let me = applied(10, "a", 7);
        assert_eq!(cause(check(&me, &seen(10, "a", 0, Some(8)))), "rewritten");
        assert_eq!(cause(check(&me, &seen(15, "a", 0, Some(8)))), "rewritten");
        let stampless = Applied { stamp: None, ..me };
        assert_eq!(check(&stampless, &seen(15, "a", 0, Some(8))), Verdict::Follows);
    }

    #[test]
    fn every_cause_is_listed_and_named_once() {
        let all = [
            Divergence::RolledBack { applied: 2, head: 1 },
            Divergence::Wiped { applied: 2 },
            Divergence::AnotherLog { applied: 2, ours: None, theirs: None },
            Divergence::Rewritten { applied: 2 },
        ];
        assert_eq!(all.map(|d| d.cause()), CAUSES);
    }
}
