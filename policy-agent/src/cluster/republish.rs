//! Recovery after the log in etcd diverged (restored from a backup, wiped,
//! replaced): `policy-agent cluster republish` publishes one agent's state —
//! what it enforces — as the newest state of the cluster, and every agent
//! converges to it (see `store::etcd::snapshots` for what is written and
//! `store::lineage` for why the others take it).
//!
//! Which agent: the most advanced one. The check here refuses a republish
//! from a host that another registered host is ahead of (its changes would
//! be lost) unless forced.

use super::hosts::HostRecord;

/// The newest change that the republished state must come after — this
/// host's, etcd's head, and every change any registered host reports
/// applied — or why this host must not republish. The rules:
///
/// 1. Another registered host reports a newer change applied than this
///    host: refused (it is further ahead; republish there), unless forced.
/// 2. The log is not diverged and its head is past this host: refused
///    (this host is behind, not ahead: it catches up by itself), unless
///    forced.
pub fn floor(
    me: &str,
    applied: u64,
    diverged: bool,
    head: u64,
    hosts: &[HostRecord],
    force: bool,
) -> Result<u64, String> {
    let ahead: Vec<String> = hosts
        .iter()
        .filter(|h| h.host != me && h.applied_seq > applied)
        .map(|h| format!("{} (change {})", h.host, h.applied_seq))
        .collect();
    if !force && !ahead.is_empty() {
        return Err(format!(
            "{} applied newer changes than this host ({me}, change {applied}): republish on \
             the most advanced host, or use --force to drop what only it has",
            ahead.join(", ")
        ));
    }
    if !force && !diverged && head > applied {
        return Err(format!(
            "etcd's change log is this host's and at change {head}, past this host's {applied}: \
             this host is behind, not ahead, and catches up by itself; use --force to drop \
             the newer changes"
        ));
    }
    let reported = hosts.iter().map(|h| h.applied_seq).max().unwrap_or(0);
    Ok(applied.max(head).max(reported))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, applied_seq: u64) -> HostRecord {
        HostRecord {
            host: name.into(),
            underlay_address: std::net::Ipv4Addr::new(10, 0, 0, 1),
            applied_seq,
            applied_revision: 0,
            reported_at: 0,
            subnet: None,
            vtep_mac: None,
            log_id: None,
            diverged: None,
        }
    }

    #[test]
    fn the_most_advanced_host_republishes_past_every_change_seen() {
        let hosts = [host("cell-0", 12), host("cell-1", 10)];
        assert_eq!(floor("cell-0", 12, true, 8, &hosts, false), Ok(12));
        // etcd's head past everyone (another log): still past it.
        assert_eq!(floor("cell-0", 12, true, 30, &hosts, false), Ok(30));
    }

    #[test]
    fn a_host_behind_another_is_refused_naming_it_unless_forced() {
        let hosts = [host("cell-0", 12), host("cell-1", 10), host("cell-2", 11)];
        let refused = floor("cell-1", 10, true, 8, &hosts, false).unwrap_err();
        assert!(refused.contains("cell-0 (change 12), cell-2 (change 11)"), "{refused}");
        assert!(refused.contains("--force"), "{refused}");
        assert_eq!(floor("cell-1", 10, true, 8, &hosts, true), Ok(12));
    }

    #[test]
    fn a_host_behind_its_own_log_is_refused() {
        let refused = floor("cell-0", 5, false, 9, &[host("cell-0", 5)], false).unwrap_err();
        assert!(refused.contains("behind"), "{refused}");
        assert_eq!(floor("cell-0", 5, false, 5, &[host("cell-0", 5)], false), Ok(5));
        assert_eq!(floor("cell-0", 5, false, 9, &[], true), Ok(9));
    }
}
