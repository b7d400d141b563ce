//! The agent's core: desired state, its durable store, and the kernel, kept
//! consistent. Every change is validated, written to the kernel (rolled back
//! if that fails), then saved; only then is it answered. So a reply means
//! "enforced and durable", and a failed request changes nothing. Changes are
//! made to the state in place with an undo record, so they cost what they
//! touch, not a copy of the state.

mod committed;
mod reads;
mod returning;
mod shared_log;
mod tunnel;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

pub use reads::{FlowQuery, PolicyStats, Status};
pub use returning::{DENIED_TAG, Held, read_held};
use tracing::{info, warn};

use crate::{
    Dataplane, Error,
    reconcile::{self, AppPair, Kernel},
    state::{
        Endpoint, Invalid, NetOutRule, Policy, State, TlsPorts, Undo, check_app_id, check_domain,
        check_hostname,
    },
    store::{Change, Position, Store, StoreError},
};

/// The daemon's agent, shared by the API, DNS, TLS and the flow reader.
pub type SharedAgent = Arc<Mutex<Agent<Dataplane>>>;

/// Locks the shared agent; a panic in another holder does not stop the
/// others (the state is changed only through undoable steps).
pub fn lock(agent: &SharedAgent) -> MutexGuard<'_, Agent<Dataplane>> {
    agent.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The app pairs (and protocols) a policy change touches.
fn touched(policies: &[Policy]) -> BTreeSet<AppPair> {
    policies.iter().map(|p| (p.source.clone(), p.destination.clone(), p.protocol)).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Invalid(Invalid),
    #[error(transparent)]
    Kernel(#[from] Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<Invalid> for AgentError {
    fn from(e: Invalid) -> Self {
        AgentError::Invalid(e)
    }
}

impl<K: Kernel> std::fmt::Debug for Agent<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("policies", &self.state.policy_count()).finish()
    }
}

/// How often a write is tried again after other agents committed first.
const CONFLICT_RETRIES: usize = 20;

/// What the agent is configured with.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// Most policies one source app may have (None: no limit).
    pub limit: Option<usize>,
    /// Platform TLS ports (None: platform TLS off).
    pub tls_ports: Option<TlsPorts>,
    /// This agent's host in cluster mode (None: a single host).
    pub host: Option<String>,
    /// Cluster mode: this host's endpoints as it last knew them (its local
    /// copy and the endpoints it held); those the cluster has since
    /// removed while their veths are still here are held (see
    /// `returning`).
    pub known_here: Vec<Endpoint>,
    /// Where the held endpoints are kept across restarts.
    pub held_file: Option<PathBuf>,
}

pub struct Agent<K: Kernel> {
    kernel: K,
    state: State,
    store: Box<dyn Store>,
    /// Most policies one source app may have (None: no limit).
    limit: Option<usize>,
    /// When the state was last known to match the store (cluster mode:
    /// the last successful read or write of etcd).
    synced: Instant,
    /// The state was loaded from a possibly older local copy: the kernel
    /// is reconciled to it only once the store has caught up.
    reconcile_pending: bool,
    /// This host's endpoints the cluster removed while their veths are
    /// still here: left as they are in the kernel until registered again.
    held: BTreeMap<IpAddr, Endpoint>,
    held_file: Option<PathBuf>,
}

