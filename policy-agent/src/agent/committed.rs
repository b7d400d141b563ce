//! Changes other agents committed (cluster mode): already validated and
//! durable, so they are applied without checks and cannot be refused. The
//! kernel follows make-before-break as for local writes; a kernel write that
//! fails (a full map) is logged and counted, and the next start's full
//! reconcile tries again — the state keeps the change, as the cluster does.

use tracing::warn;

use super::{Agent, touched};
use crate::{
    Error,
    reconcile::{self, Kernel},
    store::Change,
};

impl<K: Kernel> Agent<K> {
    pub(super) fn apply_committed(&mut self, change: &Change) {
        if let Err(e) = self.apply_committed_to_kernel(change) {
            warn!(error = %e, ?change, "the kernel could not follow a change from the cluster");
        }
    }

    fn apply_committed_to_kernel(&mut self, change: &Change) -> Result<(), Error> {
        match change {
            Change::AddPolicies(policies) | Change::RemovePolicies(policies) => {
                let removed: Vec<u32> = match change {
                    Change::RemovePolicies(_) => {
                        policies.iter().filter_map(|p| self.state.policy_id(p)).collect()
                    }
                    _ => Vec::new(),
                };
                let before = reconcile::before_change(&self.state, touched(policies));
                change.replay(&mut self.state);
                reconcile::touched_pairs(&mut self.kernel, &self.state, &before)?;
                self.kernel.forget_policies(&removed);
            }
            Change::AddEndpoint(endpoint) => {
                let old = self.state.endpoint(endpoint.ip).cloned();
                change.replay(&mut self.state);
                let tag = self.state.tag(&endpoint.app).expect("add_endpoint tags the app");
                let local = self.state.local_host();
                if endpoint.runs_on(local) {
                    self.kernel.attach(&endpoint.ifname, endpoint.ipv4(), tag)?;
                    self.kernel.bind_veth6(&endpoint.ifname, endpoint.ipv6)?;
                }
                let value = self.state.endpoint_value(endpoint).expect("tagged above");
                reconcile::set_endpoint_addresses(&mut self.kernel, endpoint, value)?;
                if let Some(stale) =
                    old.as_ref().and_then(|o| o.ipv6).filter(|a| endpoint.ipv6 != Some(*a))
                {
                    self.kernel.remove_endpoint6(stale)?;
                }
                if let Some(old) = old.filter(|o| o.runs_on(local)) {
                    let moved = !endpoint.runs_on(local) || old.ifname != endpoint.ifname;
                    if moved {
                        self.kernel.detach(&old.ifname, None)?;
                    }
                }
            }
            Change::RemoveEndpoint(ip) => {
                let old = self.state.endpoint(*ip).cloned();
                change.replay(&mut self.state);
                if let Some(old) = old {
                    // Removed by another host while its container is still
                    // here (this host was gone past its grace time): held
                    // as it is, never left unpoliced.
                    let local = old.runs_on(self.state.local_host());
                    if local && self.hold(&old) {
                        return Ok(());
                    }
                    if local {
                        self.kernel.detach(&old.ifname, old.ipv4())?;
                    }
                    reconcile::remove_endpoint_addresses(&mut self.kernel, &old)?;
                }
            }
            Change::MapRoute { .. } | Change::UnmapRoute { .. } => {
                change.replay(&mut self.state);
                return Ok(());
            }
            Change::SetAsgs { .. } => {
                change.replay(&mut self.state);
                return reconcile::netout(&mut self.kernel, &self.state);
            }
            Change::Reset(_) => {
                // Fell behind a compacted log: the whole state, then the
                // kernel to it, make-before-break as at start.
                let before: Vec<_> = self.state.local_endpoints().cloned().collect();
                change.replay(&mut self.state);
                let gone: Vec<_> =
                    before.into_iter().filter(|e| self.state.endpoint(e.ip).is_none()).collect();
                for endpoint in &gone {
                    self.hold(endpoint);
                }
                for w in reconcile::full_keeping(&mut self.kernel, &self.state, &self.held)? {
                    warn!("{w}");
                }
                return Ok(());
            }
        }
        if matches!(change, Change::AddEndpoint(_) | Change::RemoveEndpoint(_)) {
            reconcile::port_mappings(&mut self.kernel, &self.state)?;
        }
        // An app's tag may have come or gone with it.
        if !self.state.asgs().is_empty() {
            reconcile::netout(&mut self.kernel, &self.state)?;
        }
        Ok(())
    }
}
