//! `policy-agent`: the command line of the policy dataplane.

mod cli;

use anyhow::Result;
use clap::Parser as _;

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    cli::Cli::parse().run()
}
