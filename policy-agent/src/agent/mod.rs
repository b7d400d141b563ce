//! The agent's core: desired state, its durable store, and the kernel, kept
//! consistent. Every change is validated (`state::validate`), made to the
//! state, written to the kernel by `reconcile::apply` (taken back if that
//! fails), then saved (the kernel and the state taken back if that fails);
//! only then is it answered. So a reply means "enforced and durable", and a
//! failed request changes nothing. Changes are made to the state in place
//! with an undo record, so they cost what they touch, not a copy of the
//! state. Changes other agents committed reach the kernel through the same
//! `reconcile::apply` (`committed.rs`).

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

pub use reads::{PolicyStats, Status};
pub use returning::{DENIED_TAG, Held, read_held};
use tracing::{info, warn};

use crate::{
    Dataplane, DataplaneError,
    reconcile::{self, Kernel},
    state::{
        Endpoint, Invalid, NetOutRule, Policy, State, TlsPorts, Undo, check_app_id, check_domain,
        check_hostname, check_veth_exists, missing_veth,
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

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Invalid(Invalid),
    #[error(transparent)]
    Kernel(#[from] DataplaneError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A policy write while the policy server is the source of policies.
    #[error(
        "policies come from Cloud Foundry's policy server ({url}), not from this agent: write them there (cf add-network-policy, cf remove-network-policy)"
    )]
    PolicyServer { url: String },
}

impl From<Invalid> for AgentError {
    fn from(e: Invalid) -> Self {
        AgentError::Invalid(e)
    }
}

impl AgentError {
    /// A kernel write a local write made failed: a veth that vanished
    /// since it was checked is refused as if it had been missing then.
    fn from_kernel(e: DataplaneError) -> Self {
        match e {
            DataplaneError::NoInterface { ifname } => missing_veth(&ifname).into(),
            e => e.into(),
        }
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
    /// Cloud Foundry's policy server (`[cf]`): the one source of policies
    /// and tags; policy writes to the agent are refused.
    pub policy_server: Option<String>,
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
    /// The policy server's URL when it is the source of policies.
    policy_server: Option<String>,
}

impl<K: Kernel> Agent<K> {
    /// Loads the stored state and reconciles the kernel to it without
    /// clearing anything first. Returns the agent and reconcile warnings.
    pub fn start(
        kernel: K,
        mut store: Box<dyn Store>,
        settings: Settings,
    ) -> Result<(Self, Vec<String>), AgentError> {
        let state = store.load()?;
        Self::start_loaded(kernel, store, state, settings)
    }

