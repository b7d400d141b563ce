//! Changes other agents committed (cluster mode): already validated and
//! durable, so they are applied without checks and cannot be refused. The
//! kernel follows through the same steps as for local writes
//! ([`reconcile::apply`]); a kernel write that fails (a full map) takes the
//! change back out of the kernel, is logged and counted, and the next
//! start's full reconcile tries again — the state keeps the change, as the
//! cluster does.

use tracing::warn;

use super::Agent;
use crate::{
    reconcile::{self, Kernel},
    store::Change,
};

impl<K: Kernel> Agent<K> {
    pub(super) fn apply_committed(&mut self, change: &Change) {
        let before = reconcile::before(&self.state, change);
        let local = self.state.local_host().map(str::to_owned);
        match change {
            Change::RemoveEndpoint(ip) => {
                // Removed by another host while its container is still
                // here (this host was gone past its grace time): held as
                // it is, never left unpoliced.
                let here =
                    self.state.endpoint(*ip).filter(|e| e.runs_on(local.as_deref())).cloned();
                change.replay(&mut self.state);
                if here.is_some_and(|e| self.hold(&e)) {
                    return;
                }
            }
            Change::Reset(_) => {
                // Fell behind a compacted log: the whole state; this host's
                // endpoints it no longer has are held.
                let here: Vec<_> = self.state.local_endpoints().cloned().collect();
                change.replay(&mut self.state);
                let gone: Vec<_> =
                    here.into_iter().filter(|e| self.state.endpoint(e.ip).is_none()).collect();
                for endpoint in &gone {
                    self.hold(endpoint);
                }
            }
            _ => change.replay(&mut self.state),
        }
        match reconcile::apply(&mut self.kernel, &self.state, before, &self.held) {
            Ok(applied) => {
                for w in &applied.warnings {
                    warn!("{w}");
                }
                applied.keep(&mut self.kernel);
            }
            Err(e) => {
                warn!(error = %e, ?change, "the kernel could not follow a change from the cluster");
            }
        }
    }
}
