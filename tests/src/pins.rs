//! A pin directory under /sys/fs/bpf, removed (with everything pinned in it)
//! on drop.

use std::path::{Path, PathBuf};

use policy_agent::{Capacities, Dataplane, DataplaneConfig};

pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new() -> Self {
        Self { path: PathBuf::from("/sys/fs/bpf").join(crate::unique_name("pins")) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The dataplane's configuration here. Denied packets are dropped: the
    /// tables check verdicts, and rejects have their own tests.
    pub fn config(&self) -> DataplaneConfig {
        DataplaneConfig {
            deny: policy_agent::dataplane::DenySettings::drop(),
            ..DataplaneConfig::new(&self.path)
        }
    }

    /// Loads the dataplane (or takes over what is pinned here).
    pub fn open(&self) -> Dataplane {
        Dataplane::open(&self.config()).unwrap_or_else(|e| panic!("open dataplane: {e}"))
    }

    /// [`Self::open`] with room for `pairs` app pairs (and their policies'
    /// counters), as an operator configures a host past the default.
    pub fn open_for(&self, pairs: u32) -> Dataplane {
        let defaults = Capacities::default();
        let room = pairs.next_power_of_two();
        let capacities = Capacities {
            policies: defaults.policies.max(room),
            policy_stats: defaults.policy_stats.max(room),
            ..defaults
        };
        Dataplane::open(&DataplaneConfig { capacities, ..self.config() })
            .unwrap_or_else(|e| panic!("open dataplane: {e}"))
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = Dataplane::remove_all(&self.path) {
            eprintln!("warning: could not clean up {}: {e}", self.path.display());
        }
    }
}
