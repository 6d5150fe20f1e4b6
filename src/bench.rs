//! `stagesync bench`: measures stagesync next to the servers' own raw limits, in one run.

#[derive(clap::Args, Debug)]
pub struct BenchArgs {}

pub async fn command(_args: BenchArgs) -> anyhow::Result<i32> {
    anyhow::bail!("bench is not implemented yet")
}
