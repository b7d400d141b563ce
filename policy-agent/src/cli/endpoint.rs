//! `endpoint add|del` and `endpoints`.

use std::{net::IpAddr, path::PathBuf};

use anyhow::Result;
use clap::Subcommand;
use policy_agent::state::{PortMapping, Protocol};
use policy_api::client::Client;
use serde_json::Value;

use super::{JsonArgs, call};

#[derive(Subcommand)]
pub enum EndpointCommand {
    /// Register a container: its app, address and host-side veth; attaches
    /// the programs to the veth.
    Add {
        #[arg(long)]
        app: String,
        /// Its address; repeat for a dual-stack endpoint (one IPv4 and one
        /// IPv6 address).
        #[arg(long = "ip", required = true)]
        ips: Vec<IpAddr>,
        /// Host-side veth of the container.
        #[arg(long)]
        ifname: String,
        /// The container's network namespace.
        #[arg(long)]
        netns: Option<PathBuf>,
        /// NetIn: HOST_PORT:CONTAINER_PORT[/udp] (repeatable): the host's
        /// `netin_interfaces` addresses on HOST_PORT lead to the container.
        #[arg(long = "port-mapping", value_parser = parse_mapping)]
        port_mappings: Vec<PortMapping>,
    },
    /// Remove a container: detaches and removes every entry naming it.
    Del {
        /// Either of its addresses.
        #[arg(long)]
        ip: IpAddr,
    },
}

/// `61001:8080` or `61002:9000/udp`.
fn parse_mapping(text: &str) -> Result<PortMapping, String> {
    let (ports, protocol) = match text.split_once('/') {
        None => (text, Protocol::Tcp),
        Some((ports, "tcp")) => (ports, Protocol::Tcp),
        Some((ports, "udp")) => (ports, Protocol::Udp),
        Some((_, other)) => return Err(format!("protocol {other:?} is not tcp or udp")),
    };
    let bad = || format!("{text:?} is not HOST_PORT:CONTAINER_PORT[/udp]");
    let (host, container) = ports.split_once(':').ok_or_else(bad)?;
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad);
    Ok(PortMapping { host_port: port(host)?, container_port: port(container)?, protocol })
}

impl EndpointCommand {
    pub fn run(self, client: &Client) -> Result<()> {
        match self {
            EndpointCommand::Add { app, ips, ifname, netns, port_mappings } => {
                // The API checks the addresses (one per family, IPv4 needed).
                let ips: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
                let body = serde_json::json!({
                    "ips": ips,
                    "app": app,
                    "ifname": ifname,
                    "netns": netns,
                    "port_mappings": port_mappings,
                });
                call(client, "POST", "/v1/endpoints", Some(&body))?;
                println!("endpoint {} of app {app} on {ifname}: OK", ips.join(" "));
            }
            EndpointCommand::Del { ip } => {
                let reply = call(client, "DELETE", &format!("/v1/endpoints/{ip}"), None)?;
                if reply.body["removed"] == Value::Bool(true) {
                    println!("endpoint {ip} removed: OK");
                } else {
                    println!("endpoint {ip} was not registered: OK");
                }
            }
        }
        Ok(())
    }
}

pub fn list(args: &JsonArgs, client: &Client) -> Result<()> {
    let Some(body) = args.get(client, "/v1/endpoints")? else { return Ok(()) };
    println!("{:<16} {:<16} {:<38} netns", "ip", "ifname", "app");
    for e in body["endpoints"].as_array().into_iter().flatten() {
        let text = |k: &str| e[k].as_str().unwrap_or("-").to_owned();
        // Every address (IPv4 first), comma-separated.
        let ips: Vec<&str> =
            e["ips"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let ips = if ips.is_empty() { text("ip") } else { ips.join(",") };
        println!("{ips:<16} {:<16} {:<38} {}", text("ifname"), text("app"), text("netns"));
    }
    Ok(())
}