impl<K: Kernel> Agent<K> {
    /// Loads the stored state and reconciles the kernel to it without
    /// clearing anything first. Returns the agent and reconcile warnings.
    pub fn start(
        mut kernel: K,
        mut store: Box<dyn Store>,
        settings: Settings,
    ) -> Result<(Self, Vec<String>), AgentError> {
        let mut state = store.load()?;
        state.set_tls_ports(settings.tls_ports);
        state.set_local_host(settings.host);
        let reconcile_pending = store.is_stale();
        let held = returning::still_here(&kernel, &state, settings.known_here);
        let warnings = if reconcile_pending {
            // Fail-static: never take the kernel back to an older state.
            match store.diverged() {
                Some(d) => warn!(cause = d.cause(), "{d}: enforcement is left as it is"),
                None => warn!(
                    "the stored state may be older than the kernel's: enforcement is left as it is until the store catches up"
                ),
            }
            Vec::new()
        } else {
            let warnings = reconcile::full_keeping(&mut kernel, &state, &held)?;
            info!(
                policies = state.policy_count(),
                endpoints = state.endpoints().count(),
                apps = state.tags().len(),
                "reconciled the kernel to the stored state"
            );
            warnings
        };
        let synced = Instant::now();
        let agent = Self {
            kernel,
            state,
            store,
            limit: settings.limit,
            synced,
            reconcile_pending,
            held,
            held_file: settings.held_file,
        };
        agent.save_held();
        Ok((agent, warnings))
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// How far the store has been read and applied.
    pub fn position(&self) -> Position {
        self.store.position()
    }

    /// Time since the state was last known to match the store.
    pub fn state_age(&self) -> Duration {
        self.synced.elapsed()
    }

    /// Applies what other agents committed since the last read; returns
    /// how many changes that was.
    pub fn catch_up(&mut self) -> Result<usize, AgentError> {
        let changes = self.store.pending()?;
        for change in &changes {
            self.apply_committed(change);
        }
        if !changes.is_empty() {
            self.store.snapshot(&self.state)?;
        }
        self.store.settle(&self.state);
        if self.reconcile_pending && !self.store.is_stale() {
            for w in reconcile::full_keeping(&mut self.kernel, &self.state, &self.held)? {
                warn!("{w}");
            }
            self.reconcile_pending = false;
            info!("caught up with the store: the kernel is reconciled to it");
        }
        self.synced = Instant::now();
        if !changes.is_empty() {
            info!(
                changes = changes.len(),
                seq = self.store.position().seq,
                "applied changes from the cluster"
            );
        }
        Ok(changes.len())
    }

    /// Runs a write; when another agent committed first, applies its
    /// changes and runs the write again (checked against them).
    fn retrying<T>(
        &mut self,
        mut write: impl FnMut(&mut Self) -> Result<T, AgentError>,
    ) -> Result<T, AgentError> {
        // A diverged log is refused before anything reaches the kernel.
        if let Some(divergence) = self.store.diverged() {
            return Err(StoreError::Diverged(divergence.clone()).into());
        }
        let mut attempt = 0;
        loop {
            match write(self) {
                Err(AgentError::Store(StoreError::Conflict)) if attempt < CONFLICT_RETRIES => {
                    attempt += 1;
                    self.catch_up()?;
                }
                result => {
                    if result.is_ok() {
                        self.synced = Instant::now();
                    }
                    return result;
                }
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn kernel(&self) -> &K {
        &self.kernel
    }

    /// Makes `change`, which the state already holds, durable; if that
    /// fails, puts the kernel back (`undo_kernel`) and then the state.
    fn commit(
        &mut self,
        change: Change,
        undo: Undo,
        undo_kernel: impl FnOnce(&mut K),
    ) -> Result<(), AgentError> {
        if let Err(e) = self.store.append(&change, &self.state) {
            undo_kernel(&mut self.kernel);
            self.state.undo(undo);
            return Err(e.into());
        }
        Ok(())
    }

    pub fn add_policies(&mut self, policies: &[Policy]) -> Result<(), AgentError> {
        self.retrying(|agent| agent.add_policies_once(policies))
    }

    fn add_policies_once(&mut self, policies: &[Policy]) -> Result<(), AgentError> {
        let before = reconcile::before_change(&self.state, touched(policies));
        let undo = self.state.add_policies_undoable(policies, self.limit)?;
        self.apply_policies(Change::AddPolicies(policies.to_vec()), before, undo)?;
        info!(requested = policies.len(), total = self.state.policy_count(), "policies added");
        Ok(())
    }

    pub fn remove_policies(&mut self, policies: &[Policy]) -> Result<(), AgentError> {
        self.retrying(|agent| agent.remove_policies_once(policies))
    }

    fn remove_policies_once(&mut self, policies: &[Policy]) -> Result<(), AgentError> {
        let removed: Vec<u32> = policies.iter().filter_map(|p| self.state.policy_id(p)).collect();
        let before = reconcile::before_change(&self.state, touched(policies));
        let undo = self.state.remove_policies_undoable(policies);
        self.apply_policies(Change::RemovePolicies(policies.to_vec()), before, undo)?;
        self.kernel.forget_policies(&removed);
        info!(requested = policies.len(), total = self.state.policy_count(), "policies removed");
        Ok(())
    }

    /// The state already holds the change: write the touched pairs, then
    /// the journal; on failure undo both.
    fn apply_policies(
        &mut self,
        change: Change,
        before: reconcile::Before,
        undo: Undo,
    ) -> Result<(), AgentError> {
        if !undo.changes_anything() {
            return Ok(()); // already there / already gone
        }
        let written = match reconcile::touched_pairs(&mut self.kernel, &self.state, &before) {
            Ok(written) => written,
            Err(e) => {
                self.state.undo(undo);
                return Err(e.into());
            }
        };
        self.commit(change, undo, |kernel| reconcile::undo_pairs(kernel, written))
    }

    /// Registers (or replaces) an endpoint on this host and attaches to
    /// its veth.
    pub fn add_endpoint(&mut self, mut endpoint: Endpoint) -> Result<(), AgentError> {
        endpoint.host = self.state.local_host().map(str::to_owned);
        self.retrying(|agent| agent.add_endpoint_once(endpoint.clone()))
    }

    fn add_endpoint_once(&mut self, endpoint: Endpoint) -> Result<(), AgentError> {
        self.state.check_endpoint_add(&endpoint)?;
        if self.state.endpoint(endpoint.ip) == Some(&endpoint) {
            return Ok(());
        }
        let old = self.state.endpoint(endpoint.ip).cloned();
        let undo = self.state.add_endpoint_undoable(endpoint.clone());
        let tag = self.state.tag(&endpoint.app).expect("add_endpoint tags the app");
        let attached = self
            .kernel
            .attach(&endpoint.ifname, endpoint.ipv4(), tag)
            .and_then(|()| self.kernel.bind_veth6(&endpoint.ifname, endpoint.ipv6));
        if let Err(e) = attached {
            self.state.undo(undo);
            return Err(match e {
                Error::NoInterface { ifname } => Invalid::new(
                    "ifname",
                    format!("interface {ifname} not found in the agent's network namespace"),
                )
                .into(),
                e => e.into(),
            });
        }
        let value = self.state.endpoint_value(&endpoint).expect("add_endpoint tags the app");
        let stale6 = old.as_ref().and_then(|o| o.ipv6).filter(|a| endpoint.ipv6 != Some(*a));
        let kernel_written = reconcile::set_endpoint_addresses(&mut self.kernel, &endpoint, value)
            .and_then(|()| match stale6 {
                Some(ipv6) => self.kernel.remove_endpoint6(ipv6),
                None => Ok(()),
            })
            .and_then(|()| reconcile::port_mappings(&mut self.kernel, &self.state))
            .and_then(|()| self.netout_if_any());
        if let Err(e) = kernel_written {
            let _ = self.kernel.detach(&endpoint.ifname, endpoint.ipv4());
            if let Some(ipv6) =
                endpoint.ipv6.filter(|a| old.as_ref().and_then(|o| o.ipv6) != Some(*a))
            {
                let _ = self.kernel.remove_endpoint6(ipv6);
            }
            self.state.undo(undo);
            let _ = reconcile::port_mappings(&mut self.kernel, &self.state);
            return Err(e.into());
        }
        if let Some(old) = old.as_ref().filter(|o| o.ifname != endpoint.ifname)
            && let Err(e) = self.kernel.detach(&old.ifname, None)
        {
            self.state.undo(undo);
            return Err(e.into());
        }
        let (ip, ipv6) = (endpoint.ip, endpoint.ipv6);
        let added = endpoint.clone();
        let (app, logged_ifname) = (endpoint.app.clone(), endpoint.ifname.clone());
        let committed = self.commit(Change::AddEndpoint(endpoint), undo, move |kernel| {
            let _ = kernel.detach(&added.ifname, added.ipv4());
            let _ = reconcile::remove_endpoint_addresses(kernel, &added);
        });
        if committed.is_err() {
            let _ = reconcile::port_mappings(&mut self.kernel, &self.state);
        }
        committed?;
        info!(%ip, ?ipv6, app, ifname = logged_ifname, tag, "endpoint added");
        Ok(())
    }

    /// The security group trie follows the state, when any app has groups
    /// (an endpoint change may give or take an app's tag).
    fn netout_if_any(&mut self) -> Result<(), Error> {
        if self.state.asgs().is_empty() {
            return Ok(());
        }
        reconcile::netout(&mut self.kernel, &self.state)
    }

    /// Sets (Some) or removes (None) `app`'s security groups (NetOut): the
    /// rules its containers' egress out of the overlay must match. Running
    /// containers follow at once.
    pub fn set_asgs(
        &mut self,
        app: &str,
        rules: Option<Vec<NetOutRule>>,
    ) -> Result<(), AgentError> {
        self.retrying(|agent| agent.set_asgs_once(app, rules.clone()))
    }

    fn set_asgs_once(
        &mut self,
        app: &str,
        rules: Option<Vec<NetOutRule>>,
    ) -> Result<(), AgentError> {
        check_app_id("app", app)?;
        if let Some(rules) = &rules {
            crate::netout::app_entries(1, rules).map_err(|e| Invalid::new("rules", e))?;
        }
        let undo = self.state.set_asgs_undoable(app, rules.clone());
        if !undo.changes_anything() {
            return Ok(());
        }
        if let Err(e) = reconcile::netout(&mut self.kernel, &self.state) {
            self.state.undo(undo);
            let _ = reconcile::netout(&mut self.kernel, &self.state);
            return Err(e.into());
        }
        let change = Change::SetAsgs { app: app.to_owned(), rules };
        if let Err(e) = self.commit(change, undo, |_| {}) {
            let _ = reconcile::netout(&mut self.kernel, &self.state);
            return Err(e);
        }
        info!(
            app,
            "security groups {}",
            if self.state.asgs().contains_key(app) { "set" } else { "removed" }
        );
        Ok(())
    }

    /// Maps `hostname.apps.internal` to `app` (names only: no kernel state).
    pub fn map_route(&mut self, app: &str, domain: &str, hostname: &str) -> Result<(), AgentError> {
        self.retrying(|agent| agent.route_once(app, domain, hostname, true))
    }

    pub fn unmap_route(
        &mut self,
        app: &str,
        domain: &str,
        hostname: &str,
    ) -> Result<(), AgentError> {
        self.retrying(|agent| agent.route_once(app, domain, hostname, false))
    }

    fn route_once(
        &mut self,
        app: &str,
        domain: &str,
        hostname: &str,
        map: bool,
    ) -> Result<(), AgentError> {
        check_app_id("app", app)?;
        check_domain("domain", domain)?;
        let hostname = check_hostname("hostname", hostname)?;
        let undo = if map {
            self.state.map_route_undoable(app, &hostname)?
        } else {
            self.state.unmap_route_undoable(app, &hostname)?
        };
        if !undo.changes_anything() {
            return Ok(());
        }
        let (owner, name) = (app.to_owned(), hostname.clone());
        let change = if map {
            Change::MapRoute { app: owner, hostname: name }
        } else {
            Change::UnmapRoute { app: owner, hostname: name }
        };
        self.commit(change, undo, |_| {})?;
        info!(app, hostname, "route {}", if map { "mapped" } else { "unmapped" });
        Ok(())
    }

    /// Unregisters an endpoint: detaches from its veth and removes every map
    /// entry naming it. Unknown addresses are not an error.
    /// `ip` is either of its addresses.
    pub fn remove_endpoint(&mut self, ip: IpAddr) -> Result<bool, AgentError> {
        self.retrying(|agent| agent.remove_endpoint_once(ip))
    }

    fn remove_endpoint_once(&mut self, ip: IpAddr) -> Result<bool, AgentError> {
        let Some(endpoint) = self.state.endpoint_at(ip).cloned() else {
            return Ok(false);
        };
        let ip = endpoint.ip;
        // Durable first: were the agent to die before the kernel is updated,
        // the restart reconcile finishes the removal from the stored state.
        let undo = self.state.remove_endpoint_undoable(ip);
        self.commit(Change::RemoveEndpoint(ip), undo, |_| {})?;
        if endpoint.runs_on(self.state.local_host()) {
            self.kernel.detach(&endpoint.ifname, endpoint.ipv4())?;
        }
        reconcile::remove_endpoint_addresses(&mut self.kernel, &endpoint)?;
        if !endpoint.port_mappings.is_empty() {
            reconcile::port_mappings(&mut self.kernel, &self.state)?;
        }
        self.netout_if_any()?;
        info!(%ip, app = endpoint.app, ifname = endpoint.ifname, "endpoint removed");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{reconcile::fake::FakeKernel, store::Journal};

    fn temp_store(name: &str) -> Box<dyn Store> {
        let dir = std::env::temp_dir().join(format!("policy-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Box::new(Journal::open(&dir).unwrap())
    }

    fn policy(port: u16) -> Policy {
        Policy::tcp("a", "b", port)
    }

    fn reload(name: &str) -> State {
        let dir = std::env::temp_dir().join(format!("policy-agent-{name}-{}", std::process::id()));
        Journal::peek(&dir).unwrap()
    }

    #[test]
    fn writes_are_durable_and_failed_ones_change_nothing() {
        let store = temp_store("durable");
        let (mut agent, _) = Agent::start(FakeKernel::new(1), store, Settings::default()).unwrap();
        agent.add_policies(&[policy(80)]).unwrap();
        assert_eq!(&reload("durable"), agent.state());
        // A second pair does not fit in the fake kernel: nothing changes.
        let before = agent.state().clone();
        let other = Policy { destination: "c".into(), ..policy(80) };
        assert!(matches!(
            agent.add_policies(&[policy(81), other]),
            Err(AgentError::Kernel(Error::MapFull { .. }))
        ));
        assert_eq!(agent.state(), &before);
        assert_eq!(agent.kernel().pairs, before.pairs());
        assert_eq!(reload("durable"), before);
    }

    #[test]
    fn endpoints_attach_and_a_missing_interface_is_invalid() {
        let mut kernel = FakeKernel::new(10);
        kernel.interfaces.insert("hv0".into());
        let (mut agent, _) =
            Agent::start(kernel, temp_store("endpoints"), Settings::default()).unwrap();
        let ip = IpAddr::from([10, 255, 0, 1]);
        let missing = Endpoint {
            ip,
            ipv6: None,
            app: "web".into(),
            ifname: "nope".into(),
            netns: None,
            host: None,
            port_mappings: Vec::new(),
        };
        match agent.add_endpoint(missing) {
            Err(AgentError::Invalid(e)) => assert_eq!(e.field, "ifname"),
            other => panic!("{other:?}"),
        }
        assert!(agent.state().endpoints().next().is_none());
        assert!(agent.kernel().endpoints.is_empty());
        agent
            .add_endpoint(Endpoint {
                ip,
                ipv6: None,
                app: "web".into(),
                ifname: "hv0".into(),
                netns: None,
                host: None,
                port_mappings: Vec::new(),
            })
            .unwrap();
        assert_eq!(agent.kernel().endpoints[&std::net::Ipv4Addr::new(10, 255, 0, 1)], 1);
        assert!(agent.remove_endpoint(ip).unwrap());
        assert!(agent.kernel().endpoints.is_empty() && agent.kernel().attached.is_empty());
        assert!(!agent.remove_endpoint(ip).unwrap());
    }

    fn endpoint(last: u8, app: &str, ifname: &str) -> Endpoint {
        Endpoint {
            ip: IpAddr::from([10, 255, 0, last]),
            ipv6: None,
            app: app.into(),
            ifname: ifname.into(),
            netns: None,
            host: None,
            port_mappings: Vec::new(),
        }
    }

    #[test]
    fn one_veth_is_one_endpoint() {
        let mut kernel = FakeKernel::new(10);
        kernel.interfaces.extend(["hv0".to_owned(), "hv1".to_owned()]);
        let (mut agent, _) =
            Agent::start(kernel, temp_store("one-veth"), Settings::default()).unwrap();
        let first = Endpoint {
            ipv6: Some("fd00:255::10.255.0.1".parse().unwrap()),
            ..endpoint(1, "web", "hv0")
        };
        agent.add_endpoint(first.clone()).unwrap();
        let before = (agent.state().clone(), agent.kernel().attached.clone());
        // Another endpoint on the first one's veth: refused, naming the
        // holder, and nothing changes (state, kernel, journal).
        match agent.add_endpoint(endpoint(9, "evil", "hv0")) {
            Err(AgentError::Invalid(e)) => {
                assert_eq!(e.field, "ifname");
                assert!(e.reason.contains("endpoint 10.255.0.1 fd00:255::aff:1 (app web)"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!((agent.state().clone(), agent.kernel().attached.clone()), before);
        assert_eq!(reload("one-veth"), before.0);
        // Nor by moving an existing endpoint onto it.
        agent.add_endpoint(endpoint(2, "api", "hv1")).unwrap();
        assert!(matches!(
            agent.add_endpoint(endpoint(2, "api", "hv0")),
            Err(AgentError::Invalid(e)) if e.field == "ifname"
        ));
        // The holder itself may register again: the same, or with a new app.
        agent.add_endpoint(first.clone()).unwrap();
        agent.add_endpoint(Endpoint { app: "web2".into(), ..first.clone() }).unwrap();
        assert_eq!(agent.state().endpoint(first.ip).unwrap().app, "web2");
        // Once the holder is gone the veth is free.
        assert!(agent.remove_endpoint(first.ip).unwrap());
        agent.add_endpoint(endpoint(9, "new", "hv0")).unwrap();
        // Interface names are per host: another host's veth of the same
        // name is another veth.
        let mut state = agent.state().clone();
        state.set_local_host(Some("cell-1".into()));
        let elsewhere = Endpoint { host: Some("cell-2".into()), ..endpoint(3, "x", "hv0") };
        state.add_endpoint(elsewhere);
        let here = Endpoint { host: Some("cell-1".into()), ..endpoint(4, "y", "hv1") };
        state.check_endpoint_add(&here).unwrap();
        let taken = Endpoint { host: Some("cell-2".into()), ..endpoint(5, "z", "hv0") };
        assert_eq!(state.check_endpoint_add(&taken).unwrap_err().field, "ifname");
    }
}
