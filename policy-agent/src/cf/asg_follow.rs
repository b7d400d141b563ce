//! Dynamic security groups (`enable_asg_syncing`): the policy server's
//! groups for the spaces of this cell's containers, every
//! `asg_poll_interval` and when forced (`/force-asgs-for-container`),
//! turned into each app's NetOut rules and applied to running containers
//! without a restart.
//!
//! The containers are this host's endpoints that name a space: those of
//! CF's metadata store, and those `policy-cni` or the API registered with
//! garden's `space_id` (and `container_workload`). For their apps the
//! groups replace the rules the CNI call brought (a write of them is
//! refused while the server's groups hold); endpoints without a space
//! keep the NetOut rules of their registration. NetOut is per app in the kernel: an app's
//! containers share a space; if they differ in workload (staging next to
//! running instances) the running rules hold for all of them, and the
//! log says so.
//!
//! Failures change nothing: the server unreachable keeps every rule in
//! force; a group with a destination CF cannot convert keeps the rules of
//! the containers it applies to as they were (as CF), naming the group.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use tracing::{info, warn};

use super::{
    CfConfig, PolicyServerClient, ServerError,
    asgs::{SecurityGroup, Workload, rules_for},
    poller::{self, CycleError, FollowStatus, Poll, PollHandle, SharedStatus, lock},
};
use crate::{
    agent::{self, SharedAgent},
    state::Endpoint,
};

/// The apps whose NetOut rules are the policy server's groups.
pub type ManagedApps = Arc<Mutex<BTreeSet<String>>>;

pub struct AsgFollower {
    client: PolicyServerClient,
    agent: SharedAgent,
    status: SharedStatus,
    interval: Duration,
    handle: PollHandle,
    /// Apps whose NetOut rules this poller set.
    managed: ManagedApps,
    /// The agent's iptables chain beside cni-wrapper-plugin's: egress of
    /// apps with rules in force let through to them.
    accept: Option<Arc<Mutex<super::iptables::AcceptChain>>>,
}

/// One app's place as the store says: its space and workload.
#[derive(Debug, PartialEq, Eq)]
struct AppPlace {
    space: String,
    /// None: a workload CF does not know, which gets no group (all its
    /// egress out of the overlay denied).
    workload: Option<Workload>,
    mixed: bool,
}

impl AsgFollower {
    pub fn new(
        cf: &CfConfig,
        agent: SharedAgent,
        accept: Option<Arc<Mutex<super::iptables::AcceptChain>>>,
    ) -> Result<Self, ServerError> {
        let client = PolicyServerClient::new(cf)?;
        let status = FollowStatus {
            url: client.url().to_owned(),
            what: "security_groups",
            state: "starting",
            poll_interval_seconds: cf.asg_poll_interval.as_secs_f64(),
            ..FollowStatus::default()
        };
        Ok(Self {
            client,
            agent,
            status: Arc::new(Mutex::new(status)),
            interval: cf.asg_poll_interval,
            handle: PollHandle::default(),
            managed: ManagedApps::default(),
            accept,
        })
    }

    pub fn status(&self) -> SharedStatus {
        self.status.clone()
    }

    pub fn handle(&self) -> PollHandle {
        self.handle.clone()
    }

    /// The apps whose rules the server's groups are, as the last poll left
    /// them.
    pub fn managed(&self) -> ManagedApps {
        self.managed.clone()
    }

    pub fn run(mut self) {
        let (handle, status, interval) = (self.handle.clone(), self.status.clone(), self.interval);
        poller::run(&mut self, &handle, &status, interval);
    }
}

