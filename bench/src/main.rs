//! `cargo xtask bench`: prints figures, asserts nothing, and writes them to
//! `bench/results.md` with PNG plots.
//! 1. per-packet cost of the programs against an empty program, 10 to 1M
//!    policies (and the cost of reporting);
//! 2. real traffic against Cloud Foundry's iptables rule set: UDP packets/s,
//!    TCP exchange latency; 3. iperf3 throughput;
//! 4. policy update latency against an iptables rebuild;
//! 5. scale: loading 10k to 1M policies, a Cloud Foundry-sized deployment;
//! 6. platform TLS on 61443 versus plain TCP;
//! 7. cluster mode: a write enforced across hosts, fan-out to followers;
//! 8. the CNI plugin against the reference plugins, and with podman;
//! 9. NetOut's per-packet cost at 0 to 1,000 rules;
//! 10. on a Cloud Foundry cell, against vxlan-policy-agent: policy server
//!     write to first allowed connection, UDP packets/s, CPU per idle poll,
//!     60,000 policies.

mod agent;
mod api;
mod cf;
mod cluster;
mod cni;
mod compare;
mod dataplane;
mod flows;
mod large;
mod machine;
mod netout;
mod reject;
mod report;
mod soak;
mod tls;
mod update;

fn main() {
    integration_tests::require_root();
    let quick = std::env::args().any(|a| a == "--quick");
    // BENCH_ONLY=dataplane|compare|gap|large|flows|update|agent|tls|cluster|cni|netout|reject|cf|soak runs one part (soak only so).
    let only = std::env::var("BENCH_ONLY").ok();
    let runs = |part: &str| only.as_deref().is_none_or(|o| o == part);
    if runs("compare") || runs("update") || runs("reject") {
        assert!(
            integration_tests::iptables::available(),
            "iptables-legacy is missing: run `cargo xtask setup`"
        );
    }
    let mut report = report::Report::default();
    if runs("dataplane") {
        dataplane::run(quick, &mut report);
        dataplane::reporting(quick, &mut report);
    }
    if runs("compare") {
        compare::run(quick, &mut report);
    }
    if runs("compare") || runs("gap") {
        compare::gap(quick, &mut report);
    }
    if runs("compare") || runs("large") {
        large::run(quick, &mut report);
    }
    if runs("flows") {
        flows::run(quick, &mut report);
    }
    if runs("update") {
        update::run(quick, &mut report);
    }
    if runs("agent") {
        agent::run(quick, &mut report);
    }
    if runs("tls") {
        tls::run(quick, &mut report);
    }
    if runs("cluster") {
        cluster::run(quick, &mut report);
    }
    if runs("cni") {
        cni::run(quick, &mut report);
    }
    if runs("netout") {
        netout::run(quick, &mut report);
        netout::traffic(quick, &mut report);
    }
    if runs("reject") {
        reject::run(quick, &mut report);
    }
    if runs("cf") {
        cf::run(quick, &mut report);
    }
    // Minutes of churn: only when asked for (BENCH_ONLY=soak).
    if only.as_deref() == Some("soak") {
        soak::run(quick, &mut report);
    }
    // A whole run writes bench/ (committed with the code it measured); one
    // part alone writes under target/, leaving the whole run's figures be.
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().unwrap_or(manifest);
    let dir = match &only {
        None => root.join("bench"),
        Some(part) => root.join("target/bench").join(part),
    };
    report.write(&dir, quick);
}
