//! The loop both pollers of the policy server run (policies, and
//! security groups): at once, then every interval, backing off while the
//! server fails, and at once when forced (a forced poll is waited for);
//! each outcome recorded in the status `status` and `/metrics` show.

use std::{
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tracing::{info, warn};

use super::{ServerError, follow::FetchedSet};

/// The longest wait between two tries while the server fails.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// One poll of the policy server; `forced`: asked for, not due.
pub trait Poll {
    fn poll(&mut self, forced: bool) -> Result<(), CycleError>;
}

/// The follower as `status` and `/metrics` show it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FollowStatus {
    pub url: String,
    /// What is polled: `policies` or `security_groups`.
    pub what: &'static str,
    /// `following`: the last try succeeded; `failing`: it failed and
    /// enforcement is as it was; `starting`: nothing tried yet.
    pub state: &'static str,
    pub poll_interval_seconds: f64,
    /// Seconds since the epoch of the last successful poll.
    pub last_success: Option<f64>,
    pub consecutive_failures: u64,
    pub last_error: Option<FollowError>,
    /// The set in force (also after a restart, from `policy-server.json`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set: Option<FetchedSet>,
    /// Security groups in the last answer (the security groups' poller).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub security_groups: Option<usize>,
    /// Failures by kind since the start.
    #[serde(skip)]
    pub failures: std::collections::BTreeMap<&'static str, u64>,
    /// Seconds the last poll that fetched policies took (fetch and apply).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_poll_seconds: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FollowError {
    pub at: f64,
    pub kind: &'static str,
    pub message: String,
}

impl FollowStatus {
    /// Seconds since the set in force was fetched.
    pub fn set_age(&self) -> Option<f64> {
        self.set.as_ref().map(|s| (now() - s.fetched_at).max(0.0))
    }
}

pub type SharedStatus = Arc<Mutex<FollowStatus>>;

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(super) fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Forced polls: asked (a count) and done (the count a finished cycle
/// started with).
#[derive(Default)]
struct Requests {
    asked: u64,
    done: u64,
    stop: bool,
}

/// What the rest of the agent holds of a poller: a way to force a poll
/// and wait for it, and to stop it.
#[derive(Clone, Default)]
pub struct PollHandle {
    requests: Arc<(Mutex<Requests>, Condvar)>,
}

impl PollHandle {
    /// Runs a poll now (bypassing `policies_last_updated`) and waits for
    /// it to finish, at most `timeout`. Returns whether it finished.
    pub fn force(&self, timeout: Duration) -> bool {
        let (lock_, wake) = &*self.requests;
        let mut r = lock(lock_);
        r.asked += 1;
        let wanted = r.asked;
        wake.notify_all();
        let deadline = Instant::now() + timeout;
        while r.done < wanted && !r.stop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            r = wake.wait_timeout(r, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        r.done >= wanted
    }

    pub fn stop(&self) {
        let (lock_, wake) = &*self.requests;
        lock(lock_).stop = true;
        wake.notify_all();
    }
}

/// Polls with `poller` until `handle` is stopped.
pub fn run(poller: &mut impl Poll, handle: &PollHandle, status: &SharedStatus, interval: Duration) {
    let mut next = Instant::now();
    loop {
        let forced_upto = {
            let (lock_, wake) = &*handle.requests;
            let mut r = lock(lock_);
            while !r.stop && r.asked == r.done && Instant::now() < next {
                let left = next.saturating_duration_since(Instant::now());
                r = wake.wait_timeout(r, left).unwrap_or_else(|p| p.into_inner()).0;
            }
            if r.stop {
                return;
            }
            (r.asked > r.done).then_some(r.asked)
        };
        let failures = match cycle(poller, status, forced_upto.is_some()) {
            Ok(()) => 0,
            Err(()) => lock(status).consecutive_failures,
        };
        if let Some(asked) = forced_upto {
            let (lock_, wake) = &*handle.requests;
            lock(lock_).done = asked;
            wake.notify_all();
        }
        next = Instant::now() + backoff(interval, failures);
    }
}

/// One cycle; failures are recorded in the status and logged.
fn cycle(poller: &mut impl Poll, status: &SharedStatus, forced: bool) -> Result<(), ()> {
    match poller.poll(forced) {
        Ok(()) => {
            let mut s = lock(status);
            if s.state == "failing" {
                info!(url = s.url, what = s.what, "the policy server answers again");
            }
            s.state = "following";
            s.last_success = Some(now());
            s.consecutive_failures = 0;
            Ok(())
        }
        Err(e) => {
            let kind = e.kind();
            let message = e.to_string();
            let mut s = lock(status);
            s.state = "failing";
            s.consecutive_failures += 1;
            *s.failures.entry(kind).or_default() += 1;
            // Every failure at first, then one in ten: a long outage
            // does not flood the log.
            if s.consecutive_failures <= 3 || s.consecutive_failures.is_multiple_of(10) {
                warn!(
                    kind,
                    what = s.what,
                    failures = s.consecutive_failures,
                    set_age_seconds = s.set_age().map(|a| a.round()),
                    "{message}; enforcement is left as it is"
                );
            }
            s.last_error = Some(FollowError { at: now(), kind, message });
            Err(())
        }
    }
}

/// Why a cycle failed: the server, or the agent's write of its answer.
#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("the policies from the policy server could not be put in force: {0}")]
    Apply(crate::agent::AgentError),
    #[error("container metadata store: {0}")]
    Store(String),
    #[error("iptables: {0}")]
    Iptables(String),
    #[error("silk's overlay: {0}")]
    Overlay(String),
}

impl CycleError {
    pub fn kind(&self) -> &'static str {
        match self {
            CycleError::Server(e) => e.kind(),
            CycleError::Apply(_) => "apply",
            CycleError::Store(_) => "metadata_store",
            CycleError::Iptables(_) => "iptables",
            CycleError::Overlay(_) => "overlay",
        }
    }
}

/// The wait before the next try: the interval, doubled for each failure
/// in a row, at most [`MAX_BACKOFF`] (never below the interval).
pub fn backoff(interval: Duration, failures: u64) -> Duration {
    let doubled = interval.saturating_mul(1 << failures.min(16) as u32);
    doubled.min(MAX_BACKOFF.max(interval))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_to_a_ceiling() {
        let s = Duration::from_secs(1);
        assert_eq!(backoff(s, 0), s);
        assert_eq!(backoff(s, 1), Duration::from_secs(2));
        assert_eq!(backoff(s, 3), Duration::from_secs(8));
        assert_eq!(backoff(s, 10), MAX_BACKOFF);
        assert_eq!(backoff(s, 1000), MAX_BACKOFF);
        // An interval above the ceiling is kept.
        assert_eq!(backoff(Duration::from_secs(60), 5), Duration::from_secs(60));
        assert_eq!(backoff(s, 4), MAX_BACKOFF);
    }
}
