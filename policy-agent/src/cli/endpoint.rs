//! `endpoint add|del` and `endpoints`.

use std::{net::Ipv4Addr, path::PathBuf};

use anyhow::Result;
use clap::Subcommand;
use policy_agent::{api::wire, client::Client, state::Endpoint};
use serde_json::Value;

use super::{JsonArgs, call};

#[derive(Subcommand)]
pub enum EndpointCommand {
    /// Register a container: its app, address and host-side veth; attaches
    /// the programs to the veth.
    Add {
        #[arg(long)]
        app: String,
        #[arg(long)]
        ip: Ipv4Addr,
        /// Host-side veth of the container.
        #[arg(long)]
        ifname: String,
        /// The container's network namespace.
        #[arg(long)]
        netns: Option<PathBuf>,
    },
    /// Remove a container: detaches and removes every entry naming it.
    Del {
        #[arg(long)]
        ip: Ipv4Addr,
    },
}

impl EndpointCommand {
    pub fn run(self, client: &Client) -> Result<()> {
        match self {
            EndpointCommand::Add { app, ip, ifname, netns } => {
                let body = wire::endpoint_json(&Endpoint {
                    ip,
                    app: app.clone(),
                    ifname: ifname.clone(),
                    netns,
                    host: None,
                });
                call(client, "POST", "/v1/endpoints", Some(&body))?;
                println!("endpoint {ip} of app {app} on {ifname}: OK");
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
        println!("{:<16} {:<16} {:<38} {}", text("ip"), text("ifname"), text("app"), text("netns"));
    }
    Ok(())
}
