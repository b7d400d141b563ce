//! Cluster mode: a host that comes back after `host_grace_seconds` (its
//! agent stopped, or cut off from etcd) finds that another host removed its
//! endpoints from the shared state, the gone host's clean-up. Its
//! containers are still there, behind veths this agent attached. Detaching
//! them would leave them unpoliced, so they are **held**: left in the kernel
//! exactly as they were (attached, checked as their app, whose policies
//! still follow the cluster's), never detached, until this agent registers
//! them again — the host registration does, once the host holds its /24
//! again — or their veth goes. One whose address another endpoint took
//! meanwhile is denied everything (a tag no policy names) until its
//! container goes.
//!
//! Where a hold begins: a change from another host removing an endpoint
//! that runs here, or, at start, an endpoint this host knew (its local copy
//! of the state, or the held list kept in `cluster-held.json`) that etcd no
//! longer has.

use std::{collections::BTreeMap, net::IpAddr};

use tracing::{info, warn};

use super::Agent;
use crate::{reconcile::Kernel, state::Endpoint, state::State};

/// The tag a held endpoint is denied with when its address went to another
/// endpoint: tags are handed out from 1 upwards and never reused, so no
/// policy names this one.
pub const DENIED_TAG: u32 = u32::MAX;

/// What became of the held endpoints at one registration.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// Registered again, as they were.
    pub registered: Vec<IpAddr>,
    /// Their veths are gone: let go.
    pub gone: Vec<IpAddr>,
    /// Still held (denied where their address is another endpoint's).
    pub kept: Vec<IpAddr>,
}

/// Of the endpoints this host knew, those `state` no longer has whose veths
/// are still here.
pub(super) fn still_here<K: Kernel>(
    kernel: &K,
    state: &State,
    known: Vec<Endpoint>,
) -> BTreeMap<IpAddr, Endpoint> {
    known
        .into_iter()
        .filter(|e| e.runs_on(state.local_host()) && state.local_host().is_some())
        .filter(|e| state.endpoint(e.ip).is_none())
        .filter(|e| kernel.interface_exists(&e.ifname))
        .inspect(|e| {
            warn!(
                ip = %e.ip,
                app = %e.app,
                ifname = e.ifname,
                "the cluster no longer has this host's endpoint whose container is still here: \
                 held as it was until registered again"
            );
        })
        .map(|e| (e.ip, e))
        .collect()
}

impl<K: Kernel> Agent<K> {
    /// This host's endpoints held (see the module).
    pub fn held(&self) -> &BTreeMap<IpAddr, Endpoint> {
        &self.held
    }

    /// Another host removed `endpoint`, which runs here: held if its veth
    /// is still here (the kernel left as it is). False: let it go.
    pub(super) fn hold(&mut self, endpoint: &Endpoint) -> bool {
        if !self.kernel.interface_exists(&endpoint.ifname) {
            return false;
        }
        warn!(
            ip = %endpoint.ip,
            app = %endpoint.app,
            ifname = endpoint.ifname,
            "another host removed this host's endpoint whose container is still here: \
             held as it was until registered again"
        );
        self.held.insert(endpoint.ip, endpoint.clone());
        self.save_held();
        true
    }

    /// Registers the held endpoints again where `may_register` (this host
    /// holds its /24 again) and `in_subnet` says their address is this
    /// host's, lets go of those whose veths are gone, and denies those
    /// whose address another endpoint has.
    pub fn register_held(
        &mut self,
        may_register: bool,
        in_subnet: impl Fn(IpAddr) -> bool,
    ) -> Held {
        let mut outcome = Held::default();
        let held: Vec<Endpoint> = self.held.values().cloned().collect();
        for endpoint in held {
            let ip = endpoint.ip;
            if !self.kernel.interface_exists(&endpoint.ifname) {
                if let Err(e) = self.kernel.detach(&endpoint.ifname, endpoint.ipv4()) {
                    warn!(%ip, error = %e, "cannot clean up a held endpoint whose veth is gone");
                }
                self.let_go(ip, &endpoint, &mut outcome.gone);
                continue;
            }
            match self.state.endpoint(ip).cloned() {
                Some(now)
                    if now.runs_on(self.state.local_host()) && now.ifname == endpoint.ifname =>
                {
                    // Registered again already (by the runtime, say).
                    self.held.remove(&ip);
                    outcome.registered.push(ip);
                }
                Some(other) => {
                    if let Err(e) =
                        self.kernel.attach(&endpoint.ifname, endpoint.ipv4(), DENIED_TAG)
                    {
                        warn!(%ip, error = %e, "cannot deny a held endpoint");
                    }
                    warn!(
                        %ip,
                        ifname = endpoint.ifname,
                        now = ?other.host,
                        "a held endpoint's address is another endpoint's now: denied until its container goes"
                    );
                    outcome.kept.push(ip);
                }
                None if may_register && in_subnet(ip) => {
                    match self.add_endpoint(endpoint.clone()) {
                        Ok(()) => {
                            info!(%ip, app = %endpoint.app, "held endpoint registered again");
                            self.held.remove(&ip);
                            outcome.registered.push(ip);
                        }
                        Err(e) => {
                            warn!(%ip, error = %e, "cannot register a held endpoint again; retrying");
                            outcome.kept.push(ip);
                        }
                    }
                }
                None => outcome.kept.push(ip),
            }
        }
        self.save_held();
        outcome
    }

