//! What policy-agent shares with its clients — its own CLI and the CNI
//! plugin — without the agent itself (whose build compiles the eBPF
//! programs): the API's JSON shapes ([`wire`]), a blocking client for the
//! API ([`client`]: the Unix socket, or HTTPS with an API identity under
//! the `tls` feature), and the host-side rules both sides must agree on —
//! how containers are addressed ([`addressing`]), which app ids are
//! valid ([`app_id`]), network namespaces by path ([`netns`]), files
//! replaced whole ([`files`]) and links ([`link`]).

pub mod addressing;
pub mod app_id;
pub mod client;
pub mod files;
pub mod link;
pub mod netns;
pub mod wire;

pub use addressing::{GATEWAY, GATEWAY6, Ipv6Prefix};
pub use app_id::{AppIdError, MAX_ID_LEN, check_app_id};
pub use client::{Client, ClientError, Response};
