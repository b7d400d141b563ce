//! `add-network-policy`, `remove-network-policy`, `network-policies`: the
//! `cf` verbs, over the policy-server API.

use anyhow::Result;
use clap::Args;
use policy_agent::{
    api::wire,
    state::{IcmpTypes, Policy, Protocol, parse_port_range},
};
use policy_api::{
    client::Client,
    wire::{CountedPolicy, PolicyList},
};

use super::call;

#[derive(Args)]
pub struct PolicyArgs {
    /// The app that opens connections.
    source_app: String,
    /// The app that accepts them.
    #[arg(long)]
    destination_app: String,
    /// tcp, udp, or icmp (an extension of Cloud Foundry's verbs).
    #[arg(long, value_enum)]
    protocol: Protocol,
    /// PORT or START-END (1-65535); tcp and udp only.
    #[arg(long, required_if_eq_any([("protocol", "tcp"), ("protocol", "udp")]))]
    port: Option<String>,
    /// icmp only: the ICMP type allowed (8: echo request, as ping sends);
    /// without it, every ICMP message. Replies to an allowed request pass.
    #[arg(long, value_parser = clap::value_parser!(u8))]
    icmp_type: Option<u8>,
    /// icmp only: the ICMP code within --icmp-type; without it, any code.
    #[arg(long, requires = "icmp_type", value_parser = clap::value_parser!(u8))]
    icmp_code: Option<u8>,
    /// Allow only the platform TLS port (61443) fronting PORT, not PORT.
    #[arg(long)]
    tls_only: bool,
}

impl PolicyArgs {
    fn policy(&self) -> Result<Policy> {
        let (start, end) = if self.protocol.has_ports() {
            if self.icmp_type.is_some() {
                anyhow::bail!(
                    "--icmp-type is for --protocol icmp; {} policies take --port",
                    self.protocol.name()
                );
            }
            let port = self.port.as_deref().unwrap_or_default();
            parse_port_range("--port", port)?
        } else {
            if self.port.is_some() {
                anyhow::bail!(
                    "icmp policies have no ports: give --icmp-type (and --icmp-code), or neither for all ICMP"
                );
            }
            IcmpTypes { icmp_type: self.icmp_type, code: self.icmp_code }.range()
        };
        Ok(Policy {
            source: self.source_app.as_str().into(),
            destination: self.destination_app.as_str().into(),
            protocol: self.protocol,
            start,
            end,
            tls_only: self.tls_only,
        })
    }

    pub fn add(self, client: &Client) -> Result<()> {
        let policy = self.policy()?;
        let body = wire::policies_body(std::slice::from_ref(&policy));
        call(client, "POST", "/networking/v1/external/policies", Some(&body))?;
        println!(
            "Adding network policy from app {} to app {} ({} {}): OK",
            self.source_app,
            self.destination_app,
            self.protocol.name(),
            wire::policy_shape(&policy).destination.text()
        );
        Ok(())
    }

    pub fn remove(self, client: &Client) -> Result<()> {
        let body = wire::policies_body(&[self.policy()?]);
        call(client, "POST", "/networking/v1/external/policies/delete", Some(&body))?;
        println!(
            "Removing network policy from app {} to app {}: OK",
            self.source_app, self.destination_app
        );
        Ok(())
    }
}

#[derive(Args)]
pub struct ListArgs {
    /// Only policies of this source app.
    #[arg(long)]
    source: Option<String>,
    /// Print the API's JSON.
    #[arg(long)]
    json: bool,
    /// Add packet and byte counts per policy.
    #[arg(long)]
    stats: bool,
}

impl ListArgs {
    pub fn run(self, client: &Client) -> Result<()> {
        if self.stats {
            return self.stats(client);
        }
        let path = match &self.source {
            Some(source) => {
                format!("/networking/v1/external/policies?source_id={}", percent_encode(source))
            }
            None => "/networking/v1/external/policies".to_owned(),
        };
        let reply = call(client, "GET", &path, None)?;
        if self.json {
            println!("{}", reply.body);
            return Ok(());
        }
        let list: PolicyList = serde_json::from_value(reply.body)?;
        println!("{:<38} {:<38} {:<9} ports", "source", "destination", "protocol");
        for p in list.policies {
            let d = &p.destination;
            println!("{:<38} {:<38} {:<9} {}", p.source.id, d.id, d.protocol, d.text());
        }
        Ok(())
    }
}

/// Percent-encodes a query value (app ids are usually UUIDs, but need not be).
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl ListArgs {
    fn stats(&self, client: &Client) -> Result<()> {
        let reply = call(client, "GET", "/v1/policies/stats", None)?;
        let list: PolicyList<CountedPolicy> = serde_json::from_value(reply.body)?;
        let policies: Vec<CountedPolicy> = list
            .policies
            .into_iter()
            .filter(|p| self.source.as_deref().is_none_or(|s| p.policy.source.id == s))
            .collect();
        if self.json {
            println!("{}", wire::to_json(&PolicyList::from(policies)));
            return Ok(());
        }
        println!(
            "{:<6} {:<30} {:<30} {:<9} {:<12} {:>12} {:>14}",
            "id", "source", "destination", "protocol", "ports", "packets", "bytes"
        );
        for p in policies {
            let d = &p.policy.destination;
            println!(
                "{:<6} {:<30} {:<30} {:<9} {:<12} {:>12} {:>14}",
                p.id,
                p.policy.source.id,
                d.id,
                d.protocol,
                d.text(),
                p.packets,
                p.bytes
            );
        }
        Ok(())
    }
}