/// Each app's space and workload, from its containers (those without a
/// space are left as they are, as in CF).
fn places<'a>(containers: impl Iterator<Item = &'a Endpoint>) -> BTreeMap<String, AppPlace> {
    let mut out: BTreeMap<String, AppPlace> = BTreeMap::new();
    for c in containers {
        let Some(space) = c.space_id.clone() else { continue };
        let workload = c.workload.as_deref().and_then(Workload::parse);
        match out.get_mut(c.app.as_str()) {
            None => {
                out.insert(c.app.to_string(), AppPlace { space, workload, mixed: false });
            }
            Some(place) => {
                let staging = |w: Option<Workload>| w == Some(Workload::Staging);
                if staging(place.workload) != staging(workload) {
                    place.mixed = true;
                    if staging(place.workload) {
                        place.workload = workload;
                    }
                }
            }
        }
    }
    out
}

impl Poll for AsgFollower {
    fn poll(&mut self, _forced: bool) -> Result<(), CycleError> {
        let places = places(agent::lock(&self.agent).state().local_endpoints());
        let spaces: Vec<String> =
            places.values().map(|p| p.space.clone()).collect::<BTreeSet<_>>().into_iter().collect();
        let groups: Vec<SecurityGroup> =
            if places.is_empty() { Vec::new() } else { self.client.security_groups(&spaces)? };
        let mut failed = None;
        for (app, place) in &places {
            if place.mixed {
                warn!(
                    app,
                    "the app has staging and running containers: the running security groups hold for all"
                );
            }
            let picked = match place.workload {
                Some(workload) => rules_for(&groups, &place.space, workload),
                None => Ok(Default::default()),
            };
            let rules = match picked {
                Ok(r) => r,
                Err(e) => {
                    warn!(app, "{e}");
                    continue;
                }
            };
            for why in &rules.dropped {
                warn!(app, "security group rule left out: {why}");
            }
            let mut agent = agent::lock(&self.agent);
            if agent.state().netout().get(app) == Some(&rules.rules) {
                lock(&self.managed).insert(app.clone());
                continue;
            }
            match agent.set_netout(app, Some(rules.rules.clone())) {
                Ok(()) => {
                    info!(
                        app,
                        rules = rules.rules.len(),
                        space = place.space,
                        "security groups from the policy server in force"
                    );
                    lock(&self.managed).insert(app.clone());
                }
                Err(e) => {
                    warn!(app, error = %e, "security groups from the policy server not applied; the app's rules stay as they were");
                    failed = Some(e);
                }
            }
        }
        // Apps with no container left in a space: the server's rules go
        // (those of an app still here without a space are its
        // registration's to set again).
        let managed = lock(&self.managed).clone();
        for app in managed {
            if places.contains_key(&app) {
                continue;
            }
            let mut agent = agent::lock(&self.agent);
            let here = agent.state().local_endpoints().any(|e| e.app == app);
            if here || agent.set_netout(&app, None).is_ok() {
                lock(&self.managed).remove(&app);
            }
        }
        lock(&self.status).security_groups = Some(groups.len());
        if let Some(accept) = &self.accept {
            lock(accept).sync(&self.agent).map_err(CycleError::Iptables)?;
        }
        match failed {
            Some(e) => Err(CycleError::Apply(e)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(app: &str, space: Option<&str>, workload: Option<&str>) -> Endpoint {
        Endpoint {
            space_id: space.map(str::to_owned),
            workload: workload.map(str::to_owned),
            ..Endpoint::test(1, app)
        }
    }

    #[test]
    fn each_apps_space_and_workload() {
        let places = places(
            [
                container("web", Some("s1"), Some("app")),
                container("web", Some("s1"), Some("staging")),
                container("job", Some("s2"), Some("task")),
                container("nospace", None, Some("app")),
                container("odd", Some("s1"), Some("build")),
                container("stage", Some("s3"), Some("staging")),
            ]
            .iter(),
        );
        assert_eq!(places.len(), 4, "{places:?}");
        assert_eq!(
            places["web"],
            AppPlace { space: "s1".into(), workload: Some(Workload::App), mixed: true }
        );
        assert_eq!(places["job"].workload, Some(Workload::Task));
        assert_eq!(places["stage"].workload, Some(Workload::Staging));
        assert_eq!(places["odd"].workload, None, "no group: all egress denied, as CF");
    }
}
