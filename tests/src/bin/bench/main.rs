//! `cargo xtask bench`: prints figures, asserts nothing.
//! 1. per-packet cost of the programs against an empty program;
//! 2. the agent: API write → enforcement latency, loading 100k policies.

mod agent;
mod dataplane;

fn main() {
    integration_tests::require_root();
    let quick = std::env::args().any(|a| a == "--quick");
    dataplane::run(quick);
    dataplane::reporting(quick);
    agent::run(quick);
}
