//! `run` and `teardown`.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Args;
use policy_agent::{Dataplane, config::Config};

#[derive(Args)]
pub struct RunArgs {
    /// TOML configuration; without it, built-in defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// vxlan-policy-agent's own JSON config (as its BOSH job renders it):
    /// Cloud Foundry's policy server, certificates, poll intervals and
    /// container metadata store from it, in place of a `[cf]` section.
    #[arg(long, value_name = "FILE")]
    vxlan_policy_agent_config: Option<PathBuf>,
}

pub(super) fn load_config(path: Option<&PathBuf>) -> Result<Config> {
    let Some(path) = path else { return Ok(Config::default()) };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    Config::parse(&text).with_context(|| format!("invalid config {}", path.display()))
}

impl RunArgs {
    pub fn run(self) -> Result<()> {
        let mut config = load_config(self.config.as_ref())?;
        let mut ignored = Vec::new();
        if let Some(path) = &self.vxlan_policy_agent_config {
            if config.cf.is_some() {
                anyhow::bail!(
                    "--vxlan-policy-agent-config {} and a [cf] section both say where policies come from: give one",
                    path.display()
                );
            }
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let (cf, rest) = policy_agent::cf::vpa_config::from_vxlan_policy_agent(&text)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("invalid vxlan-policy-agent config {}", path.display()))?;
            config.cf = Some(cf);
            ignored = rest;
        }
        super::init_logging(&config.log_level);
        if !ignored.is_empty() {
            tracing::warn!(
                keys = ignored.join(", "),
                "vxlan-policy-agent config keys that do not apply to this agent (iptables, logging and metrics settings of vxlan-policy-agent): not used"
            );
        }
        crate::daemon::run(config)
    }
}

#[derive(Args)]
pub struct TeardownArgs {
    /// The configuration the agent ran with (for its pin directory).
    #[arg(long)]
    config: Option<PathBuf>,
}

impl TeardownArgs {
    pub fn run(self) -> Result<()> {
        let config = load_config(self.config.as_ref())?;
        Dataplane::remove_all(&config.pin_dir).with_context(|| {
            format!("failed to remove the pins under {}", config.pin_dir.display())
        })?;
        println!("detached and unpinned everything under {}", config.pin_dir.display());
        let lock_file = config.cf.as_ref().and_then(|cf| cf.iptables_lock_file.clone());
        match policy_agent::cf::iptables::remove(lock_file) {
            Ok(true) => println!(
                "removed the iptables chains {} and {} (cni-wrapper-plugin's rules hold alone again)",
                policy_agent::cf::iptables::CHAIN,
                policy_agent::cf::iptables::TO_CHAIN
            ),
            Ok(false) => {}
            Err(e) => anyhow::bail!("cannot remove the agent's iptables chains: {e}"),
        }
        Ok(())
    }
}
