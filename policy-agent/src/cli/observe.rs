//! `flows` and `explain`: what the dataplane decided, and why.

use std::net::IpAddr;

use anyhow::{Result, bail};
use clap::Args;
use policy_agent::api::wire;
use policy_api::client::Client;
use serde_json::Value;

use policy_agent::state::Protocol;

use super::call;

#[derive(Args)]
pub struct FlowsArgs {
    /// Keep streaming new events.
    #[arg(long)]
    follow: bool,
    /// Only denied packets.
    #[arg(long)]
    denied: bool,
    /// Only events whose source or destination is this app.
    #[arg(long)]
    app: Option<String>,
    /// Print the JSON lines as the agent logs them.
    #[arg(long)]
    json: bool,
}

/// One line per event for people.
fn human(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(line) else { return line.to_owned() };
    let p = &v["data"]["packet"];
    let app = |side: &str| {
        v["data"][side]["app_guid"].as_str().map(|a| format!(" ({a})")).unwrap_or_default()
    };
    let verdict = if p["allowed"] == Value::Bool(true) { "ALLOWED" } else { "DENIED " };
    format!(
        "{} {:<7} {verdict} {:<16} {} {}:{}{} -> {}:{}{}{}",
        v["timestamp"].as_str().unwrap_or("?"),
        p["direction"].as_str().unwrap_or("?"),
        p["reason"].as_str().unwrap_or("?"),
        p["protocol"].as_str().unwrap_or("?"),
        p["src_ip"].as_str().unwrap_or("?"),
        p["src_port"],
        app("source"),
        p["dst_ip"].as_str().unwrap_or("?"),
        p["dst_port"],
        app("destination"),
        v["data"]["policy_id"].as_u64().map(|id| format!(" policy {id}")).unwrap_or_default(),
    )
}

impl FlowsArgs {
    pub fn run(self, client: &Client) -> Result<()> {
        let mut query = vec![format!("follow={}", self.follow), format!("denied={}", self.denied)];
        if let Some(app) = &self.app {
            query.push(format!("app={}", super::policy::percent_encode(app)));
        }
        let path = format!("/v1/flows?{}", query.join("&"));
        let json = self.json;
        let status = client.stream_lines(&path, |line| {
            if !line.is_empty() {
                println!("{}", if json { line.to_owned() } else { human(line) });
            }
            true
        })?;
        if status != 200 {
            bail!("the agent answered HTTP {status}");
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct ExplainArgs {
    /// The source address (IPv4 or IPv6).
    src_ip: IpAddr,
    /// The destination address, of the source's family.
    dst_ip: IpAddr,
    /// tcp, udp, icmp or icmpv6.
    #[arg(value_enum)]
    protocol: Protocol,
    /// The destination port; for icmp, the ICMP type (8: echo request).
    port: u16,
    /// icmp only: the ICMP code (default 0).
    #[arg(long)]
    icmp_code: Option<u8>,
    /// The endpoint whose veth the packet leaves, if not SRC_IP's own
    /// (explains anti-spoofing drops).
    #[arg(long)]
    from: Option<IpAddr>,
    /// Print the API's JSON.
    #[arg(long)]
    json: bool,
}

impl ExplainArgs {
    pub fn run(self, client: &Client) -> Result<()> {
        let protocol = self.protocol.name();
        let mut path = if self.protocol.has_ports() {
            format!(
                "/v1/explain?src={}&dst={}&protocol={protocol}&port={}",
                self.src_ip, self.dst_ip, self.port
            )
        } else {
            format!(
                "/v1/explain?src={}&dst={}&protocol={protocol}&icmp_type={}&icmp_code={}",
                self.src_ip,
                self.dst_ip,
                self.port,
                self.icmp_code.unwrap_or(0)
            )
        };
        if let Some(from) = self.from {
            path.push_str(&format!("&from={from}"));
        }
        let answer = call(client, "GET", &path, None)?.body;
        if self.json {
            println!("{answer}");
            return Ok(());
        }
        let side = |s: &Value| {
            let app = s["app"]
                .as_str()
                .map(|a| format!("app {a}, tag {}", s["tag"].as_str().unwrap_or("?")));
            format!(
                "{} ({})",
                s["ip"].as_str().unwrap_or("?"),
                app.unwrap_or_else(|| "not a registered endpoint".into())
            )
        };
        println!("source:      {}", side(&answer["source"]));
        println!("destination: {}", side(&answer["destination"]));
        let policies: Vec<String> = answer["policies"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                format!(
                    "{} {} (policy {})",
                    p["protocol"].as_str().unwrap_or("?"),
                    wire::destination_text(p),
                    p["id"]
                )
            })
            .collect();
        if !policies.is_empty() {
            println!("policies:    {}", policies.join(", "));
        }
        if let Some(note) = answer["note"].as_str() {
            println!("note:        {note}");
        }
        println!("{}", answer["message"].as_str().unwrap_or("?"));
        Ok(())
    }
}
