//! The policy agent library: loads the dataplane into the kernel, attaches it
//! to container veths and cgroups, pins it so enforcement outlives the
//! process, writes endpoints and policies into its maps, and (the daemon)
//! keeps them in step with a durable desired state served over an API.

pub mod agent;
pub mod api;
pub mod bpffs;
pub mod cf;
pub mod cluster;
pub mod config;
pub mod dataplane;
pub mod dns;
pub mod error;
pub mod etcd;
pub mod explain;
pub mod flows;
pub mod limits;
pub mod metrics;
pub mod netout;
pub mod reconcile;
pub mod state;
pub mod store;
mod sys;
pub mod tls;

pub use dataplane::{Capacities, Dataplane, DataplaneConfig, Direction, Maps};
pub use error::DataplaneError;

/// The compiled eBPF object (built by build.rs from policy-ebpf).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/policy"));

/// An object with one empty TC program, `tc_baseline`: what benchmarks
/// measure the policy programs against.
pub static BASELINE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/baseline"));