    fn let_go(&mut self, ip: IpAddr, endpoint: &Endpoint, gone: &mut Vec<IpAddr>) {
        info!(%ip, ifname = endpoint.ifname, "held endpoint's veth is gone: let go");
        self.held.remove(&ip);
        gone.push(ip);
    }

    /// Keeps the held list across restarts (best effort: the local copy
    /// of the state also names them until it is rewritten).
    pub(super) fn save_held(&self) {
        let Some(path) = &self.held_file else { return };
        let result = if self.held.is_empty() {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        } else {
            let list: Vec<&Endpoint> = self.held.values().collect();
            let json = serde_json::to_vec_pretty(&list).expect("endpoints serialize");
            policy_api::files::replace(path, &json, 0o600)
        };
        if let Err(e) = result {
            warn!(path = %path.display(), error = %e, "cannot save the held endpoints");
        }
    }
}

/// The held list saved at `path` (empty if none or unreadable).
pub fn read_held(path: &std::path::Path) -> Vec<Endpoint> {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        agent::Settings,
        reconcile::fake::FakeKernel,
        store::{Change, Journal},
    };

    fn endpoint(last: u8, ifname: &str) -> Endpoint {
        Endpoint {
            ip: Ipv4Addr::new(10, 255, 1, last).into(),
            ipv6: None,
            app: "web".into(),
            ifname: ifname.into(),
            netns: None,
            host: Some("me".into()),
            port_mappings: Vec::new(),
            space_id: None,
            workload: None,
        }
    }

    #[test]
    fn an_endpoint_removed_elsewhere_while_its_veth_is_here_is_held_then_registered_again() {
        let dir = std::env::temp_dir().join(format!("policy-agent-held-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut kernel = FakeKernel::new(100);
        kernel.interfaces.extend(["v1".to_owned(), "v2".to_owned()]);
        let settings = Settings {
            host: Some("me".into()),
            held_file: Some(dir.join("held.json")),
            ..Settings::default()
        };
        let store = Box::new(Journal::open(&dir).unwrap());
        let (mut agent, _) = Agent::start(kernel, store, settings).unwrap();
        let (kept, gone) = (endpoint(2, "v1"), endpoint(3, "v2"));
        agent.add_endpoint(kept.clone()).unwrap();
        agent.add_endpoint(gone.clone()).unwrap();

        // Another host removes both; v2's container is gone meanwhile.
        agent.kernel.interfaces.remove("v2");
        agent.kernel.log.clear();
        agent.apply_committed(&Change::RemoveEndpoint(kept.ip));
        agent.apply_committed(&Change::RemoveEndpoint(gone.ip));
        assert_eq!(agent.held().keys().copied().collect::<Vec<_>>(), vec![kept.ip]);
        assert!(agent.kernel.attached.contains_key("v1"), "held: still attached");
        assert!(agent.kernel.endpoints.contains_key(&Ipv4Addr::new(10, 255, 1, 2)));
        assert!(!agent.kernel.log.iter().any(|l| l == "detach v1"), "{:?}", agent.kernel.log);
        assert!(agent.kernel.log.iter().any(|l| l == "detach v2"), "let go: its veth is gone");
        assert_eq!(read_held(&dir.join("held.json")), vec![kept.clone()], "kept across restarts");

        // Not while another host has this host's /24.
        assert_eq!(agent.register_held(false, |_| true).kept, vec![kept.ip]);
        let held = agent.register_held(true, |_| true);
        assert_eq!(held.registered, vec![kept.ip]);
        assert!(agent.held().is_empty() && agent.state().endpoint(kept.ip).is_some());
        assert!(!dir.join("held.json").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
