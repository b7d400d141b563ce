//! Prometheus metrics. The agent's own (API requests and latency, write and
//! reconcile durations, errors) are recorded as they happen; the kernel's
//! (verdict counters, flow event counters, map occupancy) and the totals are
//! read from the maps and the state at each scrape.
//!
//! In cluster mode: `policy_cluster_applied_seq` and
//! `policy_cluster_log_diverged{cause}` (see `store::lineage`).
//!
//! Cloud Foundry's agent names are kept where the meaning matches:
//! `totalPolicies`, and `enforceTime` for the time from an API write to the
//! kernel holding it. With a policy server (`[cf]`): `policyServerPollTime`
//! (seconds a poll that fetched took, fetch and apply),
//! `policy_server_set_age_seconds`, `policy_server_last_success_age_seconds`,
//! `policy_server_consecutive_failures` and `policy_server_poll_failures{kind}`.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    agent::{self, SharedAgent},
    store::lineage::{CAUSES, Divergence},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub method: String,
    pub path: String,
    pub status: u16,
}

pub struct Metrics {
    registry: Registry,
    pub api_requests: Family<ApiLabels, Counter>,
    pub api_latency: Family<ApiLabels, Histogram>,
    /// Seconds from an accepted write to the kernel and store holding it.
    pub enforce_time: Histogram,
    pub reconcile_duration: Histogram,
    pub reconcile_errors: Counter,
    /// Veths found with their programs removed by another tool, and
    /// attached again.
    pub veths_reattached: Counter,
    /// With a policy server: each fetching poll's duration.
    pub policy_server_poll_time: Histogram,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Metrics {
    pub fn new(agent: SharedAgent, policy_server: Option<crate::cf::SharedStatus>) -> Self {
        let mut registry = Registry::default();
        let api_requests = Family::<ApiLabels, Counter>::default();
        let api_latency = Family::<ApiLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let enforce_time = latency_histogram();
        let reconcile_duration = latency_histogram();
        let reconcile_errors = Counter::default();
        let veths_reattached = Counter::default();
        registry.register(
            "policy_api_requests",
            "API requests by method, path and status",
            api_requests.clone(),
        );
        registry.register("policy_api_request_seconds", "API request latency", api_latency.clone());
        registry.register(
            "enforceTime",
            "Seconds from accepting a policy or endpoint write to the kernel maps and the store holding it",
            enforce_time.clone(),
        );
        registry.register(
            "policy_reconcile_seconds",
            "Duration of reconciles of the kernel to the stored state",
            reconcile_duration.clone(),
        );
        registry.register(
            "policy_reconcile_errors",
            "Writes or reconciles the kernel refused",
            reconcile_errors.clone(),
        );
        registry.register(
            "policy_veths_reattached",
            "Veths whose TC filters or qdisc another tool removed, found and attached again",
            veths_reattached.clone(),
        );
        let policy_server_poll_time = latency_histogram();
        if let Some(status) = policy_server {
            registry.register(
                "policyServerPollTime",
                "Seconds a poll of the policy server that fetched policies took, fetch and apply (vxlan-policy-agent's metric, in seconds)",
                policy_server_poll_time.clone(),
            );
            registry.register_collector(Box::new(PolicyServerCollector { status }));
        }
        registry.register_collector(Box::new(KernelCollector { agent }));
        Self {
            registry,
            api_requests,
            api_latency,
            enforce_time,
            reconcile_duration,
            reconcile_errors,
            veths_reattached,
            policy_server_poll_time,
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The policy server follower's status at scrape time.
#[derive(Debug)]
struct PolicyServerCollector {
    status: crate::cf::SharedStatus,
}

impl Collector for PolicyServerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = self.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let gauge = ConstGauge::new(0.0f64);
        for (name, help, value) in [
            (
                "policy_server_set_age_seconds",
                "Seconds since the policy set in force was fetched from the policy server",
                status.set_age(),
            ),
            (
                "policy_server_last_success_age_seconds",
                "Seconds since the last successful poll of the policy server",
                status.last_success.map(|t| (now - t).max(0.0)),
            ),
            (
                "policy_server_consecutive_failures",
                "Polls of the policy server that failed in a row (enforcement unchanged meanwhile)",
                Some(status.consecutive_failures as f64),
            ),
        ] {
            if let Some(value) = value {
                ConstGauge::new(value).encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    gauge.metric_type(),
                )?)?;
            }
        }
        let counter = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "policy_server_poll_failures",
            "Failed polls of the policy server by kind (unreachable, client_certificate_refused, server_error, ...)",
            None,
            counter.metric_type(),
        )?;
        for (kind, n) in &status.failures {
            ConstCounter::new(*n).encode(family.encode_family(&[("kind", *kind)])?)?;
        }
        Ok(())
    }
}

