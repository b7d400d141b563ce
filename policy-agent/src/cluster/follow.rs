//! Following the cluster: a thread watches the head of the change log in
//! etcd and applies what other agents commit, as it happens. A watch that
//! breaks (etcd restarted, unreachable, its revision compacted) is
//! re-established after reading whatever was missed: enforcement is never
//! cleared, and the agent catches up without a restart. The host
//! registration's keepalive (`hosts`) also catches up every few seconds, a
//! safety net should a watch stall.

use std::{thread, time::Duration};

use tracing::{info, warn};

use crate::{
    agent::{self, SharedAgent},
    etcd::{Etcd, EtcdError, prefix_end},
    state::State,
};

/// Called with the state, under the agent's lock, after changes from the
/// cluster were applied; what it returns runs after the lock is released
/// (the TLS listeners follow the state without entering namespaces under
/// the lock).
pub type OnChange = Box<dyn Fn(&State) -> Box<dyn FnOnce() + Send> + Send>;

/// Applies what is new; returns etcd's revision read up to.
pub fn catch_up(agent: &SharedAgent, on_change: &OnChange) -> Result<i64, String> {
    let mut agent = agent::lock(agent);
    let applied = agent.catch_up().map_err(|e| e.to_string())?;
    let after = (applied > 0).then(|| on_change(agent.state()));
    let revision = agent.position().revision;
    drop(agent);
    if let Some(after) = after {
        after();
    }
    Ok(revision)
}

/// Runs forever on its own thread.
pub fn follow(agent: SharedAgent, etcd: Etcd, watched_key: String, on_change: OnChange) {
    let end = prefix_end(&watched_key);
    read_and_watch(&etcd, &watched_key, &end, "the cluster state", || catch_up(&agent, &on_change))
}

/// Reads with `read` (which returns etcd's revision read at), then watches
/// the keys `key..end` from the next revision and reads again at every
/// change; forever. While etcd does not answer, what is known is kept and
/// the read retried (backing off to 2 s); a broken watch is set up again
/// after a fresh read. `what` names what is followed in the log.
pub fn read_and_watch<E: std::fmt::Display>(
    etcd: &Etcd,
    key: &str,
    end: &[u8],
    what: &str,
    mut read: impl FnMut() -> Result<i64, E>,
) {
    const FIRST_RETRY: Duration = Duration::from_millis(100);
    let mut retry = FIRST_RETRY;
    let mut healthy = true;
    loop {
        let revision = match read() {
            Ok(revision) => revision,
            Err(e) => {
                if healthy {
                    warn!(error = %e, "cannot read {what}; keeping what is known, retrying");
                    healthy = false;
                }
                thread::sleep(retry);
                retry = (retry * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        if !healthy {
            info!("reading {what} again");
            healthy = true;
        }
        retry = FIRST_RETRY;
        let watched = etcd.watch(key, end, revision + 1, |_| match read() {
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e, "cannot read {what}");
                false
            }
        });
        match watched {
            Ok(()) | Err(EtcdError::Compacted { .. }) => {}
            Err(e) => {
                warn!(error = %e, "the watch on {what} broke; re-reading");
                thread::sleep(retry);
            }
        }
    }
}
