//! `cluster status`, `cluster republish`.

use anyhow::Result;
use clap::{Args, Subcommand};
use policy_api::client::Client;
use serde_json::{Value, json};

use super::{JsonArgs, call};

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Every host, its underlay address, the change it has applied and its
    /// lag behind the newest (or how far it is ahead of etcd); whether the
    /// log in etcd diverged from this host's.
    Status(JsonArgs),
    /// After etcd's log went back, vanished or was replaced (`cluster
    /// status` says "diverged"): publish this host's state — what it
    /// enforces — as the newest, on the most advanced host. Every agent
    /// converges to it, make-before-break, and writes work again.
    Republish(RepublishArgs),
}

#[derive(Args)]
pub struct RepublishArgs {
    /// Republish even though another registered host applied newer
    /// changes (they are dropped).
    #[arg(long)]
    force: bool,
    /// Print the API's JSON.
    #[arg(long)]
    json: bool,
}

fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

/// `N behind` or `N ahead` of etcd's newest change.
fn lag(v: &Value) -> String {
    match v["lag"].as_u64() {
        Some(lag) => format!("{lag} behind"),
        None => format!("{} ahead", v["ahead"]),
    }
}

/// The first characters of a log id, or `-`.
fn log_id(v: &Value) -> String {
    v.as_str().map_or_else(|| "-".to_owned(), |id| id.chars().take(8).collect())
}

impl ClusterCommand {
    pub fn run(self, client: &Client) -> Result<()> {
        match self {
            ClusterCommand::Status(args) => status(&args, client),
            ClusterCommand::Republish(args) => republish(&args, client),
        }
    }
}

fn status(args: &JsonArgs, client: &Client) -> Result<()> {
    let Some(c) = args.get(client, "/v1/cluster")? else { return Ok(()) };
    if c["mode"] != "cluster" {
        println!("single host (no [cluster] section); applied change {}", c["applied"]["seq"]);
        return Ok(());
    }
    println!("this host:  {} ({})", text(&c["host"]), text(&c["underlay_address"]));
    println!("etcd:       {}", text(&c["etcd_endpoints"]));
    let position = if c["newest"].is_null() { String::new() } else { format!(", {}", lag(&c)) };
    println!(
        "applied:    change {} (etcd revision {}) of log {}{position}; state {:.1} s old",
        c["applied"]["seq"],
        c["applied"]["revision"],
        log_id(&c["log_id"]),
        c["state_age_seconds"].as_f64().unwrap_or(0.0)
    );
    if let Some(message) = c["diverged"]["message"].as_str() {
        println!("DIVERGED:   {message}");
        println!("            enforcement stays as this host last applied it; writes are refused");
    }
    if let Some(error) = c["error"].as_str() {
        println!("etcd:       {error}");
        return Ok(());
    }
    println!(
        "newest:     change {} (etcd revision {}) of log {}",
        c["newest"]["seq"],
        c["newest"]["revision"],
        log_id(&c["newest"]["log_id"])
    );
    println!(
        "{:<24} {:<16} {:<14} {:>9} {:>10}  log",
        "host", "underlay", "subnet", "applied", "lag"
    );
    for h in c["hosts"].as_array().into_iter().flatten() {
        let subnet = h["subnet"].as_str().map_or_else(|| "-".to_owned(), |s| format!("{s}/24"));
        let diverged =
            h["diverged"].as_str().map_or_else(String::new, |d| format!(" (diverged: {d})"));
        println!(
            "{:<24} {:<16} {:<14} {:>9} {:>10}  {}{diverged}",
            text(&h["host"]),
            text(&h["underlay_address"]),
            subnet,
            h["applied_seq"],
            lag(h),
            log_id(&h["log_id"]),
        );
    }
    Ok(())
}

fn republish(args: &RepublishArgs, client: &Client) -> Result<()> {
    let body = json!({"force": args.force});
    let r = call(client, "POST", "/v1/cluster/republish", Some(&body))?.body;
    if args.json {
        println!("{r}");
        return Ok(());
    }
    println!(
        "republished this host's state (it had applied change {} of log {}) as change {} of a \
         new log {}; every agent converges to it",
        r["previous"]["seq"],
        log_id(&r["previous"]["log_id"]),
        r["seq"],
        log_id(&r["log"]["id"]),
    );
    Ok(())
}