/// Reads the kernel maps and the state at scrape time.
#[derive(Debug)]
struct KernelCollector {
    agent: SharedAgent,
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let agent = agent::lock(&self.agent);
        let state = agent.state();

        let verdicts = agent.verdicts().unwrap_or_default();
        let counter = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "policy_verdict_packets",
            "Packets by verdict and reason, as the programs counted them",
            None,
            counter.metric_type(),
        )?;
        for v in verdicts {
            let labels = [("verdict", v.verdict), ("reason", v.reason)];
            ConstCounter::new(v.packets).encode(family.encode_family(&labels)?)?;
        }

        if let Ok(stats) = agent.event_stats() {
            let mut family = encoder.encode_descriptor(
                "policy_flow_events",
                "Flow events by outcome: emitted, lost (ring buffer full), rate_limited",
                None,
                counter.metric_type(),
            )?;
            for (outcome, n) in [
                ("emitted", stats.emitted),
                ("lost", stats.lost),
                ("rate_limited", stats.rate_limited),
            ] {
                ConstCounter::new(n).encode(family.encode_family(&[("outcome", outcome)])?)?;
            }
        }

        if let Ok(stats) = agent.flow_cache_stats() {
            let fills = stats.fills + stats.fills6;
            let evictions = stats.evictions + stats.evictions6;
            let mut family = encoder.encode_descriptor(
                "policy_flow_cache",
                "Per-CPU flow caches, IPv4 and IPv6: fills (established packets they did not answer), evictions (fills that pushed out a live connection)",
                None,
                counter.metric_type(),
            )?;
            for (event, n) in [("fills", fills), ("evictions", evictions)] {
                ConstCounter::new(n).encode(family.encode_family(&[("event", event)])?)?;
            }
        }

        let gauge = ConstGauge::new(0i64);
        let occupancy = agent.map_occupancy();
        for (metric, help, pick) in [
            ("policy_map_entries", "Entries in each kernel map", 0),
            ("policy_map_capacity", "Capacity (max_entries) of each kernel map", 1),
            ("policy_map_bytes", "Kernel memory charged for each map (bytes_memlock)", 2),
        ] {
            let mut family = encoder.encode_descriptor(metric, help, None, gauge.metric_type())?;
            for map in &occupancy {
                let value = match pick {
                    0 => map.entries as i64,
                    1 => i64::from(map.capacity),
                    _ => i64::try_from(map.bytes).unwrap_or(i64::MAX),
                };
                ConstGauge::new(value).encode(family.encode_family(&[("map", map.name)])?)?;
            }
        }

        let totals = [
            ("totalPolicies", "Policies (Cloud Foundry's agent metric)", state.policy_count()),
            ("policy_policies", "Policies", state.policy_count()),
            ("policy_endpoints", "Registered endpoints", state.endpoints().count()),
            ("policy_apps", "Apps with a tag", state.tags().len()),
        ];
        for (name, help, value) in totals {
            ConstGauge::new(value as i64).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                gauge.metric_type(),
            )?)?;
        }

        if state.local_host().is_some() {
            let seq = i64::try_from(agent.position().seq).unwrap_or(i64::MAX);
            ConstGauge::new(seq).encode(encoder.encode_descriptor(
                "policy_cluster_applied_seq",
                "The newest change of the cluster's log this host applied",
                None,
                gauge.metric_type(),
            )?)?;
            let diverged = agent.diverged().map(Divergence::cause);
            let mut family = encoder.encode_descriptor(
                "policy_cluster_log_diverged",
                "1 while the cluster's log in etcd is not the one this host applied, by cause: enforcement stays as it was and writes are refused until `policy-agent cluster republish`",
                None,
                gauge.metric_type(),
            )?;
            for cause in CAUSES {
                let value = i64::from(diverged == Some(cause));
                ConstGauge::new(value).encode(family.encode_family(&[("cause", cause)])?)?;
            }
        }
        Ok(())
    }
}
