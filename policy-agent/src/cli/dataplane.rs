//! `policy-agent dataplane ...`: drive the kernel dataplane directly, without
//! the daemon. Every command loads (or takes over) the pinned dataplane,
//! does its work and exits; enforcement stays because maps and links are
//! pinned.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};
use policy_agent::{
    Dataplane, DataplaneConfig,
    dataplane::{limits_clock_ns, nix_ifindex},
    state::{Protocol, parse_port_range},
};
use policy_common::{limits::address_key, maps::PairKey, ports::Allowance};

#[derive(Args)]
pub struct DataplaneArgs {
    /// Directory on bpffs for pinned maps and links (bpffs is mounted at
    /// /sys/fs/bpf if needed).
    #[arg(long, default_value = "/sys/fs/bpf/policy-agent", global = true)]
    pin_dir: PathBuf,
    #[command(subcommand)]
    command: DataplaneCommand,
}

#[derive(Subcommand)]
enum DataplaneCommand {
    /// Load the programs (taking over any pinned links without a gap) and pin
    /// the maps.
    Load,
    /// Register a container endpoint and attach the programs to its
    /// host-side veth.
    Attach {
        /// Host-side veth of the container.
        #[arg(long)]
        ifname: String,
        /// The container's IPv4 address.
        #[arg(long)]
        ip: Ipv4Addr,
        /// The numeric tag of the container's app.
        #[arg(long)]
        tag: u32,
    },
    /// Detach the programs from a veth and unregister its endpoint.
    Detach {
        #[arg(long)]
        ifname: String,
        #[arg(long)]
        ip: Ipv4Addr,
    },
    /// Allow SRC_TAG to reach DST_TAG on a protocol and port range.
    Allow(PolicyArgs),
    /// Remove an allowance added with `allow` (exact range); connections it
    /// allowed are cut at their next packet.
    Revoke(PolicyArgs),
    /// Show attachments, endpoints, allowances, counters.
    Status,
    /// Detach everything and remove every pin (enforcement stops).
    Unload,
}

#[derive(Args)]
struct PolicyArgs {
    #[arg(long)]
    src_tag: u32,
    #[arg(long)]
    dst_tag: u32,
    #[arg(long, value_enum)]
    protocol: Protocol,
    /// PORT or START-END, 1-65535.
    #[arg(long)]
    ports: String,
    /// Id recorded with the allowance (reported with tracked connections).
    #[arg(long, default_value_t = 0)]
    policy_id: u32,
}

impl PolicyArgs {
    fn key(&self) -> PairKey {
        PairKey::new(self.src_tag, self.dst_tag, self.protocol.number())
    }
}

impl DataplaneArgs {
    fn open(&self) -> Result<Dataplane> {
        Dataplane::open(&DataplaneConfig::new(&self.pin_dir)).with_context(|| {
            format!(
                "failed to load the dataplane with pins under {} - are you root?",
                self.pin_dir.display()
            )
        })
    }

    pub fn run(self) -> Result<()> {
        match &self.command {
            DataplaneCommand::Load => {
                let dataplane = self.open()?;
                println!("dataplane loaded; pinned under {}", dataplane.pin_dir().display());
            }
            DataplaneCommand::Attach { ifname, ip, tag } => {
                let mut dataplane = self.open()?;
                let ifindex = nix_ifindex(ifname)
                    .with_context(|| format!("interface {ifname} not found - is the container's veth created in this network namespace?"))?;
                let maps = dataplane.maps_mut();
                maps.set_endpoint(*ip, *tag)?;
                maps.set_veth(ifindex, *ip, *tag)?;
                dataplane.attach_veth(ifname).with_context(|| {
                    format!("failed to attach to {ifname} - is the interface up?")
                })?;
                println!("attached {ifname} ({ip}, tag {tag})");
            }
            DataplaneCommand::Detach { ifname, ip } => {
                let mut dataplane = self.open()?;
                dataplane.detach_veth(ifname)?;
                if let Some(ifindex) = nix_ifindex(ifname) {
                    dataplane.maps_mut().remove_veth(ifindex)?;
                }
                dataplane.maps_mut().remove_endpoint(*ip)?;
                let key = address_key(IpAddr::V4(*ip));
                dataplane.maps_mut().forget_limits(&[key].into(), limits_clock_ns())?;
                println!("detached {ifname} ({ip})");
            }
            DataplaneCommand::Allow(args) => {
                let (start, end) = parse_port_range("--ports", &args.ports)?;
                let mut dataplane = self.open()?;
                dataplane
                    .maps_mut()
                    .allow(args.key(), Allowance { start, end, policy_id: args.policy_id })?;
                println!(
                    "allowed tag {} -> tag {} {} {start}-{end}",
                    args.src_tag,
                    args.dst_tag,
                    protocol_name(args.key().protocol)
                );
            }
            DataplaneCommand::Revoke(args) => {
                let (start, end) = parse_port_range("--ports", &args.ports)?;
                let mut dataplane = self.open()?;
                dataplane.maps_mut().revoke(args.key(), start, end)?;
                println!(
                    "revoked tag {} -> tag {} {} {start}-{end}",
                    args.src_tag,
                    args.dst_tag,
                    protocol_name(args.key().protocol)
                );
            }
            DataplaneCommand::Status => {
                let dataplane = self.open()?;
                print_status(&dataplane)?;
            }
            DataplaneCommand::Unload => {
                Dataplane::remove_all(&self.pin_dir)?;
                println!("removed everything pinned under {}", self.pin_dir.display());
            }
        }
        Ok(())
    }
}

fn protocol_name(protocol: u32) -> &'static str {
    u8::try_from(protocol).ok().and_then(Protocol::from_number).map_or("?", Protocol::name)
}

fn print_status(dataplane: &Dataplane) -> Result<()> {
    let maps = dataplane.maps();
    println!("pins: {}", dataplane.pin_dir().display());
    println!("attached:");
    for link in dataplane.attachments()? {
        println!("  {link}");
    }
    println!("endpoints:");
    let mut endpoints = maps.endpoints();
    endpoints.sort_by_key(|(ip, _)| *ip);
    for (ip, endpoint) in endpoints {
        println!("  {ip:<15} tag {}", endpoint.tag);
    }
    println!("allowances:");
    let mut pairs = maps.pairs();
    pairs.sort_by_key(|(key, _)| *key);
    for (key, allowances) in pairs {
        for a in allowances {
            println!(
                "  tag {} -> tag {} {} {}-{} (policy {})",
                key.src_tag,
                key.dst_tag,
                protocol_name(key.protocol),
                a.start,
                a.end,
                a.policy_id
            );
        }
    }
    println!("tracked connections: {}", maps.connections().len());
    println!("epoch: {}", maps.epoch()?);
    println!("verdicts:");
    for (reason, count) in maps.verdicts()? {
        let verdict = if reason.passes() { "pass" } else { "drop" };
        println!("  {verdict} {:<17} {count}", reason.name());
    }
    Ok(())
}
