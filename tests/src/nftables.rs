//! Cloud Foundry's policies as an nftables expert would write them — the
//! strongest non-eBPF baseline for the benchmarks (issue 15):
//!
//! - a map from source container address to its app's tag, set as the
//!   packet's mark (`meta mark set ip saddr map @marks`);
//! - one set keyed by `mark . daddr . l4proto . dport` with port intervals
//!   (a concatenated-range "pipapo" set: one lookup per packet whatever the
//!   number of policies), matched in one rule;
//! - conntrack for replies first, a final `reject` for the rest of the
//!   container network.
//!
//! Policy changes are element additions and deletions in one `nft -f`
//! transaction: no chain rebuild. Everything lives in table `inet cfpolicy`
//! of the test's own namespace.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use crate::{
    iptables::{CfPolicy, OVERLAY},
    netns::NetNs,
};

const TABLE: &str = "inet cfpolicy";

/// Elements per `add element` statement (all statements of one file are
/// one transaction).
const ELEMENTS_PER_STATEMENT: usize = 10_000;

/// Whether `nft` is installed (`cargo xtask setup` installs it).
pub fn available() -> bool {
    Command::new("nft").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// The rule set in one namespace.
pub struct CfNftables<'a> {
    ns: &'a NetNs,
}

/// One set element. The port is always written as a range: nft 1.0.6
/// deletes a single-port element of a concatenated interval set only in
/// the `P-P` form.
fn element(p: &CfPolicy) -> String {
    format!("{:#x} . {} . {} . {}-{}", p.source_tag, p.destination, p.protocol, p.start, p.end)
}

/// `verb element ... { e, e, ... }` statements for `policies`.
fn element_statements(verb: &str, policies: &[CfPolicy]) -> String {
    policies
        .chunks(ELEMENTS_PER_STATEMENT)
        .map(|chunk| {
            let elements: Vec<String> = chunk.iter().map(element).collect();
            format!("{verb} element {TABLE} allowed {{ {} }}\n", elements.join(", "))
        })
        .collect()
}

impl<'a> CfNftables<'a> {
    /// Creates the table with the local containers' tags and `policies`.
    pub fn install(ns: &'a NetNs, sources: &[(Ipv4Addr, u32)], policies: &[CfPolicy]) -> Self {
        let marks: Vec<String> =
            sources.iter().map(|(addr, tag)| format!("{addr} : {tag:#x}")).collect();
        let mut input = format!(
            "table {TABLE} {{
  map marks {{
    type ipv4_addr : mark
    {marks}
  }}
  set allowed {{
    type mark . ipv4_addr . inet_proto . inet_service
    flags interval
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ct state established,related accept
    ip daddr != {OVERLAY} accept
    meta mark set ip saddr map @marks
    meta mark . ip daddr . meta l4proto . th dport @allowed accept
    reject
  }}
}}
",
            marks = if marks.is_empty() {
                String::new()
            } else {
                format!("elements = {{ {} }}", marks.join(", "))
            },
        );
        input.push_str(&element_statements("add", policies));
        let rules = Self { ns };
        rules.apply(&input);
        rules
    }

    /// Adds policies, in one transaction.
    pub fn add(&self, policies: &[CfPolicy]) {
        self.apply(&element_statements("add", policies));
    }

    /// Removes policies, in one transaction.
    pub fn remove(&self, policies: &[CfPolicy]) {
        self.apply(&element_statements("delete", policies));
    }

    /// How many elements the policy set holds.
    pub fn element_count(&self) -> usize {
        let out = self
            .ns
            .command("nft")
            .args(["-j", "list", "set", "inet", "cfpolicy", "allowed"])
            .output()
            .expect("nft");
        let listing: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nft -j");
        listing["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o["set"]["elem"].as_array())
            .map(Vec::len)
            .sum()
    }

    fn apply(&self, input: &str) {
        let mut child = self
            .ns
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft");
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write rules");
        let out = child.wait_with_output().expect("nft");
        assert!(out.status.success(), "nft -f: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_are_tag_address_protocol_and_port_or_range() {
        let p = |start, end| CfPolicy {
            source_tag: 26,
            destination: Ipv4Addr::new(10, 255, 0, 2),
            protocol: "tcp",
            start,
            end,
        };
        assert_eq!(element(&p(8080, 8080)), "0x1a . 10.255.0.2 . tcp . 8080-8080");
        assert_eq!(element(&p(8080, 8090)), "0x1a . 10.255.0.2 . tcp . 8080-8090");
        let many: Vec<CfPolicy> = (0..25_000).map(|_| p(1, 1)).collect();
        assert_eq!(element_statements("add", &many).lines().count(), 3);
    }
}
