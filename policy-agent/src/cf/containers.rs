//! The cell's containers from Cloud Foundry's container metadata store
//! (`cni_datastore_path`, see `store`), kept registered as the agent's
//! endpoints: one added when garden's networker writes it, removed when
//! it deletes it. The handles the agent registered this way are kept in
//! the state directory, so a container deleted while the agent was down
//! is removed at its start, and endpoints registered otherwise (the API,
//! `policy-cni`) are never touched.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use super::store::{MetadataStore, routed_interface};
use crate::{
    agent::{self, SharedAgent},
    state::Endpoint,
};

/// The file in the state directory naming the containers registered from
/// the store: handle → address.
pub const REGISTERED_FILE: &str = "cf-containers.json";

pub struct StoreFollower {
    store: MetadataStore,
    registered: BTreeMap<String, Ipv4Addr>,
    file: PathBuf,
    /// A container could not be registered yet (its veth's route not
    /// there yet, say): read the store again next time.
    retry: bool,
}

impl StoreFollower {
    pub fn new(path: &Path, state_dir: &Path) -> Self {
        let file = state_dir.join(REGISTERED_FILE);
        let registered = std::fs::read(&file)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Self { store: MetadataStore::new(path), registered, file, retry: false }
    }

    /// Registers what the store added and removes what it deleted, if it
    /// changed. Returns whether any endpoint changed.
    pub fn sync(&mut self, agent: &SharedAgent) -> Result<bool, String> {
        if self.retry {
            self.store = MetadataStore::new(self.store.path());
        }
        let Some(super::store::Read { containers, skipped }) = self.store.read_if_changed()? else {
            return Ok(false);
        };
        for why in skipped {
            warn!("container metadata store: {why}: not policed");
        }
        self.retry = false;
        let mut changed = false;
        let mut registered = BTreeMap::new();
        for c in &containers {
            let Some(ifname) = routed_interface(c.ip) else {
                warn!(handle = c.handle, ip = %c.ip, "no /32 route to this container's interface yet: not registered until there is one");
                self.retry = true;
                continue;
            };
            let endpoint = Endpoint {
                ip: IpAddr::V4(c.ip),
                ipv6: None,
                app: c.app.as_str().into(),
                ifname,
                netns: None,
                host: None,
                port_mappings: Vec::new(),
                space_id: c.space.clone(),
                workload: c.workload.clone(),
            };
            let mut agent = agent::lock(agent);
            let same = agent.state().endpoint(endpoint.ip).is_some_and(|e| {
                e.app == endpoint.app
                    && e.ifname == endpoint.ifname
                    && e.ipv6.is_none()
                    && (e.space_id.as_ref(), e.workload.as_ref())
                        == (endpoint.space_id.as_ref(), endpoint.workload.as_ref())
            });
            if !same {
                match agent.add_endpoint(endpoint.clone()) {
                    Ok(()) => {
                        changed = true;
                        info!(handle = c.handle, ip = %c.ip, app = c.app, ifname = endpoint.ifname, "container from the metadata store registered");
                    }
                    Err(e) => {
                        warn!(handle = c.handle, ip = %c.ip, error = %e, "container from the metadata store not registered; trying again");
                        self.retry = true;
                        continue;
                    }
                }
            }
            registered.insert(c.handle.clone(), c.ip);
        }
        for (handle, ip) in &self.registered {
            if registered.contains_key(handle) || containers.iter().any(|c| c.ip == *ip) {
                continue;
            }
            match agent::lock(agent).remove_endpoint(IpAddr::V4(*ip)) {
                Ok(removed) => {
                    changed |= removed;
                    info!(handle, ip = %ip, "container gone from the metadata store: unregistered");
                }
                Err(e) => {
                    warn!(handle, ip = %ip, error = %e, "cannot unregister a container gone from the metadata store; trying again");
                    registered.insert(handle.clone(), *ip);
                    self.retry = true;
                }
            }
        }
        if registered != self.registered {
            self.registered = registered;
            let bytes = serde_json::to_vec(&self.registered).unwrap_or_default();
            if let Err(e) = policy_api::files::replace(&self.file, &bytes, 0o600) {
                warn!(file = %self.file.display(), error = %e, "cannot record the containers registered from the metadata store");
            }
        }
        Ok(changed)
    }
}
