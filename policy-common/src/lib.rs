//! The map ABI shared by the kernel programs and the agent, and the pure
//! decision logic both of them (and the tests' reference model) agree on.
//!
//! Everything here is `no_std` and allocation-free so that the eBPF crate can
//! use it unchanged; the `user` feature adds `aya::Pod` for the map types.
#![no_std]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(any(test, feature = "user"))]
pub mod craft;
pub mod decision;
pub mod family;
pub mod hint;
pub mod limits;
pub mod maps;
pub mod netout;
pub mod packet;
pub mod ports;
pub mod verdict;

pub use decision::{Decision, Lookups, decide_destination, decide_source};
pub use family::Family;
pub use packet::{Flow, PacketBytes, Parsed, parse_ipv4, parse_ipv6};
pub use verdict::{Reason, Verdict};
