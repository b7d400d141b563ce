//! The poll loop: the policy server's policies for this host's apps, into
//! the agent (as vxlan-policy-agent's policy poller, faster).
//!
//! Each cycle asks `policies_last_updated` and fetches
//! `policies?id=APP,...,SPACE,...` only when it grew, when the host's set
//! of apps changed (in cluster mode: the cluster's), or when forced (a container registered: its
//! policies hold before the registration is answered). No containers
//! here: nothing is asked and no policy is in force, as in Cloud Foundry.
//!
//! Fail-static: the server unreachable, answering an error or refusing
//! the certificate changes nothing in force. The set in force is the
//! agent's stored state (journaled like any change), so an agent
//! restarted while the server is down enforces it at once; `status`
//! says how old it is and why (`policy-server.json` in the state
//! directory keeps when it was fetched). Failures back off from the
//! poll interval to [`super::poller::MAX_BACKOFF`]; a forced poll does not
//! wait.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::{
    CfConfig, PolicyServerClient, ServerError,
    poller::{self, CycleError, FollowStatus, Poll, PollHandle, SharedStatus, lock, now},
};
use crate::agent::{self, SharedAgent};

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
    /// With a metadata store (cni-wrapper-plugin as the CNI plugin): the
    /// agent's iptables chain in front of its chains.
    accept: Option<Arc<Mutex<super::iptables::AcceptChain>>>,
    /// silk's overlay on this cell (`underlay_ips` set).
    silk: Option<super::silk::SilkOverlay>,
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
            what: "policies",
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
            silk: (!cf.underlay_ips.is_empty())
                .then(|| super::silk::SilkOverlay::new(&cf.vtep_name, &cf.underlay_ips)),
            accept: cf.cni_datastore_path.as_ref().map(|_| {
                Arc::new(Mutex::new(super::iptables::AcceptChain::new(
                    cf.iptables_lock_file.clone(),
                    cf.enable_asg_syncing,
                )))
            }),
        })
    }

    /// The agent's iptables chain beside cni-wrapper-plugin's, if any.
    pub fn accept_chain(&self) -> Option<Arc<Mutex<super::iptables::AcceptChain>>> {
        self.accept.clone()
    }

    /// Polls until stopped: at once, then every interval, and whenever
    /// forced (see `poller`).
    pub fn run(mut self) {
        let (handle, status, interval) = (self.handle.clone(), self.status.clone(), self.interval);
        poller::run(&mut self, &handle, &status, interval);
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
}

impl Poll for Follower {
    fn poll(&mut self, forced: bool) -> Result<(), CycleError> {
        if let Some(containers) = &mut self.containers {
            containers.sync(&self.agent).map_err(CycleError::Store)?;
        }
        if let Some(silk) = &mut self.silk {
            silk.sync(&self.agent).map_err(CycleError::Overlay)?;
        }
        if let Some(accept) = &self.accept {
            let mut accept = lock(accept);
            accept.set_tunnel(self.silk.as_ref().and_then(|s| s.joined_vtep()));
            accept.sync(&self.agent).map_err(CycleError::Iptables)?;
        }
        // The ids vxlan-policy-agent sends: each local container's app and
        // space (the server matches both against policy ends). In cluster
        // mode every host's: the policies are the cluster's state, so each
        // host asks for the same set and their changes agree (the second
        // to write one finds nothing left to change).
        let ids: BTreeSet<String> = {
            let agent = agent::lock(&self.agent);
            let state = agent.state();
            let asked: Vec<&crate::state::Endpoint> = match state.local_host() {
                Some(_) => state.endpoints().collect(),
                None => state.local_endpoints().collect(),
            };
            let spaces = asked.iter().filter_map(|e| e.space_id.clone());
            asked.iter().map(|e| e.app.to_string()).chain(spaces).collect()
        };
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
}

impl Follower {
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
