//! `state rebuild`: the operator's way out of a refused start.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::{Subcommand, ValueEnum};
use policy_agent::store::Journal;

#[derive(Subcommand)]
pub enum StateCommand {
    /// Rebuild the stored state after the agent refused to start on a
    /// damaged one: keeps the last good snapshot and the journal's whole
    /// records before the first damage, writes them as the new snapshot and
    /// moves the old journal aside. Run it with the agent stopped.
    Rebuild {
        /// The configuration the agent runs with (for its state directory).
        #[arg(long)]
        config: Option<PathBuf>,
        /// What to rebuild from.
        #[arg(long, value_enum)]
        from: From,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum From {
    /// The snapshot (`state.json`) plus the journal's records up to the damage.
    Snapshot,
}

impl StateCommand {
    pub fn run(self) -> Result<()> {
        let StateCommand::Rebuild { config, from: From::Snapshot } = self;
        let config = super::run::load_config(config.as_ref())?;
        if config.cluster.is_some() {
            bail!(
                "this agent runs in cluster mode: its state lives in etcd, rebuild the local \
                 copy by deleting {} and starting the agent",
                config.state_dir.join("cluster-state.json").display()
            );
        }
        let r = Journal::rebuild(&config.state_dir).with_context(|| {
            format!("cannot rebuild the state in {}", config.state_dir.display())
        })?;
        println!(
            "rebuilt {}: snapshot at change {} plus {} journal records = change {} ({} policies, {} endpoints)",
            config.state_dir.display(),
            r.snapshot_seq,
            r.replayed,
            r.seq,
            r.state.policy_count(),
            r.state.endpoints().count()
        );
        if let Some(damage) = r.damage {
            println!("dropped everything from the damage on: {damage}");
        }
        if let Some(moved) = r.moved {
            println!("the old journal is kept as {}", moved.display());
        }
        Ok(())
    }
}
