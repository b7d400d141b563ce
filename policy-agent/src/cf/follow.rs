//! The poll loop: the policy server's policies for this host's apps, into
//! the agent (as vxlan-policy-agent's policy poller, faster).
//!
//! Each cycle asks `policies_last_updated` and fetches
//! `policies?id=APP,...,SPACE,...` only when it grew, when the host's set
//! of apps changed, or when forced (a container registered: its
//! policies hold before the registration is answered). No containers
//! here: nothing is asked and no policy is in force, as in Cloud Foundry.
//!
//! Fail-static: the server unreachable, answering an error or refusing
//! the certificate changes nothing in force. The set in force is the
//! agent's stored state (journaled like any change), so an agent
//! restarted while the server is down enforces it at once; `status`
//! says how old it is and why (`policy-server.json` in the state
//! directory keeps when it was fetched). Failures back off from the
//! poll interval to [`MAX_BACKOFF`]; a forced poll does not wait.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::{CfConfig, PolicyServerClient, ServerError};
use crate::agent::{self, SharedAgent};

/// The longest wait between two tries while the server fails.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The file in the state directory that says when the set in force was
/// fetched.
pub const SET_FILE: &str = "policy-server.json";

/// When the set in force was fetched, and what it held.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FetchedSet {
    /// Seconds since the epoch.
    pub fetched_at: f64,
    /// The server's `policies_last_updated` then.
    pub last_updated: i64,
    pub policies: usize,
    pub apps: usize,
    /// Policies the server served that the agent could not take.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

