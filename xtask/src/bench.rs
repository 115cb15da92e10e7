//! `cargo xtask bench` (being written).

use anyhow::Result;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

pub fn bench(_args: BenchArgs) -> Result<std::process::ExitCode> {
    anyhow::bail!("bench: not implemented yet")
}