    /// [`Self::start`] with `state` already loaded from `store` (the daemon
    /// reads it while the kernel verifies the programs).
    pub fn start_loaded(
        mut kernel: K,
        store: Box<dyn Store>,
        mut state: State,
        settings: Settings,
    ) -> Result<(Self, Vec<String>), AgentError> {
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
            policy_server: settings.policy_server,
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

    /// Writes `change`, which the state already holds (`undo` takes it
    /// back; `before` was read before it): the kernel follows
    /// ([`reconcile::apply`]), then the store commits; if either fails,
    /// the kernel and the state are taken back. An endpoint's removal is
    /// made durable first: were the agent to die before the kernel
    /// follows, the restart's reconcile finishes the removal from the
    /// stored state.
    fn write(
        &mut self,
        change: Change,
        before: reconcile::Before,
        undo: Undo,
    ) -> Result<(), AgentError> {
        if !undo.changes_anything() {
            return Ok(()); // already there / already gone
        }
        if matches!(change, Change::RemoveEndpoint(_)) {
            self.commit(&change, undo)?;
            let applied = reconcile::apply(&mut self.kernel, &self.state, before, &self.held)?;
            applied.keep(&mut self.kernel);
            return Ok(());
        }
        let applied = match reconcile::apply(&mut self.kernel, &self.state, before, &self.held) {
            Ok(applied) => applied,
            Err(e) => {
                self.state.undo(undo);
                return Err(AgentError::from_kernel(e));
            }
        };
        if let Err(e) = self.commit(&change, undo) {
            applied.undo(&mut self.kernel);
            return Err(e);
        }
        applied.keep(&mut self.kernel);
        Ok(())
    }

    /// Makes `change`, which the state already holds, durable; if that
    /// fails, takes it back out of the state.
    fn commit(&mut self, change: &Change, undo: Undo) -> Result<(), AgentError> {
        if let Err(e) = self.store.append(change, &self.state) {
            self.state.undo(undo);
            return Err(e.into());
        }
        Ok(())
    }

    pub fn add_policies(&mut self, policies: &[Policy]) -> Result<(), AgentError> {
        self.refuse_with_policy_server()?;
        self.retrying(|agent| agent.add_policies_once(policies))
    }

    /// With a policy server as the source, policies are written there.
    fn refuse_with_policy_server(&self) -> Result<(), AgentError> {
        match &self.policy_server {
            Some(url) => Err(AgentError::PolicyServer { url: url.clone() }),
            None => Ok(()),
        }
    }

    /// The policy server the policies come from, if any.
    pub fn policy_server(&self) -> Option<&str> {
        self.policy_server.as_deref()
    }

    /// Makes the policies exactly what the policy server serves for this
    /// host's apps (`policies`), with its `tags`: only what differs is
    /// written, adds before removes. Returns how many policies were added
    /// and removed.
    pub fn follow_policy_server(
        &mut self,
        policies: &BTreeSet<Policy>,
        tags: &BTreeMap<String, u32>,
    ) -> Result<(usize, usize), AgentError> {
        self.retrying(|agent| {
            let server = agent.state.server_change(policies, tags);
            let counts = (server.add.len(), server.remove.len());
            let change = Change::PolicyServer(server);
            let before = reconcile::before(&agent.state, &change);
            let undo = match &change {
                Change::PolicyServer(server) => agent.state.follow_server_undoable(server),
                _ => unreachable!("made above"),
            };
            agent.write(change, before, undo)?;
            Ok(counts)
        })
    }

    fn add_policies_once(&mut self, policies: &[Policy]) -> Result<(), AgentError> {
        let change = Change::AddPolicies(policies.to_vec());
        let before = reconcile::before(&self.state, &change);
        let undo = self.state.add_policies_undoable(policies, self.limit)?;
        self.write(change, before, undo)?;
        info!(requested = policies.len(), total = self.state.policy_count(), "policies added");
        Ok(())
    }

    pub fn remove_policies(&mut self, policies: &[Policy]) -> Result<(), AgentError> {
        self.refuse_with_policy_server()?;
        self.retrying(|agent| agent.remove_policies_once(policies))
    }

    fn remove_policies_once(&mut self, policies: &[Policy]) -> Result<(), AgentError> {
        let change = Change::RemovePolicies(policies.to_vec());
        let before = reconcile::before(&self.state, &change);
        let undo = self.state.remove_policies_undoable(policies);
        self.write(change, before, undo)?;
        info!(requested = policies.len(), total = self.state.policy_count(), "policies removed");
        Ok(())
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
        check_veth_exists(&endpoint, |ifname| self.kernel.interface_exists(ifname))?;
        let (ip, ipv6, app, ifname) =
            (endpoint.ip, endpoint.ipv6, endpoint.app.clone(), endpoint.ifname.clone());
        let change = Change::AddEndpoint(endpoint.clone());
        let before = reconcile::before(&self.state, &change);
        let undo = self.state.add_endpoint_undoable(endpoint);
        self.write(change, before, undo)?;
        let tag = self.state.tag(&app).expect("add_endpoint tags the app");
        info!(%ip, ?ipv6, %app, ifname, tag, "endpoint added");
        Ok(())
    }

    /// Sets (Some) or removes (None) `app`'s security groups (NetOut): the
    /// rules its containers' egress out of the overlay must match. Running
    /// containers follow at once.
    pub fn set_netout(
        &mut self,
        app: &str,
        rules: Option<Vec<NetOutRule>>,
    ) -> Result<(), AgentError> {
        self.retrying(|agent| agent.set_netout_once(app, rules.clone()))
    }

    fn set_netout_once(
        &mut self,
        app: &str,
        rules: Option<Vec<NetOutRule>>,
    ) -> Result<(), AgentError> {
        check_app_id("app", app)?;
        if let Some(rules) = &rules {
            crate::netout::app_entries(1, rules).map_err(|e| Invalid::new("rules", e))?;
        }
        let change = Change::SetNetOut { app: app.to_owned(), rules: rules.clone() };
        let before = reconcile::before(&self.state, &change);
        let undo = self.state.set_netout_undoable(app, rules);
        if !undo.changes_anything() {
            return Ok(());
        }
        self.write(change, before, undo)?;
        info!(
            app,
            "security groups {}",
            if self.state.netout().contains_key(app) { "set" } else { "removed" }
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
        let (owner, name) = (app.to_owned(), hostname.clone());
        let change = if map {
            Change::MapRoute { app: owner, hostname: name }
        } else {
            Change::UnmapRoute { app: owner, hostname: name }
        };
        let before = reconcile::before(&self.state, &change);
        let undo = if map {
            self.state.map_route_undoable(app, &hostname)?
        } else {
            self.state.unmap_route_undoable(app, &hostname)?
        };
        if !undo.changes_anything() {
            return Ok(());
        }
        self.write(change, before, undo)?;
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
        let change = Change::RemoveEndpoint(ip);
        let before = reconcile::before(&self.state, &change);
        let undo = self.state.remove_endpoint_undoable(ip);
        self.write(change, before, undo)?;
        info!(%ip, app = %endpoint.app, ifname = endpoint.ifname, "endpoint removed");
        Ok(true)
    }
}

#[cfg(test)]
mod policy_server_tests;
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
            Err(AgentError::Kernel(DataplaneError::MapFull { .. }))
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
            space_id: None,
            workload: None,
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
                space_id: None,
                workload: None,
            })
            .unwrap();
        assert_eq!(agent.kernel().endpoints[&std::net::Ipv4Addr::new(10, 255, 0, 1)].tag, 1);
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
            space_id: None,
            workload: None,
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
