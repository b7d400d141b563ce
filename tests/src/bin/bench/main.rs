//! `cargo xtask bench`: prints figures, asserts nothing.
//! 1. per-packet cost of the programs against an empty program;
//! 2. the agent: API write → enforcement latency, loading 100k policies;
//! 3. platform TLS on 61443 versus plain TCP.

mod agent;
mod dataplane;
mod tls;

fn main() {
    integration_tests::require_root();
    let quick = std::env::args().any(|a| a == "--quick");
    // BENCH_ONLY=dataplane|agent|tls runs one part.
    let only = std::env::var("BENCH_ONLY").ok();
    let runs = |part: &str| only.as_deref().is_none_or(|o| o == part);
    if runs("dataplane") {
        dataplane::run(quick);
        dataplane::reporting(quick);
    }
    if runs("agent") {
        agent::run(quick);
    }
    if runs("tls") {
        tls::run(quick);
    }
}
