//! Cloud Foundry's control plane as the agent's input (`[cf]`): the
//! policy server's policies and tags, polled as vxlan-policy-agent polls
//! them, put in force by the eBPF dataplane.
//!
//! - `config`: the `[cf]` section;
//! - `client`: the policy server's internal API (mutual TLS, one kept
//!   connection); `http`: where its answers end (HTTP/1.1 framing);
//! - `wire`: its answers, turned into policies and tags;
//! - `poller`: the poll loop both pollers run, its status, forced polls;
//! - `follow`: the policies' poller;
//! - `store`, `containers`: the cell's containers from CF's container
//!   metadata store, registered as endpoints;
//! - `iptables`: the agent's chain in front of cni-wrapper-plugin's;
//! - `silk`: joining silk's overlay (`silk-vtep`, its GBP tags).
//! - `asgs`: dynamic security groups: the fetch, and which rules hold for
//!   a container.

pub mod asg_follow;
pub mod asgs;
pub mod client;
#[cfg(test)]
mod client_tests;
pub mod config;
pub mod containers;
pub mod follow;
pub mod http;
pub mod iptables;
pub mod poller;
pub mod silk;
pub mod store;
pub mod vpa_config;
pub mod wire;

pub use client::{PolicyServerClient, ServerError};
pub use config::CfConfig;
pub use follow::Follower;
pub use poller::{FollowStatus, PollHandle, SharedStatus};