/// The follower as `status` and `/metrics` show it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FollowStatus {
    pub url: String,
    /// `following`: the last try succeeded; `failing`: it failed and
    /// enforcement is as it was; `starting`: nothing tried yet.
    pub state: &'static str,
    pub poll_interval_seconds: f64,
    /// Seconds since the epoch of the last successful poll.
    pub last_success: Option<f64>,
    pub consecutive_failures: u64,
    pub last_error: Option<FollowError>,
    /// The set in force (also after a restart, from `policy-server.json`).
    pub set: Option<FetchedSet>,
    /// Failures by kind since the start.
    #[serde(skip)]
    pub failures: std::collections::BTreeMap<&'static str, u64>,
    /// Seconds the last full poll (fetch and apply) took.
    #[serde(skip)]
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now() -> f64 {
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

/// What the rest of the agent holds of the follower: a way to force a
/// poll and wait for it, and to stop it.
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

pub struct Follower {
    client: PolicyServerClient,
    agent: SharedAgent,
    status: SharedStatus,
    interval: Duration,
    handle: PollHandle,
    set_file: PathBuf,
    /// The `policies_last_updated` and apps of the set in force (None
    /// before the first fetch since the start: the first poll fetches).
    fetched: Option<(i64, BTreeSet<String>)>,
    /// Poll durations into `policyServerPollTime`.
    poll_time: Option<prometheus_client::metrics::histogram::Histogram>,
    /// The cell's containers from CF's metadata store (`cni_datastore_path`).
    containers: Option<super::containers::StoreFollower>,
}

impl Follower {
    /// The follower of `cf`'s policy server for `agent`; reads the client
    /// files now (a missing or wrong one stops the start, naming it).
    pub fn new(
        cf: &CfConfig,
        agent: SharedAgent,
        state_dir: &std::path::Path,
    ) -> Result<Self, ServerError> {
        let client = PolicyServerClient::new(cf)?;
        let set_file = state_dir.join(SET_FILE);
        let set = std::fs::read(&set_file)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<FetchedSet>(&bytes).ok());
        let status = FollowStatus {
            url: client.url().to_owned(),
            state: "starting",
            poll_interval_seconds: cf.poll_interval.as_secs_f64(),
            set,
            ..FollowStatus::default()
        };
        Ok(Self {
            client,
            agent,
            status: Arc::new(Mutex::new(status)),
            interval: cf.poll_interval,
            handle: PollHandle::default(),
            set_file,
            fetched: None,
            poll_time: None,
            containers: cf
                .cni_datastore_path
                .as_deref()
                .map(|path| super::containers::StoreFollower::new(path, state_dir)),
        })
    }

    pub fn status(&self) -> SharedStatus {
        self.status.clone()
    }

    pub fn handle(&self) -> PollHandle {
        self.handle.clone()
    }

    /// Observes each full poll's duration into `histogram`.
    pub fn time_polls(&mut self, histogram: prometheus_client::metrics::histogram::Histogram) {
        self.poll_time = Some(histogram);
    }

    /// Polls until stopped: at once, then every interval (backing off
    /// while the server fails), and whenever forced.
    pub fn run(mut self) {
        let mut next = Instant::now();
        loop {
            let forced_upto = {
                let (lock_, wake) = &*self.handle.requests;
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
            let failures = match self.cycle(forced_upto.is_some()) {
                Ok(()) => 0,
                Err(()) => lock(&self.status).consecutive_failures,
            };
            if let Some(asked) = forced_upto {
                let (lock_, wake) = &*self.handle.requests;
                lock(lock_).done = asked;
                wake.notify_all();
            }
            next = Instant::now() + backoff(self.interval, failures);
        }
    }

    /// One cycle; failures are recorded in the status and logged.
    fn cycle(&mut self, forced: bool) -> Result<(), ()> {
        match self.poll(forced) {
            Ok(()) => {
                let mut s = lock(&self.status);
                if s.state == "failing" {
                    info!(url = s.url, "the policy server answers again");
                }
                s.state = "following";
                s.last_success = Some(now());
                s.consecutive_failures = 0;
                Ok(())
            }
            Err(e) => {
                let kind = e.kind();
                let message = e.to_string();
                let mut s = lock(&self.status);
                s.state = "failing";
                s.consecutive_failures += 1;
                *s.failures.entry(kind).or_default() += 1;
                // Every failure at first, then one in ten: a long outage
                // does not flood the log.
                if s.consecutive_failures <= 3 || s.consecutive_failures.is_multiple_of(10) {
                    warn!(
                        kind,
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

    fn poll(&mut self, forced: bool) -> Result<(), CycleError> {
        let mut spaces = BTreeSet::new();
        if let Some(containers) = &mut self.containers {
            containers.sync(&self.agent).map_err(CycleError::Store)?;
            spaces = containers.spaces();
        }
        // The ids vxlan-policy-agent sends: each local container's app and
        // space (the server matches both against policy ends).
        let mut ids: BTreeSet<String> = {
            let agent = agent::lock(&self.agent);
            agent.state().local_endpoints().map(|e| e.app.clone()).collect()
        };
        if !ids.is_empty() {
            ids.extend(spaces);
        }
        if ids.is_empty() {
            // Nothing here to police: no request, no policy in force.
            self.apply(0, &ids, super::wire::ServerSet::default(), Instant::now())?;
            return Ok(());
        }
        let started = Instant::now();
        let last_updated = self.client.last_updated()?;
        let unchanged =
            self.fetched.as_ref().is_some_and(|(seen, apps)| last_updated <= *seen && *apps == ids);
        if unchanged && !forced {
            debug!(last_updated, "policies unchanged at the policy server");
            return Ok(());
        }
        let listed: Vec<String> = ids.iter().cloned().collect();
        let set = self.client.policies(&listed)?.into_set();
        self.apply(last_updated, &ids, set, started)
    }

    fn apply(
        &mut self,
        last_updated: i64,
        ids: &BTreeSet<String>,
        set: super::wire::ServerSet,
        started: Instant,
    ) -> Result<(), CycleError> {
        for why in &set.skipped {
            warn!("the policy server served a policy this agent cannot enforce, left out: {why}");
        }
        let (added, removed) = agent::lock(&self.agent)
            .follow_policy_server(&set.policies, &set.tags)
            .map_err(CycleError::Apply)?;
        let took = started.elapsed();
        if let Some(h) = &self.poll_time {
            h.observe(took.as_secs_f64());
        }
        let changed = added + removed > 0 || self.fetched.is_none();
        self.fetched = Some((last_updated, ids.clone()));
        let fetched = FetchedSet {
            fetched_at: now(),
            last_updated,
            policies: set.policies.len(),
            apps: set.tags.len(),
            skipped: set.skipped,
        };
        if added + removed > 0 {
            info!(
                added,
                removed,
                policies = fetched.policies,
                apps = fetched.apps,
                seconds = took.as_secs_f64(),
                "policies from the policy server in force"
            );
        }
        if changed {
            // Best effort: the set itself is in the state; this file only
            // dates it for `status` after a restart.
            let bytes = serde_json::to_vec(&fetched).unwrap_or_default();
            if let Err(e) = policy_api::files::replace(&self.set_file, &bytes, 0o644) {
                warn!(file = %self.set_file.display(), error = %e, "cannot record when the policy set was fetched");
            }
        }
        let mut s = lock(&self.status);
        s.last_poll_seconds = Some(took.as_secs_f64());
        s.set = Some(fetched);
        Ok(())
    }
}

/// Why a cycle failed: the server, or the agent's write of its answer.
#[derive(Debug, thiserror::Error)]
enum CycleError {
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("the policies from the policy server could not be put in force: {0}")]
    Apply(crate::agent::AgentError),
    #[error("container metadata store: {0}")]
    Store(String),
}

impl CycleError {
    fn kind(&self) -> &'static str {
        match self {
            CycleError::Server(e) => e.kind(),
            CycleError::Apply(_) => "apply",
            CycleError::Store(_) => "metadata_store",
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
