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
}

pub(super) fn load_config(path: Option<&PathBuf>) -> Result<Config> {
    let Some(path) = path else { return Ok(Config::default()) };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    Config::parse(&text).with_context(|| format!("invalid config {}", path.display()))
}

impl RunArgs {
    pub fn run(self) -> Result<()> {
        let config = load_config(self.config.as_ref())?;
        super::init_logging(&config.log_level);
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
        Ok(())
    }
}
