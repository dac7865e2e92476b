//! `disendiff toy ...`: the synthetic world (being written).

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: ToyCommand,
}

#[derive(clap::Subcommand)]
pub enum ToyCommand {}

pub fn run(a: Args) -> Result<()> {
    match a.command {}
}
