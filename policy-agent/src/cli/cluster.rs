//! `cluster status`.

use anyhow::Result;
use clap::Subcommand;
use policy_agent::client::Client;

use super::JsonArgs;

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Every host, its underlay address, the change it has applied and its
    /// lag behind the newest.
    Status(JsonArgs),
}

impl ClusterCommand {
    pub fn run(self, client: &Client) -> Result<()> {
        let ClusterCommand::Status(args) = self;
        let Some(c) = args.get(client, "/v1/cluster")? else { return Ok(()) };
        if c["mode"] != "cluster" {
            println!("single host (no [cluster] section); applied change {}", c["applied"]["seq"]);
            return Ok(());
        }
        let text = |v: &serde_json::Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
        println!("this host:  {} ({})", text(&c["host"]), text(&c["underlay_address"]));
        println!("etcd:       {}", text(&c["etcd_endpoints"]));
        println!(
            "applied:    change {} (etcd revision {}), {} behind; state {:.1} s old",
            c["applied"]["seq"],
            c["applied"]["revision"],
            c["lag"],
            c["state_age_seconds"].as_f64().unwrap_or(0.0)
        );
        if let Some(error) = c["error"].as_str() {
            println!("etcd:       {error}");
            return Ok(());
        }
        println!(
            "newest:     change {} (etcd revision {})",
            c["newest"]["seq"], c["newest"]["revision"]
        );
        println!(
            "{:<24} {:<16} {:<14} {:>9} {:>6}",
            "host", "underlay", "subnet", "applied", "lag"
        );
        for h in c["hosts"].as_array().into_iter().flatten() {
            let subnet = h["subnet"].as_str().map_or_else(|| "-".to_owned(), |s| format!("{s}/24"));
            println!(
                "{:<24} {:<16} {:<14} {:>9} {:>6}",
                text(&h["host"]),
                text(&h["underlay_address"]),
                subnet,
                h["applied_seq"],
                h["lag"]
            );
        }
        Ok(())
    }
}
