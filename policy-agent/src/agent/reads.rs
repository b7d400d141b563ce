//! What the agent reports about itself and the kernel: status, counters,
//! explanations. The API, metrics and the CLI read through these, never
//! through the kernel handle.

use std::net::Ipv4Addr;

use policy_common::maps::{Overlay, PolicyCounters};
use serde::Serialize;

use super::Agent;
use crate::{
    Dataplane, DataplaneError,
    dataplane::EventStats,
    explain::{Explanation, FlowQuery},
    state::{Policy, tag_text},
};

/// `GET /v1/status`, `policy-agent status`.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub pin_dir: String,
    /// Pinned links (`tc-IFNAME-HOOK`, `cgroup-ID-HOOK`).
    pub attached: Vec<String>,
    pub endpoints: usize,
    pub apps: Vec<AppTag>,
    pub policies: usize,
    pub epoch: u32,
    /// The overlay network whose endpoints have array slots (null: none).
    pub overlay: Option<OverlayStatus>,
    pub maps: Vec<MapOccupancy>,
    pub verdicts: Vec<VerdictCount>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AppTag {
    pub id: String,
    /// Zero-padded hex, as Cloud Foundry shows tags.
    pub tag: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct OverlayStatus {
    pub network: String,
    pub slots: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct MapOccupancy {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
    /// What the kernel charges for it (`bytes_memlock`).
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct VerdictCount {
    pub reason: &'static str,
    /// `pass` or `drop`.
    pub verdict: &'static str,
    pub packets: u64,
}

/// A policy with its packet and byte counts.
#[derive(Clone, Debug)]
pub struct PolicyStats {
    pub policy: Policy,
    pub id: u32,
    pub counters: PolicyCounters,
}

fn overlay_status(o: Overlay) -> Option<OverlayStatus> {
    (o.slots != 0)
        .then(|| OverlayStatus { network: Ipv4Addr::from(o.base).to_string(), slots: o.slots })
}

impl Agent<Dataplane> {
    pub fn status(&self) -> Result<Status, DataplaneError> {
        let maps = self.kernel.maps();
        Ok(Status {
            pin_dir: self.kernel.pin_dir().display().to_string(),
            attached: self.kernel.attachments()?,
            endpoints: self.state.endpoints().count(),
            apps: self
                .state
                .tags()
                .iter()
                .map(|(id, tag)| AppTag { id: id.clone(), tag: tag_text(*tag) })
                .collect(),
            policies: self.state.policy_count(),
            epoch: maps.epoch()?,
            overlay: overlay_status(maps.overlay()),
            maps: self.map_occupancy(),
            verdicts: self.verdicts()?,
        })
    }

    /// Entries, capacity and kernel bytes of every map.
    pub fn map_occupancy(&self) -> Vec<MapOccupancy> {
        self.kernel
            .maps()
            .occupancy()
            .into_iter()
            .map(|(name, entries, (capacity, bytes))| MapOccupancy {
                name,
                entries,
                capacity,
                bytes,
            })
            .collect()
    }

    /// Packets per verdict reason, as the programs counted them.
    pub fn verdicts(&self) -> Result<Vec<VerdictCount>, DataplaneError> {
        Ok(self
            .kernel
            .maps()
            .verdicts()?
            .into_iter()
            .map(|(reason, packets)| VerdictCount {
                reason: reason.name(),
                verdict: if reason.passes() { "pass" } else { "drop" },
                packets,
            })
            .collect())
    }

    /// Flow events emitted, lost and rate-limited.
    pub fn event_stats(&self) -> Result<EventStats, DataplaneError> {
        self.kernel.maps().event_stats()
    }

    /// Flow cache entries written and live connections they pushed out.
    pub fn flow_cache_stats(&self) -> Result<crate::dataplane::FlowCacheStats, DataplaneError> {
        self.kernel.maps().flow_cache_stats()
    }

    /// Every policy with its counters (pending counts included).
    pub fn policy_stats(&self) -> Vec<PolicyStats> {
        let counters = self.kernel.maps().policy_counters_all();
        self.state
            .policies()
            .map(|(policy, id)| PolicyStats {
                policy: policy.clone(),
                id,
                counters: counters.get(&id).copied().unwrap_or_default(),
            })
            .collect()
    }

    /// Why a flow is allowed or denied, from the maps the kernel uses.
    pub fn explain(&self, query: &FlowQuery) -> Explanation {
        crate::explain::explain(self.kernel.maps(), &self.state, query)
    }
}
