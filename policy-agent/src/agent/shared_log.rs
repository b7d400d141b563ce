//! The agent and the cluster's shared log when it diverged from what this
//! agent applied (see `store::lineage`): what it reports, and the
//! republish that makes this agent's state the newest again.

use tracing::{info, warn};

use super::Agent;
use crate::{
    reconcile::{self, Kernel},
    store::lineage::{Divergence, Republished},
};

impl<K: Kernel> Agent<K> {
    /// Why the shared log is not the one this agent applied (None: it is,
    /// or a single host).
    pub fn diverged(&self) -> Option<&Divergence> {
        self.store.diverged()
    }

    /// The identity of the shared log this agent follows.
    pub fn log_id(&self) -> Option<&str> {
        self.store.log_id()
    }

    /// Publishes this agent's state as the newest of the cluster, past
    /// change `floor`, if the log's head is still at `expected_head` (see
    /// `cluster::republish` for who may). The kernel is reconciled to the
    /// state, make-before-break, if it was left as it was at start.
    pub fn republish(
        &mut self,
        floor: u64,
        expected_head: u64,
    ) -> Result<Republished, super::AgentError> {
        let republished = self.store.republish(&self.state, floor, expected_head)?;
        if self.reconcile_pending {
            for w in reconcile::full_keeping(&mut self.kernel, &self.state, &self.held)? {
                warn!("{w}");
            }
            self.reconcile_pending = false;
            info!("republished: the kernel is reconciled to this host's state");
        }
        self.synced = std::time::Instant::now();
        Ok(republished)
    }
}
