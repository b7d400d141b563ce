//! Cloud Foundry's iptables enforcement, rebuilt as the baseline the
//! benchmarks compare against. The rule shapes follow cf-networking's
//! vxlan-policy-agent and silk-cni:
//!
//! - a policy chain `vpa--<n>` jumped to first from `FORWARD`, holding per
//!   local source container a `MARK --set-xmark TAG` rule, then per
//!   destination container and policy an `ACCEPT` rule matching destination
//!   address, protocol, port range and mark;
//! - after it, conntrack lets replies through (`ESTABLISHED,RELATED`), and a
//!   final `REJECT` refuses all other traffic to the container network.
//!
//! Every packet therefore walks the policy chain up to its `ACCEPT` rule (a
//! reply walks all of it). Policy changes rebuild the chain the way Cloud
//! Foundry does: a new chain filled with `iptables-restore --noflush`, a jump
//! to it inserted, the old jump deleted, the old chain flushed and deleted.
//! `iptables-legacy`, the x_tables backend Cloud Foundry's stemcells use.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use crate::netns::NetNs;

/// The container network the final REJECT covers (the silk overlay).
pub const OVERLAY: &str = "10.255.0.0/16";

/// One policy as the iptables rules see it on the destination's host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CfPolicy {
    pub source_tag: u32,
    pub destination: Ipv4Addr,
    pub protocol: &'static str,
    pub start: u16,
    pub end: u16,
}

/// The local containers (address, app tag) and the policies to enforce.
#[derive(Clone, Debug, Default)]
pub struct CfRuleSet {
    pub sources: Vec<(Ipv4Addr, u32)>,
    pub policies: Vec<CfPolicy>,
}

impl CfRuleSet {
    /// The rules of the policy chain `chain`, as `iptables-restore` lines.
    pub fn chain_rules(&self, chain: &str) -> Vec<String> {
        let marks = self.sources.iter().map(|(ip, tag)| {
            format!(
                "-A {chain} -s {ip}/32 -m comment --comment \"src:{tag}\" -j MARK --set-xmark {tag:#x}/0xffffffff"
            )
        });
        let accepts = self.policies.iter().map(|p| {
            format!(
                "-A {chain} -d {}/32 -p {proto} -m {proto} --dport {}:{} -m mark --mark {:#x} -m comment --comment \"src:{} dst:{}\" -j ACCEPT",
                p.destination,
                p.start,
                p.end,
                p.source_tag,
                p.source_tag,
                p.destination,
                proto = p.protocol,
            )
        });
        marks.chain(accepts).collect()
    }

    /// `iptables-restore --noflush` input filling `chain` (which exists).
    pub fn restore_input(&self, chain: &str) -> String {
        let mut text = String::from("*filter\n");
        for rule in self.chain_rules(chain) {
            text.push_str(&rule);
            text.push('\n');
        }
        text.push_str("COMMIT\n");
        text
    }
}

/// The enforcement of one host network namespace.
pub struct CfIptables<'a> {
    ns: &'a NetNs,
    generation: u32,
}

fn iptables(ns: &NetNs, args: &[&str]) {
    let out = ns.command("iptables-legacy").arg("-w").args(args).output().expect("iptables-legacy");
    assert!(
        out.status.success(),
        "iptables-legacy {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn restore(ns: &NetNs, input: &str) {
    let mut child = ns
        .command("iptables-legacy-restore")
        .args(["--noflush", "-w"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("iptables-legacy-restore");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write rules");
    let out = child.wait_with_output().expect("iptables-legacy-restore");
    assert!(out.status.success(), "iptables-restore: {}", String::from_utf8_lossy(&out.stderr));
}

impl<'a> CfIptables<'a> {
    /// The fixed rules (conntrack for replies, the final REJECT) and an
    /// empty policy chain. The namespace's FORWARD chain must be empty.
    pub fn install(ns: &'a NetNs) -> Self {
        let mut this = Self { ns, generation: 0 };
        iptables(ns, &["-N", &this.chain()]);
        iptables(ns, &["-A", "FORWARD", "-j", &this.chain()]);
        iptables(
            ns,
            &[
                "-A",
                "FORWARD",
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            ],
        );
        iptables(
            ns,
            &[
                "-A",
                "FORWARD",
                "-d",
                OVERLAY,
                "-j",
                "REJECT",
                "--reject-with",
                "icmp-port-unreachable",
            ],
        );
        this.generation = 0;
        this
    }

    fn chain(&self) -> String {
        format!("vpa--{}", self.generation)
    }

    /// Replaces the policy chain with one enforcing `set`, as Cloud Foundry
    /// does on every change.
    pub fn enforce(&mut self, set: &CfRuleSet) {
        let old = self.chain();
        self.generation += 1;
        let new = self.chain();
        iptables(self.ns, &["-N", &new]);
        restore(self.ns, &set.restore_input(&new));
        iptables(self.ns, &["-I", "FORWARD", "1", "-j", &new]);
        iptables(self.ns, &["-D", "FORWARD", "-j", &old]);
        iptables(self.ns, &["-F", &old]);
        iptables(self.ns, &["-X", &old]);
    }

    /// Rules in the namespace's filter table (for checks).
    pub fn rule_count(&self) -> usize {
        let out = self.ns.command("iptables-legacy").args(["-w", "-S"]).output().expect("iptables");
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("-A ")).count()
    }
}

/// Whether `iptables-legacy` works here (the x_tables backend is built in or
/// loadable).
pub fn available() -> bool {
    Command::new("iptables-legacy").args(["-w", "-S"]).output().is_ok_and(|o| o.status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_have_cloud_foundrys_shape() {
        let set = CfRuleSet {
            sources: vec![(Ipv4Addr::new(10, 255, 0, 1), 1)],
            policies: vec![CfPolicy {
                source_tag: 1,
                destination: Ipv4Addr::new(10, 255, 0, 2),
                protocol: "tcp",
                start: 8080,
                end: 8090,
            }],
        };
        assert_eq!(
            set.chain_rules("vpa--1"),
            [
                "-A vpa--1 -s 10.255.0.1/32 -m comment --comment \"src:1\" -j MARK --set-xmark 0x1/0xffffffff",
                "-A vpa--1 -d 10.255.0.2/32 -p tcp -m tcp --dport 8080:8090 -m mark --mark 0x1 -m comment --comment \"src:1 dst:10.255.0.2\" -j ACCEPT",
            ]
        );
        let input = set.restore_input("vpa--1");
        assert!(input.starts_with("*filter\n") && input.ends_with("COMMIT\n"));
    }
}
